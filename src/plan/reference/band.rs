//! REFERENCE COPY, test-only: src/plan/band.rs as it was before the scale work (issue 11), verbatim but for this
//! line and its unit tests. See [`super`]; do not optimise.
//!
//! Paper 000's `band` policy: hosts are light, moderate or heavy against a band around the mean CPU utilisation,
//! and a VM moves from a heavy host to a light one. Pure: figures in, decisions with reasons out.
//!
//! - threshold = mean host CPU utilisation;
//! - half-width = max(|threshold − (max + min) / 2|, 10 points), so the moderate band is at least 20 points wide;
//! - light < threshold − half-width ≤ moderate ≤ threshold + half-width < heavy;
//! - migration vector = threshold − the light host's utilisation (what the light host should gain);
//! - the VM on the heavy host whose CPU share on the light host is closest to the vector moves there.
//!
//! Several heavy or light hosts: the heaviest host is paired with the lightest, the second heaviest with the second
//! lightest, and so on; each pair gives at most one migration per round, so no host is in two moves before its
//! figures are measured again. Unpaired hosts wait for a later round. A heavy host with no light host (or the
//! reverse) gives no move: moving onto a moderate host could push it out of the band, and the paper only moves from
//! heavy to light.

use super::model;
use super::scenario::{Scenario, Vm};
use super::{fig, Decision, RoundPlan};

/// Half of the narrowest moderate band, in CPU points (paper 000: "20 percent width").
pub const MIN_HALF_WIDTH_PCT: f64 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    Light,
    Moderate,
    Heavy,
}

/// The threshold and moderate band of a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bands {
    pub threshold: f64,
    pub low: f64,
    pub high: f64,
}

impl Bands {
    /// Computes the bands from host utilisations; `None` without hosts.
    pub fn of(utilisations: &[f64]) -> Option<Bands> {
        if utilisations.is_empty() {
            return None;
        }
        // Summed in sorted order so that the threshold does not depend on the order hosts are listed in.
        let mut sorted = utilisations.to_vec();
        sorted.sort_by(f64::total_cmp);
        #[allow(clippy::cast_precision_loss)] // a cluster has far fewer than 2^52 hosts
        let threshold = sorted.iter().sum::<f64>() / sorted.len() as f64;
        let max = utilisations
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let min = utilisations.iter().copied().fold(f64::INFINITY, f64::min);
        let half = (threshold - (max + min) / 2.0)
            .abs()
            .max(MIN_HALF_WIDTH_PCT);
        Some(Bands {
            threshold,
            low: threshold - half,
            high: threshold + half,
        })
    }

    pub fn classify(&self, utilisation: f64) -> Band {
        if utilisation < self.low {
            Band::Light
        } else if utilisation > self.high {
            Band::Heavy
        } else {
            Band::Moderate
        }
    }
}

/// Room for the band policy is physical capacity only (it has no thresholds): after the move the light host stays
/// within 100 % CPU and NIC and its memory fits, and no other host is pushed past capacity.
fn fits(s: &Scenario, vm: &str, to: &str) -> bool {
    let p = model::project(s, vm, to);
    model::within_capacity(&p, to) && model::newly_over_capacity(s, &p).is_none()
}

/// The CPU points `vm` would add to `to` (scaled when the hosts have different CPU counts).
fn share_on(s: &Scenario, vm: &Vm, to: &str) -> f64 {
    let from = s.host(&vm.host).map_or(1, |h| h.cpus);
    let to = s.host(to).map_or(1, |h| h.cpus);
    vm.cpu_pct * f64::from(from) / f64::from(to)
}

/// One round of the band policy.
pub fn plan(s: &Scenario) -> RoundPlan {
    let mut out = RoundPlan::default();
    let utils: Vec<f64> = s.hosts.iter().map(|h| h.cpu_pct).collect();
    let Some(bands) = Bands::of(&utils) else {
        return out;
    };
    let classes: Vec<String> = s
        .hosts
        .iter()
        .map(|h| {
            format!(
                "{} {:.2}% {}",
                h.name,
                h.cpu_pct,
                name(bands.classify(h.cpu_pct))
            )
        })
        .collect();
    out.notes.push(format!(
        "threshold {:.2}%, moderate band {:.2}%..{:.2}%: {}",
        bands.threshold,
        bands.low,
        bands.high,
        classes.join(", ")
    ));

    let mut heavy: Vec<_> = s
        .hosts
        .iter()
        .filter(|h| bands.classify(h.cpu_pct) == Band::Heavy)
        .collect();
    let mut light: Vec<_> = s
        .hosts
        .iter()
        .filter(|h| bands.classify(h.cpu_pct) == Band::Light)
        .collect();
    heavy.sort_by(|a, b| {
        b.cpu_pct
            .total_cmp(&a.cpu_pct)
            .then_with(|| a.name.cmp(&b.name))
    });
    light.sort_by(|a, b| {
        a.cpu_pct
            .total_cmp(&b.cpu_pct)
            .then_with(|| a.name.cmp(&b.name))
    });
    match (heavy.is_empty(), light.is_empty()) {
        (true, true) => out
            .notes
            .push("every host is moderate: nothing to move".into()),
        (false, true) => out.notes.push(format!(
            "{} heavy but no host is light: nothing to move",
            heavy
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (true, false) => out.notes.push(format!(
            "{} light but no host is heavy: nothing to move",
            light
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (false, false) => {}
    }

    for (h, l) in heavy.iter().zip(&light) {
        let vector = bands.threshold - l.cpu_pct;
        let mut candidates: Vec<(&Vm, f64)> = s
            .vms_on(&h.name)
            .map(|v| (v, share_on(s, v, &l.name)))
            .collect();
        candidates.sort_by(|(a, sa), (b, sb)| {
            (sa - vector)
                .abs()
                .total_cmp(&(sb - vector).abs())
                .then_with(|| sa.total_cmp(sb))
                .then_with(|| a.name.cmp(&b.name))
        });
        let Some((vm, share)) = candidates
            .into_iter()
            .find(|(v, _)| fits(s, &v.name, &l.name))
        else {
            out.notes.push(format!(
                "{} is heavy but none of its VMs fits on {}",
                h.name, l.name
            ));
            continue;
        };
        out.decisions.push(Decision::Migrate {
            vm: vm.name.clone(),
            from: h.name.clone(),
            to: l.name.clone(),
            reason: format!(
                "{} is heavy ({:.2}% > {:.2}%) and {} is light ({:.2}% < {:.2}%); migration vector {:.2} - {:.2} = \
                 {:.2}; {} uses {:.2}%, the closest to the vector",
                h.name, h.cpu_pct, bands.high, l.name, l.cpu_pct, bands.low, bands.threshold, l.cpu_pct, vector,
                vm.name, share
            ),
            figures: vec![
                fig("threshold_pct", bands.threshold),
                fig("band_low_pct", bands.low),
                fig("band_high_pct", bands.high),
                fig("source_cpu_pct", h.cpu_pct),
                fig("destination_cpu_pct", l.cpu_pct),
                fig("vector_pct", vector),
                fig("vm_cpu_pct", share),
            ],
        });
    }
    out
}

fn name(b: Band) -> &'static str {
    match b {
        Band::Light => "light",
        Band::Moderate => "moderate",
        Band::Heavy => "heavy",
    }
}
