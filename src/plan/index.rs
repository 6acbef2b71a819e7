//! Look-ups over a [`Scenario`] for the planners: names to positions, the VMs of each host, the flows of each VM
//! and the memory committed on each host. Built once per round in time and memory linear in the scenario, and kept
//! up to date as a round's decisions are applied, so that a round never scans the whole scenario inside a loop.
//! PURE; it decides nothing.
//!
//! Every answer is the one the scenario's own linear look-ups give ([`Scenario::host`], [`Scenario::vms_on`],
//! [`Scenario::peers`], [`Scenario::committed_mib`]) on a scenario that passes [`Scenario::validate`]: with unique
//! names, the first entry of a name is the only one.

use std::collections::HashMap;

use super::scenario::Scenario;

/// Host and VM positions by name: the first entry of each name, as [`Scenario::host`] and [`Scenario::vm`] find.
/// Borrows the names from the scenario it was built from; the positions hold for any copy of it.
pub(crate) struct Names<'a> {
    hosts: HashMap<&'a str, usize>,
    vms: HashMap<&'a str, usize>,
}

impl<'a> Names<'a> {
    pub(crate) fn new(s: &'a Scenario) -> Self {
        let mut hosts = HashMap::with_capacity(s.hosts.len());
        for (i, h) in s.hosts.iter().enumerate() {
            hosts.entry(h.name.as_str()).or_insert(i);
        }
        let mut vms = HashMap::with_capacity(s.vms.len());
        for (i, v) in s.vms.iter().enumerate() {
            vms.entry(v.name.as_str()).or_insert(i);
        }
        Names { hosts, vms }
    }

    pub(crate) fn host(&self, name: &str) -> Option<usize> {
        self.hosts.get(name).copied()
    }

    pub(crate) fn vm(&self, name: &str) -> Option<usize> {
        self.vms.get(name).copied()
    }
}

/// One flow of a VM, seen from that VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Peer {
    /// The VM at the other end; `None` when the scenario does not list it (never in a validated scenario).
    pub vm: Option<usize>,
    pub mbps: f64,
}

/// Placement and traffic by position. The placement parts ([`Index::host_of`], [`Index::on_host`],
/// [`Index::committed_mib`]) follow the decisions applied through [`Index::moved`] and [`Index::resized`].
#[derive(Debug, Clone)]
pub(crate) struct Index {
    vm_host: Vec<Option<usize>>,
    on_host: Vec<Vec<usize>>,
    peers: Vec<Vec<Peer>>,
    committed_mib: Vec<u64>,
}

impl Index {
    pub(crate) fn new(s: &Scenario, names: &Names) -> Self {
        let vm_host: Vec<Option<usize>> = s.vms.iter().map(|v| names.host(&v.host)).collect();
        let mut on_host = vec![Vec::new(); s.hosts.len()];
        let mut committed_mib: Vec<u64> = s.hosts.iter().map(|h| h.memory_reserved_mib).collect();
        for (i, h) in vm_host.iter().enumerate() {
            if let Some(h) = *h {
                on_host[h].push(i);
                committed_mib[h] += s.vms[i].memory_mib;
            }
        }
        // (peer name, peer) per VM, in traffic order, then sorted by peer name as `Scenario::peers` sorts: stably,
        // so that sums over them do not depend on the order the scenario lists its traffic in.
        let mut named: Vec<Vec<(&str, Peer)>> = vec![Vec::new(); s.vms.len()];
        for f in &s.traffic {
            let (a, b) = (names.vm(&f.a), names.vm(&f.b));
            if let Some(a) = a {
                named[a].push((
                    &f.b,
                    Peer {
                        vm: b,
                        mbps: f.mbps,
                    },
                ));
            }
            if let Some(b) = b.filter(|_| f.a != f.b) {
                named[b].push((
                    &f.a,
                    Peer {
                        vm: a,
                        mbps: f.mbps,
                    },
                ));
            }
        }
        let peers = named
            .into_iter()
            .map(|mut list| {
                list.sort_by(|x, y| x.0.cmp(y.0));
                list.into_iter().map(|(_, p)| p).collect()
            })
            .collect();
        Index {
            vm_host,
            on_host,
            peers,
            committed_mib,
        }
    }

    /// The host VM `vm` is on; `None` when its host is not in the scenario (never in a validated scenario).
    pub(crate) fn host_of(&self, vm: usize) -> Option<usize> {
        self.vm_host[vm]
    }

