//! Property tests over generated clusters, for every policy: planned moves never exceed a host's capacity, balanced
//! clusters yield no moves, and the same scenario (even listed in another order) gives the same decisions.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::model;
use super::scenario::{Flow, History, Host, Scenario, Tuning, Vm};
use super::simulate::advance;
use super::{decide, Decision, Policy};

fn host(
    i: usize,
    cpus: u32,
    memory_mib: u64,
    cpu_pct: f64,
    nic_pct: f64,
    swap: f64,
    hist: Vec<f64>,
) -> Host {
    Host {
        name: format!("h{i}"),
        cpus,
        memory_mib,
        nic_mbps: 1000.0,
        cpu_pct,
        swap_writes_per_s: swap,
        nic_pct,
        memory_reserved_mib: 256,
        history: History {
            cpu_pct: hist,
            ..History::default()
        },
    }
}

prop_compose! {
    fn arb_host(i: usize)(
        cpus in 1u32..=8,
        memory_mib in 1024u64..=8192,
        cpu_pct in 0.0f64..=100.0,
        nic_pct in 0.0f64..=100.0,
        swap in prop_oneof![Just(0.0), 0.0f64..400.0],
        hist in prop::collection::vec(0.0f64..=100.0, 0..4),
    ) -> Host {
        host(i, cpus, memory_mib, cpu_pct, nic_pct, swap, hist)
    }
}

prop_compose! {
    fn arb_vm(i: usize, hosts: usize)(
        h in 0..hosts,
        cpu_pct in 0.0f64..=60.0,
        memory_mib in 64u64..=1024,
        grow in prop::option::of(0u64..=512),
        memory_pct in 0.0f64..=100.0,
        nic_mbps in 0.0f64..=400.0,
        swap in prop_oneof![Just(0.0), 0.0f64..300.0],
    ) -> Vm {
        Vm {
            name: format!("v{i}"),
            host: format!("h{h}"),
            cpu_pct,
            memory_mib,
            memory_pct,
            nic_mbps,
            swap_writes_per_s: swap,
            memory_max_mib: grow.map(|g| memory_mib + g),
        }
    }
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (2usize..=5, 0usize..=10)
        .prop_flat_map(|(nh, nv)| {
            let hosts: Vec<_> = (0..nh).map(arb_host).collect();
            let vms: Vec<_> = (0..nv).map(|i| arb_vm(i, nh)).collect();
            let flows = prop::collection::vec((0..nv.max(1), 0..nv.max(1), 1.0f64..300.0), 0..6);
            (hosts, vms, flows)
        })
        .prop_map(|(hosts, vms, flows)| {
            let mut traffic: Vec<Flow> = Vec::new();
            for (a, b, mbps) in flows {
                let (a, b) = (format!("v{a}"), format!("v{b}"));
                let known = vms.iter().any(|v| v.name == a) && vms.iter().any(|v| v.name == b);
                let dup = traffic
                    .iter()
                    .any(|f| (f.a == a && f.b == b) || (f.a == b && f.b == a));
                if a != b && known && !dup {
                    traffic.push(Flow { a, b, mbps });
                }
            }
            Scenario {
                description: None,
                hosts,
                vms,
                traffic,
                tuning: Tuning::default(),
            }
        })
}

/// Checks every decision of a few rounds against physical capacity, applying each decision before the next.
fn assert_within_capacity(policy: Policy, s: &Scenario) -> Result<(), TestCaseError> {
    let mut state = s.clone();
    for _ in 0..3 {
        let decisions = decide(policy, &state);
        let mut check = state.clone();
        for d in &decisions {
            match d {
                Decision::Migrate { vm, to, .. } => {
                    let was_over = !model::within_capacity(&check, to);
                    prop_assert!(!was_over, "{policy}: {to} was already past capacity: {d:?}");
                    let before = check.clone();
                    model::migrate(&mut check, vm, to);
                    prop_assert!(
                        model::within_capacity(&check, to),
                        "{policy}: {d:?} overfills {to}"
                    );
                    let pushed = model::newly_over_capacity(&before, &check);
                    prop_assert!(
                        pushed.is_none(),
                        "{policy}: {d:?} pushes {pushed:?} past capacity"
                    );
                }
                Decision::Balloon {
                    vm, host, to_mib, ..
                } => {
                    let max = check.vm(vm).and_then(|v| v.memory_max_mib).unwrap_or(0);
                    prop_assert!(*to_mib <= max, "{policy}: {d:?} past the VM's maximum");
                    model::balloon(&mut check, vm, *to_mib);
                    let h = check.host(host).unwrap();
                    prop_assert!(
                        check.committed_mib(host) <= h.memory_mib,
                        "{policy}: {d:?} overcommits {host}"
                    );
                }
            }
        }
        advance(&mut state, &decisions);
    }
    Ok(())
}

proptest! {
    // Failing seeds are kept beside this file (src/plan/properties.proptest-regressions), inside the plan module's
    // tree, and replayed first on every run.
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_plan_exceeds_capacity(s in arb_scenario()) {
        prop_assume!(s.validate().is_ok());
        for p in Policy::ALL {
            assert_within_capacity(p, &s)?;
        }
    }

    #[test]
    fn same_scenario_same_decisions(s in arb_scenario()) {
        prop_assume!(s.validate().is_ok());
        let mut reordered = s.clone();
        reordered.hosts.reverse();
        reordered.vms.reverse();
        reordered.traffic.reverse();
        for p in Policy::ALL {
            let once = decide(p, &s);
            prop_assert_eq!(&once, &decide(p, &s));
            prop_assert_eq!(&once, &decide(p, &reordered), "{} depends on input order", p);
        }
    }

    #[test]
    fn band_leaves_a_balanced_cluster_alone(s in arb_scenario(), base in 0.0f64..=90.0, spread in prop::collection::vec(0.0f64..=10.0, 5)) {
        // All hosts within 10 points of each other are all within 10 of the mean: all moderate.
        let mut s = s;
        for (h, d) in s.hosts.iter_mut().zip(spread) {
            h.cpu_pct = base + d;
        }
        prop_assert_eq!(decide(Policy::Band, &s), vec![]);
    }

    #[test]
    fn hotspot_policies_leave_a_cluster_under_thresholds_alone(s in arb_scenario(), scale in 0.0f64..=1.0) {
        let mut s = s;
        let t = s.tuning.clone();
        for h in &mut s.hosts {
            h.cpu_pct = t.cpu_threshold_pct * scale;
            h.nic_pct = t.nic_threshold_pct * scale;
            h.swap_writes_per_s = t.swap_threshold_writes_per_s * scale;
            h.history = History::default();
        }
        prop_assert_eq!(decide(Policy::Idc, &s), vec![]);
        prop_assert_eq!(decide(Policy::Sandpiper, &s), vec![]);
    }
}
