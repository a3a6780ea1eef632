"""A crash-safe store of records and files in one directory, for file-based volume plugins.

The store knows nothing about SMAPIv3: it gives a directory (an SR) small JSON records written
atomically and durably, flock-based locks that are safe to delete, and a way to tell a record
whose writer died from one that is still being written. `file_raw` builds the SR and Volume
semantics on it; `nfs-raw` can reuse it unchanged on an NFS mount (flock is emulated with POSIX
locks there, so every lock file is opened read-write).

Durability: a record is written to a temporary file in the same directory, fsynced, then
renamed (or linked, for an exclusive create) over its name, and the directory is fsynced. A
reader therefore sees either the old or the new record, never a torn one, and after a crash the
new one only if the call returned.

Locks: `lock(name)` opens `name` (creating it) and flocks it, then checks that the directory
entry still names the locked inode. A lock file may thus be unlinked by its holder at any time
(e.g. when a volume is destroyed): a waiter that wakes up on the unlinked inode notices and
retries or gives up. Locks die with their process, which is how a record left half-written by
a killed call is recognised: its lock can be taken.

Temporary files are named `.tmp.<owner>.<random>`; the owner (a volume key, or `sr`) is the
name of the lock its writer holds, so a stale temporary file is one whose owner's lock is free.
"""

import errno
import fcntl
import os
import time
from stat import S_ISDIR, S_ISREG

from ..sdk import jsonio     # strict JSON without importing `json` (start-up time)
from ..sdk import log

TMP_PREFIX = ".tmp."
LOCK_SUFFIX = ".lock"

_HEX = frozenset("0123456789abcdef")
_DASHES = (8, 13, 18, 23)

# --- fault injection -----------------------------------------------------------------------------
# Tests set XAPI_STORAGE_FAULT=<point> to have the process SIGKILL itself at that point, which is
# how "a call killed at any point" is tested deterministically. Unset, this costs one comparison.
# XAPI_STORAGE_FAULT=<point>#<n> dies at the n-th time the point is reached (default: the first).
_FAULT = os.environ.get("XAPI_STORAGE_FAULT") or None
if _FAULT is not None:
    _FAULT_NAME, _, _n = _FAULT.partition("#")
    _FAULT_LEFT = [int(_n) if _n else 1]


def faultpoint(name):
    """Die here (SIGKILL, no clean-up of any kind) if the environment asks for it."""
    if _FAULT is not None and _FAULT_NAME == name:
        _FAULT_LEFT[0] -= 1
        if _FAULT_LEFT[0] == 0:
            os.kill(os.getpid(), 9)


# --- keys ----------------------------------------------------------------------------------------

def is_uuid(key):
    """True for a canonical lower-case 8-4-4-4-12 uuid string, and nothing else.

    Volume keys are checked with this before they are ever used to build a file name, so a key
    cannot contain '/', '..', NUL or anything else that could leave the SR directory.
    """
    return (type(key) is str and len(key) == 36
            and key[8] == key[13] == key[18] == key[23] == "-" and key.count("-") == 4
            and _HEX.issuperset(key.replace("-", "")))


_SAFE_NAME = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def is_safe_name(text, max_len=100):
    """True for 1..max_len ASCII letters, digits, '-', '_', '.', starting with a letter or a
    digit: usable as a file name, a mount point and an LVM VG name (SR uuids)."""
    return (type(text) is str and 0 < len(text) <= max_len and _SAFE_NAME.issuperset(text)
            and text[0] not in "-_.")


