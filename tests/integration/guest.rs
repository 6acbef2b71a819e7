//! The guest image: every workload of `scripts/build-guest` starts and reports ready on the serial console.

use std::time::Duration;

use qmigrate::testbed::{Guest, GuestSpec};

use crate::harness::{guest_dir, Bed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_starts() {
    let bed = Bed::new();
    let disk = bed.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    for workload in [
        "idle",
        "cpu",
        "dirty:16",
        "dirty:16:4",
        "web",
        "netrecv",
        "disk",
    ] {
        let name = workload.replace(':', "-");
        let mut spec = GuestSpec::new(&name, workload, &guest_dir(), bed.dir.path());
        if workload == "disk" {
            spec.extra_args = vec![
                "-drive".into(),
                format!("file={},if=virtio,format=raw", disk.display()),
            ];
        }
        let mut g = Guest::launch(spec).await.expect("start guest");
        g.wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{workload}: {e}"));
        let serial = std::fs::read_to_string(g.spec.serial_log()).unwrap();
        assert!(
            serial.contains(&format!("workload={workload}")),
            "{workload}: {serial}"
        );
        if workload == "disk" {
            // The writer really writes: the image's first bytes are its pattern within a few seconds.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::fs::read(&disk).unwrap()[1..16]
                .iter()
                .any(|b| *b != 0x5a)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "disk workload wrote nothing"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