    /// The VMs on `host`, in scenario order.
    pub(crate) fn on_host(&self, host: usize) -> &[usize] {
        &self.on_host[host]
    }

    /// Every flow of `vm`, sorted by the peer's name.
    pub(crate) fn peers(&self, vm: usize) -> &[Peer] {
        &self.peers[vm]
    }

    /// The host's reserve plus the memory of its VMs.
    pub(crate) fn committed_mib(&self, host: usize) -> u64 {
        self.committed_mib[host]
    }

    /// Records that `vm`, of `memory_mib`, moved from its host to `to`.
    pub(crate) fn moved(&mut self, vm: usize, memory_mib: u64, to: usize) {
        if let Some(from) = self.vm_host[vm] {
            self.on_host[from].retain(|&v| v != vm);
            self.committed_mib[from] -= memory_mib;
        }
        let list = &mut self.on_host[to];
        let at = list.partition_point(|&v| v < vm);
        list.insert(at, vm);
        self.committed_mib[to] += memory_mib;
        self.vm_host[vm] = Some(to);
    }

    /// Records that `vm`'s memory changed from `from_mib` to `to_mib`.
    pub(crate) fn resized(&mut self, vm: usize, from_mib: u64, to_mib: u64) {
        if let Some(h) = self.vm_host[vm] {
            self.committed_mib[h] = self.committed_mib[h] - from_mib + to_mib;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::scenario::{Flow, History, Host, Tuning, Vm};

    fn scenario() -> Scenario {
        let host = |name: &str, reserved| Host {
            name: name.into(),
            cpus: 2,
            memory_mib: 4096,
            nic_mbps: 1000.0,
            cpu_pct: 0.0,
            swap_writes_per_s: 0.0,
            nic_pct: 0.0,
            memory_reserved_mib: reserved,
            history: History::default(),
        };
        let vm = |name: &str, host: &str, memory_mib| Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: 0.0,
            memory_mib,
            memory_pct: 0.0,
            nic_mbps: 0.0,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        };
        let flow = |a: &str, b: &str, mbps| Flow {
            a: a.into(),
            b: b.into(),
            mbps,
        };
        Scenario {
            description: None,
            hosts: vec![host("h1", 100), host("h2", 0)],
            vms: vec![vm("c", "h2", 10), vm("a", "h1", 20), vm("b", "h2", 40)],
            traffic: vec![
                flow("c", "b", 1.0),
                flow("a", "c", 2.0),
                flow("b", "a", 3.0),
            ],
            tuning: Tuning::default(),
        }
    }

    #[test]
    fn answers_as_the_scenario_does() {
        let s = scenario();
        let names = Names::new(&s);
        let ix = Index::new(&s, &names);
        for (h, host) in s.hosts.iter().enumerate() {
            assert_eq!(names.host(&host.name), Some(h));
            let on: Vec<&str> = ix
                .on_host(h)
                .iter()
                .map(|&v| s.vms[v].name.as_str())
                .collect();
            let want: Vec<&str> = s.vms_on(&host.name).map(|v| v.name.as_str()).collect();
            assert_eq!(on, want);
            assert_eq!(ix.committed_mib(h), s.committed_mib(&host.name));
        }
        for (v, vm) in s.vms.iter().enumerate() {
            let got: Vec<(&str, f64)> = ix
                .peers(v)
                .iter()
                .map(|p| (s.vms[p.vm.unwrap()].name.as_str(), p.mbps))
                .collect();
            assert_eq!(got, s.peers(&vm.name), "{}", vm.name);
        }
    }

    #[test]
    fn follows_moves_and_balloons() {
        let mut s = scenario();
        let names = Names::new(&s);
        let mut ix = Index::new(&s, &names);
        // c (index 0) moves to h1, where it comes before a (index 1) in scenario order.
        ix.moved(0, 10, 0);
        ix.resized(2, 40, 64);
        s.vms[0].host = "h1".into();
        s.vms[2].memory_mib = 64;
        assert_eq!(ix.on_host(0), [0, 1]);
        assert_eq!(ix.on_host(1), [2]);
        assert_eq!(ix.host_of(0), Some(0));
        assert_eq!(ix.committed_mib(0), s.committed_mib("h1"));
        assert_eq!(ix.committed_mib(1), s.committed_mib("h2"));
    }
}
