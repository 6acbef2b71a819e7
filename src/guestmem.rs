//! How many bytes of a running guest's RAM are non-zero, estimated by reading sampled pages of the QEMU process's
//! guest-RAM mapping through `/proc/PID/mem` (on this host, or on the source host over ssh). It must not write to
//! the guest's memory, pause the guest, or read more than the sampled pages.
//!
//! Why the contents: precopy's first pass sends non-zero pages whole and zero pages as a few bytes, so what it
//! costs is the non-zero share of RAM. Neither the guest's own view (its free pages still hold old data) nor the
//! process's RSS (transparent huge pages fault in 2 MiB at a time) predicts that; the page contents do.
//!
//! Reading another process's memory needs root or ptrace rights over it.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::time::Duration;

use serde::Serialize;

use crate::qmp::Qmp;
use crate::remote::{HostError, HostLink};

/// The page QEMU decides zero or not (its target page on x86) and the unit read here.
pub const PAGE_BYTES: u64 = 4096;
/// Pages read on this host: 8 MiB of reads, a margin of about ±2 % of RAM.
pub const DEFAULT_SAMPLES: u32 = 2048;
/// Pages read on another host, where each costs a few processes: a margin of about ±6 % of RAM.
pub const REMOTE_SAMPLES: u32 = 256;
/// Bound on a local sampling (it reads a few MB).
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each of the two commands of a remote sampling.
pub const REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// One seed for every sampling, so that two estimates of one guest read the same pages and a difference between
/// them is the guest's, not the sample's.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// The `method` of every estimate made here.
pub const METHOD: &str = "page-contents";

#[derive(Debug, thiserror::Error)]
pub enum GuestMemError {
    #[error("{process}: cannot read /proc/{pid}/smaps")]
    Smaps {
        process: String,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{process}: no read-write mapping of {ram_bytes} bytes (the guest's RAM) in /proc/{pid}/smaps")]
    NoMapping {
        process: String,
        pid: i32,
        ram_bytes: u64,
    },
    #[error(
        "{process}: permission denied on {path} (reading it needs root or ptrace rights over QEMU)"
    )]
    Denied { process: String, path: String },
    #[error("{process}: cannot read /proc/{pid}/mem at {address:#x}")]
    Mem {
        process: String,
        pid: i32,
        address: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{process}: {step} failed")]
    Remote {
        process: String,
        /// What was being done: reading smaps, reading sampled pages, finding the process.
        step: &'static str,
        #[source]
        source: Box<HostError>,
    },
    #[error("{process}: reading sampled pages printed {what}")]
    RemoteOutput { process: String, what: String },
    #[error("QMP socket {socket}: the QEMU process is unknown (no peer credentials)")]
    NoPid { socket: String },
    #[error("{process}: sampling did not finish within {}", humantime::format_duration(*.timeout))]
    Timeout { process: String, timeout: Duration },
    #[error("{process}: the sampling task failed")]
    Task {
        process: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Where the guest's RAM is in the QEMU process's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub len_bytes: u64,
}

/// An estimate of the non-zero part of a guest's RAM from sampled pages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NonZeroEstimate {
    pub ram_bytes: u64,
    pub sampled_pages: u64,
    pub nonzero_pages: u64,
    pub nonzero_fraction: f64,
    pub nonzero_bytes: u64,
    /// Half the width of a 95 % interval around `nonzero_bytes`.
    pub margin_bytes: u64,
    pub method: &'static str,
}

/// One mapping of an smaps text: its header and the fields that decide whether it holds the guest's RAM.
#[derive(Debug)]
struct Entry<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    path: &'a str,
    size_kib: Option<u64>,
    /// `dc` in VmFlags: QEMU marks its RAM blocks MADV_DONTFORK (not its TCG code buffer, stacks or arenas).
    dont_fork: bool,
}

