//! Downtime as the guest sees it: a probe from the host that tries a TCP connection to the guest every 10 ms
//! while a migration runs (the way paper 002 measured unreachability with pings), and the PURE analysis that turns
//! its log into the guest-perceived downtime ([`guest_downtime`]). It owns one thread per probe and nothing else: it
//! must not talk to QEMU, and it must not change the network namespace of any thread but its own.
//!
//! A probe counts as answered when the connection is accepted *or refused*: a reset comes from the guest's kernel,
//! so the guest is running. Timeouts, unreachable hosts and every other error count as unanswered.
//!
//! Probes are sent every `interval`, start to start, and do not wait for each other: like `ping -i`, a probe
//! that hangs for its whole `connect_timeout` during the blackout does not delay the next one, so the resolution
//! stays `interval` exactly when it matters. The probe thread therefore drives its own single-threaded tokio
//! runtime; it is still one OS thread, which may enter a network namespace (`setns`) without touching the rest of
//! the process, and every socket it opens lives in that namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// The spacing of probes, start to start, unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// How long a probe waits for the guest before counting as unanswered, unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "probe target {input:?}: {reason} (expected tcp:HOST:PORT or HOST:PORT, IPv6 in brackets)"
    )]
    BadTarget { input: String, reason: String },
    #[error("probe target {input:?}: cannot resolve it")]
    Resolve {
        input: String,
        #[source]
        source: io::Error,
    },
    #[error("probe of {target}: {reason}")]
    BadSettings { target: String, reason: String },
    #[error("probe of {target}: cannot open network namespace {}", netns.display())]
    OpenNetns {
        target: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("probe of {target}: cannot enter network namespace {}", netns.display())]
    EnterNetns {
        target: String,
        netns: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("probe of {target}: cannot start the probe thread")]
    Thread {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// What to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A TCP connection to `addr`; accepted or refused both mean the guest answered.
    Tcp { addr: SocketAddr },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { addr } => write!(f, "tcp:{addr}"),
        }
    }
}

impl FromStr for Target {
    type Err = ProbeError;

    /// Accepts `tcp:HOST:PORT` and `HOST:PORT`, where HOST is an IPv4 address, an IPv6 address in brackets, or a
    /// host name, which is resolved here (the first address wins).
    fn from_str(input: &str) -> Result<Self, ProbeError> {
        let bad = |reason: &str| ProbeError::BadTarget {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = match input.split_once(':') {
            Some(("tcp", rest)) => rest,
            Some((kind, rest))
                if !kind.is_empty()
                    && kind.chars().all(|c| c.is_ascii_alphabetic())
                    && rest.contains(':')
                    && !rest.starts_with(':') =>
            {
                return Err(bad(&format!("unknown probe kind {kind:?}, only tcp")));
            }
            _ => input,
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("port {port:?} is not a number from 1 to 65535")))?;
        if port == 0 {
            return Err(bad("port 0 cannot be connected to"));
        }
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let addr = if let Some(inner) = host.strip_prefix('[') {
            let ip = inner
                .strip_suffix(']')
                .and_then(|v6| v6.parse::<std::net::Ipv6Addr>().ok())
                .ok_or_else(|| bad(&format!("{host} is not an IPv6 address in brackets")))?;
            SocketAddr::new(IpAddr::V6(ip), port)
        } else if host.contains(':') {
            return Err(bad("an IPv6 address needs brackets, like [::1]:22"));
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            SocketAddr::new(ip, port)
        } else {
            let resolve_err = |source| ProbeError::Resolve {
                input: input.to_owned(),
                source,
            };
            (host, port)
                .to_socket_addrs()
                .map_err(resolve_err)?
                .next()
                .ok_or_else(|| resolve_err(io::Error::new(io::ErrorKind::NotFound, "no address")))?
        };
        Ok(Target::Tcp { addr })
    }
}

/// Validated settings of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    pub target: Target,
    /// Spacing of probes, start to start.
    pub interval: Duration,
    /// How long one probe waits for an answer.
    pub connect_timeout: Duration,
    /// A network namespace file (e.g. `/run/netns/NAME`) to probe from; `None` probes from qmigrate's own.
    pub netns: Option<PathBuf>,
}

impl ProbeSettings {
    /// Settings with the default interval and timeout, from qmigrate's own network namespace.
    pub fn new(target: Target) -> Self {
        ProbeSettings {
            target,
            interval: DEFAULT_INTERVAL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            netns: None,
        }
    }
}

