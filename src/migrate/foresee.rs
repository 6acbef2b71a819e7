//! Before the start: measuring what the prediction needs (the dirty rate over two windows, the guest's non-zero
//! memory), applying what earlier migrations of the VM taught (`calibrate`), and the pure assembly of the model's
//! input and of the live re-prediction after the first pass.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::calibrate::Calibration;
use crate::predict::{self, Costs, DirtyModel, ModelInput};
use crate::qmp::types::{CalcDirtyRate, QueryDirtyRate};
use crate::qmp::Qmp;
use crate::report::{DirtyRateBefore, DirtyWindow, FirstPassEstimate, LivePrediction, Sample};

use super::ladder::LadderSettings;

/// Pages per GiB `page-sampling` reads (QEMU's ceiling; its default of 512 gives 2 MiB steps on a 256 MiB guest).
const SAMPLE_PAGES_PER_GIB: u64 = 4096;

/// How far each dirty-rate method can be trusted, for the report.
pub fn trust(mode: &str) -> &'static str {
    match mode {
        "page-sampling" => {
            "page-sampling: a hash of a few thousand pages per GiB, compared across the window; pages rewritten \
             with the same bytes are missed, the sampling alone is good to about ±10 % on a 256 MiB guest, and it \
             counts what the guest dirtied while measured: on a host short of CPU the guest dirties less then, and \
             the migration's own counters correct it"
        }
        "dirty-bitmap" => {
            "dirty-bitmap: every page from KVM's dirty log, exact for the window; under TCG it reads 0"
        }
        "dirty-ring" => "dirty-ring: every page from KVM's per-vCPU dirty rings, exact for the window",
        _ => "unknown method",
    }
}

/// Measures the dirty rate over a short window (a quarter of `long`) and over `long`, in page-sampling mode
/// (the only mode that counts under TCG; see stats/sampler.rs). QEMU before 8.2 has no millisecond windows: then
/// one window of whole seconds.
pub async fn measure_dirty(src: &Qmp, long: Duration, ram_bytes: u64) -> Option<DirtyRateBefore> {
    let long_ms = long.as_millis().max(200) as u64;
    let mut windows = Vec::new();
    let mut last = None;
    for window_ms in [long_ms / 4, long_ms] {
        match window(src, window_ms, true).await {
            Ok(w) => {
                windows.push(w.0);
                last = Some(w);
            }
            Err(()) => break,
        }
    }
    if windows.is_empty() {
        let secs = (long_ms / 1000).max(1);
        let w = window(src, secs * 1000, false).await.ok()?;
        windows.push(w.0);
        last = Some(w);
    }
    let (longest, mode) = last?;
    Some(DirtyRateBefore {
        bytes_per_s: (longest.dirtied_bytes as f64 * 1000.0 / longest.window_ms as f64) as u64,
        trust: trust(&mode).to_string(),
        mode,
        calc_time_ms: longest.window_ms,
        model: fit(&windows, ram_bytes),
        windows,
        calibration_factor: None,
    })
}

/// `R` and `W` fitted to measured windows ([`DirtyModel::fit`]).
pub fn fit(windows: &[DirtyWindow], ram_bytes: u64) -> DirtyModel {
    let points: Vec<(f64, f64)> = windows
        .iter()
        .map(|w| (w.window_ms as f64 / 1000.0, w.dirtied_bytes as f64))
        .collect();
    DirtyModel::fit(&points, ram_bytes)
}

/// One `calc-dirty-rate` window; `Err` when QEMU refuses it (no millisecond unit before 8.2).
async fn window(src: &Qmp, window_ms: u64, millis: bool) -> Result<(DirtyWindow, String), ()> {
    let cmd = CalcDirtyRate {
        calc_time: if millis { window_ms } else { window_ms / 1000 },
        calc_time_unit: millis.then(|| "millisecond".to_string()),
        sample_pages: Some(SAMPLE_PAGES_PER_GIB),
        mode: Some("page-sampling".into()),
    };
    if let Err(e) = src.execute_timeout(&cmd, Duration::from_secs(5)).await {
        debug!(vm = %src.label(), "calc-dirty-rate ({window_ms} ms): {e}");
        return Err(());
    }
    let deadline = Instant::now() + Duration::from_millis(window_ms) + Duration::from_secs(5);
    tokio::time::sleep(Duration::from_millis(window_ms)).await;
    while Instant::now() < deadline {
        match src
            .execute_timeout(&QueryDirtyRate {}, Duration::from_secs(3))
            .await
        {
            Ok(d) if d.status == "measured" => {
                let rate = d.dirty_rate_bytes_per_s().unwrap_or(0) as f64;
                return Ok((
                    DirtyWindow {
                        window_ms,
                        dirtied_bytes: (rate * window_ms as f64 / 1000.0) as u64,
                    },
                    d.mode.unwrap_or_else(|| "page-sampling".into()),
                ));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                warn!(vm = %src.label(), "query-dirty-rate: {e}");
                return Err(());
            }
        }
    }
    Err(())
}

