//! The planning benchmark behind `scripts/bench-plan`: generates a seeded synthetic cluster and times one round of
//! each balancing policy (`plan::plan_round`) and one evacuation plan (`plan::evacuate::plan`, evacuating one host),
//! printing one JSON line per policy. Pure computation, no QEMU:
//!
//! `cargo run --release --example bench_plan -- --hosts 1000 --vms 10000 [--pairs 5000] [--seed 1] [--repeat 15]
//! [--policies band,idc,sandpiper,evacuate] [--load normal|stuck] [--dump true]` (`--policies none` only generates,
//! for a memory baseline; `--dump true` also prints each plan in full, to compare two builds' decisions).
//!
//! The cluster is meant to exercise the planners' hot paths, not to look like any real site: about 4 % of the hosts
//! are CPU hotspots, 2 % NIC hotspots and 2 % swap hotspots, each with a sustained history so that the AR(1)
//! prediction agrees, and the others spread between light and heavy for the band policy, with room left for the
//! moves. Half of the traffic pairs talk within a host (IDC), half across hosts. VMs are placed at random, about
//! `vms / hosts` a host. `--load stuck` is the worst case of idc and sandpiper instead: half the hosts are CPU
//! hotspots and every other host sits just under the CPU threshold, so no host has room and every hotspot tries
//! each of its VMs on every host.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qmigrate::classify::Class;
use qmigrate::plan::evacuate::{self, Candidate, HostRoom, Input, Order, Resident};
use qmigrate::plan::{plan_round, Flow, History, Host, Policy, Scenario, Tuning, Vm};
use rand::{RngExt as _, SeedableRng as _};
use rand_xorshift::XorShiftRng;

const MIB: u64 = 1 << 20;
const HISTORY_LEN: usize = 10;
const CLASSES: [Class; 6] = {
    use Class::*;
    [DirtyMemory, Web, NetReceive, Cpu, DiskIo, Idle]
};

struct Args {
    hosts: usize,
    vms: usize,
    pairs: usize,
    seed: u64,
    repeat: usize,
    policies: Vec<String>,
    stuck: bool,
    dump: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        hosts: 1000,
        vms: 10_000,
        pairs: usize::MAX,
        seed: 1,
        repeat: 15,
        policies: ["band", "idc", "sandpiper", "evacuate"]
            .map(str::to_owned)
            .to_vec(),
        stuck: false,
        dump: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--hosts" => args.hosts = number()? as usize,
            "--vms" => args.vms = number()? as usize,
            "--pairs" => args.pairs = number()? as usize,
            "--seed" => args.seed = number()?,
            "--repeat" => args.repeat = (number()? as usize).max(1),
            "--policies" => {
                args.policies = value
                    .split(',')
                    .filter(|p| !p.is_empty() && *p != "none")
                    .map(str::to_owned)
                    .collect();
            }
            "--load" => match value.as_str() {
                "normal" => args.stuck = false,
                "stuck" => args.stuck = true,
                _ => return Err(format!("--load {value}: expected normal or stuck")),
            },
            "--dump" => {
                args.dump = value.parse().map_err(|e| format!("--dump {value}: {e}"))?;
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if args.hosts < 2 {
        return Err("--hosts must be at least 2".into());
    }
    if args.pairs == usize::MAX {
        args.pairs = args.vms / 2;
    }
    Ok(args)
}

/// What kind of load a generated host carries.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Normal,
    CpuHot,
    NicHot,
    SwapHot,
    /// Just under the CPU threshold: no VM fits.
    Full,
}

/// `n` samples around `centre` (± `spread`), clamped to `lo..=hi`.
fn history(rng: &mut XorShiftRng, centre: f64, spread: f64, lo: f64, hi: f64) -> Vec<f64> {
    (0..HISTORY_LEN)
        .map(|_| (centre + rng.random_range(-spread..=spread)).clamp(lo, hi))
        .collect()
}

