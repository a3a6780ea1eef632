"""The daemon's lifecycle, its control socket, and the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xapi_storage.xen import XenError
from xapi_storage.xen.sim import running, layout


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    return [int(x) for x in out.stdout.split()]


def test_shutdown_leaves_nothing(tmp_path):
    d = str(tmp_path / "xen")
    with running(d) as sim:
        pid = sim.proc.pid
        g = sim.create_domain("g")
        xen = sim.xen(g)
        e = xen.event_channels()                       # clients still open at shutdown
        a = xen.grant_allocator()
        a.grant(0, 2)
        e.alloc_unbound(0)
        assert os.path.exists(layout.xenstore_sock(d, g))
        assert os.path.exists(layout.mem_file(d, g))
    assert not os.path.exists(d), os.listdir(d)       # everything gone, DIR included
    assert sim.proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    e.close()
    a.close()


def test_existing_dir_is_kept_but_emptied_of_our_files(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with running(str(tmp_path)):
        pass
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_second_daemon_on_same_dir_is_refused(simxen):
    with pytest.raises(XenError):
        with running(simxen.dir):
            pass


def test_control_rejects_bad_requests(simxen):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(layout.control_sock(simxen.dir))
    f = s.makefile("rwb")
    for line in (b"not json", b"[1,2]", b'{"op": "nope"}', b'{"op": "create_domain"}',
                 b'{"op": "create_domain", "name": "bad name!"}',
                 b'{"op": "destroy_domain", "domid": -1}', b'{"op": "destroy_domain", "domid": 0}',
                 b'{"op": "reserve", "domid": 0, "frames": 99999999, "refs": 0}'):
        f.write(line + b"\n")
        f.flush()
        res = json.loads(f.readline())
        assert res["ok"] is False and res["error"] and res["message"], line
    try:
        f.write(b"x" * (1 << 17))                      # an endless line: dropped
        f.flush()
        assert f.readline() == b""
    except (ConnectionResetError, BrokenPipeError):
        pass                                           # dropped while we were still writing
    s.close()
    simxen.create_domain("fine")
    with pytest.raises(XenError):
        simxen.create_domain("fine")                   # names are unique


def test_cli(tmp_path):
    d = str(tmp_path / "x")
    exe = [sys.executable, "-m", "xapi_storage.cli", "simxen"]
    p = subprocess.Popen(exe + ["run", d], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert "ready" in p.stdout.readline()
        out = subprocess.run(exe + ["create-domain", d, "vm1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, check=True)
        assert out.stdout.strip() == "1"
        out = subprocess.run(exe + ["list-domains", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, check=True)
        assert out.stdout.split("\n")[:2] == ["0\tDomain-0", "1\tvm1"]
        out = subprocess.run(exe + ["ls", d, "/local/domain/1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, check=True)
        assert "name = 'vm1'  (n0 r1)" in out.stdout
        subprocess.run(exe + ["destroy-domain", d, "vm1"], check=True)
        out = subprocess.run(exe + ["destroy-domain", d, "vm1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
        assert out.returncode == 1 and "no domain" in out.stderr
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
    assert not os.path.exists(d)
    out = subprocess.run(exe + ["list-domains", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    assert out.returncode == 1 and "not reachable" in out.stderr


def test_client_processes_dying_leave_no_files(simxen_guest):
    sim, g = simxen_guest
    code = ("import sys; from xapi_storage.xen import open_xen;"
            "x = open_xen('sim:' + sys.argv[1], domid=int(sys.argv[2]));"
            "e = x.event_channels(); e.alloc_unbound(0); a = x.grant_allocator(); a.grant(0, 1);"
            "import os; os.kill(os.getpid(), 9)")
    for _ in range(3):
        subprocess.run([sys.executable, "-c", code, sim.dir, str(g)])
    deadline = time.monotonic() + 5
    while os.listdir(os.path.join(sim.dir, "evtchn")):
        assert time.monotonic() < deadline, os.listdir(os.path.join(sim.dir, "evtchn"))
        time.sleep(0.01)


def test_restart_after_a_killed_daemon(tmp_path):
    d = str(tmp_path / "x")
    from xapi_storage.xen.sim import start
    sim = start(d)
    sim.create_domain("g")
    sim.proc.kill()                                    # no cleanup at all
    sim.proc.wait()
    assert os.path.exists(layout.pid_file(d))
    with running(d) as sim2:                           # a stale pid file is not a daemon
        assert [x["name"] for x in sim2.domains()] == ["Domain-0"]
        assert not os.path.exists(layout.mem_file(d, 1))
    assert not os.path.exists(d) or not os.listdir(d)
