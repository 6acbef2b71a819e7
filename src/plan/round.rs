//! The round shared by the hotspot-driven policies (idc and sandpiper, paper 004): each hotspot, worst first, gets
//! at most one decision — a balloon step when memory is short, else a migration — planned against the figures the
//! earlier decisions of the round leave, so two moves cannot claim the same free room. What sets the policies apart
//! plugs in through [`Chooser`]: which VM of a hotspot moves first, which host with room takes it, and the reason.
//! Pure: figures in, decisions with reasons out.

use std::cmp::Ordering;

use super::hotspot::{self, Assessment};
use super::index::{Index, Names};
use super::model;
use super::scenario::Scenario;
use super::{Decision, RoundPlan};

/// The figures of a round as its decisions so far leave them, with their look-ups.
pub(crate) struct Work {
    pub s: Scenario,
    pub ix: Index,
    /// Whether each host is a hotspot by its current figures: a hotspot takes no VM.
    pub hot: Vec<bool>,
}

impl Work {
    fn new(s: &Scenario, names: &Names) -> Self {
        Work {
            s: s.clone(),
            ix: Index::new(s, names),
            hot: s
                .hosts
                .iter()
                .map(|h| Assessment::of(h, &s.tuning).is_hotspot())
                .collect(),
        }
    }

    /// Applies a migration of VM `vm` to host `to` ([`model::migrate`]).
    fn migrate(&mut self, vm: usize, to: usize) {
        let Some(from) = self.ix.host_of(vm).filter(|&from| from != to) else {
            return;
        };
        model::migrate_at(&mut self.s, vm, from, to, &model::peer_flows(&self.ix, vm));
        self.ix.moved(vm, self.s.vms[vm].memory_mib, to);
        // Only the source's and the destination's figures change (see `model::Leaving`), so only they can change
        // their verdict.
        for h in [from, to] {
            self.hot[h] = Assessment::of(&self.s.hosts[h], &self.s.tuning).is_hotspot();
        }
    }

    /// Applies a balloon change of VM `vm` to `to_mib` ([`model::balloon`]); host figures do not change.
    fn balloon(&mut self, vm: usize, to_mib: u64) {
        let from_mib = self.s.vms[vm].memory_mib;
        self.s.vms[vm].memory_mib = to_mib;
        self.ix.resized(vm, from_mib, to_mib);
    }
}

/// What one hotspot-driven policy decides for itself.
pub(crate) trait Chooser {
    /// The figures a VM is ranked by, and its reason quotes.
    type Score;

    /// The figures of VM `vm` on hotspot `a`.
    fn score(&self, w: &Work, a: &Assessment, vm: usize) -> Self::Score;

    /// `Less` when VM `x` should move before VM `y`; a total order (ties broken by name).
    fn rank(&self, w: &Work, x: (usize, &Self::Score), y: (usize, &Self::Score)) -> Ordering;

    /// The preferred host among `dests` (hosts with room for `vm`, in scenario order, never empty).
    fn destination(&self, w: &Work, vm: usize, score: &Self::Score, dests: &[usize]) -> usize;

    /// The migration of `vm` from hotspot `a` to `to`, with its reason. `skipped` are the VMs ranked higher for
    /// which no host had room.
    fn decide(&self, m: &Move<'_, Self::Score>) -> Decision;
}

/// A migration a [`Chooser`] explains.
pub(crate) struct Move<'a, S> {
    pub w: &'a Work,
    pub hotspot: &'a Assessment,
    pub vm: usize,
    pub score: &'a S,
    pub to: usize,
    pub skipped: &'a [&'a str],
}

/// One round of a hotspot-driven policy.
pub(crate) fn plan<C: Chooser>(s: &Scenario, chooser: &C) -> RoundPlan {
    let mut out = RoundPlan::default();
    let hot = hotspot::hotspots(s);
    if hot.is_empty() {
        out.notes.push(no_hotspot_note(s));
        return out;
    }
    let names = Names::new(s);
    let mut w = Work::new(s, &names);
    for a in &hot {
        let host = names.host(&a.host).expect("hotspot in scenario");
        // Paper 004: memory first, because relieving swapping can also relieve the CPU.
        if a.swap.over() {
            match hotspot::balloon_step(&w, host, a) {
                Ok((d, vm, to_mib)) => {
                    w.balloon(vm, to_mib);
                    out.decisions.push(d);
                    continue;
                }
                Err(why) => out
                    .notes
                    .push(format!("{}: {why}; migrating instead", a.host)),
            }
        }
        match migration(&w, host, a, chooser) {
            Ok((d, vm, to)) => {
                w.migrate(vm, to);
                out.decisions.push(d);
            }
            Err(why) => out.notes.push(why),
        }
    }
    out
}

pub(crate) fn no_hotspot_note(s: &Scenario) -> String {
    let t = &s.tuning;
    format!(
        "no hotspot: no host has both its current and predicted figures over {}% CPU, {} swap writes/s or {}% NIC",
        t.cpu_threshold_pct, t.swap_threshold_writes_per_s, t.nic_threshold_pct
    )
}

/// The migration off hotspot `a` (at position `host`): the VMs in the chooser's order, the first with a host with
/// room moves to the chooser's host. Returns the decision with the VM's and the destination's positions.
fn migration<C: Chooser>(
    w: &Work,
    host: usize,
    a: &Assessment,
    chooser: &C,
) -> Result<(Decision, usize, usize), String> {
    let mut ranked: Vec<(usize, C::Score)> =
        w.ix.on_host(host)
            .iter()
            .map(|&vm| (vm, chooser.score(w, a, vm)))
            .collect();
    if ranked.is_empty() {
        return Err(format!(
            "{} is a hotspot ({}) but has no VM to move",
            a.host,
            a.describe()
        ));
    }
    ranked.sort_by(|x, y| chooser.rank(w, (x.0, &x.1), (y.0, &y.1)));
    let mut skipped = Vec::new();
    for (vm, score) in &ranked {
        let dests = hotspot::destinations(w, *vm);
        if dests.is_empty() {
            skipped.push(w.s.vms[*vm].name.as_str());
            continue;
        }
        let to = chooser.destination(w, *vm, score, &dests);
        let d = chooser.decide(&Move {
            w,
            hotspot: a,
            vm: *vm,
            score,
            to,
            skipped: &skipped,
        });
        return Ok((d, *vm, to));
    }
    Err(format!(
        "{} is a hotspot ({}) but no other host has room for any of its VMs",
        a.host,
        a.describe()
    ))
}