/// The first pass's non-zero volume before the start: `sampled` from the host when that worked, else what an
/// earlier migration of the VM found, else all of the RAM.
pub fn first_pass(
    ram_bytes: u64,
    sampled: Option<FirstPassEstimate>,
    remembered_fraction: Option<f64>,
) -> FirstPassEstimate {
    if let Some(e) = sampled {
        return e;
    }
    if let Some(f) = remembered_fraction {
        return FirstPassEstimate {
            nonzero_bytes: (ram_bytes as f64 * f) as u64,
            method: "remembered".into(),
            margin_bytes: None,
            detail: format!("{:.0} % non-zero when this VM last migrated", f * 100.0),
        };
    }
    FirstPassEstimate {
        nonzero_bytes: ram_bytes,
        method: "assumed".into(),
        margin_bytes: None,
        detail: "all of the RAM, as nothing was measured".into(),
    }
}

/// The model's input before the start. Pure.
pub fn model_input(
    ram_bytes: u64,
    first: &FirstPassEstimate,
    dirty: Option<&DirtyRateBefore>,
    link: Link,
    downtime_limit: Duration,
    throttle_works: bool,
) -> ModelInput {
    let model = dirty.map_or(DirtyModel::unbounded(0.0, ram_bytes), |d| {
        d.model
            .scaled(d.calibration_factor.unwrap_or(1.0), ram_bytes)
    });
    ModelInput {
        ram_bytes,
        throttle_works,
        nonzero_bytes: first.nonzero_bytes.min(ram_bytes),
        page_bytes: 4096,
        dirty: model,
        throughput_bytes_per_s: link.stream_bytes_per_s,
        switchover_throughput_bytes_per_s: link.link_bytes_per_s,
        downtime_limit,
        costs: Costs::default(),
    }
}

/// What the stream will get, before anything was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Under the cap: `B`.
    pub stream_bytes_per_s: f64,
    /// Without it (the stop-and-copy): `B_s`.
    pub link_bytes_per_s: f64,
}

/// The throughput the stream will get before anything was measured: the cap, the slower NIC between inventory
/// hosts (`u64::MAX` when unknown), and what this link gave before; the link alone for the stop-and-copy.
pub fn throughput(
    cap_bytes_per_s: u64,
    link_bound_bytes_per_s: u64,
    remembered: Option<f64>,
) -> Link {
    let nic = (link_bound_bytes_per_s != u64::MAX).then_some(link_bound_bytes_per_s as f64);
    let link = match (nic, remembered) {
        (Some(n), Some(r)) => n.min(r),
        (Some(n), None) => n,
        (None, Some(r)) => r,
        (None, None) => predict::DEFAULT_LINK_BYTES_PER_S,
    };
    Link {
        stream_bytes_per_s: link.min(cap_bytes_per_s as f64 * predict::CAP_OVERSHOOT),
        link_bytes_per_s: link,
    }
}

/// Applies what the calibration remembers of `vm` to the pre-start measurement.
pub fn calibrate(dirty: &mut DirtyRateBefore, cal: &Calibration, vm: &str) {
    dirty.calibration_factor = cal.dirty_factor(vm, &dirty.mode);
}

