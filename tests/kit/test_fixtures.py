"""The pytest fixtures shipped with the package (xapi_storage.testing), used as a vendor's
tests use them: by name, nothing imported."""

import os


def test_file_raw_sr_is_a_real_sr_made_through_the_executables(file_raw_sr):
    out = file_raw_sr.call("Volume.create", sr=file_raw_sr.sr, name="v", description="",
                           size=4096, sharable=False)
    assert out.ok, out.describe()
    key = out.value["key"]
    assert os.path.exists(os.path.join(file_raw_sr.path, key + ".img"))
    listed = file_raw_sr.call("SR.ls", sr=file_raw_sr.sr)
    assert [v["key"] for v in listed.value] == [key]
    # the fixture's teardown destroys the SR with what is left in it


def test_install_plugin_lays_out_executables_with_the_real_installer(install_plugin, plugin_root):
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    assert d == str(plugin_root / "volume" / "org.xen.xapi.storage.file-raw")
    assert os.access(os.path.join(d, "Plugin.Query"), os.X_OK)
    assert os.path.exists(os.path.join(d, ".xapi-storage-install.json"))


def test_conformance_fixture_reports_and_asserts(install_plugin, conformance, tmp_path):
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    report = conformance(d, configuration={"path": str(tmp_path / "sr")}, repeat=1, parallel=2,
                         only=["create-size"], env=dict(os.environ, XAPI_STORAGE_SYSLOG="0"))
    assert [(r.name, r.status) for r in report.results] == [("create-size", "PASS"),
                                                            ("results-valid", "PASS")]
    assert report.assert_ok() is report
    # a failing run: an SR.create that cannot succeed (the parent directory is missing)
    bad = conformance(d, configuration={"path": str(tmp_path / "no" / "sr")}, repeat=1,
                      only=["create-size"], env=dict(os.environ, XAPI_STORAGE_SYSLOG="0"))
    # a check that needs the SR fails (never a silent skip) when the SR cannot be made
    assert [r.name for r in bad.failed] == ["create-size"]
    assert "no attached SR" in bad.results[0].detail and "SR.create" in bad.results[0].detail
    try:
        conformance(d, configuration={"path": str(tmp_path / "no" / "sr")}, repeat=1,
                    only=["sr-attach"]).assert_ok()
    except AssertionError as e:
        assert "sr-attach" in str(e) and "FAIL" in str(e)
    else:
        raise AssertionError("assert_ok() passed a failed run")


# --- loop_devices and loop_vg, as a vendor's own test directory uses them ---------------------

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor_loop_fixtures.py")


def _vendor_run(tmp_path, ci=False, fail=False):
    """Run vendor_loop_fixtures.py with pytest from a copy in an empty directory; (the
    completed process, its output, the records of what each test was given)."""
    import json
    import shutil
    import subprocess
    import sys
    d = tmp_path / ("vendor-ci" if ci else "vendor") / ("fail" if fail else "pass")
    d.mkdir(parents=True)
    shutil.copy(VENDOR, str(d / "test_vendor.py"))
    record = d / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(SCRATCH_RECORD=str(record), SCRATCH_FAIL="1" if fail else "0")
    if ci:
        env["CI"] = "true"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "test_vendor.py"], cwd=str(d), env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    records = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
    return r, r.stdout, records


def _left(records):
    from xapi_storage.scratch import still_there
    return [x for rec in records for x in still_there(rec["devices"], rec["files"], rec["vg"])]


def test_loop_fixtures_remove_everything_even_after_a_failed_test(tmp_path):
    from xapi_storage.scratch import unavailable
    from xapi_storage.testing import need_loop_devices
    need_loop_devices("the loop_devices fixture's test")
    r, out, records = _vendor_run(tmp_path, fail=True)
    assert "failing on purpose" in out, out
    if unavailable(lvm=True):
        assert "1 failed, 1 skipped" in out, out
        assert len(records) == 1
    else:
        assert "2 failed" in out, out
        assert len(records) == 2
    assert _left(records) == []


def test_loop_vg_skips_with_the_reason_and_fails_under_ci_without_device_mapper(tmp_path):
    from xapi_storage.scratch import unavailable
    why = unavailable(lvm=True)
    r, out, records = _vendor_run(tmp_path)
    r_ci, out_ci, records_ci = _vendor_run(tmp_path, ci=True)
    if why is None:         # lvm2 and device-mapper here: both runs pass
        assert "2 passed" in out and "2 passed" in out_ci, out + out_ci
    elif unavailable() is None:
        assert r.returncode == 0 and "1 passed, 1 skipped" in out, out
        assert f"the loop_vg fixture cannot run here: {why}" in out, out
        # a fixture that fails is an error of the test's setup: the run fails
        assert r_ci.returncode == 1 and "1 passed, 1 error" in out_ci, out_ci
        assert f"the loop_vg fixture cannot run in CI: {why}" in out_ci, out_ci
    else:                   # no loop devices at all: both fixtures skip, or fail in CI
        assert "2 skipped" in out and "2 errors" in out_ci, out + out_ci
    assert _left(records + records_ci) == []
