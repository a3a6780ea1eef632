"""The image cache: keyed by the builder's inputs, a hit is trusted only when intact."""

import json

import pytest

from xapi_storage.testbed import images


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    for src in images.DATA.iterdir():
        if src.is_file():           # not e.g. a __pycache__ left by a byte-compile
            (d / src.name).write_bytes(src.read_bytes())
    monkeypatch.setattr(images, "DATA", d)
    return d


def test_key_changes_with_every_input(data_copy):
    base = images.image_key()
    assert base == images.image_key()
    for name in images.ROOTFS_INPUTS + images.IMAGE_INPUTS:
        old = (data_copy / name).read_bytes()
        (data_copy / name).write_bytes(old + b"\n# changed\n")
        assert images.image_key() != base, name
        (data_copy / name).write_bytes(old)
    assert images.image_key() == base


def test_only_package_list_and_rootfs_script_change_the_rootfs_key(data_copy):
    base = images.rootfs_key()
    (data_copy / "dom0-agent.py").write_text("# changed\n")
    assert images.rootfs_key() == base
    (data_copy / "packages.txt").write_text("fio\n")
    assert images.rootfs_key() != base


def _fake_build(d):
    d.mkdir()
    for name in images.ARTEFACTS:
        (d / name).write_bytes(name.encode() * 100)
    images._write_manifest(d)


def test_intact_build_is_a_hit(tmp_path):
    _fake_build(tmp_path / "k")
    assert images.check_cached(tmp_path / "k") is None


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "MANIFEST.json").unlink(), "no cached build"),
    (lambda d: (d / "MANIFEST.json").write_text("{"), "corrupt MANIFEST.json"),
    (lambda d: (d / "xen").unlink(), "xen is missing"),
    (lambda d: (d / "dom0.img").write_bytes(b"short"), "dom0.img has 5 bytes"),
    (lambda d: (d / "vmlinuz").write_bytes(b"X" * len(b"vmlinuz" * 100)), "vmlinuz does not match"),
])
def test_damaged_build_is_a_miss(tmp_path, damage, why):
    _fake_build(tmp_path / "k")
    damage(tmp_path / "k")
    assert why in images.check_cached(tmp_path / "k")


def test_manifest_of_another_format_is_a_miss(tmp_path):
    _fake_build(tmp_path / "k")
    m = json.loads((tmp_path / "k" / "MANIFEST.json").read_text())
    m["format"] = -1
    (tmp_path / "k" / "MANIFEST.json").write_text(json.dumps(m))
    assert "another format" in images.check_cached(tmp_path / "k")


def test_cache_hit_does_not_run_the_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("XAPI_STORAGE_TESTBED_CACHE", str(tmp_path))
    _fake_build(tmp_path / images.image_key())

    def no_build(*a, **k):
        raise AssertionError("a cache hit ran the builder")
    monkeypatch.setattr(images, "_run_logged", no_build)
    got = images.ensure_images(quiet=True)
    assert got.dir == tmp_path / images.image_key()


def test_cache_miss_without_root_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("XAPI_STORAGE_TESTBED_CACHE", str(tmp_path))
    monkeypatch.setattr(images.os, "geteuid", lambda: 1000)
    with pytest.raises(images.BuildError, match="needs root.*no cached build"):
        images.ensure_images(quiet=True)


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XAPI_STORAGE_TESTBED_CACHE", str(tmp_path))
    monkeypatch.setattr(images.os, "geteuid", lambda: 0)
    calls = []

    def fake_builder(argv, log_path, what, timeout):
        calls.append(what)
        assert argv[0] == "bash"  # package data may lose its mode bits in a wheel
        if what == "build-rootfs.sh":
            open(argv[2], "wb").close()
        else:
            argv[4].mkdir()
            for name in images.ARTEFACTS:
                (argv[4] / name).write_bytes(b"new " + name.encode())
    monkeypatch.setattr(images, "_run_logged", fake_builder)
    target = tmp_path / images.image_key()
    _fake_build(target)
    (target / "initrd.img").unlink()
    got = images.ensure_images(quiet=True)
    assert calls == ["build-rootfs.sh", "build-images.sh"]
    assert (got.dir / "initrd.img").read_bytes() == b"new initrd.img"
    assert images.check_cached(got.dir) is None
    # and now it is a hit: no further build
    images.ensure_images(quiet=True)
    assert calls == ["build-rootfs.sh", "build-images.sh"]


def test_prune_drops_only_old_entries_of_other_keys(tmp_path):
    import os
    import time
    for name in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "debs", "runs"):
        (tmp_path / name).mkdir()
    for name in ("aaaaaaaaaaaaaaaa.lock", "bbbbbbbbbbbbbbbb.lock", "bbbbbbbbbbbbbbbb.build.log",
                 "rootfs-1111111111111111.tar.zst", "rootfs-2222222222222222.tar.zst",
                 "rootfs-2222222222222222.lock", "cccccccccccccccc.lock"):
        (tmp_path / name).write_text("")
    old = time.time() - 7200
    for p in tmp_path.iterdir():
        if not p.name.startswith("cccc"):  # cccc... is fresh: maybe another session's
            os.utime(p, (old, old))
    images._prune(tmp_path, keep={"aaaaaaaaaaaaaaaa", "rootfs-1111111111111111"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "aaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaa.lock", "cccccccccccccccc.lock", "debs",
        "rootfs-1111111111111111.tar.zst", "runs"]


def test_mirror_comes_from_the_hosts_apt_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("XAPI_STORAGE_TESTBED_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-security.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    (d / "b.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n")
    assert images.host_apt_mirror([str(tmp_path / "none"), str(d)]) == \
        "http://mirror.example/debian"
    one = tmp_path / "sources.list"
    one.write_text("# deb http://old.example/debian bookworm main\n"
                   "deb [arch=amd64] http://line.example/debian bookworm main\n")
    assert images.host_apt_mirror([str(one)]) == "http://line.example/debian"
    assert images.host_apt_mirror([str(tmp_path / "none")]) is None
    monkeypatch.setattr(images, "APT_SOURCES", (str(tmp_path / "none"),))
    monkeypatch.setattr(images, "host_apt_mirror", lambda *a, **k: None)
    with pytest.raises(images.BuildError, match="XAPI_STORAGE_TESTBED_MIRROR"):
        images.mirror()
    monkeypatch.setenv("XAPI_STORAGE_TESTBED_MIRROR", "http://env.example/debian")
    assert images.mirror() == "http://env.example/debian"
