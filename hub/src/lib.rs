//! The Cairn hub as a library; `cairn-hub` is a thin binary over it.
#![forbid(unsafe_code)]

pub mod desired;
pub mod pki;
pub mod store;
pub mod endpoint;
pub mod api;
pub mod server;
pub mod cli;
