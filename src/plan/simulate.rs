//! The scenario simulator behind `qmigrate simulate`: runs a policy for a number of rounds, carrying each round's
//! decisions into the next round's figures through the load-move model, and renders the rounds as text or JSON.
//! Pure: takes a parsed scenario, returns strings; the file read happens in `run_simulate_command`.
//!
//! Between rounds every host that a migration touched starts a fresh history (its old samples describe a different
//! mix of VMs, and paper 004 does not judge hosts whose load is in flux); every other host appends its current
//! figures to its history, keeping the last [`HISTORY_LEN`] samples.

use serde_json::{json, Map, Value};

use super::model;
use super::scenario::{Host, Scenario};
use super::{plan_round, Decision, Policy, RoundPlan};
use crate::text::printable;

/// Samples kept per host for the AR(1) prediction.
pub const HISTORY_LEN: usize = 10;

/// One simulated round: the figures the policy saw, and what it decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub hosts: Vec<Host>,
    pub plan: RoundPlan,
}

/// A whole simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    pub policy: Policy,
    pub rounds: Vec<Round>,
    /// The figures after the last round.
    pub end: Scenario,
}

/// Runs `rounds` rounds of `policy` from `scenario`.
pub fn simulate(policy: Policy, scenario: &Scenario, rounds: u32) -> Simulation {
    let mut state = scenario.clone();
    let mut out = Vec::new();
    for _ in 0..rounds {
        let plan = plan_round(policy, &state);
        let hosts = state.hosts.clone();
        advance(&mut state, &plan.decisions);
        out.push(Round { hosts, plan });
    }
    Simulation {
        policy,
        rounds: out,
        end: state,
    }
}

/// Applies a round's decisions to the figures and rolls the histories forward.
pub fn advance(s: &mut Scenario, decisions: &[Decision]) {
    let before: Vec<Host> = s.hosts.clone();
    let mut touched = Vec::new();
    for d in decisions {
        match d {
            Decision::Migrate { vm, from, to, .. } => {
                model::migrate(s, vm, to);
                touched.push(from.clone());
                touched.push(to.clone());
            }
            Decision::Balloon { vm, to_mib, .. } => model::balloon(s, vm, *to_mib),
        }
    }
    for (h, old) in s.hosts.iter_mut().zip(before) {
        if touched.contains(&h.name) {
            h.history = Default::default();
        } else {
            push(&mut h.history.cpu_pct, old.cpu_pct);
            push(&mut h.history.swap_writes_per_s, old.swap_writes_per_s);
            push(&mut h.history.nic_pct, old.nic_pct);
        }
    }
}

fn push(series: &mut Vec<f64>, x: f64) {
    series.push(x);
    if series.len() > HISTORY_LEN {
        series.drain(..series.len() - HISTORY_LEN);
    }
}

/// `{"policy": …, "rounds": [{"round": 1, "migrations": [{vm, from, to, reason, figures}], "balloons": [{vm, host,
/// from_mib, to_mib, reason}], "notes": […]}]}`. `migrations` and `balloons` are always present, empty when nothing
/// was decided.
pub fn render_json(sim: &Simulation) -> String {
    let rounds: Vec<Value> = sim
        .rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut migrations = Vec::new();
            let mut balloons = Vec::new();
            for d in &r.plan.decisions {
                match d {
                    Decision::Migrate { vm, from, to, reason, figures } => {
                        let figures: Map<String, Value> =
                            figures.iter().map(|f| (f.name.to_owned(), json!(f.value))).collect();
                        migrations.push(json!({"vm": vm, "from": from, "to": to, "reason": reason, "figures": figures}));
                    }
                    Decision::Balloon { vm, host, from_mib, to_mib, reason } => balloons.push(json!({
                        "vm": vm, "host": host, "from_mib": from_mib, "to_mib": to_mib, "reason": reason
                    })),
                }
            }
            json!({"round": i + 1, "migrations": migrations, "balloons": balloons, "notes": r.plan.notes})
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&json!({"policy": sim.policy, "rounds": rounds}))
        .expect("JSON values always serialise");
    text.push('\n');
    text
}

/// A plain-text account: per round, the host figures the policy saw, its notes, and each decision with its reason.
/// Host and VM names come from the scenario file, so every text that can hold one is passed through
/// [`printable`] on its way to the terminal.
pub fn render_text(sim: &Simulation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "policy {}", sim.policy);
    for (i, r) in sim.rounds.iter().enumerate() {
        let _ = writeln!(out, "\nround {}", i + 1);
        let _ = writeln!(
            out,
            "  {:<12} {:>7} {:>7} {:>11}",
            "host", "cpu %", "nic %", "swap w/s"
        );
        for h in &r.hosts {
            let _ = writeln!(
                out,
                "  {:<12} {:>7.2} {:>7.2} {:>11.1}",
                printable(&h.name),
                h.cpu_pct,
                h.nic_pct,
                h.swap_writes_per_s
            );
        }
        for n in &r.plan.notes {
            let _ = writeln!(out, "  note: {}", printable(n));
        }
        if r.plan.decisions.is_empty() {
            let _ = writeln!(out, "  no decision");
        }
        for d in &r.plan.decisions {
            match d {
                Decision::Migrate {
                    vm,
                    from,
                    to,
                    reason,
                    figures,
                } => {
                    let _ = writeln!(
                        out,
                        "  migrate {}: {} -> {}",
                        printable(vm),
                        printable(from),
                        printable(to)
                    );
                    let _ = writeln!(out, "    why: {}", printable(reason));
                    let figs: Vec<String> = figures
                        .iter()
                        .map(|f| format!("{}={:.3}", f.name, f.value))
                        .collect();
                    let _ = writeln!(out, "    figures: {}", figs.join(" "));
                }
                Decision::Balloon {
                    vm,
                    host,
                    from_mib,
                    to_mib,
                    reason,
                } => {
                    let _ = writeln!(
                        out,
                        "  balloon {} on {}: {from_mib} MiB -> {to_mib} MiB",
                        printable(vm),
                        printable(host)
                    );
                    let _ = writeln!(out, "    why: {}", printable(reason));
                }
            }
        }
    }
    out
}
