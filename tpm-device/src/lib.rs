//! The box's TPM for Cairn: [`device`] opens a real TPM (or swtpm) through tss-esapi and
//! is the agent's [`cairn_tpm::attest::Attester`]; with the `testkit` feature,
//! [`testkit`] starts swtpm instances with EK certificates for tests.
//!
//! Architecture invariant: this is the only crate that links the C library tpm2-tss.
//! Everything the hub verifies lives in `cairn-tpm`, which is pure Rust; the hub and the
//! fleet simulator do not depend on this crate (`scripts/test.sh` checks it).
#![forbid(unsafe_code)]

pub mod device;
#[cfg(feature = "testkit")]
pub mod testkit;