/// The synthetic cluster: hosts, VMs placed at random, `pairs` traffic pairs (half within a host), loads as the
/// module documentation says (`stuck`: its worst case). Always passes `Scenario::validate`.
fn cluster(hosts: usize, vms: usize, pairs: usize, seed: u64, stuck: bool) -> Scenario {
    let mut rng = XorShiftRng::seed_from_u64(seed);
    let loads: Vec<Load> = (0..hosts)
        .map(|_| match (stuck, rng.random_range(0..100)) {
            (true, 0..=49) | (false, 0..=3) => Load::CpuHot,
            (true, _) => Load::Full,
            (false, 4..=5) => Load::NicHot,
            (false, 6..=7) => Load::SwapHot,
            (false, _) => Load::Normal,
        })
        .collect();
    let mut host_list: Vec<Host> = (0..hosts)
        .map(|i| Host {
            name: format!("h{i:05}"),
            cpus: [16, 32, 64][rng.random_range(0..3)],
            memory_mib: [131_072, 262_144][rng.random_range(0..2)],
            nic_mbps: [10_000.0, 25_000.0][rng.random_range(0..2)],
            cpu_pct: 0.0,
            swap_writes_per_s: 0.0,
            nic_pct: 0.0,
            memory_reserved_mib: 4096,
            history: History::default(),
        })
        .collect();
    let mut vm_list: Vec<Vm> = (0..vms)
        .map(|j| {
            let h = rng.random_range(0..hosts);
            let memory_mib = [1024, 2048, 4096, 8192][rng.random_range(0..4)];
            let swapping = loads[h] == Load::SwapHot && rng.random_bool(0.5);
            Vm {
                name: format!("v{j:06}"),
                host: host_list[h].name.clone(),
                cpu_pct: rng.random_range(0.5..8.0),
                memory_mib,
                memory_pct: rng.random_range(20.0..95.0),
                nic_mbps: 0.0,
                swap_writes_per_s: if swapping {
                    rng.random_range(20.0..120.0)
                } else {
                    0.0
                },
                memory_max_mib: rng.random_bool(0.5).then_some(memory_mib * 2),
            }
        })
        .collect();
    let host_of: Vec<usize> = vm_list
        .iter()
        .map(|v| v.host[1..].parse().expect("generated name"))
        .collect();
    let mut on_host: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    for (j, &h) in host_of.iter().enumerate() {
        on_host[h].push(j);
    }

    let mut seen = HashSet::new();
    let mut traffic = Vec::with_capacity(pairs);
    let mut attempts = 0;
    while traffic.len() < pairs && vms >= 2 && attempts < pairs * 20 {
        attempts += 1;
        let a = rng.random_range(0..vms);
        let local = &on_host[host_of[a]];
        let b = if traffic.len() % 2 == 0 && local.len() >= 2 {
            local[rng.random_range(0..local.len())]
        } else {
            rng.random_range(0..vms)
        };
        if a == b || !seen.insert((a.min(b), a.max(b))) {
            continue;
        }
        traffic.push(Flow {
            a: vm_list[a].name.clone(),
            b: vm_list[b].name.clone(),
            mbps: rng.random_range(1.0..300.0),
        });
        if host_of[a] != host_of[b] {
            let mbps = traffic.last().map_or(0.0, |f: &Flow| f.mbps);
            vm_list[a].nic_mbps += mbps;
            vm_list[b].nic_mbps += mbps;
        }
    }
    for v in &mut vm_list {
        // Clients outside the cluster.
        v.nic_mbps += rng.random_range(0.0..200.0);
    }

    for (i, h) in host_list.iter_mut().enumerate() {
        let vms_here = &on_host[i];
        let cpu: f64 = vms_here.iter().map(|&j| vm_list[j].cpu_pct).sum();
        let nic: f64 = vms_here.iter().map(|&j| vm_list[j].nic_mbps).sum();
        let swap: f64 = vms_here.iter().map(|&j| vm_list[j].swap_writes_per_s).sum();
        h.cpu_pct = (cpu * rng.random_range(0.7..1.3)).min(78.0);
        h.nic_pct = (nic / h.nic_mbps * 100.0).min(60.0);
        h.swap_writes_per_s = swap.min(100.0);
        match loads[i] {
            Load::Normal => {}
            Load::CpuHot => h.cpu_pct = rng.random_range(90.0..99.0),
            Load::NicHot => h.nic_pct = rng.random_range(85.0..97.0),
            Load::SwapHot => h.swap_writes_per_s = swap.max(rng.random_range(200.0..400.0)),
            Load::Full => h.cpu_pct = 84.9,
        }
        h.history = History {
            cpu_pct: history(&mut rng, h.cpu_pct, 3.0, 0.0, 100.0),
            swap_writes_per_s: history(&mut rng, h.swap_writes_per_s, 10.0, 0.0, f64::MAX),
            nic_pct: history(&mut rng, h.nic_pct, 3.0, 0.0, 100.0),
        };
    }
    let s = Scenario {
        description: Some(format!(
            "bench_plan: {hosts} hosts, {vms} VMs, {} pairs, seed {seed}{}",
            traffic.len(),
            if stuck { ", stuck" } else { "" }
        )),
        hosts: host_list,
        vms: vm_list,
        traffic,
        tuning: Tuning::default(),
    };
    if let Err(e) = s.validate() {
        panic!("the generated cluster is invalid: {e}");
    }
    s
}

