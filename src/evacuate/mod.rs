//! Evacuating a host: every VM on it live-migrated to the inventory's other hosts, in the order and to the hosts
//! the planner ([`crate::plan::evacuate`]) chose, under per-host concurrency limits and a per-link bandwidth budget,
//! each move through [`crate::migrate::migrate`] and its exactly-once rules, journaled so that a killed run resumes,
//! and undone later by a restore.
//!
//! - [`survey`]: PURE — what an inventory check found, as the planner's input (VMs with predictions, host room).
//! - [`journal`]: the append-only, fsynced journal, and its replay.
//! - [`display`]: the progress display the executor reports to.
//!
//! Data flow: `hosts::check` (every host, with classes) → survey → `plan::evacuate::plan` → journal `run` record →
//! one task per migration (`migrate::migrate`), started in plan order while the limits allow → journal `start`/`end`
//! records → the report.

pub mod display;
pub mod journal;
pub mod survey;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::classify::Class;
use crate::hosts::{CheckReport, VmCheck};
use crate::inventory::{Inventory, InventoryError};
use crate::migrate::{Destination, MigrateError, MigrationRequest, Progress, Takeover};
use crate::plan::budget::{self, Share};
use crate::plan::evacuate::{self as planner, Candidate, Order, PlanError, Step};
use crate::qmp::ConnectOptions;
use crate::remote::HostLink;
use crate::report::{MigrationReport, Outcome};
use display::{Event, Watcher};
use journal::{Journal, JournalError, Record, RunKind, VmState};

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Move every VM off the host.
    Evacuate,
    /// Continue the host's last unfinished evacuation or restore from its journal.
    Resume,
    /// Move back to the host the VMs an earlier evacuation took away from it.
    Restore,
    /// Carry out a balancing policy's moves ([`Options::moves`]), each VM to its fixed destination; `host` is
    /// [`journal::CLUSTER`].
    Balance,
}

/// One move a balancing policy asked for, carried out by [`Mode::Balance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub vm: String,
    pub to: String,
    /// The policy's reason, kept as the step's `why_host`.
    pub reason: String,
}

/// An evacuation's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub mode: Mode,
    pub order: Order,
    /// Only these VMs (empty: every VM of the host).
    pub only: Vec<String>,
    /// [`Mode::Balance`]: the moves to carry out.
    pub moves: Vec<Move>,
    /// Migrations leaving one host at once.
    pub max_out: usize,
    /// Migrations arriving at one host at once.
    pub max_in: usize,
    /// A host's outbound budget, split among its migrations (default: its NIC capacity from the inventory).
    pub link_budget_bytes_per_s: Option<u64>,
    pub journal: PathBuf,
    pub dry_run: bool,
    pub tls: bool,
    /// The tuning every migration gets (ladder, verify, recover-for, dirty-rate sample, bandwidth cap); its source
    /// and destination are replaced per VM.
    pub template: MigrationRequest,
    pub connect: ConnectOptions,
}

/// Default [`Options::max_out`]: one migration out of a host at a time (see docs/benchmarks.md, "evacuation").
pub const DEFAULT_MAX_OUT: usize = 1;
/// Default [`Options::max_in`].
pub const DEFAULT_MAX_IN: usize = 2;

/// Why an evacuation could not run; nothing was moved.
#[derive(Debug, thiserror::Error)]
pub enum EvacuateError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("host {host} cannot be evacuated: {why}")]
    Host { host: String, why: String },
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("evacuation of host {host}")]
    Plan {
        host: String,
        #[source]
        source: PlanError,
    },
    #[error("nothing to resume for host {host}: journal {journal} has no unfinished evacuation or restore of it")]
    NothingToResume { host: String, journal: String },
    #[error("VM {vm}: {why}")]
    Vm { vm: String, why: String },
}

impl EvacuateError {
    /// The exit status this error stands for.
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            EvacuateError::Inventory(_) => Exit::Usage,
            EvacuateError::Host { .. } => Exit::Endpoint,
            EvacuateError::Journal(JournalError::Held { .. }) => Exit::State,
            EvacuateError::Journal(_) => Exit::Internal,
            EvacuateError::Plan { .. }
            | EvacuateError::NothingToResume { .. }
            | EvacuateError::Vm { .. } => Exit::State,
        }
    }
}

/// How the whole run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunOutcome {
    /// `--dry-run`: planned only.
    Planned,
    /// Nothing needed to move.
    NothingToDo,
    /// Every VM moved.
    Completed,
    /// Some moved, some failed (each failed one runs on its source).
    Partial,
    /// None moved.
    Failed,
    /// Interrupted: running precopies were cancelled, no new migration started.
    Interrupted,
    /// A VM did not end up running exactly once (look at the VM's entry).
    NotRunningOnce,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Planned => "planned",
            RunOutcome::NothingToDo => "nothing-to-do",
            RunOutcome::Completed => "completed",
            RunOutcome::Partial => "partial",
            RunOutcome::Failed => "failed",
            RunOutcome::Interrupted => "interrupted",
            RunOutcome::NotRunningOnce => "not-running-once",
        }
    }
}

