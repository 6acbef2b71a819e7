//! One sample of one VM over an interval, from its QMP socket and the host alone (no guest agent): QEMU's `-name`
//! (when asked), run state, vCPU utilisation, memory and balloon, disk and NIC rates, and the dirty page rate.
//! Every QMP command is bounded by the connection's command timeout; the caller bounds the whole sample.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use super::procfs::{self, IfCounters};
use super::{
    DirtyRateSample, DiskSample, GuestMemory, MemorySample, NicSample, SampleOptions, StatsError,
    VcpuSample, VmSample,
};
use crate::qmp::stats_types::{
    BlockDeviceStats, GuestStats, HumanMonitorCommand, QomGet, QomList, QomSet, QueryBalloon,
    QueryBlockstats, QueryCpusFast, QueryKvm, QueryMemorySizeSummary, QueryRxFilter,
};
use crate::qmp::types::{CalcDirtyRate, QueryDirtyRate, QueryMigrate, QueryStatus};
use crate::qmp::{ConnectOptions, Qmp};

/// Migration states in which no dirty-rate measurement may start: it would fight the migration for the dirty log.
const MIGRATION_ACTIVE: &[&str] = &[
    "setup",
    "active",
    "pre-switchover",
    "device",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "postcopy-recover-setup",
    "wait-unplug",
    "cancelling",
    "colo",
];

/// Measurement modes of `calc-dirty-rate` under KVM, most precise first: dirty-ring needs a KVM dirty ring (QEMU
/// rejects it at once otherwise, so trying costs one round trip), dirty-bitmap the KVM dirty log.
const KVM_DIRTY_RATE_MODES: &[&str] = &["dirty-ring", "dirty-bitmap", "page-sampling"];

/// Under TCG only page-sampling counts anything: QEMU accepts dirty-bitmap there but measures 0 (seen on 7.2 and
/// 10.0 with a guest dirtying 64 MiB as fast as it can).
const TCG_DIRTY_RATE_MODES: &[&str] = &["page-sampling"];

