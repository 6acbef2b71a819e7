//! Hotspot detection and the steps shared by the idc and sandpiper policies (paper 004): the AR(1) prediction, the
//! overload flags, the balloon step that answers a memory overload before any migration, and the test that a
//! destination has room. Pure: figures in, verdicts out. The round that strings them together is in `round.rs`.

use std::collections::BTreeMap;

use super::index::{Index, Names};
use super::model::{Leaving, Load};
use super::round::Work;
use super::scenario::{Host, Scenario, Tuning, Vm};
use super::Decision;

/// Predicts the next sample with an AR(1) model fitted to `history` followed by `current`:
/// `u_{k+1} = μ + φ (u_k − μ)`, μ the mean of the series and φ its lag-1 autocorrelation (clamped to [-1, 1]);
/// the current figure while the series is too short to correlate.
pub fn ar1_predict(history: &[f64], current: f64) -> f64 {
    let mut series = history.to_vec();
    series.push(current);
    super::ar1::ar1_next(&series).unwrap_or(current)
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
    s.host(host)
        .map_or(f64::INFINITY, |h| volume_of(h, s.committed_mib(host)))
}

/// [`host_volume`] of host `h` by position.
pub(crate) fn host_volume_at(s: &Scenario, ix: &Index, h: usize) -> f64 {
    volume_of(&s.hosts[h], ix.committed_mib(h))
}

fn volume_of(h: &Host, committed_mib: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
    let mem_pct = committed_mib as f64 / h.memory_mib as f64 * 100.0;
    volume(h.cpu_pct, mem_pct, h.nic_pct)
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

/// # Panics
/// If `vm` is not in `s`.
pub fn traffic_split(s: &Scenario, vm: &Vm) -> TrafficSplit {
    let names = Names::new(s);
    let vi = names.vm(&vm.name).expect("vm in scenario");
    traffic_split_at(s, &Index::new(s, &names), vi)
}

/// [`traffic_split`] of VM `vm` by position. The sums run over the peers in name order, as
/// [`Scenario::peers`] lists them.
pub(crate) fn traffic_split_at(s: &Scenario, ix: &Index, vm: usize) -> TrafficSplit {
    let own = ix.host_of(vm);
    let mut idc = 0.0;
    let mut cross = 0.0;
    let mut by_host = BTreeMap::new();
    for p in ix.peers(vm) {
        let h = p.vm.and_then(|pv| ix.host_of(pv));
        if h == own {
            idc += p.mbps;
        } else {
            cross += p.mbps;
            let name = h.map_or("", |h| s.hosts[h].name.as_str());
            *by_host.entry(name.to_owned()).or_insert(0.0) += p.mbps;
        }
    }
    TrafficSplit {
        idc_mbps: idc,
        nic_mbps: s.vms[vm].nic_mbps.max(cross),
        by_host,
    }
}

/// The VM's resident memory as a share of its host's memory, in percent: what moving it frees on the host.
pub fn resident_pct(s: &Scenario, vm: &Vm) -> f64 {
    s.host(&vm.host).map_or(0.0, |h| resident_pct_on(vm, h))
}

/// [`resident_pct`] of VM `vm` by position.
pub(crate) fn resident_pct_at(s: &Scenario, ix: &Index, vm: usize) -> f64 {
    ix.host_of(vm)
        .map_or(0.0, |h| resident_pct_on(&s.vms[vm], &s.hosts[h]))
}

fn resident_pct_on(vm: &Vm, h: &Host) -> f64 {
    #[allow(clippy::cast_precision_loss)] // MiB counts are far below 2^52
    let pct = vm.memory_mib as f64 * vm.memory_pct / 100.0 / h.memory_mib as f64 * 100.0;
    pct
}

/// Why a host cannot take a VM (see [`room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// The VM runs there.
    OwnHost,
    /// The host is a hotspot itself.
    Hotspot,
    /// The VM's memory does not fit.
    Memory,
    /// Its CPU would pass the threshold.
    Cpu,
    /// Its NIC would pass the threshold.
    Nic,
    /// The move would push the source or the destination past physical capacity (a VM leaving can turn IDC into NIC
    /// traffic on the source).
    Capacity,
}

