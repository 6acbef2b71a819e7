//! Migrations of real guests: idle, a dirtying guest that cannot converge, the same under the controller, a
//! user's interrupt, a destination that dies, a destination launched from the source's command line.

use std::time::Duration;

use std::path::Path;

use crate::harness::{migrate_args, qmigrate, run_state, s, spawn_until, Bed, Running};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_guest_migrates() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(&src, &dst, "--timeout 60s"),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{run:?}");
    // The VM is named by QEMU's -name; its sockets stay in the report as they were given.
    assert_eq!(r["vm"], "src", "{run:?}");
    assert_eq!(r["source"], src.display().to_string(), "{run:?}");
    assert_eq!(run_state(&dst).await, "running");
    assert_eq!(run_state(&src).await, "postmigrate");
    assert_eq!(r["final_state"]["running_copies"], 1);
    let total = r["total_time_ms"].as_u64().unwrap();
    let downtime = r["downtime_ms"].as_u64().unwrap();
    assert!(total > 0 && total < 60_000, "total {total}");
    assert!(downtime <= total, "downtime {downtime} > total {total}");
    assert_eq!(r["migration_time_ms"].as_u64().unwrap(), total - downtime);
    // An idle guest sends its touched pages once, the rest as zero pages: more than a MiB, less than its RAM twice.
    let sent = r["transferred_bytes"].as_u64().unwrap();
    assert!(sent > MIB && sent < 512 * MIB, "transferred {sent}");
    assert_eq!(r["ram_bytes"].as_u64().unwrap(), 256 * MIB);
    assert!(r["passes"].as_u64().unwrap() >= 2, "{}", r["passes"]);
    assert!(r["dirty_rate_before"]["bytes_per_s"].is_u64());
    assert_eq!(r["predicted"]["verdict"], "converges");
    assert!(
        r["escalations"].as_array().unwrap().is_empty(),
        "{}",
        r["escalations"]
    );
}

/// Paper 002's non-convergence: 64 MiB dirtied at random outruns a 32 MiB/s link, and with throttling and
/// postcopy forbidden and the downtime pinned, nothing can help; the timeout cancels and the source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_guest_that_cannot_converge_is_cancelled_at_the_timeout() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(&src, &dst, "--postcopy never --auto-converge off --bandwidth 32MiB/s --max-downtime 300ms --timeout 15s"),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 5, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "cancelled");
    assert!(
        r["reason"].as_str().unwrap().contains("timeout"),
        "{}",
        r["reason"]
    );
    assert_eq!(run_state(&src).await, "running");
    assert_eq!(r["final_state"]["source"], "running");
    assert_eq!(r["final_state"]["running_copies"], 1);
    assert_eq!(r["predicted"]["verdict"], "diverges", "{}", r["predicted"]);
    let esc = r["escalations"].as_array().unwrap();
    assert_eq!(esc.len(), 1, "only the timeout's cancel: {esc:?}");
    assert_eq!(esc[0]["action"]["kind"], "cancel");
    assert!(r["total_time_ms"].as_u64().unwrap() >= 15_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_guest_with_default_settings_completes() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(&src, &dst, "--timeout 120s"),
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed");
    let max_downtime = r["settings"]["max_downtime"].as_u64().unwrap();
    assert_eq!(max_downtime, 1000);
    assert!(
        r["downtime_ms"].as_u64().unwrap() < max_downtime,
        "{}",
        r["downtime_ms"]
    );
    assert_eq!(run_state(&dst).await, "running");
    assert_eq!(run_state(&src).await, "postmigrate");
}

