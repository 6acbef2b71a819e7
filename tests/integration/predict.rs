//! Forecasts and the ladder judging its rungs, on real guests: throttling that cannot slow a dirtier is left for
//! postcopy long before the timeout, with the reason in the report and on the timeline; a migration forecast
//! hopeless is refused with `--refuse-hopeless`, naming the flags that would make it complete, and nothing moves;
//! what a migration teaches is remembered for the VM's next forecast.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{migrate_args, migration_status, qmigrate, run_state, s, Bed};

fn escalations(r: &Value) -> &Vec<Value> {
    r["escalations"].as_array().expect("escalations")
}

/// A 64 MiB random dirtier over a 32 MiB/s link, with the throttle's ceiling at 10 %: throttling reaches its
/// ceiling and the dirty rate does not move, so the ladder moves on to postcopy at once — not at the 120 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_that_does_not_slow_the_guest_is_left_for_postcopy_before_the_timeout() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:64").await;
    let dst = bed.destination("dst").await;
    let svg = bed.path("timeline.svg");
    let run = qmigrate(
        &migrate_args(
            &src,
            &dst,
            &format!(
                "--bandwidth 32MiB/s --auto-converge auto --max-throttle 10 --postcopy fallback --timeout 120s \
                 --timeline {}",
                s(&svg)
            ),
        ),
        Duration::from_secs(200),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["outcome"], "completed", "{r:#}");
    assert_eq!(r["postcopy"], true, "{r:#}");
    let esc = escalations(&r);
    let kinds: Vec<&str> = esc
        .iter()
        .filter_map(|e| e["action"]["kind"].as_str())
        .collect();
    let throttle = kinds.iter().position(|k| *k == "throttle");
    let postcopy = kinds.iter().position(|k| *k == "start-postcopy");
    assert!(
        matches!((throttle, postcopy), (Some(t), Some(p)) if t < p),
        "throttle, then postcopy: {kinds:?}"
    );
    let moved_on = &esc[postcopy.unwrap()];
    let reason = moved_on["reason"].as_str().unwrap();
    assert!(
        reason.contains("it does not slow this guest") && reason.contains("postcopy"),
        "{reason}"
    );
    let at_ms = moved_on["at_ms"].as_u64().unwrap();
    assert!(
        at_ms < 100_000,
        "moved on at {at_ms} ms, the timeout is 120 s"
    );
    assert!(
        !reason.contains("timeout of"),
        "moved on for the timeout, not the rung: {reason}"
    );
    assert_eq!(esc[throttle.unwrap()]["action"]["max_pct"], 10, "{esc:?}");
    // Checked independently of the report: the guest runs on the destination only.
    assert_eq!(run_state(&dst).await, "running");
    assert_ne!(run_state(&src).await, "running");
    assert_eq!(r["final_state"]["running_copies"], 1);

    // The report has one sample a poll, and the timeline draws them with the escalations labelled.
    let samples = r["samples"].as_array().expect("samples");
    assert!(samples.len() >= 10, "{} samples", samples.len());
    assert!(samples
        .iter()
        .any(|s| s["throttle_pct"].as_u64() == Some(10)));
    let text = std::fs::read_to_string(&svg).expect("the timeline was written");
    let doc = roxmltree::Document::parse(&text).expect("the timeline is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let labels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "text")
        .filter_map(|n| n.text())
        .collect();
    for want in ["throttle", "postcopy", "pass 2"] {
        assert!(
            labels.iter().any(|l| l.contains(want)),
            "no {want:?} label in the timeline: {labels:?}"
        );
    }
}

