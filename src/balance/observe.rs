//! PURE: what a balancing round sees of the cluster (every host's VMs as sampled), turned into the figures the
//! policies read (a [`Scenario`]), with the history they need kept from round to round: a window of host figures
//! for paper 000's windowed averages and paper 004's AR(1) prediction, and each guest's swap counter for its rate.
//!
//! The mapping (also in docs/balance.md):
//! - A VM's CPU is the sum of its vCPU threads' use, in % of one host CPU, divided by its host's physical CPUs
//!   (`capacity.cpus` in the inventory): points of the host's utilisation. A host's CPU is the sum over its VMs —
//!   the load a policy can move — capped at 100.
//! - Memory: a VM has what its balloon leaves it (its boot RAM without a balloon) and can grow back to its boot
//!   RAM when it has a balloon; its use is the guest's own figure (total − available), 100 % when unknown. A host's
//!   memory is its inventory capacity.
//! - Swap: pages a guest wrote to swap per second (its balloon statistics' swap-out counter between two reports);
//!   a host's is the sum over its VMs.
//! - NIC: a VM's tap rates minus its traffic with VMs on the same host (that stays on the host's bridge); a host's
//!   NIC utilisation is the sum over its VMs against its capacity, capped at 100.

use std::collections::{BTreeMap, VecDeque};

use crate::plan::{Flow, History, Host, Scenario, Tuning, Vm};

const MIB: u64 = 1 << 20;
/// Guest pages are 4 KiB: a swap write is one page.
const PAGE_BYTES: f64 = 4096.0;
/// The NIC speed assumed for a host whose inventory gives none.
pub const DEFAULT_NIC_MBPS: f64 = 1000.0;

/// One host as sampled in a round.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSeen {
    pub name: String,
    /// Physical CPUs (at least 1).
    pub cpus: u32,
    /// Memory capacity; 0 = unknown (then the VMs' memory is taken as the capacity: nothing free).
    pub memory_bytes: u64,
    /// NIC capacity; 0 = unknown ([`DEFAULT_NIC_MBPS`]).
    pub nic_bytes_per_s: u64,
    pub vms: Vec<VmSeen>,
}

/// One VM as sampled in a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSeen {
    pub name: String,
    /// The sum of its vCPU threads' use, in % of one host CPU.
    pub cpu_one_cpu_pct: Option<f64>,
    pub ram_bytes: u64,
    /// What the balloon leaves the guest; `None` without a balloon.
    pub balloon_bytes: Option<u64>,
    /// The guest's own memory use, % of what it has.
    pub used_pct: Option<f64>,
    /// The guest's cumulative swap-out counter and the time of its report (s, QEMU's clock).
    pub swap_out: Option<(u64, i64)>,
    /// Received plus sent on its taps.
    pub nic_bytes_per_s: Option<f64>,
}

/// Which form of the figures a policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smoothing {
    /// Paper 000 (band): each figure averaged over the window.
    WindowAverage,
    /// Paper 004 (idc, sandpiper): the latest figure, with the earlier ones as its history for the AR(1) prediction.
    LatestWithHistory,
}

#[derive(Debug, Clone, Default)]
struct HostSeries {
    cpu_pct: VecDeque<f64>,
    swap_writes_per_s: VecDeque<f64>,
    nic_pct: VecDeque<f64>,
}

#[derive(Debug, Clone, Default)]
struct VmSeries {
    cpu_pct: VecDeque<f64>,
    /// The last swap-out report, and the rate between the last two.
    swap_out: Option<(u64, i64)>,
    swap_writes_per_s: f64,
}

/// The history of a balancing run: the last `window` rounds of each host and VM.
#[derive(Debug, Clone)]
pub struct Tracker {
    window: usize,
    hosts: BTreeMap<String, HostSeries>,
    vms: BTreeMap<String, VmSeries>,
    latest: Vec<HostSeen>,
    flows: Vec<Flow>,
}

fn push(series: &mut VecDeque<f64>, value: f64, window: usize) {
    series.push_back(value);
    while series.len() > window {
        series.pop_front();
    }
}

fn mean(series: &VecDeque<f64>) -> f64 {
    if series.is_empty() {
        0.0
    } else {
        series.iter().sum::<f64>() / series.len() as f64
    }
}

