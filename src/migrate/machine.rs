//! PURE: the phases of one migration and every "what now?" decision, as a function of (phase, observation).
//! No I/O, no tokio: the I/O loop in `migrate/mod.rs` gathers observations, calls [`Machine::decide`] and carries
//! out the commands it returns, nothing more.
//!
//! The exactly-once rules live here, each a row of the table test below:
//! - The source is resumed only while it holds the newest state of the guest *and* the destination provably does
//!   not run it: its QEMU has exited, or it was stopped and read back as not running. Never once postcopy started.
//! - When the source cannot be seen (no replies, connection lost), the destination is asked before anything is
//!   touched: a running destination, or `completed` on the source, means the guest moved.
//! - A guest that resets, reboots or powers off on the destination did so as a guest: no rollback.
//! - Rollback after the switch-over is opt-in (`--verify`), precopy only, and only for a destination QEMU that
//!   exited with no shutdown of the guest's own before it, or a guest that panicked.
//! - In postcopy nothing is cancelled or killed; a paused postcopy is recovered, and if it cannot be, both QEMUs
//!   are left paused and alive for `qmigrate recover`.

use std::time::Duration;

use super::ladder::Action;

/// Where one migration stands. Terminal phases are [`Phase::Done`].
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Connecting and checking both ends; nothing changed yet.
    Checks,
    /// Capabilities, parameters, `migrate-incoming`, `migrate`: changes that a refusal undoes.
    SetUp,
    /// Iterative precopy; the source holds the newest state.
    Precopy {
        /// The guest was stopped by the ladder to finish offline: a rollback must `cont` it.
        source_stopped: bool,
    },
    /// A cancel was sent (interrupt, timeout, destination gone); waiting for QEMU to confirm it.
    Cancelling {
        cause: EndCause,
        since: Duration,
        source_stopped: bool,
    },
    /// The guest runs on the destination, its memory split between the hosts: only finishing is safe.
    Postcopy,
    /// Postcopy's stream broke; both QEMUs wait to be reconnected. `attempts` recoveries were tried.
    PostcopyPaused {
        since: Duration,
        attempts: u32,
        next_attempt_at: Duration,
    },
    /// QEMU completed on the source; the destination is being confirmed to run.
    SwitchedOver {
        at: Duration,
        postcopy: bool,
        /// A shutdown or reset of the guest's own was seen on the destination.
        guest_shutdown: bool,
    },
    /// `--verify`: watching the confirmed destination until `until` for its QEMU dying or the guest panicking.
    Verifying {
        until: Duration,
        guest_shutdown: bool,
    },
    /// The source cannot be seen; the destination decides. `before` is where we were.
    SourceLost { since: Duration, before: Box<Phase> },
    /// A precopy that ended without the guest moving: the destination is being stopped and read back, then the
    /// source is resumed if it is paused.
    Securing { outcome: Outcome, why: String },
    /// A guest that panicked on the destination inside `--verify`: stop it there, then resume the source.
    RollingBack { why: String },
    /// QEMU failed the postcopy on the source (a failed source cannot resume it, so the destination can never
    /// complete). QEMU restarts the source itself when the guest ran before the migration: then the destination
    /// is stopped, so that the guest runs once (`source_runs`); otherwise the guest is lost and both are left.
    PostcopyFailed { source_runs: bool },
    Done {
        outcome: Outcome,
        why: Option<String>,
    },
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed,
    /// Cancelled (timeout, interrupt); the source runs on.
    Cancelled,
    /// Failed in precopy (QEMU failure, destination gone); the source runs on.
    Failed,
    /// Completed, then rolled back inside `--verify`: the source runs on from the switch-over image.
    RolledBack,
    /// Postcopy paused and not recovered in time: both QEMUs paused and alive, `qmigrate recover` resumes it.
    Paused,
    /// The guest's memory was lost with a QEMU that died in postcopy, or the outcome cannot be known.
    Lost,
}

/// Why a precopy was cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    Interrupted,
    Timeout(String),
    DestinationGone,
}

/// What a run state of QEMU means for where the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndState {
    /// `running`.
    Running,
    /// Alive and not running the guest (`inmigrate`, `paused`, `postmigrate`, `finish-migrate`, …).
    NotRunning(String),
    /// The QEMU process is gone (its QMP connection closed).
    Gone,
    /// It did not answer: nothing can be concluded.
    Unknown,
}

impl Phase {
    /// The phase's name in reports and logs; a done phase is named by its outcome.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Checks => "checks",
            Phase::SetUp => "set-up",
            Phase::Precopy { .. } => "precopy",
            Phase::Cancelling { .. } => "cancelling",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused { .. } => "postcopy-paused",
            Phase::SwitchedOver { .. } => "switched-over",
            Phase::Verifying { .. } => "verifying",
            Phase::SourceLost { .. } => "source-lost",
            Phase::Securing { .. } => "securing",
            Phase::RollingBack { .. } => "rolling-back",
            Phase::PostcopyFailed { .. } => "postcopy-failed",
            Phase::Done { outcome, .. } => match outcome {
                Outcome::Completed => "verified",
                Outcome::Cancelled => "cancelled",
                Outcome::Failed => "failed",
                Outcome::RolledBack => "rolled-back",
                Outcome::Paused => "paused-recoverable",
                Outcome::Lost => "lost",
            },
        }
    }
}

impl EndState {
    /// For messages: `running`, `paused`, `gone`, `not answering`.
    pub fn describe(&self) -> String {
        match self {
            EndState::Running => "running".into(),
            EndState::NotRunning(s) => s.clone(),
            EndState::Gone => "gone".into(),
            EndState::Unknown => "not answering".into(),
        }
    }

    pub fn from_status(status: &str) -> EndState {
        match status {
            "running" => EndState::Running,
            "" => EndState::Unknown,
            s => EndState::NotRunning(s.into()),
        }
    }
}

/// A guest event on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// `RESET` or `SHUTDOWN`: the guest's own doing.
    ResetOrShutdown,
    /// `GUEST_PANICKED` / `GUEST_CRASHLOADED`.
    Panicked,
    /// `RESUME`: the destination's vCPUs started, so the guest runs (or ran) there.
    Resumed,
}

/// One thing the I/O loop saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// `query-migrate` on the source answered with this status.
    Status(String),
    /// The source stopped answering (`closed`: its connection ended).
    SourceUnreachable { closed: bool },
    /// The destination's QMP connection closed: its QEMU exited.
    DestinationGone,
    /// The destination's run state, read when a command asked for it.
    Destination(EndState),
    /// The source's run state, read when a command asked for it.
    Source(EndState),
    /// An event of the guest on the destination.
    Guest(GuestEvent),
    /// The ladder's decision (the loop asks [`super::ladder::Ladder::step`] when told to).
    Ladder { action: Action, reason: String },
    /// SIGINT, SIGTERM or SIGHUP.
    Interrupt,
    /// Time passed (deadlines: verify window, recovery, stuck statuses).
    Tick,
    /// A postcopy recovery attempt failed with this error.
    RecoverFailed(String),
}

