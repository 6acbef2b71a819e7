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

use super::index::{Index, Names};
use super::model::Leaving;
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

/// Room for the band policy is physical capacity only (it has no thresholds): after VM `vm` moves to host `to` the
/// light host stays within 100 % CPU and NIC and its memory fits, and no other host is pushed past capacity.
fn fits(s: &Scenario, ix: &Index, vm: usize, to: usize) -> bool {
    let leaving = Leaving::new(s, ix, vm);
    let after = leaving.arriving(s, ix, to);
    after.within(&s.hosts[to]) && !leaving.pushes_past_capacity(s, ix, to, after)
}

/// The CPU points VM `vm` would add to host `to` (scaled when the hosts have different CPU counts).
fn share_on(s: &Scenario, ix: &Index, vm: usize, to: usize) -> f64 {
    let from = ix.host_of(vm).map_or(1, |h| s.hosts[h].cpus);
    s.vms[vm].cpu_pct * f64::from(from) / f64::from(s.hosts[to].cpus)
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

    // Host positions, so that the VMs of a host and the room on another are look-ups, not scans.
    let of_band = |band: Band| -> Vec<usize> {
        (0..s.hosts.len())
            .filter(|&h| bands.classify(s.hosts[h].cpu_pct) == band)
            .collect()
    };
    let mut heavy = of_band(Band::Heavy);
    let mut light = of_band(Band::Light);
    heavy.sort_by(|&a, &b| {
        let (a, b) = (&s.hosts[a], &s.hosts[b]);
        b.cpu_pct
            .total_cmp(&a.cpu_pct)
            .then_with(|| a.name.cmp(&b.name))
    });
    light.sort_by(|&a, &b| {
        let (a, b) = (&s.hosts[a], &s.hosts[b]);
        a.cpu_pct
            .total_cmp(&b.cpu_pct)
            .then_with(|| a.name.cmp(&b.name))
    });
    let names = |hosts: &[usize]| -> String {
        hosts
            .iter()
            .map(|&h| s.hosts[h].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (heavy.is_empty(), light.is_empty()) {
        (true, true) => out
            .notes
            .push("every host is moderate: nothing to move".into()),
        (false, true) => out.notes.push(format!(
            "{} heavy but no host is light: nothing to move",
            names(&heavy)
        )),
        (true, false) => out.notes.push(format!(
            "{} light but no host is heavy: nothing to move",
            names(&light)
        )),
        (false, false) => {}
    }
    if heavy.is_empty() || light.is_empty() {
        return out;
    }

    let ix = Index::new(s, &Names::new(s));
    for (&hi, &li) in heavy.iter().zip(&light) {
        let (h, l) = (&s.hosts[hi], &s.hosts[li]);
        let vector = bands.threshold - l.cpu_pct;
        let mut candidates: Vec<(usize, &Vm, f64)> = ix
            .on_host(hi)
            .iter()
            .map(|&v| (v, &s.vms[v], share_on(s, &ix, v, li)))
            .collect();
        candidates.sort_by(|(_, a, sa), (_, b, sb)| {
            (sa - vector)
                .abs()
                .total_cmp(&(sb - vector).abs())
                .then_with(|| sa.total_cmp(sb))
                .then_with(|| a.name.cmp(&b.name))
        });
        let Some((_, vm, share)) = candidates
            .into_iter()
            .find(|&(v, _, _)| fits(s, &ix, v, li))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::scenario::{History, Host, Tuning};

    fn host(name: &str, cpu: f64) -> Host {
        Host {
            name: name.into(),
            cpus: 4,
            memory_mib: 3072,
            nic_mbps: 1000.0,
            cpu_pct: cpu,
            swap_writes_per_s: 0.0,
            nic_pct: 0.0,
            memory_reserved_mib: 0,
            history: History::default(),
        }
    }

    fn vm(name: &str, host: &str, cpu: f64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            cpu_pct: cpu,
            memory_mib: 512,
            memory_pct: 50.0,
            nic_mbps: 0.0,
            swap_writes_per_s: 0.0,
            memory_max_mib: None,
        }
    }

    fn cluster(hosts: &[(&str, f64)], vms: &[(&str, &str, f64)]) -> Scenario {
        Scenario {
            description: None,
            hosts: hosts.iter().map(|(n, c)| host(n, *c)).collect(),
            vms: vms.iter().map(|(n, h, c)| vm(n, h, *c)).collect(),
            traffic: vec![],
            tuning: Tuning::default(),
        }
    }

    #[test]
    fn bands_from_paper_000() {
        // (utilisations, threshold, low, high)
        let cases: &[(&[f64], f64, f64, f64)] = &[
            // Table 1: mean 43.64, mid-range 42.26, so the 10-point minimum applies
            (&[46.40, 21.09, 63.42], 43.636_666, 33.636_666, 53.636_666),
            // Table 4: all moderate
            (&[44.17, 39.73, 42.39], 42.096_666, 32.096_666, 52.096_666),
            // one outlier: |mean − mid-range| exceeds 10 and widens the band
            (&[0.0, 0.0, 0.0, 100.0], 25.0, 0.0, 50.0),
            (&[0.0, 0.0, 0.0, 0.0, 100.0], 20.0, -10.0, 50.0),
        ];
        for (utils, t, lo, hi) in cases {
            let b = Bands::of(utils).unwrap();
            assert!((b.threshold - t).abs() < 1e-5, "{utils:?}: {b:?}");
            assert!((b.low - lo).abs() < 1e-5, "{utils:?}: {b:?}");
            assert!((b.high - hi).abs() < 1e-5, "{utils:?}: {b:?}");
            assert!(b.high - b.low >= 2.0 * MIN_HALF_WIDTH_PCT);
        }
    }

    #[test]
    fn decisions() {
        struct Case {
            what: &'static str,
            hosts: &'static [(&'static str, f64)],
            vms: &'static [(&'static str, &'static str, f64)],
            want: &'static [(&'static str, &'static str, &'static str)],
        }
        let cases = [
            Case {
                what: "paper 000 table 1",
                hosts: &[("node1", 46.40), ("node2", 21.09), ("node3", 63.42)],
                vms: &[
                    ("N1V1", "node1", 51.50),
                    ("N1V2", "node1", 11.02),
                    ("N1V3", "node1", 3.00),
                    ("N2V1", "node2", 47.52),
                    ("N2V2", "node2", 7.23),
                    ("N2V3", "node2", 20.06),
                    ("N3V1", "node3", 96.67),
                    ("N3V2", "node3", 5.16),
                    ("N3V3", "node3", 25.62),
                ],
                want: &[("N3V3", "node3", "node2")],
            },
            Case {
                what: "balanced",
                hosts: &[("a", 50.0), ("b", 45.0), ("c", 55.0)],
                vms: &[("v", "c", 10.0)],
                want: &[],
            },
            Case {
                what: "heavy without light",
                hosts: &[("a", 70.0), ("b", 40.0), ("c", 40.0)],
                vms: &[("v", "a", 20.0)],
                want: &[],
            },
            Case {
                what: "two heavy, two light: heaviest pairs with lightest",
                hosts: &[
                    ("h1", 90.0),
                    ("h2", 80.0),
                    ("l1", 5.0),
                    ("l2", 10.0),
                    ("m", 45.0),
                ],
                vms: &[
                    ("a", "h1", 40.0),
                    ("b", "h1", 20.0),
                    ("c", "h2", 30.0),
                    ("d", "h2", 60.0),
                ],
                // mean 46, band 36..56; vectors 41 (to l1) and 36 (to l2)
                want: &[("a", "h1", "l1"), ("c", "h2", "l2")],
            },
        ];
        for c in cases {
            let s = cluster(c.hosts, c.vms);
            let got: Vec<(String, String, String)> = plan(&s)
                .decisions
                .into_iter()
                .map(|d| match d {
                    Decision::Migrate { vm, from, to, .. } => (vm, from, to),
                    Decision::Balloon { .. } => panic!("band never balloons"),
                })
                .collect();
            let want: Vec<(String, String, String)> = c
                .want
                .iter()
                .map(|(v, f, t)| ((*v).into(), (*f).into(), (*t).into()))
                .collect();
            assert_eq!(got, want, "{}", c.what);
        }
    }

    #[test]
    fn a_vm_that_does_not_fit_the_light_host_is_skipped() {
        // mean 50, band 40..60: h heavy, l light, vector 40. "fat" is closest (38) but needs 2048 MiB of l's 1024.
        let mut s = cluster(
            &[("h", 90.0), ("l", 10.0), ("m", 50.0)],
            &[("fat", "h", 38.0), ("thin", "h", 20.0)],
        );
        s.hosts[1].memory_mib = 1024;
        s.vms[0].memory_mib = 2048;
        let d = plan(&s).decisions;
        assert!(
            matches!(&d[..], [Decision::Migrate { vm, to, .. }] if vm == "thin" && to == "l"),
            "{d:?}"
        );
    }
}