/// The series without its latest value, oldest first.
fn earlier(series: &VecDeque<f64>) -> Vec<f64> {
    series
        .iter()
        .take(series.len().saturating_sub(1))
        .copied()
        .collect()
}

impl Tracker {
    /// A tracker keeping `window` rounds (at least 1).
    pub fn new(window: usize) -> Tracker {
        Tracker {
            window: window.max(1),
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            latest: Vec::new(),
            flows: Vec::new(),
        }
    }

    /// How many rounds the longest host series holds.
    pub fn rounds(&self) -> usize {
        self.hosts
            .values()
            .map(|h| h.cpu_pct.len())
            .max()
            .unwrap_or(0)
    }

    /// Adds a round: the hosts as sampled and the traffic between VMs (Mbps, both directions together). A VM or
    /// host missing from this round loses its history (it left, or could not be sampled).
    pub fn observe(&mut self, hosts: Vec<HostSeen>, flows: Vec<Flow>) {
        let (_, same_host_mbps) = placement(&hosts, &flows);
        let mut seen_vms = BTreeMap::new();
        for h in &hosts {
            let cpus = f64::from(h.cpus.max(1));
            let mut cpu = 0.0;
            let mut swap = 0.0;
            let mut nic_mbps = 0.0;
            for v in &h.vms {
                let mut series = self.vms.remove(&v.name).unwrap_or_default();
                let vm_cpu = v.cpu_one_cpu_pct.unwrap_or(0.0) / cpus;
                push(&mut series.cpu_pct, vm_cpu, self.window);
                series.swap_writes_per_s =
                    swap_rate(series.swap_out, v.swap_out).unwrap_or(series.swap_writes_per_s);
                if v.swap_out.is_some() {
                    series.swap_out = v.swap_out;
                }
                cpu += vm_cpu;
                swap += series.swap_writes_per_s;
                nic_mbps += vm_nic_mbps(v, &same_host_mbps);
                seen_vms.insert(v.name.clone(), series);
            }
            let series = self.hosts.entry(h.name.clone()).or_default();
            push(&mut series.cpu_pct, cpu.min(100.0), self.window);
            push(&mut series.swap_writes_per_s, swap, self.window);
            push(
                &mut series.nic_pct,
                (nic_mbps / host_nic_mbps(h) * 100.0).min(100.0),
                self.window,
            );
        }
        self.vms = seen_vms;
        self.hosts
            .retain(|name, _| hosts.iter().any(|h| &h.name == name));
        self.latest = hosts;
        self.flows = flows;
    }

    /// The cluster as the latest round saw it, in the form `smoothing` asks for, with `tuning`. `None` before the
    /// first round.
    pub fn scenario(
        &self,
        smoothing: Smoothing,
        tuning: &Tuning,
        description: String,
    ) -> Option<Scenario> {
        if self.latest.is_empty() {
            return None;
        }
        let pick = |series: &VecDeque<f64>| match smoothing {
            Smoothing::WindowAverage => mean(series),
            Smoothing::LatestWithHistory => series.back().copied().unwrap_or(0.0),
        };
        let (host_of, same_host_mbps) = placement(&self.latest, &self.flows);
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        for h in &self.latest {
            let series = self.hosts.get(&h.name).cloned().unwrap_or_default();
            let vms_mib: u64 = h.vms.iter().map(vm_memory_mib).sum();
            hosts.push(Host {
                name: h.name.clone(),
                cpus: h.cpus.max(1),
                memory_mib: if h.memory_bytes > 0 {
                    h.memory_bytes / MIB
                } else {
                    vms_mib
                }
                .max(1),
                nic_mbps: host_nic_mbps(h),
                cpu_pct: pick(&series.cpu_pct),
                swap_writes_per_s: pick(&series.swap_writes_per_s),
                nic_pct: pick(&series.nic_pct),
                memory_reserved_mib: 0,
                history: match smoothing {
                    Smoothing::WindowAverage => History::default(),
                    Smoothing::LatestWithHistory => History {
                        cpu_pct: earlier(&series.cpu_pct),
                        swap_writes_per_s: earlier(&series.swap_writes_per_s),
                        nic_pct: earlier(&series.nic_pct),
                    },
                },
            });
            for v in &h.vms {
                let series = self.vms.get(&v.name).cloned().unwrap_or_default();
                vms.push(Vm {
                    name: v.name.clone(),
                    host: h.name.clone(),
                    cpu_pct: pick(&series.cpu_pct).min(100.0),
                    memory_mib: vm_memory_mib(v),
                    memory_pct: v.used_pct.unwrap_or(100.0).clamp(0.0, 100.0),
                    nic_mbps: vm_nic_mbps(v, &same_host_mbps),
                    swap_writes_per_s: series.swap_writes_per_s,
                    memory_max_mib: v
                        .balloon_bytes
                        .map(|_| (v.ram_bytes / MIB).max(vm_memory_mib(v))),
                });
            }
        }
        let traffic = self
            .flows
            .iter()
            .filter(|f| host_of.contains_key(f.a.as_str()) && host_of.contains_key(f.b.as_str()))
            .cloned()
            .collect();
        Some(Scenario {
            description: Some(description),
            hosts,
            vms,
            traffic,
            tuning: tuning.clone(),
        })
    }
}

