#!/usr/bin/env bash
# Stage 1 of the test bed image build: a Debian root file system from Debian's packages only.
#   build-rootfs.sh OUT.tar.zst PACKAGES_FILE MIRROR SUITE DEB_CACHE_DIR
# Needs root (debootstrap chroots and makes device nodes). Writes OUT.tar.zst atomically.
set -euo pipefail
out=$1 pkgfile=$2 mirror=$3 suite=$4 debcache=$5
[ "$(id -u)" -eq 0 ] || { echo "build-rootfs: needs root (debootstrap)" >&2; exit 1; }
pkgs=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$pkgfile" | tr -s ' \n' ',' | sed 's/,$//')
work=$(mktemp -d "${out%/*}/.rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$debcache"
echo "build-rootfs: debootstrap $suite from $mirror" >&2
# minbase + an explicit list: no recommends, the smallest tree that has what the list names.
debootstrap --variant=minbase --cache-dir="$debcache" --include="$pkgs" \
    "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 40 "$work/debootstrap.log" >&2
    [ -f "$work/root/debootstrap/debootstrap.log" ] && tail -n 40 "$work/root/debootstrap/debootstrap.log" >&2
    echo "build-rootfs: debootstrap of $suite from $mirror failed (log above)" >&2
    exit 1
}
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*_Packages
tar -C "$work/root" --numeric-owner --xattrs -cf - . | zstd -q -T0 -3 -o "$work/rootfs.tar.zst"
mv "$work/rootfs.tar.zst" "$out"
echo "build-rootfs: wrote $out ($(du -h "$out" | cut -f1))" >&2
