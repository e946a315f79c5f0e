//! The operator CLI, one module per command group. Each parses its arguments (clap) and
//! talks to the admin API through `cairn_hub::cli::Client`; `serve` is in `main.rs`.

pub(crate) mod device;
pub(crate) mod events;
pub(crate) mod image;
pub(crate) mod policy;
pub(crate) mod release;
pub(crate) mod state;
pub(crate) mod token;
