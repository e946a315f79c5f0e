//! TPM 2.0 for Cairn.
//!
//! So far the hub-side, pure-Rust part that needs no TPM and no libtss2:
//! [`eventlog`] parses TCG PC Client firmware event logs and replays them to PCR values;
//! [`quote`] verifies TPM 2.0 quotes (signature, nonce, PCR digest); [`credential`]
//! makes credentials for ActivateCredential. The box's TPM through tss-esapi is the crate
//! `cairn-tpm-device`: this one never links tpm2-tss.
#![forbid(unsafe_code)]

pub mod attest;
pub mod credential;
pub mod ekcert;
pub mod eventlog;
pub mod ima;
pub mod quote;
pub mod soft;
