//! The testbed of scripts/testbed: hosts as namespaces, shaped links, sshd per host, and a clean teardown.
//!
//! Each test has its own testbed name, subnet and state directory, and takes its testbed down in a guard's Drop,
//! also when it fails. The names are fixed, so a rerun after a killed run first removes that run's leftovers.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to its end, killing it at `limit` (a hung ssh must fail the test, not stall it).
pub fn run(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

fn testbed(args: &[&str]) -> Run {
    run(Command::new(SCRIPT).args(args), LIMIT)
}

/// A testbed by name; `down` in Drop. Made before `up` runs, so that a failed `up` is cleaned as well.
pub struct Bed {
    pub name: &'static str,
    pub subnet: &'static str,
    pub dir: PathBuf,
    scratch: tempfile::TempDir,
}

impl Bed {
    pub fn new(name: &'static str, subnet: &'static str) -> Bed {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "no /usr/sbin/sshd: run scripts/install-deps"
        );
        let scratch = tempfile::Builder::new()
            .prefix("qmt-testbed")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Bed {
            name,
            subnet,
            dir: scratch.path().join("bed"),
            scratch,
        }
    }

    fn args<'a>(&'a self, cmd: &'a str) -> Vec<&'a str> {
        vec![
            cmd,
            "--name",
            self.name,
            "--dir",
            self.dir.to_str().unwrap(),
        ]
    }

    pub fn up(&self, extra: &[&str]) -> Run {
        let mut args = self.args("up");
        args.extend(["--subnet", self.subnet]);
        args.extend(extra);
        testbed(&args)
    }

    pub fn down(&self) -> Run {
        testbed(&self.args("down"))
    }

    pub fn ip(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, 10 + host)
    }

    pub fn ssh(&self, host: usize, remote: &str) -> Run {
        run(
            Command::new("ssh")
                .arg("-F")
                .arg(self.dir.join("ssh/config"))
                .arg(format!("h{host}"))
                .arg(remote),
            LIMIT,
        )
    }

    /// `scripts/testbed exec HOST -- ARGS`, started, not waited for.
    fn spawn(&self, host: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(SCRIPT);
        cmd.args(self.args("exec")).arg(host).arg("--").args(args);
        cmd
    }

    /// This testbed's namespaces and root-namespace links, as `ip` lists them.
    fn leftovers(&self) -> Vec<String> {
        let prefix = format!("{}-", self.name);
        let netns = run(Command::new("ip").args(["netns", "list"]), LIMIT).stdout;
        let links = run(Command::new("ip").args(["-o", "link", "show"]), LIMIT).stdout;
        let mut left: Vec<String> = netns
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| format!("namespace {l}"))
            .collect();
        left.extend(
            links
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n))
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("link {n}")),
        );
        if self.dir.exists() {
            left.push(format!("state dir {}", self.dir.display()));
        }
        left
    }

    /// Pids of every process in this testbed's host namespaces.
    fn host_pids(&self, hosts: usize) -> Vec<i32> {
        (1..=hosts)
            .flat_map(|i| {
                let ns = format!("{}-h{i}", self.name);
                run(Command::new("ip").args(["netns", "pids", &ns]), LIMIT)
                    .stdout
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect::<Vec<i32>>()
            })
            .collect()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let down = self.down();
        if down.code != Some(0) {
            eprintln!("testbed {}: down failed: {down:?}", self.name);
        }
    }
}

/// The core host `i` (1-based) is pinned to: the script picks among the cores it may run on, as this test does.
fn core_of(host: usize) -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let cores: Vec<u32> = list
        .split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            a.parse().unwrap()..=b.parse().unwrap()
        })
        .collect();
    cores[(host - 1) % cores.len()]
}

fn cpus_allowed(status: &str) -> &str {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {status}"))
        .trim()
}

