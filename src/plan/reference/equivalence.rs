//! The indexed planners against the reference copies: on random small clusters every policy's round (decisions,
//! reasons, figures and notes) and the load-move model's result are exactly the reference's, over several rounds;
//! on random evacuation inputs (the evacuation planner's own property-test generator) the plan, or the error with
//! its text, is exactly the reference's.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use crate::plan::evacuate::Input;
use crate::plan::scenario::{Flow, History, Host, Scenario, Tuning, Vm};
use crate::plan::simulate::advance;
use crate::plan::{evacuate, model, plan_round, Policy};

/// A figure in `0..=max`, often one of a few round values so that ties between hosts and VMs are common.
fn figure(max: f64) -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 0.0..=max,
        1 => prop::sample::select(vec![0.0, max / 4.0, max / 2.0, max]),
    ]
}

/// CPU or NIC utilisation: anywhere, or near the default thresholds so that hotspots are common.
fn utilisation() -> impl Strategy<Value = f64> {
    prop_oneof![2 => figure(100.0), 1 => 78.0f64..=100.0]
}

fn series(max: f64) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(figure(max), 0..5)
}

prop_compose! {
    fn arb_host()(
        cpus in prop_oneof![Just(4u32), 1u32..=16],
        memory_mib in prop_oneof![Just(4096u64), 1024u64..=16384],
        reserved_pct in prop_oneof![Just(0u64), 0u64..=30],
        nic_mbps in prop_oneof![Just(1000.0), 100.0f64..=10_000.0],
        cpu_pct in utilisation(),
        nic_pct in utilisation(),
        swap in prop_oneof![Just(0.0), 0.0f64..500.0],
        cpu_history in series(100.0),
        swap_history in series(500.0),
        nic_history in series(100.0),
    ) -> Host {
        Host {
            name: String::new(),
            cpus,
            memory_mib,
            nic_mbps,
            cpu_pct,
            swap_writes_per_s: swap,
            nic_pct,
            memory_reserved_mib: memory_mib * reserved_pct / 100,
            history: History { cpu_pct: cpu_history, swap_writes_per_s: swap_history, nic_pct: nic_history },
        }
    }
}

prop_compose! {
    fn arb_vm(hosts: usize)(
        host in 0..hosts,
        cpu_pct in figure(60.0),
        memory_mib in prop_oneof![Just(512u64), 64u64..=2048],
        grow in prop::option::of(prop_oneof![Just(0u64), 1u64..=1024]),
        memory_pct in figure(100.0),
        nic_mbps in figure(500.0),
        swap in prop_oneof![Just(0.0), figure(300.0)],
    ) -> (usize, Vm) {
        let vm = Vm {
            memory_mib,
            memory_max_mib: grow.map(|g| memory_mib + g),
            memory_pct,
            cpu_pct,
            nic_mbps,
            swap_writes_per_s: swap,
            ..plain_vm(host).1
        };
        (host, vm)
    }
}

prop_compose! {
    fn arb_tuning()(
        cpu in prop_oneof![Just(85.0), 50.0f64..=95.0],
        swap in prop_oneof![Just(150.0), 0.0f64..=300.0],
        nic in prop_oneof![Just(80.0), 50.0f64..=95.0],
        step in prop_oneof![Just(32u64), 1u64..=256],
        bound in prop::option::of(prop_oneof![Just(0.0), 10.0f64..=1000.0]),
    ) -> Tuning {
        Tuning {
            cpu_threshold_pct: cpu,
            swap_threshold_writes_per_s: swap,
            nic_threshold_pct: nic,
            balloon_step_mib: step,
            vm_nic_bound_mbps: bound,
        }
    }
}

/// An idle host, many alike: ties between destinations that only names break.
fn idle_host() -> Host {
    Host {
        name: String::new(),
        cpus: 4,
        memory_mib: 4096,
        nic_mbps: 1000.0,
        cpu_pct: 0.0,
        swap_writes_per_s: 0.0,
        nic_pct: 0.0,
        memory_reserved_mib: 0,
        history: History::default(),
    }
}