/// One VM of the run.
#[derive(Debug, Clone, Serialize)]
pub struct VmResult {
    pub vm: String,
    pub classes: Vec<Class>,
    pub position: usize,
    pub from: String,
    pub to: String,
    pub predicted_ms: u64,
    /// The migration's own total time (QEMU's), when it ran.
    pub actual_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// When it started and ended, from the start of the run.
    pub started_at_ms: Option<u64>,
    pub completed_at_ms: Option<u64>,
    /// `completed`, `adopted`, `moved-earlier`, `failed`, `cancelled`, `rolled-back`, `lost`, `paused`, `refused`,
    /// `skipped`, `planned`.
    pub outcome: String,
    pub reason: Option<String>,
    /// The host the guest runs on after it (None: nowhere, or unknown).
    pub running_on: Option<String>,
    pub transferred_bytes: u64,
    /// Its migration was under way when the run began (a resumed run) and was taken over, not started.
    pub taken_over: bool,
    /// The bandwidth caps it was given, in order: its share of its source's link budget at the start, then each
    /// change as migrations beside it started, ended or stalled.
    pub bandwidth_caps_bytes_per_s: Vec<u64>,
}

/// The figures of the whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// From the first start to the last end.
    pub makespan_ms: u64,
    /// The mean over moved VMs of the time from the run's start to its move's end (paper 001's completion time).
    pub mean_completion_ms: u64,
    /// The mean of the moved VMs' own migration times.
    pub mean_migration_ms: u64,
    pub total_downtime_ms: u64,
    pub bytes: u64,
    pub moved: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// The report of an evacuation (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct EvacuationReport {
    pub host: String,
    pub kind: RunKind,
    pub run: u64,
    pub resumes: Option<u64>,
    pub order: String,
    pub journal: String,
    pub max_out: usize,
    pub max_in: usize,
    pub outcome: RunOutcome,
    pub plan: Vec<Step>,
    pub vms: Vec<VmResult>,
    pub totals: Totals,
    /// What was left alone, and why.
    pub notes: Vec<String>,
}

