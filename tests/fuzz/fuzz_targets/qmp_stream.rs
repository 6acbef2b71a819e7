//! A hostile QMP peer on an in-memory stream: it greets, accepts `qmp_capabilities`, then sends arbitrary bytes in
//! arbitrary chunks while the client runs commands with short timeouts. The client must never panic, every
//! command must end (reply, error or timeout) within its bound, and every error must name the socket.
//!
//! The clock is paused (tokio `test-util`): timeouts fire as soon as nothing else can run, in no wall time.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qmigrate::qmp::types::{QueryMigrate, QueryStatus};
use qmigrate::qmp::{ConnectOptions, Qmp, QmpError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LABEL: &str = "fuzz-peer";
const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\n";

thread_local! {
    // One runtime for all runs: building one per run costs more than the run.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
}

fn check(r: Result<impl std::fmt::Debug, QmpError>) {
    if let Err(e) = r {
        assert!(
            e.to_string().contains(LABEL),
            "an error that does not name the socket: {e}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: bit 0 = the peer answers qmp_capabilities itself (else the fuzz bytes must), bit 1 = the peer
    // closes after its bytes (else it stays silent but open), bits 2.. = the write chunk size.
    let (flags, bytes) = data.split_first().unwrap_or((&0, &[]));
    let (flags, bytes) = (*flags, bytes.to_vec());
    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            let peer = tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(server);
                // Drain what the client writes so that it never blocks on a full pipe.
                let drain = tokio::spawn(async move {
                    let mut sink = [0u8; 4096];
                    while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
                });
                let _ = w.write_all(GREETING).await;
                if flags & 1 == 1 {
                    let _ = w.write_all(b"{\"return\": {}, \"id\": 0}\n").await;
                }
                for chunk in bytes.chunks(usize::from(flags >> 2) + 1) {
                    if w.write_all(chunk).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if flags & 2 == 0 {
                    std::future::pending::<()>().await;
                }
                drop(w);
                let _ = drain.await;
            });
            let opts = ConnectOptions {
                handshake_timeout: Duration::from_millis(500),
                command_timeout: Duration::from_millis(200),
            };
            let session = async {
                let (r, w) = tokio::io::split(client);
                let qmp = match Qmp::connect_stream(r, w, LABEL, &opts).await {
                    Ok(q) => q,
                    Err(e) => return check(Err::<(), _>(e)),
                };
                let mut events = qmp.events();
                check(qmp.execute(&QueryStatus {}).await);
                check(qmp.execute(&QueryMigrate {}).await);
                check(
                    qmp.execute_raw("query-kvm", None, Duration::from_millis(100))
                        .await,
                );
                while events.try_recv().is_ok() {}
            };
            // Handshake 0.5 s + three commands of at most 0.2 s each: anything past 5 s (virtual) is a hang.
            tokio::time::timeout(Duration::from_secs(5), session)
                .await
                .expect("the client hung");
            peer.abort();
        })
    });
});
