//! qmigrate: live migration of bare QEMU VMs over QMP, with convergence control, planned evacuations and balancing.
//!
//! # Layout
//! - [`plan`]: PURE balancing policies (band, idc, sandpiper) and the scenario simulator.
//! - [`stats`]: sampling VMs and the host over QMP and `/proc` (one round, many VMs at once) and per-metric time
//!   series with windowed averages and AR(1) predictions.
//! - [`classify`]: PURE workload classes (dirty-memory, web, net-receive, cpu, disk-io, idle) with their evidence.
//! - [`evacuate`]: draining a host (`qmigrate evacuate`): survey, plan, limited concurrent migrations, the journal
//!   that resumes a killed run and restores the host afterwards.
//! - [`balance`]: live balancing (`qmigrate balance`): samples → the policy → anti-thrashing → balloons and the
//!   evacuation executor.
//! - [`top`]: the live terminal view of VMs and host (`qmigrate top`): PURE rows, sort, keys and drawing; the I/O loop.

pub mod balance;
pub mod calibrate;
pub mod classify;
pub mod config;
pub mod evacuate;
pub mod exit;
pub mod guestmem;
pub mod hosts;
pub mod inventory;
pub mod launch;
pub mod lock;
pub mod manpages;
pub mod migrate;
pub mod plan;
pub mod predict;
pub mod probe;
pub mod qmp;
pub mod remote;
pub mod report;
pub mod stats;
pub mod testbed;
pub mod text;
pub mod timeline;
pub mod top;
pub mod traffic;
