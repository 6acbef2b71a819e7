//! REFERENCE COPY, test-only: src/plan/model.rs as it was before the scale work (issue 11), verbatim but for this
//! line and its unit tests. See [`super`]; do not optimise.
//!
//! The load-move model: how a planned migration or balloon change alters host and VM figures. The policies use it
//! to check that a destination has room; the simulator uses it to carry a round's decisions into the next round.
//! Pure arithmetic on a `Scenario`; it decides nothing.
//!
//! The model (also in docs/policies/scenario-format.md):
//! - CPU: a VM's `cpu_pct` is in points of its host's utilisation. Moving it takes those points off the source and
//!   adds `cpu_pct × source cpus / destination cpus` to the destination (the same work on a smaller host weighs
//!   more). The source never drops below 0: measured tables (paper 000) list VMs whose figures add up to more than
//!   their host's.
//! - Memory: host memory in use is derived (reserve + the VMs' `memory_mib`), so it follows the VM exactly.
//! - Swap writes move with the VM: the guest that swaps keeps swapping wherever it runs.
//! - NIC: every flow of the VM is re-classified. A flow whose ends share a host is IDC and uses no NIC; otherwise it
//!   loads both ends' NICs. The VM's traffic that the matrix does not explain (`nic_mbps` minus its cross-host
//!   flows, clients outside the cluster) moves with it. Peers' `nic_mbps` change accordingly.
//! - Ballooning changes only the VM's `memory_mib`; its effect on swapping is not modelled, so a guest keeps its
//!   swap rate until fresh figures say otherwise.

use super::scenario::Scenario;

/// Moves `vm` to `to` and updates every figure the model covers. Values above capacity are kept as they are (not
/// clamped), so a bad plan shows up in the numbers instead of being hidden.
///
/// # Panics
/// If `vm` or `to` is not in the scenario; callers plan only with names taken from it.
pub fn migrate(s: &mut Scenario, vm: &str, to: &str) {
    let vi = s
        .vms
        .iter()
        .position(|v| v.name == vm)
        .expect("vm in scenario");
    let from = s.vms[vi].host.clone();
    if from == to {
        return;
    }
    let si = host_index(s, &from);
    let di = host_index(s, to);

    let cpu_src = s.vms[vi].cpu_pct;
    let cpu_dst = cpu_src * f64::from(s.hosts[si].cpus) / f64::from(s.hosts[di].cpus);
    s.hosts[si].cpu_pct = (s.hosts[si].cpu_pct - cpu_src).max(0.0);
    s.hosts[di].cpu_pct += cpu_dst;
    s.vms[vi].cpu_pct = cpu_dst;

    let swap = s.vms[vi].swap_writes_per_s;
    s.hosts[si].swap_writes_per_s = (s.hosts[si].swap_writes_per_s - swap).max(0.0);
    s.hosts[di].swap_writes_per_s += swap;

    // NIC deltas in Mbps per host index, applied at the end.
    let mut delta = vec![0.0_f64; s.hosts.len()];
    let flows: Vec<(String, f64)> = s
        .peers(vm)
        .into_iter()
        .map(|(p, mbps)| (p.to_owned(), mbps))
        .collect();
    let mut cross_before = 0.0;
    let mut cross_after = 0.0;
    for (peer, mbps) in &flows {
        let pi = s
            .vms
            .iter()
            .position(|v| &v.name == peer)
            .expect("peer in scenario");
        let ph = host_index(s, &s.vms[pi].host.clone());
        let before = ph != si;
        let after = ph != di;
        if before {
            delta[si] -= mbps;
            delta[ph] -= mbps;
            cross_before += mbps;
        }
        if after {
            delta[di] += mbps;
            delta[ph] += mbps;
            cross_after += mbps;
        }
        let change = f64::from(u8::from(after)) * mbps - f64::from(u8::from(before)) * mbps;
        s.vms[pi].nic_mbps = (s.vms[pi].nic_mbps + change).max(0.0);
    }
    let external = (s.vms[vi].nic_mbps - cross_before).max(0.0);
    delta[si] -= external;
    delta[di] += external;
    s.vms[vi].nic_mbps = external + cross_after;
    for (h, d) in s.hosts.iter_mut().zip(delta) {
        h.nic_pct = (h.nic_pct + d / h.nic_mbps * 100.0).max(0.0);
    }

    s.vms[vi].host = to.to_owned();
}

/// A copy of `s` with `vm` moved to `to`: what the destination would look like.
pub fn project(s: &Scenario, vm: &str, to: &str) -> Scenario {
    let mut p = s.clone();
    migrate(&mut p, vm, to);
    p
}

/// Sets the VM's balloon target.
pub fn balloon(s: &mut Scenario, vm: &str, to_mib: u64) {
    if let Some(v) = s.vms.iter_mut().find(|v| v.name == vm) {
        v.memory_mib = to_mib;
    }
}

fn host_index(s: &Scenario, name: &str) -> usize {
    s.hosts
        .iter()
        .position(|h| h.name == name)
        .expect("host in scenario")
}

/// Whether every host in `s` is within its physical capacity: CPU and NIC at most 100 %, memory committed at most
/// the host's memory. A small tolerance absorbs rounding in the scaled CPU figures.
pub fn within_capacity(s: &Scenario, host: &str) -> bool {
    const EPS: f64 = 1e-9;
    s.host(host).is_some_and(|h| {
        h.cpu_pct <= 100.0 + EPS
            && h.nic_pct <= 100.0 + EPS
            && s.committed_mib(host) <= h.memory_mib
    })
}

/// The first host that is within capacity in `before` but not in `after`. Hosts already past capacity (an
/// overcommitted source, say) are not held against a move that does not make them worse.
pub fn newly_over_capacity<'a>(before: &Scenario, after: &'a Scenario) -> Option<&'a str> {
    after
        .hosts
        .iter()
        .map(|h| h.name.as_str())
        .find(|h| within_capacity(before, h) && !within_capacity(after, h))
}
