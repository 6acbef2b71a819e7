//! The one-step AR(1) forecast u(k+1) = μ + φ (u(k) − μ) of a series of samples (paper 004), on plain slices. PURE:
//! numbers in, a number out. Lives in the decision layer because two layers use it: the hotspot detection of the
//! idc and sandpiper policies ([`super::hotspot`]) and the sampled time series of [`crate::stats::history`].

/// Fewer samples than this give no usable lag-1 autocorrelation, so the prediction is the last value.
pub const AR1_MIN_SAMPLES: usize = 3;

/// φ of a series: its lag-1 autocorrelation, clamped to [-1, 1]. `None` with fewer than [`AR1_MIN_SAMPLES`]
/// samples; 0 for a flat series (nothing to correlate, so the mean is the best guess — which for a flat series is
/// also its last value).
pub fn ar1_phi(values: &[f64]) -> Option<f64> {
    if values.len() < AR1_MIN_SAMPLES {
        return None;
    }
    #[allow(clippy::cast_precision_loss)] // a history is a bounded number of samples
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let dev = || values.iter().map(|v| v - mean);
    let var: f64 = dev().map(|d| d * d).sum();
    if var == 0.0 {
        return Some(0.0);
    }
    let lagged: f64 = dev().zip(dev().skip(1)).map(|(a, b)| a * b).sum();
    Some((lagged / var).clamp(-1.0, 1.0))
}

/// The AR(1) one-step prediction u(k+1) = μ + φ (u(k) − μ) of a series (paper 004), μ its mean and φ from
/// [`ar1_phi`]; the last value while there are fewer than [`AR1_MIN_SAMPLES`] samples; `None` when empty.
pub fn ar1_next(values: &[f64]) -> Option<f64> {
    let last = *values.last()?;
    match ar1_phi(values) {
        Some(phi) => {
            #[allow(clippy::cast_precision_loss)]
            let mu = values.iter().sum::<f64>() / values.len() as f64;
            Some(mu + phi * (last - mu))
        }
        None => Some(last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_and_prediction() {
        // (series, φ, prediction); the series' own tests (`stats::history`) check more shapes through `Series`.
        let cases: &[(&[f64], Option<f64>, Option<f64>)] = &[
            (&[], None, None),
            // too short to correlate: the last value
            (&[70.0, 90.0], None, Some(90.0)),
            // flat: nothing to correlate, the mean (which is the last value)
            (&[4.0, 4.0, 4.0], Some(0.0), Some(4.0)),
            // μ = 90, deviations −10 10 −10 10: lagged −300 over 400, so φ = −0.75 and 90 − 0.75 · 10 = 82.5
            (&[80.0, 100.0, 80.0, 100.0], Some(-0.75), Some(82.5)),
            // μ = 4e8, deviations −4 6 −4 6 −4 (e8): lagged −96 over 120, φ = −0.8, 4e8 − 0.8 · (0 − 4e8) = 7.2e8
            (&[0.0, 1e9, 0.0, 1e9, 0.0], Some(-0.8), Some(7.2e8)),
        ];
        for (values, phi, next) in cases {
            let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => a == b,
            };
            let (got_phi, got_next) = (ar1_phi(values), ar1_next(values));
            assert!(close(got_phi, *phi), "{values:?}: φ {got_phi:?}");
            assert!(close(got_next, *next), "{values:?}: next {got_next:?}");
            if let Some(p) = got_phi {
                assert!((-1.0..=1.0).contains(&p), "{values:?}: φ = {p}");
            }
        }
    }
}
