//! The report of one migration: the model, its JSON form (`--json`) and its table. Built by `migrate`, printed
//! by the CLI, read by harnesses.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::migrate::ladder::{Action, LadderSettings};
use crate::predict::Prediction;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed,
    /// Cancelled (timeout, interrupt); the source runs on.
    Cancelled,
    /// Failed in precopy (QEMU failure, destination gone); the source runs on.
    Failed,
    /// Completed, then rolled back inside `--verify`; the source runs on from the switch-over image.
    RolledBack,
    /// Postcopy paused and not recovered in time: both QEMUs are paused and alive (`qmigrate recover`).
    Paused,
    /// The guest is not running anywhere it can be resumed safely (a destination that died in postcopy, or a
    /// destination that died after the switch-over without `--verify`).
    Lost,
}

/// One phase change of the migration's state machine, with why it happened.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseChange {
    pub at_ms: u64,
    pub phase: String,
    pub why: Option<String>,
}

/// One postcopy recovery attempt.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryAttempt {
    pub at_ms: u64,
    pub attempt: u32,
    pub uri: String,
    /// `ok` or the error.
    pub result: String,
}

/// One escalation the controller took, with the figures that triggered it.
#[derive(Debug, Clone, Serialize)]
pub struct Escalation {
    pub at_ms: u64,
    pub pass: u64,
    pub action: Action,
    pub reason: String,
}

/// One poll of the running migration (`query-migrate` on the source): the series `--timeline` draws and the
/// traces the prediction model is checked against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Sample {
    /// Since qmigrate started the migration.
    pub at_ms: u64,
    /// QEMU's migration status (`active`, `postcopy-active`, `completed`, ...).
    pub status: String,
    /// QEMU's `dirty-sync-count`: the pass in progress.
    pub pass: u64,
    pub remaining_bytes: u64,
    pub transferred_bytes: u64,
    /// Pages QEMU found zero and sent as a header only (`ram.duplicate`).
    pub zero_pages: u64,
    /// Pages QEMU sent whole (`ram.normal`).
    pub normal_pages: u64,
    pub throughput_bytes_per_s: f64,
    /// The migration's own dirty rate (`dirty-pages-rate` × page size), measured over the last pass.
    pub dirty_rate_bytes_per_s: f64,
    pub throttle_pct: u64,
    pub downtime_limit_ms: u64,
}

/// The dirty rate measured before the start (`calc-dirty-rate`), with the model fitted to it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DirtyRateBefore {
    /// Over the longest window, as QEMU reports it.
    pub bytes_per_s: u64,
    /// `page-sampling`, `dirty-bitmap` or `dirty-ring`.
    pub mode: String,
    pub calc_time_ms: u64,
    /// Every window measured: its length and the distinct bytes it found dirtied.
    pub windows: Vec<DirtyWindow>,
    /// `R` and `W` fitted to the windows, before calibration.
    pub model: crate::predict::DirtyModel,
    /// The factor remembered for this VM and method from earlier migrations, applied to the model.
    pub calibration_factor: Option<f64>,
    /// How far this method can be trusted.
    pub trust: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct DirtyWindow {
    pub window_ms: u64,
    pub dirtied_bytes: u64,
}

/// What the first pass was expected to send whole before the start.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FirstPassEstimate {
    pub nonzero_bytes: u64,
    /// `page-contents` (sampled from the host), `remembered` (from an earlier migration) or `assumed` (all RAM).
    pub method: String,
    /// ± bytes (95 %), where the method gives one.
    pub margin_bytes: Option<u64>,
    pub detail: String,
}

/// A prediction made while the migration ran, once its first pass was sent.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LivePrediction {
    pub at_ms: u64,
    /// The dirty model corrected to what the first pass found dirtied.
    pub model: crate::predict::DirtyModel,
    /// Dirtied during the first pass as counted by QEMU, over what the pre-start model predicted for it.
    pub dirty_factor: Option<f64>,
    pub throughput_bytes_per_s: f64,
    pub prediction: crate::predict::RunPrediction,
}

