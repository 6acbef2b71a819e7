//! PURE convergence control: the escalation ladder as a step function from (ladder state, latest figures of a
//! running migration) to the next action, with the reason and figures that triggered it. No I/O, no tokio.
//!
//! The ladder, in order, each rung taken only when the migration is stalled:
//! 1. raise the downtime limit, straight to what the remaining data needs when that is within `--max-downtime`,
//!    otherwise doubling, up to `--max-downtime`;
//! 2. throttle the guest's vCPUs (auto-converge), when `--auto-converge auto`;
//! 3. switch to postcopy, when `--postcopy fallback`;
//! 4. at `--timeout`: postcopy if allowed and not yet used, else the `--on-timeout` action (cancel, or pause the
//!    guest and finish offline).
//!
//! Throttling is given its chance, then judged: once it has been high ([`HIGH_THROTTLE_PCT`], or its ceiling if
//! lower) for [`SETTLE_PASSES`] passes, or on for [`THROTTLE_PATIENCE`], a migration still stalled either
//! kept its dirty rate above [`INEFFECTIVE_SHARE`] of the rate before throttling (the rung does not work: move on
//! at once, to postcopy when allowed, else to the `--on-timeout` action, without waiting for the timeout), or the
//! rate fell and it still stalls (postcopy when allowed, else throttling goes on until the timeout).
//!
//! Stalled means: at least two passes since the last escalation (so its effect can show) and either the
//! remaining data did not fall by [`MIN_PROGRESS`] over the last [`STALL_PASSES`] passes, or precopy, predicted
//! from the live dirty rate and throughput, does not converge or finishes after the timeout.

use std::time::Duration;

use serde::Serialize;

use crate::predict::{self, Costs, DirtyModel, ModelInput, Verdict};

/// Passes over which progress is judged.
pub const STALL_PASSES: usize = 3;
/// The fraction by which the remaining data must fall over [`STALL_PASSES`] passes to count as progress.
pub const MIN_PROGRESS: f64 = 0.10;
/// Passes to wait after an escalation before judging again.
pub const SETTLE_PASSES: u64 = 2;
/// A throttle this high (or at its ceiling, if lower) should show in the dirty rate.
pub const HIGH_THROTTLE_PCT: u64 = 95;
/// Throttling is judged after this long even if QEMU never raised it high: QEMU steps it up (30 %, then 20 % more)
/// every two periods of at least a second, so 99 % comes about 10 s after the start.
pub const THROTTLE_PATIENCE: Duration = Duration::from_secs(15);
/// Throttling counts as not working while the dirty rate stays above this share of the rate before it.
pub const INEFFECTIVE_SHARE: f64 = 0.5;
/// Said in the reason when throttling is left for not working (the calibration looks for it).
pub const THROTTLE_NOT_WORKING: &str = "it does not slow this guest";
/// The throttle ramp qmigrate asks of QEMU: initial and increment, in percent.
pub const THROTTLE_INITIAL_PCT: u8 = 30;
pub const THROTTLE_INCREMENT_PCT: u8 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AutoConverge {
    /// Throttle from the start, with QEMU's usual ramp.
    On,
    /// Never throttle.
    Off,
    /// Throttle only as an escalation step, when the migration stalls.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Postcopy {
    Never,
    /// Switch to postcopy as an escalation step.
    Fallback,
    /// Switch to postcopy as soon as the first full pass is sent.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnTimeout {
    /// Cancel the migration; the source keeps running.
    Cancel,
    /// Stop the guest and let the migration finish offline.
    Pause,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LadderSettings {
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms"
    )]
    pub downtime: Duration,
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms"
    )]
    pub max_downtime: Duration,
    #[serde(
        serialize_with = "crate::report::ser_ms",
        deserialize_with = "crate::report::de_ms"
    )]
    pub timeout: Duration,
    pub auto_converge: AutoConverge,
    /// The ceiling of the vCPU throttle, in percent (QEMU's `max-cpu-throttle`).
    pub max_throttle_pct: u8,
    pub postcopy: Postcopy,
    pub on_timeout: OnTimeout,
}

