//! `qmigrate top`: a live, virt-top-like terminal view of VMs and their host. Owns the view model (rows built from
//! a [`Snapshot`]), its sort, the key handling and the drawing into a ratatui [`Frame`] — all PURE, no I/O and no
//! tokio — and the I/O loop [`run`] that owns the terminal. It only displays: sampling is
//! [`crate::stats::sample_round`]'s job and classification [`crate::classify`]'s; it must not talk QMP itself.

use std::cmp::Ordering;
use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytesize::ByteSize;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::stats::name::Names;
use crate::stats::{SampleOptions, Snapshot};
use crate::text::printable;

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("no VM socket to watch")]
    NoSockets,
    #[error("stdout is not a terminal")]
    NotATerminal,
    #[error("cannot set up the terminal")]
    Terminal(#[source] io::Error),
    #[error("cannot draw on the terminal")]
    Draw(#[source] io::Error),
    #[error("cannot read the keyboard")]
    Input(#[source] io::Error),
    #[error("the sampling task died")]
    Sampler,
}

// ---------------------------------------------------------------------------------------------------------------
// PURE: the row model
// ---------------------------------------------------------------------------------------------------------------

/// One VM as the view shows it. Figures stay numbers (for sorting) until drawn; `None` is "not measured".
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    /// What the VM is called ([`crate::stats::name`]): the given name, else QEMU's `-name`, else the socket's file
    /// name. The socket is in `socket`.
    pub name: String,
    pub socket: String,
    /// QEMU's run state, `error` when the VM could not be sampled, `…` before the first round ends.
    pub state: String,
    /// Share of the VM's vCPU capacity (100 = every vCPU busy).
    pub cpu_pct: Option<f64>,
    /// Each vCPU in % of one host CPU, by vCPU index.
    pub vcpu_pcts: Vec<Option<f64>>,
    pub ram_bytes: Option<u64>,
    /// What the guest itself says is available (virtio-balloon statistics), when it has said so.
    pub guest_available_bytes: Option<u64>,
    pub dirty_bytes_per_s: Option<f64>,
    pub net_rx_bytes_per_s: Option<f64>,
    pub net_tx_bytes_per_s: Option<f64>,
    pub disk_read_bytes_per_s: Option<f64>,
    pub disk_write_bytes_per_s: Option<f64>,
    pub classes: Vec<String>,
    pub error: Option<String>,
}

impl VmRow {
    fn blank(name: &str, socket: &str, state: &str) -> VmRow {
        VmRow {
            name: name.to_string(),
            socket: socket.to_string(),
            state: state.to_string(),
            cpu_pct: None,
            vcpu_pcts: Vec::new(),
            ram_bytes: None,
            guest_available_bytes: None,
            dirty_bytes_per_s: None,
            net_rx_bytes_per_s: None,
            net_tx_bytes_per_s: None,
            disk_read_bytes_per_s: None,
            disk_write_bytes_per_s: None,
            classes: Vec::new(),
            error: None,
        }
    }

    fn net_bytes_per_s(&self) -> Option<f64> {
        add(self.net_rx_bytes_per_s, self.net_tx_bytes_per_s)
    }

    fn disk_bytes_per_s(&self) -> Option<f64> {
        add(self.disk_read_bytes_per_s, self.disk_write_bytes_per_s)
    }
}

/// Sum of what is known; unknown only when both are.
fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

/// What the screen shows: the header lines and one row per VM, in the order the sockets were given.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub host: String,
    pub round: String,
    pub rows: Vec<VmRow>,
}

impl Model {
    /// Before the first round ends (a round lasts one interval): every VM listed under the name it has before QEMU
    /// is asked, nothing measured yet.
    pub fn waiting(names: &Names, interval: Duration) -> Model {
        Model {
            host: "host: sampling…".into(),
            round: format!(
                "first round under way ({} VMs over {})",
                names.len(),
                humantime::format_duration(interval)
            ),
            rows: (0..names.len())
                .map(|i| VmRow::blank(&names.name(i).name, &names.target(i).socket, "…"))
                .collect(),
        }
    }

