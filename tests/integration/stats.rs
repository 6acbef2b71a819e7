//! `qmigrate stats` and the stats library on real guests: each workload labelled with its evidence, and a round
//! of many guests that costs about one sample, with a dead socket reported while the rest answer.

use std::path::Path;
use std::time::{Duration, Instant};

use qmigrate::stats::{sample_round, SampleOptions};
use serde_json::Value;

use crate::harness::{qmigrate, s, Bed, Tap};

/// Runs `qmigrate stats --json` on one socket and returns its VM entry.
async fn stats_of(qmp: &Path) -> Value {
    let run = qmigrate(
        &["stats", "--json", "--interval", "2s", s(qmp)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let json = run.json();
    assert_eq!(json["vms"].as_array().map(Vec::len), Some(1), "{run:?}");
    json["vms"][0].clone()
}

fn classes(vm: &Value) -> Vec<String> {
    vm["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .map(|l| l["class"].as_str().expect("class name").to_string())
        .collect()
}

/// The evidence of `class`: (metric, value, threshold) triples.
fn evidence(vm: &Value, class: &str) -> Vec<(String, f64, f64)> {
    let label = vm["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["class"] == class)
        .unwrap_or_else(|| panic!("no {class} label in {vm:#}"));
    label["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["metric"].as_str().unwrap().to_string(),
                e["value"].as_f64().unwrap(),
                e["threshold"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_is_labelled_with_its_evidence() {
    // (workload, class it must carry, the metric behind it, classes it must not carry)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("idle", "idle", "cpu_pct", &[]),
        (
            "dirty:64",
            "dirty-memory",
            "dirty_rate_bytes_per_s",
            &["idle", "disk-io", "web", "net-receive"],
        ),
        (
            "cpu",
            "cpu",
            "cpu_pct",
            &["idle", "dirty-memory", "disk-io"],
        ),
        // The disk writer's buffered writes pass through the guest's page cache, so it dirties memory too (20-40
        // MiB/s measured): it may carry dirty-memory, and the classifier says so with its figures.
        (
            "disk",
            "disk-io",
            "disk_bytes_per_s",
            &["idle", "web", "net-receive"],
        ),
    ];
    for (workload, class, metric, never) in cases {
        // One guest at a time: on two cores, busy guests side by side would starve each other's vCPU.
        let mut bed = Bed::new();
        let disk = bed.path("disk.img");
        let qmp = bed
            .source_with("vm", workload, |spec| {
                if *workload == "disk" {
                    std::fs::File::create(&disk)
                        .unwrap()
                        .set_len(64 << 20)
                        .unwrap();
                    spec.extra_args = vec![
                        "-drive".into(),
                        format!("file={},if=virtio,format=raw", disk.display()),
                    ];
                }
            })
            .await;
        let vm = stats_of(&qmp).await;
        eprintln!(
            "{workload}: {} (dirty-rate mode {})",
            vm["classes"], vm["sample"]["dirty_rate"]["mode"]
        );
        let got = classes(&vm);
        assert!(
            got.contains(&class.to_string()),
            "{workload}: {got:?}\n{vm:#}"
        );
        for c in *never {
            assert!(
                !got.contains(&c.to_string()),
                "{workload} is also {c}: {vm:#}"
            );
        }
        let ev = evidence(&vm, class);
        let (_, value, threshold) = ev
            .iter()
            .find(|(m, _, _)| m == metric)
            .unwrap_or_else(|| panic!("{workload}: no {metric} evidence: {ev:?}"));
        if *class == "idle" {
            assert_eq!(got, vec!["idle"], "{vm:#}");
            assert!(ev.iter().all(|(_, v, t)| v < t), "{ev:?}");
            // No disk and no NIC: idle shows the two figures it could look at.
            let metrics: Vec<&str> = ev.iter().map(|(m, _, _)| m.as_str()).collect();
            assert_eq!(metrics, ["cpu_pct", "dirty_rate_bytes_per_s"], "{ev:?}");
        } else {
            assert!(value >= threshold, "{workload}: {ev:?}");
        }
        // The figures behind the evidence are the sample's own.
        let sample = &vm["sample"];
        assert_eq!(sample["run_state"], "running", "{sample:#}");
        assert_eq!(sample["memory"]["ram_bytes"], 256u64 << 20, "{sample:#}");
        assert!(
            sample["memory"]["balloon_actual_bytes"].as_u64().is_some(),
            "{sample:#}"
        );
        assert_eq!(
            sample["vcpus"].as_array().map(Vec::len),
            Some(1),
            "{sample:#}"
        );
        assert!(sample["dirty_rate"]["mode"].is_string(), "{sample:#}");
        if *workload == "disk" {
            let d = &sample["disks"][0];
            assert!(d["write_bytes_per_s"].as_f64().unwrap() > 1e6, "{d:#}");
        } else {
            assert_eq!(
                sample["disks"].as_array().map(Vec::len),
                Some(0),
                "{sample:#}"
            );
        }
        assert_eq!(
            sample["nics"].as_array().map(Vec::len),
            Some(0),
            "{sample:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_memory_statistics_come_from_the_balloon() {
    let mut bed = Bed::new();
    let qmp = bed.source("vm", "idle").await;
    let vm = stats_of(&qmp).await;
    let guest = &vm["sample"]["memory"]["guest"];
    let total = guest["total_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{vm:#}"));
    let available = guest["available_bytes"].as_u64().unwrap();
    // The guest sees a little less than its 256 MiB (the kernel's own reservation) and most of it is available.
    assert!(total <= 256 << 20 && total > 128 << 20, "{guest:#}");
    assert!(available <= total && available > 64 << 20, "{guest:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_guests_cost_about_one_sample_and_a_dead_one_is_reported() {
    let mut bed = Bed::new();
    let mut sockets = Vec::new();
    for i in 0..10 {
        let qmp = bed
            .source_with(&format!("vm{i}"), "idle", |spec| spec.memory_mib = 128)
            .await;
        sockets.push(qmp.display().to_string());
    }
    let opts = SampleOptions::new(Duration::from_secs(1));

    let started = Instant::now();
    let single = sample_round(&sockets[..1], &opts).await;
    let single_time = started.elapsed();
    assert_eq!(single.answered(), 1, "{}", single.to_table());

    let dead = sockets[9].clone();
    bed.kill(Path::new(&dead));
    let started = Instant::now();
    let round = sample_round(&sockets, &opts).await;
    let round_time = started.elapsed();
    eprintln!(
        "single {single_time:?}, ten {round_time:?}\n{}",
        round.to_table()
    );
    assert_eq!(round.answered(), 9, "{}", round.to_table());
    let entry = round.vms.iter().find(|v| v.socket == dead).unwrap();
    let error = entry.error.as_deref().expect("the dead guest has an error");
    assert!(error.contains(&dead), "{error}");
    assert!(entry.classes.is_empty());
    for vm in round.vms.iter().filter(|v| v.socket != dead) {
        let sample = vm.sample.as_ref().expect("the live guests answer");
        assert_eq!(sample.run_state, "running");
        assert_eq!(sample.memory.ram_bytes, 128 << 20);
    }
    assert!(
        round_time <= single_time * 2,
        "ten guests took {round_time:?}, one took {single_time:?}"
    );

    // The CLI: exit 0 while one answers, 3 when none does.
    let run = qmigrate(
        &["stats", "--interval", "1s", &sockets[0], &dead],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("vm0.qmp") && run.stdout.contains("1 of 2 VMs answered"),
        "{run:?}"
    );
    assert!(run.stderr.contains(&dead), "{run:?}");
    let run = qmigrate(
        &["stats", "--interval", "1s", &dead],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
}

/// Host-side traffic to a guest until stopped: `Fetch` reads the web guest's 1 MiB file over and over, `Stream`
/// writes into the netrecv guest's port 5001. Returns once the first bytes have moved.
enum Load {
    Fetch,
    Stream,
}

async fn start_load(
    load: Load,
    guest_ip: &str,
) -> (
    tokio::task::JoinHandle<u64>,
    tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stop = tokio_util::sync::CancellationToken::new();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let ip = guest_ip.to_string();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut first = Some(first_tx);
        let mut moved = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        while !token.is_cancelled() {
            let port = match load {
                Load::Fetch => 80,
                Load::Stream => 5001,
            };
            let Ok(Ok(mut conn)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((ip.as_str(), port)),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match load {
                Load::Fetch => {
                    let _ = conn.write_all(b"GET /file HTTP/1.0\r\n\r\n").await;
                    loop {
                        let n = tokio::select! {
                            n = conn.read(&mut buf) => n.unwrap_or(0),
                            _ = token.cancelled() => 0,
                        };
                        if n == 0 {
                            break;
                        }
                        moved += n as u64;
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Load::Stream => loop {
                    let ok = tokio::select! {
                        r = conn.write_all(&buf) => r.is_ok(),
                        _ = token.cancelled() => false,
                    };
                    if !ok {
                        break;
                    }
                    moved += buf.len() as u64;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                },
            }
        }
        moved
    });
    tokio::time::timeout(Duration::from_secs(20), first_rx)
        .await
        .expect("no traffic to the guest within 20 s")
        .expect("load task");
    (task, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_guests_are_web_or_net_receive_by_their_tap() {
    // (workload, tap subnet, host load, class it must carry, its metric, the class it must not carry)
    let cases = [
        (
            "web",
            1u8,
            Load::Fetch,
            "web",
            "net_tx_bytes_per_s",
            "net-receive",
        ),
        (
            "netrecv",
            2,
            Load::Stream,
            "net-receive",
            "net_rx_bytes_per_s",
            "web",
        ),
    ];
    for (workload, subnet, load, class, metric, never) in cases {
        let tap = Tap::new(subnet);
        let (args, kernel) = tap.guest_args();
        let mut bed = Bed::new();
        let qmp = bed
            .source_with("vm", workload, |spec| {
                spec.extra_args = args;
                spec.kernel_extra = kernel;
            })
            .await;
        let (task, stop) = start_load(load, &tap.guest_ip).await;
        let vm = stats_of(&qmp).await;
        stop.cancel();
        let moved = task.await.unwrap();
        eprintln!("{workload}: {} ({moved} bytes moved)", vm["classes"]);
        let got = classes(&vm);
        assert!(
            got.contains(&class.to_string()),
            "{workload}: {got:?}\n{vm:#}"
        );
        assert!(!got.contains(&never.to_string()), "{workload}: {vm:#}");
        let ev = evidence(&vm, class);
        assert!(
            ev.iter().any(|(m, v, t)| m == metric && v >= t),
            "{workload}: {ev:?}"
        );
        let nic = &vm["sample"]["nics"][0];
        assert_eq!(nic["tap"], tap.name.as_str(), "{nic:#}");
        assert_eq!(nic["name"], "net0", "{nic:#}");
    }
}
