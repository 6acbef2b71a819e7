//! One migration, from checks to verdict: connect and check both ends, measure the dirty rate and predict,
//! set capabilities and parameters, start, follow every pass, apply the escalation ladder ([`ladder`]), handle
//! cancellation and a dying destination, and finally check that exactly one copy of the guest runs.
//! Decisions are made by the pure [`ladder`] and [`crate::predict`]; this module only does the I/O.

pub mod ladder;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qapi::qmp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::exit::Exit;
use crate::launch::{self, LaunchError, QemuProcess};
use crate::predict::{self, PrecopyInput};
use crate::qmp::types::{
    CalcDirtyRate, CapabilityState, MigrateSetCapabilities, MigrationInfo, QueryDirtyRate,
    QueryMigrate, QueryStatus,
};
use crate::qmp::{ConnectOptions, PeerFeatures, Qmp, QmpError};
use crate::report::{
    DirtyRateBefore, Escalation, FinalState, MigrationReport, Outcome, ReportSettings,
};
use ladder::{Action, AutoConverge, Ladder, LadderSettings, Observation, Postcopy};

/// Where the guest goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A QEMU already waiting with `-incoming defer` (or `-incoming URI`), at this QMP address.
    Qmp(String),
    /// Start one by mirroring the source's command line; its QMP socket goes to `qmp_path` (default: beside
    /// the source's, suffixed `.incoming`).
    Launch { qmp_path: Option<PathBuf> },
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
    /// After completion, how long to watch the destination for the guest dying (panic, reset, shutdown, QEMU
    /// exit) before calling the migration done; if it dies, the source is resumed.
    pub verify_window: Duration,
    pub connect: ConnectOptions,
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
                postcopy: Postcopy::Never,
                on_timeout: ladder::OnTimeout::Cancel,
            },
            dirty_rate_sample: Some(Duration::from_secs(1)),
            poll_interval: Duration::from_millis(250),
            verify_window: Duration::from_secs(2),
            connect: ConnectOptions::default(),
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
    #[error("source {socket} already has a migration in state {status}")]
    SourceBusy { socket: String, status: String },
    #[error("destination {socket} is not waiting for a migration (state: {status}); start it with -incoming defer")]
    DestinationNotIncoming { socket: String, status: String },
    #[error("cannot launch a destination: the pid of the QEMU behind {socket} is unknown")]
    NoSourcePid { socket: String },
    #[error("cannot launch the destination")]
    Launch(#[source] LaunchError),
    #[error("cannot set the migration up on {socket}")]
    Setup {
        socket: String,
        #[source]
        source: QmpError,
    },
    #[error("{socket} does not support {what}")]
    Unsupported { socket: String, what: String },
    #[error("interrupted before the migration started; nothing was changed")]
    Interrupted,
}

