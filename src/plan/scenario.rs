//! The scenario model (hosts, VMs, traffic, tuning) and its validating JSON loader. Parses text it is given; never
//! opens files.
//!
//! The figures have the shape a stats sampler produces: CPU %, memory MiB, NIC Mbps and swap writes/s, per host and
//! per VM. Loading walks the JSON by hand instead of relying on serde's messages alone, because every error has to
//! name the host, VM or flow it is about (`vm "N1V9": host "node9" is not in the scenario`), and serde's type errors
//! name neither the entry nor the field.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::PlanError;

/// The most hosts a scenario file may list. The limits on entries bound the work of a round, which grows much faster
/// than the entries: idc and sandpiper try each VM of each hotspot on every other host with a projected copy of the
/// whole scenario. Measured on a release build, a scenario at these limits with half the hosts hot and no
/// destination with room takes about 40 s a round; one at ten times the limits did not finish a round in 2 minutes.
pub const MAX_HOSTS: usize = 100;
/// The most VMs a scenario file may list (see [`MAX_HOSTS`]).
pub const MAX_VMS: usize = 1_000;
/// The most traffic flows a scenario file may list (see [`MAX_HOSTS`]).
pub const MAX_FLOWS: usize = 10_000;

/// A cluster at one sampling instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Free text: where the figures come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    #[serde(default)]
    pub traffic: Vec<Flow>,
    #[serde(default)]
    pub tuning: Tuning,
}

/// A physical host: capacity and measured utilisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub cpus: u32,
    /// Physical memory.
    pub memory_mib: u64,
    /// NIC speed.
    pub nic_mbps: f64,
    /// Measured CPU utilisation of the whole host, 0-100.
    pub cpu_pct: f64,
    pub swap_writes_per_s: f64,
    /// Measured NIC utilisation (traffic that crosses the physical NIC), 0-100.
    pub nic_pct: f64,
    /// Memory the host keeps for itself (OS, device memory); not available to guests.
    #[serde(default)]
    pub memory_reserved_mib: u64,
    /// Earlier samples, oldest first, for the AR(1) prediction.
    #[serde(default)]
    pub history: History,
}

/// Earlier samples of a host's figures, oldest first. The current figure is not repeated here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default)]
    pub cpu_pct: Vec<f64>,
    #[serde(default)]
    pub swap_writes_per_s: Vec<f64>,
    #[serde(default)]
    pub nic_pct: Vec<f64>,
}

/// A guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub host: String,
    /// The VM's CPU use in points of its host's CPU utilisation (the paper 000 tables compare it directly with the
    /// host figure).
    pub cpu_pct: f64,
    /// Memory currently given to the guest (the balloon target).
    pub memory_mib: u64,
    /// Share of `memory_mib` the guest actually uses, 0-100.
    pub memory_pct: f64,
    /// Traffic through the physical NIC; traffic with VMs on the same host (IDC) is not counted.
    pub nic_mbps: f64,
    pub swap_writes_per_s: f64,
    /// Ceiling for the balloon; `None` means the VM cannot grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_mib: Option<u64>,
}

/// Traffic between two VMs, both directions together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub a: String,
    pub b: String,
    pub mbps: f64,
}

/// Thresholds and steps of the hotspot-driven policies (idc and sandpiper). Defaults are paper 004's; any field
/// may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tuning {
    pub cpu_threshold_pct: f64,
    pub swap_threshold_writes_per_s: f64,
    pub nic_threshold_pct: f64,
    /// Fixed balloon step (paper 004 reports 32 MB allocations).
    pub balloon_step_mib: u64,
    /// The most a VM's NIC traffic can reach ("NB" bound in Nds = min(Is, AB, NB)); `None` = the source NIC speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_nic_bound_mbps: Option<f64>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cpu_threshold_pct: 85.0,
            swap_threshold_writes_per_s: 150.0,
            nic_threshold_pct: 80.0,
            balloon_step_mib: 32,
            vm_nic_bound_mbps: None,
        }
    }
}