/// Evacuating the first host of `s` that holds the average number of VMs (so that sizes compare): its VMs as
/// candidates, every other host as a destination. vCPUs follow memory (one per GiB, 1 to 8), hosts take four vCPUs
/// per core, the VMs of a traffic pair share a group, 2 % of the VMs name another in their anti-affinity, and
/// classes are drawn at random.
fn evacuation(s: &Scenario, seed: u64) -> Input {
    let mut rng = XorShiftRng::seed_from_u64(seed ^ 0xe7ac);
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (k, f) in s.traffic.iter().enumerate() {
        for end in [&f.a, &f.b] {
            groups.entry(end).or_default().push(format!("g{k}"));
        }
    }
    struct Drawn {
        vcpus: u32,
        classes: Vec<Class>,
        groups: Vec<String>,
        anti_affinity: Vec<String>,
    }
    let drawn: Vec<Drawn> = s
        .vms
        .iter()
        .map(|v| Drawn {
            vcpus: u32::try_from(v.memory_mib / 1024).unwrap_or(8).clamp(1, 8),
            classes: match rng.random_range(0..4) {
                0 => Vec::new(),
                _ => vec![CLASSES[rng.random_range(0..CLASSES.len())]],
            },
            groups: groups.get(v.name.as_str()).cloned().unwrap_or_default(),
            anti_affinity: if rng.random_bool(0.02) {
                vec![s.vms[rng.random_range(0..s.vms.len())].name.clone()]
            } else {
                Vec::new()
            },
        })
        .collect();
    let average = s.vms.len() / s.hosts.len();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &s.vms {
        *counts.entry(&v.host).or_default() += 1;
    }
    let count = |h: &Host| counts.get(h.name.as_str()).copied().unwrap_or(0);
    let leaving = &s
        .hosts
        .iter()
        .min_by_key(|h| count(h).abs_diff(average))
        .expect("hosts")
        .name;
    let candidates = s
        .vms
        .iter()
        .zip(&drawn)
        .filter(|(v, _)| &v.host == leaving)
        .map(|(v, d)| Candidate {
            name: v.name.clone(),
            from: v.host.clone(),
            vcpus: d.vcpus,
            memory_bytes: v.memory_mib * MIB,
            classes: d.classes.clone(),
            groups: d.groups.clone(),
            anti_affinity: d.anti_affinity.clone(),
            predicted: Duration::from_millis(v.memory_mib * 4 + rng.random_range(0..2000)),
            prediction: format!("{} MiB at 250 MiB/s", v.memory_mib),
        })
        .collect();
    let mut rooms: BTreeMap<&str, HostRoom> = s
        .hosts
        .iter()
        .filter(|h| &h.name != leaving)
        .map(|h| {
            let room = HostRoom {
                name: h.name.clone(),
                vcpus: h.cpus * 4,
                memory_bytes: h.memory_mib * MIB,
                used_vcpus: 0,
                used_memory_bytes: h.memory_reserved_mib * MIB,
                vms: Vec::new(),
            };
            (h.name.as_str(), room)
        })
        .collect();
    for (v, d) in s.vms.iter().zip(&drawn) {
        if let Some(room) = rooms.get_mut(v.host.as_str()) {
            room.used_vcpus += d.vcpus;
            room.used_memory_bytes += v.memory_mib * MIB;
            room.vms.push(Resident {
                name: v.name.clone(),
                classes: d.classes.clone(),
                groups: d.groups.clone(),
                anti_affinity: d.anti_affinity.clone(),
            });
        }
    }
    Input {
        candidates,
        hosts: rooms.into_values().collect(),
        order: Order::Informed,
        fixed: BTreeMap::new(),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `round` once untimed (caches, allocator), then `repeat` times; the durations sorted, and what the last run
/// returned.
fn time<T>(repeat: usize, mut round: impl FnMut() -> T) -> (Vec<Duration>, T) {
    let mut times = Vec::with_capacity(repeat);
    let mut last = Some(round());
    for _ in 0..repeat {
        let start = Instant::now();
        let out = round();
        times.push(start.elapsed());
        last = Some(out);
    }
    times.sort();
    (times, last.expect("repeat is at least 1"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_plan: {e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let s = cluster(args.hosts, args.vms, args.pairs, args.seed, args.stuck);
    let generate = start.elapsed();
    let hotspots = qmigrate::plan::hotspot::hotspots(&s).len();
    println!(
        "{}",
        serde_json::json!({
            "cluster": {"hosts": s.hosts.len(), "vms": s.vms.len(), "pairs": s.traffic.len(), "seed": args.seed,
                        "load": if args.stuck { "stuck" } else { "normal" },
                        "hotspots": hotspots, "generate_ms": millis(generate)}
        })
    );
    for name in &args.policies {
        let (times, decisions, notes) = if name == "evacuate" {
            let input = evacuation(&s, args.seed);
            let (times, plan) = time(args.repeat, || evacuate::plan(&input));
            if args.dump {
                println!("{}", serde_json::json!({ "evacuate": format!("{plan:?}") }));
            }
            let steps = match plan {
                Ok(p) => p.steps.len(),
                Err(e) => {
                    eprintln!("bench_plan: the evacuation failed: {e}");
                    0
                }
            };
            (times, steps, 0)
        } else {
            let policy: Policy = match name.parse() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("bench_plan: {e}");
                    return ExitCode::from(2);
                }
            };
            let (times, plan) = time(args.repeat, || plan_round(policy, &s));
            if args.dump {
                println!("{}", serde_json::json!({ "plan": plan }));
            }
            (times, plan.decisions.len(), plan.notes.len())
        };
        println!(
            "{}",
            serde_json::json!({
                "policy": name, "hosts": s.hosts.len(), "vms": s.vms.len(), "pairs": s.traffic.len(),
                "seed": args.seed, "load": if args.stuck { "stuck" } else { "normal" },
                "repeat": times.len(), "median_ms": millis(times[times.len() / 2]),
                "min_ms": millis(times[0]), "max_ms": millis(times[times.len() - 1]),
                "times_ms": times.iter().map(|&d| millis(d)).collect::<Vec<_>>(),
                "decisions": decisions, "notes": notes,
            })
        );
    }
    ExitCode::SUCCESS
}
