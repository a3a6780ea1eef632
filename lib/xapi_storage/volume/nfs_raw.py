"""The `nfs-raw` volume plugin: the file-raw SR (a directory of sparse raw files and records)
on an NFS export, mounted by the plugin.

See docs/nfs-raw.md. In short: the SR with uuid U lives in the directory `<serverpath>/U` of
the export; `SR.attach` mounts `<server>:<serverpath>/U` (hard, by default) on
`/run/sr-mount/U` and every other call works on that directory through file_raw, unchanged.
Every call that reads the SR first checks that this mount is there: an SR whose storage is not
mounted is an error (and `SR.stat` reports it `Unreachable`), never an empty SR.

The mount layer's logic is pure (mount_argv, parse_mountinfo, ...); the few calls that touch
the system go through command.run, with time limits.
"""

import functools
import os
import re

from ..sdk import base, log
from ..sdk.errors import SR_does_not_exist, XenAPIError
from . import file_raw
from .command import CommandTimeout, run
from .store import is_safe_name, new_uuid

PLUGIN = "nfs-raw"
MOUNT_ROOT_ENV = "XAPI_STORAGE_SR_MOUNT_ROOT"
DEFAULT_MOUNT_ROOT = "/run/sr-mount"
DEFAULT_OPTIONS = ("hard", "proto=tcp", "timeo=600", "retrans=2")
VERSIONS = ("3", "4", "4.0", "4.1", "4.2")
MOUNT_TIMEOUT = 60.0
STAT_TIMEOUT = 10.0

CONFIGURATION = {
    "server": "NFS server: a host name or an IPv4 address (IPv6 in brackets)",
    "serverpath": "the exported directory on the server; the SR lives in <serverpath>/<sr uuid>",
    "nfsversion": "optional: 3, 4, 4.0, 4.1 or 4.2 (default: what mount.nfs negotiates)",
    "options": "optional: extra comma-separated mount options, after the defaults "
               "hard,proto=tcp,timeo=600,retrans=2 (a later option wins, so 'soft' is "
               "possible: then a server outage becomes guest I/O errors)",
    "datapath": file_raw.CONFIGURATION["datapath"],
    "sr_uuid": "set by SR.create: the SR's uuid (the directory on the export, the mount point)",
}

_HOST = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*"
                   r"|\[[0-9A-Fa-f:.]+\])\Z")
_EXPORT = re.compile(r"\A/[A-Za-z0-9_.+=@,/-]*\Z")
_OPTION = re.compile(r"\A[A-Za-z0-9_.-]+(?:=[A-Za-z0-9_.:/-]+)?\Z")


def _log(level, msg):
    log.emit(level, "%s", msg)


def mount_root():
    return os.environ.get(MOUNT_ROOT_ENV) or DEFAULT_MOUNT_ROOT


# --- configuration (pure) ------------------------------------------------------------------------

def parse_config(configuration):
    """(server, serverpath, [mount options]) from device-config; a structured error for
    anything that could not be given to mount safely."""
    config = file_raw._config(configuration)
    server = config.get("server")
    if not server or not _HOST.match(server):
        raise file_raw._config_error("server", f"{server!r}: expected a host name or an "
                                     "address")
    path = config.get("serverpath")
    if not path or not _EXPORT.match(path) or "/../" in path + "/" or "/./" in path + "/":
        raise file_raw._config_error("serverpath", f"{path!r}: expected an absolute path on "
                                     "the server, without '..'")
    path = "/" + path.strip("/") if path != "/" else "/"
    options = list(DEFAULT_OPTIONS)
    version = config.get("nfsversion")
    if version is not None:
        if version not in VERSIONS:
            raise file_raw._config_error("nfsversion", f"{version!r}: expected one of "
                                         f"{', '.join(VERSIONS)}")
        options.append(f"vers={version}")
    extra = config.get("options")
    if extra:
        for opt in extra.split(","):
            if not _OPTION.match(opt):
                raise file_raw._config_error("options", f"{opt!r} is not a mount option")
            options.append(opt)
    file_raw._config_datapath(config)
    return server, path, options


def sr_source(server, serverpath, uuid):
    return f"{server}:{serverpath.rstrip('/')}/{uuid}"


