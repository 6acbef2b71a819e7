//! The inventory file (TOML): the hosts qmigrate may move VMs between — how each is reached, where its VMs' QMP
//! sockets are, where destinations listen, its capacity and TLS certificates — and the VMs with their groups and
//! anti-affinity. PURE: parsing and validation only; reaching the hosts is `remote`'s work.
//!
//! Every error names the file, the line and the key. The format is documented in `examples/inventory.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory {path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory {path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("inventory {path}: no host named {host:?} (hosts: {known})")]
    UnknownHost {
        path: PathBuf,
        host: String,
        known: String,
    },
}

/// How qmigrate reaches a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// This machine: sockets opened and commands run directly.
    Local,
    /// Through the system OpenSSH client, to this destination (`user@host` or a Host alias).
    Ssh { destination: String },
}

/// How a destination QEMU starts on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationStart {
    /// The source's command line with every host-local path rewritten (`launch::mirror_destination`).
    Mirror,
    /// A QEMU arguments template (`qemu-configs/*.args` format, read on the machine qmigrate runs on; a relative
    /// path is relative to the inventory file) with its placeholders: `{name}`, `{qmp}`, `{runtime_dir}` and
    /// `{memory_mib}` from the VM, the others from `vars` (the host's, overridden by the VM entry's).
    Template {
        path: PathBuf,
        vars: BTreeMap<String, String>,
    },
}

/// What a host can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// vCPUs the host offers its guests (may be overcommitted); 0 = not given.
    pub vcpus: u32,
    /// Physical CPUs (cores or threads) that run them: the base of the host's CPU utilisation when balancing;
    /// 0 = not given (the host's own count is used).
    pub cpus: u32,
    pub memory_bytes: u64,
    pub nic_bytes_per_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub transport: Transport,
    /// A glob on that host: a directory and a file-name pattern.
    pub qmp_glob: Option<String>,
    pub runtime_dir: PathBuf,
    pub migration_address: String,
    pub destination: DestinationStart,
    pub qemu: Option<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    pub capacity: Capacity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub host: String,
    pub qmp: Option<String>,
    pub groups: Vec<String>,
    pub anti_affinity: Vec<String>,
    /// Values for a template destination's placeholders, over the host's.
    pub vars: BTreeMap<String, String>,
}

/// How the ssh client is run for every ssh host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    pub config: Option<PathBuf>,
    pub options: Vec<String>,
    pub control_persist: Duration,
}