/// Names the scenario entry an error is about.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Scenario,
    Host(String),
    Vm(String),
    Traffic(String, String),
    /// An entry whose name could not be read: list and 1-based position.
    Nth(&'static str, usize),
    Tuning,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Scenario => write!(f, "scenario"),
            Entry::Host(n) => write!(f, "host {n:?}"),
            Entry::Vm(n) => write!(f, "vm {n:?}"),
            Entry::Traffic(a, b) => write!(f, "traffic {a:?}-{b:?}"),
            Entry::Nth(list, i) => write!(f, "{list} entry #{i}"),
            Entry::Tuning => write!(f, "tuning"),
        }
    }
}

impl Scenario {
    /// Parses and validates a scenario from JSON text. Lists longer than [`MAX_HOSTS`], [`MAX_VMS`] or [`MAX_FLOWS`]
    /// are refused before their entries are read.
    pub fn from_json(text: &str) -> Result<Scenario, PlanError> {
        let root: Value = serde_json::from_str(text).map_err(|e| PlanError::Syntax {
            reason: e.to_string(),
        })?;
        let root = as_object(&root, &Entry::Scenario)?;
        let top = Obj::new(
            Entry::Scenario,
            root,
            &["description", "hosts", "vms", "traffic", "tuning"],
        )?;
        let description = top.opt_string("description")?;
        let hosts = bounded(top.list("hosts")?, "hosts", MAX_HOSTS)?;
        let vms = bounded(top.list("vms")?, "vms", MAX_VMS)?;
        let traffic = match root.get("traffic") {
            None => None,
            Some(_) => Some(bounded(top.list("traffic")?, "traffic flows", MAX_FLOWS)?),
        };
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(i, v)| parse_host(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        let vms = vms
            .iter()
            .enumerate()
            .map(|(i, v)| parse_vm(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        let traffic = match traffic {
            None => Vec::new(),
            Some(t) => t
                .iter()
                .enumerate()
                .map(|(i, v)| parse_flow(i, v))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let tuning = match root.get("tuning") {
            None => Tuning::default(),
            Some(v) => parse_tuning(v)?,
        };
        let scenario = Scenario {
            description,
            hosts,
            vms,
            traffic,
            tuning,
        };
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks what the types cannot: unique names, known hosts and VMs, non-negative and bounded figures.
    /// Scenarios built in code should pass through here too.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.hosts.is_empty() {
            return Err(PlanError::Invalid {
                entry: Entry::Scenario,
                reason: "no hosts".into(),
            });
        }
        let mut hosts = BTreeSet::new();
        for h in &self.hosts {
            let e = Entry::Host(h.name.clone());
            if !hosts.insert(h.name.as_str()) {
                return Err(PlanError::Duplicate { entry: e });
            }
            if h.cpus == 0 {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "cpus must be at least 1".into(),
                });
            }
            if h.memory_mib == 0 {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "memory_mib must be above 0".into(),
                });
            }
            if h.memory_reserved_mib > h.memory_mib {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "memory_reserved_mib exceeds memory_mib".into(),
                });
            }
            figure(&e, "nic_mbps", h.nic_mbps, None)?;
            if h.nic_mbps == 0.0 {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "nic_mbps must be above 0".into(),
                });
            }
            figure(&e, "cpu_pct", h.cpu_pct, Some(100.0))?;
            figure(&e, "swap_writes_per_s", h.swap_writes_per_s, None)?;
            figure(&e, "nic_pct", h.nic_pct, Some(100.0))?;
            for &x in &h.history.cpu_pct {
                figure(&e, "history.cpu_pct", x, Some(100.0))?;
            }
            for &x in &h.history.swap_writes_per_s {
                figure(&e, "history.swap_writes_per_s", x, None)?;
            }
            for &x in &h.history.nic_pct {
                figure(&e, "history.nic_pct", x, Some(100.0))?;
            }
        }
        let mut vms = BTreeSet::new();
        for v in &self.vms {
            let e = Entry::Vm(v.name.clone());
            if !vms.insert(v.name.as_str()) {
                return Err(PlanError::Duplicate { entry: e });
            }
            if v.host.is_empty() {
                return Err(PlanError::NoHost { vm: v.name.clone() });
            }
            if !hosts.contains(v.host.as_str()) {
                return Err(PlanError::UnknownHost {
                    vm: v.name.clone(),
                    host: v.host.clone(),
                });
            }
            figure(&e, "cpu_pct", v.cpu_pct, Some(100.0))?;
            figure(&e, "memory_pct", v.memory_pct, Some(100.0))?;
            figure(&e, "nic_mbps", v.nic_mbps, None)?;
            figure(&e, "swap_writes_per_s", v.swap_writes_per_s, None)?;
            if v.memory_mib == 0 {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "memory_mib must be above 0".into(),
                });
            }
            if v.memory_max_mib.is_some_and(|m| m < v.memory_mib) {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "memory_max_mib is below memory_mib".into(),
                });
            }
        }
        let mut pairs = BTreeSet::new();
        for f in &self.traffic {
            let e = Entry::Traffic(f.a.clone(), f.b.clone());
            for end in [&f.a, &f.b] {
                if !vms.contains(end.as_str()) {
                    return Err(PlanError::UnknownVm {
                        entry: e,
                        vm: end.clone(),
                    });
                }
            }
            if f.a == f.b {
                return Err(PlanError::Invalid {
                    entry: e,
                    reason: "a VM cannot talk to itself".into(),
                });
            }
            let key = if f.a < f.b {
                (&f.a, &f.b)
            } else {
                (&f.b, &f.a)
            };
            if !pairs.insert(key) {
                return Err(PlanError::Duplicate { entry: e });
            }
            figure(&e, "mbps", f.mbps, None)?;
        }
        let t = &self.tuning;
        figure(
            &Entry::Tuning,
            "cpu_threshold_pct",
            t.cpu_threshold_pct,
            Some(100.0),
        )?;
        figure(
            &Entry::Tuning,
            "swap_threshold_writes_per_s",
            t.swap_threshold_writes_per_s,
            None,
        )?;
        figure(
            &Entry::Tuning,
            "nic_threshold_pct",
            t.nic_threshold_pct,
            Some(100.0),
        )?;
        if let Some(b) = t.vm_nic_bound_mbps {
            figure(&Entry::Tuning, "vm_nic_bound_mbps", b, None)?;
        }
        Ok(())
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// VMs placed on `host`, in scenario order.
    pub fn vms_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.vms.iter().filter(move |v| v.host == host)
    }

    /// Memory promised to guests plus the host's reserve. Derived from placements rather than measured, so that it
    /// follows migrations and balloon changes exactly.
    pub fn committed_mib(&self, host: &str) -> u64 {
        let reserved = self.host(host).map_or(0, |h| h.memory_reserved_mib);
        reserved + self.vms_on(host).map(|v| v.memory_mib).sum::<u64>()
    }

    /// Memory still free for guests on `host` (zero when overcommitted).
    pub fn free_mib(&self, host: &str) -> u64 {
        self.host(host)
            .map_or(0, |h| h.memory_mib.saturating_sub(self.committed_mib(host)))
    }

    /// Every flow touching `vm`, as (peer, Mbps), sorted by peer so that sums over them do not depend on the order
    /// the scenario lists its traffic in (floating-point addition is not associative).
    pub fn peers<'a>(&'a self, vm: &str) -> Vec<(&'a str, f64)> {
        let mut peers: Vec<(&str, f64)> = self
            .traffic
            .iter()
            .filter_map(|f| {
                if f.a == vm {
                    Some((f.b.as_str(), f.mbps))
                } else if f.b == vm {
                    Some((f.a.as_str(), f.mbps))
                } else {
                    None
                }
            })
            .collect();
        peers.sort_by(|a, b| a.0.cmp(b.0));
        peers
    }

    /// Which host each VM is on.
    pub fn placement(&self) -> HashMap<&str, &str> {
        self.vms
            .iter()
            .map(|v| (v.name.as_str(), v.host.as_str()))
            .collect()
    }
}

