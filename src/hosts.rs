//! The VMs of an inventory on their hosts: discovery (each host's socket glob and the VM entries), naming (the
//! inventory's name, else QEMU's `-name`, else the socket's file name: `stats::name`), `qmigrate inventory check`, and finding a
//! VM by name for `migrate --inventory`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::inventory::{Inventory, Transport};
use qapi::qmp;

use crate::qmp::{ConnectOptions, Qmp};
use crate::remote::{HostError, HostLink};

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("VM {name:?} is not in inventory {inventory} (found: {found})")]
    NotFound {
        name: String,
        inventory: String,
        found: String,
    },
    #[error("VM {name:?} is already on host {host}")]
    AlreadyThere { name: String, host: String },
    #[error("VM {name:?} on host {host} is being migrated by another qmigrate (pid {holder}); wait for it to finish, or take its migration over with --adopt once it has exited")]
    Busy {
        name: String,
        host: String,
        holder: String,
    },
    #[error("VM {name:?} does not answer: {sockets}")]
    Unanswered { name: String, sockets: String },
    #[error("VM {name:?} is on more than one host: {where_}")]
    Ambiguous { name: String, where_: String },
    #[error(transparent)]
    Host(#[from] HostError),
}

/// One VM as found on its host.
#[derive(Debug, Clone, Serialize)]
pub struct VmCheck {
    pub name: String,
    /// `given` (the inventory's), `qemu` (its -name) or `socket-file`.
    pub name_from: &'static str,
    pub host: String,
    pub socket: String,
    pub qemu_version: Option<String>,
    pub run_state: Option<String>,
    pub ram_bytes: Option<u64>,
    pub vcpus: Option<u32>,
    pub migration: Option<String>,
    /// Workload classes from one `stats` round on the VM's host, each with its evidence.
    pub classes: Vec<crate::classify::Label>,
    /// The figures behind the classes (same round).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<crate::classify::Figures>,
    /// Memory, balloon and the guest's own memory statistics (same round); not in the check's JSON.
    #[serde(skip)]
    pub memory: Option<crate::stats::MemorySample>,
    /// The MACs of its NICs (`query-rx-filter`), by which the traffic counters name it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<String>,
    pub groups: Vec<String>,
    pub anti_affinity: Vec<String>,
    /// What is wrong with this VM (unreachable socket, not QEMU), if anything.
    pub error: Option<String>,
    /// The pid of the qmigrate migrating it, when its socket does not answer because that qmigrate holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
}

/// One host as found.
#[derive(Debug, Clone, Serialize)]
pub struct HostCheck {
    pub name: String,
    pub transport: String,
    pub migration_address: String,
    pub vcpus: u32,
    /// Physical CPUs: the inventory's `capacity.cpus`, else the count the host's `stats` round reported, else 1.
    pub cpus: u32,
    pub memory_bytes: u64,
    pub nic_bytes_per_s: u64,
    pub reachable: bool,
    /// What is wrong with this host, if anything.
    pub error: Option<String>,
    /// Why the VMs of this host have no classes, if they have none.
    pub classes_note: Option<String>,
    pub vms: Vec<VmCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub inventory: String,
    pub hosts: Vec<HostCheck>,
    /// Every problem found, each naming its host or VM.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:<6} {:<16} {:>5} {:>10} {:>12}  state",
            "HOST", "VIA", "MIGRATION ADDR", "VCPUS", "MEMORY", "NIC"
        );
        for h in &self.hosts {
            let _ = writeln!(
                s,
                "{:<12} {:<6} {:<16} {:>5} {:>10} {:>12}  {}",
                h.name,
                h.transport,
                h.migration_address,
                h.vcpus,
                bytesize::ByteSize(h.memory_bytes).to_string_as(true),
                format!("{}bit/s", si(h.nic_bytes_per_s as f64 * 8.0)),
                if h.reachable {
                    "reachable".to_string()
                } else {
                    h.error.clone().unwrap_or_default()
                }
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<16} {:<10} {:<8} {:>10} {:<12} {:<10} {:<20}  SOCKET",
            "VM", "HOST", "QEMU", "RAM", "STATE", "MIGRATION", "CLASSES"
        );
        for h in &self.hosts {
            for v in &h.vms {
                let _ = writeln!(
                    s,
                    "{:<16} {:<10} {:<8} {:>10} {:<12} {:<10} {:<20}  {}{}",
                    v.name,
                    v.host,
                    v.qemu_version.as_deref().unwrap_or("-"),
                    v.ram_bytes
                        .map_or("-".into(), |b| bytesize::ByteSize(b).to_string_as(true)),
                    v.run_state.as_deref().unwrap_or("-"),
                    v.migration.as_deref().unwrap_or("-"),
                    classes_cell(&v.classes),
                    v.socket,
                    v.error
                        .as_ref()
                        .map(|e| format!("  ERROR: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        for h in &self.hosts {
            if let Some(n) = &h.classes_note {
                let _ = writeln!(s, "host {}: {n}", h.name);
            }
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "\nno problems found");
        } else {
            let _ = writeln!(s, "\n{} problem(s):", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "  {p}");
            }
        }
        s
    }
}

