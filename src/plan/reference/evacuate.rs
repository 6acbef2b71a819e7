//! Reference copy of the evacuation planner as it was before the scale work (issue 11): the placement and sequence
//! logic verbatim; the data types, the refusals, the resources and the sequencing (which the scale work did not
//! change) imported from [`crate::plan::evacuate`]. Test-only: the
//! property test in `crate::plan::reference` compares the planner with it.

use crate::classify::Class;
use crate::plan::evacuate::{
    sequence, Candidate, HostRoom, Input, Plan, PlanError, Refusal, Resource, Step,
};

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
    let mut fits = Vec::new();
    let mut refused = Vec::new();
    for (r, room) in rooms.iter().enumerate() {
        let why_not = room.refusals(c);
        if why_not.is_empty() {
            fits.push(Fit::new(r, room, c));
        } else {
            refused.push(host_refusals(room, &why_not));
        }
    }
    let Some(best) = fits.iter().min_by(|a, b| a.prefer(b)) else {
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
    classes: &'a [Class],
    groups: &'a [String],
    anti_affinity: &'a [String],
}

impl Tenant<'_> {
    fn shares_group(&self, c: &Candidate) -> bool {
        self.name != c.name && self.groups.iter().any(|g| c.groups.contains(g))
    }

    /// Either names the other in its anti-affinity.
    fn repels(&self, c: &Candidate) -> bool {
        self.name != c.name
            && (c.anti_affinity.iter().any(|a| a == self.name)
                || self.anti_affinity.contains(&c.name))
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
            .map(|v| Tenant {
                name: &v.name,
                classes: &v.classes,
                groups: &v.groups,
                anti_affinity: &v.anti_affinity,
            })
            .collect();
        Room {
            host,
            free_vcpus: host.vcpus.saturating_sub(host.used_vcpus),
            free_memory_bytes: host.memory_bytes.saturating_sub(host.used_memory_bytes),
            tenants,
        }
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
            let rivals = self.names_where(|t| Resource::of(t.classes).contains(&resource));
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
        self.tenants.push(Tenant {
            name: &c.name,
            classes: &c.classes,
            groups: &c.groups,
            anti_affinity: &c.anti_affinity,
        });
    }
}
