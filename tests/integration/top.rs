//! `qmigrate top` as a person sees it: in a real terminal (tmux), on a real guest, sorted by a key, quit with q.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{qmigrate, s, second_monitor, Bed};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ends the tmux session with the test, also when it fails.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn wait_for_screen(session: &str, what: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.contains(what) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "{what:?} never appeared; screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_guests_sorts_and_quits_in_a_real_terminal() {
    let mut bed = Bed::new();
    // Second monitors (busy.qmp.mon2): bare sockets whose file names are not the VMs' -names, which name the rows.
    let (mut busy, mut idle) = (None, None);
    bed.source_with("busy", "dirty:32", |spec| busy = Some(second_monitor(spec)))
        .await;
    bed.source_with("calm", "idle", |spec| idle = Some(second_monitor(spec)))
        .await;
    let (busy, idle) = (busy.unwrap(), idle.unwrap());
    let missing = bed.path("missing.qmp");
    let session = Session(format!("qmtop{}", std::process::id()));
    let done = bed.path("top.exit");
    let cmd = format!(
        "{} top --interval 1s {} {} {}; echo $? > {}; sleep 30",
        env!("CARGO_BIN_EXE_qmigrate"),
        s(&busy),
        s(&idle),
        s(&missing),
        s(&done)
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "170",
        "-y",
        "30",
        &cmd,
    ]);
    let screen = tokio::task::spawn_blocking({
        let name = session.0.clone();
        move || wait_for_screen(&name, "2 of 3 VMs answered", Duration::from_secs(30))
    })
    .await
    .unwrap();
    // Rows by name: the -name of each live guest, the file name of the missing socket.
    let row = |name: &str| {
        screen
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row:\n{screen}"))
    };
    assert!(row("busy").contains("dirty-memory"), "{screen}");
    assert!(row("calm").contains("idle"), "{screen}");
    assert!(row("missing").contains("error"), "{screen}");
    assert!(!screen.contains(".mon2"), "{screen}");
    assert!(screen.contains("no such file"), "{screen}");

    // Sort by dirty rate, then reversed: the idle guest comes first.
    tmux(&["send-keys", "-t", &session.0, "d"]);
    tmux(&["send-keys", "-t", &session.0, "r"]);
    let screen = tokio::task::spawn_blocking({
        let name = session.0.clone();
        move || wait_for_screen(&name, "DIRTY▲", Duration::from_secs(10))
    })
    .await
    .unwrap();
    let pos = |name: &str| {
        screen
            .lines()
            .position(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row:\n{screen}"))
    };
    assert!(pos("calm") < pos("busy"), "{screen}");

    tmux(&["send-keys", "-t", &session.0, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done.exists() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_to_string(&done).unwrap().trim(), "0");
}

#[tokio::test]
async fn top_without_a_terminal_says_so() {
    let run = qmigrate(&["top", "/nonexistent.qmp"], Duration::from_secs(20)).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("terminal"), "{run:?}");
}
