//! PURE anti-thrashing: which of a policy's decisions a balancing round carries out, and why it holds back the
//! others. A migration is held when its VM moved less than the VM cool-down ago, when its source or destination
//! took part in a move less than the host cool-down ago, when the VM cannot be moved now (migrating, not running),
//! or when the move's predicted gain — how much it lowers the busier of its two hosts, by the load-move model — is
//! below the minimum. Balloon changes are cheap and undone as easily: only a VM that cannot be touched now holds
//! one back. Defaults and their reasons: docs/balance.md.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::plan::{model, Decision, Scenario};

/// The anti-thrashing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// The least time between two moves of one VM.
    pub vm_cool_down: Duration,
    /// The least time between two moves touching one host (as source or destination).
    pub host_cool_down: Duration,
    /// The least predicted gain of a move, in points of the busier host's load.
    pub min_gain_pct: f64,
}

/// Default [`Guard::vm_cool_down`]: an hour. Incus's rebalancer keeps 6 h between moves of an instance, OpenNebula
/// DRS decides every 10 min; an hour lets a VM that was moved show its new host's figures for a good many rounds
/// before it may move again, and still answers a load that shifts within a working day.
pub const DEFAULT_VM_COOL_DOWN: Duration = Duration::from_secs(3600);
/// Default [`Guard::host_cool_down`]: ten minutes, OpenNebula DRS's period: a host that just gave or took a VM is
/// measured again before it gives or takes another.
pub const DEFAULT_HOST_COOL_DOWN: Duration = Duration::from_secs(600);
/// Default [`Guard::min_gain_pct`]: 5 points, about the noise of one sample of a busy host's CPU here.
pub const DEFAULT_MIN_GAIN_PCT: f64 = 5.0;

impl Default for Guard {
    fn default() -> Guard {
        Guard {
            vm_cool_down: DEFAULT_VM_COOL_DOWN,
            host_cool_down: DEFAULT_HOST_COOL_DOWN,
            min_gain_pct: DEFAULT_MIN_GAIN_PCT,
        }
    }
}

/// A move that completed, from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// When it ended (Unix ms).
    pub at_ms: u64,
}

/// A decision not carried out this round, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Held {
    pub decision: Decision,
    pub why: String,
}

/// A host's load for the gain: the highest of its CPU, NIC and committed-memory utilisation, in %.
pub fn load_pct(s: &Scenario, host: &str) -> f64 {
    s.host(host).map_or(0.0, |h| {
        let memory_pct = s.committed_mib(host) as f64 / h.memory_mib.max(1) as f64 * 100.0;
        h.cpu_pct.max(h.nic_pct).max(memory_pct)
    })
}

/// The predicted gain of moving `vm` from `from` to `to`: the busier of the two hosts' load before, minus the busier
/// after, in points.
pub fn gain_pct(s: &Scenario, vm: &str, from: &str, to: &str) -> f64 {
    let after = model::project(s, vm, to);
    let busier = |s: &Scenario| load_pct(s, from).max(load_pct(s, to));
    busier(s) - busier(&after)
}

