"""The `blkback` datapath: a volume served to guests by the Linux kernel's xen-blkback.

URI: `blkback://<percent-encoded absolute path>` (file-raw writes `blkback:///srv/sr/<key>.img`).

* attach: a block device (an LV, later) is used as it is; a regular file gets a loop device
  (`losetup --direct-io=on` where the filesystem takes O_DIRECT, buffered otherwise; read-only
  when the file cannot be opened for writing), found again on a later call instead of
  duplicated. The result is `XenDisk{backend_type: "vbd", params: <dev>, extra: {}}` +
  `BlockDevice{path: <dev>}`: xenopsd writes <dev> as the backend's `params`, udev's `block`
  script its major:minor as `physical-device`, and the kernel's blkback opens it. Never `File`.
* activate_readonly makes the loop device read-only (`blockdev --setro`) and activate makes it
  writable again (the lifecycle never lets both kinds coexist); deactivate flushes the backing
  file (fsync), so that what the guest wrote is on disk when its I/O ends.
* Every call re-reads the backing file's size and runs `losetup -c` when it changed: the
  kernel's blkback then tells the guest (online resize). `refresh(path)` does the same for a
  volume plugin that has just grown the file (file-raw's Volume.resize calls it).
* detach of the last domain: `losetup -d`. A loop device is only ever released if its backing
  file is still the volume's.

Lifecycle, state and crash safety: `xapi_storage.datapath.lifecycle`.
"""

import errno
import os
import stat
import time

from ..sdk import log
from ..volume.store import unquote_path
from .lifecycle import Lifecycle, datapath_error, plugin_class

SCHEME = "blkback"
COMMAND_TIMEOUT = 60
AUTOCLEAR_WAIT = 5.0


def _run(argv, uri):
    """Run a command (bounded); its stdout, or a structured error with its stderr."""
    import subprocess   # here, not at the top: most calls run no command (start-up time)
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    except OSError as e:
        raise datapath_error("Datapath_command_failed", uri,
                             f"{argv[0]}: {e.strerror}") from None
    try:
        out, err = p.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise datapath_error("Datapath_command_failed", uri,
                             f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT} s") from None
    if p.returncode != 0:
        raise datapath_error("Datapath_command_failed", uri,
                             f"{' '.join(argv)}: exit {p.returncode}: {err.strip()}")
    return out


def path_of(uri, scheme=SCHEME):
    """The absolute path a `<scheme>:///<path>` URI names (percent-decoded)."""
    # parsed by hand, not with urllib.parse (whose imports cost more than the rest of a
    # datapath call's start-up): no authority, no query, no fragment, as urlsplit would say
    prefix = scheme + "://"
    if (not isinstance(uri, str) or not uri.startswith(prefix)
            or not uri[len(prefix):].startswith("/") or "?" in uri or "#" in uri):
        raise datapath_error("Datapath_invalid_uri", uri,
                             f"expected {scheme}:///<absolute path> (percent-encoded)")
    path = unquote_path(uri[len(prefix):])
    if not path or not path.startswith("/") or "\0" in path:
        raise datapath_error("Datapath_invalid_uri", uri,
                             f"expected {scheme}:///<absolute path> (percent-encoded)")
    return path


def stat_volume(uri, path):
    """os.stat of the volume's path, or Datapath_volume_missing."""
    try:
        return os.stat(path)
    except OSError as e:
        raise datapath_error("Datapath_volume_missing", uri, f"{path}: {e.strerror}") from None


# --- loop devices --------------------------------------------------------------------------------

def _sys(dev, *names):
    p = os.path.join("/sys/block", os.path.basename(dev), *names)
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError:
        return None


def loops_of(path):
    """The loop devices whose backing file is `path` (same file: device and inode)."""
    try:
        want = os.stat(path)
    except OSError:
        want = None
    real = os.path.realpath(path)
    out = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for n in names:
        if not n.startswith("loop"):
            continue
        backing = _sys(n, "loop", "backing_file")
        if not backing:
            continue
        if backing == real or (want is not None and _same_file(backing, want)):
            out.append("/dev/" + n)
    return out


def _same_file(p, st):
    try:
        s = os.stat(p)
    except OSError:
        return False
    return (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)


def loop_size(dev):
    s = _sys(dev, "size")
    return int(s) * 512 if s and s.isdigit() else None


