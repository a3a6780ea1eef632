#!/usr/bin/env bash
# Stage 2 of the test bed image build: from the stage-1 root file system (build-rootfs.sh) make
#   OUT/xen           the Xen hypervisor, uncompressed (QEMU's multiboot loader needs the ELF)
#   OUT/vmlinuz       the Debian kernel (dom0, and the PV guest's kernel inside dom0)
#   OUT/initrd.img    a small dom0 initramfs (virtio + ext4 only)
#   OUT/dom0.img      the dom0 root disk (ext4, made with mkfs.ext4 -d: no loop mount)
#   OUT/packages.lock the exact Debian package versions inside (dpkg-query)
# and, inside dom0.img, /var/lib/testbed/guest/{vmlinuz,initrd.gz}: the guest's kernel and its
# busybox + fio + e2fsprogs + xen-blkfront initramfs.
#   build-images.sh ROOTFS.tar.zst DATA_DIR OUT_DIR
set -euo pipefail
rootfs_tar=$1 data=$2 out=$3
[ "$(id -u)" -eq 0 ] || { echo "build-images: needs root (chroot, device nodes)" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
R=$work/root
mkdir -p "$R"
zstd -q -d -c "$rootfs_tar" | tar -C "$R" --numeric-owner --xattrs -xf -
K=$(basename "$(ls -d "$R"/lib/modules/* | head -n1)")
echo "build-images: kernel $K" >&2

# ---- dom0 -------------------------------------------------------------------------------------
install -m 0755 "$data/dom0-init.sh" "$R/usr/local/sbin/testbed-init"
install -D -m 0755 "$data/dom0-agent.py" "$R/usr/local/lib/testbed/dom0-agent.py"
echo '/dev/vda / ext4 rw 0 1' > "$R/etc/fstab"
echo dom0 > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 dom0\n::1 localhost\n' > "$R/etc/hosts"
: > "$R/etc/exports"
# a venv on the system's packages, for our package (see docs/testing.md: no PyPI in dom0)
chroot "$R" python3 -m venv --system-site-packages /opt/xapi-storage/venv

# small dom0 initramfs: only what finds and mounts / (10 MB instead of 40)
printf 'virtio_pci\nvirtio_blk\next4\n' > "$R/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
chroot "$R" mkinitramfs -o /boot/initrd-testbed.img "$K"

# ---- guest initramfs: static busybox, fio and its libraries, xen-blkfront ------------------------
G=$work/guest
mkdir -p "$G"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib64,usr/bin}
cp "$R/bin/busybox" "$G/bin/busybox"
for applet in $(chroot "$R" /bin/busybox --list); do
    # never link busybox to itself (the guest would fail to run /init with ELOOP)
    [ "$applet" = busybox ] || ln -sf busybox "$G/bin/$applet"
done
# fio, and e2fsprogs' mke2fs/e2fsck for ext4 in the guest (busybox has neither ext4 nor a real
# fsck); called by full path in /usr/sbin so busybox's applets of the same names never shadow them
mkdir -p "$G/usr/sbin"
cp "$R/usr/bin/fio" "$G/usr/bin/fio"
cp "$R/sbin/mke2fs" "$G/usr/sbin/mke2fs"
cp "$R/sbin/e2fsck" "$G/usr/sbin/e2fsck"
ln -sf mke2fs "$G/usr/sbin/mkfs.ext4"
ln -sf e2fsck "$G/usr/sbin/fsck.ext4"
cp "$R/etc/mke2fs.conf" "$G/etc/mke2fs.conf"
for bin in /usr/bin/fio /sbin/mke2fs /sbin/e2fsck; do
    chroot "$R" /lib64/ld-linux-x86-64.so.2 --list "$bin" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p'
done | sort -u |
while read -r lib; do
    mkdir -p "$G$(dirname "$lib")"
    cp -L "$R$lib" "$G$lib"
done
cp -L "$R/lib64/ld-linux-x86-64.so.2" "$G/lib64/"
: > "$G/etc/modules.order"
for m in xen-blkfront ext4 loop; do
    # one module per call: modprobe --show-depends resolves only its first argument
    chroot "$R" modprobe -S "$K" --show-depends "$m" | while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        dest=${path%.xz}; dest=${dest%.zst}
        grep -qx "$dest" "$G/etc/modules.order" && continue
        mkdir -p "$G$(dirname "$dest")"
        case $path in
            *.xz) xz -dc "$R$path" > "$G$dest" ;;
            *.zst) zstd -q -dc "$R$path" > "$G$dest" ;;
            *) cp "$R$path" "$G$dest" ;;
        esac
        echo "$dest" >> "$G/etc/modules.order"
    done
done
install -m 0755 "$data/guest-init.sh" "$G/init"
mkdir -p "$R/var/lib/testbed/guest"
(cd "$G" && find . | cpio -o -H newc --quiet | gzip -1) > "$R/var/lib/testbed/guest/initrd.gz"
cp "$R/boot/vmlinuz-$K" "$R/var/lib/testbed/guest/vmlinuz"

# ---- slim down, record, make the images ---------------------------------------------------------
chroot "$R" dpkg-query -W -f '${Package}\t${Version}\n' > "$out/packages.lock"
rm -rf "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/locale/* \
    "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/debconf/*-old \
    "$R/lib/modules/$K/kernel/drivers/gpu" "$R/lib/modules/$K/kernel/drivers/media" \
    "$R/lib/modules/$K/kernel/sound" "$R/lib/modules/$K/kernel/drivers/infiniband" \
    "$R/lib/modules/$K/kernel/drivers/net/wireless"
chroot "$R" depmod "$K"
zcat "$R"/boot/xen-4.17-amd64.gz > "$work/xen"
cp "$R/boot/vmlinuz-$K" "$work/vmlinuz"
cp "$R/boot/initrd-testbed.img" "$work/initrd.img"
truncate -s 4G "$work/dom0.img"
mkfs.ext4 -q -F -L testbed-dom0 -d "$R" "$work/dom0.img"
mv "$work/xen" "$work/vmlinuz" "$work/initrd.img" "$work/dom0.img" "$out/"
echo "build-images: done: $(du -sh --apparent-size "$out/dom0.img" | cut -f1) dom0.img" \
     "($(du -sh "$out/dom0.img" | cut -f1) used), guest initrd" \
     "$(du -h "$R/var/lib/testbed/guest/initrd.gz" | cut -f1)" >&2
