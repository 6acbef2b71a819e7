//! Starting and ending QEMU processes: the destination mirrored from a running source's command line, and
//! guests built from the `qemu-configs/` templates. A process started here is killed on drop unless detached.
//!
//! # A destination on the same host
//!
//! `--launch-dst` starts the destination from the source's own command line. Both processes then live side by
//! side on one host, so every host-local resource the source holds must be given to the destination afresh, or the
//! destination must not start at all. [`mirror_destination`] decides this without touching the system; its rules:
//!
//! * **Sockets QEMU listens on** (`-qmp`, `-qmp-pretty`, `-monitor`, `-serial`, `-parallel`, `-debugcon`, `-gdb`,
//!   `-chardev socket,server=on`, `-vnc unix:`, `-spice unix=on,addr=`): the source's QMP socket becomes the
//!   destination's; every other path `P` becomes `P.<tag>` (the tag is appended, so the sibling stays in the same
//!   directory and its name shows what it came from; a client of a console socket must look there afterwards).
//! * **Files QEMU writes** (`-serial file:`, `-chardev file,path=`, any chardev `logfile=`, `-D`, `-trace file=`,
//!   `-qtest-log`, `-object filter-dump,file=`, `-audiodev wav,path=`): `P` becomes `P.<tag>`, a new file.
//!   `/dev/null`, `/dev/stdout` and `/dev/stderr` stay; any other node in /dev (outside /dev/shm and
//!   /dev/hugepages) is refused.
//! * **Dropped**: `-pidfile` (qmigrate knows the destination's pid; QEMU locks the file, so sharing it fails and
//!   a sibling nobody asked for would be litter), `-daemonize` (qmigrate must stay the parent), `-loadvm` (the
//!   state comes from the migration stream) and `-incoming`; `-incoming defer` is appended so qmigrate chooses the
//!   migration URI.
//! * **TCP displays**: `-vnc :N` / `-display vnc=:N` become `none` (a display is not guest-visible, and the
//!   source holds the port). `-spice` with `port=`/`tls-port=` is refused: SPICE cannot start without a listener.
//! * **Kept**: disk images (`-drive`, `-blockdev`, `-kernel`, …). Migration here assumes shared storage, and
//!   QEMU's image locking already hands images over at switch-over. Reads of shared inputs (firmware, secrets,
//!   TLS directories) are kept too, as are TCP *client* chardevs, which take nothing from the source.
//! * **Refused** ([`MirrorError::Unsupported`], naming the argument): a TCP listener (the source holds the port),
//!   a client UNIX socket (it is a peer's, e.g. a vhost-user backend that serves one connection), FIFOs (`pipe`;
//!   the destination would steal the source's data), host tty/parallel devices, passed file descriptors (`fd=`,
//!   `-add-fd`), a tap named by `ifname=` (a tap belongs to one process) or created with `script=no`, SLIRP
//!   `hostfwd` on a host port, `-netdev socket`/`stream`/`dgram` bound to a port or UNIX path (moving the
//!   path would cut the guest's network off from its peer), passthrough devices (`vfio-*`, `usb-host`,
//!   `vhost-scsi`, `vhost-vsock` whose guest CID is host-wide, TPM passthrough, `input-linux`), guest RAM in a
//!   shared file (`memory-backend-file,share=on`: the incoming stream would overwrite the source's memory),
//!   `snapshot=on`/`-snapshot` (the guest's writes live in an overlay only the source sees), options the mirror
//!   cannot see into (`-readconfig`, `-set`), and unknown chardev backends and netdev types. The mirror also
//!   fails when no argument creates the source's QMP socket, when a new path is one the source uses or is given
//!   twice, and when a new socket path is too long for a UNIX socket address.
//!
//! # A destination on another host
//!
//! `migrate --to-host` starts the destination on another host from the source's command line
//! ([`mirror_to_other_host`]; the tag is that host's name). There the source's ports, tap names and vsock CIDs are
//! free (another machine, or another network namespace), but files may still be shared (hosts often share storage;
//! the testbed's share one file system), and what the source reaches on its own host — its loopback, its devices,
//! its peers — is not there. The rules above hold, except:
//!
//! * **Taps are kept as they are**: `-netdev tap,ifname=…` with a `script=`, with the default script or with
//!   `script=no`, and `-nic`/`-net tap,…`. The destination host makes its own tap of that name (a NIC on a tap is
//!   the normal case between hosts) and attaches it as the source's was: by the same script, which must exist there
//!   and attach to a bridge of the same name, or — with `script=no` — not at all: such a tap must be prepared on the
//!   destination host beforehand, as it was on the source's, and the mirror cannot see whether it is. A fresh tap
//!   (no `ifname=`) with `script=no` is still refused, and passed descriptors (`fd=`, `vhostfd=`) too.
//! * **Bridges and switches** (`-netdev bridge,br=`, `vde,sock=`) are kept, as on the same host: the destination
//!   host needs a bridge of that name (allowed in `qemu-bridge-helper`'s ACL) or a switch at that socket.
//! * **Listeners on a wildcard or loopback address** (TCP and UDP chardevs with `server=on` or a local port, `-gdb`,
//!   `-s`, SLIRP `hostfwd=`, `-spice port=`/`tls-port=`, VNC displays and websockets) are kept: the port on another
//!   host is that host's own, and the service moves with the guest (its clients connect to the new host). Whether a
//!   process there holds the port cannot be seen from here; then the destination fails to start, its log names the
//!   port, and the guest stays on the source. A listener bound to any other address (an IP or a host name: one of
//!   the source's host) is refused, since the destination could not bind it — except a TCP display, which becomes
//!   `none` as on the same host.
//! * **The guest's own network link to one peer** is refused even on a wildcard address: `-netdev socket,listen=`
//!   or with a local UDP port, `-netdev stream,server=on` on TCP, `-netdev dgram` with a local port. The peer
//!   reaches it at the source host's address and does not reconnect elsewhere, so the guest would lose that network.
//! * **Clients of the source host's loopback** are refused (`-serial tcp:127.0.0.1:…`,
//!   `-chardev socket,host=localhost,…`, a UDP chardev's peer, which is `localhost` when not given,
//!   `-netdev socket,connect=`, `stream`, `dgram` to a loopback address): on another host nothing, or something
//!   else, listens there. Clients of other addresses are kept.
//! * **vhost-vsock** is kept: a guest CID is unique per host, and the source holds it on its own host only. Another
//!   VM with that CID on the destination host makes the destination fail to start, and the guest stays.
//! * **Still refused**, as on the same host: host devices (`vfio-*`, `usb-host`, `vhost-scsi`, TPM passthrough,
//!   `input-linux`, host ttys and parallel ports, nodes in /dev) — the device at that path or address on another
//!   host is different hardware, and the guest's state in it does not migrate; client UNIX sockets (the peer — a
//!   vhost-user backend, virtiofsd, passt, swtpm — runs on the source's host, and nothing starts one on the other);
//!   FIFOs; passed file descriptors; `memory-backend-file,share=on` and `snapshot=on` (on shared storage both QEMUs
//!   would use one file, as on one host); `-readconfig` and `-set`; unknown chardev backends and netdev types.
//! * **Paths move as on the same host**: the destination's QMP socket is the one asked for, and every other socket
//!   QEMU creates and file it writes gets the `.<tag>` suffix, since on shared storage both QEMUs would otherwise
//!   use one file. The checks that no new path is one the source uses hold as well.
//!
//! Paths are compared lexically (`.` components and repeated slashes removed); relative paths are relative to
//! the source's working directory, so start the destination there ([`SpawnOptions::current_dir`]). Values in
//! QEMU's `key=value,…` syntax escape a comma as `,,`; the mirror reads and writes that escaping, and writes the
//! `file:` form (which QEMU takes literally) unescaped. JSON forms (`-device {…}`) are checked but never edited:
//! one that would need a rewrite is refused.

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest path a UNIX socket address holds (`sun_path` is 108 bytes including its NUL).
const UNIX_PATH_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot mirror the source's command line for the destination")]
    Mirror(#[source] MirrorError),
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
    #[error("cannot resolve the executable of pid {pid} from /proc/{pid}/exe{hint}")]
    Exe {
        pid: i32,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} runs {}, which is not QEMU (qemu-system-* or qemu-kvm)", exe.display())]
    NotQemu { pid: i32, exe: PathBuf },
    #[error("cannot read the owner of pid {pid} from /proc/{pid}/status")]
    Owner {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the QEMU log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {} is a symbolic link; it is neither followed nor removed", path.display())]
    SocketSymlink { path: PathBuf },
    #[error("socket path {} is {kind}, not a stale socket; it is left alone", path.display())]
    SocketPathTaken { path: PathBuf, kind: &'static str },
    #[error("socket path {} is in use: a process listens on it", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot check the socket path {}", path.display())]
    SocketPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to start a QEMU process beyond its program and arguments. The default is what [`QemuProcess::spawn`]
/// does: as ourselves, in our working directory, appending to the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpawnOptions {
    /// Run the process as this (uid, gid): a destination must run as its source's user, or it could not open the
    /// source's disk images (too few rights) or would own files the VM's user cannot (too many). When we are root,
    /// the standard library also clears the supplementary groups before `setuid`, so the child keeps none of ours.
    pub run_as: Option<(u32, u32)>,
    /// The working directory: the source's, when mirroring, so relative paths on its command line mean the same.
    pub current_dir: Option<PathBuf>,
    /// The log must not exist yet (`O_CREAT|O_EXCL`): no appending to a file someone else prepared. Only such a
    /// log is handed to `run_as` (an appended-to log keeps its owner).
    pub fresh_log: bool,
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
    /// Starts `program args…` in a session of its own, through `setsid` (a Ctrl-C aimed at us does not reach it,
    /// and the scheduler treats it as the daemon a VM is: with autogroups, a QEMU in its caller's session shares one
    /// group with every QEMU the caller started, which on these machines starved new ssh sessions on that core
    /// for over 15 s), output to `log_path`. `setsid` execs QEMU in place (the child is no group leader), so the pid
    /// is QEMU's.
    pub fn spawn(
        program: &Path,
        args: &[String],
        qmp_path: &Path,
        log_path: &Path,
    ) -> Result<QemuProcess, LaunchError> {
        Self::spawn_as(program, args, qmp_path, log_path, &SpawnOptions::default())
    }

    /// [`QemuProcess::spawn`] with a user, a working directory and a log policy. The log is opened without
    /// following a symbolic link, mode 0600, and must be a regular file: a link or FIFO planted at its path cannot
    /// redirect QEMU's output or hang us. A log run as another user is handed to that user.
    pub fn spawn_as(
        program: &Path,
        args: &[String],
        qmp_path: &Path,
        log_path: &Path,
        options: &SpawnOptions,
    ) -> Result<QemuProcess, LaunchError> {
        use std::os::unix::process::CommandExt;
        let log = open_log(log_path, options)?;
        let shown = match options.run_as {
            Some((uid, gid)) => format!("{} (as uid {uid}, gid {gid})", program.display()),
            None => program.display().to_string(),
        };
        let spawn_err = |source| LaunchError::Spawn {
            program: shown.clone(),
            source,
        };
        let mut command = Command::new("setsid");
        command
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log);
        if let Some((uid, gid)) = options.run_as {
            command.uid(uid).gid(gid);
        }
        if let Some(dir) = &options.current_dir {
            command.current_dir(dir);
        }
        let child = command.spawn().map_err(spawn_err)?;
        let pid = child.id() as i32;
        tracing::debug!(pid, program = %shown, "started QEMU");
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

fn open_log(path: &Path, options: &SpawnOptions) -> Result<std::fs::File, LaunchError> {
    use nix::fcntl::OFlag;
    let err = |source| LaunchError::Log {
        path: path.to_path_buf(),
        source,
    };
    let mut open = std::fs::OpenOptions::new();
    // O_NONBLOCK makes opening a FIFO without a reader fail instead of hang; a regular file ignores it.
    open.append(true)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits());
    if options.fresh_log {
        open.create_new(true);
    } else {
        open.create(true);
    }
    let log = open.open(path).map_err(err)?;
    let meta = log.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    // Only a log this call created is handed over: appending to someone else's file must not give it away.
    if let Some((uid, gid)) = options.run_as.filter(|_| options.fresh_log) {
        std::os::unix::fs::fchown(&log, Some(uid), Some(gid)).map_err(err)?;
    }
    Ok(log)
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

/// Who a running QEMU is: the binary it runs and the user it runs as. A destination started for it must run the
/// same binary (a wrapper script on the source's command line is already resolved by `/proc/PID/exe`) as the same
/// user, and qmigrate must never start something that is not QEMU because a socket's peer said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuIdentity {
    pub exe: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Reads [`QemuIdentity`] of `pid` from `/proc/PID/exe` (which must resolve to an existing `qemu-system-*` or
/// `qemu-kvm`) and the real uid and gid in `/proc/PID/status`.
pub fn qemu_identity(pid: i32) -> Result<QemuIdentity, LaunchError> {
    let exe =
        std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| LaunchError::Exe {
            pid,
            hint: if source.kind() == std::io::ErrorKind::PermissionDenied {
                " (the process of another user can be inspected only by root)"
            } else {
                ""
            },
            source,
        })?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(LaunchError::Exe {
            pid,
            hint: " (the binary was replaced or removed after the process started)",
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    if !name.as_deref().is_some_and(is_qemu_binary_name) {
        return Err(LaunchError::NotQemu { pid, exe });
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| LaunchError::Owner { pid, source })?;
    let (uid, gid) = real_ids(&status).ok_or_else(|| LaunchError::Owner {
        pid,
        source: std::io::Error::other("no readable Uid:/Gid: lines"),
    })?;
    Ok(QemuIdentity { exe, uid, gid })
}

fn is_qemu_binary_name(name: &str) -> bool {
    name.strip_prefix("qemu-system-")
        .is_some_and(|arch| !arch.is_empty())
        || name == "qemu-kvm"
}

/// The real uid and gid (the first of the four figures on `Uid:` and `Gid:`) of a `/proc/PID/status` text.
fn real_ids(status: &str) -> Option<(u32, u32)> {
    let id = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((id("Uid:")?, id("Gid:")?))
}

/// Makes `path` ready for a QEMU that will create its QMP socket there. Nothing there, or a stale socket (its
/// listener is gone: connecting is refused, so it is removed), is fine. A socket someone listens on is refused
/// ("in use"): removing it would cut off a running VM's monitor. A symbolic link or any other file is refused and
/// left alone: a socket path in a shared directory is exactly where someone plants a link to delete our files.
pub fn prepare_socket_path(path: &Path) -> Result<(), LaunchError> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let io_err = |source| LaunchError::SocketPath {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(LaunchError::SocketSymlink {
            path: path.to_path_buf(),
        });
    }
    if !kind.is_socket() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a socket"
        };
        return Err(LaunchError::SocketPathTaken {
            path: path.to_path_buf(),
            kind,
        });
    }
    // Non-blocking: a listener whose backlog is full answers EAGAIN instead of making us wait; it is in use too.
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => Err(LaunchError::SocketInUse {
            path: path.to_path_buf(),
        }),
        Err(Errno::ECONNREFUSED) => {
            // Remove only the socket we just examined: if it was swapped meanwhile, leave the newcomer alone.
            let again = std::fs::symlink_metadata(path).map_err(io_err)?;
            if (again.dev(), again.ino()) != (meta.dev(), meta.ino())
                || !again.file_type().is_socket()
            {
                return Err(LaunchError::SocketPathTaken {
                    path: path.to_path_buf(),
                    kind: "replaced while being checked",
                });
            }
            std::fs::remove_file(path).map_err(io_err)?;
            tracing::debug!(path = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(e) => Err(io_err(e.into())),
    }
}

/// A destination's command line mirrored from its source's by [`mirror_destination`] or [`mirror_to_other_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    /// The destination's arguments (the program excluded), ending in `-incoming defer`.
    pub args: Vec<String>,
    /// Every host-local resource moved away from the source's, in command-line order: (the source's path, port or
    /// display, the destination's). The second is empty when the option was dropped. Worth reporting: a console
    /// now at `serial.log.<tag>`, or a VNC display that is gone, is something the VM's owner needs to know.
    pub rewritten: Vec<(String, String)>,
}

/// Where a mirrored destination runs, which decides what of the source's host it may reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorTarget {
    /// Beside the source (`--launch-dst`): every host-local resource must be the destination's own.
    SameHost,
    /// On another host (`migrate --to-host`): its ports, tap names and vsock CIDs are its own, but files may be on
    /// shared storage, and the source host's loopback, devices and peers are not there.
    OtherHost,
}

impl std::fmt::Display for MirrorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MirrorTarget::SameHost => "the same host",
            MirrorTarget::OtherHost => "another host",
        })
    }
}

