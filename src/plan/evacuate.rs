//! PURE evacuation planning (paper 001's informed strategy): which host each VM goes to (capacity, affinity,
//! non-sharable classes) and in which order the VMs move (informed, fifo, sjf, random), every decision with its
//! reason. No I/O, no tokio; the executor (`crate::evacuate`) gathers the figures and carries the plan out.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::Class;

/// The order the VMs of an evacuation move in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Order {
    /// Paper 001: dirty-memory and web VMs first, net-receive VMs last, shortest job first otherwise.
    Informed,
    /// The order the VMs are listed in (the inventory's, then the hosts' discovery order).
    Fifo,
    /// Shortest predicted migration first.
    Sjf,
    /// A seeded shuffle, the same for the same seed and VMs.
    Random { seed: u64 },
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Order::Informed => f.write_str("informed"),
            Order::Fifo => f.write_str("fifo"),
            Order::Sjf => f.write_str("sjf"),
            Order::Random { seed } => write!(f, "random (seed {seed})"),
        }
    }
}

/// The order modes by name, as `--order` takes them (the seed of `random` comes from `--seed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderMode {
    Informed,
    Fifo,
    Sjf,
    Random,
}

impl FromStr for OrderMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "informed" => Ok(OrderMode::Informed),
            "fifo" => Ok(OrderMode::Fifo),
            "sjf" => Ok(OrderMode::Sjf),
            "random" => Ok(OrderMode::Random),
            other => Err(format!(
                "unknown order {other:?} (expected informed, fifo, sjf or random)"
            )),
        }
    }
}

/// A VM to move, with the figures the plan is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    /// The host it runs on now.
    pub from: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Its classes (may be empty when it could not be sampled).
    pub classes: Vec<Class>,
    /// Groups of VMs that talk to each other: kept on one host where possible.
    pub groups: Vec<String>,
    /// VMs (by name) never placed on the same host as this one.
    pub anti_affinity: Vec<String>,
    /// The predicted migration time, and the prediction's reason.
    pub predicted: Duration,
    pub prediction: String,
}

/// A host VMs may move to, with what it holds already.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRoom {
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub used_vcpus: u32,
    pub used_memory_bytes: u64,
    /// The VMs on it now (not being moved): names, classes and groups, for affinity and non-sharable classes.
    pub vms: Vec<Resident>,
}

/// A VM that stays where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resident {
    pub name: String,
    pub classes: Vec<Class>,
    pub groups: Vec<String>,
    pub anti_affinity: Vec<String>,
}

/// What a plan is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// The VMs to move, in fifo order.
    pub candidates: Vec<Candidate>,
    /// The hosts they may go to (never their own).
    pub hosts: Vec<HostRoom>,
    pub order: Order,
    /// VMs whose destination is fixed (a restore sends each VM back where it came from): VM name → host.
    pub fixed: BTreeMap<String, String>,
}

/// One move of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// 1-based position in the sequence.
    pub position: usize,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub classes: Vec<Class>,
    pub vcpus: u32,
    pub memory_bytes: u64,
    #[serde(rename = "predicted_ms", with = "millis")]
    pub predicted: Duration,
    pub prediction: String,
    /// Why this host.
    pub why_host: String,
    /// Why this position.
    pub why_position: String,
}

/// The moves, in the order they start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub order: Order,
    pub steps: Vec<Step>,
}

/// Why no plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("nothing to evacuate to: no other host in the inventory")]
    NoHosts,
    #[error("no room for VM {vm} ({vcpus} vCPUs, {memory}): {why}; nothing was moved")]
    NoRoom {
        vm: String,
        vcpus: u32,
        memory: String,
        /// Per host, what stops it.
        why: String,
    },
    #[error("VM {vm} must go to host {host}, which is not one of the hosts it may go to")]
    UnknownFixedHost { vm: String, host: String },
}

/// Durations in the journal and reports as milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Plans an evacuation: a destination for every candidate, then the sequence.
///
/// Every candidate gets a host before anything is ordered, so a plan either places them all or fails naming the VM
/// that fits nowhere and what stops it on each host: nothing moves on half a plan. No candidates is an empty plan;
/// candidates without hosts are [`PlanError::NoHosts`]. Entries of `input.fixed` that name no candidate are ignored.
pub fn plan(input: &Input) -> Result<Plan, PlanError> {
    if input.candidates.is_empty() {
        return Ok(Plan {
            order: input.order,
            steps: Vec::new(),
        });
    }
    if input.hosts.is_empty() {
        return Err(PlanError::NoHosts);
    }
    let placements = place(input)?;
    let steps = sequence(input.order, &input.candidates)
        .into_iter()
        .enumerate()
        .map(|(at, (i, why_position))| {
            step(at + 1, &input.candidates[i], &placements[i], why_position)
        })
        .collect();
    Ok(Plan {
        order: input.order,
        steps,
    })
}

/// Where one candidate goes, and why there.
struct Placement {
    to: String,
    why: String,
}

fn step(position: usize, c: &Candidate, p: &Placement, why_position: String) -> Step {
    Step {
        position,
        vm: c.name.clone(),
        from: c.from.clone(),
        to: p.to.clone(),
        classes: c.classes.clone(),
        vcpus: c.vcpus,
        memory_bytes: c.memory_bytes,
        predicted: c.predicted,
        prediction: c.prediction.clone(),
        why_host: p.why.clone(),
        why_position,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Placement (paper 001, 3.2)
// ---------------------------------------------------------------------------------------------------------------

/// A destination for every candidate, indexed like `input.candidates`. Fixed VMs are placed first, so a restore gets
/// its hosts back before anything else takes the room; then the others by decreasing memory, vCPUs and name
/// (first-fit decreasing: the big ones while there is the most choice).
fn place(input: &Input) -> Result<Vec<Placement>, PlanError> {
    let mut rooms: Vec<Room> = input.hosts.iter().map(Room::new).collect();
    // Sorted, so that the plan does not depend on the order the hosts were listed in.
    rooms.sort_by(|a, b| a.host.name.cmp(&b.host.name));
    let fixed = fixed_rooms(input, &rooms)?;
    let mut placed = Vec::with_capacity(input.candidates.len());
    for i in placement_order(&input.candidates, &fixed) {
        let c = &input.candidates[i];
        let (r, why) = match fixed[i] {
            Some(r) => (r, fixed_reason(&rooms[r], c)?),
            None => choose(&rooms, c)?,
        };
        rooms[r].take(c);
        let to = rooms[r].host.name.clone();
        placed.push((i, Placement { to, why }));
    }
    placed.sort_by_key(|(i, _)| *i);
    Ok(placed.into_iter().map(|(_, p)| p).collect())
}

/// For each candidate, the room of the host it is fixed to, if any. A fixed host that is not among the hosts fails
/// the plan before anything is placed.
fn fixed_rooms(input: &Input, rooms: &[Room]) -> Result<Vec<Option<usize>>, PlanError> {
    input
        .candidates
        .iter()
        .map(|c| {
            let Some(host) = input.fixed.get(&c.name) else {
                return Ok(None);
            };
            match rooms.iter().position(|r| &r.host.name == host) {
                Some(r) => Ok(Some(r)),
                None => Err(PlanError::UnknownFixedHost {
                    vm: c.name.clone(),
                    host: host.clone(),
                }),
            }
        })
        .collect()
}

/// The order candidates are placed in: fixed ones first, then decreasing memory, vCPUs, then name.
fn placement_order(candidates: &[Candidate], fixed: &[Option<usize>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&candidates[a], &candidates[b]);
        fixed[b]
            .is_some()
            .cmp(&fixed[a].is_some())
            .then(y.memory_bytes.cmp(&x.memory_bytes))
            .then(y.vcpus.cmp(&x.vcpus))
            .then(x.name.cmp(&y.name))
            .then(a.cmp(&b))
    });
    order
}

