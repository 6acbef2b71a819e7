//! Fault suite, a benchmark rather than a test: N migrations of real dirtying guests, each with one fault injected
//! at a seeded random moment, each followed by a check of both ends that does not trust qmigrate's own report.
//!
//! ```sh
//! scripts/fault-suite 200 --seed 7      # builds what it needs, runs this example, writes docs/benchmarks.md
//! cargo run --release --example fault_suite -- 12 --seed 1 --kinds stream-cut,dst-stop --no-doc
//! ```
//!
//! The library is used only to start guests ([`qmigrate::testbed`]); every migration runs the qmigrate *binary* as
//! a child process, and the check talks raw QMP (a few lines below, not qmigrate's client) to a second monitor
//! each QEMU gets (`-qmp unix:PATH.mon2`), because QEMU serves one client per socket and qmigrate holds the first.
//! The guest boots with `ticks=100`: a counter in guest memory printed as `tick N` on each QEMU's serial log,
//! so a guest that ran twice from one state (a rollback, a duplicate) shows as a value seen twice.
//!
//! Faults: `dst-kill` (SIGKILL the destination; precopy only: once postcopy starts the destination holds the
//! only current memory and its death loses the guest by QEMU's design), `dst-stop` (SIGSTOP it 1–20 s),
//! `stream-cut` (`ss -K` every TCP connection of either QEMU, again and again for 1–20 s), `qmigrate-kill`
//! (SIGKILL qmigrate, then run `migrate --adopt`, or `recover` when the source is postcopy-paused),
//! `dst-reset` (`system_reset` on the destination right after switch-over; both QEMUs get `-action reboot=reset`,
//! since guest.args' `-no-reboot` would turn the reset into QEMU exiting), `src-qmp-drop` (a proxy between
//! qmigrate and the source's QMP socket drops its connections), and `none` (a baseline, only when asked for).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qmigrate::testbed::{Guest, GuestSpec};
use serde_json::{json, Value};

/// Set by SIGINT/SIGTERM: the current injection ends early (its guards clean up) and no table is written.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    DstKill,
    DstStop,
    StreamCut,
    QmigrateKill,
    DstReset,
    SrcQmpDrop,
    None,
}

const ALL_KINDS: [Kind; 6] = [
    Kind::DstKill,
    Kind::DstStop,
    Kind::StreamCut,
    Kind::QmigrateKill,
    Kind::DstReset,
    Kind::SrcQmpDrop,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::DstKill => "dst-kill",
            Kind::DstStop => "dst-stop",
            Kind::StreamCut => "stream-cut",
            Kind::QmigrateKill => "qmigrate-kill",
            Kind::DstReset => "dst-reset",
            Kind::SrcQmpDrop => "src-qmp-drop",
            Kind::None => "none",
        }
    }

    fn parse(s: &str) -> Result<Kind, String> {
        ALL_KINDS
            .iter()
            .chain([Kind::None].iter())
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown fault kind {s:?}"))
    }

    /// After postcopy starts, the destination's death loses the guest by QEMU's design: not a fault to inject.
    fn allowed_in(self, mode: Mode) -> bool {
        !(self == Kind::DstKill && mode == Mode::Postcopy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Precopy,
    Postcopy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Mode::Precopy => "never",
            Mode::Postcopy => "always",
        }
    }
}

struct Options {
    n: usize,
    seed: u64,
    kinds: Vec<Kind>,
    modes: Vec<Mode>,
    qmigrate: PathBuf,
    qemu: PathBuf,
    guest_dir: PathBuf,
    /// The guest's workload per mode: postcopy needs more dirty memory at the switch for its phase to last long
    /// enough to be hit; precopy needs less to converge in seconds.
    workload: [String; 2],
    memory_mib: u32,
    bandwidth: String,
    /// Precopy faults land uniformly in [0, this] after qmigrate logs "migration started".
    precopy_window: Duration,
    /// Postcopy faults land uniformly in [0, this] after postcopy-active is seen.
    postcopy_window: Duration,
    /// Longest SIGSTOP / stream cut (the shortest is 1 s).
    max_outage: Duration,
    doc: Option<PathBuf>,
    /// Where the logs of anomalous injections are kept.
    logs: PathBuf,
    /// Keep the logs of every injection, not only of the anomalous ones.
    keep_all: bool,
    args_text: String,
}

impl Options {
    fn workload_for(&self, mode: Mode) -> &str {
        &self.workload[mode as usize]
    }
}

const USAGE: &str = "usage: fault_suite [N] [--seed S] [--kinds a,b,...] [--modes precopy,postcopy] \
[--qmigrate PATH] [--qemu PATH] [--guest-dir DIR] [--workload W] \
[--workload-precopy W] [--workload-postcopy W] [--memory-mib M] [--bandwidth R] \
[--precopy-window-ms MS] [--postcopy-window-ms MS] [--max-outage-s S] [--doc PATH | --no-doc] [--logs DIR] \
[--keep-all]
kinds: dst-kill, dst-stop, stream-cut, qmigrate-kill, dst-reset, src-qmp-drop (default: all), none (a baseline)";

