"""Every lvm2 command the plugins run goes through this module.

* Commands are argument lists (never a shell line), run with a time limit (command.run), in
  English (LC_ALL=C), with stdin closed: a command that would ask a question (pvcreate on a
  device holding a filesystem, say) gets "no" (`-qq`) and fails instead of destroying data.
* Reports are read with `--reportformat json --units b --nosuffix`: sizes are exact byte counts
  and nothing is parsed out of columns. Both JSON flavours are accepted (lvm2 2.03.16 writes
  every value as a string; `json_std` of later versions writes numbers).
* Changes to one VG are serialised on this host by a flock on
  `<lock dir>/<vg>.vg.lock` (`vg_lock`): lvm2 locks each command, but a plugin's
  read-modify-write (read the tags, write new ones) must not interleave with another's.
* `Runner` is the one boundary: tests of the parsing give it a recorded lvm2; the real
  behaviour is proven against real lvm2 in the test bed (tests/xen/test_volume_plugins.py).

Tags: lvm2 accepts `[A-Za-z0-9_+.\\-/=!:&#]` in a tag (lvm2 `lib/misc/lvm-string.c`
`validate_tag`) and older releases at most 128 characters, so records are stored as tags by
`encode_record`: JSON, base64 (whose alphabet is inside that set), cut into chunks of
TAG_CHUNK characters, each tag `xsm:<generation>.<index>.<count>:<chunk>`. An update adds the
next generation's tags and drops the others in ONE `lvchange` (or `vgchange`), which lvm2
commits as one metadata change (lvm2 `tools/lvchange.c`, `_lvchange_properties_single`: tags
and permission are one commit for the whole group), and lvm2 writes its metadata atomically
(the new text goes to a new place in the metadata area, then one sector points to it). The
reader also takes only the highest generation whose chunks are all there, so even a change
applied in parts (by hand, or by another lvm2 release) never reads as a wrong record.
"""

import base64
import os

from . import command
from ..sdk import jsonio
from .store import Store

TAG_CHUNK = 100                 # base64 characters per tag (tag length stays under 128)
META_PREFIX = "xsm:"
LOCK_DIR_ENV = "XAPI_STORAGE_LVM_LOCK_DIR"
DEFAULT_LOCK_DIR = "/run/lock/xapi-storage/lvm"
TIMEOUT = 300.0                 # lvm2 on a slow or failing device can take long; never forever
_REPORT = ["--reportformat", "json", "--units", "b", "--nosuffix"]
# A volume's LV is made inactive (`-a n`) and flagged activation-skip (`-k y`): lvm2 then
# activates it only when asked with `-K` (lvchange -ay -K), never by `vgchange -ay` or by its
# own autoactivation (the udev rule that runs `pvscan --cache -aay` when a PV changes, which
# the plugin's own metadata writes cause), so that an LV is active only on the host whose
# datapath attached it (lvm2 `man lvcreate`, --setactivationskip; since lvm2 2.02.99).
INACTIVE = ["-a", "n", "-k", "y"]


class LVMError(Exception):
    """An lvm2 command failed: .argv, .rc, .stderr (its last lines)."""

    def __init__(self, argv, rc, stderr):
        self.argv = list(argv)
        self.rc = rc
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)}: exit {rc}: {self.message()}")

    def message(self):
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        return " / ".join(lines[-4:]) or "no message"

    def no_space(self):
        text = self.stderr.lower()
        return "insufficient free space" in text or "insufficient suitable" in text

    def in_use(self):
        return " in use" in self.stderr.lower()

    def not_found(self):
        text = self.stderr.lower()
        return ("not found" in text or "failed to find" in text
                or "no such" in text)


class Runner:
    """Runs lvm2 (the `lvm` binary with the command as its first argument)."""

    def __init__(self, lvm="lvm", timeout=TIMEOUT):
        self.lvm = lvm
        self.timeout = timeout

    def __call__(self, args):
        r = command.run([self.lvm] + list(args), timeout=self.timeout,
                        env={"LVM_SUPPRESS_FD_WARNINGS": "1"})
        return r.rc, r.stdout, r.stderr


