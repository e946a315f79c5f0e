//! The real rig's parts, with real stand-ins where a rig has hardware. Fast: no image
//! is built, no box booted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod config;
