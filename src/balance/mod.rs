//! `qmigrate balance`: a balancing policy (band, idc, sandpiper) fed live figures and carried out. Every round
//! samples every host and VM of the inventory (`hosts::check` with its `stats` round, over ssh where needed) and,
//! when asked, the traffic between VMs ([`crate::traffic`]); keeps the history the policies read ([`observe`]);
//! runs the policy; holds back what the anti-thrashing rules forbid ([`guard`]); and carries out the rest: balloon
//! changes through QMP `balloon`, migrations through the evacuation executor (its order, limits, link budgets,
//! journal and exactly-once rules) as a `balance` run of its journal.
//!
//! - [`observe`]: PURE — rounds of samples → the policy's `Scenario` (windowed averages, AR(1) history).
//! - [`guard`]: PURE — cool-downs per VM and per host, the minimum predicted gain.

pub mod guard;
pub mod observe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::evacuate::display::Watcher;
use crate::evacuate::journal::{self, Record, CLUSTER};
use crate::evacuate::{self, EvacuateError, EvacuationReport, Mode, Move};
use crate::hosts::CheckReport;
use crate::inventory::Inventory;
use crate::plan::{Decision, Flow, Policy, Scenario, Tuning};
use guard::{Guard, Held, RecentMove};
use observe::{HostSeen, Smoothing, Tracker, VmSeen};

const MIB: u64 = 1 << 20;

/// A balancing run's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Policy,
    /// Decide once, after [`Options::samples`] rounds of samples, and stop.
    pub once: bool,
    /// Without `once`: the time from one decision to the next (one sample each).
    pub every: Duration,
    /// Rounds of samples taken before the first decision (at least 1), back to back.
    pub samples: usize,
    /// Rounds of history kept (windowed averages, AR(1) series).
    pub window: usize,
    pub tuning: Tuning,
    pub guard: Guard,
    /// Print the decisions with their reasons and figures; change nothing.
    pub dry_run: bool,
    /// Write the scenario each decision was made on here (replaced every round), for `qmigrate simulate`.
    pub record: Option<PathBuf>,
    /// Measure the traffic between VMs over this window every round (`None`: no traffic matrix).
    pub traffic_window: Option<Duration>,
    /// How migrations run: order, limits, link budget, journal, TLS, the migration tuning, QMP timeouts. Its
    /// `host`, `mode`, `moves` and `dry_run` are set per round.
    pub executor: evacuate::Options,
}

/// Why a balancing run stopped before it could decide.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("no host of inventory {inventory} could be sampled: {problems}")]
    NothingSampled { inventory: String, problems: String },
    #[error("cannot record the scenario to {path}: {reason}")]
    Record { path: String, reason: String },
    #[error("journal {path}: {source}")]
    Journal {
        path: String,
        #[source]
        source: journal::JournalError,
    },
    #[error(transparent)]
    Executor(#[from] EvacuateError),
}

/// A balloon change carried out.
#[derive(Debug, Clone, Serialize)]
pub struct BalloonResult {
    pub vm: String,
    pub host: String,
    pub from_mib: u64,
    pub to_mib: u64,
    /// `done` (QEMU took the new target) or `failed`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One host's figures as the policy saw them.
#[derive(Debug, Clone, Serialize)]
pub struct HostFigures {
    pub host: String,
    pub cpu_pct: f64,
    pub swap_writes_per_s: f64,
    pub nic_pct: f64,
    pub memory_committed_mib: u64,
    pub memory_mib: u64,
    pub vms: Vec<String>,
}

/// What one round saw, decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u64,
    pub policy: Policy,
    pub at_ms: u64,
    pub dry_run: bool,
    /// Rounds of samples the figures come from.
    pub samples: usize,
    pub hosts: Vec<HostFigures>,
    /// The traffic matrix (Mbps, both directions together), when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Vec<Flow>>,
    /// Everything the policy decided, in its order.
    pub decisions: Vec<Decision>,
    /// Why the policy did not do more.
    pub notes: Vec<String>,
    /// Decisions held back by the anti-thrashing rules, each with why.
    pub held: Vec<Held>,
    pub balloons: Vec<BalloonResult>,
    /// The executor's report of the migrations (absent when none was carried out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrations: Option<EvacuationReport>,
    /// Hosts or VMs that could not be sampled, and other problems.
    pub problems: Vec<String>,
}