/// What the I/O loop must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Ask the ladder for a step (precopy, active statuses only).
    ConsultLadder,
    /// Carry out a ladder action on the source (raise downtime, throttle, start postcopy).
    Apply(Action),
    /// `stop` the source: the ladder's offline finish.
    StopSource,
    /// `migrate_cancel` on the source.
    Cancel,
    /// `query-status` on the destination; the answer comes back as [`Observation::Destination`].
    AskDestination,
    /// `query-status` on the source; the answer comes back as [`Observation::Source`].
    AskSource,
    /// `stop` the destination (and `quit` or kill it if qmigrate launched it), then read back its state.
    StopDestination,
    /// `cont` the destination: it took the guest over but stands paused (offline finish, `-S`).
    ContinueDestination,
    /// `cont` the source if it is paused. Only ever emitted once the destination is known not to run the guest.
    ResumeSourceIfPaused,
    /// `migrate-recover` on the destination, `migrate` with `resume: true` on the source.
    Recover { attempt: u32 },
    /// Try to reach the source again (a new connection if the old one closed).
    ReconnectSource,
    /// Tell the user something that needs no action (e.g. postcopy cannot be cancelled).
    Notice(String),
}

/// A decision: the commands to carry out, and a line saying why (logged and kept in the report's trail).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub commands: Vec<Command>,
    pub why: Option<String>,
}

/// Settings the decisions depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// `--verify`: zero disables rollback after the switch-over.
    pub verify: Duration,
    /// `--recover-for`: how long a paused postcopy is retried.
    pub recover_for: Duration,
    /// `--timeout`: after it (plus [`Rules::grace`]) a status that lets nothing be done ends the wait.
    pub timeout: Duration,
    pub grace: Duration,
    /// How long the source may stay unseen before giving up on it (touching nothing).
    pub source_lost_for: Duration,
    /// How long a completed migration's destination may take to report running.
    pub confirm_for: Duration,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            verify: Duration::ZERO,
            recover_for: Duration::from_secs(300),
            timeout: Duration::from_secs(300),
            grace: Duration::from_secs(30),
            source_lost_for: Duration::from_secs(60),
            confirm_for: Duration::from_secs(30),
        }
    }
}

/// Backoff between postcopy recovery attempts: 1 s, 2 s, 4 s, … capped at 10 s.
pub fn recover_backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(4)).min(Duration::from_secs(10))
}

/// Is this a migration status in which precopy is still running (and the ladder may act)?
pub fn is_precopy_active(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
    )
}

/// The state machine of one migration. `decide` is pure: it reads `phase`, the observation and the time, and
/// returns the next phase (stored in `self`) with the commands for the I/O loop.
#[derive(Debug, Clone)]
pub struct Machine {
    pub phase: Phase,
    pub rules: Rules,
    /// Postcopy started at some point: from then on the source is never resumed.
    pub postcopy_started: bool,
    /// Recovery attempts made, for the report.
    pub recover_attempts: u32,
    /// The guest reset or shut down on the destination after the switch-over: its own doing.
    pub guest_shutdown: bool,
    /// The guest may have run on the destination (a `RESUME` there, its run state read as `running`, or events
    /// that may have been missed). Until then a postcopy destination that dies took nothing from the source: the
    /// source's image is current, and the source may run on.
    pub destination_ran: bool,
}

impl Machine {
    pub fn new(rules: Rules) -> Machine {
        Machine {
            phase: Phase::Checks,
            rules,
            postcopy_started: false,
            recover_attempts: 0,
            guest_shutdown: false,
            destination_ran: false,
        }
    }

