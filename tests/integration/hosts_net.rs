//! Networked guests on the testbed: a guest with a NIC on its host's bridge, moved to another host, still reachable.
//!
//! The guest's NIC is a tap named by `ifname=` whose ifup script is the testbed's `qemu-ifup`: QEMU runs it in the
//! host namespace it starts in, which puts the tap on that host's `br0`, the segment the client shares. Moving the
//! guest to another host starts the destination from the same command line there (the tap's name is free on that
//! host), so the guest keeps its address and MAC and only the link its traffic crosses changes. The test checks
//! that by the bytes each host's link sends, and each end of the move with its own QMP client and `ip`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qmigrate::testbed::{BridgeNic, GuestSpec};
use serde_json::Value;

use crate::harness::{run_state, run_state_or_gone, Bed};
use crate::hosts::{exec_on, migrate_to, run_dir};
use crate::testbed::{self, run};

/// The `web` workload's `/www/file` (scripts/guest/init).
const FILE_BYTES: usize = 1 << 20;

/// A guest's NIC on its host's bridge ([`BridgeNic`]) and its address (`qm_ip=`).
pub struct GuestNic {
    pub nic: BridgeNic,
    pub ip: String,
}

impl GuestNic {
    pub fn new(tb: &testbed::Bed, guest: &str, ip: &str) -> GuestNic {
        GuestNic {
            nic: BridgeNic::new(tb.name, guest),
            ip: ip.to_string(),
        }
    }

    fn apply(&self, tb: &testbed::Bed, spec: &mut GuestSpec) {
        let ifup = tb.dir.join("qemu-ifup");
        assert!(
            ifup.is_file(),
            "scripts/testbed up made no {}",
            ifup.display()
        );
        spec.extra_args.extend(self.nic.qemu_args(&ifup));
        spec.kernel_extra = format!("{} qm_ip={}/24", spec.kernel_extra, self.ip)
            .trim()
            .to_string();
    }
}

/// Starts a guest on a testbed host (its namespace and CPU set) with `nic`, and waits for its workload.
pub async fn guest_with_nic(
    bed: &mut Bed,
    tb: &testbed::Bed,
    host: &str,
    name: &str,
    workload: &str,
    nic: &GuestNic,
) -> PathBuf {
    let dir = run_dir(tb, host);
    let wrapper = exec_on(tb, host);
    bed.source_with(name, workload, |spec| {
        spec.run_dir = dir;
        spec.wrapper = wrapper;
        nic.apply(tb, spec);
    })
    .await
}