def refresh(path, uri=None):
    """`losetup -c` every loop device of `path` whose size is not the file's any more, so the
    kernel's blkback sees the new size and tells the guest. Returns the devices refreshed."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return []
    done = []
    for dev in loops_of(path):
        if loop_size(dev) != size - size % 512:
            _run(["losetup", "-c", dev], uri or path)
            done.append(dev)
            log.info("%s: capacity refreshed to %d bytes", dev, size)
    return done


def _writable(path):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ETXTBSY):
            return False
        raise
    os.close(fd)
    return True


def attach_loop(path, uri):
    """A loop device for `path`: an existing one, or a new one (direct I/O if possible)."""
    found = loops_of(path)
    if found:
        refresh(path, uri)
        return found[0], True
    ro = [] if _writable(path) else ["--read-only"]
    try:
        dev = _run(["losetup", "--find", "--show", "--direct-io=on"] + ro + ["--", path], uri)
    except Exception:  # noqa: BLE001 - e.g. an old losetup or a filesystem refusing O_DIRECT
        again = loops_of(path)
        if again:
            return again[0], False
        dev = _run(["losetup", "--find", "--show"] + ro + ["--", path], uri)
    return dev.strip(), False


# --- the datapath --------------------------------------------------------------------------------

class Datapath(Lifecycle):
    SCHEME = SCHEME

    def validate(self, uri):
        path_of(uri)

    def setup(self, uri, readonly=False):
        path = path_of(uri)
        st = stat_volume(uri, path)
        if stat.S_ISBLK(st.st_mode):
            return {"dev": path, "loop": False, "path": path}
        if not stat.S_ISREG(st.st_mode):
            raise datapath_error("Datapath_volume_unusable", uri,
                                 f"{path} is neither a block device nor a regular file")
        dev, reused = attach_loop(path, uri)
        log.info("%s: %s loop device %s (direct I/O %s)", uri, "found" if reused else "made",
                 dev, _sys(dev, "loop", "dio") or "?")
        return {"dev": dev, "loop": True, "path": path}

    def backend(self, uri, domain, resources):
        dev = resources["dev"]
        if resources.get("loop"):
            refresh(resources["path"], uri)
        return {"implementations": [
            ["XenDisk", {"backend_type": "vbd", "params": dev, "extra": {}}],
            ["BlockDevice", {"path": dev}],
        ]}

    def activate_hook(self, uri, domain, resources, readonly):
        if not resources.get("loop"):
            return
        dev = resources["dev"]
        refresh(resources["path"], uri)
        if not readonly and not _writable(resources["path"]):
            raise datapath_error("Datapath_read_only", uri,
                                 f"{resources['path']} cannot be written on this host "
                                 "(read-only file or filesystem): use a read-only attach")
        _run(["blockdev", "--setro" if readonly else "--setrw", dev], uri)

    def deactivate_hook(self, uri, domain, resources):
        if not resources or not resources.get("path"):
            return
        try:
            fd = os.open(resources["path"], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def teardown(self, uri, resources):
        if resources is not None and not resources.get("loop"):
            return                                   # a block device: nothing was acquired
        path = resources["path"] if resources else path_of(uri)
        mine = loops_of(path)
        if resources is not None and resources["dev"] not in mine:
            mine = []            # the device was released already (or reused for another file)
        for dev in mine:
            _run(["losetup", "-d", dev], uri)
            log.info("%s: released %s", uri, dev)
        # a loop device still open (the kernel's blkback lets go of it when its backend
        # directory is removed, a moment after a hard unplug) is only marked autoclear by
        # losetup -d, and goes at its last close: give that a few seconds
        end = time.monotonic() + AUTOCLEAR_WAIT
        while True:
            left = [d for d in loops_of(path) if d in mine]
            if not left or time.monotonic() >= end:
                break
            time.sleep(0.1)
        stuck = [d for d in left if _sys(d, "loop", "autoclear") != "1"]
        if stuck:
            raise datapath_error("Datapath_cleanup_failed", uri,
                                 f"loop device(s) {', '.join(stuck)} still attached to {path}")
        if left:
            log.warning("%s: %s still open by someone; it goes at its last close (autoclear)",
                        uri, ", ".join(left))


Plugin = plugin_class(SCHEME, "The Linux kernel's xen-blkback; a loop device for a file "
                      "volume, the block device itself otherwise", features=[])

IMPLEMENTATIONS = {"Plugin": Plugin, "Datapath": Datapath}
