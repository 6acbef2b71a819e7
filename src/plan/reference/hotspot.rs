//! REFERENCE COPY, test-only: src/plan/hotspot.rs as it was before the scale work (issue 11), verbatim but for this
//! line and its unit tests. See [`super`]; do not optimise.
//!
//! Hotspot detection and the steps shared by the idc and sandpiper policies (paper 004): the AR(1) prediction, the
//! overload flags, the balloon step that answers a memory overload before any migration, and the test that a
//! destination has room. Pure: figures in, verdicts out.

use std::collections::BTreeMap;

use super::model;
use super::scenario::{Host, Scenario, Tuning, Vm};
use super::Decision;

/// Predicts the next sample with an AR(1) model fitted to `history` followed by `current`:
/// `u_{k+1} = μ + φ (u_k − μ)`, μ the mean of the series and φ its lag-1 autocorrelation (clamped to [-1, 1]);
/// the current figure while the series is too short to correlate.
pub fn ar1_predict(history: &[f64], current: f64) -> f64 {
    let mut series = history.to_vec();
    series.push(current);
    crate::stats::history::ar1_next(&series).unwrap_or(current)
}

/// One figure of a host against its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub now: f64,
    pub predicted: f64,
    pub threshold: f64,
}

impl Reading {
    fn new(history: &[f64], now: f64, threshold: f64) -> Self {
        Reading {
            now,
            predicted: ar1_predict(history, now),
            threshold,
        }
    }

    /// Paper 004: a sudden peak is not a hotspot; both the current and the predicted figure must exceed the
    /// threshold.
    pub fn over(&self) -> bool {
        self.now > self.threshold && self.predicted > self.threshold
    }
}

/// A host's three readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub host: String,
    pub cpu: Reading,
    pub swap: Reading,
    pub nic: Reading,
}

impl Assessment {
    pub fn of(h: &Host, t: &Tuning) -> Self {
        Assessment {
            host: h.name.clone(),
            cpu: Reading::new(&h.history.cpu_pct, h.cpu_pct, t.cpu_threshold_pct),
            swap: Reading::new(
                &h.history.swap_writes_per_s,
                h.swap_writes_per_s,
                t.swap_threshold_writes_per_s,
            ),
            nic: Reading::new(&h.history.nic_pct, h.nic_pct, t.nic_threshold_pct),
        }
    }

    pub fn is_hotspot(&self) -> bool {
        self.cpu.over() || self.swap.over() || self.nic.over()
    }

    /// How far past its threshold the worst overloaded figure is; the worst hotspot is handled first.
    fn severity(&self) -> f64 {
        [self.cpu, self.swap, self.nic]
            .iter()
            .filter(|r| r.over())
            .map(|r| {
                if r.threshold > 0.0 {
                    r.now / r.threshold
                } else {
                    f64::INFINITY
                }
            })
            .fold(0.0, f64::max)
    }

    /// "CPU 95.0% (predicted 94.1%, threshold 85%)" for each overloaded figure.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |what: &str, unit: &str, r: &Reading| {
            if r.over() {
                parts.push(format!(
                    "{what} {:.1}{unit} (predicted {:.1}{unit}, threshold {}{unit})",
                    r.now, r.predicted, r.threshold
                ));
            }
        };
        add("CPU", "%", &self.cpu);
        add("swap", " writes/s", &self.swap);
        add("NIC", "%", &self.nic);
        parts.join(", ")
    }
}

/// The hotspots of `s`, worst first (ties by name, so the order does not depend on the input's order).
pub fn hotspots(s: &Scenario) -> Vec<Assessment> {
    let mut hot: Vec<Assessment> = s
        .hosts
        .iter()
        .map(|h| Assessment::of(h, &s.tuning))
        .filter(Assessment::is_hotspot)
        .collect();
    hot.sort_by(|a, b| {
        b.severity()
            .total_cmp(&a.severity())
            .then_with(|| a.host.cmp(&b.host))
    });
    hot
}

/// Sandpiper's volume `1 / ((1 − cpu)(1 − mem)(1 − net))` from utilisations in percent. Each term is capped at 99 %
/// so that a saturated resource gives a large volume instead of a division by zero.
pub fn volume(cpu_pct: f64, mem_pct: f64, net_pct: f64) -> f64 {
    let free = |pct: f64| 1.0 - (pct / 100.0).clamp(0.0, 0.99);
    1.0 / (free(cpu_pct) * free(mem_pct) * free(net_pct))
}

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