/// Why a source's command line cannot be mirrored onto a destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot mirror `{arg}` onto a destination on {target}: {reason}")]
    Unsupported {
        arg: String,
        reason: String,
        target: MirrorTarget,
    },
    #[error("tag {tag:?} cannot name sibling paths: {reason}")]
    Tag { tag: String, reason: &'static str },
    #[error("no argument of the source's command line creates its QMP socket {path}")]
    NoSourceQmp { path: String },
}

/// PURE: the destination's arguments mirrored from the source's so that both can run on one host: the source's
/// QMP socket `source_qmp` becomes `destination_qmp`, every other socket or file QEMU creates moves to a sibling
/// named with `tag` (`P` → `P.<tag>`), listeners on TCP ports are dropped (displays) or refused, and
/// `-incoming defer` is appended. The rules, and what is refused, are in the module documentation.
pub fn mirror_destination(
    source_args: &[String],
    source_qmp: &str,
    destination_qmp: &str,
    tag: &str,
) -> Result<Mirrored, MirrorError> {
    mirror(
        source_args,
        source_qmp,
        destination_qmp,
        tag,
        MirrorTarget::SameHost,
    )
}

/// PURE: [`mirror_destination`] for a destination on another host (`migrate --to-host`; `tag` is best that
/// host's name). Paths move as on the same host (hosts may share storage), but taps (named or not), vsock CIDs
/// and listeners on a wildcard or loopback address are kept; clients of the source host's loopback are refused.
/// The rules are in the module documentation, "A destination on another host".
pub fn mirror_to_other_host(
    source_args: &[String],
    source_qmp: &str,
    destination_qmp: &str,
    tag: &str,
) -> Result<Mirrored, MirrorError> {
    mirror(
        source_args,
        source_qmp,
        destination_qmp,
        tag,
        MirrorTarget::OtherHost,
    )
}

fn mirror(
    source_args: &[String],
    source_qmp: &str,
    destination_qmp: &str,
    tag: &str,
    target: MirrorTarget,
) -> Result<Mirrored, MirrorError> {
    check_tag(tag)?;
    let mut m = Mirror {
        target,
        source_qmp: normalise(source_qmp),
        destination_qmp,
        tag,
        found_qmp: false,
        rewritten: Vec::new(),
        moved: Vec::new(),
    };
    let mut args = Vec::with_capacity(source_args.len() + 2);
    let mut i = 0;
    while i < source_args.len() {
        let flag_arg = &source_args[i];
        let Some(flag) = flag_name(flag_arg) else {
            args.push(flag_arg.clone());
            i += 1;
            continue;
        };
        match flag {
            "daemonize" => {
                i += 1;
                continue;
            }
            "snapshot" => return Err(m.refuse(flag_arg, SNAPSHOT)),
            // On another host, -s (-gdb tcp::1234, every address) listens on that host's port: kept.
            "s" if target == MirrorTarget::SameHost => {
                return Err(m.refuse(
                    flag_arg,
                    "it is -gdb tcp::1234, a TCP port the source holds",
                ))
            }
            _ => {}
        }
        let Some(value) = source_args.get(i + 1).filter(|_| takes_value(flag)) else {
            args.push(flag_arg.clone());
            i += 1;
            continue;
        };
        let arg = format!("{flag_arg} {value}");
        if let Some(new) = m.value(flag, value, &arg)? {
            args.push(flag_arg.clone());
            args.push(new);
        }
        i += 2;
    }
    args.push("-incoming".into());
    args.push("defer".into());
    m.finish()?;
    Ok(Mirrored {
        args,
        rewritten: m.rewritten,
    })
}

const SNAPSHOT: &str =
    "snapshot mode keeps the guest's writes in a temporary overlay only the source can see";
const PIPE: &str =
    "a FIFO carries one stream: the destination would take the source's data, and a renamed \
    FIFO would not exist";
const PASSED_FD: &str = "it refers to a file descriptor the destination does not inherit";
const OPAQUE: &str = "the mirror cannot see which host resources it creates";

fn check_tag(tag: &str) -> Result<(), MirrorError> {
    let reason = if tag.is_empty() {
        "it is empty"
    } else if !tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        "only ASCII letters, digits, '-', '_' and '.' are allowed"
    } else {
        return Ok(());
    };
    Err(MirrorError::Tag {
        tag: tag.to_string(),
        reason,
    })
}

/// `-name` or `--name` → `name`; anything else is a positional argument (a disk image) or a value.
fn flag_name(arg: &str) -> Option<&str> {
    let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    (!name.is_empty()).then_some(name)
}

/// The flags [`Mirror::value`] looks at, all of which take a value, and common flags whose free-form value might
/// start with `-`. Other flags pass through untouched, their values with them (passed on as positionals).
fn takes_value(flag: &str) -> bool {
    matches!(
        flag,
        "append"
            | "name"
            | "fw_cfg"
            | "smbios"
            | "boot"
            | "machine"
            | "M"
            | "cpu"
            | "accel"
            | "global"
            | "mon"
            | "qmp"
            | "qmp-pretty"
            | "monitor"
            | "serial"
            | "parallel"
            | "debugcon"
            | "qtest"
            | "gdb"
            | "chardev"
            | "D"
            | "qtest-log"
            | "trace"
            | "pidfile"
            | "loadvm"
            | "incoming"
            | "vnc"
            | "display"
            | "spice"
            | "netdev"
            | "nic"
            | "net"
            | "device"
            | "object"
            | "drive"
            | "tpmdev"
            | "audiodev"
            | "audio"
            | "readconfig"
            | "add-fd"
            | "set"
    )
}

/// Lexical normalisation for comparing paths: no `.` components, no repeated or trailing slashes. `..` is kept,
/// since resolving it needs the file system (symbolic links).
fn normalise(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// QEMU's boolean spellings; `server` alone parses as `server=on`.
fn is_on(value: &str) -> bool {
    matches!(value, "on" | "yes" | "true" | "y")
}

/// A TCP or UDP port that is bound for real (0 asks the kernel for a free one, which cannot clash).
fn is_fixed_port(port: &str) -> bool {
    !port.is_empty() && port != "0"
}

/// One element of a QEMU `key=value,…` option string.
#[derive(Debug, Clone)]
struct Opt {
    key: String,
    value: String,
    /// The first element given without `key=` (QEMU's "implied" key, e.g. the backend of `-chardev`).
    implied: bool,
    /// The element as written; `None` once changed, so it is written back from `key` and `value`.
    raw: Option<String>,
}

/// A QEMU option string, parsed as `util/qemu-option.c` does (`,,` is a literal comma; a bare `name` is
/// `name=on` and a bare `noname` is `name=off`), written back unchanged except for the elements set.
#[derive(Debug, Clone, Default)]
struct Opts {
    items: Vec<Opt>,
    changed: bool,
}

impl Opts {
    fn parse(text: &str, implied: Option<&str>) -> Opts {
        let mut items = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
            let (key, value, used, implied_here) = if rest[name_len..].starts_with('=') {
                let (value, used) = opt_value(&rest[name_len + 1..]);
                (
                    rest[..name_len].to_string(),
                    value,
                    name_len + 1 + used,
                    false,
                )
            } else if let Some(first) = implied.filter(|_| items.is_empty()) {
                let (value, used) = opt_value(rest);
                (first.to_string(), value, used, true)
            } else {
                let name = &rest[..name_len];
                match name.strip_prefix("no") {
                    Some(off) => (off.to_string(), "off".to_string(), name_len, false),
                    None => (name.to_string(), "on".to_string(), name_len, false),
                }
            };
            items.push(Opt {
                key,
                value,
                implied: implied_here,
                raw: Some(rest[..used].to_string()),
            });
            rest = rest[used..].strip_prefix(',').unwrap_or(&rest[used..]);
        }
        Opts {
            items,
            changed: false,
        }
    }

    /// A JSON option (`-device {"driver":…}`) flattened to dotted keys, only to be inspected.
    fn from_json(text: &str) -> Option<Opts> {
        fn flatten(key: &str, value: &serde_json::Value, out: &mut Vec<Opt>) {
            let join = |k: &str| {
                if key.is_empty() {
                    k.to_string()
                } else {
                    format!("{key}.{k}")
                }
            };
            let mut leaf = |v: String| {
                out.push(Opt {
                    key: key.to_string(),
                    value: v,
                    implied: false,
                    raw: None,
                });
            };
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        flatten(&join(k), v, out);
                    }
                }
                serde_json::Value::Array(list) => {
                    for (i, v) in list.iter().enumerate() {
                        flatten(&join(&i.to_string()), v, out);
                    }
                }
                serde_json::Value::String(s) => leaf(s.clone()),
                serde_json::Value::Bool(b) => leaf(if *b { "on" } else { "off" }.to_string()),
                serde_json::Value::Number(n) => leaf(n.to_string()),
                serde_json::Value::Null => {}
            }
        }
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        let mut items = Vec::new();
        flatten("", &value, &mut items);
        Some(Opts {
            items,
            changed: false,
        })
    }

    /// The value QEMU uses: the last one given.
    fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|o| o.key == key)
            .map(|o| o.value.as_str())
    }

    fn set(&mut self, key: &str, value: &str) {
        let mut found = false;
        for o in self.items.iter_mut().filter(|o| o.key == key) {
            o.value = value.to_string();
            o.raw = None;
            found = true;
        }
        if !found {
            self.items.push(Opt {
                key: key.to_string(),
                value: value.to_string(),
                implied: false,
                raw: None,
            });
        }
        self.changed = true;
    }

    fn render(&self) -> String {
        let elements: Vec<String> = self
            .items
            .iter()
            .map(|o| match (&o.raw, o.implied) {
                (Some(raw), _) => raw.clone(),
                (None, true) => o.value.replace(',', ",,"),
                (None, false) => format!("{}={}", o.key, o.value.replace(',', ",,")),
            })
            .collect();
        elements.join(",")
    }
}

