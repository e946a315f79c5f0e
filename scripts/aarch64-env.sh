# Cross-building for aarch64 (Raspberry Pi) with Debian's Rust toolchain; sourced by
# scripts/test-aarch64.sh and scripts/build-aarch64.sh, not run on its own.
#
# rustup has no aarch64 std here, so these builds use Debian's rustc-web/cargo-web
# (/usr/bin/rustc, /usr/bin/cargo) with libstd-rust-web-dev:arm64, link with
# aarch64-linux-gnu-gcc (.cargo/config.toml) against the arm64 tpm2-tss from Debian's
# multiarch packages, and keep their own target directory so that the rustup toolchain's
# cache under target/ stays valid. Everything is logged to stderr.

AARCH64_TARGET=aarch64-unknown-linux-gnu
AARCH64_TARGET_DIR=target/aarch64

# aarch64_install build|test: installs the packages the build (or the build and the
# tests) need, skipping those already installed (scripts/setup.sh holds the list).
aarch64_install() {
  local group=aarch64
  [ "$1" = test ] && group=aarch64-test
  scripts/setup.sh "$group" >&2
}

# aarch64_env: exports what the cross build needs. Target-specific variables only, so
# host build scripts and proc macros are built as usual.
aarch64_env() {
  # Debian's toolchain, never rustup's proxies (which have no aarch64 std).
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
  AARCH64_CARGO=/usr/bin/cargo
  export CARGO_TARGET_DIR=$AARCH64_TARGET_DIR
  # tss-esapi-sys finds tpm2-tss with pkg-config: the arm64 .pc files, not the host's.
  export PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu=1
  export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig
  # C code built by crates (SQLite, ring).
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
}
