"""Differential test: the same XenStore wire conversation against the simulated XenStore
and against the real oxenstored (Xen 4.17, Debian's xen-utils-4.17), run on this host with
two small LD_PRELOAD shims (xen-test-bed.md §7): one clamps oxenstored's setrlimit to the
hard limit, one fakes libxenctrl/libxenevtchn so it starts without a hypervisor.
oxenstored's socket path is fixed (/run/xenstored/socket), so it runs in a private mount
namespace whose /run/xenstored is a bind mount of a temporary directory: nothing on the
host is touched. Every oxenstored client counts as dom0, so this compares dom0 semantics;
domU permission checks are tested in test_xenstore.py against xenstored's rules.

Skipped (with the reason) when oxenstored, gcc or `unshare -m` is not available:
`apt-get install xen-utils-4.17` provides oxenstored.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from xapi_storage.xen import xs_wire as W
from xapi_storage.xen.sim import running

OXENSTORED = "/usr/lib/xen-4.17/bin/oxenstored"

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
#include <unistd.h>
/* oxenstored raises RLIMIT_NOFILE past our hard limit: clamp instead of failing */
int setrlimit(__rlimit_resource_t r, const struct rlimit *l) {
    int (*real)(__rlimit_resource_t, const struct rlimit *) = dlsym(RTLD_NEXT, "setrlimit");
    struct rlimit cur, want = *l;
    if (getrlimit(r, &cur) == 0 && cur.rlim_max != RLIM_INFINITY) {
        if (want.rlim_max > cur.rlim_max) want.rlim_max = cur.rlim_max;
        if (want.rlim_cur > want.rlim_max) want.rlim_cur = want.rlim_max;
    }
    return real(r, &want);
}
/* no hypervisor: a fake xenctrl handle and an event channel fd that never fires */
static int fds[2] = {-1, -1};
void *xc_interface_open(void *a, void *b, unsigned f) { return (void *)1; }
int xc_interface_close(void *x) { return 0; }
void *xenevtchn_open(void *l, unsigned f) { if (fds[0] < 0 && pipe(fds)) return 0; return (void *)1; }
void *xenevtchn_fdopen(void *l, int fd, unsigned f) { return xenevtchn_open(l, f); }
int xenevtchn_close(void *x) { return 0; }
int xenevtchn_fd(void *x) { return fds[0]; }
int xenevtchn_bind_virq(void *x, unsigned v) { return 1; }
int xenevtchn_bind_interdomain(void *x, unsigned d, unsigned p) { return 2; }
int xenevtchn_unbind(void *x, unsigned p) { return 0; }
int xenevtchn_notify(void *x, unsigned p) { return 0; }
int xenevtchn_pending(void *x) { return -1; }
int xenevtchn_unmask(void *x, unsigned p) { return 0; }
"""


def _why_not():
    if not os.path.exists(OXENSTORED):
        return f"{OXENSTORED} missing (apt-get install xen-utils-4.17)"
    if not shutil.which("gcc"):
        return "gcc missing (needed to build the LD_PRELOAD shims)"
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode:
        return "`unshare -m` not permitted here (oxenstored's socket path is fixed)"
    return None


