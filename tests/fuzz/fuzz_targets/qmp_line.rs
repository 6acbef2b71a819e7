//! One line from a QMP peer, as the reader task sees it: [`decode_line`] must classify any bytes without
//! panicking, and every lenient reply type must decode (or refuse) any JSON without panicking, through the same
//! `serde_json::from_value` the connection uses, including the helpers that do arithmetic on peer figures.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qmigrate::qmp::stats_types::{
    GuestStats, HumanMonitorCommand, QomGet, QomList, QomSet, QueryBalloon, QueryBlockstats,
    QueryCpusFast, QueryKvm, QueryMemorySizeSummary, QueryRxFilter,
};
use qmigrate::qmp::types::{
    CalcDirtyRate, MigrateSetCapabilities, QueryDirtyRate, QueryMigrate, QueryMigrateCapabilities,
    QueryMigrateParameters, QueryQmpSchema, QueryStatus,
};
use qmigrate::qmp::{decode_line, Decoded, ReplyOutcome};
use serde_json::Value;

/// Decodes `v` as the reply type of command `C`, as `Qmp::execute` does.
fn reply<C: qapi::Command>(v: &Value) -> Option<C::Ok> {
    serde_json::from_value::<C::Ok>(v.clone()).ok()
}

fn every_reply_type(v: &Value) {
    if let Some(m) = reply::<QueryMigrate>(v) {
        if let Some(ram) = m.ram {
            let _ = ram.dirty_rate_bytes_per_s();
            assert!(ram.throughput_bytes_per_s() >= 0.0);
        }
    }
    if let Some(d) = reply::<QueryDirtyRate>(v) {
        let _ = d.dirty_rate_bytes_per_s();
    }
    let _ = reply::<QueryStatus>(v);
    let _ = reply::<QueryMigrateCapabilities>(v);
    let _ = reply::<MigrateSetCapabilities>(v);
    let _ = reply::<QueryMigrateParameters>(v);
    let _ = reply::<CalcDirtyRate>(v);
    let _ = reply::<QueryQmpSchema>(v);
    let _ = reply::<QueryCpusFast>(v);
    let _ = reply::<QueryMemorySizeSummary>(v);
    let _ = reply::<QueryBalloon>(v);
    let _ = reply::<QomList>(v);
    let _ = reply::<QomGet>(v);
    let _ = reply::<QomSet>(v);
    let _ = reply::<QueryBlockstats>(v);
    let _ = reply::<QueryKvm>(v);
    let _ = reply::<QueryRxFilter>(v);
    let _ = serde_json::from_value::<GuestStats>(v.clone());
    if let Some(text) = reply::<HumanMonitorCommand>(v) {
        // `info network` text from the peer, parsed to find each NIC's tap.
        let _ = qmigrate::stats::procfs::parse_info_network(&text);
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one line, then line by line as the framing would split it.
    for line in std::iter::once(data).chain(data.split(|b| *b == b'\n')) {
        match decode_line(line) {
            Decoded::Reply {
                outcome: ReplyOutcome::Return(v),
                ..
            } => every_reply_type(&v),
            Decoded::Event(ev) => every_reply_type(&ev.data),
            Decoded::Unrecognised => {
                if let Ok(v) = serde_json::from_slice::<Value>(line) {
                    every_reply_type(&v);
                }
            }
            _ => {}
        }
    }
    // And the input as the reply payload itself, so the fuzzer need not wrap it in {"return": …}.
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        every_reply_type(&v);
    }
});
