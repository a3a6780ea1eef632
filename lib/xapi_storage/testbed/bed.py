"""The test bed runner: Xen + a Debian dom0 under QEMU, and PV guests inside it.

    from xapi_storage.testbed import TestBed, ensure_images
    with TestBed(ensure_images(), checkout="/path/to/checkout") as bed:
        bed.boot()
        rc, out, err = bed.dom0("xl info", timeout=30)
        bed.start_guest("g1", disks=["format=raw,vdev=xvdd,backendtype=qdisk,target=/root/q.img"])
        rc, out, err = bed.guest("g1", "cat /proc/partitions", timeout=30)

How it is wired:
  * QEMU (TCG, -cpu qemu64,+svm) multiboots Xen, which boots dom0 (Debian kernel) from dom0.img
    with snapshot=on: the cached image is never modified.
  * Serial (Xen console and dom0's hvc0) -> <run dir>/serial.log.
  * A virtio-serial port "testbed.ctl" carries one JSON object a line between this process and
    dom0-agent.py (QEMU connects to a unix socket this process listens on).
  * 9p shares: the checkout, read-only, at dom0:/mnt/checkout; the run directory, read-write, at
    dom0:/mnt/bed (put()/get() and log collection go through it).
  * Guests are reached through their PV console by the dom0 agent (see dom0-agent.py).

Lifetime: QEMU runs in its own process group with PR_SET_PDEATHSIG=SIGKILL (it dies with the
thread that booted it), a lifetime timer, an atexit hook and a finalizer; shutdown() is idempotent.
"""

import atexit
import base64
import ctypes
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import NamedTuple

from ..compat import monotonic_ns

QEMU = "qemu-system-x86_64"
GUEST_KERNEL = "/var/lib/testbed/guest/vmlinuz"
GUEST_INITRD = "/var/lib/testbed/guest/initrd.gz"
DOM0_VENV = "/opt/xapi-storage/venv"
DOM0_SRC = "/root/src"
PR_SET_PDEATHSIG = 1


class TestBedError(RuntimeError):
    """Something in the test bed (not in the code under test) went wrong."""


class BootError(TestBedError):
    """QEMU, Xen or dom0 did not come up in time; the message has the end of the serial log."""


class CommandTimeout(TestBedError):
    """A command in dom0 or a guest ran out of time (it was killed). .result has its output."""

    def __init__(self, msg, result=None):
        super().__init__(msg)
        self.result = result


class CommandFailed(TestBedError):
    """A command run with check=True exited non-zero. .result has rc, stdout, stderr."""

    def __init__(self, msg, result):
        super().__init__(msg)
        self.result = result


class Result(NamedTuple):
    """What a command returned: unpack as `rc, out, err = bed.dom0(...)`."""
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self):
        return self.rc == 0


def _decode(b64):
    return base64.b64decode(b64 or "").decode("utf-8", errors="replace")


def _set_pdeathsig():
    # runs in the child between fork and exec: die with the parent thread, whatever kills it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def qemu_binary():
    return shutil.which(QEMU)


def unavailable_reason(images_cached=None):
    """Why QEMU cannot run the bed here at all (a string), or None when it can."""
    if not qemu_binary():
        return "%s is not installed (run scripts/setup-testbed.sh as root)" % QEMU
    if os.geteuid() != 0 and not images_cached:
        return "not root, and no cached images: building them needs root (debootstrap, chroot)"
    return None