/// The controller at work: the same guest over the same slow link that could not converge above, with the
/// whole ladder allowed. Raising the downtime to its ceiling and throttling the vCPU to 99 % do not converge 64 MiB
/// of random writes at 32 MiB/s (measured here), so the ladder ends in postcopy, and the migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_escalates_along_the_ladder_until_a_stalled_migration_completes() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(
            &src,
            &dst,
            "--bandwidth 32MiB/s --max-downtime 600ms --postcopy fallback --timeout 120s",
        ),
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    let kinds: Vec<&str> = r["escalations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["raise-downtime", "throttle", "start-postcopy"],
        "{}",
        r["escalations"]
    );
    for e in r["escalations"].as_array().unwrap() {
        assert!(e["reason"].as_str().unwrap().contains("remaining"), "{e}");
    }
    assert_eq!(r["escalations"][0]["action"]["to_ms"], 600);
    assert!(
        r["max_throttle_pct"].as_u64().unwrap() > 1,
        "{}",
        r["max_throttle_pct"]
    );
    assert_eq!(r["postcopy"], true);
    assert!(
        r["postcopy_requests"].as_u64().unwrap() > 0,
        "{}",
        r["postcopy_requests"]
    );
    // The guest survived the switch-over (qmigrate watched it for --verify) and still runs there.
    assert_eq!(r["final_state"]["running_copies"], 1);
    assert_eq!(run_state(&dst).await, "running");
    assert_eq!(run_state(&src).await, "postmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_timeout_pause_finishes_offline() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(&src, &dst, "--postcopy never --auto-converge off --bandwidth 32MiB/s --max-downtime 300ms --timeout 10s --on-timeout pause"),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["paused_offline"], true);
    assert!(r["paused_ms"].as_u64().unwrap() > 0, "{}", r["paused_ms"]);
    let esc = r["escalations"].as_array().unwrap();
    assert_eq!(
        esc.last().unwrap()["action"]["kind"],
        "pause-source",
        "{esc:?}"
    );
    assert_eq!(r["final_state"]["destination"], "running");
    assert_eq!(run_state(&dst).await, "running");
    assert_eq!(run_state(&src).await, "postmigrate");
}

/// Starts a migration of a 64 MiB dirtier over a 32 MiB/s link with nothing to escalate: it runs until stopped.
async fn start_slow_migration(src: &Path, dst: &Path) -> Running {
    spawn_until(
        &migrate_args(
            src,
            dst,
            "--auto-converge off --bandwidth 32MiB/s --timeout 120s",
        ),
        "migration started",
        Duration::from_secs(30),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_and_the_source_keeps_running() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let running = start_slow_migration(&src, &dst).await;
    // Let it run a while: mid-pass, with data on the wire.
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.signal(nix::sys::signal::Signal::SIGINT);
    let run = running.finish(Duration::from_secs(30)).await;
    assert_eq!(run.code, 7, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "cancelled");
    assert_eq!(r["interrupted"], true);
    assert!(
        r["transferred_bytes"].as_u64().unwrap() > 0,
        "{}",
        r["transferred_bytes"]
    );
    assert!(
        run.stderr.contains("interrupted: a precopy is cancelled"),
        "{run:?}"
    );
    assert_eq!(run_state(&src).await, "running");
    assert_eq!(r["final_state"]["running_copies"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_dying_mid_migration_leaves_the_source_running() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let running = start_slow_migration(&src, &dst).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    bed.kill(&dst);
    let run = running.finish(Duration::from_secs(30)).await;
    assert_eq!(run.code, 6, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "failed");
    assert!(
        r["reason"].as_str().unwrap().contains("destination"),
        "{}",
        r["reason"]
    );
    assert_eq!(r["final_state"]["destination"], "gone");
    assert_eq!(r["final_state"]["running_copies"], 1);
    assert_eq!(run_state(&src).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_dst_mirrors_the_source_command_line() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let dst_qmp = bed.path("mirrored.qmp");
    let run = qmigrate(
        &[
            "migrate",
            "--from",
            s(&src),
            "--launch-dst",
            "--dst-qmp",
            s(&dst_qmp),
            "--json",
            "--timeout",
            "60s",
        ],
        Duration::from_secs(90),
    )
    .await;
    let r = run.json();
    let pid = r["destination_pid"].as_i64().expect("destination pid") as i32;
    bed.adopt(pid);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(r["outcome"], "completed");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "-incoming" && w[1] == "defer"),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.contains(s(&dst_qmp))), "{args:?}");
    assert!(args.iter().any(|a| a.contains("workload=idle")), "{args:?}");
    assert_eq!(run_state(&dst_qmp).await, "running");
    assert_eq!(run_state(&src).await, "postmigrate");
}
