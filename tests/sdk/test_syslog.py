"""Real syslog: the executable runs in a private mount namespace whose /dev is a fresh tmpfs
holding a UNIX datagram socket at /dev/log (where the C library's syslog() writes), so we read
exactly what SMlog would get, without touching the host's logger."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from .helpers import plugin_env

LISTENER = r"""
import json, os, socket, subprocess, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
exe, request = sys.argv[1], sys.argv[2]
p = subprocess.run([exe, "--json"], input=request.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
s.settimeout(0.5)
lines = []
try:
    while True:
        lines.append(s.recv(65536).decode())
except socket.timeout:
    pass
print(json.dumps({"rc": p.returncode, "stdout": p.stdout.decode(), "syslog": lines}))
"""


def can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not can_unshare(), reason="needs root and mount namespaces")


def run_with_syslog(exe, request):
    env = plugin_env()
    env.pop("XAPI_STORAGE_SYSLOG")
    script = "mount -t tmpfs tmpfs /dev && exec \"$0\" -c \"$1\" \"$2\" \"$3\""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        sys.executable, LISTENER, str(exe), json.dumps(request)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lines_reach_syslog_local2_with_prefix_and_request_id(toy_dir):
    out = run_with_syslog(toy_dir / "Plugin.diagnostics", {"dbg": "OpaqueRef:77\n{\"trace\":1}"})
    assert out["rc"] == 0 and out["stdout"] == '"all fine"\n'
    info = [l for l in out["syslog"] if "diagnostics for" in l]
    assert len(info) == 1, out["syslog"]
    line = info[0]
    # <PRI> = facility local2 (18) * 8 + severity info (6) = 150
    assert line.startswith("<150>"), line
    assert "SMAPIv3: [" in line
    assert " - INFO - OpaqueRef:77 - Plugin.diagnostics: diagnostics for OpaqueRef:77" in line
    assert all(l.startswith(("<151>", "<150>")) for l in out["syslog"])  # debug / info


def test_failures_reach_syslog_at_error(toy_dir):
    out = run_with_syslog(toy_dir / "Volume.revert", {"dbg": "r1", "sr": "s", "key": "k", "snapshot": "s"})
    assert out["rc"] == 1
    errors = [l for l in out["syslog"] if l.startswith("<147>")]  # local2.err = 18*8+3
    assert any("ERROR - r1 - Volume.revert: failed in" in l and "something broke" in l for l in errors), out