    /// A machine taking over a migration already under way (`--adopt`, `qmigrate recover`), from the source's
    /// migration status.
    pub fn adopting(rules: Rules, status: &str, now: Duration) -> (Machine, Decision) {
        let mut m = Machine::new(rules);
        m.phase = Phase::Precopy {
            source_stopped: false,
        };
        // What happened before we came is unknown: the guest may have run on the destination.
        m.destination_ran = true;
        // The status is the first observation: the same rows decide.
        let d = m.decide(&Observation::Status(status.into()), now);
        (m, d)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// The outcome once done.
    pub fn outcome(&self) -> Option<(Outcome, Option<&str>)> {
        match &self.phase {
            Phase::Done { outcome, why } => Some((*outcome, why.as_deref())),
            _ => None,
        }
    }

    /// The decision for `obs` at time `now` (since the migration started). Moves to the next phase.
    pub fn decide(&mut self, obs: &Observation, now: Duration) -> Decision {
        if obs == &Observation::Guest(GuestEvent::ResetOrShutdown)
            && matches!(
                self.phase,
                Phase::SwitchedOver { .. } | Phase::Verifying { .. }
            )
        {
            self.guest_shutdown = true;
        }
        if matches!(
            obs,
            Observation::Guest(GuestEvent::Resumed) | Observation::Destination(EndState::Running)
        ) {
            self.destination_ran = true;
        }
        let (next, decision) = self.next(obs, now);
        if let Some(p) = next {
            if matches!(p, Phase::Postcopy | Phase::PostcopyPaused { .. }) {
                self.postcopy_started = true;
            }
            self.phase = p;
        }
        decision
    }

    fn next(&mut self, obs: &Observation, now: Duration) -> (Option<Phase>, Decision) {
        use Command as C;
        use Observation as O;
        let r = self.rules.clone();
        let phase = self.phase.clone();
        match (&phase, obs) {
            (Phase::Done { .. }, _) => (None, nothing()),

            // Before anything changed, an interrupt just ends the run.
            (Phase::Checks | Phase::SetUp, O::Interrupt) => done(
                Outcome::Cancelled,
                "interrupted before the migration started; nothing was changed",
            ),
            (Phase::Checks | Phase::SetUp, _) => (None, nothing()),

            // A source that cannot be seen: ask the destination before touching anything.
            (Phase::SourceLost { .. }, O::SourceUnreachable { .. }) => {
                if let Phase::SourceLost { since, before } = &phase {
                    if now.saturating_sub(*since) >= r.source_lost_for {
                        return done(
                            if self.postcopy_started { Outcome::Lost } else { Outcome::Failed },
                            format!(
                                "the source did not answer for {}; nothing was touched on either end ({})",
                                fmt(r.source_lost_for),
                                describe(before)
                            ),
                        );
                    }
                }
                (None, cmds([C::AskDestination, C::ReconnectSource]))
            }
            (_, O::SourceUnreachable { closed })
                if !matches!(phase, Phase::Securing { .. } | Phase::PostcopyFailed { .. }) =>
            {
                let what = if *closed {
                    "the source's QMP connection closed"
                } else {
                    "the source stopped answering"
                };
                (
                    Some(Phase::SourceLost {
                        since: now,
                        before: Box::new(phase.clone()),
                    }),
                    Decision {
                        commands: vec![C::AskDestination, C::ReconnectSource],
                        why: Some(format!("{what}: asking the destination before touching anything")),
                    },
                )
            }
            (Phase::SourceLost { before, .. }, O::Destination(EndState::Running)) => {
                if matches!(**before, Phase::Postcopy | Phase::PostcopyPaused { .. }) {
                    // Postcopy goes on between the QEMUs whether or not we see the source: keep trying to reach it.
                    (None, cmds([C::ReconnectSource]))
                } else {
                    done(
                        Outcome::Completed,
                        "the source cannot be seen, and the destination runs the guest: it moved; the source is left alone",
                    )
                }
            }
            (Phase::SourceLost { before, .. }, O::Destination(EndState::Gone) | O::DestinationGone) => {
                if self.postcopy_started {
                    done(
                        Outcome::Lost,
                        "the destination died during postcopy while the source could not be seen: the guest's memory was split between them",
                    )
                } else {
                    // The guest can only be on the source: reach it again, then the usual rows resume it if needed.
                    let _ = before;
                    (None, cmds([C::ReconnectSource]))
                }
            }
            (Phase::SourceLost { .. }, O::Destination(_)) => (None, cmds([C::ReconnectSource])),
            (Phase::SourceLost { before, .. }, O::Status(_)) => {
                // Seen again: decide from where we were.
                self.phase = (**before).clone();
                let (next, mut d) = self.next(obs, now);
                d.why.get_or_insert_with(|| "the source answers again".into());
                (next.or_else(|| Some(self.phase.clone())), d)
            }
            (Phase::SourceLost { .. }, O::Interrupt) => (
                None,
                cmds([C::Notice(
                    "the source cannot be seen: nothing can be cancelled safely until it can".into(),
                )]),
            ),
            (Phase::SourceLost { .. }, _) => (None, nothing()),

            // Precopy.
            (Phase::Precopy { .. }, O::Status(s)) if is_precopy_active(s) => (None, cmds([C::ConsultLadder])),
            (Phase::Precopy { source_stopped }, O::Ladder { action, reason }) => match action {
                Action::Cancel => (
                    Some(Phase::Cancelling {
                        cause: EndCause::Timeout(reason.clone()),
                        since: now,
                        source_stopped: *source_stopped,
                    }),
                    why(cmds([C::Cancel]), reason),
                ),
                Action::PauseSource => (
                    Some(Phase::Precopy {
                        source_stopped: true,
                    }),
                    why(cmds([C::StopSource]), reason),
                ),
                a => (None, why(cmds([C::Apply(a.clone())]), reason)),
            },
            (Phase::Precopy { source_stopped }, O::Interrupt) => (
                Some(Phase::Cancelling {
                    cause: EndCause::Interrupted,
                    since: now,
                    source_stopped: *source_stopped,
                }),
                why(cmds([C::Cancel]), "interrupted: cancelling; the source keeps the guest"),
            ),
            (Phase::Precopy { source_stopped }, O::DestinationGone) => (
                Some(Phase::Cancelling {
                    cause: EndCause::DestinationGone,
                    since: now,
                    source_stopped: *source_stopped,
                }),
                why(
                    cmds([C::Cancel]),
                    "the destination went away mid-migration: cancelling; the source keeps the guest",
                ),
            ),
            (Phase::Precopy { .. } | Phase::Cancelling { .. }, O::Status(s)) if s == "failed" => {
                let why = match &phase {
                    Phase::Cancelling {
                        cause: EndCause::DestinationGone,
                        ..
                    } => "the destination went away mid-migration".to_string(),
                    _ => "QEMU reports the migration failed".to_string(),
                };
                secure(Outcome::Failed, why)
            }
            (Phase::Precopy { .. }, O::Status(s)) if s == "cancelled" => {
                secure(Outcome::Cancelled, "the migration was cancelled on the source".into())
            }
            (Phase::Precopy { .. } | Phase::Cancelling { .. }, O::Status(s)) if s == "completed" => (
                Some(Phase::SwitchedOver {
                    at: now,
                    postcopy: false,
                    guest_shutdown: false,
                }),
                why(
                    cmds([C::AskDestination]),
                    "QEMU completed the migration on the source: confirming the destination runs",
                ),
            ),
            (Phase::Precopy { .. } | Phase::Cancelling { .. }, O::Status(s)) if s == "postcopy-active" => (
                Some(Phase::Postcopy),
                why(nothing(), "postcopy: the guest runs on the destination now"),
            ),
            (_, O::Status(s))
                if s == "postcopy-paused"
                    && !matches!(phase, Phase::PostcopyPaused { .. } | Phase::Securing { .. }) =>
            {
                self.recover_attempts += 1;
                (
                    Some(Phase::PostcopyPaused {
                        since: now,
                        attempts: 1,
                        next_attempt_at: now + recover_backoff(1),
                    }),
                    why(
                        cmds([C::Recover {
                            attempt: self.recover_attempts,
                        }]),
                        "postcopy paused (the stream broke): recovering; both QEMUs stay alive",
                    ),
                )
            }
            (Phase::Precopy { .. }, O::Status(s)) if now >= r.timeout + r.grace && !is_postcopy(s) => secure(
                Outcome::Failed,
                format!(
                    "QEMU still reports the migration as {s:?} {} after the timeout",
                    fmt(now.saturating_sub(r.timeout))
                ),
            ),
            (Phase::Cancelling { .. }, O::Status(s)) if s == "cancelled" => {
                let (outcome, why) = match &phase {
                    Phase::Cancelling { cause, .. } => match cause {
                        EndCause::Interrupted => (Outcome::Cancelled, "interrupted".to_string()),
                        EndCause::Timeout(w) => (Outcome::Cancelled, w.clone()),
                        EndCause::DestinationGone => (
                            Outcome::Failed,
                            "the destination went away mid-migration".to_string(),
                        ),
                    },
                    _ => unreachable!(),
                };
                secure(outcome, why)
            }
            (Phase::Cancelling { since, .. }, O::Status(s))
                if now.saturating_sub(*since) >= r.grace && !is_postcopy(s) =>
            {
                secure(
                    Outcome::Failed,
                    format!("the cancel was not confirmed within {}: QEMU reports {s:?}", fmt(r.grace)),
                )
            }
            (Phase::Cancelling { .. }, _) => (None, nothing()),
            (Phase::Precopy { .. }, O::Status(_)) => (None, nothing()),
            (Phase::Precopy { .. }, _) => (None, nothing()),

            // Postcopy: nothing is cancelled or killed.
            (Phase::Postcopy, O::Status(s)) if s == "completed" => (
                Some(Phase::SwitchedOver {
                    at: now,
                    postcopy: true,
                    guest_shutdown: false,
                }),
                why(cmds([C::AskDestination]), "postcopy completed"),
            ),
            (Phase::Postcopy | Phase::PostcopyPaused { .. }, O::Interrupt) => (
                None,
                cmds([C::Notice(
                    "postcopy cannot be cancelled: the guest's memory is split between the hosts; letting it finish"
                        .into(),
                )]),
            ),
            // Died before its vCPUs ever started (seen here: a stream cut while the device state was on its way,
            // and the destination exits on the failed load). The guest ran nothing there, and its whole state is
            // in the source; but QEMU neither cancels nor resumes a postcopy on the source, so it cannot run again.
            (Phase::Postcopy | Phase::PostcopyPaused { .. }, O::DestinationGone) if !self.destination_ran => done(
                Outcome::Lost,
                "the destination QEMU died in postcopy before the guest ever ran there: the guest's whole state is in the source QEMU, left paused and alive, but QEMU neither cancels nor resumes a postcopy, so it cannot run again",
            ),
            (Phase::Postcopy | Phase::PostcopyPaused { .. }, O::DestinationGone) => done(
                Outcome::Lost,
                "the destination QEMU died during postcopy: it held the only up-to-date part of the guest's memory; the source's image is stale and is not resumed",
            ),
            (Phase::Postcopy | Phase::PostcopyPaused { .. }, O::Status(s)) if s == "failed" => (
                Some(Phase::PostcopyFailed { source_runs: false }),
                why(
                    cmds([C::AskSource]),
                    "QEMU reports the postcopy failed on the source: a failed source cannot resume it, so the destination can never complete",
                ),
            ),

            // The source's QEMU failed the postcopy. It restarts the guest itself when it ran before the
            // migration; qmigrate never does.
            (Phase::PostcopyFailed { source_runs: false }, O::Source(EndState::Running)) => (
                Some(Phase::PostcopyFailed { source_runs: true }),
                why(
                    cmds([C::StopDestination]),
                    "QEMU restarted the guest on the source from its switch-over image: the destination, which cannot be recovered, is stopped so that the guest runs once",
                ),
            ),
            (Phase::PostcopyFailed { source_runs: false }, O::Source(state)) => done(
                Outcome::Lost,
                format!(
                    "QEMU reports the postcopy failed and the source is {}: the guest is lost; both QEMUs are left as they are",
                    state.describe()
                ),
            ),
            (
                Phase::PostcopyFailed { source_runs: true },
                O::Destination(EndState::Gone | EndState::NotRunning(_)) | O::DestinationGone,
            ) => done(
                Outcome::RolledBack,
                "the postcopy failed on the source and QEMU restarted the guest there from its switch-over image; the destination was stopped; what the guest did on the destination since the switch-over is lost",
            ),
            (
                Phase::PostcopyFailed { source_runs: true },
                O::Destination(EndState::Running | EndState::Unknown),
            ) => done(
                Outcome::Lost,
                "the postcopy failed, QEMU restarted the guest on the source, and the destination could not be stopped",
            ),
            (Phase::PostcopyFailed { .. }, _) => (None, nothing()),
            (Phase::Postcopy, _) => (None, nothing()),

            // A paused postcopy: recover with backoff until --recover-for runs out.
            (Phase::PostcopyPaused { .. }, O::Status(s)) if s == "postcopy-active" => (
                Some(Phase::Postcopy),
                why(
                    nothing(),
                    format!("postcopy recovered after {} attempt(s)", self.recover_attempts),
                ),
            ),
            (Phase::PostcopyPaused { .. }, O::Status(s)) if s == "completed" => (
                Some(Phase::SwitchedOver {
                    at: now,
                    postcopy: true,
                    guest_shutdown: false,
                }),
                why(cmds([C::AskDestination]), "postcopy recovered and completed"),
            ),
            (
                Phase::PostcopyPaused {
                    since,
                    attempts,
                    next_attempt_at,
                },
                O::Status(_) | O::Tick | O::RecoverFailed(_),
            ) => {
                let status = match obs {
                    O::Status(s) => s.as_str(),
                    _ => "",
                };
                if now.saturating_sub(*since) >= r.recover_for {
                    return done(
                        Outcome::Paused,
                        format!(
                            "postcopy could not be recovered within {} ({} attempts): both QEMUs are paused and alive; resume with `qmigrate recover`",
                            fmt(r.recover_for),
                            self.recover_attempts
                        ),
                    );
                }
                if let O::RecoverFailed(e) = obs {
                    return (
                        Some(Phase::PostcopyPaused {
                            since: *since,
                            attempts: *attempts,
                            next_attempt_at: now + recover_backoff(*attempts),
                        }),
                        why(nothing(), format!("recovery attempt {} failed: {e}", self.recover_attempts)),
                    );
                }
                // While QEMU is reconnecting (postcopy-recover*), let it; retry only from postcopy-paused.
                if now >= *next_attempt_at && (status == "postcopy-paused" || status.is_empty()) {
                    self.recover_attempts += 1;
                    let n = attempts + 1;
                    (
                        Some(Phase::PostcopyPaused {
                            since: *since,
                            attempts: n,
                            next_attempt_at: now + recover_backoff(n),
                        }),
                        cmds([C::Recover {
                            attempt: self.recover_attempts,
                        }]),
                    )
                } else {
                    (None, nothing())
                }
            }
            (Phase::PostcopyPaused { .. }, _) => (None, nothing()),

            // Switched over: confirm the destination runs the guest; cont it if it stands paused.
            (
                Phase::SwitchedOver {
                    postcopy,
                    guest_shutdown,
                    ..
                },
                O::Destination(EndState::Running),
            ) => {
                if !r.verify.is_zero() && !postcopy && !guest_shutdown {
                    (
                        Some(Phase::Verifying {
                            until: now + r.verify,
                            guest_shutdown: false,
                        }),
                        why(
                            nothing(),
                            format!("the destination runs the guest; watching it for {} (--verify)", fmt(r.verify)),
                        ),
                    )
                } else {
                    done_ok("the destination runs the guest")
                }
            }
            (Phase::SwitchedOver { guest_shutdown, .. }, O::Destination(EndState::NotRunning(s)))
                if matches!(s.as_str(), "paused" | "postmigrate" | "prelaunch" | "finish-migrate")
                    && !guest_shutdown =>
            {
                (
                    None,
                    why(
                        cmds([C::ContinueDestination, C::AskDestination]),
                        format!("the destination took the guest over but stands {s}: continuing it"),
                    ),
                )
            }
            (Phase::SwitchedOver { guest_shutdown: true, .. }, O::Destination(_))
            | (Phase::SwitchedOver { guest_shutdown: true, .. }, O::DestinationGone) => done_ok(
                "the guest shut down or reset itself on the destination after the switch-over: its own doing, not a failed migration",
            ),
            (Phase::SwitchedOver { at, .. }, O::Destination(EndState::NotRunning(s)))
                if now.saturating_sub(*at) < r.confirm_for =>
            {
                let _ = s;
                (None, nothing())
            }
            (Phase::SwitchedOver { .. }, O::Tick) => (None, cmds([C::AskDestination])),
            (Phase::SwitchedOver { postcopy, .. }, O::Destination(EndState::NotRunning(s))) => {
                if *postcopy {
                    done(
                        Outcome::Lost,
                        format!("postcopy completed but the destination stays {s}; the source's image is stale and is not resumed"),
                    )
                } else {
                    // The destination did not take over: stop it for good, then the source may run on.
                    (
                        Some(Phase::RollingBack {
                            why: format!(
                                "the destination stayed {s} for {} after the switch-over",
                                fmt(r.confirm_for)
                            ),
                        }),
                        cmds([C::StopDestination]),
                    )
                }
            }
            (Phase::SwitchedOver { .. }, O::Guest(GuestEvent::ResetOrShutdown)) => {
                if let Phase::SwitchedOver { at, postcopy, .. } = phase {
                    (
                        Some(Phase::SwitchedOver {
                            at,
                            postcopy,
                            guest_shutdown: true,
                        }),
                        why(cmds([C::AskDestination]), "the guest reset or shut down on the destination"),
                    )
                } else {
                    unreachable!()
                }
            }
            (
                Phase::SwitchedOver { postcopy, .. },
                O::Destination(EndState::Gone) | O::DestinationGone,
            ) => {
                if !r.verify.is_zero() && !postcopy {
                    let w = "the destination QEMU exited right after the switch-over (--verify): the source holds the switch-over image and runs on";
                    (
                        Some(Phase::Done {
                            outcome: Outcome::RolledBack,
                            why: Some(w.into()),
                        }),
                        why(cmds([C::ResumeSourceIfPaused]), w),
                    )
                } else {
                    done(
                        Outcome::Lost,
                        "the destination QEMU exited right after the switch-over; without --verify the source is not resumed (its disk writes may be older than the destination's)",
                    )
                }
            }
            (Phase::SwitchedOver { .. }, O::Interrupt) => (
                None,
                cmds([C::Notice("the guest has switched over; confirming the destination".into())]),
            ),
            (Phase::SwitchedOver { .. }, _) => (None, nothing()),

            // --verify: only a QEMU that exited (no shutdown of the guest's own before) or a panic rolls back.
            (Phase::Verifying { guest_shutdown, .. }, O::Guest(GuestEvent::ResetOrShutdown)) => {
                let _ = guest_shutdown;
                done_ok("the guest reset or shut down on the destination: its own doing, not a failed migration")
            }
            (Phase::Verifying { .. }, O::DestinationGone | O::Destination(EndState::Gone)) => {
                let w = format!(
                    "the destination QEMU exited within {} of switching over (--verify): the source holds the switch-over image and runs on",
                    fmt(r.verify)
                );
                (
                    Some(Phase::Done {
                        outcome: Outcome::RolledBack,
                        why: Some(w.clone()),
                    }),
                    why(cmds([C::ResumeSourceIfPaused]), w),
                )
            }
            (Phase::Verifying { .. }, O::Guest(GuestEvent::Panicked)) => (
                Some(Phase::RollingBack {
                    why: format!("the guest panicked on the destination within {} of switching over (--verify)", fmt(r.verify)),
                }),
                cmds([C::StopDestination]),
            ),
            (Phase::Verifying { until, .. }, O::Tick | O::Status(_)) if now >= *until => {
                done_ok("the destination ran the guest through the verify window")
            }
            (Phase::Verifying { .. }, O::Interrupt) => {
                done_ok("interrupted during the verify window: the guest runs on the destination")
            }
            (Phase::Verifying { .. }, _) => (None, nothing()),

            // Rolling back after a panic: resume the source only once the destination reads back as not running.
            (Phase::RollingBack { why: w }, O::Destination(EndState::Gone | EndState::NotRunning(_)))
            | (Phase::RollingBack { why: w }, O::DestinationGone) => (
                Some(Phase::Done {
                    outcome: Outcome::RolledBack,
                    why: Some(format!("{w}; the destination was stopped and the source runs on")),
                }),
                cmds([C::ResumeSourceIfPaused]),
            ),
            (Phase::RollingBack { why: w }, O::Destination(EndState::Running | EndState::Unknown)) => done(
                Outcome::Lost,
                format!("{w}; the destination could not be stopped, so the source is not resumed"),
            ),
            (Phase::RollingBack { .. }, _) => (None, nothing()),

            // The migration ended in precopy without moving the guest: stop the destination, then the source.
            (Phase::Securing { outcome, why: w }, O::Destination(EndState::Gone) | O::DestinationGone)
                if *outcome == Outcome::Failed && !w.contains("destination") =>
            {
                // QEMU on the source may see the stream fail before qmigrate sees the destination die: say why.
                (
                    Some(Phase::Done {
                        outcome: *outcome,
                        why: Some(format!("{w}: the destination QEMU is gone")),
                    }),
                    cmds([C::ResumeSourceIfPaused]),
                )
            }
            (Phase::Securing { outcome, why: w }, O::Destination(EndState::Gone | EndState::NotRunning(_)))
            | (Phase::Securing { outcome, why: w }, O::DestinationGone) => (
                Some(Phase::Done {
                    outcome: *outcome,
                    why: Some(w.clone()),
                }),
                cmds([C::ResumeSourceIfPaused]),
            ),
            (Phase::Securing { why: w, .. }, O::Destination(EndState::Running)) => done(
                Outcome::Completed,
                format!("{w}, yet the destination runs the guest: the source is not resumed"),
            ),
            (Phase::Securing { why: w, .. }, O::Destination(EndState::Unknown)) => done(
                Outcome::Lost,
                format!("{w}; the destination does not answer, so the source is not resumed"),
            ),
            (Phase::Securing { .. }, _) => (None, nothing()),
        }
    }
}

fn is_postcopy(status: &str) -> bool {
    status.starts_with("postcopy")
}

fn nothing() -> Decision {
    Decision {
        commands: Vec::new(),
        why: None,
    }
}

fn cmds<const N: usize>(c: [Command; N]) -> Decision {
    Decision {
        commands: c.into(),
        why: None,
    }
}

fn why(mut d: Decision, w: impl Into<String>) -> Decision {
    d.why = Some(w.into());
    d
}

fn done(outcome: Outcome, w: impl Into<String>) -> (Option<Phase>, Decision) {
    let w = w.into();
    (
        Some(Phase::Done {
            outcome,
            why: Some(w.clone()),
        }),
        why(nothing(), w),
    )
}

fn done_ok(w: &str) -> (Option<Phase>, Decision) {
    (
        Some(Phase::Done {
            outcome: Outcome::Completed,
            why: None,
        }),
        why(nothing(), w),
    )
}

/// The migration ended in precopy without the guest moving: stop the destination and read it back first.
fn secure(outcome: Outcome, w: String) -> (Option<Phase>, Decision) {
    (
        Some(Phase::Securing {
            outcome,
            why: w.clone(),
        }),
        why(
            cmds([Command::StopDestination]),
            format!(
                "{w}: making sure the destination does not run the guest before the source runs on"
            ),
        ),
    )
}

fn describe(p: &Phase) -> &'static str {
    match p {
        Phase::Precopy { .. } | Phase::Cancelling { .. } => "it was in precopy",
        Phase::Postcopy | Phase::PostcopyPaused { .. } => "it was in postcopy",
        Phase::SwitchedOver { .. } | Phase::Verifying { .. } => "it had switched over",
        _ => "it was ending",
    }
}

