//! Statistics of running VMs and their host: one sample of one VM over an interval from its QMP socket and `/proc`
//! (`sampler`), a round sampling many VMs at once where one slow or dead socket costs only its own entry
//! ([`sample_round`]), and per-metric time series with windowed averages and AR(1) predictions (`history`).
//! Classification lives in [`crate::classify`]; this module only measures.

pub mod history;
pub mod name;
pub mod procfs;
pub mod sampler;
pub mod serve;
pub mod watch;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::classify::{self, Figures, Label, Thresholds};
use crate::qmp::QmpError;
use crate::text::printable;
use name::{NameSource, Names};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{socket}: no sample within {}", humantime::format_duration(*after))]
    Timeout { socket: String, after: Duration },
    #[error("{socket}: the sampling task died")]
    Task { socket: String },
    #[error("host: cannot read {path}")]
    Host {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a round samples.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The stretch every rate is measured over (vCPU, disk, NIC, dirty pages).
    pub interval: Duration,
    /// Bound on connecting and on each QMP command, and on the dirty-rate result after the interval.
    pub command_timeout: Duration,
    /// Bound on one VM's whole sample; past it the VM is reported as an error and the round goes on.
    pub vm_timeout: Duration,
    /// Measure the dirty page rate (`calc-dirty-rate`).
    pub dirty_rate: bool,
    /// Ask a virtio-balloon for the guest's memory statistics (sets its polling interval).
    pub guest_stats: bool,
    /// Ask QEMU for its `-name` (`query-name`). Rounds and `serve` turn it off per VM once its name is settled.
    pub query_name: bool,
    pub thresholds: Thresholds,
}

