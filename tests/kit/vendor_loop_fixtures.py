"""A vendor's tests of its own: they use the loop_devices and loop_vg fixtures by name, nothing
imported from our package. Not collected by our suite (its name does not start with test_):
tests/kit/test_fixtures.py runs it here, and tests/xen/test_conformance_real.py in dom0 of the
test bed (real lvm2 and device-mapper), each from a copy in an empty directory, with pytest.

$SCRATCH_RECORD (a file) gets one JSON line per test: the devices, files and VG it was given,
so that the caller can check they are gone afterwards. $SCRATCH_FAIL=1 makes each test fail
at its end, after it made a logical volume: the fixtures must clean up after a failure too.
"""

import json
import os
import shutil
import subprocess


def _record(loops):
    with open(os.environ["SCRATCH_RECORD"], "a") as f:
        f.write(json.dumps({"devices": loops.devices, "files": loops.files,
                            "vg": loops.vg}) + "\n")


def _sh(*argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def _end():
    assert os.environ.get("SCRATCH_FAIL") != "1", "failing on purpose (SCRATCH_FAIL=1)"


def test_loop_devices_are_fresh_loop_devices(loop_devices):
    _record(loop_devices)
    assert len(loop_devices.devices) == 2
    assert loop_devices.device == ",".join(loop_devices.devices)
    for dev, f in zip(loop_devices.devices, loop_devices.files):
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/loop/backing_file") as b:
            assert b.read().strip() == f
        with open(f"/sys/block/{name}/size") as s:
            assert int(s.read()) * 512 == 128 << 20
    if shutil.which("lvm") and os.path.exists("/dev/mapper/control"):
        # what lvm-raw's SR.create does with device-config device=...: a VG of its own
        _sh("vgcreate", "-q", "vendor-made-vg", *loop_devices.devices)
        _sh("lvcreate", "-q", "-L", "8m", "-n", "lv0", "vendor-made-vg")
    _end()


def test_loop_vg_is_a_tagged_volume_group_on_loop_devices(loop_vg):
    _record(loop_vg)
    rows = _sh("vgs", "--noheadings", "--separator", "|", "-o", "vg_name,pv_count",
               "@xapi_storage_test").split()
    assert f"{loop_vg.vg}|2" in rows, rows
    pvs = _sh("pvs", "--noheadings", "-o", "pv_name", "--select", f"vg_name={loop_vg.vg}")
    assert sorted(pvs.split()) == sorted(loop_vg.devices)
    _sh("lvcreate", "-q", "-L", "8m", "-n", "lv0", loop_vg.vg)      # active, in use by dm
    assert os.path.exists(f"/dev/{loop_vg.vg}/lv0")
    _end()
