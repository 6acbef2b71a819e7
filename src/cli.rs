//! Command-line definitions (raw arguments only; validation lives in the library).

use std::path::PathBuf;

#[derive(Debug, clap::Parser)]
#[command(name = "qmigrate", version, about = "Live migration of bare QEMU VMs over QMP")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run a balancing policy on a scenario file, with no QEMU, and print each round's decisions.
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Scenario file (JSON): hosts, vms, traffic.
    pub scenario: PathBuf,
    /// Policy: band, idc or sandpiper.
    #[arg(long)]
    pub policy: String,
    /// How many rounds to run.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
