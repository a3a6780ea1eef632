"""`xapi-storage install`: layout, shebang, idempotence, convergence, uninstall, refusals."""

import configparser
import json
import os
import subprocess
import sys

import pytest

from xapi_storage import installer

from .helpers import REPO, TOY, TOY_PLUGINS, install, plugin_env, run_exe


def snapshot(root):
    """{relative path: (mode, content, mtime_ns, inode)} of every file and dir under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) else None
            out[os.path.relpath(p, root)] = (st.st_mode, data, st.st_mtime_ns, st.st_ino)
    return out


EXPECTED_TOY = {"Plugin.Query", "Plugin.diagnostics", "SR.attach", "SR.stat", "SR.ls", "SR.probe",
                "Volume.create", "Volume.stat", "Volume.snapshot", "Volume.clone", "Volume.set_name",
                "Volume.revert", "Volume.resize", "Volume.destroy", "Volume.list_changed_blocks",
                "Volume.set_description"}


def LAID_TOY():
    """What the installer lays for the toy: `-IS`, and the directories it finds things in."""
    return installer.shim_source("sdk_toy", os.path.abspath(sys.executable),
                                 installer.install_paths(["sdk_toy"]))


def test_layout(root):
    toy = root / "volume" / TOY
    assert {p.name for p in toy.iterdir()} == EXPECTED_TOY | {installer.MANIFEST}
    dp = root / "datapath" / "toydp"
    assert {p.name for p in dp.iterdir()} == {"Plugin.Query", "Datapath.attach", "Datapath.activate",
                                              "Datapath.open", "Data.stat", installer.MANIFEST}
    for p in toy.iterdir():
        if p.name != installer.MANIFEST:
            assert os.access(p, os.X_OK) and p.stat().st_mode & 0o777 == 0o755
            text = p.read_text()
            assert text.splitlines()[0] == "#!" + os.path.abspath(sys.executable) + " -IS"
            assert text == LAID_TOY()
            compile(text, str(p), "exec")  # Python 3 source
    manifest = json.loads((toy / installer.MANIFEST).read_text())
    assert manifest["module"] == "sdk_toy" and set(manifest["files"]) == EXPECTED_TOY


def test_second_run_changes_nothing(tmp_path):
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    before = snapshot(tmp_path)
    r = install(tmp_path, *TOY_PLUGINS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("unchanged") == 2
    assert snapshot(tmp_path) == before  # same inodes and mtimes: nothing rewritten


def test_converges_after_changes(tmp_path):
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    toy = tmp_path / "volume" / TOY
    (toy / "Volume.stat").write_text("#!/bin/sh\necho damaged\n")     # a damaged executable
    os.chmod(toy / "SR.ls", 0o744)                                      # wrong mode
    (toy / "Volume.create").unlink()                                    # deleted
    other = snapshot(tmp_path / "datapath")
    r = install(tmp_path, *TOY_PLUGINS)
    assert r.returncode == 0, r.stderr
    assert "write SR.ls, write Volume.create, write Volume.stat" in r.stdout
    assert {p.name for p in toy.iterdir()} == EXPECTED_TOY | {installer.MANIFEST}
    assert (toy / "Volume.stat").read_text() == LAID_TOY()
    assert (toy / "SR.ls").stat().st_mode & 0o7777 == 0o755
    assert snapshot(tmp_path / "datapath") == other
    # a release that implements fewer methods: the others' executables go
    r = install(tmp_path, f"volume:{TOY}=sdk_toy_small")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in toy.iterdir()} == {"Plugin.Query", "Plugin.diagnostics", "Volume.stat",
                                               installer.MANIFEST}
    assert run_exe(toy / "Plugin.Query", {"dbg": "d"}).value["plugin"] == "toy"


def test_uninstall_removes_exactly_what_was_laid(tmp_path):
    (tmp_path / "volume").mkdir()
    (tmp_path / "volume" / "org.xen.xapi.storage.other").mkdir()      # someone else's plugin
    (tmp_path / "volume" / "org.xen.xapi.storage.other" / "Plugin.Query").write_text("x")
    before = snapshot(tmp_path)
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    r = install(tmp_path, *TOY_PLUGINS, uninstall=True)
    assert r.returncode == 0, r.stderr
    after = snapshot(tmp_path)
    assert set(after) == set(before) | {"datapath"}  # kind dirs stay: the daemon watches them
    assert (tmp_path / "datapath").is_dir() and not any((tmp_path / "datapath").iterdir())
    r = install(tmp_path, *TOY_PLUGINS, uninstall=True)  # again: nothing to do
    assert r.returncode == 0 and r.stdout.count("unchanged") == 2


def test_uninstall_keeps_changed_and_foreign_files(tmp_path):
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    toy = tmp_path / "volume" / TOY
    (toy / "Volume.stat").write_text("edited by an admin")
    (toy / "notes.txt").write_text("mine")
    r = install(tmp_path, *TOY_PLUGINS, uninstall=True)
    assert r.returncode == 0
    assert "was changed since it was installed: kept" in r.stderr
    assert {p.name for p in toy.iterdir()} == {"Volume.stat", "notes.txt", installer.MANIFEST}
    # the manifest names what is kept: the directory is still the installer's, so the next
    # install converges instead of refusing it
    assert set(json.loads((toy / installer.MANIFEST).read_text())["files"]) == {"Volume.stat"}
    r = install(tmp_path, *TOY_PLUGINS)
    assert r.returncode == 0, r.stderr
    assert (toy / "Volume.stat").read_text() == LAID_TOY()
    assert {p.name for p in toy.iterdir()} == EXPECTED_TOY | {"notes.txt", installer.MANIFEST}


@pytest.mark.parametrize("entry", ["../../../victim", "{victim}", "Volume.stat/../../x"])
@pytest.mark.parametrize("uninstall", [False, True])
def test_a_tampered_manifest_is_refused_and_nothing_outside_is_deleted(tmp_path, entry,
                                                                       uninstall):
    """A manifest entry is trusted for nothing: one naming a file outside the plugin
    directory (relative or absolute), with that file's true hash, would have a re-install
    (stale entry) or an uninstall delete it."""
    import hashlib
    root = tmp_path / "root"
    assert install(root, *TOY_PLUGINS).returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("someone's file")
    toy = root / "volume" / TOY
    m = json.loads((toy / installer.MANIFEST).read_text())
    m["files"][entry.replace("{victim}", str(victim))] = hashlib.sha256(
        b"someone's file").hexdigest()
    (toy / installer.MANIFEST).write_text(json.dumps(m))
    r = install(root, *TOY_PLUGINS, uninstall=uninstall)
    assert r.returncode == 1
    assert "which this installer never lays" in r.stderr and "Traceback" not in r.stderr
    assert victim.read_text() == "someone's file"
    assert (toy / "Plugin.Query").exists()


def test_root_that_is_a_file_is_a_message(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    r = install(f, *TOY_PLUGINS)
    assert r.returncode == 1
    assert "is not a directory" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_directory_not_laid_by_the_installer_is_left_alone(tmp_path):
    toy = tmp_path / "volume" / TOY
    toy.mkdir(parents=True)
    (toy / "Plugin.Query").write_text("vendor's own")
    before = snapshot(tmp_path)
    r = install(tmp_path, *TOY_PLUGINS)
    assert r.returncode == 1 and "was not laid by this installer" in r.stderr
    assert (tmp_path / "datapath" / "toydp" / "Plugin.Query").exists()  # the others still install
    r = install(tmp_path, *TOY_PLUGINS, uninstall=True)
    assert r.returncode == 1
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("volume")} == before


def test_broken_plugin_is_reported_and_skipped(tmp_path):
    r = install(tmp_path, f"volume:{TOY}=sdk_toy", "volume:org.xen.xapi.storage.broken=sdk_toy_broken",
                "volume:org.xen.xapi.storage.gone=no_such_module_xyz")
    assert r.returncode == 1
    assert ("volume plugin org.xen.xapi.storage.broken: cannot import sdk_toy_broken: "
            "RuntimeError: this plugin is broken on purpose; skipped") in r.stderr
    assert "cannot import no_such_module_xyz: ModuleNotFoundError" in r.stderr
    assert sorted(p.name for p in (tmp_path / "volume").iterdir()) == [TOY]


@pytest.mark.parametrize("spec,message", [
    ("volume:toy=sdk_toy", "must be org.xen.xapi.storage.<srtype>"),
    ("volume:org.xen.xapi.storage.a.b=sdk_toy", "must be org.xen.xapi.storage.<srtype>"),
    ("volume:org.xen.xapi.storage.Toy=sdk_toy", "must be org.xen.xapi.storage.<srtype>"),
    ("volume:org.xen.xapi.storage.../..=sdk_toy", "must be org.xen.xapi.storage.<srtype>"),
    ("datapath:../x=sdk_toy_dp", "must be a lower-case URI scheme"),
    ("datapath:toydp=sdk_toy", "a datapath plugin implements Plugin, Datapath, Data"),
    ("volume:org.xen.xapi.storage.toy=sdk_toy_dp", "a volume plugin implements Plugin, SR, Volume"),
    ("volume:org.xen.xapi.storage.toy=os;rm", "is not a module name"),
    ("floppy:x=y", "unknown plugin kind"),
])
def test_refusals(tmp_path, spec, message):
    r = install(tmp_path, spec)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "volume").exists() or not any((tmp_path / "volume").iterdir())


def test_bad_plugin_option_and_bad_interpreter(tmp_path):
    r = install(tmp_path, "nonsense")
    assert r.returncode == 2 and "expected KIND:NAME=MODULE" in r.stderr
    r = install(tmp_path, f"volume:{TOY}=sdk_toy", extra=["--python", "/opt/my python/bin/python3"])
    assert r.returncode == 1 and "shebang" in r.stderr


def test_shebang_is_the_installing_interpreter(tmp_path):
    r = install(tmp_path, f"volume:{TOY}=sdk_toy", extra=["--python", "/usr/bin/python3.11", "--no-compile"])
    assert r.returncode == 0
    # another interpreter: the installer does not know its directories, so no -IS
    text = (tmp_path / "volume" / TOY / "Plugin.Query").read_text()
    assert text.startswith("#!/usr/bin/python3.11\n") and "sys.path" not in text


def test_executables_start_isolated_with_the_installers_directories(tmp_path):
    """The executables start with `-IS` (no site-packages scan, no PYTHONPATH, no .pth files)
    and put exactly the directories the installer found the toy, the SDK and site-packages in
    on sys.path: a decoy package on PYTHONPATH cannot hijack the call, and nothing else from
    site is there."""
    assert install(tmp_path, f"volume:{TOY}=sdk_toy").returncode == 0
    exe = tmp_path / "volume" / TOY / "Plugin.Query"
    paths = installer.install_paths(["sdk_toy"])
    from .helpers import TOYS
    import xapi_storage
    assert paths[0] == TOYS
    assert os.path.dirname(os.path.dirname(xapi_storage.__file__)) in paths
    decoy = tmp_path / "decoy" / "xapi_storage"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (tmp_path / "decoy" / "sdk_toy.py").write_text("raise SystemExit('decoy imported')\n")
    env = plugin_env()
    env["PYTHONPATH"] = str(tmp_path / "decoy")
    r = run_exe(exe, {"dbg": "t"}, env=env)
    assert (r.rc, r.value["plugin"]) == (0, "toy"), r.stderr
    # what the executable's sys.path is: the interpreter's own, then exactly ours
    probe = tmp_path / "probe.py"
    text = exe.read_text().split("from xapi_storage.sdk.wire", 1)[0]
    probe.write_text(text + "import json\nprint(json.dumps(sys.path))\n")
    probe.chmod(0o755)
    out = subprocess.run([str(probe)], stdout=subprocess.PIPE, universal_newlines=True,
                         env=env, check=True).stdout
    got = json.loads(out)
    base = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys, json; "
                           "print(json.dumps(sys.path))"], stdout=subprocess.PIPE,
                          universal_newlines=True, check=True).stdout
    assert got == json.loads(base) + paths


def test_isolated_executable_under_another_python_version_leaves_sys_path_alone(tmp_path):
    """Observer mode may run the file with the host's python3 of another version (3.6 on
    XenServer 8): our directories (this Python's site-packages) must not reach it."""
    text = installer.shim_source("sdk_toy", sys.executable, ["/nowhere/site-packages"])
    setup = text.split("from xapi_storage.sdk.wire", 1)[0]
    ns = {}
    other = (sys.version_info[0], sys.version_info[1] + 1)
    exec(setup.replace(repr(tuple(sys.version_info[:2])), repr(other)), ns)
    assert "/nowhere/site-packages" not in ns["sys"].path
    exec(setup, ns)
    assert ns["sys"].path[-1] == "/nowhere/site-packages"
    ns["sys"].path.remove("/nowhere/site-packages")


def test_no_half_written_plugin_directory_is_ever_visible(tmp_path):
    # the new directory is assembled in ROOT and renamed; nothing is left behind in ROOT
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["datapath", "volume"]


# --- the repository's plugins/ directory and setup.cfg ---------------------------------------

def registered():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    out = {}
    for kind, group in installer.GROUPS.items():
        for line in cfg["options.entry_points"].get(group, "").splitlines():
            if line.strip():
                name, module = (x.strip() for x in line.split("=", 1))
                out[(kind, name)] = module
    return out


def test_file_raw_is_registered():
    assert registered()[("volume", "org.xen.xapi.storage.file-raw")] == "xapi_storage.volume.file_raw"


def test_repository_shims_are_what_the_installer_writes():
    for (kind, name), module in registered().items():
        shim = os.path.join(REPO, "plugins", kind, name, "plugin.py")
        with open(shim) as f:
            text = f.read()
        assert text.startswith("#!/usr/bin/env python3\n")
        laid = installer.shim_source(module, sys.executable)
        assert text.split("\n", 1)[1] == laid.split("\n", 1)[1], f"{shim} is stale"
        assert os.access(shim, os.X_OK)


def test_installer_finds_registered_plugins_from_entry_points():
    plugins = installer.registered_plugins()
    assert installer.Plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw") in plugins
    r = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "install", "--list"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=plugin_env())
    assert "volume\torg.xen.xapi.storage.file-raw\txapi_storage.volume.file_raw" in r.stdout