impl MigrateError {
    pub fn exit(&self) -> Exit {
        match self {
            MigrateError::Source(e) | MigrateError::Destination(e) => match e {
                QmpError::Command { .. } => Exit::State,
                _ => Exit::Endpoint,
            },
            MigrateError::Launch(_) | MigrateError::NoSourcePid { .. } => Exit::Endpoint,
            MigrateError::SourceNotRunning { .. }
            | MigrateError::SourceBusy { .. }
            | MigrateError::DestinationNotIncoming { .. }
            | MigrateError::Setup { .. }
            | MigrateError::Unsupported { .. } => Exit::State,
            MigrateError::Interrupted => Exit::Interrupted,
        }
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
        if self.final_state.running_copies != 1 {
            return Exit::GuestNotRunningOnce;
        }
        match self.outcome {
            Outcome::Completed => Exit::Completed,
            Outcome::Cancelled if self.interrupted => Exit::Interrupted,
            Outcome::Cancelled => Exit::Cancelled,
            Outcome::Failed => Exit::Failed,
        }
    }
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one migration. `cancel` interrupts it (the source keeps running); `progress` is called on every poll.
pub async fn migrate(
    req: &MigrationRequest,
    cancel: &CancellationToken,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<MigrationReport, MigrateError> {
    let src = Qmp::connect(&req.source, &req.connect)
        .await
        .map_err(MigrateError::Source)?;
    let src_label = src.label().to_string();
    let status = src
        .execute(&QueryStatus {})
        .await
        .map_err(MigrateError::Source)?;
    if status.status != "running" {
        return Err(MigrateError::SourceNotRunning {
            socket: src_label,
            status: status.status,
        });
    }
    let mig = src
        .execute(&QueryMigrate {})
        .await
        .map_err(MigrateError::Source)?;
    if let Some(s) = mig.status.as_deref().filter(|s| is_in_flight(s)) {
        return Err(MigrateError::SourceBusy {
            socket: src_label,
            status: s.into(),
        });
    }

    // The destination: an existing QEMU in incoming state, or one we start from the source's command line.
    let (dst, mut dst_process) = match &req.destination {
        Destination::Qmp(spec) => (
            Qmp::connect(spec, &req.connect)
                .await
                .map_err(MigrateError::Destination)?,
            None,
        ),
        Destination::Launch { qmp_path } => {
            let (qmp, process) = launch_destination(&src, qmp_path.clone(), &req.connect).await?;
            (qmp, Some(process))
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
        .map(|m| m.base_memory + m.plugged_memory.unwrap_or(0))
        .map_err(MigrateError::Source)?;

    // Measure before predicting: the sampled rate runs low, the live counters correct it later.
    let dirty_rate_before = match req.dirty_rate_sample {
        Some(t) if src_features.has_command("calc-dirty-rate") => tokio::select! {
            r = measure_dirty_rate(&src, t) => r,
            _ = cancel.cancelled() => return Err(MigrateError::Interrupted),
        },
        _ => None,
    };
    let predicted = dirty_rate_before.as_ref().map(|d| {
        predict::precopy(&PrecopyInput {
            volume_bytes: ram_bytes,
            dirty_rate_bytes_per_s: d.bytes_per_s as f64,
            bandwidth_bytes_per_s: req.bandwidth_bytes_per_s as f64,
            downtime_limit: settings.downtime,
        })
    });
    if let Some(p) = &predicted {
        info!(vm = %src_label, verdict = ?p.verdict, passes = p.passes, "prediction: {}", p.reason);
    }

    let setup = |socket: &str| {
        let socket = socket.to_string();
        move |source| MigrateError::Setup { socket, source }
    };
    set_up(&src, &src_features, &dst, req)
        .await
        .map_err(|(side, e)| match side {
            Side::Source => setup(&src_label)(e),
            Side::Destination => setup(&dst_label)(e),
        })?;

    let uri = req.uri.clone().unwrap_or_else(default_uri);
    if cancel.is_cancelled() {
        return Err(MigrateError::Interrupted);
    }
    match dst
        .execute(&qmp::migrate_incoming {
            uri: Some(uri.clone()),
            channels: None,
            exit_on_error: None,
        })
        .await
    {
        Ok(_) => {}
        // Started with `-incoming URI`: it already listens; the caller's --uri must match it.
        Err(e) if req.uri.is_some() && e.to_string().contains("already") => {
            info!(destination = %dst_label, "destination already listens; using {uri}")
        }
        Err(e) => return Err(setup(&dst_label)(e)),
    }
    let mut events = src.events();
    let mut dst_events = dst.events();
    src.execute(&qmp::migrate {
        uri: Some(uri.clone()),
        channels: None,
        detach: None,
        resume: None,
    })
    .await
    .map_err(setup(&src_label))?;
    let started = Instant::now();
    info!(vm = %src_label, destination = %dst_label, %uri, "migration started");

    let mut ladder = Ladder::new(settings.clone());
    let mut ctl = Controls::default();
    let mut last = MigrationInfo::default();
    let mut max_throttle = 0u64;
    let mut interrupted = false;
    let mut failure: Option<String> = None;
    let mut dst_gone = false;
    let mut events_open = true;
    let mut query_errors = 0u32;
    let mut ticker = tokio::time::interval(req.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut outcome = loop {
        let mut forced: Option<(Action, String)> = None;
        tokio::select! {
            _ = ticker.tick() => {}
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => tracing::debug!(vm = %src_label, event = %ev.name, data = %ev.data, "event"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => events_open = false,
            },
            _ = cancel.cancelled(), if !interrupted => {
                interrupted = true;
                forced = Some((Action::Cancel, "interrupted".into()));
            }
            _ = dst.closed(), if !dst_gone => {
                dst_gone = true;
                // After a cancel the destination ends itself: that is the cancel taking effect, not a failure.
                if ctl.cancel_reason.is_none() {
                    let why = format!("destination {dst_label} went away mid-migration");
                    warn!(vm = %src_label, "{why}");
                    failure.get_or_insert(why.clone());
                    if !ctl.postcopy {
                        forced = Some((Action::Cancel, why));
                    }
                }
            }
        }
        if let Some((action, reason)) = forced {
            let pass = last.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
            ctl.take(&src, action, reason, started.elapsed(), pass)
                .await;
        }
        let info = match src.execute_timeout(&QueryMigrate {}, QUERY_TIMEOUT).await {
            Ok(i) => {
                query_errors = 0;
                i
            }
            Err(e) if e.is_closed() => {
                failure.get_or_insert(format!("lost the source QMP connection: {e}"));
                break Outcome::Failed;
            }
            Err(e) => {
                query_errors += 1;
                warn!(vm = %src_label, "query-migrate: {e}");
                if query_errors >= 5 {
                    failure.get_or_insert(format!("source stopped answering: {e}"));
                    break Outcome::Failed;
                }
                continue;
            }
        };
        let status = info.status.clone().unwrap_or_default();
        max_throttle = max_throttle.max(info.cpu_throttle_percentage.unwrap_or(0));
        let ram = info.ram.clone().unwrap_or_default();
        let obs = Observation {
            elapsed: started.elapsed(),
            pass: ram.dirty_sync_count,
            remaining_bytes: ram.remaining,
            throughput_bytes_per_s: ram.mbps * 1e6 / 8.0,
            dirty_rate_bytes_per_s: (ram.dirty_pages_rate * ram.page_size.max(4096)) as f64,
        };
        progress(&Progress {
            elapsed: obs.elapsed,
            status: status.clone(),
            pass: obs.pass,
            total_bytes: ram.total,
            remaining_bytes: ram.remaining,
            transferred_bytes: ram.transferred,
            throughput_bytes_per_s: obs.throughput_bytes_per_s,
            dirty_rate_bytes_per_s: obs.dirty_rate_bytes_per_s,
            throttle_pct: info.cpu_throttle_percentage.unwrap_or(0),
            downtime_limit: ladder.downtime(),
        });
        // A cancelled or failed migration reports no RAM figures: keep the last ones seen.
        let ram_before = last.ram.take();
        last = info;
        if last.ram.is_none() {
            last.ram = ram_before;
        }
        match status.as_str() {
            "completed" => {
                // QEMU flips the status before it fills in total-time and downtime: read again until it has.
                for _ in 0..20 {
                    if last.total_time.unwrap_or(0) > 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    match src.execute_timeout(&QueryMigrate {}, QUERY_TIMEOUT).await {
                        Ok(i) if i.ram.is_some() => last = i,
                        Ok(i) => {
                            last.total_time = i.total_time;
                            last.downtime = i.downtime;
                        }
                        Err(_) => break,
                    }
                }
                break Outcome::Completed;
            }
            "failed" => {
                let desc = last
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| "no reason given".into());
                failure.get_or_insert(format!("QEMU reports the migration failed: {desc}"));
                break Outcome::Failed;
            }
            "cancelled" => {
                break if failure.is_some() {
                    Outcome::Failed
                } else {
                    Outcome::Cancelled
                };
            }
            "postcopy-paused" | "postcopy-recover" | "postcopy-recover-setup" => {
                failure.get_or_insert(format!(
                    "postcopy stalled ({status}): the destination {dst_label} is unreachable and holds part of the guest's memory"
                ));
                break Outcome::Failed;
            }
            "postcopy-active" => ctl.postcopy = true,
            "active" | "setup" | "pre-switchover" | "device" | "wait-unplug"
                if ctl.paused_at.is_none() && !interrupted && !dst_gone =>
            {
                if let Some(step) = ladder.step(&obs) {
                    ctl.take(&src, step.action, step.reason, obs.elapsed, obs.pass)
                        .await;
                }
            }
            _ => {}
        }
    };
    let wall_ms = started.elapsed().as_millis() as u64;
    if outcome == Outcome::Failed {
        // A destination that died breaks the stream before its QMP socket reports EOF: give it a moment.
        let _ = tokio::time::timeout(Duration::from_millis(500), dst.closed()).await;
    }
    if outcome == Outcome::Failed && ctl.cancel_reason.is_none() && dst.is_closed() {
        if let Some(f) = failure.as_mut().filter(|f| !f.contains(&dst_label)) {
            *f = format!("destination {dst_label} went away mid-migration ({f})");
        }
    }

    // The verdict: where does the guest run now?
    let completed = outcome == Outcome::Completed;
    let mut paused_ms = None;
    if completed {
        let d = dst
            .execute_timeout(&QueryStatus {}, QUERY_TIMEOUT)
            .await
            .ok();
        if d.as_ref()
            .is_some_and(|s| s.status == "paused" || s.status == "postmigrate")
        {
            // Stopped offline (or started with -S): the guest was running before, so it runs on after.
            if let Err(e) = dst.execute(&qmp::cont {}).await {
                warn!(destination = %dst_label, "cont: {e}");
            }
        }
        paused_ms = ctl.paused_at.map(|t| t.elapsed().as_millis() as u64);
        info!(vm = %src_label, destination = %dst_label, "switched over; watching the destination for {}", humantime::format_duration(req.verify_window));
        if let Some(death) = watch_destination(&dst, &mut dst_events, req.verify_window).await {
            // The guest died on the destination right after switching over. The source still holds a consistent
            // image of the switch-over moment: resuming it keeps the guest running, exactly once.
            let why = format!(
                "the guest died on destination {dst_label} within {} of switching over ({death}); resumed on the source",
                humantime::format_duration(req.verify_window)
            );
            warn!(vm = %src_label, "{why}");
            failure = Some(why);
            outcome = Outcome::Failed;
            if let Err(e) = src.execute(&qmp::cont {}).await {
                warn!(vm = %src_label, "cont after the destination died: {e}");
            }
            if let Some(p) = dst_process.as_mut() {
                p.kill();
            }
        }
    } else {
        // The source must run on: resume it if we stopped it, end the destination if we started it.
        let s = src
            .execute_timeout(&QueryStatus {}, QUERY_TIMEOUT)
            .await
            .ok();
        if s.as_ref()
            .is_some_and(|s| s.status == "paused" || s.status == "postmigrate")
            && !ctl.postcopy
        {
            if let Err(e) = src.execute(&qmp::cont {}).await {
                warn!(vm = %src_label, "cont after {:?}: {e}", outcome);
            }
        }
        if let Some(p) = dst_process.as_mut() {
            p.kill();
        }
    }
    let completed = outcome == Outcome::Completed;
    let final_state = final_state(&src, &dst, completed).await;
    if completed {
        if let Some(p) = dst_process.take() {
            if final_state.destination == "running" {
                p.detach();
            }
        }
    }
    if let Some(path) = uri.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
    }

    let ram = last.ram.clone().unwrap_or_default();
    let total_time_ms = if completed {
        last.total_time.unwrap_or(wall_ms)
    } else {
        wall_ms
    };
    let downtime_ms = if completed { last.downtime } else { None };
    let reason = match outcome {
        Outcome::Completed => None,
        Outcome::Cancelled => ctl.cancel_reason.or(failure),
        Outcome::Failed => failure.or(ctl.cancel_reason),
    };
    let report = MigrationReport {
        vm: src_label.clone(),
        source: src_label,
        destination: dst_label,
        destination_pid: dst.peer_pid(),
        uri,
        outcome,
        reason,
        total_time_ms,
        downtime_ms,
        migration_time_ms: total_time_ms.saturating_sub(downtime_ms.unwrap_or(0)),
        setup_time_ms: last.setup_time,
        transferred_bytes: ram.transferred,
        ram_bytes,
        passes: ram.dirty_sync_count,
        max_throttle_pct: max_throttle,
        postcopy: ctl.postcopy,
        postcopy_requests: ram.postcopy_requests,
        paused_offline: ctl.paused_at.is_some(),
        paused_ms,
        escalations: ctl.escalations,
        dirty_rate_before,
        predicted,
        settings: ReportSettings {
            ladder: settings.clone(),
            bandwidth_bytes_per_s: req.bandwidth_bytes_per_s,
        },
        final_state,
        interrupted,
        qemu_source: version_string(&src),
        qemu_destination: version_string(&dst),
    };
    info!(vm = %report.vm, outcome = ?report.outcome, total_ms = report.total_time_ms, "migration finished");
    Ok(report)
}

fn is_in_flight(status: &str) -> bool {
    !matches!(status, "none" | "completed" | "failed" | "cancelled" | "")
}

fn version_string(q: &Qmp) -> String {
    let (a, b, c) = q.greeting().version;
    format!("{a}.{b}.{c}")
}

fn default_uri() -> String {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "unix:{}",
        dir.join(format!("qmigrate-{}-{nanos}.migrate", std::process::id()))
            .display()
    )
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
    let (program, args) = launch::process_command_line(pid).map_err(MigrateError::Launch)?;
    let dst_path = qmp_path.unwrap_or_else(|| PathBuf::from(format!("{src_socket}.incoming")));
    let _ = std::fs::remove_file(&dst_path);
    let dst_args =
        launch::mirror_destination_args(&args, &src_socket, &dst_path.display().to_string());
    let log = PathBuf::from(format!("{}.log", dst_path.display()));
    info!(source_pid = pid, qmp = %dst_path.display(), "launching the destination QEMU");
    let mut process =
        QemuProcess::spawn(&program, &dst_args, &dst_path, &log).map_err(MigrateError::Launch)?;
    process
        .wait_for_socket(Duration::from_secs(10))
        .await
        .map_err(MigrateError::Launch)?;
    let qmp = Qmp::connect_unix(&dst_path, opts)
        .await
        .map_err(MigrateError::Destination)?;
    Ok((qmp, process))
}

async fn measure_dirty_rate(src: &Qmp, sample: Duration) -> Option<DirtyRateBefore> {
    let calc_time = sample.as_secs().max(1);
    if let Err(e) = src
        .execute(&CalcDirtyRate {
            calc_time,
            mode: None,
        })
        .await
    {
        warn!(vm = %src.label(), "calc-dirty-rate: {e}");
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(calc_time + 5);
    tokio::time::sleep(Duration::from_secs(calc_time)).await;
    while Instant::now() < deadline {
        match src.execute(&QueryDirtyRate {}).await {
            Ok(d) if d.status == "measured" => {
                return Some(DirtyRateBefore {
                    bytes_per_s: d.dirty_rate.unwrap_or(0).max(0) as u64 * 1024 * 1024,
                    mode: d.mode.unwrap_or_else(|| "page-sampling".into()),
                    calc_time_ms: calc_time * 1000,
                })
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                warn!(vm = %src.label(), "query-dirty-rate: {e}");
                return None;
            }
        }
    }
    None
}

enum Side {
    Source,
    Destination,
}

/// Capabilities and parameters on both ends. Every capability the run depends on is set explicitly, so a
/// previous attempt's settings never leak into this one.
async fn set_up(
    src: &Qmp,
    f: &PeerFeatures,
    dst: &Qmp,
    req: &MigrationRequest,
) -> Result<(), (Side, QmpError)> {
    let s = &req.ladder;
    let postcopy = s.postcopy != Postcopy::Never;
    let mut caps = vec![
        ("events", true),
        ("auto-converge", s.auto_converge != AutoConverge::Off),
        ("postcopy-ram", postcopy),
    ];
    caps.retain(|(name, on)| f.has_capability(name) || !on);
    caps.retain(|(name, _)| f.has_capability(name));
    let cap_list = |caps: &[(&str, bool)]| MigrateSetCapabilities {
        capabilities: caps
            .iter()
            .map(|(c, on)| CapabilityState {
                capability: c.to_string(),
                state: *on,
            })
            .collect(),
    };
    src.execute(&cap_list(&caps))
        .await
        .map_err(|e| (Side::Source, e))?;
    dst.execute(&cap_list(&[("postcopy-ram", postcopy)]))
        .await
        .map_err(|e| (Side::Destination, e))?;

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
    src.execute(&qmp::migrate_set_parameters(params))
        .await
        .map_err(|e| (Side::Source, e))?;
    Ok(())
}

/// The controls taken during one migration, and what they left behind.
#[derive(Default)]
struct Controls {
    escalations: Vec<Escalation>,
    cancel_reason: Option<String>,
    postcopy: bool,
    /// When the guest was stopped to finish offline.
    paused_at: Option<Instant>,
}

impl Controls {
    /// Carries out `action` on the source and records it with its reason.
    async fn take(&mut self, src: &Qmp, action: Action, reason: String, at: Duration, pass: u64) {
        info!(vm = %src.label(), pass, ?action, "escalation: {reason}");
        apply(src, &action, &mut self.paused_at).await;
        match action {
            Action::StartPostcopy => self.postcopy = true,
            Action::Cancel => {
                self.cancel_reason.get_or_insert(reason.clone());
            }
            _ => {}
        }
        self.escalations.push(Escalation {
            at_ms: at.as_millis() as u64,
            pass,
            action,
            reason,
        });
    }
}

/// Carries out one ladder action on the source. Failures are logged: the next poll shows their effect.
async fn apply(src: &Qmp, action: &Action, paused_at: &mut Option<Instant>) {
    let r = match action {
        Action::RaiseDowntime { to } => src
            .execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                downtime_limit: Some(to.as_millis() as u64),
                ..Default::default()
            }))
            .await
            .map(drop),
        Action::Throttle {
            initial_pct,
            increment_pct,
            max_pct,
        } => src
            .execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                cpu_throttle_initial: Some(*initial_pct),
                cpu_throttle_increment: Some(*increment_pct),
                max_cpu_throttle: Some(*max_pct),
                ..Default::default()
            }))
            .await
            .map(drop),
        Action::StartPostcopy => src.execute(&qmp::migrate_start_postcopy {}).await.map(drop),
        Action::Cancel => src.execute(&qmp::migrate_cancel {}).await.map(drop),
        Action::PauseSource => {
            let r = src.execute(&qmp::stop {}).await.map(drop);
            if r.is_ok() {
                *paused_at = Some(Instant::now());
            }
            r
        }
    };
    if let Err(e) = r {
        warn!(vm = %src.label(), ?action, "escalation step failed: {e}");
    }
}

/// Watches a destination that has just taken over the guest for `window`: its QMP connection closing, or an event
/// saying the guest panicked, reset or shut down. Returns what happened, or `None` if it survived.
async fn watch_destination(
    dst: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>,
    window: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = dst.closed() => return Some("its QEMU exited".into()),
            ev = events.recv() => match ev {
                Ok(ev) if matches!(ev.name.as_str(), "GUEST_PANICKED" | "GUEST_CRASHLOADED" | "SHUTDOWN" | "RESET") => {
                    return Some(format!("{} {}", ev.name, ev.data));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return Some("its QMP connection ended".into()),
            },
        }
    }
}

/// Reads both ends' run state and counts the running copies.
async fn final_state(src: &Qmp, dst: &Qmp, completed: bool) -> FinalState {
    let state = |q: &Qmp| {
        let q = q.clone();
        async move {
            if q.is_closed() {
                return "gone".to_string();
            }
            match q.execute_timeout(&QueryStatus {}, QUERY_TIMEOUT).await {
                Ok(s) => s.status,
                Err(e) if e.is_closed() => "gone".into(),
                Err(_) => "unknown".into(),
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
        running_copies,
    }
}
