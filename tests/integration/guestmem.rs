//! Estimates of a guest's non-zero RAM read from its QEMU's memory: plausible for an idle and a dirtying guest,
//! the same through the remote script as read here, and close to what QEMU then sends when it migrates the guest.

use std::path::Path;
use std::time::Duration;

use qmigrate::guestmem::{self, NonZeroEstimate};
use qmigrate::inventory::Inventory;

use crate::harness::{self, migrate_args, qmigrate, s, Bed};

const MIB: u64 = 1024 * 1024;
/// The harness's guests have 256 MiB.
const RAM_BYTES: u64 = 256 * MIB;

/// Its pages: sampling that many reads every page once, an exact count.
const PAGES: u64 = RAM_BYTES / guestmem::PAGE_BYTES;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Estimates the guest at `socket` through the convenience entry (this host: the pid from the socket's peer), once
/// two estimates in a row agree. Every estimate reads the same pages (one seed), so a difference is the guest's:
/// the `dirty` workload's pages fill over its first second after it says ready (gcc drops its `memset` of memory
/// it never reads, so only the random writes fill them).
async fn estimate_here(socket: &Path) -> NonZeroEstimate {
    let qmp = harness::qmp(socket).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last: Option<NonZeroEstimate> = None;
    loop {
        let e = guestmem::sample(&qmp, None, s(socket), RAM_BYTES)
            .await
            .unwrap_or_else(|e| panic!("sample {}: {e:?}", socket.display()));
        if last.is_some_and(|l| l.nonzero_pages == e.nonzero_pages) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: still changing after 30 s: {e:?}",
            socket.display()
        );
        last = Some(e);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads every page of the guest of QEMU `pid`: the exact count the samples estimate.
async fn every_page(pid: i32) -> NonZeroEstimate {
    let read =
        tokio::task::spawn_blocking(move || guestmem::sample_local(pid, RAM_BYTES, PAGES as u32));
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("256 MiB read within 30 s")
        .expect("the reading task")
        .unwrap_or_else(|e| panic!("read every page of pid {pid}: {e:?}"))
}

/// A link to this host, as an inventory's `transport = "local"` host gives it: [`guestmem::sample_remote`] then
/// runs its `cat` and its `dd` script here, without ssh.
fn local_link() -> qmigrate::remote::HostLink {
    let text = r#"[hosts.here]
transport = "local"
runtime_dir = "/tmp"
migration_address = "127.0.0.1"
"#;
    let inv = Inventory::parse(Path::new("inline.toml"), text).expect("inventory");
    let link = qmigrate::remote::links(&inv).pop().expect("one host");
    std::sync::Arc::try_unwrap(link).expect("one owner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_of_an_idle_and_a_dirtying_guest_are_plausible() {
    let mut bed = Bed::new();
    let idle = bed.source("idle", "idle").await;
    let dirty = bed.source("dirty", "dirty:64").await;

    let i = estimate_here(&idle).await;
    let d = estimate_here(&dirty).await;
    let i_all = every_page(bed.pid_of(&idle)).await;
    let d_all = every_page(bed.pid_of(&dirty)).await;
    eprintln!(
        "idle: {:.1} MiB ± {:.1} (every page: {:.1}); dirty:64: {:.1} MiB ± {:.1} (every page: {:.1})",
        mib(i.nonzero_bytes),
        mib(i.margin_bytes),
        mib(i_all.nonzero_bytes),
        mib(d.nonzero_bytes),
        mib(d.margin_bytes),
        mib(d_all.nonzero_bytes)
    );
    for (e, all) in [(&i, &i_all), (&d, &d_all)] {
        assert_eq!(e.ram_bytes, RAM_BYTES);
        assert_eq!(e.sampled_pages, u64::from(guestmem::DEFAULT_SAMPLES));
        assert_eq!(e.method, "page-contents");
        assert!(e.margin_bytes < 8 * MIB, "{e:?}");
        assert_eq!(all.sampled_pages, PAGES, "{all:?}");
        assert!(
            e.nonzero_bytes.abs_diff(all.nonzero_bytes) <= e.margin_bytes,
            "the sample {e:?} is off the count of every page {all:?}"
        );
    }
    // An idle guest's kernel, initrd and page cache: about 90 MiB of its 256.
    assert!(
        (60 * MIB..=130 * MIB).contains(&i.nonzero_bytes),
        "idle: {:.1} MiB non-zero",
        mib(i.nonzero_bytes)
    );
    // The dirtying guest writes into all of its 64 MiB.
    assert!(
        d.nonzero_bytes >= i.nonzero_bytes + 40 * MIB,
        "dirty:64 {:.1} MiB, idle {:.1} MiB",
        mib(d.nonzero_bytes),
        mib(i.nonzero_bytes)
    );

    // The remote way (smaps by `cat`, pages by one `dd` script) on the same guest agrees within both margins.
    let pid = bed.pid_of(&idle);
    let r = guestmem::sample_remote(
        &local_link(),
        pid,
        RAM_BYTES,
        guestmem::REMOTE_SAMPLES,
        guestmem::REMOTE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("sample_remote pid {pid}: {e:?}"));
    eprintln!("idle, by the remote script: {r:?}");
    assert_eq!(r.sampled_pages, u64::from(guestmem::REMOTE_SAMPLES));
    assert!(
        r.nonzero_bytes.abs_diff(i.nonzero_bytes) <= r.margin_bytes + i.margin_bytes,
        "remote {r:?} vs local {i:?}"
    );

    // A RAM size that no mapping has is an error that names the process.
    let err = guestmem::sample_local(pid, 3 * RAM_BYTES, 16).unwrap_err();
    assert!(
        matches!(err, guestmem::GuestMemError::NoMapping { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");
}

/// QEMU's first pass sends the non-zero pages whole and the rest as a few bytes each, and an idle guest dirties
/// little after it: what it sends in all is the estimate, give or take a quarter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimate_of_an_idle_guest_is_what_its_migration_sends() {
    let mut bed = Bed::new();
    let src = bed.source("src", "idle").await;
    let e = estimate_here(&src).await;
    let dst = bed.destination("dst").await;
    let run = qmigrate(
        &migrate_args(&src, &dst, "--timeout 60s"),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["outcome"], "completed", "{run:?}");
    let sent = report["transferred_bytes"]
        .as_u64()
        .expect("transferred_bytes");
    let last = report["samples"].as_array().and_then(|s| s.last()).cloned();
    let pages = |k: &str| last.as_ref().and_then(|l| l[k].as_u64()).unwrap_or(0);
    eprintln!(
        "estimate {:.1} MiB ± {:.1} ({} of {} pages), QEMU sent {:.1} MiB ({} normal, {} zero pages at completion)",
        mib(e.nonzero_bytes),
        mib(e.margin_bytes),
        e.nonzero_pages,
        e.sampled_pages,
        mib(sent),
        pages("normal_pages"),
        pages("zero_pages"),
    );
    let (lo, hi) = (sent / 4 * 3, sent / 4 * 5);
    assert!(
        (lo..=hi).contains(&e.nonzero_bytes),
        "estimate {:.1} MiB not within 25 % of the {:.1} MiB sent",
        mib(e.nonzero_bytes),
        mib(sent)
    );
    // Closer: the pages QEMU sent whole, counted at the completed poll (a few sent twice by later passes).
    assert_eq!(
        last.as_ref().map(|l| l["status"].clone()),
        Some("completed".into())
    );
    let normal_bytes = pages("normal_pages") * guestmem::PAGE_BYTES;
    assert!(
        e.nonzero_bytes.abs_diff(normal_bytes) <= normal_bytes / 10,
        "estimate {:.1} MiB not within 10 % of the {:.1} MiB QEMU sent as normal pages",
        mib(e.nonzero_bytes),
        mib(normal_bytes)
    );
}