fn parse_options() -> Result<Options, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Options {
        n: 12,
        seed: 1,
        kinds: ALL_KINDS.to_vec(),
        modes: vec![Mode::Precopy, Mode::Postcopy],
        qmigrate: root.join("target/release/qmigrate"),
        qemu: std::env::var_os("QMIGRATE_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/qemu-10/qemu-system-x86_64")),
        guest_dir: std::env::var_os("QMIGRATE_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/guest")),
        workload: ["dirty:64:64".into(), "dirty:128:128".into()],
        memory_mib: 256,
        bandwidth: "64MiB/s".into(),
        precopy_window: Duration::from_millis(3000),
        postcopy_window: Duration::from_millis(1200),
        max_outage: Duration::from_secs(20),
        doc: Some(root.join("docs/benchmarks.md")),
        logs: root.join("target/fault-suite"),
        keep_all: false,
        args_text: argv.join(" "),
    };
    let mut it = argv.into_iter();
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.ok_or(format!("{what} needs a value"))?
            .parse::<u64>()
            .map_err(|e| format!("{what}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => o.seed = num(it.next(), "--seed")?,
            "--kinds" => {
                o.kinds = it
                    .next()
                    .ok_or("--kinds needs a value")?
                    .split(',')
                    .map(Kind::parse)
                    .collect::<Result<_, _>>()?
            }
            "--modes" => {
                o.modes = it
                    .next()
                    .ok_or("--modes needs a value")?
                    .split(',')
                    .map(|m| match m {
                        "precopy" => Ok(Mode::Precopy),
                        "postcopy" => Ok(Mode::Postcopy),
                        _ => Err(format!("unknown mode {m:?}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--qmigrate" => o.qmigrate = it.next().ok_or("--qmigrate needs a path")?.into(),
            "--qemu" => o.qemu = it.next().ok_or("--qemu needs a path")?.into(),
            "--guest-dir" => o.guest_dir = it.next().ok_or("--guest-dir needs a path")?.into(),
            "--workload" => {
                let w = it.next().ok_or("--workload needs a value")?;
                o.workload = [w.clone(), w];
            }
            "--workload-precopy" => {
                o.workload[0] = it.next().ok_or("--workload-precopy needs a value")?
            }
            "--workload-postcopy" => {
                o.workload[1] = it.next().ok_or("--workload-postcopy needs a value")?
            }
            "--memory-mib" => o.memory_mib = num(it.next(), "--memory-mib")? as u32,
            "--bandwidth" => o.bandwidth = it.next().ok_or("--bandwidth needs a value")?,
            "--precopy-window-ms" => {
                o.precopy_window = Duration::from_millis(num(it.next(), "--precopy-window-ms")?)
            }
            "--postcopy-window-ms" => {
                o.postcopy_window = Duration::from_millis(num(it.next(), "--postcopy-window-ms")?)
            }
            "--max-outage-s" => {
                o.max_outage = Duration::from_secs(num(it.next(), "--max-outage-s")?.max(1))
            }
            "--doc" => o.doc = Some(it.next().ok_or("--doc needs a path")?.into()),
            "--no-doc" => o.doc = None,
            "--keep-all" => o.keep_all = true,
            "--logs" => o.logs = it.next().ok_or("--logs needs a path")?.into(),
            "-h" | "--help" => return Err(USAGE.into()),
            n if !n.starts_with('-') => o.n = n.parse().map_err(|e| format!("N: {e}"))?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.kinds.is_empty() || o.modes.is_empty() {
        return Err("no fault kinds or no modes".into());
    }
    if !o
        .kinds
        .iter()
        .any(|k| o.modes.iter().any(|m| k.allowed_in(*m)))
    {
        return Err("dst-kill is not injected in postcopy; add precopy or another kind".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------------------------
// A seeded RNG (xorshift64*, seeded through splitmix64): no dependency, the same plan for the same seed.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [lo, hi].
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.range(0, i as u64) as usize);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A raw QMP client, deliberately independent of qmigrate's: one line out, lines in until a return or an error.

struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl RawQmp {
    fn connect(path: &Path, timeout: Duration) -> Result<RawQmp, String> {
        let s =
            UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = RawQmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!(
                "{}: not a QMP greeting: {greeting}",
                path.display()
            ));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line ({e}): {line}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{command}: {e}"));
            }
            // An event: skip it.
        }
    }
}

/// `/proc/PID/stat`'s state letter; `None` when the process is gone. A zombie (`Z`) is gone too.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 1..].trim_start().chars().next()?;
    (state != 'Z' && state != 'X').then_some(state)
}

/// One QEMU's second monitor, reconnected after any error (a reply that timed out leaves the stream unusable).
struct Mon {
    path: PathBuf,
    pid: i32,
    conn: Option<RawQmp>,
}

impl Mon {
    fn new(path: PathBuf, pid: i32) -> Mon {
        Mon {
            path,
            pid,
            conn: None,
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        if self.conn.is_none() {
            self.conn = Some(RawQmp::connect(&self.path, Duration::from_secs(1))?);
        }
        let r = self
            .conn
            .as_mut()
            .expect("connected")
            .execute(command, arguments);
        if r.as_ref().is_err_and(|e| !e.starts_with(command)) {
            self.conn = None; // a transport error, not QEMU refusing the command
        }
        r
    }

    /// (run state, migration status): `gone` for a dead QEMU, `stopped` for a SIGSTOPped one (not asked, it
    /// would not answer), `unreachable` when it does not answer.
    fn observe(&mut self) -> (String, String) {
        match proc_state(self.pid) {
            None => {
                self.conn = None;
                return ("gone".into(), "gone".into());
            }
            Some('T') | Some('t') => return ("stopped".into(), "stopped".into()),
            Some(_) => {}
        }
        let run = match self.execute("query-status", None) {
            Ok(v) => v["status"].as_str().unwrap_or("?").to_string(),
            Err(_) => return ("unreachable".into(), "unreachable".into()),
        };
        let mig = match self.execute("query-migrate", None) {
            Ok(v) => v["status"].as_str().unwrap_or("none").to_string(),
            Err(_) => "unreachable".into(),
        };
        (run, mig)
    }
}

/// Migration statuses in which something is still happening (postcopy-paused waits for a recovery: not active).
fn mig_active(s: &str) -> bool {
    matches!(
        s,
        "setup"
            | "active"
            | "postcopy-active"
            | "postcopy-recover-setup"
            | "postcopy-recover"
            | "device"
            | "pre-switchover"
            | "cancelling"
            | "wait-unplug"
            | "colo"
    )
}

#[derive(Debug, Clone, Default)]
struct EndView {
    run: String,
    mig: String,
    seen_run: BTreeSet<String>,
    seen_mig: BTreeSet<String>,
}

/// Polls both second monitors every 25 ms and remembers every run state and migration status it saw, with a
/// timeline of the changes (and of the harness's own steps, through [`Watcher::note`]).
struct Watcher {
    t0: Instant,
    timeline: Arc<Mutex<Vec<String>>>,
    mons: [Arc<Mutex<Mon>>; 2],
    view: Arc<Mutex<[EndView; 2]>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    fn start(src: Mon, dst: Mon) -> Watcher {
        let mons = [Arc::new(Mutex::new(src)), Arc::new(Mutex::new(dst))];
        let view = Arc::new(Mutex::new([EndView::default(), EndView::default()]));
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let timeline: Arc<Mutex<Vec<String>>> = Arc::default();
        let thread = {
            let (mons, view, stop, tl) =
                (mons.clone(), view.clone(), stop.clone(), timeline.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for (i, m) in mons.iter().enumerate() {
                        let (run, mig) = m.lock().unwrap().observe();
                        let mut v = view.lock().unwrap();
                        if v[i].run != run || v[i].mig != mig {
                            tl.lock().unwrap().push(format!(
                                "{:8.3}s {} {run}/{mig}",
                                t0.elapsed().as_secs_f64(),
                                ["src", "dst"][i]
                            ));
                        }
                        v[i].seen_run.insert(run.clone());
                        v[i].seen_mig.insert(mig.clone());
                        v[i].run = run;
                        v[i].mig = mig;
                    }
                    thread::sleep(Duration::from_millis(25));
                }
            })
        };
        Watcher {
            t0,
            timeline,
            mons,
            view,
            stop,
            thread: Some(thread),
        }
    }

    fn view(&self) -> [EndView; 2] {
        self.view.lock().unwrap().clone()
    }

    fn note(&self, what: &str) {
        self.timeline.lock().unwrap().push(format!(
            "{:8.3}s -- {what}",
            self.t0.elapsed().as_secs_f64()
        ));
    }

    fn timeline(&self) -> String {
        self.timeline.lock().unwrap().join("\n") + "\n"
    }

    /// Waits until `cond` holds on the view, `deadline` passes or `give_up` says so. True when `cond` held.
    fn wait_for(
        &self,
        deadline: Instant,
        mut give_up: impl FnMut() -> bool,
        cond: impl Fn(&[EndView; 2]) -> bool,
    ) -> bool {
        loop {
            if cond(&self.view()) {
                return true;
            }
            if Instant::now() >= deadline || give_up() || interrupted() {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn execute(&self, end: usize, command: &str) -> Result<Value, String> {
        self.mons[end].lock().unwrap().execute(command, None)
    }

    /// Stops polling and drops both connections, so a fresh client can have the monitors.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for m in &self.mons {
            m.lock().unwrap().conn = None;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A UNIX-socket proxy between qmigrate and the source's QMP socket, so its connection can be dropped.

struct Proxy {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(path: &Path, upstream: &Path) -> std::io::Result<Proxy> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let accept = {
            let (stop, conns, upstream) = (stop.clone(), conns.clone(), upstream.to_path_buf());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(up) = UnixStream::connect(&upstream) else {
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        continue;
                    };
                    let pair = || -> std::io::Result<_> {
                        Ok((
                            client.try_clone()?,
                            client.try_clone()?,
                            up.try_clone()?,
                            up.try_clone()?,
                        ))
                    };
                    let Ok((c1, c2, u1, u2)) = pair() else {
                        continue;
                    };
                    conns.lock().unwrap().extend([client, up]);
                    for (mut from, to) in [(c1, u1), (u2, c2)] {
                        thread::spawn(move || {
                            let mut to_w = &to;
                            let _ = std::io::copy(&mut from, &mut to_w);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            })
        };
        Ok(Proxy {
            path: path.to_path_buf(),
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// Closes every proxied connection in both directions; the proxy keeps accepting new ones.
    fn drop_connections(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        for c in conns.iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let n = conns.len() / 2;
        conns.clear();
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        let _ = UnixStream::connect(&self.path); // wakes the accept loop
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Cutting the migration stream: reset every TCP connection either QEMU has, again and again until the deadline,
// so that a recovery attempt during the cut fails too, whatever port it uses.

/// (local, peer) addresses of every TCP socket the given processes hold.
fn qemu_tcp_sockets(pids: &[i32]) -> Vec<(String, String)> {
    let Ok(out) = Command::new("ss").args(["-tnpH"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| pids.iter().any(|p| l.contains(&format!("pid={p},"))))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.get(3)?.to_string(), cols.get(4)?.to_string()))
        })
        .collect()
}

/// Resets (`ss -K`) every TCP socket of the given processes, by its exact address pair, so nothing else on the
/// machine is touched; returns how many it reset.
fn cut_once(pids: &[i32]) -> usize {
    let mut n = 0;
    for (local, peer) in qemu_tcp_sockets(pids) {
        let out = Command::new("ss")
            .args(["-K", "-tnH", "src", &local, "dst", &peer])
            .output();
        if out.is_ok_and(|o| !o.stdout.is_empty()) {
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------------------------
// The qmigrate binary as a child: stderr read line by line as it comes (to see "migration started"), stdout kept
// for the JSON report, killed when dropped.

struct Qm {
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Option<JoinHandle<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    code: Option<i32>,
}

impl Qm {
    fn spawn(bin: &Path, args: &[String]) -> std::io::Result<Qm> {
        let mut child = Command::new(bin)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let mut out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = stderr.clone();
        let stderr_thread = thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Ok(Qm {
            child: Some(child),
            stderr,
            stdout: Some(stdout),
            stderr_thread: Some(stderr_thread),
            code: None,
        })
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn logged(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The exit code once it exited (a signal shows as minus its number).
    fn poll(&mut self) -> Option<i32> {
        if self.code.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    use std::os::unix::process::ExitStatusExt;
                    self.code = Some(st.code().unwrap_or_else(|| -st.signal().unwrap_or(0)));
                }
            }
        }
        self.code
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<i32> {
        loop {
            if let Some(c) = self.poll() {
                return Some(c);
            }
            if Instant::now() >= deadline || interrupted() {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
        self.poll();
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
        self.poll();
    }

    /// Ends it (kills it if still running) and returns (code, stdout, stderr); `None` if it had to be killed.
    fn finish(&mut self) -> (Option<i32>, String, String) {
        let was_running = self.poll().is_none();
        self.kill();
        let code = if was_running { None } else { self.code };
        let out = self
            .stdout
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let err = self.stderr.lock().unwrap().join("\n");
        (code, out, err)
    }
}

impl Drop for Qm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Serial logs: the guest's own counter.

/// A serial log read for the guest's counter.
struct SerialLog {
    /// Every complete `tick N` line, in order, split into lives: a new life starts at each `qmigrate-guest:
    /// booted` line (the guest rebooted, its counter starts again at 1). The text after the last newline is
    /// left out: a line the guest was printing when it stopped on one host ends on the other.
    lives: Vec<Vec<u64>>,
}

impl SerialLog {
    fn read(path: &Path) -> SerialLog {
        let text = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        let mut lives = vec![Vec::new()];
        for l in complete.lines().map(|l| l.trim_end_matches('\r')) {
            if l.starts_with("qmigrate-guest: booted") {
                lives.push(Vec::new());
            } else if let Some(n) = l.strip_prefix("tick ").and_then(|n| n.trim().parse().ok()) {
                lives.last_mut().expect("one life").push(n);
            }
        }
        SerialLog { lives }
    }

    /// The ticks of the guest that was migrated: on the source its first boot, on the destination what it
    /// printed before any reboot of its own.
    fn migrated_life(&self, source: bool) -> &[u64] {
        self.lives
            .get(usize::from(source))
            .map_or(&[], Vec::as_slice)
    }

    /// Reboots on this host (beyond the source's own first boot).
    fn reboots(&self, source: bool) -> usize {
        self.lives.len() - 1 - usize::from(source)
    }

    fn count(&self) -> usize {
        self.lives.iter().map(Vec::len).sum()
    }
}

#[derive(Debug, Default, Clone)]
struct Continuity {
    src: (usize, Option<u64>, Option<u64>),
    dst: (usize, Option<u64>, Option<u64>),
    /// A value printed twice (on both hosts, or twice on one), or a value lower than the one before it.
    went_back: Option<String>,
}

fn continuity(src: &[u64], dst: &[u64]) -> Continuity {
    let span = |t: &[u64]| (t.len(), t.iter().copied().min(), t.iter().copied().max());
    let mut went_back = None;
    for (name, t) in [("source", src), ("destination", dst)] {
        if let Some(w) = t.windows(2).find(|w| w[1] <= w[0]) {
            went_back = Some(format!("{name} printed {} after {}", w[1], w[0]));
        }
    }
    let s: BTreeSet<u64> = src.iter().copied().collect();
    let both: Vec<u64> = dst.iter().copied().filter(|v| s.contains(v)).collect();
    if let (Some(lo), Some(hi)) = (both.iter().min(), both.iter().max()) {
        went_back = Some(format!(
            "{} value(s) printed on both hosts ({lo}..{hi})",
            both.len()
        ));
    }
    Continuity {
        src: span(src),
        dst: span(dst),
        went_back,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One injection

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Completed,
    Recovered,
    Stayed,
    RolledBack,
    Paused,
    Lost,
    Duplicated,
    HarnessError,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Completed => "completed",
            Class::Recovered => "recovered",
            Class::Stayed => "stayed",
            Class::RolledBack => "rolled back",
            Class::Paused => "paused",
            Class::Lost => "LOST",
            Class::Duplicated => "DUPLICATED",
            Class::HarnessError => "harness error",
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    kind: Kind,
    mode: Mode,
    class: Class,
    /// The fault landed while the migration was still under way (for dst-reset: while qmigrate still ran).
    in_flight: bool,
    /// qmigrate did not exit within the deadline and was killed.
    hung: bool,
    /// The running copy's counter did not advance over 2.5 s.
    stuck: bool,
    /// qmigrate's exit status says something the independent check contradicts.
    disagrees: bool,
    line: String,
}

struct Ctx {
    opts: Options,
    rt: tokio::runtime::Runtime,
    recover_for: bool,
    adopt: bool,
}

struct Plan {
    index: usize,
    kind: Kind,
    mode: Mode,
    /// Delay after the trigger (migration started; postcopy-active; destination running after switch-over).
    delay: Duration,
    /// SIGSTOP or cut length.
    outage: Duration,
}

fn ends_text(v: &[EndView; 2]) -> String {
    format!(
        "src={}/{} dst={}/{}",
        v[0].run, v[0].mig, v[1].run, v[1].mig
    )
}

fn migrate_args(
    ctx: &Ctx,
    from: &Path,
    to: &Path,
    port: u16,
    mode: Mode,
    kind: Kind,
) -> Vec<String> {
    let o = &ctx.opts;
    let mut a: Vec<String> = [
        "-v",
        "migrate",
        "--from",
        &from.display().to_string(),
        "--to",
        &to.display().to_string(),
        "--uri",
        &format!("tcp:127.0.0.1:{port}"),
        "--bandwidth",
        &o.bandwidth,
        "--postcopy",
        mode.flag(),
        "--timeout",
        "60s",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if ctx.recover_for {
        a.extend(["--recover-for".into(), "30s".into()]);
    }
    // The issue's reproduction: a reset inside the verify window, while qmigrate still watches the destination.
    // Precopy only: qmigrate never verifies after postcopy.
    if kind == Kind::DstReset && mode == Mode::Precopy && ctx.recover_for {
        a.extend(["--verify".into(), "5s".into()]);
    }
    a
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(49152)
}

/// Counts recovery attempts in qmigrate's JSON report, whatever the field is called (`recover…`).
fn report_recoveries(report: &Value) -> Option<usize> {
    let obj = report.as_object()?;
    obj.iter()
        .filter(|(k, _)| k.contains("recover"))
        .find_map(|(_, v)| match v {
            Value::Array(a) => Some(a.len()),
            Value::Number(n) => n.as_u64().map(|n| n as usize),
            Value::Object(o) => o.get("attempts").and_then(|a| match a {
                Value::Array(a) => Some(a.len()),
                Value::Number(n) => n.as_u64().map(|n| n as usize),
                _ => None,
            }),
            _ => None,
        })
}

fn run_injection(ctx: &Ctx, plan: &Plan, total: usize) -> Record {
    let started = Instant::now();
    let o = &ctx.opts;
    let tag = format!(
        "[{}/{}] {} {}",
        plan.index + 1,
        total,
        plan.kind.name(),
        plan.mode.name()
    );
    let harness_error = |what: String| Record {
        kind: plan.kind,
        mode: plan.mode,
        class: Class::HarnessError,
        in_flight: false,
        hung: false,
        stuck: false,
        disagrees: false,
        line: format!("{tag}: harness error: {what}"),
    };
    let dir = match tempfile::Builder::new().prefix("qmfs").tempdir_in("/tmp") {
        Ok(d) => d,
        Err(e) => return harness_error(format!("tempdir: {e}")),
    };

    // Both QEMUs, each with a second monitor; killed when `src` and `dst` drop, also on a panic.
    let spec = |name: &str, incoming: bool| {
        let mut s = GuestSpec::new(name, o.workload_for(plan.mode), &o.guest_dir, dir.path());
        s.qemu = o.qemu.clone();
        s.memory_mib = o.memory_mib;
        s.kernel_extra = "ticks=100".into();
        s.extra_args = vec![
            "-qmp".into(),
            format!("unix:{}.mon2,server=on,wait=off", s.qmp_path().display()),
        ];
        s.incoming = incoming;
        if plan.kind == Kind::DstReset {
            // guest.args has -no-reboot, which turns a reset into a shutdown (QEMU exits): make it a reset.
            s.extra_args
                .extend(["-action".into(), "reboot=reset".into()]);
        }
        s
    };
    let (src_spec, dst_spec) = (spec("src", false), spec("dst", true));
    let launched = ctx.rt.block_on(async {
        let mut src = Guest::launch(src_spec)
            .await
            .map_err(|e| format!("source: {e}"))?;
        let dst = Guest::launch(dst_spec)
            .await
            .map_err(|e| format!("destination: {e}"))?;
        src.wait_ready(Duration::from_secs(90))
            .await
            .map_err(|e| format!("source: {e}"))?;
        Ok::<_, String>((src, dst))
    });
    let (src, dst) = match launched {
        Ok(g) => g,
        Err(e) => return harness_error(e),
    };
    let (src_pid, dst_pid) = (src.pid(), dst.pid());
    let mon2 = |g: &Guest| PathBuf::from(format!("{}.mon2", g.qmp_path().display()));
    let mut watcher = Watcher::start(Mon::new(mon2(&src), src_pid), Mon::new(mon2(&dst), dst_pid));
    let proxy = if plan.kind == Kind::SrcQmpDrop {
        match Proxy::start(&dir.path().join("src.proxy"), &src.qmp_path()) {
            Ok(p) => Some(p),
            Err(e) => return harness_error(format!("proxy: {e}")),
        }
    } else {
        None
    };
    let from = proxy
        .as_ref()
        .map_or_else(|| src.qmp_path(), |p| p.path.clone());
    let port = free_port();
    let args = migrate_args(ctx, &from, &dst.qmp_path(), port, plan.mode, plan.kind);
    let mut qm = match Qm::spawn(&o.qmigrate, &args) {
        Ok(q) => q,
        Err(e) => return harness_error(format!("run {}: {e}", o.qmigrate.display())),
    };

    // The trigger, then the delay.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // qmigrate's log line, or the source's own status (should the log's wording change).
        if qm.logged("migration started") || mig_active(&watcher.view()[0].mig) {
            break;
        }
        if qm.poll().is_some() || Instant::now() >= deadline || interrupted() {
            let (code, _, err) = qm.finish();
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            return harness_error(format!(
                "qmigrate never started the migration (exit {code:?}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let t_started = Instant::now();
    watcher.note("migration started");
    let triggered = match (plan.kind, plan.mode) {
        (Kind::DstReset, _) => watcher.wait_for(
            Instant::now() + Duration::from_secs(90),
            || qm.poll().is_some(),
            |v| v[1].run == "running" && !mig_active(&v[1].mig),
        ),
        (_, Mode::Postcopy) => watcher.wait_for(
            Instant::now() + Duration::from_secs(90),
            || qm.poll().is_some(),
            |v| v.iter().any(|e| e.mig == "postcopy-active"),
        ),
        (_, Mode::Precopy) => true,
    };
    let t_trigger = t_started.elapsed();
    watcher.note(&format!(
        "trigger {}; waiting {} ms",
        if triggered { "seen" } else { "NOT seen" },
        plan.delay.as_millis()
    ));
    let until = Instant::now() + plan.delay;
    while Instant::now() < until && !interrupted() {
        thread::sleep(Duration::from_millis(5));
    }
    let at_injection = watcher.view();
    let in_flight = if plan.kind == Kind::DstReset {
        triggered && qm.poll().is_none()
    } else {
        mig_active(&at_injection[0].mig) || at_injection[0].mig == "postcopy-paused"
    };

    // The fault.
    watcher.note(&format!("injecting {}", plan.kind.name()));
    let mut fault_note = String::new();
    let mut fault_thread: Option<JoinHandle<String>> = None;
    let mut exits: Vec<String> = Vec::new();
    match plan.kind {
        Kind::None => {}
        Kind::DstKill => {
            let _ = kill(Pid::from_raw(dst_pid), Signal::SIGKILL);
        }
        Kind::DstStop => {
            let outage = plan.outage;
            let _ = kill(Pid::from_raw(dst_pid), Signal::SIGSTOP);
            fault_thread = Some(thread::spawn(move || {
                let end = Instant::now() + outage;
                while Instant::now() < end && !interrupted() {
                    thread::sleep(Duration::from_millis(20));
                }
                let _ = kill(Pid::from_raw(dst_pid), Signal::SIGCONT);
                String::new()
            }));
        }
        Kind::StreamCut => {
            let outage = plan.outage;
            fault_thread = Some(thread::spawn(move || {
                let end = Instant::now() + outage;
                let mut resets = 0;
                while Instant::now() < end && !interrupted() {
                    resets += cut_once(&[src_pid, dst_pid]);
                    thread::sleep(Duration::from_millis(50));
                }
                format!("{resets} socket(s) reset")
            }));
        }
        Kind::QmigrateKill => {
            if let Some(pid) = qm.pid() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = qm.wait_until(Instant::now() + Duration::from_secs(5));
            let (code, out, err) = qm.finish();
            let _ = std::fs::write(dir.path().join("qmigrate-1.stdout"), out);
            let _ = std::fs::write(dir.path().join("qmigrate-1.stderr"), err);
            exits.push(code.map_or("?".into(), |c| c.to_string()));
            // What to rerun depends on where the source is now, as its second monitor says.
            thread::sleep(Duration::from_millis(200));
            let src_mig = watcher.view()[0].mig.clone();
            let rerun: Vec<String> = if src_mig == "postcopy-paused" {
                fault_note = "rerun: recover".into();
                [
                    "-v",
                    "recover",
                    "--from",
                    &from.display().to_string(),
                    "--to",
                    &dst.qmp_path().display().to_string(),
                    // TCP, so that a cut still running would reach the recovery too.
                    "--uri",
                    &format!("tcp:127.0.0.1:{}", free_port()),
                    "--json",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            } else {
                fault_note = format!("rerun: migrate --adopt (source {src_mig})");
                let mut a = migrate_args(ctx, &from, &dst.qmp_path(), port, plan.mode, plan.kind);
                a.push("--adopt".into());
                a
            };
            match Qm::spawn(&o.qmigrate, &rerun) {
                Ok(q) => qm = q,
                Err(e) => return harness_error(format!("rerun qmigrate: {e}")),
            }
        }
        Kind::DstReset => {
            if triggered {
                if let Err(e) = watcher.execute(1, "system_reset") {
                    fault_note = format!("system_reset: {e}");
                }
            } else {
                fault_note = "not injected: the destination never ran".into();
            }
        }
        Kind::SrcQmpDrop => {
            let n = proxy.as_ref().map_or(0, Proxy::drop_connections);
            fault_note = format!("{n} connection(s) dropped");
        }
    }

    // qmigrate's end, with a deadline; then the fault's own end (a SIGCONT, the end of the cut).
    let qm_deadline = Instant::now() + Duration::from_secs(150);
    let hung = qm.wait_until(qm_deadline).is_none() && !interrupted();
    let (code, out, err) = qm.finish();
    watcher.note(&format!("qmigrate ended: {code:?}"));
    exits.push(match (code, hung) {
        (Some(c), _) => c.to_string(),
        (None, true) => "hung".into(),
        (None, false) => "?".into(),
    });
    let _ = std::fs::write(dir.path().join("qmigrate.stdout"), &out);
    let _ = std::fs::write(dir.path().join("qmigrate.stderr"), &err);
    if let Some(t) = fault_thread.take() {
        let note = t.join().unwrap_or_default();
        if !note.is_empty() {
            fault_note = note;
        }
    }
    drop(proxy);
    watcher.note("fault over");

    // Let whatever QEMU still does settle (no qmigrate is watching now), then check both ends afresh.
    let _ = watcher.wait_for(
        Instant::now() + Duration::from_secs(20),
        || false,
        |v| !v.iter().any(|e| mig_active(&e.mig) || e.run == "stopped"),
    );
    let seen = watcher.view();
    watcher.stop();
    let _ = std::fs::write(dir.path().join("timeline.txt"), watcher.timeline());
    let mut fresh = [Mon::new(mon2(&src), src_pid), Mon::new(mon2(&dst), dst_pid)];
    let mut ends = [EndView::default(), EndView::default()];
    for (e, m) in ends.iter_mut().zip(fresh.iter_mut()) {
        (e.run, e.mig) = m.observe();
    }
    // A destination whose postcopy is paused says `running`, but its vCPUs wait for pages that do not come.
    let runs = |e: &EndView| {
        e.run == "running"
            && !matches!(
                e.mig.as_str(),
                "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover"
            )
    };
    let running = [runs(&ends[0]), runs(&ends[1])];
    let copies = running.iter().filter(|r| **r).count();
    let alive = [proc_state(src_pid).is_some(), proc_state(dst_pid).is_some()];

    // The guest's own continuity: no counter value twice, and the running copy's counter still advances.
    // (A guest that rebooted on that host gets time to boot and start ticking again.)
    let logs = [src.spec.serial_log(), dst.spec.serial_log()];
    let mut stuck = false;
    if copies == 1 {
        let end = usize::from(running[1]);
        let before = SerialLog::read(&logs[end]);
        let rebooting = plan.kind == Kind::DstReset || before.reboots(end == 0) > 0;
        let wait = if rebooting { 20_000 } else { 2500 };
        let deadline = Instant::now() + Duration::from_millis(wait);
        stuck = true;
        while stuck && Instant::now() < deadline && !interrupted() {
            thread::sleep(Duration::from_millis(250));
            stuck = SerialLog::read(&logs[end]).count() <= before.count();
        }
    }
    let serial = [SerialLog::read(&logs[0]), SerialLog::read(&logs[1])];
    let reboots = [serial[0].reboots(true), serial[1].reboots(false)];
    let cont = continuity(
        serial[0].migrated_life(true),
        serial[1].migrated_life(false),
    );
    let dst_ran = seen[1].seen_run.contains("running") || cont.dst.0 > 0;
    let paused_seen = seen.iter().any(|e| e.seen_mig.contains("postcopy-paused"));
    let report: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    let recoveries = report_recoveries(&report);

    let class = match copies {
        2 => Class::Duplicated,
        0 if alive[0] && alive[1] => Class::Paused,
        0 => Class::Lost,
        _ if cont.went_back.is_some() => Class::RolledBack,
        _ if running[0] && dst_ran => Class::RolledBack,
        _ if running[0] => Class::Stayed,
        _ if paused_seen || recoveries.unwrap_or(0) > 0 => Class::Recovered,
        _ => Class::Completed,
    };
    let last_exit: Option<i32> = exits.last().and_then(|e| e.parse().ok());
    let disagrees = match last_exit {
        Some(0) => running != [false, true],
        Some(5..=7) => running != [true, false],
        Some(9) => copies != 0,
        Some(8) => copies == 1,
        _ => false,
    };

    let span = |s: (usize, Option<u64>, Option<u64>)| match s {
        (0, _, _) => "-".to_string(),
        (n, Some(lo), Some(hi)) => format!("{lo}..{hi} ({n})"),
        _ => "?".into(),
    };
    let mut flags = Vec::new();
    if hung {
        flags.push("QMIGRATE HUNG".to_string());
    }
    if stuck {
        flags.push("COUNTER STUCK".into());
    }
    if disagrees {
        flags.push("REPORT != CHECK".into());
    }
    if let Some(w) = &cont.went_back {
        flags.push(format!("counter went back: {w}"));
    }
    for (name, n) in [("source", reboots[0]), ("destination", reboots[1])] {
        if n > 0 {
            flags.push(format!("guest rebooted {n}x on the {name}"));
        }
    }
    let line = format!(
        "{tag}: trigger {:.1}s +{}ms{} {} exit {} | {} at injection; now {} copies={copies} | ticks src {} dst {} | \
         {}{}{}{} | report: {} | {:.1}s",
        t_trigger.as_secs_f64(),
        plan.delay.as_millis(),
        if matches!(plan.kind, Kind::DstStop | Kind::StreamCut) {
            format!(" for {:.1}s", plan.outage.as_secs_f64())
        } else {
            String::new()
        },
        if in_flight { "in-flight" } else { "late" },
        exits.join("->"),
        ends_text(&at_injection),
        ends_text(&ends),
        span(cont.src),
        span(cont.dst),
        class.name(),
        match (paused_seen, recoveries) {
            (false, None) => String::new(),
            (p, r) => format!(
                " (postcopy-paused seen: {p}; report recoveries: {})",
                r.map_or("-".into(), |r| r.to_string())
            ),
        },
        if fault_note.is_empty() {
            String::new()
        } else {
            format!("; {fault_note}")
        },
        if flags.is_empty() {
            String::new()
        } else {
            format!("; {}", flags.join("; "))
        },
        match report.get("outcome") {
            Some(oc) => format!(
                "{} in {} ms, copies {}",
                oc.as_str().unwrap_or("?"),
                report["total_time_ms"],
                report["final_state"]["running_copies"]
            ),
            None => "none".into(),
        },
        started.elapsed().as_secs_f64(),
    );

    // Keep the logs of anything a reader would want to look at.
    let anomalous = o.keep_all
        || hung
        || stuck
        || disagrees
        || matches!(
            class,
            Class::RolledBack | Class::Paused | Class::Lost | Class::Duplicated
        );
    let mut line = line;
    if anomalous {
        let keep = o.logs.join(format!(
            "seed{}-{:03}-{}-{}",
            o.seed,
            plan.index + 1,
            plan.kind.name(),
            plan.mode.name()
        ));
        if copy_logs(dir.path(), &keep).is_ok() {
            let _ = std::fs::write(keep.join("summary.txt"), format!("{line}\n"));
            line.push_str(&format!("\n    logs kept in {}", keep.display()));
        }
    }
    drop(src);
    drop(dst);
    Record {
        kind: plan.kind,
        mode: plan.mode,
        class,
        in_flight,
        hung,
        stuck,
        disagrees,
        line,
    }
}

fn copy_logs(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The table

fn table(records: &[Record]) -> String {
    let mut rows: BTreeMap<(Kind, Mode), Vec<&Record>> = BTreeMap::new();
    for r in records {
        rows.entry((r.kind, r.mode)).or_default().push(r);
    }
    let mut t = String::from(
        "| fault | mode | injections | in flight | completed | recovered | stayed | rolled back | paused | \
         lost | duplicated | counter stuck | qmigrate hung | report ≠ check | harness errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let line = |name: &str, mode: &str, rs: &[&Record]| {
        let c = |cl: Class| rs.iter().filter(|r| r.class == cl).count();
        let f = |p: fn(&Record) -> bool| rs.iter().filter(|r| p(r)).count();
        let injected = rs.len() - c(Class::HarnessError);
        format!(
            "| {name} | {mode} | {injected} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            f(|r| r.in_flight),
            c(Class::Completed),
            c(Class::Recovered),
            c(Class::Stayed),
            c(Class::RolledBack),
            c(Class::Paused),
            c(Class::Lost),
            c(Class::Duplicated),
            f(|r| r.stuck),
            f(|r| r.hung),
            f(|r| r.disagrees),
            c(Class::HarnessError),
        )
    };
    for ((k, m), rs) in &rows {
        t.push_str(&line(k.name(), m.name(), rs));
    }
    let all: Vec<&Record> = records.iter().collect();
    t.push_str(&line("**all**", "", &all));
    t
}

fn doc_section(ctx: &Ctx, records: &[Record], wall: Duration, qemu_version: &str) -> String {
    let o = &ctx.opts;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut missing = Vec::new();
    if !ctx.recover_for {
        missing.push("`--recover-for` (not passed)");
    }
    if !ctx.adopt {
        missing.push("`--adopt` (the qmigrate-kill rerun fails as a usage error)");
    }
    format!(
        "## Fault suite\n\n\
Command: `scripts/fault-suite {}` (seed {}, {date}, {qemu_version}, TCG; qmigrate built from `{rev}`; {} \
injections in {:.0} min). Each injection: a fresh {} MiB guest ({}, with `ticks=100`) and a destination QEMU \
started with `-incoming defer`, both with a second QMP monitor; `qmigrate -v migrate --uri tcp:127.0.0.1:PORT \
--bandwidth {} --timeout 60s --postcopy never|always{}`, run as a child process; one fault at a seeded random \
moment: precopy faults 0–{} ms after qmigrate logs `migration started`, postcopy faults 0–{} ms after \
`postcopy-active` is seen, `dst-reset` 0–1000 ms after the destination runs with its incoming migration over.{}\n\n\
{}\n\
How each fault is made: `dst-kill` SIGKILLs the destination QEMU; `dst-stop` SIGSTOPs it for 1–{} s; \
`stream-cut` resets (`ss -K`) every TCP connection either QEMU has, every 50 ms for 1–{} s, so recovery \
attempts during the cut fail too; `qmigrate-kill` SIGKILLs qmigrate and reruns it (`migrate --adopt`, or \
`recover` when the source is postcopy-paused); `dst-reset` sends `system_reset` to the destination (both QEMUs get \
`-action reboot=reset` after guest.args' `-no-reboot`, so that the guest reboots there instead of QEMU \
exiting; the counter of a guest's later life is not compared with the migrated one's); `src-qmp-drop` closes, in both directions, \
the connection of a proxy that stands between qmigrate and the source's QMP socket (the proxy keeps \
accepting). `dst-kill` is not injected in postcopy: once postcopy starts, the destination holds the only \
current copy of part of the guest's memory, and its death loses the guest by QEMU's design.\n\n\
How each injection is judged, without qmigrate's report: after qmigrate exits and QEMU settles (no migration \
active, at most 20 s), `query-status` on each QEMU's second monitor over a fresh raw QMP connection (a dead \
QEMU counts as gone; a destination whose postcopy is paused reports `running` but waits for pages, and does not count as running). *completed*: the destination runs, the source does not; *recovered*: the same after \
`postcopy-paused` was seen on either end (or qmigrate's report lists recovery attempts); *stayed*: the source \
runs and the destination never ran the guest; *rolled back*: the source runs although the destination ran the \
guest, or the guest's counter went back (a `tick` value printed twice, on both serial logs or on one); \
*paused*: no copy runs but both QEMUs are alive (e.g. both postcopy-paused, qmigrate's exit 9; an operator can \
still recover); *lost*: no copy runs and a QEMU is gone; *duplicated*: both run. *in flight*: the fault landed \
while the source's migration was still active (for `dst-reset`: while qmigrate still ran); *counter stuck*: \
the running copy's counter did not advance over 2.5 s (20 s after a reset, for the reboot); *qmigrate hung*: no exit within 150 s of the fault \
(killed); *report ≠ check*: qmigrate's exit status (0, 5–7, 8, 9) contradicts the check; *harness errors*: \
the injection never happened (a guest did not boot, qmigrate never started the migration) and is not counted \
in *injections*. Logs of every anomalous injection are kept under `target/fault-suite/`.\n",
        o.args_text,
        o.seed,
        records
            .iter()
            .filter(|r| r.class != Class::HarnessError)
            .count(),
        wall.as_secs_f64() / 60.0,
        o.memory_mib,
        format_args!(
            "`workload={}` for precopy, `workload={}` for postcopy",
            o.workload[0], o.workload[1]
        ),
        o.bandwidth,
        if ctx.recover_for {
            " --recover-for 30s"
        } else {
            ""
        },
        o.precopy_window.as_millis(),
        o.postcopy_window.as_millis(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                " The qmigrate under test lacked {}.",
                missing.join(" and ")
            )
        },
        table(records),
        o.max_outage.as_secs(),
        o.max_outage.as_secs(),
    )
}

/// Replaces the `## Fault suite` section of the document (read afresh now), or appends it.
fn write_doc(path: &Path, section: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nEach section is written by the script named in it; rerun the command to refresh it.\n"
            .into()
    });
    let out = match text.find("\n## Fault suite\n") {
        Some(i) => {
            let start = i + 1;
            let end = text[start + 3..]
                .find("\n## ")
                .map_or(text.len(), |j| start + 3 + j + 1);
            format!("{}{section}\n{}", &text[..start], &text[end..])
        }
        None => format!("{}\n\n{section}", text.trim_end()),
    };
    std::fs::write(path, out.trim_end().to_string() + "\n")
}

// ---------------------------------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    for (what, p) in [
        ("qmigrate", &opts.qmigrate),
        ("QEMU", &opts.qemu),
        ("guest kernel", &opts.guest_dir.join("vmlinuz")),
    ] {
        if !p.exists() {
            eprintln!("{what} not found at {}", p.display());
            return std::process::ExitCode::from(2);
        }
    }
    // SIGINT and SIGTERM are blocked in every thread (spawned children start with an empty mask) and taken by one
    // thread, which only sets a flag: the current injection then ends through its guards, which kill the QEMUs
    // (in their own process groups, out of reach of a Ctrl-C).
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    if sigs.thread_block().is_ok() {
        thread::spawn(move || {
            if sigs.wait().is_ok() {
                eprintln!("interrupted: ending the current injection");
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let help = Command::new(&opts.qmigrate)
        .args(["migrate", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let qemu_version = Command::new(&opts.qemu)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let ctx = Ctx {
        recover_for: help.contains("--recover-for"),
        adopt: help.contains("--adopt"),
        opts,
        rt,
    };
    if !ctx.recover_for || !ctx.adopt {
        eprintln!(
            "note: this qmigrate has{} --recover-for and{} --adopt",
            if ctx.recover_for { "" } else { " no" },
            if ctx.adopt { "" } else { " no" }
        );
    }

    // The plan: every allowed (kind, mode) pair once per round, rounds shuffled, all from the seed.
    let mut rng = Rng::new(ctx.opts.seed);
    let pairs: Vec<(Kind, Mode)> = ctx
        .opts
        .kinds
        .iter()
        .flat_map(|k| ctx.opts.modes.iter().map(move |m| (*k, *m)))
        .filter(|(k, m)| k.allowed_in(*m))
        .collect();
    let mut plans = Vec::new();
    while plans.len() < ctx.opts.n {
        let mut round = pairs.clone();
        rng.shuffle(&mut round);
        for (kind, mode) in round {
            if plans.len() == ctx.opts.n {
                break;
            }
            let window = match (kind, mode) {
                (Kind::DstReset, _) => 1000,
                (_, Mode::Precopy) => ctx.opts.precopy_window.as_millis() as u64,
                (_, Mode::Postcopy) => ctx.opts.postcopy_window.as_millis() as u64,
            };
            plans.push(Plan {
                index: plans.len(),
                kind,
                mode,
                delay: Duration::from_millis(rng.range(0, window)),
                outage: Duration::from_millis(
                    rng.range(1000, ctx.opts.max_outage.as_millis() as u64),
                ),
            });
        }
    }

    eprintln!(
        "fault suite: {} injections, seed {}, {}, qmigrate {}",
        plans.len(),
        ctx.opts.seed,
        qemu_version,
        ctx.opts.qmigrate.display()
    );
    let t0 = Instant::now();
    let mut records = Vec::new();
    for plan in &plans {
        if interrupted() {
            break;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_injection(&ctx, plan, plans.len())
        }));
        let rec = r.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Record {
                kind: plan.kind,
                mode: plan.mode,
                class: Class::HarnessError,
                in_flight: false,
                hung: false,
                stuck: false,
                disagrees: false,
                line: format!("[{}] harness panic: {msg}", plan.index + 1),
            }
        });
        let mut rec = rec;
        if interrupted() {
            rec.class = Class::HarnessError;
            rec.line.push_str(" (interrupted: not counted)");
        }
        eprintln!("{}", rec.line);
        records.push(rec);
    }
    let wall = t0.elapsed();
    let section = doc_section(&ctx, &records, wall, &qemu_version);
    println!("{section}");
    if interrupted() {
        eprintln!("interrupted: the table is not written");
        return std::process::ExitCode::from(7);
    }
    if let Some(doc) = &ctx.opts.doc {
        match write_doc(doc, &section) {
            Ok(()) => eprintln!("wrote {}", doc.display()),
            Err(e) => eprintln!("cannot write {}: {e}", doc.display()),
        }
    }
    let bad = records
        .iter()
        .filter(|r| matches!(r.class, Class::Lost | Class::Duplicated))
        .count();
    if bad > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