/// The figures of a running migration the ladder decides on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub elapsed: Duration,
    /// QEMU's `dirty-sync-count`: the number of the pass in progress (1 during the first).
    pub pass: u64,
    pub remaining_bytes: u64,
    pub throughput_bytes_per_s: f64,
    pub dirty_rate_bytes_per_s: f64,
    /// QEMU's `cpu-throttle-percentage`.
    pub throttle_pct: u64,
    /// What the sync that began this pass found to send, as well as it can be told (the remaining bytes at the
    /// first poll of the pass plus what was sent since the sync); 0 when unknown.
    pub pass_volume_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Action {
    #[serde(rename = "raise-downtime")]
    RaiseDowntime {
        #[serde(serialize_with = "crate::report::ser_ms", rename = "to_ms")]
        to: Duration,
    },
    /// Let auto-converge throttle the guest: initial, increment and ceiling in percent.
    Throttle {
        initial_pct: u8,
        increment_pct: u8,
        max_pct: u8,
    },
    StartPostcopy,
    Cancel,
    PauseSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub action: Action,
    pub reason: String,
}

/// Throttling, watched for whether it works.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Throttling {
    Off,
    /// On since pass `since_pass` at `since`; the dirty rate before it (once seen) and the pass from which the
    /// throttle was high.
    On {
        since_pass: u64,
        since: Duration,
        rate_before_bytes_per_s: Option<f64>,
        high_since_pass: Option<u64>,
    },
}

/// What throttling did, once it had its chance.
enum Judgement {
    Wait,
    /// The dirty rate did not follow the throttle.
    NotWorking(String),
    /// It slowed the guest, and the migration still stalls.
    NotEnough(String),
}

/// Where a migration stands on the ladder.
#[derive(Debug, Clone)]
pub struct Ladder {
    settings: LadderSettings,
    downtime: Duration,
    throttling: Throttling,
    postcopy_started: bool,
    final_action_taken: bool,
    /// Remaining bytes when each pass began, newest last.
    pass_starts: Vec<(u64, u64)>,
    last_escalation_pass: u64,
}

impl Ladder {
    pub fn new(settings: LadderSettings) -> Ladder {
        Ladder {
            downtime: settings.downtime,
            throttling: if settings.auto_converge == AutoConverge::On {
                Throttling::On {
                    since_pass: 0,
                    since: Duration::ZERO,
                    rate_before_bytes_per_s: None,
                    high_since_pass: None,
                }
            } else {
                Throttling::Off
            },
            settings,
            postcopy_started: false,
            final_action_taken: false,
            pass_starts: Vec::new(),
            last_escalation_pass: 0,
        }
    }

    pub fn downtime(&self) -> Duration {
        self.downtime
    }

    /// Decides what to do after `obs`. Returns `None` to keep waiting.
    pub fn step(&mut self, obs: &Observation) -> Option<Step> {
        if self.final_action_taken || self.postcopy_started {
            return None;
        }
        // Pass 0 is the set-up, before QEMU has counted anything.
        if obs.pass > 0 && self.pass_starts.last().is_none_or(|(p, _)| *p != obs.pass) {
            self.pass_starts
                .push((obs.pass, obs.pass_volume_bytes.max(obs.remaining_bytes)));
        }
        if obs.elapsed >= self.settings.timeout {
            return Some(self.on_timeout(obs));
        }
        if self.settings.postcopy == Postcopy::Always && obs.pass >= 2 {
            return Some(self.start_postcopy(format!(
                "--postcopy always: the first pass is sent ({} remain)",
                predict::bytes(obs.remaining_bytes as f64)
            )));
        }
        self.watch_throttle(obs);
        let stall = self.stall(obs)?;
        if let Throttling::On { .. } = self.throttling {
            // Throttling is the rung in use: it is given its chance, then judged.
            return match self.judge_throttle(obs) {
                Judgement::Wait => None,
                Judgement::NotWorking(why) => Some(self.move_on(obs, format!("{stall}; {why}"))),
                Judgement::NotEnough(why) if self.settings.postcopy == Postcopy::Fallback => {
                    Some(self.start_postcopy(format!("{stall}; {why}; moving on to postcopy")))
                }
                Judgement::NotEnough(_) => None,
            };
        }
        self.escalate(obs, stall)
    }

