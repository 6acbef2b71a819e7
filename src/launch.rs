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
    #[error("cannot mirror the source's command line for a destination on this host")]
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
    /// Starts `program args…` in its own process group (a Ctrl-C aimed at us does not reach it), output to
    /// `log_path`.
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
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log)
            .process_group(0);
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

/// A destination's command line mirrored from its source's by [`mirror_destination`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    /// The destination's arguments (the program excluded), ending in `-incoming defer`.
    pub args: Vec<String>,
    /// Every host-local resource moved away from the source's, in command-line order: (the source's path, port or
    /// display, the destination's). The second is empty when the option was dropped. Worth reporting: a console
    /// now at `serial.log.<tag>`, or a VNC display that is gone, is something the VM's owner needs to know.
    pub rewritten: Vec<(String, String)>,
}

/// Why a source's command line cannot be mirrored onto a destination on the same host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot mirror `{arg}` onto a destination on the same host: {reason}")]
    Unsupported { arg: String, reason: String },
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
    check_tag(tag)?;
    let mut m = Mirror {
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
            "snapshot" => return Err(unsupported(flag_arg, SNAPSHOT)),
            "s" => {
                return Err(unsupported(
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
const CLIENT_SOCKET: &str = "QEMU connects to this socket as a client: it belongs to a peer (a vhost-user \
    backend, virtiofsd, passt, swtpm, …) that usually serves one connection, and a renamed path would not exist";
const PIPE: &str =
    "a FIFO carries one stream: the destination would take the source's data, and a renamed \
    FIFO would not exist";
const HOST_DEVICE: &str = "a host device can be held by one process only";
const PASSED_FD: &str = "it refers to a file descriptor the destination does not inherit";
const OPAQUE: &str = "the mirror cannot see which host resources it creates";

fn unsupported(arg: &str, reason: impl Into<String>) -> MirrorError {
    MirrorError::Unsupported {
        arg: arg.to_string(),
        reason: reason.into(),
    }
}

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
    source_qmp: String,
    destination_qmp: &'a str,
    tag: &'a str,
    found_qmp: bool,
    rewritten: Vec<(String, String)>,
    /// (the source's path normalised, the destination's normalised, the argument).
    moved: Vec<(String, String, String)>,
}

impl Mirror<'_> {
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
                self.with_opts(arg, value, Some("type"), |_, o| netdev(arg, o))?
            }
            "device" => self.with_opts(arg, value, Some("driver"), |_, o| device(arg, o))?,
            "object" => self.with_opts(arg, value, Some("qom-type"), |m, o| m.object(arg, o))?,
            "drive" => self.with_opts(arg, value, None, |_, o| {
                if o.get("snapshot").is_some_and(is_on) {
                    return Err(unsupported(arg, SNAPSHOT));
                }
                Ok(())
            })?,
            "tpmdev" => self.with_opts(arg, value, Some("type"), |_, o| {
                if o.get("type") == Some("passthrough") {
                    return Err(unsupported(arg, HOST_DEVICE));
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
            "readconfig" | "set" => return Err(unsupported(arg, OPAQUE)),
            "add-fd" => return Err(unsupported(arg, PASSED_FD)),
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
                .ok_or_else(|| unsupported(arg, "its JSON does not parse"))?;
            rule(self, &mut opts)?;
            if opts.changed {
                return Err(unsupported(
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
            return Err(unsupported(arg, PIPE));
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
            let port = address.rsplit(':').next().unwrap_or("");
            let server = opts.get("server").map_or(implicit_server, is_on);
            if server && is_fixed_port(port) {
                return Err(unsupported(
                    arg,
                    format!("it listens on TCP port {port}, which the source holds"),
                ));
            }
            self.file_key(arg, &mut opts, "logfile")?;
            if opts.changed {
                format!("{scheme}{address},{}", opts.render())
            } else {
                rest.to_string()
            }
        } else if let Some(udp) = rest.strip_prefix("udp:") {
            if let Some((_, local)) = udp.split_once('@') {
                let local = local.split(',').next().unwrap_or("");
                let port = local.rsplit(':').next().unwrap_or("");
                if is_fixed_port(port) {
                    return Err(unsupported(
                        arg,
                        format!("it binds UDP port {port}, which the source holds"),
                    ));
                }
            }
            rest.to_string()
        } else if rest.starts_with("/dev/") {
            return Err(unsupported(arg, HOST_DEVICE));
        } else {
            return Err(unsupported(
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
            "pipe" => Err(unsupported(arg, PIPE)),
            "serial" | "tty" | "parallel" | "parport" => Err(unsupported(arg, HOST_DEVICE)),
            "udp" => match opts.get("localport") {
                Some(port) if is_fixed_port(port) => Err(unsupported(
                    arg,
                    format!("it binds UDP port {port}, which the source holds"),
                )),
                _ => Ok(()),
            },
            "null" | "pty" | "stdio" | "vc" | "ringbuf" | "memory" | "msmouse" | "wctablet"
            | "braille" | "testdev" | "spicevmc" | "spiceport" | "qemu-vdagent" | "dbus"
            | "hub" => Ok(()),
            other => Err(unsupported(
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
            return Err(unsupported(arg, PASSED_FD));
        }
        let server = opts.get("server").map_or(implicit_server, is_on);
        if let Some(path) = opts.get("path").map(str::to_string) {
            if !server {
                return Err(unsupported(arg, CLIENT_SOCKET));
            }
            let new = self.socket_path(arg, &path)?;
            opts.set("path", &new);
        } else if server {
            let port = opts.get("port").unwrap_or("");
            if is_fixed_port(port) {
                return Err(unsupported(
                    arg,
                    format!("it listens on TCP port {port}, which the source holds"),
                ));
            }
        }
        Ok(())
    }

    /// `-vnc` and `-display vnc=`: a UNIX socket moves; a TCP display becomes `none`.
    fn vnc(&mut self, arg: &str, value: &str) -> Result<String, MirrorError> {
        let mut opts = Opts::parse(value, Some("vnc"));
        let display = opts.get("vnc").unwrap_or("").to_string();
        if display == "none" {
            return Ok(value.to_string());
        }
        if let Some(path) = display.strip_prefix("unix:") {
            if opts.get("websocket").is_some_and(|w| w != "off") {
                return Err(unsupported(
                    arg,
                    "its websocket listens on a TCP port the source holds",
                ));
            }
            let new = self.socket_path(arg, path)?;
            opts.set("vnc", &format!("unix:{new}"));
            return Ok(opts.render());
        }
        self.rewritten.push((value.to_string(), "none".into()));
        Ok("none".into())
    }

    fn spice(&mut self, arg: &str, opts: &mut Opts) -> Result<(), MirrorError> {
        for key in ["port", "tls-port"] {
            if let Some(port) = opts.get(key).filter(|p| is_fixed_port(p)) {
                return Err(unsupported(
                    arg,
                    format!(
                        "{key}={port} is a TCP port the source holds, and SPICE needs a listener"
                    ),
                ));
            }
        }
        if opts.get("unix").is_some_and(is_on) {
            if let Some(path) = opts.get("addr").map(str::to_string) {
                let new = self.socket_path(arg, &path)?;
                opts.set("addr", &new);
            }
        }
        Ok(())
    }

    fn object(&mut self, arg: &str, opts: &mut Opts) -> Result<(), MirrorError> {
        if opts.get("fd").is_some() {
            return Err(unsupported(arg, PASSED_FD));
        }
        match opts.get("qom-type").unwrap_or("") {
            "memory-backend-file" if opts.get("share").is_some_and(is_on) => Err(unsupported(
                arg,
                "guest RAM in a shared file: the incoming migration would overwrite the source's memory",
            )),
            "filter-dump" => self.file_key(arg, opts, "file"),
            "input-linux" => Err(unsupported(arg, HOST_DEVICE)),
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
            return Err(unsupported(arg, HOST_DEVICE));
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
            return Err(unsupported(
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
                return Err(unsupported(
                    arg,
                    format!("its new path {new} is one the source uses"),
                ));
            }
            if self.moved[..i].iter().any(|(_, other, _)| other == new) {
                return Err(unsupported(
                    arg,
                    format!("its new path {new} is given to another argument too"),
                ));
            }
        }
        Ok(())
    }
}

/// `-netdev`, `-nic` and `-net`: what a second process can share with the source.
fn netdev(arg: &str, opts: &Opts) -> Result<(), MirrorError> {
    if ["fd", "fds", "vhostfd", "vhostfds", "sock_fd"]
        .iter()
        .any(|k| opts.get(k).is_some())
    {
        return Err(unsupported(arg, PASSED_FD));
    }
    let listens = |port: &str| {
        unsupported(
            arg,
            format!("it listens on port {port}, which the source holds"),
        )
    };
    match opts.get("type").unwrap_or("") {
        "user" => {
            // hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport, given once or more (or as a JSON list).
            for fwd in opts.items.iter().filter(|o| o.key.starts_with("hostfwd")) {
                let host = fwd.value.split('-').next().unwrap_or("");
                let port = host.rsplit(':').next().unwrap_or("");
                if is_fixed_port(port) {
                    return Err(listens(port));
                }
            }
            Ok(())
        }
        "tap" => {
            if opts.get("ifname").is_some() {
                Err(unsupported(
                    arg,
                    "a named tap belongs to one process: the destination needs its own",
                ))
            } else if opts
                .get("script")
                .is_some_and(|s| s.is_empty() || s == "no")
            {
                Err(unsupported(
                    arg,
                    "with script=no nothing would connect the destination's new tap",
                ))
            } else {
                // A fresh tap, attached by the same script as the source's: two ports on the bridge, one active.
                Ok(())
            }
        }
        "socket" if opts.get("listen").is_some() => Err(listens(opts.get("listen").unwrap_or(""))),
        "socket" => match opts
            .get("localaddr")
            .map(|a| a.rsplit(':').next().unwrap_or(""))
        {
            Some(port) if is_fixed_port(port) => Err(listens(port)),
            _ => Ok(()),
        },
        "stream" => match opts.get("addr.type") {
            Some("inet") if opts.get("server").is_some_and(is_on) => {
                Err(listens(opts.get("addr.port").unwrap_or("")))
            }
            Some("unix") if !opts.get("server").is_some_and(is_on) => {
                Err(unsupported(arg, CLIENT_SOCKET))
            }
            Some("unix") => Err(unsupported(
                arg,
                "its listening socket would move, and its peer would not find it",
            )),
            Some("fd") => Err(unsupported(arg, PASSED_FD)),
            _ => Ok(()),
        },
        "dgram" => match opts.get("local.type") {
            Some("inet") => match opts.get("local.port") {
                Some(port) if is_fixed_port(port) => Err(listens(port)),
                _ => Ok(()),
            },
            Some("unix") => Err(unsupported(
                arg,
                "its bound socket would move, and its peer would not find it",
            )),
            Some("fd") => Err(unsupported(arg, PASSED_FD)),
            _ => Ok(()),
        },
        "bridge" | "vde" | "hubport" | "none" | "nic" | "vhost-user" => Ok(()),
        other => Err(unsupported(
            arg,
            format!("netdev type {other:?} is not known to be safe to share"),
        )),
    }
}

/// `-device`: drivers that hold a host device, or an id unique on the host.
fn device(arg: &str, opts: &Opts) -> Result<(), MirrorError> {
    let driver = opts.get("driver").unwrap_or("");
    if driver.starts_with("vhost-vsock") || driver.starts_with("vhost-user-vsock") {
        return Err(unsupported(
            arg,
            "a vsock guest-cid is unique on the host, and the source holds it",
        ));
    }
    if driver.starts_with("vfio-")
        || driver.starts_with("vhost-scsi")
        || matches!(driver, "usb-host" | "u2f-passthru" | "pci-assign")
    {
        return Err(unsupported(arg, HOST_DEVICE));
    }
    Ok(())
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
        for (case, extra, want, rewrites) in table {
            let got = mirror(extra).unwrap_or_else(|e| panic!("{case}: {e}"));
            let mut want_args = v(&QMP_DST);
            want_args.extend(v(want));
            want_args.extend(v(&["-incoming", "defer"]));
            assert_eq!(got.args, want_args, "{case}");
            let mut want_rewrites = vec![(SRC.to_string(), DST.to_string())];
            want_rewrites.extend(rewrites.iter().map(|(a, b)| (a.to_string(), b.to_string())));
            assert_eq!(got.rewritten, want_rewrites, "{case}");
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
        for (extra, arg, reason) in table {
            match mirror(extra) {
                Err(MirrorError::Unsupported { arg: a, reason: r }) => {
                    assert!(a.contains(arg), "{extra:?}: named {a:?}, not {arg:?}");
                    assert!(
                        r.contains(reason),
                        "{extra:?}: reason {r:?} lacks {reason:?}"
                    );
                    let shown = MirrorError::Unsupported {
                        arg: a.clone(),
                        reason: r,
                    }
                    .to_string();
                    assert!(shown.contains(&a), "{shown}");
                }
                other => panic!("{extra:?}: {other:?}"),
            }
        }
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
