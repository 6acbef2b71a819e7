//! One QMP connection: a single task owns the byte stream, writes commands with numeric ids, routes replies to
//! their callers by id and broadcasts events. Callers hold cheap clones of [`Qmp`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use super::QmpError;

/// The longest line accepted from a peer. `query-qmp-schema` on QEMU 10 is well under 1 MiB.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// How a connection is made.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on connecting plus the greeting and capabilities negotiation.
    pub handshake_timeout: Duration,
    /// Timeout of commands run through [`Qmp::execute`].
    pub command_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

/// What the peer said about itself in its greeting.
#[derive(Debug, Clone)]
pub struct Greeting {
    pub version: (u32, u32, u32),
    pub package: String,
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event. Unknown events are delivered like known ones: the name is a plain string.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

struct Request {
    id: u64,
    line: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

struct Shared {
    label: String,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    greeting: Greeting,
    command_timeout: Duration,
    peer_pid: Option<i32>,
    closed: CancellationToken,
}

/// A handle on one QMP connection. Clones share the connection; it closes when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("label", &self.shared.label)
            .finish()
    }
}

impl Qmp {
    /// Connects to a QMP UNIX socket, with errors that say what is wrong with the path.
    pub async fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Qmp, QmpError> {
        use std::os::unix::fs::FileTypeExt;
        let socket = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| io_to_connect_error(&socket, e))?;
        if !meta.file_type().is_socket() {
            return Err(QmpError::NotASocket { socket });
        }
        let stream = connect_within(
            &socket,
            opts.handshake_timeout,
            tokio::net::UnixStream::connect(path),
        )
        .await?;
        let peer_pid =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .ok()
                .map(|c| c.pid())
                .filter(|p| *p > 0);
        let (r, w) = stream.into_split();
        Self::handshake(r, w, socket, peer_pid, opts).await
    }

    /// Connects to QMP over TCP (`HOST:PORT`).
    pub async fn connect_tcp(addr: &str, opts: &ConnectOptions) -> Result<Qmp, QmpError> {
        let socket = format!("tcp:{addr}");
        let stream = connect_within(
            &socket,
            opts.handshake_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await?;
        let (r, w) = stream.into_split();
        Self::handshake(r, w, socket, None, opts).await
    }

    /// Speaks QMP over any byte stream, e.g. the stdio of an `ssh host socat - UNIX:/run/vm.qmp` child.
    pub async fn connect_stream<R, W>(
        reader: R,
        writer: W,
        label: &str,
        opts: &ConnectOptions,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake(reader, writer, label.to_string(), None, opts).await
    }

    /// Connects to `unix:PATH`, `tcp:HOST:PORT`, or a bare path.
    pub async fn connect(spec: &str, opts: &ConnectOptions) -> Result<Qmp, QmpError> {
        if let Some(addr) = spec.strip_prefix("tcp:") {
            Self::connect_tcp(addr, opts).await
        } else {
            Self::connect_unix(Path::new(spec.strip_prefix("unix:").unwrap_or(spec)), opts).await
        }
    }

    async fn handshake<R, W>(
        reader: R,
        mut writer: W,
        label: String,
        peer_pid: Option<i32>,
        opts: &ConnectOptions,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
        let not_qmp = |reason: String| QmpError::NotQmp {
            socket: label.clone(),
            reason,
        };
        let negotiate = async {
            let first = match lines.next().await {
                Some(Ok(l)) => l,
                Some(Err(e)) => return Err(not_qmp(codec_reason(&e))),
                None => return Err(not_qmp("closed before sending a greeting".into())),
            };
            let greeting = parse_greeting(&first)
                .ok_or_else(|| not_qmp(format!("unexpected greeting {}", snippet(&first))))?;
            let line = json!({"execute": "qmp_capabilities", "id": 0}).to_string() + "\n";
            writer
                .write_all(line.as_bytes())
                .await
                .map_err(|_| QmpError::Closed {
                    socket: label.clone(),
                    command: Some("qmp_capabilities".into()),
                })?;
            loop {
                let l = match lines.next().await {
                    Some(Ok(l)) => l,
                    Some(Err(e)) => return Err(not_qmp(codec_reason(&e))),
                    None => {
                        return Err(QmpError::Closed {
                            socket: label.clone(),
                            command: Some("qmp_capabilities".into()),
                        })
                    }
                };
                let v: Value = serde_json::from_str(&l)
                    .map_err(|_| not_qmp(format!("not JSON: {}", snippet(&l))))?;
                if v.get("event").is_some() {
                    continue;
                }
                if v.get("return").is_some() {
                    return Ok(greeting);
                }
                if let Some(err) = v.get("error") {
                    return Err(QmpError::Command {
                        socket: label.clone(),
                        command: "qmp_capabilities".into(),
                        class: err["class"].as_str().unwrap_or_default().into(),
                        desc: err["desc"].as_str().unwrap_or_default().into(),
                    });
                }
                return Err(not_qmp(format!("unexpected reply {}", snippet(&l))));
            }
        };
        let greeting = tokio::time::timeout(opts.handshake_timeout, negotiate)
            .await
            .map_err(|_| QmpError::NotQmp {
                socket: label.clone(),
                reason: format!(
                    "no QMP greeting within {} (QEMU serves one client per QMP socket: is another one connected?)",
                    humantime::format_duration(opts.handshake_timeout)
                ),
            })??;

        let (req_tx, req_rx) = mpsc::channel(64);
        let (ev_tx, _) = broadcast::channel(1024);
        let closed = CancellationToken::new();
        let shared = Arc::new(Shared {
            label: label.clone(),
            requests: req_tx,
            events: ev_tx.clone(),
            next_id: AtomicU64::new(1),
            greeting,
            command_timeout: opts.command_timeout,
            peer_pid,
            closed: closed.clone(),
        });
        tokio::spawn(run_connection(label, lines, writer, req_rx, ev_tx, closed));
        Ok(Qmp { shared })
    }

    /// The socket path or stream label, for messages.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    pub fn greeting(&self) -> &Greeting {
        &self.shared.greeting
    }

    /// The pid of the process listening on the UNIX socket (from SO_PEERCRED), when known.
    pub fn peer_pid(&self) -> Option<i32> {
        self.shared.peer_pid
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Resolves when the connection has ended (peer closed, protocol error).
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Runs a typed command with the connection's default timeout.
    pub async fn execute<C: qapi::Command>(&self, cmd: &C) -> Result<C::Ok, QmpError> {
        self.execute_timeout(cmd, self.shared.command_timeout).await
    }

    /// Runs a typed command; a timeout costs only this command (a late reply is dropped by id).
    pub async fn execute_timeout<C: qapi::Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Decode {
            socket: self.shared.label.clone(),
            command: C::NAME.into(),
            source,
        })?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            v => Some(v),
        };
        let v = self.execute_raw(C::NAME, args, timeout).await?;
        decode(&self.shared.label, C::NAME, v)
    }

    /// Runs a command given by name with raw JSON arguments.
    pub async fn execute_raw(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": name, "id": id});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let (tx, rx) = oneshot::channel();
        let req = Request {
            id,
            line: msg.to_string() + "\n",
            reply: tx,
        };
        let label = &self.shared.label;
        let closed = || QmpError::Closed {
            socket: label.clone(),
            command: Some(name.into()),
        };
        let timed_out = || QmpError::Timeout {
            socket: label.clone(),
            command: name.into(),
            after: timeout,
        };
        let exchange = async {
            self.shared.requests.send(req).await.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out())??;
        tracing::trace!(socket = %label, command = name, "reply");
        Ok(reply)
    }
}