def test_help_mentions_the_default_root():
    r = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "install", "--help"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert r.returncode == 0 and "/usr/libexec/xapi-storage-script" in r.stdout


def test_prune_removes_plugins_no_longer_registered(tmp_path):
    assert install(tmp_path, *TOY_PLUGINS).returncode == 0
    r = install(tmp_path, f"volume:{TOY}=sdk_toy")          # toydp no longer among the plugins
    assert r.returncode == 0
    assert "datapath/toydp was laid by this installer for sdk_toy_dp" in r.stderr and "--prune" in r.stderr
    assert (tmp_path / "datapath" / "toydp").is_dir()        # only a note without --prune
    r = install(tmp_path, f"volume:{TOY}=sdk_toy", extra=["--prune"])
    assert r.returncode == 0 and "pruned" in r.stdout
    assert not (tmp_path / "datapath" / "toydp").exists() and (tmp_path / "datapath").is_dir()
    assert (tmp_path / "volume" / TOY / "Plugin.Query").exists()


def _host_python36(tmp_path):
    """A real CPython 3.6 (pyenv's) set up like a host that has the package and the toys
    installed for it: a venv whose site-packages holds a .pth naming them. Skips (fails in CI)
    where there is no 3.6."""
    import glob
    import subprocess as sp
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(root, "versions", "3.6.*", "bin", "python3.6")))
    if not found:
        msg = f"no CPython 3.6 under {root}/versions: observer mode on 3.6 NOT TESTED"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    venv = tmp_path / "host36"
    sp.run([found[-1], "-m", "venv", "--without-pip", str(venv)], check=True)
    site = glob.glob(str(venv / "lib" / "python3.6" / "site-packages"))[0]
    from .helpers import TOYS
    with open(os.path.join(site, "xapi_storage_and_toys.pth"), "w") as f:
        f.write(os.path.join(REPO, "lib") + "\n" + TOYS + "\n")
    return str(venv / "bin" / "python3.6")


