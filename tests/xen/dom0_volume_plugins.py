"""Runs INSIDE dom0 of the test bed (tests/xen/test_volume_plugins.py starts it with the dom0 venv's
python): the lvm-raw and nfs-raw volume plugins through their installed executables, exactly
as xapi-storage-script calls them (argv [exe, "--json"], the arguments as JSON on stdin):
lvm-raw on a volume group made of loop devices (real lvm2 and device-mapper), nfs-raw on an
export of dom0's own NFS server (the test makes it with bed.nfs_export), mounted by dom0.

`python dom0_volume_plugins.py NAME...` runs the named checks and prints `PASS name` or
`FAIL name: why` for each (and what it saw), then exits 1 if any failed. Every check makes
its own loop devices and removes them, whatever happens.
"""

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor

VENV = "/opt/xapi-storage/venv"
ROOT = "/tmp/xs-plugins"
LVM_DIR = ROOT + "/volume/org.xen.xapi.storage.lvm-raw"
LOCK_DIR = "/run/lock/xapi-storage/lvm"
MiB = 1 << 20


def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: exit {r.returncode}: {r.stderr}{r.stdout}")
    return r


def install():
    if not os.path.isdir(LVM_DIR):
        sh([VENV + "/bin/xapi-storage", "install", "--root", ROOT])


