//! Traffic between VMs measured on the hosts, without a guest agent: per-MAC-pair byte counters in an nftables
//! bridge table, read twice over a window on every host, attributed to VMs by their MACs and merged into the
//! traffic matrix the policies read.
//!
//! Each host gets (once; it stays between rounds) the table `bridge qmigrate_traffic`: a dynamic set keyed by
//! `ether saddr . ether daddr` with a counter per element, updated by every frame its bridges forward (guest to
//! guest on the host, guest to the uplink and back). A frame between two hosts crosses both hosts' bridges; it is
//! counted only on the sender's host (where its source MAC belongs to a VM), so nothing is counted twice. Frames to
//! MACs that are no VM's (the gateway, broadcast) are left out. What it does not see: guests on macvtap or Open
//! vSwitch rather than a Linux bridge, and traffic routed through the host (the destination MAC is the host's).
//!
//! [`parse_set`], [`rates`] and [`matrix`] are pure; [`measure`] and [`remove`] run `nft` on the hosts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::plan::Flow;
use crate::remote::{HostError, HostLink};

/// The nftables table (bridge family) qmigrate counts frames in.
pub const TABLE: &str = "qmigrate_traffic";
/// The set in [`TABLE`] holding one counter per (source MAC, destination MAC).
pub const SET: &str = "pairs";

/// The nft commands creating [`TABLE`]. Pairs not seen for 10 minutes leave the set (their counter with them).
pub fn table_commands() -> String {
    format!(
        "add table bridge {TABLE}; \
         add set bridge {TABLE} {SET} {{ type ether_addr . ether_addr; flags dynamic,timeout; timeout 10m; \
         size 65536; counter; }}; \
         add chain bridge {TABLE} frames {{ type filter hook forward priority 0; policy accept; }}; \
         add rule bridge {TABLE} frames update @{SET} {{ ether saddr . ether daddr }}"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("host {host}: nft printed {what} qmigrate cannot read: {detail}")]
    Unreadable {
        host: String,
        what: &'static str,
        detail: String,
    },
}

/// A counter of the set: bytes from one MAC to another since the pair was first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairCount {
    pub src_mac: String,
    pub dst_mac: String,
    pub bytes: u64,
}

/// Bytes per second from one MAC to another over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairRate {
    pub src_mac: String,
    pub dst_mac: String,
    pub bytes_per_s: f64,
}

/// The counters in `nft -j list set bridge qmigrate_traffic pairs` output (none when the set is empty).
pub fn parse_set(json: &str) -> Result<Vec<PairCount>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no \"nftables\" list")?;
    let set = items
        .iter()
        .find_map(|i| i.get("set"))
        .ok_or("no set in the listing")?;
    let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        let e = e.get("elem").unwrap_or(e);
        let macs = e
            .pointer("/val/concat")
            .and_then(|c| c.as_array())
            .filter(|c| c.len() == 2)
            .ok_or_else(|| format!("an element without a MAC pair: {e}"))?;
        let mac = |i: usize| {
            macs[i]
                .as_str()
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| format!("an element whose MAC is not a string: {e}"))
        };
        let bytes = e
            .pointer("/counter/bytes")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| format!("an element without a byte counter: {e}"))?;
        out.push(PairCount {
            src_mac: mac(0)?,
            dst_mac: mac(1)?,
            bytes,
        });
    }
    Ok(out)
}

/// The rate of every pair between two readings `elapsed` apart. A pair absent from `before`, or whose counter went
/// down (it expired and came back), counted from zero in the window.
pub fn rates(before: &[PairCount], after: &[PairCount], elapsed: Duration) -> Vec<PairRate> {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return Vec::new();
    }
    let earlier: HashMap<(&str, &str), u64> = before
        .iter()
        .map(|p| ((p.src_mac.as_str(), p.dst_mac.as_str()), p.bytes))
        .collect();
    after
        .iter()
        .filter_map(|p| {
            let was = earlier
                .get(&(p.src_mac.as_str(), p.dst_mac.as_str()))
                .copied()
                .filter(|&b| b <= p.bytes)
                .unwrap_or(0);
            let delta = p.bytes - was;
            (delta > 0).then(|| PairRate {
                src_mac: p.src_mac.clone(),
                dst_mac: p.dst_mac.clone(),
                bytes_per_s: delta as f64 / secs,
            })
        })
        .collect()
}

/// One host's rates over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRates {
    pub host: String,
    pub pairs: Vec<PairRate>,
}

