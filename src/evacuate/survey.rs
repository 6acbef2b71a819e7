//! PURE: what an inventory check found, turned into the planner's input — the VMs to move with their predictions,
//! and the room on every other host. No I/O.

use std::time::Duration;

use crate::calibrate::VmCalibration;
use crate::classify::Class;
use crate::hosts::{CheckReport, HostCheck, VmCheck};
use crate::plan::evacuate::{Candidate, HostRoom, Resident};
use crate::predict::{self, ModelInput, Verdict};

/// What the predictions assume.
#[derive(Debug, Clone, Copy)]
pub struct PredictionBasis {
    /// The bandwidth one migration gets: the link's share under the outbound limit, or the cap if lower.
    pub bandwidth_bytes_per_s: u64,
    pub downtime: Duration,
    /// A migration that does not converge is predicted to run this long (the ladder's timeout).
    pub timeout: Duration,
}

/// A VM found on a host, as the planner sees it; `remembered` is what earlier migrations of it taught (its dirty
/// rate was measured by page-sampling, like the survey's, and its non-zero share of RAM).
pub fn candidate(
    vm: &VmCheck,
    basis: &PredictionBasis,
    remembered: Option<&VmCalibration>,
) -> Candidate {
    let memory_bytes = vm.ram_bytes.unwrap_or(0);
    let factor = remembered
        .filter(|c| c.method.as_deref() == Some("page-sampling"))
        .and_then(|c| c.dirty_factor)
        .unwrap_or(1.0);
    let dirty = vm
        .figures
        .and_then(|f| f.dirty_rate_bytes_per_s)
        .unwrap_or(0.0)
        * factor;
    let mut input = ModelInput::plain(
        memory_bytes,
        dirty,
        basis.bandwidth_bytes_per_s as f64,
        basis.downtime,
    );
    if let Some(share) = remembered.and_then(|c| c.nonzero_fraction) {
        input.nonzero_bytes = (memory_bytes as f64 * share) as u64;
    }
    let p = predict::precopy(&input);
    let (predicted, prediction) = match p.verdict {
        Verdict::Converges => (
            Duration::from_millis(p.total_time_ms),
            format!("converges in {} passes: {}", p.passes, p.reason),
        ),
        Verdict::Diverges => (
            basis.timeout.max(Duration::from_millis(p.total_time_ms)),
            format!(
                "does not converge by precopy alone ({}); counted at the {} timeout",
                p.reason,
                humantime::format_duration(basis.timeout)
            ),
        ),
    };
    Candidate {
        name: vm.name.clone(),
        from: vm.host.clone(),
        vcpus: vm.vcpus.unwrap_or(1),
        memory_bytes,
        classes: classes(vm),
        groups: vm.groups.clone(),
        anti_affinity: vm.anti_affinity.clone(),
        predicted,
        prediction,
    }
}

fn classes(vm: &VmCheck) -> Vec<Class> {
    vm.classes.iter().map(|l| l.class).collect()
}

/// Every reachable host but `except`, with the VMs on it (those answering) as residents. `leaving` VMs (moved by
/// this plan) are not counted where they are.
pub fn rooms(check: &CheckReport, except: &str, leaving: &[String]) -> Vec<HostRoom> {
    check
        .hosts
        .iter()
        .filter(|h| h.name != except && h.reachable && h.error.is_none())
        .map(|h| room(h, leaving))
        .collect()
}

fn room(h: &HostCheck, leaving: &[String]) -> HostRoom {
    let staying: Vec<&VmCheck> = h
        .vms
        .iter()
        .filter(|v| v.error.is_none() && !leaving.contains(&v.name))
        .collect();
    HostRoom {
        name: h.name.clone(),
        vcpus: h.vcpus,
        memory_bytes: h.memory_bytes,
        used_vcpus: staying.iter().map(|v| v.vcpus.unwrap_or(1)).sum(),
        used_memory_bytes: staying.iter().map(|v| v.ram_bytes.unwrap_or(0)).sum(),
        vms: staying
            .iter()
            .map(|v| Resident {
                name: v.name.clone(),
                classes: classes(v),
                groups: v.groups.clone(),
                anti_affinity: v.anti_affinity.clone(),
            })
            .collect(),
    }
}

/// Where a VM of this name is found: every answering entry, as (host, VM).
pub fn where_is<'a>(check: &'a CheckReport, vm: &str) -> Vec<(&'a str, &'a VmCheck)> {
    check
        .hosts
        .iter()
        .flat_map(|h| h.vms.iter().map(move |v| (h.name.as_str(), v)))
        .filter(|(_, v)| v.name == vm && v.error.is_none())
        .collect()
}