/// One probe: when it was sent, relative to the probe's start, and whether the guest answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub at: Duration,
    pub ok: bool,
}

/// Everything a probe saw, in the order the probes were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLog {
    /// The origin of every [`Record::at`].
    pub started: Instant,
    pub records: Vec<Record>,
}

/// A running probe; [`Prober::finish`] stops it and hands over its log. Dropping it stops the probe too, and
/// throws the log away.
#[derive(Debug)]
pub struct Prober {
    started: Instant,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Vec<Record>>,
}

/// Starts probing on a thread of its own; returns once that thread has entered its network namespace and is
/// about to send its first probe, or with the reason it could not.
pub fn start(settings: ProbeSettings) -> Result<Prober, ProbeError> {
    let target = settings.target.to_string();
    for (name, value) in [
        ("interval", settings.interval),
        ("connect timeout", settings.connect_timeout),
    ] {
        if value.is_zero() {
            return Err(ProbeError::BadSettings {
                target,
                reason: format!("the {name} must be above zero"),
            });
        }
    }
    let (setup_tx, setup_rx) = mpsc::sync_channel(1);
    let (stop, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("probe {target}"))
        .spawn(move || probe_thread(&settings, &setup_tx, stop_rx))
        .map_err(|source| ProbeError::Thread {
            target: target.clone(),
            source,
        })?;
    match setup_rx.recv() {
        Ok(Ok(started)) => Ok(Prober {
            started,
            stop,
            thread,
        }),
        Ok(Err(e)) => {
            // The thread returns right after reporting its failure.
            let _ = thread.join();
            Err(e)
        }
        // The thread died before reporting: only a panic does that.
        Err(_) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(_) => unreachable!("the probe thread reports its setup before it returns"),
        },
    }
}

impl Prober {
    /// Stops sending probes, waits for those still out (at most one connect timeout) and returns the log.
    pub fn finish(self) -> ProbeLog {
        // The thread may have ended already only by panicking, which the join below passes on.
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok(records) => ProbeLog {
                started: self.started,
                records,
            },
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

type Setup = mpsc::SyncSender<Result<Instant, ProbeError>>;

/// The body of the probe thread: set up, report, then probe until told to stop (or until the [`Prober`] is
/// dropped, which drops `stop`).
fn probe_thread(
    settings: &ProbeSettings,
    setup: &Setup,
    stop: oneshot::Receiver<()>,
) -> Vec<Record> {
    let runtime = match enter_netns(settings).and_then(|()| runtime(settings)) {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = setup.send(Err(e));
            return Vec::new();
        }
    };
    runtime.block_on(probe_loop(settings, setup, stop))
}

fn enter_netns(settings: &ProbeSettings) -> Result<(), ProbeError> {
    let Some(netns) = &settings.netns else {
        return Ok(());
    };
    let file = File::open(netns).map_err(|source| ProbeError::OpenNetns {
        target: settings.target.to_string(),
        netns: netns.clone(),
        source,
    })?;
    // Affects this thread only; the sockets opened here from now on belong to the namespace.
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
        ProbeError::EnterNetns {
            target: settings.target.to_string(),
            netns: netns.clone(),
            source,
        }
    })
}

fn runtime(settings: &ProbeSettings) -> Result<tokio::runtime::Runtime, ProbeError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| ProbeError::Thread {
            target: settings.target.to_string(),
            source,
        })
}

async fn probe_loop(
    settings: &ProbeSettings,
    setup: &Setup,
    mut stop: oneshot::Receiver<()>,
) -> Vec<Record> {
    let Target::Tcp { addr } = settings.target;
    let connect_timeout = settings.connect_timeout;
    let mut ticker = tokio::time::interval(settings.interval);
    // Start to start on the grid laid at the start: a tick the thread was too late for is skipped, not bunched.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let started = Instant::now();
    let _ = setup.send(Ok(started));
    let mut out = JoinSet::new();
    let mut records = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = ticker.tick() => {
                let at = started.elapsed();
                out.spawn(async move { Record { at, ok: answered(addr, connect_timeout).await } });
            }
            Some(Ok(record)) = out.join_next() => records.push(record),
        }
    }
    while let Some(done) = out.join_next().await {
        records.extend(done.ok());
    }
    // Answers come back out of order (a timeout takes longer than a refusal); the log is in sending order.
    records.sort_by_key(|r| r.at);
    records
}

