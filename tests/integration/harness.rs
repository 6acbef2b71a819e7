//! Test harness: real QEMU guests from the project's image, the qmigrate binary as a child process, and
//! clean-up by pid on drop, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use qmigrate::qmp::types::QueryStatus;
use qmigrate::qmp::{ConnectOptions, Qmp};
use qmigrate::testbed::{Guest, GuestSpec};
use serde_json::Value;

pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("QMIGRATE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initrd.img").exists(),
        "no guest image in {}: run scripts/build-guest first",
        dir.display()
    );
    dir
}

/// Records the pids of processes the tests start, so `.ci/run` can end any a killed test run left behind.
fn pid_file(pid: i32) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-pids");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(pid.to_string())
}

/// One test's world: a scratch directory and the guests started in it.
pub struct Bed {
    pub dir: tempfile::TempDir,
    guests: Vec<Guest>,
    pids: Vec<PidGuard>,
}

impl Bed {
    pub fn new() -> Bed {
        Bed {
            dir: tempfile::Builder::new()
                .prefix("qm")
                .tempdir_in("/tmp")
                .expect("tempdir"),
            guests: Vec::new(),
            pids: Vec::new(),
        }
    }

    fn spec(&self, name: &str, workload: &str) -> GuestSpec {
        let mut spec = GuestSpec::new(name, workload, &guest_dir(), self.dir.path());
        if let Some(q) = std::env::var_os("QMIGRATE_QEMU") {
            spec.qemu = q.into();
        }
        spec
    }

    /// Starts a guest running `workload` and waits until the workload is ready. Returns its QMP socket.
    pub async fn source(&mut self, name: &str, workload: &str) -> PathBuf {
        let mut g = Guest::launch(self.spec(name, workload))
            .await
            .expect("start the source guest");
        let _ = std::fs::write(pid_file(g.pid()), "");
        g.wait_ready(Duration::from_secs(60))
            .await
            .expect("guest ready");
        let qmp = g.qmp_path();
        self.guests.push(g);
        qmp
    }

    /// Starts a destination QEMU with the same configuration, waiting with `-incoming defer`.
    pub async fn destination(&mut self, name: &str) -> PathBuf {
        let mut spec = self.spec(name, "idle");
        spec.incoming = true;
        let g = Guest::launch(spec).await.expect("start the destination");
        let _ = std::fs::write(pid_file(g.pid()), "");
        let qmp = g.qmp_path();
        self.guests.push(g);
        qmp
    }

    pub fn pid_of(&self, qmp: &Path) -> i32 {
        self.guests
            .iter()
            .find(|g| g.qmp_path() == qmp)
            .expect("a guest of this bed")
            .pid()
    }

    /// Kills one guest's QEMU now (SIGKILL).
    pub fn kill(&mut self, qmp: &Path) {
        let pid = self.pid_of(qmp);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // SIGKILL returns before the process is gone; wait until its socket refuses, so the test sees a dead VM
        // and not one that is still closing (a connection reset instead of a refusal).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let refused = || {
            matches!(std::os::unix::net::UnixStream::connect(qmp),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound))
        };
        while !refused() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} still accepts 10 s after SIGKILL",
                qmp.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes sure a process started by qmigrate (a launched destination) ends with this test.
    pub fn adopt(&mut self, pid: i32) {
        let _ = std::fs::write(pid_file(pid), "");
        self.pids.push(PidGuard(pid));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::env::var_os("QMIGRATE_KEEP_TESTDIR").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
        }
        for g in &self.guests {
            let _ = std::fs::remove_file(pid_file(g.pid()));
        }
        self.guests.clear();
    }
}

pub struct PidGuard(pub i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_file(pid_file(self.0));
    }
}

pub async fn qmp(path: &Path) -> Qmp {
    Qmp::connect_unix(path, &ConnectOptions::default())
        .await
        .expect("connect to QMP")
}

pub async fn run_state(path: &Path) -> String {
    qmp(path)
        .await
        .execute(&QueryStatus {})
        .await
        .expect("query-status")
        .status
}

/// A qmigrate child whose stderr is read as it comes (QEMU serves one QMP client at a time, so a test cannot
/// watch the source while qmigrate holds its socket; it watches qmigrate's log instead).
pub struct Running {
    pub child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
}

