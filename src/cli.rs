//! Command-line definitions (raw arguments only; validation lives in the library's `config`).

use std::path::PathBuf;

use qmigrate::migrate::ladder::{AutoConverge, OnTimeout, Postcopy};

#[derive(Debug, clap::Parser)]
#[command(
    name = "qmigrate",
    version,
    about = "Live migration of bare QEMU VMs over QMP"
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Migrate one running VM live, with convergence control.
    Migrate(MigrateArgs),
    /// Resume a paused postcopy (after a broken stream, also after qmigrate itself was killed) and finish it.
    Recover(RecoverArgs),
    /// Cancel a precopy migration under way (a postcopy cannot be cancelled); the source runs on.
    Cancel(CancelArgs),
    /// Start a real guest with a dirtying workload, migrate it to a destination launched from its own command
    /// line, print the report and end both QEMUs.
    Demo(DemoArgs),
    /// Run a balancing policy on a scenario file, with no QEMU, and print each round's decisions.
    Simulate(SimulateArgs),
    /// Sample running VMs once over an interval (CPU, memory, disk, network, dirty rate) and classify their
    /// workloads.
    Stats(StatsArgs),
    /// A live, virt-top-like view of VMs: CPU, memory, dirty rate, network, disk, classes; sortable.
    Top(TopArgs),
    /// Sample VMs and the host continuously and serve Prometheus metrics over HTTP.
    Serve(ServeArgs),
    /// Measure one VM's dirty page rate: once, or as a time series with --watch.
    DirtyRate(DirtyRateArgs),
    /// Work with an inventory of hosts and VMs.
    #[command(subcommand)]
    Inventory(InventoryCommand),
    /// Drain a host: live-migrate all its VMs to the inventory's other hosts in the informed order (dirty-memory
    /// and web VMs first, net-receive VMs last, shortest job first otherwise), journaled and resumable; or move
    /// them back (--restore).
    Evacuate(EvacuateArgs),
    /// Balance a cluster live: sample every host and VM of the inventory, run a policy (band, idc, sandpiper) every
    /// --every (or --once), and carry out its decisions (balloon changes, migrations through the evacuation
    /// executor), held back by cool-downs and a minimum gain.
    Balance(BalanceArgs),
    /// Print a shell completion script for qmigrate.
    Completions(CompletionsArgs),
    /// Write qmigrate's man pages (one per subcommand) into a directory.
    Man(ManArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum InventoryCommand {
    /// Reach every host and VM of an inventory and print what was found, and what is wrong where.
    Check(InventoryCheckArgs),
    /// Measure the traffic between the inventory's VMs on its hosts (frames counted per MAC pair on the hosts'
    /// bridges, by nftables) over a window, and print who sends whom how much.
    Traffic(InventoryTrafficArgs),
}

#[derive(Debug, clap::Args)]
pub struct InventoryTrafficArgs {
    /// The inventory file (TOML; see examples/inventory.toml).
    pub file: PathBuf,
    /// How long to count.
    #[arg(long, default_value = "3s")]
    pub window: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Remove qmigrate's counting table from every host instead (it stays between measurements otherwise).
    #[arg(long)]
    pub remove: bool,
}

#[derive(Debug, clap::Args)]
pub struct InventoryCheckArgs {
    /// The inventory file (TOML; see examples/inventory.toml).
    pub file: PathBuf,
    /// Skip sampling the VMs for their workload classes (a second per host).
    #[arg(long)]
    pub no_classes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The directory to write the pages into (e.g. /usr/local/share/man/man1).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct TuningArgs {
    /// Downtime limit to start with.
    #[arg(long, default_value = "300ms")]
    pub downtime: String,
    /// The ceiling escalation may raise the downtime limit to.
    #[arg(long, default_value = "1s")]
    pub max_downtime: String,
    /// Bandwidth cap for the migration stream.
    #[arg(long, default_value = "1GiB/s")]
    pub bandwidth: String,
    /// Give up (see --on-timeout) after this long.
    #[arg(long, default_value = "5m")]
    pub timeout: String,
    /// Throttle the guest: from the start (on), never (off), or as an escalation step (auto).
    #[arg(long, value_enum, default_value_t = AutoConverge::Auto)]
    pub auto_converge: AutoConverge,
    /// Postcopy: never, as an escalation step (fallback), or right after the first pass (always).
    #[arg(long, value_enum, default_value_t = Postcopy::Never)]
    pub postcopy: Postcopy,
    /// At the timeout: cancel (the source runs on) or pause (stop the guest and finish offline).
    #[arg(long, value_enum, default_value_t = OnTimeout::Cancel)]
    pub on_timeout: OnTimeout,
    /// How long to sample the dirty rate before starting (0 to skip).
    #[arg(long, default_value = "1s")]
    pub dirty_rate_sample: String,
    /// Opt-in rollback: after the switch-over, watch the destination this long, and if its QEMU exits (with no
    /// shutdown of the guest's own) or the guest panics, resume the source from the switch-over image. Off (0s)
    /// by default: with a disk on shared storage, writes the guest made on the destination meanwhile are then seen
    /// by an older memory image. Never after postcopy.
    #[arg(long, default_value = "0s")]
    pub verify: String,
    /// How long a paused postcopy (broken stream) is recovered before both QEMUs are left paused for
    /// `qmigrate recover`.
    #[arg(long, default_value = "5m")]
    pub recover_for: String,
    /// The ceiling of the vCPU throttle escalation may apply, in percent (1-99). Throttling that reaches its
    /// ceiling and leaves the dirty rate where it was is abandoned for the next rung at once.
    #[arg(long, default_value_t = 99)]
    pub max_throttle: u8,
    /// Do not start a migration forecast not to complete within --timeout with the rungs allowed (exit 11); the
    /// message names the flags that would make it complete. Without it the forecast is a warning.
    #[arg(long)]
    pub refuse_hopeless: bool,
    /// Where what each migration teaches about its VM and link is remembered, for the next prediction
    /// (default: $QMIGRATE_CALIBRATION, else $XDG_STATE_HOME/qmigrate/calibration.json, else
    /// ~/.local/state/qmigrate/calibration.json).
    #[arg(long, conflicts_with = "no_calibration")]
    pub calibration: Option<PathBuf>,
    /// Neither read nor write the calibration file.
    #[arg(long)]
    pub no_calibration: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Watching one migration more closely (`migrate`, `demo`).
#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// Draw the migration (remaining bytes, throughput, dirty rate, throttle; passes and escalations marked) as
    /// an SVG into this file.
    #[arg(long, value_name = "FILE.svg")]
    pub timeline: Option<PathBuf>,
    /// Measure the downtime as the guest's clients see it: a TCP connect to this address every 10 ms
    /// (tcp:HOST:PORT; a refused connection counts as reachable). Both figures go in the report.
    #[arg(long, value_name = "tcp:HOST:PORT")]
    pub probe: Option<String>,
    /// Probe from inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, requires = "probe")]
    pub probe_netns: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM to move, by its name in --inventory (the inventory's, else QEMU's -name, else its socket's file
    /// name).
    #[arg(requires_all = ["inventory", "to_host"], conflicts_with_all = ["from", "to", "launch_dst", "dst_qmp"])]
    pub vm: Option<String>,
    /// The inventory file the VM and the hosts are in (TOML; see examples/inventory.toml).
    #[arg(long, requires = "vm")]
    pub inventory: Option<PathBuf>,
    /// The inventory host to move the VM to; a destination QEMU is started there from the source's command line.
    #[arg(long, requires = "vm")]
    pub to_host: Option<String>,
    /// Encrypt the stream with TLS (QEMU's tls-creds-x509, from each host's tls_dir), peers verified.
    #[arg(long, requires = "to_host")]
    pub tls: bool,
    /// QMP socket of the source (a path, unix:PATH or tcp:HOST:PORT).
    #[arg(long, required_unless_present = "vm")]
    pub from: Option<String>,
    /// QMP socket of the destination, a QEMU started with -incoming defer.
    #[arg(
        long,
        required_unless_present_any = ["launch_dst", "vm"],
        conflicts_with = "launch_dst"
    )]
    pub to: Option<String>,
    /// Start the destination QEMU by mirroring the source's command line, with -incoming defer.
    #[arg(long)]
    pub launch_dst: bool,
    /// With --launch-dst: the destination's QMP socket path (default: the source's, suffixed .incoming).
    #[arg(long, requires = "launch_dst", conflicts_with = "to")]
    pub dst_qmp: Option<PathBuf>,
    /// Migration stream URI (default: a fresh UNIX socket; tcp:HOST:PORT across hosts).
    #[arg(long)]
    pub uri: Option<String>,
    /// Take over a migration already under way on the source (a qmigrate that died): monitor, escalate,
    /// recover, finish; or resolve one it left ended with the source stopped. With --launch-dst, the
    /// destination is found at --dst-qmp (or the default path) instead of being launched.
    #[arg(long)]
    pub adopt: bool,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub observe: ObserveArgs,
}

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// QMP socket of the source, whose postcopy is paused.
    #[arg(long)]
    pub from: String,
    /// QMP socket of the destination.
    #[arg(long)]
    pub to: String,
    /// The URI the destination listens on for the recovered stream (default: the same TCP address, or a fresh
    /// UNIX socket).
    #[arg(long)]
    pub uri: Option<String>,
    /// How long to keep trying.
    #[arg(long, default_value = "5m")]
    pub recover_for: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// QMP socket of the source.
    #[arg(long)]
    pub from: String,
    /// QMP socket of the destination (asked before the source is resumed).
    #[arg(long)]
    pub to: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The guest's workload: idle, cpu, dirty:MiB[:MiB/s], web, netrecv, disk.
    #[arg(long, default_value = "dirty:64")]
    pub workload: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u32,
    /// Directory with vmlinuz and initrd.img (scripts/build-guest).
    #[arg(long, env = "QMIGRATE_GUEST_DIR", default_value = "target/guest")]
    pub guest_dir: PathBuf,
    /// QEMU binary.
    #[arg(long, env = "QMIGRATE_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Accelerator: tcg, or kvm where KVM works.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub observe: ObserveArgs,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Scenario file (JSON): hosts, vms, traffic.
    pub scenario: PathBuf,
    /// Policy: band, idc or sandpiper.
    #[arg(long)]
    pub policy: String,
    /// How many rounds to run.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The sampling flags `stats` and `top` share.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// QMP sockets of the VMs (a path, unix:PATH or tcp:HOST:PORT).
    #[arg(required = true)]
    pub sockets: Vec<String>,
    /// How long every rate is measured over, and how often `top` refreshes (the dirty rate over at least 1s).
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// Bound on connecting and on each QMP command.
    #[arg(long, default_value = "3s")]
    pub command_timeout: String,
    /// Do not measure the dirty page rate.
    #[arg(long)]
    pub no_dirty_rate: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub sample: SampleArgs,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to serve http://ADDR/metrics on, e.g. 127.0.0.1:9900.
    #[arg(long)]
    pub metrics: String,
    /// QMP sockets of the VMs (a path, unix:PATH or tcp:HOST:PORT), each optionally NAME=SOCKET to name the VM in
    /// the `vm` label. Give each VM a second -qmp monitor for this: QEMU serves one client per socket.
    #[arg(required = true)]
    pub sockets: Vec<String>,
    /// How often each VM is sampled; every rate is measured over it (the dirty rate over at least 1s).
    #[arg(long, default_value = "1s")]
    pub interval: String,
    /// Bound on connecting and on each QMP command.
    #[arg(long, default_value = "3s")]
    pub command_timeout: String,
    /// At most this many VMs are sampled at once.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent: usize,
    /// Do not measure the dirty page rate.
    #[arg(long)]
    pub no_dirty_rate: bool,
}

