//! One QMP connection: a single task owns the byte stream, writes commands with numeric ids, routes replies to
//! their callers by id and broadcasts events. Callers hold cheap clones of [`Qmp`].
//!
//! Lines are framed as bytes, not text: a peer that sends invalid UTF-8 costs one skipped line, not the
//! connection. What a line means is decided by the pure [`decode_line`], which the reader task and the fuzz
//! targets (`tests/fuzz`) share.

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
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
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
    /// Enable out-of-band execution when the peer offers it, so that [`Qmp::execute_oob`] reaches a QEMU whose main
    /// loop is blocked (a postcopy destination waiting for pages that will not come: `migrate-recover` must get
    /// through).
    pub oob: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            oob: false,
        }
    }
}

/// What the peer said about itself in its greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub version: (u32, u32, u32),
    pub package: String,
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event. Unknown events are delivered like known ones: the name is a plain string.
#[derive(Debug, Clone, PartialEq)]
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
    /// Out-of-band execution was enabled at the handshake.
    oob: bool,
    command_timeout: Duration,
    peer_pid: Option<i32>,
    closed: CancellationToken,
    /// Whatever the transport needs kept alive as long as the connection (an ssh child, killed on drop).
    _keep: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
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

    /// Like [`Qmp::connect_stream`], keeping `keep` (the process behind the stream) alive exactly as long as the
    /// connection: dropped with the last handle.
    pub async fn connect_stream_keeping<R, W>(
        reader: R,
        writer: W,
        label: &str,
        keep: Box<dyn std::any::Any + Send>,
        opts: &ConnectOptions,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let qmp = Self::handshake(reader, writer, label.to_string(), None, opts).await?;
        *qmp.shared._keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(keep);
        Ok(qmp)
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
        let mut lines = framed_lines(reader);
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
            let Decoded::Greeting(greeting) = decode_line(&first) else {
                return Err(not_qmp(format!("unexpected greeting {}", snippet(&first))));
            };
            let oob = opts.oob && greeting.capabilities.iter().any(|c| c == "oob");
            let mut caps = json!({"execute": "qmp_capabilities", "id": 0});
            if oob {
                caps["arguments"] = json!({"enable": ["oob"]});
            }
            let line = caps.to_string() + "\n";
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
                // The reply's id is not checked: qmp_capabilities is the only command in flight.
                match decode_line(&l) {
                    Decoded::Event(_) => continue,
                    Decoded::Reply {
                        outcome: ReplyOutcome::Return(_),
                        ..
                    } => return Ok((greeting, oob)),
                    Decoded::Reply {
                        outcome: ReplyOutcome::Error { class, desc },
                        ..
                    } => {
                        return Err(QmpError::Command {
                            socket: label.clone(),
                            command: "qmp_capabilities".into(),
                            class,
                            desc,
                        })
                    }
                    Decoded::NotJson => return Err(not_qmp(format!("not JSON: {}", snippet(&l)))),
                    _ => return Err(not_qmp(format!("unexpected reply {}", snippet(&l)))),
                }
            }
        };
        let (greeting, oob) = tokio::time::timeout(opts.handshake_timeout, negotiate)
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
            oob,
            command_timeout: opts.command_timeout,
            peer_pid,
            closed: closed.clone(),
            _keep: std::sync::Mutex::new(None),
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
        let args = self.arguments(cmd)?;
        let v = self.execute_raw(C::NAME, args, timeout).await?;
        decode(&self.shared.label, C::NAME, v)
    }

    /// Runs a typed command out of band (`exec-oob`) when the connection enabled it and QEMU allows it for this
    /// command, so it is served even while QEMU's main loop is blocked; in band otherwise.
    pub async fn execute_oob<C: qapi::Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        if !(self.shared.oob && C::ALLOW_OOB) {
            return self.execute_timeout(cmd, timeout).await;
        }
        let args = self.arguments(cmd)?;
        let v = self.exchange("exec-oob", C::NAME, args, timeout).await?;
        decode(&self.shared.label, C::NAME, v)
    }

    /// A typed command's arguments as QMP wants them (none for an empty object).
    fn arguments<C: qapi::Command>(&self, cmd: &C) -> Result<Option<Value>, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Decode {
            socket: self.shared.label.clone(),
            command: C::NAME.into(),
            source,
        })?;
        Ok(match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            v => Some(v),
        })
    }

    /// True when out-of-band execution was enabled at the handshake.
    pub fn has_oob(&self) -> bool {
        self.shared.oob
    }

    /// Runs a command given by name with raw JSON arguments.
    pub async fn execute_raw(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.exchange("execute", name, args, timeout).await
    }

    async fn exchange(
        &self,
        key: &str,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({key: name, "id": id});
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
    mut lines: Lines<R>,
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

/// What one line from a QMP peer is. Produced by [`decode_line`] for every line the connection receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// `{"QMP": …}`, the first thing a peer says.
    Greeting(Greeting),
    /// `{"event": "NAME", "data": …}`; `data` is `null` when absent.
    Event(QmpEvent),
    /// An object with `id`, `return` or `error`. Only a reply whose id is an unsigned integer can be routed.
    Reply {
        id: Option<u64>,
        outcome: ReplyOutcome,
    },
    /// JSON, but none of the above (`{"hello": 1}`, `[1, 2]`).
    Unrecognised,
    /// Not JSON: text, a partial line, or bytes that are not UTF-8 (also inside a JSON string).
    NotJson,
}

