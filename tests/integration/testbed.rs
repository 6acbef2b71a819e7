//! The testbed of scripts/testbed: hosts as namespaces, shaped links, sshd per host, and a clean teardown.
