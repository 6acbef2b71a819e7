//! Balancing policies (band, idc, sandpiper) and the scenario simulator: pure decision code, no I/O, no tokio. The
//! one exception is [`run_simulate_command`], the CLI entry point, which reads the scenario file before handing the
//! figures to the pure layer.
//!
//! - [`scenario`]: the model (hosts, VMs, traffic, tuning) and its validating JSON loader.
//! - `index`: look-ups over a scenario (names to positions, VMs per host, flows per VM, committed memory), built once
//!   a round and kept up to date as its decisions are applied, so that no round scans the scenario inside a loop.
//! - [`model`]: the load-move model, how a migration or balloon change alters the figures.
//! - [`ar1`]: the AR(1) one-step forecast, shared with `crate::stats::history`.
//! - [`band`]: paper 000's three-band CPU policy.
//! - [`budget`]: an evacuation's per-host link budget split among its migrations, more to a stalled one.
//! - [`evacuate`]: paper 001's informed evacuation plan: destinations by capacity and affinity, the sequence.
//! - [`hotspot`]: AR(1) hotspot detection, balloon steps and the destination room test shared by idc and sandpiper.
//! - `round`: the round idc and sandpiper share, each policy plugging in its choice of VM and destination.
//! - [`idc`]: paper 004's inter-domain-communication-aware policy.
//! - [`sandpiper`]: Sandpiper's volume-to-size policy, paper 004's baseline.
//! - [`simulate`]: rounds of decide-then-apply, rendered as text or JSON.
//!
//! Tests only: `reference` keeps the policies and the evacuation planner as they were before they were made to
//! scale, and a property test checks that both decide alike. `scripts/bench-plan` measures a round at scale.

use std::fmt;
use std::io::Read as _;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

pub mod ar1;
pub mod band;
pub mod budget;
pub mod evacuate;
pub mod hotspot;
pub mod idc;
mod index;
pub mod model;
mod round;
pub mod sandpiper;
pub mod scenario;
pub mod simulate;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod reference;

pub use scenario::{
    Entry, Flow, History, Host, Scenario, Tuning, Vm, MAX_FLOWS, MAX_HOSTS, MAX_VMS,
};

/// The largest scenario file `qmigrate simulate` reads. A scenario that fails to load is parsed into a JSON tree to
/// explain the failure, and a tree takes many times the bytes of its text (about 11 times, measured), so the file is
/// bounded rather than the tree. A scenario at the entry limits ([`MAX_HOSTS`], [`MAX_VMS`], [`MAX_FLOWS`]) with
/// 10 samples of history per host takes about 27 MiB, so this leaves room for longer histories and descriptions.
pub const MAX_SCENARIO_BYTES: u64 = 64 * 1024 * 1024;

/// The most rounds `qmigrate simulate --rounds` runs: every round is kept for the output, so the rounds bound both
/// the time and the size of what is printed. Most rounds are cheap (a round without a hotspot costs little), but a
/// scenario near the entry limits that stays stuck (hotspots, no destination with room) costs the whole search every
/// round (about 5 s at the limits, measured on a busy machine: see [`MAX_HOSTS`]), so the most rounds of such a
/// scenario take hours; ask for fewer.
pub const MAX_ROUNDS: u32 = 10_000;

/// Errors of the planning layer; each names the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read scenario {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("scenario is not valid JSON: {reason}")]
    Syntax { reason: String },
    #[error("unknown policy {name:?} (expected band, idc or sandpiper)")]
    UnknownPolicy { name: String },
    #[error("--rounds must be at least 1")]
    NoRounds,
    #[error("--rounds must be at most {max}, found {rounds}")]
    TooManyRounds { rounds: u32, max: u32 },
    #[error("scenario {path} is not a regular file")]
    NotAFile { path: String },
    #[error("scenario {path} is larger than the limit of {max_bytes} bytes")]
    TooLarge { path: String, max_bytes: u64 },
    #[error("scenario lists {count} {list}, above the limit of {max}")]
    TooMany {
        list: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{entry}: missing field {field:?}")]
    MissingField { entry: Entry, field: &'static str },
    #[error("{entry}: unknown field {field:?}")]
    UnknownField { entry: Entry, field: String },
    #[error("{entry}: {field} must be a number, found {found}")]
    NotANumber {
        entry: Entry,
        field: &'static str,
        found: String,
    },
    #[error("{entry}: {field} is negative ({value})")]
    Negative {
        entry: Entry,
        field: &'static str,
        value: f64,
    },
    #[error("{entry}: {field} is {value}, above {max}")]
    OutOfRange {
        entry: Entry,
        field: &'static str,
        value: f64,
        max: f64,
    },
    #[error("{entry} is listed twice")]
    Duplicate { entry: Entry },
    #[error("vm {vm:?}: host {host:?} is not in the scenario")]
    UnknownHost { vm: String, host: String },
    #[error("vm {vm:?} is on no host")]
    NoHost { vm: String },
    #[error("{entry}: vm {vm:?} is not in the scenario")]
    UnknownVm { entry: Entry, vm: String },
    #[error("{entry}: {reason}")]
    Invalid { entry: Entry, reason: String },
}

/// The balancing policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Paper 000: light/moderate/heavy bands around the mean CPU utilisation.
    Band,
    /// Paper 004: hotspots answered with ballooning first, then migration that keeps talking VMs together.
    Idc,
    /// Sandpiper: the largest volume-to-size ratio moves to the least loaded host.
    Sandpiper,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Band, Policy::Idc, Policy::Sandpiper];
}

