//! `qmigrate dirty-rate`: the dirty page rate of one VM as a time series, one measurement after another, each with
//! the windowed average and the AR(1) prediction of the series so far (`history`). Connects per measurement, so the
//! QMP socket is free between measurements. Printing is the caller's; this module measures and keeps the series.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::history::{Series, DEFAULT_CAPACITY};
use super::{sampler, SampleOptions, StatsError};

const METRIC: &str = "dirty_rate_bytes_per_s";

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Each measurement spans this (QEMU measures whole seconds, at least 1 s).
    pub interval: Duration,
    pub command_timeout: Duration,
    /// Stop after this many measurements (failed ones included); `None` runs until cancelled.
    pub count: Option<u64>,
    /// The window of the average.
    pub window: Duration,
}

/// One measurement and what the series says so far.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// When the measurement ended (RFC 3339, UTC).
    pub time: String,
    /// Seconds since the first measurement started.
    pub elapsed_s: f64,
    pub bytes_per_s: Option<f64>,
    /// The `calc-dirty-rate` mode QEMU measured with.
    pub mode: Option<String>,
    /// Mean of the measurements in the last `window_s` seconds.
    pub average_bytes_per_s: Option<f64>,
    pub window_s: f64,
    /// AR(1) one-step prediction of the next measurement.
    pub predicted_next_bytes_per_s: Option<f64>,
    /// Why a figure is missing (the VM migrates, the measurement did not finish).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Measurement {
    /// One line for people: time, rate, mode, average, prediction.
    pub fn to_line(&self) -> String {
        let mib = |v: Option<f64>| {
            v.map_or_else(
                || "-".to_string(),
                |b| format!("{:.1} MiB/s", b / (1024.0 * 1024.0)),
            )
        };
        let mut line = format!(
            "{}  {:>12}  {:<13}  avg({}s) {:>12}  next {:>12}",
            self.time,
            mib(self.bytes_per_s),
            self.mode.as_deref().unwrap_or("-"),
            self.window_s,
            mib(self.average_bytes_per_s),
            mib(self.predicted_next_bytes_per_s),
        );
        for n in &self.notes {
            line.push_str("  (");
            line.push_str(n);
            line.push(')');
        }
        line
    }
}

/// Measures until `opts.count` measurements were made or `cancel` fires, handing each result to `each` as it comes.
/// Returns how many measurements gave a rate.
pub async fn watch(
    socket: &str,
    opts: &WatchOptions,
    cancel: &CancellationToken,
    mut each: impl FnMut(Result<&Measurement, &StatsError>),
) -> u64 {
    let mut sample = SampleOptions::new(opts.interval);
    sample.command_timeout = opts.command_timeout;
    sample.vm_timeout = opts.interval.max(Duration::from_secs(1)) + opts.command_timeout * 2;
    // Only the dirty rate is wanted: no balloon polling is switched on in the guest for it, and the lines name no VM.
    sample.guest_stats = false;
    sample.query_name = false;
    let mut series = Series::new(DEFAULT_CAPACITY);
    let origin = Instant::now();
    let (mut made, mut measured) = (0u64, 0u64);
    while opts.count.is_none_or(|c| made < c) {
        let result = tokio::select! {
            r = tokio::time::timeout(sample.vm_timeout, sampler::sample_vm(socket, &sample)) => r,
            () = cancel.cancelled() => break,
        };
        made += 1;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(StatsError::Timeout {
                socket: socket.into(),
                after: sample.vm_timeout,
            }),
        };
        match result {
            Ok(s) => {
                let at = origin.elapsed();
                if let Some(v) = s.dirty_rate.bytes_per_s {
                    // Stamps come from one monotonic clock, and the sampler's rates are finite: push cannot fail.
                    let _ = series.push(METRIC, at, v);
                    measured += 1;
                }
                let m = Measurement {
                    time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                    elapsed_s: at.as_secs_f64(),
                    bytes_per_s: s.dirty_rate.bytes_per_s,
                    mode: s.dirty_rate.mode,
                    average_bytes_per_s: series.average_over(opts.window),
                    window_s: opts.window.as_secs_f64(),
                    predicted_next_bytes_per_s: series.predict_next(),
                    notes: s
                        .notes
                        .into_iter()
                        .filter(|n| n.contains("dirty rate"))
                        .collect(),
                };
                each(Ok(&m));
            }
            Err(e) => {
                each(Err(&e));
                // A dead socket fails at once: wait out the interval before trying again.
                if opts.count.is_none_or(|c| made < c) {
                    tokio::select! {
                        () = tokio::time::sleep(opts.interval) => {}
                        () = cancel.cancelled() => break,
                    }
                }
            }
        }
    }
    measured
}