fn fmt(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command as C;
    use Observation as O;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn st(x: &str) -> O {
        O::Status(x.into())
    }

    fn precopy() -> Phase {
        Phase::Precopy {
            source_stopped: false,
        }
    }

    fn switched(postcopy: bool) -> Phase {
        Phase::SwitchedOver {
            at: s(10),
            postcopy,
            guest_shutdown: false,
        }
    }

    fn paused(since: u64, attempts: u32, next: u64) -> Phase {
        Phase::PostcopyPaused {
            since: s(since),
            attempts,
            next_attempt_at: s(next),
        }
    }

    /// What the next phase must be.
    #[derive(Debug)]
    enum Next {
        Same,
        Is(Phase),
        Done(Outcome),
        /// A phase of this kind (compared by its name).
        Kind(&'static str),
    }

    fn kind(p: &Phase) -> &'static str {
        p.name()
    }

    /// (name, phase, rules, observation, now in seconds, the commands wanted, the next phase wanted).
    type Row<'a> = (&'a str, Phase, &'a Rules, O, u64, Vec<C>, Next);

    #[test]
    fn decision_table() {
        let verify = Rules {
            verify: s(2),
            ..Rules::default()
        };
        let plain = Rules::default();
        let lost = |before: Phase| Phase::SourceLost {
            since: s(5),
            before: Box::new(before),
        };
        let cancelling = |cause| Phase::Cancelling {
            cause,
            since: s(5),
            source_stopped: false,
        };
        let securing = |o| Phase::Securing {
            outcome: o,
            why: "x".into(),
        };
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // Before anything changed.
            ("interrupt in checks", Phase::Checks, &plain, O::Interrupt, 1, vec![], Next::Done(Outcome::Cancelled)),
            ("interrupt in set-up", Phase::SetUp, &plain, O::Interrupt, 1, vec![], Next::Done(Outcome::Cancelled)),
            // Precopy.
            ("active: ask the ladder", precopy(), &plain, st("active"), 3, vec![C::ConsultLadder], Next::Same),
            ("setup: ask the ladder", precopy(), &plain, st("setup"), 0, vec![C::ConsultLadder], Next::Same),
            ("ladder raises downtime", precopy(), &plain,
                O::Ladder { action: Action::RaiseDowntime { to: Duration::from_millis(600) }, reason: "r".into() }, 3,
                vec![C::Apply(Action::RaiseDowntime { to: Duration::from_millis(600) })], Next::Same),
            ("ladder pauses the source", precopy(), &plain,
                O::Ladder { action: Action::PauseSource, reason: "r".into() }, 3,
                vec![C::StopSource], Next::Is(Phase::Precopy { source_stopped: true })),
            ("ladder cancels at the timeout", precopy(), &plain,
                O::Ladder { action: Action::Cancel, reason: "timeout".into() }, 300,
                vec![C::Cancel], Next::Kind("cancelling")),
            ("interrupt in precopy cancels", precopy(), &plain, O::Interrupt, 3, vec![C::Cancel], Next::Kind("cancelling")),
            ("destination gone in precopy cancels", precopy(), &plain, O::DestinationGone, 3, vec![C::Cancel], Next::Kind("cancelling")),
            ("failed in precopy: stop the destination first", precopy(), &plain, st("failed"), 3,
                vec![C::StopDestination], Next::Kind("securing")),
            ("cancelled by someone else", precopy(), &plain, st("cancelled"), 3, vec![C::StopDestination], Next::Kind("securing")),
            ("completed: confirm the destination", precopy(), &plain, st("completed"), 10,
                vec![C::AskDestination], Next::Is(switched(false))),
            ("postcopy started", precopy(), &plain, st("postcopy-active"), 5, vec![], Next::Is(Phase::Postcopy)),
            ("status stuck after timeout", precopy(), &plain, st("cancelling"), 331, vec![C::StopDestination], Next::Kind("securing")),
            ("empty status after timeout", precopy(), &plain, st(""), 331, vec![C::StopDestination], Next::Kind("securing")),
            ("empty status before timeout", precopy(), &plain, st(""), 100, vec![], Next::Same),
            // Cancelling.
            ("cancel confirmed", cancelling(EndCause::Interrupted), &plain, st("cancelled"), 6, vec![C::StopDestination], Next::Kind("securing")),
            ("cancel lost the race to completion", cancelling(EndCause::Interrupted), &plain, st("completed"), 6,
                vec![C::AskDestination], Next::Kind("switched-over")),
            ("cancel lost the race to postcopy", cancelling(EndCause::Interrupted), &plain, st("postcopy-active"), 6, vec![], Next::Is(Phase::Postcopy)),
            ("cancel never confirmed", cancelling(EndCause::Interrupted), &plain, st("cancelling"), 40, vec![C::StopDestination], Next::Kind("securing")),
            ("cancel still in progress", cancelling(EndCause::Interrupted), &plain, st("cancelling"), 6, vec![], Next::Same),
            // Securing: the source runs on only once the destination is known not to run the guest.
            ("secured: destination gone", securing(Outcome::Failed), &plain, O::Destination(EndState::Gone), 7,
                vec![C::ResumeSourceIfPaused], Next::Done(Outcome::Failed)),
            ("secured: destination stopped", securing(Outcome::Cancelled), &plain, O::Destination(EndState::NotRunning("paused".into())), 7,
                vec![C::ResumeSourceIfPaused], Next::Done(Outcome::Cancelled)),
            ("securing: destination runs: never resume", securing(Outcome::Failed), &plain, O::Destination(EndState::Running), 7,
                vec![], Next::Done(Outcome::Completed)),
            ("securing: destination silent: never resume", securing(Outcome::Failed), &plain, O::Destination(EndState::Unknown), 7,
                vec![], Next::Done(Outcome::Lost)),
            // Postcopy: nothing is cancelled or killed.
            ("interrupt in postcopy", Phase::Postcopy, &plain, O::Interrupt, 6,
                vec![C::Notice("postcopy cannot be cancelled: the guest's memory is split between the hosts; letting it finish".into())], Next::Same),
            ("destination dies in postcopy", Phase::Postcopy, &plain, O::DestinationGone, 6, vec![], Next::Done(Outcome::Lost)),
            ("postcopy completes", Phase::Postcopy, &plain, st("completed"), 10, vec![C::AskDestination], Next::Is(switched(true))),
            ("postcopy pauses: recover", Phase::Postcopy, &plain, st("postcopy-paused"), 6,
                vec![C::Recover { attempt: 1 }], Next::Is(paused(6, 1, 8))),
            ("paused: wait for the backoff", paused(6, 1, 8), &plain, st("postcopy-paused"), 7, vec![], Next::Same),
            ("paused: retry after the backoff", paused(6, 1, 8), &plain, st("postcopy-paused"), 8,
                vec![C::Recover { attempt: 1 }], Next::Is(paused(6, 2, 12))),
            ("paused: QEMU reconnecting", paused(6, 1, 8), &plain, st("postcopy-recover"), 9, vec![], Next::Same),
            ("paused: attempt failed", paused(6, 2, 12), &plain, O::RecoverFailed("refused".into()), 9, vec![], Next::Is(paused(6, 2, 13))),
            ("paused: recovered", paused(6, 1, 8), &plain, st("postcopy-active"), 9, vec![], Next::Is(Phase::Postcopy)),
            ("paused: recovered and completed", paused(6, 1, 8), &plain, st("completed"), 9, vec![C::AskDestination], Next::Kind("switched-over")),
            ("paused: out of time: both stay paused", paused(6, 5, 20), &plain, st("postcopy-paused"), 306, vec![], Next::Done(Outcome::Paused)),
            ("paused: interrupt does not cancel", paused(6, 1, 8), &plain, O::Interrupt, 7,
                vec![C::Notice("postcopy cannot be cancelled: the guest's memory is split between the hosts; letting it finish".into())], Next::Same),
            ("paused: destination dies", paused(6, 1, 8), &plain, O::DestinationGone, 7, vec![], Next::Done(Outcome::Lost)),
            // QEMU fails the postcopy on the source (seen on the testbed: a stream cut just after the switch to
            // postcopy): it cannot be recovered, and QEMU may restart the source itself.
            ("postcopy failed: ask the source", Phase::Postcopy, &plain, st("failed"), 7,
                vec![C::AskSource], Next::Is(Phase::PostcopyFailed { source_runs: false })),
            ("paused postcopy failed: ask the source", paused(6, 1, 8), &plain, st("failed"), 7,
                vec![C::AskSource], Next::Is(Phase::PostcopyFailed { source_runs: false })),
            ("postcopy failed, QEMU restarted the source: stop the destination", Phase::PostcopyFailed { source_runs: false },
                &plain, O::Source(EndState::Running), 7, vec![C::StopDestination], Next::Is(Phase::PostcopyFailed { source_runs: true })),
            ("postcopy failed, source stopped: lost, nothing resumed", Phase::PostcopyFailed { source_runs: false },
                &plain, O::Source(EndState::NotRunning("paused".into())), 7, vec![], Next::Done(Outcome::Lost)),
            ("postcopy failed, source silent: lost", Phase::PostcopyFailed { source_runs: false },
                &plain, O::Source(EndState::Unknown), 7, vec![], Next::Done(Outcome::Lost)),
            ("postcopy failed, destination stopped: the source's run is the one", Phase::PostcopyFailed { source_runs: true },
                &plain, O::Destination(EndState::Gone), 7, vec![], Next::Done(Outcome::RolledBack)),
            ("postcopy failed, destination still runs: lost", Phase::PostcopyFailed { source_runs: true },
                &plain, O::Destination(EndState::Running), 7, vec![], Next::Done(Outcome::Lost)),
            ("postcopy failed: an unreachable source changes nothing", Phase::PostcopyFailed { source_runs: true },
                &plain, O::SourceUnreachable { closed: true }, 7, vec![], Next::Same),
            // Switched over.
            ("destination runs: done", switched(false), &plain, O::Destination(EndState::Running), 10, vec![], Next::Done(Outcome::Completed)),
            ("destination runs: verify", switched(false), &verify, O::Destination(EndState::Running), 10, vec![],
                Next::Is(Phase::Verifying { until: s(12), guest_shutdown: false })),
            ("no verify after postcopy", switched(true), &verify, O::Destination(EndState::Running), 10, vec![], Next::Done(Outcome::Completed)),
            ("destination paused: cont it", switched(false), &plain, O::Destination(EndState::NotRunning("paused".into())), 10,
                vec![C::ContinueDestination, C::AskDestination], Next::Same),
            ("destination still loading", switched(false), &plain, O::Destination(EndState::NotRunning("inmigrate".into())), 11, vec![], Next::Same),
            ("destination never took over", switched(false), &plain, O::Destination(EndState::NotRunning("inmigrate".into())), 41,
                vec![C::StopDestination], Next::Kind("rolling-back")),
            ("guest reset on the destination", switched(false), &plain, O::Guest(GuestEvent::ResetOrShutdown), 10,
                vec![C::AskDestination], Next::Kind("switched-over")),
            ("guest reset, QEMU exited (-no-reboot)", Phase::SwitchedOver { at: s(10), postcopy: false, guest_shutdown: true }, &verify,
                O::DestinationGone, 10, vec![], Next::Done(Outcome::Completed)),
            ("destination exits after switch-over, no verify: source not resumed", switched(false), &plain, O::DestinationGone, 10,
                vec![], Next::Done(Outcome::Lost)),
            ("destination exits after switch-over, verify: source resumed", switched(false), &verify, O::DestinationGone, 10,
                vec![C::ResumeSourceIfPaused], Next::Done(Outcome::RolledBack)),
            ("destination exits after postcopy, verify: source stale", switched(true), &verify, O::DestinationGone, 10,
                vec![], Next::Done(Outcome::Lost)),
            // Verifying.
            ("verify: guest resets: no rollback", Phase::Verifying { until: s(12), guest_shutdown: false }, &verify,
                O::Guest(GuestEvent::ResetOrShutdown), 11, vec![], Next::Done(Outcome::Completed)),
            ("verify: QEMU exits: rollback", Phase::Verifying { until: s(12), guest_shutdown: false }, &verify,
                O::DestinationGone, 11, vec![C::ResumeSourceIfPaused], Next::Done(Outcome::RolledBack)),
            ("verify: panic: stop the destination first", Phase::Verifying { until: s(12), guest_shutdown: false }, &verify,
                O::Guest(GuestEvent::Panicked), 11, vec![C::StopDestination], Next::Kind("rolling-back")),
            ("verify: window over", Phase::Verifying { until: s(12), guest_shutdown: false }, &verify, O::Tick, 12, vec![], Next::Done(Outcome::Completed)),
            ("verify: interrupt ends the window", Phase::Verifying { until: s(12), guest_shutdown: false }, &verify, O::Interrupt, 11,
                vec![], Next::Done(Outcome::Completed)),
            ("rolling back: destination stopped", Phase::RollingBack { why: "x".into() }, &verify,
                O::Destination(EndState::NotRunning("paused".into())), 12, vec![C::ResumeSourceIfPaused], Next::Done(Outcome::RolledBack)),
            ("rolling back: destination still runs", Phase::RollingBack { why: "x".into() }, &verify,
                O::Destination(EndState::Running), 12, vec![], Next::Done(Outcome::Lost)),
            // The source cannot be seen: ask the destination first.
            ("source silent in precopy", precopy(), &plain, O::SourceUnreachable { closed: false }, 5,
                vec![C::AskDestination, C::ReconnectSource], Next::Kind("source-lost")),
            ("source closed in postcopy", Phase::Postcopy, &plain, O::SourceUnreachable { closed: true }, 5,
                vec![C::AskDestination, C::ReconnectSource], Next::Kind("source-lost")),
            ("source lost, destination runs: moved", lost(precopy()), &plain, O::Destination(EndState::Running), 6, vec![], Next::Done(Outcome::Completed)),
            ("source lost in postcopy, destination runs: keep reaching the source", lost(Phase::Postcopy), &plain,
                O::Destination(EndState::Running), 6, vec![C::ReconnectSource], Next::Same),
            ("source lost, destination waits", lost(precopy()), &plain, O::Destination(EndState::NotRunning("inmigrate".into())), 6,
                vec![C::ReconnectSource], Next::Same),
            ("source lost, destination gone: reach the source", lost(precopy()), &plain, O::DestinationGone, 6, vec![C::ReconnectSource], Next::Same),
            ("source lost, interrupt: touch nothing", lost(precopy()), &plain, O::Interrupt, 6,
                vec![C::Notice("the source cannot be seen: nothing can be cancelled safely until it can".into())], Next::Same),
            ("source back: completed", lost(precopy()), &plain, st("completed"), 7, vec![C::AskDestination], Next::Kind("switched-over")),
            ("source back: still active", lost(precopy()), &plain, st("active"), 7, vec![C::ConsultLadder], Next::Is(precopy())),
            ("source lost too long: touch nothing", lost(precopy()), &plain, O::SourceUnreachable { closed: false }, 70, vec![], Next::Done(Outcome::Failed)),
        ];
        for (name, phase, rules, obs, now, want_cmds, want_next) in table {
            let mut m = Machine::new(rules.clone());
            m.phase = phase.clone();
            if matches!(phase, Phase::Postcopy | Phase::PostcopyPaused { .. }) {
                m.postcopy_started = true;
                // The common case: the guest ran on the destination (its own table below covers the other).
                m.destination_ran = true;
            }
            let d = m.decide(&obs, s(now));
            assert_eq!(d.commands, want_cmds, "{name}: commands ({d:?})");
            match want_next {
                Next::Same => {
                    assert_eq!(kind(&m.phase), kind(&phase), "{name}: phase {:?}", m.phase)
                }
                Next::Is(p) => assert_eq!(m.phase, p, "{name}"),
                Next::Kind(k) => assert_eq!(kind(&m.phase), k, "{name}: phase {:?}", m.phase),
                Next::Done(o) => assert_eq!(
                    m.outcome().map(|x| x.0),
                    Some(o),
                    "{name}: phase {:?}",
                    m.phase
                ),
            }
        }
    }

    /// QEMU on the source may report the failed stream before qmigrate sees the destination die (QEMU 7.2 does):
    /// the reason still names the destination.
    #[test]
    fn a_precopy_failure_names_a_destination_found_gone() {
        for (obs, names) in [
            (O::Destination(EndState::Gone), true),
            (O::DestinationGone, true),
            (O::Destination(EndState::NotRunning("paused".into())), false),
        ] {
            let mut m = Machine::new(Rules::default());
            m.phase = precopy();
            m.decide(&st("failed"), s(3));
            m.decide(&obs, s(4));
            let (outcome, why) = m.outcome().unwrap();
            assert_eq!(outcome, Outcome::Failed, "{obs:?}");
            let why = why.unwrap();
            assert!(
                why.starts_with("QEMU reports the migration failed"),
                "{why}"
            );
            assert_eq!(
                why.contains("the destination QEMU is gone"),
                names,
                "{obs:?}: {why}"
            );
        }
    }

    /// A postcopy destination that dies: lost either way (QEMU refuses to cancel or resume a postcopy on the
    /// source), the reason saying whether the guest ever ran there; nothing is resumed or killed.
    #[test]
    fn a_postcopy_destination_that_dies_is_told_apart_by_whether_the_guest_ran_there() {
        for (seen, ran) in [
            (None, false),
            (Some(O::Guest(GuestEvent::Resumed)), true),
            (Some(O::Destination(EndState::Running)), true),
        ] {
            let mut m = Machine::new(Rules::default());
            m.phase = Phase::Postcopy;
            m.postcopy_started = true;
            if let Some(o) = &seen {
                m.decide(o, s(6));
            }
            assert_eq!(m.destination_ran, ran, "{seen:?}");
            let d = m.decide(&O::DestinationGone, s(7));
            assert!(d.commands.is_empty(), "{seen:?}: {d:?}");
            let (outcome, why) = m.outcome().unwrap();
            assert_eq!(outcome, Outcome::Lost, "{seen:?}");
            assert_eq!(
                why.unwrap().contains("before the guest ever ran there"),
                !ran,
                "{seen:?}: {why:?}"
            );
        }
        // Taking over a postcopy, we cannot know: it counts as ran.
        let (m, _) = Machine::adopting(Rules::default(), "postcopy-active", s(0));
        assert!(m.destination_ran);
    }

    /// The first rule, over every phase: the source is resumed only once the destination is known not to run the
    /// guest, and never after postcopy started.
    #[test]
    fn resume_only_when_the_destination_does_not_run() {
        let phases = [
            Phase::Precopy {
                source_stopped: true,
            },
            Phase::Cancelling {
                cause: EndCause::Interrupted,
                since: s(1),
                source_stopped: true,
            },
            Phase::Postcopy,
            paused(1, 1, 2),
            switched(false),
            switched(true),
            Phase::Verifying {
                until: s(20),
                guest_shutdown: false,
            },
            Phase::Securing {
                outcome: Outcome::Failed,
                why: "x".into(),
            },
            Phase::RollingBack { why: "x".into() },
            Phase::PostcopyFailed { source_runs: false },
            Phase::PostcopyFailed { source_runs: true },
        ];
        let observations = [
            O::Source(EndState::Running),
            O::Source(EndState::NotRunning("paused".into())),
            st("active"),
            st("failed"),
            st("cancelled"),
            st("completed"),
            st("postcopy-paused"),
            st("postcopy-active"),
            O::SourceUnreachable { closed: true },
            O::DestinationGone,
            O::Destination(EndState::Running),
            O::Destination(EndState::Unknown),
            O::Destination(EndState::NotRunning("inmigrate".into())),
            O::Guest(GuestEvent::ResetOrShutdown),
            O::Guest(GuestEvent::Panicked),
            O::Interrupt,
            O::Tick,
        ];
        for rules in [
            Rules::default(),
            Rules {
                verify: s(5),
                ..Rules::default()
            },
        ] {
            for (p, ran) in phases.iter().flat_map(|p| [(p, true), (p, false)]) {
                for o in &observations {
                    let mut m = Machine::new(rules.clone());
                    m.phase = p.clone();
                    m.postcopy_started = matches!(
                        p,
                        Phase::Postcopy
                            | Phase::PostcopyPaused { .. }
                            | Phase::PostcopyFailed { .. }
                            | Phase::SwitchedOver { postcopy: true, .. }
                    );
                    m.destination_ran = ran;
                    let d = m.decide(o, s(10));
                    if d.commands.contains(&C::ResumeSourceIfPaused) {
                        assert!(!m.postcopy_started, "resumed after postcopy: {p:?} {o:?}");
                        assert!(
                            matches!(
                                o,
                                O::DestinationGone
                                    | O::Destination(EndState::Gone | EndState::NotRunning(_))
                            ),
                            "resumed without knowing the destination does not run: {p:?} {o:?}"
                        );
                    }
                    assert!(
                        !(m.postcopy_started && d.commands.contains(&C::Cancel)),
                        "cancelled in postcopy: {p:?} {o:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn adopting_starts_from_the_source_status() {
        let table = [
            ("active", "precopy"),
            ("postcopy-active", "postcopy"),
            ("postcopy-paused", "postcopy-paused"),
            ("completed", "switched-over"),
            ("failed", "securing"),
        ];
        for (status, want) in table {
            let (m, _) = Machine::adopting(Rules::default(), status, s(0));
            assert_eq!(kind(&m.phase), want, "{status}");
        }
    }

    /// Under -no-reboot a guest's own reset ends its QEMU: the SHUTDOWN event comes first, then the QEMU goes.
    /// That is the guest's doing, with or without --verify: no rollback, no "lost".
    #[test]
    fn a_guest_shutdown_then_its_qemu_exiting_is_the_guests_doing() {
        for verify in [Duration::ZERO, s(5)] {
            let mut m = Machine::new(Rules {
                verify,
                ..Rules::default()
            });
            m.phase = switched(false);
            m.decide(&O::Guest(GuestEvent::ResetOrShutdown), s(10));
            let d = m.decide(&O::DestinationGone, s(10));
            assert!(!d.commands.contains(&C::ResumeSourceIfPaused), "{d:?}");
            assert_eq!(
                m.outcome().map(|o| o.0),
                Some(Outcome::Completed),
                "{:?}",
                m.phase
            );
            assert!(m.guest_shutdown);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(recover_backoff(0), s(1));
        assert_eq!(recover_backoff(1), s(2));
        assert_eq!(recover_backoff(3), s(8));
        assert_eq!(recover_backoff(30), s(10));
    }
}