fn figure(
    entry: &Entry,
    field: &'static str,
    value: f64,
    max: Option<f64>,
) -> Result<(), PlanError> {
    if !value.is_finite() {
        return Err(PlanError::NotANumber {
            entry: entry.clone(),
            field,
            found: value.to_string(),
        });
    }
    if value < 0.0 {
        return Err(PlanError::Negative {
            entry: entry.clone(),
            field,
            value,
        });
    }
    if let Some(max) = max {
        if value > max {
            return Err(PlanError::OutOfRange {
                entry: entry.clone(),
                field,
                value,
                max,
            });
        }
    }
    Ok(())
}

/// Most of a JSON value an error message quotes.
const SHOWN_CHARS: usize = 60;

/// A JSON value as an error message quotes it: short (a misplaced object can be most of the file) and printable
/// (JSON escapes C0 controls but leaves C1 controls such as CSI as they are).
fn shown(v: &Value) -> String {
    let text = v.to_string();
    let text = match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    };
    crate::text::printable(&text).into_owned()
}

fn bounded<'a>(
    list: &'a [Value],
    name: &'static str,
    max: usize,
) -> Result<&'a [Value], PlanError> {
    if list.len() > max {
        return Err(PlanError::TooMany {
            list: name,
            count: list.len(),
            max,
        });
    }
    Ok(list)
}