/// A VM and its NICs' MACs, where it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct VmMacs {
    pub vm: String,
    pub host: String,
    pub macs: Vec<String>,
}

/// Bytes per second one VM sent another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Directed {
    pub from: String,
    pub to: String,
    pub bytes_per_s: f64,
}

/// The traffic between VMs: each direction, and the matrix (both directions together, in Mbps, pairs named in
/// order) the policies read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Matrix {
    pub directed: Vec<Directed>,
    pub flows: Vec<Flow>,
}

/// The MACs of every answering VM of a check, where it runs.
pub fn vm_macs(check: &crate::hosts::CheckReport) -> Vec<VmMacs> {
    check
        .hosts
        .iter()
        .flat_map(|h| &h.vms)
        .filter(|v| !v.macs.is_empty())
        .map(|v| VmMacs {
            vm: v.name.clone(),
            host: v.host.clone(),
            macs: v.macs.clone(),
        })
        .collect()
}

/// Attributes each host's pair rates to VMs: a pair counts on the host where its source MAC is a VM's (the
/// sender's host) and only when its destination MAC is another VM's.
pub fn matrix(hosts: &[HostRates], vms: &[VmMacs]) -> Matrix {
    let mut owner: HashMap<String, (&str, &str)> = HashMap::new();
    for v in vms {
        for m in &v.macs {
            owner.insert(m.to_ascii_lowercase(), (v.vm.as_str(), v.host.as_str()));
        }
    }
    let mut directed: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for h in hosts {
        for p in &h.pairs {
            let (Some(&(from, from_host)), Some(&(to, _))) =
                (owner.get(&p.src_mac), owner.get(&p.dst_mac))
            else {
                continue;
            };
            if from_host != h.host || from == to {
                continue;
            }
            *directed.entry((from, to)).or_default() += p.bytes_per_s;
        }
    }
    let mut both: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for (&(from, to), &r) in &directed {
        *both.entry((from.min(to), from.max(to))).or_default() += r;
    }
    Matrix {
        directed: directed
            .into_iter()
            .map(|((from, to), bytes_per_s)| Directed {
                from: from.into(),
                to: to.into(),
                bytes_per_s,
            })
            .collect(),
        flows: both
            .into_iter()
            .map(|((a, b), bytes_per_s)| Flow {
                a: a.into(),
                b: b.into(),
                mbps: bytes_per_s * 8.0 / 1e6,
            })
            .collect(),
    }
}

/// The matrix as a table: each direction in bytes/s, then each pair's total in Mbps.
pub fn to_table(m: &Matrix, window: Duration) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "traffic between VMs over {}",
        humantime::format_duration(window)
    );
    if m.directed.is_empty() {
        let _ = writeln!(s, "  none seen");
        return s;
    }
    let _ = writeln!(s, "{:<20} {:<20} {:>14}", "from", "to", "bytes/s");
    for d in &m.directed {
        let _ = writeln!(s, "{:<20} {:<20} {:>14.0}", d.from, d.to, d.bytes_per_s);
    }
    let _ = writeln!(s, "{:<20} {:<20} {:>14}", "pair", "", "Mbps (both)");
    for f in &m.flows {
        let _ = writeln!(s, "{:<20} {:<20} {:>14.3}", f.a, f.b, f.mbps);
    }
    s
}

/// The shell script one host runs for a measurement: create the table if missing, then the host's clock and the
/// counters, twice, `window` apart (one ssh round, timed by the host's own clock).
fn measure_script(window: Duration) -> String {
    format!(
        "set -e; nft -j list set bridge {TABLE} {SET} >/dev/null 2>&1 || nft '{create}'; \
         date +%s%N; nft -j list set bridge {TABLE} {SET}; sleep {secs:.3}; \
         date +%s%N; nft -j list set bridge {TABLE} {SET}",
        create = table_commands(),
        secs = window.as_secs_f64(),
    )
}

/// Reads the output of [`measure_script`]: two (clock, listing) readings.
fn parse_measurement(host: &str, out: &str) -> Result<HostRates, TrafficError> {
    let unreadable = |what: &'static str, detail: String| TrafficError::Unreadable {
        host: host.to_string(),
        what,
        detail,
    };
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let [t0, s0, t1, s1] = lines[..] else {
        return Err(unreadable(
            "output",
            format!("{} lines where 4 were expected", lines.len()),
        ));
    };
    let clock = |t: &str| {
        t.trim()
            .parse::<u128>()
            .map_err(|_| unreadable("a clock", format!("{t:?}")))
    };
    let (t0, t1) = (clock(t0)?, clock(t1)?);
    let before = parse_set(s0).map_err(|e| unreadable("a set listing", e))?;
    let after = parse_set(s1).map_err(|e| unreadable("a set listing", e))?;
    let elapsed = Duration::from_nanos(t1.saturating_sub(t0).min(u128::from(u64::MAX)) as u64);
    Ok(HostRates {
        host: host.to_string(),
        pairs: rates(&before, &after, elapsed),
    })
}

