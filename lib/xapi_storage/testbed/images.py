"""Build (or reuse) the test bed's images, cached by a hash of the builder's inputs.

Two stages, each cached under ~/.cache/xapi-storage/testbed/ (or $XAPI_STORAGE_TESTBED_CACHE):

  rootfs-<key1>.tar.zst   debootstrap of packages.txt            key1 = inputs of build-rootfs.sh
  <key2>/                 xen, vmlinuz, initrd.img, dom0.img,    key2 = key1 + build-images.sh,
                          packages.lock, MANIFEST.json                  the init scripts, the agent

A cache entry is used only if its MANIFEST.json is there and every file in it has the recorded
size (and, for the small ones, the recorded sha256); otherwise it is rebuilt. Builds take a lock
so that two test sessions never build the same key at once. Nothing here depends on our own code
outside this directory: changing the package's Python code never rebuilds an image.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

DATA = Path(__file__).resolve().parent / "bed-data"  # not an importable name: data only
FORMAT = 1  # bump to invalidate every cache entry
SUITE = "bookworm"
APT_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")
ROOTFS_INPUTS = ("build-rootfs.sh", "packages.txt")
IMAGE_INPUTS = ("build-images.sh", "dom0-init.sh", "dom0-agent.py", "guest-init.sh")
ARTEFACTS = ("xen", "vmlinuz", "initrd.img", "dom0.img", "packages.lock")
HASHED_MAX = 64 << 20  # artefacts up to this size are checked by sha256, larger ones by size


class BuildError(RuntimeError):
    """The image build failed; the message says which step and where its log is."""


def cache_root():
    env = os.environ.get("XAPI_STORAGE_TESTBED_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "xapi-storage" / "testbed"


def mirror():
    """The Debian mirror to build from: $XAPI_STORAGE_TESTBED_MIRROR, else the one this host's
    apt is configured with for SUITE (so the build goes where `apt-get` already goes)."""
    env = os.environ.get("XAPI_STORAGE_TESTBED_MIRROR")
    if env:
        return env
    found = host_apt_mirror()
    if found is None:
        raise BuildError(f"no Debian mirror for {SUITE} in this host's apt sources "
                         f"({', '.join(APT_SOURCES)}): set XAPI_STORAGE_TESTBED_MIRROR")
    return found


def host_apt_mirror(paths=APT_SOURCES, suite=SUITE):
    """The first URI that serves `suite` itself (not -updates or -security) with component
    main, from one-line (`deb URI SUITE COMPONENTS`) and deb822 (.sources) apt files."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, n) for n in os.listdir(p)
                            if n.endswith((".list", ".sources")))
        elif os.path.isfile(p):
            files.append(p)
    for f in files:
        try:
            text = open(f, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        if f.endswith(".sources"):
            for para in text.split("\n\n"):
                fields = {}
                for line in para.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.split()
                if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                        and "main" in fields.get("components", []) and fields.get("uris")
                        and fields.get("enabled", ["yes"]) != ["no"]):
                    return fields["uris"][0].rstrip("/")
        else:
            for line in text.splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite \
                        and "main" in words[3:]:
                    return words[1].rstrip("/")
    return None


def _hash_files(h, names):
    for name in names:
        data = (DATA / name).read_bytes()
        h.update(b"%s\0%d\0" % (name.encode(), len(data)))
        h.update(data)


def rootfs_key():
    h = hashlib.sha256(b"xapi-storage testbed rootfs %d %s\0" % (FORMAT, SUITE.encode()))
    h.update(mirror().encode() + b"\0")
    _hash_files(h, ROOTFS_INPUTS)
    return h.hexdigest()[:16]


def image_key():
    h = hashlib.sha256(b"xapi-storage testbed images %d\0" % FORMAT)
    h.update(rootfs_key().encode() + b"\0")
    _hash_files(h, IMAGE_INPUTS)
    return h.hexdigest()[:16]


