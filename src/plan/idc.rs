//! Paper 004's `idc` policy: hotspots (current and AR(1)-predicted figure over a threshold) are answered by ballooning
//! first when memory is short, then by migrating the VM whose move frees most of what is overloaded while keeping
//! VMs that talk to each other on one host. Pure: figures in, decisions with reasons out.
//!
//! Victim: the VM on the hotspot with the largest V = CPU·C + Mem·M + NB·N, where C and M are the CPU and memory
//! overload flags and N is always 1 (paper 004 keeps the network term so that inter-VM traffic always counts). CPU is
//! the VM's CPU points, Mem its resident memory as a percentage of the host's, and NB its network benefit as a
//! percentage of the source NIC: NB = Nso + Nsd − Nds, Nds = min(Is, AB, NB_bound), with Is its IDC on the source,
//! AB the source's free NIC bandwidth once the VM's own NIC traffic has left, and NB_bound the most a VM can push
//! (`tuning.vm_nic_bound_mbps`, by default the NIC speed). Ties go to the VM with more traffic. If no host has room
//! for the victim, the next VM in V order is tried.
//!
//! Destination: among the hosts with room (see `hotspot::room`), the one where the victim's peers live (most
//! traffic with it, the group reunion); without peers, the least loaded by Sandpiper's host volume.

use std::cmp::Ordering;

use super::hotspot::{self, Assessment, TrafficSplit};
use super::index::{Index, Names};
use super::round::{self, Chooser, Move, Work};
use super::scenario::{Scenario, Vm};
use super::{fig, Decision, RoundPlan};

/// One round of the idc policy. Each hotspot, worst first, gets at most one decision; later hotspots are planned
/// against the figures as the earlier decisions leave them, so two moves cannot claim the same free room.
pub fn plan(s: &Scenario) -> RoundPlan {
    round::plan(s, &Idc)
}

/// The figures behind one VM's volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub cpu_pct: f64,
    pub mem_pct: f64,
    pub split: TrafficSplit,
    pub available_mbps: f64,
    pub bound_mbps: f64,
    /// Predicted NIC traffic between destination and source after the move.
    pub nds_mbps: f64,
    pub benefit_mbps: f64,
    pub benefit_pct: f64,
    pub v: f64,
}

/// V for `vm` on its (overloaded) host, with the host's CPU and memory overload flags.
///
/// # Panics
/// If `vm` or its host is not in `s`.
pub fn volume(s: &Scenario, vm: &Vm, cpu_flag: bool, mem_flag: bool) -> Volume {
    let names = Names::new(s);
    let vi = names.vm(&vm.name).expect("vm in scenario");
    volume_at(s, &Index::new(s, &names), vi, cpu_flag, mem_flag)
}

/// [`volume`] of VM `vm` by position.
fn volume_at(s: &Scenario, ix: &Index, vm: usize, cpu_flag: bool, mem_flag: bool) -> Volume {
    let src = &s.hosts[ix.host_of(vm).expect("vm's host in scenario")];
    let split = hotspot::traffic_split_at(s, ix, vm);
    let free_mbps = src.nic_mbps * (1.0 - src.nic_pct / 100.0).max(0.0);
    let available_mbps = (free_mbps + split.nic_mbps).min(src.nic_mbps);
    let bound_mbps = s.tuning.vm_nic_bound_mbps.unwrap_or(src.nic_mbps);
    let nds_mbps = split.idc_mbps.min(available_mbps).min(bound_mbps);
    let benefit_mbps = split.nic_mbps - nds_mbps;
    let benefit_pct = benefit_mbps / src.nic_mbps * 100.0;
    let cpu_pct = s.vms[vm].cpu_pct;
    let mem_pct = hotspot::resident_pct_at(s, ix, vm);
    let v = cpu_pct * f64::from(u8::from(cpu_flag))
        + mem_pct * f64::from(u8::from(mem_flag))
        + benefit_pct;
    Volume {
        cpu_pct,
        mem_pct,
        split,
        available_mbps,
        bound_mbps,
        nds_mbps,
        benefit_mbps,
        benefit_pct,
        v,
    }
}

/// idc's choices: the largest V moves, to the host with most of its peers, else the least loaded.
struct Idc;

impl Chooser for Idc {
    type Score = Volume;

    fn score(&self, w: &Work, a: &Assessment, vm: usize) -> Volume {
        volume_at(&w.s, &w.ix, vm, a.cpu.over(), a.swap.over())
    }