@pytest.fixture
def oxenstored(tmp_path):
    why = _why_not()
    if why:
        pytest.skip("DIFFERENTIAL TEST AGAINST oxenstored NOT RUN: " + why)
    d = tmp_path / "oxs"
    d.mkdir()
    (d / "shim.c").write_text(SHIM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O", "-o", str(d / "shim.so"), str(d / "shim.c"),
                    "-ldl"], check=True)
    (d / "conf").write_text(f"pid-file = {d}/pid\npersistent = false\n"
                            f"xenstored-log-file = {d}/xenstored.log\n"
                            f"access-log-file = {d}/access.log\nperms-activate = true\n")
    script = (f"mount -t tmpfs none /run && mkdir -p /run/xenstored /run/xen && "
              f"mount --bind {d} /run/xenstored && exec env LD_PRELOAD={d}/shim.so "
              f"{OXENSTORED} --no-fork --no-domain-init --config-file {d}/conf")
    p = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    sock = str(d / "socket")
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.skip(f"DIFFERENTIAL TEST NOT RUN: oxenstored did not start: {p.stderr.read()[-500:]!r}")
        time.sleep(0.02)
    yield sock
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5)
        self.s.connect(path)
        self.buf = b""
        self.rid = 100

    def _msg(self):
        while True:
            if len(self.buf) >= 16:
                t, r, x, n = W.HEADER.unpack_from(self.buf)
                if len(self.buf) >= 16 + n:
                    m = (t, r, x, self.buf[16:16 + n])
                    self.buf = self.buf[16 + n:]
                    return m
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def call(self, type_, payload, tx=0):
        """Send; return (reply, events seen before it)."""
        self.rid += 1
        self.s.sendall(W.pack(type_, self.rid, tx, payload))
        events = []
        while True:
            m = self._msg()
            if m is None:
                return ("closed",), events
            if m[0] == W.WATCH_EVENT:
                events.append(m[3])
                continue
            assert m[1] == self.rid
            return (W.NAMES.get(m[0], m[0]), m[3]), events

    def sync(self):
        """Every watch event queued for this connection so far."""
        return self.call(W.GET_DOMAIN_PATH, b"0\x00")[1]