/// Whether the guest answered one connection attempt: accepted or refused.
async fn answered(addr: SocketAddr, connect_timeout: Duration) -> bool {
    match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        Err(_elapsed) => false,
    }
}

/// The guest-perceived downtime in a probe log. Times are milliseconds from the probe's start until
/// [`GuestDowntime::relative_to`] moves them to another origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestDowntime {
    /// Probes sent.
    pub probes: u64,
    /// Probes the guest did not answer.
    pub failed: u64,
    /// Runs of consecutive unanswered probes.
    pub windows: u32,
    /// The longest window, from the last answered probe before it to the first answered probe after it, so it
    /// includes the time the spacing of probes hides: the guest was unreachable for at most this long, and at
    /// least from the window's first unanswered probe to its last (about two intervals less). `None` when every
    /// probe was answered.
    pub longest_unreachable_ms: Option<u64>,
    /// Start of the longest window: the last answered probe before it, or its first probe when none was
    /// answered before it (see `reachable_before`).
    pub unreachable_from_ms: Option<i64>,
    /// End of the longest window: the first answered probe after it, or the last probe sent when none was
    /// answered after it (see `recovered`).
    pub unreachable_until_ms: Option<i64>,
    /// Whether a probe was answered before the longest window; when not, the guest was already unreachable when
    /// probing started and `longest_unreachable_ms` is only a lower bound. True when there is no window.
    pub reachable_before: bool,
    /// Whether a probe was answered after the longest window; when not, the guest never answered again before
    /// probing stopped and `longest_unreachable_ms` is only a lower bound. True when there is no window.
    pub recovered: bool,
}

impl GuestDowntime {
    /// The same figures with times relative to another origin (say the migration's start) that came `origin_ms`
    /// after the probe's start; negative when it came before. See [`origin_offset_ms`].
    #[must_use]
    pub fn relative_to(self, origin_ms: i64) -> Self {
        GuestDowntime {
            unreachable_from_ms: self.unreachable_from_ms.map(|t| t - origin_ms),
            unreachable_until_ms: self.unreachable_until_ms.map(|t| t - origin_ms),
            ..self
        }
    }
}

/// How many milliseconds after the probe's start `origin` came (negative when before), for
/// [`GuestDowntime::relative_to`].
pub fn origin_offset_ms(probe_started: Instant, origin: Instant) -> i64 {
    match origin.checked_duration_since(probe_started) {
        Some(after) => millis(after),
        None => -millis(probe_started.duration_since(origin)),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A run of unanswered probes, bounded by the answered probes around it when there are any.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Duration,
    until: Duration,
    reachable_before: bool,
    recovered: bool,
}

/// PURE: the guest-perceived downtime in `records`, which must be in sending order (as [`Prober::finish`] gives
/// them). The longest window wins; of equal ones, the first.
pub fn guest_downtime(records: &[Record]) -> GuestDowntime {
    let windows = failure_windows(records);
    let longest = windows.iter().copied().reduce(|best, w| {
        if w.until - w.from > best.until - best.from {
            w
        } else {
            best
        }
    });
    GuestDowntime {
        probes: records.len() as u64,
        failed: records.iter().filter(|r| !r.ok).count() as u64,
        windows: u32::try_from(windows.len()).unwrap_or(u32::MAX),
        longest_unreachable_ms: longest.map(|w| (w.until - w.from).as_millis() as u64),
        unreachable_from_ms: longest.map(|w| millis(w.from)),
        unreachable_until_ms: longest.map(|w| millis(w.until)),
        reachable_before: longest.is_none_or(|w| w.reachable_before),
        recovered: longest.is_none_or(|w| w.recovered),
    }
}

fn failure_windows(records: &[Record]) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut last_ok: Option<Duration> = None;
    let mut open: Option<Window> = None;
    for record in records {
        match (record.ok, open.take()) {
            (true, Some(w)) => windows.push(Window {
                until: record.at,
                recovered: true,
                ..w
            }),
            (false, None) => {
                open = Some(Window {
                    from: last_ok.unwrap_or(record.at),
                    until: record.at,
                    reachable_before: last_ok.is_some(),
                    recovered: false,
                });
            }
            (false, Some(w)) => {
                open = Some(Window {
                    until: record.at,
                    ..w
                })
            }
            (true, None) => {}
        }
        if record.ok {
            last_ok = Some(record.at);
        }
    }
    windows.extend(open);
    windows
}

