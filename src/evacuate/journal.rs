//! The evacuation journal: append-only JSON lines, fsynced per record; replayed to resume or restore.
//!
//! It owns the journal's format, its lock (one writer at a time: an exclusive `flock` that the kernel drops when the
//! writer dies, so a stale lock cannot exist) and the replay of its records into run and VM states ([`replay`], pure:
//! no I/O, no clock). It never decides what to migrate and never talks to QEMU: the executor (`crate::evacuate`)
//! journals every state change and asks the replayed [`History`] what is left to do (`--resume`) or what to bring
//! back (`--restore`).
//!
//! A crash can only cut the last record: each append is one write of one line, fsynced before the next begins. An
//! unterminated last line that does not parse is such a cut; it is dropped when read, and cut off when the journal is
//! next opened for writing, so that the file reads back cleanly afterwards.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::plan::evacuate::{Order, Step};

/// One state change, one line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Record {
    /// A run begins: an evacuation, a restore, or a resumed run of either (`resumes` names the run it continues,
    /// and `plan` is that run's plan).
    Run {
        run: u64,
        kind: RunKind,
        host: String,
        order: Order,
        plan: Vec<Step>,
        resumes: Option<u64>,
        at_ms: u64,
        pid: u32,
    },
    /// A VM's migration starts.
    Start {
        run: u64,
        vm: String,
        from: String,
        to: String,
        at_ms: u64,
    },
    /// A VM's migration ended (or was never tried: "skipped", "refused"); `running_on` is where the guest runs
    /// after it (None: nowhere, or unknown).
    End {
        run: u64,
        vm: String,
        from: String,
        to: String,
        outcome: String,
        running_on: Option<String>,
        reason: Option<String>,
        at_ms: u64,
    },
    /// The run ended ("completed", "partial", "failed", "interrupted").
    Finish {
        run: u64,
        outcome: String,
        at_ms: u64,
    },
}

impl Record {
    /// The run the record belongs to.
    pub fn run(&self) -> u64 {
        match self {
            Record::Run { run, .. }
            | Record::Start { run, .. }
            | Record::End { run, .. }
            | Record::Finish { run, .. } => *run,
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    /// Moves the VMs off `host`.
    Evacuate,
    /// Moves the VMs an evacuation of `host` moved back to it.
    Restore,
    /// Moves a balancing policy chose, from any hosts to fixed destinations (`qmigrate balance`); its `host` is
    /// [`CLUSTER`].
    Balance,
}

/// The `host` of a balance run's records: the whole cluster, not one host.
pub const CLUSTER: &str = "*";

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunKind::Evacuate => "evacuate",
            RunKind::Restore => "restore",
            RunKind::Balance => "balance",
        })
    }
}

/// Does an End with this outcome leave the guest running on its destination? ("adopted": found already running
/// there on resume.)
pub fn is_moved(outcome: &str) -> bool {
    matches!(outcome, "completed" | "adopted")
}