/// 128 MiB dirtied at random cannot cross a 32 MiB/s link within a 1 s downtime, and with throttling and postcopy
/// forbidden nothing can help: `--refuse-hopeless` refuses before the start (exit 11) and names the flags that would
/// make it complete; both QEMUs are as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hopeless_migration_is_refused_up_front_and_the_message_names_the_remedies() {
    let mut bed = Bed::new();
    let src = bed.source("src", "dirty:128").await;
    let dst = bed.destination("dst").await;
    let args =
        "--bandwidth 32MiB/s --auto-converge off --postcopy never --max-downtime 1s --timeout 30s";
    let run = qmigrate(
        &migrate_args(&src, &dst, &format!("{args} --refuse-hopeless")),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 11, "{run:?}");
    for want in [
        "--refuse-hopeless",
        "cannot complete within the 30s timeout",
        "--postcopy fallback",
        "--on-timeout pause",
    ] {
        assert!(run.stderr.contains(want), "no {want:?} in: {}", run.stderr);
    }
    assert!(run.stdout.is_empty(), "{run:?}");
    assert_eq!(run_state(&src).await, "running");
    assert_eq!(run_state(&dst).await, "inmigrate");
    // Never started: QEMU has no migration to report.
    let status = migration_status(&src).await;
    assert!(matches!(status.as_str(), "" | "none"), "{status}");
}

/// A forecast made with the pre-start figures, then again after the first pass; and the lesson remembered: the
/// second migration of the same VM starts from the calibration the first one wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecasts_are_reported_and_what_a_migration_taught_is_remembered() {
    let mut bed = Bed::new();
    let cal = bed.path("calibration.json");
    // dirty:64 at 64 MiB/s: the first sync finds more than a 300 ms downtime carries, so there is a second pass
    // to re-forecast at (a dirty:16 guest can switch over at its first sync, leaving no "after").
    let src = bed.source("src", "dirty:64").await;
    // The destinations carry the guest's name too (QEMU's -name is what the calibration is keyed by), each in a
    // directory of its own.
    let (first, second) = (bed.path("first"), bed.path("second"));
    for d in [&first, &second] {
        std::fs::create_dir_all(d).unwrap();
    }
    let dst = bed
        .destination_with("src", move |spec| spec.run_dir = first)
        .await;
    let flags = format!(
        "--bandwidth 64MiB/s --timeout 60s --calibration {}",
        s(&cal)
    );
    let run = qmigrate(&migrate_args(&src, &dst, &flags), Duration::from_secs(120)).await;
    assert_eq!(run.code, 0, "{run:?}");
    let r = run.json();
    assert_eq!(r["forecast"]["ending"], "precopy", "{r:#}");
    assert!(r["forecast"]["total_time_ms"].as_u64().unwrap() > 0);
    assert_eq!(r["first_pass_estimate"]["method"], "page-contents", "{r:#}");
    let windows = r["dirty_rate_before"]["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2, "{r:#}");
    assert!(r["dirty_rate_before"]["trust"]
        .as_str()
        .unwrap()
        .contains("page-sampling"));
    let live = &r["forecast_after_first_pass"];
    assert!(
        live["prediction"]["total_time_ms"].as_u64().is_some(),
        "{r:#}"
    );
    assert!(live["dirty_factor"].as_f64().is_some(), "{r:#}");

    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).expect("calibration written"))
            .expect("calibration JSON");
    let entry = &c["vms"]["src"];
    assert_eq!(entry["runs"], 1, "{c:#}");
    assert_eq!(entry["method"], "page-sampling", "{c:#}");
    let factor = entry["dirty_factor"].as_f64().expect("a dirty factor");
    assert!(factor > 0.0, "{c:#}");
    assert!(entry["nonzero_fraction"].as_f64().is_some(), "{c:#}");

    // Back again: the forecast now applies what the first migration taught.
    let dst2 = bed
        .destination_with("src", move |spec| spec.run_dir = second)
        .await;
    let back = qmigrate(&migrate_args(&dst, &dst2, &flags), Duration::from_secs(120)).await;
    assert_eq!(back.code, 0, "{back:?}");
    let b = back.json();
    assert_eq!(b["vm"], "src", "{b:#}");
    let applied = b["dirty_rate_before"]["calibration_factor"]
        .as_f64()
        .expect("the remembered factor applied");
    assert!((applied - factor).abs() < 1e-9, "{applied} vs {factor}");
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(c["vms"]["src"]["runs"], 2, "{c:#}");
}
