//! A picture of one migration (`--timeline`): the report's samples, passes, escalations and phases drawn against
//! time as an SVG. Turning the report into plotting figures (seconds, MiB, label places) is PURE and tested with
//! tables; only [`write`] touches the file system. It must not read QEMU or change the report.
//!
//! The SVG is drawn with `plotters`' SVG backend and no font feature: text goes out as `<text>` elements for the
//! viewer to set, and label widths are plotters' own estimate, so no font files or system font libraries are needed.

use std::error::Error as StdError;
use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{self, MigrationReport, PhaseChange, Sample};

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("Cannot draw the timeline of {vm}")]
    Draw {
        vm: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("Cannot write the timeline to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Draws the migration as SVG text.
pub fn render(report: &MigrationReport) -> Result<String, TimelineError> {
    let timeline = Timeline::from_report(report);
    let mut svg = String::new();
    draw(&timeline, &mut svg).map_err(|source| TimelineError::Draw {
        vm: crate::text::printable(&report.vm).into_owned(),
        source,
    })?;
    Ok(svg)
}

/// Draws the migration and writes the SVG to `path`.
pub fn write(path: &Path, report: &MigrationReport) -> Result<(), TimelineError> {
    let svg = render(report)?;
    std::fs::write(path, svg).map_err(|source| TimelineError::Write {
        path: path.to_path_buf(),
        source,
    })
}

const MIB: f64 = 1024.0 * 1024.0;

const WIDTH_PX: u32 = 1100;
const HEIGHT_PX: u32 = 820;
const TITLE_FONT_PX: u32 = 20;
const LABEL_FONT_PX: u32 = 12;
const MARGIN_PX: u32 = 10;
const Y_LABEL_AREA_PX: u32 = 80;
const X_LABEL_AREA_PX: u32 = 34;
const PHASE_STRIP_PX: i32 = 44;
const REMAINING_PANEL_PX: i32 = 300;
const RATES_PANEL_PX: i32 = 250;
/// Label rows at the top of the remaining-data panel: the first for passes, the rest for escalations.
const ESCALATION_LABEL_ROWS: usize = 3;
const LABEL_ROW_PX: i32 = 15;
/// What a character of a label is taken to need, in pixels, when deciding whether labels would overlap.
const LABEL_CHAR_PX: f64 = 7.0;
/// The width of the plotting areas, which all panels share so their time axes line up.
const PLOT_WIDTH_PX: f64 = (WIDTH_PX - 2 * MARGIN_PX - Y_LABEL_AREA_PX) as f64;

/// A line broken where a figure is missing: each part is drawn on its own.
type Line = Vec<(f64, f64)>;

/// A moment worth a vertical line, with its label.
#[derive(Debug, Clone, PartialEq)]
struct Mark {
    at_s: f64,
    label: String,
}

/// A phase of the migration, from its start to the next phase's (or the end of the picture).
#[derive(Debug, Clone, PartialEq)]
struct Span {
    from_s: f64,
    to_s: f64,
    label: String,
}

/// The migration in plotting units: seconds, MiB, MiB/s and percent.
#[derive(Debug, Clone, PartialEq)]
struct Timeline {
    title: String,
    end_s: f64,
    sample_count: usize,
    remaining_mib: Vec<Line>,
    throughput_mib_per_s: Vec<Line>,
    dirty_rate_mib_per_s: Vec<Line>,
    throttle_pct: Vec<Line>,
    passes: Vec<Mark>,
    escalations: Vec<Mark>,
    phases: Vec<Span>,
}

impl Timeline {
    fn from_report(report: &MigrationReport) -> Timeline {
        let samples = &report.samples;
        let end_s = end_s(report);
        Timeline {
            title: title(report),
            end_s,
            sample_count: samples.len(),
            remaining_mib: lines(samples, |s| s.remaining_bytes as f64 / MIB),
            throughput_mib_per_s: lines(samples, |s| s.throughput_bytes_per_s / MIB),
            dirty_rate_mib_per_s: lines(samples, |s| s.dirty_rate_bytes_per_s / MIB),
            throttle_pct: lines(samples, |s| s.throttle_pct as f64),
            passes: pass_marks(samples),
            escalations: report
                .escalations
                .iter()
                .map(|e| Mark {
                    at_s: seconds(e.at_ms),
                    label: label_text(&report::action_name(&e.action)),
                })
                .collect(),
            phases: phase_spans(&report.phases, end_s),
        }
    }
}

fn seconds(at_ms: u64) -> f64 {
    at_ms as f64 / 1000.0
}

fn title(report: &MigrationReport) -> String {
    let mut title = format!(
        "{}: {} in {:.1} s",
        label_text(&report.vm),
        report::outcome_name(report.outcome),
        seconds(report.total_time_ms)
    );
    if let Some(downtime_ms) = report.downtime_ms {
        title.push_str(&format!(", downtime {downtime_ms} ms"));
    }
    title
}

/// Text fit for an SVG: what the terminal would escape is escaped, and the two characters XML forbids that a Rust
/// string can hold are replaced.
fn label_text(s: &str) -> String {
    crate::text::printable(s).replace(['\u{fffe}', '\u{ffff}'], "\u{fffd}")
}

/// The right end of the time axis: the last thing the report tells of, and at least a second so the axis has a
/// width.
fn end_s(report: &MigrationReport) -> f64 {
    let last_ms = report
        .samples
        .iter()
        .map(|s| s.at_ms)
        .chain(report.escalations.iter().map(|e| e.at_ms))
        .chain(report.phases.iter().map(|p| p.at_ms))
        .chain([report.total_time_ms])
        .max()
        .unwrap_or(0);
    seconds(last_ms).max(1.0)
}

/// One figure of every sample against time, broken where the figure is not a number (QEMU reports no rate before
/// a pass ends) so no line is drawn across the gap.
fn lines(samples: &[Sample], figure: impl Fn(&Sample) -> f64) -> Vec<Line> {
    let mut out: Vec<Line> = Vec::new();
    let mut current: Line = Vec::new();
    for s in samples {
        let y = figure(s);
        if y.is_finite() {
            current.push((seconds(s.at_ms), y));
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Where a new pass begins: the first sample whose pass differs from the one before.
fn pass_marks(samples: &[Sample]) -> Vec<Mark> {
    samples
        .windows(2)
        .filter(|w| w[0].pass != w[1].pass)
        .map(|w| Mark {
            at_s: seconds(w[1].at_ms),
            label: format!("pass {}", w[1].pass),
        })
        .collect()
}

/// The phases as spans; a phase repeated (to record another reason) does not start a new span.
fn phase_spans(phases: &[PhaseChange], end_s: f64) -> Vec<Span> {
    let mut starts: Vec<(f64, &str)> = Vec::new();
    for p in phases {
        if starts.last().is_none_or(|(_, name)| *name != p.phase) {
            starts.push((seconds(p.at_ms), &p.phase));
        }
    }
    let ends = starts.iter().skip(1).map(|(at_s, _)| *at_s).chain([end_s]);
    starts
        .iter()
        .zip(ends)
        .map(|((from_s, name), to_s)| Span {
            from_s: *from_s,
            to_s,
            label: label_text(name),
        })
        .collect()
}

/// Which side of its line a label goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Right,
    /// Near the end of the time axis, where a label on the right would run off the picture.
    Left,
}

/// Where each mark's label goes: the first of `rows` rows where it does not overlap the label before it (`None`
/// when no row has room), and the side of its line.
fn label_places(marks: &[Mark], end_s: f64, rows: usize) -> Vec<(Option<usize>, Side)> {
    let mut free_from_s = vec![f64::NEG_INFINITY; rows];
    marks
        .iter()
        .map(|m| {
            let width_s = label_width_s(&m.label, end_s);
            let (side, from_s) = if m.at_s + width_s <= end_s {
                (Side::Right, m.at_s)
            } else {
                (Side::Left, m.at_s - width_s)
            };
            let row = free_from_s.iter().position(|&free_s| free_s <= from_s);
            if let Some(r) = row {
                free_from_s[r] = from_s + width_s;
            }
            (row, side)
        })
        .collect()
}

/// How much of the time axis a label takes, with a little space around it.
fn label_width_s(label: &str, end_s: f64) -> f64 {
    (label.chars().count() as f64 + 1.0) * LABEL_CHAR_PX * end_s / PLOT_WIDTH_PX
}

/// The value axis for some lines: from zero (none of the figures can be below) to a little above the highest,
/// never empty and never infinite.
fn value_range(lines: &[&[Line]], at_least_max: f64) -> Range<f64> {
    let values = lines.iter().flat_map(|l| l.iter()).flatten().map(|p| p.1);
    let max = values.fold(at_least_max, f64::max);
    let top = max * 1.05;
    let top = if top.is_finite() { top } else { max };
    if top > 0.0 {
        0.0..top
    } else {
        0.0..1.0
    }
}

/// A tick label short enough for the axis, whatever the size of the number.
fn axis_number(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(1e-2..1e6).contains(&magnitude) {
        format!("{v:.1e}")
    } else if magnitude >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let two_places = format!("{v:.2}");
        two_places
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

type DrawError = Box<dyn StdError + Send + Sync>;
type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type PlotArea<'b> = DrawingArea<SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

const REMAINING_COLOUR: RGBColor = RGBColor(31, 119, 180);
const THROUGHPUT_COLOUR: RGBColor = RGBColor(44, 160, 44);
const DIRTY_RATE_COLOUR: RGBColor = RGBColor(255, 127, 14);
const THROTTLE_COLOUR: RGBColor = RGBColor(148, 103, 189);
const PASS_COLOUR: RGBColor = RGBColor(150, 150, 150);
const ESCALATION_COLOUR: RGBColor = RGBColor(214, 39, 40);
const PHASE_COLOURS: [RGBColor; 4] = [
    RGBColor(222, 235, 247),
    RGBColor(254, 230, 206),
    RGBColor(229, 245, 224),
    RGBColor(239, 237, 245),
];

/// One series of a panel: its legend name, colour and lines.
struct Series<'t> {
    name: &'static str,
    colour: RGBColor,
    lines: &'t [Line],
}

/// One panel of values against time.
struct Panel<'t> {
    y_desc: &'static str,
    series: Vec<Series<'t>>,
    at_least_max: f64,
    x_desc: Option<&'static str>,
}

fn draw(t: &Timeline, svg: &mut String) -> Result<(), DrawError> {
    let root = SVGBackend::with_string(svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.titled(&t.title, ("sans-serif", TITLE_FONT_PX))?;
    let (strip, rest) = body.split_vertically(PHASE_STRIP_PX);
    let (remaining_area, rest) = rest.split_vertically(REMAINING_PANEL_PX);
    let (rates_area, throttle_area) = rest.split_vertically(RATES_PANEL_PX);

    draw_phase_strip(&strip, t)?;
    let remaining = draw_panel(&remaining_area, t, &remaining_panel(t))?;
    draw_mark_labels(&remaining, t)?;
    if t.sample_count == 0 {
        draw_no_samples(&remaining)?;
    }
    draw_panel(&rates_area, t, &rates_panel(t))?;
    draw_panel(&throttle_area, t, &throttle_panel(t))?;
    root.present()?;
    Ok(())
}

fn remaining_panel(t: &Timeline) -> Panel<'_> {
    Panel {
        y_desc: "remaining (MiB)",
        series: vec![Series {
            name: "remaining",
            colour: REMAINING_COLOUR,
            lines: &t.remaining_mib,
        }],
        at_least_max: 1.0,
        x_desc: None,
    }
}

fn rates_panel(t: &Timeline) -> Panel<'_> {
    Panel {
        y_desc: "rate (MiB/s)",
        series: vec![
            Series {
                name: "throughput",
                colour: THROUGHPUT_COLOUR,
                lines: &t.throughput_mib_per_s,
            },
            Series {
                name: "dirty rate",
                colour: DIRTY_RATE_COLOUR,
                lines: &t.dirty_rate_mib_per_s,
            },
        ],
        at_least_max: 1.0,
        x_desc: None,
    }
}

fn throttle_panel(t: &Timeline) -> Panel<'_> {
    Panel {
        y_desc: "vCPU throttle (%)",
        series: vec![Series {
            name: "vCPU throttle",
            colour: THROTTLE_COLOUR,
            lines: &t.throttle_pct,
        }],
        at_least_max: 100.0,
        x_desc: Some("time (s)"),
    }
}

/// One panel: its axes, a vertical line at every pass and escalation, and its series.
fn draw_panel<'a, 'b>(
    area: &'a Area<'b>,
    t: &Timeline,
    panel: &Panel<'_>,
) -> Result<Chart<'a, 'b>, DrawError> {
    let all_lines: Vec<&[Line]> = panel.series.iter().map(|s| s.lines).collect();
    let y_range = value_range(&all_lines, panel.at_least_max);
    let mut chart = ChartBuilder::on(area)
        .margin(MARGIN_PX)
        .x_label_area_size(X_LABEL_AREA_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(0.0..t.end_s, y_range)?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(panel.y_desc)
        .y_label_formatter(&|v| axis_number(*v))
        .x_label_formatter(&|v| axis_number(*v))
        .light_line_style(TRANSPARENT);
    if let Some(x_desc) = panel.x_desc {
        mesh.x_desc(x_desc);
    }
    mesh.draw()?;
    draw_mark_lines(&mut chart, t)?;
    draw_series(&mut chart, &panel.series)?;
    Ok(chart)
}

fn draw_mark_lines(chart: &mut Chart<'_, '_>, t: &Timeline) -> Result<(), DrawError> {
    let y_range = chart.y_range();
    let vertical = |at_s: f64| vec![(at_s, y_range.start), (at_s, y_range.end)];
    chart.draw_series(
        t.passes
            .iter()
            .map(|m| PathElement::new(vertical(m.at_s), PASS_COLOUR.mix(0.6))),
    )?;
    chart.draw_series(
        t.escalations
            .iter()
            .map(|m| PathElement::new(vertical(m.at_s), ESCALATION_COLOUR)),
    )?;
    Ok(())
}

/// Each series as lines, with a dot for a lone point (a line of one point draws nothing), and a legend when the
/// panel has more than one series.
fn draw_series<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    series: &[Series<'_>],
) -> Result<(), DrawError> {
    for s in series {
        let colour = s.colour;
        for line in s.lines {
            chart.draw_series(LineSeries::new(
                line.iter().copied(),
                colour.stroke_width(2),
            ))?;
        }
        chart
            .draw_series(
                s.lines
                    .iter()
                    .filter(|line| line.len() == 1)
                    .map(|line| Circle::new(line[0], 3, colour.filled())),
            )?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", LABEL_FONT_PX))
            .draw()?;
    }
    Ok(())
}

/// "pass N" in the top row wherever there is room, each escalation's action in the rows below (overlapping an
/// earlier one if it must: an escalation is never left unnamed).
fn draw_mark_labels(chart: &Chart<'_, '_>, t: &Timeline) -> Result<(), DrawError> {
    let top = chart.y_range().end;
    let area = chart.plotting_area();
    let pass_style = ("sans-serif", LABEL_FONT_PX)
        .into_font()
        .color(&PASS_COLOUR);
    for (mark, (row, side)) in t.passes.iter().zip(label_places(&t.passes, t.end_s, 1)) {
        if row.is_some() {
            draw_label(area, mark, (top, 0), side, &pass_style)?;
        }
    }
    let escalation_style = ("sans-serif", LABEL_FONT_PX)
        .into_font()
        .color(&ESCALATION_COLOUR);
    let places = label_places(&t.escalations, t.end_s, ESCALATION_LABEL_ROWS);
    for (i, (mark, (row, side))) in t.escalations.iter().zip(places).enumerate() {
        let row = row.unwrap_or(i % ESCALATION_LABEL_ROWS) + 1;
        draw_label(area, mark, (top, row), side, &escalation_style)?;
    }
    Ok(())
}

/// A label beside its mark's line, `row` rows below `top`.
fn draw_label(
    area: &PlotArea<'_>,
    mark: &Mark,
    (top, row): (f64, usize),
    side: Side,
    style: &TextStyle<'_>,
) -> Result<(), DrawError> {
    let below_top_px = 3 + LABEL_ROW_PX * i32::try_from(row).unwrap_or(0);
    let (beside_px, h_pos) = match side {
        Side::Right => (4, HPos::Left),
        Side::Left => (-4, HPos::Right),
    };
    let style = style.pos(Pos::new(h_pos, VPos::Top));
    area.draw(
        &(EmptyElement::at((mark.at_s, top))
            + Text::new(mark.label.clone(), (beside_px, below_top_px), style)),
    )?;
    Ok(())
}

fn draw_no_samples(chart: &Chart<'_, '_>) -> Result<(), DrawError> {
    let x = chart.x_range();
    let y = chart.y_range();
    let centre = ((x.start + x.end) / 2.0, (y.start + y.end) / 2.0);
    let style = ("sans-serif", TITLE_FONT_PX)
        .into_font()
        .color(&BLACK.mix(0.6))
        .pos(Pos::new(HPos::Center, VPos::Center));
    chart
        .plotting_area()
        .draw(&Text::new("no samples", centre, style))?;
    Ok(())
}

/// The phases as coloured bands along the time axis, each named where its name fits in its band.
fn draw_phase_strip(area: &Area<'_>, t: &Timeline) -> Result<(), DrawError> {
    let mut chart = ChartBuilder::on(area)
        .margin_left(MARGIN_PX)
        .margin_right(MARGIN_PX)
        .margin_top(MARGIN_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(0.0..t.end_s, 0.0..1.0)?;
    chart.draw_series(t.phases.iter().enumerate().map(|(i, span)| {
        let colour = PHASE_COLOURS[i % PHASE_COLOURS.len()];
        Rectangle::new([(span.from_s, 0.0), (span.to_s, 1.0)], colour.filled())
    }))?;
    let style = ("sans-serif", LABEL_FONT_PX)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let named = t
        .phases
        .iter()
        .filter(|span| span.to_s - span.from_s >= label_width_s(&span.label, t.end_s));
    chart.draw_series(named.map(|span| {
        EmptyElement::at((span.from_s, 0.5)) + Text::new(span.label.clone(), (4, 0), style.clone())
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::migrate::ladder::{Action, AutoConverge, LadderSettings, OnTimeout, Postcopy};
    use crate::report::{Escalation, FinalState, Outcome, ReportSettings};

    fn report(samples: Vec<Sample>, escalations: Vec<Escalation>) -> MigrationReport {
        let settings = ReportSettings {
            ladder: LadderSettings {
                downtime: Duration::from_millis(300),
                max_downtime: Duration::from_secs(2),
                timeout: Duration::from_secs(600),
                auto_converge: AutoConverge::Auto,
                max_throttle_pct: 99,
                postcopy: Postcopy::Fallback,
                on_timeout: OnTimeout::Cancel,
            },
            bandwidth_bytes_per_s: 0,
        };
        MigrationReport {
            outcome: Outcome::Completed,
            total_time_ms: samples.last().map_or(0, |s| s.at_ms + 200),
            downtime_ms: Some(120),
            ram_bytes: 4 << 30,
            passes: samples.last().map_or(0, |s| s.pass),
            escalations,
            final_state: FinalState {
                source: "postmigrate".into(),
                destination: "running".into(),
                guest_shutdown: false,
                running_copies: 1,
            },
            phases: vec![
                phase(0, "checks"),
                phase(50, "set-up"),
                phase(100, "precopy"),
                phase(100, "precopy"),
            ],
            samples,
            qemu_source: "9.2.0".into(),
            qemu_destination: "9.2.0".into(),
            ..MigrationReport::new(
                "web-1".into(),
                "unix:/run/src.qmp".into(),
                "unix:/run/dst.qmp".into(),
                "tcp:127.0.0.1:4444".into(),
                settings,
            )
        }
    }

    fn phase(at_ms: u64, name: &str) -> PhaseChange {
        PhaseChange {
            at_ms,
            phase: name.into(),
            why: None,
        }
    }

    fn sample(at_ms: u64, pass: u64, remaining_mib: u64, rate_mib_per_s: f64) -> Sample {
        Sample {
            at_ms,
            status: "active".into(),
            pass,
            remaining_bytes: remaining_mib << 20,
            throughput_bytes_per_s: rate_mib_per_s * MIB,
            dirty_rate_bytes_per_s: rate_mib_per_s * MIB / 2.0,
            throttle_pct: pass * 10,
            downtime_limit_ms: 300,
            ..Sample::default()
        }
    }

    fn escalation(at_ms: u64, pass: u64, action: Action) -> Escalation {
        Escalation {
            at_ms,
            pass,
            action,
            reason: "stalled".into(),
        }
    }

    fn three_passes() -> Vec<Sample> {
        (0..30)
            .map(|i| sample(i * 500, 1 + i / 10, 4096 - i * 100, 900.0))
            .collect()
    }

    fn three_escalations() -> Vec<Escalation> {
        vec![
            escalation(
                5_000,
                2,
                Action::RaiseDowntime {
                    to: Duration::from_millis(600),
                },
            ),
            escalation(
                6_000,
                2,
                Action::Throttle {
                    initial_pct: 30,
                    increment_pct: 20,
                    max_pct: 99,
                },
            ),
            escalation(10_000, 3, Action::StartPostcopy),
        ]
    }

    /// The trimmed content of every `<text>` element; panics unless the SVG is well-formed with an `svg` root.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.tag_name().name() == "text")
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    #[test]
    fn renders_well_formed_svg_naming_passes_and_escalations() {
        let huge = vec![
            Sample {
                remaining_bytes: u64::MAX,
                throughput_bytes_per_s: f64::MAX,
                dirty_rate_bytes_per_s: f64::NAN,
                throttle_pct: u64::MAX,
                ..sample(0, 1, 0, 0.0)
            },
            Sample {
                throughput_bytes_per_s: f64::INFINITY,
                dirty_rate_bytes_per_s: f64::NEG_INFINITY,
                ..sample(u64::MAX / 2, 2, 1, 1.0)
            },
        ];
        let mut hostile_name = report(three_passes(), Vec::new());
        hostile_name.vm = "a<b>&\"c\u{1b}\u{ffff}".into();
        #[rustfmt::skip]
        let cases: Vec<(&str, MigrationReport, Vec<&str>, Vec<&str>)> = vec![
            ("no samples", report(Vec::new(), Vec::new()),
             vec!["no samples", "web-1: completed in 0.0 s, downtime 120 ms", "checks"], vec!["pass 2"]),
            ("one sample", report(vec![sample(0, 1, 100, 50.0)], Vec::new()),
             vec!["remaining (MiB)", "rate (MiB/s)", "throughput", "dirty rate", "vCPU throttle (%)", "time (s)", "precopy"],
             vec!["no samples", "pass 1", "pass 2"]),
            ("passes and escalations", report(three_passes(), three_escalations()),
             vec!["pass 2", "pass 3", "downtime 600ms", "throttle", "postcopy"], vec!["no samples"]),
            ("escalations with no samples around them",
             report(Vec::new(), vec![escalation(5_000, 0, Action::Cancel), escalation(7_000, 0, Action::PauseSource)]),
             vec!["no samples", "cancel", "pause source"], vec![]),
            ("huge and non-finite figures", report(huge, three_escalations()),
             vec!["pass 2", "downtime 600ms", "throttle", "postcopy"], vec![]),
            ("a name with markup and control characters", hostile_name,
             vec!["a<b>&\"c\\x1b\u{fffd}: completed in 14.7 s, downtime 120 ms"], vec![]),
        ];
        for (name, report, wanted, unwanted) in cases {
            let svg = render(&report).unwrap_or_else(|e| panic!("{name}: {e}"));
            let texts = texts(&svg);
            for w in wanted {
                assert!(
                    texts.iter().any(|t| t == w),
                    "{name}: no text {w:?} in {texts:?}"
                );
            }
            for u in unwanted {
                assert!(
                    !texts.iter().any(|t| t == u),
                    "{name}: text {u:?} in {texts:?}"
                );
            }
            assert!(
                !svg.contains("NaN") && !svg.contains("inf"),
                "{name}: a non-number in the SVG"
            );
        }
    }

    #[test]
    fn lines_break_where_a_figure_is_not_a_number() {
        let at = |at_ms, rate| Sample {
            at_ms,
            dirty_rate_bytes_per_s: rate,
            ..Sample::default()
        };
        #[rustfmt::skip]
        let cases: Vec<(Vec<Sample>, Vec<Line>)> = vec![
            (vec![], vec![]),
            (vec![at(0, 1.0)], vec![vec![(0.0, 1.0)]]),
            (vec![at(0, f64::NAN), at(1000, 2.0), at(2000, 3.0)], vec![vec![(1.0, 2.0), (2.0, 3.0)]]),
            (vec![at(0, 1.0), at(1000, f64::INFINITY), at(2000, 3.0)], vec![vec![(0.0, 1.0)], vec![(2.0, 3.0)]]),
            (vec![at(0, 1.0), at(1000, f64::NAN), at(2000, f64::NEG_INFINITY)], vec![vec![(0.0, 1.0)]]),
        ];
        for (samples, want) in cases {
            assert_eq!(
                lines(&samples, |s| s.dirty_rate_bytes_per_s),
                want,
                "{samples:?}"
            );
        }
    }

    #[test]
    fn pass_marks_where_the_pass_changes() {
        let at = |at_ms, pass| Sample {
            at_ms,
            pass,
            ..Sample::default()
        };
        let mark = |at_s, label: &str| Mark {
            at_s,
            label: label.into(),
        };
        #[rustfmt::skip]
        let cases: Vec<(Vec<Sample>, Vec<Mark>)> = vec![
            (vec![], vec![]),
            (vec![at(0, 1)], vec![]),
            (vec![at(0, 1), at(500, 1)], vec![]),
            (vec![at(0, 1), at(500, 2), at(1000, 2), at(1500, 4)], vec![mark(0.5, "pass 2"), mark(1.5, "pass 4")]),
            // An adopted migration may be seen from any pass on.
            (vec![at(0, 7), at(250, 8)], vec![mark(0.25, "pass 8")]),
        ];
        for (samples, want) in cases {
            assert_eq!(pass_marks(&samples), want, "{samples:?}");
        }
    }

    #[test]
    fn phase_spans_run_to_the_next_phase_and_merge_repeats() {
        let span = |from_s, to_s, label: &str| Span {
            from_s,
            to_s,
            label: label.into(),
        };
        #[rustfmt::skip]
        let cases: Vec<(Vec<PhaseChange>, f64, Vec<Span>)> = vec![
            (vec![], 1.0, vec![]),
            (vec![phase(0, "checks")], 3.0, vec![span(0.0, 3.0, "checks")]),
            (vec![phase(0, "checks"), phase(1000, "precopy"), phase(1500, "precopy"), phase(2000, "verified")], 4.0,
             vec![span(0.0, 1.0, "checks"), span(1.0, 2.0, "precopy"), span(2.0, 4.0, "verified")]),
        ];
        for (phases, end_s, want) in cases {
            assert_eq!(phase_spans(&phases, end_s), want, "{phases:?}");
        }
    }

    type Places = Vec<(Option<usize>, Side)>;

    #[test]
    fn labels_take_the_first_row_with_room_and_stay_on_the_picture() {
        // At an axis of 101 s, a label of "pass N" takes 7 characters of 7 px: 4.9 s.
        let marks = |ats: &[f64]| -> Vec<Mark> {
            ats.iter()
                .map(|&at_s| Mark {
                    at_s,
                    label: "pass 9".into(),
                })
                .collect()
        };
        use Side::{Left, Right};
        #[rustfmt::skip]
        let cases: Vec<(Vec<f64>, usize, Places)> = vec![
            (vec![], 2, vec![]),
            (vec![0.0, 5.0, 10.0], 1, vec![(Some(0), Right), (Some(0), Right), (Some(0), Right)]),
            (vec![0.0, 2.0, 4.0], 1, vec![(Some(0), Right), (None, Right), (None, Right)]),
            (vec![0.0, 2.0, 4.0, 6.0], 2, vec![(Some(0), Right), (Some(1), Right), (None, Right), (Some(0), Right)]),
            (vec![0.0], 0, vec![(None, Right)]),
            // Past 96.1 s the label would run off the axis: it goes left of its line, and then needs room there.
            (vec![90.0, 100.0], 1, vec![(Some(0), Right), (Some(0), Left)]),
            (vec![93.0, 100.0], 1, vec![(Some(0), Right), (None, Left)]),
        ];
        for (ats, rows, want) in cases {
            let got = label_places(&marks(&ats), 101.0, rows);
            assert_eq!(got, want, "{ats:?} in {rows} rows");
        }
    }

    #[test]
    fn value_ranges_are_finite_and_not_empty() {
        #[rustfmt::skip]
        let cases: Vec<(Vec<Line>, f64, Range<f64>)> = vec![
            (vec![], 1.0, 0.0..1.05),
            (vec![], 0.0, 0.0..1.0),
            (vec![vec![(0.0, 200.0)]], 100.0, 0.0..210.0),
            (vec![vec![(0.0, -10.0)], vec![(1.0, 10.0)]], 1.0, 0.0..10.5),
            (vec![vec![(0.0, f64::MAX)]], 1.0, 0.0..f64::MAX),
        ];
        for (lines, at_least_max, want) in cases {
            let got = value_range(&[&lines], at_least_max);
            assert!(
                (got.start - want.start).abs() <= 1e-9
                    && (got.end - want.end).abs() <= 1e-9 * want.end.abs(),
                "{lines:?}: {got:?}, not {want:?}"
            );
        }
    }

    #[test]
    fn axis_numbers_stay_short() {
        #[rustfmt::skip]
        let cases = [
            (0.0, "0"), (5.0, "5"), (2.5, "2.5"), (0.25, "0.25"), (0.999_999_9, "1"), (150.5, "150"), (999_999.0, "999999"),
            (1.5e6, "1.5e6"), (f64::MAX, "1.8e308"), (0.001, "1.0e-3"), (-250.0, "-250"),
        ];
        for (v, want) in cases {
            assert_eq!(axis_number(v), want, "{v}");
        }
    }

    #[test]
    fn write_puts_the_svg_in_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("timeline.svg");
        write(&path, &report(three_passes(), three_escalations())).expect("written");
        let svg = std::fs::read_to_string(&path).expect("read back");
        assert!(texts(&svg).iter().any(|t| t == "downtime 600ms"));
    }

    #[test]
    fn write_into_a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("no-such-directory").join("timeline.svg");
        let err = write(&path, &report(Vec::new(), Vec::new())).expect_err("no directory");
        assert!(matches!(err, TimelineError::Write { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