    fn rank(&self, w: &Work, (va, a): (usize, &Volume), (vb, b): (usize, &Volume)) -> Ordering {
        b.v.total_cmp(&a.v)
            .then_with(|| {
                (b.split.nic_mbps + b.split.idc_mbps)
                    .total_cmp(&(a.split.nic_mbps + a.split.idc_mbps))
            })
            .then_with(|| w.s.vms[va].name.cmp(&w.s.vms[vb].name))
    }

    fn destination(&self, w: &Work, _vm: usize, vol: &Volume, dests: &[usize]) -> usize {
        let peers = |h: usize| peers_on(vol, w, h);
        let volume = |h: usize| hotspot::host_volume_at(&w.s, &w.ix, h);
        let name = |h: usize| &w.s.hosts[h].name;
        *dests
            .iter()
            .min_by(|&&x, &&y| {
                peers(y)
                    .total_cmp(&peers(x))
                    .then_with(|| volume(x).total_cmp(&volume(y)))
                    .then_with(|| name(x).cmp(name(y)))
            })
            .expect("a host with room")
    }

    fn decide(&self, m: &Move<'_, Volume>) -> Decision {
        let (w, a, vol) = (m.w, m.hotspot, m.score);
        let vm = &w.s.vms[m.vm];
        let to = &w.s.hosts[m.to].name;
        let (c, mem) = (a.cpu.over(), a.swap.over());
        let nsd = peers_on(vol, w, m.to);
        let why_dest = if nsd > 0.0 {
            let names: Vec<&str> =
                w.ix.peers(m.vm)
                    .iter()
                    .filter_map(|p| p.vm)
                    .filter(|&p| w.ix.host_of(p) == Some(m.to))
                    .map(|p| w.s.vms[p].name.as_str())
                    .collect();
            format!(
                "{to} has room and reunites it with {} ({nsd:.0} Mbps become IDC)",
                names.join(", ")
            )
        } else {
            format!(
                "{to} has room and is the least loaded; no peer of {} lives elsewhere",
                vm.name
            )
        };
        let skipped_note = if m.skipped.is_empty() {
            String::new()
        } else {
            format!(
                " ({} ranked higher but no host has room)",
                m.skipped.join(", ")
            )
        };
        Decision::Migrate {
            vm: vm.name.clone(),
            from: a.host.clone(),
            to: to.clone(),
            reason: format!(
                "{} is a hotspot: {}; {} has the largest volume V = {:.1}·{} + {:.1}·{} + {:.1} = {:.1} (network \
                 benefit {:.0} Mbps = Nso+Nsd {:.0} − Nds {:.0}){skipped_note}; {why_dest}",
                a.host,
                a.describe(),
                vm.name,
                vol.cpu_pct,
                u8::from(c),
                vol.mem_pct,
                u8::from(mem),
                vol.benefit_pct,
                vol.v,
                vol.benefit_mbps,
                vol.split.nic_mbps,
                vol.nds_mbps,
            ),
            figures: vec![
                fig("v", vol.v),
                fig("cpu_pct", vol.cpu_pct),
                fig("mem_pct", vol.mem_pct),
                fig("cpu_flag", f64::from(u8::from(c))),
                fig("mem_flag", f64::from(u8::from(mem))),
                fig("network_benefit_pct", vol.benefit_pct),
                fig("network_benefit_mbps", vol.benefit_mbps),
                fig("nso_plus_nsd_mbps", vol.split.nic_mbps),
                fig("is_mbps", vol.split.idc_mbps),
                fig("ab_mbps", vol.available_mbps),
                fig("nb_bound_mbps", vol.bound_mbps),
                fig("nds_mbps", vol.nds_mbps),
                fig("nsd_mbps", nsd),
            ],
        }
    }
}

