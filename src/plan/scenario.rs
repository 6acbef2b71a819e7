//! The scenario model (hosts, VMs, traffic, tuning) and its validating JSON loader. Parses text it is given; never
//! opens files.
//!
//! The figures have the shape a stats sampler produces: CPU %, memory MiB, NIC Mbps and swap writes/s, per host and
//! per VM. The loader is serde's, through `serde_path_to_error`: the types say what each field holds and refuse
//! unknown fields. serde's messages name neither the entry nor the field the way a scenario's author would
//! (`invalid type: string "fast", expected f64 at line 9 column 40`), and every error has to name the host, VM or
//! flow it is about, so a failed load is explained again from the path serde stopped at and the JSON found there
//! (`vm "VM1": nic_mbps must be a number, found "fast"`). What the types cannot say (unique names, known hosts and
//! VMs, figures in range) is checked afterwards by [`Scenario::validate`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_path_to_error::Segment;

use super::PlanError;

/// The most hosts a scenario file may list. The limits on entries bound the work of a round, which grows faster
/// than the entries: idc and sandpiper try each VM of each hotspot on other hosts, and at worst (half the hosts hot,
/// no destination with room) every VM of every hotspot on every host. Measured on a release build, one thread, on
/// the synthetic clusters of `scripts/bench-plan` (docs/benchmarks.md): one round of each policy at 1,000 hosts and
/// 10,000 VMs takes under 15 ms (about 30 ms at worst); at these limits, 10,000 hosts and 100,000 VMs, about 0.1 s
/// for band and 0.3-0.4 s for idc and sandpiper, and at worst, with 200,000 flows, about 5 s a round.
pub const MAX_HOSTS: usize = 10_000;
/// The most VMs a scenario file may list (see [`MAX_HOSTS`]).
pub const MAX_VMS: usize = 100_000;
/// The most traffic flows a scenario file may list (see [`MAX_HOSTS`]).
pub const MAX_FLOWS: usize = 200_000;

/// A cluster at one sampling instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Free text: where the figures come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(deserialize_with = "entries::<_, _, MAX_HOSTS>")]
    pub hosts: Vec<Host>,
    #[serde(deserialize_with = "entries::<_, _, MAX_VMS>")]
    pub vms: Vec<Vm>,
    #[serde(default, deserialize_with = "entries_or_null::<_, _, MAX_FLOWS>")]
    pub traffic: Vec<Flow>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub tuning: Tuning,
}

/// A physical host: capacity and measured utilisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(default, deserialize_with = "or_null")]
    pub memory_reserved_mib: u64,
    /// Earlier samples, oldest first, for the AR(1) prediction.
    #[serde(default, deserialize_with = "object_or_null")]
    pub history: History,
}

/// Earlier samples of a host's figures, oldest first. The current figure is not repeated here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    #[serde(default, deserialize_with = "or_null")]
    pub cpu_pct: Vec<f64>,
    #[serde(default, deserialize_with = "or_null")]
    pub swap_writes_per_s: Vec<f64>,
    #[serde(default, deserialize_with = "or_null")]
    pub nic_pct: Vec<f64>,
}

/// A guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub a: String,
    pub b: String,
    pub mbps: f64,
}

/// Thresholds and steps of the hotspot-driven policies (idc and sandpiper). Defaults are paper 004's; any field
/// may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TuningFields")]
pub struct Tuning {
    pub cpu_threshold_pct: f64,
    pub swap_threshold_writes_per_s: f64,
    pub nic_threshold_pct: f64,
    /// Fixed balloon step (paper 004 reports 32 MB allocations).
    pub balloon_step_mib: u64,
    /// The most a VM's NIC traffic can reach ("NB" bound in Nds = min(Is, AB, NB)); `None` = the source NIC speed.
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// [`Tuning`] as a scenario file gives it: a field left out, or `null`, keeps its default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TuningFields {
    cpu_threshold_pct: Option<f64>,
    swap_threshold_writes_per_s: Option<f64>,
    nic_threshold_pct: Option<f64>,
    balloon_step_mib: Option<u64>,
    vm_nic_bound_mbps: Option<f64>,
}