    /// `round` counts snapshots since start, so a person can see that the view refreshes.
    pub fn from_snapshot(snap: &Snapshot, round: u64) -> Model {
        let host = match (&snap.host, &snap.host_error) {
            (Some(h), _) => format!(
                "host: CPU {} of {} CPUs   memory {} available of {}",
                h.cpu_pct.map_or("-".into(), |v| format!("{v:.1}%")),
                h.cpus,
                fmt_bytes(Some(h.mem_available_bytes)),
                fmt_bytes(Some(h.mem_total_bytes)),
            ),
            (None, e) => format!("host: {}", e.as_deref().unwrap_or("no sample")),
        };
        let round = format!(
            "round {round}: {} of {} VMs answered in {} ms (interval {})",
            snap.answered(),
            snap.vms.len(),
            snap.elapsed_ms,
            humantime::format_duration(Duration::from_millis(snap.interval_ms))
        );
        let rows = snap
            .vms
            .iter()
            .map(|vm| {
                let Some(s) = &vm.sample else {
                    let mut row = VmRow::blank(&vm.name, &vm.socket, "error");
                    row.error = Some(vm.error.clone().unwrap_or_else(|| "no sample".into()));
                    return row;
                };
                let f = s.figures();
                let sum = |it: &mut dyn Iterator<Item = f64>| {
                    it.fold(None, |acc: Option<f64>, v| Some(acc.unwrap_or(0.0) + v))
                };
                let mut vcpus: Vec<_> = s.vcpus.iter().map(|v| (v.index, v.cpu_pct)).collect();
                vcpus.sort_by_key(|(i, _)| *i);
                VmRow {
                    state: s.run_state.clone(),
                    cpu_pct: s.cpu_pct,
                    vcpu_pcts: vcpus.into_iter().map(|(_, p)| p).collect(),
                    ram_bytes: Some(s.memory.ram_bytes + s.memory.plugged_bytes),
                    guest_available_bytes: s.memory.guest.as_ref().and_then(|g| g.available_bytes),
                    dirty_bytes_per_s: s.dirty_rate.bytes_per_s,
                    net_rx_bytes_per_s: f.net_rx_bytes_per_s,
                    net_tx_bytes_per_s: f.net_tx_bytes_per_s,
                    disk_read_bytes_per_s: sum(&mut s.disks.iter().map(|d| d.read_bytes_per_s)),
                    disk_write_bytes_per_s: sum(&mut s.disks.iter().map(|d| d.write_bytes_per_s)),
                    classes: vm
                        .classes
                        .iter()
                        .map(|l| l.class.name().to_string())
                        .collect(),
                    ..VmRow::blank(&vm.name, &vm.socket, "")
                }
            })
            .collect();
        Model { host, round, rows }
    }
}

/// Binary units, as the rest of qmigrate prints memory: `256.0 MiB`.
pub fn fmt_bytes(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), binary)
}

/// bytesize 1.3 spells kibibytes `kiB`; the IEC symbol, and what `qmigrate stats` prints, is `KiB`.
fn binary(bytes: u64) -> String {
    ByteSize(bytes).to_string_as(true).replace("kiB", "KiB")
}

/// A rate in binary units per second: `1.5 MiB/s`; `-` when not measured (a measured 0 prints as `0 B/s`).
pub fn fmt_rate(bytes_per_s: Option<f64>) -> String {
    match bytes_per_s {
        // NaN or a negative rate would be a sampler bug; showing it as a huge or odd number would hide that less
        // well than "-", but it must not panic the view either.
        Some(v) if v.is_finite() && v >= 0.0 => {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let b = v.round() as u64;
            format!("{}/s", binary(b))
        }
        _ => "-".into(),
    }
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// Per-vCPU figures in one compact cell: `97 3 0 12`.
fn fmt_vcpus(v: &[Option<f64>]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|p| p.map_or("-".into(), |p| format!("{p:.0}")))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------------------------
// PURE: sorting
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Cpu,
    Memory,
    DirtyRate,
    /// Received plus sent.
    Network,
    /// Read plus written.
    Disk,
    /// The VM's name.
    Name,
}

impl SortKey {
    pub fn title(self) -> &'static str {
        match self {
            SortKey::Cpu => "CPU%",
            SortKey::Memory => "MEM",
            SortKey::DirtyRate => "DIRTY",
            SortKey::Network => "NET",
            SortKey::Disk => "DISK",
            SortKey::Name => "VM",
        }
    }

    fn value(self, row: &VmRow) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)]
        match self {
            SortKey::Cpu => row.cpu_pct,
            SortKey::Memory => row.ram_bytes.map(|b| b as f64),
            SortKey::DirtyRate => row.dirty_bytes_per_s,
            SortKey::Network => row.net_bytes_per_s(),
            SortKey::Disk => row.disk_bytes_per_s(),
            SortKey::Name => None,
        }
    }
}

