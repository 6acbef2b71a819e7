//! REFERENCE COPY, test-only: src/plan/idc.rs as it was before the scale work (issue 11), verbatim but for this
//! line and its unit tests. See [`super`]; do not optimise.
//!
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
//! Destination: among the hosts with room (see [`hotspot::room`]), the one where the victim's peers live (most
//! traffic with it, the group reunion); without peers, the least loaded by Sandpiper's host volume.

use super::hotspot::{self, Assessment, TrafficSplit};
use super::model;
use super::scenario::{Scenario, Vm};
use super::{fig, Decision, RoundPlan};

/// One round of the idc policy. Each hotspot, worst first, gets at most one decision; later hotspots are planned
/// against the figures as the earlier decisions leave them, so two moves cannot claim the same free room.
pub fn plan(s: &Scenario) -> RoundPlan {
    let mut out = RoundPlan::default();
    let hot = hotspot::hotspots(s);
    if hot.is_empty() {
        out.notes.push(no_hotspot_note(s));
        return out;
    }
    let mut work = s.clone();
    for a in &hot {
        // Paper 004: memory first, because relieving swapping can also relieve the CPU.
        if a.swap.over() {
            match hotspot::balloon_step(&work, a) {
                Ok(d) => {
                    if let Decision::Balloon { vm, to_mib, .. } = &d {
                        model::balloon(&mut work, vm, *to_mib);
                    }
                    out.decisions.push(d);
                    continue;
                }
                Err(why) => out
                    .notes
                    .push(format!("{}: {why}; migrating instead", a.host)),
            }
        }
        match migration(&work, a) {
            Ok(d) => {
                if let Decision::Migrate { vm, to, .. } = &d {
                    model::migrate(&mut work, vm, to);
                }
                out.decisions.push(d);
            }
            Err(why) => out.notes.push(why),
        }
    }
    out
}

pub(crate) fn no_hotspot_note(s: &Scenario) -> String {
    let t = &s.tuning;
    format!(
        "no hotspot: no host has both its current and predicted figures over {}% CPU, {} swap writes/s or {}% NIC",
        t.cpu_threshold_pct, t.swap_threshold_writes_per_s, t.nic_threshold_pct
    )
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
pub fn volume(s: &Scenario, vm: &Vm, cpu_flag: bool, mem_flag: bool) -> Volume {
    let src = s.host(&vm.host).expect("vm's host in scenario");
    let split = hotspot::traffic_split(s, vm);
    let free_mbps = src.nic_mbps * (1.0 - src.nic_pct / 100.0).max(0.0);
    let available_mbps = (free_mbps + split.nic_mbps).min(src.nic_mbps);
    let bound_mbps = s.tuning.vm_nic_bound_mbps.unwrap_or(src.nic_mbps);
    let nds_mbps = split.idc_mbps.min(available_mbps).min(bound_mbps);
    let benefit_mbps = split.nic_mbps - nds_mbps;
    let benefit_pct = benefit_mbps / src.nic_mbps * 100.0;
    let cpu_pct = vm.cpu_pct;
    let mem_pct = hotspot::resident_pct(s, vm);
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

fn migration(s: &Scenario, a: &Assessment) -> Result<Decision, String> {
    let (c, m) = (a.cpu.over(), a.swap.over());
    let mut ranked: Vec<(&Vm, Volume)> =
        s.vms_on(&a.host).map(|v| (v, volume(s, v, c, m))).collect();
    if ranked.is_empty() {
        return Err(format!(
            "{} is a hotspot ({}) but has no VM to move",
            a.host,
            a.describe()
        ));
    }
    ranked.sort_by(|(va, a), (vb, b)| {
        b.v.total_cmp(&a.v)
            .then_with(|| {
                (b.split.nic_mbps + b.split.idc_mbps)
                    .total_cmp(&(a.split.nic_mbps + a.split.idc_mbps))
            })
            .then_with(|| va.name.cmp(&vb.name))
    });
    let mut skipped = Vec::new();
    for (vm, vol) in &ranked {
        let (mut dests, _) = hotspot::destinations(s, vm);
        if dests.is_empty() {
            skipped.push(vm.name.as_str());
            continue;
        }
        let peers = |h: &String| vol.split.by_host.get(h).copied().unwrap_or(0.0);
        dests.sort_by(|x, y| {
            peers(y)
                .total_cmp(&peers(x))
                .then_with(|| hotspot::host_volume(s, x).total_cmp(&hotspot::host_volume(s, y)))
                .then_with(|| x.cmp(y))
        });
        let to = &dests[0];
        let nsd = peers(to);
        let why_dest = if nsd > 0.0 {
            let names: Vec<&str> = s
                .peers(&vm.name)
                .into_iter()
                .filter(|(p, _)| s.vm(p).is_some_and(|p| &p.host == to))
                .map(|(p, _)| p)
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
        let skipped_note = if skipped.is_empty() {
            String::new()
        } else {
            format!(
                " ({} ranked higher but no host has room)",
                skipped.join(", ")
            )
        };
        return Ok(Decision::Migrate {
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
                u8::from(m),
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
                fig("mem_flag", f64::from(u8::from(m))),
                fig("network_benefit_pct", vol.benefit_pct),
                fig("network_benefit_mbps", vol.benefit_mbps),
                fig("nso_plus_nsd_mbps", vol.split.nic_mbps),
                fig("is_mbps", vol.split.idc_mbps),
                fig("ab_mbps", vol.available_mbps),
                fig("nb_bound_mbps", vol.bound_mbps),
                fig("nds_mbps", vol.nds_mbps),
                fig("nsd_mbps", nsd),
            ],
        });
    }
    Err(format!(
        "{} is a hotspot ({}) but no other host has room for any of its VMs",
        a.host,
        a.describe()
    ))
}