/// Why a fixed VM goes to its host, or NoRoom when the hard constraints do not hold there. A non-sharable class
/// is no refusal here: a restore puts back VMs that shared that host before the evacuation.
fn fixed_reason(room: &Room, c: &Candidate) -> Result<String, PlanError> {
    let why_not: Vec<Refusal> = room
        .refusals(c)
        .into_iter()
        .filter(|r| !matches!(r, Refusal::Shared { .. }))
        .collect();
    if why_not.is_empty() {
        return Ok(format!(
            "fixed: restored to the host it came from; {}",
            room.after(c)
        ));
    }
    let why = format!(
        "it must go back to {}; {}",
        room.host.name,
        host_refusals(room, &why_not)
    );
    Err(no_room(c, why))
}

/// The preferred room among those `c` fits in, and why there; NoRoom naming what stops it on each host when none.
fn choose(rooms: &[Room], c: &Candidate) -> Result<(usize, String), PlanError> {
    let resources = Resource::of(&c.classes);
    let fits: Vec<Fit> = rooms
        .iter()
        .enumerate()
        .filter(|(_, room)| room.admits(c, &resources))
        .map(|(r, room)| Fit::new(r, room, c))
        .collect();
    let Some(best) = fits.iter().min_by(|a, b| a.prefer(b)) else {
        // Every host refuses it; only now is it worth saying why, host by host.
        let refused: Vec<String> = rooms
            .iter()
            .map(|room| host_refusals(room, &room.refusals(c)))
            .collect();
        return Err(no_room(c, refused.join("; ")));
    };
    Ok((best.room, why_host(&rooms[best.room], c, fits.len())))
}

fn why_host(room: &Room, c: &Candidate, fitting: usize) -> String {
    let mates = room.group_mates(c);
    let after = room.after(c);
    if !mates.is_empty() {
        let groups: Vec<String> = mates
            .iter()
            .map(|(g, names)| format!("group {g} ({} there)", names.join(", ")))
            .collect();
        format!("with {}; {after}", groups.join(", "))
    } else if fitting == 1 {
        format!("the only host with room: {after}")
    } else {
        format!("most room: {after}")
    }
}

fn no_room(c: &Candidate, why: String) -> PlanError {
    PlanError::NoRoom {
        vm: c.name.clone(),
        vcpus: c.vcpus,
        memory: bytes(c.memory_bytes),
        why,
    }
}

/// "h2: 512.0 MiB free of memory, needs 1.0 GiB and anti-affinity with web1 there".
fn host_refusals(room: &Room, why_not: &[Refusal]) -> String {
    let why: Vec<String> = why_not.iter().map(ToString::to_string).collect();
    format!("{}: {}", room.host.name, why.join(" and "))
}

fn bytes(n: u64) -> String {
    // bytesize 1.3 spells kibibytes `kiB`; the IEC symbol is `KiB`.
    bytesize::ByteSize(n)
        .to_string_as(true)
        .replace("kiB", "KiB")
}

/// A host `c` fits in, with the figures the soft preferences compare.
struct Fit<'a> {
    room: usize,
    name: &'a str,
    /// VMs here (resident or planned) sharing a group with `c`.
    mates: usize,
    memory_after_bytes: u64,
    memory_bytes: u64,
    vcpus_after: u32,
}

impl<'a> Fit<'a> {
    fn new(room: usize, r: &Room<'a>, c: &Candidate) -> Self {
        Fit {
            room,
            name: &r.host.name,
            mates: r.mate_count(c),
            memory_after_bytes: r.free_memory_bytes - c.memory_bytes,
            memory_bytes: r.host.memory_bytes,
            vcpus_after: r.free_vcpus - c.vcpus,
        }
    }

    /// `Less` when `self` is the better host: most group mates, then the largest fraction of memory left, then the
    /// most vCPUs left, then the name.
    fn prefer(&self, other: &Fit) -> std::cmp::Ordering {
        // The fractions compared exactly, by cross-multiplying; a host without memory has none left.
        let mine = u128::from(self.memory_after_bytes) * u128::from(other.memory_bytes.max(1));
        let theirs = u128::from(other.memory_after_bytes) * u128::from(self.memory_bytes.max(1));
        other
            .mates
            .cmp(&self.mates)
            .then(theirs.cmp(&mine))
            .then(other.vcpus_after.cmp(&self.vcpus_after))
            .then(self.name.cmp(other.name))
    }
}

/// A VM on a host, resident or planned: what affinity and non-sharable classes look at.
struct Tenant<'a> {
    name: &'a str,
    groups: &'a [String],
    anti_affinity: &'a [String],
    /// Its non-sharable resources ([`Resource::of`] its classes), worked out once.
    resources: Vec<Resource>,
}

impl<'a> Tenant<'a> {
    fn new(
        name: &'a str,
        classes: &[Class],
        groups: &'a [String],
        anti_affinity: &'a [String],
    ) -> Self {
        Tenant {
            name,
            groups,
            anti_affinity,
            resources: Resource::of(classes),
        }
    }

    // The names are compared last: most VMs share no group and name no one, so most calls stop before that.
    fn shares_group(&self, c: &Candidate) -> bool {
        self.groups.iter().any(|g| c.groups.contains(g)) && self.name != c.name
    }

    /// Either names the other in its anti-affinity.
    fn repels(&self, c: &Candidate) -> bool {
        (c.anti_affinity.iter().any(|a| a == self.name) || self.anti_affinity.contains(&c.name))
            && self.name != c.name
    }
}

/// A host during planning: what is left of it, and who is on it.
struct Room<'a> {
    host: &'a HostRoom,
    free_vcpus: u32,
    free_memory_bytes: u64,
    tenants: Vec<Tenant<'a>>,
}

impl<'a> Room<'a> {
    fn new(host: &'a HostRoom) -> Self {
        let tenants = host
            .vms
            .iter()
            .map(|v| Tenant::new(&v.name, &v.classes, &v.groups, &v.anti_affinity))
            .collect();
        Room {
            host,
            free_vcpus: host.vcpus.saturating_sub(host.used_vcpus),
            free_memory_bytes: host.memory_bytes.saturating_sub(host.used_memory_bytes),
            tenants,
        }
    }

