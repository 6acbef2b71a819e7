//! PURE precopy prediction: from RAM (or what remains), dirty rate, bandwidth and the downtime limit to an
//! expected number of passes, total time, downtime and a convergence verdict. No I/O.
//!
//! The model is the classic iterative precopy: pass 0 sends `volume_bytes`; each later pass sends what was
//! dirtied while the previous one ran, `min(dirty_rate × t_prev, volume_bytes)`; the migration switches over
//! once a pass would fit inside the downtime limit. With `dirty_rate / bandwidth = r`, pass volumes shrink as
//! r^n, so r ≥ 1 never converges. The dirty rate QEMU samples before a migration (`calc-dirty-rate`) runs low
//! (it was measured at about a third of the migration's own figure here), so callers re-predict from the
//! migration's live counters once it runs.

use std::time::Duration;

use serde::Serialize;

/// The most passes the model follows before it calls the migration non-convergent.
pub const MAX_PASSES: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecopyInput {
    /// What the first pass has to send (the guest RAM, or what remains of it mid-migration).
    pub volume_bytes: u64,
    pub dirty_rate_bytes_per_s: f64,
    pub bandwidth_bytes_per_s: f64,
    pub downtime_limit: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Precopy switches over within [`MAX_PASSES`] passes.
    Converges,
    /// The dirty rate reaches or exceeds the bandwidth: the remaining data never shrinks enough.
    Diverges,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub verdict: Verdict,
    pub passes: u32,
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub transferred_bytes: u64,
    /// dirty rate / bandwidth.
    pub dirty_to_bandwidth_ratio: f64,
    pub reason: String,
}

/// Predicts precopy's outcome.
pub fn precopy(input: &PrecopyInput) -> Prediction {
    let bw = input.bandwidth_bytes_per_s.max(1.0);
    let dirty = input.dirty_rate_bytes_per_s.max(0.0);
    let ratio = dirty / bw;
    let limit_s = input.downtime_limit.as_secs_f64();
    let mut volume = input.volume_bytes as f64;
    let mut elapsed_s = 0.0;
    let mut sent = 0.0;
    for pass in 1..=MAX_PASSES {
        let t = volume / bw;
        // The first pass always runs live: QEMU only considers switching over once it has sent everything once.
        if pass > 1 && t <= limit_s {
            // This pass is the stop-and-copy: it runs while the guest is paused.
            return Prediction {
                verdict: Verdict::Converges,
                passes: pass,
                total_time_ms: ms(elapsed_s + t),
                downtime_ms: ms(t),
                transferred_bytes: (sent + volume) as u64,
                dirty_to_bandwidth_ratio: ratio,
                reason: format!(
                    "pass {pass} leaves {} to send in {} at {}/s, within the {} downtime limit",
                    bytes(volume),
                    fmt_s(t),
                    bytes(bw),
                    fmt_s(limit_s)
                ),
            };
        }
        elapsed_s += t;
        sent += volume;
        volume = (dirty * t).min(input.volume_bytes as f64);
    }
    let reason = if ratio >= 1.0 {
        format!(
            "dirty rate {}/s is at least the bandwidth {}/s: every pass re-sends as much as it sent",
            bytes(dirty),
            bytes(bw)
        )
    } else {
        format!(
            "after {MAX_PASSES} passes {} remain, {} at {}/s, above the {} downtime limit",
            bytes(volume),
            fmt_s(volume / bw),
            bytes(bw),
            fmt_s(limit_s)
        )
    };
    Prediction {
        verdict: Verdict::Diverges,
        passes: MAX_PASSES,
        total_time_ms: ms(elapsed_s),
        downtime_ms: ms(volume / bw),
        transferred_bytes: sent as u64,
        dirty_to_bandwidth_ratio: ratio,
        reason,
    }
}

/// The downtime limit that would let a migration with `remaining_bytes` left switch over now.
pub fn downtime_needed(remaining_bytes: u64, bandwidth_bytes_per_s: f64) -> Duration {
    Duration::from_secs_f64(remaining_bytes as f64 / bandwidth_bytes_per_s.max(1.0))
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

fn fmt_s(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else {
        format!("{s:.1}s")
    }
}

pub(crate) fn bytes(b: f64) -> String {
    bytesize::ByteSize(b.max(0.0) as u64).to_string_as(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    fn case(ram_mib: f64, dirty_mib_s: f64, bw_mib_s: f64, downtime_ms: u64) -> Prediction {
        precopy(&PrecopyInput {
            volume_bytes: (ram_mib * MIB) as u64,
            dirty_rate_bytes_per_s: dirty_mib_s * MIB,
            bandwidth_bytes_per_s: bw_mib_s * MIB,
            downtime_limit: Duration::from_millis(downtime_ms),
        })
    }

    #[test]
    fn verdicts_table() {
        // (ram MiB, dirty MiB/s, bandwidth MiB/s, downtime ms) -> verdict, passes
        let table = [
            ((2048.0, 0.0, 1024.0, 300), Verdict::Converges, 2),
            ((256.0, 10.0, 100.0, 300), Verdict::Converges, 2),
            ((256.0, 200.0, 32.0, 300), Verdict::Diverges, MAX_PASSES),
            ((256.0, 32.0, 32.0, 300), Verdict::Diverges, MAX_PASSES),
            ((16.0, 0.0, 1024.0, 300), Verdict::Converges, 2),
            ((256.0, 90.0, 100.0, 300), Verdict::Converges, 22),
            ((256.0, 99.0, 100.0, 300), Verdict::Diverges, MAX_PASSES),
        ];
        for ((ram, dirty, bw, dt), verdict, passes) in table {
            let p = case(ram, dirty, bw, dt);
            assert_eq!(p.verdict, verdict, "{ram} {dirty} {bw} {dt}: {}", p.reason);
            assert_eq!(p.passes, passes, "{ram} {dirty} {bw} {dt}: {}", p.reason);
        }
    }

    #[test]
    fn geometric_times_add_up() {
        // 256 MiB at 128 MiB/s = 2 s; 10% dirty ratio: 25.6 MiB (0.2 s) fits a 300 ms limit on pass 2.
        let p = case(256.0, 12.8, 128.0, 300);
        assert_eq!(p.verdict, Verdict::Converges);
        assert_eq!(p.passes, 2);
        assert_eq!(p.total_time_ms, 2200);
        assert_eq!(p.downtime_ms, 200);
        assert!((p.dirty_to_bandwidth_ratio - 0.1).abs() < 1e-9);
    }

    #[test]
    fn downtime_needed_is_remaining_over_bandwidth() {
        assert_eq!(
            downtime_needed(50 * 1024 * 1024, 100.0 * MIB),
            Duration::from_millis(500)
        );
    }
}