impl EvacuationReport {
    /// The exit status: 0 all moved (or nothing to do, or a plan), 10 partial, 6 none moved, 7 interrupted, 8 a
    /// guest not running exactly once.
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self.outcome {
            RunOutcome::Planned | RunOutcome::NothingToDo | RunOutcome::Completed => {
                Exit::Completed
            }
            RunOutcome::Partial => Exit::Partial,
            RunOutcome::Failed => Exit::Failed,
            RunOutcome::Interrupted => Exit::Interrupted,
            RunOutcome::NotRunningOnce => Exit::GuestNotRunningOnce,
        }
    }

    /// The plan and the outcome per VM as a table.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "{} of host {} ({} order, run {}, journal {}): {}\n",
            match self.kind {
                RunKind::Evacuate => "evacuation",
                RunKind::Restore => "restore",
                RunKind::Balance => "balancing",
            },
            self.host,
            self.order,
            self.run,
            self.journal,
            self.outcome.as_str()
        );
        out.push_str(&format!(
            "{:>3}  {:<16} {:<22} {:<8} {:<8} {:>10} {:>10} {:>9}  {}\n",
            "#", "VM", "classes", "from", "to", "predicted", "actual", "downtime", "outcome"
        ));
        for v in &self.vms {
            let classes: Vec<&str> = v.classes.iter().map(|c| c.name()).collect();
            out.push_str(&format!(
                "{:>3}  {:<16} {:<22} {:<8} {:<8} {:>9.1}s {:>10} {:>9}  {}{}\n",
                v.position,
                v.vm,
                classes.join(","),
                v.from,
                v.to,
                v.predicted_ms as f64 / 1000.0,
                v.actual_ms
                    .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                    .unwrap_or("-".into()),
                v.downtime_ms
                    .map(|m| format!("{m}ms"))
                    .unwrap_or("-".into()),
                v.outcome,
                v.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        if self.outcome == RunOutcome::Planned {
            out.push_str("why:\n");
            for s in &self.plan {
                out.push_str(&format!(
                    "{:>3}  {}: {} · to {}: {} · predicted {}\n",
                    s.position, s.vm, s.why_position, s.to, s.why_host, s.prediction
                ));
            }
        } else {
            let t = &self.totals;
            out.push_str(&format!(
                "moved {}, failed {}, skipped {}; makespan {:.1} s, mean completion {:.1} s, total downtime {} ms, {}\n",
                t.moved,
                t.failed,
                t.skipped,
                t.makespan_ms as f64 / 1000.0,
                t.mean_completion_ms as f64 / 1000.0,
                t.total_downtime_ms,
                bytesize::ByteSize(t.bytes).to_string_as(true)
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// Runs an evacuation, a restore or a resume of `opts.host` (see [`Mode`]). `cancel` stops it: running precopies
/// are cancelled (a postcopy finishes), nothing new starts, and the journal says where each VM is.
pub async fn run(
    inv: &Inventory,
    opts: &Options,
    cancel: &CancellationToken,
    watcher: &dyn Watcher,
) -> Result<EvacuationReport, EvacuateError> {
    if opts.host != journal::CLUSTER {
        inv.host(&opts.host)?;
    }
    // The journal is held for the whole run: two runs never share one. A dry run only reads it.
    let (mut journal, records) = if opts.dry_run {
        (None, journal::read(&opts.journal)?)
    } else {
        let (j, r) = Journal::open(&opts.journal)?;
        (Some(j), r)
    };
    let history = journal::replay(&records);
    let check = crate::hosts::check(inv, &opts.connect, true).await;
    if let Some(h) = check.hosts.iter().find(|h| h.name == opts.host) {
        if let Some(e) = &h.error {
            return Err(EvacuateError::Host {
                host: opts.host.clone(),
                why: e.clone(),
            });
        }
    }
    let mut notes: Vec<String> = check
        .hosts
        .iter()
        .filter_map(|h| {
            h.error
                .as_ref()
                .map(|e| format!("host {} left out: {e}", h.name))
        })
        .collect();
    // Without classes the informed order is shortest-job-first alone, and non-sharable classes are not seen: say so.
    notes.extend(check.hosts.iter().filter_map(|h| {
        h.classes_note.as_ref().map(|n| {
            format!(
                "host {}: no classes, the plan is made without them: {n}",
                h.name
            )
        })
    }));
    let prepared = match opts.mode {
        Mode::Evacuate => prepare_evacuation(inv, opts, &check, &mut notes)?,
        Mode::Restore => prepare_restore(inv, opts, &check, &history, &mut notes)?,
        Mode::Resume => prepare_resume(opts, &check, &history, &mut notes)?,
        Mode::Balance => prepare_balance(inv, opts, &check, &mut notes),
    };
    let mut report = EvacuationReport {
        host: opts.host.clone(),
        kind: prepared.kind,
        run: history.next_run(),
        resumes: prepared.resumes,
        order: prepared.order.to_string(),
        journal: opts.journal.display().to_string(),
        max_out: opts.max_out,
        max_in: opts.max_in,
        outcome: RunOutcome::Planned,
        plan: prepared.steps.clone(),
        vms: prepared.done.clone(),
        totals: Totals::default(),
        notes,
    };
    if opts.dry_run {
        report
            .vms
            .extend(prepared.steps.iter().map(|s| planned(s, "planned")));
        report.vms.sort_by_key(|v| v.position);
        return Ok(report);
    }
    let Some(journal) = journal.as_mut() else {
        unreachable!("a journal is open unless --dry-run");
    };
    journal.append(&Record::Run {
        run: report.run,
        kind: prepared.kind,
        host: opts.host.clone(),
        order: prepared.order,
        plan: prepared.plan_for_journal.clone(),
        resumes: prepared.resumes,
        at_ms: journal::now_ms(),
        pid: std::process::id(),
    })?;
    // A migration the killed run completed is journaled as such: a later restore moves that VM back too.
    for v in prepared.done.iter().filter(|v| v.outcome == "adopted") {
        journal.append(&Record::End {
            run: report.run,
            vm: v.vm.clone(),
            from: v.from.clone(),
            to: v.to.clone(),
            outcome: v.outcome.clone(),
            running_on: v.running_on.clone(),
            reason: v.reason.clone(),
            at_ms: journal::now_ms(),
        })?;
    }
    watcher.event(&Event::Planned {
        moves: prepared.steps.len() + prepared.done.iter().filter(|v| moved(&v.outcome)).count(),
    });
    let mut exec = Executor::new(inv, opts, journal, report.run, watcher, &check);
    let results = exec
        .execute(prepared.steps.clone(), prepared.adopt, cancel)
        .await;
    report.vms.extend(results);
    report.vms.sort_by_key(|v| v.position);
    report.totals = totals(&report.vms);
    report.outcome = outcome(&report.vms, cancel.is_cancelled());
    journal.append(&Record::Finish {
        run: report.run,
        outcome: report.outcome.as_str().into(),
        at_ms: journal::now_ms(),
    })?;
    Ok(report)
}

/// What a run carries out: the steps still to do, those already done (moved earlier, skipped), and how.
struct Prepared {
    kind: RunKind,
    order: Order,
    resumes: Option<u64>,
    /// The steps to carry out, in order.
    steps: Vec<Step>,
    /// The whole plan as the journal keeps it (a resume keeps the original).
    plan_for_journal: Vec<Step>,
    /// VMs whose migration under way is taken over rather than started.
    adopt: Vec<String>,
    /// Results known before anything runs (moved earlier, found moved, skipped).
    done: Vec<VmResult>,
}

fn prepare_evacuation(
    inv: &Inventory,
    opts: &Options,
    check: &CheckReport,
    notes: &mut Vec<String>,
) -> Result<Prepared, EvacuateError> {
    let host = check
        .hosts
        .iter()
        .find(|h| h.name == opts.host)
        .ok_or_else(|| EvacuateError::Host {
            host: opts.host.clone(),
            why: "not in the inventory check".into(),
        })?;
    for vm in &opts.only {
        if !host.vms.iter().any(|v| &v.name == vm) {
            return Err(EvacuateError::Vm {
                vm: vm.clone(),
                why: format!("not found on host {}", opts.host),
            });
        }
    }
    let mut movable: Vec<&VmCheck> = Vec::new();
    for v in host
        .vms
        .iter()
        .filter(|v| opts.only.is_empty() || opts.only.contains(&v.name))
    {
        match leave_alone(v, check) {
            Some(why) => notes.push(format!("VM {} left on {}: {why}", v.name, opts.host)),
            None => movable.push(v),
        }
    }
    // Inventory entries first, in the inventory's order, then the rest as found: the fifo order.
    movable.sort_by_key(|v| {
        inv.vms
            .keys()
            .position(|k| k == &v.name)
            .unwrap_or(usize::MAX)
    });
    let remembered = calibration(opts);
    let candidates: Vec<Candidate> = movable
        .iter()
        .map(|v| survey::candidate(v, &basis(inv, opts, &v.host), remembered.vms.get(&v.name)))
        .collect();
    let leaving: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
    let input = planner::Input {
        hosts: survey::rooms(check, &opts.host, &leaving),
        candidates,
        order: opts.order,
        fixed: BTreeMap::new(),
    };
    let plan = plan_or_nothing(&opts.host, &input)?;
    Ok(Prepared {
        kind: RunKind::Evacuate,
        order: opts.order,
        resumes: None,
        plan_for_journal: plan.clone(),
        steps: plan,
        adopt: Vec::new(),
        done: Vec::new(),
    })
}

fn plan_or_nothing(host: &str, input: &planner::Input) -> Result<Vec<Step>, EvacuateError> {
    if input.candidates.is_empty() {
        return Ok(Vec::new());
    }
    planner::plan(input)
        .map(|p| p.steps)
        .map_err(|source| EvacuateError::Plan {
            host: host.into(),
            source,
        })
}

/// Why a VM found on the drained host is not moved, if it is not.
fn leave_alone(v: &VmCheck, check: &CheckReport) -> Option<String> {
    if let Some(e) = &v.error {
        return Some(format!("does not answer ({e})"));
    }
    if survey::adoptable(v) {
        return Some(format!(
            "a migration is under way or unresolved (status {}); resolve it with --resume or migrate --adopt",
            v.migration.as_deref().unwrap_or("?")
        ));
    }
    match v.run_state.as_deref() {
        Some("running") => {}
        other => {
            return Some(format!(
                "not running (state {})",
                other.unwrap_or("unknown")
            ))
        }
    }
    let elsewhere: Vec<&str> = survey::where_is(check, &v.name)
        .into_iter()
        .filter(|(h, _)| *h != v.host)
        .map(|(h, _)| h)
        .collect();
    (!elsewhere.is_empty()).then(|| {
        format!(
            "a VM of the same name is also on {}: resolve that first",
            elsewhere.join(", ")
        )
    })
}

/// What earlier migrations taught about the VMs (`--calibration`); empty when off or unreadable (said in the log).
fn calibration(opts: &Options) -> crate::calibrate::Calibration {
    let Some(path) = &opts.template.calibration else {
        return Default::default();
    };
    crate::calibrate::load(path).unwrap_or_else(|e| {
        tracing::warn!("{e}; planning without it");
        Default::default()
    })
}

/// What the predictions of VMs leaving `from` assume.
fn basis(inv: &Inventory, opts: &Options, from: &str) -> survey::PredictionBasis {
    let budget = link_budget(inv, opts, from);
    survey::PredictionBasis {
        bandwidth_bytes_per_s: (budget / opts.max_out.max(1) as u64)
            .min(opts.template.bandwidth_bytes_per_s)
            .max(1),
        downtime: opts.template.ladder.downtime,
        timeout: opts.template.ladder.timeout,
    }
}

/// A host's outbound budget: `--link-budget`, else its NIC capacity, else the per-migration cap.
fn link_budget(inv: &Inventory, opts: &Options, host: &str) -> u64 {
    opts.link_budget_bytes_per_s
        .or_else(|| {
            inv.hosts
                .get(host)
                .map(|h| h.capacity.nic_bytes_per_s)
                .filter(|b| *b > 0)
        })
        .unwrap_or(opts.template.bandwidth_bytes_per_s)
}

/// A balancing round's moves as a plan: every VM fixed to the destination its policy chose, ordered by
/// `opts.order` and started under the same limits as an evacuation. A VM that cannot be moved now (not found once,
/// not running, migrating) is skipped with its reason; one already on its destination is noted.
fn prepare_balance(
    inv: &Inventory,
    opts: &Options,
    check: &CheckReport,
    notes: &mut Vec<String>,
) -> Prepared {
    let remembered = calibration(opts);
    let mut candidates = Vec::new();
    let mut fixed = BTreeMap::new();
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    for m in &opts.moves {
        match survey::where_is(check, &m.vm).as_slice() {
            [(h, _)] if *h == m.to => notes.push(format!("VM {} is on {h} already", m.vm)),
            [(h, v)] => match leave_alone(v, check) {
                Some(why) => skipped.push((m.vm.clone(), h.to_string(), m.to.clone(), why)),
                None => {
                    candidates.push(survey::candidate(
                        v,
                        &basis(inv, opts, h),
                        remembered.vms.get(&m.vm),
                    ));
                    fixed.insert(m.vm.clone(), m.to.clone());
                }
            },
            [] => notes.push(format!("VM {} is not found on any host: not moved", m.vm)),
            many => notes.push(format!(
                "VM {} is found on {}: not moved",
                m.vm,
                many.iter().map(|(h, _)| *h).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    for (vm, from, to, why) in skipped {
        let mut r = unplanned(&vm, &from, &to, "skipped");
        r.reason = Some(why);
        r.running_on = Some(from);
        done.push(r);
    }
    let leaving: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
    let destinations: Vec<&str> = fixed.values().map(String::as_str).collect();
    let hosts = survey::rooms(check, "", &leaving)
        .into_iter()
        .filter(|h| destinations.contains(&h.name.as_str()))
        .collect();
    let input = planner::Input {
        candidates,
        hosts,
        order: opts.order,
        fixed,
    };
    // The policy checked each destination's room with its own model; the planner's hard constraints (vCPUs,
    // memory, anti-affinity) may still refuse one: then nothing of this round moves, and the note says why.
    let steps = match plan_or_nothing(journal::CLUSTER, &input) {
        Ok(mut steps) => {
            for step in &mut steps {
                if let Some(m) = opts.moves.iter().find(|m| m.vm == step.vm) {
                    step.why_host.clone_from(&m.reason);
                }
            }
            steps
        }
        Err(e) => {
            notes.push(format!(
                "the moves cannot be planned: {}",
                crate::stats::error_chain(&e)
            ));
            Vec::new()
        }
    };
    Prepared {
        kind: RunKind::Balance,
        order: opts.order,
        resumes: None,
        plan_for_journal: steps.clone(),
        steps,
        adopt: Vec::new(),
        done,
    }
}

fn prepare_restore(
    inv: &Inventory,
    opts: &Options,
    check: &CheckReport,
    history: &journal::History,
    notes: &mut Vec<String>,
) -> Result<Prepared, EvacuateError> {
    let mut candidates = Vec::new();
    let mut fixed = BTreeMap::new();
    let mut done = Vec::new();
    let remembered = calibration(opts);
    for (vm, now_on) in history.to_restore(&opts.host) {
        if !opts.only.is_empty() && !opts.only.contains(&vm) {
            continue;
        }
        let found = survey::where_is(check, &vm);
        match found.as_slice() {
            [(h, _)] if *h == opts.host => notes.push(format!("VM {vm} is on {h} already")),
            [(h, v)] => {
                if *h != now_on {
                    notes.push(format!(
                        "VM {vm} is on {h}, not on {now_on} where the journal left it"
                    ));
                }
                match leave_alone(v, check) {
                    Some(why) => {
                        let mut r = unplanned(&vm, h, &opts.host, "skipped");
                        r.reason = Some(why);
                        r.running_on = Some(h.to_string());
                        done.push(r);
                    }
                    None => {
                        candidates.push(survey::candidate(
                            v,
                            &basis(inv, opts, h),
                            remembered.vms.get(&vm),
                        ));
                        fixed.insert(vm.clone(), opts.host.clone());
                    }
                }
            }
            [] => notes.push(format!("VM {vm} is not found on any host: not restored")),
            many => notes.push(format!(
                "VM {vm} is found on {}: not restored",
                many.iter().map(|(h, _)| *h).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    let leaving: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
    // The VMs come back to the restored host only: it is the one room that counts.
    let hosts = survey::rooms(check, "", &leaving)
        .into_iter()
        .filter(|h| h.name == opts.host)
        .collect();
    let input = planner::Input {
        candidates,
        hosts,
        order: opts.order,
        fixed,
    };
    let plan = plan_or_nothing(&opts.host, &input)?;
    Ok(Prepared {
        kind: RunKind::Restore,
        order: opts.order,
        resumes: None,
        plan_for_journal: plan.clone(),
        steps: plan,
        adopt: Vec::new(),
        done,
    })
}

/// What a resumed run does with one VM of the plan it continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeAction {
    /// Moved before (by the run resumed): nothing to do.
    MovedEarlier,
    /// It runs on its destination and nowhere else: the killed run's migration completed.
    FoundMoved,
    /// The source has a migration under way or unresolved: take it over (`--adopt`).
    Adopt,
    /// Still on its source with nothing under way: migrate it; a destination QEMU the killed run left waiting
    /// (`inmigrate`, never ran the guest) is ended first.
    Migrate { stale_destination: Option<String> },
    /// Not safe to touch; why.
    Leave(String),
}

/// PURE: the action for a VM of a resumed plan, from the journal's state and where the VM is found now (every
/// answering QEMU of that name: host, run state, migration status, socket).
pub fn resume_action(state: &VmState, step: &Step, found: &[(&str, &VmCheck)]) -> ResumeAction {
    if let VmState::Ended { outcome, .. } = state {
        if moved(outcome) {
            return ResumeAction::MovedEarlier;
        }
    }
    let on = |host: &str| found.iter().find(|(h, _)| *h == host).map(|(_, v)| *v);
    let (src, dst) = (on(&step.from), on(&step.to));
    let elsewhere: Vec<&str> = found
        .iter()
        .map(|(h, _)| *h)
        .filter(|h| *h != step.from && *h != step.to)
        .collect();
    if !elsewhere.is_empty() {
        return ResumeAction::Leave(format!(
            "found on {}, outside this plan",
            elsewhere.join(", ")
        ));
    }
    let state_of = |v: &VmCheck| v.run_state.clone().unwrap_or_default();
    match (src, dst) {
        (Some(s), _) if survey::adoptable(s) => ResumeAction::Adopt,
        (Some(s), None) if state_of(s) == "running" => ResumeAction::Migrate {
            stale_destination: None,
        },
        (Some(s), Some(d)) if state_of(s) == "running" && state_of(d) == "inmigrate" => {
            ResumeAction::Migrate {
                stale_destination: Some(d.socket.clone()),
            }
        }
        (Some(s), Some(d)) => ResumeAction::Leave(format!(
            "runs on {} ({}) and on {} ({}): look at both",
            step.from,
            state_of(s),
            step.to,
            state_of(d)
        )),
        (Some(s), None) => {
            ResumeAction::Leave(format!("on {} in state {}", step.from, state_of(s)))
        }
        (None, Some(d)) if state_of(d) == "running" => ResumeAction::FoundMoved,
        (None, Some(d)) => ResumeAction::Leave(format!(
            "only on {} in state {} (a paused postcopy needs `qmigrate recover`)",
            step.to,
            state_of(d)
        )),
        (None, None) => ResumeAction::Leave("not found on any host".into()),
    }
}

fn prepare_resume(
    opts: &Options,
    check: &CheckReport,
    history: &journal::History,
    notes: &mut Vec<String>,
) -> Result<Prepared, EvacuateError> {
    let Some(run) = history.unfinished(&opts.host) else {
        return Err(EvacuateError::NothingToResume {
            host: opts.host.clone(),
            journal: opts.journal.display().to_string(),
        });
    };
    let mut steps = Vec::new();
    let mut adopt = Vec::new();
    let mut done = Vec::new();
    for step in &run.plan {
        let state = run.vms.get(&step.vm).cloned().unwrap_or(VmState::Planned);
        let found = survey::where_is(check, &step.vm);
        let action = resume_action(&state, step, &found);
        info!(vm = %step.vm, ?action, "resume");
        match action {
            ResumeAction::MovedEarlier => done.push(planned(step, "moved-earlier")),
            ResumeAction::FoundMoved => {
                let mut r = planned(step, "adopted");
                r.reason = Some(format!("found running on {} only", step.to));
                r.running_on = Some(step.to.clone());
                done.push(r);
            }
            ResumeAction::Adopt => {
                adopt.push(step.vm.clone());
                steps.push(step.clone());
            }
            ResumeAction::Migrate { stale_destination } => {
                if let Some(s) = stale_destination {
                    notes.push(format!(
                        "VM {}: the waiting destination {s} on {} left by the killed run is ended first",
                        step.vm, step.to
                    ));
                }
                steps.push(step.clone());
            }
            ResumeAction::Leave(why) => {
                let mut r = planned(step, "skipped");
                r.reason = Some(why);
                done.push(r);
            }
        }
    }
    Ok(Prepared {
        kind: run.kind,
        order: run.order,
        resumes: Some(run.run),
        plan_for_journal: run.plan.clone(),
        steps,
        adopt,
        done,
    })
}

/// Whether a journal or report outcome means the guest now runs at its destination.
pub fn moved(outcome: &str) -> bool {
    journal::is_moved(outcome) || outcome == "moved-earlier"
}

fn planned(s: &Step, outcome: &str) -> VmResult {
    VmResult {
        classes: s.classes.clone(),
        position: s.position,
        predicted_ms: s.predicted.as_millis() as u64,
        ..unplanned(&s.vm, &s.from, &s.to, outcome)
    }
}

fn unplanned(vm: &str, from: &str, to: &str, outcome: &str) -> VmResult {
    VmResult {
        vm: vm.into(),
        classes: Vec::new(),
        position: 0,
        from: from.into(),
        to: to.into(),
        predicted_ms: 0,
        actual_ms: None,
        downtime_ms: None,
        started_at_ms: None,
        completed_at_ms: None,
        outcome: outcome.into(),
        reason: None,
        running_on: None,
        transferred_bytes: 0,
        taken_over: false,
        bandwidth_caps_bytes_per_s: Vec::new(),
    }
}

/// PURE: the run's totals from its VMs.
pub fn totals(vms: &[VmResult]) -> Totals {
    let ran: Vec<&VmResult> = vms.iter().filter(|v| v.started_at_ms.is_some()).collect();
    let moved_now: Vec<&VmResult> = ran.iter().copied().filter(|v| moved(&v.outcome)).collect();
    let first = ran
        .iter()
        .filter_map(|v| v.started_at_ms)
        .min()
        .unwrap_or(0);
    let last = ran
        .iter()
        .filter_map(|v| v.completed_at_ms)
        .max()
        .unwrap_or(first);
    let mean = |it: Vec<u64>| {
        if it.is_empty() {
            0
        } else {
            it.iter().sum::<u64>() / it.len() as u64
        }
    };
    Totals {
        makespan_ms: last.saturating_sub(first),
        mean_completion_ms: mean(moved_now.iter().filter_map(|v| v.completed_at_ms).collect()),
        mean_migration_ms: mean(moved_now.iter().filter_map(|v| v.actual_ms).collect()),
        total_downtime_ms: moved_now.iter().filter_map(|v| v.downtime_ms).sum(),
        bytes: ran.iter().map(|v| v.transferred_bytes).sum(),
        moved: vms.iter().filter(|v| moved(&v.outcome)).count(),
        failed: vms
            .iter()
            .filter(|v| !moved(&v.outcome) && !matches!(v.outcome.as_str(), "skipped" | "planned"))
            .count(),
        skipped: vms.iter().filter(|v| v.outcome == "skipped").count(),
    }
}

/// PURE: how the run ended, from its VMs.
pub fn outcome(vms: &[VmResult], interrupted: bool) -> RunOutcome {
    if vms.iter().any(|v| v.outcome == "lost") {
        return RunOutcome::NotRunningOnce;
    }
    if interrupted {
        return RunOutcome::Interrupted;
    }
    let t = totals(vms);
    match (t.moved, t.failed + t.skipped) {
        (0, 0) => RunOutcome::NothingToDo,
        (_, 0) => RunOutcome::Completed,
        (0, _) => RunOutcome::Failed,
        _ => RunOutcome::Partial,
    }
}

/// One migration running.
struct Running {
    step: Step,
    bandwidth: watch::Sender<u64>,
    /// Every cap sent, the first included.
    caps: Vec<u64>,
    stalled: bool,
    started_at: Duration,
}

/// The I/O side: starts the plan's migrations while the limits allow, splits the links, journals every change.
struct Executor<'a> {
    inv: &'a Inventory,
    opts: &'a Options,
    journal: &'a mut Journal,
    run: u64,
    watcher: &'a dyn Watcher,
    links: BTreeMap<String, Arc<HostLink>>,
    /// Where every VM was found before the run (sockets of sources, destinations a killed run left waiting).
    found: &'a CheckReport,
    started: Instant,
    running: BTreeMap<String, Running>,
    progress: Arc<Mutex<BTreeMap<String, Progress>>>,
}

/// How often stalls are looked for and budgets moved.
const BUDGET_EVERY: Duration = Duration::from_secs(1);

type Finished = (String, Result<MigrationReport, MigrateError>);

impl<'a> Executor<'a> {
    fn new(
        inv: &'a Inventory,
        opts: &'a Options,
        journal: &'a mut Journal,
        run: u64,
        watcher: &'a dyn Watcher,
        found: &'a CheckReport,
    ) -> Executor<'a> {
        let links = crate::remote::links(inv)
            .into_iter()
            .map(|l| (l.name().to_string(), l))
            .collect();
        Executor {
            inv,
            opts,
            journal,
            run,
            watcher,
            links,
            found,
            started: Instant::now(),
            running: BTreeMap::new(),
            progress: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    async fn execute(
        &mut self,
        steps: Vec<Step>,
        adopt: Vec<String>,
        cancel: &CancellationToken,
    ) -> Vec<VmResult> {
        let mut pending = steps;
        let mut results = Vec::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut ticker = tokio::time::interval(BUDGET_EVERY);
        loop {
            if !cancel.is_cancelled() {
                while let Some(i) = self.next_startable(&pending) {
                    let step = pending.remove(i);
                    let takeover = adopt.contains(&step.vm);
                    match self.start(&step, takeover, cancel, &mut tasks).await {
                        Ok(()) => {}
                        Err(r) => results.push(r),
                    }
                }
            }
            if tasks.is_empty() {
                break;
            }
            tokio::select! {
                Some(joined) = tasks.join_next() => {
                    let (vm, result) = match joined {
                        Ok(f) => f,
                        Err(e) => {
                            warn!("a migration task ended abnormally: {e}");
                            continue;
                        }
                    };
                    if let Some(r) = self.finish(&vm, result) {
                        results.push(r);
                    }
                }
                _ = ticker.tick() => self.move_budgets(),
                _ = cancel.cancelled(), if !pending.is_empty() => {
                    for s in pending.drain(..) {
                        let mut r = planned(&s, "skipped");
                        r.reason = Some("interrupted before it started".into());
                        r.running_on = Some(s.from.clone());
                        results.push(r);
                    }
                }
            }
        }
        for s in pending {
            let mut r = planned(&s, "skipped");
            r.reason = Some("interrupted before it started".into());
            r.running_on = Some(s.from.clone());
            results.push(r);
        }
        results
    }

    /// The first pending step whose source and destination are both under their limits.
    fn next_startable(&self, pending: &[Step]) -> Option<usize> {
        let count =
            |f: &dyn Fn(&Step) -> bool| self.running.values().filter(|r| f(&r.step)).count();
        pending.iter().position(|s| {
            count(&|r| r.from == s.from) < self.opts.max_out.max(1)
                && count(&|r| r.to == s.to) < self.opts.max_in.max(1)
        })
    }

    async fn start(
        &mut self,
        step: &Step,
        takeover: bool,
        cancel: &CancellationToken,
        tasks: &mut JoinSet<Finished>,
    ) -> Result<(), VmResult> {
        let refuse = |why: String| {
            let mut r = planned(step, "refused");
            r.reason = Some(why);
            r.running_on = Some(step.from.clone());
            r
        };
        let (Some(src_link), Some(dst_link)) =
            (self.links.get(&step.from), self.links.get(&step.to))
        else {
            return Err(refuse("its hosts are not in the inventory".into()));
        };
        let here = survey::where_is(self.found, &step.vm);
        let Some((_, src)) = here.iter().find(|(h, _)| *h == step.from) else {
            return Err(refuse(format!("not found on {} any more", step.from)));
        };
        if !takeover {
            if let Some((_, stale)) = here
                .iter()
                .find(|(h, v)| *h == step.to && v.run_state.as_deref() == Some("inmigrate"))
            {
                end_stale_destination(dst_link, &stale.socket).await;
            }
        }
        let mut req = self.opts.template.clone();
        req.source = src.socket.clone();
        req.destination = Destination::Host {
            link: dst_link.clone(),
            tls: self.opts.tls,
            vars: self
                .inv
                .vms
                .get(&step.vm)
                .map(|e| e.vars.clone())
                .unwrap_or_default(),
        };
        req.source_host = Some(src_link.clone());
        req.vm_name = Some(step.vm.clone());
        req.takeover = if takeover {
            Takeover::Adopt
        } else {
            Takeover::No
        };
        let (tx, rx) = watch::channel(req.bandwidth_bytes_per_s);
        req.bandwidth_updates = Some(rx);
        let at = self.started.elapsed();
        self.running.insert(
            step.vm.clone(),
            Running {
                step: step.clone(),
                bandwidth: tx,
                caps: Vec::new(),
                stalled: false,
                started_at: at,
            },
        );
        // The new migration's share, and everyone else's on that link, before it starts.
        self.split_link(&step.from);
        if let Some(r) = self.running.get_mut(&step.vm) {
            req.bandwidth_bytes_per_s = *r.bandwidth.borrow();
            r.caps.push(req.bandwidth_bytes_per_s);
        }
        if let Err(e) = self.journal.append(&Record::Start {
            run: self.run,
            vm: step.vm.clone(),
            from: step.from.clone(),
            to: step.to.clone(),
            at_ms: journal::now_ms(),
        }) {
            self.running.remove(&step.vm);
            return Err(refuse(format!("journal: {e}")));
        }
        self.watcher.event(&Event::Started {
            position: step.position,
            vm: &step.vm,
            from: &step.from,
            to: &step.to,
        });
        let cancel = cancel.clone();
        let vm = step.vm.clone();
        let progress = self.progress.clone();
        let watcher_progress = ProgressSink {
            vm: vm.clone(),
            progress,
        };
        tasks.spawn(async move {
            let on_progress = |p: &Progress| watcher_progress.record(p);
            let r = crate::migrate::migrate(&req, &cancel, &on_progress).await;
            (vm, r)
        });
        Ok(())
    }

    /// A migration ended: journal it, give its share back to the others on its link.
    fn finish(
        &mut self,
        vm: &str,
        result: Result<MigrationReport, MigrateError>,
    ) -> Option<VmResult> {
        let running = self.running.remove(vm)?;
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
        self.split_link(&running.step.from);
        let step = &running.step;
        let mut r = planned(step, "failed");
        r.bandwidth_caps_bytes_per_s = running.caps.clone();
        r.started_at_ms = Some(running.started_at.as_millis() as u64);
        r.completed_at_ms = Some(self.started.elapsed().as_millis() as u64);
        match result {
            Ok(report) => {
                r.outcome = crate::report::outcome_name(report.outcome).into();
                r.reason = report.reason.clone();
                r.actual_ms = Some(report.total_time_ms);
                r.downtime_ms = report.downtime_ms;
                r.transferred_bytes = report.transferred_bytes;
                r.running_on = running_on(&report, step);
                r.taken_over = report.adopted;
                if report.final_state.running_copies != 1 && !report.final_state.guest_shutdown {
                    r.outcome = "lost".into();
                }
            }
            Err(e) => {
                // Nothing was changed: the guest runs on its source.
                r.outcome = "refused".into();
                r.reason = Some(crate::stats::error_chain(&e));
                r.running_on = Some(step.from.clone());
            }
        }
        if let Err(e) = self.journal.append(&Record::End {
            run: self.run,
            vm: vm.into(),
            from: step.from.clone(),
            to: step.to.clone(),
            outcome: r.outcome.clone(),
            running_on: r.running_on.clone(),
            reason: r.reason.clone(),
            at_ms: journal::now_ms(),
        }) {
            warn!(vm, "journal: {e}");
        }
        self.watcher.event(&Event::Ended {
            vm,
            outcome: &r.outcome,
            took: Duration::from_millis(
                r.completed_at_ms.unwrap_or(0) - r.started_at_ms.unwrap_or(0),
            ),
            reason: r.reason.as_deref(),
        });
        Some(r)
    }

    /// Looks for stalled migrations and moves budget to them.
    fn move_budgets(&mut self) {
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut changed_links = Vec::new();
        for (vm, r) in self.running.iter_mut() {
            let Some(p) = progress.get(vm) else { continue };
            self.watcher.progress(vm, p);
            let stalled =
                budget::stalled(p.pass, p.dirty_rate_bytes_per_s, p.throughput_bytes_per_s);
            if stalled != r.stalled {
                r.stalled = stalled;
                changed_links.push(r.step.from.clone());
                info!(
                    vm,
                    stalled,
                    "budget: the migration {}",
                    if stalled { "stalls" } else { "converges again" }
                );
            }
        }
        changed_links.dedup();
        for host in changed_links {
            self.split_link(&host);
        }
    }

    /// Splits `host`'s outbound budget among its running migrations.
    fn split_link(&mut self, host: &str) {
        let budget = link_budget(self.inv, self.opts, host);
        let mut on_link: Vec<&mut Running> = self
            .running
            .values_mut()
            .filter(|r| r.step.from == host)
            .collect();
        let shares: Vec<Share> = on_link
            .iter()
            .map(|r| Share { stalled: r.stalled })
            .collect();
        let cap = self.opts.template.bandwidth_bytes_per_s;
        for (r, b) in on_link.iter_mut().zip(budget::split(budget, &shares)) {
            let b = b.min(cap);
            if *r.bandwidth.borrow() != b {
                let _ = r.bandwidth.send(b);
                // A migration not started yet gets its first cap recorded at its start.
                if !r.caps.is_empty() {
                    r.caps.push(b);
                }
            }
        }
    }
}

/// Where a migration's progress goes: the shared map the budget and the display read.
struct ProgressSink {
    vm: String,
    progress: Arc<Mutex<BTreeMap<String, Progress>>>,
}

impl ProgressSink {
    fn record(&self, p: &Progress) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.vm.clone(), p.clone());
    }
}

/// Where the guest runs after a migration, by its report.
fn running_on(report: &MigrationReport, step: &Step) -> Option<String> {
    if report.final_state.running_copies != 1 {
        return None;
    }
    match report.outcome {
        Outcome::Completed => Some(step.to.clone()),
        _ => Some(step.from.clone()),
    }
}

/// Ends a destination QEMU a killed run left waiting for a stream (`inmigrate`: it never ran the guest).
async fn end_stale_destination(link: &HostLink, socket: &str) {
    match link.qemu_process(socket).await {
        Ok(p) => {
            info!(host = %link.name(), socket, pid = p.pid, "ending a waiting destination left by a killed run");
            if let Err(e) = link.kill(p.pid).await {
                warn!(host = %link.name(), socket, "cannot end the waiting destination: {e}");
            }
            let _ = link.remove_socket(socket).await;
        }
        Err(e) => {
            warn!(host = %link.name(), socket, "cannot find the waiting destination's process: {e}")
        }
    }
}

#[cfg(test)]
mod tests;
