//! TPM 2.0 for Cairn.
//!
//! So far the hub-side, pure-Rust part that needs no TPM and no libtss2:
//! [`eventlog`] parses TCG PC Client firmware event logs and replays them to PCR values;
//! [`quote`] verifies TPM 2.0 quotes (signature, nonce, PCR digest). Credential
//! activation and the agent-side tss-esapi backend follow with the attestation issue.
#![forbid(unsafe_code)]

#[cfg(feature = "agent")]
pub mod device;
pub mod eventlog;
pub mod quote;
