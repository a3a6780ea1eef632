"""The NBD export of the ring server: the protocol (sans-I/O) byte by byte and against random
input, then the server against real clients (qemu-img, qemu-io) and a hostile one."""

import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest
from hypothesis import given, settings, strategies as hs

from xapi_storage.blkback import nbd
from xapi_storage.blkback.backends import open_storage
from xapi_storage.blkback.server import Server

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")


def _need_qemu():
    if QEMU_IO and QEMU_IMG:
        return
    msg = "qemu-io/qemu-img not installed (apt-get install qemu-utils; scripts/setup.sh does)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


# -- the protocol alone -----------------------------------------------------------------------
def _lookup(exports):
    def lookup(name):
        return exports.get(name)
    lookup.names = lambda: list(exports)
    return lookup


def _go(name):
    n = name.encode()
    data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
    return struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data


def _req(type_, handle, offset, length, flags=0, data=b""):
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, type_, handle, offset,
                       length) + data


def _opened(exports=None, readonly=False):
    exp = nbd.Export("vol", 1 << 20, readonly=readonly, can_trim=True)
    c = nbd.Connection(_lookup(exports or {"vol": exp}))
    assert c.take_output()[:16] == struct.pack(">QQ", nbd.NBDMAGIC, nbd.IHAVEOPT)
    evs = c.receive(struct.pack(">I", 3) + _go("vol"))
    assert isinstance(evs[-1], nbd.Opened)
    c.take_output()
    return c


def _replies(out):
    res = []
    while out:
        magic, err, handle = struct.unpack_from(">IIQ", out)
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        res.append((handle, err))
        out = out[16:]
    return res


def test_handshake_and_requests_fed_one_byte_at_a_time():
    c = nbd.Connection(_lookup({"vol": nbd.Export("vol", 4096)}))
    c.take_output()
    stream = struct.pack(">I", 3) + _go("vol") + _req(nbd.CMD_WRITE, 7, 512, 4, 0, b"abcd") \
        + _req(nbd.CMD_READ, 8, 0, 512) + _req(nbd.CMD_DISC, 9, 0, 0)
    evs = []
    for i in range(len(stream)):
        evs += c.receive(stream[i:i + 1])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["Opened", "Request", "Request", "Closed"]
    assert evs[1].data == b"abcd" and evs[1].offset == 512 and evs[2].handle == 8
    assert evs[3].reason == ""


def test_checks_answered_in_the_protocol():
    c = _opened()
    c.receive(_req(nbd.CMD_READ, 1, (1 << 20) - 512, 1024)          # past the end
              + _req(nbd.CMD_WRITE, 2, 1 << 20, 4, 0, b"xxxx")       # past the end
              + _req(nbd.CMD_READ, 3, 0, nbd.REQUEST_MAX + 1)        # too long
              + _req(99, 4, 0, 0)                                   # unknown command
              + _req(nbd.CMD_READ, 5, 0, 512, flags=0x80))          # unknown flag
    assert _replies(c.take_output()) == [(1, nbd.EINVAL), (2, nbd.ENOSPC),
                                         (3, nbd.EOVERFLOW), (4, nbd.EINVAL), (5, nbd.EINVAL)]
    ro = _opened(readonly=True)
    ro.receive(_req(nbd.CMD_WRITE, 1, 0, 1, 0, b"x") + _req(nbd.CMD_TRIM, 2, 0, 512)
               + _req(nbd.CMD_WRITE_ZEROES, 3, 0, 512))
    assert _replies(ro.take_output()) == [(1, nbd.EPERM), (2, nbd.EPERM), (3, nbd.EPERM)]


def test_an_oversized_write_is_skipped_not_buffered():
    c = _opened()
    n = nbd.REQUEST_MAX + 4096
    evs = c.receive(_req(nbd.CMD_WRITE, 1, 0, n))
    left = n
    while left:
        k = min(left, 65536)
        evs += c.receive(bytes(k))
        left -= k
        assert len(c._in) == 0                       # dropped as it comes
    evs += c.receive(_req(nbd.CMD_FLUSH, 2, 0, 0))
    assert [type(e).__name__ for e in evs] == ["Request"] and evs[0].type == nbd.CMD_FLUSH
    assert _replies(c.take_output()) == [(1, nbd.EOVERFLOW)]


