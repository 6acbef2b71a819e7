//! REFERENCE COPY, test-only: src/plan/hotspot.rs as it was before the scale work (issue 11), verbatim but for this
//! line, its unit tests, and the hotspot detection and volume it shares with the live module (unchanged). See [`super`]; do not optimise.
//!
//! Hotspot detection and the steps shared by the idc and sandpiper policies (paper 004): the AR(1) prediction, the
//! overload flags, the balloon step that answers a memory overload before any migration, and the test that a
//! destination has room. Pure: figures in, verdicts out.

use std::collections::BTreeMap;

use super::model;
use super::scenario::{Scenario, Vm};
use super::Decision;

// Unchanged by the scale work, so shared rather than copied.
pub use crate::plan::hotspot::{hotspots, volume, Assessment};

/// The volume of a host: how loaded it is, for "least loaded host" choices.
pub fn host_volume(s: &Scenario, host: &str) -> f64 {
    s.host(host).map_or(f64::INFINITY, |h| {
        #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
        let mem_pct = s.committed_mib(host) as f64 / h.memory_mib as f64 * 100.0;
        volume(h.cpu_pct, mem_pct, h.nic_pct)
    })
}

/// How a VM's traffic splits by where its peers are.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficSplit {
    /// Traffic with peers on the VM's own host (IDC, "Is" in paper 004).
    pub idc_mbps: f64,
    /// Traffic through the physical NIC: flows to peers on other hosts plus what the matrix does not explain
    /// (clients outside the cluster). Equals Nso + Nsd for any destination.
    pub nic_mbps: f64,
    /// Traffic with peers, by the host they are on (own host excluded).
    pub by_host: BTreeMap<String, f64>,
}

pub fn traffic_split(s: &Scenario, vm: &Vm) -> TrafficSplit {
    let placement = s.placement();
    let mut idc = 0.0;
    let mut cross = 0.0;
    let mut by_host = BTreeMap::new();
    for (peer, mbps) in s.peers(&vm.name) {
        let h = placement.get(peer).copied().unwrap_or_default();
        if h == vm.host {
            idc += mbps;
        } else {
            cross += mbps;
            *by_host.entry(h.to_owned()).or_insert(0.0) += mbps;
        }
    }
    TrafficSplit {
        idc_mbps: idc,
        nic_mbps: vm.nic_mbps.max(cross),
        by_host,
    }
}

/// The VM's resident memory as a share of its host's memory, in percent: what moving it frees on the host.
pub fn resident_pct(s: &Scenario, vm: &Vm) -> f64 {
    #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
    s.host(&vm.host).map_or(0.0, |h| {
        vm.memory_mib as f64 * vm.memory_pct / 100.0 / h.memory_mib as f64 * 100.0
    })
}

/// Hosts other than the VM's own that have room for it, with the projected scenarios.
pub fn destinations(s: &Scenario, vm: &Vm) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut why_not = Vec::new();
    for h in s.hosts.iter().filter(|h| h.name != vm.host) {
        match room(s, &vm.name, &h.name) {
            Ok(_) => ok.push(h.name.clone()),
            Err(e) => why_not.push(e),
        }
    }
    (ok, why_not)
}

/// Whether `to` can take `vm`: it is another host, not a hotspot itself, and after the move (by the load-move model)
/// its CPU and NIC stay at or under the thresholds, its memory fits, and no host goes past its physical capacity
/// (a VM leaving can turn IDC into NIC traffic on the source). Returns the projected scenario, or why not.
pub fn room(s: &Scenario, vm: &str, to: &str) -> Result<Scenario, String> {
    let v = s
        .vm(vm)
        .ok_or_else(|| format!("{vm} is not in the scenario"))?;
    let h = s
        .host(to)
        .ok_or_else(|| format!("{to} is not in the scenario"))?;
    if v.host == to {
        return Err(format!("{vm} is already on {to}"));
    }
    if Assessment::of(h, &s.tuning).is_hotspot() {
        return Err(format!("{to} is a hotspot"));
    }
    let p = model::project(s, vm, to);
    let d = p.host(to).expect("destination in projection");
    let t = &s.tuning;
    if p.committed_mib(to) > d.memory_mib {
        return Err(format!(
            "{to} has {} MiB free, {vm} needs {} MiB",
            s.free_mib(to),
            v.memory_mib
        ));
    }
    if d.cpu_pct > t.cpu_threshold_pct {
        return Err(format!("{to} would reach {:.1}% CPU", d.cpu_pct));
    }
    if d.nic_pct > t.nic_threshold_pct {
        return Err(format!("{to} would reach {:.1}% NIC", d.nic_pct));
    }
    if let Some(over) = model::newly_over_capacity(s, &p) {
        return Err(format!("{over} would exceed its capacity"));
    }
    Ok(p)
}

/// Paper 004's answer to a memory overload before any migration: raise the balloon target of the VM that swaps most
/// by one fixed step (clipped to its maximum), as long as the host has that much memory free. Returns why not when
/// no VM on the host can grow.
pub fn balloon_step(s: &Scenario, a: &Assessment) -> Result<Decision, String> {
    let host = a.host.as_str();
    let step = s.tuning.balloon_step_mib;
    let free = s.free_mib(host);
    let mut growable: Vec<_> = s
        .vms_on(host)
        .filter_map(|v| {
            let max = v.memory_max_mib?;
            let to = (v.memory_mib + step).min(max);
            (to > v.memory_mib && to - v.memory_mib <= free).then_some((v, to))
        })
        .collect();
    // The guest that swaps most is the one short of memory; among equals, the fuller one.
    growable.sort_by(|(a, _), (b, _)| {
        b.swap_writes_per_s
            .total_cmp(&a.swap_writes_per_s)
            .then_with(|| b.memory_pct.total_cmp(&a.memory_pct))
            .then_with(|| a.name.cmp(&b.name))
    });
    match growable.first() {
        Some((v, to)) => Ok(Decision::Balloon {
            vm: v.name.clone(),
            host: host.to_owned(),
            from_mib: v.memory_mib,
            to_mib: *to,
            reason: format!(
                "memory overload on {host}: {}; {} swaps most ({:.0} writes/s) and can grow, {free} MiB free \
                 on {host}, step {step} MiB, maximum {} MiB",
                a.describe(),
                v.name,
                v.swap_writes_per_s,
                v.memory_max_mib.unwrap_or(v.memory_mib)
            ),
        }),
        None => Err(format!(
            "no VM on {host} can grow its balloon ({free} MiB free, step {step} MiB, or every VM is at its maximum)"
        )),
    }
}
