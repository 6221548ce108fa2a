//! `kvplugin bench faults` on the three stores the project tests with: local disk, s3s-fs and
//! Garage, both servers started here on 127.0.0.1 (as the tests start them) and stopped at the
//! end. Takes `kvplugin bench faults`' arguments; its `--store` is the local-disk store.
//!
//! `scripts/bench-faults.sh` runs it; `make setup-tests` installs the servers.

use clap::Parser;
use integration_tests::s3::S3Server;
use mistralrs_kvplugin::{
    bench::faults::{run_matrix, FaultsBenchArgs, StoreUnderTest},
    config::PluginConfig,
};

#[derive(Parser)]
#[command(about = "The fault matrix on local disk, s3s-fs and Garage")]
struct Cli {
    #[command(flatten)]
    bench: FaultsBenchArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,mistralrs_kvplugin=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (s3s, garage) = (S3Server::start_s3s_fs(), S3Server::start_garage());
    let server_store = |name: &str, server: &S3Server| {
        let mut config = server.config();
        // The plugin's defaults but for where the store is.
        let defaults = PluginConfig::default();
        config.chunk_tokens = defaults.chunk_tokens;
        config.store.request_timeout_ms = defaults.store.request_timeout_ms;
        StoreUnderTest {
            name: name.into(),
            config,
        }
    };
    let mut stores: Vec<StoreUnderTest> = cli
        .bench
        .store
        .iter()
        .map(|url| {
            let mut config = PluginConfig::default();
            config.store.url = url.clone();
            StoreUnderTest {
                name: if cli.bench.store.len() == 1 {
                    "local".into()
                } else {
                    format!("local ({url})")
                },
                config,
            }
        })
        .collect();
    stores.push(server_store("s3s-fs", &s3s));
    stores.push(server_store("garage", &garage));
    let report = tokio::runtime::Runtime::new()?.block_on(run_matrix(&cli.bench, stores))?;
    drop((s3s, garage));
    report.print_and_check(cli.bench.json.as_deref())
}
