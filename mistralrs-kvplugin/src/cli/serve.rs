//! `kvplugin serve`: see [`crate::server`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use crate::{config::PluginConfig, engine::PagedOptions, model, server};

/// Arguments of `kvplugin serve` (named like mistral.rs's own server where they overlap).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model: a Hugging Face style folder, a `.gguf` file, or `hf` / `gguf` for the shipped
    /// SmolLM2 (F32 conversion / Q4_1 GGUF).
    #[arg(long, default_value = "hf")]
    model: String,
    /// The name clients give as `model` [default: the model's file or folder name]; `default`
    /// is always accepted too.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on. Anyone who can connect can use the model: keep it on loopback
    /// unless a proxy in front authenticates.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the address is printed once the server accepts connections).
    #[arg(long, default_value_t = 1234)]
    port: u16,
    /// The plugin's TOML config [default: the defaults, a store in .kvplugin/store]; the
    /// KVPLUGIN_* and AWS_* environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve stock mistral.rs, without the plugin (the same server otherwise, for comparisons).
    #[arg(long)]
    no_plugin: bool,
    /// Sequences the engine runs at once.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Prefixes the engine's own in-memory prefix cache keeps.
    #[arg(long, default_value_t = 16)]
    prefix_cache_n: usize,
    /// Turn the engine's own in-memory prefix cache off.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Bearer token for the admin routes (store operations, and mistral.rs's routes that change
    /// the engine); unset = those routes refuse every call.
    #[arg(long, env = "KVPLUGIN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Seconds a stop waits for the plugin's saves in flight.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// Run PagedAttention (the engine's block manager and block prefix cache) with a pool of
    /// this many tokens, all sequences together, allocated up front (SmolLM2-135M in F32: 46,080
    /// bytes per token); unset: the non-paged path.
    #[arg(long)]
    paged_cache_tokens: Option<usize>,
    /// Tokens per block with `--paged-cache-tokens` (8, 16 or 32).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
}

/// Runs the command.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let model = model::shipped_source(&args.model)?;
    let host: std::net::IpAddr = args
        .host
        .parse()
        .map_err(|e| anyhow::anyhow!("--host `{}`: {e} (give an IP address)", args.host))?;
    let plugin = if args.no_plugin {
        None
    } else {
        Some(match &args.config {
            Some(path) => PluginConfig::load(path)?,
            None => {
                let mut c = PluginConfig::default();
                c.apply_env(|k| std::env::var(k).ok())?;
                c
            }
        })
    };
    if args.admin_token.as_deref() == Some("") {
        anyhow::bail!(
            "--admin-token is empty: give a token, or leave it unset to turn admin routes off"
        );
    }
    let options = server::ServeOptions {
        served_model_name: args
            .served_model_name
            .unwrap_or_else(|| server::default_model_name(&model)),
        model,
        listen: SocketAddr::new(host, args.port),
        plugin,
        max_seqs: args.max_seqs,
        prefix_cache_n: args.prefix_cache_n,
        no_prefix_cache: args.no_prefix_cache,
        admin_token: args.admin_token,
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        paged: args.paged_cache_tokens.map(|cache_tokens| PagedOptions {
            block_size: args.block_size,
            cache_tokens,
        }),
    };
    tokio::runtime::Runtime::new()?.block_on(server::serve(options))
}
