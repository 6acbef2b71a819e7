//! Bad input: each case gets its message (naming what was wrong), its exit status, and loses nothing.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::harness::{qmigrate, qmp, run_state, s, Bed};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn missing_socket() {
    let bed = Bed::new();
    let missing = bed.path("nothing-here.qmp");
    let run = qmigrate(
        &["migrate", "--from", s(&missing), "--to", s(&missing)],
        LIMIT,
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("{}: no such file", missing.display())),
        "{run:?}"
    );
}

#[tokio::test]
async fn path_that_is_not_a_socket() {
    let bed = Bed::new();
    let file = bed.path("plain-file");
    std::fs::write(&file, "not a socket").unwrap();
    let run = qmigrate(&["migrate", "--from", s(&file), "--launch-dst"], LIMIT).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("{}: not a socket", file.display())),
        "{run:?}"
    );
}

#[tokio::test]
async fn socket_that_does_not_speak_qmp() {
    let bed = Bed::new();
    let path = bed.path("ssh.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let peer = tokio::spawn(async move {
        // A peer that is something else: it greets like an SSH server.
        while let Ok((mut c, _)) = listener.accept().await {
            let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2p1\r\n").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let run = qmigrate(&["migrate", "--from", s(&path), "--launch-dst"], LIMIT).await;
    peer.abort();
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("not a QMP peer"), "{run:?}");
    assert!(run.stderr.contains("SSH-2.0"), "{run:?}");
    assert!(run.stderr.contains(s(&path)), "{run:?}");
}

#[tokio::test]
async fn permission_denied() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    // Root passes permission checks, so run qmigrate as nobody against a socket in a root-only directory.
    std::fs::set_permissions(bed.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_qmigrate"),
        ])
        .args(["migrate", "--from", s(&src), "--launch-dst"])
        .output()
        .await
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: permission denied", src.display())),
        "{stderr}"
    );
    assert_eq!(run_state(&src).await, "running");
}

#[tokio::test]
async fn destination_not_waiting_for_a_migration() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let other = bed.source("other", "idle").await;
    let run = qmigrate(&["migrate", "--from", s(&src), "--to", s(&other)], LIMIT).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr
            .contains("is not waiting for a migration (state: running)"),
        "{run:?}"
    );
    assert!(run.stderr.contains(s(&other)), "{run:?}");
    assert_eq!(run_state(&src).await, "running");
    assert_eq!(run_state(&other).await, "running");
}

#[tokio::test]
async fn source_not_running() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let dst = bed.destination("dst").await;
    qmp(&src).await.execute(&qapi::qmp::stop {}).await.unwrap();
    let run = qmigrate(&["migrate", "--from", s(&src), "--to", s(&dst)], LIMIT).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "source {} is not running (state: paused)",
            src.display()
        )),
        "{run:?}"
    );
    assert_eq!(run_state(&src).await, "paused", "left as the user had it");
    assert_eq!(run_state(&dst).await, "inmigrate");
}

#[tokio::test]
async fn qmp_error_reply_names_the_command_and_loses_nothing() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let dst = bed.destination("dst").await;
    let caps = |path: std::path::PathBuf| async move {
        let mut c: Vec<(String, bool)> = qmp(&path)
            .await
            .execute(&qmigrate::qmp::types::QueryMigrateCapabilities {})
            .await
            .expect("query-migrate-capabilities")
            .into_iter()
            .map(|c| (c.capability, c.state))
            .collect();
        c.sort();
        c
    };
    let caps_before = caps(src.clone()).await;
    let run = qmigrate(
        &[
            "migrate",
            "--from",
            s(&src),
            "--to",
            s(&dst),
            "--uri",
            "unix:/nonexistent/dir/stream.sock",
            "--dirty-rate-sample",
            "0",
        ],
        LIMIT,
    )
    .await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("cannot set the migration up on {}", dst.display())),
        "{run:?}"
    );
    assert!(run.stderr.contains("`migrate-incoming` failed"), "{run:?}");
    assert_eq!(run_state(&src).await, "running");
    // The capabilities the refused set-up had changed on the source are back as they were.
    assert_eq!(caps(src.clone()).await, caps_before);
}

