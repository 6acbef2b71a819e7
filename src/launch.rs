//! Starting and ending QEMU processes: the destination mirrored from a running source's command line, and
//! guests built from the `qemu-configs/` templates. A process started here is killed on drop unless detached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read the command line of QEMU pid {pid}")]
    Cmdline {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QEMU pid {pid} exited ({status}) before its QMP socket {socket} appeared: {log_tail}"
    )]
    Exited {
        pid: i32,
        socket: String,
        status: String,
        log_tail: String,
    },
    #[error("QEMU pid {pid} did not create its QMP socket {socket} within {}", humantime::format_duration(*after))]
    NoSocket {
        pid: i32,
        socket: String,
        after: Duration,
    },
    #[error("guest {name}: workload {workload} not ready within {}; last serial line: {serial_tail:?}", humantime::format_duration(*after))]
    NotReady {
        name: String,
        workload: String,
        after: Duration,
        serial_tail: String,
    },
    #[error("QEMU config template {name}: {reason}")]
    Template { name: String, reason: String },
}

/// A QEMU process this program started.
#[derive(Debug)]
pub struct QemuProcess {
    child: Option<Child>,
    pid: i32,
    qmp_path: PathBuf,
    log_path: PathBuf,
}

impl QemuProcess {
    /// Starts `program args…` in its own process group (a Ctrl-C aimed at us does not reach it), output to
    /// `log_path`.
    pub fn spawn(
        program: &Path,
        args: &[String],
        qmp_path: &Path,
        log_path: &Path,
    ) -> Result<QemuProcess, LaunchError> {
        use std::os::unix::process::CommandExt;
        let spawn_err = |source| LaunchError::Spawn {
            program: program.display().to_string(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(spawn_err)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(spawn_err)?;
        let pid = child.id() as i32;
        tracing::debug!(pid, program = %program.display(), "started QEMU");
        Ok(QemuProcess {
            child: Some(child),
            pid,
            qmp_path: qmp_path.to_path_buf(),
            log_path: log_path.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until the QMP socket accepts connections, failing early (with the log's tail) if QEMU exits.
    pub async fn wait_for_socket(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(LaunchError::Exited {
                    pid: self.pid,
                    socket: self.qmp_path.display().to_string(),
                    status: status.to_string(),
                    log_tail: log_tail(&self.log_path),
                });
            }
            // The socket file appears at bind(), a moment before QEMU listens: only a connection proves it ready.
            // The probe is closed at once, which frees QMP's single client slot again.
            if self.qmp_path.exists()
                && std::os::unix::net::UnixStream::connect(&self.qmp_path).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NoSocket {
                    pid: self.pid,
                    socket: self.qmp_path.display().to_string(),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            tracing::debug!(pid = self.pid, "killed QEMU");
        }
    }

    /// Leaves the process running after this handle is gone (a destination that now carries the guest).
    pub fn detach(mut self) -> i32 {
        self.child.take();
        self.pid
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let tail = lines.into_iter().rev().collect::<Vec<_>>().join(" | ");
    if tail.is_empty() {
        "no output".into()
    } else {
        tail
    }
}

/// The program and arguments of a running QEMU, from `/proc/PID/exe` and `/proc/PID/cmdline`.
pub fn process_command_line(pid: i32) -> Result<(PathBuf, Vec<String>), LaunchError> {
    let err = |source| LaunchError::Cmdline { pid, source };
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(err)?;
    let mut parts: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    if parts.last().is_some_and(|s| s.is_empty()) {
        parts.pop();
    }
    if parts.is_empty() {
        return Err(err(std::io::Error::other("empty command line (a zombie?)")));
    }
    let argv0 = parts.remove(0);
    let program = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(argv0));
    Ok((program, parts))
}

/// PURE: the destination's arguments mirrored from the source's: every mention of the source QMP socket path
/// becomes the destination's, `-incoming`, `-daemonize` and `-pidfile` are dropped, and `-incoming defer` is
/// appended so the orchestrator chooses the migration URI.
pub fn mirror_destination_args(
    source_args: &[String],
    source_qmp: &str,
    destination_qmp: &str,
) -> Vec<String> {
    let mut out = Vec::with_capacity(source_args.len() + 2);
    let mut it = source_args.iter();
    while let Some(a) = it.next() {
        match a.trim_start_matches('-') {
            "incoming" | "pidfile" if a.starts_with('-') => {
                it.next();
            }
            "daemonize" if a.starts_with('-') => {}
            _ => out.push(a.replace(source_qmp, destination_qmp)),
        }
    }
    out.push("-incoming".into());
    out.push("defer".into());
    out
}

/// Expands a `qemu-configs/*.args` template: one option per line (`-flag value`, split at the first space),
/// `#` comments, `{name}` placeholders filled from `vars`.
pub fn expand_template(
    name: &str,
    text: &str,
    vars: &[(&str, String)],
) -> Result<Vec<String>, LaunchError> {
    let mut args = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut line = line.to_string();
        for (k, v) in vars {
            line = line.replace(&format!("{{{k}}}"), v);
        }
        if let Some(start) = line.find('{').filter(|i| line[*i..].contains('}')) {
            return Err(LaunchError::Template {
                name: name.into(),
                reason: format!("no value for placeholder in `{}`", &line[start..]),
            });
        }
        match line.split_once(' ') {
            Some((flag, value)) => {
                args.push(flag.to_string());
                args.push(value.trim().to_string());
            }
            None => args.push(line),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mirror_table() {
        let table = [
            (
                v(&["-m", "256", "-qmp", "unix:/run/a.sock,server=on,wait=off"]),
                v(&[
                    "-m",
                    "256",
                    "-qmp",
                    "unix:/run/b.sock,server=on,wait=off",
                    "-incoming",
                    "defer",
                ]),
            ),
            (
                v(&[
                    "-chardev",
                    "socket,id=m,path=/run/a.sock,server=on",
                    "-incoming",
                    "tcp:0:4444",
                    "-daemonize",
                ]),
                v(&[
                    "-chardev",
                    "socket,id=m,path=/run/b.sock,server=on",
                    "-incoming",
                    "defer",
                ]),
            ),
            (
                v(&["--pidfile", "/run/x.pid", "-name", "vm1"]),
                v(&["-name", "vm1", "-incoming", "defer"]),
            ),
        ];
        for (src, want) in table {
            assert_eq!(
                mirror_destination_args(&src, "/run/a.sock", "/run/b.sock"),
                want
            );
        }
    }

    #[test]
    fn template_expansion() {
        let t = "# comment\n-m {mem}\n-nodefaults\n-append console=ttyS0 workload={w}\n";
        let args = expand_template("t", t, &[("mem", "256".into()), ("w", "idle".into())]).unwrap();
        assert_eq!(
            args,
            v(&[
                "-m",
                "256",
                "-nodefaults",
                "-append",
                "console=ttyS0 workload=idle"
            ])
        );
        let err = expand_template("t", "-m {mem}", &[]).unwrap_err();
        assert!(err.to_string().contains("{mem}"), "{err}");
    }
}