/// Unix time in milliseconds, for the records' `at_ms`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path} is in use by another qmigrate (pid {holder}); wait for it to finish, or give this run another --journal")]
    Held { path: PathBuf, holder: String },
    #[error("cannot {action} journal {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path}:{line} is not a journal record")]
    Parse {
        path: PathBuf,
        /// 1-based.
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A journal open for appending, held exclusively until dropped (or until the process dies).
#[derive(Debug)]
pub struct Journal {
    file: Flock<File>,
    path: PathBuf,
    /// The length of the file's whole lines: a failed append is cut back to it.
    len: u64,
}

impl Journal {
    /// Opens the journal (creating it and its parent directories) and takes its lock without waiting: a journal in
    /// use by another qmigrate is [`JournalError::Held`], naming the holder's pid (kept in the sibling file
    /// `PATH.pid`). Returns the records already in it. An unterminated last line is made whole before anything is
    /// appended: kept and ended with '\n' if it is a record, cut off (and logged) if it is the head of a record a
    /// crash interrupted.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error("create the directory of", path))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error("open", path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                return Err(JournalError::Held {
                    path: path.to_path_buf(),
                    holder: holder(path),
                });
            }
            Err((_, errno)) => return Err(io_error("lock", path)(errno.into())),
        };
        // The new file's directory entry on disk too, so that a crash cannot lose the journal itself.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("sync the directory of", path))?;
        }
        // Only read when the lock is refused: a stale file is harmless.
        let _ = std::fs::write(pid_path(path), std::process::id().to_string());

        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error("read", path))?;
        let parsed = parse(path, &bytes)?;
        let mut len = bytes.len() as u64;
        match parsed.tail {
            Tail::Whole => {}
            Tail::Unterminated => {
                file.write_all(b"\n")
                    .and_then(|()| file.sync_data())
                    .map_err(io_error("end the last line of", path))?;
                len += 1;
            }
            Tail::Cut { at, line } => {
                tracing::warn!(
                    journal = %path.display(),
                    line,
                    "dropped the unterminated last line of the journal (a record cut by a crash)"
                );
                file.set_len(at as u64)
                    .and_then(|()| file.sync_data())
                    .map_err(io_error("cut the unterminated last line of", path))?;
                len = at as u64;
            }
        }
        Ok((
            Journal {
                file,
                path: path.to_path_buf(),
                len,
            },
            parsed.records,
        ))
    }

    /// Appends one record as one line, and returns once it is on disk (`sync_data`).
    pub fn append(&mut self, rec: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(rec)
            .map_err(|e| io_error("encode a record for", &self.path)(std::io::Error::other(e)))?;
        line.push(b'\n');
        if let Err(e) = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
        {
            // Part of the line may be in the file: cut it off so that the next record starts on its own line.
            let _ = self.file.set_len(self.len);
            return Err(io_error("append to", &self.path)(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a journal without locking it (a dry run, a report, a test); a missing file has no records. An unterminated
/// last line that does not parse (a record being written, or cut by a crash) is dropped and logged.
pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    let parsed = parse(path, &bytes)?;
    if let Tail::Cut { line, .. } = parsed.tail {
        tracing::warn!(
            journal = %path.display(),
            line,
            "ignored the unterminated last line of the journal (a record cut by a crash, or being written)"
        );
    }
    Ok(parsed.records)
}

/// The journal of evacuations of `host` unless `--journal` says otherwise:
/// `$XDG_STATE_HOME/qmigrate/evacuate-HOST.jsonl`, else `$HOME/.local/state/qmigrate/evacuate-HOST.jsonl`, with
/// every character of HOST other than `[A-Za-z0-9._-]` made '_'.
pub fn default_path(host: &str) -> PathBuf {
    state_dir(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
        .join("qmigrate")
        .join(file_name(host))
}

/// The journal of `qmigrate balance` unless `--journal` says otherwise: `balance.jsonl` in the same directory as
/// [`default_path`]'s.
pub fn default_balance_path() -> PathBuf {
    state_dir(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
        .join("qmigrate")
        .join("balance.jsonl")
}

/// The XDG state directory; a relative `XDG_STATE_HOME` is ignored, as the XDG spec asks.
fn state_dir(xdg_state_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    match xdg_state_home.map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => home
            .filter(|h| !h.is_empty())
            .map_or_else(|| PathBuf::from("."), PathBuf::from)
            .join(".local")
            .join("state"),
    }
}

fn file_name(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("evacuate-{safe}.jsonl")
}

fn pid_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(".pid");
    PathBuf::from(p)
}

fn holder(path: &Path) -> String {
    std::fs::read_to_string(pid_path(path))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or_else(|| "unknown".into(), |pid| pid.to_string())
}

/// The records of a journal's bytes, and the state of its last line.
struct Parsed {
    records: Vec<Record>,
    tail: Tail,
}

enum Tail {
    /// The file is empty or ends with '\n'.
    Whole,
    /// The last line lacks its '\n' but is a whole record (or blank): it only needs ending.
    Unterminated,
    /// The last line (1-based `line`, starting at byte `at`) lacks its '\n' and is not a record: the head of a
    /// record whose write was cut.
    Cut { at: usize, line: usize },
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, JournalError> {
    let mut records = Vec::new();
    let mut tail = Tail::Whole;
    let mut at = 0;
    let mut lines = bytes.split(|b| *b == b'\n').enumerate().peekable();
    while let Some((index, text)) = lines.next() {
        // The piece after the last '\n' is the only one without its own.
        let unterminated = lines.peek().is_none();
        let start = at;
        at += text.len() + 1;
        if text.iter().all(u8::is_ascii_whitespace) {
            if unterminated && !text.is_empty() {
                tail = Tail::Unterminated;
            }
            continue;
        }
        match serde_json::from_slice(text) {
            Ok(rec) => {
                records.push(rec);
                if unterminated {
                    tail = Tail::Unterminated;
                }
            }
            Err(_) if unterminated => {
                tail = Tail::Cut {
                    at: start,
                    line: index + 1,
                };
            }
            Err(source) => {
                return Err(JournalError::Parse {
                    path: path.to_path_buf(),
                    line: index + 1,
                    source,
                })
            }
        }
    }
    Ok(Parsed { records, tail })
}

/// Where a VM of a run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Nothing journaled yet.
    Planned,
    /// Its migration started and has not ended (in flight, or cut by a crash: the guest may run on either host).
    Started { from: String, to: String },
    Ended {
        from: String,
        to: String,
        outcome: String,
        running_on: Option<String>,
    },
}

impl VmState {
    /// Did it move (the guest runs on `to`)?
    pub fn moved(&self) -> bool {
        matches!(self, VmState::Ended { outcome, .. } if is_moved(outcome))
    }
}

/// A run as its records tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub run: u64,
    pub kind: RunKind,
    pub host: String,
    pub order: Order,
    pub plan: Vec<Step>,
    pub resumes: Option<u64>,
    /// Every VM's state, inherited along the `resumes` chain: a VM moved by the run this one resumes stays moved.
    pub vms: BTreeMap<String, VmState>,
    /// The Finish outcome, if the run finished.
    pub finished: Option<String>,
}

impl RunState {
    /// Was `vm` moved in this run or in a run it resumes (the "never migrate a VM twice" check)?
    pub fn moved(&self, vm: &str) -> bool {
        self.vms.get(vm).is_some_and(VmState::moved)
    }

    /// The steps left to do, in position order: never journaled, or started without an end (the executor must look
    /// where such a guest runs before migrating it: it may have moved already).
    pub fn pending(&self) -> Vec<&Step> {
        let mut steps: Vec<&Step> = self
            .plan
            .iter()
            .filter(|s| {
                matches!(
                    self.vms.get(&s.vm),
                    None | Some(VmState::Planned | VmState::Started { .. })
                )
            })
            .collect();
        steps.sort_by_key(|s| s.position);
        steps
    }
}

/// A journal replayed: its runs, in the order they began.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub runs: Vec<RunState>,
    /// Start, End and Finish records naming no run begun before them (ignored).
    pub orphans: usize,
    /// Every End, in journal order, with the index of its run in `runs`: where the VMs went, for `to_restore`.
    ends: Vec<(usize, EndRecord)>,
    max_run: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct EndRecord {
    vm: String,
    to: String,
    outcome: String,
    running_on: Option<String>,
}

/// Replays records into runs and VM states. Pure.
pub fn replay(records: &[Record]) -> History {
    let mut h = History::default();
    for rec in records {
        h.max_run = h.max_run.max(rec.run());
        match rec {
            Record::Run {
                run,
                kind,
                host,
                order,
                plan,
                resumes,
                ..
            } => {
                let mut vms = resumes
                    .and_then(|r| h.index_of(r, h.runs.len()))
                    .map(|i| h.runs[i].vms.clone())
                    .unwrap_or_default();
                for step in plan {
                    vms.entry(step.vm.clone()).or_insert(VmState::Planned);
                }
                h.runs.push(RunState {
                    run: *run,
                    kind: *kind,
                    host: host.clone(),
                    order: *order,
                    plan: plan.clone(),
                    resumes: *resumes,
                    vms,
                    finished: None,
                });
            }
            Record::Start {
                run, vm, from, to, ..
            } => match h.index_of(*run, h.runs.len()) {
                Some(i) => {
                    h.runs[i].vms.insert(
                        vm.clone(),
                        VmState::Started {
                            from: from.clone(),
                            to: to.clone(),
                        },
                    );
                }
                None => h.orphans += 1,
            },
            Record::End {
                run,
                vm,
                from,
                to,
                outcome,
                running_on,
                ..
            } => match h.index_of(*run, h.runs.len()) {
                Some(i) => {
                    let state = h.runs[i].vms.entry(vm.clone()).or_insert(VmState::Planned);
                    // An End with no Start since the VM moved ("skipped", "refused" on resume) tried nothing, so
                    // it cannot undo the move.
                    if is_moved(outcome) || !state.moved() {
                        *state = VmState::Ended {
                            from: from.clone(),
                            to: to.clone(),
                            outcome: outcome.clone(),
                            running_on: running_on.clone(),
                        };
                    }
                    h.ends.push((
                        i,
                        EndRecord {
                            vm: vm.clone(),
                            to: to.clone(),
                            outcome: outcome.clone(),
                            running_on: running_on.clone(),
                        },
                    ));
                }
                None => h.orphans += 1,
            },
            Record::Finish { run, outcome, .. } => match h.index_of(*run, h.runs.len()) {
                Some(i) => h.runs[i].finished = Some(outcome.clone()),
                None => h.orphans += 1,
            },
        }
    }
    h
}

impl History {
    /// The number for a new run: one more than any in the journal, 1 for an empty one.
    pub fn next_run(&self) -> u64 {
        self.max_run + 1
    }

    /// The run `--resume` continues for `host`: the latest run (of either kind) of `host`, if it has no Finish. A
    /// later run of `host` supersedes an earlier unfinished one (it started afresh from the hosts as they were).
    /// The state has the VM states merged along the `resumes` chain, and the plan and order of the chain's first
    /// run; its `run` is the latest run of the chain, which the resuming Run record names in `resumes`.
    pub fn unfinished(&self, host: &str) -> Option<RunState> {
        let last = self.runs.iter().rposition(|r| r.host == host)?;
        if self.runs[last].finished.is_some() {
            return None;
        }
        let root = &self.runs[self.root(last)];
        let mut state = self.runs[last].clone();
        state.plan.clone_from(&root.plan);
        state.order = root.order;
        Some(state)
    }

    /// The VMs an evacuation of `host` moved (completed or adopted) that no later move brought back to `host`, with
    /// the host each runs on now by the journal (the last End that says where it runs; a "lost" one keeps the last
    /// known host). In the order of the positions in the evacuation's plan (the first run of its `resumes` chain),
    /// earlier evacuations first.
    pub fn to_restore(&self, host: &str) -> Vec<(String, String)> {
        // VM → (sort key, where it runs now).
        let mut away: BTreeMap<&str, ((usize, usize, usize), &str)> = BTreeMap::new();
        for (seq, (i, end)) in self.ends.iter().enumerate() {
            let run = &self.runs[*i];
            let now = if is_moved(&end.outcome) {
                if run.kind == RunKind::Evacuate && run.host == host {
                    let root = self.root(*i);
                    let position = self.runs[root]
                        .plan
                        .iter()
                        .chain(&run.plan)
                        .find(|s| s.vm == end.vm)
                        .map_or(usize::MAX, |s| s.position);
                    away.insert(&end.vm, ((root, position, seq), &end.to));
                    continue;
                }
                Some(end.to.as_str())
            } else {
                end.running_on.as_deref()
            };
            match now {
                Some(now) if now == host => {
                    away.remove(end.vm.as_str());
                }
                Some(now) => {
                    if let Some((_, at)) = away.get_mut(end.vm.as_str()) {
                        *at = now;
                    }
                }
                None => {}
            }
        }
        let mut list: Vec<_> = away.into_iter().collect();
        list.sort_by_key(|(_, (key, _))| *key);
        list.into_iter()
            .map(|(vm, (_, at))| (vm.to_string(), at.to_string()))
            .collect()
    }

    /// The index in `runs[..before]` of the latest run numbered `run`.
    fn index_of(&self, run: u64, before: usize) -> Option<usize> {
        self.runs[..before].iter().rposition(|r| r.run == run)
    }

    /// The index of the first run of the `resumes` chain through `runs[i]`.
    fn root(&self, mut i: usize) -> usize {
        while let Some(j) = self.runs[i].resumes.and_then(|r| self.index_of(r, i)) {
            i = j;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn step(position: usize, vm: &str, from: &str, to: &str) -> Step {
        Step {
            position,
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            classes: vec![],
            vcpus: 2,
            memory_bytes: 1 << 30,
            predicted: Duration::from_millis(3_500),
            prediction: "1 GiB at 300 MiB/s".into(),
            why_host: "most room".into(),
            why_position: "fifo".into(),
        }
    }

    fn run(run: u64, kind: RunKind, host: &str, plan: Vec<Step>, resumes: Option<u64>) -> Record {
        Record::Run {
            run,
            kind,
            host: host.into(),
            order: Order::Fifo,
            plan,
            resumes,
            at_ms: 1_000 * run,
            pid: 42,
        }
    }

    fn start(run: u64, vm: &str, from: &str, to: &str) -> Record {
        Record::Start {
            run,
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            at_ms: 0,
        }
    }

    fn end(run: u64, vm: &str, from: &str, to: &str, outcome: &str, on: Option<&str>) -> Record {
        Record::End {
            run,
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
            outcome: outcome.into(),
            running_on: on.map(Into::into),
            reason: (outcome != "completed").then(|| format!("{outcome} for a test")),
            at_ms: 0,
        }
    }

    /// A migration of `vm` that started and ended with `outcome`.
    fn moved(
        run: u64,
        vm: &str,
        from: &str,
        to: &str,
        outcome: &str,
        on: Option<&str>,
    ) -> [Record; 2] {
        [
            start(run, vm, from, to),
            end(run, vm, from, to, outcome, on),
        ]
    }

    fn finish(run: u64, outcome: &str) -> Record {
        Record::Finish {
            run,
            outcome: outcome.into(),
            at_ms: 0,
        }
    }

    fn one_of_each() -> Vec<Record> {
        vec![
            Record::Run {
                run: 1,
                kind: RunKind::Evacuate,
                host: "h1".into(),
                order: Order::Random { seed: 7 },
                plan: vec![step(1, "a", "h1", "h2"), step(2, "b", "h1", "h3")],
                resumes: None,
                at_ms: 1_700_000_000_000,
                pid: 4242,
            },
            start(1, "a", "h1", "h2"),
            end(1, "a", "h1", "h2", "completed", Some("h2")),
            end(1, "b", "h1", "h3", "lost", None),
            finish(1, "partial"),
            run(
                2,
                RunKind::Restore,
                "h1",
                vec![step(1, "a", "h2", "h1")],
                Some(1),
            ),
        ]
    }

    #[test]
    fn records_read_back_as_written_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/qmigrate/j.jsonl");
        let (mut journal, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        assert_eq!(journal.path(), path);
        for rec in one_of_each() {
            journal.append(&rec).unwrap();
        }
        drop(journal);

        let (_journal, back) = Journal::open(&path).unwrap();
        assert_eq!(back, one_of_each());
        assert_eq!(read(&path).unwrap(), one_of_each());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), one_of_each().len());
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["event"].is_string(), "{line}");
        }
    }

    #[test]
    fn a_missing_journal_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&dir.path().join("none.jsonl")).unwrap(), vec![]);
    }

    fn write_raw(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn a_record_cut_by_a_crash_is_dropped_and_cut_off_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let recs = one_of_each();
        let (mut journal, _) = Journal::open(&path).unwrap();
        journal.append(&recs[0]).unwrap();
        journal.append(&recs[1]).unwrap();
        drop(journal);
        let whole = serde_json::to_string(&recs[2]).unwrap();
        write_raw(&path, &whole.as_bytes()[..whole.len() / 2]);

        assert_eq!(read(&path).unwrap(), recs[..2]);
        let (mut journal, old) = Journal::open(&path).unwrap();
        assert_eq!(old, recs[..2]);
        journal.append(&recs[3]).unwrap();
        drop(journal);

        assert_eq!(read(&path).unwrap(), [&recs[..2], &recs[3..4]].concat());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn an_unterminated_whole_record_is_kept_and_the_next_starts_on_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let recs = one_of_each();
        write_raw(&path, serde_json::to_string(&recs[0]).unwrap().as_bytes());

        assert_eq!(read(&path).unwrap(), recs[..1]);
        let (mut journal, old) = Journal::open(&path).unwrap();
        assert_eq!(old, recs[..1]);
        journal.append(&recs[1]).unwrap();
        drop(journal);
        assert_eq!(read(&path).unwrap(), recs[..2]);
    }

    #[test]
    fn a_bad_record_before_the_last_line_is_an_error_naming_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let recs = one_of_each();
        let good = serde_json::to_string(&recs[0]).unwrap();
        // A terminated last line was written whole: it is not a cut, so it must parse too.
        for (text, line) in [
            (
                format!("{good}\n\n{{\"event\":\"jump\",\"run\":1}}\n{good}\n"),
                3,
            ),
            (format!("{good}\n\n{good}\n{{\"event\":\"start\"\n"), 4),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = read(&path).unwrap_err();
            assert!(
                matches!(err, JournalError::Parse { line: l, .. } if l == line),
                "{err:?}"
            );
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("{}:{line}", path.display())),
                "{shown}"
            );
            let serde_message = std::error::Error::source(&err).unwrap().to_string();
            assert!(serde_message.contains("line 1"), "{serde_message}");
            assert!(matches!(
                Journal::open(&path),
                Err(JournalError::Parse { line: l, .. }) if l == line
            ));
        }
    }

    #[test]
    fn a_journal_in_use_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (first, _) = Journal::open(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        match &err {
            JournalError::Held { path: p, holder } => {
                assert_eq!(p, &path);
                assert_eq!(holder, &std::process::id().to_string());
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("j.jsonl"), "{err}");
        // A reader does not need the lock.
        assert_eq!(read(&path).unwrap(), vec![]);
        drop(first);
        Journal::open(&path).expect("free again once closed");
    }

    #[test]
    fn the_default_journal_is_in_the_xdg_state_directory_with_a_file_safe_name() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(state_dir(os("/s"), os("/home/u")), Path::new("/s"));
        assert_eq!(
            state_dir(os("relative"), os("/home/u")),
            Path::new("/home/u/.local/state")
        );
        assert_eq!(
            state_dir(None, os("/home/u")),
            Path::new("/home/u/.local/state")
        );
        assert_eq!(state_dir(None, None), Path::new("./.local/state"));
        assert_eq!(file_name("node-1.lan"), "evacuate-node-1.lan.jsonl");
        assert_eq!(file_name("u@h/../x y"), "evacuate-u_h_.._x_y.jsonl");
        let p = default_path("h 1");
        assert!(p.ends_with("qmigrate/evacuate-h_1.jsonl"), "{p:?}");
    }

    #[test]
    fn run_numbers_follow_the_highest() {
        assert_eq!(replay(&[]).next_run(), 1);
        let h = replay(&[
            run(1, RunKind::Evacuate, "h", vec![], None),
            run(5, RunKind::Restore, "h", vec![], None),
            run(2, RunKind::Evacuate, "h", vec![], None),
        ]);
        assert_eq!(h.next_run(), 6);
    }

    fn plan_h() -> Vec<Step> {
        vec![
            step(1, "a", "h", "x"),
            step(2, "b", "h", "y"),
            step(3, "c", "h", "x"),
            step(4, "d", "h", "y"),
        ]
    }

    #[test]
    fn unfinished_runs_resume_with_the_states_of_their_whole_chain() {
        use RunKind::{Evacuate, Restore};
        struct Case {
            name: &'static str,
            records: Vec<Record>,
            /// (run, pending VMs, moved VMs), or None when nothing is resumable.
            want: Option<(u64, Vec<&'static str>, Vec<&'static str>)>,
        }
        let cases = vec![
            Case {
                name: "an empty journal",
                records: vec![],
                want: None,
            },
            Case {
                name: "a finished run",
                records: [
                    vec![run(1, Evacuate, "h", plan_h(), None)],
                    moved(1, "a", "h", "x", "completed", Some("x")).to_vec(),
                    vec![finish(1, "partial")],
                ]
                .concat(),
                want: None,
            },
            Case {
                name: "a killed run: done, failed, in flight and untouched VMs",
                records: [
                    vec![run(1, Evacuate, "h", plan_h(), None)],
                    moved(1, "c", "h", "x", "completed", Some("x")).to_vec(),
                    moved(1, "a", "h", "x", "failed", Some("h")).to_vec(),
                    vec![start(1, "d", "h", "y")],
                ]
                .concat(),
                want: Some((1, vec!["b", "d"], vec!["c"])),
            },
            Case {
                name: "a resumed run killed again keeps the moves of the run it resumed",
                records: [
                    vec![run(1, Evacuate, "h", plan_h(), None)],
                    moved(1, "a", "h", "x", "completed", Some("x")).to_vec(),
                    vec![start(1, "b", "h", "y")],
                    vec![run(2, Evacuate, "h", plan_h(), Some(1))],
                    vec![end(2, "b", "h", "y", "adopted", Some("y"))],
                    // Bookkeeping for a VM already moved does not undo its move.
                    vec![end(2, "a", "h", "x", "skipped", None)],
                    vec![start(2, "d", "h", "y")],
                ]
                .concat(),
                want: Some((2, vec!["c", "d"], vec!["a", "b"])),
            },
            Case {
                name: "a resumed run that finished ends the chain",
                records: [
                    vec![run(1, Evacuate, "h", plan_h(), None)],
                    moved(1, "a", "h", "x", "completed", Some("x")).to_vec(),
                    vec![run(2, Evacuate, "h", plan_h(), Some(1))],
                    vec![finish(2, "completed")],
                ]
                .concat(),
                want: None,
            },
            Case {
                name: "a later run of the host supersedes an unfinished one",
                records: vec![
                    run(1, Evacuate, "h", plan_h(), None),
                    run(2, Restore, "h", vec![], None),
                    finish(2, "completed"),
                ],
                want: None,
            },
            Case {
                name: "runs of other hosts do not count",
                records: vec![
                    run(1, Evacuate, "h", plan_h(), None),
                    run(2, Evacuate, "g", vec![], None),
                    finish(2, "completed"),
                ],
                want: Some((1, vec!["a", "b", "c", "d"], vec![])),
            },
            Case {
                name: "an unfinished restore resumes too",
                records: [
                    vec![run(3, Restore, "h", vec![step(1, "a", "x", "h")], None)],
                    moved(3, "a", "x", "h", "cancelled", Some("x")).to_vec(),
                ]
                .concat(),
                want: Some((3, vec![], vec![])),
            },
        ];
        for case in cases {
            let state = replay(&case.records).unfinished("h");
            let got = state.as_ref().map(|r| {
                let pending: Vec<&str> = r.pending().into_iter().map(|s| s.vm.as_str()).collect();
                let moved: Vec<&str> = r
                    .vms
                    .keys()
                    .map(String::as_str)
                    .filter(|vm| r.moved(vm))
                    .collect();
                (r.run, pending, moved)
            });
            assert_eq!(got, case.want, "{}", case.name);
        }
    }

    #[test]
    fn a_resumed_chain_keeps_the_first_runs_plan_and_order() {
        let records = vec![
            Record::Run {
                run: 1,
                kind: RunKind::Evacuate,
                host: "h".into(),
                order: Order::Sjf,
                plan: plan_h(),
                resumes: None,
                at_ms: 0,
                pid: 1,
            },
            run(2, RunKind::Evacuate, "h", plan_h()[2..].to_vec(), Some(1)),
        ];
        let r = replay(&records).unfinished("h").unwrap();
        assert_eq!((r.run, r.resumes, r.order), (2, Some(1), Order::Sjf));
        assert_eq!(r.plan, plan_h());
    }

    #[test]
    fn records_of_unknown_runs_are_counted_and_ignored() {
        let h = replay(&[start(9, "a", "h", "x"), finish(9, "completed")]);
        assert_eq!((h.runs.len(), h.orphans, h.next_run()), (0, 2, 10));
    }

    #[test]
    fn to_restore_lists_what_an_evacuation_moved_and_no_later_move_brought_back() {
        use RunKind::{Evacuate, Restore};
        struct Case {
            name: &'static str,
            records: Vec<Record>,
            want: Vec<(&'static str, &'static str)>,
        }
        // Run 1 moves c and a, fails b, loses d; killed. Run 2 resumes it and adopts b.
        let evacuation = [
            vec![run(1, Evacuate, "h", plan_h(), None)],
            moved(1, "c", "h", "x", "completed", Some("x")).to_vec(),
            moved(1, "a", "h", "x", "completed", Some("x")).to_vec(),
            moved(1, "b", "h", "y", "failed", Some("h")).to_vec(),
            moved(1, "d", "h", "y", "lost", None).to_vec(),
            vec![run(2, Evacuate, "h", plan_h(), Some(1))],
            vec![end(2, "b", "h", "y", "adopted", Some("y"))],
            vec![finish(2, "partial")],
        ]
        .concat();
        let cases = vec![
            Case {
                name: "nothing journaled",
                records: vec![],
                want: vec![],
            },
            Case {
                name: "moved and adopted VMs in plan order, across the resumed chain",
                records: evacuation.clone(),
                want: vec![("a", "x"), ("b", "y"), ("c", "x")],
            },
            Case {
                name: "only evacuations of this host",
                records: evacuation.clone(),
                want: vec![],
            },
            Case {
                name: "a restore brings VMs back; a failed restore leaves them where they run",
                records: [
                    evacuation.clone(),
                    vec![run(3, Restore, "h", vec![], None)],
                    moved(3, "a", "x", "h", "completed", Some("h")).to_vec(),
                    moved(3, "c", "x", "h", "rolled-back", Some("x")).to_vec(),
                    vec![start(3, "b", "y", "h")],
                ]
                .concat(),
                want: vec![("b", "y"), ("c", "x")],
            },
            Case {
                name: "a VM moved again later is where it went last",
                records: [
                    evacuation.clone(),
                    vec![run(3, Evacuate, "x", vec![], None)],
                    moved(3, "a", "x", "z", "completed", Some("z")).to_vec(),
                    moved(3, "c", "x", "y", "failed", Some("x")).to_vec(),
                    moved(3, "b", "y", "w", "lost", None).to_vec(),
                ]
                .concat(),
                want: vec![("a", "z"), ("b", "y"), ("c", "x")],
            },
            Case {
                name: "a VM evacuated again after a restore is listed again, after the earlier evacuation's",
                records: [
                    evacuation.clone(),
                    vec![run(3, Restore, "h", vec![], None)],
                    moved(3, "a", "x", "h", "completed", Some("h")).to_vec(),
                    vec![run(4, Evacuate, "h", vec![step(1, "a", "h", "w")], None)],
                    moved(4, "a", "h", "w", "completed", Some("w")).to_vec(),
                ]
                .concat(),
                want: vec![("b", "y"), ("c", "x"), ("a", "w")],
            },
        ];
        for case in cases {
            let host = if case.name == "only evacuations of this host" {
                "x"
            } else {
                "h"
            };
            let got = replay(&case.records).to_restore(host);
            let want: Vec<(String, String)> = case
                .want
                .iter()
                .map(|(vm, at)| (vm.to_string(), at.to_string()))
                .collect();
            assert_eq!(got, want, "{}", case.name);
        }
    }
}
