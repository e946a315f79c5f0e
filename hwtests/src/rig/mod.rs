//! The real rig: the hardware scenario ([`crate::scenario`]) on real boxes on the rig
//! host's LAN.
//!
//! - [`config`] reads `rig.toml` (`rig/rig.example.toml` documents it).

pub mod config;
