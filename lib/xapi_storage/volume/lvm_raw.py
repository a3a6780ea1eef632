"""The `lvm-raw` volume plugin: an SR is an LVM volume group, a volume a logical volume.

See docs/lvm-raw.md for the contract. In short:

    VG  xapi-sr-<sr uuid>       tags: xapi-storage:sr, xsu:<sr uuid>, the SR record (xsm:...)
    LV  <volume key>            tags: xapi-storage:vol, the volume record (xsm:...)
    /run/lock/xapi-storage/lvm/<vg>.vg.lock        flock: this host's changes to the VG
    /run/lock/xapi-storage/lvm/<vg>.<key>.lock     flock: held by every call on that volume
    /run/lock/xapi-storage/lvm/<vg>.act.lock       flock: this host's activation changes
    /run/lock/xapi-storage/lvm/<vg>.<lv>.holder.<who>   who needs <lv> active on this host

Records (name, description, keys, state, ...) live in the LVs' and the VG's tags (lvm.py
encodes them), so they are on the shared storage with the data and survive a reinstall of
dom0. Every lvm2 call goes through lvm.LVM. Nothing without our tag is ever changed.
"""

import contextlib
import functools
import os
import time
from stat import S_ISBLK

from ..sdk import base, log
from ..sdk.errors import SR_does_not_exist, Volume_does_not_exist, XenAPIError
from . import lvm as lvmmod
from .command import CommandTimeout
from .file_raw import (
    DATAPATHS, DEFAULT_DATAPATH, _argument_error, _config, _config_datapath, _config_error,
    _no_space, _os_errors, _size_error, _volume_key, _want_bool, _want_size, _want_str,
)
from .store import faultpoint, is_safe_name, is_uuid, new_uuid

PLUGIN = "lvm-raw"
SR_FORMAT = "xapi-storage/lvm-raw"
SR_FORMAT_VERSION = 1
SR_TAG = "xapi-storage:sr"
VOL_TAG = "xapi-storage:vol"
POOL_TAG = "xapi-storage:pool"
POOL = "xapi-pool"              # the thin pool's LV name (provisioning=thin)
POOL_PERCENT = 90               # of the VG's free space, at SR.create; the rest for growth
DEFAULT_OVERPROVISION = "4"
UUID_TAG = "xsu:"
REVERT_TAG = "xapi-storage:reverting"  # on a volume whose revert may have left LVs behind
REVERT_NEW = ".rv"              # Volume.revert: <key>.rv is the reverted data being made,
REVERT_OLD = ".old"             # <key>.old the volume's old data set aside (see _finish_revert)
VG_PREFIX = "xapi-sr-"
MAX_SR_UUID = 100               # VG names are at most 127 characters

CONFIGURATION = {
    "device": "comma-separated block devices that make the SR's volume group (SR.create "
              "makes them LVM physical volumes; a device holding a filesystem or another "
              "VG is refused)",
    "datapath": "the datapath of every volume's URI: blkback (default) or pyblkback (of a "
                "comma-separated list only the first name is used: a volume has one URI)",
    "provisioning": "thick (default: every volume a plain LV of its full size) or thin "
                    "(volumes in one thin pool, allocated as they are written)",
    "overprovision": "thin only: new volumes and snapshots are refused once the sum of the "
                     "volumes' sizes would pass this multiple of the pool's size "
                     f"(default {DEFAULT_OVERPROVISION})",
    "sr_uuid": "set by SR.create: the SR's uuid, which names its volume group",
}

FEATURES = [
    "SR_PROBE", "SR_CREATE", "SR_DELETE", "SR_ATTACH", "SR_DETACH", "SR_SCAN", "SR_UPDATE",
    "VDI_CREATE", "VDI_DESTROY", "VDI_UPDATE", "VDI_RESIZE", "VDI_SNAPSHOT", "VDI_CLONE",
    "VDI_REVERT", "VDI_ATTACH_OFFLINE", "LARGE_VDI",
]

_LVM = [None]


def get_lvm():
    """The LVM boundary of this process (tests may install another with set_lvm)."""
    if _LVM[0] is None:
        _LVM[0] = lvmmod.LVM()
    return _LVM[0]


def set_lvm(value):
    _LVM[0] = value


def _log(level, msg):
    log.emit(level, "%s", msg)


def _lvm_error(e):
    """A structured error for a failed or hung lvm2 command."""
    if isinstance(e, CommandTimeout):
        return XenAPIError("SR_BACKEND_FAILURE", ["lvm2 command timed out", " ".join(e.argv)])
    if e.no_space():
        return _no_space(e.message())
    return XenAPIError("SR_BACKEND_FAILURE", [
        "lvm2 command failed", " ".join(e.argv), f"exit {e.rc}", e.message()])


def _lvm_errors(cls):
    """Class decorator: an lvm2 failure in any public method answers a structured error."""
    def wrap(fn):
        @functools.wraps(fn)
        def method(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (lvmmod.LVMError, CommandTimeout) as e:
                raise _lvm_error(e) from None
            except FileNotFoundError as e:
                if e.filename == "lvm":
                    raise XenAPIError("SR_BACKEND_FAILURE", [
                        "lvm2 is not installed", str(e)]) from None
                raise
        return method
    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("_"):
            setattr(cls, name, wrap(fn))
    return cls


# --- names and keys ------------------------------------------------------------------------------

def vg_name(sr_uuid):
    return VG_PREFIX + sr_uuid


def _check_sr_uuid(uuid):
    if not is_safe_name(uuid, MAX_SR_UUID):
        raise _argument_error("uuid", f"{uuid!r}: an SR uuid here is made of letters, digits, "
                              "'-', '_' and '.' (it names the volume group)")
    return uuid


def sr_vg(sr):
    """The VG named by an SR key; SR_does_not_exist if `sr` is not a key we could return."""
    if type(sr) is str and sr.startswith(VG_PREFIX) and is_safe_name(sr[len(VG_PREFIX):]):
        return sr
    raise SR_does_not_exist(sr if type(sr) is str else repr(sr))


def _config_provisioning(configuration):
    """("thick", None) or ("thin", ratio) from device-config."""
    mode = configuration.get("provisioning", "thick")
    if mode not in ("thick", "thin"):
        raise _config_error("provisioning", f"{mode!r}: expected thick or thin")
    text = configuration.get("overprovision", DEFAULT_OVERPROVISION)
    try:
        ratio = float(text)
    except ValueError:
        ratio = 0.0
    if not 0 < ratio <= 1000 or ratio != ratio:
        raise _config_error("overprovision", f"{text!r}: expected a number above 0 "
                            "(e.g. 1 for no over-provisioning, 4 for four times)")
    return mode, (ratio if mode == "thin" else None)


def _config_devices(configuration):
    text = _config(configuration).get("device")
    if text is None:
        raise _config_error("device", "missing: give the block device(s), comma-separated")
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices):
        raise _config_error("device", f"{text!r}: expected distinct block device paths")
    for d in devices:
        if not d.startswith("/dev/") or "\x00" in d:
            raise _config_error("device", f"{d!r} is not a path under /dev")
        try:
            st = os.stat(d)
        except OSError as e:
            raise _config_error("device", f"{d}: {e.strerror}") from None
        if not S_ISBLK(st.st_mode):
            raise _config_error("device", f"{d} is not a block device")
    return devices