fn as_object<'a>(v: &'a Value, entry: &Entry) -> Result<&'a Map<String, Value>, PlanError> {
    v.as_object().ok_or_else(|| PlanError::Invalid {
        entry: entry.clone(),
        reason: "must be a JSON object".into(),
    })
}

/// One JSON object being read as a scenario entry; every error it returns names the entry and the field.
struct Obj<'a> {
    entry: Entry,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(entry: Entry, map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Self, PlanError> {
        // Unknown keys are refused: a misspelt optional field (say `memory_max_mb`) would otherwise be silently
        // ignored and the simulation would run on a default the author did not mean.
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(PlanError::UnknownField {
                entry,
                field: k.clone(),
            });
        }
        Ok(Obj { entry, map })
    }

    fn get(&self, field: &'static str) -> Result<&'a Value, PlanError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Err(PlanError::MissingField {
                entry: self.entry.clone(),
                field,
            }),
            Some(v) => Ok(v),
        }
    }

    fn number(&self, field: &'static str) -> Result<f64, PlanError> {
        let v = self.get(field)?;
        let n = v.as_f64().ok_or_else(|| self.not_a_number(field, v))?;
        figure(&self.entry, field, n, None)?;
        Ok(n)
    }

    fn opt_number(&self, field: &'static str) -> Result<Option<f64>, PlanError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.number(field).map(Some),
        }
    }

    fn whole(&self, field: &'static str) -> Result<u64, PlanError> {
        let v = self.get(field)?;
        if let Some(n) = v.as_u64() {
            return Ok(n);
        }
        match v.as_f64() {
            Some(n) if n < 0.0 => Err(PlanError::Negative {
                entry: self.entry.clone(),
                field,
                value: n,
            }),
            Some(_) => Err(PlanError::Invalid {
                entry: self.entry.clone(),
                reason: format!("{field} must be a whole number, found {}", shown(v)),
            }),
            None => Err(self.not_a_number(field, v)),
        }
    }

    fn opt_whole(&self, field: &'static str) -> Result<Option<u64>, PlanError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.whole(field).map(Some),
        }
    }

    fn numbers(&self, field: &'static str) -> Result<Vec<f64>, PlanError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(xs)) => xs
                .iter()
                .map(|x| {
                    let n = x.as_f64().ok_or_else(|| self.not_a_number(field, x))?;
                    figure(&self.entry, field, n, None)?;
                    Ok(n)
                })
                .collect(),
            Some(v) => Err(PlanError::Invalid {
                entry: self.entry.clone(),
                reason: format!("{field} must be a list of numbers, found {}", shown(v)),
            }),
        }
    }

    fn string(&self, field: &'static str) -> Result<String, PlanError> {
        let v = self.get(field)?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| PlanError::Invalid {
                entry: self.entry.clone(),
                reason: format!("{field} must be a string, found {}", shown(v)),
            })
    }

    fn opt_string(&self, field: &'static str) -> Result<Option<String>, PlanError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.string(field).map(Some),
        }
    }

    fn list(&self, field: &'static str) -> Result<&'a Vec<Value>, PlanError> {
        let v = self.get(field)?;
        v.as_array().ok_or_else(|| PlanError::Invalid {
            entry: self.entry.clone(),
            reason: format!("{field} must be a list, found {}", shown(v)),
        })
    }

    fn not_a_number(&self, field: &'static str, found: &Value) -> PlanError {
        PlanError::NotANumber {
            entry: self.entry.clone(),
            field,
            found: shown(found),
        }
    }
}