def call(method, env=None, plugin=LVM_DIR, **args):
    """(exit status, JSON value) of one plugin executable; -9 and None if it was killed."""
    args.setdefault("dbg", "dom0-test")
    r = subprocess.run([os.path.join(plugin, method), "--json"], input=json.dumps(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if r.returncode < 0:
        return r.returncode, None
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"{method}: not one JSON value: {r.stdout!r} {r.stderr!r}")


def ok(method, **args):
    rc, out = call(method, **args)
    assert rc == 0, f"{method} {args}: {out}"
    return out


def fails(method, **args):
    """(error name, params) of a failed call. The interface's own errors (SR_does_not_exist,
    Volume_does_not_exist) travel as code SR_BACKEND_FAILURE with the name first in params."""
    rc, out = call(method, **args)
    assert rc == 1, f"{method} {args} should fail: {rc} {out}"
    assert set(out) == {"code", "params", "backtrace"}, out
    code, params = out["code"], out["params"]
    if code == "SR_BACKEND_FAILURE" and params and params[0].endswith("_does_not_exist"):
        return params[0], params[1:]
    return code, params


class Loops:
    """`with Loops(n, size) as devs`: n sparse files on loop devices, all removed after."""

    def __init__(self, n, size=128 * MiB):
        self.n, self.size = n, size
        self.dir = tempfile.mkdtemp(prefix="pv.", dir="/root")
        self.devs = []

    def __enter__(self):
        for i in range(self.n):
            f = f"{self.dir}/pv{i}.img"
            with open(f, "wb") as fh:
                fh.truncate(self.size)
            self.devs.append(sh(["losetup", "-f", "--show", f]).stdout.strip())
        return self.devs

    def __exit__(self, *exc):
        # whatever a failed check left: our VGs on these devices, then the PVs, then loops
        for d in self.devs:
            vg = sh(["pvs", "--noheadings", "-o", "vg_name", d], check=False).stdout.strip()
            if vg:
                sh(["vgchange", "-an", vg], check=False)
                sh(["vgremove", "-ff", "-y", vg], check=False)
            sh(["pvremove", "-ff", "-y", d], check=False)
            sh(["losetup", "-d", d], check=False)
        sh(["rm", "-rf", self.dir], check=False)


def lock_files(vg):
    return sorted(os.path.basename(p) for p in glob.glob(f"{LOCK_DIR}/{vg}.*"))


def lv_names(vg):
    out = sh(["lvs", "--noheadings", "-o", "lv_name", vg]).stdout
    return sorted(ln.strip() for ln in out.splitlines() if ln.strip())


def lv_active(vg, lv):
    return sh(["lvs", "--noheadings", "-o", "lv_active", f"{vg}/{lv}"]).stdout.strip() == "active"


def active(vg, lv):
    """The LV's device node, after activating it as a datapath's attach would (lvm-raw makes
    its volumes inactive and activation-skip: `-K` is needed). The plugin's own copies
    deactivate what no datapath holds, so the checks activate before each access."""
    sh(["lvchange", "-qq", "-ay", "-K", f"{vg}/{lv}"])
    return f"/dev/{vg}/{lv}"


def write_pattern(path, seed, size):
    data = hashlib.sha256(seed.encode()).digest() * (size // 32)
    with open(path, "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def digest(path, size):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def make_sr(devs, uuid, **extra):
    config = dict({"device": ",".join(devs)}, **extra)
    cfg = ok("SR.create", uuid=uuid, configuration=config, name="lvm SR", description="d")
    sr = ok("SR.attach", configuration=cfg)
    return cfg, sr


def accounted(sr):
    """SR.ls, then: every LV of the VG is ours and listed, or foreign; no lock file but the
    VG's and those of listed volumes (no holder file either: a killed copy's are released)."""
    listed = {v["key"] for v in ok("SR.ls", sr=sr)}
    lvs = lv_names(sr)
    assert set(lvs) >= listed, (lvs, listed)
    extra = [n for n in lvs if n not in listed and not n.startswith("foreign")
             and n != "xapi-pool"]         # a thin SR's pool
    assert not extra, f"LVs neither listed nor foreign: {extra}"
    locks = set(lock_files(sr)) - {f"{sr}.vg.lock", f"{sr}.act.lock", f"{sr}.attached"}
    stray = locks - {f"{sr}.{k}.lock" for k in listed}
    assert not stray, f"lock files of no volume: {stray}"
    return listed


# --- checks --------------------------------------------------------------------------------------

def check_lvm_lifecycle():
    install()
    with Loops(2) as devs:
        q = ok("Plugin.Query")
        assert q["plugin"] == "lvm-raw" and "VDI_SNAPSHOT" in q["features"], q
        assert "VDI_REVERT" in q["features"], q
        [p] = ok("SR.probe", configuration={"device": ",".join(devs)})
        assert p["complete"] is True and "sr" not in p, p
        uuid = "7d0a1d2e-5b5c-4d7e-9a61-3c7f1f0c0b01"
        cfg, sr = make_sr(devs, uuid)
        print("  SR key", sr)
        assert sr == "xapi-sr-" + uuid
        assert ok("SR.create", uuid=uuid, configuration={"device": ",".join(devs)},
                  name="lvm SR", description="d")["sr_uuid"] == uuid     # a retry converges
        [p] = ok("SR.probe", configuration={"device": devs[0]})
        assert p["complete"] and p["configuration"]["sr_uuid"] == uuid, p
        assert any(r["configuration"].get("sr_uuid") == uuid
                   for r in ok("SR.probe", configuration={}))
        st = ok("SR.stat", sr=sr)
        assert st["health"] == ["Healthy", ""] and st["uuid"] == uuid, st
        assert 200 * MiB < st["total_space"] <= 256 * MiB, st
        assert ok("SR.ls", sr=sr) == []
        v = ok("Volume.create", sr=sr, name="disk ü", description="desc", size=10 * MiB,
               sharable=False)
        key = v["key"]
        dev = f"/dev/{sr}/{key}"
        assert v["uri"] == [f"blkback://{dev}"], v["uri"]
        assert v["virtual_size"] == 12 * MiB, v        # whole 4 MiB extents
        # create's answer is computed from its lvcreate arguments: what lvm2 holds
        assert ok("Volume.stat", sr=sr, key=key) == v, (v, ok("Volume.stat", sr=sr, key=key))
        assert not os.path.exists(dev) and not lv_active(sr, key), "a new LV is active"
        attr = sh(["lvs", "--noheadings", "-o", "lv_attr", f"{sr}/{key}"]).stdout.strip()
        assert attr[9] == "k", f"a new LV is not activation-skip: {attr}"
        sum_v = write_pattern(active(sr, key), "v", 12 * MiB)
        for k, val in (("vdi-type", "user"), ("weird key, with = and ü", "x" * 3000)):
            ok("Volume.set", sr=sr, key=key, k=k, v=val)
        ok("Volume.unset", sr=sr, key=key, k="vdi-type")
        ok("Volume.set_name", sr=sr, key=key, new_name="renamed")
        s = ok("Volume.stat", sr=sr, key=key)
        assert s["name"] == "renamed" and s["keys"] == {"weird key, with = and ü": "x" * 3000}
        snap = ok("Volume.snapshot", sr=sr, key=key)
        assert snap["read_write"] is False and snap["name"] == "renamed", snap
        assert snap["keys"] == {}, snap
        assert ok("Volume.stat", sr=sr, key=snap["key"]) == snap, snap
        # the copy activated both LVs and let go of them after (nothing else holds them)
        assert not lv_active(sr, key) and not lv_active(sr, snap["key"]), "a copy left LVs active"
        snap_dev = active(sr, snap["key"])
        assert digest(snap_dev, 12 * MiB) == sum_v
        attr = sh(["lvs", "--noheadings", "-o", "lv_attr", f"{sr}/{snap['key']}"]).stdout
        assert attr.strip()[1] == "r", f"snapshot LV not read-only: {attr}"
        try:
            fd = os.open(snap_dev, os.O_WRONLY)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            raise AssertionError("wrote to a snapshot's LV")
        except OSError as e:
            print("  snapshot LV refuses writes:", e.strerror)
        assert digest(snap_dev, 12 * MiB) == sum_v
        clone = ok("Volume.clone", sr=sr, key=snap["key"])
        assert clone["read_write"] is True
        assert ok("Volume.stat", sr=sr, key=clone["key"]) == clone, clone
        clone_dev = active(sr, clone["key"])
        assert digest(clone_dev, 12 * MiB) == sum_v
        write_pattern(clone_dev, "clone", 4 * MiB)
        assert digest(active(sr, key), 12 * MiB) == sum_v, "writing the clone changed its origin"
        # revert: the volume gets the snapshot's data back and keeps its key, name and keys
        write_pattern(active(sr, key), "after the snapshot", 12 * MiB)
        ok("Volume.revert", sr=sr, snapshot=snap["key"], key=key)
        assert digest(active(sr, key), 12 * MiB) == sum_v, \
            "revert did not bring the snapshot's data back"
        s = ok("Volume.stat", sr=sr, key=key)
        assert s["name"] == "renamed" and s["read_write"] is True and \
            s["keys"] == {"weird key, with = and ü": "x" * 3000}, s
        assert lv_names(sr) == sorted([key, snap["key"], clone["key"]]), lv_names(sr)
        code, params = fails("Volume.revert", sr=sr, snapshot=key, key=snap["key"])
        assert params[0] == "Volume is read-only", params
        print("  reverted to the snapshot")
        ok("Volume.resize", sr=sr, key=key, new_size=20 * MiB)
        assert ok("Volume.stat", sr=sr, key=key)["virtual_size"] == 20 * MiB
        code, params = fails("Volume.resize", sr=sr, key=key, new_size=4 * MiB)
        assert params[:2] == ["VDI Invalid size", "shrinking not allowed"], params
        code, params = fails("Volume.resize", sr=sr, key=snap["key"], new_size=40 * MiB)
        assert params[0] == "Volume is read-only", params
        # too big: a structured "no space", nothing left behind
        before = lv_names(sr)
        code, params = fails("Volume.create", sr=sr, name="big", description="",
                             size=10 << 30, sharable=False)
        assert code == "SR_BACKEND_FAILURE_44", (code, params)
        assert lv_names(sr) == before
        # an LV that is not ours: never listed, never touched, and SR.destroy refuses
        sh(["lvcreate", "-qq", "-Zn", "-L", "4m", "-n", "foreign1", sr])
        assert {x["key"] for x in ok("SR.ls", sr=sr)} == {key, snap["key"], clone["key"]}
        code, params = fails("Volume.destroy", sr=sr, key="foreign1")
        assert code == "Volume_does_not_exist", (code, params)
        code, params = fails("SR.destroy", sr=sr)
        assert "not ours" in params[0], params
        sh(["lvremove", "-qq", "-f", f"{sr}/foreign1"])
        # metadata lives in the VG: what a reinstalled host sees (vgs/lvs) decodes
        sh(["vgchange", "-an", sr])
        assert not os.path.exists(dev)
        sr2 = ok("SR.attach", configuration=cfg)
        assert sr2 == sr and not os.path.exists(dev), "SR.attach activated an LV"
        s = ok("Volume.stat", sr=sr, key=key)
        assert s["name"] == "renamed" and s["keys"]["weird key, with = and ü"] == "x" * 3000
        ok("SR.set_name", sr=sr, new_name="new SR name")
        assert ok("SR.stat", sr=sr)["name"] == "new SR name"
        # the datapath's attach activates the LV it plugs, its last detach deactivates it
        dp = ROOT + "/datapath/blkback"
        attached = ok("Datapath.attach", plugin=dp, uri=s["uri"][0], domain="0")
        assert ["BlockDevice", {"path": dev}] in attached["implementations"], attached
        assert os.path.exists(dev) and lv_active(sr, key), "Datapath.attach did not activate"
        assert not lv_active(sr, clone["key"]), "an LV not attached was activated"
        # in use: destroy and detach refuse, saying why
        holder = open(dev, "rb")
        try:
            code, params = fails("Volume.destroy", sr=sr, key=key)
            assert params[0] == "Volume is in use", params
            code, params = fails("SR.detach", sr=sr)
            assert params[0] == "SR is in use" and key in params[2], params
        finally:
            holder.close()
        ok("Datapath.detach", plugin=dp, uri=s["uri"][0], domain="0")
        assert not os.path.exists(dev) and not lv_active(sr, key), "detach left the LV active"
        print("  LV inactive after SR.attach, active after Datapath.attach, inactive after detach")
        for k in (key, snap["key"], clone["key"]):
            ok("Volume.destroy", sr=sr, key=k)
            ok("Volume.destroy", sr=sr, key=k)        # idempotent
        assert accounted(sr) == set()
        ok("SR.detach", sr=sr)
        ok("SR.detach", sr=sr)
        ok("SR.destroy", sr=sr)
        assert sh(["vgs", sr], check=False).returncode != 0, "VG still there"
        assert sh(["pvs", devs[0]], check=False).returncode != 0, "PV still there"
        assert lock_files(sr) == [], lock_files(sr)
        code, _ = fails("SR.stat", sr=sr)
        assert code == "SR_does_not_exist", code


def check_lvm_bad_inputs():
    install()
    with Loops(2) as devs:
        sh(["mkfs.ext4", "-q", devs[1]])
        code, params = fails("SR.create", uuid="6b1c2f7a-0000-4000-8000-000000000001",
                             configuration={"device": ",".join(devs)}, name="", description="")
        print("  SR.create over ext4:", params)
        assert params[0] == "Invalid device-config" and devs[1] in params[2], params
        assert sh(["pvs", devs[0]], check=False).returncode != 0, "left a PV behind"
        assert sh(["blkid", devs[1]]).stdout.find("ext4") >= 0, "the filesystem was touched"
        for config in ({}, {"device": "/etc/passwd"}, {"device": "/dev/nonexistent"},
                       {"device": f"{devs[0]},{devs[0]}"}):
            code, params = fails("SR.create", uuid="6b1c2f7a-0000-4000-8000-000000000002",
                                 configuration=config, name="", description="")
            assert params[0] == "Invalid device-config", params
        for sr in ("", "xapi-sr-../x", "vg0", "xapi-sr-a b"):
            code, _ = fails("SR.ls", sr=sr)
            assert code == "SR_does_not_exist", (sr, code)
        cfg, sr = make_sr(devs[:1], "6b1c2f7a-0000-4000-8000-000000000003")
        for key in ("../x", "", "foreign", "6b1c2f7a-0000-4000-8000-00000000000Z"):
            code, _ = fails("Volume.stat", sr=sr, key=key)
            assert code == "Volume_does_not_exist", (key, code)
        code, params = fails("Volume.create", sr=sr, name="n", description="", size=-1,
                             sharable=False)
        assert code in ("SR_BACKEND_FAILURE_79", "Invalid_request"), (code, params)
        ok("SR.destroy", sr=sr)


def check_lvm_concurrent_creates():
    install()
    with Loops(2, 256 * MiB) as devs:
        cfg, sr = make_sr(devs, "0c0c0c0c-1111-4222-8333-444444444444")
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: call("Volume.create", sr=sr, name=f"v{i}",
                                                   description="", size=4 * MiB,
                                                   sharable=False), range(32)))
        bad = [r for r in results if r[0] != 0]
        assert not bad, bad
        keys = {r[1]["key"] for r in results}
        assert len(keys) == 32, len(keys)
        assert accounted(sr) == keys
        assert sorted(v["name"] for v in ok("SR.ls", sr=sr)) == sorted(f"v{i}" for i in range(32))
        ok("SR.destroy", sr=sr)         # removes the 32 (one process: TCG makes calls slow)
        assert sh(["vgs", sr], check=False).returncode != 0, "VG still there"
        assert lock_files(sr) == [], lock_files(sr)


# (method, arguments, the fault points it passes)
def _sweep_cases(sr, src):
    return [
        ("Volume.create", dict(sr=sr, name="n", description="", size=4 * MiB, sharable=False),
         ["create:pending", "create:ready"]),
        ("Volume.snapshot", dict(sr=sr, key=src), ["snapshot:pending", "copy:started",
                                                   "snapshot:data", "snapshot:ready"]),
        ("Volume.clone", dict(sr=sr, key=src), ["clone:pending", "copy:started",
                                                "clone:data", "clone:ready"]),
    ]


def check_lvm_crash_sweep():
    """A call killed at every fault point: SR.ls accounts for every LV and lock file, the
    source volume's data is intact, and repeating the call converges."""
    install()
    with Loops(2, 256 * MiB) as devs:
        cfg, sr = make_sr(devs, "5eed5eed-1111-4222-8333-444444444444")
        src = ok("Volume.create", sr=sr, name="src", description="", size=8 * MiB,
                 sharable=False)["key"]
        sum_src = write_pattern(active(sr, src), "src", 8 * MiB)
        sh(["lvchange", "-qq", "-an", f"{sr}/{src}"])     # as a volume no VM uses
        n = 0
        for method, args, points in _sweep_cases(sr, src):
            for point in points:
                rc, _ = call(method, env={"XAPI_STORAGE_FAULT": point}, **args)
                assert rc == -9, f"{method} never reached {point}: rc {rc}"
                listed = accounted(sr)
                assert src in listed
                # a killed copy's hold on the source is released by SR.ls
                assert not lv_active(sr, src), f"{point}: source left active"
                assert digest(active(sr, src), 8 * MiB) == sum_src, f"{point}: source"
                sh(["lvchange", "-qq", "-an", f"{sr}/{src}"])
                out = ok(method, **args)
                if method != "Volume.create":
                    assert digest(active(sr, out["key"]), 8 * MiB) == sum_src
                # the retry's volume, and one a call killed after its last step made
                for k in (listed | {out["key"]}) - {src}:
                    ok("Volume.destroy", sr=sr, key=k)
                n += 1
                print(f"  killed at {point}: accounted, retried")
        # revert killed at each step: the old volume or the reverted one, never half of each
        tgt = ok("Volume.create", sr=sr, name="tgt", description="", size=8 * MiB,
                 sharable=False)["key"]
        snap = ok("Volume.snapshot", sr=sr, key=src)["key"]
        # one kill per state the LVs can be left in (revert:pending and revert:swapped leave
        # states the fast tests cover: tests/lvm_raw; CI's bed time is short)
        for point, expect in (("copy:started", "old"), ("revert:made", "old"),
                              ("revert:old-aside", "reverted"), ("revert:old-gone", "reverted")):
            sum_old = write_pattern(active(sr, tgt), "tgt", 8 * MiB)
            rc, _ = call("Volume.revert", env={"XAPI_STORAGE_FAULT": point}, sr=sr,
                         snapshot=snap, key=tgt)
            assert rc == -9, f"Volume.revert never reached {point}: rc {rc}"
            listed = accounted(sr)
            assert listed == {src, snap, tgt}, (point, listed)
            got = digest(active(sr, tgt), 8 * MiB)
            assert got == {"old": sum_old, "reverted": sum_src}[expect], (point, expect)
            tags = sh(["lvs", "--noheadings", "-o", "lv_tags", sr]).stdout
            assert "xapi-storage:reverting" not in tags, (point, tags)
            ok("Volume.revert", sr=sr, snapshot=snap, key=tgt)
            assert digest(active(sr, tgt), 8 * MiB) == sum_src, point
            n += 1
            print(f"  killed at {point}: the {expect} volume, retried")
        for k in (tgt, snap):
            ok("Volume.destroy", sr=sr, key=k)
        victim = ok("Volume.create", sr=sr, name="victim", description="", size=4 * MiB,
                    sharable=False)["key"]
        for point in ("destroy:marked", "remove:data-gone"):
            rc, _ = call("Volume.destroy", env={"XAPI_STORAGE_FAULT": point}, sr=sr, key=victim)
            assert rc == -9, (point, rc)
            accounted(sr)
            ok("Volume.destroy", sr=sr, key=victim)
            assert victim not in accounted(sr)
            victim = ok("Volume.create", sr=sr, name="victim", description="", size=4 * MiB,
                        sharable=False)["key"]
            n += 1
        # SR.destroy is killed once, last (it ends the SR): the retry finishes it
        rc, _ = call("SR.destroy", env={"XAPI_STORAGE_FAULT": "sr-destroy:volume-gone"}, sr=sr)
        assert rc == -9, rc
        ok("SR.destroy", sr=sr)
        assert sh(["vgs", sr], check=False).returncode != 0
        assert lock_files(sr) == [], lock_files(sr)
        print(f"  {n + 1} killed calls")


def check_lvm_thin():
    """provisioning=thin: volumes in one thin pool, honest usage, instant read-only
    snapshots and writable clones that share blocks, the over-provisioning limit, and a
    killed thin snapshot that leaves nothing or a whole volume."""
    install()
    with Loops(2) as devs:
        cfg, sr = make_sr(devs, "7f1e0000-1111-4222-8333-444444444444",
                          provisioning="thin", overprovision="3")
        st = ok("SR.stat", sr=sr)
        print("  thin SR:", st["total_space"], st["free_space"], st["health"])
        pool = st["total_space"]
        assert 150 * MiB < pool < 256 * MiB and "thin pool data" in st["health"][1], st
        v = ok("Volume.create", sr=sr, name="t", description="", size=pool, sharable=False)
        # inactive: lvm2 does not know its allocation, the virtual size is the upper bound
        assert v["virtual_size"] >= pool and v["physical_utilisation"] == v["virtual_size"], v
        assert ok("Volume.stat", sr=sr, key=v["key"]) == v, v      # computed = what lvm2 holds
        dev = active(sr, v["key"])
        assert ok("Volume.stat", sr=sr, key=v["key"])["physical_utilisation"] == 0
        sum_v = write_pattern(dev, "thin", 16 * MiB)
        v2 = ok("Volume.stat", sr=sr, key=v["key"])
        print("  after 16 MiB written:", v2["physical_utilisation"])
        assert 15 * MiB <= v2["physical_utilisation"] < 40 * MiB, v2   # data_percent: 2 decimals
        assert ok("SR.stat", sr=sr)["free_space"] < st["free_space"]
        snap = ok("Volume.snapshot", sr=sr, key=v["key"])
        assert ok("Volume.stat", sr=sr, key=snap["key"]) == snap, snap
        assert snap["read_write"] is False and digest(active(sr, snap["key"]),
                                                      16 * MiB) == sum_v
        clone = ok("Volume.clone", sr=sr, key=snap["key"])
        write_pattern(active(sr, clone["key"]), "other", 4 * MiB)
        assert digest(dev, 16 * MiB) == sum_v and \
            digest(active(sr, snap["key"]), 16 * MiB) == sum_v
        # 3 volumes of the pool's size: a 4th pool-sized one passes 3x the pool
        code, params = fails("Volume.create", sr=sr, name="x", description="", size=pool,
                             sharable=False)
        print("  over-provisioned:", params)
        assert code == "SR_BACKEND_FAILURE_44" and "overprovision" in params[1], params
        code, params = fails("Volume.snapshot", sr=sr, key=v["key"])
        assert code == "SR_BACKEND_FAILURE_44", params
        ok("Volume.destroy", sr=sr, key=clone["key"])       # room for one more
        for point in ("snapshot:pending", "snapshot:ready"):
            before = accounted(sr)
            rc, _ = call("Volume.clone", env={"XAPI_STORAGE_FAULT": point.replace(
                "snapshot", "clone")}, sr=sr, key=snap["key"])
            assert rc == -9, (point, rc)
            after = accounted(sr)
            assert len(after - before) == (point == "snapshot:ready"), (point, after - before)
            for k in after - before:
                ok("Volume.destroy", sr=sr, key=k)
        # revert: a thin snapshot of the snapshot, swapped in
        write_pattern(dev, "after the snapshot", 16 * MiB)
        ok("Volume.revert", sr=sr, snapshot=snap["key"], key=v["key"])
        assert digest(active(sr, v["key"]), 16 * MiB) == sum_v, \
            "thin revert did not bring the data back"
        assert sorted(lv_names(sr)) == sorted([v["key"], snap["key"], "xapi-pool"])
        ok("Volume.resize", sr=sr, key=v["key"], new_size=v["virtual_size"] + 8 * MiB)
        assert ok("Volume.stat", sr=sr, key=v["key"])["virtual_size"] >= v["virtual_size"] + 8 * MiB
        for k in (snap["key"], v["key"]):
            ok("Volume.destroy", sr=sr, key=k)
        ok("SR.detach", sr=sr)
        ok("SR.destroy", sr=sr)
        assert sh(["vgs", sr], check=False).returncode != 0, "VG still there"
        assert lock_files(sr) == [], lock_files(sr)


# --- nfs-raw -------------------------------------------------------------------------------------
# The export is made by the test (bed.nfs_export) before the checks run: NFS_EXPORT on 127.0.0.1.

NFS_DIR = ROOT + "/volume/org.xen.xapi.storage.nfs-raw"
NFS_EXPORT = "/srv/nfs/xs"
NFS_SERVER = "127.0.0.1"


def nfs(method, env=None, **args):
    return call(method, env=env, plugin=NFS_DIR, **args)


def nfs_ok(method, **args):
    rc, out = nfs(method, **args)
    assert rc == 0, f"{method} {args}: {out}"
    return out


def nfs_fails(method, **args):
    return fails(method, plugin=NFS_DIR, **args)


def mounts_under(root="/run/sr-mount"):
    with open("/proc/self/mounts") as f:
        return [ln.split() for ln in f if ln.split()[1].startswith(root + "/")]


def nfs_config(**extra):
    return dict({"server": NFS_SERVER, "serverpath": NFS_EXPORT, "nfsversion": "4.2"}, **extra)


def nfs_accounted(sr, uuid):
    """SR.ls, then the SR's directory on the server holds exactly sr.json, sr.lock (and
    sr.meta.lock) plus three files per listed volume."""
    listed = {v["key"] for v in nfs_ok("SR.ls", sr=sr)}
    names = set(os.listdir(f"{NFS_EXPORT}/{uuid}"))
    want = {f"{k}{s}" for k in listed for s in (".json", ".img", ".lock")}
    extra = names - want - {"sr.json", "sr.lock", "sr.meta.lock"}
    assert not extra, f"files of no volume: {sorted(extra)}"
    assert want <= names, sorted(want - names)
    return listed


def nfs_leftovers():
    """After a failed nfs check: unmount whatever it left, so the next check starts clean."""
    for m in mounts_under():
        sh(["umount", "-l", m[1]], check=False)
        sh(["rmdir", m[1]], check=False)


def check_nfs_lifecycle():
    try:
        _nfs_lifecycle()
    except BaseException:
        nfs_leftovers()
        raise


def _nfs_lifecycle():
    install()
    uuid = "4e0f2a6b-1111-4222-8333-000000000001"
    exports = nfs_ok("SR.probe", configuration={"server": NFS_SERVER})
    assert any(r["configuration"]["serverpath"] == NFS_EXPORT for r in exports), exports
    [p] = nfs_ok("SR.probe", configuration=nfs_config())
    assert p["complete"] is True and "sr_uuid" not in p["configuration"], p
    cfg = nfs_ok("SR.create", uuid=uuid, configuration=nfs_config(), name="nfs SR",
                 description="")
    assert os.path.exists(f"{NFS_EXPORT}/{uuid}/sr.json"), "no SR on the server"
    assert mounts_under() == [], f"SR.create left a mount: {mounts_under()}"
    sr = nfs_ok("SR.attach", configuration=cfg)
    mp = f"/run/sr-mount/{uuid}"
    assert sr == "file://" + mp, sr
    [m] = mounts_under()
    assert m[0] == f"{NFS_SERVER}:{NFS_EXPORT}/{uuid}" and m[1] == mp, m
    assert m[2] == "nfs4" and "soft" not in m[3].split(","), m
    print("  mounted:", " ".join(m[:4]))
    assert nfs_ok("SR.attach", configuration=cfg) == sr        # idempotent
    assert len(mounts_under()) == 1
    probe = nfs_ok("SR.probe", configuration=nfs_config())
    assert any(r["configuration"].get("sr_uuid") == uuid for r in probe), probe
    v = nfs_ok("Volume.create", sr=sr, name="v", description="", size=8 * MiB, sharable=False)
    path = f"{mp}/{v['key']}.img"
    assert v["uri"][:1] == ["blkback://" + path], v["uri"]
    sum_v = write_pattern(path, "nfs", 8 * MiB)
    snap = nfs_ok("Volume.snapshot", sr=sr, key=v["key"])
    clone = nfs_ok("Volume.clone", sr=sr, key=snap["key"])
    assert digest(f"{NFS_EXPORT}/{uuid}/{clone['key']}.img", 8 * MiB) == sum_v
    nfs_ok("Volume.set", sr=sr, key=v["key"], k="vdi-type", v="user")
    assert nfs_accounted(sr, uuid) == {v["key"], snap["key"], clone["key"]}
    st = nfs_ok("SR.stat", sr=sr)
    assert st["health"] == ["Healthy", ""] and st["total_space"] > 0, st
    # busy: a process in the mount; detach refuses and says who
    holder = subprocess.Popen(["sleep", "600"], cwd=mp)
    try:
        code, params = nfs_fails("SR.detach", sr=sr)
        print("  busy detach:", params)
        assert params[0] == "NFS unmount failed" and "held by" in params[2], params
        assert f"pid {holder.pid} (sleep): cwd" in params[2], params
        assert len(mounts_under()) == 1
    finally:
        holder.kill()
        holder.wait()
    nfs_ok("SR.detach", sr=sr)
    nfs_ok("SR.detach", sr=sr)      # idempotent
    assert mounts_under() == [] and not os.path.exists(mp)
    # not mounted: an error, never an empty SR; stat says Unreachable
    code, params = nfs_fails("SR.ls", sr=sr)
    assert params[0] == "SR storage is not mounted", params
    code, params = nfs_fails("Volume.stat", sr=sr, key=v["key"])
    assert params[0] == "SR storage is not mounted", params
    st = nfs_ok("SR.stat", sr=sr)
    assert st["health"][0] == "Unreachable", st
    sr = nfs_ok("SR.attach", configuration=cfg)
    assert nfs_accounted(sr, uuid) == {v["key"], snap["key"], clone["key"]}
    assert digest(path, 8 * MiB) == sum_v
    for k in (v["key"], snap["key"], clone["key"]):
        nfs_ok("Volume.destroy", sr=sr, key=k)
    nfs_ok("SR.destroy", sr=sr)
    assert mounts_under() == [], mounts_under()
    assert not os.path.exists(f"{NFS_EXPORT}/{uuid}"), os.listdir(f"{NFS_EXPORT}/{uuid}")


def check_nfs_bad_inputs():
    install()
    code, params = nfs_fails("SR.create", uuid="4e0f2a6b-1111-4222-8333-000000000002",
                             configuration=nfs_config(serverpath="/srv/nfs/not-exported"),
                             name="", description="")
    print("  create on a path that is not exported:", params)
    assert params[0] == "NFS mount failed", params
    code, params = nfs_fails("SR.attach", configuration=nfs_config(
        sr_uuid="4e0f2a6b-1111-4222-8333-000000000003"))
    assert params[0] == "NFS mount failed", params
    for config in (nfs_config(server="-oexec"), nfs_config(serverpath="/x/../etc"),
                   nfs_config(options="soft;reboot")):
        code, params = nfs_fails("SR.create", uuid="4e0f2a6b-1111-4222-8333-000000000004",
                                 configuration=config, name="", description="")
        assert params[0] == "Invalid device-config", params
    assert mounts_under() == [], mounts_under()
    assert [n for n in os.listdir("/run/sr-mount") if n.startswith(".tmp")] == [] \
        if os.path.isdir("/run/sr-mount") else True


def check_nfs_crash_sweep():
    """nfs-raw calls killed at every fault point of file-raw, on a real NFS mount."""
    install()
    uuid = "4e0f2a6b-1111-4222-8333-000000000005"
    cfg = nfs_ok("SR.create", uuid=uuid, configuration=nfs_config(), name="", description="")
    sr = nfs_ok("SR.attach", configuration=cfg)
    src = nfs_ok("Volume.create", sr=sr, name="src", description="", size=4 * MiB,
                 sharable=False)["key"]
    sum_src = write_pattern(f"/run/sr-mount/{uuid}/{src}.img", "src", 4 * MiB)
    env = {"XAPI_STORAGE_NO_REFLINK": "1"}
    cases = [("Volume.create", dict(sr=sr, name="n", description="", size=MiB,
                                    sharable=False),
              ["store:tmp-written#1", "create:pending", "create:data", "create:ready"]),
             ("Volume.snapshot", dict(sr=sr, key=src),
              ["snapshot:pending", "copy:started", "snapshot:data", "snapshot:ready"]),
             ("Volume.clone", dict(sr=sr, key=src), ["clone:pending", "clone:data"]),
             ("Volume.set", dict(sr=sr, key=src, k="a", v="b"), ["store:tmp-written"])]
    n = 0
    for method, args, points in cases:
        for point in points:
            rc, _ = nfs(method, env=dict(env, XAPI_STORAGE_FAULT=point), **args)
            assert rc == -9, f"{method} never reached {point}: rc {rc}"
            listed = nfs_accounted(sr, uuid)
            assert src in listed
            assert digest(f"{NFS_EXPORT}/{uuid}/{src}.img", 4 * MiB) == sum_src, point
            out = nfs_ok(method, **args)
            made = {out["key"]} if isinstance(out, dict) else set()     # Volume.set: null
            for k in (listed | made) - {src}:
                nfs_ok("Volume.destroy", sr=sr, key=k)
            n += 1
            print(f"  killed at {point}: accounted, retried")
    for point in ("destroy:marked", "remove:data-gone", "remove:record-gone"):
        victim = nfs_ok("Volume.create", sr=sr, name="victim", description="", size=MiB,
                        sharable=False)["key"]
        rc, _ = nfs("Volume.destroy", env={"XAPI_STORAGE_FAULT": point}, sr=sr, key=victim)
        assert rc == -9, (point, rc)
        nfs_ok("Volume.destroy", sr=sr, key=victim)
        assert victim not in nfs_accounted(sr, uuid)
        n += 1
    nfs_ok("Volume.destroy", sr=sr, key=src)
    nfs_ok("SR.destroy", sr=sr)
    assert mounts_under() == []
    print(f"  {n} killed calls")


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items())
          if name.startswith("check_")}


def main(names):
    failed = 0
    for name in names or sorted(CHECKS):
        try:
            CHECKS[name]()
            print(f"PASS {name}", flush=True)
        except Exception as e:      # noqa: BLE001 - report every check
            failed += 1
            traceback.print_exc()
            print(f"FAIL {name}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