/// Whether a source's migration status says a migration is under way, or ended without the source running again
/// (what `--adopt` takes over).
pub fn adoptable(vm: &VmCheck) -> bool {
    let status = vm.migration.as_deref().unwrap_or("none");
    let run_state = vm.run_state.as_deref().unwrap_or("");
    crate::migrate::is_in_flight(status)
        || (matches!(status, "completed" | "failed" | "cancelled") && run_state != "running")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Figures, Label};

    const MIB: u64 = 1 << 20;

    fn vm(name: &str, host: &str, ram_mib: u64, dirty_mib: f64, class: Class) -> VmCheck {
        VmCheck {
            name: name.into(),
            name_from: "given",
            host: host.into(),
            socket: format!("/run/{name}.qmp"),
            qemu_version: Some("10.0.0".into()),
            run_state: Some("running".into()),
            ram_bytes: Some(ram_mib * MIB),
            vcpus: Some(1),
            migration: None,
            classes: vec![Label {
                class,
                evidence: vec![],
            }],
            figures: Some(Figures {
                dirty_rate_bytes_per_s: Some(dirty_mib * MIB as f64),
                ..Default::default()
            }),
            memory: None,
            macs: vec![],
            groups: vec![],
            anti_affinity: vec![],
            error: None,
            locked_by: None,
        }
    }

    fn basis() -> PredictionBasis {
        PredictionBasis {
            bandwidth_bytes_per_s: 10 * MIB,
            downtime: Duration::from_millis(300),
            timeout: Duration::from_secs(300),
        }
    }

    #[test]
    fn predictions_follow_the_model_and_a_divergent_vm_counts_at_the_timeout() {
        let idle = candidate(&vm("a", "h1", 100, 0.0, Class::Idle), &basis(), None);
        // 100 MiB at 10 MiB/s, nothing dirtied: the first pass and an empty second, and the fixed costs.
        let secs = idle.predicted.as_secs_f64();
        assert!((9.7..10.1).contains(&secs), "{}", idle.prediction);
        // What an earlier migration taught: 40 % of it non-zero.
        let taught = VmCalibration {
            nonzero_fraction: Some(0.4),
            ..VmCalibration::default()
        };
        let calibrated = candidate(
            &vm("a", "h1", 100, 0.0, Class::Idle),
            &basis(),
            Some(&taught),
        );
        let secs = calibrated.predicted.as_secs_f64();
        assert!((3.7..4.1).contains(&secs), "{}", calibrated.prediction);
        // A dirty rate measured at a third of the truth, corrected by the factor remembered for page-sampling.
        let low = vm("c", "h1", 100, 3.0, Class::DirtyMemory);
        let fast = VmCalibration {
            method: Some("page-sampling".into()),
            dirty_factor: Some(4.0),
            ..VmCalibration::default()
        };
        assert!(
            candidate(&low, &basis(), Some(&fast)).predicted
                > candidate(&low, &basis(), None).predicted
        );
        let busy = candidate(
            &vm("b", "h1", 100, 20.0, Class::DirtyMemory),
            &basis(),
            None,
        );
        assert_eq!(
            busy.predicted,
            Duration::from_secs(300),
            "{}",
            busy.prediction
        );
        assert!(
            busy.prediction.contains("does not converge"),
            "{}",
            busy.prediction
        );
        assert_eq!(busy.classes, vec![Class::DirtyMemory]);
    }

    fn host(name: &str, vms: Vec<VmCheck>) -> HostCheck {
        HostCheck {
            name: name.into(),
            transport: "ssh".into(),
            migration_address: "10.0.0.1".into(),
            vcpus: 4,
            cpus: 1,
            memory_bytes: 1024 * MIB,
            nic_bytes_per_s: 10 * MIB,
            reachable: true,
            error: None,
            classes_note: None,
            vms,
        }
    }

    #[test]
    fn rooms_count_the_vms_that_stay_and_skip_the_drained_and_broken_hosts() {
        let mut broken = host("h4", vec![]);
        broken.error = Some("ssh: timed out".into());
        let mut dead = vm("dead", "h2", 512, 0.0, Class::Idle);
        dead.error = Some("refused".into());
        let check = CheckReport {
            inventory: "i.toml".into(),
            hosts: vec![
                host("h1", vec![vm("a", "h1", 100, 0.0, Class::Idle)]),
                host("h2", vec![vm("b", "h2", 200, 0.0, Class::Web), dead]),
                host("h3", vec![vm("c", "h3", 300, 0.0, Class::Idle)]),
                broken,
            ],
            problems: vec![],
        };
        let r = rooms(&check, "h1", &["c".to_string()]);
        let names: Vec<&str> = r.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["h2", "h3"]);
        assert_eq!(r[0].used_memory_bytes, 200 * MIB);
        assert_eq!(r[0].vms.len(), 1);
        assert_eq!(r[0].vms[0].classes, vec![Class::Web]);
        assert_eq!(r[1].used_memory_bytes, 0, "c leaves h3");
        assert_eq!(where_is(&check, "b").len(), 1);
        assert!(where_is(&check, "dead").is_empty());
    }

    #[test]
    fn adoptable_table() {
        #[rustfmt::skip]
        let rows = [
            (Some("active"), "running", true),
            (Some("postcopy-paused"), "paused", true),
            (Some("completed"), "postmigrate", true),
            (Some("failed"), "paused", true),
            (Some("failed"), "running", false),
            (Some("cancelled"), "running", false),
            (None, "running", false),
        ];
        for (status, state, want) in rows {
            let mut v = vm("a", "h1", 1, 0.0, Class::Idle);
            v.migration = status.map(String::from);
            v.run_state = Some(state.into());
            assert_eq!(adoptable(&v), want, "{status:?} {state}");
        }
    }
}
