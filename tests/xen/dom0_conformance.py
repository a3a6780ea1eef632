"""Runs INSIDE dom0 of the test bed (tests/xen/test_conformance_real.py starts it with the dom0
venv's python): `xapi-storage conformance` against our lvm-raw and nfs-raw volume plugins, as
a vendor runs it against theirs, with our blkback datapath installed beside them.

    python dom0_conformance.py lvm-thick|lvm-thin|nfs|vendor-pytest

installs every registered plugin into a fresh root (`xapi-storage install --root`), gives the
run its own datapath state directory, and runs the command line with the device-config of
real storage: for lvm-raw two loop devices (SR.create makes the volume group on them, real
lvm2 and device-mapper); for nfs-raw the export EXPORT of dom0's own kernel NFS server (the
test makes it with bed.nfs_export), mounted over 127.0.0.1, with --hide-storage unmounting
the SR and --restore-storage attaching it again through the plugin's own SR.attach.

`vendor-pytest` runs tests/kit/vendor_loop_fixtures.py with pytest, as a vendor's test of the
loop_devices and loop_vg fixtures (pytest comes from the wheels the host test puts in the
checkout's build/dom0-wheels, seen here through the 9p share).

It prints the run's table, then `LEFT <what>` for each thing the run left behind (a logical
volume, volume group or physical volume on the loop devices, a loop device of its own, a mount
under the SR mount root, a file on the export, a datapath state file, a lock file) or `LEFT
nothing`, and exits with the command's exit status (1 as well when something was left).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

VENV = "/opt/xapi-storage/venv"
XAPI_STORAGE = VENV + "/bin/xapi-storage"
RUN_TIMEOUT = 1500      # one run of the command; the host gives the whole script 1800 s
GRACE = 180             # for the run's teardown once it was sent SIGTERM
EXPORT = "/srv/nfs/conformance"
SERVER = "127.0.0.1"
MOUNT_ROOT = "/run/sr-mount"
LVM_LOCKS = "/run/lock/xapi-storage/lvm"
MiB = 1 << 20

from xapi_storage.scratch import LoopDevices, loop_backings, still_there

WHEELS = "/mnt/checkout/build/dom0-wheels"      # pytest and its dependencies, from the host
VENDOR_TEST = "/mnt/checkout/tests/kit/vendor_loop_fixtures.py"


def sh(cmd, check=True):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: exit {r.returncode}: {r.stderr}{r.stdout}")
    return r


def mounts():
    with open("/proc/self/mounts") as f:
        return sorted(ln.split()[1] for ln in f if ln.split()[1].startswith(MOUNT_ROOT + "/"))


def files_under(d):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


def conformance(plugin_dir, config, extra, env):
    """Run the command, print its output, return its exit status. One that does not end
    within RUN_TIMEOUT is sent SIGTERM, on which its teardown still destroys what it made (a
    SIGKILL would skip that), and killed only if that does not end within GRACE."""
    argv = [XAPI_STORAGE, "conformance", plugin_dir, "--repeat", "2", "--parallel", "3",
            "--timeout", "120"]
    for k, v in sorted(config.items()):
        argv += ["-c", f"{k}={v}"]
    p = subprocess.Popen(argv + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, env=env)
    try:
        out, _ = p.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, _ = p.communicate(timeout=GRACE)
            how = "sent SIGTERM"
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                out, _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                out = "(its output stayed open)"
            how = f"sent SIGTERM, then SIGKILL after {GRACE} s"
        print(f"{out}\nTIMEOUT: no end within {RUN_TIMEOUT} s; {how}; exit {p.returncode}",
              flush=True)
        return p.returncode or 1
    print(out, flush=True)
    return p.returncode


def vendor_pytest(work):
    """The loop_devices and loop_vg fixtures in a vendor's own test directory, run by pytest
    (installed from the host's wheels into a directory of its own: dom0 has no PyPI), once
    passing and once failing on purpose after making a logical volume; what is left."""
    site, tests = os.path.join(work, "pytest-site"), os.path.join(work, "vendor")
    sh([VENV + "/bin/python", "-m", "pip", "install", "-q", "--no-index", "--find-links",
        WHEELS, "--target", site, "pytest"])
    os.mkdir(tests)
    shutil.copy(VENDOR_TEST, os.path.join(tests, "test_vendor.py"))
    record = os.path.join(work, "record.jsonl")
    rc = 0
    for fail, want in (("0", "2 passed"), ("1", "2 failed")):
        env = dict(os.environ, PYTHONPATH=site, SCRATCH_RECORD=record, SCRATCH_FAIL=fail,
                   CI="true")
        r = subprocess.run([VENV + "/bin/python", "-m", "pytest", "-q", "-rs", "-p",
                            "no:cacheprovider", "test_vendor.py"], cwd=tests, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=600)
        print(f"pytest (SCRATCH_FAIL={fail}): exit {r.returncode}\n{r.stdout}", flush=True)
        if want not in r.stdout:
            print(f"expected {want!r}")
            rc = 1
    with open(record) as f:
        records = [json.loads(ln) for ln in f]
    print(f"records: {len(records)}")
    if len(records) != 4:
        rc = 1
    return rc, [x for rec in records for x in still_there(rec["devices"], rec["files"], rec["vg"])]


def main(which):
    work = tempfile.mkdtemp(prefix="xs-conformance.", dir="/root")
    root, state = os.path.join(work, "plugins"), os.path.join(work, "datapath-state")
    env = dict(os.environ, XAPI_STORAGE_DATAPATH_STATE=state)
    sh([VENV + "/bin/xapi-storage", "install", "--root", root, "--observer-python",
        VENV + "/bin/python"])
    left = []
    mounts_before = mounts()
    try:
        if which == "vendor-pytest":
            rc, left = vendor_pytest(work)
        elif which.startswith("lvm-"):
            d = root + "/volume/org.xen.xapi.storage.lvm-raw"
            locks_before = set(glob.glob(LVM_LOCKS + "/*"))
            with LoopDevices(2, 128 * MiB) as loops:
                devs = loops.devices
                config = {"device": loops.device}
                if which == "lvm-thin":
                    config["provisioning"] = "thin"
                # no --hide-storage: a volume group cannot be taken away and given back
                # without a device-mapper layer of the test's own; storage-gone is skipped
                rc = conformance(d, config, [], env)
                for dev in devs:
                    pv = sh(["pvs", "--noheadings", "-o", "vg_name", dev], check=False)
                    if pv.returncode == 0:
                        left.append(f"physical volume {dev} (VG {pv.stdout.strip()!r})")
                lvs = sh(["lvs", "--noheadings", "-o", "vg_name,lv_name"]).stdout.split("\n")
                left += [f"logical volume {ln.split()}" for ln in lvs if "xapi-sr-" in ln]
            left += [f"lock file {p}" for p in sorted(set(glob.glob(LVM_LOCKS + "/*"))
                                                      - locks_before)]
        elif which == "nfs":
            d = root + "/volume/org.xen.xapi.storage.nfs-raw"
            attach = os.path.join(d, "SR.attach")
            hide = f'umount "{MOUNT_ROOT}/$XAPI_STORAGE_CONFIG_SR_UUID"'
            restore = (f'printf \'{{"dbg": "restore-storage", "configuration": %s}}\' '
                       f'"$XAPI_STORAGE_CONFIG" | {attach} --json')
            config = {"server": SERVER, "serverpath": EXPORT, "nfsversion": "4.2"}
            rc = conformance(d, config, ["--hide-storage", hide, "--restore-storage", restore],
                             env)
            left += [f"{EXPORT}/{n} on the export" for n in sorted(os.listdir(EXPORT))]
        else:
            raise SystemExit(f"unknown run {which!r}: lvm-thick, lvm-thin, nfs or vendor-pytest")
        left += [f"mount {m}" for m in mounts() if m not in mounts_before]
        left += [f"datapath state {p}" for p in files_under(state)]
        left += [f"loop device {dev} on {backing}" for dev, backing in loop_backings().items()
                 if backing.startswith((work, MOUNT_ROOT + "/", EXPORT + "/"))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for what in left:
        print(f"LEFT {what}")
    if not left:
        print("LEFT nothing")
    return rc or (1 if left else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