impl From<TuningFields> for Tuning {
    fn from(t: TuningFields) -> Self {
        let d = Tuning::default();
        Tuning {
            cpu_threshold_pct: t.cpu_threshold_pct.unwrap_or(d.cpu_threshold_pct),
            swap_threshold_writes_per_s: t
                .swap_threshold_writes_per_s
                .unwrap_or(d.swap_threshold_writes_per_s),
            nic_threshold_pct: t.nic_threshold_pct.unwrap_or(d.nic_threshold_pct),
            balloon_step_mib: t.balloon_step_mib.unwrap_or(d.balloon_step_mib),
            vm_nic_bound_mbps: t.vm_nic_bound_mbps,
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
    /// Parses and validates a scenario from JSON text. A list longer than [`MAX_HOSTS`], [`MAX_VMS`] or
    /// [`MAX_FLOWS`] is refused for its length, whatever else is wrong with its entries.
    pub fn from_json(text: &str) -> Result<Scenario, PlanError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let scenario = match serde_path_to_error::deserialize::<_, Object<Scenario>>(&mut de) {
            Ok(Object(s)) => s,
            Err(e) => return Err(explain(text, &e)),
        };
        de.end().map_err(|e| PlanError::Syntax {
            reason: e.to_string(),
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks what the types cannot: non-empty unique names, known hosts and VMs, non-negative and bounded figures.
    /// Scenarios built in code should pass through here too.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.hosts.is_empty() {
            return Err(PlanError::Invalid {
                entry: Entry::Scenario,
                reason: "no hosts".into(),
            });
        }
        let mut hosts = HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if h.name.is_empty() {
                return Err(unnamed(Entry::Nth("hosts", i + 1), &Value::from("")));
            }
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
        let mut vms = HashSet::new();
        for (i, v) in self.vms.iter().enumerate() {
            if v.name.is_empty() {
                return Err(unnamed(Entry::Nth("vms", i + 1), &Value::from("")));
            }
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
        let mut pairs = HashSet::new();
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
        if t.balloon_step_mib == 0 {
            return Err(PlanError::Invalid {
                entry: Entry::Tuning,
                reason: "balloon_step_mib must be above 0".into(),
            });
        }
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
    clipped(&v.to_string(), SHOWN_CHARS)
}

/// `text` cut to `max` characters and made printable.
fn clipped(text: &str, max: usize) -> String {
    let text = match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    };
    crate::text::printable(&text).into_owned()
}

/// `T` read from a JSON object only: serde's derived impls also take a JSON array, the fields by position, which no
/// scenario means.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(PhantomData)).map(Object)
    }
}

/// A list of at most `MAX` entries, each a JSON object. A longer list is refused when entry `MAX + 1` shows up
/// (skipped, not built), so a load never builds more than `MAX` entries; [`explain`] then counts them.
fn entries<'de, D: Deserializer<'de>, T: Deserialize<'de>, const MAX: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    struct List<T, const MAX: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for List<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut list = Vec::new();
            while list.len() < MAX {
                match seq.next_element::<Object<T>>()? {
                    Some(Object(entry)) => list.push(entry),
                    None => return Ok(list),
                }
            }
            match seq.next_element::<IgnoredAny>()? {
                None => Ok(list),
                Some(_) => Err(A::Error::custom(format_args!("more than {MAX} entries"))),
            }
        }
    }
    d.deserialize_seq(List::<T, MAX>(PhantomData))
}

/// [`entries`], with `null` standing for an empty list.
fn entries_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>, const MAX: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    struct Bounded<T, const MAX: usize>(Vec<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            entries::<D, T, MAX>(d).map(Bounded)
        }
    }
    Ok(Option::<Bounded<T, MAX>>::deserialize(d)?.map_or_else(Vec::new, |b| b.0))
}

/// An optional field: `null` stands for the default, as leaving the field out does.
fn or_null<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An optional JSON object: `null` stands for the default, as leaving the field out does.
fn object_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map_or_else(T::default, |o| o.0))
}

/// What a field holds, for the messages of a failed load.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Number,
    Whole,
    Text,
    List,
    Object,
}

