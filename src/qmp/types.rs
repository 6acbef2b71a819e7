//! Project-owned, lenient QMP command types, for commands whose `qapi` (QEMU 9.1 schema) types fail on the QEMU
//! versions we meet (7.2 sends capabilities 9.1 does not know; 8.2 added fields 9.1 requires) or whose enums are
//! closed. Every field is optional or defaulted and every enum is a string, so a newer or older QEMU never breaks
//! a reply. Commands the `qapi` crate types correctly are used from [`qapi::qmp`] directly.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Implements `qapi::Command` for a project-owned command type: `command!(Type, "qmp-name", ReplyType)`.
macro_rules! command {
    ($ty:ident, $name:literal, $ok:ty) => {
        impl qapi::Command for $ty {
            type Ok = $ok;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
    };
}
pub(crate) use command;

/// `query-status`, with the run state as a string.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryStatus {}
command!(QueryStatus, "query-status", StatusInfo);

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct StatusInfo {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub running: bool,
}

/// `query-migrate`, lenient: `status` is a string, every figure optional.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMigrate {}
command!(QueryMigrate, "query-migrate", MigrationInfo);

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<String>,
    pub total_time: Option<u64>,
    pub downtime: Option<u64>,
    pub expected_downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub cpu_throttle_percentage: Option<u64>,
    pub error_desc: Option<String>,
    pub ram: Option<RamStats>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    pub page_size: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
}

impl RamStats {
    /// The dirty page rate in bytes per second (4 KiB pages when the peer does not say). Saturates: the figures
    /// come from the peer, and an absurd one must read as huge, not overflow.
    pub fn dirty_rate_bytes_per_s(&self) -> u64 {
        self.dirty_pages_rate
            .saturating_mul(self.page_size.max(4096))
    }

    /// The throughput in bytes per second, from `mbps` (QEMU's megabits, 10^6 bits, per second). A negative or
    /// non-finite figure reads as 0.
    pub fn throughput_bytes_per_s(&self) -> f64 {
        let bytes = self.mbps * 1e6 / 8.0;
        if bytes.is_finite() && bytes > 0.0 {
            bytes
        } else {
            0.0
        }
    }
}

/// `query-migrate-capabilities` with capability names as strings (7.2 has `compress` and `block`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMigrateCapabilities {}
command!(
    QueryMigrateCapabilities,
    "query-migrate-capabilities",
    Vec<CapabilityState>
);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CapabilityState {
    pub capability: String,
    pub state: bool,
}

/// `migrate-set-capabilities` by name, so capabilities the 9.1 schema lacks can be set too.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<CapabilityState>,
}
command!(
    MigrateSetCapabilities,
    "migrate-set-capabilities",
    qapi::Empty
);

/// `query-migrate-parameters` as a raw map: the set of parameters differs between versions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMigrateParameters {}
command!(QueryMigrateParameters, "query-migrate-parameters", serde_json::Map<String, Value>);

/// `query-dirty-rate`, lenient (`calc-time-unit` only exists from 8.2 on).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryDirtyRate {}
command!(QueryDirtyRate, "query-dirty-rate", DirtyRateInfo);

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// `unstarted`, `measuring` or `measured`.
    #[serde(default)]
    pub status: String,
    /// MB/s (QEMU's unit: 1 MB = 2^20 bytes).
    pub dirty_rate: Option<i64>,
    pub calc_time: Option<i64>,
    pub mode: Option<String>,
    pub sample_pages: Option<u64>,
}

impl DirtyRateInfo {
    /// The measured rate in bytes per second: QEMU's MiB/s times 2^20, saturating; a negative rate reads as 0.
    pub fn dirty_rate_bytes_per_s(&self) -> Option<u64> {
        self.dirty_rate
            .map(|mib| u64::try_from(mib).unwrap_or(0).saturating_mul(1 << 20))
    }
}

/// `calc-dirty-rate` with the mode as a string.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    pub calc_time: u64,
    /// `second` (the default) or `millisecond`; QEMU 8.2 and later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calc_time_unit: Option<String>,
    /// Pages sampled per GiB in `page-sampling` mode (QEMU's default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}
command!(CalcDirtyRate, "calc-dirty-rate", qapi::Empty);

