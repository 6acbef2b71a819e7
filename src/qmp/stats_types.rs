//! Lenient QMP command types for sampling a VM's statistics (`stats`): vCPU threads, memory, balloon, QOM access,
//! block statistics, NICs. Like [`super::types`], every reply field is optional or defaulted, so a QEMU older or
//! newer than the `qapi` crate's schema (7.2's `query-blockstats` fails there) never breaks a reply.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::types::command;

/// `query-cpus-fast`: one entry per vCPU with the host thread running it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryCpusFast {}
command!(QueryCpusFast, "query-cpus-fast", Vec<CpuInfoFast>);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct CpuInfoFast {
    pub cpu_index: u32,
    pub thread_id: i64,
    pub qom_path: String,
}

/// `query-memory-size-summary`: boot memory and hot-plugged memory, in bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMemorySizeSummary {}
command!(
    QueryMemorySizeSummary,
    "query-memory-size-summary",
    MemorySizeSummary
);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct MemorySizeSummary {
    pub base_memory: u64,
    pub plugged_memory: Option<u64>,
}

/// `query-balloon`: the memory the balloon leaves the guest, in bytes. Fails (`DeviceNotActive`) without a
/// balloon.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryBalloon {}
command!(QueryBalloon, "query-balloon", BalloonInfo);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct BalloonInfo {
    pub actual: u64,
}

/// `qom-list`: the children and properties at a QOM path.
#[derive(Debug, Clone, Serialize)]
pub struct QomList {
    pub path: String,
}
command!(QomList, "qom-list", Vec<QomProperty>);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct QomProperty {
    pub name: String,
    /// `child<virtio-balloon-pci>`, `link<…>`, `int`, …
    #[serde(rename = "type")]
    pub kind: String,
}

/// `qom-get` of one property, as raw JSON.
#[derive(Debug, Clone, Serialize)]
pub struct QomGet {
    pub path: String,
    pub property: String,
}
command!(QomGet, "qom-get", Value);

/// `qom-set` of one property.
#[derive(Debug, Clone, Serialize)]
pub struct QomSet {
    pub path: String,
    pub property: String,
    pub value: Value,
}
command!(QomSet, "qom-set", Value);

/// A virtio-balloon's `guest-stats` property. Statistics the guest does not report are all ones (QEMU's uint64 -1,
/// sent as 18446744073709551615); `last-update` is 0
/// until the guest has answered once after `guest-stats-polling-interval` was set.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct GuestStats {
    pub last_update: i64,
    pub stats: GuestStatsValues,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct GuestStatsValues {
    pub stat_free_memory: Option<u64>,
    pub stat_available_memory: Option<u64>,
    pub stat_total_memory: Option<u64>,
    pub stat_swap_in: Option<u64>,
    pub stat_swap_out: Option<u64>,
    pub stat_major_faults: Option<u64>,
    pub stat_minor_faults: Option<u64>,
    pub stat_disk_caches: Option<u64>,
}

/// `query-blockstats`, lenient.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryBlockstats {}
command!(QueryBlockstats, "query-blockstats", Vec<BlockStatsEntry>);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct BlockStatsEntry {
    /// The drive id (`virtio0`); empty for `-blockdev` devices, which have `qdev` instead.
    pub device: Option<String>,
    pub node_name: Option<String>,
    pub qdev: Option<String>,
    pub stats: BlockDeviceStats,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
}

/// `query-kvm`: whether the VM runs under KVM (dirty-bitmap and dirty-ring dirty-rate modes need it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryKvm {}
command!(QueryKvm, "query-kvm", KvmInfo);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// `query-rx-filter` over every NIC: names and MACs (an empty list when the VM has none).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryRxFilter {}
command!(QueryRxFilter, "query-rx-filter", Vec<RxFilterInfo>);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct RxFilterInfo {
    pub name: String,
    pub main_mac: String,
}

/// `human-monitor-command`: QMP has no command that names a tap netdev's host interface on 7.2, HMP's
/// `info network` does.
#[derive(Debug, Clone, Serialize)]
pub struct HumanMonitorCommand {
    #[serde(rename = "command-line")]
    pub command_line: String,
}
command!(HumanMonitorCommand, "human-monitor-command", String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_from_qemu_7_2_and_10() {
        let cpus: Vec<CpuInfoFast> = serde_json::from_str(
            r#"[{"thread-id": 4242, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}]"#,
        )
        .unwrap();
        assert_eq!(cpus[0].thread_id, 4242);
        let b: Vec<BlockStatsEntry> = serde_json::from_str(
            r##"[{"device": "virtio0", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend", "node-name": "#block123", "stats": {"rd_bytes": 10, "wr_bytes": 20, "wr_operations": 2, "rd_operations": 1, "flush_operations": 3, "timed_stats": [], "account_invalid": true, "invalid_rd_operations": 0}, "parent": {"stats": {}}}]"##,
        )
        .unwrap();
        assert_eq!(b[0].stats.wr_bytes, 20);
        assert_eq!(b[0].stats.flush_operations, 3);
        let g: GuestStats = serde_json::from_str(
            r#"{"stats": {"stat-htlb-pgalloc": 0, "stat-swap-out": 0, "stat-available-memory": 200000000, "stat-free-memory": 190000000, "stat-total-memory": 230000000, "stat-major-faults": 12, "stat-disk-caches": 18446744073709551615, "stat-swap-in": 0, "stat-minor-faults": 999}, "last-update": 1700000000}"#,
        )
        .unwrap();
        assert_eq!(g.stats.stat_available_memory, Some(200_000_000));
        // What a guest does not report, as QEMU 10 sends it (seen on a guest that never ran).
        assert_eq!(g.stats.stat_disk_caches, Some(u64::MAX));
    }
}
