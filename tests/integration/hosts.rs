//! Multi-host migrations on the testbed (scripts/testbed): inventory, QMP over ssh, --to-host, TLS.
//!
//! Each test brings up its own testbed (hosts as namespaces with an sshd each, links shaped with tc) and takes it
//! down in a guard, also when it fails. Guests are started in a host's namespace and CPU set; qmigrate reaches them
//! through ssh only. Both ends are then checked with an independent QMP client on the sockets (the hosts share this
//! machine's filesystem).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{qmigrate, qmp_raw, run_state, run_state_or_gone, Bed};
use crate::testbed::{self, run};

const MIGRATE_LIMIT: Duration = Duration::from_secs(240);
/// A guest name the remote shell would run, split or glob if anything quoted it by hand.
const NASTY: &str = "vm $(touch INJECTED) 'q' \"d\" *";

/// Brings a testbed up with 2 hosts at `rate`; down when dropped.
fn testbed_up(name: &'static str, subnet: &'static str, rate: &str) -> testbed::Bed {
    let tb = testbed::Bed::new(name, subnet);
    let up = tb.up(&["--hosts", "2", "--rate", rate, "--delay", "0ms"]);
    assert_eq!(up.code, Some(0), "testbed up: {up:?}");
    tb
}

fn inventory(tb: &testbed::Bed) -> String {
    tb.dir.join("inventory.toml").display().to_string()
}

pub fn run_dir(tb: &testbed::Bed, host: &str) -> PathBuf {
    tb.dir.join(host).join("run")
}

/// `scripts/testbed exec HOST --` for this testbed: a wrapper that runs QEMU (or any command) on that host, in its
/// namespace and CPU set, under the command's own pid.
pub fn exec_on(tb: &testbed::Bed, host: &str) -> Vec<String> {
    vec![
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed").to_string(),
        "exec".into(),
        host.into(),
        "--name".into(),
        tb.name.into(),
        "--dir".into(),
        tb.dir.display().to_string(),
        "--".into(),
    ]
}

/// `qmigrate migrate VM --inventory INV --to-host HOST EXTRA…`, to its end.
pub async fn migrate_to(inv: &str, vm: &str, host: &str, extra: &[&str]) -> crate::harness::Run {
    let mut args = vec!["migrate", vm, "--inventory", inv, "--to-host", host];
    args.extend(extra);
    qmigrate(&args, MIGRATE_LIMIT).await
}

/// Starts a guest on a testbed host (its namespace and CPU set), ticking on its console every 200 ms, with a
/// second QMP monitor for the test's own checks while qmigrate holds the first. Returns both sockets.
pub async fn guest_on(
    bed: &mut Bed,
    tb: &testbed::Bed,
    host: &str,
    name: &str,
    workload: &str,
) -> (PathBuf, PathBuf) {
    let dir = run_dir(tb, host);
    let wrapper = exec_on(tb, host);
    let mut monitor = PathBuf::new();
    let qmp = bed
        .source_with(name, workload, |spec| {
            spec.run_dir = dir;
            spec.wrapper = wrapper;
            spec.kernel_extra = "ticks=200".into();
            monitor = crate::harness::second_monitor(spec);
        })
        .await;
    (qmp, monitor)
}

