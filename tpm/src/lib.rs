//! TPM 2.0 for Cairn.
//!
//! So far the hub-side, pure-Rust part that needs no TPM and no libtss2:
//! [`eventlog`] parses TCG PC Client firmware event logs and replays them to PCR values;
//! [`quote`] verifies TPM 2.0 quotes (signature, nonce, PCR digest); [`credential`]
//! makes credentials for ActivateCredential. With the `agent` feature, `device` is the
//! agent's TPM through tss-esapi.
#![forbid(unsafe_code)]

pub mod attest;
pub mod credential;
#[cfg(feature = "agent")]
pub mod device;
pub mod ekcert;
pub mod eventlog;
pub mod ima;
pub mod quote;
pub mod soft;
#[cfg(feature = "testkit")]
pub mod testkit;
