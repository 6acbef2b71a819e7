//! `qmigrate stats` and the stats library on real guests: each workload labelled with its evidence, and a round
//! of many guests that costs about one sample, with a dead socket reported while the rest answer.

use std::path::Path;
use std::time::{Duration, Instant};

use qmigrate::stats::{sample_round, SampleOptions};
use serde_json::Value;

use crate::harness::{qmigrate, s, second_monitor, Bed, Tap};

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

/// Starts a guest with `-name NAME` and a second monitor at `NAME.qmp.mon2`, a socket whose file name is not the
/// VM's name; returns that socket.
async fn guest_with_second_monitor(
    bed: &mut Bed,
    name: &str,
    workload: &str,
) -> std::path::PathBuf {
    let mut mon2 = None;
    bed.source_with(name, workload, |spec| mon2 = Some(second_monitor(spec)))
        .await;
    mon2.expect("a second monitor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_names_a_bare_socket_by_qemus_name_and_keeps_the_socket() {
    let mut bed = Bed::new();
    let mon2 = guest_with_second_monitor(&mut bed, "web-7", "idle").await;
    assert!(s(&mon2).ends_with("web-7.qmp.mon2"), "{}", mon2.display());
    let vm = stats_of(&mon2).await;
    assert_eq!(vm["name"], "web-7", "{vm:#}");
    assert_eq!(vm["name_from"], "qemu", "{vm:#}");
    assert_eq!(vm["socket"], s(&mon2), "{vm:#}");
    assert_eq!(vm["sample"]["qemu_name"], "web-7", "{vm:#}");

    // A name given on the command line wins; the table shows it, the socket below it.
    let given = format!("front={}", mon2.display());
    let run = qmigrate(
        &[
            "stats",
            "--json",
            "--no-dirty-rate",
            "--interval",
            "1s",
            &given,
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let vm = &run.json()["vms"][0];
    assert_eq!(
        (&vm["name"], &vm["name_from"]),
        (&"front".into(), &"given".into()),
        "{vm:#}"
    );
    assert_eq!(vm["socket"], s(&mon2), "{vm:#}");
    let run = qmigrate(
        &["stats", "--no-dirty-rate", "--interval", "1s", s(&mon2)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[1].starts_with("web-7 "), "{run:?}");
    assert_eq!(
        lines[2],
        format!("    socket: {}", mon2.display()),
        "{run:?}"
    );
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
    for (i, vm) in round.vms.iter().enumerate() {
        assert_eq!(
            (vm.name.as_str(), vm.socket.as_str()),
            (format!("vm{i}").as_str(), sockets[i].as_str())
        );
    }
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
    // Each VM by its name (the live one's -name, the dead one's file name), its socket on the line below.
    for (name, socket) in [("vm0", &sockets[0]), ("vm9", &dead)] {
        let row = run
            .stdout
            .lines()
            .position(|l| l.starts_with(&format!("{name} ")));
        let row = row.unwrap_or_else(|| panic!("no {name} row: {run:?}"));
        assert_eq!(
            run.stdout.lines().nth(row + 1),
            Some(format!("    socket: {socket}").as_str()),
            "{run:?}"
        );
    }
    assert!(run.stdout.contains("1 of 2 VMs answered"), "{run:?}");
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

/// Scrapes until every `vm` has at least `samples` successful or failed samples, or panics after `limit`.
async fn scrape_after_samples(
    port: u16,
    vms: &[&str],
    samples: f64,
    limit: Duration,
) -> (String, prometheus_parse::Scrape) {
    use crate::harness::{metric_value, scrape};
    let deadline = Instant::now() + limit;
    loop {
        let last = scrape(port).await;
        if let Ok((text, parsed)) = &last {
            let done = vms.iter().all(|vm| {
                let ok = metric_value(parsed, "qmigrate_vm_samples_total", &[("vm", vm)]);
                let failed = metric_value(parsed, "qmigrate_vm_sample_errors_total", &[("vm", vm)]);
                ok.unwrap_or(0.0) + failed.unwrap_or(0.0) >= samples
            });
            if done {
                return (text.clone(), parsed.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {samples} samples of {vms:?} within {limit:?}: {:?}",
            last.map(|(t, _)| t)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Fails with qmigrate's output when `serve` has already exited: it must run until signalled.
async fn still_running(mut serve: crate::harness::Running) -> crate::harness::Running {
    if let Ok(Some(_)) = serve.child.try_wait() {
        let run = serve.finish(Duration::from_secs(5)).await;
        panic!("qmigrate serve exited before it was signalled: {run:?}");
    }
    serve
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_prometheus_metrics_of_every_vm_and_stops_on_sigterm() {
    use crate::harness::{free_port, metric_value, spawn_until};
    use qmigrate::qmp::{ConnectOptions, Qmp};
    let mut bed = Bed::new();
    // Bare sockets whose file names (dirty.qmp.mon2) are not the VMs' names: the `vm` label is QEMU's -name.
    let dirty = guest_with_second_monitor(&mut bed, "dirty", "dirty:64").await;
    let idle = guest_with_second_monitor(&mut bed, "idle", "idle").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let serve = spawn_until(
        &[
            "serve",
            "--metrics",
            &addr,
            "--interval",
            "1s",
            s(&dirty),
            s(&idle),
        ],
        "serving metrics",
        Duration::from_secs(20),
    )
    .await;
    let (text, m) =
        scrape_after_samples(port, &["dirty", "idle"], 2.0, Duration::from_secs(40)).await;
    let v = |metric: &str, labels: &[(&str, &str)]| {
        metric_value(&m, metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?}:\n{text}"))
    };
    for (vm, socket) in [("dirty", s(&dirty)), ("idle", s(&idle))] {
        assert_eq!(v("qmigrate_vm_up", &[("vm", vm)]), 1.0, "{text}");
        assert_eq!(
            v(
                "qmigrate_vm_info",
                &[("vm", vm), ("socket", socket), ("name_from", "qemu")]
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            v("qmigrate_vm_run_state", &[("vm", vm), ("state", "running")]),
            1.0
        );
        assert_eq!(
            v("qmigrate_vm_memory_bytes", &[("vm", vm)]),
            f64::from(256u32 << 20)
        );
        assert!(
            v("qmigrate_vm_balloon_bytes", &[("vm", vm)]) > 0.0,
            "{text}"
        );
        let vcpu = v("qmigrate_vm_vcpu_percent", &[("vm", vm), ("vcpu", "0")]);
        assert!((0.0..=110.0).contains(&vcpu), "{text}");
        assert!(
            v("qmigrate_vm_sample_duration_seconds", &[("vm", vm)]) >= 1.0,
            "{text}"
        );
        assert_eq!(
            metric_value(&m, "qmigrate_vm_sample_errors_total", &[("vm", vm)]).unwrap_or(0.0),
            0.0
        );
    }
    let dirty_rate = v(
        "qmigrate_vm_dirty_rate_bytes_per_second",
        &[("vm", "dirty")],
    );
    let idle_rate = v("qmigrate_vm_dirty_rate_bytes_per_second", &[("vm", "idle")]);
    assert!(
        dirty_rate > idle_rate && dirty_rate >= 8.0 * 1024.0 * 1024.0,
        "dirty {dirty_rate}, idle {idle_rate}"
    );
    assert_eq!(
        v(
            "qmigrate_vm_class",
            &[("vm", "dirty"), ("class", "dirty-memory")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("qmigrate_vm_class", &[("vm", "dirty"), ("class", "idle")]),
        0.0,
        "{text}"
    );
    assert_eq!(
        v("qmigrate_vm_class", &[("vm", "idle"), ("class", "idle")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        v(
            "qmigrate_vm_class",
            &[("vm", "idle"), ("class", "dirty-memory")]
        ),
        0.0,
        "{text}"
    );
    assert!(
        v("qmigrate_vm_cpu_percent", &[("vm", "dirty")])
            > v("qmigrate_vm_cpu_percent", &[("vm", "idle")])
    );
    // No series under a path or a file name: the first sample renamed them, and their old series went.
    let labels: Vec<&str> = m
        .samples
        .iter()
        .filter_map(|s| s.labels.get("vm"))
        .collect();
    assert!(
        labels.iter().all(|l| ["dirty", "idle"].contains(l)),
        "{labels:?}\n{text}"
    );
    assert!(
        v("qmigrate_host_cpus", &[]) >= 1.0 && v("qmigrate_host_memory_total_bytes", &[]) > 0.0,
        "{text}"
    );
    // The round-trip histogram: its buckets parse as one, and it has observations from both VMs.
    let buckets = m
        .samples
        .iter()
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b)
                if s.metric == "qmigrate_qmp_round_trip_seconds" =>
            {
                Some(b)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no round-trip histogram:\n{text}"));
    assert!(buckets.iter().any(|b| b.count >= 2.0), "{text}");
    assert!(
        v("qmigrate_qmp_round_trip_seconds_count", &[]) >= 2.0,
        "{text}"
    );
    // serve releases each socket between samples: another QMP client (a migration) gets in while it runs.
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if Qmp::connect(s(&idle), &opts).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve never released {}",
            idle.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let serve = still_running(serve).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let run = serve.finish(Duration::from_secs(15)).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        crate::harness::scrape(port).await.is_err(),
        "still serving after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_a_dead_socket_as_an_error_and_serves_the_live_one() {
    use crate::harness::{free_port, metric_value, spawn_until};
    let mut bed = Bed::new();
    let live = bed.source("live", "idle").await;
    let dead = bed.source("dead", "idle").await;
    bed.kill(&dead);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let live_arg = format!("live={}", live.display());
    let dead_arg = format!("dead={}", dead.display());
    let serve = spawn_until(
        &[
            "serve",
            "--metrics",
            &addr,
            "--interval",
            "1s",
            &live_arg,
            &dead_arg,
        ],
        "serving metrics",
        Duration::from_secs(20),
    )
    .await;
    let (text, m) =
        scrape_after_samples(port, &["live", "dead"], 2.0, Duration::from_secs(30)).await;
    assert_eq!(
        metric_value(&m, "qmigrate_vm_up", &[("vm", "dead")]),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric_value(&m, "qmigrate_vm_sample_errors_total", &[("vm", "dead")]).unwrap() >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&m, "qmigrate_vm_memory_bytes", &[("vm", "dead")]),
        None,
        "{text}"
    );
    assert_eq!(
        metric_value(&m, "qmigrate_vm_up", &[("vm", "live")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(&m, "qmigrate_vm_samples_total", &[("vm", "live")]).unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &m,
            "qmigrate_vm_class",
            &[("vm", "live"), ("class", "idle")]
        ),
        Some(1.0),
        "{text}"
    );
    let serve = still_running(serve).await;
    serve.signal(nix::sys::signal::Signal::SIGINT);
    let run = serve.finish(Duration::from_secs(15)).await;
    assert_eq!(run.code, 0, "{run:?}");
    // The failure is logged once with the socket's path, not once per interval.
    let dead_path = dead.display().to_string();
    let logged = run
        .stderr
        .lines()
        .filter(|l| l.contains("no sample") && l.contains(&dead_path))
        .count();
    assert_eq!(logged, 1, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_names_a_vm_that_comes_up_late_by_its_name_once_it_answers() {
    use crate::harness::{free_port, metric_value, spawn_until};
    let mut bed = Bed::new();
    // Where the guest's second monitor will be: nothing listens there yet.
    let late = bed.path("late.qmp.mon2");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let serve = spawn_until(
        &["serve", "--metrics", &addr, "--interval", "1s", s(&late)],
        "serving metrics",
        Duration::from_secs(20),
    )
    .await;
    // Down: named by its socket's file name.
    let (text, m) =
        scrape_after_samples(port, &["late.qmp.mon2"], 1.0, Duration::from_secs(30)).await;
    assert_eq!(
        metric_value(&m, "qmigrate_vm_up", &[("vm", "late.qmp.mon2")]),
        Some(0.0),
        "{text}"
    );
    let info = |vm: &str, from: &str| {
        metric_value(
            &m,
            "qmigrate_vm_info",
            &[("vm", vm), ("socket", s(&late)), ("name_from", from)],
        )
    };
    assert_eq!(info("late.qmp.mon2", "socket-file"), Some(1.0), "{text}");

    // Up: named by its -name at its first answer; nothing stays under the file name.
    let mon2 = guest_with_second_monitor(&mut bed, "late", "idle").await;
    assert_eq!(mon2, late);
    let (text, m) = scrape_after_samples(port, &["late"], 1.0, Duration::from_secs(30)).await;
    assert_eq!(
        metric_value(&m, "qmigrate_vm_up", &[("vm", "late")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &m,
            "qmigrate_vm_info",
            &[("vm", "late"), ("socket", s(&late)), ("name_from", "qemu")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        m.samples
            .iter()
            .all(|s| s.labels.get("vm").is_none_or(|vm| vm == "late")),
        "{text}"
    );
    let serve = still_running(serve).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let run = serve.finish(Duration::from_secs(15)).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("named by QEMU's -name"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_rate_watch_prints_one_json_line_per_measurement() {
    let mut bed = Bed::new();
    let qmp = bed.source("vm", "dirty:64").await;
    let run = qmigrate(
        &[
            "dirty-rate",
            "--watch",
            "--count",
            "3",
            "--interval",
            "1s",
            "--json",
            s(&qmp),
        ],
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    let mut last_elapsed = -1.0;
    for m in &lines {
        let rate = m["bytes_per_s"].as_f64().unwrap_or_else(|| panic!("{m}"));
        assert!(rate > 0.0, "{m}");
        assert!(m["mode"].is_string() && m["time"].is_string(), "{m}");
        assert!(m["average_bytes_per_s"].as_f64().unwrap() > 0.0, "{m}");
        let elapsed = m["elapsed_s"].as_f64().unwrap();
        assert!(elapsed > last_elapsed, "{m}");
        last_elapsed = elapsed;
    }
    // The average covers every measurement in the window; the prediction needs three for AR(1), else the last value.
    let rates: Vec<f64> = lines
        .iter()
        .map(|m| m["bytes_per_s"].as_f64().unwrap())
        .collect();
    let mean = rates.iter().sum::<f64>() / 3.0;
    assert!(
        (lines[2]["average_bytes_per_s"].as_f64().unwrap() - mean).abs() < 1.0,
        "{run:?}"
    );
    assert_eq!(
        lines[1]["predicted_next_bytes_per_s"].as_f64(),
        Some(rates[1]),
        "{run:?}"
    );
    assert!(
        lines[2]["predicted_next_bytes_per_s"].as_f64().unwrap() > 0.0,
        "{run:?}"
    );

    // Without --watch: one measurement, as text.
    let run = qmigrate(
        &["dirty-rate", "--interval", "1s", s(&qmp)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    assert!(run.stdout.contains("MiB/s"), "{run:?}");
}
