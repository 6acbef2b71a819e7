//! Balancing policies (band, idc, sandpiper) and the scenario simulator: pure decision code, no I/O, no tokio.

use std::path::Path;

/// Errors of the planning layer; each names the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("scenario {path}: {reason}")]
    Scenario { path: String, reason: String },
}

/// Runs `qmigrate simulate`: reads the scenario file, runs `policy` for `rounds` rounds and renders the result
/// (JSON when `json`, a table otherwise).
pub fn run_simulate_command(path: &Path, policy: &str, rounds: u32, json: bool) -> Result<String, PlanError> {
    let _ = (policy, rounds, json);
    Err(PlanError::Scenario {
        path: path.display().to_string(),
        reason: "the simulator is not built yet".into(),
    })
}
