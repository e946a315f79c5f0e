#!/usr/bin/env bash
# Installs the Debian packages that Cairn's builds, tests and benchmarks need: the one
# list of them. Only what is missing is installed; run it as often as you like.
#
#   scripts/setup.sh [--check] [GROUP...]      (no GROUP: build)
#
# Groups:
#   build         build the workspace: C compiler, pkg-config, tpm2-tss (the agent's TPM
#                 backend). The fleet simulation alone needs none of it (Rust and a C
#                 compiler), but `cargo build --release` of the workspace does.
#   test          build, plus what the tests run: swtpm, tpm2-tools, the tools that own
#                 the boot-control formats, clippy and rustfmt.
#   images        cairn-image and the virtual rig: QEMU (x86_64 and arm), UEFI
#                 firmware, swtpm, squashfs/ext4/cpio/zstd, device-tree tools; package lists
#                 (the image builder downloads Debian packages).
#   aarch64       cross-building the agent for the Raspberry Pi with Debian's Rust.
#   aarch64-test  aarch64, plus qemu-user and the arm64 run-time libraries.
#   bench         the peers the benchmark harness measures side by side (mender,
#                 rauc, casync).
#   all           every group but bench (what ./scripts/test.sh needs).
#
# --check lists what is missing and installs nothing (exit 1 if anything is).
# Exit codes: 0 everything present, 1 missing (--check) or not installable, 2 usage.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

check_only=
groups=()
for a in "$@"; do
  case $a in
    --check) check_only=1 ;;
    -h | --help) usage; exit 0 ;;
    build | test | images | aarch64 | aarch64-test | bench) groups+=("$a") ;;
    all) groups+=(build test images aarch64-test) ;;
    *) echo "setup: unknown group or option '$a'" >&2; usage >&2; exit 2 ;;
  esac
done
[ ${#groups[@]} -gt 0 ] || groups=(build)

# The packages of each group. Host packages are installed with their recommends (as
# Debian means them to run); the arm64 cross packages without, so that no arm64
# package pulls in another architecture's copy of a host tool.
host=() cross=() need_arm64='' need_lists='' need_clippy=''
for g in "${groups[@]}"; do
  case $g in
    build) host+=(build-essential pkg-config libtss2-dev) ;;
    test)
      host+=(build-essential pkg-config libtss2-dev
        swtpm swtpm-tools tpm2-tools # a real TPM emulator, and quotes cross-checked
        gdisk mtools dosfstools libubootenv-tool efibootmgr # GPT, FAT, U-Boot env, UEFI
        e2fsprogs)  # chattr, mke2fs
      need_clippy=1 ;;
    images)
      host+=(qemu-system-x86 ovmf qemu-system-arm qemu-efi-aarch64 swtpm swtpm-tools
        squashfs-tools e2fsprogs cpio zstd binutils gdisk mtools dosfstools
        device-tree-compiler) # the virtual Pi adds /chosen/bootloader to its device tree
      need_lists=1 ;;
    aarch64 | aarch64-test)
      need_arm64=1
      cross+=(rustc-web cargo-web libstd-rust-web-dev:arm64 # Debian's Rust, arm64 std
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross pkg-config libtss2-dev:arm64)
      if [ "$g" = aarch64-test ]; then
        # qemu-user runs the test binaries; the arm64 loader, C library and the swtpm
        # TCTI (dlopen'ed by tss-esapi) come from Debian's multiarch packages; the tests
        # start host tools as processes.
        cross+=(qemu-user-static libc6:arm64 libtss2-tcti-swtpm0:arm64
          swtpm swtpm-tools tpm2-tools gdisk mtools libubootenv-tool efibootmgr)
      fi ;;
    bench) host+=(mender-client rauc rauc-service squashfs-tools casync e2fsprogs) ;;
  esac
done

