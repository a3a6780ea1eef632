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
            assert text.splitlines()[0] == "#!" + os.path.abspath(sys.executable)
            assert text == installer.shim_source("sdk_toy", os.path.abspath(sys.executable))
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
    assert (toy / "Volume.stat").read_text() == installer.shim_source("sdk_toy", os.path.abspath(sys.executable))
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
    assert (toy / "Volume.stat").read_text() == installer.shim_source(
        "sdk_toy", os.path.abspath(sys.executable))
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
    assert (tmp_path / "volume" / TOY / "Plugin.Query").read_text().startswith("#!/usr/bin/python3.11\n")


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
                       capture_output=True, text=True, env=plugin_env())
    assert "volume\torg.xen.xapi.storage.file-raw\txapi_storage.volume.file_raw" in r.stdout


def test_help_mentions_the_default_root():
    r = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "install", "--help"],
                       capture_output=True, text=True)
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


def test_warns_when_the_observer_interpreter_cannot_import_the_plugins(tmp_path, monkeypatch,
                                                                      capsys):
    """With smapi tracing on, the daemon runs `/usr/bin/python3 -m observer <exe> --json`
    whatever the shebang says (spec 2.1): the installer says so when that interpreter cannot
    import the plugins (e.g. the package lives in a virtualenv only)."""
    import argparse
    from .helpers import TOYS
    monkeypatch.setenv("PYTHONPATH", TOYS)
    assert installer.observer_problem(["sdk_toy"], python=sys.executable) is None
    assert installer.observer_problem(["sdk_toy"], python=str(tmp_path / "none")) is None
    problem = installer.observer_problem(["no_such_module_xyz"], python=sys.executable)
    assert "no_such_module_xyz" in problem and "-m observer" in problem

    ap = argparse.ArgumentParser()
    installer.add_arguments(ap)
    args = ap.parse_args(["--root", str(tmp_path / "root"), "--no-compile",
                          "--plugin", f"volume:{TOY}=sdk_toy"])
    cannot = tmp_path / "python3"
    cannot.write_text("#!/bin/sh\necho 'ModuleNotFoundError: xapi_storage' >&2\nexit 1\n")
    cannot.chmod(0o755)
    monkeypatch.setattr(installer, "OBSERVER_PYTHON", str(cannot))
    assert installer.run(args) == 0
    err = capsys.readouterr().err
    assert f"warning: {cannot} cannot import the plugins" in err
    monkeypatch.setattr(installer, "OBSERVER_PYTHON", sys.executable)
    assert installer.run(args) == 0
    assert "cannot import" not in capsys.readouterr().err