/// Every field a scenario file may give, by the name its messages use (`history.` before the fields of a host's
/// history). A test checks this against the types.
const FIELDS: &[(&str, Kind)] = &[
    ("description", Kind::Text),
    ("hosts", Kind::List),
    ("vms", Kind::List),
    ("traffic", Kind::List),
    ("tuning", Kind::Object),
    ("name", Kind::Text),
    ("cpus", Kind::Whole),
    ("memory_mib", Kind::Whole),
    ("nic_mbps", Kind::Number),
    ("cpu_pct", Kind::Number),
    ("swap_writes_per_s", Kind::Number),
    ("nic_pct", Kind::Number),
    ("memory_reserved_mib", Kind::Whole),
    ("history", Kind::Object),
    ("history.cpu_pct", Kind::List),
    ("history.swap_writes_per_s", Kind::List),
    ("history.nic_pct", Kind::List),
    ("host", Kind::Text),
    ("memory_pct", Kind::Number),
    ("memory_max_mib", Kind::Whole),
    ("a", Kind::Text),
    ("b", Kind::Text),
    ("mbps", Kind::Number),
    ("cpu_threshold_pct", Kind::Number),
    ("swap_threshold_writes_per_s", Kind::Number),
    ("nic_threshold_pct", Kind::Number),
    ("balloon_step_mib", Kind::Whole),
    ("vm_nic_bound_mbps", Kind::Number),
];

fn field(name: &str) -> Option<(&'static str, Kind)> {
    FIELDS.iter().find(|(n, _)| *n == name).copied()
}

/// What serde stopped at, as far as its message says more than the path: the three messages told apart here are
/// serde's own, fixed texts (`missing field `cpus``), and the field they quote is one of the types' own names.
enum Problem {
    Missing(String),
    Twice(String),
    Unknown,
    Other,
}

impl Problem {
    fn of(e: &serde_json::Error) -> Problem {
        let msg = e.to_string();
        let quoted = || msg.split('`').nth(1).unwrap_or_default().to_owned();
        if msg.starts_with("missing field `") {
            Problem::Missing(quoted())
        } else if msg.starts_with("duplicate field `") {
            Problem::Twice(quoted())
        } else if msg.starts_with("unknown field `") {
            Problem::Unknown
        } else {
            Problem::Other
        }
    }
}

/// Explains a failed load the way a scenario's author reads it: which entry (by name when it has a readable one),
/// which field, what was found there. Only a failed load pays for the JSON tree this needs.
fn explain(text: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> PlanError {
    let root: Value = match serde_json::from_str(text) {
        Ok(root) => root,
        Err(e) => {
            return PlanError::Syntax {
                reason: e.to_string(),
            }
        }
    };
    if !e.inner().is_data() {
        return PlanError::Syntax {
            reason: e.inner().to_string(),
        };
    }
    let Some(top) = root.as_object() else {
        return PlanError::Invalid {
            entry: Entry::Scenario,
            reason: "must be a JSON object".into(),
        };
    };
    for (key, list, max) in [
        ("hosts", "hosts", MAX_HOSTS),
        ("vms", "vms", MAX_VMS),
        ("traffic", "traffic flows", MAX_FLOWS),
    ] {
        if let Some(count) = top.get(key).and_then(Value::as_array).map(Vec::len) {
            if count > max {
                return PlanError::TooMany { list, count, max };
            }
        }
    }
    let problem = Problem::of(e.inner());
    let path: Vec<&Segment> = e.path().iter().collect();
    // The entry, the JSON object that holds what serde stopped at, and the rest of the path from there.
    let (entry, object, rest) = match path.as_slice() {
        [Segment::Map { key }, Segment::Seq { index }, rest @ ..] => {
            let object = &root[key.as_str()][*index];
            match entry_at(key, *index, object, &problem) {
                Ok(entry) => (entry, object, rest),
                Err(about_the_entry) => return about_the_entry,
            }
        }
        [Segment::Map { key }, rest @ ..] if key == "tuning" && !rest.is_empty() => {
            (Entry::Tuning, &root["tuning"], rest)
        }
        rest => (Entry::Scenario, &root, rest),
    };
    let (prefix, object, rest) = match rest {
        [Segment::Map { key }, rest @ ..] if key == "history" && !rest.is_empty() => {
            ("history.", &object["history"], rest)
        }
        _ => ("", object, rest),
    };
    let unexplained = |entry| PlanError::Invalid {
        entry,
        reason: clipped(&e.inner().to_string(), 4 * SHOWN_CHARS),
    };
    match (rest, problem) {
        ([], Problem::Missing(name)) => match (field(&format!("{prefix}{name}")), entry) {
            (Some(("host", _)), Entry::Vm(vm)) => PlanError::NoHost { vm },
            (Some((field, _)), entry) => PlanError::MissingField { entry, field },
            (None, entry) => unexplained(entry),
        },
        ([], Problem::Twice(name)) => PlanError::Invalid {
            entry,
            reason: format!("{prefix}{name} is given twice"),
        },
        ([Segment::Map { key }], Problem::Unknown) => PlanError::UnknownField {
            entry,
            field: format!("{prefix}{key}"),
        },
        ([Segment::Map { key }], _) => match (field(&format!("{prefix}{key}")), object.get(key)) {
            (Some((field, kind)), Some(found)) => wrong(entry, field, kind, found),
            _ => unexplained(entry),
        },
        // An element of a list of figures (a host's history).
        ([Segment::Map { key }, Segment::Seq { index }], _) => {
            match (
                field(&format!("{prefix}{key}")),
                object[key.as_str()].get(index),
            ) {
                (Some((field, _)), Some(found)) => PlanError::NotANumber {
                    entry,
                    field,
                    found: shown(found),
                },
                _ => unexplained(entry),
            }
        }
        _ => unexplained(entry),
    }
}

/// Names the entry at position `index` of the list `key` for an error inside it, by its name. When the name cannot
/// be read the error is about the name (or about the entry not being an object), whatever serde stopped at, since
/// every other message needs it. A flow is named by its ends, except in an unknown field's message.
fn entry_at(key: &str, index: usize, v: &Value, problem: &Problem) -> Result<Entry, PlanError> {
    // The only lists of entries.
    let list = match key {
        "hosts" => "hosts",
        "vms" => "vms",
        _ => "traffic",
    };
    let nth = Entry::Nth(list, index + 1);
    if !v.is_object() {
        return Err(PlanError::Invalid {
            entry: nth,
            reason: "must be a JSON object".into(),
        });
    }
    if list == "traffic" {
        if matches!(problem, Problem::Unknown) {
            return Ok(nth);
        }
        let end = |field: &'static str| match &v[field] {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Err(PlanError::MissingField {
                entry: nth.clone(),
                field,
            }),
            other => Err(PlanError::Invalid {
                entry: nth.clone(),
                reason: format!("{field} must be a string, found {}", shown(other)),
            }),
        };
        return Ok(Entry::Traffic(end("a")?, end("b")?));
    }
    match &v["name"] {
        Value::String(s) if !s.is_empty() && list == "hosts" => Ok(Entry::Host(s.clone())),
        Value::String(s) if !s.is_empty() => Ok(Entry::Vm(s.clone())),
        Value::Null => Err(PlanError::MissingField {
            entry: nth,
            field: "name",
        }),
        other => Err(unnamed(nth, other)),
    }
}

