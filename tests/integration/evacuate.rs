//! Evacuations on the testbed (scripts/testbed, ssh transport, three hosts): a host holding guests of mixed
//! classes under real load is drained in the informed order and restored; an evacuation SIGKILLed mid-sequence is
//! resumed. Every guest is checked afterwards with an independent QMP client on every host's sockets (the hosts
//! share this machine's filesystem), not only by qmigrate's report.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{qmigrate, run_state_or_gone, spawn_until, Bed};
use crate::hosts::{exec_on, guest_on, run_dir};
use crate::hosts_net::{guest_with_nic, GuestNic};
use crate::testbed;

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const EVACUATE_LIMIT: Duration = Duration::from_secs(600);

pub fn testbed_up(name: &'static str, subnet: &'static str, rate: &str) -> testbed::Bed {
    let tb = testbed::Bed::new(name, subnet);
    let up = tb.up(&["--hosts", "3", "--rate", rate, "--delay", "0ms"]);
    assert_eq!(up.code, Some(0), "testbed up: {up:?}");
    tb
}

pub fn inventory(tb: &testbed::Bed) -> String {
    tb.dir.join("inventory.toml").display().to_string()
}

/// Where each guest runs, asked of every host's socket by our own QMP client: guest → hosts running it.
pub async fn running_on(tb: &testbed::Bed, guests: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for g in guests {
        let mut on = Vec::new();
        for h in HOSTS {
            let socket = run_dir(tb, h).join(format!("{g}.qmp"));
            if run_state_or_gone(&socket).await == "running" {
                on.push(h.to_string());
            }
        }
        out.insert(g.to_string(), on);
    }
    out
}

/// Load from the testbed's client namespace, across the shaped links, ended (its whole process group) on drop.
struct Load(std::process::Child);