/// Each VM's host, and each VM's traffic with peers on its own host (it stays on the host's bridge: not NIC
/// traffic), in Mbps.
fn placement<'a>(
    hosts: &'a [HostSeen],
    flows: &'a [Flow],
) -> (BTreeMap<&'a str, &'a str>, BTreeMap<&'a str, f64>) {
    let host_of: BTreeMap<&str, &str> = hosts
        .iter()
        .flat_map(|h| {
            h.vms
                .iter()
                .map(move |v| (v.name.as_str(), h.name.as_str()))
        })
        .collect();
    let mut same_host_mbps: BTreeMap<&str, f64> = BTreeMap::new();
    for f in flows {
        if let (Some(a), Some(b)) = (host_of.get(f.a.as_str()), host_of.get(f.b.as_str())) {
            if a == b {
                *same_host_mbps.entry(f.a.as_str()).or_default() += f.mbps;
                *same_host_mbps.entry(f.b.as_str()).or_default() += f.mbps;
            }
        }
    }
    (host_of, same_host_mbps)
}

fn vm_memory_mib(v: &VmSeen) -> u64 {
    v.balloon_bytes.unwrap_or(v.ram_bytes) / MIB
}

fn host_nic_mbps(h: &HostSeen) -> f64 {
    if h.nic_bytes_per_s > 0 {
        h.nic_bytes_per_s as f64 * 8.0 / 1e6
    } else {
        DEFAULT_NIC_MBPS
    }
}

fn vm_nic_mbps(v: &VmSeen, same_host_mbps: &BTreeMap<&str, f64>) -> f64 {
    let tap_mbps = v.nic_bytes_per_s.unwrap_or(0.0) * 8.0 / 1e6;
    (tap_mbps - same_host_mbps.get(v.name.as_str()).copied().unwrap_or(0.0)).max(0.0)
}

