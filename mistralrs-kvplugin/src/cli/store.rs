//! `kvplugin store`: what a store holds, removal and garbage collection (see
//! [`crate::store::admin`]), and a deployment key (see [`crate::store::seal`]).

use std::{path::PathBuf, time::SystemTime};

use clap::{Args, Subcommand};

use crate::{
    config::PluginConfig,
    store::admin::{self, GcPlan},
};

/// Arguments of `kvplugin store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
    /// The plugin's TOML config [default: the defaults, a store in .kvplugin/store]; the
    /// KVPLUGIN_* and AWS_* environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Per model: objects, bytes, chunks, tails, bytes per level, age.
    Ls,
    /// Totals over the whole store.
    Stats,
    /// Remove every object of one model, or of all.
    Rm {
        /// At least 8 hex digits of the model's fingerprint (as `ls` shows).
        #[arg(long, required_unless_present = "all")]
        model: Option<String>,
        /// Every model.
        #[arg(long, conflicts_with = "model")]
        all: bool,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete chains not extended for a while, then the oldest beyond a size bound; never a chunk
    /// whose descendants stay, never anything written within the grace period.
    Gc {
        /// Delete chains older than this (`7d`, `12h`) [default: `[store] ttl`].
        #[arg(long)]
        older_than: Option<String>,
        /// Keep at most this many bytes (`10G`) [default: `[store] max_bytes`].
        #[arg(long)]
        max_bytes: Option<String>,
        /// Never delete what is younger than this [default: `[store] gc_grace`, 10m].
        #[arg(long)]
        grace: Option<String>,
        /// List what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a new random deployment secret (256 bits, hex) to a file readable by its owner
    /// only: point `[store] key_file` (or KVPLUGIN_STORE_KEY_FILE) of every process that shares
    /// the cache at it. Never overwrites a file.
    Keygen {
        /// Where to write it.
        path: PathBuf,
    },
}

/// Runs the command.
pub fn run(args: StoreArgs) -> anyhow::Result<()> {
    if let StoreCommand::Keygen { path } = &args.command {
        return keygen(path);
    }
    let config = match &args.config {
        Some(path) => PluginConfig::load(path)?,
        None => {
            let mut c = PluginConfig::default();
            c.apply_env(|k| std::env::var(k).ok())?;
            c
        }
    };
    tokio::runtime::Runtime::new()?.block_on(run_async(args, config))
}

fn keygen(path: &std::path::Path) -> anyhow::Result<()> {
    use std::{fmt::Write as _, io::Write as _};
    let mut secret = secrecy::SecretBox::new(Box::new([0u8; 32]));
    getrandom::fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut secret))
        .map_err(|e| anyhow::anyhow!("no randomness from the system: {e}"))?;
    // Zeroed on drop, like the secret.
    let mut text = secrecy::zeroize::Zeroizing::new(String::with_capacity(65));
    for b in secrecy::ExposeSecret::expose_secret(&secret) {
        write!(text, "{b:02x}").expect("writing to a string");
    }
    text.push('\n');
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    eprintln!(
        "store keygen: wrote a new secret to {} (mode 600); set `[store] key_file` to it",
        path.display()
    );
    Ok(())
}

async fn run_async(args: StoreArgs, config: PluginConfig) -> anyhow::Result<()> {
    let backend = config.open_backend()?;
    let namespace = config.namespace.as_str();
    match args.command {
        StoreCommand::Ls | StoreCommand::Stats => {
            let objects = admin::list(backend.as_ref(), namespace).await?;
            let usage = admin::usage(&objects, SystemTime::now());
            if args.json {
                println!("{}", serde_json::to_string_pretty(&usage)?);
                return Ok(());
            }
            if matches!(args.command, StoreCommand::Ls) {
                println!(
                    "{:<34} {:>8} {:>12} {:>7} {:>6}  {:<40} {:>10}",
                    "model", "objects", "bytes", "chunks", "tails", "bytes by level", "newest"
                );
                for m in &usage.models {
                    let levels: Vec<String> = m
                        .bytes_by_level
                        .iter()
                        .map(|(l, b)| format!("{l} {}", human_bytes(*b)))
                        .collect();
                    println!(
                        "{:<34} {:>8} {:>12} {:>7} {:>6}  {:<40} {:>10}",
                        m.model,
                        m.objects,
                        human_bytes(m.bytes),
                        m.chunks,
                        m.tails,
                        levels.join(", "),
                        human_age(m.newest_age_s)
                    );
                }
            } else {
                println!("store: {} ({})", config.store.url, namespace);
                println!(
                    "objects: {} ({}) in {} model(s)",
                    usage.objects,
                    human_bytes(usage.bytes),
                    usage.models.len()
                );
                println!(
                    "older layout: {} ({}); unknown names: {}",
                    usage.legacy_objects,
                    human_bytes(usage.legacy_bytes),
                    usage.unknown_objects
                );
            }
        }
        // Handled before a config is read (it needs none).
        StoreCommand::Keygen { path } => keygen(&path)?,
        StoreCommand::Rm {
            model,
            all: _,
            dry_run,
        } => {
            let (plan, deleted) =
                admin::remove(backend.as_ref(), namespace, model.as_deref(), dry_run).await?;
            report(&plan, deleted, dry_run, args.json)?;
        }
        StoreCommand::Gc {
            older_than,
            max_bytes,
            grace,
            dry_run,
        } => {
            let mut policy = config.gc_policy()?;
            if let Some(d) = older_than {
                policy.older_than = Some(admin::parse_duration(&d)?);
            }
            if let Some(b) = max_bytes {
                policy.max_bytes = Some(admin::parse_bytes(&b)?);
            }
            if let Some(g) = grace {
                policy.grace = admin::parse_duration(&g)?;
            }
            let (plan, deleted) = admin::gc(backend.as_ref(), namespace, &policy, dry_run).await?;
            report(&plan, deleted, dry_run, args.json)?;
        }
    }
    Ok(())
}

fn report(plan: &GcPlan, deleted: usize, dry_run: bool, json: bool) -> anyhow::Result<()> {
    if json {
        let out = serde_json::json!({
            "dry_run": dry_run,
            "deleted": deleted,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for d in &plan.delete {
        println!("{:<14} {:>10} {}", d.reason, human_bytes(d.bytes), d.path);
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    let n = if dry_run { plan.delete.len() } else { deleted };
    println!(
        "{verb} {n} object(s), {}; kept {} object(s), {}",
        human_bytes(plan.deleted_bytes),
        plan.kept_objects,
        human_bytes(plan.kept_bytes)
    );
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_age(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.0}s ago"),
        s if s < 7200.0 => format!("{:.0}m ago", s / 60.0),
        s if s < 172_800.0 => format!("{:.0}h ago", s / 3600.0),
        s => format!("{:.0}d ago", s / 86_400.0),
    }
}
