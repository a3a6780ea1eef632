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
