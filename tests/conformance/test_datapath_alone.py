"""`xapi-storage conformance` against a datapath plugin on its own (--uri): our blkback passes
every check that applies, on a scratch file and on a loop device, and leaves nothing behind;
a throw-away datapath with one planted defect each (toyplugins/conformance_dp_defects.py)
makes exactly its own check fail; usage errors exit 2."""

import os
import subprocess
import sys

import pytest

from xapi_storage.conformance import DATAPATH_CHECKS
from xapi_storage.testing import need_loop_devices

TOYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyplugins")
DEFECTS = [c.name for c in DATAPATH_CHECKS]


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TOYS] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(XAPI_STORAGE_SYSLOG="0", XAPI_STORAGE_DATAPATH_STATE=str(tmp_path / "dpstate"),
               **extra)
    return env


def _install(install_plugin, module):
    need_loop_devices("the datapath conformance run")
    sys.path.insert(0, TOYS)        # the installer imports the module to plan its executables
    try:
        return install_plugin("datapath", "blkback", module)
    finally:
        sys.path.remove(TOYS)


def _loops_on(prefix):
    """Loop devices whose backing file is under `prefix` (deleted or not)."""
    from xapi_storage.datapath.blkback import _sys
    return sorted(n for n in os.listdir("/sys/block") if n.startswith("loop")
                  and (_sys(n, "loop", "backing_file") or "").startswith(prefix))


def _scratch(tmp_path):
    """The run's scratch directory: its own per test (runs of other tests and interpreters go
    on at the same time)."""
    d = tmp_path / "scratch"
    d.mkdir()
    return str(d)


@pytest.mark.parametrize("uri", ["blkback://{file}", "blkback://{loop}"])
def test_blkback_passes_every_applicable_check(uri, install_plugin, conformance, tmp_path):
    d = _install(install_plugin, "xapi_storage.datapath.blkback")
    scratch = _scratch(tmp_path)
    report = conformance(d, uris=[uri], repeat=3, parallel=4, env=_env(tmp_path),
                         scratch_dir=scratch)
    report.assert_ok()
    want = {c.name: "PASS" for c in DATAPATH_CHECKS}
    want["nonpersistent"] = "SKIP"          # blkback does not declare NONPERSISTENT
    assert {r.name: r.status for r in report.results} == want, report.table()
    assert "does not declare NONPERSISTENT" in report.results[4].detail
    # nothing left: no datapath state, no loop device on the run's files, no work directory
    assert not any(f for _, _, f in os.walk(str(tmp_path / "dpstate")))
    assert os.listdir(scratch) == []
    assert _loops_on(scratch) == []


@pytest.fixture
def toy(install_plugin, tmp_path):
    d = _install(install_plugin, "conformance_dp_defects")
    yield d
    for n in _loops_on(str(tmp_path)):          # what the cleanup defect left
        subprocess.run(["losetup", "-d", "/dev/" + n])


def _run_toy(conformance, d, tmp_path, defect="", uri="blkback://{file}", only=(), **env):
    state = tmp_path / "state"
    state.mkdir()
    return conformance(d, uris=[uri], repeat=2, parallel=3, only=only,
                       scratch_dir=_scratch(tmp_path),
                       env=_env(tmp_path, CONFORMANCE_DEFECT=defect,
                                CONFORMANCE_STATE=str(state), **env))


def test_the_toy_without_a_defect_passes_every_check(toy, conformance, tmp_path):
    report = _run_toy(conformance, toy, tmp_path)
    assert [r.status for r in report.results] == ["PASS"] * len(DATAPATH_CHECKS), report.table()


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_planted_defect_fails_exactly_its_check(defect, toy, conformance, tmp_path):
    if defect == "plugin-query":
        os.unlink(os.path.join(toy, "Datapath.detach"))     # installed without detach
    report = _run_toy(conformance, toy, tmp_path, defect)
    assert [r.name for r in report.failed] == [defect], report.table()
    assert report.teardown == [], report.table()
    if defect != "cleanup":
        assert _loops_on(str(tmp_path)) == [], report.table()


