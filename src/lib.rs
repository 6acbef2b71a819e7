//! qmigrate: live migration of bare QEMU VMs over QMP, with convergence control, planned evacuations and balancing.
//!
//! # Layout
//! - [`plan`]: PURE balancing policies (band, idc, sandpiper) and the scenario simulator.

pub mod plan;
pub mod qmp;
pub mod migrate;
pub mod predict;
pub mod report;
pub mod launch;
pub mod testbed;
pub mod exit;
pub mod config;
