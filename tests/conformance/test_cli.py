"""`xapi-storage conformance` as a vendor runs it: the table, JUnit XML, exit status, usage
errors; and the caller never waits forever on a hung plugin."""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from xapi_storage.conformance.caller import Caller

HERE = os.path.dirname(os.path.abspath(__file__))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "xapi_storage.cli", "conformance"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600, env=env)


def test_table_junit_and_exit_status(install_plugin, tmp_path):
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    sr = tmp_path / "sr"
    junit = tmp_path / "junit.xml"
    out = _cli(d, "-c", f"path={sr}", "--repeat", "2", "--parallel", "3", "--junit", str(junit),
               "--hide-storage", 'mv "$XAPI_STORAGE_CONFIG_PATH" "$XAPI_STORAGE_CONFIG_PATH.x"',
               "--restore-storage", 'mv "$XAPI_STORAGE_CONFIG_PATH.x" "$XAPI_STORAGE_CONFIG_PATH"')
    assert out.returncode == 0, out.stdout + out.stderr
    # no datapath plugin beside it in this root: the datapath check is skipped
    assert "17 checks: 16 passed, 0 failed, 1 skipped" in out.stdout
    assert "plugin: file-raw" in out.stdout
    suite = ET.parse(str(junit)).getroot()
    assert suite.get("tests") == "17" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")][:2] == ["plugin-query", "sr-attach"]
    assert os.listdir(str(sr)) == []


def test_a_failing_check_gives_exit_1_and_a_junit_failure(install_plugin, tmp_path):
    sys.path.insert(0, os.path.join(HERE, "toyplugins"))
    try:
        d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "conformance_defects")
    finally:
        sys.path.pop(0)
    env = dict(os.environ, CONFORMANCE_DEFECT="snapshot", XAPI_STORAGE_SYSLOG="0",
               PYTHONPATH=os.pathsep.join([os.path.join(HERE, "toyplugins"),
                                           os.environ.get("PYTHONPATH", "")]))
    junit = tmp_path / "junit.xml"
    out = _cli(d, "-c", f"path={tmp_path / 'sr'}", "--only", "snapshot", "--junit", str(junit),
               env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    row = next(l for l in out.stdout.splitlines() if l.startswith("snapshot"))
    assert "FAIL" in row and "read-only" in out.stdout
    failures = [c for c in ET.parse(str(junit)).getroot().iter("testcase")
                if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["snapshot"]


def test_usage_errors_exit_2(tmp_path):
    assert _cli(str(tmp_path)).returncode == 2                       # not a plugin directory
    vol = tmp_path / "volume" / "org.xen.xapi.storage.x"
    vol.mkdir(parents=True)
    for args in (["-c", "novalue"], ["--only", "no-such-check"],
                 ["--hide-storage", "true"]):
        out = _cli(str(vol), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "xapi-storage conformance:" in out.stderr


def test_list_names_every_check():
    out = _cli("--list", "x")
    assert out.returncode == 0
    assert "storage-gone" in out.stdout and "results-valid" in out.stdout


def test_a_hung_plugin_is_killed_with_its_children(tmp_path):
    d = tmp_path / "volume" / "org.xen.xapi.storage.hang"
    d.mkdir(parents=True)
    exe = d / "Volume.stat"
    # the executable starts a child that keeps stdout open, then hangs itself
    exe.write_text("#!/bin/sh\nsleep 300 &\necho $! > %s\nsleep 300\n" % (tmp_path / "child"))
    exe.chmod(0o755)
    t0 = time.monotonic()
    out = Caller(str(d), timeout=1).call("Volume.stat", {"dbg": "t", "sr": "s", "key": "k"})
    assert time.monotonic() - t0 < 30
    assert out.timed_out and not out.ok
    assert "no answer within the timeout" in out.describe()
    child = int((tmp_path / "child").read_text())
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}") or \
                open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the plugin's child {child} survived")


def test_sigterm_mid_run_still_destroys_what_the_run_made(install_plugin, tmp_path):
    import signal
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    sr = tmp_path / "sr"
    p = subprocess.Popen([sys.executable, "-m", "xapi_storage.cli", "conformance", d,
                          "-c", f"path={sr}", "--repeat", "50"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    # wait until the run is inside the checks (volumes exist), then stop it
    for _ in range(600):
        if sr.is_dir() and any(n.endswith(".img") for n in os.listdir(str(sr))):
            break
        time.sleep(0.05)
    else:
        p.kill()
        raise AssertionError("the run never made a volume")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, out + err
    assert "interrupted" in err
    assert not sr.exists() or os.listdir(str(sr)) == [], os.listdir(str(sr))


def test_the_table_reaches_an_ascii_stdout(monkeypatch):
    """Python 3.6 under the C locale writes ASCII; a detail may hold any character."""
    import io
    from xapi_storage.conformance import cli
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    cli._write("key 'ünïcödé' ✓\n")
    assert raw.getvalue() == b"key '\\xfcn\\xefc\\xf6d\\xe9' \\u2713\n"
