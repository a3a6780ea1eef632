"""`xapi-storage blkback connect` as a person runs it, against the simulated Xen."""

import json
import os
import signal
import subprocess
import sys

import pytest

from xapi_storage.blkback import toolstack
from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.server import XenStore

from .test_server import wait_for


def cli(*args):
    return [sys.executable, "-m", "xapi_storage.cli", "blkback", "connect", *args]


def start(sim, *args):
    return subprocess.Popen(cli(*args, "--xen", f"sim:{sim.dir}"), stderr=subprocess.PIPE,
                            universal_newlines=True)


def finish(p, timeout=15):
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, err


def nodes(xs, g):
    """Every node under dom0's and the guest's home, with its value: nothing we wrote may
    be left when the command ends."""
    out = {}

    def walk(p):
        out[p] = xs.read(p)
        for c in xs.list(p):
            walk(f"{p}/{c}")
    walk("/local/domain/0")
    walk(f"/local/domain/{g}")
    return out


@pytest.mark.parametrize("how", ["sigint", "toolstack-unplug", "sigterm-before-connect"])
def test_connect_serve_and_clean_up(simxen_guest, disk, tmp_path, how):
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    before = nodes(xs, g)
    stats = tmp_path / "stats.json"
    p = start(sim, "guest1", "--path", str(disk), "--stats", str(stats))
    try:
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd"), what="the vbd")
        devid = int(xs.list(f"/local/domain/{g}/device/vbd")[0])
        assert devid == toolstack.xvd_devid(1)                     # xvdb, the first free
        fe_path, be_path = toolstack.paths(g, devid)
        assert xs.read(f"{be_path}/frontend") == fe_path
        assert xs.client.get_perms(fe_path.encode()) == [f"n{g}".encode(), b"r0"]
        assert xs.client.get_perms(be_path.encode()) == [b"n0", f"r{g}".encode()]
        if how == "sigterm-before-connect":
            wait_for(lambda: xs.read(f"{be_path}/state") == "2", what="InitWait")
            p.send_signal(signal.SIGTERM)
        else:
            fe = Frontend(sim.xen(g), devid)
            fe.connect()
            fe.write(0, b"c" * 8192)
            assert fe.read(0, 16) == b"c" * 8192
            wait_for(stats.exists, what="the stats file")
            wait_for(lambda: json.loads(stats.read_text())["requests"]["write"] == 1,
                     what="stats written while running")
            if how == "sigint":
                p.send_signal(signal.SIGINT)
            else:
                toolstack.unplug(xs, be_path)
            wait_for(lambda: xs.read(f"{be_path}/state") == "5", what="backend Closing")
            fe.close()                      # the guest lets go, as blkfront does on Closing
        rc, err = finish(p)
        assert rc == 0, err
        assert "removed" in err
    finally:
        if p.poll() is None:
            p.kill()
    assert nodes(xs, g) == before
    xs.close()
    if how != "sigterm-before-connect":
        assert disk.read_bytes()[:8192] == b"c" * 8192


