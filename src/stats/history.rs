//! Per-metric time series of sampled figures: windowed averages over the last t seconds (paper 000's load
//! average of per-second samples) and a one-step AR(1) prediction u(k+1) = μ + φ (u(k) − μ) (paper 004). PURE: no
//! I/O, no clock; the caller stamps every sample with its time.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

// The AR(1) forecast lives in the pure decision layer, which the balancing policies share with this module.
pub use crate::plan::ar1::{ar1_next, ar1_phi, AR1_MIN_SAMPLES};

/// How many samples a series keeps unless told otherwise: ten minutes of per-second samples.
pub const DEFAULT_CAPACITY: usize = 600;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HistoryError {
    #[error("{metric}: sample at {at:?} is older than the last one ({last:?})")]
    OutOfOrder {
        metric: String,
        at: Duration,
        last: Duration,
    },
    #[error("{metric}: sample at {at:?} is not a finite number")]
    NotFinite { metric: String, at: Duration },
}

/// One sample: when it was taken (since any fixed origin the caller chooses) and its value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: Duration,
    pub value: f64,
}

/// The samples of one metric, oldest first, at most `capacity` of them.
#[derive(Debug, Clone)]
pub struct Series {
    capacity: usize,
    points: VecDeque<Point>,
}

impl Series {
    pub fn new(capacity: usize) -> Series {
        Series {
            capacity: capacity.max(1),
            points: VecDeque::new(),
        }
    }

    /// Appends a sample, dropping the oldest beyond the capacity. Samples must come in time order (equal times are
    /// accepted: two metrics read in one round share a stamp) and be finite.
    pub fn push(&mut self, metric: &str, at: Duration, value: f64) -> Result<(), HistoryError> {
        if !value.is_finite() {
            return Err(HistoryError::NotFinite {
                metric: metric.into(),
                at,
            });
        }
        if let Some(last) = self.points.back() {
            if at < last.at {
                return Err(HistoryError::OutOfOrder {
                    metric: metric.into(),
                    at,
                    last: last.at,
                });
            }
        }
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(Point { at, value });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    pub fn last(&self) -> Option<Point> {
        self.points.back().copied()
    }

    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }

    /// The mean of the samples taken in the last `window` before (and including) the newest one: those with
    /// `at > newest − window`. A zero window is the newest value alone; `None` when there is no sample.
    pub fn average_over(&self, window: Duration) -> Option<f64> {
        let newest = self.points.back()?.at;
        let from = newest.checked_sub(window);
        let mut sum = 0.0;
        let mut n = 0u32;
        for p in self.points.iter().rev() {
            // Strictly after the window's start, so 60 one-second samples make a 60 s average, not 61.
            if from.is_some_and(|f| p.at <= f) && n > 0 {
                break;
            }
            sum += p.value;
            n += 1;
        }
        Some(sum / f64::from(n))
    }

    /// φ: the lag-1 autocorrelation of the whole series (see [`ar1_phi`]).
    pub fn phi(&self) -> Option<f64> {
        ar1_phi(&self.values())
    }

    fn values(&self) -> Vec<f64> {
        self.points.iter().map(|p| p.value).collect()
    }

    /// μ: the mean of every sample held.
    pub fn mean(&self) -> Option<f64> {
        if self.points.is_empty() {
            return None;
        }
        #[allow(clippy::cast_precision_loss)] // at most `capacity` samples
        let n = self.points.len() as f64;
        Some(self.points.iter().map(|p| p.value).sum::<f64>() / n)
    }

    /// The AR(1) one-step prediction of the series (see [`ar1_next`]).
    pub fn predict_next(&self) -> Option<f64> {
        ar1_next(&self.values())
    }
}

/// Many named series, e.g. one per metric of one VM (`cpu_pct`, `dirty_rate_bytes_per_s`, …).
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    series: BTreeMap<String, Series>,
}

impl Default for History {
    fn default() -> Self {
        History::new(DEFAULT_CAPACITY)
    }
}

impl History {
    pub fn new(capacity_per_metric: usize) -> History {
        History {
            capacity: capacity_per_metric,
            series: BTreeMap::new(),
        }
    }

    /// Records one sample of `metric`, creating its series on first use.
    pub fn record(&mut self, metric: &str, at: Duration, value: f64) -> Result<(), HistoryError> {
        let capacity = self.capacity;
        self.series
            .entry(metric.to_string())
            .or_insert_with(|| Series::new(capacity))
            .push(metric, at, value)
    }

    pub fn get(&self, metric: &str) -> Option<&Series> {
        self.series.get(metric)
    }

    pub fn metrics(&self) -> impl Iterator<Item = &str> {
        self.series.keys().map(String::as_str)
    }

    pub fn average_over(&self, metric: &str, window: Duration) -> Option<f64> {
        self.get(metric)?.average_over(window)
    }

