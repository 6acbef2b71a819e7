//! PURE migration prediction: from what the first pass really sends, how the guest dirties memory, the link and
//! the downtime limit to passes, total time, downtime and a verdict — for precopy alone and for the whole ladder
//! of escalations a run may take. No I/O. The model and its formulas are in docs/prediction.md.
//!
//! - First pass: `t₁ = setup + nonzero_bytes / B + zero_pages × zero_page_cost` (zero pages cost a header).
//! - Dirtying: in a window of `t` seconds the guest dirties `D(t) = W · (1 − e^(−R·t/W))` distinct bytes: rate
//!   `R` at first, never more than its writable working set `W` (random writes over `W`; `W = ∞` gives `R·t`).
//! - Pass `k + 1` re-sends what pass `k` left dirty: `V(k+1) = D(t(k))`, with `t(k) = V(k) / B + pass_overhead`.
//! - Switch-over once a pass would fit the downtime limit: `V(k) ≤ B · downtime_limit`; the downtime is then
//!   `V(k) / B + switchover`.
//! - `B` is the measured link throughput where it is below the `--bandwidth` cap, else the cap.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::migrate::ladder::{self, Action, Ladder, LadderSettings};

/// The link speed assumed for the stop-and-copy when nothing better is known: a UNIX socket between two QEMUs
/// on these machines moved 16 MiB of stop-and-copy in 16 ms.
pub const DEFAULT_LINK_BYTES_PER_S: f64 = 1024.0 * 1024.0 * 1024.0;

/// QEMU's stream runs this much above `max-bandwidth`: the first pass of 256 MiB guests here went at 35 MiB/s
/// under a 32 MiB/s cap, 69 under 64 and 139 under 128 (tests/fixtures/traces).
pub const CAP_OVERSHOOT: f64 = 1.08;

/// The most passes [`precopy`] follows before it calls the migration non-convergent.
pub const MAX_PASSES: u32 = 30;

/// How a guest dirties memory: `D(t) = W · (1 − e^(−R·t/W))` distinct bytes in `t` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyModel {
    /// `R`: how fast it dirties pages it has not dirtied yet, at the start of a window.
    pub rate_bytes_per_s: f64,
    /// `W`: the writable working set, the most a window of any length can dirty.
    pub working_set_bytes: f64,
}

impl DirtyModel {
    /// Dirtying at `rate` without a working-set bound below `ram_bytes`.
    pub fn unbounded(rate_bytes_per_s: f64, ram_bytes: u64) -> DirtyModel {
        DirtyModel {
            rate_bytes_per_s: rate_bytes_per_s.max(0.0),
            working_set_bytes: ram_bytes as f64,
        }
    }

    /// Distinct bytes dirtied in a window of `t_s` seconds.
    pub fn dirtied_in(&self, t_s: f64) -> f64 {
        let w = self.working_set_bytes;
        let r = self.rate_bytes_per_s;
        if w <= 0.0 || r <= 0.0 || t_s <= 0.0 {
            return 0.0;
        }
        w * (1.0 - (-r * t_s / w).exp())
    }

    /// The same shape, scaled by `factor` (a calibration: `W` and `R` grow or shrink together).
    pub fn scaled(&self, factor: f64, ram_bytes: u64) -> DirtyModel {
        let f = factor.max(0.0);
        DirtyModel {
            rate_bytes_per_s: self.rate_bytes_per_s * f,
            working_set_bytes: (self.working_set_bytes * f).min(ram_bytes as f64),
        }
    }

    /// With the guest's vCPUs throttled by `throttle_pct`: the rate falls, the working set stays.
    pub fn throttled(&self, throttle_pct: u64) -> DirtyModel {
        DirtyModel {
            rate_bytes_per_s: self.rate_bytes_per_s * (1.0 - throttle_pct.min(100) as f64 / 100.0),
            ..*self
        }
    }

