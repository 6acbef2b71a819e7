//! Exit statuses of the `qmigrate` binary, documented in README.md. A library user reads the same from
//! [`crate::report::MigrationReport`] and [`crate::migrate::MigrateError`].

/// What the process exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The migration completed; the guest runs on the destination only.
    Completed = 0,
    /// A bug or an unexpected condition.
    Internal = 1,
    /// Invalid arguments.
    Usage = 2,
    /// A QMP endpoint cannot be used: missing, not a socket, permission denied, not QMP, not answering.
    Endpoint = 3,
    /// A VM is in the wrong state (source not running, destination not waiting for a migration), or QEMU
    /// refused to set the migration up. Nothing was changed.
    State = 4,
    /// The migration was cancelled (timeout with `--on-timeout cancel`); the source runs on.
    Cancelled = 5,
    /// The migration failed (QEMU reported a failure, the destination died), or was rolled back inside
    /// `--verify`; the source runs on.
    Failed = 6,
    /// Interrupted (SIGINT/SIGTERM); the migration was cancelled and the source runs on.
    Interrupted = 7,
    /// After the migration the guest did not run exactly once. Should never happen; look at both ends.
    GuestNotRunningOnce = 8,
    /// Postcopy paused and could not be recovered within `--recover-for`: both QEMUs are paused and alive;
    /// `qmigrate recover --from A --to B` resumes it.
    Paused = 9,
    /// An evacuation moved some VMs, and some failed: each failed one runs on its source (the report says which).
    Partial = 10,
    /// `--refuse-hopeless`: the forecast said the migration cannot complete within `--timeout` with the rungs
    /// allowed; nothing was started, and the message names the flags that would make it complete.
    Hopeless = 11,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}