# --- the SR --------------------------------------------------------------------------------------

def _sr_record(vgrow):
    """The SR record of a VG row, or None if the VG is not one of our SRs."""
    if vgrow is None or SR_TAG not in vgrow["tags"]:
        return None
    rec, gen, _ = lvmmod.decode_record(vgrow["tags"])
    if rec is None or rec.get("format") != SR_FORMAT:
        return None
    if rec.get("version") != SR_FORMAT_VERSION:
        raise XenAPIError("SR_BACKEND_FAILURE", [
            "Unsupported SR format version", vgrow["name"], str(rec.get("version"))])
    rec["_gen"] = gen
    return rec


def _ready_sr(sr):
    """(VG name, VG row, SR record) of a ready SR; SR_does_not_exist otherwise."""
    vg = sr_vg(sr)
    row = get_lvm().vg(vg)
    rec = _sr_record(row)
    if rec is None or rec.get("state") != "ready":
        raise SR_does_not_exist(sr)
    return vg, row, rec


# --- what this host attached ---------------------------------------------------------------------
#
# SR.attach leaves, in the lock directory (tmpfs), `<vg>.attached`: the SR record's fields a
# thick Volume.create needs (provisioning, datapath) and the VG's extent size, read from the
# VG when it was attached. A thick create then runs `lvcreate` alone instead of a `vgs` first
# (under TCG each lvm2 process costs most of a second). It is a cache of values that do not
# change while the SR is attached (provisioning is fixed at SR.create, the extent size at
# vgcreate, the datapath only by SR.attach, which rewrites the file), never the truth: the
# records stay in lvm2's metadata. SR.detach and SR.destroy remove it first; a missing,
# malformed or unreadable file means a `vgs` as before; a VG gone under it makes lvcreate
# fail, which is then SR_does_not_exist (and the file goes).

ATTACHED = ".attached"


def _write_attached(vg, rec, row):
    """Leave the cache; one that cannot be written (a full or read-only /run) is only
    logged: creates then read the VG, as without it."""
    fields = {"uuid": rec.get("uuid"), "provisioning": rec.get("provisioning", "thick"),
              "datapath": rec.get("datapath"), "extent_size": row["extent_size"]}
    try:
        with get_lvm().locks() as store:
            store.write(vg + ATTACHED, fields, owner=vg)
    except OSError as e:
        _log(30, f"{vg}: cannot write {vg + ATTACHED} ({e}): creates will read the VG")
        try:
            _forget_attached(vg)        # never an older one in its place
        except OSError:
            pass


def _forget_attached(vg):
    with get_lvm().locks() as store:
        store.unlink(vg + ATTACHED)


def _attached(vg):
    """(SR record fields, extent size) this host's SR.attach left, or None."""
    try:
        with get_lvm().locks() as store:
            fields = store.read(vg + ATTACHED)
    except (OSError, ValueError):
        return None
    if type(fields) is not dict or type(fields.get("extent_size")) is not int or \
            fields["extent_size"] <= 0 or fields.get("provisioning") != "thick" or \
            vg != vg_name(str(fields.get("uuid"))) or not _datapath_field(fields):
        return None
    return {"uuid": fields["uuid"], "provisioning": "thick", "datapath": fields["datapath"]}, \
        fields["extent_size"]


def _datapath_field(fields):
    """True if `fields` has an SR record's datapath: null, or a list of names (_volume)."""
    dp = fields.get("datapath", 0)
    return dp is None or (type(dp) is list and all(type(d) is str and d for d in dp))


def _sr_and_volume(sr, key):
    """(VG name, SR record, VG row, LV row or None) of a ready SR and its LV `key`: ONE
    `lvs` report (lvm.lv_and_vg) when the LV exists. SR_does_not_exist otherwise."""
    vg = sr_vg(sr)
    vgrow, row = get_lvm().lv_and_vg(vg, key)
    rec = _sr_record(vgrow)
    if rec is None or rec.get("state") != "ready":
        raise SR_does_not_exist(sr)
    return vg, rec, vgrow, row


def _write_tags_record(vg, lv, rec, old_tags, permission=None):
    """Replace the record in `old_tags` by `rec`, in one lvm2 command (lvm.update_tags)."""
    rec = {k: v for k, v in rec.items() if not k.startswith("_")}
    new, drop = lvmmod.update_tags(old_tags, rec)
    if lv is None:
        get_lvm().vgchange_tags(vg, add=new, delete=drop)
    else:
        get_lvm().lvchange(vg, lv, add=new, delete=drop, permission=permission)


def _update_sr(sr, change):
    vg = sr_vg(sr)
    with get_lvm().vg_lock(vg):
        row = get_lvm().vg(vg)
        rec = _sr_record(row)
        if rec is None or rec.get("state") != "ready":
            raise SR_does_not_exist(sr)
        new = dict(rec)
        change(new)
        if new != rec:
            _write_tags_record(vg, None, new, row["tags"])


def _sr_stat(sr, row, rec, pool=None):
    """The SR's stat. Thick: the VG's size and free space. Thin: the pool's size and what
    its data area has free, and the health text gives the pool's data and metadata use."""
    health = ["Healthy", ""]
    total, free = row["size"], row["free"]
    if rec.get("provisioning") == "thin":
        if pool is None:
            health = ["Unreachable", f"the thin pool {row['name']}/{POOL} is missing"]
            total = free = 0
        else:
            total = pool["size"]
            free = int(pool["size"] * max(0.0, 100.0 - pool["data_percent"]) / 100)
            health = ["Healthy", f"thin pool data {pool['data_percent']:.2f}% used, "
                      f"metadata {pool['metadata_percent']:.2f}% used"]
    if row["missing_pvs"]:
        health = ["Unreachable", f"{row['missing_pvs']} physical volume(s) of {row['name']} "
                  "are missing"]
    return {"sr": sr, "name": rec.get("name", ""), "description": rec.get("description", ""),
            "uuid": str(rec.get("uuid")), "free_space": free, "total_space": total,
            "datasources": [], "clustered": False, "health": health}


