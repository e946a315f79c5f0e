//! The real rig: the hardware scenario ([`crate::scenario`]) on real boxes on the rig
//! host's LAN.
//!
//! - [`config`] reads `rig.toml` (`rig/rig.example.toml` documents it).
//! - [`console`] captures a box's serial console, [`power`] switches it, [`flash`]
//!   writes its boot medium.

pub mod config;
pub mod console;
pub mod flash;
pub mod power;
pub mod serial;
pub mod shell;