    /// Notes the dirty rate before throttling shows and the pass from which the throttle is high.
    fn watch_throttle(&mut self, obs: &Observation) {
        let high = HIGH_THROTTLE_PCT.min(self.settings.max_throttle_pct as u64);
        if let Throttling::On {
            rate_before_bytes_per_s,
            high_since_pass,
            ..
        } = &mut self.throttling
        {
            if obs.throttle_pct == 0 && obs.pass >= 2 {
                *rate_before_bytes_per_s = Some(obs.dirty_rate_bytes_per_s);
            }
            if obs.throttle_pct >= high.max(1) {
                high_since_pass.get_or_insert(obs.pass);
            }
        }
    }

    /// Whether throttling had its chance (high for [`SETTLE_PASSES`] passes, or on for
    /// [`THROTTLE_PATIENCE`]) and what it did to the dirty rate.
    fn judge_throttle(&self, obs: &Observation) -> Judgement {
        let Throttling::On {
            since_pass,
            since,
            rate_before_bytes_per_s,
            high_since_pass,
        } = self.throttling
        else {
            return Judgement::Wait;
        };
        let had_chance = high_since_pass.is_some_and(|h| obs.pass >= h + SETTLE_PASSES)
            || obs.elapsed >= since + THROTTLE_PATIENCE;
        if !had_chance {
            return Judgement::Wait;
        }
        let now = obs.dirty_rate_bytes_per_s;
        match rate_before_bytes_per_s.filter(|b| *b > 0.0) {
            Some(before) if now >= before * INEFFECTIVE_SHARE => Judgement::NotWorking(format!(
                "throttling for {} passes, now at {}%, left the dirty rate at {}/s against {}/s before it: \
                 {THROTTLE_NOT_WORKING}",
                obs.pass.saturating_sub(since_pass),
                obs.throttle_pct,
                predict::bytes(now),
                predict::bytes(before)
            )),
            Some(before) => Judgement::NotEnough(format!(
                "throttling at {}% brought the dirty rate from {}/s to {}/s, not enough to converge",
                obs.throttle_pct,
                predict::bytes(before),
                predict::bytes(now)
            )),
            None => Judgement::NotEnough(format!(
                "throttling at {}% for {} passes, not enough to converge",
                obs.throttle_pct,
                obs.pass.saturating_sub(since_pass)
            )),
        }
    }

    /// Leaves a rung that does not work: postcopy when allowed, else the timeout action now.
    fn move_on(&mut self, obs: &Observation, why: String) -> Step {
        if self.settings.postcopy == Postcopy::Fallback {
            return self.start_postcopy(format!("{why}; moving on to postcopy"));
        }
        self.final_step(format!(
            "{why}; no rung is left before the timeout ({} remaining)",
            predict::bytes(obs.remaining_bytes as f64)
        ))
    }