/// Starts `qmigrate -v ARGS…` and returns once its log contains `needle`.
pub async fn spawn_until<S: AsRef<str>>(args: &[S], needle: &str, timeout: Duration) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut all = vec!["-v"];
    all.extend(args.iter().map(AsRef::as_ref));
    let mut child = qmigrate_cmd(&all).spawn().expect("run qmigrate");
    let stderr = child.stderr.take().expect("stderr");
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let wanted = needle.to_string();
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut text = String::new();
        let mut seen = Some(seen_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&wanted) {
                if let Some(tx) = seen.take() {
                    let _ = tx.send(());
                }
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let found = tokio::time::timeout(timeout, seen_rx).await;
    assert!(
        matches!(found, Ok(Ok(()))),
        "qmigrate never logged {needle:?} within {timeout:?}"
    );
    Running {
        child,
        stderr: reader,
    }
}

impl Running {
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal qmigrate");
    }

    pub async fn finish(mut self, limit: Duration) -> Run {
        use tokio::io::AsyncReadExt;
        let mut stdout = String::new();
        let mut out = self.child.stdout.take().expect("stdout");
        let status = tokio::time::timeout(limit, async {
            let _ = out.read_to_string(&mut stdout).await;
            self.child.wait().await
        })
        .await
        .expect("qmigrate did not finish in time")
        .expect("qmigrate status");
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr: self.stderr.await.unwrap_or_default(),
        }
    }
}

/// The result of running the qmigrate binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn qmigrate_cmd<S: AsRef<str>>(args: &[S]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_qmigrate"));
    // Every run remembers into a file of its own unless the test names one: what one test's guest taught must not
    // change another's forecast (every test's source is called "src").
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    c.env(
        "QMIGRATE_CALIBRATION",
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("calibration")
            .join(format!("{}-{n}.json", std::process::id())),
    );
    c.args(args.iter().map(AsRef::as_ref))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs qmigrate to the end, bounded by `limit`.
pub async fn qmigrate<S: AsRef<str>>(args: &[S], limit: Duration) -> Run {
    let child = qmigrate_cmd(args).spawn().expect("run qmigrate");
    finish(child, limit).await
}

pub async fn finish(child: tokio::process::Child, limit: Duration) -> Run {
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("qmigrate did not finish in time")
        .expect("qmigrate output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `migrate --from SRC --to DST --json` followed by `extra`, a space-separated list of flags.
pub fn migrate_args(src: &Path, dst: &Path, extra: &str) -> Vec<String> {
    let mut args: Vec<String> = ["migrate", "--from", s(src), "--to", s(dst), "--json"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(extra.split_whitespace().map(String::from));
    args
}

impl Bed {
    /// Starts a guest like [`Bed::source`], letting the test adjust its spec first (a disk, a NIC, memory).
    pub async fn source_with(
        &mut self,
        name: &str,
        workload: &str,
        adjust: impl FnOnce(&mut GuestSpec),
    ) -> PathBuf {
        let mut spec = self.spec(name, workload);
        adjust(&mut spec);
        let mut g = Guest::launch(spec).await.expect("start the guest");
        let _ = std::fs::write(pid_file(g.pid()), "");
        g.wait_ready(Duration::from_secs(60))
            .await
            .expect("guest ready");
        let qmp = g.qmp_path();
        self.guests.push(g);
        qmp
    }
}

/// A host tap device with an address, for a guest's NIC; deleted on drop. Needs root (CAP_NET_ADMIN).
pub struct Tap {
    pub name: String,
    /// The host's address on the tap; the guest takes `.2` of the same /24.
    pub host_ip: String,
    pub guest_ip: String,
}

impl Tap {
    /// `subnet` picks 10.77.SUBNET.0/24, so that two taps of one test run never share a network.
    pub fn new(subnet: u8) -> Tap {
        let name = format!("qm{}t{subnet}", std::process::id() % 100_000);
        let tap = Tap {
            name,
            host_ip: format!("10.77.{subnet}.1"),
            guest_ip: format!("10.77.{subnet}.2"),
        };
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("run ip");
            assert!(st.success(), "ip {args:?} failed (root needed)");
        };
        ip(&["tuntap", "add", "dev", &tap.name, "mode", "tap"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", tap.host_ip),
            "dev",
            &tap.name,
        ]);
        ip(&["link", "set", &tap.name, "up"]);
        tap
    }

    /// QEMU arguments for a virtio NIC on this tap, and the guest's kernel parameter.
    pub fn guest_args(&self) -> (Vec<String>, String) {
        (
            vec![
                "-netdev".into(),
                format!(
                    "tap,id=hostnet0,ifname={},script=no,downscript=no",
                    self.name
                ),
                "-device".into(),
                "virtio-net-pci,netdev=hostnet0,id=net0".into(),
            ],
            format!("qm_ip={}/24", self.guest_ip),
        )
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &self.name, "mode", "tap"])
            .status();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// Scrapes `http://127.0.0.1:PORT/metrics` with a real HTTP client (ureq, off the async threads) and parses the
/// text as Prometheus exposition format. Returns the text too, for assertion messages.
pub async fn scrape(port: u16) -> Result<(String, prometheus_parse::Scrape), String> {
    let text = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        agent
            .get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .map_err(|e| e.to_string())?
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("not Prometheus text ({e}):\n{text}"))?;
    Ok((text, parsed))
}

/// The value of `metric` for the sample whose labels include every `(name, value)` of `labels`.
pub fn metric_value(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

impl Bed {
    /// Starts a destination like [`Bed::destination`], letting the test adjust its spec first.
    pub async fn destination_with(
        &mut self,
        name: &str,
        adjust: impl FnOnce(&mut GuestSpec),
    ) -> PathBuf {
        let mut spec = self.spec(name, "idle");
        spec.incoming = true;
        adjust(&mut spec);
        let g = Guest::launch(spec).await.expect("start the destination");
        let _ = std::fs::write(pid_file(g.pid()), "");
        let qmp = g.qmp_path();
        self.guests.push(g);
        qmp
    }
}

/// Adds a second QMP monitor at `QMP.mon2` to a spec, for an independent client while qmigrate holds the first
/// (QEMU serves one client per socket). Returns its path.
pub fn second_monitor(spec: &mut GuestSpec) -> PathBuf {
    let path = PathBuf::from(format!("{}.mon2", spec.qmp_path().display()));
    spec.extra_args.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]);
    path
}

