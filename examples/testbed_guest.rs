//! Starts a test guest on a host of the testbed (`scripts/testbed up`) and leaves it running there, in the host's
//! namespace and CPU set, its QMP socket in the host's run directory (where the testbed's inventory finds it).
//! For benchmarks and trying things by hand; prints the guest's pid and QMP socket once its workload is ready.
//!
//!     cargo run --example testbed_guest -- HOST NAME WORKLOAD [--testbed NAME] [--dir DIR] [--memory-mib 256]
//!                                         [--ip ADDR[/PREFIX] [--gateway ADDR]]
//!
//! `--ip` gives the guest a virtio NIC on a tap in the host's bridge `br0`, the segment of every host and the
//! client, so the guest is reachable at ADDR from all of them (take one from SUBNET.100 up). The tap is named and
//! the MAC chosen from the testbed's and the guest's names, so both stay the same wherever the guest moves; the
//! testbed's `qemu-ifup` adds the tap to `br0` of whichever host namespace QEMU runs in.
//!
//! QEMU and the guest image come from QMIGRATE_QEMU and QMIGRATE_GUEST_DIR (default: target/guest).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qmigrate::testbed::{BridgeNic, Guest, GuestSpec};

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
    /// A NIC on the host's bridge with this address (`/24` unless a prefix is given), e.g. 10.77.0.100.
    #[arg(long, value_name = "ADDR[/PREFIX]")]
    ip: Option<String>,
    /// The guest's default route (only with --ip). The testbed needs none: hosts, client and guests share a /24.
    #[arg(long, value_name = "ADDR", requires = "ip")]
    gateway: Option<String>,
}

/// The guest init's parameters (scripts/guest/init): `qm_ip=ADDR/PREFIX`, `qm_gw=ADDR`.
fn kernel_params(ip: &str, gateway: Option<&str>) -> anyhow::Result<String> {
    let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "24"));
    anyhow::ensure!(
        addr.parse::<std::net::Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32),
        "--ip {ip}: not an IPv4 address with an optional /PREFIX"
    );
    let mut params = format!("qm_ip={addr}/{prefix}");
    if let Some(gw) = gateway {
        anyhow::ensure!(
            gw.parse::<std::net::Ipv4Addr>().is_ok(),
            "--gateway {gw}: not an IPv4 address"
        );
        params.push_str(&format!(" qm_gw={gw}"));
    }
    Ok(params)
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
    let mut nic = None;
    if let Some(ip) = &a.ip {
        let ifup = dir.join("qemu-ifup");
        anyhow::ensure!(
            ifup.is_file(),
            "no {} (made by scripts/testbed up; bring the testbed up again)",
            ifup.display()
        );
        let bridge_nic = BridgeNic::new(&a.testbed, &a.name);
        spec.extra_args.extend(bridge_nic.qemu_args(&ifup));
        spec.kernel_extra = kernel_params(ip, a.gateway.as_deref())?;
        nic = Some(bridge_nic);
    }
    let testbed = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");
    spec.wrapper = vec![
        testbed.into(),
        "exec".into(),
        a.host.clone(),
        "--name".into(),
        a.testbed.clone(),
        "--dir".into(),
        dir.display().to_string(),
        "--".into(),
    ];
    let mut guest = Guest::launch(spec).await?;
    guest.wait_ready(Duration::from_secs(90)).await?;
    let qmp = guest.qmp_path();
    let pid = guest.process.detach();
    match nic {
        Some(nic) => println!(
            "{pid} {} tap {} mac {} ip {}",
            qmp.display(),
            nic.tap,
            nic.mac,
            a.ip.as_deref().unwrap_or("")
        ),
        None => println!("{pid} {}", qmp.display()),
    }
    Ok(())
}
