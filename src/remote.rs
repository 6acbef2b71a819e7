//! Reaching a host of the inventory: commands, QMP sessions and QEMU processes there, on this machine or through the
//! system OpenSSH client (the user's ssh configuration, keys and agent, plus one shared ControlMaster connection per
//! host). Remote commands are argument vectors quoted for the remote shell by `shlex`, never by hand.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::inventory::{split_glob, Host, SshSettings, Transport};
use crate::qmp::{ConnectOptions, Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host {host}: cannot run {program}")]
    Spawn {
        host: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host {host}: cannot be reached: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("host {host}: `{command}` failed ({status}){}", stderr_suffix(.stderr))]
    Command {
        host: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("host {host}: `{command}` did not finish within {}", humantime::format_duration(*.timeout))]
    Timeout {
        host: String,
        command: String,
        timeout: Duration,
    },
    #[error("host {host}: {what}")]
    Invalid { host: String, what: String },
    #[error("host {host}: QMP socket {socket}")]
    Qmp {
        host: String,
        socket: String,
        #[source]
        source: Box<QmpError>,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    last.map(|l| format!(": {}", crate::text::printable(l.trim())))
        .unwrap_or_default()
}

/// The ssh exit status that means ssh itself failed (not the remote command).
const SSH_FAILED: i32 = 255;
/// Bound on one remote command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// What a command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// The QEMU process behind a QMP socket on a host, read from its `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteProcess {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The user qmigrate runs as on that host.
    pub our_uid: u32,
    pub exe: String,
    pub cwd: String,
    pub args: Vec<String>,
}

/// One host, reachable.
#[derive(Debug)]
pub struct HostLink {
    pub host: Host,
    ssh: SshSettings,
    control_dir: PathBuf,
}

impl HostLink {
    pub fn new(host: Host, ssh: SshSettings) -> HostLink {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let control_dir = base.join(format!("qmigrate-ssh-{}", nix::unistd::getuid()));
        HostLink {
            host,
            ssh,
            control_dir,
        }
    }

    pub fn name(&self) -> &str {
        &self.host.name
    }

    pub fn is_local(&self) -> bool {
        self.host.transport == Transport::Local
    }

    /// A label for a path on this host, for messages and reports: `host:path`.
    pub fn label(&self, path: &str) -> String {
        format!("{}:{path}", self.host.name)
    }

