//! The Cairn hub as a library; `cairn-hub` is a thin binary over it.
#![forbid(unsafe_code)]

pub mod api;
pub mod attest;
pub mod cli;
pub mod desired;
pub mod endpoint;
pub mod evidence;
pub mod pki;
pub mod process;
pub mod release;
pub mod server;
pub mod store;
pub mod sync;