def _pool_row(vg, rec, rows=None):
    """The thin pool's LV row of a thin SR (None for thick, or if it is missing)."""
    if rec.get("provisioning") != "thin":
        return None
    if rows is None:
        return get_lvm().lv(vg, POOL)
    return next((r for r in rows if r["name"] == POOL), None)


def _check_overprovision(vg, rec, more):
    """Thin: refuse (SR_BACKEND_FAILURE_44) a new volume of `more` bytes when the volumes'
    sizes would pass `overprovision` times the pool's size. Call with the VG lock held."""
    if rec.get("provisioning") != "thin":
        return
    rows = get_lvm().lvs(vg)
    pool = _pool_row(vg, rec, rows)
    if pool is None:
        raise XenAPIError("SR_BACKEND_FAILURE", ["Thin pool missing", f"{vg}/{POOL}"])
    ratio = float(rec.get("overprovision", DEFAULT_OVERPROVISION))
    used = sum(r["size"] for r in rows if r["pool"] == POOL)
    if used + more > ratio * pool["size"]:
        raise _no_space(f"thin pool {vg}/{POOL}: volumes would total {used + more} bytes, "
                        f"over {ratio:g} times the pool's {pool['size']} bytes "
                        "(device-config overprovision)")


# --- who needs an LV active on this host --------------------------------------------------------
#
# Volumes are made inactive and flagged activation-skip (lvm.INACTIVE): an LV is active on a
# host only while something there needs its device node: the datapath that attached it
# (holder "datapath.<scheme>", datapath/lvm_activation.py) or a copy reading or writing it
# (holder "copy.<pid>": thick snapshot, clone, revert). Each need is an empty file
# <vg>.<lv>.holder.<who> in the lock directory (tmpfs: a reboot, which deactivates every LV,
# clears them too), made and removed under <vg>.act.lock together with the lvchange that
# follows, so the last holder to go deactivates the LV and no one deactivates it under
# another: a VM shut down while its disk is being snapshotted keeps the LV active until the
# copy ends, and a copy that ends while a VM starts leaves it active for the VM. A copy
# holder whose process is gone (killed) no longer counts.

HOLDER = ".holder."
ACT_LOCK = ".act.lock"
DEACTIVATE_WAIT = 5.0           # a kernel backend lets go of a device a moment after unplug


def _holder_file(vg, lv, who):
    return f"{vg}.{lv}{HOLDER}{who}"


def copy_holder():
    return f"copy.{os.getpid()}"


def _live(who):
    """False for the holder of a copy whose process is gone (a killed call)."""
    if not who.startswith("copy."):
        return True
    pid = who[len("copy."):]
    return not pid.isdigit() or os.path.exists(f"/proc/{pid}")


def _holder_parts(vg, name):
    """(lv, who) of a holder file of `vg`, else None. Only the LVs lvm-raw holds count (volume
    keys, a revert's <key>.rv), and a `who` never holds HOLDER: so no name is misread, when
    another VG's name starts with this one's (an SR uuid may hold '.') or an LV's holds
    '.holder.'."""
    if not name.startswith(vg + "."):
        return None
    lv, sep, who = name[len(vg) + 1:].partition(HOLDER)
    if not sep or not who or HOLDER in who or not (is_uuid(lv) or _revert_base(lv)):
        return None
    return lv, who


def _holders(names, vg, lv):
    return [p[1] for p in (_holder_parts(vg, n) for n in names) if p and p[0] == lv]


def _drop_holders(store, vg, lv=None):
    """Remove the holder files of `lv` (None: of every LV of `vg`)."""
    for name in store.names():
        parts = _holder_parts(vg, name)
        if parts and lv in (None, parts[0]):
            store.unlink(name)


def holds(vg, lv, who, lvm=None):
    """True if `who` holds `lv` active on this host."""
    with (lvm or get_lvm()).locks() as store:
        return store.exists(_holder_file(vg, lv, who))


def hold_active(vg, lvs, who, lvm=None):
    """Activate the LVs `lvs` of `vg` (ours: the caller checked) for `who`: the holder files
    first, then one `lvchange -ay -K` (idempotent). If that fails the files stay: a failed or
    timed-out lvchange may have activated some of the LVs, so the caller releases them
    (`release_active`) as it would after a kill."""
    lv = lvm or get_lvm()
    with lv.locks() as store, store.lock(vg + ACT_LOCK):
        for name in lvs:
            fd = store.open(_holder_file(vg, name, who), os.O_WRONLY | os.O_CREAT)
            os.close(fd)
        lv.activate(vg, lvs)


def release_active(vg, lvs, who, wait=None, keep_claim_if_busy=False, lvm=None):
    """`who` no longer needs `lvs` active: each LV that no other live holder needs is
    deactivated, waiting up to `wait` s (default DEACTIVATE_WAIT) for a device still open (a
    backend letting go) to be closed, then `who`'s holder file of it goes. Returns the LVs
    left active because still open; with keep_claim_if_busy their holder files stay, so that
    a retry of the release deactivates them. A deactivation that fails otherwise (or a
    process killed before it is done) leaves `who`'s holder files of the LVs not done yet:
    the retry, or SR.ls for a dead copy, finds them. An LV that is gone counts as
    deactivated. The act lock is held for one pass over the LVs, never across the wait, so
    other holds and releases on the SR go on meanwhile (each pass looks at the holders
    anew)."""
    lv = lvm or get_lvm()
    end = time.monotonic() + (DEACTIVATE_WAIT if wait is None else wait)
    pending = list(lvs)
    while True:
        still = []
        with lv.locks() as store, store.lock(vg + ACT_LOCK):
            names = store.names()
            free = [n for n in pending
                    if not any(_live(w) for w in _holders(names, vg, n) if w != who)]
            batch = len(free) > 1
            if batch:               # one lvchange for all (a copy's two LVs): most often
                try:
                    lv.activate(vg, free, active=False)
                except lvmmod.LVMError:
                    batch = False   # one at a time below says which, and why
            for name in pending:
                if name in free and not batch:
                    try:
                        lv.activate(vg, [name], active=False)
                    except lvmmod.LVMError as e:
                        if not e.in_use():
                            if not e.not_found():
                                raise
                        else:
                            still.append(name)
                            continue
                store.unlink(_holder_file(vg, name, who))
                for w in _holders(names, vg, name):     # a dead copy's are spent
                    if not _live(w):
                        store.unlink(_holder_file(vg, name, w))
            if not still:
                return []
            if time.monotonic() >= end:
                if not keep_claim_if_busy:
                    for name in still:
                        store.unlink(_holder_file(vg, name, who))
                return still
        pending = still
        time.sleep(0.2)


