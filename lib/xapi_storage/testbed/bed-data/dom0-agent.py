#!/usr/bin/python3
"""The test bed's agent in dom0: runs the host's requests, one JSON object a line, on the
virtio-serial port named "testbed.ctl". Standard library only (it runs on dom0's python3).

Host -> agent: {"id": N, "op": OP, ...}.   Agent -> host: {"id": N, ...reply} or {"event": ...}.
Every request runs in its own thread, so a slow command never blocks another one.

ops:
  run          argv | sh, timeout, input(b64), cwd, env  -> rc, out(b64), err(b64), timed_out, secs
  spawn        argv | sh, name                             -> handle, pid   (output in files)
  poll         handle                                      -> rc (null while running)
  stop         handle, signal, timeout                     -> rc, out(b64), err(b64)   (tails)
  guest_start  name, config (xl cfg text), timeout         -> domid, secs
  guest_run    name, sh, timeout                           -> rc, out(b64), err(b64), timed_out
  guest_stop   name, timeout                               -> ok
  poweroff                                                 -> ok, then the machine powers off

A guest is reached through its PV console (hvc0), which xenconsoled exposes in dom0 as a pty; the
guest initramfs runs a small shell agent there (guest-init.sh). Framing on that console:
  dom0 -> guest: "TBCMD <id> <timeout> <base64 script>\\n"
  guest -> dom0: "@@TB OUT <id>", base64 lines, "@@TB ERR <id>", base64 lines, "@@TB END <id> <rc>"
Lines that are not base64 between the markers (kernel messages) are ignored.
"""

import base64
import ctypes
import glob
import json
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import tty

PORT_NAME = "testbed.ctl"
LOG_DIR = "/var/log/testbed"
BG_DIR = LOG_DIR + "/bg"
TAIL = 1 << 20  # bytes of a background process's output returned by "stop"

_send_lock = threading.Lock()
_fd = None


def log(msg):
    with open(LOG_DIR + "/agent.log", "a") as f:
        f.write("%.3f %s\n" % (time.monotonic(), msg))


def send(obj):
    data = (json.dumps(obj) + "\n").encode()
    with _send_lock:
        view = memoryview(data)
        while view:
            n = os.write(_fd, view)
            view = view[n:]


def b64(data):
    return base64.b64encode(data).decode("ascii")


def find_port():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
            with open(name_file) as f:
                if f.read().strip() == PORT_NAME:
                    dev = "/dev/" + name_file.split("/")[-2]
                    if os.path.exists(dev):
                        return dev
        time.sleep(0.2)
    raise SystemExit("dom0-agent: no virtio-serial port named %s" % PORT_NAME)


def _argv(req):
    if req.get("argv") is not None:
        return [str(a) for a in req["argv"]]
    return ["/bin/sh", "-c", req["sh"]]


def _env(req):
    env = dict(os.environ)
    env.update(req.get("env") or {})
    return env


# ---- commands in dom0 -------------------------------------------------------------------------