    /// Whether `c` fits here: [`Room::refusals`] would be empty. `resources` are `c`'s ([`Resource::of`]).
    fn admits(&self, c: &Candidate, resources: &[Resource]) -> bool {
        self.host.name != c.from
            && c.vcpus <= self.free_vcpus
            && c.memory_bytes <= self.free_memory_bytes
            && !self
                .tenants
                .iter()
                .any(|t| t.repels(c) || resources.iter().any(|r| t.resources.contains(r)))
    }

    /// Everything that stops `c` from coming here: none when it fits.
    fn refusals(&self, c: &Candidate) -> Vec<Refusal<'a>> {
        let mut why = Vec::new();
        if self.host.name == c.from {
            why.push(Refusal::RunsThere);
        }
        if c.vcpus > self.free_vcpus {
            why.push(Refusal::Vcpus {
                free: self.free_vcpus,
                of: self.host.vcpus,
                needs: c.vcpus,
            });
        }
        if c.memory_bytes > self.free_memory_bytes {
            why.push(Refusal::Memory {
                free: self.free_memory_bytes,
                needs: c.memory_bytes,
            });
        }
        let enemies = self.names_where(|t| t.repels(c));
        if !enemies.is_empty() {
            why.push(Refusal::AntiAffinity { with: enemies });
        }
        for resource in Resource::of(&c.classes) {
            let rivals = self.names_where(|t| t.resources.contains(&resource));
            if !rivals.is_empty() {
                why.push(Refusal::Shared {
                    resource,
                    with: rivals,
                });
            }
        }
        why
    }

    fn names_where(&self, keep: impl Fn(&Tenant) -> bool) -> Vec<&'a str> {
        self.tenants
            .iter()
            .filter(|t| keep(t))
            .map(|t| t.name)
            .collect()
    }

    fn mate_count(&self, c: &Candidate) -> usize {
        self.tenants.iter().filter(|t| t.shares_group(c)).count()
    }

    /// Per group of `c` (in its order), the members here.
    fn group_mates(&self, c: &Candidate) -> Vec<(&'a str, Vec<&'a str>)> {
        let mut mates: Vec<(&str, Vec<&str>)> = Vec::new();
        for t in self.tenants.iter().filter(|t| t.shares_group(c)) {
            for g in t.groups.iter().filter(|g| c.groups.contains(g)) {
                match mates.iter_mut().find(|(name, _)| name == g) {
                    Some((_, names)) => names.push(t.name),
                    None => mates.push((g, vec![t.name])),
                }
            }
        }
        mates.sort_by_key(|(g, _)| c.groups.iter().position(|x| x == g));
        mates
    }

    /// What is left once `c` is here: "3.0 GiB of 4.0 GiB free after, 3 of 4 vCPUs".
    fn after(&self, c: &Candidate) -> String {
        format!(
            "{} of {} free after, {} of {} vCPUs",
            bytes(self.free_memory_bytes.saturating_sub(c.memory_bytes)),
            bytes(self.host.memory_bytes),
            self.free_vcpus.saturating_sub(c.vcpus),
            self.host.vcpus
        )
    }

    /// Puts `c` here (it fits: [`Room::refusals`] said so).
    fn take(&mut self, c: &'a Candidate) {
        self.free_vcpus = self.free_vcpus.saturating_sub(c.vcpus);
        self.free_memory_bytes = self.free_memory_bytes.saturating_sub(c.memory_bytes);
        self.tenants.push(Tenant::new(
            &c.name,
            &c.classes,
            &c.groups,
            &c.anti_affinity,
        ));
    }
}

/// A resource two VMs on one host do not share well (paper 001, 3.2: two disk-bound VMs slow each other down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Resource {
    Disk,
    Network,
}

impl Resource {
    /// The non-sharable resources of a VM with these classes, each once.
    pub(super) fn of(classes: &[Class]) -> Vec<Resource> {
        let mut resources: Vec<Resource> = classes
            .iter()
            .filter_map(|c| match c {
                Class::DiskIo => Some(Resource::Disk),
                Class::Web | Class::NetReceive => Some(Resource::Network),
                Class::DirtyMemory | Class::Cpu | Class::Idle => None,
            })
            .collect();
        resources.sort();
        resources.dedup();
        resources
    }

    fn heavy(self) -> &'static str {
        match self {
            Resource::Disk => "disk-heavy",
            Resource::Network => "network-heavy",
        }
    }
}

/// One thing that stops a VM from going to a host.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Refusal<'a> {
    RunsThere,
    Vcpus {
        free: u32,
        of: u32,
        needs: u32,
    },
    Memory {
        free: u64,
        needs: u64,
    },
    AntiAffinity {
        with: Vec<&'a str>,
    },
    Shared {
        resource: Resource,
        with: Vec<&'a str>,
    },
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::RunsThere => f.write_str("the VM runs there now"),
            Refusal::Vcpus { free, of, needs } => {
                write!(f, "{free} of {of} vCPUs free, needs {needs}")
            }
            Refusal::Memory { free, needs } => {
                let (mut shown_free, mut shown_needs) = (bytes(*free), bytes(*needs));
                if shown_free == shown_needs {
                    // Rounded alike ("2.1 GiB free, needs 2.1 GiB"): the exact figures tell them apart.
                    (shown_free, shown_needs) = (format!("{free} B"), format!("{needs} B"));
                }
                write!(f, "{shown_free} free of memory, needs {shown_needs}")
            }
            Refusal::AntiAffinity { with } => {
                write!(f, "anti-affinity with {} there", with.join(", "))
            }
            Refusal::Shared { resource, with } => {
                write!(f, "a second {} VM ({})", resource.heavy(), with.join(", "))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Sequence (paper 001, 3.3 and 3.4)
// ---------------------------------------------------------------------------------------------------------------

/// Paper 001's informed tiers, in the order they move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// Dirty-memory and web VMs: left on the host, they slow the migrations beside and after them.
    First,
    /// CPU, disk-io, idle and unclassified VMs: their place does not slow the others.
    Middle,
    /// Net-receive VMs: moved, they load the destination's link and slow the migrations after them.
    Last,
}

impl Tier {
    /// Net-receive wins over the rest: a dirty-memory or web VM that also receives still goes last (paper 001, 3.4:
    /// "the VMs which have NET I/O(receive) workload need to be migrated at last").
    fn of(classes: &[Class]) -> Tier {
        if classes.contains(&Class::NetReceive) {
            Tier::Last
        } else if classes
            .iter()
            .any(|c| matches!(c, Class::DirtyMemory | Class::Web))
        {
            Tier::First
        } else {
            Tier::Middle
        }
    }

    fn rule(self) -> &'static str {
        match self {
            Tier::First => {
                "dirty-memory and web VMs go first (paper 001: they slow the migrations beside them)"
            }
            Tier::Middle => {
                "cpu, disk-io, idle and unclassified VMs go after them (paper 001: their place does not slow the \
                 others)"
            }
            Tier::Last => {
                "net-receive VMs go last, whatever else they are (paper 001: they load the destination's link and \
                 slow the migrations after them)"
            }
        }
    }
}