fn classes_cell(labels: &[crate::classify::Label]) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|l| l.class.name())
        .collect::<Vec<_>>()
        .join(",")
}

fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.3}G", v / 1e9).replace(".000", ""),
        v if v >= 1e6 => format!("{:.3}M", v / 1e6).replace(".000", ""),
        v if v >= 1e3 => format!("{:.3}k", v / 1e3).replace(".000", ""),
        v => format!("{v}"),
    }
}

/// The sockets of one host: the glob's matches and the VM entries' explicit sockets, each with the inventory
/// name it has, if any.
async fn sockets_of(
    inv: &Inventory,
    link: &HostLink,
) -> Result<Vec<(String, Option<String>)>, HostError> {
    let mut found: BTreeMap<String, Option<String>> = BTreeMap::new();
    if let Some(glob) = &link.host.qmp_glob {
        for s in link.list_sockets(glob).await? {
            found.insert(s, None);
        }
    }
    for v in inv.vms.values().filter(|v| v.host == link.host.name) {
        if let Some(q) = &v.qmp {
            found.insert(q.clone(), Some(v.name.clone()));
        }
    }
    Ok(found.into_iter().collect())
}

/// Reads one VM over QMP (version, run state, name, RAM, migration status); its QMP session ends on return.
async fn check_vm(
    inv: &Inventory,
    link: &HostLink,
    socket: &str,
    listed: Option<&str>,
    opts: &ConnectOptions,
) -> VmCheck {
    let mut vm = VmCheck {
        name: String::new(),
        name_from: "socket-file",
        host: link.host.name.clone(),
        socket: socket.to_string(),
        qemu_version: None,
        run_state: None,
        ram_bytes: None,
        vcpus: None,
        migration: None,
        classes: Vec::new(),
        figures: None,
        memory: None,
        macs: Vec::new(),
        groups: Vec::new(),
        anti_affinity: Vec::new(),
        error: None,
        locked_by: None,
    };
    let mut qemu_name = None;
    match link.connect_qmp(socket, opts).await {
        Err(e) => {
            vm.locked_by = lock_holder(link, socket);
            vm.error = Some(match &vm.locked_by {
                Some(pid) => format!(
                    "being migrated by another qmigrate (pid {pid}), which holds its QMP socket"
                ),
                None => crate::stats::error_chain(&e),
            });
        }
        Ok(q) => {
            let (a, b, c) = q.greeting().version;
            vm.qemu_version = Some(format!("{a}.{b}.{c}"));
            qemu_name = query_name(&q).await;
            match q.execute(&crate::qmp::types::QueryStatus {}).await {
                Ok(s) => vm.run_state = Some(s.status),
                Err(e) => vm.error = Some(e.to_string()),
            }
            vm.ram_bytes = q
                .execute(&qmp::query_memory_size_summary {})
                .await
                .ok()
                .map(|m| m.base_memory.saturating_add(m.plugged_memory.unwrap_or(0)));
            vm.vcpus = q
                .execute(&crate::qmp::stats_types::QueryCpusFast {})
                .await
                .ok()
                .map(|c| c.len() as u32);
            vm.migration = q
                .execute(&crate::qmp::types::QueryMigrate {})
                .await
                .ok()
                .and_then(|m| m.status);
            vm.macs = q
                .execute(&crate::qmp::stats_types::QueryRxFilter {})
                .await
                .map(|nics| {
                    nics.into_iter()
                        .map(|n| n.main_mac.to_ascii_lowercase())
                        .filter(|m| !m.is_empty())
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    // An entry names the VM; else an entry whose name is QEMU's -name claims it.
    let entry_name = listed.map(str::to_string).or_else(|| {
        qemu_name
            .as_ref()
            .filter(|n| {
                inv.vms
                    .get(n.as_str())
                    .is_some_and(|e| e.host == link.host.name && e.qmp.is_none())
            })
            .cloned()
    });
    let named = crate::stats::name::vm_name(entry_name.as_deref(), qemu_name.as_deref(), socket);
    vm.name = crate::text::printable(&named.name).into_owned();
    vm.name_from = named.from.as_str();
    if let Some(e) = inv.vms.get(&vm.name) {
        vm.groups = e.groups.clone();
        vm.anti_affinity = e.anti_affinity.clone();
    }
    vm
}

/// The pid of the qmigrate holding the lock of the VM at `socket` on `link` (the lock `migrate` takes), if one does.
pub fn lock_holder(link: &HostLink, socket: &str) -> Option<String> {
    let taken = if link.is_local() {
        crate::lock::VmLock::acquire(socket)
    } else {
        crate::lock::VmLock::acquire_keyed(&link.label(socket))
    };
    match taken {
        Err(crate::lock::LockError::Held { holder, .. }) => Some(holder),
        _ => None,
    }
}

/// QEMU's `-name`, if it has one.
pub async fn query_name(q: &Qmp) -> Option<String> {
    q.execute_raw("query-name", None, Duration::from_secs(5))
        .await
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
}

/// Reaches every host and VM of the inventory, all hosts at once; with `classes`, each host's VMs are also
/// sampled once and classified.
pub async fn check(inv: &Inventory, opts: &ConnectOptions, classes: bool) -> CheckReport {
    let links = crate::remote::links(inv);
    let tasks = links
        .iter()
        .map(|link| check_host(inv, link, opts, classes));
    let hosts = futures_util::future::join_all(tasks).await;
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for h in &hosts {
        if let Some(e) = &h.error {
            problems.push(format!("host {}: {e}", h.name));
        }
        for v in &h.vms {
            if let Some(e) = &v.error {
                problems.push(format!(
                    "VM {} on host {} ({}): {e}",
                    v.name, v.host, v.socket
                ));
            }
            seen.entry(v.name.as_str())
                .or_default()
                .push(h.name.as_str());
        }
    }
    for (name, where_) in &seen {
        if where_.len() > 1 {
            problems.push(format!(
                "VM {name} is found more than once: on {}",
                where_.join(", ")
            ));
        }
    }
    for e in inv.vms.values() {
        if !seen.contains_key(e.name.as_str()) {
            problems.push(format!(
                "VM {} (inventory entry, host {}): not found on its host",
                e.name, e.host
            ));
        }
    }
    CheckReport {
        inventory: inv.path.display().to_string(),
        hosts,
        problems,
    }
}

async fn check_host(
    inv: &Inventory,
    link: &Arc<HostLink>,
    opts: &ConnectOptions,
    classes: bool,
) -> HostCheck {
    let h = &link.host;
    let mut out = HostCheck {
        name: h.name.clone(),
        transport: match h.transport {
            Transport::Local => "local".into(),
            Transport::Ssh { .. } => "ssh".into(),
        },
        migration_address: h.migration_address.clone(),
        vcpus: h.capacity.vcpus,
        cpus: h.capacity.cpus.max(1),
        memory_bytes: h.capacity.memory_bytes,
        nic_bytes_per_s: h.capacity.nic_bytes_per_s,
        reachable: false,
        error: None,
        classes_note: None,
        vms: Vec::new(),
    };
    if let Err(e) = link.ping().await {
        out.error = Some(crate::stats::error_chain(&e));
        return out;
    }
    out.reachable = true;
    match sockets_of(inv, link).await {
        Err(e) => out.error = Some(crate::stats::error_chain(&e)),
        Ok(sockets) => {
            for (socket, listed) in sockets {
                out.vms
                    .push(check_vm(inv, link, &socket, listed.as_deref(), opts).await);
            }
        }
    }
    if classes {
        let live: Vec<String> = out
            .vms
            .iter()
            .filter(|v| v.error.is_none())
            .map(|v| v.socket.clone())
            .collect();
        if !live.is_empty() {
            match classes_on(link, &live).await {
                Ok((mut found, host_cpus)) => {
                    if h.capacity.cpus == 0 {
                        out.cpus = host_cpus.unwrap_or(1).max(1);
                    }
                    for v in &mut out.vms {
                        if let Some((labels, figures, memory)) = found.remove(&v.socket) {
                            v.classes = labels;
                            v.figures = Some(figures);
                            v.memory = memory;
                        }
                    }
                }
                Err(note) => out.classes_note = Some(note),
            }
        }
    }
    out
}

/// How long the `stats` round behind the classes samples.
const CLASSES_INTERVAL: &str = "1s";

/// The classes of a host's VMs, from one `stats` round taken on that host (CPU and NIC figures come from its
/// `/proc`): in this process for a local host; for an ssh host, by this same qmigrate executable run there over
/// ssh, when it is installed at the same path (else a note says so).
/// What one `stats` round found of a VM: its classes, their figures, and its memory.
type Found = (
    Vec<crate::classify::Label>,
    crate::classify::Figures,
    Option<crate::stats::MemorySample>,
);

async fn classes_on(
    link: &HostLink,
    sockets: &[String],
) -> Result<(BTreeMap<String, Found>, Option<u32>), String> {
    let snapshot = if link.is_local() {
        let interval = humantime::parse_duration(CLASSES_INTERVAL).expect("a duration");
        let snap =
            crate::stats::sample_round(sockets, &crate::stats::SampleOptions::new(interval)).await;
        serde_json::to_value(&snap).map_err(|e| e.to_string())?
    } else {
        let exe = std::env::current_exe()
            .map_err(|e| format!("classes: cannot tell qmigrate's own path: {e}"))?;
        let exe = exe.display().to_string();
        let mut argv = vec![
            exe.as_str(),
            "stats",
            "--json",
            "--interval",
            CLASSES_INTERVAL,
        ];
        argv.extend(sockets.iter().map(String::as_str));
        match link.run(&argv, crate::remote::COMMAND_TIMEOUT).await {
            Ok(out) => serde_json::from_slice(&out.stdout).map_err(|e| {
                format!(
                    "classes: `qmigrate stats` on {} printed no report: {e}",
                    link.name()
                )
            })?,
            Err(HostError::Command { status, .. }) if status == "exit 127" => {
                return Err(format!(
                    "classes need qmigrate on {} at {exe} (the same path as here)",
                    link.name()
                ))
            }
            Err(e) => return Err(format!("classes: {}", crate::stats::error_chain(&e))),
        }
    };
    let mut out = BTreeMap::new();
    for vm in snapshot["vms"].as_array().into_iter().flatten() {
        let (Some(socket), Some(classes)) = (vm["socket"].as_str(), vm.get("classes")) else {
            continue;
        };
        let labels: Vec<crate::classify::Label> =
            serde_json::from_value(classes.clone()).unwrap_or_default();
        let memory = serde_json::from_value(vm["sample"]["memory"].clone()).ok();
        out.insert(
            socket.to_string(),
            (labels, figures_of(&vm["sample"]), memory),
        );
    }
    let host_cpus = snapshot["host"]["cpus"]
        .as_u64()
        .and_then(|c| u32::try_from(c).ok());
    Ok((out, host_cpus))
}

/// The figures of a VM's sample as `stats --json` prints it: dirty rate, and the NIC rates summed over NICs.
fn figures_of(sample: &serde_json::Value) -> crate::classify::Figures {
    let sum = |key: &str| {
        sample["nics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n[key].as_f64())
            .fold(None, |acc: Option<f64>, v| Some(acc.unwrap_or(0.0) + v))
    };
    crate::classify::Figures {
        dirty_rate_bytes_per_s: sample["dirty_rate"]["bytes_per_s"].as_f64(),
        cpu_pct: sample["cpu_pct"].as_f64(),
        net_rx_bytes_per_s: sum("rx_bytes_per_s"),
        net_tx_bytes_per_s: sum("tx_bytes_per_s"),
        ..Default::default()
    }
}

/// A VM found by name: its host and socket.
#[derive(Debug, Clone)]
pub struct Located {
    pub name: String,
    pub link: Arc<HostLink>,
    pub socket: String,
}

/// Finds a VM by name on every host at once (each host's glob and the inventory's explicit sockets; a VM may
/// have moved away from the host its entry names). `exclude` is the socket a migration to another host would give
/// the VM there (`host`, `socket`): a QEMU qmigrate started there is the migration's destination, not the VM.
pub async fn find(
    inv: &Inventory,
    name: &str,
    opts: &ConnectOptions,
    exclude: Option<(&str, &str)>,
) -> Result<Located, FindError> {
    let links = crate::remote::links(inv);
    let hosts =
        futures_util::future::join_all(links.iter().map(|l| check_host(inv, l, opts, false))).await;
    let mut hits = Vec::new();
    let mut found = Vec::new();
    let mut broken = Vec::new();
    let mut busy = None;
    let mut excluded = None;
    for (link, host) in links.iter().zip(hosts) {
        if let Some(e) = host.error {
            // A host that cannot be searched might hold the VM: say so rather than "not found".
            return Err(FindError::Host(HostError::Invalid {
                host: host.name,
                what: format!("cannot be searched for VM {name:?}: {e}"),
            }));
        }
        for v in host.vms {
            if v.name != name {
                found.push(format!("{} on {}", v.name, v.host));
            } else if exclude == Some((v.host.as_str(), v.socket.as_str())) {
                excluded = Some(v.host);
            } else if let Some(holder) = v.locked_by {
                busy = Some(FindError::Busy {
                    name: name.into(),
                    host: v.host,
                    holder,
                });
            } else if let Some(e) = v.error {
                // A socket nobody answers on (a QEMU that died) is no VM; it is named if nothing else matches.
                broken.push(format!("{}:{}: {e}", v.host, v.socket));
            } else {
                hits.push(Located {
                    name: name.into(),
                    link: link.clone(),
                    socket: v.socket,
                });
            }
        }
    }
    if let (0, Some(b)) = (hits.len(), busy) {
        return Err(b);
    }
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 if excluded.is_some() => Err(FindError::AlreadyThere {
            name: name.into(),
            host: excluded.unwrap_or_default(),
        }),
        0 if !broken.is_empty() => Err(FindError::Unanswered {
            name: name.into(),
            sockets: broken.join("; "),
        }),
        0 => Err(FindError::NotFound {
            name: name.into(),
            inventory: inv.path.display().to_string(),
            found: if found.is_empty() {
                "no VMs".into()
            } else {
                found.join(", ")
            },
        }),
        _ => Err(FindError::Ambiguous {
            name: name.into(),
            where_: hits
                .iter()
                .map(|h| format!("{}:{}", h.link.host.name, h.socket))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