def test_bad_uris_also_names_a_missing_file_in_a_loop_uri(toy, conformance, tmp_path):
    """A datapath that takes block devices ({loop}) is also given a path that does not exist:
    the toy's planted bad-uris defect (a made-up backend for it) fails the check there too."""
    report = _run_toy(conformance, toy, tmp_path, "bad-uris", uri="blkback://{loop}",
                      only=["bad-uris"])
    assert [r.name for r in report.failed] == ["bad-uris"], report.table()
    assert "a file that does not exist" in report.failed[0].detail
    assert report.teardown == [] and _loops_on(str(tmp_path)) == [], report.table()


@pytest.mark.parametrize("defect", ["", "dom0-plug"])
def test_the_unplug_after_a_failed_check_closes_only_what_was_opened(defect, toy, conformance,
                                                                     tmp_path):
    """With NONPERSISTENT, the unplug after a failed check ends an epoch (Datapath.close) only
    where one was begun (Datapath.open), as the toolstack does: a plugin that refuses to close
    what it never opened is not blamed for it in the teardown."""
    report = _run_toy(conformance, toy, tmp_path, defect, CONFORMANCE_STRICT_CLOSE="1")
    assert [r.name for r in report.failed] == ([defect] if defect else []), report.table()
    assert report.teardown == [], report.table()


def test_a_bad_uri_that_was_attached_anyway_is_detached(toy, conformance, tmp_path):
    """A datapath that makes and attaches the missing file it was given fails bad-uris, and
    the run detaches what it attached: no loop device left over the removed file."""
    report = _run_toy(conformance, toy, tmp_path, "bad-uris-made", only=["bad-uris"])
    assert [r.name for r in report.failed] == ["bad-uris"], report.table()
    assert "a file that does not exist" in report.failed[0].detail
    assert report.teardown == [] and _loops_on(str(tmp_path)) == [], report.table()
    assert not any(f for _, _, f in os.walk(str(tmp_path / "dpstate")))


def _cli(*args, env=None, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "xapi_storage.cli", "conformance"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600, env=env, preexec_fn=preexec_fn)