/// `query-qmp-schema`, reduced to what capability detection needs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryQmpSchema {}
command!(QueryQmpSchema, "query-qmp-schema", Vec<SchemaEntry>);

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SchemaEntry {
    pub name: String,
    #[serde(rename = "meta-type")]
    pub meta_type: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_types_accept_replies_the_qapi_schema_rejects() {
        // QEMU 7.2's capability list contains `compress` and `block`, unknown to the 9.1 schema.
        let caps: Vec<CapabilityState> =
            serde_json::from_str(r#"[{"state": false, "capability": "compress"}, {"state": true, "capability": "block"}]"#)
                .unwrap();
        assert_eq!(caps[1].capability, "block");
        // 7.2's query-dirty-rate has no calc-time-unit.
        let d: DirtyRateInfo =
            serde_json::from_str(r#"{"status": "measured", "sample-pages": 512, "dirty-rate": 74, "mode": "page-sampling", "start-time": 1, "calc-time": 1}"#)
                .unwrap();
        assert_eq!(d.dirty_rate, Some(74));
        // An unknown future migration status and missing ram fields.
        let m: MigrationInfo = serde_json::from_str(
            r#"{"status": "some-new-state", "ram": {"transferred": 5, "future-field": 1}}"#,
        )
        .unwrap();
        assert_eq!(m.status.as_deref(), Some("some-new-state"));
        assert_eq!(m.ram.unwrap().transferred, 5);
    }
}

#[cfg(test)]
mod absurd_figures {
    use super::*;

    #[test]
    fn figures_near_u64_max_saturate_instead_of_overflowing() {
        let m: MigrationInfo = serde_json::from_str(
            r#"{"status": "active", "total-time": 18446744073709551615, "ram": {"dirty-pages-rate": 18446744073709551615, "page-size": 18446744073709551615, "mbps": 1.7976931348623157e308}}"#,
        )
        .unwrap();
        assert_eq!(m.total_time, Some(u64::MAX));
        let ram = m.ram.unwrap();
        assert_eq!(ram.dirty_rate_bytes_per_s(), u64::MAX);
        // f64::MAX * 1e6 is infinite: no throughput figure rather than an infinite one.
        assert!(ram.throughput_bytes_per_s().abs() < f64::EPSILON);
        let ram = RamStats {
            dirty_pages_rate: u64::MAX / 4096 + 1,
            page_size: 0,
            mbps: -5.0,
            ..RamStats::default()
        };
        assert_eq!(ram.dirty_rate_bytes_per_s(), u64::MAX);
        assert!(ram.throughput_bytes_per_s().abs() < f64::EPSILON);
        let ram = RamStats {
            dirty_pages_rate: 10,
            page_size: 0,
            mbps: 8.0,
            ..RamStats::default()
        };
        assert_eq!(ram.dirty_rate_bytes_per_s(), 40_960);
        assert!((ram.throughput_bytes_per_s() - 1e6).abs() < 1e-6);

        let rate = |r: i64| {
            DirtyRateInfo {
                dirty_rate: Some(r),
                ..DirtyRateInfo::default()
            }
            .dirty_rate_bytes_per_s()
        };
        assert_eq!(rate(i64::MAX), Some(u64::MAX));
        assert_eq!(rate(i64::MIN), Some(0));
        assert_eq!(rate(74), Some(74 << 20));
        assert_eq!(DirtyRateInfo::default().dirty_rate_bytes_per_s(), None);
    }
}

#[cfg(test)]
mod qemu72_replies {
    use super::*;

    #[test]
    fn completed_query_migrate_from_qemu_7_2() {
        let m: MigrationInfo = serde_json::from_str(r#"{"status": "completed", "setup-time": 0, "downtime": 41, "total-time": 700, "ram": {"total": 268967936, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 34640, "downtime-bytes": 5074266, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 1107.3848799999998, "transferred": 96783128, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 91708862, "duplicate": 42221, "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 96215040, "normal": 23490}}"#).unwrap();
        assert_eq!(m.total_time, Some(700));
        assert_eq!(m.downtime, Some(41));
        assert_eq!(m.ram.unwrap().dirty_sync_count, 3);
    }
}
