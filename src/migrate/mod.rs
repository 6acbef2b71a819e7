//! One migration, from checks to verdict, as the I/O side of a state machine: connect and check both ends, measure
//! the dirty rate and predict, set capabilities and parameters, start, then loop — gather one observation (a poll
//! of the source, an event, the destination going away, an interrupt), ask the PURE [`machine`] what now, carry
//! out its commands — until the machine is done, and finally read both ends to count the running copies.
//! Escalations are decided by the PURE [`ladder`], every other "what now?" by [`machine`]; this module decides
//! nothing itself.

pub mod foresee;
pub mod ladder;
pub mod machine;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qapi::qmp;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::exit::Exit;
use crate::inventory::DestinationStart;
use crate::launch::{self, LaunchError, QemuProcess};
use crate::lock::{LockError, VmLock};
use crate::predict::{self, ModelInput};
use crate::qmp::types::{
    CapabilityState, MigrateSetCapabilities, MigrationInfo, QueryMigrate, QueryMigrateCapabilities,
    QueryStatus,
};
use crate::qmp::{ConnectOptions, PeerFeatures, Qmp, QmpError, QmpEvent};
use crate::remote::{HostError, HostLink};
use crate::report::{
    Escalation, FinalState, MigrationReport, Outcome, PhaseChange, RecoveryAttempt, ReportSettings,
    Sample,
};
use ladder::{Action, AutoConverge, Ladder, LadderSettings, Postcopy};
use machine::{Command, EndState, GuestEvent, Machine, Observation, Phase, Rules};

/// Where the guest goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A QEMU already waiting with `-incoming defer` (or `-incoming URI`), at this QMP address.
    Qmp(String),
    /// Start one by mirroring the source's command line; its QMP socket goes to `qmp_path` (default: beside
    /// the source's, suffixed `.incoming`).
    Launch { qmp_path: Option<PathBuf> },
    /// Start one on a host of the inventory by mirroring the source's command line (its QMP socket in the host's
    /// runtime directory, named after the VM); the stream goes over TCP, or TLS with `tls`, to the host's
    /// migration address. The source's QEMU is ended once the guest runs there.
    Host {
        link: Arc<HostLink>,
        tls: bool,
        /// The VM entry's values for a template destination's placeholders (over the host's).
        vars: std::collections::BTreeMap<String, String>,
    },
}

/// What to do with a migration that is already under way on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Start a new migration; a migration under way is an error that suggests `--adopt`.
    No,
    /// `--adopt`: take over a migration under way (monitor, escalate, recover, finish), or resolve one a dead
    /// qmigrate left behind.
    Adopt,
    /// `qmigrate recover`: like adopt, for a postcopy that is paused.
    Recover,
    /// `qmigrate cancel`: take over and cancel a precopy (a postcopy cannot be cancelled).
    Cancel,
}

/// Everything one migration needs, validated.
#[derive(Debug, Clone)]
pub struct MigrationRequest {
    /// QMP address of the source: a UNIX socket path, `unix:PATH` or `tcp:HOST:PORT`.
    pub source: String,
    pub destination: Destination,
    /// Migration stream URI; default a fresh UNIX socket (both QEMUs on this host).
    pub uri: Option<String>,
    pub bandwidth_bytes_per_s: u64,
    pub ladder: LadderSettings,
    /// How long `calc-dirty-rate` samples before the start; `None` skips the measurement.
    pub dirty_rate_sample: Option<Duration>,
    pub poll_interval: Duration,
    /// `--verify`: after completion, how long to watch the destination for its QEMU dying or the guest panicking,
    /// and roll back to the source if it does. Zero (the default) disables rollback after the switch-over.
    pub verify_window: Duration,
    /// `--recover-for`: how long a paused postcopy is retried before both QEMUs are left paused.
    pub recover_for: Duration,
    pub takeover: Takeover,
    pub connect: ConnectOptions,
    /// The host the source is on, when it is reached through an inventory (`source` is then a socket path there).
    pub source_host: Option<Arc<HostLink>>,
    /// The VM's name for reports and logs (default: the source's QMP address).
    pub vm_name: Option<String>,
    /// New bandwidth caps while the migration runs (an evacuation splitting a link among its migrations): each
    /// value sent is applied to the source's `max-bandwidth` (and `max-postcopy-bandwidth`) at once.
    pub bandwidth_updates: Option<tokio::sync::watch::Receiver<u64>>,
    /// `--refuse-hopeless`: do not start a migration forecast not to complete within the timeout.
    pub refuse_hopeless: bool,
    /// Where what migrations teach about each VM and link is remembered (`calibrate`); `None` forgets.
    pub calibration: Option<PathBuf>,
    /// `--probe`: the guest's reachability probed from the host while the migration runs.
    pub probe: Option<crate::probe::ProbeSettings>,
}

impl MigrationRequest {
    /// A request with the defaults of the CLI.
    pub fn new(source: &str, destination: Destination) -> MigrationRequest {
        MigrationRequest {
            source: source.into(),
            destination,
            uri: None,
            bandwidth_bytes_per_s: 1 << 30,
            ladder: LadderSettings {
                downtime: Duration::from_millis(300),
                max_downtime: Duration::from_secs(1),
                timeout: Duration::from_secs(300),
                auto_converge: AutoConverge::Auto,
                max_throttle_pct: 99,
                postcopy: Postcopy::Never,
                on_timeout: ladder::OnTimeout::Cancel,
            },
            dirty_rate_sample: Some(Duration::from_secs(1)),
            poll_interval: Duration::from_millis(250),
            verify_window: Duration::ZERO,
            recover_for: Duration::from_secs(300),
            takeover: Takeover::No,
            connect: ConnectOptions::default(),
            source_host: None,
            vm_name: None,
            bandwidth_updates: None,
            refuse_hopeless: false,
            calibration: None,
            probe: None,
        }
    }
}