def _install_args(tmp_path, plugin, observer, *extra):
    import argparse
    ap = argparse.ArgumentParser()
    installer.add_arguments(ap)
    return ap.parse_args(["--root", str(tmp_path / "root"), "--no-compile",
                          "--plugin", plugin, "--observer-python", observer, *extra])


@pytest.mark.skipif(sys.version_info < (3, 8), reason="the installer's own Python must import "
                    "the 3.8+ toy; this runs on the newer Pythons of the run")
def test_observer_mode_check_fails_loudly_for_a_plugin_only_a_newer_python_imports(
        tmp_path, capsys):
    """With smapi tracing on, the daemon runs `/usr/bin/python3 -m observer <exe> --json`
    whatever the shebang says: Python 3.6 on XenServer 8 / XCP-ng 8.3. A plugin that imports
    on the installer's Python but not on that one is an error (exit 1), not a warning."""
    host = _host_python36(tmp_path)
    assert installer.run(_install_args(tmp_path, f"volume:{TOY}=sdk_toy", host)) == 0
    assert "error" not in capsys.readouterr().err            # the same plugin, 3.6-clean: fine
    args = _install_args(tmp_path, "volume:org.xen.xapi.storage.toy38=sdk_toy_py38", host)
    assert installer.run(args) == 1
    err = capsys.readouterr().err
    assert f"xapi-storage install: error: {host} cannot run" in err
    assert "prod" in err and "-m observer" in err, err       # says what failed, and why
    # the executables stay: they work while tracing is off
    assert (tmp_path / "root" / "volume" / "org.xen.xapi.storage.toy38" / "Plugin.Query").exists()