/// Measures every host at once over `window` (the table is created where missing). A host that fails is
/// reported with its error; the others still count.
pub async fn measure(
    links: &[Arc<HostLink>],
    window: Duration,
    timeout: Duration,
) -> Vec<(String, Result<HostRates, TrafficError>)> {
    let script = measure_script(window);
    let runs = links.iter().map(|link| {
        let script = script.clone();
        async move {
            let name = link.name().to_string();
            let r = async {
                let out = link
                    .run(&["sh", "-c", &script], window + timeout)
                    .await
                    .map_err(TrafficError::from)?;
                parse_measurement(&name, &String::from_utf8_lossy(&out.stdout))
            }
            .await;
            (name, r)
        }
    });
    futures_util::future::join_all(runs).await
}

/// The hosts measured, and a problem naming each host that was not (its VMs' sending is missing from the matrix).
pub fn gathered(
    measured: Vec<(String, Result<HostRates, TrafficError>)>,
) -> (Vec<HostRates>, Vec<String>) {
    let mut rates = Vec::new();
    let mut problems = Vec::new();
    for (host, r) in measured {
        match r {
            Ok(h) => rates.push(h),
            Err(e) => problems.push(format!(
                "traffic not measured on host {host}: {}",
                crate::stats::error_chain(&e)
            )),
        }
    }
    (rates, problems)
}