impl Default for SshSettings {
    fn default() -> SshSettings {
        SshSettings {
            config: None,
            options: Vec::new(),
            control_persist: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub path: PathBuf,
    pub ssh: SshSettings,
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, VmEntry>,
}

impl Inventory {
    /// Reads and validates an inventory file.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.into(),
            source,
        })?;
        Inventory::parse(path, &text)
    }

    /// PURE: parses and validates the text of an inventory file; `path` is only named in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let line = span.map_or(0, |s| line_of(text, s.start));
            InventoryError::Invalid {
                path: path.into(),
                line,
                message,
            }
        };
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| line_text(text, s.start))
                .filter(|l| !l.is_empty())
                .map(|l| format!(" (at `{l}`)"))
                .unwrap_or_default();
            invalid(e.span(), format!("{}{key}", e.message().trim_end()))
        })?;
        let ssh = match raw.ssh {
            None => SshSettings::default(),
            Some(s) => SshSettings {
                config: s.config.map(PathBuf::from),
                options: s.options,
                control_persist: match s.control_persist {
                    None => Duration::from_secs(60),
                    Some(d) => humantime::parse_duration(d.get_ref().trim()).map_err(|e| {
                        invalid(
                            Some(d.span()),
                            format!(
                                "ssh.control_persist {:?}: not a duration ({e})",
                                d.get_ref()
                            ),
                        )
                    })?,
                },
            },
        };
        if raw.hosts.is_empty() {
            return Err(invalid(
                None,
                "no [hosts.NAME] table: an inventory needs at least one host".into(),
            ));
        }
        let mut hosts = BTreeMap::new();
        for (name, h) in raw.hosts {
            let key = |k: &str| format!("hosts.{name}.{k}");
            let transport = match h.transport.get_ref().as_str() {
                "local" => Transport::Local,
                "ssh" => Transport::Ssh {
                    destination: h.ssh.clone().unwrap_or_else(|| name.clone()),
                },
                other => {
                    return Err(invalid(
                        Some(h.transport.span()),
                        format!("{} {other:?}: use \"local\" or \"ssh\"", key("transport")),
                    ))
                }
            };
            if h.ssh.is_some() && transport == Transport::Local {
                return Err(invalid(
                    Some(h.transport.span()),
                    format!("{} is set but the transport is \"local\"", key("ssh")),
                ));
            }
            if let Some(g) = &h.qmp {
                check_glob(g.get_ref()).map_err(|m| {
                    invalid(
                        Some(g.span()),
                        format!("{} {:?}: {m}", key("qmp"), g.get_ref()),
                    )
                })?;
            }
            let destination = match h.destination.as_ref().map(|d| (d.get_ref(), d.span())) {
                None => DestinationStart::Mirror,
                Some((RawDestination::Name(n), _)) if n == "mirror" => DestinationStart::Mirror,
                Some((RawDestination::Name(other), span)) => {
                    return Err(invalid(
                        Some(span),
                        format!(
                            "{} {other:?}: use \"mirror\" or {{ template = \"FILE.args\", vars = {{ .. }} }}",
                            key("destination")
                        ),
                    ))
                }
                Some((RawDestination::Template(RawTemplate { template, vars }), _)) => {
                    let file = PathBuf::from(template);
                    let file = match (file.is_relative(), path.parent()) {
                        (true, Some(dir)) => dir.join(file),
                        _ => file,
                    };
                    DestinationStart::Template {
                        path: file,
                        vars: vars.clone(),
                    }
                }
            };
            let address = h.migration_address.get_ref().trim();
            if address.is_empty() || address.contains([' ', '/']) {
                return Err(invalid(
                    Some(h.migration_address.span()),
                    format!(
                        "{} {address:?}: not a host name or IP address",
                        key("migration_address")
                    ),
                ));
            }
            let capacity = match h.capacity {
                None => Capacity::default(),
                Some(c) => Capacity {
                    vcpus: c.vcpus.unwrap_or(0),
                    cpus: c.cpus.unwrap_or(0),
                    memory_bytes: match c.memory {
                        None => 0,
                        Some(m) => parse_size(m.get_ref()).map_err(|e| {
                            invalid(
                                Some(m.span()),
                                format!("{} {:?}: {e}", key("capacity.memory"), m.get_ref()),
                            )
                        })?,
                    },
                    nic_bytes_per_s: match c.nic {
                        None => 0,
                        Some(n) => link_rate_bytes_per_s(n.get_ref()).map_err(|e| {
                            invalid(
                                Some(n.span()),
                                format!("{} {:?}: {e}", key("capacity.nic"), n.get_ref()),
                            )
                        })?,
                    },
                },
            };
            hosts.insert(
                name.clone(),
                Host {
                    name: name.clone(),
                    transport,
                    qmp_glob: h.qmp.map(Spanned::into_inner),
                    runtime_dir: PathBuf::from(h.runtime_dir),
                    migration_address: address.to_string(),
                    destination,
                    qemu: h.qemu.map(PathBuf::from),
                    tls_dir: h.tls_dir.map(PathBuf::from),
                    capacity,
                },
            );
        }
        let mut vms = BTreeMap::new();
        for (name, v) in raw.vms {
            if !hosts.contains_key(v.host.get_ref()) {
                return Err(invalid(
                    Some(v.host.span()),
                    format!(
                        "vms.{name:?}.host {:?}: no such host (hosts: {})",
                        v.host.get_ref(),
                        hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if v.qmp.is_none() && hosts[v.host.get_ref()].qmp_glob.is_none() {
                return Err(invalid(
                    Some(v.host.span()),
                    format!(
                        "vms.{name:?}: no qmp socket, and host {:?} has no qmp glob to find it by",
                        v.host.get_ref()
                    ),
                ));
            }
            vms.insert(
                name.clone(),
                VmEntry {
                    name,
                    host: v.host.into_inner(),
                    qmp: v.qmp,
                    groups: v.groups,
                    anti_affinity: v.anti_affinity,
                    vars: v.vars,
                },
            );
        }
        Ok(Inventory {
            path: path.into(),
            ssh,
            hosts,
            vms,
        })
    }

    /// The host named `name`, or an error listing the known ones.
    pub fn host(&self, name: &str) -> Result<&Host, InventoryError> {
        self.hosts
            .get(name)
            .ok_or_else(|| InventoryError::UnknownHost {
                path: self.path.clone(),
                host: name.into(),
                known: self.hosts.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

/// Splits a socket glob into its directory and its file-name pattern; the directory may not hold wildcards.
pub fn split_glob(glob: &str) -> Option<(&str, &str)> {
    let (dir, pattern) = glob.rsplit_once('/')?;
    let dir = if dir.is_empty() { "/" } else { dir };
    Some((dir, pattern))
}

fn check_glob(glob: &str) -> Result<(), String> {
    let Some((dir, pattern)) = split_glob(glob) else {
        return Err("needs an absolute directory and a file pattern, like /run/qemu/*.qmp".into());
    };
    if !dir.starts_with('/') {
        return Err("the directory must be absolute".into());
    }
    if dir.contains(['*', '?', '[']) {
        return Err("wildcards are allowed in the file name only".into());
    }
    glob::Pattern::new(pattern).map_err(|e| format!("bad pattern: {e}"))?;
    Ok(())
}

/// Parses a size: `4GiB`, `512MiB`, `128GB`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("not a size ({e}); try 4GiB or 512MiB"))
}

/// Parses a link rate into bytes per second: bits (`100Mbit/s`, `10Gbit/s`, `100mbit`) or bytes (`125MB/s`).
pub fn link_rate_bytes_per_s(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let v = v
        .strip_suffix("/s")
        .or_else(|| v.strip_suffix("ps"))
        .unwrap_or(v);
    let lower = v.to_ascii_lowercase();
    let bits = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .into_iter()
        .find_map(|(suffix, scale)| {
            lower
                .strip_suffix(suffix)
                .map(|n| (n.trim().to_string(), scale))
        });
    let bytes = match bits {
        Some((number, scale)) => {
            let n: f64 = number.parse().map_err(|_| {
                format!("not a rate: {number:?} is not a number; try 100Mbit/s or 1Gbit/s")
            })?;
            (n * scale / 8.0) as u64
        }
        None => v
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("not a rate ({e}); try 100Mbit/s, 1Gbit/s or 125MB/s"))?,
    };
    if bytes == 0 {
        return Err("must be more than zero".into());
    }
    Ok(bytes)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn line_text(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    text[start..end].trim().to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    ssh: Option<RawSsh>,
    #[serde(default)]
    hosts: BTreeMap<String, RawHost>,
    #[serde(default)]
    vms: BTreeMap<String, RawVm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    config: Option<String>,
    #[serde(default)]
    options: Vec<String>,
    control_persist: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    transport: Spanned<String>,
    ssh: Option<String>,
    qmp: Option<Spanned<String>>,
    runtime_dir: String,
    migration_address: Spanned<String>,
    destination: Option<Spanned<RawDestination>>,
    qemu: Option<String>,
    tls_dir: Option<String>,
    capacity: Option<RawCapacity>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "\"mirror\" or { template = \"FILE.args\", vars = { .. } }"
)]
enum RawDestination {
    Name(String),
    Template(RawTemplate),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    template: String,
    #[serde(default)]
    vars: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    vcpus: Option<u32>,
    cpus: Option<u32>,
    memory: Option<Spanned<String>>,
    nic: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    host: Spanned<String>,
    qmp: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    anti_affinity: Vec<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[ssh]
config = "/tmp/tb/ssh/config"
options = ["-o", "ConnectTimeout=5"]

[hosts.h1]
transport = "ssh"
qmp = "/tmp/tb/h1/run/*.qmp"
runtime_dir = "/tmp/tb/h1/run"
migration_address = "10.77.0.11"
capacity = { vcpus = 2, memory = "4GiB", nic = "100Mbit/s" }

[hosts.here]
transport = "local"
runtime_dir = "/run/q"
migration_address = "127.0.0.1"

[vms."web 1"]
host = "here"
qmp = "/run/q/web 1.qmp"
groups = ["shop"]
"#;

    #[test]
    fn a_good_inventory_parses_with_its_units() {
        let inv = Inventory::parse(Path::new("inv.toml"), GOOD).unwrap();
        let h1 = &inv.hosts["h1"];
        assert_eq!(
            h1.transport,
            Transport::Ssh {
                destination: "h1".into()
            }
        );
        assert_eq!(h1.capacity.memory_bytes, 4 << 30);
        assert_eq!(h1.capacity.nic_bytes_per_s, 12_500_000);
        assert_eq!(inv.hosts["here"].transport, Transport::Local);
        assert_eq!(inv.vms["web 1"].groups, vec!["shop".to_string()]);
        assert_eq!(inv.ssh.control_persist, Duration::from_secs(60));
        assert!(inv
            .host("nowhere")
            .unwrap_err()
            .to_string()
            .contains("h1, here"));
    }

    #[test]
    fn a_template_destination_is_found_beside_the_inventory() {
        let text = GOOD.replacen(
            "migration_address = \"10.77.0.11\"",
            "migration_address = \"10.77.0.11\"\ndestination = { template = \"vm.args\", vars = { accel = \"tcg\" } }",
            1,
        );
        let inv = Inventory::parse(Path::new("/etc/q/inv.toml"), &text).unwrap();
        assert_eq!(
            inv.hosts["h1"].destination,
            DestinationStart::Template {
                path: PathBuf::from("/etc/q/vm.args"),
                vars: [("accel".to_string(), "tcg".to_string())].into(),
            }
        );
        assert_eq!(inv.hosts["here"].destination, DestinationStart::Mirror);
        for bad in [
            "destination = \"copy\"",
            "destination = { templat = \"vm.args\" }",
        ] {
            let text = GOOD.replacen(
                "runtime_dir = \"/tmp/tb/h1/run\"",
                &format!("runtime_dir = \"/tmp/tb/h1/run\"\n{bad}"),
                1,
            );
            let msg = Inventory::parse(Path::new("inv.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with("inventory inv.toml:10:"), "{bad}: {msg}");
            assert!(msg.contains("mirror"), "{bad}: {msg}");
        }
    }

    #[test]
    fn the_example_inventory_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/inventory.toml"
        ));
        let inv = Inventory::load(path).unwrap();
        assert_eq!(inv.hosts.len(), 3);
        assert_eq!(inv.vms["web 1"].anti_affinity, vec!["web 2".to_string()]);
    }

    /// (what is changed in GOOD, the line the error must name, words the message must hold)
    #[test]
    fn errors_name_the_line_and_the_key() {
        let cases: &[(&str, &str, usize, &[&str])] = &[
            (
                "transport = \"ssh\"\nqmp",
                "transport = \"ssh\"\nqmq",
                8,
                &["unknown field `qmq`"],
            ),
            (
                "memory = \"4GiB\"",
                "memory = \"4 furlongs\"",
                11,
                &["hosts.h1.capacity.memory", "not a size"],
            ),
            (
                "nic = \"100Mbit/s\"",
                "nic = \"fast\"",
                11,
                &["hosts.h1.capacity.nic", "not a rate"],
            ),
            (
                "transport = \"local\"",
                "transport = \"telnet\"",
                14,
                &["hosts.here.transport", "\"telnet\""],
            ),
            (
                "host = \"here\"",
                "host = \"there\"",
                19,
                &["vms.\"web 1\".host", "no such host", "h1, here"],
            ),
            (
                "*.qmp\"",
                "*.qmp\"\nqmp = \"x\"",
                9,
                &["duplicate key", "qmp"],
            ),
            (
                "/tmp/tb/h1/run/*.qmp",
                "/tmp/*/run/*.qmp",
                8,
                &["hosts.h1.qmp", "file name only"],
            ),
            (
                "migration_address = \"127.0.0.1\"",
                "",
                13,
                &["missing field `migration_address`", "[hosts.here]"],
            ),
            (
                "\"ConnectTimeout=5\"]",
                "\"ConnectTimeout=5\"]\ncontrol_persist = \"soon\"",
                5,
                &["ssh.control_persist", "not a duration"],
            ),
            ("vcpus = 2", "vcpus = -2", 11, &["vcpus"]),
        ];
        for (from, to, line, words) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = Inventory::parse(Path::new("inv.toml"), &text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("inventory inv.toml:"), "{msg}");
            if *line > 0 {
                assert!(
                    msg.starts_with(&format!("inventory inv.toml:{line}:")),
                    "{to}: {msg}"
                );
            }
            for w in *words {
                assert!(msg.contains(w), "{to}: {w:?} not in {msg}");
            }
        }
    }

    #[test]
    fn rates_in_bits_and_bytes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("100Mbit/s", Some(12_500_000)),
            ("100mbit", Some(12_500_000)),
            ("1Gbit/s", Some(125_000_000)),
            ("125MB/s", Some(125_000_000)),
            ("1GiB/s", Some(1 << 30)),
            ("0Mbit/s", None),
            ("fast", None),
            ("x Mbit/s", None),
        ];
        for (v, want) in cases {
            assert_eq!(link_rate_bytes_per_s(v).ok(), *want, "{v}");
        }
    }
}
