//! Nothing: this crate exists so that `cargo check` builds the patched engine with its
//! features off (see Cargo.toml).
pub use mistralrs_core as engine;