/// The candidates (by index) in the order they move, each with why there.
pub(super) fn sequence(order: Order, candidates: &[Candidate]) -> Vec<(usize, String)> {
    match order {
        Order::Fifo => fifo(candidates.len()),
        Order::Sjf => sjf(candidates),
        Order::Random { seed } => random(candidates.len(), seed),
        Order::Informed => informed(candidates),
    }
}

fn fifo(n: usize) -> Vec<(usize, String)> {
    (0..n)
        .map(|i| (i, format!("{}: listed {}", of(i, n), ordinal(i + 1))))
        .collect()
}

fn sjf(candidates: &[Candidate]) -> Vec<(usize, String)> {
    let n = candidates.len();
    sorted_by(candidates, |_| ())
        .into_iter()
        .enumerate()
        .map(|(at, i)| {
            let predicted = secs(candidates[i].predicted);
            let why = format!("{}: {} ({predicted})", of(at, n), shortest(at + 1));
            (i, why)
        })
        .collect()
}

/// A Fisher–Yates shuffle of the candidate order driven by xorshift seeded with `seed`: the same seed and the same
/// number of candidates give the same order.
fn random(n: usize, seed: u64) -> Vec<(usize, String)> {
    use rand::seq::SliceRandom as _;
    use rand::SeedableRng as _;

    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_xorshift::XorShiftRng::seed_from_u64(seed));
    order
        .into_iter()
        .enumerate()
        .map(|(at, i)| (i, format!("{}: random order, seed {seed}", of(at, n))))
        .collect()
}

/// Paper 001's informed order: the tiers in turn, shortest predicted first within each.
fn informed(candidates: &[Candidate]) -> Vec<(usize, String)> {
    let n = candidates.len();
    let mut out = Vec::with_capacity(n);
    let mut current: Option<(Tier, usize)> = None;
    for (at, i) in sorted_by(candidates, |c| Tier::of(&c.classes))
        .into_iter()
        .enumerate()
    {
        let c = &candidates[i];
        let tier = Tier::of(&c.classes);
        let rank = match current {
            Some((t, rank)) if t == tier => rank + 1,
            _ => 1,
        };
        current = Some((tier, rank));
        let why = format!(
            "{}: {}; {} of its tier ({})",
            of(at, n),
            tier.rule(),
            shortest(rank),
            secs(c.predicted)
        );
        out.push((i, why));
    }
    out
}

/// Candidate indices sorted by `key`, then shortest predicted, then the candidate order.
fn sorted_by<K: Ord>(candidates: &[Candidate], key: impl Fn(&Candidate) -> K) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| (key(&candidates[i]), candidates[i].predicted, i));
    order
}

/// "3 of 5" for the 0-based position `at`.
fn of(at: usize, n: usize) -> String {
    format!("{} of {n}", at + 1)
}