class _Channel:
    """The host end of the agent's JSON-lines channel."""

    def __init__(self, sock, transcript):
        self.sock = sock
        self.transcript = transcript
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.replies = {}
        self.events = []
        self.closed = False
        threading.Thread(target=self._reader, daemon=True, name="testbed-ctl").start()

    def _reader(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                with self.cond:
                    if "event" in msg:
                        self.events.append(msg)
                    else:
                        self.replies[msg.get("id")] = msg
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_event(self, name, timeout, alive=lambda: True):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, ev in enumerate(self.events):
                    if ev["event"] == name:
                        return self.events.pop(i)
                left = deadline - time.monotonic()
                if left <= 0 or self.closed or not alive():
                    return None
                self.cond.wait(min(left, 1.0))

    def request(self, op, wait, **fields):
        """Send one request; wait up to `wait` seconds for its reply."""
        rid = next(self.ids)
        msg = dict(fields, id=rid, op=op)
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            self.sock.sendall(data)
        deadline = time.monotonic() + wait
        with self.cond:
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if self.closed:
                    raise TestBedError("dom0 agent connection closed during %r" % op)
                if left <= 0:
                    raise CommandTimeout("no answer from the dom0 agent to %r in %.0fs" %
                                         (op, wait))
                self.cond.wait(min(left, 1.0))
            reply = self.replies.pop(rid)
        if "error" in reply and reply.get("ok") is None and "rc" not in reply:
            raise TestBedError("dom0 agent: %s failed: %s" % (op, reply["error"]))
        return reply


class Background:
    """A process running in dom0 (bed.spawn); stop() it to get its exit status and output."""

    def __init__(self, bed, handle, pid, desc):
        self.bed, self.handle, self.pid, self.desc = bed, handle, pid, desc
        self.result = None

    def poll(self):
        """Its exit status, or None while it runs."""
        if self.result is not None:
            return self.result.rc
        return self.bed._chan.request("poll", 30, handle=self.handle)["rc"]

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Signal its process group (unless it has exited), wait, return Result (output tails)."""
        if self.result is None:
            r = self.bed._chan.request("stop", timeout + 30, handle=self.handle, signal=int(sig),
                                       timeout=timeout)
            self.result = Result(r["rc"], _decode(r["out"]), _decode(r["err"]))
            self.bed._note("stopped %s: rc %s" % (self.handle, r["rc"]))
        return self.result

    def __repr__(self):
        return "<Background %s pid %s in dom0: %s>" % (self.handle, self.pid, self.desc)


class Guest:
    """A PV guest started by bed.start_guest(); commands run in its busybox initramfs."""

    def __init__(self, bed, name, domid, config):
        self.bed, self.name, self.domid, self.config = bed, name, domid, config

    def run(self, cmd, timeout=60, check=False):
        return self.bed.guest(self.name, cmd, timeout=timeout, check=check)

    def stop(self):
        self.bed.stop_guest(self.name)

    def __repr__(self):
        return "<Guest %s domid %s>" % (self.name, self.domid)


class TestBed:
    """One boot of the test bed. Use as a context manager, or call shutdown() yourself."""

    __test__ = False  # not a pytest test class

    def __init__(self, images, checkout=None, run_dir=None, memory_mb=3072, dom0_mem_mb=1536,
                 cpus=2, scratch_gb=8, boot_timeout=300, lifetime=3 * 3600, qemu=None,
                 accel="tcg,thread=multi", cpu="qemu64,+svm"):
        self.images = images
        self.checkout = Path(checkout).resolve() if checkout else None
        if run_dir is None:
            run_dir = default_run_dir(self.checkout)
        self.run_dir = Path(run_dir)
        self.memory_mb, self.dom0_mem_mb, self.cpus = memory_mb, dom0_mem_mb, cpus
        self.scratch_gb = scratch_gb
        self.boot_timeout, self.lifetime = boot_timeout, lifetime
        self.qemu = qemu or qemu_binary()
        self.accel, self.cpu = accel, cpu
        self.proc = None
        self._chan = None
        self._sock_dir = None
        self._timer = None
        self.guests = {}
        self.timings = {}
        self._lock = threading.Lock()
        self._finalizer = None

    # ---- lifecycle --------------------------------------------------------------------------

    def qemu_argv(self):
        """The QEMU command line (also useful by hand: see docs/testing.md)."""
        im = self.images
        xen_args = ("console=com1 com1=115200,8n1 dom0_mem={m}M,max:{m}M dom0_max_vcpus={c} "
                    "loglvl=all guest_loglvl=all noreboot console_timestamps=boot"
                    ).format(m=self.dom0_mem_mb, c=self.cpus)
        dom0_args = ("root=/dev/vda rw console=hvc0 earlyprintk=xen "
                     "init=/usr/local/sbin/testbed-init")
        for p in (im.xen, im.vmlinuz, im.initrd):
            if "," in str(p):
                raise TestBedError("QEMU's multiboot -initrd cannot take a path with a comma: %s"
                                   % p)
        argv = [self.qemu, "-accel", self.accel, "-cpu", self.cpu,
                "-m", str(self.memory_mb), "-smp", str(self.cpus),
                "-nodefaults", "-nic", "none", "-display", "none", "-no-reboot",
                "-chardev", "file,id=ser0,path=%s" % (self.run_dir / "serial.log"),
                "-serial", "chardev:ser0",
                "-kernel", str(im.xen), "-append", xen_args,
                "-initrd", "%s %s,%s" % (im.vmlinuz, dom0_args, im.initrd),
                "-drive", "file=%s,if=virtio,format=raw,cache=unsafe,snapshot=on" % im.dom0_img,
                "-drive", "file=%s,if=virtio,format=raw,cache=unsafe"
                % (self.run_dir / "scratch.img"),
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", "socket,id=ctl,path=%s" % self._sock_path,
                "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=testbed.ctl",
                "-virtfs", "local,path=%s,mount_tag=bed,security_model=passthrough,id=bed"
                % self.run_dir]
        if self.checkout:
            argv += ["-virtfs", "local,path=%s,mount_tag=checkout,security_model=none,"
                     "readonly=on,id=checkout" % self.checkout]
        return argv

    def boot(self):
        """Start QEMU and wait (boot_timeout) until dom0's agent answers. Returns self."""
        if self.proc is not None:
            raise TestBedError("this TestBed is already booted")
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        (self.run_dir / "xfer").mkdir(exist_ok=True)
        scratch = self.run_dir / "scratch.img"
        if not scratch.exists():
            with open(scratch, "wb") as f:
                f.truncate(self.scratch_gb << 30)
        # the socket path must stay short (108 bytes): keep it out of the run directory
        self._sock_dir = tempfile.mkdtemp(prefix="xs-tb-")
        self._sock_path = os.path.join(self._sock_dir, "ctl.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._sock_path)
        listener.listen(1)
        listener.settimeout(1.0)
        argv = self.qemu_argv()
        self._transcript = open(self.run_dir / "commands.log", "a", buffering=1)
        self._note("qemu: %s" % " ".join(shlex.quote(a) for a in argv))
        qemu_log = open(self.run_dir / "qemu.log", "wb")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_set_pdeathsig)
        finally:
            qemu_log.close()
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        atexit.register(self._finalizer)
        self._timer = threading.Timer(self.lifetime, self._expire)
        self._timer.daemon = True
        self._timer.start()
        try:
            conn = None
            while conn is None:
                if self.proc.poll() is not None:
                    raise BootError("QEMU exited at once (rc %s): %s" %
                                    (self.proc.returncode, self._tail("qemu.log")))
                if time.monotonic() - t0 > 30:
                    raise BootError("QEMU did not connect its control socket in 30s")
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    pass
            conn.settimeout(None)
            self._chan = _Channel(conn, self._transcript)
            ready = self._chan.wait_event("ready", self.boot_timeout,
                                          alive=lambda: self.proc.poll() is None)
            if ready is None:
                try:  # (poll() says None while the lifetime timer's thread waits for QEMU)
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                state = ("QEMU exited (rc %s)" % self.proc.returncode
                         if self.proc.returncode is not None else
                         "no answer from dom0's agent in %ds" % self.boot_timeout)
                raise BootError("the test bed did not boot: %s; run dir %s; end of serial log:"
                                "\n%s" % (state, self.run_dir, self._tail("serial.log", 40)))
        except BaseException:
            self.shutdown(graceful=False)
            raise
        finally:
            listener.close()
        self.timings["boot"] = round(time.monotonic() - t0, 1)
        self.timings["dom0_uptime_at_ready"] = ready.get("uptime")
        self._note("dom0 agent ready after %.1fs (dom0 uptime %ss)" %
                   (self.timings["boot"], ready.get("uptime")))
        return self

    def _expire(self):
        self._note("lifetime of %ds reached: killing QEMU" % self.lifetime)
        _kill_group(self.proc)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def shutdown(self, graceful=True, timeout=20):
        """Power dom0 off (graceful) and make sure QEMU is gone. Safe to call twice."""
        with self._lock:
            if self.proc is None:
                return
            if graceful and self.alive() and self._chan and not self._chan.closed:
                try:
                    self._chan.request("poweroff", 10)
                    self.proc.wait(timeout)
                except (TestBedError, subprocess.TimeoutExpired, OSError):
                    pass
            _kill_group(self.proc)
            if self._timer:
                self._timer.cancel()
            if self._finalizer:
                self._finalizer.detach()
                atexit.unregister(self._finalizer)
            if self._chan:
                try:
                    self._chan.sock.close()
                except OSError:
                    pass
            if self._sock_dir:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._note("shut down (QEMU rc %s)" % self.proc.returncode)
            if getattr(self, "_transcript", None):
                self._transcript.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- dom0 ---------------------------------------------------------------------------------

    def _note(self, text):
        tr = getattr(self, "_transcript", None)
        if tr and not tr.closed:
            tr.write("%s %s\n" % (time.strftime("%H:%M:%S"), text))

    def _tail(self, name, lines=25):
        try:
            text = (self.run_dir / name).read_text(errors="replace")
        except OSError:
            return "(no %s)" % name
        return "\n".join(text.splitlines()[-lines:])

    def _require(self):
        if self._chan is None:
            raise TestBedError("the test bed is not booted (call boot())")
        if not self.alive():
            raise TestBedError("QEMU is not running any more (rc %s); see %s" %
                               (self.proc.returncode, self.run_dir / "serial.log"))

    @staticmethod
    def _cmd_fields(cmd):
        return {"argv": list(cmd)} if isinstance(cmd, (list, tuple)) else {"sh": cmd}

    def dom0(self, cmd, timeout=60, input=None, check=False, env=None, cwd=None):
        """Run cmd in dom0 (a list: argv; a string: /bin/sh -c) as root. Returns Result.

        On timeout the process group is killed and CommandTimeout raised (with .result)."""
        self._require()
        fields = self._cmd_fields(cmd)
        if input is not None:
            data = input.encode() if isinstance(input, str) else bytes(input)
            fields["input"] = base64.b64encode(data).decode()
        r = self._chan.request("run", timeout + 30, timeout=timeout, env=env, cwd=cwd, **fields)
        res = Result(r["rc"], _decode(r["out"]), _decode(r["err"]))
        self._note("dom0 %r -> rc %s in %ss%s" % (cmd, res.rc, r.get("secs"),
                                                  " (TIMEOUT)" if r.get("timed_out") else ""))
        if r.get("timed_out"):
            raise CommandTimeout("dom0 command %r took more than %ss (killed)\nstdout: %s\n"
                                 "stderr: %s" % (cmd, timeout, res.stdout[-2000:],
                                                 res.stderr[-2000:]), res)
        if check and res.rc != 0:
            raise CommandFailed("dom0 command %r failed with rc %s\nstdout: %s\nstderr: %s" %
                                (cmd, res.rc, res.stdout[-2000:], res.stderr[-2000:]), res)
        return res

    def spawn(self, cmd, name=None, env=None, cwd=None):
        """Start cmd in dom0 in the background (own process group). Returns Background."""
        self._require()
        r = self._chan.request("spawn", 60, name=name, env=env, cwd=cwd, **self._cmd_fields(cmd))
        self._note("spawned %s pid %s: %r" % (r["handle"], r["pid"], cmd))
        return Background(self, r["handle"], r["pid"], cmd)

    def put(self, local, remote, mode=None):
        """Copy a host file into dom0 (through the 9p run directory)."""
        name = "put-%d-%s" % (monotonic_ns(), Path(local).name)
        shutil.copyfile(local, self.run_dir / "xfer" / name)
        try:
            argv = ["install", "-D"] + (["-m", "%o" % mode] if mode is not None else []) + \
                   ["/mnt/bed/xfer/" + name, remote]
            self.dom0(argv, timeout=120, check=True)
        finally:
            (self.run_dir / "xfer" / name).unlink()

    def write_file(self, remote, data, mode=None):
        """Write bytes or str to a file in dom0."""
        fd, tmp = tempfile.mkstemp(dir=self.run_dir / "xfer")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        try:
            self.put(tmp, remote, mode)
        finally:
            os.unlink(tmp)

    def get(self, remote, local):
        """Copy a file from dom0 to the host."""
        name = "get-%d" % monotonic_ns()
        self.dom0(["cp", remote, "/mnt/bed/xfer/" + name], timeout=120, check=True)
        shutil.move(str(self.run_dir / "xfer" / name), str(local))

    def install_checkout(self, timeout=600):
        """Install the shared checkout into dom0's venv the way the README does, offline.

        The README's `make setup` makes a venv and pip-installs from PyPI. dom0 has no PyPI, so:
        a venv made with --system-site-packages (Debian's python3-jsonschema, -pyxs, -cffi),
        a copy of the checkout (9p is read-only and pip builds in the source tree), then
        `pip install --no-deps --no-build-isolation --no-index`. Returns the venv's path."""
        if not self.checkout:
            raise TestBedError("no checkout shared into dom0 (TestBed(checkout=...))")
        t0 = time.monotonic()
        script = (
            "set -e; rm -rf {src}; mkdir -p {src}; cd /mnt/checkout; "
            "tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./.pytest_cache "
            "--exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C {src} -xf -; "
            "{venv}/bin/pip install --quiet --no-deps --no-build-isolation --no-index "
            "--disable-pip-version-check {src}; "
            "{venv}/bin/python -c 'import xapi_storage, sys; print(xapi_storage.__file__)'"
        ).format(src=DOM0_SRC, venv=DOM0_VENV)
        self.dom0(script, timeout=timeout, check=True)
        self.timings["install"] = round(time.monotonic() - t0, 1)
        return DOM0_VENV

    def nfs_export(self, path, options="rw,sync,no_root_squash,no_subtree_check,fsid=%d"):
        """Export dom0's `path` over NFS (starting rpcbind, mountd, statd and nfsd once)."""
        if not re.match(r"^/[A-Za-z0-9_./-]+$", path) or not re.match(r"^[A-Za-z0-9_=,]+$", options.replace("%d", "")):
            raise ValueError("nfs_export: path must be absolute and plain, options plain: %r %r" % (path, options))
        opts = options % (zlib.crc32(path.encode()) % 10000 + 1) if "%d" in options else options
        script = (
            "set -e; mkdir -p {p}; "
            "modprobe -a nfsd nfs nfsv4; "
            "mountpoint -q /var/lib/nfs/rpc_pipefs || "
            "mount -t rpc_pipefs rpc_pipefs /var/lib/nfs/rpc_pipefs; "
            "mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd; "
            "pidof rpcbind >/dev/null || rpcbind -w; "
            "pidof rpc.statd >/dev/null || rpc.statd --no-notify; "
            "pidof rpc.mountd >/dev/null || rpc.mountd; "
            "grep -q '^{p} ' /etc/exports || echo '{p} *({o})' >> /etc/exports; "
            "exportfs -ra; "
            "[ \"$(cat /proc/fs/nfsd/threads)\" != 0 ] || rpc.nfsd 4"
        ).format(p=path, o=opts)
        self.dom0(script, timeout=120, check=True)

    # ---- guests -------------------------------------------------------------------------------

    def guest_config(self, name, disks=(), memory_mb=512, vcpus=1, extra_cfg=""):
        disk_list = ", ".join(json.dumps(d) for d in disks)
        return ('name = "{n}"\ntype = "pv"\nmemory = {m}\nvcpus = {v}\n'
                'kernel = "{k}"\nramdisk = "{r}"\nextra = "console=hvc0 quiet"\n'
                'disk = [ {d} ]\nvif = [ ]\non_poweroff = "destroy"\non_crash = "preserve"\n{x}'
                ).format(n=name, m=memory_mb, v=vcpus, k=GUEST_KERNEL, r=GUEST_INITRD,
                         d=disk_list, x=extra_cfg)

    def start_guest(self, name, disks=(), memory_mb=512, vcpus=1, extra_cfg="", timeout=240):
        """Create PV guest `name` (busybox + fio initramfs) and wait until it answers.

        disks: xl disk specs, e.g. "format=raw,vdev=xvdd,access=rw,backendtype=qdisk,target=F".
        A guest that is to get qdisk disks hot-plugged needs one qdisk disk here (then libxl
        starts its device model). Returns Guest."""
        self._require()
        if name in self.guests:
            raise TestBedError("guest %r is already running" % name)
        cfg = self.guest_config(name, disks, memory_mb, vcpus, extra_cfg)
        t0 = time.monotonic()
        r = self._chan.request("guest_start", timeout + 30, name=name, config=cfg,
                               timeout=timeout)
        if not r.get("ok"):
            raise TestBedError("guest %s did not start: %s" % (name, r.get("error")))
        self.timings["guest_start:%s" % name] = round(time.monotonic() - t0, 1)
        self._note("guest %s up as domid %s in %.1fs" % (name, r["domid"],
                                                        time.monotonic() - t0))
        g = self.guests[name] = Guest(self, name, r["domid"], cfg)
        return g

    def guest(self, name, cmd, timeout=60, check=False):
        """Run a shell command (busybox sh) in guest `name`. Returns Result."""
        self._require()
        if not isinstance(cmd, str):
            cmd = " ".join(shlex.quote(str(a)) for a in cmd)
        r = self._chan.request("guest_run", timeout + 40, name=name, sh=cmd, timeout=timeout)
        res = Result(r["rc"], _decode(r["out"]), _decode(r["err"]))
        self._note("guest %s %r -> rc %s in %ss" % (name, cmd, res.rc, r.get("secs")))
        if r.get("timed_out"):
            raise CommandTimeout("guest %s command %r took more than %ss" % (name, cmd, timeout),
                                 res)
        if check and res.rc != 0:
            raise CommandFailed("guest %s command %r failed with rc %s\nstdout: %s\nstderr: %s"
                                % (name, cmd, res.rc, res.stdout[-2000:], res.stderr[-2000:]),
                                res)
        return res

    def stop_guest(self, name):
        self._require()
        r = self._chan.request("guest_stop", 90, name=name)
        self.guests.pop(name, None)
        if not r.get("ok"):
            raise TestBedError("xl destroy %s failed: %s" % (name, r.get("error")))

    # ---- logs ---------------------------------------------------------------------------------

    def collect_logs(self, timeout=90):
        """Gather every log into <run dir>/logs (dom0's own logs too, if dom0 still answers).

        The run directory already holds serial.log (Xen console + dom0 console), qemu.log and
        commands.log (every request and its exit status). Returns the run directory."""
        if self.alive() and self._chan and not self._chan.closed:
            script = (
                "d=/mnt/bed/logs/dom0; mkdir -p $d; "
                "dmesg > $d/dmesg.txt 2>&1; xl dmesg > $d/xen-dmesg.txt 2>&1; "
                "xl list > $d/xl-list.txt 2>&1; xenstore-ls -fp > $d/xenstore.txt 2>&1; "
                "ps axf > $d/ps.txt 2>&1; "
                "cp -r /var/log/xen $d/xen 2>/dev/null; cp -r /var/log/testbed $d/testbed "
                "2>/dev/null; true")
            try:
                self.dom0(script, timeout=timeout)
            except TestBedError as e:
                self._note("log collection in dom0 failed: %s" % e)
        return self.run_dir


def _kill_group(proc):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def default_run_dir(checkout=None):
    """Where a boot keeps its logs: $XAPI_STORAGE_TESTBED_ARTIFACTS, or build/testbed-runs/ in
    the checkout (a CI artefact path), or the cache's runs/ directory."""
    base = os.environ.get("XAPI_STORAGE_TESTBED_ARTIFACTS")
    if base:
        base = Path(base)
    elif checkout:
        base = Path(checkout) / "build" / "testbed-runs"
    else:
        from .images import cache_root
        base = cache_root() / "runs"
    return base / ("%s-%d" % (time.strftime("%Y%m%d-%H%M%S"), os.getpid()))
