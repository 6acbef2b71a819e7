//! Starts a test guest on a host of the testbed (`scripts/testbed up`) and leaves it running there, in the host's
//! namespace and CPU set, its QMP socket in the host's run directory (where the testbed's inventory finds it).
//! For benchmarks and trying things by hand; prints the guest's pid and QMP socket once its workload is ready.
//!
//!     cargo run --example testbed_guest -- HOST NAME WORKLOAD [--testbed NAME] [--dir DIR] [--memory-mib 256]
//!
//! QEMU and the guest image come from QMIGRATE_QEMU and QMIGRATE_GUEST_DIR (default: target/guest).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qmigrate::testbed::{Guest, GuestSpec};

#[derive(Parser)]
struct Args {
    /// The testbed host: h1, h2, ...
    host: String,
    /// The guest's name (its -name and socket file name).
    name: String,
    /// idle, cpu, dirty:MiB[:MiB/s], web, netrecv, disk.
    workload: String,
    /// The testbed's name (scripts/testbed up --name).
    #[arg(long, default_value = "qmt")]
    testbed: String,
    /// The testbed's state directory (default /tmp/qmigrate-testbed-NAME).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = a
        .dir
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/qmigrate-testbed-{}", a.testbed)));
    let run_dir = dir.join(&a.host).join("run");
    anyhow::ensure!(
        run_dir.is_dir(),
        "no testbed host {} at {} (scripts/testbed up?)",
        a.host,
        run_dir.display()
    );
    let guest_dir = std::env::var_os("QMIGRATE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/guest"));
    let mut spec = GuestSpec::new(&a.name, &a.workload, &guest_dir, &run_dir);
    spec.memory_mib = a.memory_mib;
    if let Some(q) = std::env::var_os("QMIGRATE_QEMU") {
        spec.qemu = q.into();
    }
    let testbed = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");
    spec.wrapper = vec![
        testbed.into(),
        "exec".into(),
        a.host.clone(),
        "--name".into(),
        a.testbed.clone(),
        "--".into(),
    ];
    let mut guest = Guest::launch(spec).await?;
    guest.wait_ready(Duration::from_secs(90)).await?;
    let qmp = guest.qmp_path();
    let pid = guest.process.detach();
    println!("{pid} {}", qmp.display());
    Ok(())
}
