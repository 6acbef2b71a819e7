//! PURE workload classification (paper 001's classes): one VM's figures → the classes it belongs to, each with the
//! figures and thresholds behind it. No I/O, no tokio; the sampler (`stats`) provides the figures.
//!
//! The classes are independent tests, so a VM may carry several: a guest dirtying memory as fast as it can also
//! burns its vCPU, and is `dirty-memory` and `cpu`. `idle` is given only when no other class applies, and carries
//! the figures that were below their thresholds. A VM with no figure at all gets no class.

use serde::{Deserialize, Serialize};

/// A workload class, ordered as paper 001's informed strategy cares about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Writes memory faster than the threshold: long precopy, migrate early (paper 001).
    DirtyMemory,
    /// Transmit-heavy network (a server): occupies the link, migrate early.
    Web,
    /// Receive-heavy network: loads the destination's link, migrate last.
    NetReceive,
    /// CPU-bound: cheap to migrate, shortest job first.
    Cpu,
    /// Disk I/O-bound: cheap to migrate, shortest job first.
    DiskIo,
    /// None of the above.
    Idle,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::DirtyMemory => "dirty-memory",
            Class::Web => "web",
            Class::NetReceive => "net-receive",
            Class::Cpu => "cpu",
            Class::DiskIo => "disk-io",
            Class::Idle => "idle",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where each class begins. Defaults are set for the project's test guests under TCG (see docs/stats.md): an idle
/// guest sits far below every one of them, each workload far above its own.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Thresholds {
    /// `dirty-memory` from this dirty page rate. Default 8 MiB/s: an idle Linux guest dirties well under 1 MiB/s.
    pub dirty_rate_bytes_per_s: f64,
    /// `cpu` from this share of the VM's vCPU capacity (100 = every vCPU busy). Default 50 %.
    pub cpu_pct: f64,
    /// `web` / `net-receive` from this many bytes per second in the dominant direction. Default 1 MiB/s.
    pub net_bytes_per_s: f64,
    /// `disk-io` from this many bytes per second read plus written. Default 1 MiB/s.
    pub disk_bytes_per_s: f64,
    /// `disk-io` also from this many operations per second (reads, writes and flushes), for small-block I/O.
    /// Default 100.
    pub disk_ops_per_s: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            dirty_rate_bytes_per_s: 8.0 * MIB,
            cpu_pct: 50.0,
            net_bytes_per_s: MIB,
            disk_bytes_per_s: MIB,
            disk_ops_per_s: 100.0,
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The figures of one VM the classifier looks at. `None` means not measured (no NIC, no disk, the dirty rate
/// skipped while migrating); a missing figure never makes a class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub dirty_rate_bytes_per_s: Option<f64>,
    /// Total vCPU utilisation as a share of the VM's vCPU capacity.
    pub cpu_pct: Option<f64>,
    /// What the guest received and sent (not the host tap's own view, which is the mirror image).
    pub net_rx_bytes_per_s: Option<f64>,
    pub net_tx_bytes_per_s: Option<f64>,
    pub disk_bytes_per_s: Option<f64>,
    pub disk_ops_per_s: Option<f64>,
}

/// One figure against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The figure's name, unit included (`dirty_rate_bytes_per_s`).
    pub metric: String,
    pub value: f64,
    pub threshold: f64,
}

/// One class of a VM with the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub class: Class,
    pub evidence: Vec<Evidence>,
}

