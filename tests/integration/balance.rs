//! `qmigrate balance` on the testbed (three hosts over ssh, each pinned to one core): a host overloaded by real
//! guests (a CPU loop and a dirtying workload) is relieved by each policy, through the evacuation executor, and every
//! guest runs exactly once afterwards, checked on every host with our own QMP client. What the policy decided is
//! also what `qmigrate simulate` decides on the scenario the round recorded (`--record`), so the live figures and
//! the replay agree.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::evacuate::{inventory, journal_records, running_on, testbed_up};
use crate::harness::{qmigrate, Bed};
use crate::hosts::{guest_on, migrate_to};

const BALANCE_LIMIT: Duration = Duration::from_secs(300);

/// `qmigrate balance --once` with `policy` and this test's defaults, then `extra`; the round's JSON report.
async fn balance_once(
    inv: &str,
    policy: &str,
    journal: &Path,
    record: &Path,
    extra: &[&str],
) -> (i32, Value) {
    let j = journal.display().to_string();
    let r = record.display().to_string();
    let mut args = vec![
        "balance",
        "--inventory",
        inv,
        "--policy",
        policy,
        "--once",
        "--traffic-window",
        "0s",
        "--journal",
        &j,
        "--record",
        &r,
        "--json",
    ];
    args.extend(extra);
    let run = qmigrate(&args, BALANCE_LIMIT).await;
    let line = run
        .stdout
        .lines()
        .next()
        .unwrap_or_else(|| panic!("balance printed no round: {run:?}"));
    let report: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (run.code, report)
}

/// `balance_once` with no cool-downs after `samples` rounds of samples, on a journal and record of its own (named by
/// `policy` and `case`); it must succeed. Returns the journal, the record and the round.
async fn round_without_cool_downs(
    bed: &Bed,
    inv: &str,
    policy: &str,
    case: &str,
    samples: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Value) {
    let journal = bed.path(&format!("balance-{case}-{policy}.jsonl"));
    let record = bed.path(&format!("scenario-{case}-{policy}.json"));
    let (code, round) = balance_once(
        inv,
        policy,
        &journal,
        &record,
        &[
            "--vm-cool-down",
            "0s",
            "--host-cool-down",
            "0s",
            "--samples",
            samples,
        ],
    )
    .await;
    eprintln!(
        "{policy}: {}",
        serde_json::to_string_pretty(&round).unwrap()
    );
    assert_eq!(code, 0, "{policy}: {round:#}");
    (journal, record, round)
}

/// The first migration a round decided, as (vm, from, to).
fn first_move(decisions: &Value) -> Option<(String, String, String)> {
    decisions.as_array()?.iter().find_map(|d| {
        (d["kind"] == "migrate").then(|| {
            let s = |k: &str| d[k].as_str().unwrap().to_string();
            (s("vm"), s("from"), s("to"))
        })
    })
}