def _reap_dead_holders(vg, lv_names):
    """Release what killed copies held: SR.ls's clean-up of a killed snapshot, clone or
    revert. A holder of an LV that is gone (not in `lv_names`) is removed; otherwise each LV
    no live holder needs is deactivated. No lvm2 process unless there is such an LV. (A live
    holder's LV may be newer than `lv_names`: its holder releases it.)"""
    with get_lvm().locks() as store:
        names = store.names()
        for lv, who in filter(None, (_holder_parts(vg, n) for n in names)):
            if not _live(who) and lv not in lv_names:
                store.unlink(_holder_file(vg, lv, who))
    for lv, who in filter(None, (_holder_parts(vg, n) for n in names)):
        if not _live(who) and lv in lv_names:
            busy = release_active(vg, [lv], who, wait=0.0)
            _log(30, f"{vg}/{lv}: released for a killed call ({who})"
                 + (": left active, still open" if busy else ""))


@contextlib.contextmanager
def _active_for_copy(vg, lvs):
    """The LVs `lvs` active while a copy uses them; released (deactivated unless a datapath
    needs them) after, an LV still open is left active and logged."""
    who = copy_holder()
    try:
        hold_active(vg, lvs, who)
        yield
    finally:
        busy = release_active(vg, lvs, who, wait=0.0)
        if busy:
            _log(30, f"{vg}: left active after a copy, still open: {', '.join(busy)}")


# --- volumes -------------------------------------------------------------------------------------

class _VolumeLock:
    """This host's flock on one volume, held for a whole call (create, copy, change, destroy).
    A record in state "creating" or "destroying" whose lock is free was left by a killed call."""

    def __init__(self, vg, key, blocking=True):
        self.store = get_lvm().locks()
        self.name = f"{vg}.{key}.lock"
        self.blocking = blocking
        self.lock = None

    def __enter__(self):
        """self; with blocking=False, self.lock is None if another process holds it."""
        try:
            self.lock = self.store.lock(self.name, blocking=self.blocking)
        except BaseException:
            self.store.close()
            raise
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
        self.store.close()

    def forget(self):
        """Remove the lock file (the volume is gone); call with the lock held."""
        self.store.unlink(self.name)


def _vol_record(lvrow):
    """The record of one of our LVs, or None if the LV is not ours (no tag) or its record
    does not decode (then it is never touched: see orphans in SR.ls)."""
    if lvrow is None or VOL_TAG not in lvrow["tags"]:
        return None
    rec, gen, _ = lvmmod.decode_record(lvrow["tags"])
    if rec is None or rec.get("key") != lvrow["name"]:
        return None
    rec["_gen"] = gen
    return rec


def _new_record(key, name, description, read_write, sharable, state, origin=None):
    rec = {"key": key, "state": state, "name": name, "description": description,
           "read_write": read_write, "sharable": sharable, "keys": {}}
    if origin is not None:
        rec["origin"] = origin
    return rec


def _volume(vg, srrec, rec, row):
    key = rec["key"]
    location = f"/dev/{vg}/{key}"
    datapath = srrec.get("datapath") or list(DEFAULT_DATAPATH)
    used = row["size"]
    if row["pool"] and row["data_known"]:       # thin: what the pool has allocated to it
        used = int(row["size"] * row["data_percent"] / 100)
    # (lvm2 knows a thin LV's allocation only while the LV is active, i.e. attached on this
    # host; otherwise its virtual size is reported, an upper bound)
    return {
        "key": key, "uuid": key, "name": rec["name"], "description": rec["description"],
        "read_write": rec["read_write"], "sharable": rec["sharable"],
        "virtual_size": row["size"], "physical_utilisation": used,
        # ONE URI, for the SR's first datapath: the rule file-raw follows (docs/file-raw.md,
        # branch datapath): with two schemes the daemon could send a non-persistent disk's
        # Datapath.open to one plugin and its attach and close to the other
        "uri": [f"{datapath[0]}://{location}"],
        "keys": dict(rec["keys"]),
    }


def _new_row(key, size, pool=""):
    """The LV row of a volume this call has just made, computed from what it asked lvm2 for
    (no report read back): `size` is already rounded to whole extents; made inactive (so a
    thin volume's allocation is not known to lvm2: see _volume)."""
    return {"name": key, "size": size, "pool": pool, "data_percent": 0.0,
            "data_known": False, "active": False, "open": False}


def _remove_lv(vg, key, lock):
    """Remove one of our LVs (lvremove is one atomic metadata change), its lock file and its
    holder files."""
    get_lvm().lvremove(vg, key)
    faultpoint("remove:data-gone")
    with get_lvm().locks() as store:
        _drop_holders(store, vg, key)
    lock.forget()


def _settle(vg, key, row, lock):
    """With `key`'s lock held: the ready record, or None after removing what a killed call
    left (an LV of ours in state creating or destroying)."""
    rec = _vol_record(row)
    if rec is None:
        return None
    if rec.get("state") == "ready":
        return rec
    _log(30, f"{vg}: removing volume {key} left in state {rec.get('state')!r} by a killed call")
    with get_lvm().vg_lock(vg):
        _remove_lv(vg, key, lock)
    return None


def _revert_leftovers(key, rows):
    """{suffix: (row, record)} of the LVs a revert of `key` made or set aside: ours (tagged,
    a record naming `key`), named <key>.rv or <key>.old."""
    found = {}
    for suffix in (REVERT_NEW, REVERT_OLD):
        row = rows.get(key + suffix)
        if row is not None and VOL_TAG in row["tags"]:
            rec, _, _ = lvmmod.decode_record(row["tags"])
            if rec is not None and rec.get("key") == key:
                found[suffix] = (row, rec)
    return found


def _finish_revert(vg, key, rows):
    """With `key`'s lock held and `rows` ({LV name: row}) the VG's LVs: complete or undo a revert
    of `key` that a killed call left; True if there was one. A revert (Volume.revert) tags
    <key> REVERT_TAG, makes <key>.rv (tagged so too: the snapshot's data, marked ready once
    whole), renames <key> to <key>.old and <key>.rv to <key>, removes <key>.old, then drops
    the tag: each step is one lvm2 metadata change, so the LVs that exist say how far it got:

        <key> and <key>.rv              not swapped: <key> is the old volume, whole; .rv goes
        <key>.old and a ready <key>.rv  set aside: the swap is finished (.rv becomes <key>)
        <key>.old, no ready <key>.rv    (never made by a revert) <key>.old is put back
        <key> and <key>.old             swapped: .old goes

    and a <key> still tagged loses its tag. While the tag is on <key> (or <key> is absent)
    every call on it comes here first, so a destroyed volume is never brought back."""
    left = _revert_leftovers(key, rows)
    row = rows.get(key)
    if not left and (row is None or REVERT_TAG not in row["tags"]):
        return False
    _log(30, f"{vg}: finishing the revert of {key} a killed call left: "
         f"{sorted(key + s for s in left)}, volume {'present' if row else 'absent'}")
    lv = get_lvm()
    new, old = left.get(REVERT_NEW), left.get(REVERT_OLD)
    tags = row["tags"] if row is not None else []
    with lv.vg_lock(vg):
        if row is None:
            if new is not None and new[1].get("state") == "ready":
                lv.lvrename(vg, new[0]["name"], key)        # finish the swap
                tags, new = new[0]["tags"], None
            elif old is not None:
                lv.lvrename(vg, old[0]["name"], key)        # put the old volume back
                tags, old = old[0]["tags"], None
        for left_over in (new, old):
            if left_over is not None:
                lv.lvremove(vg, left_over[0]["name"])
        if REVERT_TAG in tags:
            lv.lvchange(vg, key, delete=[REVERT_TAG])
    return True