    pub fn predict_next(&self, metric: &str) -> Option<f64> {
        self.get(metric)?.predict_next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(values: &[f64]) -> Series {
        let mut s = Series::new(DEFAULT_CAPACITY);
        for (i, v) in values.iter().enumerate() {
            s.push("m", Duration::from_secs(i as u64), *v).unwrap();
        }
        s
    }

    #[test]
    fn windowed_averages() {
        // (per-second samples, window in s, expected average)
        let cases: &[(&[f64], u64, Option<f64>)] = &[
            (&[], 10, None),
            (&[7.0], 10, Some(7.0)),
            (&[7.0], 0, Some(7.0)),
            // the window covers the last 2 samples (t = 2 and 3), not 3
            (&[1.0, 2.0, 3.0, 5.0], 2, Some(4.0)),
            (&[1.0, 2.0, 3.0, 5.0], 3, Some(10.0 / 3.0)),
            // a window longer than the history averages everything
            (&[1.0, 2.0, 3.0, 5.0], 60, Some(11.0 / 4.0)),
            // zero window: the newest value alone
            (&[1.0, 2.0, 3.0, 5.0], 0, Some(5.0)),
            // paper 000's load average: a 1 s spike barely moves a 10 s average
            (
                &[10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 100.0],
                10,
                Some(19.0),
            ),
        ];
        for (values, window_s, want) in cases {
            let got = series(values).average_over(Duration::from_secs(*window_s));
            match (got, want) {
                (Some(g), Some(w)) => assert!(
                    (g - w).abs() < 1e-9,
                    "{values:?} over {window_s}s: {g} != {w}"
                ),
                _ => assert_eq!(got, *want, "{values:?} over {window_s}s"),
            }
        }
    }

    #[test]
    fn ar1_predictions() {
        // (series, expected prediction)
        let cases: &[(&[f64], Option<f64>)] = &[
            (&[], None),
            // fewer than 3 samples: the last value
            (&[70.0], Some(70.0)),
            (&[70.0, 90.0], Some(90.0)),
            // flat: the value itself
            (&[90.0, 90.0, 90.0], Some(90.0)),
            // alternating: φ < 0, the prediction swings back under the mean (μ = 90, φ = -0.75)
            (&[80.0, 100.0, 80.0, 100.0], Some(82.5)),
            // a single spike after a calm history: φ ≈ 0, the prediction stays near the mean
            (&[50.0, 50.0, 50.0, 98.0], Some(59.0)),
            // a steady rise: φ > 0, the prediction is above the mean but below the last value
            (&[10.0, 20.0, 30.0, 40.0], Some(25.0 + 0.25 * 15.0)),
        ];
        for (values, want) in cases {
            let got = series(values).predict_next();
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{values:?}: {g} != {w}"),
                _ => assert_eq!(got, *want, "{values:?}"),
            }
        }
    }

    #[test]
    fn agrees_with_the_planners_ar1() {
        // plan::hotspot has its own AR(1) on plain slices; both must predict the same.
        for values in [
            vec![80.0, 100.0, 80.0, 100.0],
            vec![50.0, 50.0, 50.0, 98.0],
            vec![3.0, 9.0, 4.0, 8.0, 7.0, 1.0],
        ] {
            let (last, history) = values.split_last().unwrap();
            let theirs = crate::plan::hotspot::ar1_predict(history, *last);
            let ours = series(&values).predict_next().unwrap();
            assert!(
                (theirs - ours).abs() < 1e-9,
                "{values:?}: {ours} != {theirs}"
            );
        }
    }

    #[test]
    fn phi_is_clamped_and_needs_three_samples() {
        assert_eq!(series(&[1.0, 2.0]).phi(), None);
        for values in [[0.0, 1e9, 0.0, 1e9, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]] {
            let phi = series(&values).phi().unwrap();
            assert!((-1.0..=1.0).contains(&phi), "{values:?}: φ = {phi}");
        }
    }

    #[test]
    fn capacity_drops_the_oldest() {
        let mut s = Series::new(3);
        for (i, v) in [100.0, 1.0, 2.0, 3.0].iter().enumerate() {
            s.push("m", Duration::from_secs(i as u64), *v).unwrap();
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.mean(), Some(2.0));
    }

    #[test]
    fn rejects_out_of_order_and_non_finite_samples() {
        let mut h = History::new(10);
        h.record("cpu_pct", Duration::from_secs(5), 1.0).unwrap();
        // the same stamp is fine: one round stamps every metric alike
        h.record("cpu_pct", Duration::from_secs(5), 2.0).unwrap();
        let e = h
            .record("cpu_pct", Duration::from_secs(4), 3.0)
            .unwrap_err();
        assert!(matches!(e, HistoryError::OutOfOrder { .. }), "{e}");
        assert!(e.to_string().starts_with("cpu_pct:"), "{e}");
        let e = h
            .record("cpu_pct", Duration::from_secs(6), f64::NAN)
            .unwrap_err();
        assert!(matches!(e, HistoryError::NotFinite { .. }), "{e}");
        assert_eq!(h.get("cpu_pct").unwrap().len(), 2);
        assert_eq!(h.average_over("cpu_pct", Duration::from_secs(1)), Some(1.5));
        assert_eq!(h.predict_next("nothing"), None);
        assert_eq!(h.metrics().collect::<Vec<_>>(), vec!["cpu_pct"]);
    }
}