impl RoundReport {
    /// The exit status of a round: the executor's when it ran, failure when a balloon change failed.
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        if let Some(m) = &self.migrations {
            let e = m.exit();
            if e != Exit::Completed {
                return e;
            }
        }
        if self.balloons.iter().any(|b| b.outcome != "done") {
            return Exit::Failed;
        }
        Exit::Completed
    }

    /// The round as text.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "round {} ({}{}, figures from {} sample{}):",
            self.round,
            self.policy,
            if self.dry_run { ", dry run" } else { "" },
            self.samples,
            if self.samples == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            s,
            "  {:<12} {:>6} {:>8} {:>6} {:>14}  vms",
            "HOST", "CPU%", "SWAP/s", "NIC%", "MEMORY MiB"
        );
        for h in &self.hosts {
            let _ = writeln!(
                s,
                "  {:<12} {:>6.1} {:>8.0} {:>6.1} {:>14}  {}",
                crate::text::printable(&h.host),
                h.cpu_pct,
                h.swap_writes_per_s,
                h.nic_pct,
                format!("{}/{}", h.memory_committed_mib, h.memory_mib),
                h.vms
                    .iter()
                    .map(|v| crate::text::printable(v))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Some(flows) = &self.traffic {
            for f in flows {
                let _ = writeln!(
                    s,
                    "  traffic {} <-> {}: {:.3} Mbps",
                    crate::text::printable(&f.a),
                    crate::text::printable(&f.b),
                    f.mbps
                );
            }
        }
        if self.decisions.is_empty() {
            let _ = writeln!(s, "  no decision");
        }
        for d in &self.decisions {
            let _ = writeln!(s, "  {}", describe(d));
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {}", crate::text::printable(n));
        }
        for h in &self.held {
            let _ = writeln!(
                s,
                "  held: {}: {}",
                describe(&h.decision),
                crate::text::printable(&h.why)
            );
        }
        for b in &self.balloons {
            let _ = writeln!(
                s,
                "  balloon {} on {}: {} -> {} MiB: {}{}",
                crate::text::printable(&b.vm),
                crate::text::printable(&b.host),
                b.from_mib,
                b.to_mib,
                b.outcome,
                b.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
        if let Some(m) = &self.migrations {
            s.push_str(&m.to_table());
        }
        for p in &self.problems {
            let _ = writeln!(s, "  problem: {}", crate::text::printable(p));
        }
        s
    }
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Migrate {
            vm,
            from,
            to,
            reason,
            ..
        } => format!(
            "migrate {} {} -> {}: {}",
            crate::text::printable(vm),
            crate::text::printable(from),
            crate::text::printable(to),
            crate::text::printable(reason)
        ),
        Decision::Balloon {
            vm,
            host,
            from_mib,
            to_mib,
            reason,
        } => format!(
            "balloon {} on {}: {from_mib} -> {to_mib} MiB: {}",
            crate::text::printable(vm),
            crate::text::printable(host),
            crate::text::printable(reason)
        ),
    }
}

/// Which form of the figures `policy` reads.
fn smoothing(policy: Policy) -> Smoothing {
    match policy {
        Policy::Band => Smoothing::WindowAverage,
        Policy::Idc | Policy::Sandpiper => Smoothing::LatestWithHistory,
    }
}

/// Runs balancing rounds until `opts.once` is done or `cancel` fires; `on_round` gets each round's report as it
/// ends. Returns the reports.
pub async fn run(
    inv: &Inventory,
    opts: &Options,
    cancel: &CancellationToken,
    watcher: &dyn Watcher,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<Vec<RoundReport>, BalanceError> {
    let mut tracker = Tracker::new(opts.window);
    let mut reports = Vec::new();
    if !opts.dry_run {
        finish_unfinished(inv, opts, cancel, watcher).await?;
    }
    let mut round = 0;
    while !cancel.is_cancelled() {
        let wanted = if round == 0 { opts.samples.max(1) } else { 1 };
        let mut problems = Vec::new();
        let mut check = None;
        for _ in 0..wanted {
            if cancel.is_cancelled() {
                break;
            }
            let (c, flows, traffic_problems) = sample(inv, opts).await;
            problems = c.problems.clone();
            problems.extend(traffic_problems);
            tracker.observe(seen(&c), flows);
            check = Some(c);
        }
        let Some(check) = check else { break };
        round += 1;
        let report = decide_and_act(
            inv, opts, &tracker, &check, round, problems, cancel, watcher,
        )
        .await?;
        on_round(&report);
        reports.push(report);
        if opts.once {
            break;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(opts.every) => {}
        }
    }
    Ok(reports)
}

/// An earlier balance run of this journal that did not finish (qmigrate was killed) is finished first: migrations
/// in flight are taken over, moved VMs are not moved again (the executor's resume).
async fn finish_unfinished(
    inv: &Inventory,
    opts: &Options,
    cancel: &CancellationToken,
    watcher: &dyn Watcher,
) -> Result<(), BalanceError> {
    let path = &opts.executor.journal;
    let records = journal::read(path).map_err(|source| BalanceError::Journal {
        path: path.display().to_string(),
        source,
    })?;
    if journal::replay(&records).unfinished(CLUSTER).is_none() {
        return Ok(());
    }
    warn!(journal = %path.display(), "an earlier balance run did not finish: resuming it first");
    let mut o = opts.executor.clone();
    o.host = CLUSTER.into();
    o.mode = Mode::Resume;
    o.dry_run = false;
    let report = evacuate::run(inv, &o, cancel, watcher).await?;
    info!(
        outcome = report.outcome.as_str(),
        "the unfinished balance run is finished"
    );
    Ok(())
}

/// One round of samples: every host and VM (with classes, memory and NIC figures), and the traffic matrix when
/// asked, at the same time.
async fn sample(inv: &Inventory, opts: &Options) -> (CheckReport, Vec<Flow>, Vec<String>) {
    let check = crate::hosts::check(inv, &opts.executor.connect, true);
    match opts.traffic_window {
        None => (check.await, Vec::new(), Vec::new()),
        Some(window) => {
            let links = crate::remote::links(inv);
            let (check, measured) = tokio::join!(
                check,
                crate::traffic::measure(&links, window, crate::remote::COMMAND_TIMEOUT)
            );
            let (rates, problems) = crate::traffic::gathered(measured);
            let m = crate::traffic::matrix(&rates, &crate::traffic::vm_macs(&check));
            (check, m.flows, problems)
        }
    }
}

/// The check's hosts and VMs as the tracker takes them: reachable hosts, answering running VMs.
fn seen(check: &CheckReport) -> Vec<HostSeen> {
    check
        .hosts
        .iter()
        .filter(|h| h.reachable && h.error.is_none())
        .map(|h| HostSeen {
            name: h.name.clone(),
            cpus: h.cpus,
            memory_bytes: h.memory_bytes,
            nic_bytes_per_s: h.nic_bytes_per_s,
            vms: h
                .vms
                .iter()
                .filter(|v| v.error.is_none())
                .map(|v| {
                    let figures = v.figures.unwrap_or_default();
                    let guest = v.memory.as_ref().and_then(|m| m.guest.as_ref());
                    VmSeen {
                        name: v.name.clone(),
                        cpu_one_cpu_pct: figures
                            .cpu_pct
                            .map(|p| p * f64::from(v.vcpus.unwrap_or(1))),
                        ram_bytes: v.ram_bytes.unwrap_or(0),
                        balloon_bytes: v.memory.as_ref().and_then(|m| m.balloon_actual_bytes),
                        used_pct: guest.and_then(|g| {
                            let (total, available) =
                                (g.total_bytes?, g.available_bytes.or(g.free_bytes)?);
                            (total > 0).then(|| {
                                total.saturating_sub(available) as f64 / total as f64 * 100.0
                            })
                        }),
                        swap_out: guest.and_then(|g| Some((g.swap_out_bytes?, g.last_update_s))),
                        nic_bytes_per_s: match (
                            figures.net_rx_bytes_per_s,
                            figures.net_tx_bytes_per_s,
                        ) {
                            (None, None) => None,
                            (rx, tx) => Some(rx.unwrap_or(0.0) + tx.unwrap_or(0.0)),
                        },
                    }
                })
                .collect(),
        })
        .collect()
}

/// VMs that cannot be touched now, with why: not running, a migration under way, locked by another qmigrate.
fn busy(check: &CheckReport) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for v in check.hosts.iter().flat_map(|h| &h.vms) {
        let why = if let Some(holder) = &v.locked_by {
            Some(format!("held by {holder}"))
        } else if crate::evacuate::survey::adoptable(v) {
            Some(format!(
                "a migration is under way or unresolved (status {})",
                v.migration.as_deref().unwrap_or("?")
            ))
        } else if v.error.is_none() && v.run_state.as_deref() != Some("running") {
            Some(format!(
                "not running (state {})",
                v.run_state.as_deref().unwrap_or("unknown")
            ))
        } else {
            None
        };
        if let Some(why) = why {
            out.insert(v.name.clone(), why);
        }
    }
    out
}

/// Completed moves of the balance journal, for the cool-downs.
fn recent_moves(path: &Path) -> Result<Vec<RecentMove>, BalanceError> {
    let records = journal::read(path).map_err(|source| BalanceError::Journal {
        path: path.display().to_string(),
        source,
    })?;
    Ok(records
        .into_iter()
        .filter_map(|r| match r {
            Record::End {
                vm,
                from,
                to,
                outcome,
                at_ms,
                ..
            } if journal::is_moved(&outcome) => Some(RecentMove {
                vm,
                from,
                to,
                at_ms,
            }),
            _ => None,
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
async fn decide_and_act(
    inv: &Inventory,
    opts: &Options,
    tracker: &Tracker,
    check: &CheckReport,
    round: u64,
    problems: Vec<String>,
    cancel: &CancellationToken,
    watcher: &dyn Watcher,
) -> Result<RoundReport, BalanceError> {
    let at_ms = journal::now_ms();
    let description = format!(
        "recorded by qmigrate balance from {} (round {round}, policy {}, {} sample(s), unix ms {at_ms})",
        inv.path.display(),
        opts.policy,
        tracker.rounds()
    );
    let scenario = tracker
        .scenario(smoothing(opts.policy), &opts.tuning, description)
        .ok_or_else(|| BalanceError::NothingSampled {
            inventory: inv.path.display().to_string(),
            problems: problems.join("; "),
        })?;
    if let Some(path) = &opts.record {
        record(path, &scenario)?;
    }
    let plan = crate::plan::plan_round(opts.policy, &scenario);
    let recent = recent_moves(&opts.executor.journal)?;
    let (keep, held) = guard::screen(
        &scenario,
        plan.decisions.clone(),
        &recent,
        &busy(check),
        at_ms,
        &opts.guard,
    );
    let mut report = RoundReport {
        round,
        policy: opts.policy,
        at_ms,
        dry_run: opts.dry_run,
        samples: tracker.rounds(),
        hosts: figures(&scenario),
        traffic: opts.traffic_window.map(|_| scenario.traffic.clone()),
        decisions: plan.decisions,
        notes: plan.notes,
        held,
        balloons: Vec::new(),
        migrations: None,
        problems,
    };
    if opts.dry_run {
        return Ok(report);
    }
    // Balloon changes first: paper 004 answers a memory overload by ballooning before any migration.
    for d in &keep {
        if let Decision::Balloon {
            vm,
            host,
            from_mib,
            to_mib,
            ..
        } = d
        {
            report
                .balloons
                .push(balloon(inv, opts, check, vm, host, *from_mib, *to_mib).await);
        }
    }
    let moves: Vec<Move> = keep
        .iter()
        .filter_map(|d| match d {
            Decision::Migrate { vm, to, reason, .. } => Some(Move {
                vm: vm.clone(),
                to: to.clone(),
                reason: reason.clone(),
            }),
            Decision::Balloon { .. } => None,
        })
        .collect();
    if !moves.is_empty() && !cancel.is_cancelled() {
        let mut o = opts.executor.clone();
        o.host = CLUSTER.into();
        o.mode = Mode::Balance;
        o.moves = moves;
        o.dry_run = false;
        report.migrations = Some(evacuate::run(inv, &o, cancel, watcher).await?);
    }
    Ok(report)
}

fn figures(s: &Scenario) -> Vec<HostFigures> {
    s.hosts
        .iter()
        .map(|h| HostFigures {
            host: h.name.clone(),
            cpu_pct: h.cpu_pct,
            swap_writes_per_s: h.swap_writes_per_s,
            nic_pct: h.nic_pct,
            memory_committed_mib: s.committed_mib(&h.name),
            memory_mib: h.memory_mib,
            vms: s.vms_on(&h.name).map(|v| v.name.clone()).collect(),
        })
        .collect()
}

/// Writes the scenario whole: to a temporary file beside `path`, then renamed over it.
fn record(path: &Path, s: &Scenario) -> Result<(), BalanceError> {
    let fail = |reason: String| BalanceError::Record {
        path: path.display().to_string(),
        reason,
    };
    let text = serde_json::to_string_pretty(s).map_err(|e| fail(e.to_string()))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail(e.to_string()))?;
    std::io::Write::write_all(&mut tmp, format!("{text}\n").as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    tmp.persist(path).map_err(|e| fail(e.error.to_string()))?;
    Ok(())
}

/// Sets a VM's balloon target through QMP on its host.
async fn balloon(
    inv: &Inventory,
    opts: &Options,
    check: &CheckReport,
    vm: &str,
    host: &str,
    from_mib: u64,
    to_mib: u64,
) -> BalloonResult {
    let mut result = BalloonResult {
        vm: vm.into(),
        host: host.into(),
        from_mib,
        to_mib,
        outcome: "done".into(),
        error: None,
    };
    let socket = check
        .hosts
        .iter()
        .filter(|h| h.name == host)
        .flat_map(|h| &h.vms)
        .find(|v| v.name == vm)
        .map(|v| v.socket.clone());
    let link = crate::remote::links(inv)
        .into_iter()
        .find(|l| l.name() == host);
    let outcome = match (socket, link) {
        (Some(socket), Some(link)) => {
            set_balloon(&link, &socket, &opts.executor.connect, to_mib).await
        }
        _ => Err(format!("VM {vm} is not found on host {host}")),
    };
    if let Err(e) = outcome {
        warn!(vm, host, "balloon change failed: {e}");
        result.outcome = "failed".into();
        result.error = Some(e);
    } else {
        info!(vm, host, from_mib, to_mib, "balloon target set");
    }
    result
}

async fn set_balloon(
    link: &crate::remote::HostLink,
    socket: &str,
    connect: &crate::qmp::ConnectOptions,
    to_mib: u64,
) -> Result<(), String> {
    let qmp = link
        .connect_qmp(socket, connect)
        .await
        .map_err(|e| crate::stats::error_chain(&e))?;
    qmp.execute_raw(
        "balloon",
        Some(serde_json::json!({ "value": to_mib * MIB })),
        connect.command_timeout,
    )
    .await
    .map(|_| ())
    .map_err(|e| {
        format!(
            "{}: balloon: {}",
            link.label(socket),
            crate::stats::error_chain(&e)
        )
    })
}
