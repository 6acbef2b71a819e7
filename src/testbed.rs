//! Real guests for tests, demos, benchmarks and harnesses: a QEMU started from `qemu-configs/guest.args` with
//! the image from `scripts/build-guest`, its QMP socket and serial log in a run directory, killed on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::launch::{expand_template, LaunchError, QemuProcess};

/// The guest template, compiled in so the binary works from any directory.
pub const GUEST_TEMPLATE: &str = include_str!("../qemu-configs/guest.args");

#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub memory_mib: u32,
    /// `idle`, `cpu`, `dirty:MiB[:MiB/s]`, `web`, `netrecv`, `disk`.
    pub workload: String,
    /// `tcg` (works everywhere) or `kvm`.
    pub accel: String,
    pub qemu: PathBuf,
    /// Holds `vmlinuz` and `initrd.img`.
    pub guest_dir: PathBuf,
    /// Where the QMP socket, serial log and QEMU log go.
    pub run_dir: PathBuf,
    /// More kernel command line parameters (e.g. `qm_ip=10.0.0.2/24`).
    pub kernel_extra: String,
    /// More QEMU arguments (e.g. a NIC or a disk).
    pub extra_args: Vec<String>,
    /// Start as a migration destination (`-incoming defer`).
    pub incoming: bool,
    /// A command QEMU is started through, which must exec it under its own pid: e.g.
    /// `scripts/testbed exec h1 --` (a host of the testbed: its namespace and CPU set).
    pub wrapper: Vec<String>,
}

impl GuestSpec {
    pub fn new(name: &str, workload: &str, guest_dir: &Path, run_dir: &Path) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            memory_mib: 256,
            workload: workload.into(),
            accel: "tcg".into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            guest_dir: guest_dir.into(),
            run_dir: run_dir.into(),
            kernel_extra: String::new(),
            extra_args: Vec::new(),
            incoming: false,
            wrapper: Vec::new(),
        }
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp", self.name))
    }

    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join(format!("{}.serial.log", self.name))
    }

    /// The full QEMU argument list.
    pub fn args(&self) -> Result<Vec<String>, LaunchError> {
        let vars = [
            ("name", self.name.clone()),
            ("accel", self.accel.clone()),
            ("memory_mib", self.memory_mib.to_string()),
            ("guest_dir", self.guest_dir.display().to_string()),
            ("workload", self.workload.clone()),
            ("kernel_extra", self.kernel_extra.clone()),
            ("serial_log", self.serial_log().display().to_string()),
            ("qmp", self.qmp_path().display().to_string()),
        ];
        let mut args = expand_template("guest.args", GUEST_TEMPLATE, &vars)?;
        args.extend(self.extra_args.iter().cloned());
        if self.incoming {
            args.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        Ok(args)
    }
}

/// A running guest; the QEMU process is killed when this is dropped.
#[derive(Debug)]
pub struct Guest {
    pub spec: GuestSpec,
    pub process: QemuProcess,
}

impl Guest {
    /// Starts the guest and waits for its QMP socket.
    pub async fn launch(spec: GuestSpec) -> Result<Guest, LaunchError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(|source| LaunchError::Spawn {
            program: spec.run_dir.display().to_string(),
            source,
        })?;
        let qmp = spec.qmp_path();
        let _ = std::fs::remove_file(&qmp);
        let log = spec.run_dir.join(format!("{}.qemu.log", spec.name));
        let mut process = match spec.wrapper.split_first() {
            None => QemuProcess::spawn(&spec.qemu, &spec.args()?, &qmp, &log)?,
            Some((program, rest)) => {
                let mut args = rest.to_vec();
                args.push(spec.qemu.display().to_string());
                args.extend(spec.args()?);
                QemuProcess::spawn(Path::new(program), &args, &qmp, &log)?
            }
        };
        process.wait_for_socket(Duration::from_secs(10)).await?;
        Ok(Guest { spec, process })
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.spec.qmp_path()
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Waits until the guest's workload reports itself ready on the serial console.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(self.spec.serial_log()).unwrap_or_default();
            if log
                .lines()
                .any(|l| l.starts_with("workload ") && l.ends_with(" ready"))
            {
                return Ok(());
            }
            if !self.process.is_alive() || Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    name: self.spec.name.clone(),
                    workload: self.spec.workload.clone(),
                    after: timeout,
                    serial_tail: log.lines().last().unwrap_or("").to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A guest's virtio NIC on a tap in the bridge of its host on the multi-host testbed (`scripts/testbed`): the tap
/// named by `ifname=` and put on the host's `br0` by the testbed's `qemu-ifup` (QEMU runs it in the host namespace
/// it starts in, so the same command line works on every host). The tap's name (at most 15 bytes, as interface
/// names are) and the MAC come from FNV-1a of the testbed's and the guest's names: stable across runs and hosts,
/// distinct between guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNic {
    pub tap: String,
    pub mac: String,
}

impl BridgeNic {
    pub fn new(testbed: &str, guest: &str) -> BridgeNic {
        let hash = format!("{testbed}/{guest}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let [a, b, c, ..] = hash.to_be_bytes();
        BridgeNic {
            tap: format!("qm{:08x}", hash >> 32),
            mac: format!("52:54:00:{a:02x}:{b:02x}:{c:02x}"),
        }
    }

    /// The QEMU arguments of the NIC, with the testbed's ifup script.
    pub fn qemu_args(&self, ifup: &Path) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!(
                "tap,id=net0,ifname={},script={},downscript=no",
                self.tap,
                ifup.display()
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", self.mac),
        ]
    }
}