/// Failures before the migration started; nothing was changed on either guest.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("source")]
    Source(#[source] QmpError),
    #[error("destination")]
    Destination(#[source] QmpError),
    #[error("source {socket} is not running (state: {status})")]
    SourceNotRunning { socket: String, status: String },
    #[error("source {socket} already has a migration in state {status} (a qmigrate that died, or another tool); take it over with `qmigrate migrate --adopt`, or cancel it with `qmigrate cancel`")]
    SourceBusy { socket: String, status: String },
    #[error("source {socket} has no migration to {what} (migration state: {status}, run state: {run_state})")]
    NothingToAdopt {
        socket: String,
        what: &'static str,
        status: String,
        run_state: String,
    },
    #[error("destination {socket} is not waiting for a migration (state: {status}); start it with -incoming defer")]
    DestinationNotIncoming { socket: String, status: String },
    #[error("cannot launch a destination: the pid of the QEMU behind {socket} is unknown")]
    NoSourcePid { socket: String },
    #[error("cannot launch the destination")]
    Launch(#[source] LaunchError),
    #[error("cannot set the migration up on {socket}; the capabilities changed were restored")]
    Setup {
        socket: String,
        #[source]
        source: QmpError,
    },
    #[error("{socket} does not support {what}")]
    Unsupported { socket: String, what: String },
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("migration URI {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("interrupted before the migration started; nothing was changed")]
    Interrupted,
    #[error(transparent)]
    Host(Box<HostError>),
    #[error("{vm}: not started (--refuse-hopeless): {reason}")]
    Hopeless { vm: String, reason: String },
    #[error("cannot probe the guest")]
    Probe(#[source] crate::probe::ProbeError),
}

impl From<HostError> for MigrateError {
    fn from(e: HostError) -> MigrateError {
        MigrateError::Host(Box::new(e))
    }
}

impl MigrateError {
    pub fn exit(&self) -> Exit {
        match self {
            MigrateError::Source(e) | MigrateError::Destination(e) => match e {
                QmpError::Command { .. } => Exit::State,
                _ => Exit::Endpoint,
            },
            MigrateError::Launch(_) | MigrateError::NoSourcePid { .. } | MigrateError::Host(_) => {
                Exit::Endpoint
            }
            MigrateError::SourceNotRunning { .. }
            | MigrateError::SourceBusy { .. }
            | MigrateError::NothingToAdopt { .. }
            | MigrateError::DestinationNotIncoming { .. }
            | MigrateError::Setup { .. }
            | MigrateError::Unsupported { .. }
            | MigrateError::Locked(_) => Exit::State,
            MigrateError::Uri { .. } => Exit::Usage,
            MigrateError::Interrupted => Exit::Interrupted,
            MigrateError::Hopeless { .. } => Exit::Hopeless,
            MigrateError::Probe(_) => Exit::Endpoint,
        }
    }
}

/// Checks a migration URI: `unix:PATH` and `tcp:HOST:PORT` are taken; `exec:` (it runs a shell command), `fd:`,
/// `rdma:` and `file:` are refused with the reason.
pub fn check_uri(uri: &str) -> Result<(), MigrateError> {
    let err = |reason: &str| {
        Err(MigrateError::Uri {
            uri: crate::text::printable(uri).into_owned(),
            reason: reason.into(),
        })
    };
    let (scheme, rest) = uri.split_once(':').unwrap_or((uri, ""));
    match scheme {
        "unix" if !rest.is_empty() => Ok(()),
        "tcp" => match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
            _ => err("a TCP URI is tcp:HOST:PORT"),
        },
        "exec" => err("exec: URIs are refused: QEMU would run a shell command"),
        "fd" | "rdma" | "file" | "vsock" => {
            err("not supported by qmigrate; use unix:PATH or tcp:HOST:PORT")
        }
        _ => err("unknown scheme; use unix:PATH or tcp:HOST:PORT"),
    }
}

/// A snapshot of a running migration, for progress displays.
#[derive(Debug, Clone)]
pub struct Progress {
    pub elapsed: Duration,
    pub status: String,
    pub pass: u64,
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    pub transferred_bytes: u64,
    pub throughput_bytes_per_s: f64,
    pub dirty_rate_bytes_per_s: f64,
    pub throttle_pct: u64,
    pub downtime_limit: Duration,
}

impl MigrationReport {
    /// The exit status this report stands for.
    pub fn exit(&self) -> Exit {
        match self.outcome {
            Outcome::Paused => return Exit::Paused,
            Outcome::Lost => return Exit::GuestNotRunningOnce,
            // A guest that powered itself off on the destination runs nowhere, by its own doing.
            Outcome::Completed
                if self.final_state.guest_shutdown && self.final_state.running_copies == 0 => {}
            _ if self.final_state.running_copies != 1 => return Exit::GuestNotRunningOnce,
            _ => {}
        }
        match self.outcome {
            Outcome::Completed => Exit::Completed,
            Outcome::Cancelled if self.interrupted => Exit::Interrupted,
            Outcome::Cancelled => Exit::Cancelled,
            Outcome::Failed | Outcome::RolledBack => Exit::Failed,
            Outcome::Paused => Exit::Paused,
            Outcome::Lost => Exit::GuestNotRunningOnce,
        }
    }
}

/// The VM's name for the report and logs: the one asked for (the inventory's), else QEMU's `-name`, else the
/// source's QMP address.
async fn vm_name(req: &MigrationRequest, src: &Qmp) -> String {
    if let Some(n) = &req.vm_name {
        return n.clone();
    }
    match crate::hosts::query_name(src).await {
        Some(n) if !n.trim().is_empty() => crate::text::printable(&n).into_owned(),
        _ => src.label().to_string(),
    }
}

/// The source's QMP session: through its host when it has one (the inventory's), else directly.
async fn connect_source(
    req: &MigrationRequest,
    opts: &ConnectOptions,
) -> Result<Qmp, MigrateError> {
    match &req.source_host {
        Some(link) => Ok(link.connect_qmp(&req.source, opts).await?),
        None => Qmp::connect(&req.source, opts)
            .await
            .map_err(MigrateError::Source),
    }
}

/// The next bandwidth cap sent; `None` once the sender is gone. Pends forever without a channel.
async fn changed_bandwidth(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<u64> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// How long a broken QMP session to a destination on another host is retried while its QEMU lives.
const RECONNECT_WINDOW: Duration = Duration::from_secs(10);

/// How long `--probe` goes on after a completed switch-over, for the guest to answer again on the destination.
const PROBE_AFTER_SWITCHOVER: Duration = Duration::from_secs(2);
/// Bound on sampling the guest's memory before the start (over ssh it reads a few hundred pages one by one).
const GUEST_MEMORY_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on one query of either end while the migration runs.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Consecutive unanswered polls after which the source counts as unreachable.
const UNANSWERED_POLLS: u32 = 2;

/// Runs one migration (or takes over one under way, per `req.takeover`). `cancel` interrupts it: a precopy is
/// cancelled and the source runs on; a postcopy cannot be cancelled and finishes. `progress` is called on every
/// poll.
pub async fn migrate(
    req: &MigrationRequest,
    cancel: &CancellationToken,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<MigrationReport, MigrateError> {
    if let Some(uri) = &req.uri {
        check_uri(uri)?;
    }
    // One qmigrate per VM, for the whole run.
    let _lock = match &req.source_host {
        Some(link) if !link.is_local() => VmLock::acquire_keyed(&link.label(&req.source))?,
        _ => VmLock::acquire(&req.source)?,
    };
    let src = connect_source(req, &req.connect).await?;
    let src_label = src.label().to_string();
    let status = src
        .execute(&QueryStatus {})
        .await
        .map_err(MigrateError::Source)?;
    let mig = src
        .execute(&QueryMigrate {})
        .await
        .map_err(MigrateError::Source)?;
    let mig_status = mig.status.clone().unwrap_or_default();
    if req.takeover != Takeover::No {
        return adopt(req, src, status.status, mig, cancel, progress).await;
    }
    if is_in_flight(&mig_status) || (mig_status == "completed" && status.status == "postmigrate") {
        return Err(MigrateError::SourceBusy {
            socket: src_label,
            status: mig_status,
        });
    }
    if status.status != "running" {
        return Err(MigrateError::SourceNotRunning {
            socket: src_label,
            status: status.status,
        });
    }

    // The destination: an existing QEMU in incoming state, or one we start from the source's command line. Its
    // connection runs out of band where QEMU offers it: a postcopy destination waiting for pages blocks its main
    // loop, and only an out-of-band `migrate-recover` reaches it then.
    let dst_connect = destination_connect(req);
    let (dst, dst_process) = match &req.destination {
        Destination::Qmp(spec) => (
            Qmp::connect(spec, &dst_connect)
                .await
                .map_err(MigrateError::Destination)?,
            None,
        ),
        Destination::Launch { qmp_path } => {
            let (qmp, process) = launch_destination(&src, qmp_path.clone(), &dst_connect).await?;
            (qmp, Some(Launched::Local(process)))
        }
        Destination::Host { link, .. } => {
            let (qmp, pid) = launch_on_host(req, &src, link, &dst_connect).await?;
            (
                qmp,
                Some(Launched::Remote {
                    link: link.clone(),
                    pid,
                    socket: host_qmp_path_of(req, link),
                }),
            )
        }
    };
    let dst_label = dst.label().to_string();
    let dst_status = dst
        .execute(&QueryStatus {})
        .await
        .map_err(MigrateError::Destination)?;
    if dst_status.status != "inmigrate" {
        return Err(MigrateError::DestinationNotIncoming {
            socket: dst_label,
            status: dst_status.status,
        });
    }

    let src_features = PeerFeatures::detect(&src)
        .await
        .map_err(MigrateError::Source)?;
    let dst_features = PeerFeatures::detect(&dst)
        .await
        .map_err(MigrateError::Destination)?;
    let settings = &req.ladder;
    if settings.postcopy != Postcopy::Never {
        for (f, label) in [(&src_features, &src_label), (&dst_features, &dst_label)] {
            if !f.has_capability("postcopy-ram") {
                return Err(MigrateError::Unsupported {
                    socket: label.clone(),
                    what: "postcopy-ram (needed by --postcopy)".into(),
                });
            }
        }
    }
    if settings.auto_converge != AutoConverge::Off && !src_features.has_capability("auto-converge")
    {
        return Err(MigrateError::Unsupported {
            socket: src_label,
            what: "auto-converge (use --auto-converge off)".into(),
        });
    }

    let ram_bytes = src
        .execute(&qmp::query_memory_size_summary {})
        .await
        .map(|m| m.base_memory.saturating_add(m.plugged_memory.unwrap_or(0)))
        .map_err(MigrateError::Source)?;

    // Measure, then predict: the pre-start figures with what earlier migrations of this VM taught.
    let calibration = req
        .calibration
        .as_deref()
        .map(|p| {
            crate::calibrate::load(p).unwrap_or_else(|e| {
                warn!("{e}; predicting without it");
                Default::default()
            })
        })
        .unwrap_or_default();
    let vm_key = vm_name(req, &src).await;
    let mut dirty_rate_before = match req.dirty_rate_sample {
        Some(t) if src_features.has_command("calc-dirty-rate") => tokio::select! {
            r = foresee::measure_dirty(&src, t, ram_bytes) => r,
            _ = cancel.cancelled() => return Err(MigrateError::Interrupted),
        },
        _ => None,
    };
    if let Some(d) = dirty_rate_before.as_mut() {
        foresee::calibrate(d, &calibration, &vm_key);
    }
    let sampled = sample_guest_memory(req, &src, ram_bytes).await;
    let remembered = calibration.vms.get(&vm_key);
    let first_pass = foresee::first_pass(
        ram_bytes,
        sampled,
        remembered.and_then(|c| c.nonzero_fraction),
    );
    let link_key = link_key(req);
    let throughput = foresee::throughput(
        req.bandwidth_bytes_per_s,
        link_bound(req),
        link_key
            .as_deref()
            .and_then(|k| calibration.links.get(k))
            .map(|l| l.throughput_bytes_per_s),
    );
    let model = foresee::model_input(
        ram_bytes,
        &first_pass,
        dirty_rate_before.as_ref(),
        throughput,
        settings.downtime,
        // Throttling is counted on only where it was seen to work for this VM.
        remembered.and_then(|c| c.throttle_works) == Some(true),
    );
    let predicted = dirty_rate_before.as_ref().map(|_| predict::precopy(&model));
    let forecast_settings = settings.clone();
    let forecast = dirty_rate_before
        .as_ref()
        .map(|_| predict::run(&model, &forecast_settings));
    let mut warnings = Vec::new();
    if let Some(f) = forecast.as_ref().filter(|f| !f.completes()) {
        let remedies = predict::remedies(&model, &forecast_settings);
        let mut text = format!(
            "forecast: cannot complete within the {} timeout ({}){}",
            humantime::format_duration(settings.timeout),
            f.reason,
            if model.throttle_works || settings.auto_converge == AutoConverge::Off {
                ""
            } else {
                "; throttling is not counted on until a migration of this VM has seen it work"
            }
        );
        if remedies.is_empty() {
            text.push_str("; no flag would make it complete by the forecast");
        } else {
            let list: Vec<String> = remedies
                .iter()
                .map(|(flag, p)| {
                    format!(
                        "{flag} (forecast: {} in {})",
                        ending_name(p.ending),
                        humantime::format_duration(Duration::from_millis(p.total_time_ms))
                    )
                })
                .collect();
            text.push_str(&format!("; it would complete with {}", list.join(", or ")));
        }
        warn!(vm = %src_label, "{text}");
        if req.refuse_hopeless {
            drop_destination(dst_process).await;
            return Err(MigrateError::Hopeless {
                vm: vm_key,
                reason: text,
            });
        }
        warnings.push(text);
    }
    if let Some(p) = &forecast {
        info!(vm = %src_label, ending = ?p.ending, total_ms = p.total_time_ms, "forecast: {}", p.reason);
    }
    if cancel.is_cancelled() {
        return Err(MigrateError::Interrupted);
    }

    // Set-up: what it changes on the source is undone if QEMU refuses any of it.
    let caps_before = src.execute(&QueryMigrateCapabilities {}).await.ok();
    let stream = stream(req, &dst)?;
    let name = vm_key;
    let mut run = Run::new(req, src, dst, dst_process, stream, false);
    run.report.vm = name;
    if let Some(Launched::Remote { pid, .. }) = &run.dst_process {
        run.report.destination_pid = Some(*pid);
    }
    run.report.ram_bytes = ram_bytes;
    run.report.dirty_rate_before = dirty_rate_before;
    run.report.first_pass_estimate = Some(first_pass);
    run.report.model = Some(model);
    run.report.predicted = predicted;
    run.report.forecast = forecast;
    run.report.warnings = warnings;
    run.model = Some(model);
    run.link_key = link_key;
    if let Some(settings) = &req.probe {
        match crate::probe::start(settings.clone()) {
            Ok(p) => run.prober = Some(p),
            Err(e) => {
                run.end_launched_destination().await;
                return Err(MigrateError::Probe(e));
            }
        }
    }
    run.enter(Phase::SetUp, None);
    let tls = matches!(req.destination, Destination::Host { tls: true, .. });
    let set_up = async {
        run.set_up(&src_features).await?;
        if tls {
            run.set_up_tls().await?;
        }
        run.start().await
    };
    if let Err(e) = set_up.await {
        run.restore_capabilities(caps_before.as_deref()).await;
        if tls {
            run.clear_tls().await;
        }
        run.end_launched_destination().await;
        return Err(e);
    }
    Ok(run.drive(cancel, progress).await)
}

/// Takes over a migration under way on the source (`--adopt`, `recover`, `cancel`).
async fn adopt(
    req: &MigrationRequest,
    src: Qmp,
    run_state: String,
    mig: MigrationInfo,
    cancel: &CancellationToken,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<MigrationReport, MigrateError> {
    let status = mig.status.clone().unwrap_or_default();
    let src_label = src.label().to_string();
    let nothing = |what| MigrateError::NothingToAdopt {
        socket: src_label.clone(),
        what,
        status: status.clone(),
        run_state: run_state.clone(),
    };
    let adoptable = match req.takeover {
        Takeover::Recover => status.starts_with("postcopy-"),
        Takeover::Cancel => is_in_flight(&status),
        _ => {
            is_in_flight(&status)
                // A dead qmigrate left the source stopped after a migration that ended.
                || (matches!(status.as_str(), "completed" | "failed" | "cancelled")
                    && run_state != "running")
        }
    };
    if !adoptable {
        return Err(nothing(match req.takeover {
            Takeover::Recover => "recover",
            Takeover::Cancel => "cancel",
            _ => "adopt",
        }));
    }
    let dst_connect = destination_connect(req);
    let dst = match &req.destination {
        Destination::Qmp(spec) => Qmp::connect(spec, &dst_connect)
            .await
            .map_err(MigrateError::Destination)?,
        Destination::Launch { qmp_path } => {
            let base = src_label.strip_prefix("unix:").unwrap_or(&src_label);
            let path = qmp_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{base}.incoming")));
            Qmp::connect_unix(&path, &dst_connect)
                .await
                .map_err(MigrateError::Destination)?
        }
        Destination::Host { link, .. } => {
            link.connect_qmp(&host_qmp_path_of(req, link), &dst_connect)
                .await?
        }
    };
    let stream = stream(req, &dst)?;
    info!(vm = %src_label, destination = %dst.label(), %status, "taking over the migration under way");
    let name = vm_name(req, &src).await;
    let mut run = Run::new(req, src, dst, None, stream, true);
    run.report.vm = name;
    run.last = mig;
    run.report.ram_bytes = run.last.ram.as_ref().map_or(0, |r| r.total);
    let (machine, decision) = Machine::adopting(run.machine.rules.clone(), &status, Duration::ZERO);
    run.machine = machine;
    run.trail(decision.why.clone());
    run.carry_out(decision).await;
    if req.takeover == Takeover::Cancel {
        // The cancel asked for, carried out through the same rows as an interrupt; it is not one (exit 5, not 7).
        run.interrupted = true;
        let d = run.machine.decide(&Observation::Interrupt, run.now());
        run.trail(d.why.clone());
        if let Some(o) = run.carry_out(d).await {
            run.feed(o).await;
        }
        let mut report = run.drive(cancel, progress).await;
        report.interrupted = false;
        return Ok(report);
    }
    Ok(run.drive(cancel, progress).await)
}

/// The I/O side of one migration: both connections, the machine and the ladder, and the report being built.
struct Run<'a> {
    req: &'a MigrationRequest,
    src: Qmp,
    dst: Qmp,
    dst_process: Option<Launched>,
    src_events: tokio::sync::broadcast::Receiver<QmpEvent>,
    dst_events: tokio::sync::broadcast::Receiver<QmpEvent>,
    machine: Machine,
    ladder: Ladder,
    started: Instant,
    last: MigrationInfo,
    unanswered: u32,
    interrupted: bool,
    dst_gone_seen: bool,
    paused_at: Option<Instant>,
    max_throttle: u64,
    /// The private directory of a default UNIX stream, removed with the run.
    stream_dir: Option<tempfile::TempDir>,
    /// Bandwidth caps sent while the migration runs ([`MigrationRequest::bandwidth_updates`]).
    bandwidth_updates: Option<tokio::sync::watch::Receiver<u64>>,
    /// The prediction's input before the start, for the re-prediction after the first pass.
    model: Option<ModelInput>,
    /// Under which key the link's throughput is remembered.
    link_key: Option<String>,
    /// `--probe`, running from the start of the migration to its report.
    prober: Option<crate::probe::Prober>,
    /// The pass in progress and what its sync found to send (estimated from the first poll in it).
    pass_volume: (u64, u64),
    report: MigrationReport,
}

impl<'a> Run<'a> {
    fn new(
        req: &'a MigrationRequest,
        src: Qmp,
        dst: Qmp,
        dst_process: Option<Launched>,
        (uri, stream_dir): (String, Option<tempfile::TempDir>),
        adopted: bool,
    ) -> Run<'a> {
        let rules = Rules {
            verify: req.verify_window,
            recover_for: req.recover_for,
            timeout: req.ladder.timeout,
            ..Rules::default()
        };
        let report = MigrationReport {
            destination_pid: dst.peer_pid(),
            adopted,
            qemu_source: version_string(&src),
            qemu_destination: version_string(&dst),
            ..MigrationReport::new(
                req.vm_name
                    .clone()
                    .unwrap_or_else(|| src.label().to_string()),
                src.label().to_string(),
                dst.label().to_string(),
                uri,
                ReportSettings {
                    ladder: req.ladder.clone(),
                    bandwidth_bytes_per_s: req.bandwidth_bytes_per_s,
                },
            )
        };
        Run {
            src_events: src.events(),
            dst_events: dst.events(),
            req,
            src,
            dst,
            dst_process,
            machine: Machine::new(rules),
            ladder: Ladder::new(req.ladder.clone()),
            started: Instant::now(),
            last: MigrationInfo::default(),
            unanswered: 0,
            interrupted: false,
            dst_gone_seen: false,
            paused_at: None,
            max_throttle: 0,
            stream_dir,
            bandwidth_updates: req.bandwidth_updates.clone(),
            model: None,
            link_key: None,
            prober: None,
            pass_volume: (0, 0),
            report,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn vm(&self) -> &str {
        &self.report.vm
    }

    /// Records a phase change in the report's trail.
    fn enter(&mut self, phase: Phase, why: Option<String>) {
        self.machine.phase = phase;
        self.trail(why);
    }

    fn trail(&mut self, why: Option<String>) {
        let name = self.machine.phase.name();
        let changed = self.report.phases.last().is_none_or(|p| p.phase != name);
        if changed || why.is_some() {
            if let Some(w) = &why {
                info!(vm = %self.vm(), phase = name, "{w}");
            }
            self.report.phases.push(PhaseChange {
                at_ms: self.now().as_millis() as u64,
                phase: name.into(),
                why,
            });
        }
    }

    /// Capabilities and parameters on both ends. Every capability the run depends on is set explicitly, so a
    /// previous attempt's settings never leak into this one.
    async fn set_up(&mut self, f: &PeerFeatures) -> Result<(), MigrateError> {
        let req = self.req;
        let s = &req.ladder;
        let on_src = |source| MigrateError::Setup {
            socket: self.src.label().to_string(),
            source,
        };
        let postcopy = s.postcopy != Postcopy::Never;
        let mut caps = vec![
            ("events", true),
            ("auto-converge", s.auto_converge != AutoConverge::Off),
            ("postcopy-ram", postcopy),
        ];
        caps.retain(|(name, _)| f.has_capability(name));
        self.src.execute(&cap_list(&caps)).await.map_err(on_src)?;
        self.dst
            .execute(&cap_list(&[("postcopy-ram", postcopy)]))
            .await
            .map_err(|source| MigrateError::Setup {
                socket: self.dst.label().to_string(),
                source,
            })?;
        let mut params = qmp::MigrateSetParameters {
            downtime_limit: Some(s.downtime.as_millis() as u64),
            max_bandwidth: Some(req.bandwidth_bytes_per_s),
            ..Default::default()
        };
        match s.auto_converge {
            // QEMU's own ramp.
            AutoConverge::On => {
                params.cpu_throttle_initial = Some(20);
                params.cpu_throttle_increment = Some(10);
                params.max_cpu_throttle = Some(99);
            }
            // Dormant: auto-converge cannot be switched on mid-migration, so it is on from the start with a 1 %
            // ceiling, and the ladder lifts the ceiling when it decides to throttle.
            AutoConverge::Auto => {
                params.cpu_throttle_initial = Some(1);
                params.cpu_throttle_increment = Some(1);
                params.max_cpu_throttle = Some(1);
            }
            AutoConverge::Off => {}
        }
        if postcopy && f.has_parameter("max-postcopy-bandwidth") {
            params.max_postcopy_bandwidth = Some(req.bandwidth_bytes_per_s);
        }
        self.src
            .execute(&qmp::migrate_set_parameters(params))
            .await
            .map_err(on_src)?;
        Ok(())
    }

    /// A refused set-up puts back the capabilities it had changed on the source.
    async fn restore_capabilities(&self, before: Option<&[CapabilityState]>) {
        let Some(before) = before else { return };
        let wanted: Vec<&str> = vec!["events", "auto-converge", "postcopy-ram"];
        let restore: Vec<(&str, bool)> = before
            .iter()
            .filter(|c| wanted.contains(&c.capability.as_str()))
            .map(|c| (c.capability.as_str(), c.state))
            .collect();
        if let Err(e) = self.src.execute(&cap_list(&restore)).await {
            warn!(vm = %self.vm(), "cannot restore the migration capabilities after a refused set-up: {e}");
        }
    }

    async fn end_launched_destination(&mut self) {
        if let Some(p) = self.dst_process.as_mut() {
            p.kill().await;
        }
    }

    /// `--tls`: x509 credentials on both ends (the destination a server, the source a client checking the
    /// destination's certificate against its migration address), from each host's `tls_dir`.
    async fn set_up_tls(&mut self) -> Result<(), MigrateError> {
        let (Some(src_link), Destination::Host { link: dst_link, .. }) =
            (&self.req.source_host, &self.req.destination)
        else {
            return Ok(());
        };
        for (link, files) in [
            (
                src_link,
                ["ca-cert.pem", "client-cert.pem", "client-key.pem"],
            ),
            (
                dst_link,
                ["ca-cert.pem", "server-cert.pem", "server-key.pem"],
            ),
        ] {
            let Some(dir) = &link.host.tls_dir else {
                return Err(MigrateError::from(HostError::Invalid {
                    host: link.name().into(),
                    what: "--tls needs tls_dir for this host in the inventory".into(),
                }));
            };
            let dir = dir.display().to_string();
            let missing = link.missing_files(&dir, &files).await?;
            if !missing.is_empty() {
                return Err(MigrateError::from(HostError::Invalid {
                    host: link.name().into(),
                    what: format!("--tls: tls_dir {dir} lacks {}", missing.join(", ")),
                }));
            }
        }
        let address = dst_link.host.migration_address.clone();
        for (q, link, endpoint) in [
            (self.dst.clone(), dst_link, "server"),
            (self.src.clone(), src_link, "client"),
        ] {
            let setup = |source| MigrateError::Setup {
                socket: q.label().to_string(),
                source,
            };
            let dir = link
                .host
                .tls_dir
                .as_ref()
                .expect("checked")
                .display()
                .to_string();
            let _ = q
                .execute_raw("object-del", Some(json!({"id": TLS_ID})), QUERY_TIMEOUT)
                .await;
            q.execute_raw(
                "object-add",
                Some(
                    json!({"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": dir,
                    "endpoint": endpoint, "verify-peer": true}),
                ),
                QUERY_TIMEOUT,
            )
            .await
            .map_err(setup)?;
            let mut params = json!({"tls-creds": TLS_ID});
            if endpoint == "client" {
                params["tls-hostname"] = json!(address);
            }
            q.execute_raw("migrate-set-parameters", Some(params), QUERY_TIMEOUT)
                .await
                .map_err(setup)?;
        }
        info!(vm = %self.vm(), "the stream is TLS (x509, peers verified)");
        Ok(())
    }

    /// After a move to another host, the source's QEMU holds only a stale image and would be listed as a second
    /// copy of the VM on its host: it is ended (`quit`), as libvirt ends a migrated domain's source. True once
    /// it is gone.
    async fn quit_source(&self) -> bool {
        if self.src.is_closed() {
            warn!(vm = %self.vm(), "the source QEMU cannot be ended: no QMP session to it");
            return false;
        }
        match self.src.execute_timeout(&qmp::quit {}, QUERY_TIMEOUT).await {
            Ok(_) => {}
            Err(e) if e.is_closed() => {}
            Err(e) => {
                warn!(vm = %self.vm(), "cannot end the source QEMU after the move: {e}");
                return false;
            }
        }
        tokio::time::timeout(Duration::from_secs(5), self.src.closed())
            .await
            .is_ok()
    }

    async fn clear_tls(&self) {
        clear_tls(&self.src).await;
    }

    /// `migrate-incoming` on the destination, `migrate` on the source. A `migrate` that timed out is resolved by
    /// asking the source what it did.
    async fn start(&mut self) -> Result<(), MigrateError> {
        let uri = self.report.uri.clone();
        match self
            .dst
            .execute(&qmp::migrate_incoming {
                uri: Some(uri.clone()),
                channels: None,
                exit_on_error: None,
            })
            .await
        {
            Ok(_) => {}
            // Started with `-incoming URI`: it already listens; the caller's --uri must match it.
            Err(e) if self.req.uri.is_some() && e.to_string().contains("already") => {
                info!(destination = %self.dst.label(), "destination already listens; using {uri}")
            }
            Err(source) => {
                return Err(MigrateError::Setup {
                    socket: self.dst.label().to_string(),
                    source,
                })
            }
        }
        let uri = match uri.strip_suffix(":0").filter(|_| uri.starts_with("tcp:")) {
            Some(_) => {
                let port = listening_port(&self.dst)
                    .await
                    .ok_or_else(|| MigrateError::Setup {
                        socket: self.dst.label().to_string(),
                        source: QmpError::Timeout {
                            socket: self.dst.label().to_string(),
                            command: "query-migrate (the port it listens on)".into(),
                            after: QUERY_TIMEOUT,
                        },
                    })?;
                let host = uri["tcp:".len()..uri.len() - 2].trim_matches(['[', ']']);
                let uri = tcp_uri(host, port);
                self.report.uri = uri.clone();
                uri
            }
            None => uri,
        };
        self.src_events = self.src.events();
        self.dst_events = self.dst.events();
        let r = self
            .src
            .execute(&qmp::migrate {
                uri: Some(uri.clone()),
                channels: None,
                detach: None,
                resume: None,
            })
            .await;
        self.started = Instant::now();
        self.report.phases.clear();
        match r {
            Ok(_) => {}
            Err(e @ QmpError::Command { .. }) => {
                return Err(MigrateError::Setup {
                    socket: self.src.label().to_string(),
                    source: e,
                })
            }
            Err(e) => {
                // Timed out or cut: QEMU may have received it. The source decides; if it cannot be asked, the
                // machine asks the destination.
                warn!(vm = %self.vm(), "`migrate` got no reply ({e}); asking the source whether it started");
                match self
                    .src
                    .execute_timeout(&QueryMigrate {}, QUERY_TIMEOUT)
                    .await
                {
                    Ok(i)
                        if !is_in_flight(i.status.as_deref().unwrap_or(""))
                            && i.status.as_deref() != Some("completed") =>
                    {
                        return Err(MigrateError::Setup {
                            socket: self.src.label().to_string(),
                            source: e,
                        })
                    }
                    _ => {}
                }
            }
        }
        info!(vm = %self.vm(), destination = %self.dst.label(), %uri, "migration started");
        self.enter(
            Phase::Precopy {
                source_stopped: false,
            },
            Some(format!("migration started over {uri}")),
        );
        Ok(())
    }

    /// The loop: one observation at a time, the machine decides, its commands are carried out.
    async fn drive(
        mut self,
        cancel: &CancellationToken,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> MigrationReport {
        let mut ticker = tokio::time::interval(self.req.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut src_events_open = true;
        let mut dst_events_open = true;
        while !self.machine.is_done() {
            let obs = tokio::select! {
                _ = ticker.tick() => None,
                ev = self.src_events.recv(), if src_events_open => {
                    match ev {
                        Ok(ev) => debug!(vm = %self.vm(), event = %ev.name, data = %ev.data, "event"),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => src_events_open = false,
                    }
                    continue;
                }
                ev = self.dst_events.recv(), if dst_events_open => match ev {
                    Ok(ev) => guest_event(&ev).map(Observation::Guest),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(_) => {
                        dst_events_open = false;
                        None
                    }
                },
                changed = changed_bandwidth(&mut self.bandwidth_updates) => {
                    match changed {
                        Some(b) => self.set_bandwidth(b).await,
                        None => self.bandwidth_updates = None,
                    }
                    continue;
                }
                _ = cancel.cancelled(), if !self.interrupted => {
                    self.interrupted = true;
                    Some(Observation::Interrupt)
                }
                _ = self.dst.closed(), if !self.dst_gone_seen => {
                    // Over ssh, a closed session is not a dead QEMU: ask its host before believing it.
                    if self.reconnect_destination().await {
                        dst_events_open = true;
                        continue;
                    }
                    self.dst_gone_seen = true;
                    // Events the destination sent before it went (a guest's own SHUTDOWN under -no-reboot) come
                    // first: they say why it went.
                    while let Ok(ev) = self.dst_events.try_recv() {
                        if let Some(g) = guest_event(&ev) {
                            self.feed(Observation::Guest(g)).await;
                        }
                    }
                    Some(Observation::DestinationGone)
                }
            };
            match obs {
                Some(o) => self.feed(o).await,
                None => {
                    if polls_source(&self.machine.phase) {
                        let o = self.poll_source(progress).await;
                        if let Some(o) = o {
                            self.feed(o).await;
                        }
                    }
                    if !self.machine.is_done() {
                        self.feed(Observation::Tick).await;
                    }
                }
            }
        }
        self.finish().await
    }

    /// The destination's QMP session closed. For a QEMU qmigrate started on another host, the session rides on
    /// ssh and may have broken while QEMU runs on: its host is asked whether the process lives, and a new session
    /// opened if it does, for up to [`RECONNECT_WINDOW`]. True when a new session replaced the old one.
    async fn reconnect_destination(&mut self) -> bool {
        let Some(Launched::Remote { link, pid, socket }) = &self.dst_process else {
            return false;
        };
        let (link, pid, socket) = (link.clone(), *pid, socket.clone());
        let opts = ConnectOptions {
            handshake_timeout: QUERY_TIMEOUT,
            ..destination_connect(self.req)
        };
        let deadline = Instant::now() + RECONNECT_WINDOW;
        let pid_arg = pid.to_string();
        while Instant::now() < deadline {
            match link.run(&["kill", "-0", &pid_arg], QUERY_TIMEOUT).await {
                // The process is gone: so is the destination.
                Err(HostError::Command { .. }) => return false,
                Err(e) => debug!(vm = %self.vm(), "destination host: {e}"),
                Ok(_) => match link.connect_qmp(&socket, &opts).await {
                    Ok(q) => {
                        warn!(vm = %self.vm(), host = %link.name(), "the destination's QMP session broke; reconnected");
                        self.trail(Some(format!(
                            "the QMP session to the destination on {} broke while its QEMU (pid {pid}) ran on; reconnected",
                            link.name()
                        )));
                        self.dst_events = q.events();
                        self.dst = q;
                        // Events sent while the session was down are lost: a RESUME among them cannot be ruled out.
                        self.machine.destination_ran = true;
                        return true;
                    }
                    Err(e) => debug!(vm = %self.vm(), "reconnecting to the destination: {e}"),
                },
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// Feeds one observation (and every observation its commands produce) to the machine.
    async fn feed(&mut self, first: Observation) {
        let mut queue = vec![first];
        while let Some(obs) = queue.pop() {
            if !matches!(obs, Observation::Tick | Observation::Status(_)) {
                debug!(vm = %self.vm(), ?obs, "observation");
            }
            let before = self.machine.phase.name();
            let d = self.machine.decide(&obs, self.now());
            if d.why.is_some() || self.machine.phase.name() != before {
                self.trail(d.why.clone());
            }
            if let Some(o) = self.carry_out(d).await {
                queue.push(o);
            }
        }
    }

    /// Carries out a decision's commands in order; the last one that yields an observation hands it back.
    async fn carry_out(&mut self, d: machine::Decision) -> Option<Observation> {
        let mut out = None;
        for c in d.commands {
            if let Some(o) = self.command(c).await {
                out = Some(o);
            }
        }
        out
    }

    async fn command(&mut self, c: Command) -> Option<Observation> {
        let pass = self.last.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
        match c {
            Command::ConsultLadder => {
                if self.paused_at.is_some() || self.interrupted {
                    return None;
                }
                let obs = ladder_observation(&self.last, self.now(), self.pass_volume.1);
                self.ladder.step(&obs).map(|s| Observation::Ladder {
                    action: s.action,
                    reason: s.reason,
                })
            }
            Command::Apply(action) => {
                let why = self.last_why();
                self.escalate(action, why, pass).await;
                None
            }
            Command::StopSource => {
                let why = self.last_why();
                self.escalate(Action::PauseSource, why, pass).await;
                None
            }
            Command::Cancel => {
                let why = self.last_why();
                self.escalate(Action::Cancel, why, pass).await;
                None
            }
            Command::AskDestination => {
                Some(Observation::Destination(self.destination_state().await))
            }
            Command::AskSource => Some(Observation::Source(self.source_state().await)),
            Command::StopDestination => {
                if !self.dst.is_closed() {
                    if let Err(e) = self.dst.execute_timeout(&qmp::stop {}, QUERY_TIMEOUT).await {
                        debug!(destination = %self.dst.label(), "stop: {e}");
                    }
                }
                if let Some(p) = self.dst_process.as_mut() {
                    // We launched it: it goes entirely.
                    p.kill().await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.dst.closed()).await;
                    self.dst_gone_seen = true;
                    return Some(Observation::Destination(EndState::Gone));
                }
                Some(Observation::Destination(self.destination_state().await))
            }
            Command::ContinueDestination => {
                if let Err(e) = self.dst.execute_timeout(&qmp::cont {}, QUERY_TIMEOUT).await {
                    warn!(destination = %self.dst.label(), "cont: {e}");
                }
                None
            }
            Command::ResumeSourceIfPaused => {
                self.resume_source().await;
                None
            }
            Command::Recover { attempt } => self.recover(attempt).await,
            Command::ReconnectSource => {
                if self.src.is_closed() {
                    let opts = ConnectOptions {
                        handshake_timeout: QUERY_TIMEOUT,
                        ..self.req.connect.clone()
                    };
                    match connect_source(self.req, &opts).await {
                        Ok(q) => {
                            info!(vm = %self.vm(), "reconnected to the source");
                            self.src_events = q.events();
                            self.src = q;
                            self.unanswered = 0;
                        }
                        Err(e) => debug!(vm = %self.vm(), "reconnect: {e}"),
                    }
                }
                None
            }
            Command::Notice(text) => {
                warn!(vm = %self.vm(), "{text}");
                self.trail(Some(text));
                None
            }
        }
    }

    fn last_why(&self) -> String {
        self.report
            .phases
            .last()
            .and_then(|p| p.why.clone())
            .unwrap_or_default()
    }

    /// A new bandwidth cap for the running migration, on the source.
    async fn set_bandwidth(&mut self, bandwidth_bytes_per_s: u64) {
        info!(vm = %self.vm(), bandwidth_bytes_per_s, "bandwidth cap changed");
        let r = self
            .src
            .execute_timeout(
                &qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                    max_bandwidth: Some(bandwidth_bytes_per_s),
                    max_postcopy_bandwidth: Some(bandwidth_bytes_per_s),
                    ..Default::default()
                }),
                QUERY_TIMEOUT,
            )
            .await;
        match r {
            Ok(_) => self.report.settings.bandwidth_bytes_per_s = bandwidth_bytes_per_s,
            Err(e) => warn!(vm = %self.vm(), "bandwidth cap not applied: {e}"),
        }
    }

    /// Carries out one ladder action on the source and records it.
    async fn escalate(&mut self, action: Action, reason: String, pass: u64) {
        info!(vm = %self.vm(), pass, ?action, "escalation: {reason}");
        let src = &self.src;
        let r = match &action {
            Action::RaiseDowntime { to } => src
                .execute_timeout(
                    &qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                        downtime_limit: Some(to.as_millis() as u64),
                        ..Default::default()
                    }),
                    QUERY_TIMEOUT,
                )
                .await
                .map(drop),
            Action::Throttle {
                initial_pct,
                increment_pct,
                max_pct,
            } => src
                .execute_timeout(
                    &qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                        cpu_throttle_initial: Some(*initial_pct),
                        cpu_throttle_increment: Some(*increment_pct),
                        max_cpu_throttle: Some(*max_pct),
                        ..Default::default()
                    }),
                    QUERY_TIMEOUT,
                )
                .await
                .map(drop),
            Action::StartPostcopy => src
                .execute_timeout(&qmp::migrate_start_postcopy {}, QUERY_TIMEOUT)
                .await
                .map(drop),
            Action::Cancel => src
                .execute_timeout(&qmp::migrate_cancel {}, QUERY_TIMEOUT)
                .await
                .map(drop),
            Action::PauseSource => {
                let r = src
                    .execute_timeout(&qmp::stop {}, QUERY_TIMEOUT)
                    .await
                    .map(drop);
                if r.is_ok() {
                    self.paused_at = Some(Instant::now());
                }
                r
            }
        };
        if let Err(e) = r {
            warn!(vm = %self.vm(), ?action, "escalation step failed: {e}");
        }
        self.report.escalations.push(Escalation {
            at_ms: self.now().as_millis() as u64,
            pass,
            action,
            reason,
        });
    }

    /// `query-migrate` on the source, as an observation; `None` while an unanswered poll is not yet conclusive.
    async fn poll_source(
        &mut self,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Option<Observation> {
        if self.src.is_closed() {
            return Some(Observation::SourceUnreachable { closed: true });
        }
        let info = match self
            .src
            .execute_timeout(&QueryMigrate {}, QUERY_TIMEOUT)
            .await
        {
            Ok(i) => {
                self.unanswered = 0;
                i
            }
            Err(e) if e.is_closed() => {
                warn!(vm = %self.vm(), "{e}");
                return Some(Observation::SourceUnreachable { closed: true });
            }
            Err(e) => {
                self.unanswered += 1;
                warn!(vm = %self.vm(), "query-migrate: {e}");
                return (self.unanswered >= UNANSWERED_POLLS)
                    .then_some(Observation::SourceUnreachable { closed: false });
            }
        };
        let status = info.status.clone().unwrap_or_default();
        self.max_throttle = self
            .max_throttle
            .max(info.cpu_throttle_percentage.unwrap_or(0));
        if status == "completed" {
            // QEMU flips the status before it fills in total-time and downtime.
            let mut info = info;
            for _ in 0..20 {
                if info.total_time.unwrap_or(0) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                match self
                    .src
                    .execute_timeout(&QueryMigrate {}, QUERY_TIMEOUT)
                    .await
                {
                    Ok(i) => info = i,
                    Err(_) => break,
                }
            }
            self.remember(info);
        } else {
            self.remember(info);
        }
        let obs = ladder_observation(&self.last, self.now(), self.pass_volume.1);
        let ram = self.last.ram.clone().unwrap_or_default();
        if obs.pass != self.pass_volume.0 {
            // A new pass since the last poll: the sync found what is left plus what was sent since it, about half
            // the time since that poll.
            let gap_s = self.report.samples.last().map_or(0.0, |s| {
                (obs.elapsed.as_millis() as u64).saturating_sub(s.at_ms) as f64 / 1000.0
            });
            let sent_since = obs.throughput_bytes_per_s * gap_s / 2.0;
            self.pass_volume = (obs.pass, ram.remaining.saturating_add(sent_since as u64));
        }
        self.report.samples.push(Sample {
            at_ms: obs.elapsed.as_millis() as u64,
            status: status.clone(),
            pass: obs.pass,
            remaining_bytes: ram.remaining,
            transferred_bytes: ram.transferred,
            zero_pages: ram.duplicate,
            normal_pages: ram.normal,
            throughput_bytes_per_s: obs.throughput_bytes_per_s,
            dirty_rate_bytes_per_s: obs.dirty_rate_bytes_per_s,
            throttle_pct: obs.throttle_pct,
            downtime_limit_ms: self.ladder.downtime().as_millis() as u64,
        });
        self.predict_after_first_pass();
        progress(&Progress {
            elapsed: obs.elapsed,
            status: status.clone(),
            pass: obs.pass,
            total_bytes: ram.total,
            remaining_bytes: ram.remaining,
            transferred_bytes: ram.transferred,
            throughput_bytes_per_s: obs.throughput_bytes_per_s,
            dirty_rate_bytes_per_s: obs.dirty_rate_bytes_per_s,
            throttle_pct: self.last.cpu_throttle_percentage.unwrap_or(0),
            downtime_limit: self.ladder.downtime(),
        });
        Some(Observation::Status(status))
    }

    /// Once the first pass is sent: the forecast again, from what it showed.
    fn predict_after_first_pass(&mut self) {
        if self.report.forecast_after_first_pass.is_some() {
            return;
        }
        let Some(model) = self.model else {
            return;
        };
        if let Some(live) = foresee::after_first_pass(
            &model,
            &self.req.ladder,
            &self.report.samples,
            self.req.poll_interval,
        ) {
            info!(vm = %self.vm(), ending = ?live.prediction.ending, total_ms = live.prediction.total_time_ms,
                "forecast after the first pass: {}", live.prediction.reason);
            self.report.forecast_after_first_pass = Some(live);
        }
    }

    /// Keeps the newest figures; a cancelled or failed migration reports none, so the last ones seen stay.
    fn remember(&mut self, info: MigrationInfo) {
        let ram_before = self.last.ram.take();
        self.last = info;
        if self.last.ram.is_none() {
            self.last.ram = ram_before;
        }
    }

    async fn source_state(&mut self) -> EndState {
        end_state(&self.src).await
    }

    async fn destination_state(&mut self) -> EndState {
        end_state(&self.dst).await
    }

    /// `cont` on the source if it is paused. The machine emits this only once the destination is known not to
    /// run the guest.
    async fn resume_source(&mut self) {
        for _ in 0..10 {
            match self
                .src
                .execute_timeout(&QueryStatus {}, QUERY_TIMEOUT)
                .await
            {
                Ok(s) if s.status == "running" => return,
                Ok(s) if matches!(s.status.as_str(), "paused" | "postmigrate") => {
                    match self.src.execute_timeout(&qmp::cont {}, QUERY_TIMEOUT).await {
                        Ok(_) => {
                            info!(vm = %self.vm(), "resumed the source");
                            return;
                        }
                        Err(e) => warn!(vm = %self.vm(), "cont: {e}"),
                    }
                }
                // finish-migrate, or a cancel still settling: give QEMU a moment.
                Ok(_) => {}
                Err(e) => {
                    warn!(vm = %self.vm(), "query-status: {e}");
                    if e.is_closed() {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One postcopy recovery attempt: `migrate-recover` on the destination (it listens again), `migrate` with
    /// `resume: true` on the source.
    async fn recover(&mut self, attempt: u32) -> Option<Observation> {
        let uri = recovery_uri(&self.report.uri, attempt);
        info!(vm = %self.vm(), attempt, %uri, "postcopy recovery attempt");
        let at_ms = self.now().as_millis() as u64;
        let record = |run: &mut Run, result: String| {
            run.report.recoveries.push(RecoveryAttempt {
                at_ms,
                attempt,
                uri: uri.clone(),
                result,
            });
        };
        // Out of band: the destination's main loop may be blocked on a page that will not come. QEMU refuses it
        // until the destination itself has noticed the broken stream (then the backoff retries); a destination
        // already listening from an earlier attempt is fine.
        if let Err(e) = self
            .dst
            .execute_oob(&qmp::migrate_recover { uri: uri.clone() }, QUERY_TIMEOUT)
            .await
        {
            let e = e.to_string();
            if !e.contains("already") {
                record(self, format!("migrate-recover: {e}"));
                return Some(Observation::RecoverFailed(e));
            }
        }
        match self
            .src
            .execute_timeout(
                &qmp::migrate {
                    uri: Some(uri.clone()),
                    channels: None,
                    detach: None,
                    resume: Some(true),
                },
                QUERY_TIMEOUT,
            )
            .await
        {
            Ok(_) => {
                record(self, "ok".into());
                self.report.uri = uri;
                None
            }
            Err(e) => {
                let e = e.to_string();
                record(self, format!("migrate resume: {e}"));
                Some(Observation::RecoverFailed(e))
            }
        }
    }

    /// Reads both ends, counts the running copies and builds the report.
    async fn finish(mut self) -> MigrationReport {
        let (outcome, why) = self
            .machine
            .outcome()
            .map(|(o, w)| (o, w.map(String::from)))
            .unwrap_or((machine::Outcome::Lost, None));
        let outcome = match outcome {
            machine::Outcome::Completed => Outcome::Completed,
            machine::Outcome::Cancelled => Outcome::Cancelled,
            machine::Outcome::Failed => Outcome::Failed,
            machine::Outcome::RolledBack => Outcome::RolledBack,
            machine::Outcome::Paused => Outcome::Paused,
            machine::Outcome::Lost => Outcome::Lost,
        };
        let guest_shutdown = self.machine.guest_shutdown;
        let wall_ms = self.now().as_millis() as u64;
        let completed = outcome == Outcome::Completed;
        let final_state = final_state(&self.src, &self.dst, completed, guest_shutdown).await;
        if let Destination::Host { tls, .. } = &self.req.destination {
            if *tls && final_state.source != "gone" {
                clear_tls(&self.src).await;
            }
            if completed && final_state.running_copies == 1 && final_state.destination == "running"
            {
                self.report.source_quit = self.quit_source().await;
            }
        }
        if let Some(mut p) = self.dst_process.take() {
            if final_state.destination == "running" || outcome == Outcome::Paused || completed {
                // It carries the guest (or half of it, paused): it must outlive us.
                p.detach();
            } else {
                p.kill().await;
            }
        }
        // Our default stream goes with its directory; a socket QEMU made for a --uri unix:PATH is removed only if
        // it still is a socket (never following a link), and never while a paused postcopy may need it.
        drop(self.stream_dir.take());
        if outcome != Outcome::Paused {
            if let Some(path) = self.report.uri.strip_prefix("unix:") {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        if let Some(prober) = self.prober.take() {
            if completed {
                // The guest's network comes back on the destination after the switch-over: give it time to show.
                tokio::time::sleep(PROBE_AFTER_SWITCHOVER).await;
            }
            let started = self.started;
            let settings = self.req.probe.clone();
            if let (Ok(log), Some(settings)) = (
                tokio::task::spawn_blocking(move || prober.finish()).await,
                settings,
            ) {
                self.report.guest_reachability = Some(crate::probe::GuestReachability::new(
                    &settings, &log, started,
                ));
            }
        }
        let ram = self.last.ram.clone().unwrap_or_default();
        let total_time_ms = if completed {
            self.last.total_time.unwrap_or(wall_ms)
        } else {
            wall_ms
        };
        let downtime_ms = if completed { self.last.downtime } else { None };
        let r = &mut self.report;
        r.outcome = outcome;
        r.reason = if completed { None } else { why };
        r.total_time_ms = total_time_ms;
        r.downtime_ms = downtime_ms;
        r.migration_time_ms = total_time_ms.saturating_sub(downtime_ms.unwrap_or(0));
        r.setup_time_ms = self.last.setup_time;
        r.transferred_bytes = ram.transferred;
        if r.ram_bytes == 0 {
            r.ram_bytes = ram.total;
        }
        r.passes = ram.dirty_sync_count;
        r.max_throttle_pct = self.max_throttle;
        r.postcopy = self.machine.postcopy_started;
        r.postcopy_requests = ram.postcopy_requests;
        r.paused_offline = self.paused_at.is_some();
        r.paused_ms = self
            .paused_at
            .filter(|_| completed)
            .map(|t| t.elapsed().as_millis() as u64);
        r.final_state = final_state;
        r.interrupted = self.interrupted;
        info!(vm = %r.vm, outcome = ?r.outcome, total_ms = r.total_time_ms, "migration finished");
        if let Some(path) = &self.req.calibration {
            let lesson = foresee::lesson(r, self.req.bandwidth_bytes_per_s);
            if let Err(e) =
                crate::calibrate::remember(path, &r.vm, self.link_key.as_deref(), &lesson)
            {
                warn!(vm = %r.vm, "{e}");
            }
        }
        self.report
    }
}

fn cap_list(caps: &[(&str, bool)]) -> MigrateSetCapabilities {
    MigrateSetCapabilities {
        capabilities: caps
            .iter()
            .map(|(c, on)| CapabilityState {
                capability: c.to_string(),
                state: *on,
            })
            .collect(),
    }
}

/// The figures the ladder decides on, from `query-migrate`; peer figures saturate instead of overflowing.
fn ladder_observation(
    info: &MigrationInfo,
    elapsed: Duration,
    pass_volume_bytes: u64,
) -> ladder::Observation {
    let ram = info.ram.clone().unwrap_or_default();
    ladder::Observation {
        elapsed,
        pass: ram.dirty_sync_count,
        remaining_bytes: ram.remaining,
        throughput_bytes_per_s: ram.throughput_bytes_per_s(),
        dirty_rate_bytes_per_s: ram.dirty_rate_bytes_per_s() as f64,
        throttle_pct: info.cpu_throttle_percentage.unwrap_or(0),
        pass_volume_bytes,
    }
}

/// How the destination is connected: as asked, with out-of-band execution.
fn destination_connect(req: &MigrationRequest) -> ConnectOptions {
    ConnectOptions {
        oob: true,
        ..req.connect.clone()
    }
}

/// Which phases poll the source's migration status.
fn polls_source(p: &Phase) -> bool {
    matches!(
        p,
        Phase::Precopy { .. }
            | Phase::Cancelling { .. }
            | Phase::Postcopy
            | Phase::PostcopyPaused { .. }
            | Phase::SourceLost { .. }
    )
}

/// A guest event on the destination that the machine cares about.
fn guest_event(ev: &QmpEvent) -> Option<GuestEvent> {
    match ev.name.as_str() {
        "RESET" | "SHUTDOWN" => Some(GuestEvent::ResetOrShutdown),
        "GUEST_PANICKED" | "GUEST_CRASHLOADED" => Some(GuestEvent::Panicked),
        "RESUME" => Some(GuestEvent::Resumed),
        _ => None,
    }
}

/// The URI a recovery listens on: the same TCP address (QEMU closed its listener once the first connection came),
/// a fresh UNIX path per attempt (the old one may still exist).
pub fn recovery_uri(uri: &str, attempt: u32) -> String {
    match uri.strip_prefix("unix:") {
        Some(path) => {
            let base = path.split(".recover-").next().unwrap_or(path);
            format!("unix:{base}.recover-{attempt}")
        }
        None => uri.to_string(),
    }
}

/// The id of the x509 credentials object `--tls` adds on both ends.
const TLS_ID: &str = "qmigrate-tls";

/// Takes `--tls`'s credentials off a QEMU (the source after the run: it may migrate again without them).
async fn clear_tls(q: &Qmp) {
    let _ = q
        .execute_raw(
            "migrate-set-parameters",
            Some(json!({"tls-creds": "", "tls-hostname": ""})),
            QUERY_TIMEOUT,
        )
        .await;
    let _ = q
        .execute_raw("object-del", Some(json!({"id": TLS_ID})), QUERY_TIMEOUT)
        .await;
}

/// `tcp:HOST:PORT`, an IPv6 address in brackets.
fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// The port an incoming QEMU listens on, from its `query-migrate` (`socket-address`).
async fn listening_port(dst: &Qmp) -> Option<u16> {
    let info = dst
        .execute_raw("query-migrate", None, QUERY_TIMEOUT)
        .await
        .ok()?;
    info.get("socket-address")?
        .as_array()?
        .iter()
        .find_map(|a| a.get("port")?.as_str()?.parse().ok())
}

/// A destination QEMU qmigrate started: killed when the migration ends without it carrying the guest.
enum Launched {
    Local(QemuProcess),
    Remote {
        link: Arc<HostLink>,
        pid: i32,
        socket: String,
    },
}

impl Launched {
    async fn kill(&mut self) {
        match self {
            Launched::Local(p) => p.kill(),
            Launched::Remote { link, pid, socket } => {
                if let Err(e) = link.kill(*pid).await {
                    warn!(host = %link.name(), pid = *pid, "cannot end the destination QEMU: {e}");
                }
                // Its socket would look like a VM of that host to the next search.
                if let Err(e) = link.remove_socket(socket).await {
                    warn!(host = %link.name(), %socket, "cannot remove the destination's socket: {e}");
                }
            }
        }
    }

    /// Leaves it running past qmigrate.
    fn detach(self) {
        match self {
            Launched::Local(p) => {
                p.detach();
            }
            Launched::Remote { .. } => {}
        }
    }
}

/// Whether a `query-migrate` status says a migration is under way.
pub fn is_in_flight(status: &str) -> bool {
    !matches!(status, "none" | "completed" | "failed" | "cancelled" | "")
}

fn version_string(q: &Qmp) -> String {
    let (a, b, c) = q.greeting().version;
    format!("{a}.{b}.{c}")
}

/// The migration stream: the `--uri` given, or a private one (with the directory that holds it).
fn stream(
    req: &MigrationRequest,
    dst: &Qmp,
) -> Result<(String, Option<tempfile::TempDir>), MigrateError> {
    match (&req.uri, &req.destination) {
        (Some(u), _) => Ok((u.clone(), None)),
        // The destination's QEMU picks a free port; `start` reads it back.
        (None, Destination::Host { link, .. }) => {
            Ok((tcp_uri(&link.host.migration_address, 0), None))
        }
        (None, _) => private_stream(dst).map(|(u, d)| (u, Some(d))),
    }
}

/// The default migration stream: a UNIX socket in a private directory of its own (mode 0700, a fresh random
/// name), never a guessable path in a shared directory. The directory goes to the destination QEMU's user, who
/// binds the socket; it is removed with the returned handle.
fn private_stream(dst: &Qmp) -> Result<(String, tempfile::TempDir), MigrateError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(|e| MigrateError::Uri {
            uri: format!("unix:{}/…", base.display()),
            reason: format!("cannot create a private directory for the stream: {e}"),
        })?;
    if let Some(pid) = dst.peer_pid() {
        if let Ok(id) = launch::qemu_identity(pid) {
            let _ = std::os::unix::fs::chown(dir.path(), Some(id.uid), Some(id.gid));
        }
    }
    let uri = format!("unix:{}", dir.path().join("stream.sock").display());
    Ok((uri, dir))
}

async fn launch_destination(
    src: &Qmp,
    qmp_path: Option<PathBuf>,
    opts: &ConnectOptions,
) -> Result<(Qmp, QemuProcess), MigrateError> {
    let src_socket = src
        .label()
        .strip_prefix("unix:")
        .unwrap_or(src.label())
        .to_string();
    let pid = src.peer_pid().ok_or_else(|| MigrateError::NoSourcePid {
        socket: src_socket.clone(),
    })?;
    // The peer must be QEMU, by its executable and by its answer; the destination runs as the source's user.
    let identity = launch::qemu_identity(pid).map_err(MigrateError::Launch)?;
    src.execute(&qmp::query_version {})
        .await
        .map_err(MigrateError::Source)?;
    let (_, args) = launch::process_command_line(pid).map_err(MigrateError::Launch)?;
    let dst_path = qmp_path.unwrap_or_else(|| PathBuf::from(format!("{src_socket}.incoming")));
    launch::prepare_socket_path(&dst_path).map_err(MigrateError::Launch)?;
    // The command line names the socket as QEMU was told; --from may spell it otherwise (DIR/./vm.sock).
    let canonical = std::fs::canonicalize(&src_socket)
        .map(|p| p.display().to_string())
        .unwrap_or(src_socket.clone());
    let mirrored = launch::mirror_destination(
        &args,
        &canonical,
        &dst_path.display().to_string(),
        "incoming",
    )
    .or_else(|_| {
        launch::mirror_destination(
            &args,
            &src_socket,
            &dst_path.display().to_string(),
            "incoming",
        )
    })
    .map_err(|e| MigrateError::Launch(LaunchError::Mirror(e)))?;
    for (old, new) in &mirrored.rewritten {
        debug!(source_pid = pid, "mirror: {old} -> {new}");
    }
    let log = PathBuf::from(format!("{}.log", dst_path.display()));
    info!(source_pid = pid, qmp = %dst_path.display(), uid = identity.uid, "launching the destination QEMU");
    let options = launch::SpawnOptions {
        run_as: Some((identity.uid, identity.gid)),
        current_dir: std::fs::read_link(format!("/proc/{pid}/cwd")).ok(),
        fresh_log: false,
    };
    let mut process =
        QemuProcess::spawn_as(&identity.exe, &mirrored.args, &dst_path, &log, &options)
            .map_err(MigrateError::Launch)?;
    process
        .wait_for_socket(Duration::from_secs(10))
        .await
        .map_err(MigrateError::Launch)?;
    let qmp = Qmp::connect_unix(&dst_path, opts)
        .await
        .map_err(MigrateError::Destination)?;
    Ok((qmp, process))
}

/// The slower NIC of the two inventory hosts, when both are known (else no bound).
/// Ends a destination we launched, when the migration is not started after all.
async fn drop_destination(process: Option<Launched>) {
    if let Some(mut p) = process {
        p.kill().await;
    }
}

/// The key the source→destination link is remembered under, for migrations between inventory hosts.
fn link_key(req: &MigrationRequest) -> Option<String> {
    match (&req.source_host, &req.destination) {
        (Some(s), Destination::Host { link, .. }) => {
            Some(crate::calibrate::link_key(s.name(), link.name()))
        }
        _ => None,
    }
}

/// The guest's non-zero memory, read from the host; `None` (logged) when the host does not let us.
async fn sample_guest_memory(
    req: &MigrationRequest,
    src: &Qmp,
    ram_bytes: u64,
) -> Option<crate::report::FirstPassEstimate> {
    let link = req.source_host.as_deref();
    let socket = req.source.strip_prefix("unix:").unwrap_or(&req.source);
    match tokio::time::timeout(
        GUEST_MEMORY_TIMEOUT,
        crate::guestmem::sample(src, link, socket, ram_bytes),
    )
    .await
    {
        Ok(Ok(e)) => Some(crate::report::FirstPassEstimate {
            nonzero_bytes: e.nonzero_bytes,
            method: e.method.to_string(),
            margin_bytes: Some(e.margin_bytes),
            detail: format!(
                "{} of {} sampled pages non-zero",
                e.nonzero_pages, e.sampled_pages
            ),
        }),
        Ok(Err(e)) => {
            info!(vm = %src.label(), "guest memory not sampled: {e}");
            None
        }
        Err(_) => {
            info!(vm = %src.label(), "guest memory not sampled within {GUEST_MEMORY_TIMEOUT:?}");
            None
        }
    }
}

pub fn ending_name(e: predict::Ending) -> &'static str {
    match e {
        predict::Ending::Precopy => "completes in precopy",
        predict::Ending::Postcopy => "completes in postcopy",
        predict::Ending::Offline => "completes offline",
        predict::Ending::Cancelled => "cancelled",
    }
}

fn link_bound(req: &MigrationRequest) -> u64 {
    let nic = |l: &HostLink| Some(l.host.capacity.nic_bytes_per_s).filter(|b| *b > 0);
    match (&req.source_host, &req.destination) {
        (Some(s), Destination::Host { link, .. }) => [nic(s), nic(link)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(u64::MAX),
        _ => u64::MAX,
    }
}

/// The VM's name on a host: the one asked for, else its socket's file name.
fn host_vm_name(req: &MigrationRequest) -> String {
    req.vm_name.clone().unwrap_or_else(|| {
        let file = req.source.rsplit('/').next().unwrap_or(&req.source);
        file.strip_suffix(".qmp").unwrap_or(file).to_string()
    })
}

/// Where a destination's QMP socket goes on a host: its runtime directory, named after the VM.
fn host_qmp_path_of(req: &MigrationRequest, link: &HostLink) -> String {
    host_qmp_path(&link.host, &host_vm_name(req))
}

/// Where the destination of VM `name` gets its QMP socket on `host`: `RUNTIME_DIR/NAME.qmp` (a `/` in the name
/// becomes `_`).
pub fn host_qmp_path(host: &crate::inventory::Host, name: &str) -> String {
    format!(
        "{}/{}.qmp",
        host.runtime_dir.display(),
        name.replace('/', "_")
    )
}

/// A template destination's arguments: the template's placeholders filled from the VM (`{name}`, `{qmp}`,
/// `{runtime_dir}`, `{memory_mib}`) and the vars (the VM entry's over the host's; a var's value may itself use the
/// VM's four), `-incoming defer` appended.
fn template_args(
    path: &std::path::Path,
    host_vars: &std::collections::BTreeMap<String, String>,
    vm_vars: &std::collections::BTreeMap<String, String>,
    name: &str,
    qmp: &str,
    link: &HostLink,
    ram_bytes: u64,
) -> Result<Vec<String>, MigrateError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        MigrateError::Launch(LaunchError::Template {
            name: shown.clone(),
            reason: format!("cannot read it: {e}"),
        })
    })?;
    let own = [
        ("name", name.to_string()),
        ("qmp", qmp.to_string()),
        ("runtime_dir", link.host.runtime_dir.display().to_string()),
        ("memory_mib", (ram_bytes >> 20).to_string()),
    ];
    let mut vars: Vec<(&str, String)> = own.to_vec();
    let mut merged = host_vars.clone();
    merged.extend(vm_vars.clone());
    for (k, v) in &merged {
        let v = own
            .iter()
            .fold(v.clone(), |v, (ok, ov)| v.replace(&format!("{{{ok}}}"), ov));
        vars.push((k.as_str(), v));
    }
    let mut args = launch::expand_template(&shown, &text, &vars).map_err(MigrateError::Launch)?;
    args.extend(["-incoming".to_string(), "defer".to_string()]);
    Ok(args)
}

/// Starts the destination on another host: the source's command line read from its host's `/proc` (the QEMU
/// listening on the source socket, checked to be QEMU), mirrored with every host-local path moved, started there
/// as its own process as the source's user. Returns its QMP connection and pid.
async fn launch_on_host(
    req: &MigrationRequest,
    src: &Qmp,
    link: &Arc<HostLink>,
    opts: &ConnectOptions,
) -> Result<(Qmp, i32), MigrateError> {
    let Some(src_link) = &req.source_host else {
        return Err(MigrateError::from(HostError::Invalid {
            host: link.name().into(),
            what: "a destination on a host needs the source's host too (migrate --inventory)"
                .into(),
        }));
    };
    let process = src_link.qemu_process(&req.source).await?;
    let exe_name = process.exe.rsplit('/').next().unwrap_or("");
    if !exe_name.starts_with("qemu") {
        return Err(MigrateError::from(HostError::Invalid {
            host: src_link.name().into(),
            what: format!(
                "{} is served by {} (pid {}), not QEMU",
                req.source, process.exe, process.pid
            ),
        }));
    }
    src.execute(&qmp::query_version {})
        .await
        .map_err(MigrateError::Source)?;
    let dst_socket = host_qmp_path_of(req, link);
    let args = match &link.host.destination {
        DestinationStart::Mirror => {
            let mirrored =
                launch::mirror_to_other_host(&process.args, &req.source, &dst_socket, link.name())
                    .map_err(|e| MigrateError::Launch(LaunchError::Mirror(e)))?;
            for (old, new) in &mirrored.rewritten {
                debug!(host = %link.name(), "mirror: {old} -> {new}");
            }
            mirrored.args
        }
        DestinationStart::Template { path, vars } => {
            let ram_bytes = src
                .execute(&qmp::query_memory_size_summary {})
                .await
                .map(|m| m.base_memory.saturating_add(m.plugged_memory.unwrap_or(0)))
                .map_err(MigrateError::Source)?;
            let vm_vars = match &req.destination {
                Destination::Host { vars, .. } => vars.clone(),
                _ => Default::default(),
            };
            template_args(
                path,
                vars,
                &vm_vars,
                &host_vm_name(req),
                &dst_socket,
                link,
                ram_bytes,
            )?
        }
    };
    link.make_dir(&link.host.runtime_dir.display().to_string())
        .await?;
    let log = format!("{dst_socket}.log");
    let exe = link
        .host
        .qemu
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or(process.exe.clone());
    let run_as = (process.uid != process.our_uid).then_some((process.uid, process.gid));
    info!(host = %link.name(), qmp = %dst_socket, "launching the destination QEMU");
    let pid = link
        .spawn_detached(&process.cwd, &log, run_as, &exe, &args)
        .await?;
    if let Err(e) = link
        .wait_for_socket(pid, &dst_socket, &log, Duration::from_secs(15))
        .await
    {
        let _ = link.kill(pid).await;
        let _ = link.remove_socket(&dst_socket).await;
        return Err(e.into());
    }
    match link.connect_qmp(&dst_socket, opts).await {
        Ok(q) => Ok((q, pid)),
        Err(e) => {
            let _ = link.kill(pid).await;
            let _ = link.remove_socket(&dst_socket).await;
            Err(e.into())
        }
    }
}

/// One end's run state: `Gone` when its QMP connection closed, `Unknown` when it does not answer in time.
async fn end_state(q: &Qmp) -> EndState {
    if q.is_closed() {
        return EndState::Gone;
    }
    match q.execute_timeout(&QueryStatus {}, QUERY_TIMEOUT).await {
        Ok(s) => EndState::from_status(&s.status),
        Err(e) if e.is_closed() => EndState::Gone,
        Err(e) => {
            warn!(qmp = %q.label(), "query-status: {e}");
            EndState::Unknown
        }
    }
}

/// Reads both ends' run state and counts the running copies.
async fn final_state(src: &Qmp, dst: &Qmp, completed: bool, guest_shutdown: bool) -> FinalState {
    let state = |q: &Qmp| {
        let q = q.clone();
        async move {
            match end_state(&q).await {
                EndState::Running => "running".to_string(),
                EndState::NotRunning(s) => s,
                EndState::Gone => "gone".into(),
                EndState::Unknown => "unknown".into(),
            }
        }
    };
    let mut source = state(src).await;
    let destination = state(dst).await;
    if completed && source == "running" && destination == "running" {
        // Two copies: the destination holds the newest state, so the source must stop.
        warn!(vm = %src.label(), "both ends run the guest after completion; stopping the source");
        let _ = src.execute(&qmp::stop {}).await;
        source = state(src).await;
    }
    let running_copies = [&source, &destination]
        .iter()
        .filter(|s| s.as_str() == "running")
        .count() as u32;
    FinalState {
        source,
        destination,
        guest_shutdown,
        running_copies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Capacity, Host, SshSettings, Transport};

    fn link() -> HostLink {
        HostLink::new(
            Host {
                name: "b".into(),
                transport: Transport::Local,
                qmp_glob: None,
                runtime_dir: PathBuf::from("/run/q"),
                migration_address: "10.0.0.2".into(),
                destination: DestinationStart::Mirror,
                qemu: None,
                tls_dir: None,
                capacity: Capacity::default(),
            },
            SshSettings::default(),
        )
    }

    #[test]
    fn a_template_is_filled_from_the_vm_then_the_vars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.args");
        std::fs::write(
            &path,
            "-name {name}\n-m {memory_mib}\n-qmp unix:{qmp},server=on,wait=off\n-serial file:{log}\n-accel {accel}\n",
        )
        .unwrap();
        let host: std::collections::BTreeMap<String, String> = [
            ("accel".to_string(), "kvm".to_string()),
            ("log".to_string(), "{runtime_dir}/{name}.log".to_string()),
        ]
        .into();
        let vm = [("accel".to_string(), "tcg".to_string())].into();
        let args = template_args(
            &path,
            &host,
            &vm,
            "web 1",
            "/run/q/web 1.qmp",
            &link(),
            256 << 20,
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "-name",
                "web 1",
                "-m",
                "256",
                "-qmp",
                "unix:/run/q/web 1.qmp,server=on,wait=off",
                "-serial",
                "file:/run/q/web 1.log",
                "-accel",
                "tcg",
                "-incoming",
                "defer"
            ]
        );
        // A placeholder nobody fills, and a template that is not there, are named.
        let empty = Default::default();
        let e = template_args(&path, &empty, &empty, "w", "/q", &link(), 1 << 30).unwrap_err();
        assert!(format!("{:#}", anyhow::Error::new(e)).contains("{log}"));
        let e = template_args(
            &dir.path().join("none.args"),
            &host,
            &vm,
            "w",
            "/q",
            &link(),
            1 << 30,
        )
        .unwrap_err();
        assert!(format!("{:#}", anyhow::Error::new(e)).contains("none.args"));
    }

    #[test]
    fn tcp_uris_bracket_ipv6() {
        assert_eq!(tcp_uri("10.0.0.2", 4444), "tcp:10.0.0.2:4444");
        assert_eq!(tcp_uri("fd00::2", 4444), "tcp:[fd00::2]:4444");
    }
}
