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

use super::index::Index;
use super::scenario::{Host, Scenario};

/// One flow of a moving VM: the peer's position, its host's, and the Mbps.
pub(crate) type PeerFlow = (usize, usize, f64);

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
    if s.vms[vi].host == to {
        return;
    }
    let si = host_index(s, &s.vms[vi].host);
    let di = host_index(s, to);
    let flows: Vec<PeerFlow> = s
        .peers(vm)
        .into_iter()
        .map(|(peer, mbps)| {
            let pi = s
                .vms
                .iter()
                .position(|v| v.name == peer)
                .expect("peer in scenario");
            (pi, host_index(s, &s.vms[pi].host), mbps)
        })
        .collect();
    migrate_at(s, vi, si, di, &flows);
}

fn host_index(s: &Scenario, name: &str) -> usize {
    s.hosts
        .iter()
        .position(|h| h.name == name)
        .expect("host in scenario")
}

/// The flows of VM `vm` as [`migrate_at`] takes them, from the index.
///
/// # Panics
/// If a peer or its host is not in the scenario (never in a validated one).
pub(crate) fn peer_flows(ix: &Index, vm: usize) -> Vec<PeerFlow> {
    ix.peers(vm)
        .iter()
        .map(|p| {
            let pi = p.vm.expect("peer in scenario");
            (pi, ix.host_of(pi).expect("host in scenario"), p.mbps)
        })
        .collect()
}

/// [`migrate`] by position: moves VM `vi` from host `si` to host `di`; `flows` are its flows sorted by peer name, as
/// [`Scenario::peers`] lists them, with where the peers are.
pub(crate) fn migrate_at(s: &mut Scenario, vi: usize, si: usize, di: usize, flows: &[PeerFlow]) {
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
    let mut cross_before = 0.0;
    let mut cross_after = 0.0;
    for &(pi, ph, mbps) in flows {
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
        h.nic_pct = nic_after(h, d);
    }

    s.vms[vi].host.clone_from(&s.hosts[di].name);
}

/// A host's NIC utilisation once `delta_mbps` more (or less) crosses it.
fn nic_after(h: &Host, delta_mbps: f64) -> f64 {
    (h.nic_pct + delta_mbps / h.nic_mbps * 100.0).max(0.0)
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

/// The figures of a host that physical capacity is judged on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    pub cpu_pct: f64,
    pub nic_pct: f64,
    pub committed_mib: u64,
}

impl Load {
    /// Host `h` as `s` and `ix` have it now.
    pub(crate) fn now(s: &Scenario, ix: &Index, h: usize) -> Load {
        let host = &s.hosts[h];
        Load {
            cpu_pct: host.cpu_pct,
            nic_pct: host.nic_pct,
            committed_mib: ix.committed_mib(h),
        }
    }

    /// CPU and NIC at most 100 %, memory committed at most the host's memory. A small tolerance absorbs rounding in
    /// the scaled CPU figures.
    pub(crate) fn within(&self, h: &Host) -> bool {
        const EPS: f64 = 1e-9;
        self.cpu_pct <= 100.0 + EPS
            && self.nic_pct <= 100.0 + EPS
            && self.committed_mib <= h.memory_mib
    }
}

