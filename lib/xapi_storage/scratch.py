"""Scratch block storage for tests: sparse files on loop devices, optionally a volume group on
them, and everything removed afterwards.

    with LoopDevices(2, 128 * MiB) as loops:            # loops.devices: ["/dev/loop3", ...]
        ...                                             # e.g. SR.create device=loops.device
    with LoopDevices(2, vg="my-test-vg") as loops:      # loops.vg: a VG tagged TEST_TAG
        ...

On leaving the block (also after an exception) the files, the loop devices and whatever lvm2
has on them go: every volume group that lives only on these devices (the one made here, or
one a plugin under test made, with its logical volumes), then the physical-volume labels, then
the loop devices. A volume group that also spans a device not made here is left alone and
reported: the cleanup never touches storage it did not make. What could not be removed is
raised as ScratchLeft at the end, after everything else was tried.

No pytest here: dom0 of the test bed uses it without pytest. The pytest fixtures built on it,
`loop_devices` and `loop_vg`, are in xapi_storage.testing.
"""

import os
import shutil
import subprocess
import tempfile
import uuid

MiB = 1 << 20
TEST_TAG = "xapi_storage_test"      # the tag on every volume group made here (vgs @TAG)
COMMAND_TIMEOUT = 120


class ScratchLeft(Exception):
    """The cleanup could not remove something; the message lists what and why."""


def unavailable(lvm=False):
    """Why loop devices (with `lvm`: also a volume group, which needs lvm2 and device-mapper)
    cannot be used on this machine, or None."""
    if os.geteuid() != 0:
        return "loop devices need root"
    if not os.path.exists("/dev/loop-control") or not shutil.which("losetup"):
        return "no loop driver (/dev/loop-control) or no losetup"
    if lvm:
        if not shutil.which("lvm"):
            return "no lvm2 (the lvm command is not installed)"
        if not _device_mapper():
            return "no device-mapper (not in /proc/misc, no /dev/mapper/control)"
    return None


def _device_mapper():
    try:
        with open("/proc/misc") as f:
            if any(ln.split()[1:] == ["device-mapper"] for ln in f):
                return True
    except OSError:
        pass
    return os.path.exists("/dev/mapper/control")


def _run(argv, check=True):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=COMMAND_TIMEOUT)
    if check and r.returncode != 0:
        raise ScratchLeft(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class LoopDevices:
    """`n` sparse files of `size` bytes in a fresh directory under `dir` (default: the system's
    temporary directory), each on a loop device. `vg`: also make a volume group of that name
    on all of them, tagged TEST_TAG (`True` picks a fresh name). Attributes once entered:
    `devices` (paths), `device` (the same, comma-separated: the form of our lvm-raw's
    device-config), `vg` (the name, or None), `files`."""

    def __init__(self, n=2, size=128 * MiB, vg=None, dir=None):
        if n < 1 or size < 8 * MiB:
            raise ValueError("LoopDevices: at least one device of at least 8 MiB")
        self.n, self.size, self.parent = n, size, dir
        self.vg = f"xapi-storage-test-{uuid.uuid4().hex[:8]}" if vg is True else vg
        self.dir = None
        self.files, self.devices = [], []

    @property
    def device(self):
        return ",".join(self.devices)

    def __enter__(self):
        try:
            self.dir = tempfile.mkdtemp(prefix="xapi-storage-loops.", dir=self.parent)
            for i in range(self.n):
                f = os.path.join(self.dir, f"disk{i}.img")
                with open(f, "wb") as fh:
                    fh.truncate(self.size)
                self.files.append(f)
                self.devices.append(_run(["losetup", "-f", "--show", f]).stdout.strip())
            if self.vg:
                _run(["vgcreate", "-q", "--addtag", TEST_TAG, self.vg] + self.devices)
        except BaseException:
            self.close(raise_left=False)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        # after a failure in the block, the block's exception is the one worth seeing
        self.close(raise_left=exc_type is None)

    def close(self, raise_left=True):
        """Remove everything (see the module's text); raise ScratchLeft listing what stayed."""
        left = []
        if self.devices and shutil.which("lvm"):
            left += self._remove_lvm()
        for d in self.devices:
            r = _run(["losetup", "-d", d], check=False)
            if r.returncode != 0 and os.path.exists(f"/sys/block/{os.path.basename(d)}/loop"):
                left.append(f"loop device {d}: {r.stderr.strip()}")
        self.devices = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            if os.path.exists(self.dir):
                left.append(f"directory {self.dir}")
            self.dir = None
        if left and raise_left:
            raise ScratchLeft("; ".join(left))
        return left

    def _pvs(self):
        """{pv path: vg name or ""} of every physical volume lvm2 sees."""
        r = _run(["pvs", "--noheadings", "--separator", "|", "-o", "pv_name,vg_name"],
                 check=False)
        out = {}
        for ln in r.stdout.splitlines():
            if "|" in ln:
                pv, vg = ln.strip().split("|", 1)
                out[pv.strip()] = vg.strip()
        return out

    def _remove_lvm(self):
        left = []
        ours = set(self.devices)
        pvs = self._pvs()
        for vg in sorted({v for p, v in pvs.items() if p in ours and v}):
            spans = sorted(p for p, v in pvs.items() if v == vg)
            if not set(spans) <= ours:
                left.append(f"volume group {vg} also spans {[p for p in spans if p not in ours]},"
                            " not made here: left alone")
                continue
            _run(["vgchange", "-q", "-an", vg], check=False)
            r = _run(["vgremove", "-q", "-ff", "-y", vg], check=False)
            if r.returncode != 0:
                left.append(f"volume group {vg}: {r.stderr.strip()}")
        pvs = self._pvs()
        for d in self.devices:
            if d in pvs and not pvs[d]:
                r = _run(["pvremove", "-q", "-ff", "-y", d], check=False)
                if r.returncode != 0:
                    left.append(f"physical volume {d}: {r.stderr.strip()}")
        return left


def loop_backings():
    """{"/dev/loopN": backing file} of every loop device in use ("<file> (deleted)" once the
    file is removed)."""
    out = {}
    for n in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{n}/loop/backing_file") as f:
                out["/dev/" + n] = f.read().strip()
        except OSError:
            continue
    return out


def still_there(devices=(), files=(), vg=None):
    """What of these still exists: a loop device still backed by its file (`devices` and
    `files` pairwise, as LoopDevices made them), a file, the volume group `vg`. For tests of
    a cleanup; [] when everything is gone."""
    left = []
    backings = loop_backings()
    for dev, f in zip(devices, files):
        if backings.get(dev, "").startswith(f):
            left.append(f"loop device {dev} on {f}")
    left += [f"file {f}" for f in files if os.path.exists(f)]
    if vg and shutil.which("lvm") and _run(["vgs", vg], check=False).returncode == 0:
        left.append(f"volume group {vg}")
    return left