/// What the migration report says about the guest's reachability.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReachability {
    /// What was probed, as `tcp:ADDR`.
    pub target: String,
    /// Spacing of probes: the resolution of the figures.
    pub interval_ms: u64,
    /// How long one probe waited before counting as unanswered.
    pub connect_timeout_ms: u64,
    #[serde(flatten)]
    pub downtime: GuestDowntime,
}

impl GuestReachability {
    /// The report of a finished probe, with times relative to `origin` (the migration's start).
    pub fn new(settings: &ProbeSettings, log: &ProbeLog, origin: Instant) -> Self {
        GuestReachability {
            target: settings.target.to_string(),
            interval_ms: settings.interval.as_millis() as u64,
            connect_timeout_ms: settings.connect_timeout.as_millis() as u64,
            downtime: guest_downtime(&log.records)
                .relative_to(origin_offset_ms(log.started, origin)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log from `(ms, answered)` pairs.
    fn log(probes: &[(u64, bool)]) -> Vec<Record> {
        probes
            .iter()
            .map(|&(ms, ok)| Record {
                at: Duration::from_millis(ms),
                ok,
            })
            .collect()
    }

    const T: bool = true;
    const F: bool = false;

    #[test]
    fn guest_downtime_table() {
        struct Case {
            name: &'static str,
            probes: &'static [(u64, bool)],
            failed: u64,
            windows: u32,
            longest_ms: Option<u64>,
            from_ms: Option<i64>,
            until_ms: Option<i64>,
            reachable_before: bool,
            recovered: bool,
        }
        #[rustfmt::skip]
        let cases = [
            Case { name: "empty log", probes: &[],
                failed: 0, windows: 0, longest_ms: None, from_ms: None, until_ms: None,
                reachable_before: T, recovered: T },
            Case { name: "no failures", probes: &[(0, T), (10, T), (20, T)],
                failed: 0, windows: 0, longest_ms: None, from_ms: None, until_ms: None,
                reachable_before: T, recovered: T },
            Case { name: "one window, measured answer to answer",
                probes: &[(0, T), (10, T), (20, F), (30, F), (40, T), (50, T)],
                failed: 2, windows: 1, longest_ms: Some(30), from_ms: Some(10), until_ms: Some(40),
                reachable_before: T, recovered: T },
            Case { name: "two windows, the second longer",
                probes: &[(0, T), (10, F), (20, T), (30, T), (40, F), (50, F), (60, F), (70, T)],
                failed: 4, windows: 2, longest_ms: Some(40), from_ms: Some(30), until_ms: Some(70),
                reachable_before: T, recovered: T },
            Case { name: "two equal windows: the first wins",
                probes: &[(0, T), (10, F), (20, T), (30, F), (40, T)],
                failed: 2, windows: 2, longest_ms: Some(20), from_ms: Some(0), until_ms: Some(20),
                reachable_before: T, recovered: T },
            Case { name: "failures before any answer",
                probes: &[(0, F), (10, F), (20, F), (30, T), (40, T)],
                failed: 3, windows: 1, longest_ms: Some(30), from_ms: Some(0), until_ms: Some(30),
                reachable_before: F, recovered: T },
            Case { name: "failures at the end, never recovered",
                probes: &[(0, T), (10, T), (20, F), (30, F), (40, F)],
                failed: 3, windows: 1, longest_ms: Some(30), from_ms: Some(10), until_ms: Some(40),
                reachable_before: T, recovered: F },
            Case { name: "a short recovered window before a longer open one",
                probes: &[(0, T), (10, F), (20, T), (30, F), (40, F), (50, F)],
                failed: 4, windows: 2, longest_ms: Some(30), from_ms: Some(20), until_ms: Some(50),
                reachable_before: T, recovered: F },
            Case { name: "a single failed probe",
                probes: &[(0, T), (10, T), (20, F), (30, T)],
                failed: 1, windows: 1, longest_ms: Some(20), from_ms: Some(10), until_ms: Some(30),
                reachable_before: T, recovered: T },
            Case { name: "a gap in the probes counts toward the window",
                probes: &[(0, T), (10, F), (120, F), (230, T)],
                failed: 2, windows: 1, longest_ms: Some(230), from_ms: Some(0), until_ms: Some(230),
                reachable_before: T, recovered: T },
            Case { name: "never answered", probes: &[(0, F), (10, F), (20, F)],
                failed: 3, windows: 1, longest_ms: Some(20), from_ms: Some(0), until_ms: Some(20),
                reachable_before: F, recovered: F },
            Case { name: "one probe, unanswered", probes: &[(5, F)],
                failed: 1, windows: 1, longest_ms: Some(0), from_ms: Some(5), until_ms: Some(5),
                reachable_before: F, recovered: F },
        ];
        for case in cases {
            let got = guest_downtime(&log(case.probes));
            let want = GuestDowntime {
                probes: case.probes.len() as u64,
                failed: case.failed,
                windows: case.windows,
                longest_unreachable_ms: case.longest_ms,
                unreachable_from_ms: case.from_ms,
                unreachable_until_ms: case.until_ms,
                reachable_before: case.reachable_before,
                recovered: case.recovered,
            };
            assert_eq!(got, want, "{}", case.name);
        }
    }

    #[test]
    fn relative_to_moves_times_not_durations() {
        let d = guest_downtime(&log(&[(0, T), (100, F), (200, T)]));
        let later = d.relative_to(150);
        assert_eq!(later.unreachable_from_ms, Some(-150));
        assert_eq!(later.unreachable_until_ms, Some(50));
        assert_eq!(later.longest_unreachable_ms, Some(200));
        let earlier = d.relative_to(-30);
        assert_eq!(earlier.unreachable_from_ms, Some(30));
        assert_eq!(earlier.unreachable_until_ms, Some(230));
        assert_eq!(guest_downtime(&[]).relative_to(150), guest_downtime(&[]));

        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(origin_offset_ms(t0, t1), 1500);
        assert_eq!(origin_offset_ms(t1, t0), -1500);
    }

    #[test]
    fn reachability_serializes_flat() {
        let settings = ProbeSettings::new("tcp:192.0.2.1:22".parse().unwrap());
        let started = Instant::now();
        let log = ProbeLog {
            started,
            records: log(&[(0, T), (10, F), (20, T)]),
        };
        let report = GuestReachability::new(&settings, &log, started + Duration::from_millis(5));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "target": "tcp:192.0.2.1:22",
                "interval_ms": 10,
                "connect_timeout_ms": 100,
                "probes": 3,
                "failed": 1,
                "windows": 1,
                "longest_unreachable_ms": 20,
                "unreachable_from_ms": -5,
                "unreachable_until_ms": 15,
                "reachable_before": true,
                "recovered": true,
            })
        );
    }