def test_options_unknown_export_list_and_too_long():
    c = nbd.Connection(_lookup({"a": nbd.Export("a", 512)}))
    c.take_output()
    c.receive(struct.pack(">I", 1) + _go("nope")
              + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_LIST, 0)
              + struct.pack(">QII", nbd.IHAVEOPT, 8, 0)               # structured replies
              + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_INFO, 10 ** 6))
    c.receive(bytes(10 ** 6))
    out = c.take_output()
    reps = []
    while out:
        magic, opt, rep, n = struct.unpack_from(">QIII", out)
        assert magic == nbd.REPLY_MAGIC_OPT
        reps.append((opt, rep))
        out = out[20 + n:]
    assert reps == [(nbd.OPT_GO, nbd.REP_ERR_UNKNOWN), (nbd.OPT_LIST, nbd.REP_SERVER),
                    (nbd.OPT_LIST, nbd.REP_ACK), (8, nbd.REP_ERR_UNSUP),
                    (nbd.OPT_INFO, nbd.REP_ERR_TOO_BIG)]
    assert not c.closed


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.binary(max_size=64), max_size=20), hs.booleans())
def test_random_bytes_never_break_the_machine(chunks, handshake_done):
    c = _opened() if handshake_done else nbd.Connection(_lookup({}))
    for ch in chunks:
        for ev in c.receive(ch):
            assert isinstance(ev, (nbd.Opened, nbd.Request, nbd.Closed))
            if isinstance(ev, nbd.Request):
                assert ev.offset + ev.length <= c.export.size
        c.take_output()