/// Reads an entry's `name` first, so that every later error can name it.
fn named<'a>(
    list: &'static str,
    index: usize,
    v: &'a Value,
) -> Result<(String, &'a Map<String, Value>), PlanError> {
    let nth = Entry::Nth(list, index + 1);
    let map = as_object(v, &nth)?;
    match map.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Ok((s.clone(), map)),
        None | Some(Value::Null) => Err(PlanError::MissingField {
            entry: nth,
            field: "name",
        }),
        Some(other) => Err(PlanError::Invalid {
            entry: nth,
            reason: format!("name must be a non-empty string, found {}", shown(other)),
        }),
    }
}

fn parse_host(index: usize, v: &Value) -> Result<Host, PlanError> {
    let (name, map) = named("hosts", index, v)?;
    let o = Obj::new(
        Entry::Host(name.clone()),
        map,
        &[
            "name",
            "cpus",
            "memory_mib",
            "nic_mbps",
            "cpu_pct",
            "swap_writes_per_s",
            "nic_pct",
            "memory_reserved_mib",
            "history",
        ],
    )?;
    let cpus = o.whole("cpus")?;
    let cpus = u32::try_from(cpus).map_err(|_| PlanError::Invalid {
        entry: o.entry.clone(),
        reason: format!("cpus {cpus} is too large"),
    })?;
    let history = match map.get("history") {
        None | Some(Value::Null) => History::default(),
        Some(h) => {
            let hm = as_object(h, &o.entry)?;
            let ho = Obj::new(
                o.entry.clone(),
                hm,
                &["cpu_pct", "swap_writes_per_s", "nic_pct"],
            )?;
            History {
                cpu_pct: ho.numbers("cpu_pct")?,
                swap_writes_per_s: ho.numbers("swap_writes_per_s")?,
                nic_pct: ho.numbers("nic_pct")?,
            }
        }
    };
    Ok(Host {
        cpus,
        memory_mib: o.whole("memory_mib")?,
        nic_mbps: o.number("nic_mbps")?,
        cpu_pct: o.number("cpu_pct")?,
        swap_writes_per_s: o.number("swap_writes_per_s")?,
        nic_pct: o.number("nic_pct")?,
        memory_reserved_mib: o.opt_whole("memory_reserved_mib")?.unwrap_or(0),
        history,
        name,
    })
}