/// Whether every host in `s` is within its physical capacity: CPU and NIC at most 100 %, memory committed at most
/// the host's memory. A small tolerance absorbs rounding in the scaled CPU figures.
pub fn within_capacity(s: &Scenario, host: &str) -> bool {
    s.host(host).is_some_and(|h| {
        Load {
            cpu_pct: h.cpu_pct,
            nic_pct: h.nic_pct,
            committed_mib: s.committed_mib(host),
        }
        .within(h)
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

/// A VM about to leave its host, with the arithmetic of [`migrate_at`] done once for any destination, so that
/// trying every host costs a few operations each instead of a projected copy of the scenario.
///
/// Only the source's and the destination's figures change: a flow with a peer on a third host crosses that host's
/// NIC before and after the move, and its delta there is `0 − mbps + mbps`, exactly 0. The deltas of the source and
/// the destination are summed flow by flow in the order [`migrate_at`] sums them, so the projected figures are the
/// same numbers to the last bit.
#[derive(Debug, Clone)]
pub(crate) struct Leaving {
    from: usize,
    cpu_pct: f64,
    memory_mib: u64,
    /// (peer's host, Mbps), sorted by peer name as [`Index::peers`] gives them.
    flows: Vec<(usize, f64)>,
    /// The hosts holding a peer, sorted: the destinations where the deltas must be summed again.
    peer_hosts: Vec<usize>,
    external_mbps: f64,
    /// The source's and the destination's NIC deltas (Mbps) for a destination without peers.
    src_delta_mbps: f64,
    dst_delta_mbps: f64,
}

impl Leaving {
    /// VM `vm` leaving the host `ix` places it on.
    ///
    /// # Panics
    /// If the VM, a peer of it, or their host is not in the scenario (never in a validated one).
    pub(crate) fn new(s: &Scenario, ix: &Index, vm: usize) -> Leaving {
        let from = ix.host_of(vm).expect("vm's host in scenario");
        let flows: Vec<(usize, f64)> = peer_flows(ix, vm)
            .into_iter()
            .map(|(_, ph, mbps)| (ph, mbps))
            .collect();
        let mut peer_hosts: Vec<usize> = flows.iter().map(|&(h, _)| h).collect();
        peer_hosts.sort_unstable();
        peer_hosts.dedup();
        let mut cross_before = 0.0;
        for &(ph, mbps) in &flows {
            if ph != from {
                cross_before += mbps;
            }
        }
        let external_mbps = (s.vms[vm].nic_mbps - cross_before).max(0.0);
        let mut leaving = Leaving {
            from,
            cpu_pct: s.vms[vm].cpu_pct,
            memory_mib: s.vms[vm].memory_mib,
            flows,
            peer_hosts,
            external_mbps,
            src_delta_mbps: 0.0,
            dst_delta_mbps: 0.0,
        };
        // No host is `usize::MAX`, so this is the destination without peers.
        (leaving.src_delta_mbps, leaving.dst_delta_mbps) = leaving.deltas(usize::MAX);
        leaving
    }

    /// The host it leaves.
    pub(crate) fn from(&self) -> usize {
        self.from
    }

    /// The NIC deltas of the source and of destination `di`, summed as [`migrate_at`] sums them.
    fn deltas(&self, di: usize) -> (f64, f64) {
        let (si, mut src, mut dst) = (self.from, 0.0, 0.0);
        for &(ph, mbps) in &self.flows {
            if ph != si {
                src -= mbps;
                if ph == di {
                    dst -= mbps;
                }
            }
            if ph != di {
                dst += mbps;
                if ph == si {
                    src += mbps;
                }
            }
        }
        (src - self.external_mbps, dst + self.external_mbps)
    }

    /// The NIC deltas for destination `di`: the precomputed ones unless a peer lives there.
    fn deltas_to(&self, di: usize) -> (f64, f64) {
        if self.peer_hosts.binary_search(&di).is_ok() {
            self.deltas(di)
        } else {
            (self.src_delta_mbps, self.dst_delta_mbps)
        }
    }

    /// Destination `di`'s figures after the move (`di` is not the source).
    pub(crate) fn arriving(&self, s: &Scenario, ix: &Index, di: usize) -> Load {
        Load {
            cpu_pct: self.cpu_on(s, di),
            nic_pct: self.nic_on(s, di),
            committed_mib: self.committed_on(ix, di),
        }
    }

    // The destination's figures one by one, for checks that stop at the first that fails.

    pub(crate) fn cpu_on(&self, s: &Scenario, di: usize) -> f64 {
        let (src, dst) = (&s.hosts[self.from], &s.hosts[di]);
        dst.cpu_pct + self.cpu_pct * f64::from(src.cpus) / f64::from(dst.cpus)
    }

    pub(crate) fn nic_on(&self, s: &Scenario, di: usize) -> f64 {
        nic_after(&s.hosts[di], self.deltas_to(di).1)
    }

    pub(crate) fn committed_on(&self, ix: &Index, di: usize) -> u64 {
        ix.committed_mib(di) + self.memory_mib
    }

    /// The source's figures after a move to `di`.
    fn departed(&self, s: &Scenario, ix: &Index, di: usize) -> Load {
        let src = &s.hosts[self.from];
        Load {
            cpu_pct: (src.cpu_pct - self.cpu_pct).max(0.0),
            nic_pct: nic_after(src, self.deltas_to(di).0),
            committed_mib: ix.committed_mib(self.from) - self.memory_mib,
        }
    }

    /// Whether the move to `di`, which leaves `di` at `arriving`, pushes its source or `di` past physical capacity
    /// when it was within it ([`newly_over_capacity`] on the projected scenario; no other host's figures change).
    pub(crate) fn pushes_past_capacity(
        &self,
        s: &Scenario,
        ix: &Index,
        di: usize,
        arriving: Load,
    ) -> bool {
        let pushed = |h: usize, after: Load| {
            let host = &s.hosts[h];
            Load::now(s, ix, h).within(host) && !after.within(host)
        };
        pushed(di, arriving) || pushed(self.from, self.departed(s, ix, di))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::scenario::{Flow, History, Host, Tuning, Vm};

    fn host(name: &str, cpus: u32, cpu: f64, nic: f64) -> Host {
        Host {
            name: name.into(),
            cpus,
            memory_mib: 4096,
            nic_mbps: 1000.0,
            cpu_pct: cpu,
            swap_writes_per_s: 0.0,
            nic_pct: nic,
            memory_reserved_mib: 0,
            history: History::default(),
        }
    }

    fn vm(name: &str, host: &str, cpu: f64, nic: f64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: cpu,
            memory_mib: 512,
            memory_pct: 50.0,
            nic_mbps: nic,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        }
    }

    fn two_pairs() -> Scenario {
        // a and b talk over IDC on h1; a also talks to c on h2 (200 Mbps) and to clients (50 Mbps).
        Scenario {
            description: None,
            hosts: vec![
                host("h1", 4, 60.0, 25.0),
                host("h2", 2, 20.0, 20.0),
                host("h3", 4, 10.0, 0.0),
            ],
            vms: vec![
                vm("a", "h1", 30.0, 250.0),
                vm("b", "h1", 10.0, 0.0),
                vm("c", "h2", 10.0, 200.0),
            ],
            traffic: vec![
                Flow {
                    a: "a".into(),
                    b: "b".into(),
                    mbps: 100.0,
                },
                Flow {
                    a: "c".into(),
                    b: "a".into(),
                    mbps: 200.0,
                },
            ],
            tuning: Tuning::default(),
        }
    }

    #[test]
    fn moves_follow_the_documented_model() {
        struct Case {
            to: &'static str,
            // cpu of h1, h2, h3 after; nic of h1, h2, h3 after; nic of a, b, c after
            cpu: [f64; 3],
            nic: [f64; 3],
            vm_nic: [f64; 3],
        }
        let cases = [
            // To h2 (2 CPUs): 30 points on 4 CPUs weigh 60 on 2. a-b becomes NIC traffic (100 Mbps on h1 and h2),
            // a-c becomes IDC (h2 loses 200), the 50 Mbps of clients move to h2.
            Case {
                to: "h2",
                cpu: [30.0, 80.0, 10.0],
                nic: [10.0, 15.0, 0.0],
                vm_nic: [150.0, 100.0, 0.0],
            },
            // To h3: a-b and a-c both cross h3's NIC; h1 keeps a-b's 100 Mbps, h2 keeps a-c.
            Case {
                to: "h3",
                cpu: [30.0, 20.0, 40.0],
                nic: [10.0, 20.0, 35.0],
                vm_nic: [350.0, 100.0, 200.0],
            },
        ];
        for c in cases {
            let p = project(&two_pairs(), "a", c.to);
            let cpu: Vec<f64> = p.hosts.iter().map(|h| h.cpu_pct).collect();
            let nic: Vec<f64> = p.hosts.iter().map(|h| h.nic_pct).collect();
            let vm_nic: Vec<f64> = p.vms.iter().map(|v| v.nic_mbps).collect();
            let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
            assert!(close(&cpu, &c.cpu), "cpu to {}: {cpu:?}", c.to);
            assert!(close(&nic, &c.nic), "nic to {}: {nic:?}", c.to);
            assert!(close(&vm_nic, &c.vm_nic), "vm nic to {}: {vm_nic:?}", c.to);
            assert_eq!(p.vm("a").unwrap().host, c.to);
        }
    }

    #[test]
    fn source_cpu_never_goes_negative() {
        let mut s = two_pairs();
        s.vms[0].cpu_pct = 90.0;
        migrate(&mut s, "a", "h3");
        assert_eq!(s.hosts[0].cpu_pct, 0.0);
    }
}
