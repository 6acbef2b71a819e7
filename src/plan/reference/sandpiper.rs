//! REFERENCE COPY, test-only: src/plan/sandpiper.rs as it was before the scale work (issue 11), verbatim but for this
//! line and its unit tests. See [`super`]; do not optimise.
//!
//! The `sandpiper` policy, paper 004's baseline (Wood et al., NSDI 2007): on a hotspot the VM with the largest
//! volume-to-size ratio moves to the least loaded host with room. Pure: figures in, decisions with reasons out.
//!
//! volume = 1 / ((1 − cpu)(1 − mem)(1 − net)), VSR = volume / size. For a VM, cpu is its CPU points, mem its
//! resident memory as a share of the host's, net all its traffic as a share of the source NIC — including traffic
//! with VMs on the same host, which Sandpiper counts and paper 004 argues it should not. Size is the VM's memory in
//! MiB. The least loaded host is the one with the smallest host volume.
//!
//! Hotspot detection and the balloon step before migrating are the same as idc's ([`super::hotspot`]): paper 004
//! describes Sandpiper allocating memory first as well, so the two policies differ only in which VM moves and where.

use super::hotspot::{self, Assessment};
use super::model;
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

pub fn vsr(s: &Scenario, vm: &Vm) -> Vsr {
    let src = s.host(&vm.host).expect("vm's host in scenario");
    let split = hotspot::traffic_split(s, vm);
    let net_pct = (split.nic_mbps + split.idc_mbps) / src.nic_mbps * 100.0;
    let mem_pct = hotspot::resident_pct(s, vm);
    let volume = hotspot::volume(vm.cpu_pct, mem_pct, net_pct);
    #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
    let vsr = volume / vm.memory_mib as f64;
    Vsr {
        cpu_pct: vm.cpu_pct,
        mem_pct,
        net_pct,
        volume,
        size_mib: vm.memory_mib,
        vsr,
    }
}

/// One round of the sandpiper policy: each hotspot, worst first, gets at most one decision, planned against the
/// figures the earlier decisions of the round leave.
pub fn plan(s: &Scenario) -> RoundPlan {
    let mut out = RoundPlan::default();
    let hot = hotspot::hotspots(s);
    if hot.is_empty() {
        out.notes.push(super::idc::no_hotspot_note(s));
        return out;
    }
    let mut work = s.clone();
    for a in &hot {
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

fn migration(s: &Scenario, a: &Assessment) -> Result<Decision, String> {
    let mut ranked: Vec<(&Vm, Vsr)> = s.vms_on(&a.host).map(|v| (v, vsr(s, v))).collect();
    if ranked.is_empty() {
        return Err(format!(
            "{} is a hotspot ({}) but has no VM to move",
            a.host,
            a.describe()
        ));
    }
    ranked.sort_by(|(va, a), (vb, b)| b.vsr.total_cmp(&a.vsr).then_with(|| va.name.cmp(&vb.name)));
    for (vm, r) in &ranked {
        let (mut dests, _) = hotspot::destinations(s, vm);
        dests.sort_by(|x, y| {
            hotspot::host_volume(s, x)
                .total_cmp(&hotspot::host_volume(s, y))
                .then_with(|| x.cmp(y))
        });
        let Some(to) = dests.first() else { continue };
        let to_volume = hotspot::host_volume(s, to);
        return Ok(Decision::Migrate {
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
        });
    }
    Err(format!(
        "{} is a hotspot ({}) but no other host has room for any of its VMs",
        a.host,
        a.describe()
    ))
}
