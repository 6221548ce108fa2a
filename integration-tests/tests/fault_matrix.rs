//! The fault matrix of `kvplugin bench faults` on the real engine and model, small: local disk
//! and s3s-fs, short prompts, 64-token chunks. Every request of every fault must get stock's
//! answer (or stock's refusal); the faults that leave good objects behind must still hit.

use integration_tests::{gguf_path, s3::S3Server};
use mistralrs_kvplugin::{
    bench::faults::{run_matrix, FaultRow, FaultsBenchArgs, StoreUnderTest, FAULTS},
    config::PluginConfig,
};

#[test]
fn every_fault_leaves_every_request_answered_as_stock_answers_it() {
    // The model must be there (a missing one is a failure, never a skip).
    assert!(gguf_path().is_file());
    let local = tempfile::tempdir().unwrap();
    let s3s = S3Server::start_s3s_fs();
    let mut on_disk = PluginConfig::default();
    on_disk.store.url = local.path().display().to_string();
    on_disk.chunk_tokens = 64;
    let stores = vec![
        StoreUnderTest {
            name: "local".into(),
            config: on_disk,
        },
        StoreUnderTest {
            name: "s3s-fs".into(),
            config: s3s.config(),
        },
    ];
    let args = FaultsBenchArgs {
        store: vec![],
        context: 160,
        requests: 2,
        max_new_tokens: 6,
        load_timeout_ms: 1500,
        only: vec![],
        text: None,
        json: None,
    };
    let report = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run_matrix(&args, stores))
        .unwrap();
    assert_eq!(report.faults.len(), 2 * FAULTS.len());
    let row = |store: &str, name: &str| -> &FaultRow {
        report
            .faults
            .iter()
            .find(|r| r.store == store && r.name == name)
            .unwrap()
    };
    for r in &report.faults {
        assert_eq!(
            (r.answered, r.wrong_answers, r.lost_requests),
            (r.requests, 0, 0),
            "{r:?}"
        );
    }
    for store in ["local", "s3s-fs"] {
        // A slow store still serves its hits; a bad second chunk keeps the first one's hit.
        for fault in [
            "slow",
            "corrupt_object",
            "hostile_header",
            "planted_without_key",
        ] {
            let r = row(store, fault);
            assert_eq!(r.store_hits, r.requests as u64, "{r:?}");
        }
        // Faults that leave nothing usable are misses.
        for fault in ["server_down", "load_timeout", "disk_full", "never_answers"] {
            assert_eq!(row(store, fault).store_hits, 0, "{:?}", row(store, fault));
        }
    }
    // The real S3 failures were real.
    assert_eq!(row("s3s-fs", "wrong_credentials").how, "real");
    assert_eq!(row("local", "wrong_credentials").how, "injected");
}
