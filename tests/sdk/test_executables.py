"""The installed executables, called exactly as xapi-storage-script calls them: argv
[path, "--json"], the named arguments as one JSON object on stdin, stdout holding exactly one
JSON value, exit status 0 or 1 with an error record. Also the command-line mode static-vdis
uses, --help, case-insensitive names, and stray output."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from .helpers import TOY, assert_error_record, plugin_env, run_exe

VOL = {"dbg": "OpaqueRef:1\n{\"trace\": 1}", "name": "disk0", "description": "", "size": 10737418240,
       "sharable": False}


def test_plugin_query(toy_dir):
    r = run_exe(toy_dir / "Plugin.Query", {"dbg": "register"})
    assert r.rc == 0, r
    assert r.value["plugin"] == "toy" and r.value["required_api_version"] == "5.0"
    assert r.stdout.count("\n") == 1


def test_volume_lifecycle_through_executables(toy_dir, sr):
    r = run_exe(toy_dir / "Volume.create", {**VOL, "sr": sr})
    assert r.rc == 0, r
    vol = r.value
    assert vol["virtual_size"] == 10737418240 and vol["uuid"]
    assert run_exe(toy_dir / "Volume.stat", {"dbg": "d", "sr": sr, "key": vol["key"]}).value == vol
    assert run_exe(toy_dir / "SR.ls", {"dbg": "d", "sr": sr}).value == [vol]
    r = run_exe(toy_dir / "Volume.destroy", {"key": vol["key"], "sr": sr, "dbg": "d"})  # reversed order
    assert (r.rc, r.stdout) == (0, "null\n")
    r = run_exe(toy_dir / "Volume.stat", {"dbg": "d", "sr": sr, "key": vol["key"]})
    assert r.rc == 1
    assert_error_record(r.value, "SR_BACKEND_FAILURE", "Volume_does_not_exist")
    assert r.value["params"] == ["Volume_does_not_exist", vol["key"]]


def test_stdin_is_read_whole_even_over_many_lines(toy_dir, sr):
    text = json.dumps({**VOL, "sr": sr}, indent=2) + "\n\n"
    r = run_exe(toy_dir / "Volume.create", stdin=text)
    assert r.rc == 0, r


def test_stdin_may_be_large(toy_dir):
    big = {"dbg": "d", "configuration": {f"k{i}": "v" * 100 for i in range(5000)}}
    r = run_exe(toy_dir / "SR.attach", big)
    assert r.rc == 1 and r.value["params"][0] == "SR_does_not_exist"


@pytest.mark.parametrize("exe,request_,first,where", [
    ("Volume.create", {"dbg": "d", "sr": "s"}, "Invalid_request", "name"),
    ("Volume.create", {**VOL, "sr": "s", "size": "ten"}, "Invalid_request", "size"),
    ("Volume.create", {**VOL, "sr": "s", "size": 1.5}, "Invalid_request", "size"),
    ("Volume.snapshot", {"dbg": "d", "sr": "/nonexistent", "key": "k"}, "Volume_does_not_exist", None),
    ("Volume.revert", {"dbg": "d", "sr": "s", "key": "k", "snapshot": "s"}, "ValueError", None),
    ("Volume.enable_cbt", None, None, None),
])
def test_error_paths(toy_dir, exe, request_, first, where):
    path = toy_dir / exe
    if not path.exists():  # an unimplemented method has no executable: the daemon says SCRIPT_MISSING
        assert exe == "Volume.enable_cbt"
        return
    r = run_exe(path, request_)
    assert r.rc == 1, r
    assert_error_record(r.value, "SR_BACKEND_FAILURE", first)
    if where:
        assert r.value["params"][1] == exe and r.value["params"][2] == where


def test_plugin_bugs_are_invalid_results(toy_dir, sr):
    vol = run_exe(toy_dir / "Volume.create", {**VOL, "sr": sr}).value
    for exe, where in (("Volume.snapshot", "uuid"), ("Volume.clone", "virtual_size")):
        r = run_exe(toy_dir / exe, {"dbg": "d", "sr": sr, "key": vol["key"]})
        assert r.rc == 1
        assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_result")
        assert r.value["params"][1:3] == [exe, where]
        assert "sdk_toy.py" not in " ".join(r.value["backtrace"]["files"])  # raised by the SDK


def test_xenapi_error_code_passes_through(toy_dir):
    r = run_exe(toy_dir / "Volume.set_name", {"dbg": "d", "sr": "s", "key": "k", "new_name": "x"})
    assert (r.rc, r.value["code"], r.value["params"]) == (1, "SR_BACKEND_FAILURE_79",
                                                         ["VDI Invalid size", "shrinking not allowed"])
    assert any(f.endswith("sdk_toy.py") for f in r.value["backtrace"]["files"])


def test_plugin_calling_sys_exit_still_gives_an_error_record(toy_dir):
    r = run_exe(toy_dir / "Volume.set_description", {"dbg": "d", "sr": "s", "key": "k", "new_description": ""})
    assert r.rc == 1
    assert r.value["params"] == ["SystemExit", "3"]


def test_stray_output_never_reaches_stdout(toy_dir):
    # the plugin prints, writes to fd 1 and runs a child that prints: all of it goes to stderr
    r = run_exe(toy_dir / "Plugin.diagnostics", {"dbg": "d"})
    assert (r.rc, r.stdout) == (0, '"all fine"\n'), r
    for s in ("a stray print from the plugin", "a stray write to fd 1", "a stray print from a child"):
        assert s in r.stderr


@pytest.mark.parametrize("name", ["plugin.query", "PLUGIN.QUERY", "Plugin.query", "pLuGiN.qUeRy"])
def test_dispatch_is_case_insensitive(toy_dir, tmp_path, name):
    d = tmp_path / TOY
    d.mkdir()
    shutil.copy(toy_dir / "Plugin.Query", d / name)
    r = run_exe(d / name, {"dbg": "d"})
    assert r.rc == 0 and r.value["plugin"] == "toy"


def test_symlinked_executable_dispatches_on_its_own_name(toy_dir, tmp_path):
    (tmp_path / "SR.stat").symlink_to(toy_dir / "Plugin.Query")
    r = run_exe(tmp_path / "SR.stat", {"dbg": "d", "sr": "x"})
    assert r.rc == 0 and r.value["health"] == ["Healthy", ""]


def test_unknown_name_gives_an_error_record(toy_dir, tmp_path):
    shutil.copy(toy_dir / "Plugin.Query", tmp_path / "plugin.py")
    r = run_exe(tmp_path / "plugin.py", {"dbg": "d"})
    assert r.rc == 1
    assert_error_record(r.value, "SR_BACKEND_FAILURE", "Unknown_method")
    r = run_exe(tmp_path / "plugin.py", args=("--help",), parse=False)
    assert r.rc == 0 and "Volume.create" in r.stdout and "not a method" in r.stdout


def test_help(toy_dir):
    r = subprocess.run([str(toy_dir / "Volume.create"), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True,
                       env=plugin_env())
    assert r.returncode == 0
    out = r.stdout
    assert out.startswith("Volume.create: Create a volume")
    assert f"Plugin: {TOY} (module sdk_toy)" in out
    assert "Volume.create DBG SR NAME DESCRIPTION SIZE SHARABLE" in out
    for line in ("  size             int64", "  sharable         bool", "Result: volume"):
        assert line in out
    r = subprocess.run([str(toy_dir / "SR.attach"), "-h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=plugin_env())
    assert "SR.attach DBG [--configuration KEY VALUE]..." in r.stdout
    assert "Implemented by this plugin: yes" in r.stdout


def test_help_on_every_executable(root):
    for kind_dir in (root / "volume", root / "datapath"):
        for plugin in kind_dir.iterdir():
            for exe in plugin.iterdir():
                if exe.name.startswith("."):
                    continue
                r = subprocess.run([str(exe), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, env=plugin_env())
                assert r.returncode == 0 and r.stdout.startswith(exe.name + ":"), (exe, r.stderr)
                assert "Parameters:" in r.stdout and "Result:" in r.stdout


# --- command-line mode (static-vdis) ----------------------------------------------------------

def cli(path, *args):
    return run_exe(path, args=args, stdin="")


def test_cli_mode_as_static_vdis_calls_it(toy_dir, sr):
    r = cli(toy_dir / "Plugin.Query", "static-vdis")
    assert r.rc == 0 and r.value["plugin"] == "toy"
    r = cli(toy_dir / "SR.attach", "static-vdis", "--configuration", "path", sr, "--configuration", "x", "y")
    assert (r.rc, r.value) == (0, sr)
    r = cli(toy_dir / "Volume.create", "static-vdis", sr, "n", "d", "1024", "TRUE")
    assert r.rc == 0, r
    key = r.value["key"]
    assert r.value["virtual_size"] == 1024 and r.value["sharable"] is True
    r = cli(toy_dir / "Volume.stat", "static-vdis", sr, key)
    assert r.rc == 0 and r.value["key"] == key
    r = cli(toy_dir / "Volume.list_changed_blocks", "static-vdis", sr, key, key, "0", "-1")
    assert r.rc == 0 and r.value["bitmap"] == "0:-1"


def test_cli_mode_datapath(root):
    dp = root / "datapath" / "toydp"
    r = cli(dp / "Datapath.attach", "static-vdis", "toydp:///dev/loop3", "0")
    assert r.rc == 0
    assert r.value["implementations"][1] == ["BlockDevice", {"path": "/dev/loop3"}]
    assert cli(dp / "Datapath.activate", "static-vdis", "toydp:///dev/loop3", "0").stdout == "null\n"
    assert cli(dp / "Datapath.open", "static-vdis", "u", "false").rc == 0
    r = cli(dp / "Datapath.open", "static-vdis", "u", "maybe")
    assert r.rc == 1 and r.value["params"][:4] == ["Invalid_request", "Datapath.open", "persistent", "type"]
    r = cli(dp / "Data.stat", "static-vdis", '["CopyV1", "x"]')
    assert r.rc == 0 and r.value["complete"] is True


@pytest.mark.parametrize("args,where,rule", [
    (("static-vdis",), "sr", "required"),
    (("static-vdis", "s", "k", "extra"), "(the value itself)", "command-line"),
    (("static-vdis", "s", "--bogus", "a", "b"), "bogus", "command-line"),
])
def test_cli_mode_errors(toy_dir, args, where, rule):
    r = cli(toy_dir / "Volume.stat", *args)
    assert r.rc == 1
    assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_request")
    assert r.value["params"][2:4] == [where, rule]


def test_cli_mode_map_option_needs_two_values(toy_dir):
    r = cli(toy_dir / "SR.attach", "d", "--configuration", "path")
    assert r.rc == 1 and r.value["params"][2:4] == ["configuration", "command-line"]


# --- runpy (xapi's observer) ------------------------------------------------------------------

def test_executable_runs_under_runpy_like_the_observer(toy_dir):
    # the observer shifts argv to [path, "--json"] and runs the file with runpy.run_path
    code = ("import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
            "runpy.run_path(path, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, str(toy_dir / "Plugin.Query"), "--json"],
                       input='{"dbg":"d"}', stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=plugin_env())
    assert r.returncode == 0 and json.loads(r.stdout)["plugin"] == "toy", r.stderr


# --- logging ----------------------------------------------------------------------------------

def test_logs_to_stderr_when_asked(toy_dir):
    env = plugin_env(XAPI_STORAGE_LOG_STDERR="1")
    r = run_exe(toy_dir / "Plugin.diagnostics", {"dbg": "OpaqueRef:abc\n{\"traceparent\": 1}"}, env=env)
    assert r.rc == 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("SMAPIv3: ")]
    assert any(" - INFO - OpaqueRef:abc - Plugin.diagnostics: diagnostics for OpaqueRef:abc" in l for l in lines), lines
    assert any(" - DEBUG - OpaqueRef:abc - Plugin.diagnostics: ok in " in l for l in lines), lines
    assert all("traceparent" not in l.split(" - ")[2] for l in lines)
    r = run_exe(toy_dir / "Plugin.diagnostics", {"dbg": "d"})  # not asked: silent
    assert "SMAPIv3:" not in r.stderr


def test_failure_is_logged_with_its_record(toy_dir):
    env = plugin_env(XAPI_STORAGE_LOG_STDERR="1", XAPI_STORAGE_LOG_LEVEL="error")
    r = run_exe(toy_dir / "Volume.revert", {"dbg": "req-7", "sr": "s", "key": "k", "snapshot": "s"}, env=env)
    lines = [l for l in r.stderr.splitlines() if l.startswith("SMAPIv3: ")]
    assert any("ERROR - req-7 - Volume.revert: failed in" in l and '["ValueError","something broke"]' in l
               for l in lines), lines
    assert not any(" - DEBUG - " in l for l in lines)


def test_secret_configuration_values_are_not_logged(toy_dir):
    env = plugin_env(XAPI_STORAGE_LOG_STDERR="1")
    r = run_exe(toy_dir / "SR.attach", {"dbg": "d", "configuration": {"chappassword": "hunter2", "path": "/x"}}, env=env)
    assert "hunter2" not in r.stderr and "<hidden>" in r.stderr


def test_cli_mode_failure_is_also_said_on_stderr(toy_dir):
    r = cli(toy_dir / "Volume.stat", "static-vdis", "/nonexistent", "k")
    assert r.rc == 1 and r.value["params"] == ["Volume_does_not_exist", "k"]
    assert 'Volume.stat: SR_BACKEND_FAILURE ["Volume_does_not_exist","k"]' in r.stderr


def test_stdin_that_is_not_utf8(toy_dir):
    r = run_exe(toy_dir / "Plugin.Query", stdin=b'{"dbg":"\xff"}')
    assert r.rc == 1
    assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_request")
    assert r.value["params"][3] == "json"


def test_plugin_module_that_fails_to_import(tmp_path):
    from xapi_storage import installer
    exe = tmp_path / "Plugin.Query"
    exe.write_text(installer.shim_source("sdk_toy_broken", sys.executable))
    exe.chmod(0o755)
    r = run_exe(exe, {"dbg": "d"})
    assert r.rc == 1
    assert_error_record(r.value, "SR_BACKEND_FAILURE", "Plugin_load_failed")
    assert r.value["params"][1:] == ["sdk_toy_broken", "cannot import sdk_toy_broken: RuntimeError: "
                                     "this plugin is broken on purpose"]
    r = run_exe(exe, args=("--help",), parse=False)  # --help still documents the method
    assert r.rc == 0 and r.stdout.startswith("Plugin.Query: Describe the plugin")


def test_result_that_is_not_json(tmp_path):
    mod = tmp_path / "setresult.py"
    mod.write_text("from xapi_storage.sdk import base\n"
                   "class P(base.Plugin):\n"
                   "    def ls(self, dbg):\n"
                   "        return {'a', 'b'}\n"
                   "    def diagnostics(self, dbg):\n"
                   "        return float('nan')\n"
                   "IMPLEMENTATIONS = {'Plugin': P}\n")
    from xapi_storage import installer
    env = plugin_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{plugin_env()['PYTHONPATH']}")
    for name in ("Plugin.ls", "Plugin.diagnostics"):
        exe = tmp_path / name
        exe.write_text(installer.shim_source("setresult", sys.executable))
        exe.chmod(0o755)
        r = run_exe(exe, {"dbg": "d"}, env=env)
        assert r.rc == 1
        assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_result")
        assert r.value["params"][3] == "type"


def test_plugin_that_closes_its_stdout_still_answers(tmp_path):
    mod = tmp_path / "closer.py"
    mod.write_text("import os, sys\nfrom xapi_storage.sdk import base\n"
                   "class P(base.Plugin):\n"
                   "    def diagnostics(self, dbg):\n"
                   "        sys.stdout.close()\n"
                   "        os.close(1)\n"
                   "        return 'still here'\n"
                   "IMPLEMENTATIONS = {'Plugin': P}\n")
    from xapi_storage import installer
    env = plugin_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{plugin_env()['PYTHONPATH']}")
    exe = tmp_path / "Plugin.diagnostics"
    exe.write_text(installer.shim_source("closer", sys.executable))
    exe.chmod(0o755)
    r = run_exe(exe, {"dbg": "d"}, env=env)
    assert (r.rc, r.value) == (0, "still here"), r


def test_cli_mode_values_after_double_dash_are_positional(toy_dir, sr):
    r = cli(toy_dir / "Volume.create", "static-vdis", sr, "--", "-h", "--json", "1", "false")
    assert r.rc == 0, r
    assert (r.value["name"], r.value["description"]) == ("-h", "--json")


def test_stdlib_logging_of_a_plugin_is_forwarded(tmp_path):
    (tmp_path / "usinglogging.py").write_text(
        "import logging\nfrom xapi_storage.sdk import base\n"
        "LOG = logging.getLogger('vendor.plugin')\n"
        "class P(base.Plugin):\n"
        "    def diagnostics(self, dbg):\n"
        "        LOG.debug('debug via logging')\n"
        "        LOG.warning('warned via logging')\n"
        "        return 'ok'\n"
        "IMPLEMENTATIONS = {'Plugin': P}\n")
    from xapi_storage import installer
    exe = tmp_path / "Plugin.diagnostics"
    exe.write_text(installer.shim_source("usinglogging", sys.executable))
    exe.chmod(0o755)
    env = plugin_env(XAPI_STORAGE_LOG_STDERR="1",
                     PYTHONPATH=f"{tmp_path}{os.pathsep}{plugin_env()['PYTHONPATH']}")
    r = run_exe(exe, {"dbg": "req-9"}, env=env)
    assert (r.rc, r.value) == (0, "ok"), r
    assert " - WARNING - req-9 - Plugin.diagnostics: vendor.plugin: warned via logging" in r.stderr
    assert " - DEBUG - req-9 - Plugin.diagnostics: vendor.plugin: debug via logging" in r.stderr


def test_stdin_never_closed_ends_with_an_error_record(toy_dir):
    """The daemon has no timeout: a --json call whose stdin is never closed (the request
    written, or not even that) answers Invalid_request after the stdin bound
    ($XAPI_STORAGE_STDIN_WAIT, default 60 s) instead of waiting forever."""
    import time
    env = dict(plugin_env(), XAPI_STORAGE_STDIN_WAIT="1")
    for written in (b"", b'{"dbg": "d"}'):
        p = subprocess.Popen([str(toy_dir / "Plugin.Query"), "--json"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            t0 = time.monotonic()
            p.stdin.write(written)
            p.stdin.flush()
            out = p.stdout.read()
            p.wait(timeout=30)
            assert 1 <= time.monotonic() - t0 < 20
            rec = json.loads(out)
            assert_error_record(rec, "SR_BACKEND_FAILURE", "Invalid_request")
            assert "stdin was not closed within 1 s" in rec["params"][4], rec
            assert p.returncode == 1
        finally:
            p.kill()
            p.stdin.close()
            p.wait()
