//! The QMP layer: connections (UNIX, TCP, any byte stream), the handshake, typed commands with per-command
//! timeouts, events, lenient types where the `qapi` crate's schema does not match the QEMU we talk to, and
//! detection of what the peer supports. It knows nothing about migration policy.

mod conn;
pub mod features;
pub mod stats_types;
pub mod types;

use std::time::Duration;

pub use conn::{
    decode_line, ConnectOptions, Decoded, Greeting, Qmp, QmpEvent, ReplyOutcome, MAX_LINE_BYTES,
};
pub use features::PeerFeatures;

/// Every failure of the QMP layer names the socket (or stream label) and, where one was running, the command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{socket}: no such file")]
    NotFound { socket: String },
    #[error("{socket}: not a socket")]
    NotASocket { socket: String },
    #[error("{socket}: permission denied")]
    PermissionDenied { socket: String },
    #[error("{socket}: connection refused (nothing listens there)")]
    Refused { socket: String },
    #[error("{socket}: cannot connect")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket}: not a QMP peer: {reason}")]
    NotQmp { socket: String, reason: String },
    #[error("{socket}: `{command}` got no reply within {}", humantime::format_duration(*after))]
    Timeout {
        socket: String,
        command: String,
        after: Duration,
    },
    #[error("{socket}: `{command}` failed: {desc}")]
    Command {
        socket: String,
        command: String,
        class: String,
        desc: String,
    },
    #[error("{socket}: connection closed{}", command.as_ref().map(|c| format!(" during `{c}`")).unwrap_or_default())]
    Closed {
        socket: String,
        command: Option<String>,
    },
    #[error("{socket}: cannot decode the reply to `{command}`")]
    Decode {
        socket: String,
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{socket}: protocol error: {reason}")]
    Protocol { socket: String, reason: String },
}

impl QmpError {
    /// The QMP error class of a command that QEMU rejected, if that is what this is.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when the peer is gone (EOF, reset) rather than merely slow or unhappy with a command.
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. })
    }
}
