//! `qmigrate serve`: samples every VM and the host continuously and serves the latest figures as Prometheus metrics
//! over HTTP (`prometheus-client` encodes, `axum` serves). Each VM has its own sampling loop, so a slow or dead socket
//! delays only its own figures; a semaphore bounds how many VMs are sampled at once. The QMP socket is connected
//! per sample and released between them (QEMU serves one client per socket: a migration must be able to get in).
//! Each VM's series carry its name in the `vm` label (`stats::name`: given, else QEMU's `-name` from its first
//! answer, else the socket's file name), made printable. This module owns the metric names; it must not decide
//! anything from the figures (that is `classify`/`plan`).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::name::{NameSource, Names};
use super::{error_chain, sample_host, sampler, HostSample, SampleOptions, StatsError, VmSample};
use crate::classify::{self, Class, Label};
use crate::qmp::types::QueryStatus;
use crate::qmp::{ConnectOptions, Qmp};
use crate::text::printable;

/// How long the HTTP server may take to finish open requests after the stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Every class, so that each VM exports all of them (1 carried, 0 not) and a dashboard can plot any.
const CLASSES: [Class; 6] = [
    Class::DirtyMemory,
    Class::Web,
    Class::NetReceive,
    Class::Cpu,
    Class::DiskIo,
    Class::Idle,
];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics server on {addr} failed")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

pub use super::name::Target;

/// How `serve` samples.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Per-sample settings; `interval` is also the cadence of each VM's loop.
    pub sample: SampleOptions,
    /// At most this many VMs are being sampled at once.
    pub max_concurrent_vms: usize,
}

