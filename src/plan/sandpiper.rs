//! The `sandpiper` policy, paper 004's baseline (Wood et al., NSDI 2007): on a hotspot the VM with the largest
//! volume-to-size ratio moves to the least loaded host with room. Pure: figures in, decisions with reasons out.
//!
//! volume = 1 / ((1 − cpu)(1 − mem)(1 − net)), VSR = volume / size. For a VM, cpu is its CPU points, mem its
//! resident memory as a share of the host's, net all its traffic as a share of the source NIC — including traffic
//! with VMs on the same host, which Sandpiper counts and paper 004 argues it should not. Size is the VM's memory in
//! MiB. The least loaded host is the one with the smallest host volume.
//!
//! Hotspot detection, the balloon step before migrating and the round are the same as idc's ([`super::hotspot`],
//! `round.rs`): paper 004 describes Sandpiper allocating memory first as well, so the two policies differ only
//! in which VM moves and where.

use std::cmp::Ordering;

use super::hotspot::{self, Assessment};
use super::index::{Index, Names};
use super::round::{self, Chooser, Move, Work};
use super::scenario::{Scenario, Vm};
use super::{fig, Decision, RoundPlan};

/// The figures behind one VM's VSR.
#[derive(Debug, Clone, PartialEq)]
pub struct Vsr {
    pub cpu_pct: f64,
    pub mem_pct: f64,
    pub net_pct: f64,
    pub volume: f64,
    pub size_mib: u64,
    pub vsr: f64,
}

/// # Panics
/// If `vm` or its host is not in `s`.
pub fn vsr(s: &Scenario, vm: &Vm) -> Vsr {
    let names = Names::new(s);
    let vi = names.vm(&vm.name).expect("vm in scenario");
    vsr_at(s, &Index::new(s, &names), vi)
}

/// [`vsr`] of VM `vm` by position.
fn vsr_at(s: &Scenario, ix: &Index, vm: usize) -> Vsr {
    let src = &s.hosts[ix.host_of(vm).expect("vm's host in scenario")];
    let v = &s.vms[vm];
    let split = hotspot::traffic_split_at(s, ix, vm);
    let net_pct = (split.nic_mbps + split.idc_mbps) / src.nic_mbps * 100.0;
    let mem_pct = hotspot::resident_pct_at(s, ix, vm);
    let volume = hotspot::volume(v.cpu_pct, mem_pct, net_pct);
    #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
    let vsr = volume / v.memory_mib as f64;
    Vsr {
        cpu_pct: v.cpu_pct,
        mem_pct,
        net_pct,
        volume,
        size_mib: v.memory_mib,
        vsr,
    }
}

/// One round of the sandpiper policy: each hotspot, worst first, gets at most one decision, planned against the
/// figures the earlier decisions of the round leave.
pub fn plan(s: &Scenario) -> RoundPlan {
    round::plan(s, &Sandpiper)
}

/// Sandpiper's choices: the largest VSR with room elsewhere moves, to the least loaded host with room.
struct Sandpiper;

impl Chooser for Sandpiper {
    type Score = Vsr;

    fn score(&self, w: &Work, _a: &Assessment, vm: usize) -> Vsr {
        vsr_at(&w.s, &w.ix, vm)
    }

    fn rank(&self, w: &Work, (va, a): (usize, &Vsr), (vb, b): (usize, &Vsr)) -> Ordering {
        b.vsr
            .total_cmp(&a.vsr)
            .then_with(|| w.s.vms[va].name.cmp(&w.s.vms[vb].name))
    }

    fn destination(&self, w: &Work, _vm: usize, _r: &Vsr, dests: &[usize]) -> usize {
        let volume = |h: usize| hotspot::host_volume_at(&w.s, &w.ix, h);
        *dests
            .iter()
            .min_by(|&&x, &&y| {
                volume(x)
                    .total_cmp(&volume(y))
                    .then_with(|| w.s.hosts[x].name.cmp(&w.s.hosts[y].name))
            })
            .expect("a host with room")
    }