impl Entry<'_> {
    fn size_bytes(&self) -> u64 {
        self.size_kib
            .map_or(self.end.saturating_sub(self.start), |k| {
                k.saturating_mul(1024)
            })
    }

    /// How good a candidate for the guest's RAM this mapping is, lower being better; `None` if it is none.
    /// Anonymous beats file-backed (`memory-backend-file`, memfd), and a mapping QEMU marked as a RAM block beats
    /// one it did not (a thread stack or an arena of the same size).
    fn rank(&self, ram_bytes: u64) -> Option<u8> {
        let p = self.perms.as_bytes();
        let writable_data = p.len() == 4 && p[0] == b'r' && p[1] == b'w' && p[2] != b'x';
        // `[heap]`, `[stack]`, `[vvar]`… are the kernel's; `[anon:NAME]` is an anonymous mapping with a name.
        let anonymous = self.path.is_empty() || self.path.starts_with("[anon:");
        let kernel_named = self.path.starts_with('[') && !anonymous;
        if !writable_data || kernel_named || self.size_bytes() != ram_bytes {
            return None;
        }
        Some(u8::from(!anonymous) * 2 + u8::from(!self.dont_fork))
    }
}

/// PURE: the header of a mapping, `START-END PERMS OFFSET DEV INODE [PATH]`, or `None` for a field line.
fn header(line: &str) -> Option<Entry<'_>> {
    let mut f = line.splitn(6, ' ');
    let (start, end) = f.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = f.next()?;
    // Offset, device and inode; the path (which may hold spaces) follows after padding.
    f.next()?;
    f.next()?;
    f.next()?;
    Some(Entry {
        start,
        end,
        perms,
        path: f.next().unwrap_or("").trim(),
        size_kib: None,
        dont_fork: false,
    })
}

/// PURE: the mappings of an smaps text (or of a maps text, whose entries have no fields).
fn entries(smaps: &str) -> Vec<Entry<'_>> {
    let mut out: Vec<Entry<'_>> = Vec::new();
    for line in smaps.lines() {
        if let Some(e) = header(line) {
            out.push(e);
            continue;
        }
        let Some(last) = out.last_mut() else { continue };
        if let Some(v) = line.strip_prefix("Size:") {
            last.size_kib = v.trim().trim_end_matches("kB").trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            last.dont_fork = v.split_whitespace().any(|f| f == "dc");
        }
    }
    out
}

/// PURE: the mapping of a QEMU process's `/proc/PID/smaps` that holds a guest RAM of `ram_bytes`.
///
/// QEMU maps `pc.ram` as one block of exactly the RAM size, private and anonymous (`rw-p`, no path) unless a
/// `memory-backend-file` or memfd backs it (then it has a path, and is often shared). A mapping with a path is
/// taken only when no anonymous one matches. The TCG code buffer (`rwxp`) never matches. Among equals the first
/// (lowest address) is taken, preferring one QEMU marked as a RAM block (`dc`): for a guest as small as a thread
/// stack or a device's RAM, the pick may still be wrong. A RAM made of several backends (NUMA nodes, DIMMs) has no
/// one mapping of its size and is not found.
pub fn ram_mapping(smaps: &str, ram_bytes: u64) -> Option<Mapping> {
    entries(smaps)
        .iter()
        .filter_map(|e| e.rank(ram_bytes).map(|r| (r, e)))
        .min_by_key(|(r, _)| *r)
        .map(|(_, e)| Mapping {
            start: e.start,
            len_bytes: e.size_bytes(),
        })
}

/// PURE: `samples` page offsets into a mapping of `len_bytes`, one drawn at random (seeded) in each of `samples`
/// equal strata, in increasing order; every page once when there are fewer pages than samples.
pub fn sample_offsets(len_bytes: u64, page_bytes: u64, samples: u32, seed: u64) -> Vec<u64> {
    use rand::{RngExt as _, SeedableRng as _};
    if page_bytes == 0 {
        return Vec::new();
    }
    let pages = u128::from(len_bytes / page_bytes);
    let strata = u128::from(samples).min(pages);
    let mut rng = rand_xorshift::XorShiftRng::seed_from_u64(seed);
    (0..strata)
        .map(|i| {
            // Both bounds fit in u64: they are at most `pages`.
            let lo = (i * pages / strata) as u64;
            let hi = ((i + 1) * pages / strata) as u64;
            rng.random_range(lo..hi) * page_bytes
        })
        .collect()
}