def new_uuid():
    """A random (version 4) uuid string, without importing the uuid module (start-up time)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- percent-encoding of paths inside URIs and SR keys -------------------------------------------

_SAFE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/"
_SAFE = frozenset(_SAFE_CHARS.encode())
_SAFE_STR = frozenset(_SAFE_CHARS)


def quote_path(path):
    """Percent-encode every byte of `path` outside [A-Za-z0-9-._~/] (upper-case hex)."""
    if _SAFE_STR.issuperset(path):
        return path
    out = []
    for byte in os.fsencode(path):
        out.append(chr(byte) if byte in _SAFE else f"%{byte:02X}")
    return "".join(out)


def unquote_path(text):
    """Inverse of quote_path, or None if `text` is not exactly what quote_path produces."""
    if type(text) is not str:
        return None
    raw = bytearray()
    i, n = 0, len(text)
    try:
        while i < n:
            c = text[i]
            if c == "%":
                h = text[i + 1:i + 3]
                if len(h) != 2 or h.upper() != h:
                    return None
                raw.append(int(h, 16))
                i += 3
            else:
                if ord(c) > 127:
                    return None
                raw.append(ord(c))
                i += 1
    except ValueError:
        return None
    path = os.fsdecode(bytes(raw))
    return path if quote_path(path) == text else None


# --- the store -----------------------------------------------------------------------------------

class NotRegularFile(ValueError):
    """An entry of the store is not the regular file it should be (someone else put it there)."""


class LockTimeout(Exception):
    """A lock could not be had within its bound (see `lock_wait_limits`)."""


# --- bounded lock waits --------------------------------------------------------------------------
# The toolstack's daemon has no timeout of its own, so no lock wait may be endless. Two bounds:
#
# * STOPPED_WAIT (5 s): the holders of the lock, as the kernel lists them in /proc/locks, are all
#   stopped (SIGSTOP, ^Z) or traced, and stay so for this long. A stopped process makes no
#   progress until someone resumes it, which may be never; 5 s lets a brief stop (a debugger
#   step, ^Z then bg) pass.
# * MAX_WAIT (6 h, $XAPI_STORAGE_LOCK_WAIT seconds): any holder, running or not. A lock is
#   legitimately held for a long time by a copy (a snapshot or clone of a 2 TiB volume without
#   reflinks is about 3 h at 200 MB/s), and a waiter behind it must not fail early; this bound
#   only catches what the first cannot see: a holder on another host (NFS), in another pid
#   namespace, or stuck in the kernel on dead storage.
STOPPED_WAIT = 5.0
DEFAULT_MAX_WAIT = 6 * 3600.0


def lock_wait_limits():
    """(stopped_wait, max_wait) in seconds; max_wait from $XAPI_STORAGE_LOCK_WAIT if set."""
    text = os.environ.get("XAPI_STORAGE_LOCK_WAIT")
    try:
        max_wait = float(text) if text else DEFAULT_MAX_WAIT
    except ValueError:
        max_wait = DEFAULT_MAX_WAIT
    if not max_wait > 0:
        max_wait = DEFAULT_MAX_WAIT
    return min(STOPPED_WAIT, max_wait), max_wait


def parse_proc_locks(text, dev, ino):
    """The pids holding (not waiting for) a lock on inode `ino` of device `dev`, from the text
    of /proc/locks ("1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->")."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    pids = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        if fields[5] == want and fields[4].isdigit() and fields[4] != "0":
            pids.add(int(fields[4]))
    return pids


def _proc_state(pid):
    """The one-letter state of process `pid` (R, S, D, T, t, ...), or None if not visible."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:][:1].decode()
    except (OSError, ValueError):
        return None


def lock_holders(fd):
    """{pid: state} of the processes (other than this one) holding a lock on `fd`'s inode."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return {}
    me = os.getpid()
    return {pid: _proc_state(pid) for pid in parse_proc_locks(text, st.st_dev, st.st_ino)
            if pid != me}