impl Load {
    fn start(tb: &testbed::Bed, script: &str) -> Load {
        let mut argv = exec_on(tb, "client");
        argv.extend(["sh".to_string(), "-c".to_string(), script.to_string()]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the load");
        Load(child)
    }

    /// Fetches the web guest's file over and over, at about 4 MB/s (its class needs 1 MiB/s; more only costs
    /// the guest's host CPU, which its other guests share).
    fn fetch(tb: &testbed::Bed, ip: &str) -> Load {
        Load::start(
            tb,
            &format!(
                "while :; do curl -s -o /dev/null --max-time 20 --limit-rate 4M http://{ip}/file; sleep 0.05; done"
            ),
        )
    }

    /// Streams zeros to the net-receive guest at about 3 MB/s (300 kB every 0.1 s).
    fn stream(tb: &testbed::Bed, ip: &str) -> Load {
        Load::start(
            tb,
            &format!(
                "while :; do (while :; do head -c 300000 /dev/zero; sleep 0.1; done) \
                 | socat -u - TCP:{ip}:5001,connect-timeout=2; sleep 0.2; done"
            ),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// `qmigrate evacuate h1 --inventory INV --journal J --json EXTRA…`, to its end.
async fn evacuate_h1(inv: &str, journal: &str, extra: &[&str]) -> crate::harness::Run {
    let mut args = vec![
        "evacuate",
        "h1",
        "--inventory",
        inv,
        "--journal",
        journal,
        "--json",
    ];
    args.extend(extra);
    qmigrate(&args, EVACUATE_LIMIT).await
}

fn vm<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == name)
        .unwrap_or_else(|| panic!("no VM {name} in {report:#}"))
}

fn classes(v: &Value) -> Vec<String> {
    v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

pub fn journal_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a journal record"))
        .collect()
}

/// h1 holds a dirtying guest, a web server and a net-receive guest (both under load from the client namespace)
/// and an idle guest. `evacuate h1` (after a `--dry-run` that moves nothing) moves all four to h2 and h3 in the
/// informed order — dirty-memory and web first, net-receive last — never web and net-receive onto one host; each
/// runs exactly once afterwards. `--restore h1` brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuating_a_host_of_mixed_guests_in_the_informed_order_then_restoring_it() {
    let tb = testbed_up("qme1", "10.91.0", "1000mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    let journal = bed.path("evacuate-h1.jsonl");
    let j = journal.display().to_string();
    let web_nic = GuestNic::new(&tb, "web", "10.91.0.101");
    let recv_nic = GuestNic::new(&tb, "recv", "10.91.0.102");
    guest_with_nic(&mut bed, &tb, "h1", "web", "web", &web_nic).await;
    guest_with_nic(&mut bed, &tb, "h1", "recv", "netrecv", &recv_nic).await;
    guest_on(&mut bed, &tb, "h1", "dirty", "dirty:32:64").await;
    guest_on(&mut bed, &tb, "h1", "idle", "idle").await;
    let guests = ["web", "recv", "dirty", "idle"];
    let _web_load = Load::fetch(&tb, &web_nic.ip);
    let _recv_load = Load::stream(&tb, &recv_nic.ip);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The plan, with its reasons; nothing moves.
    let dry = evacuate_h1(&inv, &j, &["--dry-run"]).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    let plan = dry.json();
    assert_eq!(plan["outcome"], "planned", "{plan:#}");
    assert_eq!(plan["plan"].as_array().unwrap().len(), 4, "{plan:#}");
    for s in plan["plan"].as_array().unwrap() {
        assert!(!s["why_host"].as_str().unwrap().is_empty(), "{s:#}");
        assert!(!s["why_position"].as_str().unwrap().is_empty(), "{s:#}");
    }
    assert!(!journal.exists(), "a dry run writes no journal");
    let before = running_on(&tb, &guests).await;
    assert!(before.values().all(|h| h == &["h1"]), "{before:?}");

    let run = evacuate_h1(&inv, &j, &["--timeout", "240s"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    eprintln!("{}", serde_json::to_string_pretty(&r["vms"]).unwrap());
    assert_eq!(r["outcome"], "completed", "{r:#}");
    // The classes the order was made from, measured on h1 under the load.
    assert!(
        classes(vm(&r, "dirty")).contains(&"dirty-memory".into()),
        "{r:#}"
    );
    assert!(classes(vm(&r, "web")).contains(&"web".into()), "{r:#}");
    assert!(
        classes(vm(&r, "recv")).contains(&"net-receive".into()),
        "{r:#}"
    );
    let pos = |g: &str| vm(&r, g)["position"].as_u64().unwrap();
    assert!(pos("dirty") <= 2 && pos("web") <= 2, "{r:#}");
    assert_eq!((pos("idle"), pos("recv")), (3, 4), "{r:#}");
    assert_ne!(
        vm(&r, "web")["to"],
        vm(&r, "recv")["to"],
        "two network-heavy VMs on one host: {r:#}"
    );
    // Checked on every host with our own client: each guest runs once, where the report says.
    let after = running_on(&tb, &guests).await;
    for g in guests {
        let to = vm(&r, g)["to"].as_str().unwrap().to_string();
        assert_eq!(vm(&r, g)["outcome"], "completed", "{g}: {r:#}");
        assert_eq!(after[g], vec![to], "{g}: {after:?}");
    }
    let t = &r["totals"];
    assert_eq!(t["moved"], 4, "{r:#}");
    assert!(
        t["makespan_ms"].as_u64().unwrap() > 0 && t["bytes"].as_u64().unwrap() > 0,
        "{r:#}"
    );
    let records = journal_records(&journal);
    let ends = records.iter().filter(|x| x["event"] == "end").count();
    assert_eq!(ends, 4, "{records:#?}");
    assert_eq!(records.last().unwrap()["event"], "finish", "{records:#?}");

    // After maintenance: back where they came from.
    let back = evacuate_h1(&inv, &j, &["--restore", "--timeout", "240s"]).await;
    assert_eq!(back.code, 0, "{back:?}");
    let b = back.json();
    assert_eq!(b["kind"], "restore", "{b:#}");
    assert_eq!(b["totals"]["moved"], 4, "{b:#}");
    let home = running_on(&tb, &guests).await;
    assert!(home.values().all(|h| h == &["h1"]), "{home:?}\n{b:#}");
    // Nothing left to restore.
    let again = evacuate_h1(&inv, &j, &["--restore"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json()["outcome"], "nothing-to-do", "{again:?}");
}

/// An evacuation SIGKILLed while its second migration runs: `--resume` takes that migration over (or finds it
/// done), moves the rest, and never moves a VM twice; every guest runs exactly once afterwards. While it runs,
/// the VM being moved cannot be driven by another qmigrate, nor the journal shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuation_killed_mid_sequence_resumes_without_moving_a_vm_twice() {
    let tb = testbed_up("qme2", "10.92.0", "100mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    let journal = bed.path("evacuate-h1.jsonl");
    let j = journal.display().to_string();
    let guests = ["a", "b", "c", "d"];
    guest_on(&mut bed, &tb, "h1", "a", "idle").await;
    let (_, b_monitor) = guest_on(&mut bed, &tb, "h1", "b", "dirty:16:8").await;
    guest_on(&mut bed, &tb, "h1", "c", "idle").await;
    guest_on(&mut bed, &tb, "h1", "d", "idle").await;
    let args = [
        "evacuate",
        "h1",
        "--inventory",
        &inv,
        "--journal",
        &j,
        "--json",
        "--order",
        "fifo",
        "--timeout",
        "240s",
    ];
    let running = spawn_until(&args, "[2] b: h1 -> ", EVACUATE_LIMIT).await;
    // While b moves: its lock and the journal are taken.
    let other = qmigrate(
        &["migrate", "b", "--inventory", &inv, "--to-host", "h3"],
        EVACUATE_LIMIT,
    )
    .await;
    assert_eq!(other.code, 4, "{other:?}");
    assert!(
        other.stderr.contains("being migrated by another qmigrate"),
        "{other:?}"
    );
    let second = qmigrate(&args, EVACUATE_LIMIT).await;
    assert_eq!(second.code, 4, "{second:?}");
    assert!(second.stderr.contains(&j), "{second:?}");
    // Killed mid-precopy, seen on b's second monitor: QEMU goes on sending without qmigrate.
    crate::harness::wait_migration_status(&b_monitor, "active", Duration::from_secs(60)).await;
    running.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = running.finish(Duration::from_secs(30)).await;
    assert_eq!(killed.code, -1, "killed by the signal: {killed:?}");
    let records = journal_records(&journal);
    assert!(
        records
            .iter()
            .any(|x| x["event"] == "start" && x["vm"] == "b"),
        "{records:#?}"
    );
    assert!(
        !records.iter().any(|x| x["event"] == "finish"),
        "{records:#?}"
    );

    let resumed = evacuate_h1(&inv, &j, &["--resume", "--timeout", "240s"]).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let r = resumed.json();
    eprintln!("{}", serde_json::to_string_pretty(&r["vms"]).unwrap());
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert!(r["resumes"].as_u64().is_some(), "{r:#}");
    assert_eq!(vm(&r, "a")["outcome"], "moved-earlier", "{r:#}");
    // b's migration was taken over where the killed run left it (or found completed without it).
    let b = vm(&r, "b");
    match b["outcome"].as_str().unwrap() {
        "completed" => assert_eq!(b["taken_over"], true, "{r:#}"),
        "adopted" => {}
        other => panic!("b: {other}: {r:#}"),
    }
    // Checked on every host: each guest runs exactly once, away from h1, where the plan sent it.
    let after = running_on(&tb, &guests).await;
    for g in guests {
        assert_eq!(after[g].len(), 1, "{g}: {after:?}");
        assert_ne!(after[g][0], "h1", "{g}: {after:?}");
        assert_eq!(
            after[g][0],
            vm(&r, g)["to"].as_str().unwrap(),
            "{g}: {after:?}\n{r:#}"
        );
    }
    // Never moved twice: one moving end per VM over both runs; no destination QEMU left behind.
    let records = journal_records(&journal);
    for g in guests {
        let moves = records
            .iter()
            .filter(|x| x["event"] == "end" && x["vm"] == g)
            .filter(|x| x["outcome"] == "completed" || x["outcome"] == "adopted")
            .count();
        assert_eq!(moves, 1, "{g}: {records:#?}");
    }
    // Nothing left to resume.
    let again = evacuate_h1(&inv, &j, &["--resume"]).await;
    assert_eq!(again.code, 4, "{again:?}");
    assert!(again.stderr.contains("nothing to resume"), "{again:?}");
}

/// Two migrations at once out of h1 (`--max-out 2`) share its link budget, and QEMU gets each share; a guest that
/// cannot converge within `--timeout` is cancelled and stays on h1 while the others move: exit 10, "partial".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_does_not_stop_the_others_and_the_link_budget_is_shared() {
    const MIB: u64 = 1 << 20;
    let tb = testbed_up("qme3", "10.94.0", "1000mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    let journal = bed.path("evacuate-h1.jsonl");
    let j = journal.display().to_string();
    let (stuck, stuck_monitor) = guest_on(&mut bed, &tb, "h1", "stuck", "dirty:128:64").await;
    guest_on(&mut bed, &tb, "h1", "a", "idle").await;
    guest_on(&mut bed, &tb, "h1", "b", "idle").await;
    let args = [
        "evacuate",
        "h1",
        "--inventory",
        &inv,
        "--journal",
        &j,
        "--json",
        "--max-out",
        "2",
        "--link-budget",
        "40MiB/s",
        "--timeout",
        "15s",
        "--auto-converge",
        "off",
        "--max-downtime",
        "300ms",
    ];
    let mut child = crate::harness::qmigrate_cmd(&args)
        .spawn()
        .expect("run qmigrate");
    // While stuck and another run, QEMU caps stuck at its share of the budget, below the whole of it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut shares = Vec::new();
    while tokio::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        if crate::harness::migration_status(&stuck_monitor).await == "active" {
            let p = crate::harness::qmp_raw(&stuck_monitor, "query-migrate-parameters").await;
            let cap = p["max-bandwidth"].as_u64().unwrap_or(0);
            shares.push(cap);
            if cap < 40 * MIB {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let run = crate::harness::finish(child, EVACUATE_LIMIT).await;
    assert!(
        shares.iter().any(|c| *c < 40 * MIB && *c >= MIB),
        "caps seen by QEMU: {shares:?}\n{run:?}"
    );
    assert_eq!(run.code, 10, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert_eq!(vm(&r, "stuck")["outcome"], "cancelled", "{r:#}");
    assert_eq!(vm(&r, "stuck")["running_on"], "h1", "{r:#}");
    for g in ["a", "b"] {
        assert_eq!(vm(&r, g)["outcome"], "completed", "{g}: {r:#}");
    }
    // Every cap within the budget; a migration that ran beside another got less than the whole.
    let caps: Vec<u64> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["bandwidth_caps_bytes_per_s"].as_array().unwrap().clone())
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert!(caps.iter().all(|c| *c <= 40 * MIB), "{caps:?}");
    assert!(caps.iter().any(|c| *c < 40 * MIB), "{caps:?}");
    // Checked on every host: stuck still runs on h1 only, a and b on h2 or h3 only.
    let after = running_on(&tb, &["stuck", "a", "b"]).await;
    assert_eq!(after["stuck"], ["h1"], "{after:?}");
    assert_eq!(crate::harness::run_state(&stuck).await, "running");
    for g in ["a", "b"] {
        assert_eq!(after[g].len(), 1, "{g}: {after:?}");
        assert_ne!(after[g][0], "h1", "{g}: {after:?}");
    }
}

/// Bad input and impossible evacuations: each a clear error naming what is wrong, a non-zero exit, nothing moved.
/// Two local hosts (no testbed needed); the second has no room for the first's guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_an_impossible_evacuation_are_refused_before_anything_moves() {
    let mut bed = Bed::new();
    let root = bed.path("hosts");
    for h in ["a", "b"] {
        std::fs::create_dir_all(root.join(h)).unwrap();
    }
    let guest = bed
        .source_with("g1", "idle", |spec| spec.run_dir = root.join("a"))
        .await;
    let inv = bed.path("inventory.toml");
    let host = |name: &str, memory: &str| {
        format!(
            "[hosts.{name}]\ntransport = \"local\"\nqmp = \"{dir}/*.qmp\"\nruntime_dir = \"{dir}\"\n\
             migration_address = \"127.0.0.1\"\ncapacity = {{ vcpus = 4, memory = \"{memory}\", nic = \"1Gbit/s\" }}\n\n",
            dir = root.join(name).display()
        )
    };
    std::fs::write(&inv, host("a", "4GiB") + &host("b", "64MiB")).unwrap();
    let inv = inv.display().to_string();
    let journal = bed.path("j.jsonl").display().to_string();
    let limit = Duration::from_secs(120);
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["evacuate", "nohost", "--inventory", &inv], 2, "nohost"),
        (vec!["evacuate", "a", "--inventory", "/nonexistent/inv.toml"], 2, "/nonexistent/inv.toml"),
        (vec!["evacuate", "a", "--inventory", &inv, "--order", "bogus"], 2, "unknown order \"bogus\""),
        (vec!["evacuate", "a", "--inventory", &inv, "--max-out", "0"], 2, "--max-out"),
        (vec!["evacuate", "a", "--inventory", &inv, "--link-budget", "fast"], 2, "link-budget"),
        (vec!["evacuate", "a", "--inventory", &inv, "--command-timeout", "0s"], 2, "--command-timeout"),
        (vec!["evacuate", "a", "--inventory", &inv, "--journal", &journal, "--resume"], 4, "nothing to resume for host a"),
        (vec!["evacuate", "a", "--inventory", &inv, "--journal", &journal, "--vm", "ghost", "--dry-run"], 4, "VM ghost: not found on host a"),
        (vec!["evacuate", "a", "--inventory", &inv, "--journal", &journal, "--dry-run"], 4, "no room for VM g1"),
        (vec!["evacuate", "a", "--inventory", &inv, "--journal", &journal], 4, "b: 64.0 MiB free of memory, needs 256.0 MiB"),
    ];
    for (args, code, says) in cases {
        let run = qmigrate(&args, limit).await;
        assert_eq!(run.code, code, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(says),
            "{args:?}: wanted {says:?} in {run:?}"
        );
        assert_eq!(
            crate::harness::run_state(&guest).await,
            "running",
            "{args:?}"
        );
    }
    // The refused evacuation moved nothing and journaled no start.
    let records = journal_records(Path::new(&journal));
    assert!(
        !records.iter().any(|r| r["event"] == "start"),
        "{records:#?}"
    );
    assert!(!root.join("b").join("g1.qmp").exists());
}