/// What `qmigrate simulate` decides in one round on a recorded scenario.
fn simulated_move(record: &Path, policy: &str) -> Option<(String, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qmigrate"))
        .args([
            "simulate",
            record.to_str().unwrap(),
            "--policy",
            policy,
            "--rounds",
            "1",
            "--json",
        ])
        .output()
        .expect("qmigrate simulate runs");
    assert!(
        out.status.success(),
        "simulate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let m = v["rounds"][0]["migrations"].as_array()?.first()?.clone();
    let s = |k: &str| m[k].as_str().unwrap().to_string();
    Some((s("vm"), s("from"), s("to")))
}

/// h1 holds a CPU loop and a dirtying guest (one core: h1 is at ~100 % CPU), h2 and h3 an idle guest each. For each
/// policy: `balance --once` moves the VM the policy picks off h1 through the executor (journaled as a balance run),
/// every guest runs exactly once, `simulate` on the recorded scenario makes the same decision; then the VM is moved
/// back for the next policy. After the first move, a dry run on the same journal with the default cool-downs holds
/// a move touching h1 back, naming the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_relieves_an_overloaded_host_and_every_guest_runs_once() {
    let tb = testbed_up("qbl1", "10.96.0", "1000mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    guest_on(&mut bed, &tb, "h1", "spin", "cpu").await;
    guest_on(&mut bed, &tb, "h1", "dirty", "dirty:24").await;
    guest_on(&mut bed, &tb, "h2", "calm2", "idle").await;
    guest_on(&mut bed, &tb, "h3", "calm3", "idle").await;
    let guests = ["spin", "dirty", "calm2", "calm3"];
    let home = |g: &str| match g {
        "calm2" => "h2",
        "calm3" => "h3",
        _ => "h1",
    };
    for (i, policy) in ["band", "idc", "sandpiper"].into_iter().enumerate() {
        let (journal, record, round) =
            round_without_cool_downs(&bed, &inv, policy, "cpu", "1").await;
        let h1 = round["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == "h1")
            .unwrap();
        assert!(
            h1["cpu_pct"].as_f64().unwrap() > 85.0,
            "{policy}: h1 is not overloaded: {round:#}"
        );
        let (vm, from, to) = first_move(&round["decisions"])
            .unwrap_or_else(|| panic!("{policy} decided no move: {round:#}"));
        assert_eq!(from, "h1", "{policy}: {round:#}");
        assert!(
            ["spin", "dirty"].contains(&vm.as_str()),
            "{policy}: {round:#}"
        );
        // Carried out by the executor, one migration, completed.
        let m = &round["migrations"];
        assert_eq!(m["outcome"], "completed", "{policy}: {round:#}");
        let done: Vec<&Value> = m["vms"].as_array().unwrap().iter().collect();
        assert_eq!(done.len(), 1, "{policy}: {m:#}");
        assert_eq!(
            (done[0]["vm"].as_str(), done[0]["to"].as_str()),
            (Some(vm.as_str()), Some(to.as_str()))
        );
        // Journaled as a balance run.
        let records = journal_records(&journal);
        assert!(
            records
                .iter()
                .any(|r| r["kind"] == "balance" && r["host"] == "*"),
            "{records:#?}"
        );
        // Every guest exactly once, where it should be: our own QMP client on every host.
        let now = running_on(&tb, &guests).await;
        for g in guests {
            let want = if g == vm { to.as_str() } else { home(g) };
            assert_eq!(
                now[g],
                vec![want.to_string()],
                "{policy}: {g} runs on {:?}",
                now[g]
            );
        }
        // The replay of the recorded figures decides the same.
        assert_eq!(
            simulated_move(&record, policy),
            Some((vm.clone(), from.clone(), to.clone())),
            "{policy}: simulate disagrees"
        );
        if i == 0 {
            // The anti-thrashing rules, on the same journal with the defaults: h1 just gave a VM away.
            let (code, dry) = balance_once(
                &inv,
                "band",
                &journal,
                &record,
                &["--dry-run", "--samples", "1"],
            )
            .await;
            assert_eq!(code, 0, "{dry:#}");
            assert!(
                dry["migrations"].is_null(),
                "a dry run moves nothing: {dry:#}"
            );
            let held = dry["held"].as_array().unwrap();
            let decided = dry["decisions"].as_array().unwrap();
            let moves = decided.iter().filter(|d| d["kind"] == "migrate").count();
            assert_eq!(held.len(), moves, "every move is held back: {dry:#}");
            for h in held {
                let why = h["why"].as_str().unwrap();
                assert!(
                    why.contains("the host cool-down is 10m")
                        || why.contains("the VM cool-down is 1h"),
                    "{dry:#}"
                );
            }
            let still = running_on(&tb, &guests).await;
            assert_eq!(still, now, "the dry run moved something");
        }
        // Back home for the next policy.
        if i + 1 < 3 {
            let back = migrate_to(&inv, &vm, "h1", &[]).await;
            assert_eq!(back.code, 0, "{back:?}");
        }
    }
}

/// A guest on h1 that needs more memory than its balloon leaves it (the `swap` workload touches 160 MiB of a
/// 256 MiB guest ballooned down to 160 MiB, with a swap disk): the guest swaps. Each hotspot policy answers the
/// memory overload with a balloon change on that guest before any migration, and the change is carried out: QEMU's
/// balloon reaches the new target, asked with our own QMP client, and the guest still runs once, on h1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapping_guest_gets_a_bigger_balloon_before_any_migration() {
    let tb = testbed_up("qbl2", "10.94.0", "1000mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    let swap_disk = bed.path("hog-swap.img");
    std::fs::File::create(&swap_disk)
        .and_then(|f| f.set_len(128 << 20))
        .expect("swap disk");
    let dir = crate::hosts::run_dir(&tb, "h1");
    let wrapper = crate::hosts::exec_on(&tb, "h1");
    let mut monitor = std::path::PathBuf::new();
    bed.source_with("hog", "swap:160", |spec| {
        spec.run_dir = dir;
        spec.wrapper = wrapper;
        spec.memory_mib = 256;
        spec.extra_args.extend([
            "-drive".to_string(),
            format!(
                "file={},if=virtio,format=raw,cache=unsafe",
                swap_disk.display()
            ),
        ]);
        monitor = crate::harness::second_monitor(spec);
    })
    .await;
    guest_on(&mut bed, &tb, "h2", "calm2", "idle").await;
    let guests = ["hog", "calm2"];
    let balloon_mib = |mon: std::path::PathBuf| async move {
        let b = crate::harness::qmp_raw(&mon, "query-balloon").await;
        b["actual"].as_u64().unwrap() >> 20
    };
    for policy in ["idc", "sandpiper"] {
        // Squeeze the guest, and give it a few seconds to start swapping.
        crate::harness::qmp(&monitor)
            .await
            .execute_raw(
                "balloon",
                Some(serde_json::json!({ "value": 160u64 << 20 })),
                Duration::from_secs(10),
            )
            .await
            .expect("balloon down");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while balloon_mib(monitor.clone()).await > 164 {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest does not give its memory back"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let (_, _, round) = round_without_cool_downs(&bed, &inv, policy, "mem", "2").await;
        let decisions = round["decisions"].as_array().unwrap();
        let first_balloon = decisions
            .iter()
            .position(|d| d["kind"] == "balloon" && d["vm"] == "hog")
            .unwrap_or_else(|| panic!("{policy}: no balloon change for hog: {round:#}"));
        if let Some(m) = decisions.iter().position(|d| d["kind"] == "migrate") {
            assert!(
                m > first_balloon,
                "{policy}: a migration before the balloon change: {round:#}"
            );
        }
        let b = &decisions[first_balloon];
        let to_mib = b["to_mib"].as_u64().unwrap();
        assert!(
            (161..=256).contains(&to_mib) && b["from_mib"].as_u64().unwrap() < to_mib,
            "{policy}: {b:#}"
        );
        // Carried out: QEMU took the target and the guest's balloon gets there.
        let done = round["balloons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["vm"] == "hog")
            .unwrap_or_else(|| {
                panic!("{policy}: the balloon change was not carried out: {round:#}")
            });
        assert_eq!(done["outcome"], "done", "{policy}: {round:#}");
        assert_eq!(done["to_mib"].as_u64(), Some(to_mib), "{round:#}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now = balloon_mib(monitor.clone()).await;
            if now + 1 >= to_mib {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{policy}: the balloon stays at {now} MiB, not {to_mib}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let now = running_on(&tb, &guests).await;
        assert_eq!(now["hog"], vec!["h1".to_string()], "{policy}: {now:?}");
        assert_eq!(now["calm2"], vec!["h2".to_string()], "{policy}: {now:?}");
    }
}
