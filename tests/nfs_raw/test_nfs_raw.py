"""The nfs-raw plugin's logic that needs no NFS client: device-config checks, the mount command
line, /proc/self/mountinfo parsing, and the rule that an SR whose storage is not mounted is
never read (here: a real file-raw SR sitting in the mount point's directory, as on a host where
the mount went away, must not be listed, changed or reported healthy). Real mounts, exports,
hard-mount outages and busy unmounts are tested in the test bed (tests/xen/test_volume_plugins.py)."""

import os

import pytest

from xapi_storage.sdk.errors import SR_does_not_exist, XenAPIError
from xapi_storage.volume import file_raw, nfs_raw

UUID = "3a1e5b7c-0000-4000-8000-000000000001"
DBG = "test"


def test_config_gives_hard_mounts_by_default_and_refuses_what_mount_could_misread():
    server, path, opts = nfs_raw.parse_config({"server": "nfs1.example", "serverpath": "/srv/x/"})
    assert (server, path) == ("nfs1.example", "/srv/x")
    assert opts == ["hard", "proto=tcp", "timeo=600", "retrans=2"]
    _, _, opts = nfs_raw.parse_config({"server": "10.0.0.1", "serverpath": "/", "nfsversion":
                                       "4.1", "options": "nconnect=4,noatime"})
    assert opts[-3:] == ["vers=4.1", "nconnect=4", "noatime"]
    assert nfs_raw.mount_argv("h:/e/u", "/run/sr-mount/u", ["hard", "vers=3"]) == \
        ["mount", "-t", "nfs", "-o", "hard,vers=3", "h:/e/u", "/run/sr-mount/u"]
    assert nfs_raw.sr_source("h", "/", "u") == "h:/u"
    assert nfs_raw.sr_source("[fe80::1]", "/e", "u") == "[fe80::1]:/e/u"
    bad = [{}, {"server": "h"}, {"server": "-o x", "serverpath": "/e"},
           {"server": "h:/x", "serverpath": "/e"}, {"server": "h", "serverpath": "e"},
           {"server": "h", "serverpath": "/e/../etc"}, {"server": "h", "serverpath": "/e x"},
           {"server": "h", "serverpath": "/e", "nfsversion": "5"},
           {"server": "h", "serverpath": "/e", "options": "rw,,x"},
           {"server": "h", "serverpath": "/e", "options": "x y"},
           {"server": "h", "serverpath": "/e", "datapath": "tapdisk"}]
    for config in bad:
        with pytest.raises(XenAPIError) as e:
            nfs_raw.parse_config(config)
        assert e.value.params[0] == "Invalid device-config", config


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:35 / /run/sr-mount/a\\040b rw - nfs4 srv:/e/a\\040b rw,vers=4.2\n"
    "41 22 0:36 / /run/sr-mount/u rw - tmpfs tmpfs rw\n"
    "42 41 0:37 / /run/sr-mount/u rw,relatime - nfs srv:/e/u rw,vers=3,hard\n"
    "garbage line\n")


def test_mountinfo_parsing_takes_the_topmost_mount_and_unescapes():
    assert nfs_raw.mount_at(MOUNTINFO, "/run/sr-mount/a b") == ("nfs4", "srv:/e/a b")
    assert nfs_raw.mount_at(MOUNTINFO, "/run/sr-mount/u") == ("nfs", "srv:/e/u")
    assert nfs_raw.mount_at(MOUNTINFO, "/run/sr-mount") is None
    assert len(nfs_raw.parse_mountinfo(MOUNTINFO)) == 4


def test_the_real_mountinfo_of_this_host_parses():
    with open("/proc/self/mountinfo") as f:
        mounts = nfs_raw.parse_mountinfo(f.read())
    assert any(point == "/" for point, _, _ in mounts)