/// Where the guest is after the migration: QEMU's run state at each end (`gone` if that QEMU is not there).
#[derive(Debug, Clone, Serialize)]
pub struct FinalState {
    pub source: String,
    pub destination: String,
    /// The guest shut down or reset itself on the destination after the switch-over (its own doing).
    pub guest_shutdown: bool,
    /// How many ends run the guest: 1 is the only right answer.
    pub running_copies: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub vm: String,
    /// The source QEMU was ended after the guest moved to another host (`migrate --to-host`).
    pub source_quit: bool,
    pub source: String,
    pub destination: String,
    pub destination_pid: Option<i32>,
    pub uri: String,
    pub outcome: Outcome,
    /// Why it was cancelled or failed.
    pub reason: Option<String>,
    pub total_time_ms: u64,
    /// As QEMU reports it (`downtime` of `query-migrate`); absent unless completed.
    pub downtime_ms: Option<u64>,
    /// total − downtime.
    pub migration_time_ms: u64,
    pub setup_time_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub ram_bytes: u64,
    pub passes: u64,
    pub max_throttle_pct: u64,
    pub postcopy: bool,
    pub postcopy_requests: u64,
    /// The guest was stopped to finish offline (`--on-timeout pause`); `paused_ms` is how long it stood still.
    pub paused_offline: bool,
    pub paused_ms: Option<u64>,
    pub escalations: Vec<Escalation>,
    pub dirty_rate_before: Option<DirtyRateBefore>,
    pub first_pass_estimate: Option<FirstPassEstimate>,
    /// The inputs of the prediction before the start.
    pub model: Option<crate::predict::ModelInput>,
    /// Precopy alone at the initial downtime limit, before the start.
    pub predicted: Option<Prediction>,
    /// The run with qmigrate's ladder, before the start.
    pub forecast: Option<crate::predict::RunPrediction>,
    /// The run re-predicted once the first pass was sent.
    pub forecast_after_first_pass: Option<LivePrediction>,
    /// Said before the start: a forecast that the run cannot complete, with what would make it complete.
    pub warnings: Vec<String>,
    /// `--probe`: the downtime as the guest's clients saw it, beside QEMU's `downtime_ms`.
    pub guest_reachability: Option<crate::probe::GuestReachability>,
    pub settings: ReportSettings,
    pub final_state: FinalState,
    /// Cancelled because the user interrupted the run (SIGINT/SIGTERM).
    pub interrupted: bool,
    /// This run took over a migration already under way (`--adopt`, `qmigrate recover`, `qmigrate cancel`).
    pub adopted: bool,
    /// Every phase the migration went through, with why.
    pub phases: Vec<PhaseChange>,
    /// Postcopy recovery attempts.
    pub recoveries: Vec<RecoveryAttempt>,
    /// One per poll of the source while the migration ran.
    pub samples: Vec<Sample>,
    pub qemu_source: String,
    pub qemu_destination: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportSettings {
    #[serde(flatten)]
    pub ladder: LadderSettings,
    pub bandwidth_bytes_per_s: u64,
}

impl MigrationReport {
    /// A report of a migration between `source` and `destination` over `uri` with nothing measured yet: the
    /// outcome `failed` until the run says otherwise.
    pub fn new(
        vm: String,
        source: String,
        destination: String,
        uri: String,
        settings: ReportSettings,
    ) -> MigrationReport {
        MigrationReport {
            vm,
            source_quit: false,
            source,
            destination,
            destination_pid: None,
            uri,
            outcome: Outcome::Failed,
            reason: None,
            total_time_ms: 0,
            downtime_ms: None,
            migration_time_ms: 0,
            setup_time_ms: None,
            transferred_bytes: 0,
            ram_bytes: 0,
            passes: 0,
            max_throttle_pct: 0,
            postcopy: false,
            postcopy_requests: 0,
            paused_offline: false,
            paused_ms: None,
            escalations: Vec::new(),
            dirty_rate_before: None,
            first_pass_estimate: None,
            model: None,
            predicted: None,
            forecast: None,
            forecast_after_first_pass: None,
            warnings: Vec::new(),
            guest_reachability: None,
            settings,
            final_state: FinalState {
                source: String::new(),
                destination: String::new(),
                guest_shutdown: false,
                running_copies: 0,
            },
            interrupted: false,
            adopted: false,
            phases: Vec::new(),
            recoveries: Vec::new(),
            samples: Vec::new(),
            qemu_source: String::new(),
            qemu_destination: String::new(),
        }
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        use crate::text::printable;
        let mut rows: Vec<(&str, String)> = vec![
            ("vm", printable(&self.vm).into_owned()),
            ("outcome", outcome_name(self.outcome).into()),
        ];
        if let Some(r) = &self.reason {
            rows.push(("reason", printable(r).into_owned()));
        }
        rows.push(("source", printable(&self.source).into_owned()));
        rows.push(("destination", printable(&self.destination).into_owned()));
        rows.push(("uri", printable(&self.uri).into_owned()));
        rows.push(("total time", ms(self.total_time_ms)));
        rows.push((
            "downtime",
            self.downtime_ms.map(ms).unwrap_or_else(|| "-".into()),
        ));
        rows.push(("migration time", ms(self.migration_time_ms)));
        rows.push(("transferred", size(self.transferred_bytes)));
        rows.push(("ram", size(self.ram_bytes)));
        rows.push(("passes", self.passes.to_string()));
        rows.push(("max throttle", format!("{}%", self.max_throttle_pct)));
        rows.push((
            "postcopy",
            if self.postcopy {
                format!("yes ({} page requests)", self.postcopy_requests)
            } else {
                "no".into()
            },
        ));
        if self.paused_offline {
            rows.push(("paused offline", self.paused_ms.map(ms).unwrap_or_default()));
        }
        if let Some(d) = &self.dirty_rate_before {
            rows.push((
                "dirty rate before",
                format!(
                    "{}/s ({}, {})",
                    size(d.bytes_per_s),
                    d.mode,
                    ms(d.calc_time_ms)
                ),
            ));
        }
        if let Some(p) = &self.predicted {
            let text = match p.verdict {
                crate::predict::Verdict::Converges => format!(
                    "converges: {} passes, total {}, downtime {}",
                    p.passes,
                    ms(p.total_time_ms),
                    ms(p.downtime_ms)
                ),
                crate::predict::Verdict::Diverges => format!("does not converge: {}", p.reason),
            };
            rows.push(("predicted", text));
        }
        if let Some(e) = &self.first_pass_estimate {
            rows.push((
                "first pass",
                format!(
                    "{} non-zero ({}: {})",
                    size(e.nonzero_bytes),
                    e.method,
                    e.detail
                ),
            ));
        }
        let forecast = |p: &crate::predict::RunPrediction| {
            format!(
                "{}, total {}, downtime {}{}",
                crate::migrate::ending_name(p.ending),
                ms(p.total_time_ms),
                ms(p.downtime_ms),
                if p.escalations.is_empty() {
                    String::new()
                } else {
                    format!(" (after {})", p.escalations.join(", "))
                }
            )
        };
        if let Some(p) = &self.forecast {
            rows.push(("forecast", forecast(p)));
        }
        if let Some(l) = &self.forecast_after_first_pass {
            rows.push((
                "after 1st pass",
                format!("{} (at {})", forecast(&l.prediction), ms(l.at_ms)),
            ));
        }
        if let Some(g) = &self.guest_reachability {
            rows.push((
                "guest downtime",
                match g.downtime.longest_unreachable_ms {
                    Some(ms_) => format!(
                        "{} unreachable at most ({}: {} of {} probes unanswered every {} ms{})",
                        ms(ms_),
                        printable(&g.target),
                        g.downtime.failed,
                        g.downtime.probes,
                        g.interval_ms,
                        if g.downtime.recovered {
                            ""
                        } else {
                            "; not answering again yet"
                        }
                    ),
                    None => format!(
                        "none seen ({}: all {} probes answered every {} ms)",
                        printable(&g.target),
                        g.downtime.probes,
                        g.interval_ms
                    ),
                },
            ));
        }
        for w in &self.warnings {
            rows.push(("warning", printable(w).into_owned()));
        }
        rows.push((
            "final state",
            format!(
                "source {}, destination {} ({} running)",
                self.final_state.source,
                self.final_state.destination,
                self.final_state.running_copies
            ),
        ));
        if self.source_quit {
            rows.push((
                "source QEMU",
                "ended (the guest moved to another host)".to_string(),
            ));
        }
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<18} {v}");
        }
        if !self.recoveries.is_empty() {
            let _ = writeln!(out, "postcopy recovery:");
            for r in &self.recoveries {
                let _ = writeln!(
                    out,
                    "  {:>8} attempt {:<3} {} {}",
                    ms(r.at_ms),
                    r.attempt,
                    printable(&r.uri),
                    printable(&r.result)
                );
            }
        }
        if !self.escalations.is_empty() {
            let _ = writeln!(out, "escalations:");
            for e in &self.escalations {
                let _ = writeln!(
                    out,
                    "  {:>8} pass {:<3} {:<16} {}",
                    ms(e.at_ms),
                    e.pass,
                    action_name(&e.action),
                    e.reason
                );
            }
        }
        out
    }
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Cancelled => "cancelled",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled-back",
        Outcome::Paused => "paused",
        Outcome::Lost => "lost",
    }
}

pub fn action_name(a: &Action) -> String {
    match a {
        Action::RaiseDowntime { to } => format!("downtime {}ms", to.as_millis()),
        Action::Throttle { .. } => "throttle".into(),
        Action::StartPostcopy => "postcopy".into(),
        Action::Cancel => "cancel".into(),
        Action::PauseSource => "pause source".into(),
    }
}

fn ms(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}s", v as f64 / 1000.0)
    } else {
        format!("{v}ms")
    }
}

fn size(b: u64) -> String {
    bytesize::ByteSize(b).to_string_as(true)
}

pub(crate) fn de_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_millis)
}

pub(crate) fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}