fn unnamed(entry: Entry, found: &Value) -> PlanError {
    PlanError::Invalid {
        entry,
        reason: format!("name must be a non-empty string, found {}", shown(found)),
    }
}

/// A field that holds the wrong thing (`null` in a required field counts as missing).
fn wrong(entry: Entry, field: &'static str, kind: Kind, found: &Value) -> PlanError {
    let expected = match (kind, found, &entry) {
        (_, Value::Null, Entry::Vm(vm)) if field == "host" => {
            return PlanError::NoHost { vm: vm.clone() }
        }
        (_, Value::Null, _) => return PlanError::MissingField { entry, field },
        (Kind::Whole, Value::Number(n), _) => {
            if let Some(n) = n.as_u64() {
                return PlanError::Invalid {
                    entry,
                    reason: format!("{field} {n} is too large"),
                };
            }
            match n.as_f64() {
                Some(value) if value < 0.0 => {
                    return PlanError::Negative {
                        entry,
                        field,
                        value,
                    }
                }
                _ => "a whole number",
            }
        }
        (Kind::Number | Kind::Whole, _, _) => {
            return PlanError::NotANumber {
                entry,
                field,
                found: shown(found),
            }
        }
        (Kind::Text, _, _) => "a string",
        (Kind::List, _, _) => "a list",
        (Kind::Object, _, _) => "a JSON object",
    };
    PlanError::Invalid {
        entry,
        reason: format!("{field} must be {expected}, found {}", shown(found)),
    }
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
            (
                "scenario lists 10001 hosts, above the limit of 10000",
                |v| v["hosts"] = many(MAX_HOSTS + 1),
            ),
            (
                "scenario lists 100001 vms, above the limit of 100000",
                |v| v["vms"] = many(MAX_VMS + 1),
            ),
            (
                "scenario lists 200001 traffic flows, above the limit of 200000",
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

    #[test]
    fn each_wrong_shape_names_its_entry_and_field() {
        type Edit = fn(&mut Value);
        let cases: &[(&str, Edit)] = &[
            ("scenario: must be a JSON object", |v| {
                *v = Value::Array(vec![])
            }),
            (r#"scenario: unknown field "host""#, |v| {
                v["host"] = 1.into()
            }),
            (r#"scenario: missing field "vms""#, |v| {
                v.as_object_mut().unwrap().remove("vms");
            }),
            (r#"scenario: hosts must be a list, found {"a":1}"#, |v| {
                v["hosts"] = serde_json::json!({"a": 1})
            }),
            ("scenario: description must be a string, found 5", |v| {
                v["description"] = 5.into()
            }),
            ("scenario: tuning must be a JSON object, found 5", |v| {
                v["tuning"] = 5.into()
            }),
            ("hosts entry #1: must be a JSON object", |v| {
                v["hosts"][0] = serde_json::json!(["node1", 4, 3072, 1000, 46.4, 0, 10])
            }),
            (
                "hosts entry #2: name must be a non-empty string, found 7",
                |v| v["hosts"][1]["name"] = 7.into(),
            ),
            (
                r#"vms entry #1: name must be a non-empty string, found """#,
                |v| v["vms"][0]["name"] = "".into(),
            ),
            (r#"host "node1": missing field "cpus""#, |v| {
                v["hosts"][0]["cpus"] = Value::Null
            }),
            (
                "host \"node1\": cpus must be a whole number, found 1.5",
                |v| v["hosts"][0]["cpus"] = 1.5.into(),
            ),
            ("host \"node1\": cpus 5000000000 is too large", |v| {
                v["hosts"][0]["cpus"] = 5_000_000_000u64.into()
            }),
            (
                r#"host "node1": history.cpu_pct must be a number, found "x""#,
                |v| v["hosts"][0]["history"] = serde_json::json!({"cpu_pct": [1, "x"]}),
            ),
            (
                "host \"node1\": history.nic_pct must be a list, found 3",
                |v| v["hosts"][0]["history"] = serde_json::json!({"nic_pct": 3}),
            ),
            (r#"host "node1": unknown field "history.cpu""#, |v| {
                v["hosts"][0]["history"] = serde_json::json!({"cpu": [1]})
            }),
            ("host \"node1\": history.cpu_pct is negative (-1)", |v| {
                v["hosts"][0]["history"] = serde_json::json!({"cpu_pct": [-1]})
            }),
            (r#"vm "VM2" is on no host"#, |v| {
                v["vms"][1]["host"] = Value::Null
            }),
            (r#"vm "VM1": host must be a string, found 3"#, |v| {
                v["vms"][0]["host"] = 3.into()
            }),
            ("vm \"VM1\": memory_max_mib is negative (-1)", |v| {
                v["vms"][0]["memory_max_mib"] = (-1).into()
            }),
            (r#"traffic entry #1: unknown field "c""#, |v| {
                v["traffic"][0]["c"] = 1.into()
            }),
            ("traffic entry #1: a must be a string, found 1", |v| {
                v["traffic"][0]["a"] = 1.into()
            }),
            (r#"traffic entry #1: missing field "b""#, |v| {
                v["traffic"][0].as_object_mut().unwrap().remove("b");
            }),
            (
                r#"traffic "VM1"-"VM2": mbps must be a number, found "x""#,
                |v| v["traffic"][0]["mbps"] = "x".into(),
            ),
            (r#"traffic "VM1"-"VM2": missing field "mbps""#, |v| {
                v["traffic"][0].as_object_mut().unwrap().remove("mbps");
            }),
            (r#"tuning: unknown field "cpu_threshold""#, |v| {
                v["tuning"] = serde_json::json!({"cpu_threshold": 90})
            }),
            (
                r#"tuning: nic_threshold_pct must be a number, found "high""#,
                |v| v["tuning"] = serde_json::json!({"nic_threshold_pct": "high"}),
            ),
            ("tuning: balloon_step_mib must be above 0", |v| {
                v["tuning"] = serde_json::json!({"balloon_step_mib": 0})
            }),
        ];
        for (want, edit) in cases {
            let err = Scenario::from_json(&with(*edit)).unwrap_err();
            assert_eq!(err.to_string(), *want);
        }
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        let text = GOOD.replacen(r#""cpus": 4,"#, r#""cpus": 4, "cpus": 8,"#, 1);
        let err = Scenario::from_json(&text).unwrap_err();
        assert_eq!(err.to_string(), r#"host "node1": cpus is given twice"#);
    }

    #[test]
    fn text_after_the_scenario_is_a_syntax_error() {
        let err = Scenario::from_json(&format!("{GOOD} {{}}")).unwrap_err();
        assert!(matches!(err, PlanError::Syntax { .. }), "{err}");
    }

    #[test]
    fn null_stands_for_an_optional_field_left_out() {
        let s = Scenario::from_json(&with(|v| {
            v["description"] = Value::Null;
            v["hosts"][0]["memory_reserved_mib"] = Value::Null;
            v["hosts"][0]["history"] = Value::Null;
            v["hosts"][1]["history"] = serde_json::json!({"cpu_pct": null, "nic_pct": [1]});
            v["vms"][0]["memory_max_mib"] = Value::Null;
            v["traffic"] = Value::Null;
            v["tuning"] = serde_json::json!({"cpu_threshold_pct": null, "nic_threshold_pct": 70});
        }))
        .unwrap();
        let good = Scenario::from_json(GOOD).unwrap();
        assert_eq!(s.hosts[0], good.hosts[0]);
        assert_eq!(s.hosts[1].history.nic_pct, [1.0]);
        assert!(s.hosts[1].history.cpu_pct.is_empty());
        assert_eq!(s.vms, good.vms);
        assert!(s.traffic.is_empty());
        let want = Tuning {
            nic_threshold_pct: 70.0,
            ..Tuning::default()
        };
        assert_eq!(s.tuning, want);
    }

    #[test]
    fn a_full_list_is_allowed() {
        let s = Scenario::from_json(&with(|v| {
            let flow = v["traffic"][0].clone();
            v["traffic"] = Value::Array(vec![flow; MAX_FLOWS]);
        }));
        // The list is read whole; only then is the same pair found listed twice.
        assert_eq!(
            s.unwrap_err().to_string(),
            r#"traffic "VM1"-"VM2" is listed twice"#
        );
    }

    /// Every scenario file that loads is written back by serde (as `qmigrate balance --record` writes one) and
    /// loads again to the same scenario.
    #[test]
    fn scenario_files_survive_a_round_trip() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
        let mut loaded = 0;
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let s = match Scenario::from_json(&text) {
                Ok(s) => s,
                Err(e) => {
                    assert!(name.starts_with("malformed-"), "{name}: {e}");
                    continue;
                }
            };
            assert!(!name.starts_with("malformed-"), "{name} loads");
            for text in [
                serde_json::to_string(&s).unwrap(),
                serde_json::to_string_pretty(&s).unwrap(),
            ] {
                assert_eq!(Scenario::from_json(&text).unwrap(), s, "{name}");
            }
            loaded += 1;
        }
        assert!(loaded >= 8, "only {loaded} scenario files load");
    }

    /// The messages of a failed load take each field's name and kind from [`FIELDS`]: it must list every field
    /// the types write, with the kind of JSON value written.
    #[test]
    fn the_field_table_matches_the_types() {
        let mut s = Scenario::from_json(GOOD).unwrap();
        s.description = Some("every field".into());
        s.hosts[0].memory_reserved_mib = 256;
        s.hosts[0].history = History {
            cpu_pct: vec![1.0],
            swap_writes_per_s: vec![2.0],
            nic_pct: vec![3.0],
        };
        s.vms[0].memory_max_mib = Some(1024);
        s.tuning.vm_nic_bound_mbps = Some(100.0);
        let v = serde_json::to_value(&s).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut check = |name: String, v: &Value| {
            let (name, kind) = field(&name).unwrap_or_else(|| panic!("{name} is not in FIELDS"));
            let fits = match kind {
                Kind::Number => v.is_number(),
                Kind::Whole => v.is_u64(),
                Kind::Text => v.is_string(),
                Kind::List => v.is_array(),
                Kind::Object => v.is_object(),
            };
            assert!(fits, "{name}: {kind:?} in FIELDS, {v} written");
            seen.insert(name);
        };
        let fields = |v: &Value| v.as_object().unwrap().clone();
        for (k, x) in fields(&v) {
            check(k, &x);
        }
        for list in ["hosts", "vms", "traffic"] {
            for entry in v[list].as_array().unwrap() {
                for (k, x) in fields(entry) {
                    if k == "history" {
                        for (k, x) in fields(&x) {
                            check(format!("history.{k}"), &x);
                        }
                    }
                    check(k, &x);
                }
            }
        }
        for (k, x) in fields(&v["tuning"]) {
            check(k, &x);
        }
        assert_eq!(seen.len(), FIELDS.len(), "FIELDS names a field no type has");
    }
}