/// Samples one VM over `opts.interval`.
pub async fn sample_vm(socket: &str, opts: &SampleOptions) -> Result<VmSample, StatsError> {
    let connect = ConnectOptions {
        handshake_timeout: opts.command_timeout,
        command_timeout: opts.command_timeout,
        ..ConnectOptions::default()
    };
    let qmp = Qmp::connect(socket, &connect).await?;
    let mut notes = Vec::new();
    let status = qmp.execute(&QueryStatus {}).await?;
    let qemu_name = if opts.query_name {
        match qmp.execute(&qapi::qmp::query_name {}).await {
            Ok(info) => info.name,
            // A QEMU that will not say: the VM is named by its socket.
            Err(e) if e.qmp_class().is_some() => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let cpus = qmp.execute(&QueryCpusFast {}).await?;
    let pid = qmp.peer_pid();
    if pid.is_none() {
        notes.push("no QEMU pid (not a local UNIX socket): no vCPU utilisation".to_string());
    }
    let summary = qmp.execute(&QueryMemorySizeSummary {}).await?;
    let balloon_actual = match qmp.execute(&QueryBalloon {}).await {
        Ok(b) => Some(b.actual),
        Err(e) if e.qmp_class().is_some() => None, // no balloon device
        Err(e) => return Err(e.into()),
    };
    let balloon_path = if opts.guest_stats {
        find_balloon(&qmp).await?
    } else {
        None
    };
    if let Some(path) = &balloon_path {
        start_guest_stats(&qmp, path, opts.interval, &mut notes).await?;
    }
    let nics = nic_taps(&qmp, &mut notes).await?;

    // First readings, taken together so that every rate covers the same stretch.
    let disks_before = block_counters(&qmp).await?;
    let taps_before = tap_counters(&nics);
    let ticks_before = pid.map(|p| thread_ticks(p, &cpus));
    let started = Instant::now();
    let dirty_mode = if opts.dirty_rate {
        start_dirty_rate(&qmp, opts.interval, &mut notes).await?
    } else {
        None
    };

    tokio::time::sleep(opts.interval).await;

    let disks_after = block_counters(&qmp).await?;
    let taps_after = tap_counters(&nics);
    let ticks_after = pid.map(|p| thread_ticks(p, &cpus));
    let elapsed_s = started.elapsed().as_secs_f64();

    let vcpus: Vec<VcpuSample> = cpus
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let pct = match (&ticks_before, &ticks_after) {
                (Some(b), Some(a)) => match (b[i], a[i]) {
                    (Some(b), Some(a)) => Some(ticks_pct(a.saturating_sub(b), elapsed_s)),
                    _ => None,
                },
                _ => None,
            };
            VcpuSample {
                index: c.cpu_index,
                thread_id: c.thread_id,
                cpu_pct: pct,
            }
        })
        .collect();
    let measured: Vec<f64> = vcpus.iter().filter_map(|v| v.cpu_pct).collect();
    let (cpu_total_pct, cpu_pct) = if measured.is_empty() || measured.len() != vcpus.len() {
        (None, None)
    } else {
        let total: f64 = measured.iter().sum();
        #[allow(clippy::cast_precision_loss)]
        (Some(total), Some(total / measured.len() as f64))
    };

    let disks = disks_after
        .iter()
        .map(|(device, after)| {
            let before = disks_before.get(device).copied().unwrap_or(*after);
            let rate = |a: u64, b: u64| rate_per_s(a.saturating_sub(b), elapsed_s);
            DiskSample {
                device: device.clone(),
                read_bytes_per_s: rate(after.rd_bytes, before.rd_bytes),
                write_bytes_per_s: rate(after.wr_bytes, before.wr_bytes),
                read_ops_per_s: rate(after.rd_operations, before.rd_operations),
                write_ops_per_s: rate(after.wr_operations, before.wr_operations),
                flush_ops_per_s: rate(after.flush_operations, before.flush_operations),
            }
        })
        .collect();

    let nics = nics
        .into_iter()
        .zip(taps_before.into_iter().zip(taps_after))
        .map(|((name, mac, tap), (before, after))| {
            // The tap sees the guest's traffic mirrored: what the host sends into the tap the guest receives.
            let rates = match (before, after) {
                (Some(b), Some(a)) => {
                    let r = |a: u64, b: u64| Some(rate_per_s(a.saturating_sub(b), elapsed_s));
                    (
                        r(a.tx_bytes, b.tx_bytes),
                        r(a.rx_bytes, b.rx_bytes),
                        r(a.tx_packets, b.tx_packets),
                        r(a.rx_packets, b.rx_packets),
                    )
                }
                _ => (None, None, None, None),
            };
            NicSample {
                name,
                mac,
                tap,
                rx_bytes_per_s: rates.0,
                tx_bytes_per_s: rates.1,
                rx_packets_per_s: rates.2,
                tx_packets_per_s: rates.3,
            }
        })
        .collect();

    let dirty_rate = match dirty_mode {
        Some(mode) => finish_dirty_rate(&qmp, mode, opts, &mut notes).await?,
        None => DirtyRateSample::default(),
    };

    let guest = match &balloon_path {
        Some(path) => guest_memory(&qmp, path, &mut notes).await?,
        None => None,
    };

    Ok(VmSample {
        socket: socket.to_string(),
        qemu_name,
        pid,
        run_state: status.status,
        interval_ms: u64::try_from(opts.interval.as_millis()).unwrap_or(u64::MAX),
        vcpus,
        cpu_pct,
        cpu_total_pct,
        memory: MemorySample {
            ram_bytes: summary.base_memory,
            plugged_bytes: summary.plugged_memory.unwrap_or(0),
            balloon_actual_bytes: balloon_actual,
            guest,
        },
        disks,
        nics,
        dirty_rate,
        notes,
    })
}

fn ticks_pct(ticks: u64, elapsed_s: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let busy_s = ticks as f64 / procfs::USER_HZ;
    busy_s * 100.0 / elapsed_s
}

fn rate_per_s(delta: u64, elapsed_s: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let d = delta as f64;
    d / elapsed_s
}