fn decode<T: DeserializeOwned>(label: &str, command: &str, v: Value) -> Result<T, QmpError> {
    serde_json::from_value(v).map_err(|source| QmpError::Decode {
        socket: label.into(),
        command: command.into(),
        source,
    })
}

async fn run_connection<R, W>(
    label: String,
    mut lines: FramedRead<R, LinesCodec>,
    mut writer: W,
    mut requests: mpsc::Receiver<Request>,
    events: broadcast::Sender<QmpEvent>,
    closed: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)> =
        HashMap::new();
    let end_reason: Option<String> = loop {
        tokio::select! {
            req = requests.recv() => {
                let Some(req) = req else { break None };
                // Callers that gave up (timeout, dropped future) leave entries behind; prune them here.
                pending.retain(|_, (_, tx)| !tx.is_closed());
                let command = serde_json::from_str::<Value>(&req.line)
                    .ok()
                    .and_then(|v| v["execute"].as_str().map(String::from))
                    .unwrap_or_default();
                if writer.write_all(req.line.as_bytes()).await.is_err() || writer.flush().await.is_err() {
                    let _ = req.reply.send(Err(QmpError::Closed { socket: label.clone(), command: Some(command) }));
                    break None;
                }
                pending.insert(req.id, (command, req.reply));
            }
            line = lines.next() => match line {
                None => break None,
                Some(Err(e)) => break Some(codec_reason(&e)),
                Some(Ok(line)) => route(&label, &line, &mut pending, &events),
            }
        }
    };
    closed.cancel();
    for (_, (command, tx)) in pending.drain() {
        let err = match &end_reason {
            Some(reason) => QmpError::Protocol {
                socket: label.clone(),
                reason: reason.clone(),
            },
            None => QmpError::Closed {
                socket: label.clone(),
                command: Some(command),
            },
        };
        let _ = tx.send(Err(err));
    }
    if let Some(reason) = end_reason {
        tracing::warn!(socket = %label, %reason, "QMP connection dropped");
    }
}