def test_usage_errors_of_a_datapath_run_exit_2(tmp_path):
    d = tmp_path / "datapath" / "acme+nbd"
    d.mkdir(parents=True)
    for args, says in (([], "give --uri"), (["--uri", "nbd://x"], "its scheme is not"),
                       (["--uri", "acme+nbd://{file}", "-c", "a=b"], "for a volume plugin"),
                       (["--uri", "acme+nbd://{file}", "--size", "10"], "at least 1 MiB"),
                       (["--uri", "acme+nbd://{file}", "--timeout", "inf"], "above 0"),
                       (["--uri", "acme+nbd://{file}", "--timeout", "nan"], "above 0"),
                       (["--uri", "acme+nbd://{file}", "--timeout", "0"], "above 0")):
        out = _cli(str(d), *args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
    vol = tmp_path / "volume" / "org.xen.xapi.storage.x"
    vol.mkdir(parents=True)
    out = _cli(str(vol), "--uri", "x://y")
    assert out.returncode == 2 and "--uri is for a datapath plugin" in out.stderr


@pytest.mark.parametrize("uri", ["blkback://{file}", "blkback://{loop}"])
def test_scratch_storage_the_run_cannot_make_is_a_clear_error(uri, install_plugin, tmp_path):
    """A scratch file the filesystem refuses (here: a file size limit under --size, as a full
    or quota-bound filesystem refuses it): one line saying so, exit 2, no traceback, and the
    run's scratch directory gone."""
    import resource
    d = _install(install_plugin, "xapi_storage.datapath.blkback")
    scratch = _scratch(tmp_path)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    out = _cli(d, "--uri", uri, env=_env(tmp_path, TMPDIR=scratch), preexec_fn=limit)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot make the scratch storage of --uri" in out.stderr, out.stderr
    assert "nothing was checked" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert os.listdir(scratch) == []
    assert _loops_on(scratch) == []


def test_list_names_the_datapath_checks():
    out = _cli("--list")
    assert out.returncode == 0
    assert "checks of a datapath plugin:" in out.stdout and "live-migration" in out.stdout


def test_pyblkback_passes_every_check_on_the_simulated_xen(install_plugin, conformance, simxen,
                                                           tmp_path):
    """pyblkback declares NONPERSISTENT (so every check runs) and answers a dom0 plug with an
    Nbd only (xapi runs nbd-client on it); it serves through XenStore: the simulated Xen's."""
    import tempfile
    d = install_plugin("datapath", "pyblkback", "xapi_storage.datapath.pyblkback")
    run = tempfile.mkdtemp(prefix="pbb-", dir="/tmp")      # short: unix socket paths
    try:
        report = conformance(d, uris=["pyblkback://{file}"], repeat=2, parallel=3, timeout=60,
                             scratch_dir=_scratch(tmp_path), env=_env(tmp_path, XAPI_STORAGE_XEN=f"sim:{simxen.dir}",
                                      XAPI_STORAGE_PYBLKBACK_RUN=run,
                                      XAPI_STORAGE_PYBLKBACK_LOG=str(tmp_path / "log"),
                                      XAPI_STORAGE_PYBLKBACK_SYSTEMD="0"))
        assert [r.status for r in report.results] == ["PASS"] * len(DATAPATH_CHECKS), \
            report.table()
        assert report.teardown == []
        assert os.listdir(run) == []                # no server left
        assert not any(f for _, _, f in os.walk(str(tmp_path / "dpstate")))
    finally:
        import shutil
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_mid_run_leaves_nothing(sig, install_plugin, tmp_path):
    """A CI job cancelled during the run (SIGTERM), an operator's ssh session gone (SIGHUP):
    exit 130 after the teardown unplugged everything and removed the scratch loop device and
    file."""
    import signal
    import time
    d = _install(install_plugin, "xapi_storage.datapath.blkback")
    scratch = _scratch(tmp_path)
    env = _env(tmp_path, TMPDIR=scratch)
    p = subprocess.Popen([sys.executable, "-m", "xapi_storage.cli", "conformance", d, "--uri",
                          "blkback://{loop}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, env=env)
    time.sleep(1.0)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "interrupted; what the run made was destroyed" in err
    assert os.listdir(scratch) == []
    assert _loops_on(scratch) == []
    assert not any(f for _, _, f in os.walk(str(tmp_path / "dpstate")))


def test_a_signal_during_the_teardown_waits_for_it(toy, tmp_path):
    """SIGTERM mid-check, then again at every deactivate (the check's own unplug and the
    teardown's): the teardown still unplugs everything and removes the loop device and the
    scratch file, then the run ends as interrupted (exit 130)."""
    scratch = _scratch(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "registered").touch()          # the signal at the registration: the test below
    env = _env(tmp_path, TMPDIR=scratch, CONFORMANCE_DEFECT="signals",
               CONFORMANCE_STATE=str(state))
    out = _cli(toy, "--uri", "blkback://{loop}", "--only", "vm-lifecycle", env=env)
    assert out.returncode == 130, out.stdout + out.stderr
    assert "interrupted; what the run made was destroyed" in out.stderr
    assert os.path.exists(state / "signalled")
    assert os.listdir(scratch) == []
    assert _loops_on(scratch) == []
    assert not any(f for _, _, f in os.walk(str(tmp_path / "dpstate")))


def test_a_signal_at_the_registration_leaves_nothing(toy, tmp_path):
    """SIGTERM while the daemon's registration (Plugin.Query, before any check) runs: exit 130
    and the run's temporary plugin root is gone."""
    scratch = _scratch(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    env = _env(tmp_path, TMPDIR=scratch, CONFORMANCE_DEFECT="signals",
               CONFORMANCE_STATE=str(state))
    out = _cli(toy, "--uri", "blkback://{file}", env=env)
    assert out.returncode == 130, out.stdout + out.stderr
    assert os.path.exists(state / "registered")
    assert os.listdir(scratch) == []