def test_observer_mode_replaces_pythonpath_and_runs_from_root(tmp_path, monkeypatch, capsys):
    """The check runs as the daemon does: PYTHONPATH is the plugin directory alone (a module
    found only through the installer's own PYTHONPATH does not count) and cwd is /.
    (--no-isolate: executables that do not carry the directories the installer found the
    module in, which would find it whatever PYTHONPATH says.)"""
    host = _host_python36(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "toy_elsewhere.py").write_text("from sdk_toy import IMPLEMENTATIONS\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    monkeypatch.chdir(elsewhere)
    args = _install_args(tmp_path, "volume:org.xen.xapi.storage.else=toy_elsewhere", host,
                         "--no-isolate")
    assert installer.run(args) == 1
    err = capsys.readouterr().err
    assert "toy_elsewhere" in err and f"PYTHONPATH={tmp_path / 'root'}" in err, err
    # the plugin directory itself is on the path: a module there imports
    d = tmp_path / "root" / "volume" / "org.xen.xapi.storage.else"
    (d / "toy_elsewhere.py").write_text("from sdk_toy import IMPLEMENTATIONS\n")
    assert installer.observer_problem(str(d), host) is None


def test_observer_mode_check_none_and_missing_interpreter(tmp_path, capsys):
    """`--observer-python none` skips the check; an interpreter that is not there is a note."""
    bad = tmp_path / "python3"
    bad.write_text("#!/bin/sh\necho 'ModuleNotFoundError: xapi_storage' >&2\nexit 1\n")
    bad.chmod(0o755)
    assert installer.run(_install_args(tmp_path, f"volume:{TOY}=sdk_toy", str(bad))) == 1
    assert "ModuleNotFoundError: xapi_storage" in capsys.readouterr().err
    assert installer.run(_install_args(tmp_path, f"volume:{TOY}=sdk_toy", "none")) == 0
    assert "observer" not in capsys.readouterr().err
    missing = str(tmp_path / "nowhere" / "python3")
    assert installer.run(_install_args(tmp_path, f"volume:{TOY}=sdk_toy", missing)) == 0
    assert f"note: no {missing} here" in capsys.readouterr().err