/// Swap writes per second between two reports of the cumulative swap-out counter; `None` when there is no newer
/// report (the guest reports every few seconds) or the counter went back (the guest rebooted).
fn swap_rate(before: Option<(u64, i64)>, now: Option<(u64, i64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (before?, now?);
    (t1 > t0 && b1 >= b0).then(|| (b1 - b0) as f64 / PAGE_BYTES / (t1 - t0) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, cpu: f64) -> VmSeen {
        VmSeen {
            name: name.into(),
            cpu_one_cpu_pct: Some(cpu),
            ram_bytes: 256 * MIB,
            balloon_bytes: Some(256 * MIB),
            used_pct: Some(40.0),
            swap_out: None,
            nic_bytes_per_s: None,
        }
    }

    fn host(name: &str, cpus: u32, vms: Vec<VmSeen>) -> HostSeen {
        HostSeen {
            name: name.into(),
            cpus,
            memory_bytes: 1024 * MIB,
            nic_bytes_per_s: 12_500_000,
            vms,
        }
    }

    #[test]
    fn swap_rates_need_a_newer_report() {
        let cases = [
            (None, Some((4096, 10)), None),
            (Some((0, 10)), Some((4096 * 300, 12)), Some(150.0)),
            (Some((4096, 10)), Some((4096, 10)), None),
            (Some((4096 * 9, 10)), Some((4096, 11)), None),
        ];
        for (before, now, want) in cases {
            assert_eq!(swap_rate(before, now), want, "{before:?} → {now:?}");
        }
    }

    #[test]
    fn host_figures_are_the_sum_of_their_vms_over_physical_cpus() {
        let mut t = Tracker::new(3);
        for cpu in [60.0, 80.0, 100.0, 90.0] {
            t.observe(
                vec![
                    host("h1", 2, vec![vm("a", cpu), vm("b", 100.0)]),
                    host("h2", 1, vec![vm("c", 5.0)]),
                ],
                vec![],
            );
        }
        let s = t
            .scenario(Smoothing::LatestWithHistory, &Tuning::default(), "t".into())
            .unwrap();
        let h1 = s.host("h1").unwrap();
        assert_eq!(h1.cpu_pct, 95.0);
        // The window keeps 3 rounds: the latest is the figure, the two before it its history.
        assert_eq!(h1.history.cpu_pct, vec![90.0, 100.0]);
        assert_eq!(s.vm("a").unwrap().cpu_pct, 45.0);
        assert_eq!(s.host("h2").unwrap().cpu_pct, 5.0);
        let avg = t
            .scenario(Smoothing::WindowAverage, &Tuning::default(), "t".into())
            .unwrap();
        assert!((avg.host("h1").unwrap().cpu_pct - (90.0 + 100.0 + 95.0) / 3.0).abs() < 1e-9);
        assert!(avg.host("h1").unwrap().history.cpu_pct.is_empty());
        s.validate().unwrap();
    }

    #[test]
    fn traffic_on_one_host_is_not_nic_traffic() {
        let mut a = vm("a", 1.0);
        a.nic_bytes_per_s = Some(250_000.0); // 2 Mbps on its tap, all of it to b on the same host
        let mut b = vm("b", 1.0);
        b.nic_bytes_per_s = Some(250_000.0);
        let mut c = vm("c", 1.0);
        c.nic_bytes_per_s = Some(125_000.0); // 1 Mbps to a client
        let mut t = Tracker::new(2);
        t.observe(
            vec![host("h1", 1, vec![a, b]), host("h2", 1, vec![c])],
            vec![Flow {
                a: "a".into(),
                b: "b".into(),
                mbps: 2.0,
            }],
        );
        let s = t
            .scenario(Smoothing::LatestWithHistory, &Tuning::default(), "t".into())
            .unwrap();
        assert_eq!(s.vm("a").unwrap().nic_mbps, 0.0);
        assert_eq!(s.host("h1").unwrap().nic_pct, 0.0);
        assert!((s.host("h2").unwrap().nic_pct - 1.0).abs() < 1e-9);
        assert_eq!(s.traffic.len(), 1);
    }

    #[test]
    fn a_ballooned_guest_can_grow_back_to_its_boot_memory() {
        let mut v = vm("a", 1.0);
        v.balloon_bytes = Some(128 * MIB);
        v.swap_out = Some((0, 100));
        let mut t = Tracker::new(4);
        t.observe(vec![host("h1", 1, vec![v.clone()])], vec![]);
        v.swap_out = Some((4096 * 400, 102));
        t.observe(vec![host("h1", 1, vec![v.clone()])], vec![]);
        // No newer report: the last rate holds.
        t.observe(vec![host("h1", 1, vec![v])], vec![]);
        let s = t
            .scenario(Smoothing::LatestWithHistory, &Tuning::default(), "t".into())
            .unwrap();
        let a = s.vm("a").unwrap();
        assert_eq!((a.memory_mib, a.memory_max_mib), (128, Some(256)));
        assert_eq!(a.swap_writes_per_s, 200.0);
        assert_eq!(
            s.host("h1").unwrap().history.swap_writes_per_s,
            vec![0.0, 200.0]
        );
        let mut none = vm("b", 1.0);
        none.balloon_bytes = None;
        t.observe(vec![host("h1", 1, vec![none])], vec![]);
        let s = t
            .scenario(Smoothing::LatestWithHistory, &Tuning::default(), "t".into())
            .unwrap();
        assert_eq!(s.vm("b").unwrap().memory_max_mib, None);
        assert!(s.vm("a").is_none());
    }
}
