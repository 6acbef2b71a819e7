//! Table tests of the executor's pure parts: what a resumed run does with each VM, and the run's totals and outcome.

use std::time::Duration;

use super::*;
use crate::classify::Class;

fn step(vm: &str, from: &str, to: &str) -> Step {
    Step {
        position: 1,
        vm: vm.into(),
        from: from.into(),
        to: to.into(),
        classes: vec![Class::Idle],
        vcpus: 1,
        memory_bytes: 1 << 28,
        predicted: Duration::from_secs(3),
        prediction: "p".into(),
        why_host: "h".into(),
        why_position: "p".into(),
    }
}

fn vm(host: &str, state: &str, migration: Option<&str>) -> VmCheck {
    VmCheck {
        name: "a".into(),
        name_from: "given",
        host: host.into(),
        socket: format!("/run/{host}/a.qmp"),
        qemu_version: Some("10.0.0".into()),
        run_state: Some(state.into()),
        ram_bytes: Some(1 << 28),
        vcpus: Some(1),
        migration: migration.map(String::from),
        classes: vec![],
        figures: None,
        memory: None,
        macs: vec![],
        groups: vec![],
        anti_affinity: vec![],
        error: None,
        locked_by: None,
    }
}

fn ended(outcome: &str) -> VmState {
    VmState::Ended {
        from: "h1".into(),
        to: "h2".into(),
        outcome: outcome.into(),
        running_on: None,
    }
}

#[test]
fn resume_action_table() {
    let started = VmState::Started {
        from: "h1".into(),
        to: "h2".into(),
    };
    let migrate = ResumeAction::Migrate {
        stale_destination: None,
    };
    let stale = ResumeAction::Migrate {
        stale_destination: Some("/run/h2/a.qmp".into()),
    };
    let leave = |s: &str| ResumeAction::Leave(s.into());
    #[rustfmt::skip]
    let rows: Vec<(&str, VmState, Vec<VmCheck>, ResumeAction)> = vec![
        ("moved before: never again", ended("completed"), vec![vm("h2", "running", None)], ResumeAction::MovedEarlier),
        ("adopted before: never again", ended("adopted"), vec![vm("h2", "running", None)], ResumeAction::MovedEarlier),
        ("never started: migrate", VmState::Planned, vec![vm("h1", "running", None)], migrate.clone()),
        ("failed before: migrate again", ended("failed"), vec![vm("h1", "running", Some("failed"))], migrate.clone()),
        ("killed mid-precopy: adopt", started.clone(), vec![vm("h1", "running", Some("active")), vm("h2", "inmigrate", None)], ResumeAction::Adopt),
        ("killed in postcopy: adopt", started.clone(), vec![vm("h1", "postmigrate", Some("postcopy-active")), vm("h2", "running", None)], ResumeAction::Adopt),
        ("killed after completion, source left: adopt resolves", started.clone(), vec![vm("h1", "postmigrate", Some("completed")), vm("h2", "running", None)], ResumeAction::Adopt),
        ("killed after completion, source ended: found moved", started.clone(), vec![vm("h2", "running", None)], ResumeAction::FoundMoved),
        ("killed before the stream: stale destination ended", started.clone(), vec![vm("h1", "running", None), vm("h2", "inmigrate", None)], stale),
        ("killed before the destination: migrate", started.clone(), vec![vm("h1", "running", Some("cancelled"))], migrate),
        ("two running copies: touch nothing", started.clone(), vec![vm("h1", "running", None), vm("h2", "running", None)],
            leave("runs on h1 (running) and on h2 (running): look at both")),
        ("paused postcopy destination only", started.clone(), vec![vm("h2", "paused", None)],
            leave("only on h2 in state paused (a paused postcopy needs `qmigrate recover`)")),
        ("gone everywhere", started.clone(), vec![], leave("not found on any host")),
        ("moved elsewhere by someone", started.clone(), vec![vm("h3", "running", None)], leave("found on h3, outside this plan")),
        ("source paused, nothing under way", started, vec![vm("h1", "paused", Some("none"))], leave("on h1 in state paused")),
    ];
    let s = step("a", "h1", "h2");
    for (name, state, found, want) in rows {
        let found: Vec<(&str, &VmCheck)> = found.iter().map(|v| (v.host.as_str(), v)).collect();
        assert_eq!(resume_action(&state, &s, &found), want, "{name}");
    }
}

fn result(
    outcome: &str,
    started: Option<u64>,
    ended: Option<u64>,
    actual: Option<u64>,
) -> VmResult {
    let mut r = planned(&step("a", "h1", "h2"), outcome);
    r.started_at_ms = started;
    r.completed_at_ms = ended;
    r.actual_ms = actual;
    r.downtime_ms = actual.map(|_| 10);
    r.transferred_bytes = if started.is_some() { 100 } else { 0 };
    r
}

/// (name, VMs, interrupted, outcome wanted, makespan ms, mean completion ms, moved).
type TotalsRow = (
    &'static str,
    Vec<VmResult>,
    bool,
    RunOutcome,
    u64,
    u64,
    usize,
);

#[test]
fn totals_and_outcome_table() {
    #[rustfmt::skip]
    let rows: Vec<TotalsRow> = vec![
        ("nothing", vec![], false, RunOutcome::NothingToDo, 0, 0, 0),
        ("all moved", vec![result("completed", Some(0), Some(4000), Some(4000)), result("completed", Some(4000), Some(10000), Some(6000))],
            false, RunOutcome::Completed, 10000, 7000, 2),
        ("one failed", vec![result("completed", Some(0), Some(4000), Some(4000)), result("failed", Some(4000), Some(5000), Some(1000))],
            false, RunOutcome::Partial, 5000, 4000, 1),
        ("none moved", vec![result("cancelled", Some(0), Some(4000), Some(4000))], false, RunOutcome::Failed, 4000, 0, 0),
        ("a lost guest outranks all", vec![result("completed", Some(0), Some(1000), Some(1000)), result("lost", Some(0), Some(2000), None)],
            false, RunOutcome::NotRunningOnce, 2000, 1000, 1),
        ("interrupted", vec![result("completed", Some(0), Some(1000), Some(1000)), result("skipped", None, None, None)],
            true, RunOutcome::Interrupted, 1000, 1000, 1),
        ("moved earlier counts as moved, not in the times", vec![result("moved-earlier", None, None, None), result("completed", Some(500), Some(1500), Some(1000))],
            false, RunOutcome::Completed, 1000, 1500, 2),
    ];
    for (name, vms, interrupted, want, makespan, mean_completion, moved) in rows {
        let t = totals(&vms);
        assert_eq!(outcome(&vms, interrupted), want, "{name}");
        assert_eq!(t.makespan_ms, makespan, "{name}: makespan");
        assert_eq!(
            t.mean_completion_ms, mean_completion,
            "{name}: mean completion"
        );
        assert_eq!(t.moved, moved, "{name}: moved");
    }
}