/// PURE: the non-zero bytes of a RAM of `ram_bytes` of which `nonzero_pages` of `sampled_pages` were non-zero.
///
/// The margin is the binomial one (95 %, normal approximation), which overstates a stratified sample's; when no
/// page or every page was non-zero it is the rule of three (3/n), and with no sample it is the whole RAM.
pub fn estimate(ram_bytes: u64, sampled_pages: u64, nonzero_pages: u64) -> NonZeroEstimate {
    let nonzero_pages = nonzero_pages.min(sampled_pages);
    let (nonzero_fraction, nonzero_bytes, margin_fraction) = if sampled_pages == 0 {
        (0.0, 0, 1.0)
    } else {
        let n = sampled_pages as f64;
        let p = nonzero_pages as f64 / n;
        let bytes = u128::from(ram_bytes) * u128::from(nonzero_pages) / u128::from(sampled_pages);
        let margin = if nonzero_pages == 0 || nonzero_pages == sampled_pages {
            3.0 / n
        } else {
            1.96 * (p * (1.0 - p) / n).sqrt()
        };
        // At most `ram_bytes`, as `nonzero_pages <= sampled_pages`.
        (p, bytes as u64, margin.min(1.0))
    };
    NonZeroEstimate {
        ram_bytes,
        sampled_pages,
        nonzero_pages,
        nonzero_fraction,
        nonzero_bytes,
        margin_bytes: (margin_fraction * ram_bytes as f64).round() as u64,
        method: METHOD,
    }
}

/// PURE: the output of [`PAGES_SCRIPT`], one `0` or `1` a line: the count of `1`s, if there are `expected` lines.
fn count_nonzero(out: &str, expected: usize) -> Result<u64, String> {
    let mut lines = 0;
    let mut nonzero = 0;
    for line in out.lines() {
        lines += 1;
        match line.trim() {
            "0" => {}
            "1" => nonzero += 1,
            other => {
                return Err(format!(
                    "{:?} where 0 or 1 was due",
                    crate::text::printable(other)
                ))
            }
        }
    }
    if lines == expected {
        Ok(nonzero)
    } else {
        Err(format!("{lines} answers for {expected} pages"))
    }
}

fn local_process(pid: i32) -> String {
    format!("QEMU pid {pid}")
}

/// Estimates the non-zero bytes of the guest RAM (`ram_bytes`) of the QEMU process `pid` on this host by reading
/// `samples` pages of it. Synchronous (a few MB of reads): call it from `spawn_blocking`.
pub fn sample_local(
    pid: i32,
    ram_bytes: u64,
    samples: u32,
) -> Result<NonZeroEstimate, GuestMemError> {
    let process = local_process(pid);
    let smaps_path = format!("/proc/{pid}/smaps");
    let smaps = std::fs::read_to_string(&smaps_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            GuestMemError::Denied {
                process: process.clone(),
                path: smaps_path.clone(),
            }
        } else {
            GuestMemError::Smaps {
                process: process.clone(),
                pid,
                source,
            }
        }
    })?;
    let m = ram_mapping(&smaps, ram_bytes).ok_or_else(|| GuestMemError::NoMapping {
        process: process.clone(),
        pid,
        ram_bytes,
    })?;
    let mem_error = |address: u64, source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            GuestMemError::Denied {
                process: process.clone(),
                path: format!("/proc/{pid}/mem"),
            }
        } else {
            GuestMemError::Mem {
                process: process.clone(),
                pid,
                address,
                source,
            }
        }
    };
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| mem_error(m.start, e))?;
    let offsets = sample_offsets(m.len_bytes, PAGE_BYTES, samples, SEED);
    let mut page = [0u8; PAGE_BYTES as usize];
    let mut nonzero = 0;
    for offset in &offsets {
        let address = m.start + offset;
        mem.read_exact_at(&mut page, address)
            .map_err(|e| mem_error(address, e))?;
        if page.iter().any(|b| *b != 0) {
            nonzero += 1;
        }
    }
    Ok(estimate(ram_bytes, offsets.len() as u64, nonzero))
}