/// What a reply says.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyOutcome {
    Return(Value),
    /// `class` is `GenericError` when the peer gave none.
    Error {
        class: String,
        desc: String,
    },
    /// Neither `return` nor `error`: a protocol error for the command waiting on it.
    Neither,
}

/// Classifies one received line (without its `\n`). Pure, and total over any bytes: serde_json rejects invalid
/// UTF-8 and bounds nesting depth, so a hostile peer can make a line [`Decoded::NotJson`] but cannot make this
/// panic.
pub fn decode_line(line: &[u8]) -> Decoded {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return Decoded::NotJson;
    };
    let Value::Object(mut v) = v else {
        return Decoded::Unrecognised;
    };
    if let Some(Value::String(name)) = v.remove("event") {
        return Decoded::Event(QmpEvent {
            name,
            data: v.remove("data").unwrap_or(Value::Null),
        });
    }
    if v.contains_key("id") || v.contains_key("return") || v.contains_key("error") {
        let id = v.get("id").and_then(Value::as_u64);
        let outcome = if let Some(ret) = v.remove("return") {
            ReplyOutcome::Return(ret)
        } else if let Some(err) = v.get("error") {
            ReplyOutcome::Error {
                class: err["class"].as_str().unwrap_or("GenericError").into(),
                desc: err["desc"].as_str().unwrap_or_default().into(),
            }
        } else {
            ReplyOutcome::Neither
        };
        return Decoded::Reply { id, outcome };
    }
    match v.get("QMP") {
        Some(qmp) => Decoded::Greeting(parse_greeting(qmp)),
        None => Decoded::Unrecognised,
    }
}

fn route(label: &str, line: &[u8], pending: &mut Pending, events: &broadcast::Sender<QmpEvent>) {
    let (id, outcome) = match decode_line(line) {
        Decoded::Event(ev) => {
            tracing::debug!(socket = %label, event = %ev.name, "event");
            let _ = events.send(ev);
            return;
        }
        Decoded::Reply {
            id: Some(id),
            outcome,
        } => (id, outcome),
        Decoded::NotJson => {
            tracing::warn!(socket = %label, line = %snippet(line), "ignoring a line that is not JSON");
            return;
        }
        Decoded::Reply { id: None, .. } | Decoded::Greeting(_) | Decoded::Unrecognised => {
            tracing::warn!(socket = %label, line = %snippet(line), "ignoring a reply without a known id");
            return;
        }
    };
    let Some((command, tx)) = pending.remove(&id) else {
        tracing::debug!(socket = %label, id, "late reply to an abandoned command dropped");
        return;
    };
    let result = match outcome {
        ReplyOutcome::Return(ret) => Ok(ret),
        ReplyOutcome::Error { class, desc } => Err(QmpError::Command {
            socket: label.into(),
            command,
            class,
            desc,
        }),
        ReplyOutcome::Neither => Err(QmpError::Protocol {
            socket: label.into(),
            reason: format!("reply to `{command}` has neither return nor error"),
        }),
    };
    let _ = tx.send(result);
}