    /// Why the migration counts as stalled, or `None`.
    fn stall(&self, obs: &Observation) -> Option<String> {
        if obs.pass < 2 || obs.pass < self.last_escalation_pass + SETTLE_PASSES {
            return None;
        }
        let n = self.pass_starts.len();
        if n > STALL_PASSES {
            let (old_pass, old) = self.pass_starts[n - 1 - STALL_PASSES];
            // Like against like: what this pass's sync found against what that one's found.
            let (_, now) = self.pass_starts[n - 1];
            if now as f64 > old as f64 * (1.0 - MIN_PROGRESS) {
                return Some(format!(
                    "remaining {} at pass {} vs {} at pass {old_pass}: less than {:.0}% progress",
                    predict::bytes(now as f64),
                    obs.pass,
                    predict::bytes(old as f64),
                    MIN_PROGRESS * 100.0
                ));
            }
        }
        if obs.throughput_bytes_per_s <= 0.0 {
            return None;
        }
        // From here on: what remains is the next pass, dirtied at the live rate, at most what remains again.
        let p = predict::precopy(&ModelInput {
            ram_bytes: obs.remaining_bytes,
            nonzero_bytes: obs.remaining_bytes,
            page_bytes: 4096,
            dirty: DirtyModel::unbounded(obs.dirty_rate_bytes_per_s, obs.remaining_bytes),
            throttle_works: false,
            throughput_bytes_per_s: obs.throughput_bytes_per_s,
            switchover_throughput_bytes_per_s: obs.throughput_bytes_per_s,
            downtime_limit: self.downtime,
            costs: Costs {
                setup: Duration::ZERO,
                zero_page_ns: 0.0,
                ..Costs::default()
            },
        });
        let left = self.settings.timeout.saturating_sub(obs.elapsed);
        match p.verdict {
            Verdict::Diverges => Some(format!("projected not to converge: {}", p.reason)),
            Verdict::Converges if Duration::from_millis(p.total_time_ms) > left => Some(format!(
                "projected to finish in {} but only {} are left before the timeout",
                humantime::format_duration(Duration::from_millis(p.total_time_ms)),
                humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
            )),
            Verdict::Converges => None,
        }
    }

    fn escalate(&mut self, obs: &Observation, stall: String) -> Option<Step> {
        let figures = format!(
            "{stall}; remaining {}, dirty {}/s, throughput {}/s",
            predict::bytes(obs.remaining_bytes as f64),
            predict::bytes(obs.dirty_rate_bytes_per_s),
            predict::bytes(obs.throughput_bytes_per_s)
        );
        if self.downtime < self.settings.max_downtime {
            // What the last sync found is what has to fit, not what is left of it by the time of this poll.
            let found = self
                .pass_starts
                .last()
                .map_or(obs.remaining_bytes, |(_, r)| (*r).max(obs.remaining_bytes));
            let needed = predict::downtime_needed(found, obs.throughput_bytes_per_s);
            // Straight to what switching over now needs when the ceiling allows it, with a quarter of headroom since
            // the remaining data keeps moving while QEMU decides; doubling otherwise (also when that was tried and
            // QEMU still did not switch over: it saw a slower link than we did).
            let wanted = needed.mul_f64(1.25);
            let max = self.settings.max_downtime;
            // A raise smaller than the headroom means QEMU did not switch over at what we computed: double.
            let to = if wanted > self.downtime.mul_f64(1.25) && wanted <= max {
                wanted
            } else {
                (self.downtime * 2).min(max)
            };
            self.downtime = to;
            self.last_escalation_pass = obs.pass;
            return Some(Step {
                action: Action::RaiseDowntime { to },
                reason: format!(
                    "{figures}; switching over now needs {} of downtime",
                    humantime::format_duration(Duration::from_millis(needed.as_millis() as u64))
                ),
            });
        }
        if self.settings.auto_converge == AutoConverge::Auto && self.throttling == Throttling::Off {
            self.throttling = Throttling::On {
                since_pass: obs.pass,
                since: obs.elapsed,
                rate_before_bytes_per_s: (obs.dirty_rate_bytes_per_s > 0.0)
                    .then_some(obs.dirty_rate_bytes_per_s),
                high_since_pass: None,
            };
            self.last_escalation_pass = obs.pass;
            let max_pct = self.settings.max_throttle_pct.clamp(1, 99);
            return Some(Step {
                action: Action::Throttle {
                    initial_pct: THROTTLE_INITIAL_PCT.min(max_pct),
                    increment_pct: THROTTLE_INCREMENT_PCT,
                    max_pct,
                },
                reason: format!("{figures}; downtime already at its ceiling"),
            });
        }
        if self.settings.postcopy == Postcopy::Fallback {
            return Some(
                self.start_postcopy(format!("{figures}; downtime and throttling exhausted")),
            );
        }
        None
    }

    fn on_timeout(&mut self, obs: &Observation) -> Step {
        let why = format!(
            "timeout of {} reached with {} remaining",
            humantime::format_duration(self.settings.timeout),
            predict::bytes(obs.remaining_bytes as f64)
        );
        if self.settings.postcopy == Postcopy::Fallback {
            return self.start_postcopy(why);
        }
        self.final_step(why)
    }