say() { echo "setup: $*" >&2; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing_of() { local p; for p in "$@"; do installed "$p" || echo "$p"; done | sort -u; }

mapfile -t miss_host < <(missing_of "${host[@]}")
# A package both lists name is installed as a host package.
mapfile -t miss_cross < <(missing_of "${cross[@]}" | grep -vxF -f <(printf '%s\n' "${miss_host[@]}" _) || true)
have_arm64=
dpkg --print-foreign-architectures | grep -qx arm64 && have_arm64=1
lists_ok=1
# The image builder reads package lists: apt-cache must know a kernel.
[ -n "$need_lists" ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1 && lists_ok=

clippy_missing=
if [ -n "$need_clippy" ] && command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || clippy_missing+=" clippy"
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || clippy_missing+=" rustfmt"
fi

all_missing=("${miss_host[@]}" "${miss_cross[@]}")
if [ -n "$check_only" ]; then
  rc=0
  [ ${#all_missing[@]} -eq 0 ] || { say "missing: ${all_missing[*]}"; rc=1; }
  [ -n "$need_arm64" ] && [ -z "$have_arm64" ] && { say "missing: dpkg architecture arm64"; rc=1; }
  [ -n "$lists_ok" ] || { say "missing: apt package lists (apt-get update)"; rc=1; }
  [ -z "$clippy_missing" ] || { say "missing rustup components:$clippy_missing"; rc=1; }
  [ $rc -ne 0 ] || say "everything for ${groups[*]} is installed"
  exit $rc
fi

if [ -n "$clippy_missing" ]; then
  say "adding rustup components:$clippy_missing"
  # shellcheck disable=SC2086
  rustup component add $clippy_missing || {
    say "rustup could not add$clippy_missing; install them with: rustup component add$clippy_missing"
    exit 1
  }
fi

if [ ${#all_missing[@]} -eq 0 ] && { [ -z "$need_arm64" ] || [ -n "$have_arm64" ]; } && [ -n "$lists_ok" ]; then
  say "everything for ${groups[*]} is installed already"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    say "needs root to install: ${all_missing[*]}"
    say "run it as root (or install sudo), or install those packages yourself"
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive

if [ -n "$need_arm64" ] && [ -z "$have_arm64" ]; then
  say "adding the arm64 architecture to dpkg (for the cross-build's arm64 libraries)"
  "${sudo[@]}" dpkg --add-architecture arm64
fi
say "apt-get update"
if ! "${sudo[@]}" apt-get update -qq; then
  say "apt-get update failed: the package lists above could not be read."
  say "check /etc/apt/sources.list.d/ and the network to Debian's mirror, then run this again"
  exit 1
fi

# Binary packages built from one source package must come from the same build:
# Debian's qemu-system-common, for one, Breaks a qemu-utils of another release (new
# machines of this image come with bookworm-backports' qemu-utils and no backports
# source, so Debian 12's qemu-system will not install beside it). When we install a
# package, every installed package of the same source is asked for at the version
# built from the same source version as the one we install (a downgrade if need be).
# Prints PKG=VERSION lines for apt-get.
source_of() { # source_of PKG [VERSION]: "SOURCE SOURCEVERSION" of PKG's candidate (or VERSION)
  local pkg=$1 want=${2:-}
  [ -n "$want" ] || want=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$want" ] && [ "$want" != "(none)" ] || return 0
  apt-cache show "$pkg" 2>/dev/null | awk -v pkg="$pkg" -v want="$want" '
    /^Package: / { p = $2; v = ""; s = ""; sv = "" }
    /^Version: / { v = $2 }
    /^Source: /  { s = $2; sv = $3; gsub(/[()]/, "", sv) }
    /^$/ { if (!done && p == pkg && v == want) { print (s ? s : p), (sv ? sv : v); done = 1 } }
    END  { if (!done && p == pkg && v == want) print (s ? s : p), (sv ? sv : v) }'
}
version_built_from() { # version_built_from PKG SOURCEVERSION: PKG's version of that build
  apt-cache show "$1" 2>/dev/null | awk -v pkg="$1" -v sv="$2" '
    /^Package: / { p = $2; v = ""; s = "" }
    /^Version: / { v = $2 }
    /^Source: /  { s = $3; gsub(/[()]/, "", s) }
    /^$/ { if (!done && p == pkg && (s ? s : v) == sv) { print v; done = 1 } }
    END  { if (!done && p == pkg && (s ? s : v) == sv) print v }'
}
# (Both awk programs read apt-cache's output to the end: exiting early would kill
# apt-cache with SIGPIPE, which pipefail and set -e turn into a silent exit 141.)
align=()
host_arch=$(dpkg --print-architecture)
declare -A seen_src=()
for p in "${miss_host[@]}" "${miss_cross[@]}"; do
  read -r src srcver < <(source_of "${p%%:*}"; echo) || true
  [ -n "${src:-}" ] && [ -z "${seen_src[$src]:-}" ] || continue
  seen_src[$src]=1
  # Installed packages of the same source at another source version (host arch only).
  # (Removed but not purged packages, dpkg's "rc", are listed too: not installed.)
  while read -r ist iarch ipkg iver isrc; do
    [ "$ist" = installed ] && [ "$isrc" = "$src" ] || continue
    [ "$iarch" = "$host_arch" ] || [ "$iarch" = all ] || continue
    read -r _ isrcver < <(source_of "$ipkg" "$iver"; echo) || true
    [ -n "${isrcver:-}" ] && [ "$isrcver" != "$srcver" ] || continue
    v=$(version_built_from "$ipkg" "$srcver")
    if [ -z "$v" ]; then
      say "$ipkg $iver is installed, but $p needs the $src $srcver build, of which apt knows no $ipkg"
      say "remove it (apt-get remove $ipkg) or add the source it came from, then run this again"
      exit 1
    fi
    say "$ipkg $iver is from another build of $src than $p ($srcver): asking for $ipkg=$v"
    align+=("$ipkg=$v")
  done < <(dpkg-query -W -f='${db:Status-Status} ${Architecture} ${Package} ${Version} ${source:Package}\n' 2>/dev/null)
done

# Packages apt marked as installed automatically: one we name to set its version stays so.
auto_before=$(apt-mark showauto 2>/dev/null || true)
apt_install() { # apt_install [apt-get options] -- PKG...
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  [ $# -gt 0 ] || return 0
  local pkgs=("$@") log rc want new w
  log=$(mktemp)
  # The first try and up to three more, each with what apt asked for after the last.
  for _ in 1 2 3 4; do
    say "installing ${pkgs[*]}"
    rc=0
    "${sudo[@]}" apt-get install -y -qq "${opts[@]}" "${pkgs[@]}" 2>"$log" || rc=$?
    cat "$log" >&2
    if [ $rc -eq 0 ]; then
      rm -f "$log"
      # Re-mark as automatic what we named only to set its version.
      for w in "${pkgs[@]}"; do
        case $w in *=*) grep -qxF "${w%%=*}" <<<"$auto_before" &&
          "${sudo[@]}" apt-mark auto "${w%%=*}" >/dev/null ;; esac
      done
      return 0
    fi
    # A dependency of what we install may want an exact version of a package installed
    # from another release (libdw1 wants its own build's libelf1): ask for that version
    # too, as for the packages of one source above, and try again.
    mapfile -t want < <(apt-get install -s "${opts[@]}" "${pkgs[@]}" 2>&1 |
      sed -nE 's/^ *([^ ]+ : )?(Pre)?Depends: ([^ ]+) \(= ([^)]+)\) but [^ ]+ is (installed|to be installed).*/\3=\4/p' |
      sort -u)
    new=()
    for w in "${want[@]}"; do
      installed "${w%%=*}" && ! printf '%s\n' "${pkgs[@]}" | grep -qxF "$w" && new+=("$w")
    done
    [ ${#new[@]} -gt 0 ] || break
    say "apt needs these exact versions of installed packages: ${new[*]}; asking for them"
    pkgs+=("${new[@]}")
  done
  rm -f "$log"
  say "apt-get could not install: ${pkgs[*]}"
  # -qq hid apt's reasons: a simulation shows them.
  apt-get install -s "${opts[@]}" "${pkgs[@]}" 2>&1 |
    grep -E -A1 '^( *[^ ]+ : | +)(Pre)?Depends|Breaks|Conflicts|^E:|held' | grep -v '^--$' |
    sed 's/^/setup:   /' >&2 || true
  local held
  held=$(apt-mark showhold 2>/dev/null | tr '\n' ' ')
  [ -z "$held" ] || say "held packages: $held(apt-mark unhold PKG lets apt change them)"
  say "to see everything: apt-get install -s ${opts[*]} ${pkgs[*]}"
  say "a held package, or one installed from another Debian release than the mirror here"
  say "offers (apt-cache policy PKG), is the usual cause; fix that and run this again"
  exit 1
}
host_install=("${miss_host[@]}")
cross_install=("${miss_cross[@]}")
# The aligned versions go with whichever call installs their source's packages; both
# calls accept them (they are host packages already installed).
if [ ${#host_install[@]} -gt 0 ]; then
  apt_install --allow-downgrades -- "${host_install[@]}" "${align[@]}"
  align=()
fi
apt_install --allow-downgrades --no-install-recommends -- "${cross_install[@]}" "${align[@]}"

mapfile -t still < <(missing_of "${host[@]}" "${cross[@]}")
if [ ${#still[@]} -gt 0 ]; then
  say "apt-get finished, but these are still not installed: ${still[*]}"
  exit 1
fi
say "installed everything for ${groups[*]}"
