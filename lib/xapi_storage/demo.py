"""`xapi-storage demo`: the main job on a default that needs no Xen.

Installs the plugins into a temporary root, then drives the `file-raw` volume plugin through its
executables exactly as xapi-storage-script would (argv [path, "--json"], JSON on stdin): create
an SR in a temporary directory, a volume, write to it, serve it to a guest of the simulated Xen
through pyblkback (the guest's blkfront reads and writes it over the shared ring), snapshot and
clone it, list the SR, and destroy it all again (unless --keep).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

HELP = ("the main job with no Xen: a file-raw SR through the plugin executables, its volume "
        "served to a simulated guest by pyblkback, then snapshot, clone, list, destroy")

PLUGIN_DIR = "volume/org.xen.xapi.storage.file-raw"


def add_arguments(parser):
    parser.add_argument("--dir", help="work in DIR (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the SR and the installed plugins afterwards")
    parser.add_argument("--no-ring", action="store_true",
                        help="skip serving the volume through pyblkback on the simulated Xen")


class _Failed(Exception):
    pass


def _call(plugin, method, **args):
    args.setdefault("dbg", "demo")
    r = subprocess.run([os.path.join(plugin, method), "--json"], input=json.dumps(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    shown = {k: v for k, v in args.items() if k != "dbg"}
    print(f"$ {method} {json.dumps(shown)}")
    if r.returncode != 0:
        print(f"  FAILED (exit {r.returncode}): {r.stdout.strip()} {r.stderr.strip()}")
        raise _Failed(method)
    return out


def _gib(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


GUEST_SECTOR = 2048                     # 1 MiB into the volume


def _serve_through_ring(path, work):
    """Serve the volume file to a guest of a simulated Xen with pyblkback; the guest reads what
    the demo wrote and writes 64 KiB of its own. Returns the bytes the guest wrote."""
    from .blkback import serve
    from .xen.sim import running

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else work
    simdir = tempfile.mkdtemp(prefix="xapi-storage-demo-xen-", dir=shm)
    os.rmdir(simdir)                    # the simulated Xen makes its own directory
    data = bytes(range(256)) * 256      # 64 KiB
    print(f"\n$ pyblkback: serve {path} to a guest of a simulated Xen ({simdir})")
    with running(simdir) as sim:
        domid = sim.create_domain("demo-guest")
        with serve(f"sim:{sim.dir}", "demo-guest", path, backend="raw") as served:
            with served.frontend() as fe:       # the guest's blkfront, acting as domain domid
                print(f"  guest d{domid} connected to {served.name}: "
                      f"{fe.sectors * 512 >> 20} MiB, {fe.sector_size}-byte sectors")
                print(f"  guest reads sector 0: {fe.read(0, 1)[:20]!r}")
                fe.write(GUEST_SECTOR, data)
                fe.flush()
                if fe.read(GUEST_SECTOR, len(data) // 512) != data:
                    raise _Failed("read back through the ring")
                print(f"  guest wrote {len(data) >> 10} KiB at sector {GUEST_SECTOR}, flushed, "
                      "read it back")
            st = served.stats()
        req = ", ".join(f"{n} {c}" for n, c in st["requests"].items() if c)
        print(f"  server stats: requests {req}; {st['bytes']['read']} B read, "
              f"{st['bytes']['write']} B written; {st['errors']} errors; "
              f"{st['notifies']} notifies for {st['batches']} batches")
    with open(path, "rb") as f:
        f.seek(GUEST_SECTOR * 512)
        if f.read(len(data)) != data:
            raise _Failed("the guest's data is not in the volume file")
    print("  the guest's data is in the volume file; the server and the simulated Xen are gone\n")
    return data


def run(args):
    work = args.dir or tempfile.mkdtemp(prefix="xapi-storage-demo-")
    os.makedirs(work, exist_ok=True)
    root, path = os.path.join(work, "root"), os.path.join(work, "sr")
    try:
        exe = shutil.which("xapi-storage", path=os.path.dirname(sys.executable))
        argv = [exe] if exe else [sys.executable, "-m", "xapi_storage.cli"]
        # observer mode is checked with this interpreter: the demo's root is not the host's
        r = subprocess.run(argv + ["install", "--root", root, "--observer-python", sys.executable], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            print(f"install failed: {r.stderr.strip()}", file=sys.stderr)
            return 1
        plugin = os.path.join(root, PLUGIN_DIR)
        print(f"plugins installed under {root}\n")
        q = _call(plugin, "Plugin.Query")
        print(f"  plugin {q['plugin']} {q['version']}, API {q['required_api_version']}")
        config = _call(plugin, "SR.create", uuid="00000000-0000-4000-8000-00000000d3e0",
                       configuration={"path": path}, name="demo SR", description="")
        sr = _call(plugin, "SR.attach", configuration=config)
        print(f"  SR key {sr}")
        st = _call(plugin, "SR.stat", sr=sr)
        print(f"  {st['name']}: {_gib(st['free_space'])} free of {_gib(st['total_space'])}, "
              f"health {st['health'][0]}")
        vol = _call(plugin, "Volume.create", sr=sr, name="disk0", description="demo disk",
                    size=1 << 30, sharable=False)
        _call(plugin, "Volume.set", sr=sr, key=vol["key"], k="vdi-type", v="user")
        data = vol["uri"][0].split("://", 1)[1]
        with open(data, "r+b") as f:            # what a VM would do through a datapath
            f.write(b"hello from the demo\n")
        print(f"  wrote 20 bytes into {data}")
        guest_data = None
        if not args.no_ring:
            guest_data = _serve_through_ring(data, work)
        snap = _call(plugin, "Volume.snapshot", sr=sr, key=vol["key"])
        clone = _call(plugin, "Volume.clone", sr=sr, key=snap["key"])
        with open(clone["uri"][0].split("://", 1)[1], "rb") as f:
            print(f"  the clone reads: {f.read(20)!r}")
            if guest_data is not None:
                f.seek(GUEST_SECTOR * 512)
                same = f.read(len(guest_data)) == guest_data
                print(f"  and at sector {GUEST_SECTOR} the guest's {len(guest_data) >> 10} KiB: "
                      f"{'identical' if same else 'DIFFERENT'}")
                if not same:
                    raise _Failed("clone content")
        vols = _call(plugin, "SR.ls", sr=sr)
        kind = {vol["key"]: "volume", snap["key"]: "snapshot", clone["key"]: "clone"}
        print(f"\n  {'key':<36}  {'kind':<8}  {'rw':<5}  {'virtual':>9}  {'used':>9}  uri[0]")
        for v in sorted(vols, key=lambda v: kind[v["key"]] != "volume"):
            print(f"  {v['key']:<36}  {kind[v['key']]:<8}  {str(v['read_write']):<5}  "
                  f"{_gib(v['virtual_size']):>9}  {_gib(v['physical_utilisation']):>9}  "
                  f"{v['uri'][0]}")
        print()
        if not args.keep:
            _call(plugin, "SR.destroy", sr=sr)
            print(f"  SR destroyed; {path} is empty again")
        return 0
    except _Failed:
        return 1
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
