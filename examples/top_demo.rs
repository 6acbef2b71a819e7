//! Tries `qmigrate::top::run` by hand before the CLI has a `top` command:
//! `cargo run --example top_demo -- [--interval 2s] SOCKET…`.

use std::process::ExitCode;
use std::time::Duration;

use qmigrate::stats::{error_chain, SampleOptions};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut interval = Duration::from_secs(1);
    if args.first().map(String::as_str) == Some("--interval") && args.len() >= 2 {
        match humantime::parse_duration(&args[1]) {
            Ok(d) => interval = d,
            Err(e) => {
                eprintln!("top_demo: --interval {}: {e}", args[1]);
                return ExitCode::from(2);
            }
        }
        args.drain(..2);
    }
    // No tracing subscriber on purpose: a log line on stderr would be drawn over the view.
    match qmigrate::top::run(args, SampleOptions::new(interval)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("top_demo: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