/// Splits `decisions` into those to carry out and those held back. `busy` names the VMs that cannot be touched now,
/// with why; `recent` are completed moves; `now_ms` is the round's time. Decisions are screened in order, each
/// kept migration applied to the figures before the next is judged.
pub fn screen(
    s: &Scenario,
    decisions: Vec<Decision>,
    recent: &[RecentMove],
    busy: &BTreeMap<String, String>,
    now_ms: u64,
    g: &Guard,
) -> (Vec<Decision>, Vec<Held>) {
    let within = |at_ms: u64, cool_down: Duration| {
        now_ms.saturating_sub(at_ms) < u64::try_from(cool_down.as_millis()).unwrap_or(u64::MAX)
    };
    let ago = |at_ms: u64| {
        humantime::format_duration(Duration::from_secs(now_ms.saturating_sub(at_ms) / 1000))
    };
    let mut figures = s.clone();
    let mut keep = Vec::new();
    let mut held = Vec::new();
    for d in decisions {
        let vm = match &d {
            Decision::Migrate { vm, .. } | Decision::Balloon { vm, .. } => vm.clone(),
        };
        let why = if let Some(why) = busy.get(&vm) {
            Some(format!("{vm} cannot be touched now: {why}"))
        } else if let Decision::Migrate { from, to, .. } = &d {
            let vm_moved = recent
                .iter()
                .filter(|m| m.vm == vm && within(m.at_ms, g.vm_cool_down))
                .max_by_key(|m| m.at_ms);
            let host_moved = recent
                .iter()
                .filter(|m| {
                    within(m.at_ms, g.host_cool_down)
                        && [from, to].iter().any(|h| **h == m.from || **h == m.to)
                })
                .max_by_key(|m| m.at_ms);
            let gain = gain_pct(&figures, &vm, from, to);
            if let Some(m) = vm_moved {
                Some(format!(
                    "{vm} moved {} ago ({} -> {}); the VM cool-down is {}",
                    ago(m.at_ms),
                    m.from,
                    m.to,
                    humantime::format_duration(g.vm_cool_down)
                ))
            } else if let Some(m) = host_moved {
                Some(format!(
                    "a move touched {} {} ago ({} {} -> {}); the host cool-down is {}",
                    if m.from == *from || m.to == *from {
                        from
                    } else {
                        to
                    },
                    ago(m.at_ms),
                    m.vm,
                    m.from,
                    m.to,
                    humantime::format_duration(g.host_cool_down)
                ))
            } else if gain < g.min_gain_pct {
                Some(format!(
                    "predicted gain {gain:.1} points (busier of {from} and {to}: {:.1}% before), below the minimum \
                     of {:.1}",
                    load_pct(&figures, from).max(load_pct(&figures, to)),
                    g.min_gain_pct
                ))
            } else {
                model::migrate(&mut figures, &vm, to);
                None
            }
        } else {
            None
        };
        match why {
            Some(why) => held.push(Held { decision: d, why }),
            None => keep.push(d),
        }
    }
    (keep, held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{History, Host, Tuning, Vm};

    const MIN: u64 = 60_000;

    fn scenario() -> Scenario {
        let host = |name: &str, cpu: f64| Host {
            name: name.into(),
            cpus: 1,
            memory_mib: 4096,
            nic_mbps: 1000.0,
            cpu_pct: cpu,
            swap_writes_per_s: 0.0,
            nic_pct: 0.0,
            memory_reserved_mib: 0,
            history: History::default(),
        };
        let vm = |name: &str, host: &str, cpu: f64| Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: cpu,
            memory_mib: 256,
            memory_pct: 50.0,
            nic_mbps: 0.0,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        };
        Scenario {
            description: None,
            hosts: vec![host("h1", 96.0), host("h2", 10.0), host("h3", 90.0)],
            vms: vec![
                vm("big", "h1", 50.0),
                vm("small", "h1", 2.0),
                vm("other", "h1", 44.0),
                vm("z", "h3", 90.0),
            ],
            traffic: vec![],
            tuning: Tuning::default(),
        }
    }

    fn mv(vm: &str, from: &str, to: &str) -> Decision {
        Decision::Migrate {
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            reason: String::new(),
            figures: vec![],
        }
    }

    fn moved(vm: &str, from: &str, to: &str, at_ms: u64) -> RecentMove {
        RecentMove {
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            at_ms,
        }
    }

    #[test]
    fn gain_is_how_much_the_busier_host_drops() {
        let s = scenario();
        // h1 96 → 46, h2 10 → 60: the busier of the two goes from 96 to 60.
        assert!((gain_pct(&s, "big", "h1", "h2") - 36.0).abs() < 1e-9);
        assert!((gain_pct(&s, "small", "h1", "h2") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn each_rule_holds_a_move_back_with_its_reason() {
        let now = 1000 * MIN;
        let g = Guard::default();
        let cases: Vec<(&str, Decision, Vec<RecentMove>, Option<&str>)> = vec![
            ("nothing recent, a large gain", mv("big", "h1", "h2"), vec![], None),
            (
                "the VM moved 30 min ago",
                mv("big", "h1", "h2"),
                vec![moved("big", "h2", "h1", now - 30 * MIN)],
                Some("big moved 30m ago (h2 -> h1); the VM cool-down is 1h"),
            ),
            (
                "the VM moved 61 min ago: free",
                mv("big", "h1", "h2"),
                vec![moved("big", "h2", "h1", now - 61 * MIN)],
                None,
            ),
            (
                "the destination took a VM 5 min ago",
                mv("big", "h1", "h2"),
                vec![moved("x", "h3", "h2", now - 5 * MIN)],
                Some("a move touched h2 5m ago (x h3 -> h2); the host cool-down is 10m"),
            ),
            (
                "a move elsewhere does not count",
                mv("big", "h1", "h2"),
                vec![moved("x", "h3", "h4", now - 5 * MIN)],
                None,
            ),
            (
                "too small a gain",
                mv("small", "h1", "h2"),
                vec![],
                Some("predicted gain 2.0 points (busier of h1 and h2: 96.0% before), below the minimum of 5.0"),
            ),
        ];
        for (name, d, recent, want) in cases {
            let (keep, held) = screen(&scenario(), vec![d], &recent, &BTreeMap::new(), now, &g);
            match want {
                None => assert!(held.is_empty() && keep.len() == 1, "{name}: {held:?}"),
                Some(why) => {
                    assert!(keep.is_empty(), "{name}");
                    assert_eq!(held[0].why, why, "{name}");
                }
            }
        }
    }

    #[test]
    fn later_moves_are_judged_on_the_figures_after_the_earlier_ones() {
        // "big" to h2 takes h2 to 60 %; "other" to h2 then would take h2 to 104 %: no gain left.
        let (keep, held) = screen(
            &scenario(),
            vec![mv("big", "h1", "h2"), mv("other", "h1", "h2")],
            &[],
            &BTreeMap::new(),
            0,
            &Guard::default(),
        );
        assert_eq!(keep, vec![mv("big", "h1", "h2")]);
        assert_eq!(held.len(), 1, "{held:?}");
    }

    #[test]
    fn a_busy_vm_is_never_touched() {
        let busy = BTreeMap::from([("big".to_string(), "migration active".to_string())]);
        let balloon = Decision::Balloon {
            vm: "big".into(),
            host: "h1".into(),
            from_mib: 256,
            to_mib: 288,
            reason: String::new(),
        };
        let (keep, held) = screen(&scenario(), vec![balloon], &[], &busy, 0, &Guard::default());
        assert!(keep.is_empty());
        assert_eq!(held[0].why, "big cannot be touched now: migration active");
    }
}
