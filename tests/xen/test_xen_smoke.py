"""Smoke tests that prove the test bed is real Xen (issue 4, item 4). One booted bed, one guest."""

import pytest

pytestmark = pytest.mark.xen

WAIT_DEV = "for i in $(seq 150); do [ -b /dev/{d} ] && break; sleep 0.2; done; [ -b /dev/{d} ]"
# TCG guest I/O costs per request (tens to hundreds of IOPS, fewer when the host is busy): few,
# larger random writes, each checked by crc32c on read-back
FIO_VERIFY = ("fio --name=verify --filename=/dev/{d} --rw=randwrite --bs=16k --size={size} "
              "--direct=1 --ioengine=psync --verify=crc32c --verify_fatal=1 --do_verify=1 "
              "--thread --output-format=terse --terse-version=3")


def test_xl_info_shows_the_hypervisor(bed):
    rc, out, err = bed.dom0("xl info", timeout=60)
    assert rc == 0, err
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    assert (info["xen_major"], info["xen_minor"]) == ("4", "17")
    assert "pv" in info["virt_caps"].split()
    rc, out, _ = bed.dom0(["xl", "list"], timeout=30)
    assert rc == 0 and out.splitlines()[1].split()[:2] == ["Domain-0", "0"]


DEVICES = """
import os, socket
for path in ("/dev/xen/gntdev", "/dev/xen/evtchn", "/dev/xen/gntalloc", "/dev/xen/privcmd"):
    os.close(os.open(path, os.O_RDWR))
    print("opened", path)
s = socket.socket(socket.AF_UNIX)
s.connect("/run/xenstored/socket")
s.close()
print("connected /run/xenstored/socket")
from pyxs import Client
with Client(unix_socket_path="/run/xenstored/socket") as c:
    c.write(b"/local/domain/0/data/testbed", b"hello from dom0")
    print("read back", c.read(b"/local/domain/0/data/testbed").decode())
    print("dom0 name", c.read(b"/local/domain/0/name").decode())
"""


def test_dom0_xen_devices_open_from_python(bed):
    rc, out, err = bed.dom0(["/opt/xapi-storage/venv/bin/python", "-c", DEVICES], timeout=60)
    assert rc == 0, err
    assert "read back hello from dom0" in out
    assert "dom0 name Domain-0" in out
    # the real xenstored saw that write: read it with Xen's own C client too
    rc, out, _ = bed.dom0("xenstore-read /local/domain/0/data/testbed", timeout=30)
    assert (rc, out.strip()) == (0, "hello from dom0")


def test_our_package_is_installed_in_dom0(bed):
    rc, out, err = bed.dom0("/opt/xapi-storage/venv/bin/xapi-storage --help", timeout=60)
    assert rc == 0, err
    assert "testbed" in out
    rc, out, err = bed.dom0(["/opt/xapi-storage/venv/bin/python", "-c",
                             "import xapi_storage, jsonschema, pyxs, cffi; "
                             "print(xapi_storage.__file__)"], timeout=60)
    assert rc == 0, err
    assert out.startswith("/opt/xapi-storage/venv/lib/")


def test_block_attach_file_fio_verify(bed, guest):
    bed.dom0("rm -f /root/blk1.img; truncate -s 64M /root/blk1.img", check=True)
    bed.dom0(["xl", "block-attach", guest.name,
              "format=raw,vdev=xvdb,access=rw,target=/root/blk1.img"], timeout=120, check=True)
    try:
        guest.run(WAIT_DEV.format(d="xvdb"), timeout=60, check=True)
        assert guest.run("cat /sys/block/xvdb/size", check=True).stdout.strip() == str(64 << 11)
        res = guest.run(FIO_VERIFY.format(d="xvdb", size="2M"), timeout=240)
        assert res.rc == 0, res.stderr + res.stdout
        # terse v3: field 5 is the error count
        assert res.stdout.split(";")[4] == "0", res.stdout
        guest.run("echo TESTBED-MARK-xvdb | dd of=/dev/xvdb bs=512 seek=100000 conv=fsync "
                  "2>/dev/null", check=True)
    finally:
        bed.dom0(["xl", "block-detach", guest.name, "xvdb"], timeout=120)
    # what the guest wrote through blkfront -> blkback -> loop is in dom0's file
    rc, out, _ = bed.dom0("dd if=/root/blk1.img bs=512 skip=100000 count=1 2>/dev/null | head -n1",
                          timeout=30)
    assert out.strip() == "TESTBED-MARK-xvdb"
    assert not guest.run("[ -b /dev/xvdb ]").ok, "xvdb is still there after block-detach"