def mount_argv(source, mountpoint, options):
    return ["mount", "-t", "nfs", "-o", ",".join(options), source, mountpoint]


def _unescape(field):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text):
    """[(mount point, fstype, source)] from /proc/self/mountinfo, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append((_unescape(fields[4]), tail[0], _unescape(tail[1])))
    return mounts


def mount_at(mountinfo_text, mountpoint):
    """(fstype, source) of the topmost mount at `mountpoint`, or None."""
    found = None
    for point, fstype, source in parse_mountinfo(mountinfo_text):
        if point == mountpoint:
            found = (fstype, source)
    return found


# --- the mount layer (touches the system) --------------------------------------------------------

def _mountinfo():
    with open("/proc/self/mountinfo") as f:
        return f.read()


def sr_mountpoint(uuid):
    return f"{mount_root()}/{uuid}"


def _mounted(mountpoint):
    found = mount_at(_mountinfo(), mountpoint)
    return found if found is not None and found[0] in ("nfs", "nfs4") else None


def _mount_error(what, source, why):
    return XenAPIError("SR_BACKEND_FAILURE", ["NFS mount failed", what, source, why])


def _mount(source, mountpoint, options):
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    try:
        r = run(mount_argv(source, mountpoint, options), timeout=MOUNT_TIMEOUT)
    except CommandTimeout:
        _rmdir(mountpoint)
        raise _mount_error("mount", source, f"no answer from the server within "
                           f"{MOUNT_TIMEOUT:g} s") from None
    except FileNotFoundError:
        _rmdir(mountpoint)
        raise _mount_error("mount", source, "mount is not installed") from None
    if r.rc != 0:
        _rmdir(mountpoint)
        raise _mount_error("mount", source, r.stderr.strip() or f"exit {r.rc}")


def _rmdir(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


def _holders(mountpoint, proc="/proc"):
    """What holds a mount busy: every process whose working directory, root, executable or
    an open file is on it (what `fuser -vm` reports, read from /proc directly, so that no
    extra package is needed), as "pid N (command): cwd, fd 3" items."""
    inside = mountpoint.rstrip("/") + "/"
    found = []
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return ""
    for pid in pids:
        base = f"{proc}/{pid}"
        uses = []
        links = [("cwd", "cwd"), ("root", "root"), ("exe", "exe")]
        try:
            links += [(f"fd/{fd}", f"fd {fd}") for fd in sorted(os.listdir(base + "/fd"),
                                                                 key=lambda x: int(x))]
        except (OSError, ValueError):
            pass
        for link, what in links:
            try:
                target = os.readlink(f"{base}/{link}")
            except OSError:
                continue
            if target == mountpoint or target.startswith(inside):
                uses.append(what)
        if uses:
            try:
                with open(base + "/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append(f"pid {pid} ({comm}): {', '.join(uses)}")
    return "; ".join(found)


def _umount(mountpoint):
    """Unmount (idempotent) and remove the mount point. Busy: an error naming the holders."""
    if _mounted(mountpoint) is not None:
        try:
            r = run(["umount", mountpoint], timeout=MOUNT_TIMEOUT)
        except CommandTimeout:
            raise XenAPIError("SR_BACKEND_FAILURE", [
                "NFS unmount failed", mountpoint, "umount did not finish within "
                f"{MOUNT_TIMEOUT:g} s (server not answering?)"]) from None
        if r.rc != 0 and _mounted(mountpoint) is not None:
            why = r.stderr.strip() or f"exit {r.rc}"
            if "busy" in why.lower():
                why += "; held by: " + (_holders(mountpoint) or "no process (a bind mount, "
                                        "an NFS export or a loop device on it?)")
            raise XenAPIError("SR_BACKEND_FAILURE", ["NFS unmount failed", mountpoint, why])
    _rmdir(mountpoint)


class _TempMount:
    """`with _TempMount(source, options) as path`: the export mounted on a private
    directory under the mount root, unmounted (lazily if it must) at the end."""

    def __init__(self, source, options):
        self.source, self.options = source, options
        self.path = f"{mount_root()}/.tmp-{new_uuid()}"

    def __enter__(self):
        _mount(self.source, self.path, self.options)
        return self.path

    def __exit__(self, *exc):
        try:
            _umount(self.path)
        except XenAPIError:
            run(["umount", "-l", self.path], timeout=MOUNT_TIMEOUT)
            _rmdir(self.path)


def _key_mountpoint(sr):
    """The mount point of an nfs-raw SR key; SR_does_not_exist for any other key."""
    path = file_raw.sr_path(sr)
    root = mount_root()
    head, uuid = os.path.split(path)
    if head != root or not uuid or uuid.startswith("."):
        raise SR_does_not_exist(sr)
    return path


def _not_mounted(sr, mountpoint):
    return XenAPIError("SR_BACKEND_FAILURE", [
        "SR storage is not mounted", sr, f"no NFS mount at {mountpoint}: SR.attach mounts it "
        "(an unmounted SR is never read as an empty one)"])


def require_mounted(sr):
    mountpoint = _key_mountpoint(sr)
    if _mounted(mountpoint) is None:
        raise _not_mounted(sr, mountpoint)
    return mountpoint


def check_sr_uuid(uuid):
    if not is_safe_name(uuid):
        raise file_raw._argument_error("uuid", f"{uuid!r}: an SR uuid here is made of "
                                       "letters, digits, '-', '_' and '.' (it names the "
                                       "SR's directory and mount point)")
    return uuid


def _needs_mount(fn):
    """Wrap a file_raw method taking (dbg, sr, ...): refuse before it reads an unmounted SR."""
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        require_mounted(kwargs["sr"] if "sr" in kwargs else args[1])
        return fn(self, *args, **kwargs)
    return method


# --- the interfaces ------------------------------------------------------------------------------

class Plugin(base.Plugin):
    def query(self, dbg):
        return base.query_result(PLUGIN, "nfs-raw volume plugin",
                                 "SRs are directories on an NFS export; volumes are sparse raw files",
                                 file_raw.FEATURES, CONFIGURATION)

    def diagnostics(self, dbg):
        from .. import __version__
        mounts = [m for m in parse_mountinfo(_mountinfo())
                  if m[0].startswith(mount_root() + "/")]
        return (f"nfs-raw {__version__}; mounts under {mount_root()}: "
                + ("; ".join(f"{s} on {p} ({t})" for p, t, s in mounts) or "none"))


class SR(file_raw.SR):
    def probe(self, dbg, configuration):
        config = file_raw._config(configuration)
        if "serverpath" not in config:
            return _list_exports(config)
        server, path, options = parse_config(config)
        base_config = {k: v for k, v in config.items() if k != "sr_uuid"}
        results = []
        with _TempMount(f"{server}:{path}", options) as tmp:
            with os.scandir(tmp) as it:
                names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
            for name in names[:1000]:
                found = file_raw._probe_dir(f"{tmp}/{name}")
                if type(found) is dict and found.get("state") == "ready" \
                        and found.get("uuid") == name:
                    # an SR found carries its stat (xe sr-probe lists it as an existing SR),
                    # with the `sr` key SR.attach will answer for it
                    results.append({"configuration": dict(base_config, sr_uuid=name),
                                    "complete": True, "extra_info": {},
                                    "sr": file_raw._sr_stat(
                                        file_raw.sr_key(sr_mountpoint(name)), f"{tmp}/{name}",
                                        found)})
        results.append({"configuration": base_config, "complete": True,
                        "extra_info": {"reason": "the export is reachable: SR.create makes "
                                       "a new SR in <serverpath>/<sr uuid>"}})
        return results

    def create(self, dbg, uuid, configuration, name, description):
        file_raw._want_str("uuid", uuid)
        check_sr_uuid(uuid)
        server, path, options = parse_config(configuration)
        if configuration.get("sr_uuid", uuid) != uuid:
            raise file_raw._config_error("sr_uuid", f"{configuration['sr_uuid']} differs "
                                         f"from the uuid {uuid} given to SR.create")
        with _TempMount(f"{server}:{path}", options) as tmp:
            file_raw.SR().create(dbg, uuid, dict(_file_config(configuration),
                                                 path=f"{tmp}/{uuid}", sr_uuid=uuid),
                                 name, description)
        result = dict(configuration)
        result["sr_uuid"] = uuid
        return result

    def attach(self, dbg, configuration):
        server, path, options = parse_config(configuration)
        uuid = configuration.get("sr_uuid")
        if uuid is None:
            raise file_raw._config_error("sr_uuid", "missing: attach the configuration "
                                         "SR.create returned")
        check_sr_uuid(uuid)
        mountpoint = sr_mountpoint(uuid)
        source = sr_source(server, path, uuid)
        found = _mounted(mountpoint)
        made = False
        if found is None:
            _mount(source, mountpoint, options)
            made = True
        elif found[1] != source:
            raise XenAPIError("SR_BACKEND_FAILURE", [
                "SR mount point in use", mountpoint, f"{found[1]} is mounted there, not "
                f"{source}"])
        try:
            return file_raw.SR().attach(dbg, dict(_file_config(configuration),
                                                  path=mountpoint, sr_uuid=uuid))
        except BaseException:
            if made:
                _umount(mountpoint)
            raise

    def detach(self, dbg, sr):
        _umount(_key_mountpoint(sr))

    def destroy(self, dbg, sr):
        mountpoint = require_mounted(sr)
        source = _mounted(mountpoint)[1]
        file_raw.SR().destroy(dbg, sr)
        _umount(mountpoint)
        # the SR's directory on the export: removed through a mount of its parent
        parent, _, uuid = source.rpartition("/")
        if parent.endswith(":"):
            parent += "/"           # the SR was in the export's root directory
        options = _mount_options_of(mountpoint)
        with _TempMount(parent, options) as tmp:
            try:
                os.rmdir(f"{tmp}/{uuid}")
            except OSError as e:
                _log(30, f"{source}: SR directory left in place: {e.strerror}")

    def stat(self, dbg, sr):
        mountpoint = _key_mountpoint(sr)
        why = None
        if _mounted(mountpoint) is None:
            why = f"no NFS mount at {mountpoint}"
        else:
            try:
                r = run(["stat", "-f", mountpoint], timeout=STAT_TIMEOUT)
                if r.rc != 0:
                    why = r.stderr.strip()
            except CommandTimeout:
                why = f"the NFS server did not answer within {STAT_TIMEOUT:g} s"
        if why is not None:
            return {"sr": sr, "name": "", "description": "", "free_space": 0,
                    "total_space": 0, "datasources": [], "clustered": False,
                    "health": ["Unreachable", why]}
        return file_raw.SR.stat(self, dbg, sr)


for _name in ("set_name", "set_description", "ls"):
    setattr(SR, _name, _needs_mount(getattr(file_raw.SR, _name)))


class Volume(file_raw.Volume):
    pass


for _name in ("create", "snapshot", "clone", "destroy", "stat", "set", "unset", "set_name",
              "set_description", "resize", "revert"):
    setattr(Volume, _name, _needs_mount(getattr(file_raw.Volume, _name)))


def _file_config(configuration):
    return {k: v for k, v in configuration.items() if k == "datapath"}


def _mount_options_of(mountpoint):
    """The options to mount the parent export as the SR was: our defaults plus vers."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and _unescape(parts[1]) == mountpoint:
                vers = [o for o in parts[3].split(",") if o.startswith("vers=")]
                return list(DEFAULT_OPTIONS) + vers
    return list(DEFAULT_OPTIONS)


def _list_exports(config):
    server = config.get("server")
    if not server or not _HOST.match(server):
        raise file_raw._config_error("server", f"{server!r}: expected a host name or an "
                                     "address")
    try:
        r = run(["showmount", "-e", "--no-headers", server], timeout=MOUNT_TIMEOUT)
    except (OSError, CommandTimeout) as e:
        raise _mount_error("showmount", server, str(e)) from None
    if r.rc != 0:
        raise _mount_error("showmount", server, (r.stderr.strip() or f"exit {r.rc}")
                           + " (an NFSv4-only server has no export list: give serverpath)")
    results = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("/"):
            results.append({"configuration": dict(config, serverpath=parts[0]),
                            "complete": False,
                            "extra_info": {"reason": "an export: probe again with this "
                                           "serverpath for its SRs", "clients": " ".join(
                                               parts[1:])}})
    return results


IMPLEMENTATIONS = {"Plugin": Plugin, "SR": SR, "Volume": Volume}
