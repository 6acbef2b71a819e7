//! The traffic matrix measured on the testbed's hosts (`qmigrate inventory traffic`): two pairs of guests talk at
//! rates their load generators hold (one pair across two hosts, one on one host), and the matrix names exactly
//! those pairs with rates within ±25 % of what the generators send. The counters are nftables' on each host's
//! bridge, counted on the sender's host only, attributed by the guests' MACs over QMP; no guest agent. `balance`
//! records the same pairs in the scenario its policy decides on.

use std::time::Duration;

use serde_json::Value;

use crate::evacuate::{inventory, testbed_up};
use crate::harness::{qmigrate, Bed};
use crate::hosts_net::{guest_with_nic, GuestNic};

/// What the senders send, KiB/s (the guest's `send` workload holds its long-run average to this).
const FAR_KIB_PER_S: f64 = 160.0;
const NEAR_KIB_PER_S: f64 = 80.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_names_the_talking_pairs_at_the_rates_sent() {
    let tb = testbed_up("qtr1", "10.95.0", "1000mbit");
    let mut bed = Bed::new();
    let inv = inventory(&tb);
    // far: h1 -> h2 (crosses both hosts' bridges and the switch); near: both on h3.
    let far_recv = GuestNic::new(&tb, "farrecv", "10.95.0.101");
    let far_send = GuestNic::new(&tb, "farsend", "10.95.0.102");
    let near_recv = GuestNic::new(&tb, "nearrecv", "10.95.0.103");
    let near_send = GuestNic::new(&tb, "nearsend", "10.95.0.104");
    guest_with_nic(&mut bed, &tb, "h2", "farrecv", "netrecv", &far_recv).await;
    guest_with_nic(&mut bed, &tb, "h3", "nearrecv", "netrecv", &near_recv).await;
    let send = |to: &GuestNic, kib: f64| format!("send:{}:5001:{kib:.0}", to.ip);
    guest_with_nic(
        &mut bed,
        &tb,
        "h1",
        "farsend",
        &send(&far_recv, FAR_KIB_PER_S),
        &far_send,
    )
    .await;
    guest_with_nic(
        &mut bed,
        &tb,
        "h3",
        "nearsend",
        &send(&near_recv, NEAR_KIB_PER_S),
        &near_send,
    )
    .await;
    // A guest on the same bridge that says nothing to anyone.
    let quiet = GuestNic::new(&tb, "quiet", "10.95.0.105");
    guest_with_nic(&mut bed, &tb, "h1", "quiet", "idle", &quiet).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let run = qmigrate(
        &["inventory", "traffic", &inv, "--window", "6s", "--json"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let m: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    eprintln!("{}", serde_json::to_string_pretty(&m).unwrap());
    assert_eq!(m["problems"], serde_json::json!([]), "{m:#}");

    // Each direction a generator sends: within ±25 % of its rate (frames carry headers: a few % more).
    let directed = m["directed"].as_array().unwrap();
    let rate = |from: &str, to: &str| {
        directed
            .iter()
            .find(|d| d["from"] == from && d["to"] == to)
            .and_then(|d| d["bytes_per_s"].as_f64())
            .unwrap_or_else(|| panic!("no traffic {from} -> {to}: {m:#}"))
    };
    for (from, to, kib) in [
        ("farsend", "farrecv", FAR_KIB_PER_S),
        ("nearsend", "nearrecv", NEAR_KIB_PER_S),
    ] {
        let want = kib * 1024.0;
        let got = rate(from, to);
        assert!(
            (got / want - 1.0).abs() <= 0.25,
            "{from} -> {to}: {got:.0} B/s measured, {want:.0} B/s sent: {m:#}"
        );
    }

    // The matrix (both directions together): those two pairs and nothing else worth a mention.
    let flows: Vec<(String, String, f64)> = m["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["a"].as_str().unwrap().to_string(),
                f["b"].as_str().unwrap().to_string(),
                f["mbps"].as_f64().unwrap(),
            )
        })
        .collect();
    let talking: Vec<(&str, &str)> = flows
        .iter()
        .filter(|f| f.2 > 0.05)
        .map(|f| (f.0.as_str(), f.1.as_str()))
        .collect();
    assert_eq!(
        talking,
        vec![("farrecv", "farsend"), ("nearrecv", "nearsend")],
        "{m:#}"
    );
    for (a, b, kib) in [
        ("farrecv", "farsend", FAR_KIB_PER_S),
        ("nearrecv", "nearsend", NEAR_KIB_PER_S),
    ] {
        let want_mbps = kib * 1024.0 * 8.0 / 1e6;
        let got = flows.iter().find(|f| f.0 == a && f.1 == b).unwrap().2;
        assert!(
            (got / want_mbps - 1.0).abs() <= 0.25,
            "{a} <-> {b}: {got:.3} Mbps measured, {want_mbps:.3} sent: {m:#}"
        );
    }
    assert!(
        !flows.iter().any(|f| f.0 == "quiet" || f.1 == "quiet"),
        "the quiet guest talked: {m:#}"
    );

    // balance measures the same matrix each round and records it in the scenario a policy decides on.
    let journal = bed.path("balance.jsonl");
    let record = bed.path("scenario.json");
    let run = qmigrate(
        &[
            "balance",
            "--inventory",
            &inv,
            "--policy",
            "idc",
            "--once",
            "--dry-run",
            "--samples",
            "1",
            "--traffic-window",
            "4s",
            "--journal",
            journal.to_str().unwrap(),
            "--record",
            record.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let scenario: Value =
        serde_json::from_str(&std::fs::read_to_string(&record).expect("the recorded scenario"))
            .expect("JSON");
    let recorded: Vec<(&str, &str)> = scenario["traffic"]
        .as_array()
        .unwrap_or_else(|| panic!("no traffic recorded: {scenario:#}"))
        .iter()
        .filter(|f| f["mbps"].as_f64().unwrap() > 0.05)
        .map(|f| (f["a"].as_str().unwrap(), f["b"].as_str().unwrap()))
        .collect();
    assert_eq!(
        recorded,
        vec![("farrecv", "farsend"), ("nearrecv", "nearsend")],
        "{scenario:#}"
    );

    // The counting table can be removed from every host.
    let rm = qmigrate(
        &["inventory", "traffic", &inv, "--remove"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(rm.code, 0, "{rm:?}");
    for h in ["h1", "h2", "h3"] {
        let ns = format!("{}-{h}", tb.name);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "list", "tables"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(qmigrate::traffic::TABLE),
            "{h} still has the table"
        );
    }
}
