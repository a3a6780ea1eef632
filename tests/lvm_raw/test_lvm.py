"""The logic of lvm.py that needs no lvm2: records stored as tags, report parsing, the argument
lists given to lvm2, error mapping, the time limit on commands, and the block-device copy on
real loop devices. The plugin's behaviour on real lvm2 is tested in the test bed
(tests/xen/test_volume_plugins.py)."""

import json
import os
import re
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

from xapi_storage.volume import command, lvm, lvm_raw
from xapi_storage.volume import store as store_mod
from xapi_storage.volume.datacopy import copy_block_device

TAG = re.compile(r"\A[A-Za-z0-9_+.\-/=!:&#]{1,128}\Z")     # lvm2 validate_tag, old length limit

text = st.text(st.characters(blacklist_categories=()), max_size=300)
records = st.fixed_dictionaries({
    "key": st.just("7d0a1d2e-5b5c-4d7e-9a61-3c7f1f0c0b01"), "name": text, "description": text,
    "state": st.sampled_from(["creating", "ready", "destroying"]),
    "read_write": st.booleans(), "sharable": st.booleans(),
    "keys": st.dictionaries(text, text, max_size=8)})


@settings(max_examples=200, deadline=None)
@given(records, st.integers(1, 10 ** 6))
def test_a_record_round_trips_through_valid_lvm2_tags(rec, gen):
    tags = lvm.encode_record(rec, gen)
    assert all(TAG.match(t) for t in tags), tags
    got, got_gen, older = lvm.decode_record(["xapi-storage:vol", "other"] + tags)
    assert (got, got_gen, older) == (rec, gen, [])


@settings(max_examples=200, deadline=None)
@given(records, records, st.data())
def test_an_update_applied_in_any_part_leaves_the_old_or_the_new_record(old, new, data):
    """lvm2 may commit the tags of one lvchange one by one, and the process may die in
    between: whatever subset of the additions and deletions landed, a reader gets a whole
    record, the old or the new one; once all landed, only the new one is left."""
    tags = ["xapi-storage:vol"] + lvm.encode_record(old, 3)
    add, delete = lvm.update_tags(tags, new)
    assert not set(add) & set(tags)
    landed_add = data.draw(st.lists(st.sampled_from(add), unique=True)) if add else []
    landed_del = data.draw(st.lists(st.sampled_from(delete), unique=True)) if delete else []
    partial = [t for t in tags if t not in landed_del] + landed_add
    got, _, _ = lvm.decode_record(partial)
    if set(landed_add) == set(add):
        assert got == new
    elif not landed_del:
        assert got == old
    else:
        # deletions landed before every addition did: only reachable by hand, since lvm2
        # commits all the tag changes of one lvchange at once (lvm2 tools/lvchange.c,
        # _lvchange_properties_single); even then it never decodes as a wrong record
        assert got in (None, old)
    full = [t for t in tags if t not in delete] + add
    got, _, older = lvm.decode_record(full)
    assert got == new and older == []


def test_a_partial_later_generation_is_ignored_and_then_replaced():
    old = {"key": "k", "v": 1}
    tags = lvm.encode_record(old, 1) + lvm.encode_record({"key": "k", "v": "x" * 400}, 2)[:2]
    got, gen, older = lvm.decode_record(tags)
    assert (got, gen, len(older)) == (old, 1, 2)
    add, delete = lvm.update_tags(tags, {"key": "k", "v": 3})
    assert all(t.startswith("xsm:3.") for t in add)      # above the partial generation 2
    assert sorted(delete) == sorted(tags)


def test_tags_that_are_not_records_are_ignored():
    assert lvm.decode_record(["xsm:", "xsm:1", "xsm:a.b.c:x", "xsm:1.0.1:!!!!", "foo"]) == \
        (None, 0, ["xsm:1.0.1:!!!!"])


# lvm2 2.03.16 (Debian bookworm) `lvs --reportformat json --units b --nosuffix -o ...`:
# every value a string, tags comma-separated
LVS_STRINGS = """  {
      "report": [
          {
              "lv": [
                  {"lv_name":"7d0a1d2e-5b5c-4d7e-9a61-3c7f1f0c0b01", "lv_uuid":"abc",
                   "lv_size":"12582912", "lv_attr":"-wi-ao----", "lv_active":"active",
                   "lv_device_open":"open", "pool_lv":"", "segtype":"linear",
                   "data_percent":"", "metadata_percent":"",
                   "lv_tags":"xapi-storage:vol,xsm:1.0.1:e30="},
                  {"lv_name":"foreign", "lv_uuid":"def", "lv_size":"4194304",
                   "lv_attr":"-wi-------", "lv_active":"", "lv_device_open":"",
                   "pool_lv":"", "segtype":"linear", "data_percent":"",
                   "metadata_percent":"", "lv_tags":""}
              ]
          }
      ]
  }
"""
# the json_std flavour of later lvm2 releases: numbers as numbers, tags as a list
LVS_NUMBERS = """{"report": [{"lv": [{"lv_name": "t1", "lv_size": 1073741824,
  "lv_active": "active", "lv_device_open": "", "pool_lv": "pool", "segtype": "thin",
  "data_percent": 12.5, "metadata_percent": 1.25, "lv_tags": ["a", "b"]}]}]}"""