fn parse_vm(index: usize, v: &Value) -> Result<Vm, PlanError> {
    let (name, map) = named("vms", index, v)?;
    let o = Obj::new(
        Entry::Vm(name.clone()),
        map,
        &[
            "name",
            "host",
            "cpu_pct",
            "memory_mib",
            "memory_pct",
            "nic_mbps",
            "swap_writes_per_s",
            "memory_max_mib",
        ],
    )?;
    let host = match map.get("host") {
        None | Some(Value::Null) => return Err(PlanError::NoHost { vm: name }),
        Some(_) => o.string("host")?,
    };
    Ok(Vm {
        host,
        cpu_pct: o.number("cpu_pct")?,
        memory_mib: o.whole("memory_mib")?,
        memory_pct: o.number("memory_pct")?,
        nic_mbps: o.number("nic_mbps")?,
        swap_writes_per_s: o.number("swap_writes_per_s")?,
        memory_max_mib: o.opt_whole("memory_max_mib")?,
        name,
    })
}

fn parse_flow(index: usize, v: &Value) -> Result<Flow, PlanError> {
    let nth = Entry::Nth("traffic", index + 1);
    let map = as_object(v, &nth)?;
    let ends = Obj::new(nth, map, &["a", "b", "mbps"])?;
    let (a, b) = (ends.string("a")?, ends.string("b")?);
    let o = Obj {
        entry: Entry::Traffic(a.clone(), b.clone()),
        map,
    };
    Ok(Flow {
        mbps: o.number("mbps")?,
        a,
        b,
    })
}