# --- records as tags (pure) ----------------------------------------------------------------------

def encode_record(record, generation):
    """The tags that hold `record` (a JSON-able dict) as generation `generation`."""
    text = base64.b64encode(jsonio.dumps(record).encode("ascii")).decode("ascii")
    chunks = [text[i:i + TAG_CHUNK] for i in range(0, len(text), TAG_CHUNK)] or [""]
    n = len(chunks)
    return [f"{META_PREFIX}{generation}.{i}.{n}:{c}" for i, c in enumerate(chunks)]


def decode_record(tags):
    """(record, generation, tags of older generations) from an LV's or VG's tags. record is
    None (generation 0) when no generation is complete or the complete one does not decode."""
    gens = {}
    for tag in tags:
        if not tag.startswith(META_PREFIX):
            continue
        head, sep, chunk = tag[len(META_PREFIX):].partition(":")
        parts = head.split(".")
        if not sep or len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        gen, i, n = (int(p) for p in parts)
        entry = gens.setdefault(gen, {"n": n, "chunks": {}, "tags": []})
        entry["tags"].append(tag)
        if entry["n"] == n and i < n:
            entry["chunks"][i] = chunk
    best, best_gen = None, 0
    for gen in sorted(gens, reverse=True):
        entry = gens[gen]
        if len(entry["chunks"]) != entry["n"]:
            continue
        try:
            text = "".join(entry["chunks"][i] for i in range(entry["n"]))
            rec = jsonio.loads(base64.b64decode(text.encode("ascii"), validate=True)
                               .decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            continue
        if type(rec) is dict:
            best, best_gen = rec, gen
            break
    older = [t for gen, e in gens.items() if gen != best_gen for t in e["tags"]]
    return best, best_gen, older


def update_tags(tags, record):
    """(tags to add, tags to delete) that replace the record in `tags` by `record`: the new
    generation is numbered above every generation present (complete or not, so a crashed
    update's partial tags never mix with the new ones); every other record tag goes."""
    gens = [0]
    for tag in tags:
        if tag.startswith(META_PREFIX):
            head = tag[len(META_PREFIX):].partition(":")[0].split(".")[0]
            if head.isdigit():
                gens.append(int(head))
    add = encode_record(record, max(gens) + 1)
    return add, [t for t in tags if t.startswith(META_PREFIX) and t not in add]


def split_tags(text):
    """lvm2's report of a tag list: comma-separated (a tag cannot hold a comma)."""
    if type(text) is list:
        return [str(t) for t in text]
    return [t for t in (text or "").split(",") if t]


def _int(value):
    if value in (None, ""):
        return 0
    return int(float(value)) if type(value) is not int else value


def _float(value):
    if value in (None, ""):
        return 0.0
    return float(value)


def parse_report(stdout, kind):
    """The rows of an lvm2 JSON report of kind "vg", "lv" or "pv" (a list of dicts)."""
    try:
        doc = jsonio.loads(stdout)
    except ValueError as e:
        raise ValueError(f"lvm2 report is not JSON: {e}: {stdout[:200]!r}") from None
    rows = []
    for section in doc.get("report", []) if type(doc) is dict else []:
        for row in section.get(kind, []):
            if type(row) is dict:
                rows.append(row)
    return rows


def vg_row(row):
    return {"name": row.get("vg_name", ""), "uuid": row.get("vg_uuid", ""),
            "size": _int(row.get("vg_size")), "free": _int(row.get("vg_free")),
            "extent_size": _int(row.get("vg_extent_size")),
            "missing_pvs": _int(row.get("vg_missing_pv_count")),
            "pv_count": _int(row.get("pv_count")),
            "tags": split_tags(row.get("vg_tags"))}


def lv_row(row):
    return {"name": row.get("lv_name", ""), "uuid": row.get("lv_uuid", ""),
            "size": _int(row.get("lv_size")), "attr": row.get("lv_attr", ""),
            "active": row.get("lv_active", "") == "active",
            "open": row.get("lv_device_open", "") == "open",
            "pool": row.get("pool_lv", ""), "segtype": row.get("segtype", ""),
            "data_percent": _float(row.get("data_percent")),
            # lvm2 reports a thin LV's data use only while the LV is active
            "data_known": row.get("data_percent") not in (None, ""),
            "skip": row.get("lv_attr", "")[9:10] == "k",        # activation-skip flag
            "metadata_percent": _float(row.get("metadata_percent")),
            "tags": split_tags(row.get("lv_tags"))}


def pv_row(row):
    return {"name": row.get("pv_name", ""), "vg": row.get("vg_name", ""),
            "size": _int(row.get("pv_size")), "tags": split_tags(row.get("pv_tags"))}


VG_FIELDS = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_missing_pv_count,pv_count,vg_tags"
LV_FIELDS = ("lv_name,lv_uuid,lv_size,lv_attr,lv_active,lv_device_open,pool_lv,segtype,"
             "data_percent,metadata_percent,lv_tags")
PV_FIELDS = "pv_name,vg_name,pv_size,pv_tags"


# --- the commands --------------------------------------------------------------------------------

class LVM:
    """lvm2 for the plugins. `runner(args) -> (rc, stdout, stderr)` runs `lvm <args>`."""

    def __init__(self, runner=None, lock_dir=None):
        self.runner = runner or Runner()
        self.lock_dir = lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR

    def run(self, args):
        rc, out, err = self.runner(args)
        if rc != 0:
            raise LVMError(["lvm"] + list(args), rc, err)
        return out

    # locks ------------------------------------------------------------------------------------
    def locks(self):
        """The Store of this host's lock files (made on first use)."""
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        return Store(self.lock_dir)

    def vg_lock(self, vg):
        """Exclusive flock serialising this host's changes to `vg` (use with `with`)."""
        store = self.locks()
        try:
            return store.lock(f"{vg}.vg.lock")
        finally:
            store.close()

    # reports ----------------------------------------------------------------------------------
    def vgs(self, vg=None):
        args = ["vgs"] + _REPORT + ["-o", VG_FIELDS]
        if vg is not None:
            args.append(vg)
        return [vg_row(r) for r in parse_report(self.run(args), "vg")]

    def vg(self, vg):
        """The VG's row, or None if there is no VG of that name."""
        try:
            rows = self.vgs(vg)
        except LVMError as e:
            if e.not_found():
                return None
            raise
        return rows[0] if rows else None

    def lvs(self, vg, lv=None):
        args = ["lvs"] + _REPORT + ["-o", LV_FIELDS, vg if lv is None else f"{vg}/{lv}"]
        return [lv_row(r) for r in parse_report(self.run(args), "lv")]

    def lv(self, vg, lv):
        """The LV's row, or None if `vg` has no LV of that name."""
        try:
            rows = self.lvs(vg, lv)
        except LVMError as e:
            if e.not_found():
                return None
            raise
        return rows[0] if rows else None

    def lv_and_vg(self, vg, lv):
        """(VG row, LV row) of `vg`/`lv` from ONE `lvs` report that carries the VG's fields
        too (lvm2 reports VG fields on LV rows): the call that needs the SR record and one
        volume pays one lvm2 process. When the VG has no such LV: (the VG's row, None), which
        costs a `vgs` more; no VG: (None, None)."""
        args = ["lvs"] + _REPORT + ["-o", LV_FIELDS + "," + VG_FIELDS, f"{vg}/{lv}"]
        try:
            rows = parse_report(self.run(args), "lv")
        except LVMError as e:
            if not e.not_found():
                raise
            rows = []
        if not rows:
            return self.vg(vg), None
        return vg_row(rows[0]), lv_row(rows[0])

    def pvs(self, devices=None):
        args = ["pvs"] + _REPORT + ["-o", PV_FIELDS] + list(devices or ())
        return [pv_row(r) for r in parse_report(self.run(args), "pv")]

    # changes ----------------------------------------------------------------------------------
    def pvcreate(self, devices, metadatasize="8m"):
        self.run(["pvcreate", "-qq", "--metadatasize", metadatasize] + list(devices))

    def pvremove(self, devices):
        self.run(["pvremove", "-qq"] + list(devices))

    def vgcreate(self, vg, devices, tags):
        self.run(["vgcreate", "-qq"] + _tag_args("--addtag", tags) + [vg] + list(devices))

    def vgremove(self, vg):
        """Remove an empty VG (without -f: a VG that still holds an LV is refused)."""
        self.run(["vgremove", "-qq", vg])

    def vgchange_tags(self, vg, add=(), delete=()):
        if add or delete:
            self.run(["vgchange", "-qq"] + _tag_args("--addtag", add)
                     + _tag_args("--deltag", delete) + [vg])

    def lvcreate(self, vg, lv, size, tags, pool=None):
        """A thick LV of `size` bytes (lvm2 rounds up to whole extents), not zeroed (`-Z n`,
        no first-4-KiB wipe); or a thin LV of that virtual size in `pool`. Either is made
        inactive and flagged activation-skip (see INACTIVE)."""
        if pool is None:
            args = ["lvcreate", "-qq", "-Z", "n", "-W", "n", "-n", lv, "-L", f"{size}b"]
        else:
            args = ["lvcreate", "-qq", "-n", lv, "-V", f"{size}b", "--thinpool", pool]
        self.run(args + INACTIVE + _tag_args("--addtag", tags) + [vg])

    def lvcreate_thin_snapshot(self, vg, origin, lv, tags, read_only):
        """A thin snapshot (shares blocks with its origin), inactive, activation-skip."""
        self.run(["lvcreate", "-qq", "-s", "-p", "r" if read_only else "rw", "-n", lv]
                 + INACTIVE + _tag_args("--addtag", tags) + [f"{vg}/{origin}"])

    def lvcreate_pool(self, vg, pool, extents, tags):
        """A thin pool of `extents` (lvm2's -l: a count or e.g. "90%FREE"); its new blocks
        are zeroed (-Z y), so a thin volume never reads another's old data."""
        self.run(["lvcreate", "-qq", "-Z", "y", "--type", "thin-pool", "-n", pool,
                  "-l", extents] + _tag_args("--addtag", tags) + [vg])

    def lvchange(self, vg, lv, add=(), delete=(), permission=None):
        args = ["lvchange", "-qq"]
        if permission is not None:
            args += ["-p", permission]
        self.run(args + _tag_args("--addtag", add) + _tag_args("--deltag", delete)
                 + [f"{vg}/{lv}"])

    def activate(self, vg, lvs, active=True):
        """Activate (`-K`: activation-skip LVs too) or deactivate the named LVs of `vg`, in
        one command."""
        names = [f"{vg}/{lv}" for lv in lvs]
        if names:
            self.run(["lvchange", "-qq", "-a", "y" if active else "n"]
                     + (["-K"] if active else []) + names)

    def set_activation_skip(self, vg, lvs):
        """Flag the named LVs activation-skip (see INACTIVE), in one command."""
        names = [f"{vg}/{lv}" for lv in lvs]
        if names:
            self.run(["lvchange", "-qq", "-k", "y"] + names)

    def lvrename(self, vg, old, new):
        """Rename an LV (one metadata change; an active LV's device is renamed with it)."""
        self.run(["lvrename", "-qq", vg, old, new])

    def lvextend(self, vg, lv, size):
        self.run(["lvextend", "-qq", "-L", f"{size}b", f"{vg}/{lv}"])

    def lvremove(self, vg, lv):
        """Remove the LV; its extents are discarded first (devices/issue_discards=1) where the
        PV supports discard, so a later LV placed there does not read this one's data on
        storage whose discard zeroes (loop devices, thin LUNs)."""
        self.run(["lvremove", "-qq", "-f", "--config", "devices { issue_discards = 1 }",
                  f"{vg}/{lv}"])


def round_up(size, extent_size):
    """The size lvm2 gives an LV asked for `size` bytes: whole extents, at least one."""
    extent_size = max(int(extent_size), 1)
    return max(1, -(-int(size) // extent_size)) * extent_size


def _tag_args(option, tags):
    args = []
    for t in tags:
        args += [option, t]
    return args