/// Orders rows as `top` does: the biggest figure first (names A to Z), `reverse` flips that. A row without the
/// figure (an error, not measured yet) goes last either way: reversing to find the idlest VM should not bring up
/// the dead ones first. Ties go by name, then socket, so rows do not jump about between refreshes.
pub fn sort_rows(rows: &mut [VmRow], key: SortKey, reverse: bool) {
    let by_name = |a: &VmRow, b: &VmRow| a.name.cmp(&b.name).then_with(|| a.socket.cmp(&b.socket));
    rows.sort_by(|a, b| {
        if key == SortKey::Name {
            let o = by_name(a, b);
            return if reverse { o.reverse() } else { o };
        }
        match (key.value(a), key.value(b)) {
            (Some(x), Some(y)) => {
                let o = y.total_cmp(&x);
                let o = if reverse { o.reverse() } else { o };
                o.then_with(|| by_name(a, b))
            }
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => by_name(a, b),
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// PURE: keys
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ViewState {
    pub sort: SortKey,
    pub reverse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Redraw,
    Quit,
    /// A key the view does not use.
    Ignore,
}

/// One key press → the next view state and what the loop should do. Choosing a sort key starts in its natural
/// direction again (biggest first), so `c` always means "the busiest VMs on top" whatever was pressed before.
pub fn on_key(state: ViewState, key: KeyEvent) -> (ViewState, Action) {
    // Terminals that report releases and repeats would otherwise toggle `r` twice per press.
    if key.kind != KeyEventKind::Press {
        return (state, Action::Ignore);
    }
    // Raw mode turns Ctrl-C into a key instead of SIGINT; it must still quit.
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return match key.code {
            KeyCode::Char('c') => (state, Action::Quit),
            _ => (state, Action::Ignore),
        };
    }
    let sort = |sort| {
        (
            ViewState {
                sort,
                reverse: false,
            },
            Action::Redraw,
        )
    };
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => (state, Action::Quit),
        KeyCode::Char('c') => sort(SortKey::Cpu),
        KeyCode::Char('m') => sort(SortKey::Memory),
        KeyCode::Char('d') => sort(SortKey::DirtyRate),
        KeyCode::Char('n') => sort(SortKey::Network),
        KeyCode::Char('i') => sort(SortKey::Disk),
        KeyCode::Char('s') => sort(SortKey::Name),
        KeyCode::Char('r') => (
            ViewState {
                reverse: !state.reverse,
                ..state
            },
            Action::Redraw,
        ),
        _ => (state, Action::Ignore),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PURE: drawing
// ---------------------------------------------------------------------------------------------------------------

/// Column titles, their widths, and the sort key each belongs to. RX/TX sort together as NET, READ/WRITE as DISK.
const COLUMNS: [(&str, u16, Option<SortKey>); 12] = [
    ("VM", 18, Some(SortKey::Name)),
    ("STATE", 9, None),
    ("CPU%", 6, Some(SortKey::Cpu)),
    ("vCPU%", 10, None),
    ("MEM", 10, Some(SortKey::Memory)),
    ("AVAIL", 10, None),
    ("DIRTY", 12, Some(SortKey::DirtyRate)),
    ("RX", 12, Some(SortKey::Network)),
    ("TX", 12, Some(SortKey::Network)),
    ("READ", 12, Some(SortKey::Disk)),
    ("WRITE", 12, Some(SortKey::Disk)),
    ("CLASSES", 0, None),
];

const MAX_ERROR_LINES: usize = 4;

/// Draws the whole screen: two header lines (host, round), the key help with the current sort, and the table. VM
/// names, run states and error texts come from socket paths and peers, so they are drawn through [`printable`].
pub fn render(frame: &mut Frame, state: &ViewState, model: &Model) {
    // Errors are long (a path, the command, the OS's words) and the last column is narrow: each also gets a line of
    // its own under the table, so a person can read why a VM has no figures. A few at most: the rows come first.
    let errors: Vec<Line> = model
        .rows
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| (r, e)))
        .take(MAX_ERROR_LINES)
        .map(|(r, e)| {
            Line::from(vec![
                Span::styled(
                    format!("{}: ", printable(&r.name)),
                    Style::default().fg(Color::Red),
                ),
                Span::raw(printable(e)),
            ])
        })
        .collect();
    #[allow(clippy::cast_possible_truncation)]
    let [host, round, help, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(errors.len() as u16),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(errors), footer);
    let bold = Style::default().add_modifier(Modifier::BOLD);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("qmigrate top   ", bold),
            Span::raw(printable(&model.host)),
        ])),
        host,
    );
    frame.render_widget(Paragraph::new(model.round.as_str()), round);
    let arrow = if state.reverse { "▲" } else { "▼" };
    frame.render_widget(
        Paragraph::new(format!(
            "sort: {} {arrow}   keys: c CPU  m memory  d dirty  n network  i disk  s name  r reverse  q quit",
            state.sort.title()
        ))
        .style(Style::default().fg(Color::DarkGray)),
        help,
    );

    let header = Row::new(COLUMNS.iter().map(|(title, _, key)| {
        if *key == Some(state.sort) {
            Cell::from(format!("{title}{arrow}")).style(bold.add_modifier(Modifier::REVERSED))
        } else {
            Cell::from(*title).style(bold)
        }
    }));
    let mut rows = model.rows.clone();
    sort_rows(&mut rows, state.sort, state.reverse);
    let rows = rows.iter().map(|r| {
        let last = match &r.error {
            // The sampler's errors start with the socket, which the VM column already names.
            Some(e) => Cell::from(printable(
                e.strip_prefix(r.socket.as_str())
                    .and_then(|e| e.strip_prefix(": "))
                    .unwrap_or(e),
            ))
            .style(Style::default().fg(Color::Red)),
            None if r.classes.is_empty() => Cell::from("-"),
            None => Cell::from(r.classes.join(",")),
        };
        let state_style = match r.state.as_str() {
            "running" => Style::default().fg(Color::Green),
            "error" => Style::default().fg(Color::Red),
            _ => Style::default().fg(Color::Yellow),
        };
        Row::new(vec![
            Cell::from(printable(&r.name)),
            Cell::from(printable(&r.state)).style(state_style),
            Cell::from(fmt_pct(r.cpu_pct)),
            Cell::from(fmt_vcpus(&r.vcpu_pcts)),
            Cell::from(fmt_bytes(r.ram_bytes)),
            Cell::from(fmt_bytes(r.guest_available_bytes)),
            Cell::from(fmt_rate(r.dirty_bytes_per_s)),
            Cell::from(fmt_rate(r.net_rx_bytes_per_s)),
            Cell::from(fmt_rate(r.net_tx_bytes_per_s)),
            Cell::from(fmt_rate(r.disk_read_bytes_per_s)),
            Cell::from(fmt_rate(r.disk_write_bytes_per_s)),
            last,
        ])
    });
    let widths = COLUMNS.iter().map(|(_, w, _)| {
        if *w == 0 {
            Constraint::Fill(1)
        } else {
            Constraint::Length(*w)
        }
    });
    frame.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        table,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// I/O: the terminal and the loop