/// Whether host `to` can take the VM `leaving` describes, in the round's figures: it is another host, not a
/// hotspot itself, and after the move (by the load-move model) its CPU and NIC stay at or under the thresholds, its
/// memory fits, and no host goes past its physical capacity.
pub(crate) fn room(w: &Work, leaving: &Leaving, to: usize) -> Result<(), NoRoom> {
    if to == leaving.from() {
        return Err(NoRoom::OwnHost);
    }
    if w.hot[to] {
        return Err(NoRoom::Hotspot);
    }
    // Cheapest first: most hosts are refused before the NIC delta is worked out.
    let t = &w.s.tuning;
    let committed_mib = leaving.committed_on(&w.ix, to);
    if committed_mib > w.s.hosts[to].memory_mib {
        return Err(NoRoom::Memory);
    }
    let cpu_pct = leaving.cpu_on(&w.s, to);
    if cpu_pct > t.cpu_threshold_pct {
        return Err(NoRoom::Cpu);
    }
    let nic_pct = leaving.nic_on(&w.s, to);
    if nic_pct > t.nic_threshold_pct {
        return Err(NoRoom::Nic);
    }
    let after = Load {
        cpu_pct,
        nic_pct,
        committed_mib,
    };
    if leaving.pushes_past_capacity(&w.s, &w.ix, to, after) {
        return Err(NoRoom::Capacity);
    }
    Ok(())
}

/// The hosts other than VM `vm`'s own that have room for it, in scenario order.
pub(crate) fn destinations(w: &Work, vm: usize) -> Vec<usize> {
    let leaving = Leaving::new(&w.s, &w.ix, vm);
    (0..w.s.hosts.len())
        .filter(|&h| room(w, &leaving, h).is_ok())
        .collect()
}

/// Paper 004's answer to a memory overload before any migration: raise the balloon target of the VM that swaps most
/// by one fixed step (clipped to its maximum), as long as the host has that much memory free. Returns the decision
/// with the VM's position and its new target, or why not when no VM on the host can grow.
pub(crate) fn balloon_step(
    w: &Work,
    host: usize,
    a: &Assessment,
) -> Result<(Decision, usize, u64), String> {
    let s = &w.s;
    let name = a.host.as_str();
    let step = s.tuning.balloon_step_mib;
    let free = s.hosts[host]
        .memory_mib
        .saturating_sub(w.ix.committed_mib(host));
    let mut growable: Vec<(usize, u64)> =
        w.ix.on_host(host)
            .iter()
            .filter_map(|&vi| {
                let v = &s.vms[vi];
                let max = v.memory_max_mib?;
                let to = (v.memory_mib + step).min(max);
                (to > v.memory_mib && to - v.memory_mib <= free).then_some((vi, to))
            })
            .collect();
    // The guest that swaps most is the one short of memory; among equals, the fuller one.
    growable.sort_by(|&(a, _), &(b, _)| {
        let (a, b) = (&s.vms[a], &s.vms[b]);
        b.swap_writes_per_s
            .total_cmp(&a.swap_writes_per_s)
            .then_with(|| b.memory_pct.total_cmp(&a.memory_pct))
            .then_with(|| a.name.cmp(&b.name))
    });
    match growable.first() {
        Some(&(vi, to)) => {
            let v = &s.vms[vi];
            let d = Decision::Balloon {
                vm: v.name.clone(),
                host: name.to_owned(),
                from_mib: v.memory_mib,
                to_mib: to,
                reason: format!(
                    "memory overload on {name}: {}; {} swaps most ({:.0} writes/s) and can grow, {free} MiB free \
                     on {name}, step {step} MiB, maximum {} MiB",
                    a.describe(),
                    v.name,
                    v.swap_writes_per_s,
                    v.memory_max_mib.unwrap_or(v.memory_mib)
                ),
            };
            Ok((d, vi, to))
        }
        None => Err(format!(
            "no VM on {name} can grow its balloon ({free} MiB free, step {step} MiB, or every VM is at its maximum)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ar1_prediction() {
        let cases: &[(&[f64], f64, f64)] = &[
            // no history or too little: the current figure
            (&[], 90.0, 90.0),
            (&[70.0], 90.0, 90.0),
            // flat: the current figure
            (&[90.0, 90.0], 90.0, 90.0),
            // alternating series: φ is negative, the prediction swings back under the mean
            (&[80.0, 100.0, 80.0], 100.0, 82.5),
            // a single spike after a calm history: φ is near 0, the prediction stays near the mean
            (&[50.0, 50.0, 50.0], 98.0, 59.0),
        ];
        for (history, now, want) in cases {
            let got = ar1_predict(history, *now);
            assert!(
                (got - want).abs() < 1e-9,
                "{history:?} then {now}: got {got}, want {want}"
            );
        }
    }

    #[test]
    fn a_spike_is_not_a_hotspot() {
        let spike = Reading::new(&[50.0, 50.0, 50.0], 98.0, 85.0);
        assert!(!spike.over());
        let sustained = Reading::new(&[92.0, 95.0, 93.0], 96.0, 85.0);
        assert!(sustained.over(), "{sustained:?}");
    }

    #[test]
    fn volume_grows_with_each_resource() {
        assert_eq!(volume(0.0, 0.0, 0.0), 1.0);
        assert!((volume(50.0, 50.0, 0.0) - 4.0).abs() < 1e-12);
        assert!(volume(100.0, 0.0, 0.0).is_finite());
    }
}