@pytest.fixture
def unmounted_sr(tmp_path, monkeypatch):
    """A ready file-raw SR in <mount root>/<uuid>, with nothing mounted there: what a host
    sees when the NFS mount has gone (or the directory was filled by hand)."""
    root = str(tmp_path / "sr-mount")
    monkeypatch.setenv(nfs_raw.MOUNT_ROOT_ENV, root)
    os.makedirs(root)
    path = f"{root}/{UUID}"
    config = file_raw.SR().create(dbg=DBG, uuid=UUID, configuration={"path": path},
                                  name="n", description="")
    sr = file_raw.SR().attach(dbg=DBG, configuration=config)
    vol = file_raw.Volume().create(dbg=DBG, sr=sr, name="v", description="", size=1 << 20,
                                   sharable=False)
    return sr, path, vol["key"]


def test_an_unmounted_sr_is_never_read(unmounted_sr):
    sr, path, key = unmounted_sr
    before = sorted(os.listdir(path))
    S, V = nfs_raw.SR(), nfs_raw.Volume()
    calls = [lambda: S.ls(dbg=DBG, sr=sr), lambda: S.set_name(dbg=DBG, sr=sr, new_name="x"),
             lambda: V.stat(dbg=DBG, sr=sr, key=key),
             lambda: V.create(dbg=DBG, sr=sr, name="n", description="", size=512,
                              sharable=False),
             lambda: V.destroy(dbg=DBG, sr=sr, key=key),
             lambda: V.set(dbg=DBG, sr=sr, key=key, k="a", v="b"),
             lambda: V.snapshot(dbg=DBG, sr=sr, key=key),
             lambda: V.resize(dbg=DBG, sr=sr, key=key, new_size=4096),
             lambda: S.destroy(dbg=DBG, sr=sr)]
    for call in calls:
        with pytest.raises(XenAPIError) as e:
            call()
        assert e.value.params[0] == "SR storage is not mounted", e.value.params
        assert "no NFS mount at " + path in e.value.params[2]
    assert sorted(os.listdir(path)) == before
    st = S.stat(dbg=DBG, sr=sr)
    assert st["health"][0] == "Unreachable" and path in st["health"][1], st
    assert (st["total_space"], st["free_space"]) == (0, 0)
    S.detach(dbg=DBG, sr=sr)        # nothing mounted: detach is idempotent
    # the same directory through file-raw is a healthy SR: the check is nfs-raw's own
    assert [v["key"] for v in file_raw.SR().ls(dbg=DBG, sr=sr)] == [key]


def test_keys_outside_the_mount_root_are_not_nfs_raw_srs(unmounted_sr, tmp_path):
    sr, path, key = unmounted_sr
    for bad in (file_raw.sr_key(str(tmp_path)), file_raw.sr_key(os.path.dirname(path) +
                                                                 "/.tmp-x"), "nfs://x", ""):
        with pytest.raises(SR_does_not_exist):
            nfs_raw.SR().ls(dbg=DBG, sr=bad)


def test_sr_uuids_must_be_safe_names():
    for bad in ("", "../x", "a/b", ".hidden", "a b", "x" * 101):
        with pytest.raises(XenAPIError) as e:
            nfs_raw.check_sr_uuid(bad)
        assert e.value.params[0] == "Invalid argument"
    assert nfs_raw.check_sr_uuid(UUID) == UUID


def test_busy_holders_are_named_from_proc(tmp_path):
    """What a busy unmount's error names: processes whose cwd or an open file is under the
    mount point (read from /proc: dom0 may have no fuser)."""
    import subprocess
    d = tmp_path / "mnt"
    (d / "sub").mkdir(parents=True)
    f = open(str(d / "sub" / "file"), "w")
    p = subprocess.Popen(["sleep", "60"], cwd=str(d / "sub"))
    try:
        held = nfs_raw._holders(str(d))
        assert f"pid {p.pid} (sleep): cwd" in held, held
        assert f"pid {os.getpid()} (" in held and f"fd {f.fileno()}" in held, held
        assert nfs_raw._holders(str(tmp_path / "other")) == ""
        assert str(p.pid) not in nfs_raw._holders(str(d) + "x")   # a sibling path is not in it
    finally:
        p.kill()
        p.wait()
        f.close()