impl SampleOptions {
    pub fn new(interval: Duration) -> SampleOptions {
        let command_timeout = Duration::from_secs(3);
        SampleOptions {
            interval,
            command_timeout,
            // The interval (at least 1 s for the dirty rate), the dirty-rate wait, and room for a dozen commands.
            vm_timeout: interval.max(Duration::from_secs(1)) + command_timeout * 2,
            dirty_rate: true,
            guest_stats: true,
            query_name: true,
            thresholds: Thresholds::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VcpuSample {
    pub index: u32,
    pub thread_id: i64,
    /// % of one host CPU this vCPU's thread used over the interval.
    pub cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestMemory {
    pub total_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    pub swap_in_bytes: Option<u64>,
    pub swap_out_bytes: Option<u64>,
    pub major_faults: Option<u64>,
    /// The guest's last report, seconds since the epoch (QEMU's clock).
    pub last_update_s: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemorySample {
    /// Boot memory (`query-memory-size-summary`).
    pub ram_bytes: u64,
    pub plugged_bytes: u64,
    /// What the balloon leaves the guest (`query-balloon`); `None` without a balloon.
    pub balloon_actual_bytes: Option<u64>,
    /// The guest's own view, through the virtio-balloon statistics.
    pub guest: Option<GuestMemory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskSample {
    pub device: String,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub read_ops_per_s: f64,
    pub write_ops_per_s: f64,
    pub flush_ops_per_s: f64,
}

/// One NIC, with rates as the guest sees them (received by the guest, sent by the guest), measured on the host's
/// tap device. No tap, no rates.
#[derive(Debug, Clone, Serialize)]
pub struct NicSample {
    pub name: String,
    pub mac: String,
    pub tap: Option<String>,
    pub rx_bytes_per_s: Option<f64>,
    pub tx_bytes_per_s: Option<f64>,
    pub rx_packets_per_s: Option<f64>,
    pub tx_packets_per_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DirtyRateSample {
    pub bytes_per_s: Option<f64>,
    /// The `calc-dirty-rate` mode used: dirty-ring, dirty-bitmap or page-sampling.
    pub mode: Option<String>,
}

/// One VM over one interval.
#[derive(Debug, Clone, Serialize)]
pub struct VmSample {
    pub socket: String,
    /// QEMU's `-name` (`query-name`); `None` when it has none or was not asked (`SampleOptions::query_name`).
    pub qemu_name: Option<String>,
    pub pid: Option<i32>,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, …).
    pub run_state: String,
    pub interval_ms: u64,
    pub vcpus: Vec<VcpuSample>,
    /// Total vCPU utilisation as a share of the VM's vCPU capacity (100 = every vCPU busy).
    pub cpu_pct: Option<f64>,
    /// The sum over vCPUs, in % of one host CPU.
    pub cpu_total_pct: Option<f64>,
    pub memory: MemorySample,
    pub disks: Vec<DiskSample>,
    pub nics: Vec<NicSample>,
    pub dirty_rate: DirtyRateSample,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

impl VmSample {
    /// The figures the classifier looks at. Disk and NIC figures are summed over devices; a VM without a disk
    /// or a tapped NIC has no such figure.
    pub fn figures(&self) -> Figures {
        let sum = |it: &mut dyn Iterator<Item = Option<f64>>| {
            it.flatten()
                .fold(None, |acc: Option<f64>, v| Some(acc.unwrap_or(0.0) + v))
        };
        Figures {
            dirty_rate_bytes_per_s: self.dirty_rate.bytes_per_s,
            cpu_pct: self.cpu_pct,
            net_rx_bytes_per_s: sum(&mut self.nics.iter().map(|n| n.rx_bytes_per_s)),
            net_tx_bytes_per_s: sum(&mut self.nics.iter().map(|n| n.tx_bytes_per_s)),
            disk_bytes_per_s: sum(&mut self
                .disks
                .iter()
                .map(|d| Some(d.read_bytes_per_s + d.write_bytes_per_s))),
            disk_ops_per_s: sum(&mut self
                .disks
                .iter()
                .map(|d| Some(d.read_ops_per_s + d.write_ops_per_s + d.flush_ops_per_s))),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSample {
    /// Busy share of all host CPUs over the interval.
    pub cpu_pct: Option<f64>,
    pub cpus: usize,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
}

/// One VM's entry in a round: its name, its sample and classes, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct VmEntry {
    /// What the VM is called ([`name`]): the given name, else QEMU's `-name`, else the socket's file name.
    pub name: String,
    pub name_from: NameSource,
    pub socket: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<VmSample>,
    pub classes: Vec<Label>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A round: every VM sampled over the same interval, and the host.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub interval_ms: u64,
    /// Wall time of the whole round.
    pub elapsed_ms: u64,
    pub host: Option<HostSample>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_error: Option<String>,
    pub vms: Vec<VmEntry>,
}

impl Snapshot {
    /// How many VMs answered.
    pub fn answered(&self) -> usize {
        self.vms.iter().filter(|v| v.sample.is_some()).count()
    }
}

/// Samples every VM concurrently, each in its own task bounded by `opts.vm_timeout`, and the host alongside.
/// `targets` are QMP sockets, each optionally `NAME=SOCKET` ([`name::Target::parse`]). Never fails as a whole: a VM
/// that cannot be sampled is an entry with its error.
pub async fn sample_round(targets: &[String], opts: &SampleOptions) -> Snapshot {
    sample_named(&mut Names::parse(targets), opts).await
}

/// [`sample_round`] over targets whose names outlive the round (`top` samples round after round): a VM's `-name` is
/// asked at its first successful sample only, and settles its name in `names`.
pub async fn sample_named(names: &mut Names, opts: &SampleOptions) -> Snapshot {
    let started = Instant::now();
    let host = tokio::spawn(sample_host(opts.interval));
    let asked: Vec<bool> = (0..names.len())
        .map(|i| opts.query_name && names.wants_qemu_name(i))
        .collect();
    let tasks: Vec<_> = (0..names.len())
        .map(|i| {
            let socket = names.target(i).socket.clone();
            let mut opts = opts.clone();
            opts.query_name = asked[i];
            tokio::spawn(async move {
                match tokio::time::timeout(opts.vm_timeout, sampler::sample_vm(&socket, &opts))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(StatsError::Timeout {
                        socket,
                        after: opts.vm_timeout,
                    }),
                }
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap_or_else(|_| {
            Err(StatsError::Task {
                socket: names.target(i).socket.clone(),
            })
        });
        // In the order given, so that two VMs with one -name are named the same way every time.
        if let (Ok(sample), true) = (&result, asked[i]) {
            names.resolve(i, sample.qemu_name.as_deref());
        }
        results.push(result);
    }
    let vms = results
        .into_iter()
        .enumerate()
        .map(|(i, result)| {
            let name = names.name(i);
            let socket = names.target(i).socket.clone();
            let (sample, classes, error) = match result {
                Ok(sample) => {
                    let classes = classify::classify(&sample.figures(), &opts.thresholds);
                    (Some(sample), classes, None)
                }
                Err(e) => {
                    tracing::warn!(vm = %printable(&name.name), socket = %printable(&socket),
                        error = %error_chain(&e), "no sample");
                    (None, Vec::new(), Some(error_chain(&e)))
                }
            };
            VmEntry {
                name: name.name.clone(),
                name_from: name.from,
                socket,
                sample,
                classes,
                error,
            }
        })
        .collect();
    let (host, host_error) = match host.await {
        Ok(Ok(h)) => (Some(h), None),
        Ok(Err(e)) => (None, Some(error_chain(&e))),
        Err(_) => (None, Some("host: the sampling task died".into())),
    };
    Snapshot {
        interval_ms: u64::try_from(opts.interval.as_millis()).unwrap_or(u64::MAX),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        host,
        host_error,
        vms,
    }
}

/// Host CPU over the interval and memory at its end, from `/proc/stat` and `/proc/meminfo`.
pub async fn sample_host(interval: Duration) -> Result<HostSample, StatsError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| StatsError::Host {
            path: path.into(),
            source,
        })
    };
    let unparsable = |path: &str| StatsError::Host {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable"),
    };
    let before =
        procfs::parse_proc_stat(&read("/proc/stat")?).ok_or_else(|| unparsable("/proc/stat"))?;
    tokio::time::sleep(interval).await;
    let text = read("/proc/stat")?;
    let after = procfs::parse_proc_stat(&text).ok_or_else(|| unparsable("/proc/stat"))?;
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    let (total, available) = procfs::parse_meminfo(&read("/proc/meminfo")?)
        .ok_or_else(|| unparsable("/proc/meminfo"))?;
    Ok(HostSample {
        cpu_pct: procfs::host_cpu_pct(before, after),
        cpus,
        mem_total_bytes: total,
        mem_available_bytes: available,
    })
}

/// An error and its sources on one line, outermost first.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Snapshot {
    /// A table for people: one row per VM, then each class with its evidence, then errors and the host.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let kib = |b: f64| b / 1024.0;
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> f64| {
            v.map_or("-".to_string(), |v| format!("{:.1}", f(v)))
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:>6} {:>8} {:>9} {:>10} {:>10} {:>10} {:>11}  classes",
            "VM",
            "state",
            "cpu%",
            "ram MiB",
            "avail MiB",
            "dirty MiB/s",
            "rx KiB/s",
            "tx KiB/s",
            "disk KiB/s"
        );
        // Names, sockets, run states, notes and errors come from files and peers: printed through `printable`.
        for vm in &self.vms {
            let name = printable(&vm.name);
            // The socket under its VM, unless the name is the socket already.
            let socket_line =
                || (vm.name != vm.socket).then(|| format!("    socket: {}", printable(&vm.socket)));
            let Some(s) = &vm.sample else {
                let _ = writeln!(
                    out,
                    "{name:<24} error     {}",
                    printable(vm.error.as_deref().unwrap_or("?"))
                );
                if let Some(line) = socket_line() {
                    let _ = writeln!(out, "{line}");
                }
                continue;
            };
            let f = s.figures();
            #[allow(clippy::cast_precision_loss)]
            let ram = mib(s.memory.ram_bytes as f64);
            #[allow(clippy::cast_precision_loss)]
            let avail = s
                .memory
                .guest
                .as_ref()
                .and_then(|g| g.available_bytes)
                .map(|b| b as f64);
            let classes: Vec<&str> = vm.classes.iter().map(|l| l.class.name()).collect();
            let _ = writeln!(
                out,
                "{name:<24} {:<9} {:>6} {:>8.0} {:>9} {:>10} {:>10} {:>10} {:>11}  {}",
                printable(&s.run_state),
                opt(f.cpu_pct, &|v| v),
                ram,
                opt(avail, &mib),
                opt(f.dirty_rate_bytes_per_s, &mib),
                opt(f.net_rx_bytes_per_s, &kib),
                opt(f.net_tx_bytes_per_s, &kib),
                opt(f.disk_bytes_per_s, &kib),
                if classes.is_empty() {
                    "-".to_string()
                } else {
                    classes.join(",")
                }
            );
            if let Some(line) = socket_line() {
                let _ = writeln!(out, "{line}");
            }
            for label in &vm.classes {
                let why: Vec<String> = label
                    .evidence
                    .iter()
                    .map(|e| {
                        let cmp = if e.value >= e.threshold { ">=" } else { "<" };
                        format!("{} {:.1} {cmp} {:.1}", e.metric, e.value, e.threshold)
                    })
                    .collect();
                let _ = writeln!(out, "    {}: {}", label.class, why.join("; "));
            }
            for note in &s.notes {
                let _ = writeln!(out, "    note: {}", printable(note));
            }
        }
        match (&self.host, &self.host_error) {
            (Some(h), _) => {
                #[allow(clippy::cast_precision_loss)]
                let (total, avail) = (
                    mib(h.mem_total_bytes as f64),
                    mib(h.mem_available_bytes as f64),
                );
                let _ = writeln!(
                    out,
                    "host: cpu {}% of {} CPUs, memory {avail:.0} MiB available of {total:.0} MiB; {} of {} VMs answered in {} ms",
                    opt(h.cpu_pct, &|v| v),
                    h.cpus,
                    self.answered(),
                    self.vms.len(),
                    self.elapsed_ms
                );
            }
            (None, e) => {
                let _ = writeln!(
                    out,
                    "host: {}",
                    printable(e.as_deref().unwrap_or("no sample"))
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_round_of_missing_sockets_reports_each_and_returns() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone.qmp").display().to_string();
        let plain = dir.path().join("plain-file");
        std::fs::write(&plain, "").unwrap();
        let plain = plain.display().to_string();
        let mut opts = SampleOptions::new(Duration::from_millis(100));
        opts.vm_timeout = Duration::from_secs(2);
        let snap = sample_round(&[missing.clone(), plain.clone()], &opts).await;
        assert_eq!(snap.answered(), 0);
        assert_eq!(snap.vms.len(), 2);
        // Nothing answered: each VM goes by its socket's file name.
        let names: Vec<(&str, NameSource)> = snap
            .vms
            .iter()
            .map(|v| (v.name.as_str(), v.name_from))
            .collect();
        assert_eq!(
            names,
            [
                ("gone", NameSource::SocketFile),
                ("plain-file", NameSource::SocketFile)
            ]
        );
        assert_eq!(snap.vms[0].socket, missing);
        let e0 = snap.vms[0].error.as_deref().unwrap();
        assert!(e0.contains(&missing) && e0.contains("no such file"), "{e0}");
        let e1 = snap.vms[1].error.as_deref().unwrap();
        assert!(e1.contains("not a socket"), "{e1}");
        assert!(snap.host.is_some(), "{:?}", snap.host_error);
        let table = snap.to_table();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("gone ") && l.contains("error")),
            "{table}"
        );
        assert!(
            table.contains(&format!("    socket: {missing}\n")),
            "{table}"
        );
        assert!(table.contains("0 of 2 VMs answered"), "{table}");
    }

    #[tokio::test]
    async fn a_socket_that_never_greets_costs_only_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.qmp");
        // Accepts connections and says nothing, like a stopped or wedged QEMU.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut opts = SampleOptions::new(Duration::from_millis(100));
        opts.command_timeout = Duration::from_millis(300);
        opts.vm_timeout = Duration::from_secs(5);
        let started = Instant::now();
        let snap = sample_round(&[path.display().to_string()], &opts).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let e = snap.vms[0].error.as_deref().unwrap();
        assert!(
            e.contains("silent.qmp") && e.contains("no QMP greeting"),
            "{e}"
        );
    }

    #[test]
    fn the_table_names_each_vm_printably_with_its_socket_below() {
        let entry = |name: &str, from, socket: &str| VmEntry {
            name: name.into(),
            name_from: from,
            socket: socket.into(),
            sample: None,
            classes: vec![],
            error: Some(format!("{socket}: cannot connect")),
        };
        let snap = Snapshot {
            interval_ms: 1000,
            elapsed_ms: 1000,
            host: None,
            host_error: None,
            vms: vec![
                entry("web\u{1b}[2J", NameSource::Qemu, "/run/vm/a.qmp"),
                entry("tcp:h:1", NameSource::SocketPath, "tcp:h:1"),
            ],
        };
        let table = snap.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with(r"web\x1b[2J  "), "{table}");
        assert_eq!(lines[2], "    socket: /run/vm/a.qmp", "{table}");
        // A VM named by its socket gets no second line saying so.
        assert!(lines[3].starts_with("tcp:h:1 "), "{table}");
        assert!(lines[4].starts_with("host:"), "{table}");
        assert!(!table.contains('\u{1b}'), "{table}");
    }

    #[test]
    fn figures_sum_devices_and_leave_absent_ones_unknown() {
        let mut s = VmSample {
            socket: "vm.qmp".into(),
            qemu_name: None,
            pid: None,
            run_state: "running".into(),
            interval_ms: 1000,
            vcpus: vec![],
            cpu_pct: Some(12.0),
            cpu_total_pct: Some(12.0),
            memory: MemorySample {
                ram_bytes: 1 << 28,
                plugged_bytes: 0,
                balloon_actual_bytes: None,
                guest: None,
            },
            disks: vec![],
            nics: vec![],
            dirty_rate: DirtyRateSample::default(),
            notes: vec![],
        };
        let f = s.figures();
        assert_eq!((f.disk_bytes_per_s, f.net_rx_bytes_per_s), (None, None));
        let disk = |r: f64, w: f64| DiskSample {
            device: "d".into(),
            read_bytes_per_s: r,
            write_bytes_per_s: w,
            read_ops_per_s: 1.0,
            write_ops_per_s: 2.0,
            flush_ops_per_s: 3.0,
        };
        s.disks = vec![disk(1.0, 2.0), disk(10.0, 20.0)];
        s.nics = vec![NicSample {
            name: "net0".into(),
            mac: String::new(),
            tap: None,
            rx_bytes_per_s: None,
            tx_bytes_per_s: None,
            rx_packets_per_s: None,
            tx_packets_per_s: None,
        }];
        let f = s.figures();
        assert_eq!(f.disk_bytes_per_s, Some(33.0));
        assert_eq!(f.disk_ops_per_s, Some(12.0));
        // an untapped NIC has no rates: still unknown, not zero
        assert_eq!(f.net_tx_bytes_per_s, None);
    }
}