/// An option value up to the next single comma (`,,` is a literal comma), and how many bytes it used.
fn opt_value(text: &str) -> (String, usize) {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if chars.peek().is_some_and(|(_, n)| *n == ',') {
                chars.next();
            } else {
                return (value, i);
            }
        }
        value.push(c);
    }
    (value, text.len())
}

/// The state of one mirroring: what moved, to check at the end that nothing moved onto something else.
struct Mirror<'a> {
    target: MirrorTarget,
    source_qmp: String,
    destination_qmp: &'a str,
    tag: &'a str,
    found_qmp: bool,
    rewritten: Vec<(String, String)>,
    /// (the source's path normalised, the destination's normalised, the argument).
    moved: Vec<(String, String, String)>,
}

impl Mirror<'_> {
    fn refuse(&self, arg: &str, reason: impl Into<String>) -> MirrorError {
        MirrorError::Unsupported {
            arg: arg.to_string(),
            reason: reason.into(),
            target: self.target,
        }
    }

    fn other_host(&self) -> bool {
        self.target == MirrorTarget::OtherHost
    }

    fn host_device(&self) -> &'static str {
        if self.other_host() {
            "a host device is the source host's own hardware: the one at that path or address on another host is \
             different, and the guest's state in it does not migrate"
        } else {
            "a host device can be held by one process only"
        }
    }

    fn client_socket(&self) -> &'static str {
        if self.other_host() {
            "QEMU connects to this socket as a client: its peer (a vhost-user backend, virtiofsd, passt, swtpm, …) \
             runs on the source's host, and nothing starts one on another host"
        } else {
            "QEMU connects to this socket as a client: it belongs to a peer (a vhost-user backend, virtiofsd, passt, \
             swtpm, …) that usually serves one connection, and a renamed path would not exist"
        }
    }

    /// A TCP or UDP listener on `host:port` (`host` empty: every address). On the same host a fixed port is the
    /// source's. On another host the port is that host's own and the service moves with the guest, unless the
    /// address is one of the source's host, which the destination could not bind.
    fn listener(&self, arg: &str, proto: &str, host: &str, port: &str) -> Result<(), MirrorError> {
        if !is_fixed_port(port) {
            return Ok(());
        }
        let verb = if proto == "UDP" {
            "binds"
        } else {
            "listens on"
        };
        if !self.other_host() {
            return Err(self.refuse(
                arg,
                format!("it {verb} {proto} port {port}, which the source holds"),
            ));
        }
        if is_host_address(host) {
            return Err(self.refuse(
                arg,
                format!(
                    "it {verb} {proto} port {port} of {host}, an address of the source's host that another \
                     host cannot bind"
                ),
            ));
        }
        Ok(())
    }

    /// A TCP or UDP client of `host` (empty: this host). On another host the source host's loopback is not where
    /// the peer is; other addresses are reached from there as well.
    fn client(&self, arg: &str, host: &str) -> Result<(), MirrorError> {
        if self.other_host() && (host.is_empty() || is_loopback(host)) {
            let shown = if host.is_empty() { "localhost" } else { host };
            return Err(self.refuse(
                arg,
                format!(
                    "it connects to {shown}, the source's own host: on another host nothing, or something else, \
                     listens there"
                ),
            ));
        }
        Ok(())
    }

    /// A listener that carries the guest's network to one peer (`-netdev socket,listen=`, `stream,server=on`, a
    /// local UDP port): on another host the peer still reaches for the source's host.
    fn peer_link(&self, arg: &str, port: &str) -> MirrorError {
        if self.other_host() {
            self.refuse(
                arg,
                format!(
                    "its peer reaches it at port {port} of the source's host and does not reconnect elsewhere: \
                     the guest would lose this network"
                ),
            )
        } else {
            self.refuse(
                arg,
                format!("it listens on port {port}, which the source holds"),
            )
        }
    }

    /// The destination's value for `-flag value`, or `None` to drop the option.
    fn value(&mut self, flag: &str, value: &str, arg: &str) -> Result<Option<String>, MirrorError> {
        let new = match flag {
            "qmp" | "qmp-pretty" | "monitor" | "serial" | "parallel" | "debugcon" | "qtest" => {
                self.chardev_spec(arg, value, false)?
            }
            // The gdbstub forces server=on onto a tcp: device.
            "gdb" => self.chardev_spec(arg, value, true)?,
            "chardev" => self.with_opts(arg, value, Some("backend"), |m, o| m.chardev(arg, o))?,
            "D" | "qtest-log" => self.file(arg, value)?,
            "trace" => self.with_opts(arg, value, Some("enable"), |m, o| {
                m.file_key(arg, o, "file")
            })?,
            "pidfile" | "loadvm" => {
                self.rewritten.push((value.to_string(), String::new()));
                return Ok(None);
            }
            "incoming" => {
                // A source that was itself a destination says `-incoming defer`: nothing changes.
                if value != "defer" {
                    self.rewritten.push((value.to_string(), "defer".into()));
                }
                return Ok(None);
            }
            "vnc" => self.vnc(arg, value)?,
            "display" => match value.strip_prefix("vnc=") {
                Some(vnc) => format!("vnc={}", self.vnc(arg, vnc)?),
                None => value.to_string(),
            },
            "spice" => self.with_opts(arg, value, None, |m, o| m.spice(arg, o))?,
            "netdev" | "nic" | "net" => {
                self.with_opts(arg, value, Some("type"), |m, o| m.netdev(arg, o))?
            }
            "device" => self.with_opts(arg, value, Some("driver"), |m, o| m.device(arg, o))?,
            "object" => self.with_opts(arg, value, Some("qom-type"), |m, o| m.object(arg, o))?,
            "drive" => self.with_opts(arg, value, None, |m, o| {
                if o.get("snapshot").is_some_and(is_on) {
                    return Err(m.refuse(arg, SNAPSHOT));
                }
                Ok(())
            })?,
            "tpmdev" => self.with_opts(arg, value, Some("type"), |m, o| {
                if o.get("type") == Some("passthrough") {
                    return Err(m.refuse(arg, m.host_device()));
                }
                Ok(())
            })?,
            "audiodev" | "audio" => self.with_opts(arg, value, Some("driver"), |m, o| {
                if o.get("driver") == Some("wav") {
                    // Without a path, wav writes qemu.wav in the working directory: the source's file.
                    let path = o.get("path").unwrap_or("qemu.wav").to_string();
                    let new = m.file(arg, &path)?;
                    o.set("path", &new);
                }
                Ok(())
            })?,
            "readconfig" | "set" => return Err(self.refuse(arg, OPAQUE)),
            "add-fd" => return Err(self.refuse(arg, PASSED_FD)),
            _ => value.to_string(),
        };
        Ok(Some(new))
    }

    /// Applies `rule` to an option string (or a JSON object, which may be checked but not edited).
    fn with_opts(
        &mut self,
        arg: &str,
        value: &str,
        implied: Option<&str>,
        rule: impl FnOnce(&mut Self, &mut Opts) -> Result<(), MirrorError>,
    ) -> Result<String, MirrorError> {
        if value.trim_start().starts_with('{') {
            let mut opts = Opts::from_json(value)
                .ok_or_else(|| self.refuse(arg, "its JSON does not parse"))?;
            rule(self, &mut opts)?;
            if opts.changed {
                return Err(self.refuse(
                    arg,
                    "a path in its JSON form would have to be rewritten, which the mirror does not do",
                ));
            }
            return Ok(value.to_string());
        }
        let mut opts = Opts::parse(value, implied);
        rule(self, &mut opts)?;
        Ok(if opts.changed {
            opts.render()
        } else {
            value.to_string()
        })
    }

    /// The legacy chardev syntax of `-serial`, `-monitor`, `-qmp`, …: `file:P`, `unix:P,opts`, `tcp:H:P,opts`, …
    fn chardev_spec(
        &mut self,
        arg: &str,
        spec: &str,
        implicit_server: bool,
    ) -> Result<String, MirrorError> {
        let (mux, rest) = match spec.strip_prefix("mon:") {
            Some(rest) => ("mon:", rest),
            None => ("", spec),
        };
        let new = if matches!(
            rest,
            "none" | "null" | "pty" | "stdio" | "msmouse" | "wctablet" | "braille" | "testdev"
        ) || rest.starts_with("vc")
            || rest.starts_with("chardev:")
        {
            rest.to_string()
        } else if let Some(path) = rest.strip_prefix("file:") {
            // QEMU takes everything after file: as the path, commas included.
            format!("file:{}", self.file(arg, path)?)
        } else if rest.starts_with("pipe:") {
            return Err(self.refuse(arg, PIPE));
        } else if let Some(opts) = rest.strip_prefix("unix:") {
            let mut opts = Opts::parse(opts, Some("path"));
            self.socket(arg, &mut opts, implicit_server)?;
            self.file_key(arg, &mut opts, "logfile")?;
            format!("unix:{}", opts.render())
        } else if let Some((scheme, tail)) = ["tcp:", "telnet:", "tn3270:", "websocket:"]
            .iter()
            .find_map(|s| rest.strip_prefix(s).map(|t| (s, t)))
        {
            let (address, opts) = tail.split_once(',').unwrap_or((tail, ""));
            let mut opts = Opts::parse(opts, None);
            let (host, port) = split_host_port(address);
            if opts.get("server").map_or(implicit_server, is_on) {
                self.listener(arg, "TCP", host, port)?;
            } else {
                self.client(arg, host)?;
            }
            self.file_key(arg, &mut opts, "logfile")?;
            if opts.changed {
                format!("{scheme}{address},{}", opts.render())
            } else {
                rest.to_string()
            }
        } else if let Some(udp) = rest.strip_prefix("udp:") {
            // udp:[remote_host]:remote_port[@[src_ip]:src_port]
            let udp = udp.split(',').next().unwrap_or("");
            let (remote, local) = match udp.split_once('@') {
                Some((remote, local)) => (remote, Some(local)),
                None => (udp, None),
            };
            if let Some(local) = local {
                let (host, port) = split_host_port(local);
                self.listener(arg, "UDP", host, port)?;
            }
            self.client(arg, split_host_port(remote).0)?;
            rest.to_string()
        } else if rest.starts_with("/dev/") {
            return Err(self.refuse(arg, self.host_device()));
        } else {
            return Err(self.refuse(
                arg,
                "this character device is not known to be safe to share",
            ));
        };
        Ok(format!("{mux}{new}"))
    }

    /// `-chardev backend,…`.
    fn chardev(&mut self, arg: &str, opts: &mut Opts) -> Result<(), MirrorError> {
        self.file_key(arg, opts, "logfile")?;
        match opts.get("backend").unwrap_or("") {
            "socket" => self.socket(arg, opts, false),
            "file" => self.file_key(arg, opts, "path"),
            "pipe" => Err(self.refuse(arg, PIPE)),
            "serial" | "tty" | "parallel" | "parport" => Err(self.refuse(arg, self.host_device())),
            "udp" => {
                if let Some(port) = opts.get("localport") {
                    self.listener(arg, "UDP", opts.get("localaddr").unwrap_or(""), port)?;
                }
                // QEMU sends to localhost when no host is given.
                self.client(arg, opts.get("host").unwrap_or(""))
            }
            "null" | "pty" | "stdio" | "vc" | "ringbuf" | "memory" | "msmouse" | "wctablet"
            | "braille" | "testdev" | "spicevmc" | "spiceport" | "qemu-vdagent" | "dbus"
            | "hub" => Ok(()),
            other => Err(self.refuse(
                arg,
                format!("chardev backend {other:?} is not known to be safe to share"),
            )),
        }
    }

    /// A socket chardev, in option form (`path=`, `host=`/`port=`, `server=`, `fd=`); `logfile=` is the caller's.
    fn socket(
        &mut self,
        arg: &str,
        opts: &mut Opts,
        implicit_server: bool,
    ) -> Result<(), MirrorError> {
        if opts.get("fd").is_some() {
            return Err(self.refuse(arg, PASSED_FD));
        }
        let server = opts.get("server").map_or(implicit_server, is_on);
        let host = opts.get("host").unwrap_or("");
        if let Some(path) = opts.get("path").map(str::to_string) {
            if !server {
                return Err(self.refuse(arg, self.client_socket()));
            }
            let new = self.socket_path(arg, &path)?;
            opts.set("path", &new);
        } else if server {
            self.listener(arg, "TCP", host, opts.get("port").unwrap_or(""))?;
        } else if opts.get("port").is_some() {
            self.client(arg, host)?;
        }
        Ok(())
    }

    /// `-vnc` and `-display vnc=`: a UNIX socket moves; a TCP display becomes `none` on the same host, and on
    /// another host when it is bound to an address of the source's host.
    fn vnc(&mut self, arg: &str, value: &str) -> Result<String, MirrorError> {
        let mut opts = Opts::parse(value, Some("vnc"));
        let display = opts.get("vnc").unwrap_or("").to_string();
        if display == "none" {
            return Ok(value.to_string());
        }
        // websocket=on takes the display's address; websocket=[HOST:]PORT names its own.
        let websocket = opts
            .get("websocket")
            .filter(|w| *w != "off")
            .map(|w| split_host_port(if w == "on" { "" } else { w }))
            .map(|(host, port)| (host.to_string(), port.to_string()));
        if let Some(path) = display.strip_prefix("unix:") {
            if let Some((host, port)) = &websocket {
                if !self.other_host() {
                    return Err(
                        self.refuse(arg, "its websocket listens on a TCP port the source holds")
                    );
                }
                self.listener(arg, "TCP", host, port)?;
            }
            let new = self.socket_path(arg, path)?;
            opts.set("vnc", &format!("unix:{new}"));
            return Ok(opts.render());
        }
        let host = split_host_port(&display).0;
        let ws_host = websocket.as_ref().map_or("", |(h, _)| h.as_str());
        if self.other_host() && !is_host_address(host) && !is_host_address(ws_host) {
            return Ok(value.to_string());
        }
        self.rewritten.push((value.to_string(), "none".into()));
        Ok("none".into())
    }

    fn spice(&mut self, arg: &str, opts: &mut Opts) -> Result<(), MirrorError> {
        let unix = opts.get("unix").is_some_and(is_on);
        let addr = if unix {
            ""
        } else {
            opts.get("addr").unwrap_or("")
        };
        for key in ["port", "tls-port"] {
            if let Some(port) = opts.get(key).filter(|p| is_fixed_port(p)) {
                if !self.other_host() {
                    return Err(self.refuse(
                        arg,
                        format!(
                            "{key}={port} is a TCP port the source holds, and SPICE needs a listener"
                        ),
                    ));
                }
                if is_host_address(addr) {
                    return Err(self.refuse(
                        arg,
                        format!(
                            "{key}={port} on {addr}, an address of the source's host, and SPICE needs a listener"
                        ),
                    ));
                }
            }
        }
        if unix {
            if let Some(path) = opts.get("addr").map(str::to_string) {
                let new = self.socket_path(arg, &path)?;
                opts.set("addr", &new);
            }
        }
        Ok(())
    }

    fn object(&mut self, arg: &str, opts: &mut Opts) -> Result<(), MirrorError> {
        if opts.get("fd").is_some() {
            return Err(self.refuse(arg, PASSED_FD));
        }
        match opts.get("qom-type").unwrap_or("") {
            "memory-backend-file" if opts.get("share").is_some_and(is_on) => Err(self.refuse(
                arg,
                "guest RAM in a shared file: the incoming migration would overwrite the source's memory",
            )),
            "filter-dump" => self.file_key(arg, opts, "file"),
            "input-linux" => Err(self.refuse(arg, self.host_device())),
            _ => Ok(()),
        }
    }

    /// Moves the file named by `key`, if given.
    fn file_key(&mut self, arg: &str, opts: &mut Opts, key: &str) -> Result<(), MirrorError> {
        if let Some(path) = opts.get(key).map(str::to_string) {
            let new = self.file(arg, &path)?;
            opts.set(key, &new);
        }
        Ok(())
    }

    /// A file QEMU writes: `P` → `P.<tag>`.
    /// `/dev/null` and our own output streams stay; other device nodes are refused (a sibling would be a new
    /// file in /dev), except in the tmpfs directories under /dev.
    fn file(&mut self, arg: &str, path: &str) -> Result<String, MirrorError> {
        let normal = normalise(path);
        if matches!(normal.as_str(), "/dev/null" | "/dev/stdout" | "/dev/stderr") {
            return Ok(path.to_string());
        }
        if normal.starts_with("/dev/")
            && !normal.starts_with("/dev/shm/")
            && !normal.starts_with("/dev/hugepages/")
        {
            return Err(self.refuse(arg, self.host_device()));
        }
        let new = format!("{path}.{}", self.tag);
        self.moved(arg, path, &new);
        Ok(new)
    }

    /// A socket QEMU listens on: the source's QMP socket → the destination's; any other `P` → `P.<tag>`.
    fn socket_path(&mut self, arg: &str, path: &str) -> Result<String, MirrorError> {
        let new = if normalise(path) == self.source_qmp {
            self.found_qmp = true;
            self.destination_qmp.to_string()
        } else {
            format!("{path}.{}", self.tag)
        };
        if new.len() > UNIX_PATH_MAX {
            return Err(self.refuse(
                arg,
                format!(
                    "the new socket path {new} is longer than the {UNIX_PATH_MAX} bytes of a UNIX socket address"
                ),
            ));
        }
        self.moved(arg, path, &new);
        Ok(new)
    }

    fn moved(&mut self, arg: &str, old: &str, new: &str) {
        self.rewritten.push((old.to_string(), new.to_string()));
        self.moved
            .push((normalise(old), normalise(new), arg.to_string()));
    }

    /// The QMP socket was found, and no new path is one the source uses or another new path.
    fn finish(&self) -> Result<(), MirrorError> {
        if !self.found_qmp {
            return Err(MirrorError::NoSourceQmp {
                path: self.source_qmp.clone(),
            });
        }
        for (i, (_, new, arg)) in self.moved.iter().enumerate() {
            if self.moved.iter().any(|(old, _, _)| old == new) {
                return Err(self.refuse(arg, format!("its new path {new} is one the source uses")));
            }
            if self.moved[..i].iter().any(|(_, other, _)| other == new) {
                return Err(self.refuse(
                    arg,
                    format!("its new path {new} is given to another argument too"),
                ));
            }
        }
        Ok(())
    }

    /// `-netdev`, `-nic` and `-net`: what a second process can share with the source.
    fn netdev(&self, arg: &str, opts: &Opts) -> Result<(), MirrorError> {
        if ["fd", "fds", "vhostfd", "vhostfds", "sock_fd"]
            .iter()
            .any(|k| opts.get(k).is_some())
        {
            return Err(self.refuse(arg, PASSED_FD));
        }
        match opts.get("type").unwrap_or("") {
            "user" => {
                // hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport, given once or more (or as a JSON list).
                for fwd in opts.items.iter().filter(|o| o.key.starts_with("hostfwd")) {
                    let host_side = fwd.value.split('-').next().unwrap_or("");
                    let mut parts = host_side.rsplitn(3, ':');
                    let port = parts.next().unwrap_or("");
                    let addr = parts.next().unwrap_or("");
                    let proto = if parts.next() == Some("udp") {
                        "UDP"
                    } else {
                        "TCP"
                    };
                    self.listener(arg, proto, addr, port)?;
                }
                Ok(())
            }
            "tap" => {
                let named = opts.get("ifname").is_some();
                let no_script = opts
                    .get("script")
                    .is_some_and(|s| s.is_empty() || s == "no");
                if named && !self.other_host() {
                    Err(self.refuse(
                        arg,
                        "a named tap belongs to one process: the destination needs its own",
                    ))
                } else if named {
                    // The name is free on another host: the destination's tap is made there under it, attached by
                    // the same script (or, with script=no, prepared there beforehand, as the source's was).
                    Ok(())
                } else if no_script {
                    Err(self.refuse(
                        arg,
                        "with script=no nothing would connect the destination's new tap",
                    ))
                } else {
                    // A fresh tap, attached by the same script as the source's: two ports on the bridge, one active.
                    Ok(())
                }
            }
            "socket" => {
                if let Some(listen) = opts.get("listen") {
                    return Err(self.peer_link(arg, split_host_port(listen).1));
                }
                if let Some(local) = opts.get("localaddr") {
                    let port = split_host_port(local).1;
                    if is_fixed_port(port) {
                        return Err(self.peer_link(arg, port));
                    }
                }
                for key in ["connect", "udp"] {
                    if let Some(peer) = opts.get(key) {
                        self.client(arg, split_host_port(peer).0)?;
                    }
                }
                Ok(())
            }
            "stream" => {
                let server = opts.get("server").is_some_and(is_on);
                match opts.get("addr.type") {
                    Some("inet") if server => {
                        Err(self.peer_link(arg, opts.get("addr.port").unwrap_or("")))
                    }
                    Some("inet") => self.client(arg, opts.get("addr.host").unwrap_or("")),
                    Some("unix") if !server => Err(self.refuse(arg, self.client_socket())),
                    Some("unix") => Err(self.refuse(
                        arg,
                        "its listening socket would move, and its peer would not find it",
                    )),
                    Some("fd") => Err(self.refuse(arg, PASSED_FD)),
                    _ => Ok(()),
                }
            }
            "dgram" => {
                match opts.get("local.type") {
                    Some("inet") => {
                        if let Some(port) = opts.get("local.port").filter(|p| is_fixed_port(p)) {
                            return Err(self.peer_link(arg, port));
                        }
                    }
                    Some("unix") => {
                        return Err(self.refuse(
                            arg,
                            "its bound socket would move, and its peer would not find it",
                        ))
                    }
                    Some("fd") => return Err(self.refuse(arg, PASSED_FD)),
                    _ => {}
                }
                if opts.get("remote.type") == Some("inet") {
                    self.client(arg, opts.get("remote.host").unwrap_or(""))?;
                }
                Ok(())
            }
            "bridge" | "vde" | "hubport" | "none" | "nic" | "vhost-user" => Ok(()),
            other => Err(self.refuse(
                arg,
                format!("netdev type {other:?} is not known to be safe to share"),
            )),
        }
    }

    /// `-device`: drivers that hold a host device, or an id unique on the host.
    fn device(&self, arg: &str, opts: &Opts) -> Result<(), MirrorError> {
        let driver = opts.get("driver").unwrap_or("");
        // On another host the guest keeps its CID: the source's host holds it, not that one.
        if (driver.starts_with("vhost-vsock") || driver.starts_with("vhost-user-vsock"))
            && !self.other_host()
        {
            return Err(self.refuse(
                arg,
                "a vsock guest-cid is unique on the host, and the source holds it",
            ));
        }
        if driver.starts_with("vfio-")
            || driver.starts_with("vhost-scsi")
            || matches!(driver, "usb-host" | "u2f-passthru" | "pci-assign")
        {
            return Err(self.refuse(arg, self.host_device()));
        }
        Ok(())
    }
}