    #[test]
    fn parses_targets() {
        let ok = [
            ("tcp:127.0.0.1:22", "tcp:127.0.0.1:22"),
            ("10.0.0.5:80", "tcp:10.0.0.5:80"),
            ("[::1]:22", "tcp:[::1]:22"),
            ("tcp:[fe80::1]:2222", "tcp:[fe80::1]:2222"),
        ];
        for (input, shown) in ok {
            let target: Target = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(target.to_string(), shown, "{input}");
            assert_eq!(
                shown.parse::<Target>().unwrap(),
                target,
                "{input} round trip"
            );
        }
        // /etc/hosts answers for localhost: no network needed.
        let Target::Tcp { addr } = "tcp:localhost:22".parse().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 22, "{addr}");

        let bad = [
            ("", "no port"),
            ("tcp:", "no port"),
            ("127.0.0.1", "no port"),
            (":22", "no host"),
            ("tcp::22", "no host"),
            ("127.0.0.1:ssh", "\"ssh\" is not a number"),
            ("127.0.0.1:70000", "\"70000\" is not a number"),
            ("127.0.0.1:0", "port 0"),
            ("::1:22", "needs brackets"),
            ("[::1:22", "not an IPv6 address in brackets"),
            ("[1.2.3.4]:22", "not an IPv6 address in brackets"),
            ("udp:1.2.3.4:5", "unknown probe kind \"udp\""),
        ];
        for (input, says) in bad {
            let err = input.parse::<Target>().expect_err(input).to_string();
            assert!(err.contains(says), "{input}: {err}");
            assert!(
                err.contains(&format!("{input:?}")),
                "{input}: {err} names the input"
            );
        }
    }

    fn probe_for(target: Target, connect_timeout: Duration, run: Duration) -> ProbeLog {
        let prober = start(ProbeSettings {
            connect_timeout,
            ..ProbeSettings::new(target)
        })
        .unwrap();
        // The run length is the measurement itself, not a wait for something to happen.
        std::thread::sleep(run);
        prober.finish()
    }

    fn assert_spacing(log: &ProbeLog, run: Duration) {
        let n = log.records.len();
        // About one per interval; a loaded test machine may skip a few ticks, never add any.
        assert!((8..=23).contains(&n), "{n} probes in {run:?}");
        assert!(
            log.records.windows(2).all(|w| w[0].at < w[1].at),
            "in sending order"
        );
    }

    #[test]
    fn listening_guest_answers_every_probe() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let run = Duration::from_millis(200);
        // Not accepting is fine: the kernel completes handshakes into the backlog, which holds far more.
        let log = probe_for(Target::Tcp { addr }, DEFAULT_CONNECT_TIMEOUT, run);
        assert_spacing(&log, run);
        assert!(log.records.iter().all(|r| r.ok), "{:?}", log.records);
        let d = guest_downtime(&log.records);
        assert_eq!(
            (d.failed, d.windows, d.longest_unreachable_ms),
            (0, 0, None)
        );
    }

    #[test]
    fn refused_connection_counts_as_answered() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is gone: the port answers with a reset, which only a running kernel sends.
        let log = probe_for(
            Target::Tcp { addr },
            DEFAULT_CONNECT_TIMEOUT,
            Duration::from_millis(100),
        );
        assert!(!log.records.is_empty());
        assert!(log.records.iter().all(|r| r.ok), "{:?}", log.records);
    }

    /// A loopback listener that never answers again: its accept queue (backlog 0) is filled and never drained,
    /// so the kernel drops every further SYN, as for a guest that is paused. Keep both halves alive.
    fn silent_listener() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // listen() again on a listening socket only changes its backlog; std offers no way to choose it.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                Ok(stream) => held.push(stream),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return (listener, held),
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            }
        }
        panic!("the accept queue of {addr} never filled");
    }

    #[test]
    fn silent_guest_fails_every_probe_at_full_rate() {
        let (listener, _held) = silent_listener();
        let addr = listener.local_addr().unwrap();
        let run = Duration::from_millis(200);
        // Probes that wait longer than the interval overlap rather than delay each other: still ~20, not 4.
        let log = probe_for(Target::Tcp { addr }, Duration::from_millis(50), run);
        assert_spacing(&log, run);
        assert!(log.records.iter().all(|r| !r.ok), "{:?}", log.records);
        let d = guest_downtime(&log.records);
        assert_eq!(
            (d.windows, d.reachable_before, d.recovered),
            (1, false, false)
        );
    }

    #[test]
    fn start_names_a_missing_namespace() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let settings = ProbeSettings {
            netns: Some("/run/netns/qmigrate-no-such-ns".into()),
            ..ProbeSettings::new(Target::Tcp { addr })
        };
        let err = start(settings).expect_err("no such namespace");
        assert!(matches!(err, ProbeError::OpenNetns { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/run/netns/qmigrate-no-such-ns"),
            "{err}"
        );
    }

    #[test]
    fn start_enters_a_namespace_or_names_it() {
        // Our own namespace: entering it needs CAP_SYS_ADMIN, so either outcome is right, but not any other error.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = ProbeSettings {
            netns: Some("/proc/self/ns/net".into()),
            ..ProbeSettings::new(Target::Tcp { addr })
        };
        match start(settings) {
            Ok(prober) => {
                std::thread::sleep(Duration::from_millis(30));
                let log = prober.finish();
                assert!(
                    !log.records.is_empty() && log.records.iter().all(|r| r.ok),
                    "{:?}",
                    log.records
                );
            }
            Err(e @ ProbeError::EnterNetns { .. }) => {
                assert!(e.to_string().contains("/proc/self/ns/net"), "{e}");
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn start_rejects_a_zero_interval() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let settings = ProbeSettings {
            interval: Duration::ZERO,
            ..ProbeSettings::new(Target::Tcp { addr })
        };
        let err = start(settings).expect_err("zero interval").to_string();
        assert!(
            err.contains("interval must be above zero") && err.contains("tcp:127.0.0.1:9"),
            "{err}"
        );
    }
}