def _recover(vg, key, row):
    """`key`'s LV row (None: no such LV) once a killed revert of it is finished: a full
    `lvs` only when `row` says one may have been (absent, or tagged REVERT_TAG)."""
    if row is not None and REVERT_TAG not in row["tags"]:
        return row
    if _finish_revert(vg, key, _rows_by_name(vg)):
        return get_lvm().lv(vg, key)
    return row


def _locked_volume(sr, key, lock):
    """With `key`'s lock held: (VG name, SR record, VG row, LV row, ready record) from one
    `lvs`; Volume_does_not_exist or SR_does_not_exist otherwise (then this lock file, made
    for nothing, is removed). A volume that a killed revert left renamed is put back first."""
    try:
        vg, srrec, vgrow, row = _sr_and_volume(sr, key)
        row = _recover(vg, key, row)
        rec = _settle(vg, key, row, lock) if row is not None else None
        if rec is None:
            raise Volume_does_not_exist(key)
    except (SR_does_not_exist, Volume_does_not_exist):
        lock.forget()
        raise
    return vg, srrec, vgrow, row, rec


def _rows_by_name(vg):
    return {r["name"]: r for r in get_lvm().lvs(vg)}


def _update_volume(sr, key, change):
    _volume_key(key)
    with _VolumeLock(sr_vg(sr), key) as lock:
        vg, _, _, row, rec = _locked_volume(sr, key, lock)
        new = dict(rec, keys=dict(rec["keys"]))
        change(new)
        if new != rec:
            # the row read under the volume's lock is current: every change of a volume's
            # tags holds that lock
            with get_lvm().vg_lock(vg):
                _write_tags_record(vg, key, new, row["tags"])