/// Classifies one VM. Labels come in [`Class`] order.
pub fn classify(f: &Figures, t: &Thresholds) -> Vec<Label> {
    let ev = |metric: &str, value: f64, threshold: f64| Evidence {
        metric: metric.into(),
        value,
        threshold,
    };
    let mut labels = Vec::new();
    let mut below = Vec::new();
    let mut test = |class: Class, checks: Vec<(&str, Option<f64>, f64)>, extra: Vec<Evidence>| {
        let mut hit = Vec::new();
        for (metric, value, threshold) in checks {
            let Some(v) = value else { continue };
            if v >= threshold {
                hit.push(ev(metric, v, threshold));
            } else {
                below.push(ev(metric, v, threshold));
            }
        }
        if !hit.is_empty() {
            hit.extend(extra);
            labels.push(Label {
                class,
                evidence: hit,
            });
        }
    };

    test(
        Class::DirtyMemory,
        vec![(
            "dirty_rate_bytes_per_s",
            f.dirty_rate_bytes_per_s,
            t.dirty_rate_bytes_per_s,
        )],
        vec![],
    );
    // Network: the dominant direction decides between web and net-receive; the other direction is shown as the
    // threshold it had to exceed, so a reader sees why a busy link got one label and not the other.
    let (rx, tx) = (f.net_rx_bytes_per_s, f.net_tx_bytes_per_s);
    let tx_dominant = match (rx, tx) {
        (Some(r), Some(x)) => x > r,
        (None, Some(_)) => true,
        _ => false,
    };
    let (web_tx, recv_rx) = if tx_dominant { (tx, None) } else { (None, rx) };
    test(
        Class::Web,
        vec![("net_tx_bytes_per_s", web_tx, t.net_bytes_per_s)],
        rx.map(|r| vec![ev("net_rx_bytes_per_s", r, tx.unwrap_or(0.0))])
            .unwrap_or_default(),
    );
    test(
        Class::NetReceive,
        vec![("net_rx_bytes_per_s", recv_rx, t.net_bytes_per_s)],
        tx.map(|x| vec![ev("net_tx_bytes_per_s", x, rx.unwrap_or(0.0))])
            .unwrap_or_default(),
    );
    // The non-dominant direction of a quiet link still counts as a figure below its threshold for `idle`.
    let quiet_other = if tx_dominant { rx } else { tx };
    let other_name = if tx_dominant {
        "net_rx_bytes_per_s"
    } else {
        "net_tx_bytes_per_s"
    };
    test(Class::Cpu, vec![("cpu_pct", f.cpu_pct, t.cpu_pct)], vec![]);
    test(
        Class::DiskIo,
        vec![
            ("disk_bytes_per_s", f.disk_bytes_per_s, t.disk_bytes_per_s),
            ("disk_ops_per_s", f.disk_ops_per_s, t.disk_ops_per_s),
        ],
        vec![],
    );
    if labels.is_empty() {
        if let Some(v) = quiet_other {
            below.push(ev(other_name, v, t.net_bytes_per_s));
        }
        if !below.is_empty() {
            below.sort_by(|a, b| a.metric.cmp(&b.metric));
            labels.push(Label {
                class: Class::Idle,
                evidence: below,
            });
        }
    }
    labels
}

