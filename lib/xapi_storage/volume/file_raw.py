"""The `file-raw` volume plugin: an SR is a directory, a volume a sparse raw file plus a record.

See docs/file-raw.md for the contract (SR key, on-disk layout, record format, URIs, locking and
crash behaviour). In short:

    <path>/sr.json          SR record; its presence (format "xapi-storage/file-raw") makes <path> an SR
    <path>/sr.lock          flock: shared by every mutating call, exclusive by SR.create/SR.destroy
    <path>/sr.meta.lock     flock: serialises read-modify-write of sr.json (and lock repairs)
    <path>/<key>.json       volume record (state creating | ready | destroying)
    <path>/<key>.img        volume data: a sparse raw file, size = virtual size
    <path>/<key>.lock       flock: serialises calls on one volume; free = no call in progress
    <path>/.tmp.<owner>.*   temporary files of atomic writes (owner = key or "sr.meta")

The SR key is "file://" + the percent-encoded absolute path; a volume key is a lower-case uuid.
"""

import errno
import os
from stat import S_ISDIR, S_ISREG, S_IWOTH

from ..sdk import base, log
from ..sdk.errors import SR_does_not_exist, Volume_does_not_exist, XenAPIError
from .store import (
    LOCK_SUFFIX, LockTimeout, NotRegularFile, Store, faultpoint, is_enospc, is_uuid, new_uuid,
    quote_path, unquote_path,
)

PLUGIN = "file-raw"
SR_FORMAT = "xapi-storage/file-raw"
SR_FORMAT_VERSION = 1
SR_RECORD = "sr.json"
SR_LOCK = "sr.lock"
SR_META = "sr.meta"             # owner tag of sr.json's temporary files; its lock is sr.meta.lock
SR_KEY_PREFIX = "file://"
DATAPATHS = ("blkback", "pyblkback")
DEFAULT_DATAPATH = ("blkback",)
SECTOR = 512
MAX_SIZE = (1 << 63) - SECTOR   # largest int64 that is a multiple of 512

CONFIGURATION = {
    "path": "absolute path of the directory that holds the SR (SR.create makes it if missing; "
            "its parent must exist)",
    "datapath": "the datapath of every volume's URI: blkback (default) or pyblkback; a "
                "comma-separated list is accepted and only its first name is used (a volume "
                "has one URI: see docs/file-raw.md)",
    "sr_uuid": "set by SR.create: the SR's uuid, checked by SR.attach",
}

FEATURES = [
    "SR_PROBE", "SR_CREATE", "SR_DELETE", "SR_ATTACH", "SR_DETACH", "SR_SCAN", "SR_UPDATE",
    "VDI_CREATE", "VDI_DESTROY", "VDI_UPDATE", "VDI_RESIZE", "VDI_SNAPSHOT", "VDI_CLONE",
    "VDI_REVERT", "VDI_ATTACH_OFFLINE", "THIN_PROVISIONING", "LARGE_VDI",
]


# --- errors --------------------------------------------------------------------------------------

def _config_error(key, why):
    return XenAPIError("SR_BACKEND_FAILURE", ["Invalid device-config", key, why])


def _argument_error(name, why):
    return XenAPIError("SR_BACKEND_FAILURE", ["Invalid argument", name, why])


def _size_error(why):
    return XenAPIError("SR_BACKEND_FAILURE_79", ["VDI Invalid size", why])


def _no_space(exc):
    return XenAPIError("SR_BACKEND_FAILURE_44", ["There is insufficient space", str(exc)])


def _read_only(exc):
    return XenAPIError("SR_BACKEND_FAILURE", [
        "The SR is read-only", f"{exc.strerror}: {exc.filename or ''}".rstrip(": "),
        "its filesystem is mounted read-only: only reads (attach, stat, ls) work"])


def _lock_timeout(exc):
    return XenAPIError("SR_BACKEND_FAILURE", ["Timed out waiting for a lock", str(exc)])