    /// Fits `R` and `W` to windows measured before the start: `(window seconds, distinct bytes dirtied)`. Two
    /// windows of different lengths give both; one gives `R` only (`W` = the RAM). A longer window that dirtied
    /// no more than a shorter one means the working set filled within the shorter: `W` is what they dirtied.
    pub fn fit(windows: &[(f64, f64)], ram_bytes: u64) -> DirtyModel {
        let ram = ram_bytes as f64;
        let mut w: Vec<(f64, f64)> = windows
            .iter()
            .copied()
            .filter(|(t, d)| *t > 0.0 && d.is_finite() && *d >= 0.0)
            .collect();
        w.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (Some(&(t1, d1)), Some(&(t2, d2))) = (w.first(), w.last()) else {
            return DirtyModel::unbounded(0.0, ram_bytes);
        };
        if w.len() < 2 || t2 <= t1 * 1.05 || d1 <= 0.0 {
            return DirtyModel::unbounded(d2.max(d1) / t2, ram_bytes);
        }
        let ratio = d2 / d1;
        let linear = t2 / t1;
        if ratio >= linear * 0.95 {
            // Still growing in proportion: no bound seen below the RAM.
            return DirtyModel::unbounded(d2 / t2, ram_bytes);
        }
        if ratio <= 1.02 {
            // Saturated within the shorter window: both counted W (each with its sampling error, so their mean);
            // R at least fills W within the shorter.
            let ws = ((d1 + d2) / 2.0).min(ram);
            return DirtyModel {
                rate_bytes_per_s: ws * 3.0 / t1,
                working_set_bytes: ws,
            };
        }
        // Solve (1 − e^(−x·t2)) / (1 − e^(−x·t1)) = ratio for x = R/W by bisection; the left side falls from
        // t2/t1 (x → 0) to 1 (x → ∞).
        let g = |x: f64| (1.0 - (-x * t2).exp()) / (1.0 - (-x * t1).exp());
        let (mut lo, mut hi) = (1e-9, 1e3 / t1);
        for _ in 0..100 {
            let mid = (lo * hi).sqrt();
            if g(mid) > ratio {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let x = (lo * hi).sqrt();
        let ws = (d1 / (1.0 - (-x * t1).exp())).min(ram);
        DirtyModel {
            rate_bytes_per_s: x * ws,
            working_set_bytes: ws,
        }
    }
}

/// Fixed costs of a migration outside the bytes it sends, measured on recorded migrations (docs/prediction.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// From `migrate` to the first page sent.
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms",
        rename = "setup_ms"
    )]
    pub setup: Duration,
    /// Each dirty-bitmap sync between passes.
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms",
        rename = "pass_overhead_ms"
    )]
    pub pass_overhead: Duration,
    /// Stopping the guest, the device state and starting the destination, beyond the last RAM.
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms",
        rename = "switchover_ms"
    )]
    pub switchover: Duration,
    /// Scanning a zero page and sending its header.
    pub zero_page_ns: f64,
    /// QEMU checks what is left after each iteration of sending (at most 50 ms of it), so it syncs with, on
    /// average, this much of sending below the threshold still unsent.
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms",
        rename = "sync_margin_ms"
    )]
    pub sync_margin: Duration,
}

impl Default for Costs {
    fn default() -> Costs {
        Costs {
            setup: Duration::from_millis(20),
            pass_overhead: Duration::from_millis(10),
            switchover: Duration::from_millis(15),
            zero_page_ns: 150.0,
            sync_margin: Duration::from_millis(25),
        }
    }
}

/// Everything the model predicts from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelInput {
    pub ram_bytes: u64,
    /// What the first pass sends whole: the non-zero pages.
    pub nonzero_bytes: u64,
    pub page_bytes: u64,
    pub dirty: DirtyModel,
    /// Whether throttling the vCPUs slows this guest's dirtying. Unknown counts as no: under TCG a 64 MiB random
    /// dirtier's rate was seen unchanged at 81 % and 99 % throttle (docs/prediction.md). Without it the simulated
    /// throttle rung runs its course (the ladder's patience) and changes nothing.
    #[serde(default)]
    pub throttle_works: bool,
    /// `B`: the throughput the stream will get (the cap, or the link where that is slower).
    pub throughput_bytes_per_s: f64,
    /// `B_s`: the throughput of the stop-and-copy. QEMU lifts the bandwidth cap once the guest is stopped, so
    /// this is the link's own speed (a UNIX socket on these machines: over 1 GB/s).
    pub switchover_throughput_bytes_per_s: f64,
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms",
        rename = "downtime_limit_ms"
    )]
    pub downtime_limit: Duration,
    pub costs: Costs,
}

