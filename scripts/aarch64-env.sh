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
# tests) need, skipping those already installed.
aarch64_install() {
  local pkgs=(
    rustc-web cargo-web libstd-rust-web-dev:arm64 # Debian's Rust, with the arm64 std
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross   # the cross C compiler and linker
    pkg-config libtss2-dev:arm64                  # tpm2-tss for the agent's TPM backend
  )
  if [ "$1" = test ]; then
    pkgs+=(
      qemu-user-static # runs the aarch64 test binaries on this host
      # The arm64 loader and C library the test binaries run with (multiarch, in /lib
      # and /usr/lib/aarch64-linux-gnu), and the TCTI of the swtpm the tests start,
      # which tss-esapi loads at run time (dlopen).
      libc6:arm64 libtss2-tcti-swtpm0:arm64
      # Host tools the tests run as processes (x86 binaries, started from the aarch64
      # test binary): the TPM emulator and its provisioning tools, tpm2-tools for
      # cross-checks, and the tools that own the boot-control formats.
      swtpm swtpm-tools tpm2-tools gdisk mtools libubootenv-tool efibootmgr
    )
  fi
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      missing+=("$p")
  done
  local have_arm64=
  dpkg --print-foreign-architectures | grep -qx arm64 && have_arm64=1
  if [ ${#missing[@]} -eq 0 ] && [ -n "$have_arm64" ]; then
    return 0
  fi
  if [ -z "$have_arm64" ]; then
    echo "== adding the arm64 architecture to dpkg" >&2
    dpkg --add-architecture arm64
  fi
  echo "== installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
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