#[tokio::test]
async fn invalid_arguments() {
    let cases: [(&[&str], &str); 9] = [
        (
            &["--uri", "exec:cat > /tmp/x"],
            "exec: URIs are refused: QEMU would run a shell command",
        ),
        (&["--uri", "tcp:host"], "a TCP URI is tcp:HOST:PORT"),
        (
            &["--dst-qmp", "/tmp/x.qmp"],
            "cannot be used with '--dst-qmp",
        ),
        (
            &["--recover-for", "ever"],
            "--recover-for \"ever\": not a duration",
        ),
        (&["--verify", "soon"], "--verify \"soon\": not a duration"),
        (&["--bandwidth", "fast"], "--bandwidth \"fast\": not a rate"),
        (
            &["--max-downtime", "100ms"],
            "--max-downtime \"100ms\": is below --downtime 300ms",
        ),
        (&["--timeout", "soon"], "--timeout \"soon\": not a duration"),
        (
            &["--auto-converge", "maybe"],
            "invalid value 'maybe' for '--auto-converge",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec![
            "migrate",
            "--from",
            "/nonexistent/a.qmp",
            "--to",
            "/nonexistent/b.qmp",
        ];
        args.extend_from_slice(extra);
        let run = qmigrate(&args, LIMIT).await;
        assert_eq!(run.code, 2, "{extra:?}: {run:?}");
        assert!(run.stderr.contains(message), "{extra:?}: {run:?}");
    }
}

/// `demo` refuses bad arguments with exit 2 before starting any guest.
#[tokio::test]
async fn demo_refuses_bad_arguments() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--workload", "dirty:lots"],
            "--workload \"dirty:lots\": not a workload",
        ),
        (&["--bandwidth", "0MiB/s"], "--bandwidth"),
        (&["--memory-mib", "1"], "--memory-mib 1"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["demo", "--guest-dir", "/nonexistent"];
        args.extend_from_slice(extra);
        let run = qmigrate(&args, LIMIT).await;
        assert_eq!(run.code, 2, "{extra:?}: {run:?}");
        assert!(run.stderr.contains(message), "{extra:?}: {run:?}");
        assert!(!run.stderr.contains("starting the source guest"), "{run:?}");
    }
}

/// `recover` and `cancel` on a VM with no migration to take over: exit 4, saying so, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_and_cancel_without_a_migration() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let dst = bed.destination("dst").await;
    for (cmd, what) in [
        ("recover", "no migration to recover"),
        ("cancel", "no migration to cancel"),
    ] {
        let run = qmigrate(&[cmd, "--from", s(&src), "--to", s(&dst)], LIMIT).await;
        assert_eq!(run.code, 4, "{cmd}: {run:?}");
        assert!(run.stderr.contains(what), "{cmd}: {run:?}");
    }
    assert_eq!(run_state(&src).await, "running");
    assert_eq!(run_state(&dst).await, "inmigrate");
}

/// The documented install commands for completions and man pages work from the binary.
#[tokio::test]
async fn completions_and_man_pages_come_from_the_binary() {
    for shell in ["bash", "zsh", "fish"] {
        let run = qmigrate(&["completions", shell], LIMIT).await;
        assert_eq!(run.code, 0, "{run:?}");
        for sub in ["migrate", "inventory", "serve", "recover"] {
            assert!(run.stdout.contains(sub), "{shell}: no {sub}");
        }
    }
    let run = qmigrate(&["completions", "tcsh"], LIMIT).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("tcsh"), "{run:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let run = qmigrate(&["man", "--out", out.to_str().unwrap()], LIMIT).await;
    assert_eq!(run.code, 0, "{run:?}");
    for page in [
        "qmigrate.1",
        "qmigrate-migrate.1",
        "qmigrate-inventory-check.1",
    ] {
        let text =
            std::fs::read_to_string(out.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text:.200}"
        );
    }
    let migrate = std::fs::read_to_string(out.join("qmigrate-migrate.1")).unwrap();
    assert!(
        migrate.contains("to\\-host") && migrate.contains("inventory"),
        "{migrate:.400}"
    );
}