def conversation(path):
    """Run the script against the server at `path`; return the transcript."""
    a, b = Conn(path), Conn(path)
    out = []

    def step(name, conn, type_, payload, tx=0):
        reply, ev = conn.call(type_, payload, tx)
        if reply[0] == "TRANSACTION_START":
            reply = (reply[0], b"<txid>")
        out.append((name, reply, ev, a.sync(), b.sync()))
        return reply

    def txid(conn):
        conn.rid += 1
        conn.s.sendall(W.pack(W.TRANSACTION_START, conn.rid, 0, b"\x00"))
        m = conn._msg()
        return int(m[3][:-1])

    Z = b"\x00"
    step("write", a, W.WRITE, b"/d/a" + Z + b"1")
    step("write empty", a, W.WRITE, b"/d/e" + Z)
    step("write binary", a, W.WRITE, b"/d/bin" + Z + bytes(range(256)))
    step("read", a, W.READ, b"/d/a" + Z)
    step("read binary", a, W.READ, b"/d/bin" + Z)
    step("read parent", a, W.READ, b"/d" + Z)
    step("read missing", a, W.READ, b"/d/missing" + Z)
    step("read missing deep", a, W.READ, b"/nope/x/y" + Z)
    step("mkdir", a, W.MKDIR, b"/d/m" + Z)
    step("mkdir again", a, W.MKDIR, b"/d/m" + Z)
    step("mkdir deep", a, W.MKDIR, b"/d/m2/x/y" + Z)
    step("directory", a, W.DIRECTORY, b"/d" + Z)
    step("directory empty", a, W.DIRECTORY, b"/d/m" + Z)
    step("directory missing", a, W.DIRECTORY, b"/d/none" + Z)
    step("get perms", a, W.GET_PERMS, b"/d/a" + Z)
    step("set perms", a, W.SET_PERMS, b"/d/a" + Z + b"n0" + Z + b"r3" + Z + b"b5" + Z)
    step("get perms after", a, W.GET_PERMS, b"/d/a" + Z)
    step("inherit perms", a, W.WRITE, b"/d/a/child" + Z + b"c")
    step("get inherited", a, W.GET_PERMS, b"/d/a/child" + Z)
    step("set perms other owner", a, W.SET_PERMS, b"/d/e" + Z + b"b7" + Z)
    step("get perms other owner", a, W.GET_PERMS, b"/d/e" + Z)
    step("set perms missing", a, W.SET_PERMS, b"/d/none" + Z + b"n0" + Z)
    step("watch", b, W.WATCH, b"/d" + Z + b"tok" + Z)
    step("watch deep", b, W.WATCH, b"/d/m2/x/y" + Z + b"deep" + Z)
    step("watch duplicate", b, W.WATCH, b"/d" + Z + b"tok" + Z)
    step("watch same path other token", b, W.WATCH, b"/d" + Z + b"tok2" + Z)
    step("unwatch other token", b, W.UNWATCH, b"/d" + Z + b"tok2" + Z)
    step("write under watch", a, W.WRITE, b"/d/w" + Z + b"x")
    step("write outside watch", a, W.WRITE, b"/dx" + Z + b"x")
    step("mkdir under watch", a, W.MKDIR, b"/d/w2" + Z)
    step("set perms under watch", a, W.SET_PERMS, b"/d/w" + Z + b"n0" + Z)
    step("rm subtree with watch below", a, W.RM, b"/d/m2" + Z)
    step("rm absent", a, W.RM, b"/d/absent" + Z)
    step("rm absent parent", a, W.RM, b"/nope/x" + Z)
    step("unwatch", b, W.UNWATCH, b"/d" + Z + b"tok" + Z)
    step("unwatch again", b, W.UNWATCH, b"/d" + Z + b"tok" + Z)
    step("get domain path", a, W.GET_DOMAIN_PATH, b"12" + Z)
    # transactions
    t = txid(a)
    step("tx read", a, W.READ, b"/d/a" + Z, t)
    step("tx write", a, W.WRITE, b"/d/t1" + Z + b"v", t)
    step("tx invisible outside", b, W.READ, b"/d/t1" + Z)
    step("tx visible inside", a, W.READ, b"/d/t1" + Z, t)
    step("tx commit", a, W.TRANSACTION_END, b"T" + Z, t)
    step("tx committed", b, W.READ, b"/d/t1" + Z)
    step("watch for tx", b, W.WATCH, b"/d/t2" + Z + b"tx" + Z)
    t = txid(a)
    step("tx2 read", a, W.READ, b"/d/a" + Z, t)
    step("tx2 write", a, W.WRITE, b"/d/t2" + Z + b"v", t)
    step("conflicting write", b, W.WRITE, b"/d/a" + Z + b"2")
    step("tx2 commit conflicts", a, W.TRANSACTION_END, b"T" + Z, t)
    step("tx2 not applied", b, W.READ, b"/d/t2" + Z)
    t = txid(a)
    step("tx3 write", a, W.WRITE, b"/d/t2" + Z + b"w", t)
    step("tx3 abort", a, W.TRANSACTION_END, b"F" + Z, t)
    step("tx3 not applied", b, W.READ, b"/d/t2" + Z)
    step("tx end unknown", a, W.TRANSACTION_END, b"T" + Z, 987654)
    step("read in unknown tx", a, W.READ, b"/d/a" + Z, 987654)
    # malformed requests
    step("read no nul", a, W.READ, b"/d/a")
    step("read double slash", a, W.READ, b"/d//a" + Z)
    step("read trailing slash", a, W.READ, b"/d/" + Z)
    step("read bad char", a, W.READ, b"/d/a b" + Z)
    step("write no nul", a, W.WRITE, b"/d/zz")
    step("watch no token", a, W.WATCH, b"/d" + Z)
    step("set perms bad", a, W.SET_PERMS, b"/d/a" + Z + b"q1" + Z)
    step("tx end bad arg", a, W.TRANSACTION_END, b"X" + Z)
    step("unknown type", a, 99, b"x" + Z)
    # more watch semantics
    step("watch root", b, W.WATCH, b"/" + Z + b"root" + Z)
    step("write deep under root watch", a, W.WRITE, b"/r/s/t" + Z + b"1")
    step("rm leaf under root watch", a, W.RM, b"/r/s/t" + Z)
    step("unwatch root", b, W.UNWATCH, b"/" + Z + b"root" + Z)
    step("watch missing node", b, W.WATCH, b"/later/x" + Z + b"later" + Z)
    step("create watched node via parent write", a, W.WRITE, b"/later/x/y" + Z + b"v")
    step("rm parent of watched node", a, W.RM, b"/later" + Z)
    step("reset watches", b, W.RESET_WATCHES, Z)
    step("write after reset", a, W.WRITE, b"/later/x" + Z + b"v")
    step("write root value", a, W.WRITE, b"/" + Z + b"rootval")
    step("read root", a, W.READ, b"/" + Z)
    step("get perms root", a, W.GET_PERMS, b"/" + Z)
    step("set perms many", a, W.SET_PERMS, b"/d/a" + Z + b"b3" + Z + b"r4" + Z + b"w5" + Z + b"n6" + Z)
    step("get perms many", a, W.GET_PERMS, b"/d/a" + Z)
    step("directory part", a, W.DIRECTORY_PART, b"/d" + Z + b"0" + Z)
    step("directory part offset", a, W.DIRECTORY_PART, b"/d" + Z + b"2" + Z)
    step("directory part past end", a, W.DIRECTORY_PART, b"/d" + Z + b"999" + Z)
    step("mkdir then write", a, W.MKDIR, b"/d/mw" + Z)
    step("write over dir", a, W.WRITE, b"/d/mw" + Z + b"val")
    step("is introduced 0", a, W.IS_DOMAIN_INTRODUCED, b"0" + Z)
    step("is introduced 5", a, W.IS_DOMAIN_INTRODUCED, b"5" + Z)
    # transactions: disjoint ones both commit
    t1, t2 = txid(a), txid(b)
    step("t1 write", a, W.WRITE, b"/d/a" + Z + b"1", t1)
    step("t2 write", b, W.WRITE, b"/d/e" + Z + b"2", t2)
    step("t1 commit", a, W.TRANSACTION_END, b"T" + Z, t1)
    step("t2 commit", b, W.TRANSACTION_END, b"T" + Z, t2)
    t = txid(a)
    step("tx rm", a, W.RM, b"/d/e" + Z, t)
    step("tx rm invisible", b, W.READ, b"/d/e" + Z)
    step("tx rm commit", a, W.TRANSACTION_END, b"T" + Z, t)
    step("tx rm applied", b, W.READ, b"/d/e" + Z)
    step("still alive", a, W.READ, b"/d/a" + Z)
    # where the two servers differ on purpose (see KNOWN); kept last so that a different
    # outcome cannot change the steps above
    t1, t2 = txid(a), txid(b)
    step("sibling t1 create", a, W.WRITE, b"/d/s1" + Z + b"1", t1)
    step("sibling t2 create", b, W.WRITE, b"/d/s2" + Z + b"2", t2)
    step("sibling t1 commit", a, W.TRANSACTION_END, b"T" + Z, t1)
    step("sibling t2 commit", b, W.TRANSACTION_END, b"T" + Z, t2)
    t = txid(a)
    step("ro tx read", a, W.READ, b"/d/a" + Z, t)
    step("ro tx conflicting write", b, W.WRITE, b"/d/a" + Z + b"x")
    step("ro tx commit", a, W.TRANSACTION_END, b"T" + Z, t)
    step("rm root", a, W.RM, b"/" + Z)
    a.s.close()
    b.s.close()
    return out