    fn decide(&self, m: &Move<'_, Vsr>) -> Decision {
        let (w, a, r) = (m.w, m.hotspot, m.score);
        let vm = &w.s.vms[m.vm];
        let to = &w.s.hosts[m.to].name;
        let to_volume = hotspot::host_volume_at(&w.s, &w.ix, m.to);
        Decision::Migrate {
            vm: vm.name.clone(),
            from: a.host.clone(),
            to: to.clone(),
            reason: format!(
                "{} is a hotspot: {}; {} has the largest VSR with room elsewhere: volume 1/((1-{:.3})(1-{:.3})(1-{:.3})) \
                 = {:.3} over {} MiB = {:.5}; {to} is the least loaded host with room (volume {to_volume:.3})",
                a.host,
                a.describe(),
                vm.name,
                r.cpu_pct / 100.0,
                r.mem_pct / 100.0,
                r.net_pct / 100.0,
                r.volume,
                r.size_mib,
                r.vsr,
            ),
            figures: vec![
                fig("vsr", r.vsr),
                fig("volume", r.volume),
                fig("cpu_pct", r.cpu_pct),
                fig("mem_pct", r.mem_pct),
                fig("net_pct", r.net_pct),
                #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
                fig("size_mib", r.size_mib as f64),
                fig("destination_volume", to_volume),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::scenario::{Flow, History, Host, Tuning};

    fn host(name: &str, cpu: f64, nic: f64) -> Host {
        Host {
            name: name.into(),
            cpus: 1,
            memory_mib: 2048,
            nic_mbps: 1000.0,
            cpu_pct: cpu,
            swap_writes_per_s: 0.0,
            nic_pct: nic,
            memory_reserved_mib: 0,
            history: History::default(),
        }
    }

    fn vm(name: &str, host: &str, cpu: f64, mem_mib: u64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: cpu,
            memory_mib: mem_mib,
            memory_pct: 50.0,
            nic_mbps: 0.0,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        }
    }

    #[test]
    fn vsr_counts_idc_and_divides_by_size() {
        let s = Scenario {
            description: None,
            hosts: vec![host("a", 90.0, 0.0), host("b", 10.0, 0.0)],
            vms: vec![vm("x", "a", 50.0, 1024), vm("y", "a", 10.0, 512)],
            traffic: vec![Flow {
                a: "x".into(),
                b: "y".into(),
                mbps: 500.0,
            }],
            tuning: Tuning::default(),
        };
        let r = vsr(&s, s.vm("x").unwrap());
        // cpu 0.5, mem 1024·0.5/2048 = 0.25, net 500/1000 = 0.5 (IDC counted)
        assert!((r.volume - 1.0 / (0.5 * 0.75 * 0.5)).abs() < 1e-12, "{r:?}");
        assert!((r.vsr - r.volume / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn decisions() {
        // (what, hosts (name, cpu, nic), vms (name, host, cpu, MiB), want (vm, to))
        type Case = (
            &'static str,
            Vec<Host>,
            Vec<Vm>,
            Option<(&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                "no hotspot",
                vec![host("a", 50.0, 0.0), host("b", 10.0, 0.0)],
                vec![vm("x", "a", 40.0, 256)],
                None,
            ),
            (
                "largest VSR to the least loaded host",
                vec![
                    host("a", 95.0, 0.0),
                    host("b", 40.0, 0.0),
                    host("c", 10.0, 0.0),
                ],
                vec![vm("big", "a", 60.0, 2000), vm("small", "a", 30.0, 256)],
                Some(("small", "c")),
            ),
            (
                "largest VSR has no room anywhere: the next one moves",
                vec![host("a", 95.0, 0.0), host("b", 40.0, 0.0)],
                vec![vm("hungry", "a", 70.0, 128), vm("modest", "a", 20.0, 256)],
                Some(("modest", "b")),
            ),
        ];
        for (what, hosts, vms, want) in cases {
            let s = Scenario {
                description: None,
                hosts,
                vms,
                traffic: vec![],
                tuning: Tuning::default(),
            };
            let d = plan(&s).decisions;
            let got = d.first().map(|d| match d {
                Decision::Migrate { vm, to, .. } => (vm.as_str(), to.as_str()),
                Decision::Balloon { .. } => panic!("{what}: unexpected balloon"),
            });
            assert_eq!(got, want, "{what}: {d:?}");
        }
    }
}