/// PURE: what a failed remote command means: `cat` and `dd` say "Permission denied" when the host's user may not
/// read the process's `path`; anything else is the step's failure.
fn remote_error(process: &str, step: &'static str, path: &str, source: HostError) -> GuestMemError {
    match &source {
        HostError::Command { stderr, .. } if stderr.contains("Permission denied") => {
            GuestMemError::Denied {
                process: process.to_string(),
                path: path.to_string(),
            }
        }
        _ => GuestMemError::Remote {
            process: process.to_string(),
            step,
            source: Box::new(source),
        },
    }
}

/// For each address $2.. in the memory of process $1, prints 1 if its page holds a non-zero byte, else 0. The first
/// page is read once alone so that a refusal (permission, no such process) ends the script with dd's reason.
const PAGES_SCRIPT: &str = r#"m=/proc/$1/mem; shift
dd if="$m" of=/dev/null bs=4096 count=1 iflag=skip_bytes skip="$1" status=none || exit 1
for a in "$@"; do
dd if="$m" bs=4096 count=1 iflag=skip_bytes skip="$a" status=none | tr -d '\000' | head -c1 | wc -c
done"#;

/// Estimates like [`sample_local`] for a QEMU process on another host: its smaps read with `cat`, then `samples`
/// pages read by one shell script (`dd` a page each), each command bounded by `timeout`.
pub async fn sample_remote(
    link: &HostLink,
    pid: i32,
    ram_bytes: u64,
    samples: u32,
    timeout: Duration,
) -> Result<NonZeroEstimate, GuestMemError> {
    let process = format!("host {}, QEMU pid {pid}", link.name());
    let smaps_path = format!("/proc/{pid}/smaps");
    let mem_path = format!("/proc/{pid}/mem");
    let out = link
        .run(&["cat", &smaps_path], timeout)
        .await
        .map_err(|e| remote_error(&process, "reading smaps", &smaps_path, e))?;
    let smaps = String::from_utf8_lossy(&out.stdout);
    let m = ram_mapping(&smaps, ram_bytes).ok_or_else(|| GuestMemError::NoMapping {
        process: process.clone(),
        pid,
        ram_bytes,
    })?;
    let offsets = sample_offsets(m.len_bytes, PAGE_BYTES, samples, SEED);
    if offsets.is_empty() {
        return Ok(estimate(ram_bytes, 0, 0));
    }
    let pid_arg = pid.to_string();
    let addresses: Vec<String> = offsets.iter().map(|o| (m.start + o).to_string()).collect();
    // `run` quotes every argument for the remote shell (shlex); the script gets them as $1, $2…
    let mut argv = vec!["sh", "-c", PAGES_SCRIPT, "sh", &pid_arg];
    argv.extend(addresses.iter().map(String::as_str));
    let out = link
        .run(&argv, timeout)
        .await
        .map_err(|e| remote_error(&process, "reading sampled pages", &mem_path, e))?;
    // A page that failed after the first (the process gone meanwhile) printed 0 and dd's complaint.
    if let Some(said) = out.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        return Err(GuestMemError::RemoteOutput {
            process,
            what: format!("an error: {}", crate::text::printable(said.trim())),
        });
    }
    let nonzero =
        count_nonzero(&String::from_utf8_lossy(&out.stdout), offsets.len()).map_err(|what| {
            GuestMemError::RemoteOutput {
                process: process.clone(),
                what,
            }
        })?;
    Ok(estimate(ram_bytes, offsets.len() as u64, nonzero))
}