impl FromStr for Policy {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "band" => Ok(Policy::Band),
            "idc" => Ok(Policy::Idc),
            "sandpiper" => Ok(Policy::Sandpiper),
            other => Err(PlanError::UnknownPolicy {
                name: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Band => "band",
            Policy::Idc => "idc",
            Policy::Sandpiper => "sandpiper",
        })
    }
}

/// A named number that went into a decision (threshold, vector, volume…), so a reader can check the arithmetic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub value: f64,
}

pub(crate) fn fig(name: &'static str, value: f64) -> Figure {
    Figure { name, value }
}

/// One action a policy asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decision {
    /// Live-migrate `vm` from `from` to `to`.
    Migrate {
        vm: String,
        from: String,
        to: String,
        reason: String,
        figures: Vec<Figure>,
    },
    /// Raise (or lower) the balloon target of `vm` on `host`.
    Balloon {
        vm: String,
        host: String,
        from_mib: u64,
        to_mib: u64,
        reason: String,
    },
}

/// A policy's answer for one round: its decisions, and notes on why it did not do more.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundPlan {
    pub decisions: Vec<Decision>,
    pub notes: Vec<String>,
}

/// Runs one round of `policy` on the figures in `scenario`.
pub fn plan_round(policy: Policy, scenario: &Scenario) -> RoundPlan {
    match policy {
        Policy::Band => band::plan(scenario),
        Policy::Idc => idc::plan(scenario),
        Policy::Sandpiper => sandpiper::plan(scenario),
    }
}

/// The decisions of one round of `policy` on `scenario`, without the notes.
pub fn decide(policy: Policy, scenario: &Scenario) -> Vec<Decision> {
    plan_round(policy, scenario).decisions
}

/// Runs `qmigrate simulate`: reads the scenario file, runs `policy` for `rounds` rounds and renders the result
/// (JSON when `json`, a table otherwise). Refuses more than [`MAX_ROUNDS`] rounds, and a scenario that is not a
/// regular file or is larger than [`MAX_SCENARIO_BYTES`].
pub fn run_simulate_command(
    path: &Path,
    policy: &str,
    rounds: u32,
    json: bool,
) -> Result<String, PlanError> {
    let policy: Policy = policy.parse()?;
    if rounds == 0 {
        return Err(PlanError::NoRounds);
    }
    if rounds > MAX_ROUNDS {
        return Err(PlanError::TooManyRounds {
            rounds,
            max: MAX_ROUNDS,
        });
    }
    let text = read_scenario(path, MAX_SCENARIO_BYTES)?;
    let scenario = Scenario::from_json(&text)?;
    let run = simulate::simulate(policy, &scenario, rounds);
    Ok(if json {
        simulate::render_json(&run)
    } else {
        simulate::render_text(&run)
    })
}

/// Reads a scenario file of at most `max_bytes`. Only a regular file is read: a FIFO would block the read (and the
/// open) forever and a device such as `/dev/zero` never ends. The size is checked before reading, and the read stops
/// one byte past the limit anyway, in case the file grows in between.
fn read_scenario(path: &Path, max_bytes: u64) -> Result<String, PlanError> {
    let shown = || crate::text::printable(&path.display().to_string()).into_owned();
    let read_error = |e: std::io::Error| PlanError::Read {
        path: shown(),
        reason: e.to_string(),
    };
    let not_a_file = || PlanError::NotAFile { path: shown() };
    let too_large = || PlanError::TooLarge {
        path: shown(),
        max_bytes,
    };
    // Checked before opening, because opening a FIFO for reading waits for a writer.
    if !std::fs::metadata(path).map_err(read_error)?.is_file() {
        return Err(not_a_file());
    }
    // Non-blocking, and checked again on the open file, in case the path was swapped for a FIFO meanwhile; on a
    // regular file O_NONBLOCK changes nothing.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(read_error)?
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    if meta.len() > max_bytes {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| PlanError::Read {
        path: shown(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_file_is_read_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_scenario(&path, 10).unwrap(), "0123456789");
        let err = read_scenario(&path, 9).unwrap_err();
        assert!(
            matches!(err, PlanError::TooLarge { max_bytes: 9, .. }),
            "{err}"
        );
        let err = read_scenario(dir.path(), 100).unwrap_err();
        assert!(matches!(err, PlanError::NotAFile { .. }), "{err}");
        let err = read_scenario(Path::new("/dev/null"), 100).unwrap_err();
        assert!(matches!(err, PlanError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_scenario(&path, 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("scenario {} is not a regular file", path.display())
        );
    }

    #[test]
    fn rounds_are_bounded() {
        let err = run_simulate_command(Path::new("/nonexistent"), "band", MAX_ROUNDS + 1, false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--rounds must be at most {MAX_ROUNDS}, found {}",
                MAX_ROUNDS + 1
            )
        );
    }
}
