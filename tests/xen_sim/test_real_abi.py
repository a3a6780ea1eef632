"""The real-Xen adapters cannot run here (no Xen): check their ABI and their failure mode.

ioctl numbers and struct layouts are checked against the values of the spec
(blkif-backend.md §4, xen-test-bed.md §6) and, when gcc and the kernel's UAPI headers
(linux-libc-dev: /usr/include/xen/*.h) are present, against the headers themselves.
"""

import errno
import os
import shutil
import subprocess

import pytest

from xapi_storage.xen import XenError, open_xen
from xapi_storage.xen import real as R

SPEC = {
    "IOCTL_GNTDEV_MAP_GRANT_REF": 0x00184700,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": 0x00104701,
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": 0x00184702,
    "IOCTL_GNTDEV_SET_MAX_GRANTS": 0x00044703,
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": 0x00104707,
    "IOCTL_GNTDEV_GRANT_COPY": 0x00104708,
    "IOCTL_GNTALLOC_ALLOC_GREF": 0x00184705,
    "IOCTL_EVTCHN_BIND_VIRQ": 0x00044500,
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": 0x00084501,
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": 0x00044502,
    "IOCTL_EVTCHN_UNBIND": 0x00044503,
    "IOCTL_EVTCHN_NOTIFY": 0x00044504,
    "IOCTL_EVTCHN_RESET": 0x00004505,
    "IOCTL_EVTCHN_RESTRICT_DOMID": 0x00024506,
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_ioctl_numbers_match_the_spec(name):
    assert getattr(R, name) == SPEC[name], f"{name}: {getattr(R, name):#x} != {SPEC[name]:#x}"


def test_map_grant_ref_argument_layout():
    buf = R.pack_map_grant_ref(7, [11, 12, 13])
    assert len(buf) == 16 + 3 * 8
    assert bytes(buf[:16]) == (3).to_bytes(4, "little") + bytes(12)
    assert bytes(buf[16:24]) == (7).to_bytes(4, "little") + (11).to_bytes(4, "little")
    assert bytes(buf[32:40]) == (7).to_bytes(4, "little") + (13).to_bytes(4, "little")
    assert isinstance(buf, bytearray)            # mutable: the kernel writes `index` back


HEADERS = ["/usr/include/xen/gntdev.h", "/usr/include/xen/gntalloc.h", "/usr/include/xen/evtchn.h"]


@pytest.mark.skipif(not shutil.which("gcc") or not all(os.path.exists(h) for h in HEADERS),
                    reason="needs gcc and linux-libc-dev's /usr/include/xen/{gntdev,gntalloc,evtchn}.h")
def test_against_kernel_uapi_headers(tmp_path):
    names = list(SPEC) + ["IOCTL_GNTALLOC_DEALLOC_GREF"]
    sizes = {
        "struct ioctl_gntdev_map_grant_ref": R.GNTDEV_MAP_HDR.size + R.GNTDEV_GRANT_REF.size,
        "struct ioctl_gntdev_grant_ref": R.GNTDEV_GRANT_REF.size,
        "struct ioctl_gntdev_unmap_grant_ref": R.GNTDEV_UNMAP.size,
        "struct ioctl_gntdev_get_offset_for_vaddr": R.GNTDEV_GET_OFFSET.size,
        "struct ioctl_gntdev_unmap_notify": R.GNTDEV_UNMAP_NOTIFY.size,
        "struct ioctl_gntdev_grant_copy": R.GNTDEV_GRANT_COPY.size,
        "struct ioctl_gntalloc_alloc_gref": R.GNTALLOC_ALLOC_HDR.size + 8,
        "struct ioctl_gntalloc_dealloc_gref": R.GNTALLOC_DEALLOC.size,
        "struct ioctl_evtchn_bind_interdomain": R.EVTCHN_BIND_INTERDOMAIN.size,
    }
    offsets = {
        ("struct ioctl_gntdev_map_grant_ref", "index"): 8,
        ("struct ioctl_gntdev_map_grant_ref", "refs"): 16,
        ("struct ioctl_gntalloc_alloc_gref", "index"): 8,
        ("struct ioctl_gntalloc_alloc_gref", "gref_ids"): 16,
        ("struct ioctl_gntdev_grant_copy", "segments"): 8,
    }
    src = ['#include <stdio.h>', '#include <stddef.h>', '#include <stdint.h>',
           '#include <sys/ioctl.h>', 'typedef uint32_t grant_ref_t;', 'typedef uint16_t domid_t;', '#include <xen/gntdev.h>', '#include <xen/gntalloc.h>',
           '#include <xen/evtchn.h>', 'int main(void) {']
    src += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in names]
    src += [f'printf("sizeof({s}) %lu\\n", (unsigned long)sizeof({s}));' for s in sizes]
    src += [f'printf("offsetof({s},{f}) %lu\\n", (unsigned long)offsetof({s}, {f}));'
            for s, f in offsets]
    src += ["return 0; }"]
    c = tmp_path / "abi.c"
    c.write_text("\n".join(src))
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-o", str(exe), str(c)], check=True)
    got = dict(line.rsplit(" ", 1) for line in subprocess.run(
        [str(exe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, check=True).stdout.splitlines())
    for n in names:
        assert int(got[n]) == getattr(R, n), n
    for s, size in sizes.items():
        assert int(got[f"sizeof({s})"]) == size, s
    for (s, f), off in offsets.items():
        assert int(got[f"offsetof({s},{f})"]) == off, (s, f)


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="this host has /dev/xen")
def test_missing_devices_give_a_clear_error():
    xen = open_xen("real")
    for make, dev in ((xen.grant_mapper, "gntdev"), (xen.grant_allocator, "gntalloc"),
                      (xen.event_channels, "evtchn")):
        with pytest.raises(XenError) as e:
            make()
        assert e.value.errno == errno.ENOENT
        assert f"/dev/xen/{dev}" in str(e.value) and "modprobe" in str(e.value)
    assert xen.xenstore_path.endswith("socket")
