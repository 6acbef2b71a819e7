//! The QMP layer against real QEMU (concurrency, ids, timeouts, feature detection) and against fake peers for
//! the protocol faults a real QEMU cannot be made to produce (garbage, oversized lines, a peer that hangs).

use std::time::Duration;

use qmigrate::qmp::types::{QueryMigrateCapabilities, QueryStatus};
use qmigrate::qmp::{ConnectOptions, PeerFeatures, Qmp, QmpError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{qmp, Bed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_concurrent_commands_events_and_features() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let q = qmp(&src).await;
    assert_eq!(
        q.peer_pid(),
        Some(bed.pid_of(&src)),
        "peer credentials give the QEMU pid"
    );
    // Twenty commands in flight at once on one connection, each routed back to its caller.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let q = q.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    q.execute(&QueryStatus {}).await.map(|s| s.status)
                } else {
                    q.execute(&QueryMigrateCapabilities {})
                        .await
                        .map(|c| c.len().to_string())
                }
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t.await.unwrap().unwrap();
        if i % 2 == 0 {
            assert_eq!(v, "running");
        } else {
            assert!(v.parse::<usize>().unwrap() > 10, "{v}");
        }
    }
    // A command that cannot answer in time costs only itself.
    let err = q
        .execute_timeout(
            &qmigrate::qmp::types::QueryQmpSchema {},
            Duration::from_micros(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("`query-qmp-schema` got no reply"),
        "{err}"
    );
    assert_eq!(q.execute(&QueryStatus {}).await.unwrap().status, "running");
    // Events reach subscribers.
    let mut events = q.events();
    q.execute(&qapi::qmp::stop {}).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "STOP");
    q.execute(&qapi::qmp::cont {}).await.unwrap();
    // Features come from the peer.
    let f = PeerFeatures::detect(&q).await.unwrap();
    assert!(f.has_command("migrate") && f.has_command("query-migrate"));
    assert!(f.has_capability("auto-converge") && f.has_capability("postcopy-ram"));
    assert!(f.has_parameter("downtime-limit"));
    assert!(f.events.contains("MIGRATION_PASS"));
}

/// A fake QMP peer: greets, accepts qmp_capabilities, then runs `script` on each later command line.
async fn fake_peer<F, Fut>(bed: &Bed, name: &str, script: F) -> std::path::PathBuf
where
    F: Fn(String, tokio::net::unix::OwnedWriteHalf) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = tokio::net::unix::OwnedWriteHalf> + Send,
{
    let path = bed.path(name);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (c, _) = listener.accept().await.unwrap();
        let (r, mut w) = c.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 99}, \"package\": \"fake\"}, \"capabilities\": [\"oob\"]}}\n").await.unwrap();
        let first = lines.next_line().await.unwrap().unwrap();
        let id = serde_json::from_str::<serde_json::Value>(&first).unwrap()["id"].clone();
        w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            w = script(line, w).await;
        }
    });
    path
}

fn id_of(line: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["id"].clone()
}

#[tokio::test]
async fn garbage_and_unknown_events_do_not_break_the_connection() {
    let bed = Bed::new();
    let path = fake_peer(&bed, "garbage.sock", |line, mut w| async move {
        w.write_all(b"this is not json\n").await.unwrap();
        w.write_all(b"{\"event\": \"SOMETHING_FROM_QEMU_42\", \"data\": {\"x\": 1}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n").await.unwrap();
        w.write_all(format!("{{\"return\": {{\"status\": \"brand-new-state\", \"running\": true}}, \"id\": {}}}\n", id_of(&line)).as_bytes()).await.unwrap();
        w
    })
    .await;
    let q = Qmp::connect_unix(&path, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(q.greeting().version, (99, 0, 0));
    let mut events = q.events();
    let st = q.execute(&QueryStatus {}).await.unwrap();
    assert_eq!(st.status, "brand-new-state");
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "SOMETHING_FROM_QEMU_42");
    assert_eq!(
        q.execute(&QueryStatus {}).await.unwrap().status,
        "brand-new-state"
    );
}

#[tokio::test]
async fn oversized_line_ends_the_connection_with_a_named_error() {
    let bed = Bed::new();
    let path = fake_peer(&bed, "huge.sock", |_line, mut w| async move {
        let huge = vec![b'x'; qmigrate::qmp::MAX_LINE_BYTES + 10];
        let _ = w.write_all(&huge).await;
        let _ = w.write_all(b"\n").await;
        w
    })
    .await;
    let q = Qmp::connect_unix(&path, &ConnectOptions::default())
        .await
        .unwrap();
    let err = q.execute(&QueryStatus {}).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    assert!(err.to_string().contains("longer than"), "{err}");
    assert!(q.is_closed());
}