def flock_bounded(fd, op, what):
    """flock(fd, op) (op without LOCK_NB), waiting at most as `lock_wait_limits` says;
    LockTimeout (naming `what` and the holders) when a bound expires."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    stopped_wait, max_wait = lock_wait_limits()
    start = time.monotonic()
    stopped_since = None
    pause = 0.01
    while True:
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        holders = lock_holders(fd)
        if holders and all(s in ("T", "t") for s in holders.values()):
            stopped_since = now if stopped_since is None else stopped_since
            if now - stopped_since >= stopped_wait:
                raise LockTimeout(
                    f"{what} is held by stopped process(es) {_pids(holders)}: gave up after "
                    f"{now - start:.0f} s (a stopped holder is waited for {stopped_wait:g} s)")
        else:
            stopped_since = None
        if now - start >= max_wait:
            raise LockTimeout(
                f"{what} is still held after {max_wait:g} s"
                + (f" by process(es) {_pids(holders)}" if holders else
                   " by a process not visible here (another host or pid namespace)")
                + " (bound: $XAPI_STORAGE_LOCK_WAIT)")


def _pids(holders):
    return ", ".join(f"{pid} (state {state or '?'})" for pid, state in sorted(holders.items()))


class Lock:
    """A held flock on a file of the store; release() (or the with block) closes it."""

    __slots__ = ("fd", "name")

    def __init__(self, fd, name):
        self.fd = fd
        self.name = name

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class Store:
    """One directory holding records (`<name>` JSON files), data files and lock files.

    Every file operation is relative to a directory file descriptor opened once (O_DIRECTORY),
    so a rename of the directory's path cannot redirect half a call elsewhere, and O_NOFOLLOW
    keeps a symlink planted in the directory from being followed.
    """

    def __init__(self, path):
        self.path = path
        self._dfd = None

    # directory ------------------------------------------------------------------------------
    @property
    def dfd(self):
        if self._dfd is None:
            self._dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._dfd

    def close(self):
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fsync_dir(self):
        os.fsync(self.dfd)

    def names(self):
        """The directory's entry names (one readdir pass; listdir takes a directory fd on
        every Python, scandir only from 3.7)."""
        return os.listdir(self.dfd)

    def stat(self, name):
        """lstat of an entry, or None if it does not exist."""
        try:
            return os.stat(name, dir_fd=self.dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name):
        return self.stat(name) is not None

    def unlink(self, name):
        """Remove an entry; True if it was there and is gone. A directory under one of our
        names was put there by someone else and may hold anything: it is never removed, only
        logged (False). Any other failure (EPERM of an immutable file, EROFS) is raised."""
        try:
            os.unlink(name, dir_fd=self.dfd)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.EPERM):
                raise
            st = self.stat(name)
            if st is None or not S_ISDIR(st.st_mode):
                raise
            log.warning("%s/%s: a directory, not one of our files: left in place",
                        self.path, name)
            return False

    def open(self, name, flags, mode=0o600):
        return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=self.dfd)

    # records --------------------------------------------------------------------------------
    def open_regular(self, name, flags):
        """Open the regular file `name`. A symlink, directory, FIFO or device put there by
        someone else is neither followed nor waited on: NotRegularFile (O_NOFOLLOW, O_NONBLOCK,
        then fstat; the descriptor is made blocking again). An open refused with EAGAIN is a
        file server's lease (Samba oplock, NFS delegation) being broken, a wait that must be
        had: that open is retried blocking. FileNotFoundError if there is nothing."""
        try:
            try:
                fd = self.open(name, flags | os.O_NONBLOCK)
            except BlockingIOError:
                fd = self.open(name, flags)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise NotRegularFile(f"{self.path}/{name} is not a regular file") from None
            raise
        try:
            if not S_ISREG(os.fstat(fd).st_mode):
                raise NotRegularFile(f"{self.path}/{name} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name):
        """The JSON record `name`, or None if it does not exist. ValueError if it is not a
        regular file holding JSON (see open_regular)."""
        try:
            fd = self.open_regular(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, 65536)
            if len(data) == 65536:      # rare: a record with many keys
                chunks = [data]
                while data:
                    data = os.read(fd, 65536)
                    chunks.append(data)
                data = b"".join(chunks)
        finally:
            os.close(fd)
        return jsonio.loads(data.decode("utf-8"))

    def write(self, name, record, owner, exclusive=False):
        """Atomically and durably replace (or, if exclusive, create) the record `name`.

        `owner` names the lock the caller holds (the temporary file is tagged with it).
        With exclusive=True, FileExistsError if `name` already exists (nothing is left behind).
        """
        data = jsonio.dumps(record).encode("ascii")
        tmp = f"{TMP_PREFIX}{owner}.{os.urandom(8).hex()}"
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            faultpoint("store:tmp-written")
            if exclusive:
                os.link(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd,
                        follow_symlinks=False)
                os.unlink(tmp, dir_fd=self.dfd)
            else:
                os.rename(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        except BaseException:
            self.unlink(tmp)
            raise
        self.fsync_dir()

    # locks ----------------------------------------------------------------------------------
    def lock(self, name, exclusive=True, blocking=True, create=True, repair=None):
        """flock the file `name` (created if missing and `create`).

        Returns a Lock, or None if `name` does not exist (create=False), or if not `blocking`
        and another process holds a conflicting lock. A blocking wait is bounded
        (`flock_bounded`: LockTimeout).

        Entries planted under the lock's name never wedge it: a directory is locked itself
        (flock works on a directory), and a symlink, FIFO, socket or device node is removed
        (never followed nor opened as such) and the lock file made anew; `repair`, if given,
        is a callable returning a held Lock that serialises such removals, so that two callers
        can never remove each other's fresh lock file. On a read-only filesystem an existing
        lock file is opened read-only (flock does not need write access).
        """
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fd = self._open_lock(name, flags)
            except FileNotFoundError:
                return None
            except NotRegularFile:
                self._remove_planted(name, repair)
                if not create:
                    return None
                continue
            try:
                if blocking:
                    flock_bounded(fd, op, f"{self.path}/{name}")
                else:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                held = os.fstat(fd)
                now = self.stat(name)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and now.st_ino == held.st_ino and now.st_dev == held.st_dev:
                return Lock(fd, name)
            # The holder before us unlinked the file: our lock is on a dead inode.
            os.close(fd)
            if not create:
                return None

    def _open_lock(self, name, flags):
        """A descriptor to flock for `name`: the regular file (made if flags say O_CREAT), or
        the directory planted there. NotRegularFile for anything else."""
        try:
            fd = self.open(name, flags | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.EISDIR:
                return self.open(name, os.O_RDONLY | os.O_DIRECTORY)
            if e.errno in (errno.ELOOP, errno.ENXIO):
                raise NotRegularFile(f"{self.path}/{name} is not a regular file") from None
            if e.errno == errno.EROFS:
                # read-only filesystem: an existing file can still be locked
                try:
                    fd = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
                except FileNotFoundError:
                    raise e from None
            else:
                raise
        try:
            mode = os.fstat(fd).st_mode
        except BaseException:
            os.close(fd)
            raise
        if S_ISREG(mode) or S_ISDIR(mode):
            return fd
        os.close(fd)
        raise NotRegularFile(f"{self.path}/{name} is not a regular file")

    def _remove_planted(self, name, repair):
        """Remove the symlink, FIFO, socket or device node under the lock name `name`."""
        guard = repair() if repair is not None else None
        try:
            st = self.stat(name)
            if st is not None and not S_ISREG(st.st_mode) and not S_ISDIR(st.st_mode):
                log.warning("%s/%s: not a lock file (mode %o): removed", self.path, name,
                            st.st_mode)
                self.unlink(name)
        finally:
            if guard is not None:
                guard.release()

    def temporaries(self, names=None):
        """{owner: [temporary file names]} for the temporary files in the directory."""
        owners = {}
        for n in self.names() if names is None else names:
            if n.startswith(TMP_PREFIX):
                owner = n[len(TMP_PREFIX):].rsplit(".", 1)[0]
                owners.setdefault(owner, []).append(n)
        return owners


def is_enospc(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