class Images:
    """The paths of one built set of images."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.key = self.dir.name
        self.xen = self.dir / "xen"
        self.vmlinuz = self.dir / "vmlinuz"
        self.initrd = self.dir / "initrd.img"
        self.dom0_img = self.dir / "dom0.img"
        self.packages_lock = self.dir / "packages.lock"

    def __repr__(self):
        return "Images(%r)" % str(self.dir)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(directory):
    files = {}
    for name in ARTEFACTS:
        p = directory / name
        size = p.stat().st_size
        files[name] = {"size": size, "sha256": _sha256(p) if size <= HASHED_MAX else None}
    manifest = {"format": FORMAT, "key": directory.name, "files": files, "built": time.time()}
    tmp = directory / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(directory / "MANIFEST.json")


def check_cached(directory):
    """None if `directory` holds a complete, intact build; else why not (a string)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return "no cached build"
    except ValueError as e:
        return "corrupt MANIFEST.json (%s)" % e
    if manifest.get("format") != FORMAT or set(manifest.get("files", {})) != set(ARTEFACTS):
        return "MANIFEST.json of another format"
    for name, want in manifest["files"].items():
        p = directory / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return "%s is missing" % name
        if size != want["size"]:
            return "%s has %d bytes, expected %d" % (name, size, want["size"])
        if want.get("sha256") and _sha256(p) != want["sha256"]:
            return "%s does not match its sha256" % name
    return None


@contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_logged(argv, log_path, what, timeout):
    with open(log_path, "ab") as log:
        log.write(("\n$ %s\n" % " ".join(map(str, argv))).encode())
        log.flush()
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise BuildError("%s took more than %ds; log: %s" % (what, timeout, log_path))
    if rc != 0:
        tail = Path(log_path).read_text(errors="replace").splitlines()[-25:]
        raise BuildError("%s failed (exit %d); log: %s\n%s" % (what, rc, log_path, "\n".join(tail)))


def _say(msg, quiet):
    if not quiet:
        print("testbed: %s" % msg, file=sys.stderr, flush=True)


def ensure_images(rebuild=False, quiet=False, timeout=1800):
    """Return the Images for the current inputs, building them if needed (needs root then)."""
    root = cache_root()
    key = image_key()
    target = root / key
    with _locked(root / (key + ".lock")):
        why = "rebuild asked" if rebuild else check_cached(target)
        if why is None:
            _say("images %s (cached)" % target, quiet)
            return Images(target)
        if os.geteuid() != 0:
            raise BuildError("building the test bed images needs root (debootstrap, chroot); "
                             "reason to build: %s" % why)
        _say("building images %s: %s" % (target, why), quiet)
        t0 = time.monotonic()
        log_path = root / (key + ".build.log")
        log_path.write_text("")
        rootfs = root / ("rootfs-%s.tar.zst" % rootfs_key())
        with _locked(root / ("rootfs-%s.lock" % rootfs_key())):
            if rebuild or not rootfs.exists():
                _say("debootstrap from %s (about 2-5 minutes)" % mirror(), quiet)
                _run_logged(["bash", str(DATA / "build-rootfs.sh"), rootfs, DATA / "packages.txt",
                             mirror(), SUITE, root / "debs"], log_path, "build-rootfs.sh",
                            timeout)
        tmp = root / (".%s.tmp-%d" % (key, os.getpid()))
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _run_logged(["bash", str(DATA / "build-images.sh"), rootfs, DATA, tmp], log_path,
                        "build-images.sh", timeout)
            _write_manifest(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say("built images %s in %.0fs (log %s)" % (target, time.monotonic() - t0, log_path),
             quiet)
        _prune(root, keep={key, "rootfs-%s" % rootfs_key()})
        return Images(target)


def _prune(root, keep):
    """Drop stale builds of other keys, with their locks and logs, once they are an hour old
    (a cache keeps one image set and one rootfs; `debs` and `runs` stay)."""
    for p in root.iterdir():
        stem = p.name.split(".")[0] if not p.name.startswith(".") else p.name
        if stem in keep or p.name in ("debs", "runs"):
            continue
        if time.time() - p.stat().st_mtime < 3600:
            continue  # maybe in use by another session building or booting another key
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