def op_run(req):
    t0 = time.monotonic()
    timeout = float(req.get("timeout", 60))
    inp = base64.b64decode(req["input"]) if req.get("input") else b""
    try:
        p = subprocess.Popen(_argv(req), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=req.get("cwd"), env=_env(req),
                             start_new_session=True)
    except OSError as e:
        return {"rc": 127, "out": "", "err": b64(("dom0-agent: %s\n" % e).encode()),
                "timed_out": False, "secs": 0.0}
    timed_out = False
    try:
        out, err = p.communicate(inp, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return {"rc": p.returncode, "out": b64(out), "err": b64(err), "timed_out": timed_out,
            "secs": round(time.monotonic() - t0, 3)}


def _killpg(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


_bg = {}
_bg_lock = threading.Lock()
_bg_next = [0]


def op_spawn(req):
    os.makedirs(BG_DIR, exist_ok=True)
    with _bg_lock:
        _bg_next[0] += 1
        handle = "%s-%d" % (re.sub(r"[^A-Za-z0-9_.-]", "_", req.get("name") or "bg"), _bg_next[0])
    out = open(os.path.join(BG_DIR, handle + ".out"), "wb")
    err = open(os.path.join(BG_DIR, handle + ".err"), "wb")
    try:
        p = subprocess.Popen(_argv(req), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             cwd=req.get("cwd"), env=_env(req), start_new_session=True)
    finally:
        out.close()
        err.close()
    with _bg_lock:
        _bg[handle] = p
    log("spawn %s pid %d: %s" % (handle, p.pid, _argv(req)))
    return {"handle": handle, "pid": p.pid}


def _tail(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read()
    except OSError:
        return b""


def _proc(req):
    with _bg_lock:
        p = _bg.get(req["handle"])
    if p is None:
        raise KeyError("no background process %r" % req["handle"])
    return p


def op_poll(req):
    return {"rc": _proc(req).poll()}


def op_stop(req):
    p = _proc(req)
    sig = int(req.get("signal", signal.SIGTERM))
    if p.poll() is None:
        _killpg(p.pid, sig)
        try:
            p.wait(timeout=float(req.get("timeout", 10)))
        except subprocess.TimeoutExpired:
            _killpg(p.pid, signal.SIGKILL)
            p.wait()
    base = os.path.join(BG_DIR, req["handle"])
    return {"rc": p.returncode, "out": b64(_tail(base + ".out")), "err": b64(_tail(base + ".err"))}


# ---- guests, through their PV console ---------------------------------------------------------

_B64_LINE = re.compile(rb"^[A-Za-z0-9+/=]*$")


class GuestConsole:
    """The dom0 end of a guest's hvc0: a pty from xenconsoled, spoken to by guest-init.sh."""

    def __init__(self, name, domid, tty_path):
        self.name, self.domid = name, domid
        self.fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        attrs = termios.tcgetattr(self.fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.lock = threading.Lock()          # one command at a time per guest
        self.cond = threading.Condition()
        self.results = {}                     # id -> (rc, out, err)
        self.closed = False
        self._cur = None                      # [id, section, out_lines, err_lines]
        self._next = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._line(line.rstrip(b"\r"))
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _line(self, line):
        m = re.match(rb"^@@TB (OUT|ERR|END) (\d+)(?: (-?\d+))?", line)
        if m:
            kind, cid = m.group(1), int(m.group(2))
            if kind == b"OUT":
                self._cur = [cid, "out", [], []]
            elif self._cur and self._cur[0] == cid and kind == b"ERR":
                self._cur[1] = "err"
            elif self._cur and self._cur[0] == cid and kind == b"END":
                out = base64.b64decode(b"".join(self._cur[2]))
                err = base64.b64decode(b"".join(self._cur[3]))
                with self.cond:
                    self.results[cid] = (int(m.group(3) or 255), out, err)
                    self.cond.notify_all()
                self._cur = None
            return
        if self._cur and _B64_LINE.match(line):
            self._cur[2 if self._cur[1] == "out" else 3].append(line)

    def run(self, script, timeout):
        with self.lock:
            self._next += 1
            cid = self._next
            # the guest kills the command at `timeout`; we wait a little longer for its answer
            line = "TBCMD %d %d %s\n" % (cid, max(1, int(timeout)), b64(script.encode()))
            os.write(self.fd, line.encode())
            deadline = time.monotonic() + timeout + 10
            with self.cond:
                while cid not in self.results:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.closed:
                        return None
                    self.cond.wait(left)
                return self.results.pop(cid)

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


_guests = {}


def _sh(argv, timeout=60):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode(errors="replace").strip()


def op_guest_start(req):
    name = req["name"]
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        raise ValueError("bad guest name %r" % name)
    t0 = time.monotonic()
    timeout = float(req.get("timeout", 180))
    cfg = "/etc/xen/%s.cfg" % name
    with open(cfg, "w") as f:
        f.write(req["config"])
    for old in glob.glob("/var/log/xen/console/guest-%s.log" % name):
        os.unlink(old)
    rc, out = _sh(["xl", "create", cfg], timeout=timeout)
    if rc != 0:
        return {"ok": False, "error": "xl create %s failed (rc %d): %s" % (cfg, rc, out)}
    rc, domid = _sh(["xl", "domid", name])
    if rc != 0:
        return {"ok": False, "error": "xl domid %s: %s" % (name, domid)}
    tty_path = None
    while time.monotonic() - t0 < timeout:
        rc, tty_path = _sh(["xenstore-read", "/local/domain/%s/console/tty" % domid])
        if rc == 0 and tty_path:
            break
        time.sleep(0.2)
    else:
        return {"ok": False, "error": "no console tty for %s (xenconsoled running?)" % name}
    con = GuestConsole(name, int(domid), tty_path)
    _guests[name] = con
    # the guest agent answers once its init is up; ask until it does
    while time.monotonic() - t0 < timeout:
        res = con.run("echo ready", timeout=5)
        if res and res[1].strip() == b"ready":
            return {"ok": True, "domid": int(domid), "secs": round(time.monotonic() - t0, 3)}
    return {"ok": False, "error": "guest %s (domid %s) did not answer on hvc0 in %ds; see "
            "/var/log/xen/console/guest-%s.log" % (name, domid, timeout, name)}


def op_guest_run(req):
    con = _guests.get(req["name"])
    if con is None:
        raise KeyError("no guest %r started by this agent" % req["name"])
    timeout = float(req.get("timeout", 60))
    t0 = time.monotonic()
    res = con.run(req["sh"], timeout)
    if res is None:
        return {"rc": None, "out": "", "err": "", "timed_out": True,
                "secs": round(time.monotonic() - t0, 3)}
    rc, out, err = res
    # guest-init.sh runs the command under busybox timeout, which exits 143 on SIGTERM
    return {"rc": rc, "out": b64(out), "err": b64(err), "timed_out": rc == 143,
            "secs": round(time.monotonic() - t0, 3)}


def op_guest_stop(req):
    name = req["name"]
    con = _guests.pop(name, None)
    if con:
        con.close()
    rc, out = _sh(["xl", "destroy", name], timeout=float(req.get("timeout", 60)))
    return {"ok": rc == 0, "error": None if rc == 0 else out}


def op_poweroff(req):
    def later():
        # no systemd here, so no poweroff(8): sync and ask the kernel (dom0 off -> Xen off ->
        # QEMU exits)
        time.sleep(0.5)
        os.sync()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    threading.Thread(target=later, daemon=True).start()
    return {"ok": True}


OPS = {"run": op_run, "spawn": op_spawn, "poll": op_poll, "stop": op_stop,
       "guest_start": op_guest_start, "guest_run": op_guest_run, "guest_stop": op_guest_stop,
       "poweroff": op_poweroff}


def handle(req):
    rid = req.get("id")
    try:
        fn = OPS[req["op"]]
        reply = fn(req)
    except Exception as e:  # the host gets the error, the agent keeps serving
        reply = {"error": "%s: %s" % (type(e).__name__, e)}
        log("request %r failed: %r" % (req.get("op"), e))
    reply["id"] = rid
    send(reply)


def main():
    global _fd
    os.makedirs(LOG_DIR, exist_ok=True)
    port = find_port()
    _fd = os.open(port, os.O_RDWR)
    log("serving on %s" % port)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    send({"event": "ready", "uptime": uptime, "port": port})
    buf = b""
    while True:
        data = os.read(_fd, 65536)
        if not data:           # host side closed: keep the port open and wait for it again
            time.sleep(0.2)
            continue
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError:
                log("bad request line %r" % line[:200])
                continue
            threading.Thread(target=handle, args=(req,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