impl ServeOptions {
    pub fn new(interval: Duration) -> ServeOptions {
        ServeOptions {
            sample: SampleOptions::new(interval),
            max_concurrent_vms: 256,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    vm: String,
    socket: String,
    name_from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VcpuLabels {
    vm: String,
    vcpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    vm: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    vm: String,
    class: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// The label sets one VM set last time, so that a disk, NIC, vCPU or run state that went away stops being exported.
#[derive(Default)]
struct Exported {
    info: Option<InfoLabels>,
    states: Vec<StateLabels>,
    vcpus: Vec<VcpuLabels>,
    disks: Vec<DeviceLabels>,
    nics: Vec<DeviceLabels>,
}

/// Every metric `serve` exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Held for writing while one VM's figures are replaced, for reading while encoding: a scrape never sees half
    /// of a VM's update.
    update: RwLock<()>,
    vm_up: Family<VmLabels, Gauge>,
    vm_info: Family<InfoLabels, Gauge>,
    vm_run_state: Family<StateLabels, Gauge>,
    vm_cpu_pct: Family<VmLabels, F64Gauge>,
    vm_cpu_host_pct: Family<VmLabels, F64Gauge>,
    vcpu_pct: Family<VcpuLabels, F64Gauge>,
    memory_bytes: Family<VmLabels, Gauge>,
    balloon_bytes: Family<VmLabels, Gauge>,
    guest_total_bytes: Family<VmLabels, Gauge>,
    guest_free_bytes: Family<VmLabels, Gauge>,
    guest_available_bytes: Family<VmLabels, Gauge>,
    disk_read_bytes_per_s: Family<DeviceLabels, F64Gauge>,
    disk_write_bytes_per_s: Family<DeviceLabels, F64Gauge>,
    net_rx_bytes_per_s: Family<DeviceLabels, F64Gauge>,
    net_tx_bytes_per_s: Family<DeviceLabels, F64Gauge>,
    net_rx_packets_per_s: Family<DeviceLabels, F64Gauge>,
    net_tx_packets_per_s: Family<DeviceLabels, F64Gauge>,
    dirty_rate_bytes_per_s: Family<VmLabels, F64Gauge>,
    class: Family<ClassLabels, Gauge>,
    samples: Family<VmLabels, Counter>,
    sample_errors: Family<VmLabels, Counter>,
    sample_duration_s: Family<VmLabels, F64Gauge>,
    qmp_round_trip_s: Histogram,
    host_up: Gauge,
    host_cpu_pct: F64Gauge,
    host_cpus: Gauge,
    host_memory_total_bytes: Gauge,
    host_memory_available_bytes: Gauge,
    host_sample_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[allow(clippy::cast_possible_wrap)] // byte counts below 2^63
fn as_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Metrics {
    #[allow(clippy::too_many_lines)] // one registration per metric
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            update: RwLock::new(()),
            vm_up: Family::default(),
            vm_info: Family::default(),
            vm_run_state: Family::default(),
            vm_cpu_pct: Family::default(),
            vm_cpu_host_pct: Family::default(),
            vcpu_pct: Family::default(),
            memory_bytes: Family::default(),
            balloon_bytes: Family::default(),
            guest_total_bytes: Family::default(),
            guest_free_bytes: Family::default(),
            guest_available_bytes: Family::default(),
            disk_read_bytes_per_s: Family::default(),
            disk_write_bytes_per_s: Family::default(),
            net_rx_bytes_per_s: Family::default(),
            net_tx_bytes_per_s: Family::default(),
            net_rx_packets_per_s: Family::default(),
            net_tx_packets_per_s: Family::default(),
            dirty_rate_bytes_per_s: Family::default(),
            class: Family::default(),
            samples: Family::default(),
            sample_errors: Family::default(),
            sample_duration_s: Family::default(),
            // 50 µs to about 1.3 s in steps of 1.5: fine enough to read a p50 and p99 from the buckets.
            qmp_round_trip_s: Histogram::new(exponential_buckets(50e-6, 1.5, 26)),
            host_up: Gauge::default(),
            host_cpu_pct: F64Gauge::default(),
            host_cpus: Gauge::default(),
            host_memory_total_bytes: Gauge::default(),
            host_memory_available_bytes: Gauge::default(),
            host_sample_errors: Counter::default(),
        };
        let mut r = Registry::default();
        r.register(
            "qmigrate_vm_up",
            "1 when the VM's last sample succeeded, 0 when it failed (see qmigrate_vm_sample_errors_total)",
            m.vm_up.clone(),
        );
        r.register(
            "qmigrate_vm_info",
            "1 for each VM: its socket, and where its name (the vm label) came from: given, qemu (-name), \
             socket-file, socket-path",
            m.vm_info.clone(),
        );
        r.register(
            "qmigrate_vm_run_state",
            "1 for the VM's QEMU run state (query-status)",
            m.vm_run_state.clone(),
        );
        r.register(
            "qmigrate_vm_cpu_percent",
            "vCPU utilisation as a share of the VM's vCPU capacity (100 = every vCPU busy)",
            m.vm_cpu_pct.clone(),
        );
        r.register(
            "qmigrate_vm_cpu_host_percent",
            "vCPU utilisation summed over vCPUs, in % of one host CPU",
            m.vm_cpu_host_pct.clone(),
        );
        r.register(
            "qmigrate_vm_vcpu_percent",
            "one vCPU thread's utilisation, in % of one host CPU",
            m.vcpu_pct.clone(),
        );
        r.register(
            "qmigrate_vm_memory_bytes",
            "configured memory: boot plus plugged (query-memory-size-summary)",
            m.memory_bytes.clone(),
        );
        r.register(
            "qmigrate_vm_balloon_bytes",
            "memory the balloon leaves the guest (query-balloon)",
            m.balloon_bytes.clone(),
        );
        r.register(
            "qmigrate_vm_guest_total_bytes",
            "guest-reported total memory (virtio-balloon statistics)",
            m.guest_total_bytes.clone(),
        );
        r.register(
            "qmigrate_vm_guest_free_bytes",
            "guest-reported free memory (virtio-balloon statistics)",
            m.guest_free_bytes.clone(),
        );
        r.register(
            "qmigrate_vm_guest_available_bytes",
            "guest-reported available memory (virtio-balloon statistics)",
            m.guest_available_bytes.clone(),
        );
        r.register(
            "qmigrate_vm_disk_read_bytes_per_second",
            "bytes read per second by device (query-blockstats)",
            m.disk_read_bytes_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_disk_write_bytes_per_second",
            "bytes written per second by device (query-blockstats)",
            m.disk_write_bytes_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_net_rx_bytes_per_second",
            "bytes per second received by the guest's NIC, from its host tap",
            m.net_rx_bytes_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_net_tx_bytes_per_second",
            "bytes per second sent by the guest's NIC, from its host tap",
            m.net_tx_bytes_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_net_rx_packets_per_second",
            "packets per second received by the guest's NIC, from its host tap",
            m.net_rx_packets_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_net_tx_packets_per_second",
            "packets per second sent by the guest's NIC, from its host tap",
            m.net_tx_packets_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_dirty_rate_bytes_per_second",
            "dirty page rate (calc-dirty-rate; page-sampling reads low)",
            m.dirty_rate_bytes_per_s.clone(),
        );
        r.register(
            "qmigrate_vm_class",
            "1 when the VM carries the workload class, 0 when not",
            m.class.clone(),
        );
        r.register(
            "qmigrate_vm_samples",
            "samples that succeeded",
            m.samples.clone(),
        );
        r.register(
            "qmigrate_vm_sample_errors",
            "samples that failed (dead or hung socket, QMP error)",
            m.sample_errors.clone(),
        );
        r.register(
            "qmigrate_vm_sample_duration_seconds",
            "wall time of the VM's last sample, the interval included",
            m.sample_duration_s.clone(),
        );
        r.register(
            "qmigrate_qmp_round_trip_seconds",
            "QMP command round trip (query-status on an open connection), all VMs",
            m.qmp_round_trip_s.clone(),
        );
        r.register(
            "qmigrate_host_up",
            "1 when the host's last sample succeeded",
            m.host_up.clone(),
        );
        r.register(
            "qmigrate_host_cpu_percent",
            "busy share of all host CPUs (/proc/stat)",
            m.host_cpu_pct.clone(),
        );
        r.register("qmigrate_host_cpus", "host CPUs", m.host_cpus.clone());
        r.register(
            "qmigrate_host_memory_total_bytes",
            "host memory (/proc/meminfo MemTotal)",
            m.host_memory_total_bytes.clone(),
        );
        r.register(
            "qmigrate_host_memory_available_bytes",
            "host memory available (/proc/meminfo MemAvailable)",
            m.host_memory_available_bytes.clone(),
        );
        r.register(
            "qmigrate_host_sample_errors",
            "host samples that failed",
            m.host_sample_errors.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The exposition text (OpenMetrics, which Prometheus scrapes).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let _read = self
            .update
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn observe_round_trip(&self, took: Duration) {
        self.qmp_round_trip_s.observe(took.as_secs_f64());
    }

    /// Removes a VM's figures (not `up`, its counters or its sample duration). The caller holds `update`.
    fn clear_figures(&self, vm: &str, exported: &mut Exported) {
        let l = VmLabels { vm: vm.into() };
        for s in exported.states.drain(..) {
            self.vm_run_state.remove(&s);
        }
        for v in exported.vcpus.drain(..) {
            self.vcpu_pct.remove(&v);
        }
        for d in exported.disks.drain(..) {
            self.disk_read_bytes_per_s.remove(&d);
            self.disk_write_bytes_per_s.remove(&d);
        }
        for n in exported.nics.drain(..) {
            self.net_rx_bytes_per_s.remove(&n);
            self.net_tx_bytes_per_s.remove(&n);
            self.net_rx_packets_per_s.remove(&n);
            self.net_tx_packets_per_s.remove(&n);
        }
        let per_vm_f64 = [
            &self.vm_cpu_pct,
            &self.vm_cpu_host_pct,
            &self.dirty_rate_bytes_per_s,
        ];
        let per_vm_i64 = [
            &self.memory_bytes,
            &self.balloon_bytes,
            &self.guest_total_bytes,
            &self.guest_free_bytes,
            &self.guest_available_bytes,
        ];
        for f in per_vm_f64 {
            f.remove(&l);
        }
        for f in per_vm_i64 {
            f.remove(&l);
        }
        for c in CLASSES {
            self.class.remove(&ClassLabels {
                vm: vm.into(),
                class: c.name().into(),
            });
        }
    }

    /// Names a VM's series: `vm` is the label its metrics carry, `socket` and `from` go into `qmigrate_vm_info`.
    fn name_vm(&self, vm: &str, socket: &str, from: NameSource, exported: &mut Exported) {
        let _write = self
            .update
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = exported.info.take() {
            self.vm_info.remove(&old);
        }
        let info = InfoLabels {
            vm: vm.into(),
            socket: printable(socket).into_owned(),
            name_from: from.as_str().into(),
        };
        self.vm_info.get_or_create(&info).set(1);
        exported.info = Some(info);
    }

    /// Drops every series of `vm`, counters included: the VM goes by another name from now on.
    fn forget_vm(&self, vm: &str, exported: &mut Exported) {
        let _write = self
            .update
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.clear_figures(vm, exported);
        let l = VmLabels { vm: vm.into() };
        self.vm_up.remove(&l);
        self.samples.remove(&l);
        self.sample_errors.remove(&l);
        self.sample_duration_s.remove(&l);
        if let Some(info) = exported.info.take() {
            self.vm_info.remove(&info);
        }
    }

    /// Replaces one VM's figures with a new sample, or with its failure: a failed VM keeps only `up` = 0, its
    /// counters and its sample duration, so that no stale figure looks current.
    fn record_vm(
        &self,
        vm: &str,
        result: &Result<(VmSample, Vec<Label>), StatsError>,
        took: Duration,
        exported: &mut Exported,
    ) {
        let _write = self
            .update
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let l = VmLabels { vm: vm.into() };
        self.sample_duration_s
            .get_or_create(&l)
            .set(took.as_secs_f64());
        self.clear_figures(vm, exported);
        let (sample, labels) = match result {
            Ok(r) => r,
            Err(_) => {
                self.vm_up.get_or_create(&l).set(0);
                self.sample_errors.get_or_create(&l).inc();
                return;
            }
        };
        self.vm_up.get_or_create(&l).set(1);
        self.samples.get_or_create(&l).inc();
        let state = StateLabels {
            vm: vm.into(),
            state: sample.run_state.clone(),
        };
        self.vm_run_state.get_or_create(&state).set(1);
        exported.states.push(state);
        let set_f64 = |f: &Family<VmLabels, F64Gauge>, v: Option<f64>| {
            if let Some(v) = v {
                f.get_or_create(&l).set(v);
            }
        };
        set_f64(&self.vm_cpu_pct, sample.cpu_pct);
        set_f64(&self.vm_cpu_host_pct, sample.cpu_total_pct);
        set_f64(&self.dirty_rate_bytes_per_s, sample.dirty_rate.bytes_per_s);
        let set_i64 = |f: &Family<VmLabels, Gauge>, v: Option<u64>| {
            if let Some(v) = v {
                f.get_or_create(&l).set(as_i64(v));
            }
        };
        let mem = &sample.memory;
        set_i64(
            &self.memory_bytes,
            Some(mem.ram_bytes.saturating_add(mem.plugged_bytes)),
        );
        set_i64(&self.balloon_bytes, mem.balloon_actual_bytes);
        if let Some(g) = &mem.guest {
            set_i64(&self.guest_total_bytes, g.total_bytes);
            set_i64(&self.guest_free_bytes, g.free_bytes);
            set_i64(&self.guest_available_bytes, g.available_bytes);
        }
        for v in &sample.vcpus {
            if let Some(pct) = v.cpu_pct {
                let vl = VcpuLabels {
                    vm: vm.into(),
                    vcpu: v.index.to_string(),
                };
                self.vcpu_pct.get_or_create(&vl).set(pct);
                exported.vcpus.push(vl);
            }
        }
        for d in &sample.disks {
            let dl = DeviceLabels {
                vm: vm.into(),
                device: d.device.clone(),
            };
            self.disk_read_bytes_per_s
                .get_or_create(&dl)
                .set(d.read_bytes_per_s);
            self.disk_write_bytes_per_s
                .get_or_create(&dl)
                .set(d.write_bytes_per_s);
            exported.disks.push(dl);
        }
        for n in &sample.nics {
            let nl = DeviceLabels {
                vm: vm.into(),
                device: n.name.clone(),
            };
            // An untapped NIC has no rates: exporting 0 would claim a silent NIC.
            let pairs = [
                (&self.net_rx_bytes_per_s, n.rx_bytes_per_s),
                (&self.net_tx_bytes_per_s, n.tx_bytes_per_s),
                (&self.net_rx_packets_per_s, n.rx_packets_per_s),
                (&self.net_tx_packets_per_s, n.tx_packets_per_s),
            ];
            for (f, v) in pairs {
                if let Some(v) = v {
                    f.get_or_create(&nl).set(v);
                }
            }
            exported.nics.push(nl);
        }
        // A VM with no figure at all has no class, and then exports none rather than six zeros.
        if !labels.is_empty() {
            for c in CLASSES {
                let carried = labels.iter().any(|lab| lab.class == c);
                self.class
                    .get_or_create(&ClassLabels {
                        vm: vm.into(),
                        class: c.name().into(),
                    })
                    .set(i64::from(carried));
            }
        }
    }

    fn record_host(&self, result: &Result<HostSample, StatsError>) {
        let _write = self
            .update
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(h) => {
                self.host_up.set(1);
                if let Some(pct) = h.cpu_pct {
                    self.host_cpu_pct.set(pct);
                }
                self.host_cpus
                    .set(i64::try_from(h.cpus).unwrap_or(i64::MAX));
                self.host_memory_total_bytes.set(as_i64(h.mem_total_bytes));
                self.host_memory_available_bytes
                    .set(as_i64(h.mem_available_bytes));
            }
            Err(_) => {
                self.host_up.set(0);
                self.host_sample_errors.inc();
            }
        }
    }
}

/// Serves `http://<listener>/metrics` and samples every target and the host until `cancel` fires; then stops
/// sampling, lets open requests finish (bounded) and returns.
pub async fn run(
    listener: TcpListener,
    targets: Vec<Target>,
    opts: ServeOptions,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let metrics = Arc::new(Metrics::new());
    let limit = Arc::new(Semaphore::new(opts.max_concurrent_vms.max(1)));
    let names = Names::new(targets);
    for i in 0..names.len() {
        let (t, n) = (names.target(i), names.name(i));
        if n.from == NameSource::SocketPath {
            tracing::warn!(socket = %printable(&t.socket),
                "another VM goes by the same name: labelled with its socket path");
        }
    }
    let count = names.len();
    let names = Arc::new(Mutex::new(names));
    let mut loops = tokio::task::JoinSet::new();
    for index in 0..count {
        loops.spawn(vm_loop(
            index,
            Arc::clone(&names),
            opts.sample.clone(),
            Arc::clone(&metrics),
            Arc::clone(&limit),
            cancel.clone(),
        ));
    }
    loops.spawn(host_loop(
        opts.sample.interval,
        Arc::clone(&metrics),
        cancel.clone(),
    ));

    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(Arc::clone(&metrics));
    tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
    let stop = cancel.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    let served = tokio::select! {
        r = &mut server => Some(r),
        () = cancel.cancelled() => None,
    };
    // The server ended by itself (an accept error) or we were told to stop: either way every loop ends now.
    cancel.cancel();
    let served = match served {
        Some(r) => Some(r),
        None => tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.ok(),
    };
    if served.is_none() {
        // A client holding a connection open past the grace period does not keep us running.
        server.abort();
    }
    // Each loop checks the token between steps; a sample in progress is bounded by its own timeout.
    let _ = tokio::time::timeout(opts.sample.vm_timeout + SHUTDOWN_GRACE, async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    loops.abort_all();
    match served {
        Some(Ok(Err(source))) => Err(ServeError::Serve { addr, source }),
        _ => Ok(()),
    }
}

async fn scrape(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    match metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
    }
}

/// One VM, sampled again and again: each sample spans the interval; a sample that fails early waits out the rest of
/// the interval so that a dead socket is retried once per interval, not in a spin. The VM's first successful sample
/// asks QEMU for its `-name`, which may rename it ([`Names::resolve`]): its series under the old name go.
async fn vm_loop(
    index: usize,
    names: Arc<Mutex<Names>>,
    mut opts: SampleOptions,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    cancel: CancellationToken,
) {
    let lock = || {
        names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let (socket, mut name) = {
        let names = lock();
        (
            names.target(index).socket.clone(),
            names.name(index).clone(),
        )
    };
    // The `vm` label: names come from peers and files, and people read the exposition text too.
    let mut label = printable(&name.name).into_owned();
    let mut exported = Exported::default();
    metrics.name_vm(&label, &socket, name.from, &mut exported);
    let mut last_error: Option<String> = None;
    while !cancel.is_cancelled() {
        let next = tokio::time::Instant::now() + opts.interval;
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => p,
            () = cancel.cancelled() => break,
        };
        let Ok(_permit) = permit else { break };
        let asked = opts.query_name && lock().wants_qemu_name(index);
        let mut sample_opts = opts.clone();
        sample_opts.query_name = asked;
        let started = Instant::now();
        let sampled = tokio::select! {
            r = tokio::time::timeout(opts.vm_timeout, sampler::sample_vm(&socket, &sample_opts)) => r,
            () = cancel.cancelled() => break,
        };
        let result = match sampled {
            Ok(Ok(sample)) => {
                let labels = classify::classify(&sample.figures(), &opts.thresholds);
                Ok((sample, labels))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StatsError::Timeout {
                socket: socket.clone(),
                after: opts.vm_timeout,
            }),
        };
        let took = started.elapsed();
        if let (Ok((sample, _)), true) = (&result, asked) {
            // Once per VM, at its first answer: the name is settled whatever QEMU said.
            opts.query_name = false;
            let renamed = {
                let mut names = lock();
                names
                    .resolve(index, sample.qemu_name.as_deref())
                    .map(|_| names.name(index).clone())
            };
            if let Some(new) = renamed {
                let new_label = printable(&new.name).into_owned();
                tracing::info!(vm = %new_label, was = %label, socket = %printable(&socket),
                    "named by QEMU's -name");
                metrics.forget_vm(&label, &mut exported);
                metrics.name_vm(&new_label, &socket, new.from, &mut exported);
                (name, label) = (new, new_label);
            } else {
                let settled = lock().name(index).clone();
                if settled.from != name.from {
                    metrics.name_vm(&label, &socket, settled.from, &mut exported);
                    name = settled;
                }
            }
        }
        if result.is_ok() {
            // The sampler's own commands are not timed (its execute calls live in sampler.rs); a short probe on a
            // fresh connection measures the round trip instead, after the sample so the two never share the socket.
            if let Ok(rtt) = probe_round_trip(&socket, opts.command_timeout).await {
                metrics.observe_round_trip(rtt);
            }
        }
        match &result {
            Ok(_) if last_error.is_some() => {
                tracing::info!(vm = %label, "answers again");
                last_error = None;
            }
            Err(e) => {
                let msg = error_chain(e);
                // Log a failure when it starts or changes, not once per interval.
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(vm = %label, error = %printable(&msg), "no sample");
                    last_error = Some(msg);
                }
            }
            Ok(_) => {}
        }
        metrics.record_vm(&label, &result, took, &mut exported);
        drop(_permit);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => break,
        }
    }
}

/// One `query-status` round trip on a fresh connection (connect and handshake not counted).
async fn probe_round_trip(socket: &str, command_timeout: Duration) -> Result<Duration, StatsError> {
    let connect = ConnectOptions {
        handshake_timeout: command_timeout,
        command_timeout,
        ..ConnectOptions::default()
    };
    let qmp = Qmp::connect(socket, &connect).await?;
    let started = Instant::now();
    qmp.execute(&QueryStatus {}).await?;
    Ok(started.elapsed())
}

async fn host_loop(interval: Duration, metrics: Arc<Metrics>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let next = tokio::time::Instant::now() + interval;
        let result = tokio::select! {
            r = sample_host(interval) => r,
            () = cancel.cancelled() => break,
        };
        if let Err(e) = &result {
            tracing::warn!(error = %error_chain(e), "no host sample");
        }
        metrics.record_host(&result);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_vm_keeps_only_up_and_its_error_count() {
        let m = Metrics::new();
        let mut exported = Exported::default();
        let err = Err(StatsError::Task {
            socket: "gone.qmp".into(),
        });
        m.record_vm("gone", &err, Duration::from_millis(3), &mut exported);
        m.record_vm("gone", &err, Duration::from_millis(3), &mut exported);
        m.record_host(&Err(StatsError::Task {
            socket: "host".into(),
        }));
        let text = m.encode().unwrap();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let parsed = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).unwrap();
        let value = |name: &str| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get("vm") == Some("gone"))
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        assert_eq!(value("qmigrate_vm_up"), Some(0.0), "{text}");
        assert_eq!(
            value("qmigrate_vm_sample_errors_total"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(value("qmigrate_vm_dirty_rate_bytes_per_second"), None);
        assert_eq!(value("qmigrate_vm_class"), None);
        assert!(text.contains("qmigrate_host_up 0"), "{text}");
    }

    /// A sample with one of everything: a vCPU, guest memory, a disk and a tapped NIC.
    fn full_sample() -> VmSample {
        use super::super::{
            DirtyRateSample, DiskSample, GuestMemory, MemorySample, NicSample, VcpuSample,
        };
        VmSample {
            socket: "vm.qmp".into(),
            qemu_name: None,
            pid: Some(1),
            run_state: "running".into(),
            interval_ms: 1000,
            vcpus: vec![VcpuSample {
                index: 0,
                thread_id: 2,
                cpu_pct: Some(97.0),
            }],
            cpu_pct: Some(97.0),
            cpu_total_pct: Some(97.0),
            memory: MemorySample {
                ram_bytes: 256 << 20,
                plugged_bytes: 0,
                balloon_actual_bytes: Some(256 << 20),
                guest: Some(GuestMemory {
                    total_bytes: Some(240 << 20),
                    free_bytes: Some(100 << 20),
                    available_bytes: Some(200 << 20),
                    swap_in_bytes: None,
                    swap_out_bytes: None,
                    major_faults: None,
                    last_update_s: 1,
                }),
            },
            disks: vec![DiskSample {
                device: "virtio0".into(),
                read_bytes_per_s: 1.0,
                write_bytes_per_s: 2.0,
                read_ops_per_s: 0.0,
                write_ops_per_s: 0.0,
                flush_ops_per_s: 0.0,
            }],
            nics: vec![NicSample {
                name: "net0".into(),
                mac: String::new(),
                tap: Some("tap0".into()),
                rx_bytes_per_s: Some(3.0),
                tx_bytes_per_s: Some(4.0),
                rx_packets_per_s: Some(5.0),
                tx_packets_per_s: Some(6.0),
            }],
            dirty_rate: DirtyRateSample {
                bytes_per_s: Some(40.0 * 1024.0 * 1024.0),
                mode: Some("page-sampling".into()),
            },
            notes: vec![],
        }
    }

    fn recorded(sample: VmSample) -> Result<(VmSample, Vec<Label>), StatsError> {
        let labels = classify::classify(&sample.figures(), &classify::Thresholds::default());
        Ok((sample, labels))
    }

    #[test]
    fn a_device_that_goes_away_stops_being_exported() {
        let m = Metrics::new();
        let mut exported = Exported::default();
        m.record_vm(
            "vm",
            &recorded(full_sample()),
            Duration::from_secs(1),
            &mut exported,
        );
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                r#"qmigrate_vm_disk_write_bytes_per_second{vm="vm",device="virtio0"} 2.0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"qmigrate_vm_class{vm="vm",class="dirty-memory"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"qmigrate_vm_class{vm="vm",class="idle"} 0"#),
            "{text}"
        );
        let mut paused = full_sample();
        paused.disks.clear();
        paused.run_state = "paused".into();
        m.record_vm(
            "vm",
            &recorded(paused),
            Duration::from_secs(1),
            &mut exported,
        );
        let text = m.encode().unwrap();
        assert!(!text.contains("virtio0"), "{text}");
        assert!(!text.contains(r#"state="running""#), "{text}");
        assert!(
            text.contains(r#"qmigrate_vm_run_state{vm="vm",state="paused"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"qmigrate_vm_samples_total{vm="vm"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn a_renamed_vm_leaves_no_series_under_its_old_name() {
        let m = Metrics::new();
        let mut exported = Exported::default();
        m.name_vm(
            "vm.qmp.mon2",
            "/run/vm.qmp.mon2",
            NameSource::SocketFile,
            &mut exported,
        );
        m.record_vm(
            "vm.qmp.mon2",
            &recorded(full_sample()),
            Duration::from_secs(1),
            &mut exported,
        );
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                r#"qmigrate_vm_info{vm="vm.qmp.mon2",socket="/run/vm.qmp.mon2",name_from="socket-file"} 1"#
            ),
            "{text}"
        );
        m.forget_vm("vm.qmp.mon2", &mut exported);
        m.name_vm("web", "/run/vm.qmp.mon2", NameSource::Qemu, &mut exported);
        m.record_vm(
            "web",
            &recorded(full_sample()),
            Duration::from_secs(1),
            &mut exported,
        );
        let text = m.encode().unwrap();
        assert!(!text.contains(r#"vm="vm.qmp.mon2""#), "{text}");
        assert!(
            text.contains(
                r#"qmigrate_vm_info{vm="web",socket="/run/vm.qmp.mon2",name_from="qemu"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"qmigrate_vm_samples_total{vm="web"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let m = Metrics::new();
        m.record_vm(
            "vm",
            &recorded(full_sample()),
            Duration::from_secs(1),
            &mut Exported::default(),
        );
        m.record_vm(
            "gone",
            &Err(StatsError::Task {
                socket: "gone.qmp".into(),
            }),
            Duration::from_secs(1),
            &mut Exported::default(),
        );
        m.record_host(&Err(StatsError::Task {
            socket: "host".into(),
        }));
        let text = m.encode().unwrap();
        let exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana/qmigrate.json"
        ))
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 10));
        let mut used = 0;
        for (i, _) in dashboard.match_indices("qmigrate_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Counters and histograms are exposed as name_total, name_bucket, name_count and name_sum.
            let base = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(exported.contains(&base), "{name} is not exported:\n{text}");
            used += 1;
        }
        assert!(used > 20, "{used}");
    }
}