/// The run state through `path`, or `gone` when nothing answers there (the QEMU exited).
pub async fn run_state_or_gone(path: &Path) -> String {
    match Qmp::connect_unix(path, &ConnectOptions::default()).await {
        Ok(q) => q
            .execute(&QueryStatus {})
            .await
            .map(|s| s.status)
            .unwrap_or_else(|_| "gone".into()),
        Err(_) => "gone".into(),
    }
}

/// Runs one command on a QMP socket with a connection of its own, returning the reply's `return` value.
pub async fn qmp_raw(path: &Path, command: &str) -> Value {
    qmp(path)
        .await
        .execute_raw(command, None, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{command} on {}: {e}", path.display()))
}

/// `query-migrate`'s status on a QEMU, through its socket (a second monitor while qmigrate holds the first).
pub async fn migration_status(path: &Path) -> String {
    qmp_raw(path, "query-migrate").await["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Polls `query-migrate` on `path` until its status is `want`, or panics after `limit`.
pub async fn wait_migration_status(path: &Path, want: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = migration_status(path).await;
        if s == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never reached migration status {want} (last {s})",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resets every TCP connection to or from `port` on 127.0.0.1 (`ss -K`): a cut migration stream. Returns how many
/// were reset.
pub fn cut_tcp(port: u16) -> usize {
    let mut n = 0;
    for side in ["dport", "sport"] {
        let out = std::process::Command::new("ss")
            .args(["-K", "-t", "-n", side, "=", &format!(":{port}")])
            .output()
            .expect("run ss");
        n += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("ESTAB") || l.contains(&format!(":{port}")))
            .count();
    }
    n
}

/// A QMP proxy between qmigrate and a QEMU that, once told to, drops every reply to `query-migrate`: a monitor
/// that stalls. Ends (closing both sides) when dropped.
pub struct DroppingProxy {
    pub path: PathBuf,
    pub drop_replies: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl DroppingProxy {
    pub async fn start(upstream: &Path, path: PathBuf) -> DroppingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy");
        let drop_replies = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = drop_replies.clone();
        let upstream = upstream.to_path_buf();
        let task = tokio::spawn(async move {
            // One client at a time, like QEMU.
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::UnixStream::connect(&upstream).await else {
                    return;
                };
                let (cr, mut cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                let ids =
                    std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
                let ids_up = ids.clone();
                let up = tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(cr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Ok(v) = serde_json::from_str::<Value>(&line) {
                            if v["execute"] == "query-migrate" {
                                ids_up.lock().unwrap().insert(v["id"].to_string());
                            }
                        }
                        if sw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
                let flag = flag.clone();
                let mut lines = tokio::io::BufReader::new(sr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let dropped = flag.load(Ordering::SeqCst)
                        && serde_json::from_str::<Value>(&line)
                            .is_ok_and(|v| ids.lock().unwrap().contains(&v["id"].to_string()));
                    if !dropped && cw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
                up.abort();
            }
        });
        DroppingProxy {
            path,
            drop_replies,
            task,
        }
    }
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
