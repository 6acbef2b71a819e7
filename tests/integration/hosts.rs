//! Multi-host migrations on the testbed (scripts/testbed): inventory, QMP over ssh, --to-host, TLS.
