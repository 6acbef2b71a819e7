//! Using qmigrate as a library from a test harness: start a guest and an incoming destination from the
//! project's templates, migrate with the convergence controller, read the report.
//!
//! ```sh
//! scripts/build-guest && cargo run --example migrate_one -- target/guest dirty:64
//! ```

use std::time::Duration;

use qmigrate::migrate::{migrate, Destination, MigrationRequest};
use qmigrate::testbed::{Guest, GuestSpec};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let guest_dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "target/guest".into()));
    let workload = args.next().unwrap_or_else(|| "dirty:64".into());
    let run_dir = tempfile::tempdir()?;

    // Both guests are killed when `source` and `destination` are dropped.
    let mut source =
        Guest::launch(GuestSpec::new("src", &workload, &guest_dir, run_dir.path())).await?;
    source.wait_ready(Duration::from_secs(60)).await?;
    let mut dst_spec = GuestSpec::new("dst", &workload, &guest_dir, run_dir.path());
    dst_spec.incoming = true;
    let destination = Guest::launch(dst_spec).await?;

    let mut req = MigrationRequest::new(
        &source.qmp_path().display().to_string(),
        Destination::Qmp(destination.qmp_path().display().to_string()),
    );
    req.ladder.timeout = Duration::from_secs(120);
    let report = migrate(&req, &CancellationToken::new(), &|p| {
        eprintln!("pass {} remaining {} bytes", p.pass, p.remaining_bytes);
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    assert_eq!(report.final_state.running_copies, 1);
    Ok(())
}