# Known, deliberate differences (each checked to be what the C xenstored does, or harmless):
KNOWN = {
    # oxenstored answers EIO for an unknown transaction id; the C xenstored (and simxen)
    # ENOENT, which says what is wrong
    "tx end unknown", "read in unknown tx",
    # oxenstored 4.17 lacks DIRECTORY_PART (ENOSYS); simxen implements the C xenstored's
    "directory part", "directory part offset", "directory part past end",
    # with --no-domain-init oxenstored has not introduced dom0
    "is introduced 0",
    # oxenstored merges transactions that created siblings, and lets a read-only transaction
    # commit after what it read changed; simxen says EAGAIN whenever a node the transaction
    # read or wrote (or whose child list it changed) was changed meanwhile: stricter, and
    # every client must retry on EAGAIN anyway
    "sibling t2 commit", "ro tx commit",
    # oxenstored deletes the whole store on RM of "/"; simxen refuses (EINVAL), as the C
    # xenstored's do_rm does
    "rm root",
}


def test_same_conversation_as_oxenstored(oxenstored, tmp_path):
    real = conversation(oxenstored)
    with running(str(tmp_path / "sim")) as sim:
        ours = conversation(sim.xenstore_path(0))
    diffs = []
    for r, o in zip(real, ours):
        if r != o and r[0] not in KNOWN:
            diffs.append(f"{r[0]}:\n  oxenstored: {r[1:]}\n  simxen:     {o[1:]}")
    assert not diffs, "simxen differs from oxenstored:\n" + "\n".join(diffs)
