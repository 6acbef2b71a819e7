//! Networked guests on the testbed: a guest with a NIC on its host's bridge, moved to another host, still reachable.