/// "shortest predicted", "second shortest predicted", …
fn shortest(rank: usize) -> String {
    if rank == 1 {
        "shortest predicted".to_owned()
    } else {
        format!("{} shortest predicted", ordinal(rank))
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// "first" … "tenth", then "11th", "21st", "22nd", "23rd", "111th".
fn ordinal(n: usize) -> String {
    const WORDS: [&str; 10] = [
        "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
        "tenth",
    ];
    if let Some(word) = n.checked_sub(1).and_then(|i| WORDS.get(i)) {
        return (*word).to_owned();
    }
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn vm(name: &str, vcpus: u32, memory_mib: u64) -> Candidate {
        Candidate {
            name: name.into(),
            from: "src".into(),
            vcpus,
            memory_bytes: memory_mib * MIB,
            classes: vec![],
            groups: vec![],
            anti_affinity: vec![],
            predicted: Duration::from_secs(10),
            prediction: "test".into(),
        }
    }

    fn host(name: &str, vcpus: u32, memory_mib: u64) -> HostRoom {
        HostRoom {
            name: name.into(),
            vcpus,
            memory_bytes: memory_mib * MIB,
            used_vcpus: 0,
            used_memory_bytes: 0,
            vms: vec![],
        }
    }

    fn resident(name: &str) -> Resident {
        Resident {
            name: name.into(),
            classes: vec![],
            groups: vec![],
            anti_affinity: vec![],
        }
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|&n| n.to_owned()).collect()
    }

    fn input(candidates: Vec<Candidate>, hosts: Vec<HostRoom>) -> Input {
        Input {
            candidates,
            hosts,
            order: Order::Fifo,
            fixed: BTreeMap::new(),
        }
    }

    fn fixed(mut i: Input, vm: &str, host: &str) -> Input {
        i.fixed.insert(vm.into(), host.into());
        i
    }

    /// What a placement row expects.
    enum Want {
        /// (vm, host, a piece of why_host)
        To(Vec<(&'static str, &'static str, &'static str)>),
        /// The VM that fits nowhere, and pieces of the reason.
        NoRoom(&'static str, Vec<&'static str>),
        UnknownFixedHost(&'static str, &'static str),
        NoHosts,
    }

    fn check(what: &str, input: &Input, want: &Want) {
        let got = plan(input);
        match (want, got) {
            (Want::To(to), Ok(p)) => {
                for (vm, host, why) in to {
                    let s = p.steps.iter().find(|s| s.vm == *vm).expect(what);
                    assert_eq!(s.to, *host, "{what}: {s:?}");
                    assert!(s.why_host.contains(why), "{what}: {:?}", s.why_host);
                }
            }
            (Want::NoRoom(vm, pieces), Err(PlanError::NoRoom { vm: got, why, .. })) => {
                assert_eq!(got, *vm, "{what}: {why}");
                for piece in pieces {
                    assert!(why.contains(piece), "{what}: {piece:?} not in {why:?}");
                }
            }
            (Want::UnknownFixedHost(vm, host), Err(e)) => {
                let want = PlanError::UnknownFixedHost {
                    vm: (*vm).into(),
                    host: (*host).into(),
                };
                assert_eq!(e, want, "{what}");
            }
            (Want::NoHosts, Err(e)) => assert_eq!(e, PlanError::NoHosts, "{what}"),
            (_, got) => panic!("{what}: unexpected {got:?}"),
        }
    }

    #[test]
    fn placement_table() {
        let classed = |mut c: Candidate, classes: &[Class]| {
            c.classes = classes.to_vec();
            c
        };
        let grouped = |mut c: Candidate, groups: &[&str]| {
            c.groups = strings(groups);
            c
        };
        let against = |mut c: Candidate, names: &[&str]| {
            c.anti_affinity = strings(names);
            c
        };
        let holding = |mut h: HostRoom, r: Resident| {
            h.vms.push(r);
            h
        };
        let used = |mut h: HostRoom, vcpus: u32, memory_mib: u64| {
            h.used_vcpus = vcpus;
            h.used_memory_bytes = memory_mib * MIB;
            h
        };
        let web1 = Resident {
            classes: vec![Class::Web],
            ..resident("web1")
        };
        let db1 = Resident {
            classes: vec![Class::DiskIo],
            ..resident("db1")
        };
        let shop = |name: &str| Resident {
            groups: strings(&["shop"]),
            ..resident(name)
        };
        let moved_from = |mut c: Candidate, from: &str| {
            c.from = from.into();
            c
        };
        #[rustfmt::skip]
        let table: Vec<(&str, Input, Want)> = vec![
            ("memory: a host too small is passed over",
                input(vec![vm("v1", 2, 1024)], vec![host("h1", 8, 512), host("h2", 8, 4096)]),
                Want::To(vec![("v1", "h2", "the only host with room: 3.0 GiB of 4.0 GiB free after, 6 of 8 vCPUs")])),
            ("vcpus: a host with too few is passed over",
                input(vec![vm("v1", 4, 1024)], vec![host("h1", 2, 65536), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "the only host with room")])),
            ("used room counts",
                input(vec![vm("v1", 2, 1024)], vec![used(host("h1", 8, 8192), 2, 7680), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "the only host with room")])),
            ("planned VMs take room",
                input(vec![vm("v1", 1, 3072), vm("v2", 1, 3072)], vec![host("h1", 8, 5120), host("h2", 8, 3072)]),
                Want::To(vec![("v1", "h1", "most room"), ("v2", "h2", "the only host with room")])),
            ("anti-affinity: the VM names a resident",
                input(vec![against(vm("v1", 1, 512), &["web1"])], vec![holding(host("h1", 8, 16384), web1.clone()), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "")])),
            ("anti-affinity: a resident names the VM",
                input(vec![vm("v1", 1, 512)], vec![holding(host("h1", 8, 16384), Resident { anti_affinity: strings(&["v1"]), ..resident("r1") }), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "")])),
            ("anti-affinity between two candidates",
                input(vec![vm("v1", 1, 2048), against(vm("v2", 1, 1024), &["v1"])], vec![host("h1", 8, 16384), host("h2", 8, 4096)]),
                Want::To(vec![("v1", "h1", "most room"), ("v2", "h2", "the only host with room")])),
            ("a disk-io pair is refused",
                input(vec![classed(vm("v1", 1, 512), &[Class::DiskIo])], vec![holding(host("h1", 8, 16384), db1.clone()), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "")])),
            ("two disk-io candidates go apart",
                input(vec![classed(vm("v1", 1, 512), &[Class::DiskIo]), classed(vm("v2", 1, 256), &[Class::DiskIo])], vec![host("h1", 8, 16384), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h1", ""), ("v2", "h2", "")])),
            ("web and net-receive do not share a host",
                input(vec![classed(vm("v1", 1, 512), &[Class::NetReceive])], vec![holding(host("h1", 8, 16384), web1.clone()), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h2", "")])),
            ("disk-io beside web is fine",
                input(vec![classed(vm("v1", 1, 512), &[Class::DiskIo])], vec![holding(host("h1", 8, 16384), web1.clone()), host("h2", 8, 2048)]),
                Want::To(vec![("v1", "h1", "most room")])),
            ("a group member is preferred to more room",
                input(vec![grouped(vm("v1", 1, 1024), &["shop"])], vec![holding(host("h1", 4, 4096), shop("db1")), host("h2", 64, 65536)]),
                Want::To(vec![("v1", "h1", "with group shop (db1 there); 3.0 GiB of 4.0 GiB free after, 3 of 4 vCPUs")])),
            ("the most group members win",
                input(vec![grouped(vm("v1", 1, 1024), &["shop"])],
                    vec![holding(host("h1", 8, 65536), shop("a")), holding(holding(host("h2", 8, 4096), shop("b")), shop("c"))]),
                Want::To(vec![("v1", "h2", "with group shop (b, c there)")])),
            ("candidates of a group end up together",
                input(vec![grouped(vm("big", 1, 2048), &["shop"]), grouped(vm("small", 1, 512), &["shop"])], vec![host("h1", 8, 8192), host("h2", 8, 8192)]),
                Want::To(vec![("big", "h1", "most room"), ("small", "h1", "with group shop (big there)")])),
            ("most room is a fraction of the host",
                input(vec![vm("v1", 1, 1024)], vec![used(host("h1", 8, 16384), 0, 12288), host("h2", 8, 4096)]),
                Want::To(vec![("v1", "h2", "most room: 3.0 GiB of 4.0 GiB free after")])),
            ("vcpus break a memory tie",
                input(vec![vm("v1", 1, 1024)], vec![host("h1", 4, 4096), host("h2", 8, 4096)]),
                Want::To(vec![("v1", "h2", "7 of 8 vCPUs")])),
            ("the name breaks a full tie",
                input(vec![vm("v1", 1, 1024)], vec![host("h2", 4, 4096), host("h1", 4, 4096)]),
                Want::To(vec![("v1", "h1", "most room")])),
            ("never back to the host it runs on",
                input(vec![moved_from(vm("v1", 1, 1024), "h1")], vec![host("h1", 64, 65536), host("h2", 4, 2048)]),
                Want::To(vec![("v1", "h2", "the only host with room")])),
            ("a fixed host is honoured over more room",
                fixed(input(vec![vm("v1", 1, 1024)], vec![host("h1", 4, 2048), host("h2", 64, 65536)]), "v1", "h1"),
                Want::To(vec![("v1", "h1", "fixed: restored to the host it came from; 1.0 GiB of 2.0 GiB free after")])),
            ("fixed VMs are placed first",
                fixed(input(vec![vm("big", 1, 3072), vm("back", 1, 2048)], vec![host("h1", 8, 4096), host("h2", 8, 3072)]), "back", "h1"),
                Want::To(vec![("back", "h1", "fixed"), ("big", "h2", "the only host with room")])),
            ("a full fixed host fails the plan",
                fixed(input(vec![vm("v1", 1, 1024)], vec![used(host("h1", 4, 2048), 0, 1536), host("h2", 64, 65536)]), "v1", "h1"),
                Want::NoRoom("v1", vec!["it must go back to h1; h1: 512.0 MiB free of memory, needs 1.0 GiB"])),
            ("a fixed host with an anti-affine VM fails the plan",
                fixed(input(vec![against(vm("v1", 1, 1024), &["web1"])], vec![holding(host("h1", 4, 8192), web1.clone())]), "v1", "h1"),
                Want::NoRoom("v1", vec!["h1: anti-affinity with web1 there"])),
            ("a fixed host takes back a second network-heavy VM: they shared it before",
                fixed(input(vec![Candidate { classes: vec![Class::NetReceive], ..vm("recv", 1, 1024) }],
                    vec![holding(host("h1", 4, 8192), web1.clone())]), "recv", "h1"),
                Want::To(vec![("recv", "h1", "fixed: restored to the host it came from")])),
            ("an unknown fixed host",
                fixed(input(vec![vm("v1", 1, 1024)], vec![host("h1", 4, 8192)]), "v1", "h9"),
                Want::UnknownFixedHost("v1", "h9")),
            ("a fixed entry for another VM is ignored",
                fixed(input(vec![vm("v1", 1, 1024)], vec![host("h1", 4, 8192)]), "other", "h9"),
                Want::To(vec![("v1", "h1", "")])),
            ("no hosts",
                input(vec![vm("v1", 1, 1024)], vec![]),
                Want::NoHosts),
            ("nowhere to go: every host says why",
                input(vec![moved_from(classed(against(vm("v1", 2, 2048), &["x"]), &[Class::Web]), "h4")], vec![
                    host("h1", 8, 1024),
                    holding(host("h2", 8, 8192), resident("x")),
                    holding(host("h3", 8, 8192), web1.clone()),
                    host("h4", 8, 8192),
                    host("h5", 1, 8192),
                    holding(host("h6", 8, 8192), Resident { classes: vec![Class::NetReceive], ..resident("rx") }),
                ]),
                Want::NoRoom("v1", vec![
                    "h1: 1.0 GiB free of memory, needs 2.0 GiB; ",
                    "h2: anti-affinity with x there; ",
                    "h3: a second network-heavy VM (web1); ",
                    "h4: the VM runs there now; ",
                    "h5: 1 of 1 vCPUs free, needs 2; ",
                    "h6: a second network-heavy VM (rx)",
                ])),
            ("all reasons of one host",
                input(vec![classed(against(vm("v1", 2, 2048), &["db1"]), &[Class::DiskIo])], vec![holding(host("h1", 1, 1024), db1.clone())]),
                Want::NoRoom("v1", vec![
                    "h1: 1 of 1 vCPUs free, needs 2 and 1.0 GiB free of memory, needs 2.0 GiB and anti-affinity with db1 there and a second disk-heavy VM (db1)",
                ])),
            ("memory rounded alike is shown exactly",
                input(vec![vm("v1", 1, 2049)], vec![host("h1", 8, 2048)]),
                Want::NoRoom("v1", vec!["h1: 2147483648 B free of memory, needs 2148532224 B"])),
            ("one VM that fits nowhere fails the whole plan",
                input(vec![vm("fits", 1, 512), vm("huge", 1, 65536)], vec![host("h1", 8, 4096)]),
                Want::NoRoom("huge", vec!["h1: 4.0 GiB free of memory, needs 64.0 GiB"])),
        ];
        for (what, input, want) in &table {
            check(what, input, want);
        }
    }

    #[test]
    fn no_room_names_the_vm_and_every_host() {
        let i = input(
            vec![vm("big", 2, 4096)],
            vec![host("h1", 8, 1024), host("h2", 8, 512)],
        );
        assert_eq!(
            plan(&i).unwrap_err().to_string(),
            "no room for VM big (2 vCPUs, 4.0 GiB): h1: 1.0 GiB free of memory, needs 4.0 GiB; h2: 512.0 MiB free \
             of memory, needs 4.0 GiB; nothing was moved"
        );
    }

    #[test]
    fn no_candidates_is_an_empty_plan() {
        let p = plan(&input(vec![], vec![])).unwrap();
        assert!(p.steps.is_empty());
    }

    /// Candidates for the order rows: (name, classes, predicted seconds).
    fn listed(vms: &[(&str, &[Class], f64)]) -> Vec<Candidate> {
        vms.iter()
            .map(|(name, classes, secs)| Candidate {
                classes: classes.to_vec(),
                predicted: Duration::from_secs_f64(*secs),
                ..vm(name, 1, 256)
            })
            .collect()
    }

    fn ordered(order: Order, candidates: Vec<Candidate>) -> Plan {
        let hosts = (0..candidates.len())
            .map(|i| host(&format!("h{i}"), 8, 8192))
            .collect();
        let i = Input {
            order,
            ..input(candidates, hosts)
        };
        plan(&i).unwrap()
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.steps.iter().map(|s| s.vm.as_str()).collect()
    }

    #[test]
    fn order_table() {
        use Class::*;
        let mixed = listed(&[
            ("cpu", &[Cpu], 5.0),
            ("dirty", &[DirtyMemory], 20.0),
            ("recv", &[NetReceive], 1.0),
            ("web", &[Web], 10.0),
            ("dirty-recv", &[DirtyMemory, NetReceive], 2.0),
            ("none", &[], 3.0),
            ("idle", &[Idle], 3.0),
            ("disk", &[DiskIo], 0.5),
        ]);
        #[rustfmt::skip]
        let table: Vec<(&str, Order, Vec<Candidate>, Vec<&str>)> = vec![
            ("informed: tiers, shortest first within each", Order::Informed, mixed.clone(),
                vec!["web", "dirty", "disk", "none", "idle", "cpu", "recv", "dirty-recv"]),
            ("informed: a dirty net-receive VM goes last", Order::Informed,
                listed(&[("dr", &[DirtyMemory, NetReceive], 0.1), ("c", &[Cpu], 9.0), ("d", &[DirtyMemory], 30.0)]),
                vec!["d", "c", "dr"]),
            ("informed: a web net-receive VM goes last", Order::Informed,
                listed(&[("wr", &[Web, NetReceive], 0.1), ("i", &[Idle], 9.0)]),
                vec!["i", "wr"]),
            ("informed: sjf within a tier, ties by listing", Order::Informed,
                listed(&[("a", &[Web], 9.0), ("b", &[DirtyMemory], 3.0), ("c", &[Web], 3.0), ("d", &[Web], 1.0)]),
                vec!["d", "b", "c", "a"]),
            ("fifo: as listed", Order::Fifo, mixed.clone(),
                vec!["cpu", "dirty", "recv", "web", "dirty-recv", "none", "idle", "disk"]),
            ("sjf: shortest first, ties by listing", Order::Sjf, mixed.clone(),
                vec!["disk", "recv", "dirty-recv", "none", "idle", "cpu", "web", "dirty"]),
        ];
        for (what, order, candidates, want) in table {
            let p = ordered(order, candidates);
            assert_eq!(names(&p), want, "{what}");
            let positions: Vec<usize> = p.steps.iter().map(|s| s.position).collect();
            assert_eq!(positions, (1..=want.len()).collect::<Vec<_>>(), "{what}");
        }
    }

    #[test]
    fn random_is_seeded() {
        let eight: Vec<Candidate> = (0..8).map(|i| vm(&format!("v{i}"), 1, 256)).collect();
        let once = ordered(Order::Random { seed: 7 }, eight.clone());
        let again = ordered(Order::Random { seed: 7 }, eight.clone());
        let other = ordered(Order::Random { seed: 8 }, eight.clone());
        assert_eq!(once, again);
        assert_ne!(names(&once), names(&other));
        let mut sorted = names(&once);
        sorted.sort_unstable();
        assert_eq!(sorted, ["v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7"]);
    }

    #[test]
    fn why_position_gives_the_rule_and_the_figures() {
        use Class::*;
        let five = || {
            listed(&[
                ("a", &[DirtyMemory], 12.3),
                ("b", &[Cpu], 4.1),
                ("c", &[NetReceive], 1.0),
                ("d", &[Web], 20.0),
                ("e", &[], 6.0),
            ])
        };
        let why = |p: &Plan, vm: &str| {
            p.steps
                .iter()
                .find(|s| s.vm == vm)
                .unwrap()
                .why_position
                .clone()
        };
        let informed = ordered(Order::Informed, five());
        assert_eq!(
            why(&informed, "a"),
            "1 of 5: dirty-memory and web VMs go first (paper 001: they slow the migrations beside them); \
             shortest predicted of its tier (12.3 s)"
        );
        assert_eq!(
            why(&informed, "e"),
            "4 of 5: cpu, disk-io, idle and unclassified VMs go after them (paper 001: their place does not slow \
             the others); second shortest predicted of its tier (6.0 s)"
        );
        assert!(
            why(&informed, "c").starts_with("5 of 5: net-receive VMs go last"),
            "{}",
            why(&informed, "c")
        );
        let fifo = ordered(Order::Fifo, five());
        assert_eq!(why(&fifo, "c"), "3 of 5: listed third");
        let sjf = ordered(Order::Sjf, five());
        assert_eq!(why(&sjf, "b"), "2 of 5: second shortest predicted (4.1 s)");
        let random = ordered(Order::Random { seed: 7 }, five());
        assert_eq!(random.steps[3].why_position, "4 of 5: random order, seed 7");
    }

    #[test]
    fn a_step_copies_the_candidate() {
        let c = Candidate {
            classes: vec![Class::Cpu],
            predicted: Duration::from_millis(4100),
            prediction: "4.1 s at 1 GiB/s".into(),
            ..vm("v1", 3, 1536)
        };
        let p = plan(&input(vec![c.clone()], vec![host("h1", 8, 8192)])).unwrap();
        let s = &p.steps[0];
        assert_eq!(
            (
                &s.vm,
                &s.from,
                s.to.as_str(),
                &s.classes,
                s.vcpus,
                s.memory_bytes
            ),
            (&c.name, &c.from, "h1", &c.classes, 3, 1536 * MIB)
        );
        assert_eq!((s.predicted, &s.prediction), (c.predicted, &c.prediction));
        assert_eq!(p.order, Order::Fifo);
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 10, 11, 12, 13, 21, 22, 23, 101, 111, 112]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            got,
            [
                "first", "second", "third", "tenth", "11th", "12th", "13th", "21st", "22nd",
                "23rd", "101st", "111th", "112th"
            ]
        );
    }
}

/// Property tests over generated inputs: every plan places each candidate once within every host's room and every
/// hard constraint, follows its order's rules, and is the same for the same input however the hosts are listed.
#[cfg(test)]
pub(crate) mod properties {
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;

    use super::*;

    const MIB: u64 = 1 << 20;
    const CLASSES: [Class; 6] = [
        Class::DirtyMemory,
        Class::Web,
        Class::NetReceive,
        Class::Cpu,
        Class::DiskIo,
        Class::Idle,
    ];
    const NAMES: [&str; 12] = [
        "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "r0", "r1", "r2", "r3",
    ];

    fn arb_classes() -> impl Strategy<Value = Vec<Class>> {
        // Mostly none or sharable classes, so that plans are often possible.
        let sharable = [Class::DirtyMemory, Class::Cpu, Class::Idle];
        let non_sharable = [Class::Web, Class::NetReceive, Class::DiskIo];
        prop_oneof![
            4 => Just(vec![]),
            4 => prop::sample::select(sharable.to_vec()).prop_map(|c| vec![c]),
            2 => prop::sample::select(non_sharable.to_vec()).prop_map(|c| vec![c]),
            1 => prop::sample::subsequence(CLASSES.to_vec(), 2),
        ]
    }

    fn arb_names(pool: &'static [&'static str], most: usize) -> impl Strategy<Value = Vec<String>> {
        prop::sample::subsequence(pool, 0..=most)
            .prop_map(|names| names.into_iter().map(str::to_owned).collect())
    }

    prop_compose! {
        fn arb_resident(i: usize)(
            classes in arb_classes(),
            groups in arb_names(&["g0", "g1"], 1),
            anti_affinity in prop_oneof![3 => Just(vec![]), 1 => arb_names(&NAMES, 1)],
        ) -> Resident {
            Resident { name: format!("r{i}"), classes, groups, anti_affinity }
        }
    }

    prop_compose! {
        fn arb_host(i: usize)(
            vcpus in 1u32..=32,
            memory_mib in 1024u64..=32768,
            used_pct in prop_oneof![Just(0u64), 0u64..=100],
            vms in (0usize..=2).prop_flat_map(move |k| (0..k).map(|j| arb_resident(i * 2 + j)).collect::<Vec<_>>()),
        ) -> HostRoom {
            HostRoom {
                name: format!("h{i}"),
                vcpus,
                memory_bytes: memory_mib * MIB,
                used_vcpus: (u64::from(vcpus) * used_pct / 100) as u32,
                used_memory_bytes: memory_mib * MIB * used_pct / 100,
                vms,
            }
        }
    }

    prop_compose! {
        fn arb_candidate(i: usize)(
            vcpus in 1u32..=4,
            memory_mib in 128u64..=3072,
            classes in arb_classes(),
            groups in arb_names(&["g0", "g1"], 2),
            anti_affinity in prop_oneof![3 => Just(vec![]), 1 => arb_names(&NAMES, 2)],
            predicted_ms in prop_oneof![Just(1000u64), 0u64..=60_000],
            from in prop_oneof![4 => Just("src".to_owned()), 1 => (0usize..5).prop_map(|h| format!("h{h}"))],
        ) -> Candidate {
            Candidate {
                name: format!("v{i}"),
                from,
                vcpus,
                memory_bytes: memory_mib * MIB,
                classes,
                groups,
                anti_affinity,
                predicted: Duration::from_millis(predicted_ms),
                prediction: String::new(),
            }
        }
    }

    fn arb_order() -> impl Strategy<Value = Order> {
        prop_oneof![
            Just(Order::Informed),
            Just(Order::Fifo),
            Just(Order::Sjf),
            any::<u64>().prop_map(|seed| Order::Random { seed }),
        ]
    }

    pub(crate) fn arb_input() -> impl Strategy<Value = Input> {
        (1usize..=5, 0usize..=8)
            .prop_flat_map(|(nh, nc)| {
                let hosts: Vec<_> = (0..nh).map(arb_host).collect();
                let candidates: Vec<_> = (0..nc).map(arb_candidate).collect();
                // Now and then a VM is fixed to a host, one past the last being unknown.
                let fixed = prop::collection::vec(prop::option::weighted(0.1, 0..=nh), nc);
                (hosts, candidates, fixed, arb_order())
            })
            .prop_map(|(hosts, candidates, fixed, order)| {
                let fixed = candidates
                    .iter()
                    .zip(fixed)
                    .filter_map(|(c, h)| Some((c.name.clone(), format!("h{}", h?))))
                    .collect();
                Input {
                    candidates,
                    hosts,
                    order,
                    fixed,
                }
            })
    }

    /// The non-sharable resources as the brief states them, written apart from [`Resource::of`] so the property
    /// checks the rule rather than the code.
    fn resources(classes: &[Class]) -> Vec<&'static str> {
        let mut r: Vec<&str> = classes
            .iter()
            .filter_map(|c| match c {
                Class::DiskIo => Some("disk"),
                Class::Web | Class::NetReceive => Some("network"),
                _ => None,
            })
            .collect();
        r.dedup();
        r
    }

    /// Paper 001's tiers as numbers, apart from [`Tier::of`]: net-receive last, dirty-memory and web first.
    fn tier(classes: &[Class]) -> u8 {
        if classes.contains(&Class::NetReceive) {
            3
        } else if classes.contains(&Class::DirtyMemory) || classes.contains(&Class::Web) {
            1
        } else {
            2
        }
    }

    /// (a) and the fixed hosts: each candidate exactly once, positions 1..n, never back where it runs.
    fn check_steps(input: &Input, p: &Plan) -> Result<(), TestCaseError> {
        let mut got: Vec<&str> = p.steps.iter().map(|s| s.vm.as_str()).collect();
        let mut want: Vec<&str> = input.candidates.iter().map(|c| c.name.as_str()).collect();
        got.sort_unstable();
        want.sort_unstable();
        prop_assert_eq!(got, want);
        for (at, s) in p.steps.iter().enumerate() {
            prop_assert_eq!(s.position, at + 1);
            prop_assert_ne!(&s.to, &s.from);
            if let Some(host) = input.fixed.get(&s.vm) {
                prop_assert_eq!(&s.to, host);
            }
        }
        Ok(())
    }

    /// (b) Room and hard constraints, host by host: residents plus planned VMs.
    fn check_hosts(input: &Input, p: &Plan) -> Result<(), TestCaseError> {
        for h in &input.hosts {
            let planned: Vec<&Candidate> = p
                .steps
                .iter()
                .filter(|s| s.to == h.name)
                .map(|s| input.candidates.iter().find(|c| c.name == s.vm).unwrap())
                .collect();
            let vcpus: u32 = planned.iter().map(|c| c.vcpus).sum();
            let memory: u64 = planned.iter().map(|c| c.memory_bytes).sum();
            prop_assert!(h.used_vcpus + vcpus <= h.vcpus, "{} vCPUs exceeded", h.name);
            prop_assert!(
                h.used_memory_bytes + memory <= h.memory_bytes,
                "{} memory exceeded",
                h.name
            );
            let residents = h
                .vms
                .iter()
                .map(|r| (&r.name, &r.classes, &r.anti_affinity));
            let all: Vec<_> = planned
                .iter()
                .map(|c| (&c.name, &c.classes, &c.anti_affinity))
                .chain(residents)
                .collect();
            // Each planned VM against every other VM there (planned ones come first in `all`).
            for (a, x) in all.iter().enumerate().take(planned.len()) {
                for y in all.iter().skip(a + 1) {
                    prop_assert!(
                        !x.2.contains(y.0) && !y.2.contains(x.0),
                        "anti-affinity {} {} on {}",
                        x.0,
                        y.0,
                        h.name
                    );
                    let shared = resources(x.1)
                        .into_iter()
                        .any(|r| resources(y.1).contains(&r));
                    // A restore (fixed host) puts back VMs that shared their host before.
                    let restored = input.fixed.contains_key(x.0) || input.fixed.contains_key(y.0);
                    prop_assert!(
                        !shared || restored,
                        "{} and {} share a resource on {}",
                        x.0,
                        y.0,
                        h.name
                    );
                }
            }
        }
        Ok(())
    }

    /// (c) The rules of each order.
    fn check_order(input: &Input, p: &Plan) -> Result<(), TestCaseError> {
        let index = |vm: &str| input.candidates.iter().position(|c| c.name == vm).unwrap();
        let indices: Vec<usize> = p.steps.iter().map(|s| index(&s.vm)).collect();
        for pair in p.steps.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            match input.order {
                Order::Informed => {
                    let (ta, tb) = (tier(&a.classes), tier(&b.classes));
                    prop_assert!(ta <= tb, "tiers {ta:?} then {tb:?}");
                    prop_assert!(
                        ta < tb || a.predicted <= b.predicted,
                        "{} before {}",
                        a.vm,
                        b.vm
                    );
                }
                Order::Sjf => prop_assert!(a.predicted <= b.predicted, "{} before {}", a.vm, b.vm),
                Order::Fifo | Order::Random { .. } => {}
            }
        }
        if input.order == Order::Fifo {
            prop_assert_eq!(indices, (0..input.candidates.len()).collect::<Vec<_>>());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
            ..ProptestConfig::default()
        })]

        #[test]
        fn an_ok_plan_keeps_every_rule(input in arb_input()) {
            if let Ok(p) = plan(&input) {
                check_steps(&input, &p)?;
                check_hosts(&input, &p)?;
                check_order(&input, &p)?;
            }
        }

        #[test]
        fn the_same_input_gives_the_same_plan(input in arb_input()) {
            let once = plan(&input);
            prop_assert_eq!(&once, &plan(&input));
            let mut reordered = input.clone();
            reordered.hosts.reverse();
            prop_assert_eq!(&once, &plan(&reordered));
        }

        #[test]
        fn too_little_memory_fails(input in arb_input()) {
            let free: u64 = input.hosts.iter().map(|h| h.memory_bytes - h.used_memory_bytes).sum();
            let needed: u64 = input.candidates.iter().map(|c| c.memory_bytes).sum();
            if free < needed {
                prop_assert!(plan(&input).is_err());
            }
        }

        #[test]
        fn no_room_says_why_on_every_host(input in arb_input()) {
            if let Err(PlanError::NoRoom { vm, why, .. }) = plan(&input) {
                if !input.fixed.contains_key(&vm) {
                    for h in &input.hosts {
                        prop_assert!(why.contains(&format!("{}: ", h.name)), "{} missing from {}", h.name, why);
                    }
                }
            }
        }

        #[test]
        fn roomy_hosts_without_constraints_take_everyone(input in arb_input()) {
            let mut input = input;
            input.fixed.clear();
            for c in &mut input.candidates {
                c.classes.clear();
                c.anti_affinity.clear();
                c.from = "src".into();
            }
            for h in &mut input.hosts {
                h.vms.clear();
                (h.used_vcpus, h.used_memory_bytes) = (0, 0);
                (h.vcpus, h.memory_bytes) = (32, 32 * 4096 * MIB);
            }
            prop_assert_eq!(plan(&input).is_ok(), !input.hosts.is_empty() || input.candidates.is_empty());
        }
    }
}