/// `host:port` → (the host without brackets, the port); a bare `port` has an empty host (every address).
fn split_host_port(address: &str) -> (&str, &str) {
    match address.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => ("", address),
    }
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "ip6-localhost" | "::1") || host.starts_with("127.")
}

/// An address only one host has: not a wildcard (empty, `0.0.0.0`, `::`) and not loopback. A host name counts:
/// it names one host's address.
fn is_host_address(host: &str) -> bool {
    !matches!(host, "" | "0.0.0.0" | "::") && !is_loopback(host)
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

    const SRC: &str = "/run/vm/a.sock";
    const DST: &str = "/run/vm/b.sock";
    const QMP: [&str; 2] = ["-qmp", "unix:/run/vm/a.sock,server=on,wait=off"];
    const QMP_DST: [&str; 2] = ["-qmp", "unix:/run/vm/b.sock,server=on,wait=off"];

    /// Mirrors `QMP + extra` with tag `dst`.
    fn mirror(extra: &[&str]) -> Result<Mirrored, MirrorError> {
        let mut args = v(&QMP);
        args.extend(v(extra));
        mirror_destination(&args, SRC, DST, "dst")
    }

    /// [`mirror`] for a destination on another host.
    fn mirror_other(extra: &[&str]) -> Result<Mirrored, MirrorError> {
        let mut args = v(&QMP);
        args.extend(v(extra));
        mirror_to_other_host(&args, SRC, DST, "dst")
    }

    #[test]
    fn mirror_rewrites_table() {
        // (case, extra source arguments, the destination's arguments after QMP_DST and before -incoming defer,
        //  the rewrites after the QMP socket's)
        #[allow(clippy::type_complexity)]
        let table: &[(&str, &[&str], &[&str], &[(&str, &str)])] = &[
            (
                "nothing else",
                &["-m", "256", "-nodefaults"],
                &["-m", "256", "-nodefaults"],
                &[],
            ),
            (
                "second -qmp monitor, short-form booleans",
                &["-qmp", "unix:/run/vm/other.sock,server,nowait"],
                &["-qmp", "unix:/run/vm/other.sock.dst,server,nowait"],
                &[("/run/vm/other.sock", "/run/vm/other.sock.dst")],
            ),
            (
                "-qmp-pretty",
                &["-qmp-pretty", "unix:/run/vm/p.sock,server=on,wait=off"],
                &["-qmp-pretty", "unix:/run/vm/p.sock.dst,server=on,wait=off"],
                &[("/run/vm/p.sock", "/run/vm/p.sock.dst")],
            ),
            (
                "HMP -monitor socket",
                &["-monitor", "unix:/run/vm/hmp.sock,server=on,wait=off"],
                &["-monitor", "unix:/run/vm/hmp.sock.dst,server=on,wait=off"],
                &[("/run/vm/hmp.sock", "/run/vm/hmp.sock.dst")],
            ),
            (
                "-serial file:",
                &["-serial", "file:/var/log/vm/serial.log"],
                &["-serial", "file:/var/log/vm/serial.log.dst"],
                &[("/var/log/vm/serial.log", "/var/log/vm/serial.log.dst")],
            ),
            (
                "-serial mon:stdio, chardev:, none, pty kept",
                &[
                    "-serial",
                    "mon:stdio",
                    "-serial",
                    "chardev:s1",
                    "-parallel",
                    "none",
                    "-serial",
                    "pty",
                ],
                &[
                    "-serial",
                    "mon:stdio",
                    "-serial",
                    "chardev:s1",
                    "-parallel",
                    "none",
                    "-serial",
                    "pty",
                ],
                &[],
            ),
            (
                "-chardev file",
                &["-chardev", "file,id=s0,path=/var/log/s.log,append=on"],
                &["-chardev", "file,id=s0,path=/var/log/s.log.dst,append=on"],
                &[("/var/log/s.log", "/var/log/s.log.dst")],
            ),
            (
                "-chardev socket path (server)",
                &[
                    "-chardev",
                    "socket,id=c,path=/run/vm/console.sock,server=on,wait=off",
                ],
                &[
                    "-chardev",
                    "socket,id=c,path=/run/vm/console.sock.dst,server=on,wait=off",
                ],
                &[("/run/vm/console.sock", "/run/vm/console.sock.dst")],
            ),
            (
                "socket chardev with a logfile, both forms",
                &[
                    "-chardev",
                    "socket,id=c,path=/run/c.sock,server=on,logfile=/run/c.log",
                    "-serial",
                    "unix:/run/s.sock,server=on,logfile=/run/s.log",
                ],
                &[
                    "-chardev",
                    "socket,id=c,path=/run/c.sock.dst,server=on,logfile=/run/c.log.dst",
                    "-serial",
                    "unix:/run/s.sock.dst,server=on,logfile=/run/s.log.dst",
                ],
                &[
                    ("/run/c.log", "/run/c.log.dst"),
                    ("/run/c.sock", "/run/c.sock.dst"),
                    ("/run/s.sock", "/run/s.sock.dst"),
                    ("/run/s.log", "/run/s.log.dst"),
                ],
            ),
            (
                "chardev logfile=",
                &["-chardev", "stdio,id=x,logfile=/var/log/x.log,logappend=on"],
                &[
                    "-chardev",
                    "stdio,id=x,logfile=/var/log/x.log.dst,logappend=on",
                ],
                &[("/var/log/x.log", "/var/log/x.log.dst")],
            ),
            (
                "-D",
                &["-D", "/var/log/qemu.log", "-d", "guest_errors"],
                &["-D", "/var/log/qemu.log.dst", "-d", "guest_errors"],
                &[("/var/log/qemu.log", "/var/log/qemu.log.dst")],
            ),
            (
                "-pidfile dropped",
                &["-pidfile", "/run/vm.pid"],
                &[],
                &[("/run/vm.pid", "")],
            ),
            (
                "--pidfile dropped",
                &["--pidfile", "/run/vm.pid", "-name", "vm1"],
                &["-name", "vm1"],
                &[("/run/vm.pid", "")],
            ),
            ("-daemonize dropped", &["-daemonize", "-S"], &["-S"], &[]),
            (
                "-incoming tcp dropped",
                &["-incoming", "tcp:0:4444"],
                &[],
                &[("tcp:0:4444", "defer")],
            ),
            (
                "-loadvm dropped",
                &["-loadvm", "snap1"],
                &[],
                &[("snap1", "")],
            ),
            (
                "-vnc display",
                &["-vnc", ":1"],
                &["-vnc", "none"],
                &[(":1", "none")],
            ),
            (
                "-vnc host:port with options",
                &["-vnc", "127.0.0.1:5901,password=on"],
                &["-vnc", "none"],
                &[("127.0.0.1:5901,password=on", "none")],
            ),
            ("-vnc none kept", &["-vnc", "none"], &["-vnc", "none"], &[]),
            (
                "-vnc unix:",
                &["-vnc", "unix:/run/vm/vnc.sock,password=on"],
                &["-vnc", "unix:/run/vm/vnc.sock.dst,password=on"],
                &[("/run/vm/vnc.sock", "/run/vm/vnc.sock.dst")],
            ),
            (
                "-display vnc=",
                &["-display", "vnc=:2"],
                &["-display", "vnc=none"],
                &[(":2", "none")],
            ),
            (
                "-display vnc=unix:",
                &["-display", "vnc=unix:/run/v.sock"],
                &["-display", "vnc=unix:/run/v.sock.dst"],
                &[("/run/v.sock", "/run/v.sock.dst")],
            ),
            (
                "-display none kept",
                &["-display", "none"],
                &["-display", "none"],
                &[],
            ),
            (
                "-spice on a UNIX socket",
                &[
                    "-spice",
                    "unix=on,addr=/run/vm/spice.sock,disable-ticketing=on",
                ],
                &[
                    "-spice",
                    "unix=on,addr=/run/vm/spice.sock.dst,disable-ticketing=on",
                ],
                &[("/run/vm/spice.sock", "/run/vm/spice.sock.dst")],
            ),
            (
                "path with spaces",
                &["-serial", "file:/var/log/my vm/serial.log"],
                &["-serial", "file:/var/log/my vm/serial.log.dst"],
                &[("/var/log/my vm/serial.log", "/var/log/my vm/serial.log.dst")],
            ),
            (
                "escaped comma in an option value",
                &["-chardev", "file,id=s,path=/var/log/a,,b.log"],
                &["-chardev", "file,id=s,path=/var/log/a,,b.log.dst"],
                &[("/var/log/a,b.log", "/var/log/a,b.log.dst")],
            ),
            (
                "literal comma after file:",
                &["-serial", "file:/var/log/a,b.log"],
                &["-serial", "file:/var/log/a,b.log.dst"],
                &[("/var/log/a,b.log", "/var/log/a,b.log.dst")],
            ),
            (
                "disks kept (shared storage)",
                &[
                    "-drive",
                    "file=/var/lib/vm.qcow2,if=virtio,snapshot=off",
                    "-blockdev",
                    "driver=file,node-name=f,filename=/x.img",
                    "disk.img",
                ],
                &[
                    "-drive",
                    "file=/var/lib/vm.qcow2,if=virtio,snapshot=off",
                    "-blockdev",
                    "driver=file,node-name=f,filename=/x.img",
                    "disk.img",
                ],
                &[],
            ),
            (
                "SLIRP without fixed host ports, bridge, tap with a script",
                &[
                    "-netdev",
                    "user,id=n,hostfwd=tcp::0-:22",
                    "-netdev",
                    "bridge,id=b,br=br0",
                    "-netdev",
                    "tap,id=t,script=/etc/qemu-ifup",
                    "-nic",
                    "user,model=virtio",
                ],
                &[
                    "-netdev",
                    "user,id=n,hostfwd=tcp::0-:22",
                    "-netdev",
                    "bridge,id=b,br=br0",
                    "-netdev",
                    "tap,id=t,script=/etc/qemu-ifup",
                    "-nic",
                    "user,model=virtio",
                ],
                &[],
            ),
            (
                "TCP client and ephemeral listener kept",
                &[
                    "-serial",
                    "tcp:127.0.0.1:4444",
                    "-serial",
                    "tcp::0,server=on,wait=off",
                ],
                &[
                    "-serial",
                    "tcp:127.0.0.1:4444",
                    "-serial",
                    "tcp::0,server=on,wait=off",
                ],
                &[],
            ),
            (
                "TCP client's logfile",
                &["-serial", "tcp:127.0.0.1:4444,logfile=/l"],
                &["-serial", "tcp:127.0.0.1:4444,logfile=/l.dst"],
                &[("/l", "/l.dst")],
            ),
            (
                "-trace file=",
                &["-trace", "enable=virtio*,file=/tmp/t.log"],
                &["-trace", "enable=virtio*,file=/tmp/t.log.dst"],
                &[("/tmp/t.log", "/tmp/t.log.dst")],
            ),
            (
                "-audiodev wav path",
                &["-audiodev", "wav,id=a,path=/tmp/a.wav"],
                &["-audiodev", "wav,id=a,path=/tmp/a.wav.dst"],
                &[("/tmp/a.wav", "/tmp/a.wav.dst")],
            ),
            (
                "-audiodev wav default path",
                &["-audiodev", "wav,id=a"],
                &["-audiodev", "wav,id=a,path=qemu.wav.dst"],
                &[("qemu.wav", "qemu.wav.dst")],
            ),
            (
                "private file-backed RAM kept",
                &[
                    "-object",
                    "memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
                ],
                &[
                    "-object",
                    "memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
                ],
                &[],
            ),
            (
                "filter-dump file",
                &["-object", "filter-dump,id=f,netdev=n,file=/tmp/d.pcap"],
                &["-object", "filter-dump,id=f,netdev=n,file=/tmp/d.pcap.dst"],
                &[("/tmp/d.pcap", "/tmp/d.pcap.dst")],
            ),
            (
                "JSON -device kept",
                &[
                    "-device",
                    r#"{"driver":"virtio-net-pci","netdev":"n","id":"net0"}"#,
                ],
                &[
                    "-device",
                    r#"{"driver":"virtio-net-pci","netdev":"n","id":"net0"}"#,
                ],
                &[],
            ),
            (
                "-gdb on a UNIX socket",
                &["-gdb", "unix:/run/vm/gdb.sock,server=on,wait=off"],
                &["-gdb", "unix:/run/vm/gdb.sock.dst,server=on,wait=off"],
                &[("/run/vm/gdb.sock", "/run/vm/gdb.sock.dst")],
            ),
            (
                "unknown flags and their values pass through",
                &[
                    "-append",
                    "console=ttyS0 -serial file:/x",
                    "-L",
                    "/usr/share/qemu",
                    "-accel",
                    "kvm",
                ],
                &[
                    "-append",
                    "console=ttyS0 -serial file:/x",
                    "-L",
                    "/usr/share/qemu",
                    "-accel",
                    "kvm",
                ],
                &[],
            ),
        ];
        // A destination on another host gets the same rewrites (paths move alike: hosts may share storage),
        // except in these cases, which `mirror_to_other_host_table` covers.
        let differ_on_other_host = [
            "-vnc display",
            "-vnc host:port with options",
            "-display vnc=",
            "TCP client and ephemeral listener kept",
            "TCP client's logfile",
        ];
        for (case, extra, want, rewrites) in table {
            let got = mirror(extra).unwrap_or_else(|e| panic!("{case}: {e}"));
            let mut want_args = v(&QMP_DST);
            want_args.extend(v(want));
            want_args.extend(v(&["-incoming", "defer"]));
            assert_eq!(got.args, want_args, "{case}");
            let mut want_rewrites = vec![(SRC.to_string(), DST.to_string())];
            want_rewrites.extend(rewrites.iter().map(|(a, b)| (a.to_string(), b.to_string())));
            assert_eq!(got.rewritten, want_rewrites, "{case}");
            let other = mirror_other(extra);
            if differ_on_other_host.contains(case) {
                assert_ne!(
                    other,
                    Ok(got),
                    "{case}: listed as differing on another host"
                );
            } else {
                assert_eq!(other, Ok(got), "{case}: on another host");
            }
        }
    }

    #[test]
    fn mirror_finds_the_qmp_socket_in_any_spelling() {
        // (case, source arguments, the --from path, the destination's first two arguments)
        let table: &[(&str, &[&str], &str, &[&str])] = &[
            ("same", &QMP, SRC, &QMP_DST),
            ("./ in --from", &QMP, "/run/vm/./a.sock", &QMP_DST),
            ("// in --from", &QMP, "/run//vm/a.sock", &QMP_DST),
            (
                "./ on the command line",
                &["-qmp", "unix:/run/./vm/a.sock,server=on"],
                SRC,
                &["-qmp", "unix:/run/vm/b.sock,server=on"],
            ),
            (
                "relative, ./ in --from",
                &["-qmp", "unix:vm/a.sock,server=on"],
                "./vm/a.sock",
                &["-qmp", "unix:/run/vm/b.sock,server=on"],
            ),
            (
                "a -chardev socket for -mon",
                &[
                    "-chardev",
                    "socket,id=mon0,path=/run/vm/a.sock,server=on,wait=off",
                    "-mon",
                    "chardev=mon0,mode=control",
                ],
                SRC,
                &[
                    "-chardev",
                    "socket,id=mon0,path=/run/vm/b.sock,server=on,wait=off",
                ],
            ),
            (
                "escaped comma in the source's path",
                &["-qmp", "unix:/run/v,,m/a.sock,server=on"],
                "/run/v,m/a.sock",
                &["-qmp", "unix:/run/vm/b.sock,server=on"],
            ),
        ];
        for (case, args, from, want) in table {
            let got = mirror_destination(&v(args), from, DST, "dst")
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(&got.args[..2], &v(want)[..], "{case}");
            assert_eq!(
                got.args[got.args.len() - 2..],
                v(&["-incoming", "defer"]),
                "{case}"
            );
        }
        // A comma in the destination's path is escaped where QEMU reads option syntax.
        let got = mirror_destination(&v(&QMP), SRC, "/run/vm/b,c.sock", "dst").unwrap();
        assert_eq!(got.args[1], "unix:/run/vm/b,,c.sock,server=on,wait=off");
    }

    #[test]
    fn mirror_refusals_table() {
        // (extra source arguments, the argument the error must name, a word of its reason)
        let long = format!("unix:/{}.sock,server=on", "x".repeat(UNIX_PATH_MAX - 6));
        let table: &[(&[&str], &str, &str)] = &[
            (&["-chardev", "tty,id=t,path=/dev/ttyS0"], "-chardev tty,id=t,path=/dev/ttyS0", "host device"),
            (&["-chardev", "serial,id=t,path=/dev/ttyS0"], "-chardev serial,id=t,path=/dev/ttyS0", "host device"),
            (&["-serial", "/dev/ttyS0"], "-serial /dev/ttyS0", "host device"),
            (&["-parallel", "/dev/parport0"], "-parallel /dev/parport0", "host device"),
            (&["-chardev", "pipe,id=p,path=/tmp/fifo"], "-chardev pipe,id=p,path=/tmp/fifo", "FIFO"),
            (&["-serial", "pipe:/tmp/fifo"], "-serial pipe:/tmp/fifo", "FIFO"),
            (&["-chardev", "socket,id=v,path=/run/vhost.sock"], "-chardev socket,id=v,path=/run/vhost.sock", "client"),
            (&["-qmp", "unix:/run/other.sock"], "-qmp unix:/run/other.sock", "client"),
            (&["-chardev", "socket,id=f,fd=3,server=on"], "-chardev socket,id=f,fd=3,server=on", "file descriptor"),
            (&["-serial", "tcp::4444,server=on,wait=off"], "-serial tcp::4444,server=on,wait=off", "port 4444"),
            (&["-monitor", "telnet:127.0.0.1:5555,server,nowait"], "-monitor telnet:127.0.0.1:5555,server,nowait", "port 5555"),
            (&["-chardev", "socket,id=t,host=0.0.0.0,port=4446,server=on"], "-chardev socket,id=t,host=0.0.0.0,port=4446,server=on", "port 4446"),
            (&["-gdb", "tcp::1234"], "-gdb tcp::1234", "port 1234"),
            (&["-s"], "-s", "1234"),
            (&["-serial", "udp:127.0.0.1:6000@:6001"], "-serial udp:127.0.0.1:6000@:6001", "UDP port 6001"),
            (&["-chardev", "udp,id=u,port=6000,localport=5555"], "-chardev udp,id=u,port=6000,localport=5555", "UDP port 5555"),
            (&["-chardev", "frobnicator,id=z"], "-chardev frobnicator,id=z", "not known"),
            (&["-serial", "COM1"], "-serial COM1", "not known"),
            (&["-serial", "file:/dev/pts/3"], "-serial file:/dev/pts/3", "host device"),
            (&["-D", "/dev/fd/2"], "-D /dev/fd/2", "host device"),
            (&["-netdev", "tap,id=n,ifname=tap0,script=no,downscript=no"], "-netdev tap,id=n,ifname=tap0,script=no,downscript=no", "named tap"),
            (&["-netdev", "tap,id=n,script=no"], "-netdev tap,id=n,script=no", "script=no"),
            (&["-netdev", "tap,id=n,fd=3"], "-netdev tap,id=n,fd=3", "file descriptor"),
            (&["-netdev", "user,id=n,hostfwd=tcp::2222-:22"], "-netdev user,id=n,hostfwd=tcp::2222-:22", "port 2222"),
            (&["-nic", "user,hostfwd=tcp:127.0.0.1:8080-:80"], "-nic user,hostfwd=tcp:127.0.0.1:8080-:80", "port 8080"),
            (&["-netdev", r#"{"type":"user","id":"n","hostfwd":[{"str":"tcp::2223-:22"}]}"#], "hostfwd", "port 2223"),
            (&["-netdev", "socket,id=n,listen=:1234"], "-netdev socket,id=n,listen=:1234", "listens"),
            (&["-netdev", "stream,id=n,server=on,addr.type=inet,addr.host=0.0.0.0,addr.port=1235"], "addr.port=1235", "port 1235"),
            (&["-netdev", "stream,id=n,addr.type=unix,addr.path=/run/passt.sock"], "addr.path=/run/passt.sock", "client"),
            (&["-netdev", "dgram,id=n,local.type=inet,local.host=0.0.0.0,local.port=1236,remote.type=inet,remote.host=1.2.3.4,remote.port=1"], "local.port=1236", "port 1236"),
            (&["-netdev", "vhost-vdpa,id=n,vhostdev=/dev/vhost-vdpa-0"], "vhost-vdpa", "not known"),
            (&["-spice", "port=5900,disable-ticketing=on"], "-spice port=5900,disable-ticketing=on", "port=5900"),
            (&["-spice", "tls-port=5901,x509-dir=/etc/pki"], "-spice tls-port=5901,x509-dir=/etc/pki", "tls-port=5901"),
            (&["-vnc", "unix:/run/v.sock,websocket=5700"], "-vnc unix:/run/v.sock,websocket=5700", "websocket"),
            (&["-drive", "file=/x.qcow2,snapshot=on"], "-drive file=/x.qcow2,snapshot=on", "overlay"),
            (&["-snapshot"], "-snapshot", "overlay"),
            (&["-device", "vfio-pci,host=0000:01:00.0"], "-device vfio-pci,host=0000:01:00.0", "host device"),
            (&["-device", r#"{"driver":"vfio-pci","host":"0000:01:00.0"}"#], "vfio-pci", "host device"),
            (&["-device", "vhost-vsock-pci,guest-cid=3"], "-device vhost-vsock-pci,guest-cid=3", "guest-cid"),
            (&["-device", "usb-host,hostbus=1,hostaddr=2"], "-device usb-host,hostbus=1,hostaddr=2", "host device"),
            (&["-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/vm,share=on"], "share=on", "overwrite"),
            (&["-object", "input-linux,id=k,evdev=/dev/input/event0"], "-object input-linux", "host device"),
            (&["-object", r#"{"qom-type":"filter-dump","id":"f","netdev":"n","file":"/tmp/d.pcap"}"#], "filter-dump", "JSON"),
            (&["-tpmdev", "passthrough,id=t,path=/dev/tpm0"], "-tpmdev passthrough", "host device"),
            (&["-readconfig", "/etc/vm.cfg"], "-readconfig /etc/vm.cfg", "cannot see"),
            (&["-set", "chardev.c.path=/p"], "-set chardev.c.path=/p", "cannot see"),
            (&["-add-fd", "fd=3,set=1"], "-add-fd fd=3,set=1", "file descriptor"),
            (&["-chardev", "file,id=a,path=/var/log/x", "-chardev", "file,id=b,path=/var/log/x.dst"], "-chardev file,id=a,path=/var/log/x", "source uses"),
            (&["-serial", "file:/var/log/y.dst", "-serial", "file:/var/log/y"], "-serial file:/var/log/y", "source uses"),
            (&["-serial", "file:/var/log/z", "-D", "/var/log/./z"], "-D /var/log/./z", "another argument"),
            (&["-qmp", long.as_str()], "-qmp unix:/xxx", "longer than"),
        ];
        // What a destination on another host keeps of these (each a row of `mirror_to_other_host_table`); it
        // refuses the rest too, naming the same argument (its reasons are checked there).
        let kept_on_other_host = [
            "tap,id=n,ifname=tap0,script=no,downscript=no",
            "tcp::4444,server=on,wait=off",
            "telnet:127.0.0.1:5555,server,nowait",
            "socket,id=t,host=0.0.0.0,port=4446,server=on",
            "tcp::1234",
            "-s",
            "user,id=n,hostfwd=tcp::2222-:22",
            "user,hostfwd=tcp:127.0.0.1:8080-:80",
            r#"{"type":"user","id":"n","hostfwd":[{"str":"tcp::2223-:22"}]}"#,
            "port=5900,disable-ticketing=on",
            "tls-port=5901,x509-dir=/etc/pki",
            "unix:/run/v.sock,websocket=5700",
            "vhost-vsock-pci,guest-cid=3",
        ];
        for (extra, arg, reason) in table {
            match mirror(extra) {
                Err(MirrorError::Unsupported {
                    arg: a,
                    reason: r,
                    target,
                }) => {
                    assert!(a.contains(arg), "{extra:?}: named {a:?}, not {arg:?}");
                    assert!(
                        r.contains(reason),
                        "{extra:?}: reason {r:?} lacks {reason:?}"
                    );
                    assert_eq!(target, MirrorTarget::SameHost);
                    let shown = MirrorError::Unsupported {
                        arg: a.clone(),
                        reason: r,
                        target,
                    }
                    .to_string();
                    assert!(shown.contains(&a), "{shown}");
                    assert!(shown.contains("on the same host"), "{shown}");
                }
                other => panic!("{extra:?}: {other:?}"),
            }
            let other = mirror_other(extra);
            if extra.iter().any(|e| kept_on_other_host.contains(e)) {
                assert!(other.is_ok(), "{extra:?} on another host: {other:?}");
                continue;
            }
            match other {
                Err(e @ MirrorError::Unsupported { .. }) => {
                    let shown = e.to_string();
                    assert!(
                        shown.contains(arg) && shown.contains("on another host"),
                        "{extra:?}: {shown}"
                    );
                }
                other => panic!("{extra:?} on another host: {other:?}"),
            }
        }
    }

    /// What changes when the destination runs on another host: (case, extra source arguments, the outcome on
    /// the same host, the outcome on another host).
    #[test]
    fn mirror_to_other_host_table() {
        use Want::{Args, Refused};
        let table: &[(&str, &[&str], Want, Want)] = &[
            // Taps: the name is free on another host; a fresh tap still needs something to attach it.
            (
                "named tap, script=no",
                &["-netdev", "tap,id=n,ifname=tap0,script=no,downscript=no"],
                Refused("ifname=tap0", "named tap"),
                Args(&["-netdev", "tap,id=n,ifname=tap0,script=no,downscript=no"]),
            ),
            (
                "named tap with an ifup script",
                &["-netdev", "tap,id=net0,ifname=qmweb,script=/tmp/bed/qemu-ifup,downscript=no"],
                Refused("ifname=qmweb", "named tap"),
                Args(&["-netdev", "tap,id=net0,ifname=qmweb,script=/tmp/bed/qemu-ifup,downscript=no"]),
            ),
            (
                "named tap, the default script",
                &["-netdev", "tap,id=n,ifname=vm1"],
                Refused("ifname=vm1", "named tap"),
                Args(&["-netdev", "tap,id=n,ifname=vm1"]),
            ),
            (
                "-nic tap, named",
                &["-nic", "tap,ifname=vm1,model=virtio-net-pci,mac=52:54:00:12:34:56"],
                Refused("-nic tap,ifname=vm1", "named tap"),
                Args(&["-nic", "tap,ifname=vm1,model=virtio-net-pci,mac=52:54:00:12:34:56"]),
            ),
            (
                "-net tap, named",
                &["-net", "tap,ifname=vm1,script=/etc/qemu-ifup"],
                Refused("-net tap,ifname=vm1", "named tap"),
                Args(&["-net", "tap,ifname=vm1,script=/etc/qemu-ifup"]),
            ),
            (
                "JSON tap, named",
                &["-netdev", r#"{"type":"tap","id":"n","ifname":"vm1","script":"no"}"#],
                Refused("vm1", "named tap"),
                Args(&["-netdev", r#"{"type":"tap","id":"n","ifname":"vm1","script":"no"}"#]),
            ),
            (
                "fresh tap with script=no",
                &["-netdev", "tap,id=n,script=no"],
                Refused("tap,id=n,script=no", "script=no"),
                Refused("tap,id=n,script=no", "script=no"),
            ),
            (
                "tap on a passed descriptor",
                &["-netdev", "tap,id=n,ifname=t,vhost=on,vhostfd=4"],
                Refused("vhostfd=4", "file descriptor"),
                Refused("vhostfd=4", "file descriptor"),
            ),
            (
                "bridge and fresh tap with a script",
                &["-netdev", "bridge,id=b,br=br0", "-nic", "tap,script=/etc/qemu-ifup"],
                Args(&["-netdev", "bridge,id=b,br=br0", "-nic", "tap,script=/etc/qemu-ifup"]),
                Args(&["-netdev", "bridge,id=b,br=br0", "-nic", "tap,script=/etc/qemu-ifup"]),
            ),
            // vsock: a CID is unique per host.
            (
                "vhost-vsock",
                &["-device", "vhost-vsock-pci,guest-cid=3"],
                Refused("guest-cid=3", "guest-cid"),
                Args(&["-device", "vhost-vsock-pci,guest-cid=3"]),
            ),
            // Listeners: another host's port is its own; an address of the source's host is not.
            (
                "TCP serial on every address",
                &["-serial", "tcp::4444,server=on,wait=off"],
                Refused("tcp::4444", "port 4444"),
                Args(&["-serial", "tcp::4444,server=on,wait=off"]),
            ),
            (
                "telnet monitor on loopback",
                &["-monitor", "telnet:127.0.0.1:5555,server,nowait"],
                Refused("telnet:127.0.0.1:5555", "port 5555"),
                Args(&["-monitor", "telnet:127.0.0.1:5555,server,nowait"]),
            ),
            (
                "socket chardev on 0.0.0.0",
                &["-chardev", "socket,id=t,host=0.0.0.0,port=4446,server=on"],
                Refused("port=4446", "port 4446"),
                Args(&["-chardev", "socket,id=t,host=0.0.0.0,port=4446,server=on"]),
            ),
            (
                "socket chardev on a host address",
                &["-chardev", "socket,id=t,host=192.0.2.11,port=4446,server=on,wait=off"],
                Refused("port=4446", "port 4446"),
                Refused("port=4446", "of 192.0.2.11, an address of the source's host"),
            ),
            (
                "TCP serial on an IPv6 host address",
                &["-serial", "tcp:[2001:db8::11]:4444,server=on"],
                Refused("4444", "port 4444"),
                Refused("4444", "2001:db8::11"),
            ),
            (
                "ephemeral port on a host address",
                &["-serial", "tcp:192.0.2.11:0,server=on,wait=off"],
                Args(&["-serial", "tcp:192.0.2.11:0,server=on,wait=off"]),
                Args(&["-serial", "tcp:192.0.2.11:0,server=on,wait=off"]),
            ),
            (
                "-gdb tcp::1234",
                &["-gdb", "tcp::1234"],
                Refused("-gdb tcp::1234", "port 1234"),
                Args(&["-gdb", "tcp::1234"]),
            ),
            ("-s", &["-s", "-S"], Refused("-s", "1234"), Args(&["-s", "-S"])),
            (
                "UDP serial from every address to another machine",
                &["-serial", "udp:192.0.2.1:6000@:6001"],
                Refused("udp:192.0.2.1", "UDP port 6001"),
                Args(&["-serial", "udp:192.0.2.1:6000@:6001"]),
            ),
            (
                "UDP serial from a host address",
                &["-serial", "udp:192.0.2.1:6000@192.0.2.11:6001"],
                Refused("udp:192.0.2.1", "UDP port 6001"),
                Refused("udp:192.0.2.1", "binds UDP port 6001 of 192.0.2.11"),
            ),
            (
                "SLIRP hostfwd on every address",
                &["-netdev", "user,id=n,hostfwd=tcp::2222-:22"],
                Refused("hostfwd=tcp::2222", "port 2222"),
                Args(&["-netdev", "user,id=n,hostfwd=tcp::2222-:22"]),
            ),
            (
                "SLIRP hostfwd on loopback",
                &["-nic", "user,hostfwd=tcp:127.0.0.1:8080-:80"],
                Refused("8080", "port 8080"),
                Args(&["-nic", "user,hostfwd=tcp:127.0.0.1:8080-:80"]),
            ),
            (
                "SLIRP UDP hostfwd on a host address",
                &["-netdev", "user,id=n,hostfwd=udp:192.0.2.11:5353-:53"],
                Refused("5353", "UDP port 5353"),
                Refused("5353", "192.0.2.11"),
            ),
            (
                "SPICE on every address",
                &["-spice", "port=5900,disable-ticketing=on"],
                Refused("port=5900", "port=5900"),
                Args(&["-spice", "port=5900,disable-ticketing=on"]),
            ),
            (
                "SPICE on a host address",
                &["-spice", "port=5900,addr=192.0.2.11,disable-ticketing=on"],
                Refused("port=5900", "port=5900"),
                Refused("port=5900", "192.0.2.11"),
            ),
            // A TCP display is not guest-visible: dropped rather than refused where it cannot listen.
            (
                "VNC on every address",
                &["-vnc", ":1"],
                Args(&["-vnc", "none"]),
                Args(&["-vnc", ":1"]),
            ),
            (
                "VNC on loopback with a websocket",
                &["-vnc", "127.0.0.1:1,websocket=on"],
                Args(&["-vnc", "none"]),
                Args(&["-vnc", "127.0.0.1:1,websocket=on"]),
            ),
            (
                "-display vnc= on every address",
                &["-display", "vnc=:2"],
                Args(&["-display", "vnc=none"]),
                Args(&["-display", "vnc=:2"]),
            ),
            (
                "VNC on a host address",
                &["-vnc", "192.0.2.11:1"],
                Args(&["-vnc", "none"]),
                Args(&["-vnc", "none"]),
            ),
            (
                "VNC websocket on a host address",
                &["-vnc", ":1,websocket=192.0.2.11:5700"],
                Args(&["-vnc", "none"]),
                Args(&["-vnc", "none"]),
            ),
            (
                "VNC on a UNIX socket with a websocket",
                &["-vnc", "unix:/run/v.sock,websocket=5700"],
                Refused("websocket=5700", "websocket"),
                Args(&["-vnc", "unix:/run/v.sock.dst,websocket=5700"]),
            ),
            // Clients: the source host's loopback is not on another host.
            (
                "TCP serial client of loopback",
                &["-serial", "tcp:127.0.0.1:4444"],
                Args(&["-serial", "tcp:127.0.0.1:4444"]),
                Refused("tcp:127.0.0.1:4444", "connects to 127.0.0.1, the source's own host"),
            ),
            (
                "socket chardev client of localhost",
                &["-chardev", "socket,id=c,host=localhost,port=4444"],
                Args(&["-chardev", "socket,id=c,host=localhost,port=4444"]),
                Refused("host=localhost", "connects to localhost"),
            ),
            (
                "TCP serial client of another machine",
                &["-serial", "tcp:192.0.2.1:4444,logfile=/l"],
                Args(&["-serial", "tcp:192.0.2.1:4444,logfile=/l.dst"]),
                Args(&["-serial", "tcp:192.0.2.1:4444,logfile=/l.dst"]),
            ),
            (
                "UDP chardev sending to localhost by default",
                &["-chardev", "udp,id=u,port=6000"],
                Args(&["-chardev", "udp,id=u,port=6000"]),
                Refused("udp,id=u", "connects to localhost"),
            ),
            (
                "socket netdev connecting to loopback",
                &["-netdev", "socket,id=n,connect=127.0.0.1:1234"],
                Args(&["-netdev", "socket,id=n,connect=127.0.0.1:1234"]),
                Refused("connect=127.0.0.1:1234", "source's own host"),
            ),
            (
                "socket netdev connecting elsewhere, and multicast",
                &[
                    "-netdev",
                    "socket,id=n,connect=192.0.2.1:1234",
                    "-netdev",
                    "socket,id=m,mcast=230.0.0.1:1234",
                ],
                Args(&[
                    "-netdev",
                    "socket,id=n,connect=192.0.2.1:1234",
                    "-netdev",
                    "socket,id=m,mcast=230.0.0.1:1234",
                ]),
                Args(&[
                    "-netdev",
                    "socket,id=n,connect=192.0.2.1:1234",
                    "-netdev",
                    "socket,id=m,mcast=230.0.0.1:1234",
                ]),
            ),
            (
                "stream client of loopback",
                &["-netdev", "stream,id=n,addr.type=inet,addr.host=127.0.0.1,addr.port=1235"],
                Args(&["-netdev", "stream,id=n,addr.type=inet,addr.host=127.0.0.1,addr.port=1235"]),
                Refused("addr.host=127.0.0.1", "source's own host"),
            ),
            (
                "stream client of another machine",
                &["-netdev", "stream,id=n,addr.type=inet,addr.host=192.0.2.1,addr.port=1235"],
                Args(&["-netdev", "stream,id=n,addr.type=inet,addr.host=192.0.2.1,addr.port=1235"]),
                Args(&["-netdev", "stream,id=n,addr.type=inet,addr.host=192.0.2.1,addr.port=1235"]),
            ),
            // The guest's own link to a peer: the peer does not follow to another host.
            (
                "socket netdev listener",
                &["-netdev", "socket,id=n,listen=:1234"],
                Refused("listen=:1234", "listens on port 1234"),
                Refused("listen=:1234", "its peer reaches it at port 1234"),
            ),
            (
                "socket netdev on a local UDP port",
                &["-netdev", "socket,id=n,udp=192.0.2.1:2000,localaddr=:2001"],
                Refused("localaddr=:2001", "port 2001"),
                Refused("localaddr=:2001", "its peer reaches it at port 2001"),
            ),
            (
                "stream server on every address",
                &["-netdev", "stream,id=n,server=on,addr.type=inet,addr.host=0.0.0.0,addr.port=1235"],
                Refused("addr.port=1235", "port 1235"),
                Refused("addr.port=1235", "does not reconnect elsewhere"),
            ),
            (
                "dgram on a local port",
                &["-netdev", "dgram,id=n,local.type=inet,local.host=0.0.0.0,local.port=1236,remote.type=inet,remote.host=192.0.2.1,remote.port=1"],
                Refused("local.port=1236", "port 1236"),
                Refused("local.port=1236", "the guest would lose this network"),
            ),
            // Refused on both: host devices, peers' sockets, shared RAM, overlays, descriptors, FIFOs.
            (
                "vfio",
                &["-device", "vfio-pci,host=0000:01:00.0"],
                Refused("vfio-pci", "host device"),
                Refused("vfio-pci", "the source host's own hardware"),
            ),
            (
                "usb-host",
                &["-device", "usb-host,hostbus=1,hostaddr=2"],
                Refused("usb-host", "host device"),
                Refused("usb-host", "host device"),
            ),
            (
                "host serial port",
                &["-serial", "/dev/ttyS0"],
                Refused("/dev/ttyS0", "host device"),
                Refused("/dev/ttyS0", "host device"),
            ),
            (
                "TPM passthrough",
                &["-tpmdev", "passthrough,id=t,path=/dev/tpm0"],
                Refused("passthrough", "host device"),
                Refused("passthrough", "host device"),
            ),
            (
                "vhost-user backend socket",
                &["-chardev", "socket,id=v,path=/run/vhost.sock"],
                Refused("/run/vhost.sock", "client"),
                Refused("/run/vhost.sock", "runs on the source's host"),
            ),
            (
                "passt",
                &["-netdev", "stream,id=n,addr.type=unix,addr.path=/run/passt.sock"],
                Refused("/run/passt.sock", "client"),
                Refused("/run/passt.sock", "client"),
            ),
            (
                "shared guest RAM",
                &["-object", "memory-backend-file,id=m,size=1G,mem-path=/srv/vm.ram,share=on"],
                Refused("share=on", "overwrite"),
                Refused("share=on", "overwrite"),
            ),
            ("-snapshot", &["-snapshot"], Refused("-snapshot", "overlay"), Refused("-snapshot", "overlay")),
            (
                "-add-fd",
                &["-add-fd", "fd=3,set=1"],
                Refused("-add-fd", "file descriptor"),
                Refused("-add-fd", "file descriptor"),
            ),
            (
                "FIFO",
                &["-serial", "pipe:/tmp/fifo"],
                Refused("pipe:/tmp/fifo", "FIFO"),
                Refused("pipe:/tmp/fifo", "FIFO"),
            ),
        ];
        for (case, extra, same, other) in table {
            for (target, want, got) in [
                (MirrorTarget::SameHost, same, mirror(extra)),
                (MirrorTarget::OtherHost, other, mirror_other(extra)),
            ] {
                match (want, got) {
                    (Args(want), Ok(got)) => {
                        let mut want_args = v(&QMP_DST);
                        want_args.extend(v(want));
                        want_args.extend(v(&["-incoming", "defer"]));
                        assert_eq!(got.args, want_args, "{case} on {target}");
                    }
                    (Refused(arg, reason), Err(e)) => {
                        let shown = e.to_string();
                        assert!(
                            matches!(&e, MirrorError::Unsupported { target: t, .. } if *t == target),
                            "{case} on {target}: {e:?}"
                        );
                        assert!(
                            shown.contains(arg),
                            "{case} on {target}: {shown} lacks {arg:?}"
                        );
                        assert!(
                            shown.contains(reason),
                            "{case} on {target}: {shown} lacks {reason:?}"
                        );
                        assert!(
                            shown.contains(&format!("onto a destination on {target}: ")),
                            "{case}: {shown}"
                        );
                    }
                    (want, got) => panic!("{case} on {target}: wanted {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[derive(Debug)]
    enum Want {
        /// The destination's arguments between the QMP socket's and `-incoming defer`.
        Args(&'static [&'static str]),
        /// Refused: the message names this argument and gives a reason with these words.
        Refused(&'static str, &'static str),
    }

    #[test]
    fn mirror_other_errors() {
        assert_eq!(
            mirror_destination(&v(&["-m", "256"]), SRC, DST, "dst"),
            Err(MirrorError::NoSourceQmp { path: SRC.into() })
        );
        // The destination's QMP socket must not be the source's, however it is spelled.
        let same = mirror_destination(&v(&QMP), SRC, "/run/vm/./a.sock", "dst").unwrap_err();
        assert!(
            matches!(&same, MirrorError::Unsupported { reason, .. } if reason.contains("source uses")),
            "{same}"
        );
        // Nor a file the mirror gives another argument.
        let clash = mirror(&["-D", "/run/vm/b.sock.log"]);
        assert!(clash.is_ok(), "{clash:?}");
        let clash = mirror_destination(
            &v(&["-qmp", "unix:/run/vm/a.sock,server=on", "-D", "/run/vm/b"]),
            SRC,
            "/run/vm/b.dst",
            "dst",
        )
        .unwrap_err();
        assert!(clash.to_string().contains("another argument"), "{clash}");
        for tag in ["", "a/b", "a,b", "a b"] {
            let err = mirror_destination(&v(&QMP), SRC, DST, tag).unwrap_err();
            assert!(matches!(err, MirrorError::Tag { .. }), "{tag:?}: {err}");
        }
    }

    #[test]
    fn mirror_the_testbed_guest() {
        let args = expand_template(
            "guest",
            include_str!("../qemu-configs/guest.args"),
            &[
                ("qmp", "/tmp/bed/src.qmp".into()),
                ("name", "src".into()),
                ("memory_mib", "256".into()),
                ("guest_dir", "/guest".into()),
                ("serial_log", "/tmp/bed/src.serial".into()),
                ("workload", "idle".into()),
                ("kernel_extra", String::new()),
                ("accel", "tcg".into()),
            ],
        )
        .unwrap();
        let got =
            mirror_destination(&args, "/tmp/bed/src.qmp", "/tmp/bed/dst.qmp", "incoming").unwrap();
        assert!(
            got.args
                .iter()
                .any(|a| a.contains("path=/tmp/bed/src.serial.incoming")),
            "{:?}",
            got.args
        );
        assert!(
            got.args
                .iter()
                .any(|a| a == "unix:/tmp/bed/dst.qmp,server=on,wait=off"),
            "{:?}",
            got.args
        );
        assert_eq!(got.rewritten.len(), 2, "{:?}", got.rewritten);

        // With a NIC on its host's bridge (examples/testbed_guest.rs --ip): another host keeps the tap as it is,
        // moves the serial log like the same host does, and otherwise changes nothing.
        let mut args = args;
        let tap = "tap,id=net0,ifname=qm060f03b1,script=/tmp/bed/qemu-ifup,downscript=no";
        args.extend(v(&[
            "-netdev",
            tap,
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:06:0f:03",
        ]));
        let same = mirror_destination(&args, "/tmp/bed/src.qmp", "/tmp/bed/dst.qmp", "h2");
        assert!(
            matches!(&same, Err(MirrorError::Unsupported { arg, .. }) if arg.contains(tap)),
            "{same:?}"
        );
        let got = mirror_to_other_host(&args, "/tmp/bed/src.qmp", "/tmp/bed/h2/run/src.qmp", "h2")
            .unwrap();
        let want: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("/tmp/bed/src.serial", "/tmp/bed/src.serial.h2")
                    .replace("unix:/tmp/bed/src.qmp", "unix:/tmp/bed/h2/run/src.qmp")
            })
            .chain(v(&["-incoming", "defer"]))
            .collect();
        assert_eq!(got.args, want);
        assert_eq!(
            got.rewritten,
            [
                (
                    "/tmp/bed/src.serial".into(),
                    "/tmp/bed/src.serial.h2".into()
                ),
                ("/tmp/bed/src.qmp".into(), "/tmp/bed/h2/run/src.qmp".into())
            ]
        );
    }

    #[test]
    fn option_strings_parse_like_qemu() {
        let o = Opts::parse(
            "socket,id=c,path=/a,,b,server,nowait,nodelay",
            Some("backend"),
        );
        let pairs: Vec<(&str, &str)> = o
            .items
            .iter()
            .map(|o| (o.key.as_str(), o.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("backend", "socket"),
                ("id", "c"),
                ("path", "/a,b"),
                ("server", "on"),
                ("wait", "off"),
                ("delay", "off")
            ]
        );
        assert_eq!(o.render(), "socket,id=c,path=/a,,b,server,nowait,nodelay");
        let mut o = Opts::parse("/p,,q,server=on", Some("path"));
        assert_eq!(o.get("path"), Some("/p,q"));
        o.set("path", "/r,s");
        assert_eq!(o.render(), "/r,,s,server=on");
        assert_eq!(Opts::parse("a=1,a=2", None).get("a"), Some("2"));
        for (path, want) in [
            ("/run//vm/./a.sock", "/run/vm/a.sock"),
            ("./a", "a"),
            ("a/", "a"),
            ("/", "/"),
            (".", "."),
            ("/a/../b", "/a/../b"),
        ] {
            assert_eq!(normalise(path), want, "{path}");
        }
    }

    #[test]
    fn qemu_binary_names_and_owners() {
        for (name, ok) in [
            ("qemu-system-x86_64", true),
            ("qemu-system-aarch64", true),
            ("qemu-kvm", true),
            ("qemu-system-", false),
            ("qemu-img", false),
            ("bash", false),
            ("python3", false),
        ] {
            assert_eq!(is_qemu_binary_name(name), ok, "{name}");
        }
        let status =
            "Name:\tqemu\nUmask:\t0022\nUid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\n";
        assert_eq!(real_ids(status), Some((1000, 100)));
        assert_eq!(real_ids("Name:\tx\n"), None);
    }

    #[test]
    fn identity_of_a_process_that_is_not_qemu() {
        let me = std::process::id() as i32;
        match qemu_identity(me) {
            Err(LaunchError::NotQemu { pid, exe }) => {
                assert_eq!(pid, me);
                assert_eq!(exe, std::env::current_exe().unwrap());
                let shown = LaunchError::NotQemu {
                    pid,
                    exe: exe.clone(),
                }
                .to_string();
                assert!(
                    shown.contains(&me.to_string()) && shown.contains(&exe.display().to_string()),
                    "{shown}"
                );
            }
            other => panic!("{other:?}"),
        }
        let err = qemu_identity(i32::MAX).unwrap_err();
        assert!(
            matches!(err, LaunchError::Exe { pid: i32::MAX, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("/proc/{}/exe", i32::MAX)),
            "{err}"
        );
    }

    /// Runs only where the repository's QEMU is built (scripts/test fetches it into target/qemu-10).
    #[test]
    fn identity_of_a_real_qemu_through_its_wrapper() {
        let wrapper =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qemu-10/qemu-system-x86_64");
        if !wrapper.exists() {
            eprintln!("skipped: no {}", wrapper.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        let qmp = dir.path().join("qmp.sock");
        let args = v(&["-machine", "none", "-nodefaults", "-display", "none", "-S"]);
        let mut qemu = QemuProcess::spawn_as(
            &wrapper,
            &args,
            &qmp,
            &log,
            &SpawnOptions {
                fresh_log: true,
                ..SpawnOptions::default()
            },
        )
        .unwrap();
        // The wrapper execs QEMU under the same pid; wait for the exec with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let id = loop {
            match qemu_identity(qemu.pid()) {
                Ok(id) => break id,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        assert_eq!(id.exe.file_name().unwrap(), "qemu-system-x86_64");
        assert!(
            id.exe.ends_with("root/usr/bin/qemu-system-x86_64"),
            "{}",
            id.exe.display()
        );
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(Some((id.uid, id.gid)), real_ids(&me));
        qemu.kill();
    }

    /// Runs only where the repository's QEMU is built: a destination mirrored from a live source starts beside it.
    #[tokio::test]
    async fn mirrored_destination_starts_beside_its_source() {
        let wrapper =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qemu-10/qemu-system-x86_64");
        if !wrapper.exists() {
            eprintln!("skipped: no {}", wrapper.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).display().to_string();
        let source_args = vec![
            "-machine".to_string(),
            "none".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-S".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("src.qmp")),
            "-qmp".into(),
            format!("unix:{},server,nowait", p("second,,qmp")),
            // -machine none has no serial port, so a -serial file: would never be opened.
            "-chardev".into(),
            format!("file,id=f,path={}", p("serial log,,x")),
            "-chardev".into(),
            format!(
                "socket,id=c,path={},server=on,wait=off,logfile={}",
                p("console.sock"),
                p("console.log")
            ),
            "-vnc".into(),
            format!("unix:{}", p("vnc.sock")),
            "-D".into(),
            p("qemu.log"),
            "-pidfile".into(),
            p("src.pid"),
        ];
        let src_qmp = dir.path().join("src.qmp");
        let mut source = QemuProcess::spawn(
            &wrapper,
            &source_args,
            &src_qmp,
            &dir.path().join("src.out"),
        )
        .unwrap();
        source
            .wait_for_socket(Duration::from_secs(10))
            .await
            .unwrap();
        let (program, args) = process_command_line(source.pid()).unwrap();
        let from = format!("{}/./src.qmp", dir.path().display());
        let dst_qmp = dir.path().join("dst.qmp");
        prepare_socket_path(&dst_qmp).unwrap();
        let mirrored =
            mirror_destination(&args, &from, &dst_qmp.display().to_string(), "dst").unwrap();
        let mut destination = QemuProcess::spawn_as(
            &program,
            &mirrored.args,
            &dst_qmp,
            &dir.path().join("dst.out"),
            &SpawnOptions {
                fresh_log: true,
                ..SpawnOptions::default()
            },
        )
        .unwrap();
        destination
            .wait_for_socket(Duration::from_secs(10))
            .await
            .unwrap();
        // QMP listens before QEMU has finished starting (VNC comes later): wait for the rest with a deadline.
        let moved = [
            "second,qmp.dst",
            "serial log,x.dst",
            "console.sock.dst",
            "console.log.dst",
            "vnc.sock.dst",
            "qemu.log.dst",
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !moved.iter().all(|m| dir.path().join(m).exists()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for m in moved {
            assert!(dir.path().join(m).exists(), "{m}: {:?}", mirrored.args);
        }
        assert!(source.is_alive() && destination.is_alive());
        assert!(!dir.path().join("src.pid.dst").exists());
        destination.kill();
        source.kill();
    }

    #[test]
    fn spawn_log_is_private_fresh_and_never_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sh = Path::new("/bin/sh");
        let qmp = dir.path().join("unused.sock");
        let fresh = SpawnOptions {
            fresh_log: true,
            ..SpawnOptions::default()
        };
        let log = dir.path().join("a.log");
        let mut p =
            QemuProcess::spawn_as(sh, &v(&["-c", "echo hello"]), &qmp, &log, &fresh).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
        assert_eq!(
            std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A fresh log that exists already is refused, naming it.
        let err = QemuProcess::spawn_as(sh, &v(&["-c", "true"]), &qmp, &log, &fresh).unwrap_err();
        assert!(
            matches!(err, LaunchError::Log { .. })
                && err.to_string().contains(&log.display().to_string()),
            "{err}"
        );
        // A link at the log's path is not followed, even when appending is allowed.
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = QemuProcess::spawn(sh, &v(&["-c", "echo no"]), &qmp, &link).unwrap_err();
        assert!(matches!(err, LaunchError::Log { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        // Nor is a FIFO opened (it would block).
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = QemuProcess::spawn(sh, &v(&["-c", "true"]), &qmp, &fifo).unwrap_err();
        assert!(matches!(err, LaunchError::Log { .. }), "{err}");
    }

    /// Root only: the child runs as nobody, and the log is handed to nobody.
    #[test]
    fn spawn_as_another_user() {
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        if real_ids(&me).map(|(uid, _)| uid) != Some(0) {
            eprintln!("skipped: not root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nobody.log");
        let options = SpawnOptions {
            run_as: Some((65534, 65534)),
            current_dir: Some(PathBuf::from("/")),
            fresh_log: true,
        };
        let mut p = QemuProcess::spawn_as(
            Path::new("/bin/sh"),
            &v(&["-c", "echo $(id -u) $(id -g) $(id -G) $(pwd)"]),
            &dir.path().join("unused.sock"),
            &log,
            &options,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "65534 65534 65534 /\n"
        );
        let meta = std::fs::metadata(&log).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }

    #[test]
    fn socket_paths_prepared_safely() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        // Nothing there.
        prepare_socket_path(&p("none.sock")).unwrap();
        // A stale socket (its listener closed) is removed.
        drop(std::os::unix::net::UnixListener::bind(p("stale.sock")).unwrap());
        assert!(p("stale.sock").exists());
        prepare_socket_path(&p("stale.sock")).unwrap();
        assert!(std::fs::symlink_metadata(p("stale.sock")).is_err());
        // A socket in use is refused and kept.
        let _live = std::os::unix::net::UnixListener::bind(p("live.sock")).unwrap();
        let err = prepare_socket_path(&p("live.sock")).unwrap_err();
        assert!(matches!(err, LaunchError::SocketInUse { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&p("live.sock").display().to_string()),
            "{err}"
        );
        assert!(p("live.sock").exists());
        // A symbolic link is refused, never followed nor removed: not to a stale socket, not dangling.
        drop(std::os::unix::net::UnixListener::bind(p("stale2.sock")).unwrap());
        std::os::unix::fs::symlink(p("stale2.sock"), p("link.sock")).unwrap();
        std::os::unix::fs::symlink(p("nowhere"), p("dangling.sock")).unwrap();
        for link in ["link.sock", "dangling.sock"] {
            let err = prepare_socket_path(&p(link)).unwrap_err();
            assert!(matches!(err, LaunchError::SocketSymlink { .. }), "{err}");
            assert!(
                err.to_string().contains(&p(link).display().to_string()),
                "{err}"
            );
            assert!(std::fs::symlink_metadata(p(link)).is_ok());
        }
        assert!(p("stale2.sock").exists());
        // A regular file or a directory is refused and kept.
        std::fs::write(p("file.sock"), "data").unwrap();
        std::fs::create_dir(p("dir.sock")).unwrap();
        for (name, kind) in [("file.sock", "a regular file"), ("dir.sock", "a directory")] {
            let err = prepare_socket_path(&p(name)).unwrap_err();
            assert!(matches!(err, LaunchError::SocketPathTaken { .. }), "{err}");
            let shown = err.to_string();
            assert!(
                shown.contains(&p(name).display().to_string()) && shown.contains(kind),
                "{shown}"
            );
            assert!(p(name).exists());
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