# -- the server, real clients -----------------------------------------------------------------
class Exported:
    def __init__(self, sim, path, sock, readonly=False):
        self.server = Server(sim.xen(0))
        self.listener = self.server.listen_nbd(str(sock))
        self.storage = open_storage("raw", str(path))
        self.listener.add_export("vol", self.storage, readonly=readonly)
        self.sock = str(sock)
        self.stop = False
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run(until=lambda: self.stop)
        except BaseException as e:                        # noqa: BLE001 - checked at close
            self.error = e

    def uri(self, name="vol"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def close(self):
        self.stop = True
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()
        self.storage.close()
        assert not os.path.exists(self.sock)
        if self.error:
            raise self.error


@pytest.fixture
def exported(simxen, disk, tmp_path):
    e = Exported(simxen, disk, tmp_path / "nbd.sock")
    try:
        yield e
    finally:
        e.close()


def _run(*cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_qemu_img_and_qemu_io(exported, disk, tmp_path):
    _need_qemu()
    info = _run(QEMU_IMG, "info", "--output=json", "--image-opts",
                f"driver=nbd,server.type=unix,server.path={exported.sock},export=vol")
    assert f'"virtual-size": {16 << 20}' in info
    out = _run(QEMU_IO, "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "read -P 0xab 1M 1M",
               "-c", "flush", "-c", "write -z 1536k 64k", "-c", "discard 4M 64k",
               "-c", "write -f -P 0x11 0 4k", exported.uri())       # -f: FUA
    assert "Pattern verification failed" not in out
    data = disk.read_bytes()
    assert data[1 << 20:1536 << 10] == b"\xab" * (512 << 10)
    assert data[1536 << 10:1600 << 10] == bytes(64 << 10)
    assert data[1600 << 10:2 << 20] == b"\xab" * (448 << 10)
    assert data[:4096] == b"\x11" * 4096
    assert data[4 << 20:(4 << 20) + (64 << 10)] == bytes(64 << 10)     # punched: zeroes
    copy = tmp_path / "copy.raw"
    _run(QEMU_IMG, "convert", "-f", "raw", "-O", "raw", exported.uri(), str(copy))
    assert copy.read_bytes() == data


def test_read_only_export(simxen, disk, tmp_path):
    _need_qemu()
    e = Exported(simxen, disk, tmp_path / "ro.sock", readonly=True)
    try:
        before = disk.read_bytes()
        p = subprocess.run([QEMU_IO, "-f", "raw", "-c", "write -P 0xcd 0 4k", e.uri()],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        said = (p.stdout + p.stderr).lower()
        # qemu sees NBD_FLAG_READ_ONLY and refuses to open it for writing
        assert p.returncode != 0 and "permission denied" in said, said
        _run(QEMU_IO, "-r", "-f", "raw", "-c", "read 0 64k", e.uri())
        assert disk.read_bytes() == before
    finally:
        e.close()


def _client(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _recv(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise EOFError(f"closed after {len(b)} of {n} bytes")
        b += x
    return b


def _hostile_open(path):
    s = _client(path)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 3)
              + b"vol")
    size, _flags = struct.unpack(">QH", _recv(s, 10))
    return s, size


def test_hostile_client(exported, disk):
    size = 16 << 20
    # garbage instead of a handshake: dropped, nothing else happens
    s = _client(exported.sock)
    _recv(s, 18)
    s.sendall(os.urandom(4096))
    s.settimeout(5)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    s.close()
    # out-of-range and oversized requests: each answered with its error, connection kept
    s, got = _hostile_open(exported.sock)
    assert got == size
    s.sendall(_req(nbd.CMD_READ, 1, size - 512, 1024) + _req(nbd.CMD_READ, 2, 2**64 - 512, 512)
              + _req(nbd.CMD_WRITE, 3, size, 1, 0, b"x")
              + _req(nbd.CMD_READ, 4, 0, 0xFFFFFFFF) + _req(nbd.CMD_READ, 5, size - 512, 512))
    replies = [struct.unpack(">IIQ", _recv(s, 16)) for _ in range(4)]
    assert [(h, e) for _m, e, h in replies] == [(1, nbd.EINVAL), (2, nbd.EINVAL),
                                                (3, nbd.ENOSPC), (4, nbd.EOVERFLOW)]
    _m, e, h = struct.unpack(">IIQ", _recv(s, 16))
    assert (h, e) == (5, 0) and _recv(s, 512) == disk.read_bytes()[size - 512:]
    # a bad request magic ends only this connection
    s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert s.recv(16) == b""
    s.close()
    # the server still serves everyone else
    s, _ = _hostile_open(exported.sock)
    s.sendall(_req(nbd.CMD_READ, 9, 0, 4096))
    assert struct.unpack(">IIQ", _recv(s, 16))[1:] == (0, 9)
    assert _recv(s, 4096) == disk.read_bytes()[:4096]
    s.sendall(_req(nbd.CMD_DISC, 10, 0, 0))
    assert s.recv(16) == b""
    s.close()
    assert exported.thread.is_alive() and exported.error is None


def test_connect_exports_the_guests_disk_over_nbd(simxen_guest, disk, tmp_path):
    """`blkback connect --nbd`: what the guest wrote through its ring, qemu-img reads over NBD
    from the same server; the socket is root-only and gone at exit."""
    _need_qemu()
    import signal
    import stat
    import sys
    from xapi_storage.blkback.frontend import Frontend
    from xapi_storage.blkback.server import XenStore
    from .test_server import wait_for
    sim, g = simxen_guest
    sock = tmp_path / "disk.sock"
    p = subprocess.Popen([sys.executable, "-m", "xapi_storage.cli", "blkback", "connect",
                          str(g), "--path", str(disk), "--xen", f"sim:{sim.dir}", "--quiet",
                          "--nbd", str(sock), "--nbd-name", "xvdb"],
                         stderr=subprocess.PIPE, universal_newlines=True)
    xs = XenStore(sim.xenstore_path(0))
    try:
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd") and sock.exists(),
                 what="the vbd and the socket")
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0         # owner only
        devid = int(xs.list(f"/local/domain/{g}/device/vbd")[0])
        with Frontend(sim.xen(g), devid) as fe:
            fe.connect()
            fe.write(2048, b"guest-data" * 4096)
            out = _run(QEMU_IO, "-r", "-f", "raw", "-c", "read -v 1M 10",
                       f"nbd+unix:///xvdb?socket={sock}")
            assert "67 75 65 73 74 2d 64 61 74 61" in out          # "guest-data"
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        xs.close()
