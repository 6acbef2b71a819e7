//! qmigrate: live migration of bare QEMU VMs over QMP, with convergence control, planned evacuations and balancing.
//!
//! # Layout
//! - [`plan`]: PURE balancing policies (band, idc, sandpiper) and the scenario simulator.

pub mod config;
pub mod exit;
pub mod launch;
pub mod migrate;
pub mod plan;
pub mod predict;
pub mod qmp;
pub mod report;
pub mod testbed;