fn parse_tuning(v: &Value) -> Result<Tuning, PlanError> {
    let map = as_object(v, &Entry::Tuning)?;
    let o = Obj::new(
        Entry::Tuning,
        map,
        &[
            "cpu_threshold_pct",
            "swap_threshold_writes_per_s",
            "nic_threshold_pct",
            "balloon_step_mib",
            "vm_nic_bound_mbps",
        ],
    )?;
    let d = Tuning::default();
    let step = o
        .opt_whole("balloon_step_mib")?
        .unwrap_or(d.balloon_step_mib);
    if step == 0 {
        return Err(PlanError::Invalid {
            entry: Entry::Tuning,
            reason: "balloon_step_mib must be above 0".into(),
        });
    }
    Ok(Tuning {
        cpu_threshold_pct: o
            .opt_number("cpu_threshold_pct")?
            .unwrap_or(d.cpu_threshold_pct),
        swap_threshold_writes_per_s: o
            .opt_number("swap_threshold_writes_per_s")?
            .unwrap_or(d.swap_threshold_writes_per_s),
        nic_threshold_pct: o
            .opt_number("nic_threshold_pct")?
            .unwrap_or(d.nic_threshold_pct),
        balloon_step_mib: step,
        vm_nic_bound_mbps: o.opt_number("vm_nic_bound_mbps")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "hosts": [{"name": "node1", "cpus": 4, "memory_mib": 3072, "nic_mbps": 1000, "cpu_pct": 46.4,
                   "swap_writes_per_s": 0, "nic_pct": 10},
                  {"name": "node2", "cpus": 4, "memory_mib": 3072, "nic_mbps": 1000, "cpu_pct": 20,
                   "swap_writes_per_s": 0, "nic_pct": 10}],
        "vms": [{"name": "VM1", "host": "node1", "cpu_pct": 51.5, "memory_mib": 512, "memory_pct": 20,
                 "nic_mbps": 10, "swap_writes_per_s": 0},
                {"name": "VM2", "host": "node2", "cpu_pct": 5, "memory_mib": 512, "memory_pct": 20,
                 "nic_mbps": 10, "swap_writes_per_s": 0}],
        "traffic": [{"a": "VM1", "b": "VM2", "mbps": 100}]
    }"#;

    fn with(edit: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(GOOD).unwrap();
        edit(&mut v);
        v.to_string()
    }

    #[test]
    fn loads_the_issue_example() {
        let s = Scenario::from_json(GOOD).unwrap();
        assert_eq!(s.hosts.len(), 2);
        assert_eq!(s.tuning, Tuning::default());
        assert_eq!(s.committed_mib("node1"), 512);
        assert_eq!(s.free_mib("node1"), 2560);
    }

    #[test]
    fn malformed_scenarios_name_the_entry() {
        type Edit = fn(&mut Value);
        let cases: &[(&str, Edit)] = &[
            (r#"vm "VM2": host "node9" is not in the scenario"#, |v| {
                v["vms"][1]["host"] = "node9".into()
            }),
            (r#"host "node1" is listed twice"#, |v| {
                v["hosts"][1]["name"] = "node1".into()
            }),
            (r#"vm "VM1" is listed twice"#, |v| {
                v["vms"][1]["name"] = "VM1".into()
            }),
            (r#"host "node2": cpu_pct is negative (-3)"#, |v| {
                v["hosts"][1]["cpu_pct"] = (-3.0).into()
            }),
            (
                r#"vm "VM1": nic_mbps must be a number, found "fast""#,
                |v| v["vms"][0]["nic_mbps"] = "fast".into(),
            ),
            (r#"vm "VM2" is on no host"#, |v| {
                v["vms"][1].as_object_mut().unwrap().remove("host");
            }),
            (r#"vm "VM2" is on no host"#, |v| {
                v["vms"][1]["host"] = "".into()
            }),
            (
                r#"traffic "VM1"-"VM7": vm "VM7" is not in the scenario"#,
                |v| v["traffic"][0]["b"] = "VM7".into(),
            ),
            (r#"host "node1": missing field "cpus""#, |v| {
                v["hosts"][0].as_object_mut().unwrap().remove("cpus");
            }),
            (r#"vm "VM1": unknown field "memory_max_mb""#, |v| {
                v["vms"][0]["memory_max_mb"] = 9.into()
            }),
            (r#"host "node1": cpu_pct is 140, above 100"#, |v| {
                v["hosts"][0]["cpu_pct"] = 140.into()
            }),
            (r#"vm "VM1": memory_mib is negative (-512)"#, |v| {
                v["vms"][0]["memory_mib"] = (-512).into()
            }),
            (r#"hosts entry #2: missing field "name""#, |v| {
                v["hosts"][1].as_object_mut().unwrap().remove("name");
            }),
            ("scenario: no hosts", |v| v["hosts"] = Value::Array(vec![])),
            (r#"traffic "VM1"-"VM2": mbps is negative (-1)"#, |v| {
                v["traffic"][0]["mbps"] = (-1).into()
            }),
        ];
        for (want, edit) in cases {
            let err = Scenario::from_json(&with(*edit)).unwrap_err();
            assert_eq!(err.to_string(), *want);
        }
    }

    #[test]
    fn entry_lists_are_bounded() {
        fn many(n: usize) -> Value {
            Value::Array(vec![Value::Null; n])
        }
        type Edit = fn(&mut Value);
        let cases: &[(&str, Edit)] = &[
            ("scenario lists 101 hosts, above the limit of 100", |v| {
                v["hosts"] = many(MAX_HOSTS + 1)
            }),
            ("scenario lists 1001 vms, above the limit of 1000", |v| {
                v["vms"] = many(MAX_VMS + 1)
            }),
            (
                "scenario lists 10001 traffic flows, above the limit of 10000",
                |v| v["traffic"] = many(MAX_FLOWS + 1),
            ),
        ];
        for (want, edit) in cases {
            let err = Scenario::from_json(&with(*edit)).unwrap_err();
            assert_eq!(err.to_string(), *want);
        }
    }

    #[test]
    fn quoted_values_are_short_and_printable() {
        let err = Scenario::from_json(&with(|v| {
            v["vms"][0]["nic_mbps"] = "\u{9b}31m".into();
        }))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"vm "VM1": nic_mbps must be a number, found "\u{9b}31m""#
        );
        let err = Scenario::from_json(&with(|v| {
            v["vms"][0]["host"] = Value::Array(vec![Value::from("x".repeat(200))]);
        }))
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.ends_with("xxx…"), "{msg}");
        assert!(msg.len() < 150, "{msg}");
    }

    #[test]
    fn bad_json_is_a_syntax_error() {
        let err = Scenario::from_json("{\"hosts\": [").unwrap_err();
        assert!(matches!(err, PlanError::Syntax { .. }), "{err}");
    }
}