// ---------------------------------------------------------------------------------------------------------------

/// Whether this process has the terminal in raw mode on the alternate screen; the panic hook and the guard both
/// restore, whichever comes first, and only once.
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, AtomicOrdering::SeqCst) {
        let _ = ratatui::crossterm::execute!(
            io::stdout(),
            ratatui::crossterm::terminal::LeaveAlternateScreen,
            ratatui::crossterm::cursor::Show
        );
        let _ = ratatui::crossterm::terminal::disable_raw_mode();
    }
}

/// Raw mode and the alternate screen for as long as it lives. Dropping it (return, `?`, unwinding) restores the
/// terminal. The panic hook restores it too, before the panic message is printed: otherwise the message would go to
/// the alternate screen and vanish with it.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<TerminalGuard> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        // Taken before the first change so that a failure half-way still undoes what was done.
        TERMINAL_TAKEN.store(true, AtomicOrdering::SeqCst);
        let guard = TerminalGuard;
        ratatui::crossterm::terminal::enable_raw_mode()?;
        ratatui::crossterm::execute!(
            io::stdout(),
            ratatui::crossterm::terminal::EnterAlternateScreen,
            ratatui::crossterm::cursor::Hide
        )?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Reads terminal events on a thread of its own: crossterm's reader blocks, and the `event-stream` feature (an