/// A VM like many others: ties between VMs that only names break.
fn plain_vm(host: usize) -> (usize, Vm) {
    let vm = Vm {
        name: String::new(),
        host: String::new(),
        cpu_pct: 10.0,
        memory_mib: 512,
        memory_pct: 50.0,
        nic_mbps: 0.0,
        swap_writes_per_s: 0.0,
        memory_max_mib: Some(1024),
    };
    (host, vm)
}

/// 2–12 hosts, 0–40 VMs, 0–30 flows. Names are shuffled against positions, so that code that breaks ties by
/// position instead of by name shows.
fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (2usize..=12, 0usize..=40)
        .prop_flat_map(|(nh, nv)| {
            let host = prop_oneof![3 => arb_host(), 1 => Just(idle_host())];
            let vm = prop_oneof![3 => arb_vm(nh).boxed(), 1 => (0..nh).prop_map(plain_vm).boxed()];
            let hosts = prop::collection::vec(host, nh);
            let vms = prop::collection::vec(vm, nv);
            let ends = nv.max(1);
            let flows = prop::collection::vec((0..ends, 0..ends, figure(300.0)), 0..=30);
            let host_names = Just((0..nh).collect::<Vec<_>>()).prop_shuffle();
            let vm_names = Just((0..nv).collect::<Vec<_>>()).prop_shuffle();
            (hosts, vms, flows, host_names, vm_names, arb_tuning())
        })
        .prop_map(|(mut hosts, vms, flows, host_names, vm_names, tuning)| {
            for (h, n) in hosts.iter_mut().zip(&host_names) {
                h.name = format!("h{n}");
            }
            let vms: Vec<Vm> = vms
                .into_iter()
                .zip(&vm_names)
                .map(|((h, mut v), n)| {
                    v.name = format!("v{n}");
                    v.host.clone_from(&hosts[h].name);
                    v
                })
                .collect();
            // Each pair once, never a VM with itself.
            let mut pairs = BTreeSet::new();
            let traffic = flows
                .into_iter()
                .filter(|&(a, b, _)| {
                    a != b && a.max(b) < vms.len() && pairs.insert((a.min(b), a.max(b)))
                })
                .map(|(a, b, mbps)| Flow {
                    a: vms[a].name.clone(),
                    b: vms[b].name.clone(),
                    mbps,
                })
                .collect();
            Scenario {
                description: None,
                hosts,
                vms,
                traffic,
                tuning,
            }
        })
}

/// `input` with every host alike (capacity, use, residents): ties between hosts that only names break.
fn alike(mut input: Input) -> Input {
    for h in &mut input.hosts {
        (h.vcpus, h.memory_bytes) = (8, 8 << 30);
        (h.used_vcpus, h.used_memory_bytes) = (2, 2 << 30);
        h.vms.clear();
    }
    input
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    /// Three rounds of every policy, each round's decisions carried into the next by the simulator.
    #[test]
    fn every_policy_decides_as_the_reference(s in arb_scenario()) {
        prop_assume!(s.validate().is_ok());
        for policy in Policy::ALL {
            let mut state = s.clone();
            for round in 1..=3 {
                let got = plan_round(policy, &state);
                let want = super::plan_round(policy, &state);
                prop_assert_eq!(&got, &want, "{} round {}", policy, round);
                advance(&mut state, &got.decisions);
            }
        }
    }

    /// Every VM moved to every host, by the model and by the reference model, gives the same figures.
    #[test]
    fn the_model_moves_as_the_reference(s in arb_scenario()) {
        prop_assume!(s.validate().is_ok());
        for vm in &s.vms {
            for to in &s.hosts {
                let got = model::project(&s, &vm.name, &to.name);
                let want = super::model::project(&s, &vm.name, &to.name);
                prop_assert_eq!(&got, &want, "{} to {}", vm.name, to.name);
                prop_assert_eq!(
                    model::newly_over_capacity(&s, &got),
                    super::model::newly_over_capacity(&s, &want)
                );
            }
        }
    }

    /// The evacuation planner's own input generator, as generated, with the hosts listed the other way round, and
    /// with every host alike.
    #[test]
    fn the_evacuation_plan_is_the_reference(input in evacuate::properties::arb_input()) {
        let mut reversed = input.clone();
        reversed.hosts.reverse();
        for input in [alike(input.clone()), reversed, input] {
            prop_assert_eq!(evacuate::plan(&input), super::evacuate::plan(&input));
        }
    }
}