/// The last `tick N` a console log shows.
fn last_tick(log: &Path) -> Option<u64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// Throw-away x509 certificates for QEMU's tls-creds-x509 in each host's tls_dir: one CA; per host a certificate
/// for its migration address (server) and one for it as a client. `rogue` hosts get theirs from another CA.
fn make_certs(tb: &testbed::Bed, hosts: &[usize], rogue: &[usize]) {
    let scratch = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let r = run(
            Command::new("openssl")
                .args(args)
                .current_dir(scratch.path()),
            Duration::from_secs(30),
        );
        assert_eq!(r.code, Some(0), "openssl {args:?}: {r:?}");
    };
    for ca in ["ca", "rogue-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{ca}-key.pem"),
            "-out",
            &format!("{ca}-cert.pem"),
            "-subj",
            &format!("/CN={ca}"),
        ]);
    }
    for &i in hosts {
        let ip = tb.ip(i);
        let ca = if rogue.contains(&i) { "rogue-ca" } else { "ca" };
        let pki = tb.dir.join(format!("h{i}")).join("pki");
        std::fs::write(
            scratch.path().join("ext"),
            format!(
                "subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .unwrap();
        let key = pki.join("server-key.pem").display().to_string();
        let cert = pki.join("server-cert.pem").display().to_string();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            "host.csr",
            "-subj",
            &format!("/CN={ip}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "host.csr",
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            &cert,
        ]);
        std::fs::copy(&key, pki.join("client-key.pem")).unwrap();
        std::fs::copy(&cert, pki.join("client-cert.pem")).unwrap();
        std::fs::copy(
            scratch.path().join(format!("{ca}-cert.pem")),
            pki.join("ca-cert.pem"),
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_check_lists_every_host_and_vm_over_ssh() {
    let tb = testbed_up("qmh1", "10.81.0", "200mbit");
    let mut bed = Bed::new();
    guest_on(&mut bed, &tb, "h1", "plain", "idle").await;
    let (nasty, _) = guest_on(&mut bed, &tb, "h2", NASTY, "idle").await;
    let inv = inventory(&tb);
    let run = qmigrate(
        &["inventory", "check", &inv, "--json"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    let hosts = report["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{report:#}");
    for (h, vm) in hosts.iter().zip(["plain", NASTY]) {
        assert_eq!(h["reachable"], true, "{h:#}");
        assert_eq!(h["transport"], "ssh", "{h:#}");
        let vms = h["vms"].as_array().unwrap();
        assert_eq!(vms.len(), 1, "{h:#}");
        assert_eq!(vms[0]["name"], vm, "{h:#}");
        assert_eq!(vms[0]["name_from"], "qemu", "{h:#}");
        assert_eq!(vms[0]["run_state"], "running", "{h:#}");
        assert!(
            vms[0]["qemu_version"].as_str().unwrap().contains('.'),
            "{h:#}"
        );
        assert_eq!(vms[0]["ram_bytes"], 256u64 << 20, "{h:#}");
        // Classified by a stats round taken on the VM's own host (qmigrate run there over ssh).
        assert_eq!(vms[0]["classes"][0]["class"], "idle", "{h:#}");
        assert!(h["classes_note"].is_null(), "{h:#}");
    }
    assert_eq!(hosts[1]["vms"][0]["socket"], nasty.display().to_string());
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    assert!(!Path::new("INJECTED").exists() && !tb.dir.join("h2/run/INJECTED").exists());

    // The table says the same to a human.
    let run = qmigrate(&["inventory", "check", &inv], Duration::from_secs(60)).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("plain") && run.stdout.contains(NASTY),
        "{run:?}"
    );
    assert!(run.stdout.contains("no problems found"), "{run:?}");

    // A VM that dies is a problem named with its host and socket; the exit says something is wrong.
    let plain = run_dir(&tb, "h1").join("plain.qmp");
    bed.kill(&plain);
    let run = qmigrate(
        &["inventory", "check", &inv, "--json"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    let problems = run.json()["problems"].to_string();
    assert!(
        problems.contains("host h1") && problems.contains(&plain.display().to_string()),
        "{problems}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirtying_guest_moves_to_another_host_and_back_over_tls() {
    let tb = testbed_up("qmh2", "10.82.0", "200mbit");
    let mut bed = Bed::new();
    let (on_h1, _) = guest_on(&mut bed, &tb, "h1", NASTY, "dirty:32:4").await;
    let src_pid = bed.pid_of(&on_h1);
    let inv = inventory(&tb);
    let on_h2 = run_dir(&tb, "h2").join(format!("{NASTY}.qmp"));

    // Plain TCP, h1 → h2, over the shaped link.
    let run = migrate_to(&inv, NASTY, "h2", &["--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["vm"], NASTY, "{r:#}");
    assert!(
        r["uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tcp:{}:", tb.ip(2))),
        "{r:#}"
    );
    assert_eq!(r["final_state"]["running_copies"], 1, "{r:#}");
    assert_eq!(r["source_quit"], true, "{r:#}");
    assert!(
        r["destination"].as_str().unwrap().starts_with("h2:"),
        "{r:#}"
    );
    // Checked independently: the guest runs on h2, its old QEMU on h1 is gone.
    assert_eq!(run_state(&on_h2).await, "running");
    assert_eq!(run_state_or_gone(&on_h1).await, "gone");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !testbed::gone(src_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the source QEMU still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!Path::new("INJECTED").exists() && !tb.dir.join("h1/run/INJECTED").exists());
    // Nothing lost: the guest's tick counter, kept in guest memory, goes on from where the source left it.
    let src_log = run_dir(&tb, "h1").join(format!("{NASTY}.serial.log"));
    let dst_log = run_dir(&tb, "h1").join(format!("{NASTY}.serial.log.h2"));
    let before = last_tick(&src_log).expect("ticks on the source");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = last_tick(&dst_log).expect("ticks on the destination");
    assert!(after > before, "tick {after} on h2 after {before} on h1");
    let name = qmp_raw(&on_h2, "query-name").await;
    assert_eq!(name["name"], NASTY);

    // Back h2 → h1 over TLS, with certificates made here.
    make_certs(&tb, &[1, 2], &[]);
    let run = migrate_to(&inv, NASTY, "h1", &["--tls", "--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert!(
        r["uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tcp:{}:", tb.ip(1))),
        "{r:#}"
    );
    assert_eq!(run_state(&on_h1).await, "running");
    assert_eq!(run_state_or_gone(&on_h2).await, "gone");
    // The stream was TLS: the destination took the credentials qmigrate gave it.
    let params: Value = qmp_raw(&on_h1, "query-migrate-parameters").await;
    assert_eq!(params["tls-creds"], "qmigrate-tls", "{params:#}");
    assert_eq!(name, qmp_raw(&on_h1, "query-name").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_destination_with_a_certificate_of_another_ca_and_the_guest_stays() {
    let tb = testbed_up("qmh3", "10.83.0", "400mbit");
    let mut bed = Bed::new();
    let (on_h1, _) = guest_on(&mut bed, &tb, "h1", "guarded", "dirty:16:2").await;
    make_certs(&tb, &[1, 2], &[2]);
    let inv = inventory(&tb);
    let run = migrate_to(&inv, "guarded", "h2", &["--tls", "--json"]).await;
    assert_ne!(run.code, 0, "{run:?}");
    // The guest runs on h1 only; no QEMU is left waiting on h2.
    assert_eq!(run_state(&on_h1).await, "running");
    let on_h2 = run_dir(&tb, "h2").join("guarded.qmp");
    assert_eq!(run_state_or_gone(&on_h2).await, "gone");
    let params: Value = qmp_raw(&on_h1, "query-migrate-parameters").await;
    assert_eq!(
        params["tls-creds"], "",
        "the source's TLS settings were not cleared: {params:#}"
    );

    // Missing certificates are named before anything starts.
    std::fs::remove_file(tb.dir.join("h2/pki/server-key.pem")).unwrap();
    let run = migrate_to(&inv, "guarded", "h2", &["--tls"]).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("host h2") && run.stderr.contains("server-key.pem"),
        "{run:?}"
    );
    assert_eq!(run_state(&on_h1).await, "running");
}

/// Inventory errors each name the place: the file and line of a bad key or value; the host that cannot be
/// reached; the VM whose socket is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_errors_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"[ssh]
options = ["-o", "ConnectTimeout=3"]

[hosts.here]
transport = "local"
qmp = "DIR/*.qmp"
runtime_dir = "DIR"
migration_address = "127.0.0.1"
capacity = { vcpus = 1, memory = "1GiB", nic = "1Gbit/s" }

[hosts.far]
transport = "ssh"
ssh = "ssh://root@127.0.0.1:9"
runtime_dir = "/tmp"
migration_address = "127.0.0.1"

[vms.ghost]
host = "here"
qmp = "DIR/ghost.qmp"
"#
    .replace("DIR", &dir.path().display().to_string());
    let file = dir.path().join("inventory.toml");
    let f = file.display().to_string();
    let cases = [
        (
            "transport = \"local\"",
            "transport = \"local\"\nsockets = 3",
            "inventory.toml:6:",
            "unknown field `sockets`",
        ),
        (
            "\"1GiB\"",
            "\"1 gigabyte\"",
            "inventory.toml:9:",
            "hosts.here.capacity.memory",
        ),
        (
            "\"1Gbit/s\"",
            "\"quick\"",
            "inventory.toml:9:",
            "hosts.here.capacity.nic",
        ),
        (
            "host = \"here\"",
            "host = \"hear\"",
            "inventory.toml:18:",
            "no such host",
        ),
    ];
    for (from, to, place, words) in cases {
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let run = qmigrate(&["inventory", "check", &f], Duration::from_secs(30)).await;
        assert_eq!(run.code, 2, "{to}: {run:?}");
        assert!(
            run.stderr.contains(place) && run.stderr.contains(words),
            "{to}: {run:?}"
        );
    }
    // Valid, but one host cannot be reached and one VM's socket is missing.
    std::fs::write(&file, &good).unwrap();
    let run = qmigrate(
        &["inventory", "check", &f, "--json"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    let problems: Vec<String> = run.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("host far: ") && p.contains("cannot be reached")),
        "{problems:?}"
    );
    let ghost = dir.path().join("ghost.qmp").display().to_string();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("VM ghost on host here")
                && p.contains(&ghost)
                && p.contains("no such file")),
        "{problems:?}"
    );
    // Moving a VM the inventory does not have names it and what was found.
    let run = qmigrate(
        &["migrate", "nobody", "--inventory", &f, "--to-host", "here"],
        Duration::from_secs(60),
    )
    .await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("\"nobody\""), "{run:?}");
    let run = qmigrate(
        &[
            "migrate",
            "ghost",
            "--inventory",
            &f,
            "--to-host",
            "nowhere",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no host named \"nowhere\"") && run.stderr.contains("far, here"),
        "{run:?}"
    );
}

/// Pids of the `socat` processes that carry a QMP session to `socket` over ssh (on the socket's host).
fn socat_sessions(socket: &Path) -> Vec<i32> {
    let want = format!("UNIX-CONNECT:{}", socket.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"socat")) && args.contains(&want.as_bytes())
        })
        .collect()
}

fn kill_sessions(socket: &Path) -> usize {
    let pids = socat_sessions(socket);
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids.len()
}

/// Faults on the way between hosts, during one migration: the QMP session to the destination breaks (its ssh
/// side killed), then the source's, then the destination host's link goes down for 3 s. The QEMUs live on
/// through all of it; qmigrate reconnects and the guest ends up on h2, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_sessions_and_a_link_down_mid_migration_still_move_the_guest_once() {
    let tb = testbed_up("qmh4", "10.84.0", "100mbit");
    let mut bed = Bed::new();
    let (on_h1, monitor) = guest_on(&mut bed, &tb, "h1", "faulty", "dirty:64:2").await;
    let on_h2 = run_dir(&tb, "h2").join("faulty.qmp");
    let inv = inventory(&tb);
    let args = [
        "migrate",
        "faulty",
        "--inventory",
        &inv,
        "--to-host",
        "h2",
        "--json",
    ];
    let child = crate::harness::qmigrate_cmd(&args).spawn().unwrap();
    crate::harness::wait_migration_status(&monitor, "active", Duration::from_secs(60)).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        kill_sessions(&on_h2),
        1,
        "one QMP session to the destination"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kill_sessions(&on_h1), 1, "one QMP session to the source");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        crate::harness::migration_status(&monitor).await,
        "active",
        "the faults came too late"
    );
    let ns = format!("{}-h2", tb.name);
    let link = |state: &str| {
        let r = run(
            Command::new("ip").args(["netns", "exec", &ns, "ip", "link", "set", "eth0", state]),
            Duration::from_secs(10),
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    };
    link("down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    link("up");

    let run = crate::harness::finish(child, MIGRATE_LIMIT).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["final_state"]["running_copies"], 1, "{r:#}");
    let trail = r["phases"].to_string();
    assert!(trail.contains("reconnected"), "{r:#}");
    assert_eq!(run_state(&on_h2).await, "running");
    assert_eq!(run_state_or_gone(&monitor).await, "gone");
}

/// A host whose destinations start from a template (`qemu-configs/guest.args`) instead of the source's command
/// line: the VM's own placeholders filled by qmigrate, the rest from the inventory's vars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_starts_from_a_template_of_qemu_configs() {
    let tb = testbed_up("qmh5", "10.85.0", "400mbit");
    let mut bed = Bed::new();
    let (on_h1, _) = guest_on(&mut bed, &tb, "h1", "tmpl", "dirty:16:2").await;
    let text = std::fs::read_to_string(inventory(&tb)).unwrap();
    let (h1, h2) = text.split_once("[hosts.h2]").unwrap();
    let template = format!(
        "destination = {{ template = \"{}\", vars = {{ accel = \"tcg\", guest_dir = \"{}\", \
         kernel_extra = \"ticks=200\", serial_log = \"{{runtime_dir}}/{{name}}.serial.log\" }} }}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/qemu-configs/guest.args"),
        crate::harness::guest_dir().display()
    );
    let inv = tb.dir.join("template.toml");
    std::fs::write(
        &inv,
        format!(
            "{h1}[hosts.h2]{}\n[vms.tmpl]\nhost = \"h1\"\nvars = {{ workload = \"dirty:16:2\" }}\n",
            h2.replacen("destination = \"mirror\"", &template, 1)
        ),
    )
    .unwrap();
    let inv = inv.display().to_string();
    let run = migrate_to(&inv, "tmpl", "h2", &["--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["outcome"], "completed", "{run:?}");
    let on_h2 = run_dir(&tb, "h2").join("tmpl.qmp");
    assert_eq!(run_state(&on_h2).await, "running");
    assert_eq!(run_state_or_gone(&on_h1).await, "gone");
    // The template's serial log, on h2, goes on counting from the source's ticks.
    let before = last_tick(&run_dir(&tb, "h1").join("tmpl.serial.log")).expect("ticks on h1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = last_tick(&run_dir(&tb, "h2").join("tmpl.serial.log")).expect("ticks on h2");
    assert!(after > before, "tick {after} on h2 after {before} on h1");
}

/// qmigrate itself killed mid-migration between hosts: both QEMUs live on; a second run with `--adopt` finds the
/// VM by name (the QEMU it had started on h2 is its destination, not a second copy) and finishes the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmigrate_killed_mid_migration_between_hosts_is_adopted_by_name() {
    let tb = testbed_up("qmh6", "10.87.0", "100mbit");
    let mut bed = Bed::new();
    let (_, monitor) = guest_on(&mut bed, &tb, "h1", "adoptee", "dirty:64:2").await;
    let inv = inventory(&tb);
    let args = [
        "migrate",
        "adoptee",
        "--inventory",
        &inv,
        "--to-host",
        "h2",
        "--json",
    ];
    let mut child = crate::harness::qmigrate_cmd(&args).spawn().unwrap();
    crate::harness::wait_migration_status(&monitor, "active", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    // Killed, not stopped: the migration goes on without it.
    assert_eq!(crate::harness::migration_status(&monitor).await, "active");

    // Without --adopt, a second run refuses and says how to go on.
    let run = qmigrate(&args, MIGRATE_LIMIT).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains("--adopt"), "{run:?}");

    let mut adopt = args.to_vec();
    adopt.push("--adopt");
    let run = qmigrate(&adopt, MIGRATE_LIMIT).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["adopted"], true, "{r:#}");
    assert_eq!(r["final_state"]["running_copies"], 1, "{r:#}");
    let on_h2 = run_dir(&tb, "h2").join("adoptee.qmp");
    assert_eq!(run_state(&on_h2).await, "running");
    assert_eq!(run_state_or_gone(&monitor).await, "gone");
}