/// Just the classes of [`classify`]'s labels.
pub fn classes(labels: &[Label]) -> Vec<Class> {
    labels.iter().map(|l| l.class).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(
        dirty: Option<f64>,
        cpu: Option<f64>,
        rx: Option<f64>,
        tx: Option<f64>,
        disk: Option<f64>,
        ops: Option<f64>,
    ) -> Figures {
        Figures {
            dirty_rate_bytes_per_s: dirty,
            cpu_pct: cpu,
            net_rx_bytes_per_s: rx,
            net_tx_bytes_per_s: tx,
            disk_bytes_per_s: disk,
            disk_ops_per_s: ops,
        }
    }

    #[test]
    fn classes_table() {
        use Class::*;
        const M: f64 = MIB;
        let n = None;
        // (case, figures, expected classes)
        let cases: Vec<(&str, Figures, Vec<Class>)> = vec![
            ("nothing measured", Figures::default(), vec![]),
            (
                "quiet everywhere",
                figures(
                    Some(0.1 * M),
                    Some(2.0),
                    Some(100.0),
                    Some(200.0),
                    Some(0.0),
                    Some(0.0),
                ),
                vec![Idle],
            ),
            (
                "only cpu measured, low",
                figures(n, Some(3.0), n, n, n, n),
                vec![Idle],
            ),
            (
                "dirtier burns cpu too",
                figures(Some(200.0 * M), Some(99.0), n, n, n, n),
                vec![DirtyMemory, Cpu],
            ),
            (
                "busy loop",
                figures(Some(0.5 * M), Some(99.0), n, n, n, n),
                vec![Cpu],
            ),
            (
                "exactly at the cpu threshold",
                figures(n, Some(50.0), n, n, n, n),
                vec![Cpu],
            ),
            (
                "just under the cpu threshold",
                figures(n, Some(49.9), n, n, n, n),
                vec![Idle],
            ),
            (
                "server sends",
                figures(n, Some(30.0), Some(0.2 * M), Some(20.0 * M), n, n),
                vec![Web],
            ),
            (
                "sink receives",
                figures(n, Some(30.0), Some(20.0 * M), Some(0.3 * M), n, n),
                vec![NetReceive],
            ),
            (
                "tx without an rx figure",
                figures(n, n, n, Some(2.0 * M), n, n),
                vec![Web],
            ),
            (
                "busy both ways, rx dominant",
                figures(n, n, Some(5.0 * M), Some(4.0 * M), n, n),
                vec![NetReceive],
            ),
            (
                "quiet link, tx dominant",
                figures(n, n, Some(10.0), Some(20.0), n, n),
                vec![Idle],
            ),
            (
                "disk by bytes",
                figures(n, Some(10.0), n, n, Some(30.0 * M), Some(30.0)),
                vec![DiskIo],
            ),
            (
                "disk by small ops",
                figures(n, Some(10.0), n, n, Some(0.4 * M), Some(500.0)),
                vec![DiskIo],
            ),
            (
                "everything",
                figures(
                    Some(50.0 * M),
                    Some(90.0),
                    Some(0.0),
                    Some(9.0 * M),
                    Some(9.0 * M),
                    Some(0.0),
                ),
                vec![DirtyMemory, Web, Cpu, DiskIo],
            ),
        ];
        for (case, f, want) in cases {
            let got = classify(&f, &Thresholds::default());
            assert_eq!(classes(&got), want, "{case}: {got:#?}");
        }
    }

    #[test]
    fn evidence_names_the_figures_and_thresholds() {
        let t = Thresholds::default();
        let f = figures(
            Some(200.0 * MIB),
            Some(99.0),
            None,
            None,
            Some(0.0),
            Some(500.0),
        );
        let got = classify(&f, &t);
        let dirty = &got[0];
        assert_eq!(dirty.class, Class::DirtyMemory);
        assert_eq!(
            dirty.evidence,
            vec![Evidence {
                metric: "dirty_rate_bytes_per_s".into(),
                value: 200.0 * MIB,
                threshold: t.dirty_rate_bytes_per_s
            }]
        );
        // disk-io by ops only: the byte figure below its threshold is not evidence for it
        let disk = got.iter().find(|l| l.class == Class::DiskIo).unwrap();
        assert_eq!(disk.evidence.len(), 1);
        assert_eq!(disk.evidence[0].metric, "disk_ops_per_s");
        assert_eq!(disk.evidence[0].threshold, 100.0);

        // web shows the receive figure against the transmit figure it lost to
        let web = classify(
            &figures(None, None, Some(0.1 * MIB), Some(3.0 * MIB), None, None),
            &t,
        );
        assert_eq!(web[0].class, Class::Web);
        assert_eq!(web[0].evidence[0].metric, "net_tx_bytes_per_s");
        assert_eq!(web[0].evidence[1].metric, "net_rx_bytes_per_s");
        assert_eq!(web[0].evidence[1].threshold, 3.0 * MIB);

        // idle carries every figure that stayed below its threshold
        let idle = classify(
            &figures(
                Some(1.0),
                Some(1.0),
                Some(1.0),
                Some(2.0),
                Some(1.0),
                Some(1.0),
            ),
            &t,
        );
        assert_eq!(classes(&idle), vec![Class::Idle]);
        let metrics: Vec<&str> = idle[0].evidence.iter().map(|e| e.metric.as_str()).collect();
        assert_eq!(
            metrics,
            vec![
                "cpu_pct",
                "dirty_rate_bytes_per_s",
                "disk_bytes_per_s",
                "disk_ops_per_s",
                "net_rx_bytes_per_s",
                "net_tx_bytes_per_s"
            ]
        );
        assert!(idle[0].evidence.iter().all(|e| e.value < e.threshold));
    }

    #[test]
    fn thresholds_are_configurable() {
        let f = figures(Some(4.0 * MIB), Some(40.0), None, None, None, None);
        assert_eq!(
            classes(&classify(&f, &Thresholds::default())),
            vec![Class::Idle]
        );
        let low = Thresholds {
            dirty_rate_bytes_per_s: 2.0 * MIB,
            cpu_pct: 30.0,
            ..Thresholds::default()
        };
        assert_eq!(
            classes(&classify(&f, &low)),
            vec![Class::DirtyMemory, Class::Cpu]
        );
        // a partial JSON thresholds block keeps the other defaults
        let t: Thresholds = serde_json::from_str(r#"{"cpu_pct": 80}"#).unwrap();
        assert_eq!(t.cpu_pct, 80.0);
        assert_eq!(t.disk_ops_per_s, 100.0);
        assert_eq!(
            serde_json::to_string(&Class::NetReceive).unwrap(),
            "\"net-receive\""
        );
    }
}