VGS = """{"report": [{"vg": [{"vg_name": "xapi-sr-u", "vg_uuid": "U", "vg_size": "260046848",
  "vg_free": "247463936", "vg_extent_size": "4194304", "vg_missing_pv_count": "0",
  "pv_count": "2", "vg_tags": "xapi-storage:sr,xsu:u"}]}]}"""


def test_reports_parse_in_both_json_flavours():
    a, b = [lvm.lv_row(r) for r in lvm.parse_report(LVS_STRINGS, "lv")]
    assert (a["size"], a["active"], a["open"], a["tags"]) == \
        (12582912, True, True, ["xapi-storage:vol", "xsm:1.0.1:e30="])
    assert (b["size"], b["active"], b["open"], b["tags"]) == (4194304, False, False, [])
    [t] = [lvm.lv_row(r) for r in lvm.parse_report(LVS_NUMBERS, "lv")]
    assert (t["size"], t["pool"], t["data_percent"], t["tags"]) == \
        (1 << 30, "pool", 12.5, ["a", "b"])
    [v] = [lvm.vg_row(r) for r in lvm.parse_report(VGS, "vg")]
    assert (v["size"], v["free"], v["pv_count"], v["tags"]) == \
        (260046848, 247463936, 2, ["xapi-storage:sr", "xsu:u"])
    with pytest.raises(ValueError, match="not JSON"):
        lvm.parse_report("  WARNING: something\n", "lv")


class Recorder:
    """A recorded lvm2: answers by command name, keeps every argument list."""

    def __init__(self, answers=None):
        self.calls = []
        self.answers = answers or {}

    def __call__(self, args):
        self.calls.append(list(args))
        return self.answers.get(args[0], (0, "", ""))


def test_commands_are_argument_lists_that_never_say_yes(tmp_path):
    rec = Recorder({"lvs": (0, LVS_STRINGS, "")})
    lv = lvm.LVM(runner=rec, lock_dir=str(tmp_path))
    lv.lvcreate("vg", "k", 5 << 20, ["xapi-storage:vol", "xsm:1.0.1:e30="])
    lv.lvchange("vg", "k", add=["a"], delete=["b"], permission="r")
    lv.vgremove("vg")
    lv.lvremove("vg", "k")
    rows = lv.lvs("vg")
    assert [r["name"] for r in rows][1] == "foreign"
    assert rec.calls[0] == ["lvcreate", "-qq", "-Z", "n", "-W", "n", "-n", "k", "-L", "5242880b",
                            "-a", "n", "-k", "y", "--addtag", "xapi-storage:vol",
                            "--addtag", "xsm:1.0.1:e30=", "vg"]
    assert rec.calls[1] == ["lvchange", "-qq", "-p", "r", "--addtag", "a", "--deltag", "b",
                            "vg/k"]
    assert rec.calls[2] == ["vgremove", "-qq", "vg"]      # no -f: a VG with LVs is refused
    assert rec.calls[3][:2] == ["lvremove", "-qq"] and rec.calls[3][-1] == "vg/k"
    assert rec.calls[4][:6] == ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix"]
    for argv in rec.calls:
        assert "-y" not in argv and "--yes" not in argv and "-ff" not in argv


def test_failures_become_structured_errors(tmp_path):
    rec = Recorder({"lvcreate": (5, "", '  Volume group "vg" has insufficient free space '
                                        "(3 extents): 250 required.\n"),
                    "lvs": (5, "", '  Failed to find logical volume "vg/x"\n')})
    lv = lvm.LVM(runner=rec, lock_dir=str(tmp_path))
    with pytest.raises(lvm.LVMError) as e:
        lv.lvcreate("vg", "x", 1 << 30, [])
    err = lvm_raw._lvm_error(e.value)
    assert err.code == "SR_BACKEND_FAILURE_44" and "insufficient free space" in err.params[1]
    assert lv.lv("vg", "x") is None         # "not found" is an answer, not an error
    rec.answers["lvs"] = (5, "", "  Couldn't read metadata: I/O error\n")
    with pytest.raises(lvm.LVMError) as e:
        lv.lv("vg", "x")
    err = lvm_raw._lvm_error(e.value)
    assert err.code == "SR_BACKEND_FAILURE" and err.params[0] == "lvm2 command failed"
    assert "I/O error" in err.params[3]


def test_sr_keys_and_uuids_are_checked_before_naming_a_vg():
    assert lvm_raw.sr_vg("xapi-sr-7d0a1d2e-5b5c-4d7e-9a61-3c7f1f0c0b01")
    for bad in ("", "vg0", "xapi-sr-", "xapi-sr-../x", "xapi-sr-a b", "xapi-sr--x",
                "xapi-sr-" + "a" * 101, "xapi-sr-é", None, 3):
        with pytest.raises(Exception) as e:
            lvm_raw.sr_vg(bad)
        assert type(e.value).__name__ == "SR_does_not_exist", bad
    for bad in ("", "-a", "a/b", "a b", "ü"):
        with pytest.raises(Exception) as e:
            lvm_raw._check_sr_uuid(bad)
        assert e.value.params[0] == "Invalid argument", bad


