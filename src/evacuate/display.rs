//! What a migration and an evacuation show while they run: one line per running migration and an overall bar on a terminal
//! (indicatif multi-progress), or one log line per event otherwise. The executor only calls a [`Watcher`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::migrate::Progress;

/// A step of an evacuation as shown to its user.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The plan is made: this many VMs to move.
    Planned { moves: usize },
    Started {
        position: usize,
        vm: &'a str,
        from: &'a str,
        to: &'a str,
    },
    Ended {
        vm: &'a str,
        outcome: &'a str,
        took: Duration,
        reason: Option<&'a str>,
    },
    /// Something the user should know (a VM skipped, adopted, a budget moved).
    Note { text: &'a str },
}

/// Receives an evacuation's events and every running migration's progress.
pub trait Watcher: Send + Sync {
    fn event(&self, e: &Event<'_>);
    fn progress(&self, vm: &str, p: &Progress);
}

/// No display (library use, `--json` without a terminal).
pub struct Silent;

impl Watcher for Silent {
    fn event(&self, _: &Event<'_>) {}
    fn progress(&self, _: &str, _: &Progress) {}
}

/// One line per event on stderr, for logs and scripts.
pub struct Lines;

impl Watcher for Lines {
    fn event(&self, e: &Event<'_>) {
        eprintln!("{}", line(e));
    }
    fn progress(&self, _: &str, _: &Progress) {}
}

fn line(e: &Event<'_>) -> String {
    match e {
        Event::Planned { moves } => format!("evacuation: {moves} VMs to move"),
        Event::Started {
            position,
            vm,
            from,
            to,
        } => format!("[{position}] {vm}: {from} -> {to}: started"),
        Event::Ended {
            vm,
            outcome,
            took,
            reason,
        } => format!(
            "{vm}: {outcome} after {:.1} s{}",
            took.as_secs_f64(),
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        ),
        Event::Note { text } => (*text).to_string(),
    }
}

/// The terminal display: an overall bar over the VMs to move, and one bar per running migration.
pub struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    running: Mutex<BTreeMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} VMs moved · {elapsed} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        overall.set_prefix("evacuation");
        overall.enable_steady_tick(Duration::from_millis(200));
        Bars {
            multi,
            overall,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    fn bar_for(&self, vm: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(1));
        bar.set_style(
            ProgressStyle::with_template("  {prefix:20} {bar:24} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(vm.to_string());
        bar
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

impl Watcher for Bars {
    fn event(&self, e: &Event<'_>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::Planned { moves } => self.overall.set_length(*moves as u64),
            Event::Started { vm, .. } => {
                let bar = self.bar_for(vm);
                bar.set_message(line(e));
                running.insert(vm.to_string(), bar);
            }
            Event::Ended { vm, outcome, .. } => {
                if let Some(bar) = running.remove(*vm) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if *outcome == "completed" || *outcome == "adopted" {
                    self.overall.inc(1);
                }
                let _ = self.multi.println(line(e));
            }
            Event::Note { .. } => {
                let _ = self.multi.println(line(e));
            }
        }
    }

    fn progress(&self, vm: &str, p: &Progress) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bar) = running.get(vm) {
            show(bar, p);
        }
    }
}

/// One migration's progress on its bar: bytes sent of the RAM, and the figures the ladder looks at.
pub fn show(bar: &ProgressBar, p: &Progress) {
    bar.set_length(p.total_bytes.max(1));
    bar.set_position(p.total_bytes.saturating_sub(p.remaining_bytes));
    bar.set_message(format!(
        "{} pass {} · {}/s · dirty {}/s · throttle {}% · downtime limit {}ms",
        p.status,
        p.pass,
        bytesize::ByteSize(p.throughput_bytes_per_s as u64).to_string_as(true),
        bytesize::ByteSize(p.dirty_rate_bytes_per_s as u64).to_string_as(true),
        p.throttle_pct,
        p.downtime_limit.as_millis()
    ));
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.overall.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(remaining: u64) -> Progress {
        Progress {
            elapsed: Duration::from_secs(1),
            status: "active".into(),
            pass: 1,
            total_bytes: 100,
            remaining_bytes: remaining,
            transferred_bytes: 100 - remaining,
            throughput_bytes_per_s: 10.0,
            dirty_rate_bytes_per_s: 1.0,
            throttle_pct: 0,
            downtime_limit: Duration::from_millis(300),
        }
    }

    /// The bars follow the events: a bar per running migration, gone when it ends; the overall bar counts the
    /// moved VMs only.
    #[test]
    fn bars_follow_the_events() {
        let bars = Bars::new();
        bars.multi.set_draw_target(ProgressDrawTarget::hidden());
        bars.event(&Event::Planned { moves: 2 });
        for vm in ["a", "b"] {
            bars.event(&Event::Started {
                position: 1,
                vm,
                from: "h1",
                to: "h2",
            });
        }
        bars.progress("a", &progress(40));
        bars.progress("nobody", &progress(40));
        let bar_a = bars.running.lock().unwrap()["a"].clone();
        assert_eq!((bar_a.length(), bar_a.position()), (Some(100), 60));
        assert!(
            bar_a.message().contains("active pass 1"),
            "{}",
            bar_a.message()
        );
        bars.event(&Event::Ended {
            vm: "a",
            outcome: "completed",
            took: Duration::from_secs(3),
            reason: None,
        });
        bars.event(&Event::Ended {
            vm: "b",
            outcome: "failed",
            took: Duration::from_secs(3),
            reason: Some("QEMU reports the migration failed"),
        });
        assert!(bars.running.lock().unwrap().is_empty());
        assert_eq!(
            (bars.overall.position(), bars.overall.length()),
            (1, Some(2))
        );
    }

    #[test]
    fn lines_name_the_vm_and_the_outcome() {
        let l = line(&Event::Ended {
            vm: "web",
            outcome: "cancelled",
            took: Duration::from_millis(12_340),
            reason: Some("timeout"),
        });
        assert_eq!(l, "web: cancelled after 12.3 s (timeout)");
        let l = line(&Event::Started {
            position: 2,
            vm: "web",
            from: "h1",
            to: "h3",
        });
        assert_eq!(l, "[2] web: h1 -> h3: started");
    }
}
