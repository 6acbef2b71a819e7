//! What earlier migrations taught about each VM and link, remembered in a JSON file so that the next prediction
//! starts from calibrated figures: how far the dirty rate measured before the start was off from the migration's
//! own counters, the share of the RAM that is non-zero, whether throttling slowed the guest, and the throughput a
//! link really gave. The update rules are pure; reading and writing the file are the only I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How much a new observation counts against what was remembered (exponential smoothing).
pub const WEIGHT_NEW: f64 = 0.5;
/// Calibration factors are kept within these bounds: a measurement off by more is not trusted as a correction.
pub const FACTOR_RANGE: (f64, f64) = (0.1, 10.0);

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read the calibration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the calibration file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write the calibration file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one VM's migrations showed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmCalibration {
    /// Migrations that contributed.
    pub runs: u32,
    /// The dirty-rate method the factor applies to (`page-sampling`, `dirty-bitmap`, `dirty-ring`).
    pub method: Option<String>,
    /// What the migration itself found dirtied after its first pass, over what the pre-start measurement
    /// predicted for the same time: multiply the pre-start figures by this.
    pub dirty_factor: Option<f64>,
    /// Non-zero share of the RAM the first pass found.
    pub nonzero_fraction: Option<f64>,
    /// Whether throttling slowed this guest the last time it was tried (`None`: never tried).
    pub throttle_works: Option<bool>,
    /// Seconds since the epoch of the last update.
    pub updated_s: u64,
}

/// What one link (source host → destination host) gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkCalibration {
    /// The throughput measured when the cap was not what limited it.
    pub throughput_bytes_per_s: f64,
    pub updated_s: u64,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    #[serde(default)]
    pub vms: BTreeMap<String, VmCalibration>,
    #[serde(default)]
    pub links: BTreeMap<String, LinkCalibration>,
}

/// What one migration measured, to be folded into the calibration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lesson {
    pub method: Option<String>,
    /// live dirtied ÷ predicted dirtied for the first pass's duration.
    pub dirty_factor: Option<f64>,
    pub nonzero_fraction: Option<f64>,
    /// `Some(false)` when the ladder found throttling did not slow the guest, `Some(true)` when a throttled
    /// precopy completed, `None` when the migration did not throttle.
    pub throttle_worked: Option<bool>,
    /// The link's throughput, when it stayed below the cap.
    pub link_throughput_bytes_per_s: Option<f64>,
}

/// The key a link is remembered under.
pub fn link_key(from: &str, to: &str) -> String {
    format!("{from} -> {to}")
}

impl Calibration {
    /// Folds one migration's lesson in: smoothed factors, the newest throttle verdict. Pure.
    pub fn learn(&mut self, vm: &str, link: Option<&str>, lesson: &Lesson, now_s: u64) {
        let entry = self.vms.entry(vm.to_string()).or_default();
        // A factor for another method does not carry over.
        if lesson.method.is_some() && entry.method != lesson.method {
            entry.dirty_factor = None;
            entry.method = lesson.method.clone();
        }
        if let Some(f) = lesson.dirty_factor.filter(|f| f.is_finite() && *f > 0.0) {
            let f = f.clamp(FACTOR_RANGE.0, FACTOR_RANGE.1);
            entry.dirty_factor = Some(smooth(entry.dirty_factor, f));
        }
        if let Some(z) = lesson.nonzero_fraction.filter(|z| (0.0..=1.0).contains(z)) {
            entry.nonzero_fraction = Some(smooth(entry.nonzero_fraction, z));
        }
        if let Some(t) = lesson.throttle_worked {
            entry.throttle_works = Some(t);
        }
        entry.runs += 1;
        entry.updated_s = now_s;
        if let (Some(key), Some(tp)) = (link, lesson.link_throughput_bytes_per_s) {
            if tp.is_finite() && tp > 0.0 {
                let l = self.links.entry(key.to_string()).or_default();
                l.throughput_bytes_per_s = if l.throughput_bytes_per_s > 0.0 {
                    smooth(Some(l.throughput_bytes_per_s), tp)
                } else {
                    tp
                };
                l.updated_s = now_s;
            }
        }
    }

