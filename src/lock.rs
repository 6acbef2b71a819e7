//! The per-VM lock: an exclusive `flock` on a file beside the VM's QMP socket, held for a whole migration, so that
//! two qmigrate runs never drive one VM. The kernel drops it when its holder dies, so a stale lock cannot exist;
//! the file itself stays (deleting a lock file races with its next user) and holds the holder's pid.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("VM {socket} is being migrated by another qmigrate (pid {holder}, lock {path}); wait for it to finish, or take its migration over with --adopt once it has exited")]
    Held {
        socket: String,
        holder: String,
        path: PathBuf,
    },
    #[error("cannot take the lock {path} for VM {socket}")]
    Io {
        socket: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct VmLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

impl VmLock {
    /// Takes the lock of the VM whose QMP address is `socket` (a path, `unix:PATH` or `tcp:HOST:PORT`), without
    /// waiting: a held lock is an error naming the holder's pid.
    pub fn acquire(socket: &str) -> Result<VmLock, LockError> {
        match VmLock::acquire_at(socket, lock_path(socket)) {
            // The socket's directory is not ours to write (a VM run by another user, read-only): the lock goes to
            // our runtime directory, keyed by the socket's canonical path.
            Err(LockError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(nix::libc::EACCES | nix::libc::EPERM | nix::libc::EROFS)
                ) =>
            {
                VmLock::acquire_at(socket, runtime_lock_path(&canonical_spec(socket)))
            }
            r => r,
        }
    }

    /// Takes the lock of a VM reached through another host (`key` names the host and the socket there), kept in
    /// this machine's runtime directory: it excludes the qmigrate runs of this machine.
    pub fn acquire_keyed(key: &str) -> Result<VmLock, LockError> {
        VmLock::acquire_at(key, runtime_lock_path(key))
    }

    fn acquire_at(socket: &str, path: PathBuf) -> Result<VmLock, LockError> {
        let io = |source| LockError::Io {
            socket: socket.into(),
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LockError::Held {
                    socket: socket.into(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        crate::text::printable(holder).into_owned()
                    },
                    path,
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = write!(lock, "{}", std::process::id());
        let _ = lock.flush();
        Ok(VmLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Beside the socket for a UNIX path (its directory canonicalised, so that `DIR/./vm.sock` and `DIR/vm.sock` share
/// one lock); in the runtime directory for a TCP address.
pub fn lock_path(socket: &str) -> PathBuf {
    let spec = socket.strip_prefix("unix:").unwrap_or(socket);
    if !spec.starts_with("tcp:") {
        let p = Path::new(spec);
        if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            return dir.join(format!(".{}.qmigrate-lock", name.to_string_lossy()));
        }
    }
    runtime_lock_path(spec)
}

/// A socket's path with its directory canonicalised, for keying a lock in the runtime directory.
fn canonical_spec(socket: &str) -> String {
    let spec = socket.strip_prefix("unix:").unwrap_or(socket);
    let p = Path::new(spec);
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) if !spec.starts_with("tcp:") => std::fs::canonicalize(dir)
            .map(|d| d.join(name).display().to_string())
            .unwrap_or_else(|_| spec.to_string()),
        _ => spec.to_string(),
    }
}

fn runtime_lock_path(spec: &str) -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let key: String = spec
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    runtime
        .join(format!("qmigrate-locks-{}", current_uid()))
        .join(format!("{key}.lock"))
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_vm_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.qmp");
        let first = VmLock::acquire(sock.to_str().unwrap()).unwrap();
        // Another spelling of the same socket takes the same lock.
        let other = format!("unix:{}/./vm.qmp", dir.path().display());
        let err = VmLock::acquire(&other).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("vm.qmp"), "{err}");
        drop(first);
        VmLock::acquire(&other).expect("free again once released");
    }

    #[test]
    fn tcp_addresses_lock_in_the_runtime_directory() {
        let p = lock_path("tcp:10.0.0.1:4444");
        assert!(
            p.to_string_lossy().ends_with("tcp_10.0.0.1_4444.lock"),
            "{p:?}"
        );
    }
}
