//! Balancing policies (band, idc, sandpiper) and the scenario simulator: pure decision code, no I/O, no tokio. The
//! one exception is [`run_simulate_command`], the CLI entry point, which reads the scenario file before handing the
//! figures to the pure layer.
//!
//! - [`scenario`]: the model (hosts, VMs, traffic, tuning) and its validating JSON loader.
//! - [`model`]: the load-move model, how a migration or balloon change alters the figures.
//! - [`band`]: paper 000's three-band CPU policy.
//! - [`hotspot`]: AR(1) hotspot detection, balloon steps and the destination room test shared by idc and sandpiper.
//! - [`idc`]: paper 004's inter-domain-communication-aware policy.
//! - [`sandpiper`]: Sandpiper's volume-to-size policy, paper 004's baseline.
//! - [`simulate`]: rounds of decide-then-apply, rendered as text or JSON.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

pub mod band;
pub mod hotspot;
pub mod idc;
pub mod model;
pub mod sandpiper;
pub mod scenario;
pub mod simulate;

#[cfg(test)]
mod properties;

pub use scenario::{Entry, Flow, History, Host, Scenario, Tuning, Vm};

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
/// (JSON when `json`, a table otherwise).
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
    let text = std::fs::read_to_string(path).map_err(|e| PlanError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let scenario = Scenario::from_json(&text)?;
    let run = simulate::simulate(policy, &scenario, rounds);
    Ok(if json {
        simulate::render_json(&run)
    } else {
        simulate::render_text(&run)
    })
}