/// The VM's traffic with peers on host `h` (Nsd if it moved there).
fn peers_on(vol: &Volume, w: &Work, h: usize) -> f64 {
    vol.split
        .by_host
        .get(w.s.hosts[h].name.as_str())
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::scenario::{Flow, History, Host, Tuning};

    fn host(name: &str, cpu: f64, nic: f64, history_cpu: &[f64]) -> Host {
        Host {
            name: name.into(),
            cpus: 1,
            memory_mib: 2048,
            nic_mbps: 1000.0,
            cpu_pct: cpu,
            swap_writes_per_s: 0.0,
            nic_pct: nic,
            memory_reserved_mib: 0,
            history: History {
                cpu_pct: history_cpu.to_vec(),
                ..History::default()
            },
        }
    }

    fn vm(name: &str, host: &str, cpu: f64, nic: f64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: cpu,
            memory_mib: 256,
            memory_pct: 50.0,
            nic_mbps: nic,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        }
    }

    fn flow(a: &str, b: &str, mbps: f64) -> Flow {
        Flow {
            a: a.into(),
            b: b.into(),
            mbps,
        }
    }

    #[test]
    fn network_benefit_follows_equations_1_and_2() {
        // x talks to y over IDC (300) and to z on h2 (100) and to clients (50). h1's NIC carries 400 of 1000.
        let s = Scenario {
            description: None,
            hosts: vec![host("h1", 90.0, 40.0, &[]), host("h2", 10.0, 10.0, &[])],
            vms: vec![
                vm("x", "h1", 40.0, 150.0),
                vm("y", "h1", 10.0, 0.0),
                vm("z", "h2", 5.0, 100.0),
            ],
            traffic: vec![flow("x", "y", 300.0), flow("x", "z", 100.0)],
            tuning: Tuning::default(),
        };
        struct Case {
            bound: Option<f64>,
            nds: f64,
        }
        // AB = 600 free + 150 of x's own = 750; Is = 300.
        let cases = [
            Case {
                bound: None,
                nds: 300.0,
            },
            Case {
                bound: Some(120.0),
                nds: 120.0,
            },
        ];
        for c in cases {
            let mut s = s.clone();
            s.tuning.vm_nic_bound_mbps = c.bound;
            let vol = volume(&s, s.vm("x").unwrap(), true, false);
            assert_eq!(vol.split.idc_mbps, 300.0);
            assert_eq!(vol.split.nic_mbps, 150.0);
            assert_eq!(vol.available_mbps, 750.0);
            assert_eq!(vol.nds_mbps, c.nds);
            assert_eq!(vol.benefit_mbps, 150.0 - c.nds);
            assert!((vol.v - (40.0 + (150.0 - c.nds) / 10.0)).abs() < 1e-9);
        }
    }

    #[test]
    fn decisions() {
        struct Case {
            what: &'static str,
            scenario: Scenario,
            want: Option<(&'static str, &'static str)>,
        }
        let base = |hosts: Vec<Host>, vms: Vec<Vm>, traffic: Vec<Flow>| Scenario {
            description: None,
            hosts,
            vms,
            traffic,
            tuning: Tuning::default(),
        };
        let cases = [
            Case {
                what: "no hotspot",
                scenario: base(
                    vec![host("a", 80.0, 10.0, &[]), host("b", 10.0, 0.0, &[])],
                    vec![],
                    vec![],
                ),
                want: None,
            },
            Case {
                what: "a spike is not a hotspot",
                scenario: base(
                    vec![
                        host("a", 95.0, 10.0, &[40.0, 40.0, 40.0]),
                        host("b", 10.0, 0.0, &[]),
                    ],
                    vec![vm("v", "a", 50.0, 0.0)],
                    vec![],
                ),
                want: None,
            },
            Case {
                what: "the isolated VM moves, not a member of a pair",
                scenario: base(
                    vec![host("a", 95.0, 30.0, &[]), host("b", 20.0, 0.0, &[])],
                    vec![
                        vm("p1", "a", 35.0, 0.0),
                        vm("p2", "a", 30.0, 0.0),
                        vm("solo", "a", 25.0, 20.0),
                    ],
                    vec![flow("p1", "p2", 280.0)],
                ),
                want: Some(("solo", "b")),
            },
            Case {
                what: "the destination with the peer wins over the idle host",
                scenario: base(
                    vec![
                        host("a", 50.0, 90.0, &[]),
                        host("b", 20.0, 30.0, &[]),
                        host("idle", 0.0, 0.0, &[]),
                    ],
                    vec![
                        vm("talker", "a", 10.0, 500.0),
                        vm("other", "a", 10.0, 300.0),
                        vm("peer", "b", 10.0, 300.0),
                    ],
                    vec![flow("talker", "peer", 300.0)],
                ),
                want: Some(("talker", "b")),
            },
            Case {
                what: "no host has room",
                scenario: base(
                    vec![host("a", 95.0, 10.0, &[]), host("b", 80.0, 0.0, &[])],
                    vec![vm("v", "a", 50.0, 0.0)],
                    vec![],
                ),
                want: None,
            },
        ];
        for c in cases {
            let d = plan(&c.scenario).decisions;
            let got = d.first().map(|d| match d {
                Decision::Migrate { vm, to, .. } => (vm.as_str(), to.as_str()),
                Decision::Balloon { .. } => panic!("{}: unexpected balloon", c.what),
            });
            assert_eq!(got, c.want, "{}: {d:?}", c.what);
        }
    }
}