/// async reader) is not enabled. Polls with a short timeout so that dropping it stops and joins it promptly.
struct InputThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl InputThread {
    fn spawn(tx: tokio::sync::mpsc::Sender<io::Result<Event>>) -> io::Result<InputThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name("top-input".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(AtomicOrdering::Relaxed) {
                        let ev = match event::poll(Duration::from_millis(100)) {
                            Ok(false) => continue,
                            Ok(true) => event::read(),
                            Err(e) => Err(e),
                        };
                        let fatal = ev.is_err();
                        if tx.blocking_send(ev).is_err() || fatal {
                            break;
                        }
                    }
                }
            })?;
        Ok(InputThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for InputThread {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Aborts the sampling task when the view ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shows `sockets` (each a QMP socket or `NAME=SOCKET`) until q, Esc or Ctrl-C. Rounds of
/// [`crate::stats::sample_named`] run back to back in a background task, each measuring over `opts.interval`, so the
/// view refreshes once per interval while keys are answered at once; a VM is named once, at its first answer; a VM
/// that cannot be sampled is a row with its error and costs the round at most `opts.vm_timeout`. The terminal is
/// restored on every way out, panics included.
///
/// Anything written to stdout or stderr meanwhile (a tracing subscriber, say) lands on the screen: callers should
/// keep logs off the terminal while this runs.
pub async fn run(sockets: Vec<String>, opts: SampleOptions) -> Result<(), TopError> {
    if sockets.is_empty() {
        return Err(TopError::NoSockets);
    }
    if !io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    // A watch channel keeps only the newest snapshot: if drawing ever falls behind, old rounds are worth nothing.
    let (snap_tx, mut snap_rx) = tokio::sync::watch::channel::<Option<Snapshot>>(None);
    let names = Names::parse(&sockets);
    let waiting = Model::waiting(&names, opts.interval);
    let _sampler = AbortOnDrop(tokio::spawn({
        let mut names = names;
        let opts = opts.clone();
        async move {
            loop {
                let snap = crate::stats::sample_named(&mut names, &opts).await;
                if snap_tx.send(Some(snap)).is_err() {
                    break;
                }
            }
        }
    }));

    // Declared in this order so that they drop in the reverse one: input thread, terminal, then the guard.
    let _guard = TerminalGuard::enter().map_err(TopError::Terminal)?;
    let mut terminal =
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
            .map_err(TopError::Terminal)?;
    let (key_tx, mut key_rx) = tokio::sync::mpsc::channel(64);
    let _input = InputThread::spawn(key_tx).map_err(TopError::Input)?;

    let mut state = ViewState::default();
    let mut model = waiting;
    let mut round = 0u64;
    loop {
        terminal
            .draw(|f| render(f, &state, &model))
            .map_err(TopError::Draw)?;
        tokio::select! {
            changed = snap_rx.changed() => {
                // The sender lives in the sampling task: an error means it panicked.
                changed.map_err(|_| TopError::Sampler)?;
                if let Some(snap) = snap_rx.borrow_and_update().as_ref() {
                    round += 1;
                    model = Model::from_snapshot(snap, round);
                }
            }
            ev = key_rx.recv() => match ev {
                Some(Ok(Event::Key(key))) => {
                    let (next, action) = on_key(state, key);
                    state = next;
                    if action == Action::Quit {
                        return Ok(());
                    }
                }
                // A resize or anything else: the next pass redraws for the new size.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(TopError::Input(e)),
                None => {
                    return Err(TopError::Input(io::Error::other("the input thread ended")))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Class, Label};
    use crate::stats::name::NameSource;
    use crate::stats::{
        DirtyRateSample, DiskSample, GuestMemory, HostSample, MemorySample, NicSample, VcpuSample,
        VmEntry, VmSample,
    };
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    const MIB: f64 = 1024.0 * 1024.0;

    fn row(name: &str, cpu: Option<f64>, ram_mib: Option<u64>, dirty: Option<f64>) -> VmRow {
        VmRow {
            cpu_pct: cpu,
            ram_bytes: ram_mib.map(|m| m << 20),
            dirty_bytes_per_s: dirty,
            ..VmRow::blank(name, &format!("/tmp/{name}.qmp"), "running")
        }
    }

    fn names(rows: &[VmRow]) -> Vec<&str> {
        rows.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn sort_orders_biggest_first_reverse_flips_and_missing_go_last() {
        let mut net = row("net", Some(5.0), Some(512), Some(0.0));
        net.net_rx_bytes_per_s = Some(10.0 * MIB);
        let mut disk = row("disk", Some(60.0), Some(256), Some(30.0 * MIB));
        disk.disk_write_bytes_per_s = Some(200.0 * MIB);
        let base = vec![
            row("b-idle", Some(1.0), Some(256), Some(0.0)),
            disk,
            row("dead", None, None, None),
            row("a-cpu", Some(98.0), Some(1024), Some(1.0 * MIB)),
            net,
        ];
        let cases: &[(SortKey, bool, &[&str])] = &[
            (
                SortKey::Cpu,
                false,
                &["a-cpu", "disk", "net", "b-idle", "dead"],
            ),
            (
                SortKey::Cpu,
                true,
                &["b-idle", "net", "disk", "a-cpu", "dead"],
            ),
            // equal memory: by name
            (
                SortKey::Memory,
                false,
                &["a-cpu", "net", "b-idle", "disk", "dead"],
            ),
            // equal dirty rates (0): by name, also when reversed
            (
                SortKey::DirtyRate,
                false,
                &["disk", "a-cpu", "b-idle", "net", "dead"],
            ),
            (
                SortKey::DirtyRate,
                true,
                &["b-idle", "net", "a-cpu", "disk", "dead"],
            ),
            // only two rows have network or disk figures; the rest go by name after them
            (
                SortKey::Network,
                false,
                &["net", "a-cpu", "b-idle", "dead", "disk"],
            ),
            (
                SortKey::Disk,
                true,
                &["disk", "a-cpu", "b-idle", "dead", "net"],
            ),
            (
                SortKey::Name,
                false,
                &["a-cpu", "b-idle", "dead", "disk", "net"],
            ),
            (
                SortKey::Name,
                true,
                &["net", "disk", "dead", "b-idle", "a-cpu"],
            ),
        ];
        for (key, reverse, want) in cases {
            let mut rows = base.clone();
            sort_rows(&mut rows, *key, *reverse);
            assert_eq!(names(&rows), *want, "{key:?} reverse={reverse}");
        }
    }

    #[test]
    fn rates_and_sizes_print_in_binary_units() {
        let cases: &[(Option<f64>, &str)] = &[
            (None, "-"),
            (Some(0.0), "0 B/s"),
            (Some(512.4), "512 B/s"),
            (Some(1536.0), "1.5 KiB/s"),
            (Some(30.0 * MIB), "30.0 MiB/s"),
            (Some(f64::NAN), "-"),
            (Some(-1.0), "-"),
        ];
        for (v, want) in cases {
            assert_eq!(fmt_rate(*v), *want, "{v:?}");
        }
        assert_eq!(fmt_bytes(Some(256 << 20)), "256.0 MiB");
        assert_eq!(fmt_bytes(None), "-");
        assert_eq!(fmt_vcpus(&[Some(97.4), None, Some(3.0)]), "97 - 3");
        assert_eq!(fmt_vcpus(&[]), "-");
    }

    #[test]
    fn keys_change_the_sort_and_quit() {
        let key = |c: KeyCode| KeyEvent::new(c, KeyModifiers::NONE);
        let reversed_mem = ViewState {
            sort: SortKey::Memory,
            reverse: true,
        };
        let cases: &[(ViewState, KeyEvent, SortKey, bool, Action)] = &[
            (
                ViewState::default(),
                key(KeyCode::Char('c')),
                SortKey::Cpu,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('m')),
                SortKey::Memory,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('d')),
                SortKey::DirtyRate,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('n')),
                SortKey::Network,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('i')),
                SortKey::Disk,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('s')),
                SortKey::Name,
                false,
                Action::Redraw,
            ),
            (
                ViewState::default(),
                key(KeyCode::Char('r')),
                SortKey::Cpu,
                true,
                Action::Redraw,
            ),
            (
                reversed_mem,
                key(KeyCode::Char('r')),
                SortKey::Memory,
                false,
                Action::Redraw,
            ),
            // a new key starts in its natural direction
            (
                reversed_mem,
                key(KeyCode::Char('d')),
                SortKey::DirtyRate,
                false,
                Action::Redraw,
            ),
            (
                reversed_mem,
                key(KeyCode::Char('q')),
                SortKey::Memory,
                true,
                Action::Quit,
            ),
            (
                reversed_mem,
                key(KeyCode::Esc),
                SortKey::Memory,
                true,
                Action::Quit,
            ),
            (
                reversed_mem,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
                SortKey::Memory,
                true,
                Action::Quit,
            ),
            (
                reversed_mem,
                key(KeyCode::Char('x')),
                SortKey::Memory,
                true,
                Action::Ignore,
            ),
            (
                ViewState::default(),
                KeyEvent::new_with_kind(
                    KeyCode::Char('r'),
                    KeyModifiers::NONE,
                    KeyEventKind::Release,
                ),
                SortKey::Cpu,
                false,
                Action::Ignore,
            ),
        ];
        for (before, k, sort, reverse, action) in cases {
            let (after, got) = on_key(*before, *k);
            assert_eq!(
                (after.sort, after.reverse, got),
                (*sort, *reverse, *action),
                "{before:?} + {k:?}"
            );
        }
    }

    fn sample(socket: &str, cpu: f64, dirty_mib: f64) -> VmSample {
        VmSample {
            socket: socket.into(),
            qemu_name: None,
            pid: Some(42),
            run_state: "running".into(),
            interval_ms: 1000,
            vcpus: vec![
                VcpuSample {
                    index: 1,
                    thread_id: 2,
                    cpu_pct: Some(cpu / 2.0),
                },
                VcpuSample {
                    index: 0,
                    thread_id: 1,
                    cpu_pct: Some(cpu * 1.5),
                },
            ],
            cpu_pct: Some(cpu),
            cpu_total_pct: Some(cpu * 2.0),
            memory: MemorySample {
                ram_bytes: 256 << 20,
                plugged_bytes: 0,
                balloon_actual_bytes: Some(256 << 20),
                guest: Some(GuestMemory {
                    total_bytes: Some(240 << 20),
                    free_bytes: Some(100 << 20),
                    available_bytes: Some(200 << 20),
                    swap_in_bytes: None,
                    swap_out_bytes: None,
                    major_faults: None,
                    last_update_s: 0,
                }),
            },
            disks: vec![DiskSample {
                device: "vda".into(),
                read_bytes_per_s: 1024.0,
                write_bytes_per_s: 2.0 * MIB,
                read_ops_per_s: 1.0,
                write_ops_per_s: 10.0,
                flush_ops_per_s: 0.0,
            }],
            nics: vec![NicSample {
                name: "net0".into(),
                mac: "52:54:00:00:00:01".into(),
                tap: Some("tap0".into()),
                rx_bytes_per_s: Some(3.0 * 1024.0),
                tx_bytes_per_s: Some(MIB),
                rx_packets_per_s: None,
                tx_packets_per_s: None,
            }],
            dirty_rate: DirtyRateSample {
                bytes_per_s: Some(dirty_mib * MIB),
                mode: Some("page-sampling".into()),
            },
            notes: vec![],
        }
    }

    fn snapshot() -> Snapshot {
        let label = |class| Label {
            class,
            evidence: vec![],
        };
        Snapshot {
            interval_ms: 1000,
            elapsed_ms: 1012,
            host: Some(HostSample {
                cpu_pct: Some(37.5),
                cpus: 2,
                mem_total_bytes: 8 << 30,
                mem_available_bytes: 6 << 30,
            }),
            host_error: None,
            vms: vec![
                VmEntry {
                    name: "busy-vm".into(),
                    name_from: NameSource::Qemu,
                    socket: "/tmp/busy.qmp".into(),
                    sample: Some(sample("/tmp/busy.qmp", 90.0, 1.0)),
                    classes: vec![label(Class::Cpu), label(Class::DiskIo)],
                    error: None,
                },
                VmEntry {
                    // A name from a peer, with an escape sequence that would clear the screen.
                    name: "dirty-vm\u{1b}[2J".into(),
                    name_from: NameSource::Qemu,
                    socket: "/tmp/dirty.qmp".into(),
                    sample: Some(sample("/tmp/dirty.qmp", 40.0, 35.0)),
                    classes: vec![label(Class::DirtyMemory)],
                    error: None,
                },
                VmEntry {
                    name: "gone".into(),
                    name_from: NameSource::SocketFile,
                    socket: "/tmp/gone.qmp".into(),
                    sample: None,
                    classes: vec![],
                    error: Some("/tmp/gone.qmp: cannot connect: No such file".into()),
                },
            ],
        }
    }

    #[test]
    fn the_model_carries_every_figure_and_errors_as_rows() {
        let m = Model::from_snapshot(&snapshot(), 3);
        assert!(m.host.contains("CPU 37.5% of 2 CPUs"), "{}", m.host);
        assert!(
            m.host.contains("6.0 GiB available of 8.0 GiB"),
            "{}",
            m.host
        );
        assert!(
            m.round.contains("round 3: 2 of 3 VMs answered in 1012 ms"),
            "{}",
            m.round
        );
        let busy = &m.rows[0];
        assert_eq!(
            (busy.name.as_str(), busy.socket.as_str()),
            ("busy-vm", "/tmp/busy.qmp")
        );
        // by vCPU index, not in QEMU's order
        assert_eq!(busy.vcpu_pcts, vec![Some(135.0), Some(45.0)]);
        assert_eq!(busy.guest_available_bytes, Some(200 << 20));
        assert_eq!(busy.net_tx_bytes_per_s, Some(MIB));
        assert_eq!(busy.disk_read_bytes_per_s, Some(1024.0));
        assert_eq!(busy.classes, vec!["cpu", "disk-io"]);
        let gone = &m.rows[2];
        assert_eq!(gone.state, "error");
        assert!(gone.error.as_deref().unwrap().contains("cannot connect"));
        assert_eq!(gone.cpu_pct, None);

        let waiting = Model::waiting(
            &Names::parse(&["/tmp/a.qmp", "db=/tmp/b.qmp"]),
            Duration::from_secs(2),
        );
        assert_eq!(waiting.rows[0].state, "…");
        let names: Vec<&str> = waiting.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "db"]);
        assert!(waiting.round.contains("2 VMs over 2s"), "{}", waiting.round);
    }

    fn screen(state: ViewState, model: &Model) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(160, 12)).unwrap();
        t.draw(|f| render(f, &state, model)).unwrap();
        let buf = t.backend().buffer();
        buf.content
            .chunks(buf.area.width as usize)
            .map(|line| line.iter().map(|c| c.symbol()).collect::<String>())
            .collect()
    }

    fn line_of(lines: &[String], needle: &str) -> usize {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", lines.join("\n")))
    }

    #[test]
    fn the_screen_shows_host_columns_rows_with_classes_and_follows_the_sort() {
        let model = Model::from_snapshot(&snapshot(), 1);
        let lines = screen(ViewState::default(), &model);
        let all = lines.join("\n");
        assert!(
            lines[0].contains("qmigrate top") && lines[0].contains("CPU 37.5% of 2 CPUs"),
            "{all}"
        );
        // A name from a peer is shown with its escape spelt out, never obeyed.
        assert!(
            all.contains(r"dirty-vm\x1b[2J") && !all.contains('\u{1b}'),
            "{all}"
        );
        let header = line_of(&lines, "STATE");
        for title in [
            "VM", "CPU%▼", "vCPU%", "MEM", "AVAIL", "DIRTY", "RX", "TX", "READ", "WRITE", "CLASSES",
        ] {
            assert!(lines[header].contains(title), "{title}: {all}");
        }
        let busy = &lines[line_of(&lines, "busy-vm")];
        for cell in [
            "running",
            "90.0",
            "135 45",
            "256.0 MiB",
            "200.0 MiB",
            "1.0 MiB/s",
            "3.0 KiB/s",
            "2.0 MiB/s",
            "cpu,disk-io",
        ] {
            assert!(busy.contains(cell), "{cell}: {busy}");
        }
        let gone = &lines[line_of(&lines, "gone ")];
        assert!(
            gone.contains("error") && gone.contains("cannot connect") && !gone.contains("/tmp/"),
            "{gone}"
        );
        // the whole error, under the table
        assert!(
            line_of(&lines, "gone: /tmp/gone.qmp: cannot connect: No such file")
                > line_of(&lines, "gone "),
            "{all}"
        );

        // CPU: busy first; dirty rate: dirty first; reversed: busy first again; the error row stays last.
        let order = |state| {
            let lines = screen(state, &model);
            (
                line_of(&lines, "busy-vm") < line_of(&lines, "dirty-vm"),
                line_of(&lines, "gone ")
                    > line_of(&lines, "busy-vm").max(line_of(&lines, "dirty-vm")),
            )
        };
        assert_eq!(order(ViewState::default()), (true, true));
        let dirty = ViewState {
            sort: SortKey::DirtyRate,
            reverse: false,
        };
        assert_eq!(order(dirty), (false, true));
        assert_eq!(
            order(ViewState {
                reverse: true,
                ..dirty
            }),
            (true, true)
        );
        let lines = screen(dirty, &model);
        assert!(
            lines[line_of(&lines, "STATE")].contains("DIRTY▼"),
            "{}",
            lines.join("\n")
        );
        assert!(
            lines[line_of(&lines, "sort:")].contains("sort: DIRTY ▼"),
            "{}",
            lines.join("\n")
        );
    }
}
