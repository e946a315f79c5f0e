//! A/B OS upgrades: the engine, the slot installer and the boot-control backends.

pub mod boot;