impl ModelInput {
    /// What is known without a closer look: all of the RAM non-zero, dirtying without a bound below the RAM.
    pub fn plain(
        ram_bytes: u64,
        dirty_rate_bytes_per_s: f64,
        throughput_bytes_per_s: f64,
        downtime_limit: Duration,
    ) -> ModelInput {
        ModelInput {
            ram_bytes,
            nonzero_bytes: ram_bytes,
            page_bytes: 4096,
            dirty: DirtyModel::unbounded(dirty_rate_bytes_per_s, ram_bytes),
            throttle_works: false,
            throughput_bytes_per_s,
            switchover_throughput_bytes_per_s: throughput_bytes_per_s.max(DEFAULT_LINK_BYTES_PER_S),
            downtime_limit,
            costs: Costs::default(),
        }
    }

    fn zero_pages(&self) -> f64 {
        (self.ram_bytes.saturating_sub(self.nonzero_bytes) / self.page_bytes.max(1)) as f64
    }

    /// `t₁`: the first pass, set-up included.
    pub fn first_pass_s(&self) -> f64 {
        self.costs.setup.as_secs_f64()
            + self.nonzero_bytes as f64 / self.bw()
            + self.zero_pages() * self.costs.zero_page_ns * 1e-9
    }

    fn bw(&self) -> f64 {
        self.throughput_bytes_per_s.max(1.0)
    }

    /// `T = B · L`: QEMU syncs the dirty bitmap once what it has left to send falls to this, and switches over
    /// when what the sync finds is no more.
    fn threshold(&self, limit_s: f64) -> f64 {
        self.bw() * limit_s
    }

    /// What is left unsent when QEMU syncs after a pass: the threshold, less the margin of its last iteration.
    fn unsent_at_sync(&self, threshold: f64) -> f64 {
        (threshold - self.bw() * self.costs.sync_margin.as_secs_f64()).max(0.0)
    }

    /// What a sync finds to send: the `unsent` pages and those `dirtied` since the last sync, the dirtied ones
    /// spread over the working set and so partly among the unsent.
    fn after_sync(&self, unsent: f64, dirtied: f64) -> f64 {
        let w = self.dirty.working_set_bytes.max(1.0);
        unsent + dirtied * (1.0 - (unsent / w).min(1.0))
    }