/// Estimates the non-zero bytes of the guest behind `qmp` (at `socket`): on this host when `link` is none or
/// local (the process from the socket's peer credentials, [`DEFAULT_SAMPLES`] pages), else on the link's host
/// (the process found listening on `socket` there, [`REMOTE_SAMPLES`] pages).
pub async fn sample(
    qmp: &Qmp,
    link: Option<&HostLink>,
    socket: &str,
    ram_bytes: u64,
) -> Result<NonZeroEstimate, GuestMemError> {
    if let Some(link) = link.filter(|l| !l.is_local()) {
        let p = link
            .qemu_process(socket)
            .await
            .map_err(|source| GuestMemError::Remote {
                process: format!("host {}, QEMU of {socket}", link.name()),
                step: "finding the process",
                source: Box::new(source),
            })?;
        return sample_remote(link, p.pid, ram_bytes, REMOTE_SAMPLES, REMOTE_TIMEOUT).await;
    }
    let pid = qmp.peer_pid().ok_or_else(|| GuestMemError::NoPid {
        socket: socket.to_string(),
    })?;
    let process = local_process(pid);
    let task = tokio::task::spawn_blocking(move || sample_local(pid, ram_bytes, DEFAULT_SAMPLES));
    match tokio::time::timeout(LOCAL_TIMEOUT, task).await {
        Err(_) => Err(GuestMemError::Timeout {
            process,
            timeout: LOCAL_TIMEOUT,
        }),
        Ok(Err(source)) => Err(GuestMemError::Task { process, source }),
        Ok(Ok(r)) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Mappings of a real QEMU 10 (TCG, `-m 256`, `-nodefaults`) from its /proc/PID/smaps, some fields cut: the
    /// binary's text, the heap, an anonymous neighbour, the guest RAM (THP, `dc`), the 1 GiB TCG code buffer and
    /// the stack.
    const SMAPS: &str = "\
55670847d000-556708af6000 r-xp 00497000 fe:00 5333405                    /work/main/target/qemu-10/root/usr/bin/qemu-system-x86_64
Size:               6628 kB
KernelPageSize:        4 kB
Rss:                6172 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me 
55674844c000-55674965e000 rw-p 00000000 00:00 0                          [heap]
Size:              18504 kB
Rss:                4860 kB
VmFlags: rd wr mr mw me ac 
7fc927078000-7fc927e00000 rw-p 00000000 00:00 0 
Size:              13856 kB
KernelPageSize:        4 kB
Rss:               13856 kB
Anonymous:         13856 kB
VmFlags: rd wr mr mw me ac 
7fc927e00000-7fc937e00000 rw-p 00000000 00:00 0 
Size:             262144 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:              122880 kB
Pss:              122880 kB
Private_Dirty:    122880 kB
Anonymous:        122880 kB
AnonHugePages:    122880 kB
THPeligible:           1
VmFlags: rd wr mr mw me dc ac hg mg 
7fc938021000-7fc93c000000 ---p 00000000 00:00 0 
Size:              65404 kB
VmFlags: mr mw me nr 
7fc940000000-7fc97ffff000 rwxp 00000000 00:00 0 
Size:            1048572 kB
KernelPageSize:        4 kB
Rss:               49152 kB
AnonHugePages:     49152 kB
VmFlags: rd wr ex mr mw me ac hg 
7ffdb602f000-7ffdb6050000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac 
";

    /// A file-backed guest RAM (`memory-backend-file,share=on`) of 256 MiB.
    const FILE_BACKED: &str = "\
7f0000000000-7f0010000000 rw-s 00000000 00:2d 1234                       /dev/hugepages/qemu_back_mem.pc.ram.XyZ (deleted)
Size:             262144 kB
KernelPageSize:     2048 kB
VmFlags: rd wr sh mr mw me ms dc de ht 
";

    /// A thread stack of 8 MiB before an 8 MiB guest RAM: QEMU marked only the RAM `dc`.
    const TWO_OF_A_SIZE: &str = "\
7f1000000000-7f1000800000 rw-p 00000000 00:00 0 
Size:               8192 kB
VmFlags: rd wr mr mw me ac 
7f2000000000-7f2000800000 rw-p 00000000 00:00 0 
Size:               8192 kB
VmFlags: rd wr mr mw me dc ac 
7f3000000000-7f3000800000 rw-p 00000000 00:00 0 
Size:               8192 kB
VmFlags: rd wr mr mw me dc ac 
";

    #[test]
    fn the_guest_ram_mapping_is_found_by_its_size() {
        let ram = |start: u64, len_bytes: u64| Some(Mapping { start, len_bytes });
        let both = format!("{FILE_BACKED}{SMAPS}");
        let maps: String = SMAPS
            .lines()
            .filter(|l| header(l).is_some())
            .map(|l| format!("{l}\n"))
            .collect();
        let cases: [(&str, &str, u64, Option<Mapping>); 11] = [
            (
                "QEMU's own",
                SMAPS,
                256 * MIB,
                ram(0x7fc9_27e0_0000, 256 * MIB),
            ),
            ("no mapping of that size", SMAPS, 512 * MIB, None),
            ("the TCG code buffer is rwx", SMAPS, 1_048_572 * 1024, None),
            ("the heap is not the guest's", SMAPS, 18_504 * 1024, None),
            ("no access (---p)", SMAPS, 65_404 * 1024, None),
            (
                "an anonymous neighbour",
                SMAPS,
                13_856 * 1024,
                ram(0x7fc9_2707_8000, 13_856 * 1024),
            ),
            (
                "file-backed, alone",
                FILE_BACKED,
                256 * MIB,
                ram(0x7f00_0000_0000, 256 * MIB),
            ),
            (
                "anonymous beats file-backed",
                &both,
                256 * MIB,
                ram(0x7fc9_27e0_0000, 256 * MIB),
            ),
            (
                "a RAM block (dc) beats a stack, first of equals",
                TWO_OF_A_SIZE,
                8 * MIB,
                ram(0x7f20_0000_0000, 8 * MIB),
            ),
            (
                "maps without fields: sizes from the range",
                &maps,
                256 * MIB,
                ram(0x7fc9_27e0_0000, 256 * MIB),
            ),
            ("empty", "", 256 * MIB, None),
        ];
        for (what, smaps, ram_bytes, want) in cases {
            assert_eq!(ram_mapping(smaps, ram_bytes), want, "{what}");
        }
    }

    #[test]
    fn headers_are_parsed_with_paths_that_hold_spaces() {
        let e = header("7f00-7f10 rw-s 00000000 00:2d 1234       /run/a b/ram (deleted)").unwrap();
        assert_eq!(
            (e.start, e.end, e.perms, e.path),
            (0x7f00, 0x7f10, "rw-s", "/run/a b/ram (deleted)")
        );
        let e = header("7f00-7f10 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(e.path, "");
        for line in ["Size:  4 kB", "VmFlags: rd wr", "7f00-zz rw-p 0 0 0", ""] {
            assert!(header(line).is_none(), "{line:?}");
        }
    }

    #[test]
    fn sample_offsets_take_one_page_in_each_stratum() {
        let page = PAGE_BYTES;
        // (len_bytes, samples, expected count)
        let cases = [
            (256 * MIB, 2048, 2048),
            (256 * MIB, 1, 1),
            (256 * MIB, 0, 0),
            (10 * page, 4, 4),
            (3 * page, 10, 3),
            (3 * page + 100, 3, 3),
            (page - 1, 5, 0),
            (0, 5, 0),
        ];
        for (len_bytes, samples, count) in cases {
            for seed in [0, 1, SEED] {
                let o = sample_offsets(len_bytes, page, samples, seed);
                let what = format!("len {len_bytes} samples {samples} seed {seed}");
                assert_eq!(o.len(), count, "{what}");
                assert_eq!(
                    o,
                    sample_offsets(len_bytes, page, samples, seed),
                    "{what}: deterministic"
                );
                let pages = len_bytes / page;
                for (i, off) in o.iter().enumerate() {
                    assert_eq!(off % page, 0, "{what}: aligned");
                    assert!(off + page <= len_bytes, "{what}: {off} in bounds");
                    let i = i as u64;
                    let n = o.len() as u64;
                    let stratum = (i * pages / n, (i + 1) * pages / n);
                    assert!(
                        (stratum.0..stratum.1).contains(&(off / page)),
                        "{what}: {i} in {stratum:?}"
                    );
                }
            }
        }
        assert_eq!(
            sample_offsets(10 * page, 0, 4, 1),
            Vec::<u64>::new(),
            "no page size"
        );
        assert_eq!(
            sample_offsets(3 * page, page, 10, 7),
            [0, page, 2 * page],
            "every page"
        );
        assert_ne!(
            sample_offsets(256 * MIB, page, 64, 1),
            sample_offsets(256 * MIB, page, 64, 2),
            "seeds differ"
        );
    }

    #[test]
    fn estimates_scale_the_sampled_fraction_with_a_binomial_margin() {
        let ram = 256 * MIB;
        // (sampled, non-zero, fraction, non-zero bytes, margin bytes)
        let cases = [
            (2048, 1024, 0.5, 128 * MIB, 5_813_009),
            (2048, 512, 0.25, 64 * MIB, 5_034_213),
            (2048, 0, 0.0, 0, 393_216),
            (2048, 2048, 1.0, ram, 393_216),
            (256, 64, 0.25, 64 * MIB, 14_238_905),
            (0, 0, 0.0, 0, ram),
            (1, 1, 1.0, ram, ram),
            (10, 20, 1.0, ram, 80_530_637),
        ];
        for (sampled, nonzero, fraction, bytes, margin) in cases {
            let e = estimate(ram, sampled, nonzero);
            let what = format!("{nonzero} of {sampled}");
            assert_eq!(e.nonzero_fraction, fraction, "{what}");
            assert_eq!(e.nonzero_bytes, bytes, "{what}");
            assert_eq!(e.margin_bytes, margin, "{what}");
            assert_eq!(
                (e.ram_bytes, e.sampled_pages, e.method),
                (ram, sampled, METHOD),
                "{what}"
            );
        }
        let json = serde_json::to_value(estimate(ram, 4, 1)).unwrap();
        assert_eq!(json["method"], "page-contents");
        assert_eq!(json["nonzero_bytes"], 64 * MIB);
    }

    #[test]
    fn remote_failures_say_what_failed() {
        let command = |stderr: &str| HostError::Command {
            host: "far".into(),
            command: "cat /proc/7/smaps".into(),
            status: "exit 1".into(),
            stderr: stderr.into(),
        };
        let p = "host far, QEMU pid 7";
        let cases = [
            (
                command("cat: /proc/7/smaps: Permission denied\n"),
                "host far, QEMU pid 7: permission denied on /proc/7/smaps (reading it needs root or ptrace rights over QEMU)",
            ),
            (
                command("cat: /proc/7/smaps: No such file or directory\n"),
                "host far, QEMU pid 7: reading smaps failed",
            ),
            (
                HostError::Unreachable {
                    host: "far".into(),
                    reason: "Permission denied (publickey)".into(),
                },
                "host far, QEMU pid 7: reading smaps failed",
            ),
        ];
        for (source, want) in cases {
            let e = remote_error(p, "reading smaps", "/proc/7/smaps", source);
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn remote_answers_are_counted_only_when_complete() {
        let cases: [(&str, usize, Result<u64, &str>); 6] = [
            ("0\n1\n1\n0\n", 4, Ok(2)),
            ("      1\n      0\n", 2, Ok(1)),
            ("", 0, Ok(0)),
            ("0\n1\n", 3, Err("2 answers for 3 pages")),
            ("0\n2\n", 2, Err("\"2\" where 0 or 1 was due")),
            (
                "0\nPermission denied\n",
                2,
                Err("\"Permission denied\" where 0 or 1 was due"),
            ),
        ];
        for (out, expected, want) in cases {
            assert_eq!(
                count_nonzero(out, expected),
                want.map_err(String::from),
                "{out:?}"
            );
        }
    }
}
