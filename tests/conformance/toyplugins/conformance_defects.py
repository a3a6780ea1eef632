"""Throw-away volume plugins for the conformance suite's own tests: file-raw with ONE planted
defect, chosen by the environment variable CONFORMANCE_DEFECT (the name of the check that
the defect must make fail; unset = no defect). CONFORMANCE_STATE is a directory this plugin
may keep state in (outside the SR).

Each defect is a mistake real plugins made or could make; tests/conformance/test_defects.py
checks that each makes exactly its own check fail."""

import os
import time

from xapi_storage.sdk import errors, wire
from xapi_storage.volume import file_raw
from xapi_storage.volume.file_raw import _update_volume

DEFECT = os.environ.get("CONFORMANCE_DEFECT", "")
STATE = os.environ.get("CONFORMANCE_STATE", "/nonexistent")


class Plugin(file_raw.Plugin):
    def query(self, dbg):
        q = super().query(dbg)
        if DEFECT == "plugin-query":        # declares CBT, but ships no Volume.enable_cbt
            q["features"] = q["features"] + ["VDI_CONFIG_CBT"]
        return q


class SR(file_raw.SR):
    def attach(self, dbg, configuration):
        sr = super().attach(dbg, configuration)
        if DEFECT == "sr-attach":
            open(os.path.join(STATE, "attached"), "w").close()
        return sr

    def detach(self, dbg, sr):
        if DEFECT == "sr-attach":            # a second detach fails: not idempotent
            try:
                os.unlink(os.path.join(STATE, "attached"))
            except FileNotFoundError:
                raise errors.Sr_not_attached(sr) from None
        return super().detach(dbg, sr)

    def probe(self, dbg, configuration):
        found = super().probe(dbg, configuration)
        if DEFECT == "probe":               # never reports the SR that is there
            found = [r for r in found if "sr" not in r] or \
                [{"configuration": dict(configuration), "complete": False, "extra_info": {}}]
            for r in found:
                r["configuration"].pop("sr_uuid", None)
                r["complete"] = False
        return found

    def ls(self, dbg, sr):
        try:
            return super().ls(dbg, sr)
        except errors.SR_does_not_exist:
            if DEFECT == "storage-gone" and not os.path.isdir(file_raw.sr_path(sr)):
                return []                    # storage gone, reported as an empty SR
            raise

    def destroy(self, dbg, sr):
        if DEFECT == "cleanup":              # answers success, removes nothing
            return None
        return super().destroy(dbg, sr)


class Volume(file_raw.Volume):
    def create(self, dbg, sr, name, description, size, sharable):
        if DEFECT == "create-size":          # rounds down instead of up
            size = size // 512 * 512
        return super().create(dbg, sr, name, description, size, sharable)

    def set(self, dbg, sr, key, k, v):
        if DEFECT == "volume-keys" and k.startswith("_sm_config_"):
            return None                      # silently drops xapi's sm-config keys
        if DEFECT == "parallel":             # read-modify-write without the volume's lock
            keys = dict(self.stat(dbg, sr, key)["keys"])
            time.sleep(0.2)
            keys[k] = v
            return _update_volume(sr, key, lambda rec: rec.__setitem__("keys", keys))
        return super().set(dbg, sr, key, k, v)

    def unset(self, dbg, sr, key, k):
        if DEFECT == "repeat-converges" and k not in self.stat(dbg, sr, key)["keys"]:
            raise errors.XenAPIError("SR_BACKEND_FAILURE", ["No such key", k])
        return super().unset(dbg, sr, key, k)

    def snapshot(self, dbg, sr, key):
        vol = super().snapshot(dbg, sr, key)
        if DEFECT == "snapshot":             # reports the snapshot writable
            vol["read_write"] = True
        return vol

    def clone(self, dbg, sr, key):
        if DEFECT == "clone":                # a clone that is a read-only snapshot
            return file_raw._copy_volume(sr, key, read_write=False)
        return super().clone(dbg, sr, key)

    def resize(self, dbg, sr, key, new_size):
        if DEFECT == "resize":               # answers success, changes nothing
            return None
        return super().resize(dbg, sr, key, new_size)

    def destroy(self, dbg, sr, key):
        if DEFECT == "destroy-missing":      # a second destroy fails
            self.stat(dbg, sr, key)
        return super().destroy(dbg, sr, key)

    def stat(self, dbg, sr, key):
        try:
            vol = super().stat(dbg, sr, key)
        except errors.Volume_does_not_exist:
            if DEFECT != "bad-inputs":
                raise
            vol = {"key": key, "uuid": key, "name": "", "description": "", "read_write": True,
                   "sharable": False, "virtual_size": 0, "physical_utilisation": 0, "uri": [],
                   "keys": {}}               # a made-up volume for a key that does not exist
        if DEFECT == "results-valid":
            vol["uuid"] = None               # null for an optional field
        return vol


if DEFECT == "static-vdis":
    # executables that understand only --json (a plugin written without the SDK's
    # command-line mode)
    def _no_cli(method, args):
        raise errors.InvalidRequest(method.wire_name, "(the value itself)", "command-line",
                                    "this plugin only understands --json")
    wire.parse_cli = _no_cli

if DEFECT == "results-valid":
    # printed as it is, without the SDK's check of the result (a plugin not using the SDK)
    from xapi_storage.sdk import jsonio
    wire.check_result = lambda method, result: jsonio.dumps(result)


IMPLEMENTATIONS = {"Plugin": Plugin, "SR": SR, "Volume": Volume}