def test_qdisk_serves_a_disk_to_the_guest(bed, guest):
    # the guest config carried xvdd on qdisk: libxl started a device model for the guest
    rc, out, _ = bed.dom0("ps -eo args | grep -- '-xen-domid %d ' | grep -v grep" % guest.domid,
                          timeout=30)
    assert rc == 0 and "qemu" in out, "no device model QEMU for domid %d" % guest.domid
    rc, out, _ = bed.dom0("xenstore-list /local/domain/0/backend/qdisk/%d" % guest.domid,
                          timeout=30)
    assert rc == 0 and out.split() == ["51760"], out  # xvdd
    guest.run(WAIT_DEV.format(d="xvdd"), timeout=60, check=True)
    res = guest.run(FIO_VERIFY.format(d="xvdd", size="2M"), timeout=240)
    assert res.rc == 0, res.stderr + res.stdout
    assert res.stdout.split(";")[4] == "0", res.stdout
    guest.run("echo TESTBED-MARK-xvdd | dd of=/dev/xvdd bs=512 seek=100000 conv=fsync "
              "2>/dev/null", check=True)
    rc, out, _ = bed.dom0("dd if=/root/qdisk.img bs=512 skip=100000 count=1 2>/dev/null "
                          "| head -n1", timeout=30)
    assert out.strip() == "TESTBED-MARK-xvdd"


LVM = """
set -e
truncate -s 256M /root/pv0.img /root/pv1.img
LOOP0=$(losetup -f --show /root/pv0.img)
LOOP1=$(losetup -f --show /root/pv1.img)
echo "loops $LOOP0 $LOOP1"
pvcreate -q -y "$LOOP0" "$LOOP1"
vgcreate -q tbvg "$LOOP0" "$LOOP1"
lvcreate -q -y -L 300M -n lv1 tbvg
dmsetup ls | grep -q '^tbvg-lv1'
[ -b /dev/tbvg/lv1 ]
echo LVM-DATA | dd of=/dev/tbvg/lv1 bs=512 seek=500000 conv=fsync 2>/dev/null
dd if=/dev/tbvg/lv1 bs=512 skip=500000 count=1 2>/dev/null | head -n1
lvs --noheadings -o lv_name,lv_size --units m tbvg
"""
LVM_CLEANUP = """
lvremove -q -y tbvg >/dev/null 2>&1; vgremove -q -y tbvg >/dev/null 2>&1
for l in $(losetup -j /root/pv0.img -O NAME -n) $(losetup -j /root/pv1.img -O NAME -n); do
    pvremove -q -y $l >/dev/null 2>&1; losetup -d $l; done
rm -f /root/pv0.img /root/pv1.img
"""


def test_lvm_volume_group_on_loop_devices(bed):
    try:
        rc, out, err = bed.dom0(LVM, timeout=180)
        assert rc == 0, err + out
        # the LV spans both PVs (300M > 256M): device-mapper really linear-maps two loops
        assert "LVM-DATA" in out
        assert "lv1 300.00m" in " ".join(out.split())
    finally:
        bed.dom0(LVM_CLEANUP, timeout=120)


def test_nfs_export_mounted_by_dom0_itself(bed):
    bed.nfs_export("/srv/nfs/smoke")
    bed.dom0("echo from-the-server > /srv/nfs/smoke/hello", check=True)
    script = ("set -e; mkdir -p /mnt/nfs-smoke; "
              "mount -t nfs -o vers=4.2,soft,timeo=100 127.0.0.1:/srv/nfs/smoke /mnt/nfs-smoke; "
              "grep ' /mnt/nfs-smoke nfs4 ' /proc/mounts; cat /mnt/nfs-smoke/hello; "
              "echo from-the-client > /mnt/nfs-smoke/back; sync")
    try:
        rc, out, err = bed.dom0(script, timeout=120)
        assert rc == 0, err + out
        assert "from-the-server" in out
    finally:
        bed.dom0("umount /mnt/nfs-smoke", timeout=60)
    rc, out, _ = bed.dom0("cat /srv/nfs/smoke/back", timeout=30)
    assert out.strip() == "from-the-client"


CFFI_BUILD = """
import sys, tempfile
from cffi import FFI
ffi = FFI()
ffi.cdef("int tb_add(int, int);")
ffi.set_source("_tb_cffi_probe", "int tb_add(int a, int b) { return a + b; }")
d = tempfile.mkdtemp()
ffi.compile(tmpdir=d, verbose=False)
sys.path.insert(0, d)
import _tb_cffi_probe
print("tb_add", _tb_cffi_probe.lib.tb_add(40, 2))
"""


def test_dom0_venv_builds_a_cffi_c_module(bed):
    # what our package's install needs: gcc, python3-dev and cffi from the venv
    rc, out, err = bed.dom0(["/opt/xapi-storage/venv/bin/python", "-c", CFFI_BUILD], timeout=180)
    assert rc == 0, err
    assert out.strip() == "tb_add 42"
