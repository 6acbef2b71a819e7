//! What the host's `/proc` and `/sys` say about a QEMU process and the host: parsers (pure, tested on captured
//! text) and the small readers around them. Nothing here talks QMP.

use std::path::Path;

/// The unit of CPU times in `/proc/*/stat` and `/proc/stat`. `sysconf(_SC_CLK_TCK)` returns it, but it is fixed at
/// 100 on every Linux architecture qmigrate runs on, and the `nix` features we build with do not expose sysconf.
pub const USER_HZ: f64 = 100.0;

/// CPU time (user + system) of one thread, in clock ticks, from the text of `/proc/PID/task/TID/stat`.
pub fn parse_task_stat(text: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses; fields are counted after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name come state (field 3) … utime (14) and stime (15): indexes 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// The host's aggregate CPU times from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy_ticks: u64,
    pub total_ticks: u64,
}

pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal; guest time is already inside user.
    // Saturating: a malformed file must not panic a debug build (the figures are wrong either way).
    let total = v.iter().take(8).fold(0u64, |a, b| a.saturating_add(*b));
    let idle = v.get(3)?.saturating_add(v.get(4).copied().unwrap_or(0));
    Some(CpuTimes {
        busy_ticks: total.saturating_sub(idle),
        total_ticks: total,
    })
}

/// Busy share of the host's CPUs between two readings, in % of all CPUs.
pub fn host_cpu_pct(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total_ticks.checked_sub(before.total_ticks)?;
    if total == 0 {
        return None;
    }
    let busy = after.busy_ticks.saturating_sub(before.busy_ticks);
    #[allow(clippy::cast_precision_loss)]
    Some(busy as f64 * 100.0 / total as f64)
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// One NIC of a VM and the host interface behind it, from HMP `info network`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPeer {
    pub nic: String,
    /// The tap interface on the host, when the NIC's peer is a tap netdev.
    pub ifname: Option<String>,
}

/// Parses HMP `info network`: a NIC line (`net0: index=0,type=nic,…`) followed by its peer
/// (` \ hostnet0: index=0,type=tap,ifname=tap0,…`).
pub fn parse_info_network(text: &str) -> Vec<NicPeer> {
    let mut out: Vec<NicPeer> = Vec::new();
    let mut current: Option<usize> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(peer) = trimmed.strip_prefix('\\') {
            if let Some(i) = current {
                if peer.contains("type=tap") {
                    out[i].ifname = opt_value(peer, "ifname");
                }
            }
            continue;
        }
        current = None;
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        if let Some((name, opts)) = line.split_once(':') {
            if opts.contains("type=nic") {
                out.push(NicPeer {
                    nic: name.trim().to_string(),
                    ifname: None,
                });
                current = Some(out.len() - 1);
            }
        }
    }
    out
}

fn opt_value(opts: &str, key: &str) -> Option<String> {
    opts.split([',', ' '])
        .find_map(|kv| kv.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Byte and packet counters of a host network interface, from the interface's side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

pub fn read_if_counters(ifname: &str) -> std::io::Result<IfCounters> {
    // The name comes from the peer (HMP `info network`): a Linux interface name (at most 15 bytes, no `/`, not
    // `.` or `..`), or no path is built from it at all.
    if !is_interface_name(ifname) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{:?} is not a network interface name",
                crate::text::printable(ifname)
            ),
        ));
    }
    let dir = Path::new("/sys/class/net").join(ifname).join("statistics");
    let read = |name: &str| -> std::io::Result<u64> {
        let text = std::fs::read_to_string(dir.join(name))?;
        text.trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    Ok(IfCounters {
        rx_bytes: read("rx_bytes")?,
        tx_bytes: read("tx_bytes")?,
        rx_packets: read("rx_packets")?,
        tx_packets: read("tx_packets")?,
    })
}

/// CPU ticks of one thread of a process.
pub fn read_thread_ticks(pid: i32, tid: i64) -> std::io::Result<u64> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let text = std::fs::read_to_string(&path)?;
    parse_task_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{path}: unparsable"),
        )
    })
}

/// A Linux network interface name: 1–15 bytes, no `/`, white space or NUL, not `.` or `..`.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b.is_ascii_control())
}

#[cfg(test)]
mod tests {
    #[test]
    fn interface_names_from_the_peer_are_checked_before_a_path_is_built() {
        for (name, ok) in [
            ("tap0", true),
            ("qm123t4", true),
            ("veth-a.b_c", true),
            ("", false),
            (".", false),
            ("..", false),
            ("../../etc", false),
            ("a/b", false),
            ("sixteen-chars-xx", false),
            ("tab\there", false),
        ] {
            assert_eq!(super::is_interface_name(name), ok, "{name:?}");
        }
        let err = super::read_if_counters("../../etc").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    use super::*;

    #[test]
    fn task_stat_with_awkward_names() {
        let cases = [
            ("4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 2519 0 0 0 150 27 0 0 20 0 3 0 123 0 0", Some(177)),
            ("4243 (CPU 0/TCG) R 1 4242 4242 0 -1 4194368 0 0 0 0 9001 99 0 0 20 0 3 0 123", Some(9100)),
            ("7 (a) b) (c) S 1 1 1 0 -1 0 0 0 0 0 5 6 0 0", Some(11)),
            ("7 (short) S 1 2", None),
            ("garbage", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_task_stat(text), want, "{text}");
        }
    }

    #[test]
    fn host_cpu_from_proc_stat() {
        let a =
            parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n")
                .unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy_ticks: 200,
                total_ticks: 1000
            }
        );
        let b = parse_proc_stat("cpu  250 0 150 800 100 0 0 0 0 0\n").unwrap();
        // 200 busy ticks out of 300
        assert!((host_cpu_pct(a, b).unwrap() - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(host_cpu_pct(a, a), None);
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24684000 kB\nMemFree:        23000000 kB\nMemAvailable:   23900000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24_684_000 * 1024, 23_900_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn figures_near_u64_max_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let stat = format!("1 (qemu) S {}{max} {max} 0", "0 ".repeat(10));
        assert_eq!(parse_task_stat(&stat), Some(max));
        let t = parse_proc_stat(&format!("cpu  {max} {max} 1 {max} {max} 0 0 0\n")).unwrap();
        assert_eq!(t.total_ticks, max);
        assert_eq!(
            parse_meminfo(&format!(
                "MemTotal: {max} kB\nMemAvailable: {} kB\n",
                max / 1024
            )),
            Some((max, max / 1024 * 1024))
        );
    }

    #[test]
    fn info_network_maps_nics_to_taps() {
        let text = "net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ hostnet0: index=0,type=tap,ifname=qmtap0,script=no,downscript=no\r\nnet1: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n \\ user.0: index=0,type=user,net=10.0.2.0,restrict=off\r\nnet2: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:58\r\n";
        assert_eq!(
            parse_info_network(text),
            vec![
                NicPeer {
                    nic: "net0".into(),
                    ifname: Some("qmtap0".into())
                },
                NicPeer {
                    nic: "net1".into(),
                    ifname: None
                },
                NicPeer {
                    nic: "net2".into(),
                    ifname: None
                },
            ]
        );
        assert_eq!(parse_info_network(""), vec![]);
    }
}