def _os_errors(cls):
    """Class decorator: what the world does to any step of any method the class defines
    becomes one structured error, after the method's own clean-up ran: a full SR (ENOSPC, or
    EDQUOT over a quota) answers SR_BACKEND_FAILURE_44, a read-only mount (EROFS) "The SR is
    read-only", a lock wait past its bound (store.flock_bounded) "Timed out waiting for a
    lock"."""
    def wrap(fn):
        def method(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LockTimeout as e:
                raise _lock_timeout(e) from None
            except OSError as e:
                if is_enospc(e):
                    raise _no_space(e) from None
                if e.errno == errno.EROFS:
                    raise _read_only(e) from None
                raise
        # what functools.wraps does, without importing functools (and collections with it):
        # ~a quarter of a plugin call's own start-up
        for attr in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
            if hasattr(fn, attr):
                setattr(method, attr, getattr(fn, attr))
        method.__dict__.update(fn.__dict__)
        method.__wrapped__ = fn
        return method
    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("_"):
            setattr(cls, name, wrap(fn))
    return cls


def _log(level, msg):
    log.emit(level, "%s", msg)


# --- arguments -----------------------------------------------------------------------------------

def _want_str(name, value):
    if type(value) is not str:
        raise _argument_error(name, f"expected a string, got {type(value).__name__}")
    return value


def _want_bool(name, value):
    if type(value) is not bool:
        raise _argument_error(name, f"expected a boolean, got {type(value).__name__}")
    return value


def _want_size(name, value):
    """An int64 size rounded up to a multiple of 512 bytes."""
    if type(value) is not int:
        raise _argument_error(name, f"expected an integer, got {type(value).__name__}")
    if value < 0:
        raise _size_error(f"{name} {value} is negative")
    if value > MAX_SIZE:
        raise _size_error(f"{name} {value} is larger than {MAX_SIZE}")
    return -(-value // SECTOR) * SECTOR


def _config(configuration):
    if type(configuration) is not dict or not all(
            type(k) is str and type(v) is str for k, v in configuration.items()):
        raise _argument_error("configuration", "expected a map of strings to strings")
    return configuration


def _config_path(configuration):
    path = _config(configuration).get("path")
    if path is None:
        raise _config_error("path", "missing: give the absolute path of the SR's directory")
    if not path.startswith("/") or "\x00" in path:
        raise _config_error("path", f"{path!r} is not an absolute path")
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise _config_error("path", "the root directory cannot be an SR")
    return norm


def _config_datapath(configuration):
    text = configuration.get("datapath")
    if text is None:
        return None
    order = [p.strip() for p in text.split(",")]
    if not order or any(p not in DATAPATHS for p in order) or len(set(order)) != len(order):
        raise _config_error("datapath", f"{text!r}: expected a comma-separated list of distinct "
                            f"names from {', '.join(DATAPATHS)}")
    return order


def sr_key(path):
    """The SR key (what SR.attach returns) of the SR in directory `path`."""
    return SR_KEY_PREFIX + quote_path(path)


def sr_path(sr):
    """The directory of an SR key; SR_does_not_exist if `sr` is not a key we could return."""
    if type(sr) is str and sr.startswith(SR_KEY_PREFIX):
        path = unquote_path(sr[len(SR_KEY_PREFIX):])
        if (path is not None and path.startswith("/") and path != "/" and "\x00" not in path
                and os.path.normpath(path) == path and not path.startswith("//")):
            return path
    raise SR_does_not_exist(sr if type(sr) is str else repr(sr))


def _volume_key(key):
    if not is_uuid(key):
        raise Volume_does_not_exist(key if type(key) is str else repr(key))
    return key


# --- SR records ----------------------------------------------------------------------------------

def _is_sr_record(rec):
    return type(rec) is dict and rec.get("format") == SR_FORMAT


def _read_sr_record(store):
    """The SR record in `store`, or None if the directory is not (yet) one of our SRs."""
    try:
        rec = store.read(SR_RECORD)
    except (ValueError, IsADirectoryError):
        return None
    if rec is None or not _is_sr_record(rec):
        return None
    if rec.get("version") != SR_FORMAT_VERSION:
        raise XenAPIError("SR_BACKEND_FAILURE", [
            "Unsupported SR format version", store.path, str(rec.get("version"))])
    return rec


def _open_store(path, sr):
    store = Store(path)
    try:
        store.dfd
    except (FileNotFoundError, NotADirectoryError):
        raise SR_does_not_exist(sr) from None
    return store


class _Attached:
    """`with _Attached(sr) as (store, rec)`: the SR's directory, its record, and a shared
    hold on sr.lock for the whole call (SR.destroy waits for it)."""

    def __init__(self, sr):
        self.sr = sr
        self.path = sr_path(sr)
        self.store = None
        self.lock = None

    def __enter__(self):
        self.store = _open_store(self.path, self.sr)
        try:
            self.lock = self.store.lock(SR_LOCK, exclusive=False, create=False)
            if self.lock is None and _is_ready(_read_sr_record(self.store)):
                # sr.lock lost (removed by hand: SR.destroy removes it only after marking the
                # SR destroying, or after removing sr.json): make it again
                _log(30, f"{self.path}/{SR_LOCK} was missing: made again")
                self.lock = self.store.lock(SR_LOCK, exclusive=False)
            rec = _read_sr_record(self.store) if self.lock else None
            if not _is_ready(rec):
                raise SR_does_not_exist(self.sr)
        except BaseException:
            self.__exit__()
            raise
        return self.store, rec

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
        self.store.close()


def _is_ready(rec):
    return rec is not None and rec.get("state") == "ready"


def _ready_store(sr):
    """Lock-free (for stat calls): the SR's open Store and record; the caller closes the
    Store. SR_does_not_exist unless the SR is there and ready."""
    store = _open_store(sr_path(sr), sr)
    try:
        rec = _read_sr_record(store)
        if rec is None or rec.get("state") != "ready":
            raise SR_does_not_exist(sr)
    except BaseException:
        store.close()
        raise
    return store, rec


def _sr_stat(sr, path, rec):
    vfs = os.statvfs(path)
    health = ["Healthy", ""]
    if not os.access(path, os.W_OK):
        health = ["Unreachable", f"{path} is not writable"]
    result = {
        "sr": sr,
        "name": rec.get("name", ""),
        "description": rec.get("description", ""),
        "free_space": vfs.f_bavail * vfs.f_frsize,
        "total_space": vfs.f_blocks * vfs.f_frsize,
        "datasources": [],
        "clustered": False,
        "health": health,
    }
    if type(rec.get("uuid")) is str:
        result["uuid"] = rec["uuid"]
    return result


def _update_sr_record(store, change):
    """Read-modify-write of sr.json under sr.meta.lock (caller holds sr.lock)."""
    with store.lock(SR_META + LOCK_SUFFIX):
        rec = _read_sr_record(store)
        if rec is None or rec.get("state") != "ready":
            raise SR_does_not_exist(sr_key(store.path))
        new = dict(rec)
        change(new)
        if new != rec:
            store.write(SR_RECORD, new, owner=SR_META)


# --- volume records ------------------------------------------------------------------------------

def _img(key):
    return key + ".img"


def _rec(key):
    return key + ".json"


def _not_regular(store, key, what):
    return XenAPIError("SR_BACKEND_FAILURE", [
        "Volume data is not a regular file", key, f"{store.path}/{_img(key)} is {what}"])


def _open_data(store, key, flags):
    """Open `key`'s data file. Someone else's symlink, directory, FIFO or device put in its
    place is neither followed nor waited on (O_NOFOLLOW, O_NONBLOCK, then fstat), and a data
    file with another name (a hard link, maybe outside the SR) is not ours alone: a structured
    error instead, and the entry is left as it is."""
    try:
        fd = store.open_regular(_img(key), flags)
    except FileNotFoundError:
        raise _not_regular(store, key, "missing") from None
    except NotRegularFile:
        raise _not_regular(store, key, "not a regular file: left untouched") from None
    try:
        links = os.fstat(fd).st_nlink
    except BaseException:
        os.close(fd)
        raise
    if links != 1:
        os.close(fd)
        raise _not_regular(store, key, f"hard-linked ({links} names, maybe outside the SR): "
                           "left untouched")
    return fd


def _usable(st):
    """True if the lstat `st` of a data file is one a datapath may be given: a regular file
    with no other name (a hard link could be a file outside the SR)."""
    return st is not None and S_ISREG(st.st_mode) and st.st_nlink == 1


def _volume(path, datapath, rec, st, qpath=None):
    """The interface's volume record. `st` is the lstat of the data file: if that is not a
    regular file of ours alone (missing, replaced by a symlink, directory, ..., or hard-linked),
    the volume is reported with no URI: a datapath opens the URI's path, and a symlink or a
    link could lead anywhere in dom0. Without a URI the daemon refuses to attach it, but it can
    still be destroyed. Sizes are those of a regular file, else 0. Otherwise it has one URI,
    for the first datapath of the SR's `datapath` list."""
    key = rec["key"]
    regular = st is not None and S_ISREG(st.st_mode)
    location = f"{qpath or quote_path(path)}/{key}.img"     # a key needs no quoting
    return {
        "key": key,
        "uuid": key,
        "name": rec["name"],
        "description": rec["description"],
        "read_write": rec["read_write"],
        "sharable": rec["sharable"],
        "virtual_size": st.st_size if regular else 0,
        "physical_utilisation": st.st_blocks * 512 if regular else 0,
        # ONE URI, the SR's first datapath: with two schemes the daemon could send a
        # non-persistent disk's Datapath.open to one plugin and its attach to the other
        # (docs/file-raw.md, "One URI per volume")
        "uri": [f"{datapath[0]}://{location}"] if _usable(st) and datapath else [],
        "keys": dict(rec["keys"]),
    }


def _grown(path):
    """Tell the datapaths that can be told that a volume's data file grew: the `blkback`
    datapath refreshes its loop device (`losetup -c`), and the kernel's blkback then gives the
    guest the new size. (The `pyblkback` server re-reads the size by itself.) Best effort: a
    failure is logged, the resize stands."""
    try:
        from ..datapath.blkback import refresh
        refresh(path)
    except Exception as e:  # noqa: BLE001 - the volume did grow; say why the guest may not see it
        _log(log.WARNING, f"{path} grew, but its loop device could not be refreshed: {e}")


def _foreign_volume(key, rec, why, st):
    """A volume whose record this plugin does not understand (see _load): listed, so that it
    shows up (xapi's SR.scan forgets what is not listed) and can be destroyed, but read-only
    and without a URI, its description saying why."""
    name = rec.get("name") if type(rec) is dict else None
    return _volume("", (), {
        "key": key, "name": name if type(name) is str else "",
        "description": f"file-raw cannot use this volume: its record {why}",
        "read_write": False, "sharable": False, "keys": {}}, st)


# What _load finds under a key's record name:
MISSING = "missing"         # nothing
READY = "ready"             # a volume record this plugin understands, state ready
UNFINISHED = "unfinished"   # a record of ours in state creating/destroying: a call's work
FOREIGN = "foreign"         # anything else in a file: unknown state, malformed, garbage, FIFO...
PLANTED_DIR = "directory"   # a directory: not a record at all, never removed

_UNFINISHED_STATES = ("creating", "destroying")
_READY_FIELDS = (("name", str), ("description", str), ("read_write", bool),
                 ("sharable", bool), ("keys", dict))


def _record_problem(rec, key):
    """Why `rec` (parsed JSON) is not a record of volume `key` this plugin understands, or
    None. A record in state creating/destroying need only name its key: those are removed."""
    if type(rec) is not dict:
        return "is not a JSON object"
    if rec.get("key") != key:
        return f"names another volume ({str(rec.get('key'))[:40]!r})"
    state = rec.get("state")
    if state in _UNFINISHED_STATES:
        return None
    if state != "ready":
        return f"has a state this plugin does not know ({str(state)[:40]!r})"
    for field, kind in _READY_FIELDS:
        if type(rec.get(field)) is not kind:
            return f"has no {kind.__name__} {field!r}"
    if not all(type(k) is str and type(v) is str for k, v in rec["keys"].items()):
        return "has keys that are not strings"
    return None


def _load(store, key):
    """(status, record, why) of `key`: status is one of MISSING, READY, UNFINISHED, FOREIGN,
    PLANTED_DIR above; `why` says what is wrong with a FOREIGN record (also logged)."""
    name = _rec(key)
    try:
        rec = store.read(name)
    except NotRegularFile:
        st = store.stat(name)
        if st is not None and S_ISDIR(st.st_mode):
            _log(40, f"{store.path}/{name}: a directory, not a volume record: left in place")
            return PLANTED_DIR, None, "is a directory"
        rec, why = None, "is not a regular file"
    except ValueError as e:             # not JSON, not UTF-8
        rec, why = None, f"is not readable ({str(e)[:80]})"
    else:
        if rec is None:
            return MISSING, None, None
        why = _record_problem(rec, key)
        if why is None:
            return (READY if rec["state"] == "ready" else UNFINISHED), rec, None
    _log(40, f"{store.path}/{name}: volume record not understood: it {why}; "
         "listed without URI, never removed but by Volume.destroy or SR.destroy")
    return FOREIGN, rec, why


def _write_new_record(store, key, rec):
    """The first record of a new volume, under its lock (just made). If it cannot be written
    (a full SR, say), the lock file goes too: nothing of the new volume is left."""
    try:
        store.write(_rec(key), rec, owner=key, exclusive=True)
    except BaseException:
        store.unlink(key + LOCK_SUFFIX)
        raise


def _remove_volume_files(store, key):
    """Data first, then the record, then the lock: a crash between two steps leaves a record
    (state creating or destroying) that the next SR.ls or locked call finishes removing.
    A directory under any of these names is not ours to remove (someone else put it there and
    it may hold anything): Store.unlink leaves it in place and logs it, and the volume goes."""
    if store.unlink(_img(key)):
        store.fsync_dir()
    faultpoint("remove:data-gone")
    store.unlink(_rec(key))
    store.fsync_dir()
    faultpoint("remove:record-gone")
    store.unlink(key + LOCK_SUFFIX)


def _destroy_volume(store, key, status, rec, mark=True):
    """Remove volume `key` (its lock held) whatever its record (_load's `status`, `rec`).

    With `mark`, the record is first rewritten `destroying` so that a call killed midway
    leaves work the next SR.ls finishes. Writing it needs a free inode and block; on a full SR
    (ENOSPC/EDQUOT) there may be neither, and freeing space must still work: then the data
    goes first, with the record as it was. A call killed between the two leaves a volume
    listed with sizes 0 and no URI until the destroy is retried: nothing lost, nothing hidden.
    """
    if mark and status in (READY, FOREIGN):
        new = dict(rec, state="destroying") if status == READY else \
            {"key": key, "state": "destroying"}
        try:
            store.write(_rec(key), new, owner=key)
        except OSError as e:
            if not is_enospc(e):
                raise
            _log(30, f"{store.path}: volume {key}: no space to mark it destroying ({e}): "
                 "its data is removed first")
    faultpoint("destroy:marked")
    for t in store.temporaries().get(key, ()):
        store.unlink(t)
    _remove_volume_files(store, key)


def _lock_volume(store, key, blocking=True):
    """The lock of volume `key` (see Store.lock; planted entries under its name are removed
    under sr.meta.lock, so that two callers never remove each other's fresh lock file)."""
    return store.lock(key + LOCK_SUFFIX, blocking=blocking,
                      repair=lambda: store.lock(SR_META + LOCK_SUFFIX))


def _settle(store, key):
    """Call with `key`'s lock held. (status, record, why) as _load says, after removing what a
    killed create/snapshot/clone/destroy left behind for this key (a record of ours in state
    creating or destroying; a lock file without a record). Nothing else is ever removed: a
    record in a state this plugin does not know may be a newer version's, on a shared SR."""
    status, rec, why = _load(store, key)
    if status == UNFINISHED:
        _log(30, f"{store.path}: removing volume {key} left in state {rec['state']!r} "
             "by a killed call")
        _remove_volume_files(store, key)
        return MISSING, None, None
    if status == MISSING:
        store.unlink(key + LOCK_SUFFIX)
    return status, rec, why


class _VolumeLocks:
    """Exclusive locks on several volumes, taken in key order (no deadlock), each settled."""

    def __init__(self, store, keys):
        self.store = store
        self.keys = sorted(set(keys))
        self.locks = []

    def __enter__(self):
        records = {}
        try:
            for key in self.keys:
                self.locks.append(_lock_volume(self.store, key))
                records[key] = _settle(self.store, key)
        except BaseException:
            self.__exit__()
            raise
        return records

    def __exit__(self, *exc):
        for lock in self.locks:
            lock.release()


def _require(records, key):
    status, rec, why = records[key]
    if status in (MISSING, PLANTED_DIR):
        raise Volume_does_not_exist(key)
    if status != READY:
        raise XenAPIError("SR_BACKEND_FAILURE", [
            "Volume record not understood", key, f"the record {why}: only destroy is allowed"])
    return rec


def _new_record(key, name, description, read_write, sharable, origin=None):
    rec = {"key": key, "state": "creating", "name": name, "description": description,
           "read_write": read_write, "sharable": sharable, "keys": {}}
    if origin is not None:
        rec["origin"] = origin
    return rec


# --- the interfaces ------------------------------------------------------------------------------

class Plugin(base.Plugin):
    def query(self, dbg):
        return base.query_result(PLUGIN, "file-raw volume plugin",
                                 "SRs are directories; volumes are sparse raw files with JSON records",
                                 FEATURES, CONFIGURATION)

    def diagnostics(self, dbg):
        from .datacopy import reflink_disabled
        from .. import __version__
        return (f"file-raw {__version__}; datapaths {','.join(DATAPATHS)}; "
                f"reflink {'disabled by XAPI_STORAGE_NO_REFLINK' if reflink_disabled() else 'tried first'}")


@_os_errors
class SR(base.SR):
    def probe(self, dbg, configuration):
        path = _config_path(configuration)
        base_config = {k: v for k, v in configuration.items() if k != "sr_uuid"}
        base_config["path"] = path
        found = _probe_dir(path)
        if found == "notdir":
            raise _config_error("path", f"{path} exists and is not a directory")
        if found == "noparent":
            raise _config_error("path", f"the parent of {path} does not exist")
        if type(found) is dict:
            if found.get("state") == "ready":
                return [_probe_sr(base_config, path, found)]
            return [{"configuration": base_config, "complete": False,
                     "extra_info": {"reason": "an SR being destroyed: retry SR.destroy",
                                    "sr_uuid": str(found.get("uuid"))}}]
        if found in ("missing", "empty"):
            return [{"configuration": base_config, "complete": True,
                     "extra_info": {"reason": "no SR here yet: usable for SR.create"}}]
        # a non-empty directory that is not an SR: look one level down for SRs
        results = []
        try:
            with os.scandir(path) as it:
                subdirs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except OSError as e:
            raise _config_error("path", f"{path}: cannot list: {e.strerror}") from None
        for name in subdirs:        # every one: an SR left out would be invisible
            sub = f"{path}/{name}"
            rec = _probe_dir(sub)
            if type(rec) is dict and rec.get("state") == "ready":
                results.append(_probe_sr(dict(base_config, path=sub), sub, rec))
        results.append({"configuration": base_config, "complete": False,
                        "extra_info": {"reason": "directory is not empty and is not a file-raw "
                                       "SR; SRs found in its sub-directories are listed"}})
        return results

    def create(self, dbg, uuid, configuration, name, description):
        path = _config_path(configuration)
        datapath = _config_datapath(configuration)
        _want_str("uuid", uuid)
        _want_str("name", name)
        _want_str("description", description)
        if configuration.get("sr_uuid", uuid) != uuid:
            raise _config_error("sr_uuid", f"{configuration['sr_uuid']} differs from the uuid "
                                f"{uuid} given to SR.create")
        made = False
        try:
            os.mkdir(path, 0o755)
            made = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise _config_error("path", f"the parent of {path} does not exist") from None
        if not os.path.isdir(path):
            raise _config_error("path", f"{path} exists and is not a directory")
        if os.stat(path).st_mode & S_IWOTH:
            # anyone could plant files under the SR's names (or hard links to their own)
            raise _config_error("path", f"{path} is writable by every user: give a directory "
                                "only root can write (chmod o-w)")
        try:
            # the directory's entry survives a crash (also on the retry of a killed call)
            _fsync_path(os.path.dirname(path))
            _create_sr(path, uuid, name, description, datapath)
        except BaseException:
            if made:        # leave nothing behind: remove what this call made
                _undo_mkdir(path)
            raise
        result = dict(configuration)
        result["path"] = path
        result["sr_uuid"] = uuid
        return result

    def attach(self, dbg, configuration):
        path = _config_path(configuration)
        datapath = _config_datapath(configuration)
        key = sr_key(path)
        with _Attached(key) as (store, rec):
            wanted = configuration.get("sr_uuid")
            if wanted is not None and wanted != rec.get("uuid"):
                raise XenAPIError("SR_BACKEND_FAILURE", [
                    "SR uuid mismatch", path, f"device-config sr_uuid is {wanted}",
                    f"the SR in the directory is {rec.get('uuid')}"])
            if datapath is not None and datapath != rec.get("datapath"):
                _update_sr_record(store, lambda r: r.__setitem__("datapath", datapath))
        return key

    def detach(self, dbg, sr):
        sr_path(sr)         # a malformed key is an error; otherwise nothing to release
        return None

    def destroy(self, dbg, sr):
        path = sr_path(sr)
        with _open_store(path, sr) as store:
            rec = _read_sr_record(store)
            if rec is None:
                raise SR_does_not_exist(sr)
            with store.lock(SR_LOCK) as lock:
                rec = _read_sr_record(store)
                if rec is None:         # a concurrent SR.destroy finished first
                    store.unlink(SR_LOCK)       # which this call may have just re-made
                    raise SR_does_not_exist(sr)
                marked = rec.get("state") == "destroying"
                if not marked:
                    marked = _mark_sr_destroying(store, rec)
                faultpoint("sr-destroy:marked")
                names = store.names()
                keys = {n[:-5] for n in names if n.endswith(".json") and is_uuid(n[:-5])}
                for key in sorted(keys):
                    if marked:
                        _remove_volume_files(store, key)
                    else:       # a ready SR: each volume goes as Volume.destroy does it
                        status, vrec, _ = _load(store, key)
                        _destroy_volume(store, key, status, vrec)
                    faultpoint("sr-destroy:volume-gone")
                if not marked:  # no SR left behind that is ready but has no lock file
                    store.unlink(SR_RECORD)
                    store.fsync_dir()
                for n in names:
                    if n.startswith(".tmp.") or (n.endswith(LOCK_SUFFIX) and is_uuid(n[:-5])):
                        store.unlink(n)
                    elif n.endswith(".img") and is_uuid(n[:-4]) and n[:-4] not in keys:
                        _log(30, f"{path}/{n}: data file without a record left in place")
                store.unlink(SR_META + LOCK_SUFFIX)
                store.unlink(SR_LOCK)
                faultpoint("sr-destroy:locks-gone")
                store.unlink(SR_RECORD)
                store.fsync_dir()
                lock.release()
        return None

    def stat(self, dbg, sr):
        store, rec = _ready_store(sr)
        with store:
            return _sr_stat(sr, store.path, rec)

    def set_name(self, dbg, sr, new_name):
        _want_str("new_name", new_name)
        with _Attached(sr) as (store, _):
            _update_sr_record(store, lambda r: r.__setitem__("name", new_name))

    def set_description(self, dbg, sr, new_description):
        _want_str("new_description", new_description)
        with _Attached(sr) as (store, _):
            _update_sr_record(store, lambda r: r.__setitem__("description", new_description))

    def ls(self, dbg, sr):
        with _Attached(sr) as (store, srrec):
            return _list_volumes(store, srrec)


def _mark_sr_destroying(store, rec):
    """Rewrite sr.json `destroying` (only SR.destroy accepts it then); False if the SR is too
    full to write it (ENOSPC/EDQUOT): SR.destroy then removes the volumes one by one as
    Volume.destroy does (the first freed makes room) and sr.json before the lock files."""
    try:
        store.write(SR_RECORD, dict(rec, state="destroying"), owner=SR_META)
        return True
    except OSError as e:
        if not is_enospc(e):
            raise
        _log(30, f"{store.path}: no space to mark the SR destroying ({e}): "
             "its volumes are removed one by one")
        return False


def _check_creatable(store, uuid):
    """The SR record if `store` already holds this SR (a retry), None if the directory is free
    for a new SR, else the error that says why not."""
    rec = _read_sr_record(store)
    if rec is not None:
        if rec.get("uuid") != uuid or rec.get("state") != "ready":
            raise XenAPIError("SR_BACKEND_FAILURE", [
                "SR already exists", store.path, str(rec.get("uuid")), str(rec.get("state"))])
        return rec
    ours = (SR_LOCK, SR_META + LOCK_SUFFIX)
    if any(n not in ours and not n.startswith(f".tmp.{SR_META}.") for n in store.names()):
        raise XenAPIError("SR_BACKEND_FAILURE", [
            "Directory not empty", store.path, "SR.create needs an empty or missing directory"])
    return None


def _create_sr(path, uuid, name, description, datapath):
    with Store(path) as store:
        if _check_creatable(store, uuid) is not None:     # a retry: the SR is there
            store.lock(SR_LOCK, exclusive=False).release()  # (makes a lost sr.lock again)
            return
        with store.lock(SR_LOCK):
            if _check_creatable(store, uuid) is None:
                names = store.names()
                for n in names:         # temporaries of a killed SR.create
                    if n.startswith(f".tmp.{SR_META}."):
                        store.unlink(n)
                faultpoint("sr-create:checked")
                rec = {"format": SR_FORMAT, "version": SR_FORMAT_VERSION, "state": "ready",
                       "uuid": uuid, "name": name, "description": description,
                       "datapath": list(datapath or DEFAULT_DATAPATH)}
                try:
                    store.write(SR_RECORD, rec, owner=SR_META)
                except BaseException:
                    # no SR was made (a full filesystem, say): leave the directory as empty
                    # as it was (the lock is unlinked held, as SR.destroy does)
                    store.unlink(SR_META + LOCK_SUFFIX)
                    store.unlink(SR_LOCK)
                    raise


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _undo_mkdir(path):
    """Remove the directory a failed SR.create made, unless a concurrent SR.create (that found
    the directory made) has put its SR, or anything else, in it meanwhile."""
    try:
        store = Store(path)
        store.dfd
    except OSError:
        return
    with store:
        with store.lock(SR_LOCK):
            try:
                if _read_sr_record(store) is not None:
                    return
            except Exception:       # noqa: BLE001 - an SR record of another version: keep it
                return
            ours = (SR_LOCK, SR_META + LOCK_SUFFIX)
            if any(n not in ours for n in store.names()):
                return
            for n in ours:
                store.unlink(n)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _probe_dir(path):
    """What is at `path`: an SR record (dict), or "missing", "noparent", "notdir", "empty",
    "other"."""
    try:
        store = Store(path)
        store.dfd
    except FileNotFoundError:
        return "missing" if os.path.isdir(os.path.dirname(path)) else "noparent"
    except NotADirectoryError:
        return "notdir"
    with store:
        rec = _read_sr_record(store)
        if rec is not None:
            return rec
        names = store.names()
        ours = (SR_LOCK, SR_META + LOCK_SUFFIX)
        if all(n in ours or n.startswith(".tmp.") for n in names):
            return "empty"
        return "other"


def _probe_sr(config, path, rec):
    config = dict(config, sr_uuid=str(rec.get("uuid")))
    return {"configuration": config, "complete": True,
            "sr": _sr_stat(sr_key(path), path, rec), "extra_info": {}}


def _list_volumes(store, srrec):
    """Every ready volume. Also finishes removing what killed calls left behind (a record not
    ready, a lock or temporary file without a record, stale temporary files), for each key
    whose lock is free: a held lock means a call on that key is still running."""
    path = store.path
    datapath = srrec.get("datapath", DEFAULT_DATAPATH)
    names = store.names()
    present = set(names)
    qpath = quote_path(path)
    result, listed, unsettled = [], set(), set()
    for n in names:
        if n.endswith(".json"):
            key = n[:-5]
            if not is_uuid(key):
                continue
            status, rec, why = _load(store, key)
            if status == READY:
                result.append(_volume(path, datapath, rec, store.stat(_img(key)), qpath))
                listed.add(key)
            elif status == FOREIGN:
                result.append(_foreign_volume(key, rec, why, store.stat(_img(key))))
                listed.add(key)
            elif status == UNFINISHED:
                unsettled.add(key)
        elif n.endswith(LOCK_SUFFIX) and is_uuid(n[:-5]) and (n[:-5] + ".json") not in present:
            unsettled.add(n[:-5])
    tmps = store.temporaries(names)
    unsettled.update(k for k in tmps if is_uuid(k))
    for key in sorted(unsettled):
        try:
            lock = _lock_volume(store, key, blocking=False)
            if lock is None:
                continue                                # a call on it is running
            with lock:
                status, rec, why = _settle(store, key)
                if key not in listed:                   # finished since we listed
                    if status == READY:
                        result.append(_volume(path, datapath, rec, store.stat(_img(key))))
                    elif status == FOREIGN:
                        result.append(_foreign_volume(key, rec, why, store.stat(_img(key))))
                for t in tmps.get(key, ()):
                    store.unlink(t)
        except OSError as e:
            # e.g. a symlink or a directory planted under one of our names: never followed,
            # never removed; it must not make the whole listing (xapi's SR.scan) fail
            _log(40, f"{path}: volume {key}: cannot clean up: {e}; left in place")
    if SR_META in tmps:
        lock = store.lock(SR_META + LOCK_SUFFIX, blocking=False)
        if lock is not None:
            with lock:
                for t in tmps[SR_META]:
                    store.unlink(t)
    return result


@_os_errors
class Volume(base.Volume):
    def create(self, dbg, sr, name, description, size, sharable):
        _want_str("name", name)
        _want_str("description", description)
        size = _want_size("size", size)
        _want_bool("sharable", sharable)
        with _Attached(sr) as (store, srrec):
            key = new_uuid()
            with store.lock(key + LOCK_SUFFIX):
                rec = _new_record(key, name, description, True, sharable)
                _write_new_record(store, key, rec)
                try:
                    faultpoint("create:pending")
                    fd = store.open(_img(key), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.ftruncate(fd, size)
                        os.fsync(fd)
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
                    store.fsync_dir()
                    faultpoint("create:data")
                    rec["state"] = "ready"
                    store.write(_rec(key), rec, owner=key)
                    faultpoint("create:ready")
                except BaseException as e:
                    _remove_volume_files(store, key)
                    if isinstance(e, OSError) and e.errno == errno.EFBIG:
                        raise _size_error(f"size {size} is too large for this filesystem") \
                            from None
                    raise
            return _volume(store.path, srrec.get("datapath", DEFAULT_DATAPATH), rec, st)

    def snapshot(self, dbg, sr, key):
        return _copy_volume(sr, key, read_write=False)

    def clone(self, dbg, sr, key):
        return _copy_volume(sr, key, read_write=True)

    def destroy(self, dbg, sr, key):
        _volume_key(key)
        with _Attached(sr) as (store, _):
            with _lock_volume(store, key):
                status, rec, _ = _load(store, key)
                if status == MISSING:           # already gone: destroy is idempotent
                    store.unlink(key + LOCK_SUFFIX)
                    return None
                # whatever the record (even one this plugin does not understand): the
                # caller named this volume
                _destroy_volume(store, key, status, rec)
        return None

    def stat(self, dbg, sr, key):
        _volume_key(key)
        store, srrec = _ready_store(sr)
        with store:
            status, rec, why = _load(store, key)
            if status == FOREIGN:
                return _foreign_volume(key, rec, why, store.stat(_img(key)))
            if status != READY:
                raise Volume_does_not_exist(key)
            st = store.stat(_img(key))
            if not _usable(st):
                # no URI then (see _volume): VDI.destroy, which stats first, still works
                what = ("missing" if st is None else "not a regular file" if not
                        S_ISREG(st.st_mode) else f"hard-linked ({st.st_nlink} names)")
                _log(40, f"{store.path}/{_img(key)} is {what}: reported without URIs")
            return _volume(store.path, srrec.get("datapath", DEFAULT_DATAPATH), rec, st)

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

    def resize(self, dbg, sr, key, new_size):
        _volume_key(key)
        size = _want_size("new_size", new_size)
        with _Attached(sr) as (store, _):
            with _VolumeLocks(store, [key]) as records:
                rec = _require(records, key)
                if not rec["read_write"]:
                    raise XenAPIError("SR_BACKEND_FAILURE", [
                        "Volume is read-only", key, "a snapshot cannot be resized"])
                fd = _open_data(store, key, os.O_RDWR)
                try:
                    current = os.fstat(fd).st_size
                    if size < current:
                        raise _size_error("shrinking not allowed")
                    if size > current:
                        try:
                            os.ftruncate(fd, size)
                        except OSError as e:
                            if e.errno == errno.EFBIG:
                                raise _size_error(
                                    f"size {size} is too large for this filesystem") from None
                            raise
                        os.fsync(fd)
                finally:
                    os.close(fd)
                if size > current:
                    _grown(f"{store.path}/{_img(key)}")
        return None

    def revert(self, dbg, sr, snapshot, key):
        _volume_key(snapshot)
        _volume_key(key)
        if snapshot == key:
            raise _argument_error("snapshot", "a volume cannot be reverted to itself")
        with _Attached(sr) as (store, _):
            with _VolumeLocks(store, [snapshot, key]) as records:
                _require(records, snapshot)
                rec = _require(records, key)
                if not rec["read_write"]:
                    raise XenAPIError("SR_BACKEND_FAILURE", [
                        "Volume is read-only", key, "a snapshot cannot be reverted"])
                # Copy the snapshot beside the volume, then rename it over the volume's data:
                # a crash leaves either the old or the new data, plus at most a temporary file.
                tmp = f".tmp.{key}.{os.urandom(8).hex()}"
                src = _open_data(store, snapshot, os.O_RDONLY)
                try:
                    dst = store.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        _copy_data(src, dst)
                        os.fsync(dst)
                    finally:
                        os.close(dst)
                    faultpoint("revert:copied")
                    os.rename(tmp, _img(key), src_dir_fd=store.dfd, dst_dir_fd=store.dfd)
                    store.fsync_dir()
                except BaseException:
                    store.unlink(tmp)
                    raise
                finally:
                    os.close(src)
        return None


def _copy_data(src, dst):
    from .datacopy import clone_or_copy
    started = [False]

    def progress(_pos):
        if not started[0]:
            started[0] = True
            faultpoint("copy:started")
    return clone_or_copy(src, dst, progress=progress)


def _update_volume(sr, key, change):
    _volume_key(key)
    with _Attached(sr) as (store, _):
        with _VolumeLocks(store, [key]) as records:
            rec = _require(records, key)
            new = dict(rec, keys=dict(rec["keys"]))
            change(new)
            if new != rec:
                store.write(_rec(key), new, owner=key)
    return None


class _Closing:
    """`with _Closing(fd)`: the file descriptor is closed at the end of the block."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self.fd

    def __exit__(self, *exc):
        os.close(self.fd)


def _copy_volume(sr, key, read_write):
    """Snapshot (read_write=False) or clone (True) of `key` into a new volume."""
    _volume_key(key)
    kind = "clone" if read_write else "snapshot"
    with _Attached(sr) as (store, srrec):
        with _VolumeLocks(store, [key]) as records:
            src_rec = _require(records, key)
            new = new_uuid()
            src = _open_data(store, key, os.O_RDONLY)
            with _Closing(src), store.lock(new + LOCK_SUFFIX):
                rec = _new_record(new, src_rec["name"], src_rec["description"], read_write,
                                  src_rec["sharable"], origin={"kind": kind, "of": key})
                _write_new_record(store, new, rec)
                try:
                    faultpoint(f"{kind}:pending")
                    dst = store.open(_img(new), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        rec["copied_by"] = _copy_data(src, dst)
                        if not read_write:
                            os.fchmod(dst, 0o400)
                        os.fsync(dst)
                        st = os.fstat(dst)
                    finally:
                        os.close(dst)
                    store.fsync_dir()
                    faultpoint(f"{kind}:data")
                    rec["state"] = "ready"
                    store.write(_rec(new), rec, owner=new)
                    faultpoint(f"{kind}:ready")
                except BaseException:
                    _remove_volume_files(store, new)
                    raise
            return _volume(store.path, srrec.get("datapath", DEFAULT_DATAPATH), rec, st)


IMPLEMENTATIONS = {"Plugin": Plugin, "SR": SR, "Volume": Volume}