    /// The stop-and-copy of `volume` bytes: sent at the link's own speed, plus the fixed switch-over cost.
    fn downtime_s(&self, volume: f64) -> f64 {
        volume / self.switchover_throughput_bytes_per_s.max(self.bw())
            + self.costs.switchover.as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Precopy switches over.
    Converges,
    /// The remaining data never shrinks to what the downtime limit allows.
    Diverges,
}

/// How a run is predicted to end with the rungs it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// Precopy switches over (possibly after escalations).
    Precopy,
    /// Switches to postcopy, which always completes.
    Postcopy,
    /// Stopped at the timeout and finished offline (`--on-timeout pause`).
    Offline,
    /// Cancelled at the timeout: the guest stays on the source.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Predicts plain precopy (no escalation) from `volume_bytes` left to send, with the first pass costed as in
/// `input` when `volume_bytes` is the whole first pass.
pub fn precopy(input: &ModelInput) -> Prediction {
    let bw = input.bw();
    let limit_s = input.downtime_limit.as_secs_f64();
    let overhead_s = input.costs.pass_overhead.as_secs_f64();
    let ratio = input.dirty.rate_bytes_per_s / bw;
    let threshold = input.threshold(limit_s);
    let first_unsent = input
        .unsent_at_sync(threshold)
        .min(input.nonzero_bytes as f64);
    let mut t = (input.first_pass_s() - first_unsent / bw).max(input.costs.setup.as_secs_f64());
    let mut elapsed_s = t;
    let mut sent = input.nonzero_bytes as f64 - first_unsent;
    let mut volume = first_unsent + input.dirty.dirtied_in(t);
    for pass in 2..=MAX_PASSES {
        let send_s = volume / bw;
        if volume <= threshold {
            let downtime_s = input.downtime_s(volume);
            return Prediction {
                verdict: Verdict::Converges,
                passes: pass,
                total_time_ms: ms(elapsed_s + downtime_s),
                downtime_ms: ms(downtime_s),
                transferred_bytes: (sent + volume) as u64,
                dirty_to_bandwidth_ratio: ratio,
                reason: format!(
                    "pass {pass} leaves {} to send in {} at {}/s, within the {} downtime limit",
                    bytes(volume),
                    fmt_s(send_s),
                    bytes(bw),
                    fmt_s(limit_s)
                ),
            };
        }
        // QEMU sends down to the threshold, then syncs: the next pass is what it left plus what was dirtied.
        let unsent = input.unsent_at_sync(threshold);
        t = (volume - unsent) / bw + overhead_s;
        elapsed_s += t;
        sent += volume - unsent;
        volume = input.after_sync(unsent, input.dirty.dirtied_in(t));
    }
    let fits = input.dirty.working_set_bytes / bw;
    let reason = if ratio >= 1.0 && fits > limit_s {
        format!(
            "dirty rate {}/s is at least the bandwidth {}/s and its working set {} needs {} of downtime: every \
             pass re-sends as much as it sent",
            bytes(input.dirty.rate_bytes_per_s),
            bytes(bw),
            bytes(input.dirty.working_set_bytes),
            fmt_s(fits)
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

/// A run predicted with qmigrate's ladder: the model feeds the real [`Ladder`] pass by pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPrediction {
    pub ending: Ending,
    pub passes: u32,
    pub total_time_ms: u64,
    /// The guest's pause: the stop-and-copy, or the whole offline finish.
    pub downtime_ms: u64,
    pub transferred_bytes: u64,
    /// The escalations the ladder is predicted to take, in order, as `report::action_name` writes them.
    pub escalations: Vec<String>,
    pub reason: String,
}

impl RunPrediction {
    /// Completes within the timeout with the guest on the destination.
    pub fn completes(&self) -> bool {
        self.ending != Ending::Cancelled
    }
}

/// Where the simulated run is.
enum SimPhase {
    Precopy,
    Postcopy,
    Offline,
}

/// Predicts the run as qmigrate will drive it: precopy pass by pass, the ladder consulted after each, its
/// downtime raises, throttling (the rate falls by the throttle, QEMU's ramp applied each pass), postcopy and the
/// timeout action. A step of the simulation is one pass, cut at the timeout.
pub fn run(input: &ModelInput, settings: &LadderSettings) -> RunPrediction {
    run_from(input, settings, &Start::default())
}

/// Where a prediction starts: the first pass (the default), or a running migration after its first pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Start {
    /// Time already spent.
    pub elapsed: Duration,
    /// The pass about to run; 0 or 1 is the first.
    pub pass: u32,
    /// What that pass has to send (ignored for the first: the non-zero RAM).
    pub volume_bytes: u64,
    pub sent_bytes: u64,
    /// The downtime limit in force (zero: the ladder's initial one).
    pub downtime_limit: Duration,
}

/// [`run`] from a later point of the migration.
pub fn run_from(input: &ModelInput, settings: &LadderSettings, start: &Start) -> RunPrediction {
    let bw = input.bw();
    let overhead_s = input.costs.pass_overhead.as_secs_f64();
    let switchover_s = input.costs.switchover.as_secs_f64();
    let timeout_s = settings.timeout.as_secs_f64();
    let mut ladder = Ladder::new(settings.clone());
    let mut limit_s = if start.downtime_limit.is_zero() {
        settings.downtime.as_secs_f64()
    } else {
        start.downtime_limit.as_secs_f64()
    };
    let mut throttle: Option<SimThrottle> = None;
    if settings.auto_converge == ladder::AutoConverge::On {
        throttle = Some(SimThrottle::new(20, 10, 99));
    }
    // QEMU's dirty rate: pages found dirty at the syncs of a period of at least a second, over that period.
    let mut rate = RateWindow::new(start.elapsed.as_secs_f64());
    let mut escalations = Vec::new();
    let mut phase = SimPhase::Precopy;
    let mut t = input.first_pass_s();
    let mut elapsed_s = start.elapsed.as_secs_f64();
    let mut sent = start.sent_bytes as f64;
    let mut pass: u32 = start.pass.max(1);
    let mut volume = if pass == 1 {
        input.nonzero_bytes as f64
    } else {
        start.volume_bytes as f64
    };
    let done =
        |ending, passes, total_s: f64, down_s: f64, sent: f64, esc: Vec<String>, why: String| {
            RunPrediction {
                ending,
                passes,
                total_time_ms: ms(total_s),
                downtime_ms: ms(down_s),
                transferred_bytes: sent as u64,
                escalations: esc,
                reason: why,
            }
        };
    loop {
        match phase {
            SimPhase::Postcopy => {
                // The guest runs on the destination; what is left arrives at the link's pace.
                let rest_s = volume / bw;
                return done(
                    Ending::Postcopy,
                    pass,
                    elapsed_s + switchover_s + rest_s,
                    switchover_s,
                    sent + volume,
                    escalations,
                    format!(
                        "postcopy after {}: {} left arrive in {}",
                        fmt_s(elapsed_s),
                        bytes(volume),
                        fmt_s(rest_s)
                    ),
                );
            }
            SimPhase::Offline => {
                let rest_s = volume / bw + switchover_s;
                return done(
                    Ending::Offline,
                    pass,
                    elapsed_s + rest_s,
                    rest_s,
                    sent + volume,
                    escalations,
                    format!(
                        "stopped at {} with {} left, sent in {} with the guest paused",
                        fmt_s(elapsed_s),
                        bytes(volume),
                        fmt_s(rest_s)
                    ),
                );
            }
            SimPhase::Precopy => {}
        }
        let threshold = input.threshold(limit_s);
        if pass > 1 && volume <= threshold {
            let down_s = input.downtime_s(volume);
            return done(
                Ending::Precopy,
                pass,
                elapsed_s + down_s,
                down_s,
                sent + volume,
                escalations,
                format!(
                    "pass {pass} leaves {} to send within the {} downtime limit",
                    bytes(volume),
                    fmt_s(limit_s)
                ),
            );
        }
        // QEMU sends down to the threshold, then syncs. What the first pass leaves unsent is memory outside the
        // working set; what later passes leave is in it.
        let unsent = input.unsent_at_sync(threshold).min(volume);
        t = if pass > 1 {
            (volume - unsent) / bw + overhead_s
        } else {
            (t - unsent / bw).max(input.costs.setup.as_secs_f64())
        };
        let cut = elapsed_s + t >= timeout_s;
        let step_s = if cut { timeout_s - elapsed_s } else { t };
        let dirty = match &throttle {
            Some(th) if input.throttle_works => input.dirty.throttled(th.pct),
            _ => input.dirty,
        };
        let dirtied = dirty.dirtied_in(step_s);
        sent += (step_s.max(0.0) * bw).min(volume - unsent);
        elapsed_s += step_s;
        volume = if cut {
            // Mid-pass: what the pass has not sent yet, and what it dirtied.
            input.after_sync((volume - step_s * bw).max(unsent), dirtied)
        } else if pass == 1 {
            unsent + dirtied
        } else {
            input.after_sync(unsent, dirtied)
        };
        if !cut {
            pass += 1;
        }
        // QEMU counts the pages a sync newly finds dirty, not those dirtied again while already unsent.
        let period_ended = rate.add(elapsed_s, (volume - unsent).max(0.0));
        if let Some(th) = throttle.as_mut().filter(|_| period_ended) {
            th.period_ended();
        }
        let obs = ladder::Observation {
            elapsed: Duration::from_secs_f64(elapsed_s),
            pass: pass as u64,
            remaining_bytes: volume as u64,
            throughput_bytes_per_s: bw,
            dirty_rate_bytes_per_s: rate.bytes_per_s,
            throttle_pct: throttle.as_ref().map_or(0, |t| t.pct),
            pass_volume_bytes: volume as u64,
        };
        if let Some(step) = ladder.step(&obs) {
            escalations.push(crate::report::action_name(&step.action));
            match step.action {
                Action::RaiseDowntime { to } => limit_s = to.as_secs_f64(),
                Action::Throttle {
                    initial_pct,
                    increment_pct,
                    max_pct,
                } => {
                    throttle = Some(SimThrottle::new(
                        initial_pct as u64,
                        increment_pct as u64,
                        max_pct as u64,
                    ))
                }
                Action::StartPostcopy => phase = SimPhase::Postcopy,
                Action::PauseSource => phase = SimPhase::Offline,
                Action::Cancel => {
                    return done(
                        Ending::Cancelled,
                        pass,
                        elapsed_s,
                        0.0,
                        sent,
                        escalations,
                        step.reason,
                    )
                }
            }
        } else if cut {
            // The ladder always acts at the timeout; this only guards the loop.
            return done(
                Ending::Cancelled,
                pass,
                elapsed_s,
                0.0,
                sent,
                escalations,
                "timeout".into(),
            );
        }
        if pass > 10_000 {
            return done(
                Ending::Cancelled,
                pass,
                elapsed_s,
                0.0,
                sent,
                escalations,
                "no end in 10000 passes".into(),
            );
        }
    }
}

/// QEMU's auto-converge as the simulation sees it: it judges the guest at the end of each period of at least a
/// second (a sync), and throttles (first `initial`, then `increment` more) after two periods in a row found it
/// dirtying too fast — a stalled migration always does.
struct SimThrottle {
    pct: u64,
    initial: u64,
    increment: u64,
    max: u64,
    periods: u32,
}

impl SimThrottle {
    fn new(initial: u64, increment: u64, max: u64) -> SimThrottle {
        SimThrottle {
            pct: 0,
            initial: initial.min(max),
            increment,
            max,
            periods: 0,
        }
    }

    fn period_ended(&mut self) {
        self.periods += 1;
        if self.periods.is_multiple_of(2) {
            self.pct = if self.pct == 0 {
                self.initial
            } else {
                (self.pct + self.increment).min(self.max)
            };
        }
    }
}

/// QEMU's `dirty-pages-rate`: updated at a sync once at least a second passed since the last update.
struct RateWindow {
    since_s: f64,
    dirtied: f64,
    bytes_per_s: f64,
}

impl RateWindow {
    fn new(now_s: f64) -> RateWindow {
        RateWindow {
            since_s: now_s,
            dirtied: 0.0,
            bytes_per_s: 0.0,
        }
    }

    /// Counts a sync; true when it ended a period.
    fn add(&mut self, now_s: f64, dirtied: f64) -> bool {
        self.dirtied += dirtied;
        if now_s - self.since_s < 1.0 {
            return false;
        }
        self.bytes_per_s = self.dirtied / (now_s - self.since_s);
        self.since_s = now_s;
        self.dirtied = 0.0;
        true
    }
}

/// What would make a run that is predicted not to complete complete: the flags to suggest, each with its
/// predicted result. Pure: re-runs [`run`] with each change.
pub fn remedies(input: &ModelInput, settings: &LadderSettings) -> Vec<(String, RunPrediction)> {
    let mut out = Vec::new();
    if settings.postcopy == ladder::Postcopy::Never {
        let s = LadderSettings {
            postcopy: ladder::Postcopy::Fallback,
            ..settings.clone()
        };
        out.push(("--postcopy fallback".to_string(), run(input, &s)));
    }
    if settings.on_timeout == ladder::OnTimeout::Cancel {
        let s = LadderSettings {
            on_timeout: ladder::OnTimeout::Pause,
            ..settings.clone()
        };
        out.push(("--on-timeout pause".to_string(), run(input, &s)));
    }
    // The downtime the working set needs, with a quarter of headroom, rounded up to 100 ms.
    let need_s = input.dirty.working_set_bytes / input.bw() * 1.25;
    let need = Duration::from_millis(((need_s * 10.0).ceil() as u64).max(1) * 100);
    if need > settings.max_downtime {
        let s = LadderSettings {
            max_downtime: need,
            ..settings.clone()
        };
        let p = run(input, &s);
        if p.completes() {
            out.push((
                format!("--max-downtime {}", humantime::format_duration(need)),
                p,
            ));
        }
    }
    out.retain(|(_, p)| p.completes());
    out
}

/// The downtime limit that would let a migration with `remaining_bytes` left switch over now.
pub fn downtime_needed(remaining_bytes: u64, bandwidth_bytes_per_s: f64) -> Duration {
    Duration::from_secs_f64(remaining_bytes as f64 / bandwidth_bytes_per_s.max(1.0))
}

fn ms(s: f64) -> u64 {
    (s.max(0.0) * 1000.0).round() as u64
}

pub(crate) fn fmt_s(s: f64) -> String {
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
    use crate::migrate::ladder::{AutoConverge, OnTimeout, Postcopy};

    const MIB: f64 = 1024.0 * 1024.0;

    fn input(ram_mib: f64, nonzero_mib: f64, dirty: DirtyModel, bw_mib_s: f64) -> ModelInput {
        ModelInput {
            ram_bytes: (ram_mib * MIB) as u64,
            nonzero_bytes: (nonzero_mib * MIB) as u64,
            page_bytes: 4096,
            dirty,
            throttle_works: true,
            throughput_bytes_per_s: bw_mib_s * MIB,
            switchover_throughput_bytes_per_s: DEFAULT_LINK_BYTES_PER_S,
            downtime_limit: Duration::from_millis(300),
            costs: Costs::default(),
        }
    }

    fn dirty(rate_mib_s: f64, ws_mib: f64) -> DirtyModel {
        DirtyModel {
            rate_bytes_per_s: rate_mib_s * MIB,
            working_set_bytes: ws_mib * MIB,
        }
    }

    fn settings(ac: AutoConverge, pc: Postcopy, on_timeout: OnTimeout) -> LadderSettings {
        LadderSettings {
            downtime: Duration::from_millis(300),
            max_downtime: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            auto_converge: ac,
            max_throttle_pct: 99,
            postcopy: pc,
            on_timeout,
        }
    }

    #[test]
    fn dirtied_bytes_grow_at_the_rate_then_stop_at_the_working_set() {
        let d = dirty(100.0, 16.0);
        assert!((d.dirtied_in(0.01) / MIB - 1.0).abs() < 0.05);
        assert!(d.dirtied_in(10.0) <= 16.0 * MIB);
        assert!(d.dirtied_in(10.0) > 15.9 * MIB);
        assert_eq!(d.dirtied_in(0.0), 0.0);
        // A VM dirtying 16 MiB never re-sends more than 16 MiB a pass, at any rate.
        for rate in [1.0, 100.0, 10_000.0] {
            assert!(dirty(rate, 16.0).dirtied_in(60.0) <= 16.0 * MIB);
        }
    }

    #[test]
    fn fit_table() {
        let ram = (256.0 * MIB) as u64;
        let truth = dirty(16.0, 64.0);
        // windows (s, MiB) -> rate MiB/s, working set MiB (±10 %)
        type Windows = Vec<(f64, f64)>;
        let table: Vec<(Windows, f64, f64)> = vec![
            // Growing in proportion: a rate, no bound below the RAM.
            (vec![(0.25, 4.0), (1.0, 16.0)], 16.0, 256.0),
            // Saturated already in the short window (the 64 MiB random dirtier measured here).
            (vec![(0.25, 62.0), (1.0, 62.0)], 744.0, 62.0),
            // The exponential itself is recovered.
            (
                vec![
                    (0.25, truth.dirtied_in(0.25) / MIB),
                    (1.0, truth.dirtied_in(1.0) / MIB),
                ],
                16.0,
                64.0,
            ),
            // One window: a rate only.
            (vec![(1.0, 30.0)], 30.0, 256.0),
            // Nothing dirtied.
            (vec![(0.25, 0.0), (1.0, 0.0)], 0.0, 256.0),
        ];
        for (windows, rate, ws) in table {
            let w: Vec<(f64, f64)> = windows.iter().map(|(t, d)| (*t, d * MIB)).collect();
            let m = DirtyModel::fit(&w, ram);
            let close = |a: f64, b: f64| (a - b).abs() <= b.abs() * 0.1 + 0.01;
            assert!(close(m.rate_bytes_per_s / MIB, rate), "{windows:?}: {m:?}");
            assert!(close(m.working_set_bytes / MIB, ws), "{windows:?}: {m:?}");
        }
    }

    #[test]
    fn precopy_verdicts_table() {
        // (nonzero MiB, rate MiB/s, working set MiB, bandwidth MiB/s) -> verdict
        let table = [
            ((93.0, 2.0, 256.0, 32.0), Verdict::Converges),
            ((120.0, 500.0, 16.0, 64.0), Verdict::Converges),
            ((150.0, 500.0, 64.0, 64.0), Verdict::Diverges),
            ((150.0, 500.0, 64.0, 256.0), Verdict::Converges),
            ((256.0, 200.0, 256.0, 32.0), Verdict::Diverges),
            ((256.0, 10.0, 256.0, 100.0), Verdict::Converges),
        ];
        for ((nz, rate, ws, bw), want) in table {
            let p = precopy(&input(256.0, nz, dirty(rate, ws), bw));
            assert_eq!(p.verdict, want, "{nz} {rate} {ws} {bw}: {}", p.reason);
        }
    }

    #[test]
    fn zero_pages_cost_almost_nothing() {
        // The idle guest measured here: 93 MiB non-zero of 256 at 32 MiB/s took 2.6-2.9 s, not 8.
        let p = precopy(&input(256.0, 93.0, dirty(2.0, 256.0), 32.0));
        assert_eq!(p.verdict, Verdict::Converges);
        assert!((2500..3300).contains(&p.total_time_ms), "{p:?}");
    }

    #[test]
    fn run_table() {
        use AutoConverge::{Auto, Off};
        use OnTimeout::{Cancel, Pause};
        use Postcopy::{Fallback, Never};
        // (rate MiB/s, working set MiB, bandwidth MiB/s, settings) -> ending, an escalation it takes
        let table = [
            (
                (2.0, 256.0, 32.0, (Auto, Never, Cancel)),
                Ending::Precopy,
                None,
            ),
            (
                (500.0, 16.0, 64.0, (Auto, Never, Cancel)),
                Ending::Precopy,
                None,
            ),
            // 40 MiB re-sent each pass needs 1.25 s at 32 MiB/s: the ladder raises the limit to 1 s, then throttles.
            (
                (500.0, 40.0, 64.0, (Off, Never, Cancel)),
                Ending::Precopy,
                Some("downtime"),
            ),
            (
                (500.0, 64.0, 32.0, (Off, Never, Cancel)),
                Ending::Cancelled,
                None,
            ),
            (
                (500.0, 64.0, 32.0, (Off, Fallback, Cancel)),
                Ending::Postcopy,
                Some("postcopy"),
            ),
            (
                (500.0, 64.0, 32.0, (Off, Never, Pause)),
                Ending::Offline,
                Some("pause source"),
            ),
            (
                (100.0, 256.0, 64.0, (Auto, Never, Cancel)),
                Ending::Precopy,
                Some("throttle"),
            ),
        ];
        for ((rate, ws, bw, (ac, pc, ot)), ending, esc) in table {
            let p = run(
                &input(256.0, 150.0, dirty(rate, ws), bw),
                &settings(ac, pc, ot),
            );
            assert_eq!(p.ending, ending, "{rate} {ws} {bw}: {p:?}");
            if let Some(e) = esc {
                assert!(
                    p.escalations.iter().any(|x| x.starts_with(e)),
                    "{rate} {ws} {bw}: {p:?}"
                );
            }
            if ending == Ending::Cancelled {
                assert!(!p.completes());
                assert!(p.total_time_ms >= 60_000, "{p:?}");
            }
        }
    }

    #[test]
    fn remedies_name_the_flags_that_make_a_hopeless_run_complete() {
        let i = input(256.0, 150.0, dirty(500.0, 64.0), 32.0);
        let s = settings(AutoConverge::Off, Postcopy::Never, OnTimeout::Cancel);
        assert!(!run(&i, &s).completes());
        let r = remedies(&i, &s);
        let flags: Vec<&str> = r.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            flags,
            [
                "--postcopy fallback",
                "--on-timeout pause",
                "--max-downtime 2s 500ms"
            ]
        );
        assert!(r.iter().all(|(_, p)| p.completes()));
    }

    #[test]
    fn run_from_a_later_pass_counts_the_time_already_spent() {
        let i = input(256.0, 93.0, dirty(2.0, 256.0), 32.0);
        let s = settings(AutoConverge::Auto, Postcopy::Never, OnTimeout::Cancel);
        let p = run_from(
            &i,
            &s,
            &Start {
                elapsed: Duration::from_secs(3),
                pass: 2,
                volume_bytes: (4.0 * MIB) as u64,
                sent_bytes: (93.0 * MIB) as u64,
                downtime_limit: Duration::ZERO,
            },
        );
        assert_eq!(p.ending, Ending::Precopy);
        assert_eq!(p.passes, 2);
        // 3 s spent, 4 MiB left: sent at the link's own speed with the guest stopped, plus the switch-over.
        assert!((3015..3030).contains(&p.total_time_ms), "{p:?}");
    }

    #[test]
    fn downtime_needed_is_remaining_over_bandwidth() {
        assert_eq!(
            downtime_needed(50 * 1024 * 1024, 100.0 * MIB),
            Duration::from_millis(500)
        );
    }
}