def _copy_lv(src_path, dst_path, size):
    """Copy `size` bytes of one block device to another and flush them (thick snapshots and
    clones: every block, since the new LV is not zeroed)."""
    from .datacopy import copy_block_device
    started = [False]

    def progress(_pos):
        if not started[0]:
            started[0] = True
            faultpoint("copy:started")
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(dst_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            copy_block_device(src, dst, size, progress=progress)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_volume(sr, key, read_write):
    """Snapshot (read_write=False) or clone of `key`: thick, a new LV holding a full copy;
    thin, a thin snapshot (blocks shared until written), made ready in one lvcreate.
    lvm2 processes: one `lvs` (SR record and source together), the `lvcreate`, and for thick
    the `lvchange` that marks the copy ready; nothing is read back."""
    _volume_key(key)
    kind = "clone" if read_write else "snapshot"
    new = new_uuid()
    with _VolumeLock(sr_vg(sr), key) as src_lock, _VolumeLock(sr_vg(sr), new) as new_lock:
        try:
            vg, srrec, _, src_row, src_rec = _locked_volume(sr, key, src_lock)
        except BaseException:
            new_lock.forget()
            raise
        thin = bool(src_row["pool"])
        rec = _new_record(new, src_rec["name"], src_rec["description"], read_write,
                          src_rec["sharable"], "ready" if thin else "creating",
                          origin={"kind": kind, "of": key})
        tags = [VOL_TAG] + lvmmod.encode_record(rec, 1)
        if thin:
            try:
                faultpoint(f"{kind}:pending")
                with get_lvm().vg_lock(vg):
                    _check_overprovision(vg, srrec, src_row["size"])
                    get_lvm().lvcreate_thin_snapshot(vg, key, new, tags,
                                                     read_only=not read_write)
            except BaseException:
                new_lock.forget()
                raise
            faultpoint(f"{kind}:ready")
            return _volume(vg, srrec, rec, _new_row(new, src_row["size"], POOL))
        try:
            with get_lvm().vg_lock(vg):
                get_lvm().lvcreate(vg, new, src_row["size"], tags)
        except BaseException:
            new_lock.forget()
            raise
        try:
            faultpoint(f"{kind}:pending")
            with _active_for_copy(vg, [key, new]):
                _copy_lv(f"/dev/{vg}/{key}", f"/dev/{vg}/{new}", src_row["size"])
            faultpoint(f"{kind}:data")
            rec["state"] = "ready"
            with get_lvm().vg_lock(vg):
                # the tags are the ones lvcreate was given: nobody else changes them (the
                # new volume's lock is held and its key is not known outside this call)
                _write_tags_record(vg, new, rec, tags,
                                   permission=None if read_write else "r")
            faultpoint(f"{kind}:ready")
        except BaseException:
            with get_lvm().vg_lock(vg):
                _remove_lv(vg, new, new_lock)
            raise
        return _volume(vg, srrec, rec, _new_row(new, src_row["size"]))


# --- the interfaces ------------------------------------------------------------------------------

class Plugin(base.Plugin):
    def query(self, dbg):
        return base.query_result(PLUGIN, "lvm-raw volume plugin",
                                 "SRs are LVM volume groups; volumes are raw logical volumes",
                                 FEATURES, CONFIGURATION)

    def diagnostics(self, dbg):
        from .. import __version__
        return (f"lvm-raw {__version__}; datapaths {','.join(DATAPATHS)}; "
                f"locks in {get_lvm().lock_dir}")


def _probe_result(config, vgrow, rec):
    vg = vgrow["name"]
    return {"configuration": dict(config, sr_uuid=str(rec.get("uuid"))), "complete": True,
            "sr": _sr_stat(vg, vgrow, rec, _pool_row(vg, rec)),
            "extra_info": {"vg": vg, "provisioning": rec.get("provisioning", "thick")}}


@_lvm_errors
@_os_errors         # lock waits past their bound, a full or read-only dom0
class SR(base.SR):
    def probe(self, dbg, configuration):
        config = {k: v for k, v in _config(configuration).items() if k != "sr_uuid"}
        lv = get_lvm()
        results, ours = [], {}
        for row in lv.vgs():
            rec = _sr_record(row)
            if rec is not None:
                ours[row["name"]] = (row, rec)
        if "device" not in config:
            for name in sorted(ours):
                row, rec = ours[name]
                if rec.get("state") == "ready":
                    results.append(_probe_result(config, row, rec))
            return results
        devices = _config_devices(config)
        pvs = {p["name"]: p for p in lv.pvs()}
        vgs = {pvs[d]["vg"] for d in devices if d in pvs and pvs[d]["vg"]}
        if not vgs:
            return [{"configuration": config, "complete": True,
                     "extra_info": {"reason": "no volume group on these devices: usable for "
                                    "SR.create (which refuses a device holding other data)"}}]
        for name in sorted(vgs):
            if name in ours and ours[name][1].get("state") == "ready":
                results.append(_probe_result(config, *ours[name]))
            else:
                results.append({"configuration": config, "complete": False,
                                "extra_info": {"reason": f"volume group {name} on these "
                                               "devices is not a ready lvm-raw SR"}})
        return results

    def create(self, dbg, uuid, configuration, name, description):
        _want_str("uuid", uuid)
        _want_str("name", name)
        _want_str("description", description)
        devices = _config_devices(configuration)
        datapath = _config_datapath(configuration)
        mode, ratio = _config_provisioning(configuration)
        _check_sr_uuid(uuid)
        if configuration.get("sr_uuid", uuid) != uuid:
            raise _config_error("sr_uuid", f"{configuration['sr_uuid']} differs from the uuid "
                                f"{uuid} given to SR.create")
        vg = vg_name(uuid)
        lv = get_lvm()
        with lv.vg_lock(vg):
            row = lv.vg(vg)
            if row is not None:
                rec = _sr_record(row)
                if rec is None or rec.get("uuid") != uuid or \
                        rec.get("state") not in ("ready", "creating"):
                    raise XenAPIError("SR_BACKEND_FAILURE", [
                        "SR already exists", vg, "a volume group of that name exists"])
            else:
                made = self._make_pvs(devices)
                faultpoint("sr-create:checked")
                rec = {"format": SR_FORMAT, "version": SR_FORMAT_VERSION,
                       "state": "ready" if mode == "thick" else "creating",
                       "uuid": uuid, "name": name, "description": description,
                       "datapath": list(datapath or DEFAULT_DATAPATH), "provisioning": mode}
                if ratio is not None:
                    rec["overprovision"] = f"{ratio:g}"
                try:
                    lv.vgcreate(vg, devices, [SR_TAG, UUID_TAG + uuid]
                                + lvmmod.encode_record(rec, 1))
                except BaseException:
                    if made:
                        lv.pvremove(made)
                    raise
                row = lv.vg(vg)
            if rec.get("state") == "creating":      # thin: the pool, then ready
                if lv.lv(vg, POOL) is None:
                    lv.lvcreate_pool(vg, POOL, f"{POOL_PERCENT}%FREE", [POOL_TAG])
                faultpoint("sr-create:pool")
                _write_tags_record(vg, None, dict(rec, state="ready"), row["tags"])
        result = dict(configuration)
        result["sr_uuid"] = uuid
        return result

    @staticmethod
    def _make_pvs(devices):
        """Make the devices PVs; those already orphan PVs (a killed SR.create) are reused.
        A device in another VG, or holding a filesystem (pvcreate -qq says no), is refused."""
        lv = get_lvm()
        pvs = {p["name"]: p for p in lv.pvs()}
        for d in devices:
            if d in pvs and pvs[d]["vg"]:
                raise _config_error("device", f"{d} belongs to volume group {pvs[d]['vg']}")
        todo = [d for d in devices if d not in pvs]
        if todo:
            try:
                lv.pvcreate(todo)
            except lvmmod.LVMError as e:
                # pvcreate makes what it can: undo those, so nothing is left behind
                made = [p["name"] for p in lv.pvs() if p["name"] in todo]
                if made:
                    lv.pvremove(made)
                raise _config_error("device", f"cannot make {', '.join(todo)} LVM physical "
                                    f"volumes (in use, or holding data?): {e.message()}") \
                    from None
        return todo

    def attach(self, dbg, configuration):
        uuid = _config(configuration).get("sr_uuid")
        if uuid is None:
            raise _config_error("sr_uuid", "missing: attach the configuration SR.create returned")
        datapath = _config_datapath(configuration)
        vg = vg_name(_check_sr_uuid(uuid))
        _, row, rec = _ready_sr(vg)
        if row["missing_pvs"]:
            raise XenAPIError("SR_BACKEND_FAILURE", [
                "SR is not reachable", vg, f"{row['missing_pvs']} physical volume(s) missing"])
        # no LV is activated here: the datapath's attach activates the one it plugs
        # (datapath/lvm_activation.py), so only the host that runs the VM has it active.
        # Volumes made without the activation-skip flag (by an older release) get it, so that
        # lvm2's autoactivation leaves them alone too (one lvchange, only when needed).
        rows = get_lvm().lvs(vg)
        unskipped = [r["name"] for r in rows if VOL_TAG in r["tags"] and not r["skip"]]
        if unskipped:
            with get_lvm().vg_lock(vg):
                get_lvm().set_activation_skip(vg, unskipped)
        # a thin SR's pool is active while the SR is attached (what SR.stat reads its use
        # from; a pool is never shared between hosts); it exposes no volume
        pool = _pool_row(vg, rec, rows)
        if pool is not None and not pool["active"]:
            get_lvm().activate(vg, [POOL])
        if datapath is not None and datapath != rec.get("datapath"):
            _update_sr(vg, lambda r: r.__setitem__("datapath", datapath))
            rec = dict(rec, datapath=datapath)
        _write_attached(vg, rec, row)
        return vg

    def detach(self, dbg, sr):
        vg = sr_vg(sr)
        _forget_attached(vg)
        row = get_lvm().vg(vg)
        if _sr_record(row) is None:
            return None             # gone already: detach is idempotent
        lv = get_lvm()
        # the report is read under the act lock: a datapath's hold cannot come in between
        # and have its LV deactivated and its holder file dropped unseen
        with lv.locks() as store, store.lock(vg + ACT_LOCK):
            rows = [r for r in lv.lvs(vg) if VOL_TAG in r["tags"] and r["active"]]
            busy = [r["name"] for r in rows if r["open"]]
            if busy:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "SR is in use", vg, "open volumes: " + ", ".join(sorted(busy))])
            lv.activate(vg, [r["name"] for r in rows], active=False)
            _drop_holders(store, vg)        # nothing on this host uses the SR any more
        # a thin SR's pool: it was activated with its first volume
        lv.activate(vg, [r["name"] for r in lv.lvs(vg)
                         if POOL_TAG in r["tags"] and r["active"]], active=False)
        return None

    def destroy(self, dbg, sr):
        vg = sr_vg(sr)
        lv = get_lvm()
        _forget_attached(vg)
        with lv.vg_lock(vg):
            row = lv.vg(vg)
            rec = _sr_record(row)
            if rec is None:
                raise SR_does_not_exist(sr)
            lvs = lv.lvs(vg)
            foreign = [r["name"] for r in lvs
                       if VOL_TAG not in r["tags"] and POOL_TAG not in r["tags"]]
            if foreign:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "SR holds logical volumes that are not ours", vg, ", ".join(foreign)])
            # a volume open is a user; an active thin pool always reads as open (its visible
            # LV is a device over the pool's own -tpool layer), users or not
            busy = [r["name"] for r in lvs if r["open"] and VOL_TAG in r["tags"]]
            if busy:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "SR is in use", vg, "open volumes: " + ", ".join(sorted(busy))])
            if rec.get("state") != "destroying":
                _write_tags_record(vg, None, dict(rec, state="destroying"), row["tags"])
            faultpoint("sr-destroy:marked")
            store = lv.locks()
            with store:
                for r in sorted(lvs, key=lambda r: POOL_TAG in r["tags"]):  # the pool last
                    lv.lvremove(vg, r["name"])
                    store.unlink(f"{vg}.{r['name']}.lock")
                    faultpoint("sr-destroy:volume-gone")
            devices = [p["name"] for p in lv.pvs() if p["vg"] == vg]
            lv.vgremove(vg)
            faultpoint("sr-destroy:locks-gone")
            if devices:
                lv.pvremove(devices)
        with lv.locks() as store:
            _drop_holders(store, vg)
            store.unlink(vg + ACT_LOCK)
            store.unlink(f"{vg}.vg.lock")
        return None

    def stat(self, dbg, sr):
        vg, row, rec = _ready_sr(sr)
        return _sr_stat(vg, row, rec, _pool_row(vg, rec))

    def set_name(self, dbg, sr, new_name):
        _want_str("new_name", new_name)
        _update_sr(sr, lambda r: r.__setitem__("name", new_name))

    def set_description(self, dbg, sr, new_description):
        _want_str("new_description", new_description)
        _update_sr(sr, lambda r: r.__setitem__("description", new_description))

    def ls(self, dbg, sr):
        vg, _, srrec = _ready_sr(sr)
        result = []
        rows = get_lvm().lvs(vg)
        reverts = _reverted_keys(rows)
        if reverts:                 # a killed revert: finish it (unless one is running)
            by_name = {r["name"]: r for r in rows}
            for key in sorted(reverts):
                with _VolumeLock(vg, key, blocking=False) as lock:
                    if lock.lock is not None:
                        _finish_revert(vg, key, by_name)
            rows = get_lvm().lvs(vg)
            reverts = _reverted_keys(rows)
        _forget_stray_locks(vg, {r["name"] for r in rows})
        _reap_dead_holders(vg, {r["name"] for r in rows})
        for row in rows:
            if VOL_TAG not in row["tags"] or _revert_base(row["name"]):
                continue            # not ours: never listed, never touched; or a running revert's
            rec = _vol_record(row)
            if rec is None:
                _log(40, f"{vg}/{row['name']} (LV uuid {row['uuid']}): tagged {VOL_TAG} "
                     f"but its record does not decode (tags {row['tags']}): an orphan, left "
                     "untouched")
                continue
            if rec.get("state") == "ready":
                result.append(_volume(vg, srrec, rec, row))
                continue
            with _VolumeLock(vg, row["name"], blocking=False) as lock:
                if lock.lock is not None:       # else a call on it is running
                    _settle(vg, row["name"], row, lock)
        # a revert running between its two renames: the volume is listed from the LV that
        # holds its data at that moment (a ready <key>.rv, else <key>.old), so that a scan
        # never misses it (xapi forgets a VDI that SR.ls leaves out)
        by_name = {r["name"]: r for r in rows}
        for key in sorted(k for k in reverts if k not in by_name):
            left = _revert_leftovers(key, by_name)
            for suffix in (REVERT_NEW, REVERT_OLD):
                if suffix in left and left[suffix][1].get("state") == "ready":
                    result.append(_volume(vg, srrec, left[suffix][1], left[suffix][0]))
                    break
        return result