#[derive(Debug, clap::Args)]
pub struct DirtyRateArgs {
    /// QMP socket of the VM (a path, unix:PATH or tcp:HOST:PORT).
    pub socket: String,
    /// Measure again and again (until --count or Ctrl-C), one line per measurement.
    #[arg(long)]
    pub watch: bool,
    /// How long each measurement spans (QEMU measures whole seconds, at least 1s).
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// With --watch: stop after this many measurements.
    #[arg(long, requires = "watch")]
    pub count: Option<u64>,
    /// The window of the moving average.
    #[arg(long, default_value = "60s")]
    pub window: String,
    /// Bound on connecting and on each QMP command.
    #[arg(long, default_value = "3s")]
    pub command_timeout: String,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvacuateArgs {
    /// The host to drain (or, with --restore, to move the VMs back to).
    pub host: String,
    /// The inventory file (TOML; see examples/inventory.toml).
    #[arg(long)]
    pub inventory: PathBuf,
    /// Print the plan (destinations, order, predictions and the reason for each) and move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue the host's last unfinished evacuation or restore from its journal: migrations in flight are taken
    /// over, moved VMs are not moved again.
    #[arg(long, conflicts_with = "restore")]
    pub resume: bool,
    /// Move back to HOST the VMs an earlier evacuation of it moved away (after maintenance), in the same order
    /// rules.
    #[arg(long)]
    pub restore: bool,
    /// Only these VMs (repeat the flag); default every VM of the host.
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    #[command(flatten)]
    pub exec: ExecutorArgs,
}

#[derive(Debug, clap::Args)]
pub struct BalanceArgs {
    /// The inventory file (TOML; see examples/inventory.toml).
    #[arg(long)]
    pub inventory: PathBuf,
    /// The policy: band (paper 000), idc or sandpiper (paper 004).
    #[arg(long)]
    pub policy: String,
    /// Decide once (after --samples rounds of samples) and stop.
    #[arg(long, conflicts_with = "every")]
    pub once: bool,
    /// The time between two decisions (one round of samples each).
    #[arg(long, default_value = "30s")]
    pub every: String,
    /// Rounds of samples taken, back to back, before the first decision.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Rounds of history kept for the windowed averages and the AR(1) prediction.
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// Print the decisions with their reasons and figures, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the scenario each decision was made on to this file (replaced every round), for `qmigrate simulate`.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Measure the traffic between VMs on the hosts over this window every round (for idc and the planner's
    /// affinity); "0s" turns it off.
    #[arg(long, default_value = "3s")]
    pub traffic_window: String,
    /// The least time between two moves of one VM.
    #[arg(long, default_value = "1h")]
    pub vm_cool_down: String,
    /// The least time between two moves touching one host.
    #[arg(long, default_value = "10m")]
    pub host_cool_down: String,
    /// The least predicted gain of a move, in points of the busier host's load (CPU, NIC or memory %).
    #[arg(long, default_value_t = qmigrate::balance::guard::DEFAULT_MIN_GAIN_PCT)]
    pub min_gain: f64,
    /// Hotspot CPU threshold (idc, sandpiper), %.
    #[arg(long)]
    pub cpu_threshold: Option<f64>,
    /// Hotspot NIC threshold (idc, sandpiper), %.
    #[arg(long)]
    pub nic_threshold: Option<f64>,
    /// Hotspot swap threshold (idc, sandpiper), swap writes per second.
    #[arg(long)]
    pub swap_threshold: Option<f64>,
    /// The balloon step answering a memory overload (idc, sandpiper), e.g. 32MiB.
    #[arg(long)]
    pub balloon_step: Option<String>,
    #[command(flatten)]
    pub exec: ExecutorArgs,
}

/// How the evacuation executor runs migrations (evacuate and balance).
#[derive(Debug, clap::Args)]
pub struct ExecutorArgs {
    /// The order VMs move in: informed (paper 001), fifo (inventory order), sjf (shortest predicted first) or
    /// random (with --seed).
    #[arg(long, default_value = "informed")]
    pub order: String,
    /// The seed of --order random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Migrations leaving one host at once.
    #[arg(long, default_value_t = qmigrate::evacuate::DEFAULT_MAX_OUT)]
    pub max_out: usize,
    /// Migrations arriving at one host at once.
    #[arg(long, default_value_t = qmigrate::evacuate::DEFAULT_MAX_IN)]
    pub max_in: usize,
    /// A host's outbound bandwidth budget, split among its migrations (more to one that stalls); default the
    /// host's NIC capacity from the inventory.
    #[arg(long)]
    pub link_budget: Option<String>,
    /// The journal (default $XDG_STATE_HOME/qmigrate/evacuate-HOST.jsonl; for balance, balance.jsonl there).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Encrypt every stream with TLS (QEMU's tls-creds-x509, from each host's tls_dir).
    #[arg(long)]
    pub tls: bool,
    /// Bound on reaching a VM's QMP socket (over ssh: the login too) and on each QMP command; raise it for hosts
    /// that answer slowly under load.
    #[arg(long, default_value = "5s")]
    pub command_timeout: String,
    #[command(flatten)]
    pub tuning: TuningArgs,
}