/// Cuts the migration stream between the testbed's hosts: every TCP connection of h1 and h2 that is not ssh's
/// (ssh carries the QMP sessions) is killed in its namespace. Returns how many were cut.
fn cut_migration_streams(tb: &testbed::Bed) -> usize {
    let mut cut = 0;
    for host in ["h1", "h2"] {
        let ns = format!("{}-{host}", tb.name);
        let r = run(
            Command::new("ip").args([
                "netns", "exec", &ns, "ss", "-K", "-t", "-n", "sport", "!=", ":22", "and", "dport",
                "!=", ":22",
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(r.code, Some(0), "{r:?}");
        cut += r.stdout.lines().filter(|l| l.contains("ESTAB")).count();
    }
    cut
}

/// Starts a guest on h1 and `qmigrate migrate NAME --to-host h2 --postcopy always`, and returns (the guest's second
/// monitor, the running qmigrate) once the source reports postcopy.
async fn start_postcopy(
    bed: &mut Bed,
    tb: &testbed::Bed,
    name: &str,
    workload: &str,
) -> (PathBuf, tokio::process::Child) {
    let (_, monitor) = guest_on(bed, tb, "h1", name, workload).await;
    let inv = inventory(tb);
    let args = [
        "migrate",
        name,
        "--inventory",
        &inv,
        "--to-host",
        "h2",
        "--postcopy",
        "always",
        "--json",
    ];
    let child = crate::harness::qmigrate_cmd(&args).spawn().unwrap();
    crate::harness::wait_migration_status(&monitor, "postcopy-active", Duration::from_secs(90))
        .await;
    (monitor, child)
}

/// A postcopy between hosts whose stream is cut once the guest runs on h2: QEMU pauses both ends, qmigrate
/// recovers over a new connection to h2, and the guest ends up running on h2 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_between_hosts_survives_a_cut_stream() {
    let tb = testbed_up("qmh7", "10.88.0", "100mbit");
    let mut bed = Bed::new();
    let (monitor, child) = start_postcopy(&mut bed, &tb, "pc", "dirty:128:16").await;
    // The destination's own second monitor (mirrored with h2's tag): the guest runs there in postcopy.
    let dst_monitor = PathBuf::from(format!("{}.h2", monitor.display()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while run_state_or_gone(&dst_monitor).await != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination never ran the guest"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cut_migration_streams(&tb) > 0,
        "no migration socket was cut"
    );
    let run = crate::harness::finish(child, MIGRATE_LIMIT).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["postcopy"], true, "{r:#}");
    assert!(!r["recoveries"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(r["final_state"]["running_copies"], 1, "{r:#}");
    assert_eq!(
        run_state(&run_dir(&tb, "h2").join("pc.qmp")).await,
        "running"
    );
    assert_eq!(run_state_or_gone(&monitor).await, "gone");
}

/// The stream cut right after the source switches to postcopy, while the guest's device state is still on its
/// way to h2. QEMU was seen here to do one of three things, depending on where the cut lands: pause both ends
/// (recovered: the guest moves), fail the postcopy on the source and restart the guest there itself while h2
/// waits paused for a recovery that cannot come (two QEMUs in `running` until qmigrate stops h2), or end h2 on the
/// failed load while the source pauses (QEMU then neither cancels nor resumes the source: the guest's state stays
/// in its paused QEMU). In none of them may the guest run twice, and the source QEMU is never killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_cut_before_the_destination_runs_never_leaves_two_copies() {
    postcopy_cut_early("qmh8", "10.89.0", Duration::ZERO).await;
}

/// The same, the cut a second after the source's switch (seen here: QEMU then fails the postcopy on the source
/// and restarts the guest there itself; qmigrate stops the destination).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_cut_a_second_after_the_switch_never_leaves_two_copies() {
    postcopy_cut_early("qmh9", "10.90.0", Duration::from_secs(1)).await;
}

async fn postcopy_cut_early(name: &'static str, subnet: &'static str, after: Duration) {
    let tb = testbed_up(name, subnet, "100mbit");
    let mut bed = Bed::new();
    let (monitor, child) = start_postcopy(&mut bed, &tb, "early", "dirty:64:2").await;
    tokio::time::sleep(after).await;
    assert!(
        cut_migration_streams(&tb) > 0,
        "no migration socket was cut"
    );
    let run = crate::harness::finish(child, MIGRATE_LIMIT).await;
    let r = run.json();
    // Checked independently: never two QEMUs running the guest; the source's QEMU is still there.
    let src = run_state_or_gone(&monitor).await;
    let dst = run_state_or_gone(&run_dir(&tb, "h2").join("early.qmp")).await;
    let running = [&src, &dst]
        .iter()
        .filter(|s| s.as_str() == "running")
        .count();
    assert!(running <= 1, "source {src}, destination {dst}: {r:#}");
    assert_eq!(r["final_state"]["running_copies"], running, "{r:#}");
    let outcome = r["outcome"].as_str().unwrap();
    eprintln!("QEMU's way this time: {outcome}: {}", r["reason"]);
    match outcome {
        "completed" => assert_eq!((run.code, dst.as_str()), (0, "running"), "{r:#}"),
        "rolled-back" => {
            assert_eq!(
                (run.code, src.as_str(), dst.as_str()),
                (6, "running", "gone"),
                "{r:#}"
            );
            assert!(r["phases"].to_string().contains("postcopy-failed"), "{r:#}");
        }
        "lost" => {
            assert_eq!(run.code, 8, "{r:#}");
            assert!(
                src != "gone" && src != "running" && dst == "gone",
                "source {src}, destination {dst}"
            );
            assert!(
                r["reason"]
                    .as_str()
                    .unwrap()
                    .contains("before the guest ever ran there"),
                "{r:#}"
            );
        }
        other => panic!("outcome {other}: {r:#}"),
    }
}