type Pending = HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)>;

fn route(label: &str, line: &str, pending: &mut Pending, events: &broadcast::Sender<QmpEvent>) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        tracing::warn!(socket = %label, line = %snippet(line), "ignoring a line that is not JSON");
        return;
    };
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ev = QmpEvent {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        };
        tracing::debug!(socket = %label, event = %ev.name, "event");
        let _ = events.send(ev);
        return;
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        tracing::warn!(socket = %label, line = %snippet(line), "ignoring a reply without a known id");
        return;
    };
    let Some((command, tx)) = pending.remove(&id) else {
        tracing::debug!(socket = %label, id, "late reply to an abandoned command dropped");
        return;
    };
    let result = if let Some(ret) = v.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = v.get("error") {
        Err(QmpError::Command {
            socket: label.into(),
            command,
            class: err["class"].as_str().unwrap_or("GenericError").into(),
            desc: err["desc"].as_str().unwrap_or_default().into(),
        })
    } else {
        Err(QmpError::Protocol {
            socket: label.into(),
            reason: format!("reply to `{command}` has neither return nor error"),
        })
    };
    let _ = tx.send(result);
}

fn parse_greeting(line: &str) -> Option<Greeting> {
    let v: Value = serde_json::from_str(line).ok()?;
    let qmp = v.get("QMP")?;
    let q = &qmp["version"]["qemu"];
    let n = |k: &str| q[k].as_u64().unwrap_or(0) as u32;
    Some(Greeting {
        version: (n("major"), n("minor"), n("micro")),
        package: qmp["version"]["package"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string(),
        capabilities: qmp["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn codec_reason(e: &LinesCodecError) -> String {
    match e {
        LinesCodecError::MaxLineLengthExceeded => {
            format!("a line longer than {MAX_LINE_BYTES} bytes")
        }
        LinesCodecError::Io(e) => e.to_string(),
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}…", &s[..end])
    } else {
        format!("{s:?}")
    }
}

/// Bounds a connect attempt by `timeout`, turning its failures into errors that name the socket.
async fn connect_within<T>(
    socket: &str,
    timeout: Duration,
    connect: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, QmpError> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| QmpError::Timeout {
            socket: socket.to_string(),
            command: "connect".into(),
            after: timeout,
        })?
        .map_err(|e| io_to_connect_error(socket, e))
}

fn io_to_connect_error(socket: &str, e: std::io::Error) -> QmpError {
    use std::io::ErrorKind;
    let socket = socket.to_string();
    match e.kind() {
        ErrorKind::NotFound => QmpError::NotFound { socket },
        ErrorKind::PermissionDenied => QmpError::PermissionDenied { socket },
        ErrorKind::ConnectionRefused => QmpError::Refused { socket },
        _ => QmpError::Connect { socket, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_parses_qemu_7_and_tolerates_unknown_capabilities() {
        let g = parse_greeting(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob", "future-thing"]}}"#,
        )
        .unwrap();
        assert_eq!(g.version, (7, 2, 22));
        assert_eq!(g.capabilities, vec!["oob", "future-thing"]);
        assert!(parse_greeting(r#"{"hello": 1}"#).is_none());
        assert!(parse_greeting("SSH-2.0-OpenSSH").is_none());
    }
}