/// The bytes a host's link has sent towards the switch (its `eth0`, under the bridge).
fn sent_bytes(tb: &testbed::Bed, host: &str) -> u64 {
    let ns = format!("{}-{host}", tb.name);
    let r = run(
        Command::new("ip").args(["-n", &ns, "-j", "-s", "link", "show", "dev", "eth0"]),
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let links: Value = serde_json::from_str(&r.stdout).expect("ip -j output");
    links[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx bytes for {ns} eth0: {}", r.stdout))
}

/// The interfaces on a host's `br0`.
fn on_bridge(tb: &testbed::Bed, host: &str) -> String {
    let ns = format!("{}-{host}", tb.name);
    let r = run(
        Command::new("ip").args(["-n", &ns, "-o", "link", "show", "master", "br0"]),
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    r.stdout
}

fn has_tap(bridge: &str, tap: &str) -> bool {
    bridge
        .lines()
        .any(|l| l.split(": ").nth(1).is_some_and(|n| n == tap))
}

/// Fetches `http://IP/file` from the client namespace with curl into `into`; returns its content and how many
/// bytes each host's link sent meanwhile (h1, h2).
fn fetch(tb: &testbed::Bed, ip: &str, into: &Path) -> (Vec<u8>, u64, u64) {
    let _ = std::fs::remove_file(into);
    let before = (sent_bytes(tb, "h1"), sent_bytes(tb, "h2"));
    let mut argv = exec_on(tb, "client");
    argv.extend(
        [
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-o",
            &into.display().to_string(),
            "-w",
            "%{http_code}",
            &format!("http://{ip}/file"),
        ]
        .map(String::from),
    );
    let r = run(
        Command::new(&argv[0]).args(&argv[1..]),
        Duration::from_secs(90),
    );
    assert_eq!(r.code, Some(0), "curl from the client: {r:?}");
    assert_eq!(r.stdout, "200", "{r:?}");
    let after = (sent_bytes(tb, "h1"), sent_bytes(tb, "h2"));
    let body = std::fs::read(into).expect("the fetched file");
    assert_eq!(body.len(), FILE_BYTES, "fetched {} bytes", body.len());
    (body, after.0 - before.0, after.1 - before.1)
}

/// A `web` guest with a NIC on h1's bridge serves its file to the client across h1's link; moved to h2 with
/// `migrate --to-host`, it serves the same file at the same address across h2's link, its tap now on h2's
/// bridge, and nothing of it is left on h1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_guest_moved_to_another_host_stays_reachable_at_its_address() {
    let tb = testbed::Bed::new("qmn", "10.86.0");
    let up = tb.up(&["--hosts", "2", "--rate", "200mbit", "--delay", "0ms"]);
    assert_eq!(up.code, Some(0), "testbed up: {up:?}");
    let mut bed = Bed::new();
    let nic = GuestNic::new(&tb, "web", &format!("{}.100", tb.subnet));
    let on_h1 = guest_with_nic(&mut bed, &tb, "h1", "web", "web", &nic).await;
    let src_pid = bed.pid_of(&on_h1);
    let on_h2 = run_dir(&tb, "h2").join("web.qmp");
    assert!(
        has_tap(&on_bridge(&tb, "h1"), &nic.nic.tap),
        "{}",
        on_bridge(&tb, "h1")
    );
    assert!(!has_tap(&on_bridge(&tb, "h2"), &nic.nic.tap));

    // Served from h1: the file crosses h1's link, not h2's.
    let scratch = bed.path("fetched");
    let (first, via_h1, via_h2) = fetch(&tb, &nic.ip, &scratch);
    assert!(
        via_h1 >= FILE_BYTES as u64 && via_h2 < FILE_BYTES as u64 / 4,
        "h1's link sent {via_h1} bytes, h2's {via_h2}"
    );

    let inv = tb.dir.join("inventory.toml").display().to_string();
    // The guest's clients' view of the downtime: a TCP connect to its web server every 10 ms from the client
    // namespace, beside QEMU's own figure.
    let probe = format!("tcp:{}:80", nic.ip);
    let netns = format!("{}-client", tb.name);
    let run = migrate_to(
        &inv,
        "web",
        "h2",
        &["--json", "--probe", &probe, "--probe-netns", &netns],
    )
    .await;
    assert!(
        !run.stderr.contains("named tap"),
        "the destination on h2 was mirrored as if on the same host (launch_on_host must call \
         launch::mirror_to_other_host): {run:?}"
    );
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    if let Some(pid) = r["destination_pid"].as_i64() {
        bed.adopt(pid as i32);
    }
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["final_state"]["running_copies"], 1, "{r:#}");
    assert_eq!(r["source_quit"], true, "{r:#}");
    let g = &r["guest_reachability"];
    assert_eq!(g["target"], probe.as_str(), "{r:#}");
    assert_eq!(g["interval_ms"], 10, "{r:#}");
    let probes = g["probes"].as_u64().unwrap();
    let total = r["total_time_ms"].as_u64().unwrap();
    assert!(
        probes * 10 >= total / 2,
        "{probes} probes over {total} ms: {g:#}"
    );
    // The guest answered before the switch-over, stopped answering around it, and answered again on h2.
    assert_eq!(g["reachable_before"], true, "{g:#}");
    assert_eq!(g["recovered"], true, "{g:#}");
    let unreachable = g["longest_unreachable_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("the switch-over went unseen: {g:#}"));
    let downtime = r["downtime_ms"].as_u64().unwrap();
    assert!(
        unreachable + 20 >= downtime && unreachable < 30_000,
        "unreachable {unreachable} ms, QEMU's downtime {downtime} ms: {g:#}"
    );
    assert!(
        r["uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tcp:{}:", tb.ip(2))),
        "{r:#}"
    );

    // Checked independently: the guest runs on h2, h1's QEMU is gone and its tap with it; h2 has the tap, by the
    // same name, on its bridge.
    assert_eq!(run_state(&on_h2).await, "running");
    assert_eq!(run_state_or_gone(&on_h1).await, "gone");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !testbed::gone(src_pid) || has_tap(&on_bridge(&tb, "h1"), &nic.nic.tap) {
        assert!(
            Instant::now() < deadline,
            "h1 still has the source QEMU (pid {src_pid}) or its tap: {}",
            on_bridge(&tb, "h1")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        has_tap(&on_bridge(&tb, "h2"), &nic.nic.tap),
        "{}",
        on_bridge(&tb, "h2")
    );

    // The same guest at the same address: the same file (made from /dev/urandom at boot, kept in guest memory),
    // now across h2's link.
    let (second, via_h1, via_h2) = fetch(&tb, &nic.ip, &scratch);
    assert!(first == second, "the file differs after the move");
    assert!(
        via_h2 >= FILE_BYTES as u64 && via_h1 < FILE_BYTES as u64 / 4,
        "h1's link sent {via_h1} bytes, h2's {via_h2}"
    );
}