def test_a_hung_command_is_killed_with_its_children():
    t0 = time.monotonic()
    with pytest.raises(command.CommandTimeout) as e:
        command.run(["sh", "-c", "sleep 60 & echo $! > /dev/stderr; sleep 60"], timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert "no answer within 0.5 s" in str(e.value)
    r = command.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.rc, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_a_hung_commands_whole_group_dies(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(command.CommandTimeout):
        command.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung command's child {pid} survived")


def _loop(path):
    r = subprocess.run(["losetup", "-f", "--show", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"no loop device in CI: {r.stderr.strip()}")
        pytest.skip(f"block-device copy not tested: no loop device: {r.stderr.strip()}")
    return r.stdout.strip()


def test_block_device_copy_copies_every_byte_on_real_loop_devices(tmp_path):
    size = 9 << 20
    src_img, dst_img = tmp_path / "src.img", tmp_path / "dst.img"
    data = os.urandom(1 << 20)
    with open(src_img, "wb") as f:
        f.truncate(size)
        f.seek(3 << 20)
        f.write(data)           # data between zeroes
    with open(dst_img, "wb") as f:
        f.write(b"\xee" * size)     # stale data of a former LV: must be overwritten
    src, dst = _loop(src_img), None
    try:
        dst = _loop(dst_img)
        s = os.open(src, os.O_RDONLY)
        d = os.open(dst, os.O_WRONLY)
        seen = []
        try:
            copy_block_device(s, d, size, progress=seen.append)
            os.fsync(d)
        finally:
            os.close(s)
            os.close(d)
    finally:
        for dev in (src, dst):
            if dev:
                subprocess.run(["losetup", "-d", dev])
    assert seen[-1] == size and len(seen) == 3
    with open(src_img, "rb") as a, open(dst_img, "rb") as b:
        assert a.read() == b.read()


def test_block_device_copy_of_a_short_source_is_an_error(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(b"x" * 1000)
    dst.write_bytes(b"")
    s, d = os.open(str(src), os.O_RDONLY), os.open(str(dst), os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="source ended at byte 1000"):
            copy_block_device(s, d, 5000)
    finally:
        os.close(s)
        os.close(d)


def _report(kind, rows):
    import json
    return json.dumps({"report": [{kind: rows}]})


def _sr_vg_row(vg, uuid):
    rec = {"format": lvm_raw.SR_FORMAT, "version": lvm_raw.SR_FORMAT_VERSION, "state": "ready",
           "uuid": uuid, "name": "", "description": "", "datapath": ["blkback"]}
    tags = [lvm_raw.SR_TAG, lvm_raw.UUID_TAG + uuid] + lvm.encode_record(rec, 1)
    return {"vg_name": vg, "vg_uuid": "U", "vg_size": "260046848", "vg_free": "0",
            "vg_extent_size": "4194304", "vg_missing_pv_count": "0", "pv_count": "1",
            "vg_tags": ",".join(tags)}


def _lv_report_row(name, tags, open_):
    return {"lv_name": name, "lv_uuid": name, "lv_size": "4194304", "lv_attr": "",
            "lv_active": "active", "lv_device_open": "open" if open_ else "", "pool_lv": "",
            "segtype": "thin-pool", "data_percent": "", "metadata_percent": "",
            "lv_tags": ",".join(tags)}


@pytest.mark.parametrize("volume_open", [False, True])
def test_sr_destroy_of_an_attached_thin_sr_is_not_refused_for_its_pool(tmp_path, volume_open):
    """The daemon calls SR.destroy with the SR attached: a thin SR's active pool reads as
    open (lvm2 reports its visible LV open: it is a device over the pool's -tpool layer).
    Only an open volume refuses the destroy."""
    uuid = "9e570000-1111-4222-8333-00000000000b"
    vg = lvm_raw.VG_PREFIX + uuid
    pool = _lv_report_row(lvm_raw.POOL, [lvm_raw.POOL_TAG], True)
    vol = _lv_report_row("7d0a1d2e-5b5c-4d7e-9a61-3c7f1f0c0b01", [lvm_raw.VOL_TAG],
                         volume_open)
    rec = Recorder({"vgs": (0, _report("vg", [_sr_vg_row(vg, uuid)]), ""),
                    "lvs": (0, _report("lv", [pool, vol]), ""),
                    "pvs": (0, _report("pv", []), "")})
    lvm_raw.set_lvm(lvm.LVM(runner=rec, lock_dir=str(tmp_path)))
    try:
        sr = lvm_raw.SR()
        if volume_open:
            with pytest.raises(lvm_raw.XenAPIError) as e:
                sr.destroy("dbg", vg)
            assert e.value.params[:3] == ["SR is in use", vg, f"open volumes: {vol['lv_name']}"]
            assert not [c for c in rec.calls if c[0] in ("lvremove", "vgremove")]
        else:
            sr.destroy("dbg", vg)
            removed = [c[-1] for c in rec.calls if c[0] == "lvremove"]
            assert removed == [f"{vg}/{vol['lv_name']}", f"{vg}/{lvm_raw.POOL}"]  # pool last
            assert ["vgremove", "-qq", vg] in rec.calls
    finally:
        lvm_raw.set_lvm(None)


class ModelLVM2:
    """A small model of lvm2 for counting the processes a call runs: one VG whose LVs have a
    name, size (whole 4 MiB extents), tags and open flag; answers vgs, lvs (LV fields and the
    VG's), lvcreate, lvchange and lvremove in the argument shapes lvm.py uses. What lvm2
    really does with them is proven in the test bed (tests/xen/dom0_volume_plugins.py)."""

    EXTENT = 4 << 20

    def __init__(self, vg, uuid):
        self.vg = _sr_vg_row(vg, uuid)
        self.lvs = {}
        self.calls = []

    def _lv_out(self, name):
        lv = self.lvs[name]
        return dict(self.vg, lv_name=name, lv_uuid=lv.get("data", name),
                    lv_size=str(lv["size"]),
                    lv_attr="-wi-------" + ("k" if lv.get("skip") else "-"),
                    lv_active="active" if lv.get("active", True) else "",
                    lv_device_open="open" if lv["open"] else "",
                    pool_lv="", segtype="linear", data_percent="", metadata_percent="",
                    lv_tags=",".join(lv["tags"]))

    def __call__(self, args):
        self.calls.append(list(args))
        cmd, target = args[0], args[-1]
        for flag in ("-a", "-k"):
            if cmd != "lvchange" or flag not in args:
                continue
            # lvchange -qq -a y [-K] VG/LV..., lvchange -qq -a n VG/LV..., lvchange -qq -k y ...
            value = args[args.index(flag) + 1] == "y"
            for name in [a.partition("/")[2] for a in args if "/" in a]:
                if name not in self.lvs:
                    return 5, "", f'  Failed to find logical volume "{name}"\n'
                lv = self.lvs[name]
                if flag == "-k":
                    lv["skip"] = value
                elif value and lv.get("skip") and "-K" not in args:
                    continue            # lvm2 skips it
                elif lv["open"] and not value:
                    return 5, "", f"  Logical volume {name} in use.\n"
                else:
                    lv["active"] = value
            return 0, "", ""
        if cmd == "lvrename":           # lvrename VG OLD NEW
            target = f"{args[-3]}/{args[-2]}"
        vg, _, name = target.partition("/")
        if vg != self.vg["vg_name"]:
            return 5, "", f'  Volume group "{vg}" not found\n'
        opts = list(zip(args, args[1:]))
        add = [b for a, b in opts if a == "--addtag"]
        drop = [b for a, b in opts if a == "--deltag"]
        if cmd == "vgs":
            return 0, _report("vg", [self.vg]), ""
        if cmd == "lvs":
            if name and name not in self.lvs:
                return 5, "", f'  Failed to find logical volume "{target}"\n'
            return 0, _report("lv", [self._lv_out(n) for n in self.lvs if n == name or
                                     not name]), ""
        if cmd == "lvrename":
            old, new = args[-2:]
            if new in self.lvs:
                return 5, "", f"  cannot rename {old} to {new}\n"
            self.lvs[new] = self.lvs.pop(old)
            return 0, "", ""
        if cmd == "lvcreate":
            size = int(dict(opts)["-L"].rstrip("b"))
            self.lvs[dict(opts)["-n"]] = {"size": -(-size // self.EXTENT) * self.EXTENT,
                                          "tags": add, "open": False,
                                          "active": dict(opts).get("-a", "y") == "y",
                                          "skip": dict(opts).get("-k") == "y"}
            return 0, "", ""
        if name not in self.lvs:
            return 5, "", f'  Failed to find logical volume "{target}"\n'
        if cmd == "lvchange":
            lv = self.lvs[name]
            lv["tags"] = [t for t in lv["tags"] if t not in drop] + add
            return 0, "", ""
        if cmd == "lvremove":
            if self.lvs[name]["open"]:
                return 5, "", f"  Logical volume {target} in use.\n"
            del self.lvs[name]
            return 0, "", ""
        raise AssertionError(f"unexpected lvm2 command {args}")


def test_each_volume_call_runs_only_the_lvm2_commands_it_needs(tmp_path):
    """Under TCG each lvm2 process costs about a second: create is `vgs` + `lvcreate` (its
    answer computed, not read back), destroy one `lvs` (SR record and LV in one report) +
    `lvremove`, stat one `lvs`, a record change one `lvs` + one `lvchange`."""
    uuid = "9e570000-1111-4222-8333-00000000000c"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))

    def cmds(fn, *args):
        del model.calls[:]
        result = fn("dbg", vg, *args)
        return result, [c[0] for c in model.calls]
    try:
        vol, ran = cmds(lvm_raw.Volume().create, "n", "d", 10 << 20, False)
        assert ran == ["vgs", "lvcreate"]
        assert vol["virtual_size"] == vol["physical_utilisation"] == 12 << 20   # 3 extents
        stat, ran = cmds(lvm_raw.Volume().stat, vol["key"])
        assert ran == ["lvs"] and stat == vol       # the computed answer is what lvm2 holds
        _, ran = cmds(lvm_raw.Volume().set, vol["key"], "k", "v")
        assert ran == ["lvs", "lvchange"]
        assert lvm_raw.Volume().stat("dbg", vg, vol["key"])["keys"] == {"k": "v"}
        model.lvs[vol["key"]]["open"] = True
        with pytest.raises(lvm_raw.XenAPIError, match="Volume is in use"):
            lvm_raw.Volume().destroy("dbg", vg, vol["key"])
        model.lvs[vol["key"]]["open"] = False
        _, ran = cmds(lvm_raw.Volume().destroy, vol["key"])
        assert ran == ["lvs", "lvremove"] and not model.lvs
        _, ran = cmds(lvm_raw.Volume().destroy, vol["key"])     # idempotent
        assert ran == ["lvs", "vgs", "lvs"]        # gone: also no revert left it aside
        assert os.listdir(str(tmp_path)) == [f"{vg}.vg.lock"]   # no volume lock file left
        with pytest.raises(lvm_raw.SR_does_not_exist):
            lvm_raw.Volume().destroy("dbg", vg + "x", vol["key"])
        assert os.listdir(str(tmp_path)) == [f"{vg}.vg.lock"]
    finally:
        lvm_raw.set_lvm(None)


def test_a_thick_create_on_an_sr_attached_here_runs_lvcreate_alone(tmp_path):
    """SR.attach leaves the SR's fixed fields (provisioning, datapath, extent size) on this
    host's tmpfs: a thick create then needs no vgs. Detach removes them; a VG gone under them
    is SR_does_not_exist and they go too."""
    uuid = "9e570000-1111-4222-8333-00000000000b"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    create = lambda: lvm_raw.Volume().create("dbg", vg, "n", "d", 10 << 20, False)  # noqa
    try:
        computed = create()
        assert lvm_raw.SR().attach("dbg", {"sr_uuid": uuid}) == vg
        del model.calls[:]
        vol = create()
        assert [c[0] for c in model.calls] == ["lvcreate"]
        want = dict(computed, key=vol["key"], uuid=vol["uuid"],
                    uri=[u.replace(computed["key"], vol["key"]) for u in computed["uri"]])
        assert vol == want == lvm_raw.Volume().stat("dbg", vg, vol["key"])
        lvm_raw.SR().detach("dbg", vg)
        del model.calls[:]
        create()
        assert [c[0] for c in model.calls] == ["vgs", "lvcreate"]
        lvm_raw.SR().attach("dbg", {"sr_uuid": uuid})
        # a cache file that is not what SR.attach writes means a vgs, never a raw error or
        # a wrong URI
        path = os.path.join(str(tmp_path), vg + lvm_raw.ATTACHED)
        with open(path) as f:
            good = json.load(f)
        for bad in ({k: v for k, v in good.items() if k != "datapath"},
                    dict(good, datapath="pyblkback"), dict(good, datapath=[7])):
            with open(path, "w") as f:
                json.dump(bad, f)
            del model.calls[:]
            assert create()["uri"][0].startswith("blkback:///dev/"), bad
            assert [c[0] for c in model.calls] == ["vgs", "lvcreate"], bad
        lvm_raw.SR().attach("dbg", {"sr_uuid": uuid})
        model.vg["vg_name"] = "elsewhere"           # the VG went while attached
        with pytest.raises(lvm_raw.SR_does_not_exist):
            create()
        assert not os.path.exists(os.path.join(str(tmp_path), vg + lvm_raw.ATTACHED))
    finally:
        lvm_raw.set_lvm(None)


def _vol_tags(key, state="ready", reverting=False):
    rec = {"key": key, "state": state, "name": "n", "description": "", "read_write": True,
           "sharable": False, "keys": {}}
    return [lvm_raw.VOL_TAG] + [lvm_raw.REVERT_TAG] * reverting + lvm.encode_record(rec, 1)


KEY = "3c7f1f0c-0b01-4d7e-9a61-7d0a1d2e5b5c"


# which LVs a killed Volume.revert left (data: "old" = the volume's, "new" = the snapshot's)
# -> which data the volume holds once SR.ls or the next call has finished it
@pytest.mark.parametrize("left, state, after", [
    ({"": "old", ".rv": "new"}, "ready", "old"),          # made, not swapped: undone
    ({"": "old", ".rv": "new"}, "creating", "old"),       # killed during the copy
    ({".old": "old", ".rv": "new"}, "ready", "new"),      # set aside: the swap is finished
    ({".old": "old", ".rv": "new"}, "creating", "old"),   # (never made so) put back
    ({"": "new", ".old": "old"}, "ready", "new"),         # swapped: the old data goes
    ({"": "new"}, "ready", "new"),                        # done but for the tag
])
@pytest.mark.parametrize("finisher", ["SR.ls", "Volume.set", "Volume.destroy"])
def test_a_killed_revert_leaves_the_old_or_the_reverted_volume(tmp_path, left, state, after,
                                                                finisher):
    uuid = "9e570000-1111-4222-8333-00000000000d"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    for suffix, data in left.items():
        model.lvs[KEY + suffix] = {"size": 4 << 20, "open": False, "data": data,
                                   "tags": _vol_tags(KEY, state if suffix == ".rv" else
                                                     "ready", reverting=True)}
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    try:
        if finisher == "SR.ls":
            assert [v["key"] for v in lvm_raw.SR().ls("dbg", vg)] == [KEY]
        elif finisher == "Volume.set":
            lvm_raw.Volume().set("dbg", vg, KEY, "k", "v")
        else:
            lvm_raw.Volume().destroy("dbg", vg, KEY)
            assert model.lvs == {} and lvm_raw.SR().ls("dbg", vg) == []   # not resurrected
            return
        assert sorted(model.lvs) == [KEY] and model.lvs[KEY]["data"] == after
        assert lvm_raw.REVERT_TAG not in model.lvs[KEY]["tags"]
        del model.calls[:]
        lvm_raw.Volume().set("dbg", vg, KEY, "k", "w")      # finished: back to one lvs
        assert [c[0] for c in model.calls] == ["lvs", "lvchange"]
    finally:
        lvm_raw.set_lvm(None)


@pytest.mark.parametrize("left, listed_from", [
    ({".old": "old", ".rv": "new"}, "new"),      # between the two renames
    ({"": "old", ".rv": "new"}, "old"),          # copying
])
def test_sr_ls_during_a_running_revert_lists_the_volume_and_changes_nothing(tmp_path, left,
                                                                           listed_from):
    uuid = "9e570000-1111-4222-8333-000000000010"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    for suffix, data in left.items():
        model.lvs[KEY + suffix] = {"size": (8 if data == "new" else 4) << 20, "open": False,
                                   "data": data, "tags": _vol_tags(KEY, reverting=True)}
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    try:
        with lvm_raw._VolumeLock(vg, KEY):      # the revert's own lock: it is running
            [v] = lvm_raw.SR().ls("dbg", vg)
        assert v["key"] == KEY and v["virtual_size"] == (8 if listed_from == "new" else 4) << 20
        assert sorted(model.lvs) == sorted(KEY + s for s in left)
        assert not [c for c in model.calls if c[0] in ("lvrename", "lvremove", "lvchange")]
    finally:
        lvm_raw.set_lvm(None)


def test_revert_refuses_itself_a_snapshot_target_and_an_open_volume(tmp_path):
    uuid = "9e570000-1111-4222-8333-00000000000e"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    snap = "4d7e0b01-3c7f-4d7e-9a61-7d0a1d2e5b5c"
    model.lvs[KEY] = {"size": 4 << 20, "open": True, "tags": _vol_tags(KEY)}
    model.lvs[snap] = {"size": 4 << 20, "open": False, "tags": _vol_tags(snap)}
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    try:
        with pytest.raises(lvm_raw.XenAPIError, match="reverted to itself"):
            lvm_raw.Volume().revert("dbg", vg, KEY, KEY)
        with pytest.raises(lvm_raw.XenAPIError, match="in use"):
            lvm_raw.Volume().revert("dbg", vg, snap, KEY)
        with pytest.raises(lvm_raw.Volume_does_not_exist):
            lvm_raw.Volume().revert("dbg", vg, "5d7e0b01-3c7f-4d7e-9a61-7d0a1d2e5b5c", KEY)
        assert sorted(model.lvs) == sorted([KEY, snap])
        assert not [c for c in model.calls if c[0] in ("lvcreate", "lvrename", "lvremove")]
    finally:
        lvm_raw.set_lvm(None)


def test_volumes_are_active_only_while_something_on_the_host_needs_them(tmp_path, monkeypatch):
    """Volumes are made inactive and activation-skip; a thick snapshot's copy holds its two
    LVs active while it reads and writes them and lets go after, except what a datapath still
    holds (a running VM's disk); SR.attach activates nothing and flags older LVs skip."""
    uuid = "9e570000-1111-4222-8333-00000000000e"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    seen = []

    def copy(src, dst, size):           # the copy itself needs real devices: the bed's part
        seen.append([model.lvs[p.rpartition("/")[2]]["active"] for p in (src, dst)])
    monkeypatch.setattr(lvm_raw, "_copy_lv", copy)
    holders = lambda: sorted(n for n in os.listdir(str(tmp_path)) if ".holder." in n)  # noqa
    try:
        vol = lvm_raw.Volume().create("dbg", vg, "n", "d", 4 << 20, False)
        lv = model.lvs[vol["key"]]
        assert not lv["active"] and lv["skip"]
        del model.calls[:]
        snap = lvm_raw.Volume().snapshot("dbg", vg, vol["key"])
        assert seen == [[True, True]], "the copy ran on inactive LVs"
        # lvs, lvcreate, one lvchange -ay for both, the ready lvchange, one -an for both
        assert [c[0] for c in model.calls] == ["lvs", "lvcreate"] + ["lvchange"] * 3, \
            model.calls
        assert not lv["active"] and not model.lvs[snap["key"]]["active"] and holders() == []
        assert model.lvs[snap["key"]]["skip"]
        # a VM runs on the volume: the copy leaves it active for the VM
        lvm_raw.hold_active(vg, [vol["key"]], "datapath.blkback")
        lvm_raw.Volume().clone("dbg", vg, vol["key"])
        assert lv["active"], "a snapshot deactivated a running VM's disk"
        assert holders() == [f"{vg}.{vol['key']}.holder.datapath.blkback"]
        # SR.attach: no activation; an LV made without the skip flag gets it
        lvm_raw.release_active(vg, [vol["key"]], "datapath.blkback")
        lv["skip"] = False
        assert lvm_raw.SR().attach("dbg", {"sr_uuid": uuid}) == vg
        assert lv["skip"] and not any(x.get("active") for x in model.lvs.values())
        lvm_raw.Volume().destroy("dbg", vg, vol["key"])
        assert holders() == []
    finally:
        lvm_raw.set_lvm(None)


def test_a_copy_whose_activation_fails_leaves_no_lv_active(tmp_path, monkeypatch):
    """`lvchange -ay -K` of a copy's two LVs activates the first and fails on the second: the
    copy fails, structured, and neither LV stays active nor keeps a holder file."""
    uuid = "9e570000-1111-4222-8333-000000000010"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)

    def runner(args):
        if args[:4] == ["lvchange", "-qq", "-a", "y"] and len(args) > 6:
            model(args[:5] + args[5:6])             # the first LV is activated, then:
            return 5, "", "  device-mapper: create ioctl failed: Device or resource busy\n"
        return model(args)
    lvm_raw.set_lvm(lvm.LVM(runner=runner, lock_dir=str(tmp_path)))
    monkeypatch.setattr(lvm_raw, "_copy_lv", lambda *a: None)
    try:
        vol = lvm_raw.Volume().create("dbg", vg, "n", "d", 4 << 20, False)
        with pytest.raises(lvm_raw.XenAPIError) as e:
            lvm_raw.Volume().snapshot("dbg", vg, vol["key"])
        assert e.value.params[0] == "lvm2 command failed", e.value.params
        assert not any(lv.get("active") for lv in model.lvs.values()), \
            "a failed activation left an LV active"
        assert list(model.lvs) == [vol["key"]]
        assert [n for n in os.listdir(str(tmp_path)) if ".holder." in n] == []
    finally:
        lvm_raw.set_lvm(None)


def test_sr_ls_and_detach_touch_only_their_own_holders(tmp_path):
    """Holder files are read by their exact shape: SR.ls and SR.detach of xapi-sr-<u> leave
    those of xapi-sr-<u>.x (an SR uuid may hold '.') alone, and SR.ls leaves the live holder
    of a volume made and attached after its `lvs` (it is not in that list) alone."""
    uuid = "9e570000-1111-4222-8333-000000000011"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    made = []

    def runner(args):
        out = model(args)
        if args[0] == "lvs" and args[-1] == vg and made == ["armed"]:
            # another process, while SR.ls runs: a new volume, attached by a datapath
            del made[:]
            made.append(lvm_raw.Volume().create("dbg", vg, "n", "d", 4 << 20, False)["key"])
            lvm_raw.hold_active(vg, made, "datapath.blkback")
        return out
    lvm_raw.set_lvm(lvm.LVM(runner=runner, lock_dir=str(tmp_path)))
    other = os.path.join(str(tmp_path), f"{vg}.x.{'3c7f1f0c-0b01-4d7e-9a61-7d0a1d2e5b5c'}"
                         ".holder.datapath.blkback")           # SR xapi-sr-<uuid>.x's
    open(other, "w").close()
    try:
        made.append("armed")
        lvm_raw.SR().ls("dbg", vg)
        assert os.path.exists(other), "SR.ls removed another SR's holder"
        mine = f"{vg}.{made[0]}.holder.datapath.blkback"
        assert os.path.exists(os.path.join(str(tmp_path), mine)), \
            "SR.ls removed the holder of a volume newer than its lvs"
        lvm_raw.SR().detach("dbg", vg)
        assert os.path.exists(other), "SR.detach removed another SR's holder"
        assert not os.path.exists(os.path.join(str(tmp_path), mine))
    finally:
        lvm_raw.set_lvm(None)


KEY_B = "4d8f2f1d-1c12-4e8f-8b72-8e1b2e3f6c6d"


def _two_inactive_volumes(tmp_path, uuid):
    """(vg, model, LVM, (KEY, KEY_B)): a model VG holding two inactive activation-skip
    volumes of ours, as lvm-raw makes them."""
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    for k in (KEY, KEY_B):
        model.lvs[k] = {"size": 4 << 20, "open": False, "active": False, "skip": True,
                        "tags": _vol_tags(k)}
    return vg, model, lvm.LVM(runner=model, lock_dir=str(tmp_path)), (KEY, KEY_B)


def test_a_release_waiting_for_a_busy_device_does_not_hold_up_the_sr(tmp_path):
    """A datapath's release waits up to DEACTIVATE_WAIT s for a backend to let go of the
    device; meanwhile another volume of the SR can be attached (its hold takes the act lock):
    the lock is not held across the wait."""
    import threading
    uuid = "9e570000-1111-4222-8333-00000000000a"
    vg, model, lv, (a, b) = _two_inactive_volumes(tmp_path, uuid)
    lvm_raw.hold_active(vg, [a], "datapath.t", lvm=lv)
    model.lvs[a]["open"] = True                 # a backend that has not let go yet
    out = []
    waiter = threading.Thread(target=lambda: out.append(
        lvm_raw.release_active(vg, [a], "datapath.t", wait=3.0, keep_claim_if_busy=True,
                               lvm=lv)))
    waiter.start()
    try:
        time.sleep(0.3)                          # the release is waiting now
        lvm_raw.hold_active(vg, [b], "datapath.t", lvm=lv)
        assert waiter.is_alive(), "the hold waited for the other volume's release to end"
        assert model.lvs[b]["active"]
        model.lvs[a]["open"] = False             # the backend lets go: the release ends
    finally:
        waiter.join(10)
    assert out == [[]] and not model.lvs[a]["active"]


def test_a_hold_racing_sr_detach_is_never_dropped_with_its_lv_left_active(tmp_path):
    """SR.detach reads which LVs are active under the act lock: a datapath's hold that comes
    while it runs either happens before (and SR.detach sees it) or after (its LV active and
    its holder file there), never in between (its holder dropped, its LV left active)."""
    import threading
    uuid = "9e570000-1111-4222-8333-000000000009"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    lv = lvm.LVM(runner=model, lock_dir=str(tmp_path))
    model.lvs[KEY] = {"size": 4 << 20, "open": False, "active": False, "skip": True,
                      "tags": _vol_tags(KEY)}
    racer = []
    real = model.__call__

    def runner(args):
        out = real(args)
        if args[0] == "lvs" and not racer:      # just after SR.detach's report: a hold
            t = threading.Thread(target=lvm_raw.hold_active,
                                 args=(vg, [KEY], "datapath.t"), kwargs={"lvm": lv})
            racer.append(t)
            t.start()
            t.join(0.5)
        return out
    lv.runner = runner
    lvm_raw.set_lvm(lv)
    try:
        lvm_raw.SR().detach("dbg", vg)
        racer[0].join(10)
        held = os.path.exists(os.path.join(str(tmp_path), f"{vg}.{KEY}.holder.datapath.t"))
        assert model.lvs[KEY]["active"] == held, \
            f"LV active {model.lvs[KEY]['active']}, holder file {held}"
    finally:
        lvm_raw.set_lvm(None)


def test_sr_attach_succeeds_when_its_cache_cannot_be_written(tmp_path, monkeypatch):
    """The .attached cache is an optimisation: a full /run must not fail SR.attach, and no
    older cache may stay in its place."""
    uuid = "9e570000-1111-4222-8333-000000000008"
    vg = lvm_raw.VG_PREFIX + uuid
    model = ModelLVM2(vg, uuid)
    lvm_raw.set_lvm(lvm.LVM(runner=model, lock_dir=str(tmp_path)))
    try:
        lvm_raw.SR().attach("dbg", {"sr_uuid": uuid})
        assert os.path.exists(os.path.join(str(tmp_path), vg + lvm_raw.ATTACHED))

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(store_mod.Store, "write", full)
        assert lvm_raw.SR().attach("dbg", {"sr_uuid": uuid}) == vg
        assert not os.path.exists(os.path.join(str(tmp_path), vg + lvm_raw.ATTACHED))
        del model.calls[:]
        lvm_raw.Volume().create("dbg", vg, "n", "d", 4 << 20, False)
        assert [c[0] for c in model.calls] == ["vgs", "lvcreate"]
    finally:
        lvm_raw.set_lvm(None)


def test_a_release_of_two_lvs_one_still_open_deactivates_the_other(tmp_path):
    """A copy's release deactivates its two LVs in one lvchange; when lvm2 refuses that (one
    is still open), each is tried alone: the closed one is deactivated, the open one is
    reported and left active."""
    uuid = "9e570000-1111-4222-8333-000000000007"
    vg, model, lv, (a, b) = _two_inactive_volumes(tmp_path, uuid)
    lvm_raw.hold_active(vg, [a, b], "copy.1", lvm=lv)
    model.lvs[a]["open"] = True
    assert lvm_raw.release_active(vg, [a, b], "copy.1", wait=0.0, lvm=lv) == [a]
    assert model.lvs[a]["active"] and not model.lvs[b]["active"]
    assert [n for n in os.listdir(str(tmp_path)) if ".holder." in n] == []


def test_sr_ls_releases_what_killed_copies_held(tmp_path):
    """A killed copy's holder files: SR.ls deactivates the LV it held (nothing else needs it)
    and removes the holder of an LV that is gone without running lvm2 for it."""
    vg, model, lv, (a, _) = _two_inactive_volumes(tmp_path, "9e570000-1111-4222-8333-000000000006")
    lvm_raw.hold_active(vg, [a], "copy.999999999", lvm=lv)     # no such process
    gone = "5e9a3f2e-2d23-4f90-9c83-9f2c3f4a7d7e"
    open(os.path.join(str(tmp_path), f"{vg}.{gone}.holder.copy.999999999"), "w").close()
    lvm_raw.set_lvm(lv)
    try:
        del model.calls[:]
        lvm_raw.SR().ls("dbg", vg)
        assert not model.lvs[a]["active"]
        assert [n for n in os.listdir(str(tmp_path)) if ".holder." in n] == []
        assert not any(gone in " ".join(c) for c in model.calls), model.calls
    finally:
        lvm_raw.set_lvm(None)