/// `qmigrate inventory traffic`: a bad window or a missing inventory is refused, naming it, before any host is
/// touched.
#[tokio::test]
async fn inventory_traffic_refuses_bad_settings() {
    let bed = Bed::new();
    let missing = bed.path("missing.toml");
    let cases: &[(&[&str], &str)] = &[
        (&["--window", "soon"], "--window \"soon\": not a duration"),
        (
            &["--window", "0s"],
            "--window must be more than zero and at most 1h (found 0s)",
        ),
        (
            &["--window", "2h"],
            "--window must be more than zero and at most 1h (found 2h)",
        ),
        (&[], "missing.toml"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["inventory", "traffic", s(&missing)];
        args.extend(*extra);
        let run = qmigrate(&args, LIMIT).await;
        assert_eq!(run.code, 2, "{extra:?}: {run:?}");
        assert!(run.stderr.contains(message), "{extra:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{extra:?}: {run:?}");
    }
}

/// `qmigrate balance`: bad settings are refused before anything is sampled, naming the flag and the value; an
/// inventory whose hosts cannot be reached is an endpoint error naming them.
#[tokio::test]
async fn balance_refuses_bad_settings() {
    let bed = Bed::new();
    let inv = bed.path("inventory.toml");
    std::fs::write(
        &inv,
        "[hosts.far]\ntransport = \"local\"\nqmp = \"/nonexistent-qmigrate-dir/*.qmp\"\nruntime_dir = \"/nonexistent-qmigrate-dir\"\nmigration_address = \"127.0.0.1\"\n",
    )
    .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--policy", "roundrobin"],
            "unknown policy \"roundrobin\" (expected band, idc or sandpiper)",
        ),
        (
            &["--policy", "band", "--every", "soon"],
            "--every \"soon\": not a duration",
        ),
        (
            &["--policy", "band", "--every", "0s"],
            "--every must be more than zero",
        ),
        (
            &["--policy", "band", "--samples", "0"],
            "--samples and --window must be at least 1",
        ),
        (
            &["--policy", "idc", "--min-gain=-3"],
            "--min-gain must be a number of points, 0 or more (found -3)",
        ),
        (
            &["--policy", "idc", "--cpu-threshold=-1"],
            "--cpu-threshold must be 0 or more (found -1)",
        ),
        (
            &["--policy", "idc", "--balloon-step", "12KiB"],
            "--balloon-step must be at least 1MiB (found 12KiB)",
        ),
        (
            &["--policy", "idc", "--vm-cool-down", "a while"],
            "--vm-cool-down \"a while\": not a duration",
        ),
        (
            &["--policy", "sandpiper", "--max-out", "0"],
            "--max-out and --max-in must be at least 1",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec!["balance", "--inventory", s(&inv)];
        args.extend(*extra);
        if !extra.contains(&"--every") {
            args.push("--once");
        }
        let run = qmigrate(&args, LIMIT).await;
        assert_eq!(run.code, 2, "{extra:?}: {run:?}");
        assert!(run.stderr.contains(message), "{extra:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{extra:?}: {run:?}");
    }
    let missing = bed.path("missing.toml");
    let run = qmigrate(
        &[
            "balance",
            "--inventory",
            s(&missing),
            "--policy",
            "band",
            "--once",
        ],
        LIMIT,
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains(s(&missing)), "{run:?}");
    // The one host has no VM at all: nothing to decide on, said as such.
    let run = qmigrate(
        &[
            "balance",
            "--inventory",
            s(&inv),
            "--policy",
            "band",
            "--once",
            "--traffic-window",
            "0s",
            "--journal",
            s(&bed.path("j.jsonl")),
        ],
        LIMIT,
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("could be sampled"), "{run:?}");
}
