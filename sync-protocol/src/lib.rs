//! The Cairn sync protocol, sans I/O.
//!
//! This crate owns Cairn's wire format and the state machines of one agent↔hub
//! connection. It reads no clock, opens no socket and spawns nothing: callers pass in
//! received bytes and the current [`std::time::Instant`], and take out frames to send,
//! events to act on and the next deadline — the way `quinn-proto` is driven by `quinn`.
//! The agent's and hub's QUIC tasks, and the deterministic fleet simulator, are such
//! drivers.
//!
//! - [`frame`]: length-prefixed postcard frames with a maximum size and typed errors.
//! - [`message`]: the messages of protocol version 1 (ALPN [`message::ALPN`]).
//! - [`state`]: desired-state documents, deltas, and their ed25519 signatures.
//! - [`agent`] / [`hub`]: the two sides of a session: handshake and version negotiation,
//!   state pushes and acks, and the sequence-numbered report stream acknowledged only
//!   once durable, so that nothing is lost or passed on twice across reconnects.
//! - [`release`]: signed OS release manifests, block indexes, fetch requests.
//! - [`bounded`]: identifiers and texts with fixed size limits.
//! - [`sabotage`]: deliberate bugs for the simulator's tests (only with the `sabotage`
//!   feature).
#![forbid(unsafe_code)]

pub mod agent;
pub mod attest;
pub mod bounded;
pub mod frame;
pub mod hub;
pub mod message;
pub mod release;
pub mod sabotage;
mod session;
pub mod state;
pub mod token;

pub use bounded::{BoundError, DeviceId, LabelKey, LabelValue, ResourceName, Text};
pub use session::{SessionConfig, SessionError};