/// A process that is gone, or a zombie nobody reaped yet (pid 1 here may not reap).
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Sends `bytes` from host 1 to host 2 over TCP and returns the receiver's rate in bit/s, timed from its first
/// byte to the end of the stream (so process start-up and the connection are not counted).
fn transfer_bit_per_s(bed: &Bed, bytes: u64) -> f64 {
    let dst = bed.ip(2);
    let mut receiver: Child = bed
        .spawn(
            "h2",
            &[
                "socat",
                "-u",
                &format!("TCP-LISTEN:5001,bind={dst},reuseaddr"),
                "STDOUT",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the receiver");
    let mut stream = receiver.stdout.take().unwrap();
    let sender_cmd = format!(
        "head -c {bytes} /dev/zero | socat -u STDIN TCP:{dst}:5001,retry=100,interval=0.05"
    );
    let mut sender = bed.spawn("h1", &["sh", "-c", &sender_cmd]);
    let sent = std::thread::spawn(move || run(&mut sender, LIMIT));
    let mut buf = vec![0u8; 1 << 16];
    let mut first: Option<(Instant, usize)> = None;
    let mut total = 0usize;
    loop {
        let n = stream.read(&mut buf).expect("read the stream");
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some((Instant::now(), n));
        }
        total += n;
    }
    let end = Instant::now();
    let sent = sent.join().unwrap();
    assert_eq!(sent.code, Some(0), "sender: {sent:?}");
    assert!(receiver.wait().unwrap().success(), "receiver failed");
    assert_eq!(total as u64, bytes, "bytes received");
    let (start, first_n) = first.expect("nothing received");
    (total - first_n) as f64 * 8.0 / end.duration_since(start).as_secs_f64()
}

#[test]
fn two_hosts_pinned_reachable_and_shaped() {
    let bed = Bed::new("qtb-shape", "10.77.101");
    let up = bed.up(&["--hosts", "2", "--rate", "50mbit"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let inventory = bed.dir.join("inventory.toml");
    assert!(
        up.stdout.contains(inventory.to_str().unwrap()),
        "summary names the inventory: {up:?}"
    );

    for host in 1..=2 {
        let ssh = bed.ssh(host, "cat /proc/self/status; ip -o addr");
        assert_eq!(ssh.code, Some(0), "ssh h{host}: {ssh:?}");
        assert_eq!(
            cpus_allowed(&ssh.stdout),
            core_of(host).to_string(),
            "h{host}'s cpu over ssh"
        );
        assert!(
            ssh.stdout.contains(&format!("inet {}/24", bed.ip(host))),
            "h{host}'s address: {}",
            ssh.stdout
        );
        let exec = run(
            &mut bed.spawn(&format!("h{host}"), &["cat", "/proc/self/status"]),
            LIMIT,
        );
        assert_eq!(
            cpus_allowed(&exec.stdout),
            core_of(host).to_string(),
            "h{host}'s cpu through exec: {exec:?}"
        );
    }

    // 15 MB at 50 Mbit/s is about 2.4 s; an unshaped veth does several Gbit/s.
    let rate = transfer_bit_per_s(&bed, 15_000_000);
    eprintln!("h1 -> h2 at 50mbit: {:.1} Mbit/s", rate / 1e6);
    assert!(
        (25e6..=55e6).contains(&rate),
        "h1 -> h2 at {:.1} Mbit/s, configured 50mbit",
        rate / 1e6
    );

    let toml = std::fs::read_to_string(&inventory).expect("inventory.toml");
    for want in [
        format!("config = \"{}\"", bed.dir.join("ssh/config").display()),
        "[hosts.h1]".to_string(),
        "[hosts.h2]".to_string(),
        format!("migration_address = \"{}\"", bed.ip(1)),
        format!("migration_address = \"{}\"", bed.ip(2)),
        format!("runtime_dir = \"{}\"", bed.dir.join("h2/run").display()),
        "nic = \"50Mbit/s\"".to_string(),
    ] {
        assert!(toml.contains(&want), "inventory lacks {want}:\n{toml}");
    }
    assert!(bed.dir.join("h1/run").is_dir() && bed.dir.join("h2/pki").is_dir());

    let status = testbed(&bed.args("status"));
    assert_eq!(status.code, Some(0), "{status:?}");
    assert_eq!(
        status.stdout.matches("sshd answers: yes").count(),
        2,
        "{status:?}"
    );
    assert!(status.stdout.contains("rate 50Mbit"), "{status:?}");
}

#[test]
fn down_leaves_nothing_also_after_a_crash() {
    let bed = Bed::new("qtb-down", "10.77.102");
    // /run/sshd goes with the last testbed if a testbed made it; another testbed may be up meanwhile (hosts.rs).
    let run_sshd_before = Path::new("/run/sshd").exists();
    let run_sshd_kept = || {
        let others = std::fs::read_dir("/run/qmigrate-testbed/sshd-users")
            .map(|d| d.count())
            .unwrap_or(0);
        others > 0 || Path::new("/run/sshd").exists() == run_sshd_before
    };

    // A normal run, with processes started both through exec and through ssh.
    let up = bed.up(&["--hosts", "2"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let mut sleeper = bed.spawn("h2", &["sleep", "600"]).spawn().expect("exec h2");
    let detached = bed.ssh(1, "setsid sleep 600 </dev/null >/dev/null 2>&1 &");
    assert_eq!(detached.code, Some(0), "{detached:?}");
    let pids = bed.host_pids(2);
    assert!(
        pids.len() >= 4,
        "two sshd and two sleeps expected, got {pids:?}"
    );
    let down = bed.down();
    assert_eq!(down.code, Some(0), "{down:?}");
    assert_eq!(bed.leftovers(), Vec::<String>::new());
    assert!(
        !sleeper.wait().unwrap().success(),
        "exec'd process was killed"
    );
    assert!(
        pids.iter().all(|&p| gone(p)),
        "processes left: {:?}",
        pids.iter().filter(|&&p| !gone(p)).collect::<Vec<_>>()
    );
    assert!(run_sshd_kept(), "/run/sshd as before the test");

    // A crash: sshd killed, the state directory deleted, down finds the rest by name.
    let up = bed.up(&["--hosts", "2"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let sshds: Vec<i32> = bed
        .host_pids(2)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sshd")
        })
        .collect();
    assert_eq!(sshds.len(), 2, "one sshd per host");
    for &p in &sshds {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    std::fs::remove_dir_all(&bed.dir).unwrap();
    let down = bed.down();
    assert_eq!(down.code, Some(0), "{down:?}");
    assert_eq!(bed.leftovers(), Vec::<String>::new());
    assert!(run_sshd_kept(), "/run/sshd as before the test");

    let again = bed.down();
    assert_eq!(again.code, Some(0), "a second down: {again:?}");
    let status = testbed(&bed.args("status"));
    assert_ne!(status.code, Some(0), "status of nothing: {status:?}");
}

#[test]
fn a_failure_midway_through_up_is_torn_down() {
    let bed = Bed::new("qtb-fail", "10.77.103");
    // An ssh-keygen that fails: up has made namespaces and links by then.
    let fake = bed.scratch.path().join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    let keygen = fake.join("ssh-keygen");
    std::fs::write(&keygen, "#!/bin/sh\necho no keys today >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&keygen, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let mut args = bed.args("up");
    args.extend(["--subnet", bed.subnet]);
    let up = run(Command::new(SCRIPT).args(&args).env("PATH", path), LIMIT);
    assert_eq!(up.code, Some(1), "{up:?}");
    assert!(up.stderr.contains("generating ssh keys"), "{up:?}");
    assert_eq!(bed.leftovers(), Vec::<String>::new());
}

#[test]
fn bad_input_makes_nothing() {
    let bed = Bed::new("qtb-bad", "10.77.104");
    for (args, option) in [
        (&["--hosts", "0"][..], "--hosts"),
        (&["--rate", "fast"], "--rate"),
        (&["--rate", "100 furlongs"], "--rate"),
        (&["--delay", "soon"], "--delay"),
        (&["--subnet", "10.77"], "--subnet"),
        (&["--frobnicate"], "--frobnicate"),
    ] {
        let up = bed.up(args);
        assert_eq!(up.code, Some(2), "up {args:?}: {up:?}");
        assert!(up.stderr.contains(option), "up {args:?}: {up:?}");
        assert_eq!(bed.leftovers(), Vec::<String>::new(), "up {args:?}");
    }
    let exec = testbed(&["exec", "--name", bed.name, "h1"]);
    assert_eq!(exec.code, Some(2), "{exec:?}");
    let exec = testbed(&["exec", "--name", bed.name, "h1", "--", "true"]);
    assert_eq!(
        exec.code,
        Some(1),
        "exec on a testbed that is down: {exec:?}"
    );
    assert!(exec.stderr.contains("is testbed qtb-bad up?"), "{exec:?}");
}