def _revert_base(name):
    """The volume key of a revert's <key>.rv or <key>.old LV name, else None."""
    for suffix in (REVERT_NEW, REVERT_OLD):
        if name.endswith(suffix) and is_uuid(name[:-len(suffix)]):
            return name[:-len(suffix)]
    return None


def _reverted_keys(rows):
    """The keys whose revert may have left something to finish (see _finish_revert)."""
    ours = [r for r in rows if VOL_TAG in r["tags"]]
    return ({_revert_base(r["name"]) for r in ours} - {None}) | \
        {r["name"] for r in ours if REVERT_TAG in r["tags"] and is_uuid(r["name"])}


def _forget_stray_locks(vg, lv_names):
    """Remove this host's lock files of volumes that have no LV (a create killed before its
    lvcreate, or a destroy killed after its lvremove), unless a call holds them."""
    prefix = vg + "."
    with get_lvm().locks() as store:
        for name in store.names():
            key = name[len(prefix):-len(".lock")] if name.startswith(prefix) else ""
            if not is_uuid(key) or not name.endswith(".lock") or key in lv_names:
                continue
            lock = store.lock(name, blocking=False, create=False)
            if lock is not None:
                with lock:
                    store.unlink(name)


@_lvm_errors
@_os_errors         # lock waits past their bound, a full or read-only dom0
class Volume(base.Volume):
    def create(self, dbg, sr, name, description, size, sharable):
        _want_str("name", name)
        _want_str("description", description)
        size = _want_size("size", size)
        _want_bool("sharable", sharable)
        vg = sr_vg(sr)
        attached = _attached(vg)
        if attached is not None:        # thick, attached here: no vgs (see _attached)
            srrec, extent_size = attached
        else:
            vg, vgrow, srrec = _ready_sr(sr)
            extent_size = vgrow["extent_size"]
        key = new_uuid()
        rec = _new_record(key, name, description, True, sharable, "ready")
        with _VolumeLock(vg, key) as lock:
            faultpoint("create:pending")
            thin = srrec.get("provisioning") == "thin"
            try:
                with get_lvm().vg_lock(vg):
                    _check_overprovision(vg, srrec, size)
                    get_lvm().lvcreate(vg, key, max(size, 1),
                                       [VOL_TAG] + lvmmod.encode_record(rec, 1),
                                       pool=POOL if thin else None)
            except lvmmod.LVMError as e:
                lock.forget()
                if attached is not None and e.not_found():
                    _forget_attached(vg)        # the VG went while attached
                    raise SR_does_not_exist(sr) from None
                raise
            except BaseException:
                lock.forget()
                raise
            faultpoint("create:ready")
        # the new LV's row from the lvcreate arguments, not read back (an lvm2 process less):
        # lvm2 gives whole extents, thick or thin; a new thin volume has no block allocated
        return _volume(vg, srrec, rec, _new_row(
            key, lvmmod.round_up(max(size, 1), extent_size), POOL if thin else ""))

    def snapshot(self, dbg, sr, key):
        return _copy_volume(sr, key, read_write=False)

    def clone(self, dbg, sr, key):
        return _copy_volume(sr, key, read_write=True)

    def destroy(self, dbg, sr, key):
        """lvm2 processes: one `lvs` (SR record and LV together), the `lvremove`."""
        _volume_key(key)
        vg = sr_vg(sr)
        with _VolumeLock(vg, key) as vl:
            try:
                vg, _, _, row = _sr_and_volume(sr, key)
            except SR_does_not_exist:
                vl.forget()
                raise
            row = _recover(vg, key, row)        # a killed revert may have set it aside
            if row is None:
                vl.forget()
                return None             # already gone: destroy is idempotent
            if VOL_TAG not in row["tags"]:
                raise Volume_does_not_exist(key)    # not ours: never touched
            in_use = XenAPIError("SR_BACKEND_FAILURE", [
                "Volume is in use", key, f"/dev/{vg}/{key} is open (attached?)"])
            if row["open"]:
                raise in_use
            faultpoint("destroy:marked")
            with get_lvm().vg_lock(vg):
                try:
                    _remove_lv(vg, key, vl)
                except lvmmod.LVMError as e:
                    if e.in_use():          # opened since the report: lvm2 refuses, so do we
                        raise in_use from None
                    if e.not_found():       # a concurrent destroy came first
                        vl.forget()
                        return None
                    raise
        return None

    def stat(self, dbg, sr, key):
        _volume_key(key)
        vg, srrec, _, row = _sr_and_volume(sr, key)
        rec = _vol_record(row)
        if rec is None or rec.get("state") != "ready":
            raise Volume_does_not_exist(key)
        return _volume(vg, srrec, rec, row)

    def set(self, dbg, sr, key, k, v):
        _want_str("k", k)
        _want_str("v", v)
        _update_volume(sr, key, lambda rec: rec["keys"].__setitem__(k, v))

    def unset(self, dbg, sr, key, k):
        _want_str("k", k)
        _update_volume(sr, key, lambda rec: rec["keys"].pop(k, None))

    def set_name(self, dbg, sr, key, new_name):
        _want_str("new_name", new_name)
        _update_volume(sr, key, lambda rec: rec.__setitem__("name", new_name))

    def set_description(self, dbg, sr, key, new_description):
        _want_str("new_description", new_description)
        _update_volume(sr, key, lambda rec: rec.__setitem__("description", new_description))

    def revert(self, dbg, sr, snapshot, key):
        """Make `key` hold `snapshot`'s data (and size), keeping its key, name, description and
        keys. The snapshot's data goes to a new LV <key>.rv (thick: a full copy, made ready
        once fsynced; thin: a thin snapshot of the snapshot, instant), then <key> is renamed
        <key>.old, <key>.rv renamed <key>, and <key>.old removed: a killed call leaves the old
        volume or the reverted one, never a half-copied one, and the next call on `key` or
        SR.ls finishes it (_finish_revert). Needs free space for one copy (thick) while it
        runs. The volume must not be attached."""
        _volume_key(snapshot)
        _volume_key(key)
        if snapshot == key:
            raise _argument_error("snapshot", "a volume cannot be reverted to itself")
        vgname = sr_vg(sr)
        with contextlib.ExitStack() as stack:
            locks = {k: stack.enter_context(_VolumeLock(vgname, k))
                     for k in sorted((key, snapshot))}      # one order: no deadlock
            vg, srrec, _, row, rec = _locked_volume(sr, key, locks[key])
            _, _, _, snap_row, _ = _locked_volume(sr, snapshot, locks[snapshot])
            if not rec["read_write"]:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "Volume is read-only", key, "a snapshot cannot be reverted"])
            if row["open"]:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "Volume is in use", key, f"/dev/{vg}/{key} is open (attached?)"])
            thin = bool(snap_row["pool"])
            new, old = key + REVERT_NEW, key + REVERT_OLD
            target = {k: v for k, v in rec.items() if not k.startswith("_")}
            target["state"] = "ready" if thin else "creating"
            tags = [VOL_TAG, REVERT_TAG] + lvmmod.encode_record(target, 1)
            lv = get_lvm()
            try:
                with lv.vg_lock(vg):
                    lv.lvchange(vg, key, add=[REVERT_TAG])
                faultpoint("revert:pending")
                with lv.vg_lock(vg):
                    if thin:
                        _check_overprovision(vg, srrec, snap_row["size"])
                        lv.lvcreate_thin_snapshot(vg, snapshot, new, tags, read_only=False)
                    else:
                        lv.lvcreate(vg, new, snap_row["size"], tags)
                if not thin:
                    with _active_for_copy(vg, [snapshot, new]):
                        _copy_lv(f"/dev/{vg}/{snapshot}", f"/dev/{vg}/{new}",
                                 snap_row["size"])
                    with lv.vg_lock(vg):
                        _write_tags_record(vg, new, dict(target, state="ready"), tags)
                faultpoint("revert:made")
                with lv.vg_lock(vg):
                    lv.lvrename(vg, key, old)
                faultpoint("revert:old-aside")
                with lv.vg_lock(vg):
                    lv.lvrename(vg, new, key)
                faultpoint("revert:swapped")
                with lv.vg_lock(vg):
                    lv.lvremove(vg, old)
                faultpoint("revert:old-gone")
                with lv.vg_lock(vg):
                    lv.lvchange(vg, key, delete=[REVERT_TAG])
            except BaseException:
                # undo (not swapped) or finish (set aside) what this call made
                _finish_revert(vg, key, _rows_by_name(vg))
                raise
        return None

    def resize(self, dbg, sr, key, new_size):
        _volume_key(key)
        size = _want_size("new_size", new_size)
        with _VolumeLock(sr_vg(sr), key) as lock:
            vg, _, _, row, rec = _locked_volume(sr, key, lock)
            if not rec["read_write"]:
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "Volume is read-only", key, "a snapshot cannot be resized"])
            if size < row["size"]:
                raise _size_error("shrinking not allowed")
            if size > row["size"]:
                with get_lvm().vg_lock(vg):
                    get_lvm().lvextend(vg, key, size)
        return None


IMPLEMENTATIONS = {"Plugin": Plugin, "SR": SR, "Volume": Volume}