#[tokio::test]
async fn hanging_peer_times_out_per_command_and_late_replies_are_dropped() {
    let bed = Bed::new();
    // Answers nothing to the first command; answers the second at once and the first one late.
    let path = fake_peer(&bed, "hang.sock", {
        let first: std::sync::Arc<tokio::sync::Mutex<Option<serde_json::Value>>> = Default::default();
        move |line, mut w| {
            let first = first.clone();
            async move {
                let mut f = first.lock().await;
                match f.take() {
                    None => *f = Some(id_of(&line)),
                    Some(old) => {
                        let reply = format!("{{\"return\": {{\"status\": \"second\", \"running\": true}}, \"id\": {}}}\n", id_of(&line));
                        w.write_all(reply.as_bytes()).await.unwrap();
                        let late = format!("{{\"return\": {{\"status\": \"late\", \"running\": true}}, \"id\": {old}}}\n");
                        w.write_all(late.as_bytes()).await.unwrap();
                    }
                }
                w
            }
        }
    })
    .await;
    let q = Qmp::connect_unix(&path, &ConnectOptions::default())
        .await
        .unwrap();
    let err = q
        .execute_timeout(&QueryStatus {}, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    assert_eq!(q.execute(&QueryStatus {}).await.unwrap().status, "second");
    let third = q
        .execute_timeout(&QueryStatus {}, Duration::from_millis(300))
        .await;
    assert!(matches!(third, Err(QmpError::Timeout { .. })), "{third:?}");
    assert!(!q.is_closed());
}

#[tokio::test]
async fn silent_peer_is_not_qmp() {
    let bed = Bed::new();
    let path = bed.path("silent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let keep = tokio::spawn(async move {
        let c = listener.accept().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(c);
    });
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let err = Qmp::connect_unix(&path, &opts).await.unwrap_err();
    keep.abort();
    assert!(
        err.to_string().contains("no QMP greeting within 500ms"),
        "{err}"
    );
}

/// QMP over TCP and over a child process's stdio (as through `ssh host socat - UNIX-CONNECT:…`), both against the
/// same real QEMU's extra monitors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_byte_stream_transports() {
    let bed = Bed::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stdio_sock = bed.path("stdio.qmp");
    let mut spec = qmigrate::testbed::GuestSpec::new(
        "vm",
        "idle",
        &crate::harness::guest_dir(),
        bed.dir.path(),
    );
    spec.extra_args = vec![
        "-qmp".into(),
        format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", stdio_sock.display()),
    ];
    let _guest = qmigrate::testbed::Guest::launch(spec).await.unwrap();

    let tcp = Qmp::connect(&format!("tcp:127.0.0.1:{port}"), &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(tcp.label(), format!("tcp:127.0.0.1:{port}"));
    assert_eq!(
        tcp.execute(&QueryStatus {}).await.unwrap().status,
        "running"
    );

    let mut child = tokio::process::Command::new("socat")
        .args(["-", &format!("UNIX-CONNECT:{}", stdio_sock.display())])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("socat");
    let (r, w) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let piped = Qmp::connect_stream(r, w, "socat-child", &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(piped.greeting().version.0, tcp.greeting().version.0);
    assert_eq!(
        piped.execute(&QueryStatus {}).await.unwrap().status,
        "running"
    );
    let _ = child.kill().await;
}

/// `--launch-dst` starts a destination only from a QEMU: a peer whose executable is something else (here this
/// test binary) is refused, and never re-executed.
#[tokio::test]
async fn launch_dst_refuses_a_peer_that_is_not_qemu() {
    let bed = Bed::new();
    let path = fake_peer(&bed, "not-qemu.sock", |line, mut w| async move {
        let reply = if line.contains("query-status") {
            r#"{"status": "running", "running": true}"#
        } else {
            "{}"
        };
        w.write_all(format!("{{\"return\": {reply}, \"id\": {}}}\n", id_of(&line)).as_bytes())
            .await
            .unwrap();
        w
    })
    .await;
    let run = crate::harness::qmigrate(
        &["migrate", "--from", path.to_str().unwrap(), "--launch-dst"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("which is not QEMU"), "{run:?}");
    assert!(!bed.path("not-qemu.sock.incoming").exists(), "{run:?}");
}
