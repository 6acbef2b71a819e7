//! Integration tests against real QEMU processes running the project's guest image (TCG). One binary, a
//! module per theme. Needs `scripts/build-guest` and `qemu-system-x86_64` (README.md's test command does both).

mod balance;
mod errors;
mod evacuate;
mod exactly_once;
mod guest;
mod guestmem;
mod harness;
mod hosts;
mod hosts_net;
mod migrate;
mod predict;
mod qmp;
mod stats;
mod testbed;
mod top;
mod traffic;