    /// The command that runs `argv` on this host.
    fn command(&self, argv: &[&str]) -> Result<Command, HostError> {
        match &self.host.transport {
            Transport::Local => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                Ok(c)
            }
            Transport::Ssh { destination } => {
                let remote =
                    shlex::try_join(argv.iter().copied()).map_err(|e| HostError::Invalid {
                        host: self.host.name.clone(),
                        what: format!("cannot quote {argv:?} for the remote shell: {e}"),
                    })?;
                let mut c = Command::new("ssh");
                c.args(self.ssh_args())
                    .arg("--")
                    .arg(destination)
                    .arg(remote);
                Ok(c)
            }
        }
    }

    /// The ssh client's options: the inventory's, batch mode (never a password prompt), and a shared connection.
    fn ssh_args(&self) -> Vec<String> {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.control_dir);
        let mut a = Vec::new();
        if let Some(c) = &self.ssh.config {
            a.extend(["-F".to_string(), c.display().to_string()]);
        }
        a.extend(self.ssh.options.iter().cloned());
        for o in [
            "BatchMode=yes".to_string(),
            "ControlMaster=auto".into(),
            format!("ControlPath={}/%C", self.control_dir.display()),
            format!(
                "ControlPersist={}",
                self.ssh.control_persist.as_secs().max(1)
            ),
        ] {
            a.extend(["-o".to_string(), o]);
        }
        a
    }

    /// Runs `argv` on the host and returns what it printed; a non-zero exit is an error with its stderr.
    pub async fn run(&self, argv: &[&str], timeout: Duration) -> Result<Output, HostError> {
        let mut cmd = self.command(argv)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let shown = shlex::try_join(argv.iter().copied()).unwrap_or_else(|_| argv.join(" "));
        let child = cmd.spawn().map_err(|source| HostError::Spawn {
            host: self.host.name.clone(),
            program: if self.is_local() {
                argv[0].into()
            } else {
                "ssh".into()
            },
            source,
        })?;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => {
                return Err(HostError::Timeout {
                    host: self.host.name.clone(),
                    command: shown,
                    timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(HostError::Spawn {
                    host: self.host.name.clone(),
                    program: shown,
                    source,
                })
            }
            Ok(Ok(o)) => o,
        };
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(Output {
                stdout: out.stdout,
                stderr,
            }),
            Some(SSH_FAILED) if !self.is_local() => Err(HostError::Unreachable {
                host: self.host.name.clone(),
                reason: stderr_suffix(&stderr).trim_start_matches(": ").to_string(),
            }),
            code => Err(HostError::Command {
                host: self.host.name.clone(),
                command: shown,
                status: code.map_or("killed by a signal".into(), |c| format!("exit {c}")),
                stderr,
            }),
        }
    }

    /// Checks that the host answers (and, over ssh, opens the shared connection).
    pub async fn ping(&self) -> Result<(), HostError> {
        self.run(&["true"], COMMAND_TIMEOUT).await.map(|_| ())
    }

    /// Opens a QMP session to a socket on this host: directly, or over ssh through `socat` on the far side.
    pub async fn connect_qmp(&self, socket: &str, opts: &ConnectOptions) -> Result<Qmp, HostError> {
        let qmp_err = |source| HostError::Qmp {
            host: self.host.name.clone(),
            socket: socket.into(),
            source: Box::new(source),
        };
        if self.is_local() {
            return Qmp::connect_unix(Path::new(socket), opts)
                .await
                .map_err(qmp_err);
        }
        let target = format!("UNIX-CONNECT:{}", socat_escape(socket));
        let mut cmd = self.command(&["socat", "-", &target])?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| HostError::Spawn {
            host: self.host.name.clone(),
            program: "ssh".into(),
            source,
        })?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three are piped");
        };
        let errors = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let label = self.label(socket);
        match Qmp::connect_stream_keeping(stdout, stdin, &label, Box::new(child), opts).await {
            Ok(q) => Ok(q),
            Err(e) => {
                // What ssh or socat said is the better reason ("No such file or directory", "Connection refused").
                let said = tokio::time::timeout(Duration::from_secs(2), errors)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let reason = stderr_suffix(&said);
                if reason.is_empty() {
                    Err(qmp_err(e))
                } else {
                    Err(HostError::Qmp {
                        host: self.host.name.clone(),
                        socket: socket.into(),
                        source: Box::new(QmpError::NotQmp {
                            socket: label,
                            reason: reason.trim_start_matches(": ").to_string(),
                        }),
                    })
                }
            }
        }
    }

    /// The QMP sockets matching `glob` on this host (the glob's directory listed, its file pattern matched here).
    pub async fn list_sockets(&self, glob: &str) -> Result<Vec<String>, HostError> {
        let invalid = |what: String| HostError::Invalid {
            host: self.host.name.clone(),
            what,
        };
        let (dir, pattern) =
            split_glob(glob).ok_or_else(|| invalid(format!("bad glob {glob:?}")))?;
        let pattern =
            glob::Pattern::new(pattern).map_err(|e| invalid(format!("bad glob {glob:?}: {e}")))?;
        let out = self
            .run(
                &[
                    "find",
                    dir,
                    "-mindepth",
                    "1",
                    "-maxdepth",
                    "1",
                    "-type",
                    "s",
                    "-print0",
                ],
                COMMAND_TIMEOUT,
            )
            .await?;
        let mut found: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .filter(|p| {
                Path::new(p)
                    .file_name()
                    .is_some_and(|n| pattern.matches(&n.to_string_lossy()))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// The QEMU process listening on `socket`: its pid (from `ss`), user, executable, working directory and
    /// command line (from `/proc`).
    pub async fn qemu_process(&self, socket: &str) -> Result<RemoteProcess, HostError> {
        let invalid = |what: String| HostError::Invalid {
            host: self.host.name.clone(),
            what,
        };
        let out = self.run(&["ss", "-xlpnH"], COMMAND_TIMEOUT).await?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let pid = listening_pid(&listing, socket).ok_or_else(|| {
            invalid(format!(
                "no process is seen listening on {socket} (ss -xlp)"
            ))
        })?;
        let pid_arg = pid.to_string();
        let out = self
            .run(
                &["sh", "-c", PROCESS_SCRIPT, "sh", &pid_arg],
                COMMAND_TIMEOUT,
            )
            .await?;
        parse_process(pid, &out.stdout)
            .ok_or_else(|| invalid(format!("cannot read /proc/{pid} of {socket}")))
    }

    /// Starts a program on the host as its own process (a new session, not a child of the ssh session), its
    /// output appended to `log`, as `run_as` (uid, gid) when that is not the user qmigrate runs as there. Its pid
    /// is written to `LOG.pid` on the host and returned.
    pub async fn spawn_detached(
        &self,
        cwd: &str,
        log: &str,
        run_as: Option<(u32, u32)>,
        program: &str,
        args: &[String],
    ) -> Result<i32, HostError> {
        let (uid, gid);
        let pidfile = format!("{log}.pid");
        let mut argv: Vec<&str> = vec!["sh", "-c", SPAWN_SCRIPT, "sh", cwd, log, &pidfile];
        if let Some((u, g)) = run_as {
            uid = format!("--reuid={u}");
            gid = format!("--regid={g}");
            argv.extend(["setpriv", &uid, &gid, "--clear-groups"]);
        }
        argv.push(program);
        argv.extend(args.iter().map(String::as_str));
        let out = self.run(&argv, COMMAND_TIMEOUT).await?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| HostError::Invalid {
                host: self.host.name.clone(),
                what: format!("starting {program} printed no pid"),
            })
    }

    /// Waits until `socket` exists on the host while `pid` lives; a dead process is an error with its log's end.
    pub async fn wait_for_socket(
        &self,
        pid: i32,
        socket: &str,
        log: &str,
        timeout: Duration,
    ) -> Result<(), HostError> {
        let deadline = Instant::now() + timeout;
        let pid_arg = pid.to_string();
        loop {
            let out = self
                .run(
                    &["sh", "-c", WAIT_SCRIPT, "sh", &pid_arg, socket, log],
                    COMMAND_TIMEOUT,
                )
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().next().unwrap_or("") {
                "ready" => return Ok(()),
                "dead" => {
                    let tail: Vec<&str> = text.lines().skip(1).collect();
                    return Err(HostError::Invalid {
                        host: self.host.name.clone(),
                        what: format!(
                            "the destination QEMU (pid {pid}) exited before creating {socket}: {}",
                            crate::text::printable(&tail.join(" / "))
                        ),
                    });
                }
                _ if Instant::now() >= deadline => {
                    return Err(HostError::Timeout {
                        host: self.host.name.clone(),
                        command: format!("waiting for {socket}"),
                        timeout,
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Kills a process qmigrate started on the host (SIGKILL), if it still runs the program it started.
    pub async fn kill(&self, pid: i32) -> Result<(), HostError> {
        let pid_arg = pid.to_string();
        self.run(&["kill", "-KILL", &pid_arg], COMMAND_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Removes a socket file qmigrate's destination left (only a socket: never a file or a link of another kind).
    pub async fn remove_socket(&self, socket: &str) -> Result<(), HostError> {
        self.run(
            &[
                "sh",
                "-c",
                r#"[ ! -S "$1" ] || rm -f -- "$1""#,
                "sh",
                socket,
            ],
            COMMAND_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    /// Makes `dir` on the host (and its parents), private to the user.
    pub async fn make_dir(&self, dir: &str) -> Result<(), HostError> {
        self.run(&["mkdir", "-p", "-m", "0700", dir], COMMAND_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// The files of `names` in `dir` that are missing or unreadable on the host.
    pub async fn missing_files(&self, dir: &str, names: &[&str]) -> Result<Vec<String>, HostError> {
        let mut argv = vec!["sh", "-c", MISSING_SCRIPT, "sh", dir];
        argv.extend(names);
        let out = self.run(&argv, COMMAND_TIMEOUT).await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

/// Reads a process's user, executable, working directory and command line (NUL-separated, last).
const PROCESS_SCRIPT: &str = r#"p=/proc/$1
stat -c '%u %g' "$p" && id -u && readlink "$p/exe" && readlink "$p/cwd" && cat "$p/cmdline""#;

/// `cd CWD`, then starts the rest in a new session with its output to LOG, and writes its pid to PIDFILE and
/// prints it.
const SPAWN_SCRIPT: &str = r#"cd "$1" 2>/dev/null || cd /
log=$2; pidfile=$3; shift 3
setsid "$@" </dev/null >>"$log" 2>&1 &
echo $! >"$pidfile"
echo $!"#;

/// Prints `ready` when socket $2 exists, `dead` and the end of log $3 when pid $1 is gone, else `wait`.
const WAIT_SCRIPT: &str = r#"if [ -S "$2" ]; then echo ready
elif ! kill -0 "$1" 2>/dev/null; then echo dead; tail -n 5 "$3" 2>/dev/null
else echo wait; fi"#;

/// Prints each of the files $2.. of directory $1 that is not readable.
const MISSING_SCRIPT: &str = r#"d=$1; shift
for f in "$@"; do [ -r "$d/$f" ] || echo "$f"; done"#;

/// PURE: the pid of the process listening on the UNIX socket `path` in `ss -xlpnH` output.
pub fn listening_pid(listing: &str, path: &str) -> Option<i32> {
    // `... PATH INODE * 0 users:((...,pid=N,...))`: the path is followed by the inode number, so that a path that
    // is a prefix of another ("/run/web" of "/run/web 1.qmp") is not taken for it.
    let needle = format!(" {path} ");
    let line = listing.lines().find(|l| {
        l.match_indices(&needle).any(|(i, _)| {
            let inode = l[i + needle.len()..].split(' ').next().unwrap_or("");
            !inode.is_empty() && inode.bytes().all(|b| b.is_ascii_digit())
        })
    })?;
    let rest = line.split("pid=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// PURE: the output of [`PROCESS_SCRIPT`].
fn parse_process(pid: i32, out: &[u8]) -> Option<RemoteProcess> {
    let mut parts = out.splitn(5, |b| *b == b'\n');
    let ids = String::from_utf8_lossy(parts.next()?).into_owned();
    let our = String::from_utf8_lossy(parts.next()?).trim().parse().ok()?;
    let exe = String::from_utf8_lossy(parts.next()?).into_owned();
    let cwd = String::from_utf8_lossy(parts.next()?).into_owned();
    let cmdline = parts.next()?;
    let (uid, gid) = ids.trim().split_once(' ')?;
    let mut args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(|a| a.is_empty()) {
        args.pop();
    }
    if args.is_empty() {
        return None;
    }
    args.remove(0);
    Some(RemoteProcess {
        pid,
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
        our_uid: our,
        exe: exe.trim_end_matches(" (deleted)").to_string(),
        cwd,
        args,
    })
}

/// socat's address syntax gives `:`, `,`, `!` and `\` meanings; a backslash escapes them.
fn socat_escape(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(
            c,
            ':' | ',' | '!' | '\\' | '"' | '\'' | '(' | ')' | '[' | ']' | '{' | '}'
        ) {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// The hosts of an inventory, each linked once.
pub fn links(inv: &crate::inventory::Inventory) -> Vec<Arc<HostLink>> {
    inv.hosts
        .values()
        .map(|h| Arc::new(HostLink::new(h.clone(), inv.ssh.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_pid_is_found_by_the_whole_path() {
        let listing = "\
u_str LISTEN 0 1 /run/q/web.qmp.incoming 101 * 0 users:((\"qemu-system-x86\",pid=77,fd=9))
u_str LISTEN 0 1 /run/q/web.qmp 100 * 0 users:((\"qemu-system-x86\",pid=42,fd=9))
u_str LISTEN 0 1 /run/q/web 1.qmp 102 * 0 users:((\"qemu-system-x86\",pid=43,fd=9),(\"x\",pid=1,fd=2))
";
        let cases = [
            ("/run/q/web.qmp", Some(42)),
            ("/run/q/web.qmp.incoming", Some(77)),
            ("/run/q/web 1.qmp", Some(43)),
            ("/run/q/web", None),
            ("/run/q/other.qmp", None),
        ];
        for (path, want) in cases {
            assert_eq!(listening_pid(listing, path), want, "{path}");
        }
    }

    #[test]
    fn a_process_is_read_from_the_script_output() {
        let out = b"107 108\n0\n/usr/bin/qemu-system-x86_64\n/var/lib/vm\nqemu-system-x86_64\x00-name\x00web 1\x00-m\x00256\x00";
        let p = parse_process(5, out).unwrap();
        assert_eq!((p.uid, p.gid, p.our_uid), (107, 108, 0));
        assert_eq!(p.exe, "/usr/bin/qemu-system-x86_64");
        assert_eq!(p.cwd, "/var/lib/vm");
        assert_eq!(p.args, ["-name", "web 1", "-m", "256"]);
        assert!(parse_process(5, b"107 108\n0\n").is_none());
        assert!(parse_process(5, b"x\n0\n/e\n/\nq\0").is_none());
    }

    #[test]
    fn socat_addresses_escape_their_special_characters() {
        assert_eq!(socat_escape("/run/q/web 1.qmp"), "/run/q/web 1.qmp");
        assert_eq!(socat_escape("/run/a:b,c!d"), "/run/a\\:b\\,c\\!d");
        assert_eq!(socat_escape("/x/$(rm -rf)"), "/x/$\\(rm -rf\\)");
    }
}
