//! PURE link budgets for an evacuation: a host's outbound bandwidth split among the migrations leaving it, with the
//! larger share moved to a migration that stalls. No I/O.

/// One running migration out of a host, as the budget sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    /// Its progress says it does not converge at its current share (see [`stalled`]).
    pub stalled: bool,
}

/// The part of a budget the stalled migrations get when some run beside migrations that converge.
pub const STALLED_SHARE: f64 = 0.75;

/// The floor of a share: a migration is never starved below this (QEMU reads 0 as "no cap").
pub const MIN_SHARE_BYTES_PER_S: u64 = 1 << 20;

/// Splits `budget_bytes_per_s` among the migrations `shares` (in their order): equally while none stalls; once some
/// stall and others do not, the stalled ones share [`STALLED_SHARE`] of it and the others the rest, since a
/// converging migration finishes anyway and a stalled one only finishes with more of the link.
pub fn split(budget_bytes_per_s: u64, shares: &[Share]) -> Vec<u64> {
    let stalled = shares.iter().filter(|s| s.stalled).count();
    let others = shares.len() - stalled;
    let budget = budget_bytes_per_s as f64;
    let (for_stalled, for_others) = match (stalled, others) {
        (0, 0) => return Vec::new(),
        (0, n) => (0.0, budget / n as f64),
        (n, 0) => (budget / n as f64, 0.0),
        (s, o) => (
            budget * STALLED_SHARE / s as f64,
            budget * (1.0 - STALLED_SHARE) / o as f64,
        ),
    };
    shares
        .iter()
        .map(|s| {
            let b = if s.stalled { for_stalled } else { for_others };
            (b as u64).max(MIN_SHARE_BYTES_PER_S)
        })
        .collect()
}

/// Whether a migration stalls: past its first pass, it dirties memory at least at 90 % of the rate it sends, so its
/// remaining data no longer shrinks.
pub fn stalled(pass: u64, dirty_rate_bytes_per_s: f64, throughput_bytes_per_s: f64) -> bool {
    pass >= 2
        && throughput_bytes_per_s > 0.0
        && dirty_rate_bytes_per_s >= 0.9 * throughput_bytes_per_s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn shares(flags: &[bool]) -> Vec<Share> {
        flags.iter().map(|&stalled| Share { stalled }).collect()
    }

    #[test]
    fn split_table() {
        #[rustfmt::skip]
        let rows: Vec<(&str, u64, Vec<bool>, Vec<u64>)> = vec![
            ("nothing running", 100 * MIB, vec![], vec![]),
            ("one takes it all", 100 * MIB, vec![false], vec![100 * MIB]),
            ("two split evenly", 100 * MIB, vec![false, false], vec![50 * MIB, 50 * MIB]),
            ("a lone stalled one takes it all", 100 * MIB, vec![true], vec![100 * MIB]),
            ("stalled one gets three quarters", 100 * MIB, vec![false, true], vec![25 * MIB, 75 * MIB]),
            ("two stalled share three quarters", 100 * MIB, vec![true, false, true],
                vec![(37.5 * MIB as f64) as u64, 25 * MIB, (37.5 * MIB as f64) as u64]),
            ("never below the floor", MIB, vec![false, false, false], vec![MIB, MIB, MIB]),
        ];
        for (name, budget, flags, want) in rows {
            assert_eq!(split(budget, &shares(&flags)), want, "{name}");
        }
    }

    #[test]
    fn split_never_exceeds_the_budget_above_the_floor() {
        for n in 1..8usize {
            for stalled in 0..=n {
                let flags: Vec<bool> = (0..n).map(|i| i < stalled).collect();
                let total: u64 = split(1000 * MIB, &shares(&flags)).iter().sum();
                assert!(
                    total <= 1000 * MIB && total + n as u64 >= 1000 * MIB,
                    "{n} {stalled}: {total}"
                );
            }
        }
    }

    #[test]
    fn stalled_table() {
        #[rustfmt::skip]
        let rows = [
            ("first pass never stalls", 1, 100.0, 50.0, false),
            ("dirtying faster than sending", 3, 100.0, 50.0, true),
            ("just under the line", 3, 44.0, 50.0, false),
            ("at the line", 3, 45.0, 50.0, true),
            ("nothing sent yet", 3, 10.0, 0.0, false),
        ];
        for (name, pass, dirty, sent, want) in rows {
            assert_eq!(stalled(pass, dirty, sent), want, "{name}");
        }
    }
}
