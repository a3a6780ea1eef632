#!/usr/bin/env bash
# Host packages the tests need: the real-Xen test bed, and the real tools some fast tests use
# (see docs/testing.md). Needs root and Debian's apt.
# Idempotent and quick: when every package is already installed it only asks dpkg (well under 1 s).
# Non-interactive: CI runs it as root with no standard input.
set -euo pipefail

# qemu-system-x86: runs Xen + dom0 (TCG); debootstrap: builds the dom0 root from Debian's packages;
# e2fsprogs: mkfs.ext4 -d (no loop mount); cpio + zstd: guest initramfs and the image cache.
# xfsprogs: an XFS image on a loop device, where file-raw's reflink path runs for real;
# xen-utils-4.17 + gcc: the real oxenstored that the simulated XenStore is compared with.
# qemu-utils: qemu-img and qemu-io, real NBD clients of pyblkback's NBD export.
PACKAGES=(qemu-system-x86 debootstrap e2fsprogs cpio zstd xfsprogs xen-utils-4.17 gcc qemu-utils)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-testbed: host packages present (${PACKAGES[*]})" >&2
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-testbed: missing host packages: ${missing[*]}; run this script as root" \
         "(or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "setup-testbed: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update -qq </dev/null
timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
echo "setup-testbed: installed ${missing[*]}" >&2