def test_two_disks_get_two_device_ids(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    xs = XenStore(sim.xenstore_path(0))
    p1 = start(sim, str(g), "--path", str(disk))
    try:
        wait_for(lambda: len(xs.list(f"/local/domain/{g}/device/vbd")) == 1, what="vbd 1")
        p2 = start(sim, "guest1", "--path", str(other), "--readonly", "--backend", "cow")
        try:
            wait_for(lambda: len(xs.list(f"/local/domain/{g}/device/vbd")) == 2, what="vbd 2")
            ids = sorted(int(x) for x in xs.list(f"/local/domain/{g}/device/vbd"))
            assert ids == [toolstack.xvd_devid(1), toolstack.xvd_devid(2)]
        finally:
            p2.send_signal(signal.SIGINT)
            assert finish(p2)[0] == 0
    finally:
        p1.send_signal(signal.SIGINT)
        assert finish(p1)[0] == 0
    assert xs.list(f"/local/domain/{g}/device/vbd") == []
    xs.close()


@pytest.mark.parametrize("args,msg", [
    (["nosuchguest", "--path", "{disk}"], "no domain named 'nosuchguest'"),
    (["guest1", "--path", "/nonexistent.img"], "cannot open the storage"),
    (["guest1"], "needs --path"),
    (["guest1", "--path", "{disk}", "--kind", "vbd"], "kernel's blkback"),
    (["guest1", "--path", "{disk}", "--kind", "pyvbd/../../x"], "one XenStore path element"),
    (["guest1", "--path", "{disk}", "--kind", ""], "one XenStore path element"),
    (["guest1", "--backend", "null", "--size", "-1"], "a positive multiple of 512"),
    (["guest1", "--backend", "null", "--size", "0"], "a positive multiple of 512"),
    (["guest1", "--backend", "null", "--size", "1000"], "a positive multiple of 512"),
])
def test_errors_are_clear_and_leave_nothing(simxen_guest, disk, args, msg):
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    before = nodes(xs, g)
    p = start(sim, *[a.replace("{disk}", str(disk)) for a in args])
    rc, err = finish(p)
    assert rc != 0 and msg in err, err
    assert nodes(xs, g) == before
    xs.close()


def test_status_line_on_a_terminal(simxen_guest, disk):
    import pty
    sim, g = simxen_guest
    master, slave = pty.openpty()
    p = subprocess.Popen(cli("guest1", "--path", str(disk), "--xen", f"sim:{sim.dir}"),
                         stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = bytearray()

    def drain():
        import select
        while select.select([master], [], [], 0)[0]:
            try:
                d = os.read(master, 65536)
            except OSError:
                return
            if not d:
                return
            out.extend(d)
    try:
        xs = XenStore(sim.xenstore_path(0))
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd"), what="the vbd")
        fe = Frontend(sim.xen(g), toolstack.xvd_devid(1))
        fe.connect()
        fe.write(0, b"t" * 4096)
        wait_for(lambda: (drain(), b"writes 1 (4.0 KiB)" in out)[1], what="the status line")
        p.send_signal(signal.SIGINT)
        wait_for(lambda: xs.read(f"{fe.be_path}/state") == "5", what="Closing")
        fe.close()
        assert p.wait(15) == 0
        drain()
        xs.close()
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert "\r\x1b[K" in text and "xvdb of domain" in text and "[Connected]" in text


@pytest.mark.parametrize("extra", [["--readonly"], ["--backend", "cow"], [],
                                   ["--backend", "block"]])
def test_a_fifo_as_path_is_refused_at_once(simxen_guest, tmp_path, extra):
    """open() of a FIFO waits for a writer (read-only open) forever, where no signal ends
    it: the storage is opened without waiting and its type checked."""
    sim, g = simxen_guest
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    xs = XenStore(sim.xenstore_path(0))
    before = nodes(xs, g)
    p = start(sim, "guest1", "--path", str(fifo), *extra)
    rc, err = finish(p, timeout=30)
    assert rc == 1 and "cannot open the storage" in err and "is not a" in err, err
    assert nodes(xs, g) == before
    xs.close()


@pytest.mark.parametrize("signame", ["SIGHUP", "SIGQUIT", "SIGUSR1", "SIGALRM"])
def test_other_signals_unplug_cleanly(simxen_guest, disk, signame):
    """SIGHUP (the terminal or ssh session closed: stderr is gone too), SIGQUIT, SIGUSR1,
    SIGALRM: each would kill the process by default, leaving its nodes in XenStore; each
    unplugs like Ctrl-C instead, and a stderr that fails (EIO) does not stop the clean-up."""
    import pty
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    before = nodes(xs, g)
    master, slave = pty.openpty()
    p = subprocess.Popen(cli("guest1", "--path", str(disk), "--xen", f"sim:{sim.dir}"),
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd"), what="the vbd")
        fe = Frontend(sim.xen(g), toolstack.xvd_devid(1))
        fe.connect()
        fe.write(0, b"h" * 4096)
        if signame == "SIGHUP":
            os.close(master)            # the terminal goes away
            master = None
        p.send_signal(getattr(signal, signame))
        wait_for(lambda: xs.read(f"{fe.be_path}/state") == "5", what="backend Closing")
        fe.close()
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
        if master is not None:
            os.close(master)
    assert nodes(xs, g) == before
    xs.close()
    assert disk.read_bytes()[:4096] == b"h" * 4096


def test_stats_file_is_private_and_never_follows_a_link(tmp_path):
    """--stats, as root, once a second: a symlink planted where the temporary file used to
    be (a guessable name) or at the stats path itself must never have its target written;
    the file is for the operator only (0600)."""
    from xapi_storage.blkback.stats import write_json_atomically
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "stats.json"
    os.symlink(str(victim), f"{path}.tmp{os.getpid()}")
    os.symlink(str(victim), str(path))
    write_json_atomically(str(path), {"a": 1})
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_text()) == {"a": 1}
    assert os.stat(str(path)).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        ["victim", "stats.json", f"stats.json.tmp{os.getpid()}"])


def test_real_xen_without_xenstored_is_a_message(tmp_path):
    """`--xen real` where no xenstored listens (dom0 without Xen running, or a wrong
    XENSTORED_PATH): a one-line error and exit 1, not a traceback."""
    env = dict(os.environ, XENSTORED_PATH=str(tmp_path / "no-such-socket"))
    p = subprocess.run(cli("0", "--backend", "null", "--size", "1048576", "--xen", "real"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=env, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "error: cannot reach Xen" in p.stderr and "Traceback" not in p.stderr, p.stderr
