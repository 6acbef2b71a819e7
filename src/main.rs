//! The `qmigrate` binary: argument parsing, tracing set-up, error printing and exit codes. Nothing else.

use clap::Parser;

mod cli;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match args.command {
        cli::Command::Simulate(s) => {
            match qmigrate::plan::run_simulate_command(&s.scenario, &s.policy, s.rounds, s.json) {
                Ok(out) => {
                    print!("{out}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
    }
}