    /// The `--on-timeout` action, after which the ladder does nothing more.
    fn final_step(&mut self, why: String) -> Step {
        self.final_action_taken = true;
        match self.settings.on_timeout {
            OnTimeout::Cancel => Step {
                action: Action::Cancel,
                reason: format!("{why}; --on-timeout cancel"),
            },
            OnTimeout::Pause => Step {
                action: Action::PauseSource,
                reason: format!("{why}; --on-timeout pause: stopping the guest to finish offline"),
            },
        }
    }

    fn start_postcopy(&mut self, reason: String) -> Step {
        self.postcopy_started = true;
        Step {
            action: Action::StartPostcopy,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn settings(
        auto_converge: AutoConverge,
        postcopy: Postcopy,
        max_downtime_ms: u64,
    ) -> LadderSettings {
        LadderSettings {
            downtime: Duration::from_millis(300),
            max_downtime: Duration::from_millis(max_downtime_ms),
            timeout: Duration::from_secs(60),
            auto_converge,
            max_throttle_pct: 99,
            postcopy,
            on_timeout: OnTimeout::Cancel,
        }
    }

    /// A migration stuck at 46 MiB remaining, dirtying 200 MiB/s over a 32 MiB/s link.
    fn stuck(pass: u64, secs: u64) -> Observation {
        Observation {
            elapsed: Duration::from_secs(secs),
            pass,
            remaining_bytes: 46 * MIB,
            throughput_bytes_per_s: (32 * MIB) as f64,
            dirty_rate_bytes_per_s: (200 * MIB) as f64,
            throttle_pct: 0,
            pass_volume_bytes: 0,
        }
    }

    fn run(ladder: &mut Ladder, passes: std::ops::RangeInclusive<u64>) -> Vec<Action> {
        passes
            .filter_map(|p| ladder.step(&stuck(p, p)).map(|s| s.action))
            .collect()
    }

    #[test]
    fn ladder_order_table() {
        let d = |ms| Action::RaiseDowntime {
            to: Duration::from_millis(ms),
        };
        let throttle = Action::Throttle {
            initial_pct: 30,
            increment_pct: 20,
            max_pct: 99,
        };
        // (auto-converge, postcopy, max downtime ms) -> the actions over passes 1..=24, the clock at 1 s a pass.
        let table: Vec<(AutoConverge, Postcopy, u64, Vec<Action>)> = vec![
            (AutoConverge::Off, Postcopy::Never, 300, vec![]),
            // Throttling that never rises is given its patience, then judged: the dirty rate did not move, so the
            // timeout action comes at once.
            (
                AutoConverge::Auto,
                Postcopy::Never,
                300,
                vec![throttle.clone(), Action::Cancel],
            ),
            (
                AutoConverge::On,
                Postcopy::Fallback,
                300,
                vec![Action::StartPostcopy],
            ),
            (
                AutoConverge::Off,
                Postcopy::Never,
                1000,
                vec![d(600), d(1000)],
            ),
            (
                AutoConverge::Auto,
                Postcopy::Fallback,
                2000,
                vec![d1800(), d(2000), throttle.clone(), Action::StartPostcopy],
            ),
            (
                AutoConverge::Off,
                Postcopy::Always,
                300,
                vec![Action::StartPostcopy],
            ),
        ];
        for (ac, pc, max, want) in table {
            let mut l = Ladder::new(settings(ac, pc, max));
            assert_eq!(run(&mut l, 1..=24), want, "{ac:?} {pc:?} {max}");
        }
    }

    // 46 MiB at 32 MiB/s needs 1.4375 s; with a quarter of headroom that is 1.797 s, under a 2 s ceiling.
    fn d1800() -> Action {
        Action::RaiseDowntime {
            to: Duration::from_secs_f64(46.0 / 32.0 * 1.25),
        }
    }

    #[test]
    fn progress_is_not_a_stall() {
        let mut l = Ladder::new(settings(AutoConverge::Auto, Postcopy::Fallback, 2000));
        // Remaining halves every pass and the link is fast: nothing to do.
        for p in 1..=8u64 {
            let obs = Observation {
                elapsed: Duration::from_secs(p),
                pass: p,
                remaining_bytes: (256 * MIB) >> p,
                throughput_bytes_per_s: (512 * MIB) as f64,
                dirty_rate_bytes_per_s: (8 * MIB) as f64,
                throttle_pct: 0,
                pass_volume_bytes: 0,
            };
            assert_eq!(l.step(&obs), None, "pass {p}");
        }
    }

    #[test]
    fn timeout_takes_postcopy_if_allowed_else_the_on_timeout_action() {
        for (postcopy, on_timeout, want) in [
            (Postcopy::Fallback, OnTimeout::Cancel, Action::StartPostcopy),
            (Postcopy::Never, OnTimeout::Cancel, Action::Cancel),
            (Postcopy::Never, OnTimeout::Pause, Action::PauseSource),
        ] {
            let mut s = settings(AutoConverge::Off, postcopy, 300);
            s.on_timeout = on_timeout;
            let mut l = Ladder::new(s);
            let step = l.step(&stuck(1, 61)).expect("an action at the timeout");
            assert_eq!(step.action, want);
            assert!(step.reason.contains("timeout"), "{}", step.reason);
            // Nothing further once the final action was taken.
            assert_eq!(l.step(&stuck(2, 62)), None);
        }
    }

    #[test]
    fn reasons_carry_the_figures() {
        let mut l = Ladder::new(settings(AutoConverge::Off, Postcopy::Never, 1000));
        let step = (1..=6).find_map(|p| l.step(&stuck(p, p))).unwrap();
        assert!(step.reason.contains("46.0 MiB"), "{}", step.reason);
        assert!(step.reason.contains("32.0 MiB/s"), "{}", step.reason);
    }

    /// The stuck migration with QEMU reporting `throttle` percent and a dirty rate of `dirty` MiB/s.
    fn throttled(pass: u64, throttle: u64, dirty: u64) -> Observation {
        Observation {
            throttle_pct: throttle,
            dirty_rate_bytes_per_s: (dirty * MIB) as f64,
            ..stuck(pass, pass)
        }
    }

    #[test]
    fn throttling_that_does_not_slow_the_guest_is_left_at_once() {
        // (postcopy, ceiling %, throttle % reported from pass 6 on, dirty MiB/s then) -> the step after throttling
        let table = [
            (Postcopy::Fallback, 99, 99, 200, Some(Action::StartPostcopy)),
            (Postcopy::Never, 99, 99, 190, Some(Action::Cancel)),
            // A low ceiling counts as high once reached.
            (Postcopy::Fallback, 10, 10, 200, Some(Action::StartPostcopy)),
            // The dirty rate fell by more than half: throttling works, keep waiting.
            (Postcopy::Never, 99, 99, 60, None),
            // Not yet high: keep waiting.
            (Postcopy::Never, 99, 50, 200, None),
        ];
        for (postcopy, ceiling, pct, dirty, want) in table {
            let mut s = settings(AutoConverge::Auto, postcopy, 300);
            s.max_throttle_pct = ceiling;
            let mut l = Ladder::new(s);
            // Passes 1-4 unthrottled at 200 MiB/s: the throttle rung is taken.
            let first: Vec<Action> = (1..=4)
                .filter_map(|p| l.step(&throttled(p, 0, 200)).map(|s| s.action))
                .collect();
            assert!(
                matches!(first.as_slice(), [Action::Throttle { max_pct, .. }] if *max_pct == ceiling),
                "{first:?}"
            );
            let mut got = None;
            for p in 5..=7 {
                if let Some(step) = l.step(&throttled(p, pct, dirty)) {
                    assert!(
                        step.reason.contains(THROTTLE_NOT_WORKING),
                        "{}",
                        step.reason
                    );
                    assert!(step.reason.contains(&format!("{pct}%")), "{}", step.reason);
                    got = Some(step.action);
                    break;
                }
            }
            assert_eq!(got, want, "{postcopy:?} {ceiling} {pct} {dirty}");
        }
    }
}
