"""tests/xen/dom0_conformance.py's own bounded run of `xapi-storage conformance` (the script
itself runs in dom0 of the test bed; this part needs no Xen): a run that outlives its time
gets SIGTERM, so that its teardown still destroys what it made, not SIGKILL."""

import importlib.util
import os
import sys

import pytest

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "xen",
                    "dom0_conformance.py")


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("dom0_conformance", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _command(tmp_path, on_term):
    """An executable standing in for `xapi-storage`: prints a line, then waits; on SIGTERM it
    runs `on_term` (Python source) and exits 130."""
    exe = tmp_path / "xapi-storage"
    exe.write_text(f"""#!{sys.executable}
import signal, sys, time
def term(signum, frame):
{on_term}
    sys.exit(130)
signal.signal(signal.SIGTERM, term)
print("started", flush=True)
time.sleep(60)
""")
    exe.chmod(0o755)
    return str(exe)


def test_a_run_past_its_time_gets_sigterm_and_its_teardown_runs(script, tmp_path, monkeypatch,
                                                                 capsys):
    marker = tmp_path / "teardown-ran"
    monkeypatch.setattr(script, "XAPI_STORAGE", _command(
        tmp_path, f"    open({str(marker)!r}, 'w').close()\n    print('torn down')"))
    monkeypatch.setattr(script, "RUN_TIMEOUT", 1)
    rc = script.conformance(str(tmp_path), {}, [], dict(os.environ))
    out = capsys.readouterr().out
    assert rc == 130 and marker.exists(), out
    assert "started" in out and "torn down" in out
    assert "TIMEOUT: no end within 1 s; sent SIGTERM; exit 130" in out


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace(script, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(script, "XAPI_STORAGE", _command(tmp_path, "    time.sleep(60)"))
    monkeypatch.setattr(script, "RUN_TIMEOUT", 1)
    monkeypatch.setattr(script, "GRACE", 1)
    rc = script.conformance(str(tmp_path), {}, [], dict(os.environ))
    out = capsys.readouterr().out
    assert rc == -9, out
    assert "sent SIGTERM, then SIGKILL after 1 s; exit -9" in out