    /// The factor for `vm`'s pre-start dirty figures measured by `method`, if one was learned.
    pub fn dirty_factor(&self, vm: &str, method: &str) -> Option<f64> {
        self.vms
            .get(vm)
            .filter(|c| c.method.as_deref() == Some(method))
            .and_then(|c| c.dirty_factor)
    }
}

fn smooth(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o * (1.0 - WEIGHT_NEW) + new * WEIGHT_NEW,
        None => new,
    }
}

/// The default file: `$QMIGRATE_CALIBRATION`, else `$XDG_STATE_HOME/qmigrate/calibration.json`, else
/// `~/.local/state/qmigrate/calibration.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QMIGRATE_CALIBRATION") {
        return Some(PathBuf::from(p));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
    Some(state.join("qmigrate/calibration.json"))
}

/// Reads the file; a missing file is an empty calibration.
pub fn load(path: &Path) -> Result<Calibration, CalibrationError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| CalibrationError::Parse {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Calibration::default()),
        Err(source) => Err(CalibrationError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the file whole: a temporary file beside it, renamed over it.
pub fn save(path: &Path, cal: &Calibration) -> Result<(), CalibrationError> {
    let err = |source| CalibrationError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(err)?;
    serde_json::to_writer_pretty(tmp.as_file(), cal).map_err(|e| err(e.into()))?;
    tmp.as_file().sync_data().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// Loads, learns and saves in one go (a lost race with another qmigrate loses one lesson, never the file).
pub fn remember(
    path: &Path,
    vm: &str,
    link: Option<&str>,
    lesson: &Lesson,
) -> Result<(), CalibrationError> {
    let mut cal = load(path)?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cal.learn(vm, link, lesson, now_s);
    save(path, &cal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lesson(factor: f64) -> Lesson {
        Lesson {
            method: Some("page-sampling".into()),
            dirty_factor: Some(factor),
            ..Lesson::default()
        }
    }

    #[test]
    fn factors_are_smoothed_clamped_and_kept_per_method() {
        let mut c = Calibration::default();
        // (method, factor learned) -> factor remembered for page-sampling afterwards
        let table: [(&str, f64, Option<f64>); 5] = [
            ("page-sampling", 2.0, Some(2.0)),
            ("page-sampling", 1.0, Some(1.5)),
            ("page-sampling", 1000.0, Some(5.75)),
            ("dirty-ring", 3.0, None),
            ("page-sampling", 4.0, Some(4.0)),
        ];
        for (method, f, want) in table {
            let mut l = lesson(f);
            l.method = Some(method.into());
            c.learn("vm1", None, &l, 7);
            assert_eq!(c.dirty_factor("vm1", "page-sampling"), want, "{method} {f}");
        }
        assert_eq!(c.vms["vm1"].runs, 5);
        assert_eq!(c.dirty_factor("other", "page-sampling"), None);
    }

    #[test]
    fn throttle_verdict_and_link_throughput_are_remembered() {
        let mut c = Calibration::default();
        let key = link_key("h1", "h2");
        let mut l = lesson(1.0);
        l.throttle_worked = Some(false);
        l.link_throughput_bytes_per_s = Some(100.0);
        c.learn("vm1", Some(&key), &l, 1);
        assert_eq!(c.vms["vm1"].throttle_works, Some(false));
        // A migration that did not throttle says nothing about it.
        l.throttle_worked = None;
        l.link_throughput_bytes_per_s = Some(50.0);
        c.learn("vm1", Some(&key), &l, 2);
        assert_eq!(c.vms["vm1"].throttle_works, Some(false));
        assert_eq!(c.links[&key].throughput_bytes_per_s, 75.0);
        l.throttle_worked = Some(true);
        c.learn("vm1", Some(&key), &l, 3);
        assert_eq!(c.vms["vm1"].throttle_works, Some(true));
    }

    #[test]
    fn the_file_round_trips_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/calibration.json");
        assert_eq!(load(&path).unwrap(), Calibration::default());
        remember(&path, "vm1", Some("a -> b"), &lesson(2.0)).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.dirty_factor("vm1", "page-sampling"), Some(2.0));
        std::fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("calibration.json"), "{e}");
    }
}