/// Removes the table from every host (where it is); returns the hosts that failed, each with its error.
pub async fn remove(links: &[Arc<HostLink>], timeout: Duration) -> Vec<(String, TrafficError)> {
    let script = format!(
        "if nft list table bridge {TABLE} >/dev/null 2>&1; then nft delete table bridge {TABLE}; fi"
    );
    let runs = links.iter().map(|link| {
        let script = script.clone();
        async move {
            (
                link.name().to_string(),
                link.run(&["sh", "-c", &script], timeout).await,
            )
        }
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .filter_map(|(h, r)| r.err().map(|e| (h, e.into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"set": {"family": "bridge", "name": "pairs", "table": "qmigrate_traffic", "type": ["ether_addr", "ether_addr"], "handle": 2, "size": 65536, "elem": [{"elem": {"val": {"concat": ["5A:35:d6:13:7b:b5", "ee:e1:24:1d:6e:12"]}, "timeout": 600, "expires": 598, "counter": {"packets": 29, "bytes": 1001516}}}, {"elem": {"val": {"concat": ["ee:e1:24:1d:6e:12", "ff:ff:ff:ff:ff:ff"]}, "counter": {"packets": 1, "bytes": 28}}}], "stmt": [{"counter": null}]}}]}"#;

    fn count(src: &str, dst: &str, bytes: u64) -> PairCount {
        PairCount {
            src_mac: src.into(),
            dst_mac: dst.into(),
            bytes,
        }
    }

    fn rate(src: &str, dst: &str, bytes_per_s: f64) -> PairRate {
        PairRate {
            src_mac: src.into(),
            dst_mac: dst.into(),
            bytes_per_s,
        }
    }

    #[test]
    fn the_set_listing_gives_one_counter_per_pair() {
        assert_eq!(
            parse_set(LISTING).unwrap(),
            vec![
                count("5a:35:d6:13:7b:b5", "ee:e1:24:1d:6e:12", 1_001_516),
                count("ee:e1:24:1d:6e:12", "ff:ff:ff:ff:ff:ff", 28),
            ]
        );
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "pairs", "stmt": [{"counter": null}]}}]}"#;
        assert_eq!(parse_set(empty).unwrap(), vec![]);
        for bad in [
            "not json",
            r#"{"nftables": [{"metainfo": {}}]}"#,
            r#"{"nftables": [{"set": {"elem": [{"elem": {"val": "x", "counter": {"bytes": 1}}}]}}]}"#,
            r#"{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["a", "b"]}}}]}}]}"#,
        ] {
            assert!(parse_set(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_are_deltas_over_the_window() {
        let table: &[(&[PairCount], &[PairCount], Vec<PairRate>)] = &[
            // grew by 3000 bytes in 2 s
            (
                &[count("a", "b", 1000)],
                &[count("a", "b", 4000)],
                vec![rate("a", "b", 1500.0)],
            ),
            // new in the window: counted from zero
            (&[], &[count("a", "b", 600)], vec![rate("a", "b", 300.0)]),
            // expired and came back: its counter went down, counted from zero
            (
                &[count("a", "b", 9000)],
                &[count("a", "b", 200)],
                vec![rate("a", "b", 100.0)],
            ),
            // unchanged or gone: no rate
            (
                &[count("a", "b", 5), count("c", "d", 7)],
                &[count("a", "b", 5)],
                vec![],
            ),
        ];
        for (before, after, want) in table {
            assert_eq!(&rates(before, after, Duration::from_secs(2)), want);
        }
        assert_eq!(rates(&[], &[count("a", "b", 1)], Duration::ZERO), vec![]);
    }

    fn vm(name: &str, host: &str, macs: &[&str]) -> VmMacs {
        VmMacs {
            vm: name.into(),
            host: host.into(),
            macs: macs.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn pairs_count_on_the_senders_host_only_and_only_between_vms() {
        let vms = [
            vm("web", "h1", &["52:54:00:00:00:01"]),
            vm("db", "h2", &["52:54:00:00:00:02", "52:54:00:00:00:12"]),
            vm("cache", "h1", &["52:54:00:00:00:03"]),
        ];
        let hosts = [
            HostRates {
                host: "h1".into(),
                pairs: vec![
                    // web -> db leaves h1: counted here
                    rate("52:54:00:00:00:01", "52:54:00:00:00:02", 1_000_000.0),
                    // db -> web arrives on h1: counted on h2, not here
                    rate("52:54:00:00:00:02", "52:54:00:00:00:01", 50_000.0),
                    // cache -> web, both on h1
                    rate("52:54:00:00:00:03", "52:54:00:00:00:01", 250_000.0),
                    // web -> the gateway, and broadcast: no VM
                    rate("52:54:00:00:00:01", "aa:bb:cc:dd:ee:ff", 9e9),
                    rate("52:54:00:00:00:03", "ff:ff:ff:ff:ff:ff", 9e9),
                ],
            },
            HostRates {
                host: "h2".into(),
                pairs: vec![
                    rate("52:54:00:00:00:02", "52:54:00:00:00:01", 50_000.0),
                    // the second NIC of db, to web
                    rate("52:54:00:00:00:12", "52:54:00:00:00:01", 25_000.0),
                    // web -> db arriving on h2: already counted on h1
                    rate("52:54:00:00:00:01", "52:54:00:00:00:02", 1_000_000.0),
                ],
            },
        ];
        let m = matrix(&hosts, &vms);
        let directed: Vec<(&str, &str, f64)> = m
            .directed
            .iter()
            .map(|d| (d.from.as_str(), d.to.as_str(), d.bytes_per_s))
            .collect();
        assert_eq!(
            directed,
            vec![
                ("cache", "web", 250_000.0),
                ("db", "web", 75_000.0),
                ("web", "db", 1_000_000.0),
            ]
        );
        let flows: Vec<(&str, &str, f64)> = m
            .flows
            .iter()
            .map(|f| (f.a.as_str(), f.b.as_str(), f.mbps))
            .collect();
        assert_eq!(flows, vec![("cache", "web", 2.0), ("db", "web", 8.6)]);
    }

    #[test]
    fn a_measurement_is_two_timed_listings() {
        let out = format!(
            "1000000000\n{}\n3000000000\n{}\n",
            LISTING.replace("1001516", "1000"),
            LISTING
        );
        let r = parse_measurement("h1", &out).unwrap();
        assert_eq!(r.host, "h1");
        assert_eq!(
            r.pairs,
            vec![rate("5a:35:d6:13:7b:b5", "ee:e1:24:1d:6e:12", 500_258.0)]
        );
        for bad in ["", "1\n{}\n", "x\n{}\n2\n{}\n"] {
            let e = parse_measurement("h1", bad).unwrap_err().to_string();
            assert!(e.starts_with("host h1: nft printed"), "{e}");
        }
    }

    #[test]
    fn the_script_creates_the_table_only_where_missing() {
        let s = measure_script(Duration::from_millis(2500));
        assert!(s.contains("sleep 2.500"), "{s}");
        assert!(
            s.contains(&format!(
                "list set bridge {TABLE} {SET} >/dev/null 2>&1 || nft 'add table"
            )),
            "{s}"
        );
        assert!(!table_commands().contains('\''));
    }
}