fn thread_ticks(pid: i32, cpus: &[crate::qmp::stats_types::CpuInfoFast]) -> Vec<Option<u64>> {
    cpus.iter()
        .map(|c| procfs::read_thread_ticks(pid, c.thread_id).ok())
        .collect()
}

/// The balloon device's QOM path: a `virtio-balloon*` child of `/machine/peripheral` (devices with an id) or
/// `/machine/peripheral-anon`.
async fn find_balloon(qmp: &Qmp) -> Result<Option<String>, StatsError> {
    for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let children = match qmp
            .execute(&QomList {
                path: parent.into(),
            })
            .await
        {
            Ok(c) => c,
            Err(e) if e.qmp_class().is_some() => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(c) = children
            .iter()
            .find(|c| c.kind.starts_with("child<virtio-balloon"))
        {
            return Ok(Some(format!("{parent}/{}", c.name)));
        }
    }
    Ok(None)
}

/// Makes the guest report memory statistics. The interval stays set after we leave: turning it off again would
/// leave the next sample without figures, and the cost to the guest is one small virtio message per interval.
async fn start_guest_stats(
    qmp: &Qmp,
    path: &str,
    interval: Duration,
    notes: &mut Vec<String>,
) -> Result<(), StatsError> {
    const PROP: &str = "guest-stats-polling-interval";
    let current = qmp
        .execute(&QomGet {
            path: path.into(),
            property: PROP.into(),
        })
        .await;
    let current_s = match current {
        Ok(v) => v.as_i64().unwrap_or(0),
        Err(e) if e.qmp_class().is_some() => {
            notes.push(format!("balloon {path}: no guest statistics ({e})"));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // Poll at least once per sample interval so the figures are fresh when the sample ends.
    let want_s = i64::try_from(interval.as_secs()).unwrap_or(i64::MAX).max(1);
    if current_s == 0 || current_s > want_s {
        match qmp
            .execute(&QomSet {
                path: path.into(),
                property: PROP.into(),
                value: json!(want_s),
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.qmp_class().is_some() => {
                notes.push(format!(
                    "balloon {path}: cannot enable guest statistics ({e})"
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn guest_memory(
    qmp: &Qmp,
    path: &str,
    notes: &mut Vec<String>,
) -> Result<Option<GuestMemory>, StatsError> {
    let raw = match qmp
        .execute(&QomGet {
            path: path.into(),
            property: "guest-stats".into(),
        })
        .await
    {
        Ok(v) => v,
        Err(e) if e.qmp_class().is_some() => {
            notes.push(format!("balloon {path}: no guest statistics ({e})"));
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    // Guest statistics are a bonus: one that cannot be read costs a note, never the VM's whole sample.
    let stats: GuestStats = match serde_json::from_value(raw) {
        Ok(s) => s,
        Err(e) => {
            notes.push(format!("balloon {path}: unreadable guest statistics ({e})"));
            return Ok(None);
        }
    };
    if stats.last_update == 0 {
        notes.push("the guest has not reported memory statistics yet".into());
        return Ok(None);
    }
    // The guest reports all ones (uint64 -1) for what it does not know.
    let known = |v: Option<u64>| v.filter(|v| *v != u64::MAX);
    let s = &stats.stats;
    Ok(Some(GuestMemory {
        total_bytes: known(s.stat_total_memory),
        free_bytes: known(s.stat_free_memory),
        available_bytes: known(s.stat_available_memory),
        swap_in_bytes: known(s.stat_swap_in),
        swap_out_bytes: known(s.stat_swap_out),
        major_faults: known(s.stat_major_faults),
        last_update_s: stats.last_update,
    }))
}

/// The VM's NICs (name, MAC) and the tap behind each, if any.
async fn nic_taps(
    qmp: &Qmp,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, String, Option<String>)>, StatsError> {
    let filters = match qmp.execute(&QueryRxFilter {}).await {
        Ok(f) => f,
        Err(e) if e.qmp_class().is_some() => {
            notes.push(format!("no NIC list ({e})"));
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    if filters.is_empty() {
        return Ok(Vec::new());
    }
    let peers = match qmp
        .execute(&HumanMonitorCommand {
            command_line: "info network".into(),
        })
        .await
    {
        Ok(text) => procfs::parse_info_network(&text),
        Err(e) if e.qmp_class().is_some() => {
            notes.push(format!("cannot map NICs to host interfaces ({e})"));
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    Ok(filters
        .into_iter()
        .map(|f| {
            let tap = peers
                .iter()
                .find(|p| p.nic == f.name)
                .and_then(|p| p.ifname.clone());
            if tap.is_none() {
                notes.push(format!("NIC {}: no tap device behind it, no rates", f.name));
            }
            (f.name, f.main_mac, tap)
        })
        .collect())
}

fn tap_counters(nics: &[(String, String, Option<String>)]) -> Vec<Option<IfCounters>> {
    nics.iter()
        .map(|(_, _, tap)| {
            tap.as_deref()
                .and_then(|t| procfs::read_if_counters(t).ok())
        })
        .collect()
}

async fn block_counters(qmp: &Qmp) -> Result<BTreeMap<String, BlockDeviceStats>, StatsError> {
    let entries = qmp.execute(&QueryBlockstats {}).await?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let name = [e.device, e.qdev, e.node_name]
                .into_iter()
                .flatten()
                .find(|n| !n.is_empty())?;
            Some((name, e.stats))
        })
        .collect())
}

/// Starts a dirty-rate measurement unless the VM migrates; returns the mode QEMU accepted.
async fn start_dirty_rate(
    qmp: &Qmp,
    interval: Duration,
    notes: &mut Vec<String>,
) -> Result<Option<&'static str>, StatsError> {
    let migration = qmp.execute(&QueryMigrate {}).await?;
    if let Some(status) = migration.status.as_deref() {
        if MIGRATION_ACTIVE.contains(&status) {
            notes.push(format!(
                "dirty rate not measured: the VM is migrating ({status})"
            ));
            return Ok(None);
        }
    }
    // calc-time is in whole seconds on 7.2 (8.2 added milliseconds): the measurement spans the interval, at least 1 s.
    let calc_time = interval.as_secs().max(1);
    let kvm = match qmp.execute(&QueryKvm {}).await {
        Ok(k) => k.enabled,
        Err(e) if e.qmp_class().is_some() => false,
        Err(e) => return Err(e.into()),
    };
    let modes = if kvm {
        KVM_DIRTY_RATE_MODES
    } else {
        TCG_DIRTY_RATE_MODES
    };
    let mut last_error = None;
    for mode in modes {
        match qmp
            .execute(&CalcDirtyRate {
                calc_time,
                calc_time_unit: None,
                sample_pages: None,
                mode: Some((*mode).into()),
            })
            .await
        {
            Ok(_) => return Ok(Some(mode)),
            Err(e) if e.qmp_class().is_some() => last_error = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(e) = last_error {
        notes.push(format!("dirty rate not measured ({e})"));
    }
    Ok(None)
}

async fn finish_dirty_rate(
    qmp: &Qmp,
    mode: &'static str,
    opts: &SampleOptions,
    notes: &mut Vec<String>,
) -> Result<DirtyRateSample, StatsError> {
    // The measurement ends about calc-time after it started; page-sampling then hashes the sampled pages again.
    let deadline = Instant::now() + opts.command_timeout;
    loop {
        let info = qmp.execute(&QueryDirtyRate {}).await?;
        if info.status == "measured" {
            #[allow(clippy::cast_precision_loss)]
            let bytes = info.dirty_rate_bytes_per_s().map(|b| b as f64);
            return Ok(DirtyRateSample {
                bytes_per_s: bytes,
                mode: Some(info.mode.unwrap_or_else(|| mode.into())),
            });
        }
        if Instant::now() >= deadline {
            notes.push(format!(
                "dirty rate not measured: still {} after the interval",
                info.status
            ));
            return Ok(DirtyRateSample {
                bytes_per_s: None,
                mode: Some(mode.into()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