/// The greeting's contents; anything missing or out of range reads as 0 or empty.
fn parse_greeting(qmp: &Value) -> Greeting {
    let q = &qmp["version"]["qemu"];
    let n = |k: &str| {
        q[k].as_u64()
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Greeting {
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
    }
}

type Lines<R> = FramedRead<R, AnyDelimiterCodec>;

/// Splits the peer's bytes on `\n` without decoding them: UTF-8 is [`decode_line`]'s business.
fn framed_lines<R: AsyncRead>(reader: R) -> Lines<R> {
    FramedRead::new(
        reader,
        AnyDelimiterCodec::new_with_max_length(vec![b'\n'], Vec::new(), MAX_LINE_BYTES),
    )
}

fn codec_reason(e: &AnyDelimiterCodecError) -> String {
    match e {
        AnyDelimiterCodecError::MaxChunkLengthExceeded => {
            format!("a line longer than {MAX_LINE_BYTES} bytes")
        }
        AnyDelimiterCodecError::Io(e) => e.to_string(),
    }
}

/// The start of a line for a message, with invalid UTF-8 shown as U+FFFD.
fn snippet(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
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
    use tokio::io::{AsyncBufReadExt, BufReader};

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 99}, \"package\": \"fake\"}, \"capabilities\": []}}\n";

    fn quick() -> ConnectOptions {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            oob: false,
        }
    }

    /// A fake peer on an in-memory stream: greets, accepts qmp_capabilities, then answers each later command line
    /// (its id and its number, counting from 1) with the bytes `script` returns.
    async fn fake_peer(script: impl Fn(u64, usize) -> Vec<u8> + Send + 'static) -> Qmp {
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(server);
            let mut lines = BufReader::new(r).lines();
            w.write_all(GREETING).await.unwrap();
            let mut n = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                let id = serde_json::from_str::<Value>(&line).unwrap()["id"]
                    .as_u64()
                    .unwrap();
                let out = if n == 0 {
                    format!("{{\"return\": {{}}, \"id\": {id}}}\n").into_bytes()
                } else {
                    script(id, n)
                };
                n += 1;
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
        let (r, w) = tokio::io::split(client);
        Qmp::connect_stream(r, w, "fake-peer", &quick())
            .await
            .unwrap()
    }

    #[test]
    fn greeting_parses_qemu_7_and_tolerates_unknown_capabilities() {
        let Decoded::Greeting(g) = decode_line(
            br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob", "future-thing"]}}"#,
        ) else {
            panic!("not a greeting");
        };
        assert_eq!(g.version, (7, 2, 22));
        assert_eq!(g.package, "Debian 1:7.2");
        assert_eq!(g.capabilities, vec!["oob", "future-thing"]);
        assert_eq!(decode_line(br#"{"hello": 1}"#), Decoded::Unrecognised);
        assert_eq!(decode_line(b"SSH-2.0-OpenSSH"), Decoded::NotJson);
        // A version number beyond u32 saturates instead of wrapping.
        let Decoded::Greeting(g) =
            decode_line(br#"{"QMP": {"version": {"qemu": {"major": 4294967306}}}}"#)
        else {
            panic!("not a greeting");
        };
        assert_eq!(g.version, (u32::MAX, 0, 0));
    }

    #[test]
    fn decode_line_classifies_every_kind_of_line() {
        let cases: &[(&[u8], Decoded)] = &[
            (
                br#"{"return": {"status": "running"}, "id": 7}"#,
                Decoded::Reply {
                    id: Some(7),
                    outcome: ReplyOutcome::Return(json!({"status": "running"})),
                },
            ),
            (
                b"{\"return\": {}, \"id\": 3}\r",
                Decoded::Reply {
                    id: Some(3),
                    outcome: ReplyOutcome::Return(json!({})),
                },
            ),
            (
                br#"{"error": {"class": "DeviceNotActive", "desc": "No balloon"}, "id": 2}"#,
                Decoded::Reply {
                    id: Some(2),
                    outcome: ReplyOutcome::Error {
                        class: "DeviceNotActive".into(),
                        desc: "No balloon".into(),
                    },
                },
            ),
            (
                br#"{"error": 5, "id": 2}"#,
                Decoded::Reply {
                    id: Some(2),
                    outcome: ReplyOutcome::Error {
                        class: "GenericError".into(),
                        desc: String::new(),
                    },
                },
            ),
            (
                br#"{"id": 4}"#,
                Decoded::Reply {
                    id: Some(4),
                    outcome: ReplyOutcome::Neither,
                },
            ),
            (
                br#"{"return": {}, "id": "four"}"#,
                Decoded::Reply {
                    id: None,
                    outcome: ReplyOutcome::Return(json!({})),
                },
            ),
            (
                br#"{"return": {}, "id": -1}"#,
                Decoded::Reply {
                    id: None,
                    outcome: ReplyOutcome::Return(json!({})),
                },
            ),
            (
                br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                Decoded::Event(QmpEvent {
                    name: "STOP".into(),
                    data: Value::Null,
                }),
            ),
            (
                br#"{"event": "MIGRATION", "data": {"status": "active"}}"#,
                Decoded::Event(QmpEvent {
                    name: "MIGRATION".into(),
                    data: json!({"status": "active"}),
                }),
            ),
            // An event name that is not a string is not an event.
            (br#"{"event": 1}"#, Decoded::Unrecognised),
            (b"[1, 2]", Decoded::Unrecognised),
            (b"", Decoded::NotJson),
            (b"{\"return\": {}, \"id\": 1", Decoded::NotJson),
            // Invalid UTF-8, bare and inside a JSON string.
            (b"\xff\xfe\xfd", Decoded::NotJson),
            (b"{\"return\": \"\xc3\x28\", \"id\": 1}", Decoded::NotJson),
            // Nesting beyond serde_json's recursion limit is refused, not a stack overflow.
            (&[b'['; 100_000], Decoded::NotJson),
        ];
        for (line, want) in cases {
            assert_eq!(
                &decode_line(line),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn invalid_utf8_between_replies_costs_a_line_not_the_connection() {
        let qmp = fake_peer(|id, n| {
            let reply = format!("{{\"return\": {{\"n\": {n}}}, \"id\": {id}}}\n").into_bytes();
            if n == 1 {
                // The first reply, then garbage: invalid UTF-8 alone, inside a JSON string that claims the
                // next command's id, and in an event.
                let mut out = reply;
                out.extend_from_slice(b"\xff\xfe\x80 not text\n");
                out.extend_from_slice(b"{\"return\": \"\xc3\x28\", \"id\": ");
                out.extend_from_slice(format!("{}}}\n", id + 1).as_bytes());
                out.extend_from_slice(b"{\"event\": \"\xed\xa0\x80\"}\n");
                out
            } else {
                reply
            }
        })
        .await;
        let t = Duration::from_secs(5);
        let first = qmp.execute_raw("query-status", None, t).await.unwrap();
        assert_eq!(first, json!({"n": 1}));
        let second = qmp.execute_raw("query-status", None, t).await.unwrap();
        assert_eq!(second, json!({"n": 2}));
        assert!(!qmp.is_closed());
    }

    #[tokio::test]
    async fn a_line_over_the_limit_ends_the_connection_with_an_error_naming_the_socket() {
        let qmp = fake_peer(|_, _| vec![b'x'; MAX_LINE_BYTES + 2]).await;
        let err = qmp
            .execute_raw("query-status", None, Duration::from_secs(10))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QmpError::Protocol { .. }), "{msg}");
        assert!(
            msg.contains("fake-peer") && msg.contains("longer than"),
            "{msg}"
        );
        tokio::time::timeout(Duration::from_secs(5), qmp.closed())
            .await
            .unwrap();
    }
}
