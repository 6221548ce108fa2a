//! # mistralrs-kvplugin
//!
//! The KV-cache layer for the [mistral.rs](https://github.com/EricLBuehler/mistral.rs) engine:
//! prefix caches computed once are kept outside the engine and handed back to later requests,
//! across engine restarts and machines.
//!
//! The engine side is a small patch to `mistralrs-core` 0.8.1 (cargo feature `kv-hooks`, see
//! `patches/`) that exposes [`mistralrs_core::KvHook`]. This crate implements that hook:
//! - [`hook::KvPluginHook`] adapts the engine's tensor-level calls to a [`store::PrefixStore`],
//!   keyed by a [`fingerprint::ModelFingerprint`] so that caches never cross models or dtypes;
//! - [`store`] holds the stores: [`store::MemoryPrefixStore`] and [`store::ObjectPrefixStore`]
//!   (chunked, compressed, over any `object_store` backend: memory, local disk, S3);
//! - [`engine`] runs the patched engine on a local model (tests, the demo and benchmarks);
//! - [`blend`] reuses documents' caches at any position in RAG prompts (CacheBlend);
//! - [`model`] finds the model files and converts the shipped GGUF into a Hugging Face folder;
//! - [`server`] is `kvplugin serve`: mistral.rs's OpenAI-compatible server with the hook, and
//!   Prometheus metrics.

pub mod bench;
pub mod blend;
pub mod cli;
pub mod codec;
pub mod config;
pub mod corpus;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fingerprint;
pub mod hook;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod stream;

pub use error::{Error, Result};
pub use fingerprint::ModelFingerprint;
pub use hook::{HookConfig, KvPluginHook};
pub use metrics::{Metrics, MetricsSnapshot};
pub use store::{MemoryPrefixStore, ObjectPrefixStore, ObjectStoreConfig, PrefixStore};
