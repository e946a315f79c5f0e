//! The hardware tests: Cairn OS images (built by `cairn-image`) booted on boxes,
//! managed by a real hub.
//!
//! - [`scenario`] is the hardware scenario, run against any [`machine::Machine`].
//! - [`predict`] computes the PCRs a release will measure from a reference event log.
//! - [`vm`] is the virtual rig: QEMU (TCG) + OVMF + swtpm; [`pivm`] its Raspberry Pi 4
//!   (QEMU `virt`, the Pi firmware's boot decisions played on the host).
//! - [`rig`] is the real rig: real boxes with relays or PDUs, serial consoles and
//!   flashing from the rig host (`cairn-rig`).
#![forbid(unsafe_code)]

pub mod hub;
pub mod machine;
pub mod pivm;
pub mod predict;
pub mod rig;
pub mod scenario;
pub mod vm;

/// Logs of `cairn-rig`: `tracing` to stderr, level from `RUST_LOG` (info).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