/// The re-prediction once the first pass is sent: `first_pass_s` it took, `samples` so far (the newest is in the
/// second pass). The model keeps the pre-start shape scaled to what QEMU found dirtied in the first pass. Pure.
pub fn after_first_pass(
    input: &ModelInput,
    settings: &LadderSettings,
    samples: &[Sample],
    poll_interval: Duration,
) -> Option<LivePrediction> {
    let now = samples.last()?;
    if now.pass != 2 {
        return None;
    }
    // The pass began at the sync, at most one poll ago: add back what was sent since, half a poll on average.
    let prev = samples.iter().rev().find(|s| s.pass < 2)?;
    let first_pass_s = (now.at_ms + prev.at_ms) as f64 / 2000.0;
    let bw = if now.throughput_bytes_per_s > 0.0 {
        now.throughput_bytes_per_s
    } else {
        input.throughput_bytes_per_s
    };
    let since_sync_s = (now.at_ms - prev.at_ms) as f64 / 2000.0;
    // What the sync found: what is left now and what was sent since; of it, what the first pass had left unsent
    // (up to the threshold, memory outside the working set) was not dirtied.
    let found = now.remaining_bytes as f64 + bw * since_sync_s.min(poll_interval.as_secs_f64());
    let threshold = bw * now.downtime_limit_ms as f64 / 1000.0;
    let unsent = (threshold - bw * input.costs.sync_margin.as_secs_f64()).max(0.0);
    let dirtied = (found - unsent).max(found * 0.1);
    let predicted = input.dirty.dirtied_in(first_pass_s);
    let (model, factor) = if predicted > 0.0 {
        let f = dirtied / predicted;
        (input.dirty.scaled(f, input.ram_bytes), Some(f))
    } else {
        (
            DirtyModel::unbounded(dirtied / first_pass_s.max(1e-3), input.ram_bytes),
            None,
        )
    };
    let live = ModelInput {
        dirty: model,
        throughput_bytes_per_s: bw,
        ..*input
    };
    let prediction = predict::run_from(
        &live,
        settings,
        &predict::Start {
            elapsed: Duration::from_secs_f64(first_pass_s),
            pass: 2,
            volume_bytes: found as u64,
            sent_bytes: prev.transferred_bytes,
            downtime_limit: Duration::from_millis(now.downtime_limit_ms),
        },
    );
    Some(LivePrediction {
        at_ms: now.at_ms,
        model,
        dirty_factor: factor,
        throughput_bytes_per_s: bw,
        prediction,
    })
}

/// What a finished migration teaches about its VM and link. Pure.
pub fn lesson(
    report: &crate::report::MigrationReport,
    cap_bytes_per_s: u64,
) -> crate::calibrate::Lesson {
    let before = report.dirty_rate_before.as_ref();
    // Relative to the raw pre-start figures: the live factor on top of the one already applied.
    let dirty_factor = report
        .forecast_after_first_pass
        .as_ref()
        .and_then(|l| l.dirty_factor)
        .map(|f| f * before.and_then(|b| b.calibration_factor).unwrap_or(1.0));
    let after_first = report.samples.iter().find(|s| s.pass >= 2);
    let nonzero_fraction = after_first
        .filter(|_| report.ram_bytes > 0)
        .map(|s| (1.0 - (s.zero_pages * 4096) as f64 / report.ram_bytes as f64).clamp(0.0, 1.0));
    let gave_up_on_throttle = report
        .escalations
        .iter()
        .any(|e| e.reason.contains(super::ladder::THROTTLE_NOT_WORKING));
    let throttle_worked = if gave_up_on_throttle {
        Some(false)
    } else if report.max_throttle_pct > 0
        && report.outcome == crate::report::Outcome::Completed
        && !report.postcopy
    {
        Some(true)
    } else {
        None
    };
    // The first pass's own throughput, when it stayed clearly below the cap: that is the link.
    let first: Vec<f64> = report
        .samples
        .iter()
        .filter(|s| s.pass == 1 && s.throughput_bytes_per_s > 0.0)
        .map(|s| s.throughput_bytes_per_s)
        .collect();
    let mean = (!first.is_empty()).then(|| first.iter().sum::<f64>() / first.len() as f64);
    let link_throughput_bytes_per_s = mean.filter(|m| *m < cap_bytes_per_s as f64 * 0.9);
    crate::calibrate::Lesson {
        method: before.map(|b| b.mode.clone()),
        dirty_factor,
        nonzero_fraction,
        throttle_worked,
        link_throughput_bytes_per_s,
    }
}
