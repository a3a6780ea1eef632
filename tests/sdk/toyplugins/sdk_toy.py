"""A toy volume plugin for the SDK's tests: volumes are JSON files in the directory given as
device-config `path`. Some methods misbehave on purpose, to exercise the SDK's error paths."""

import json
import os
import subprocess
import sys
import uuid

from xapi_storage.sdk import base, errors, log


class Plugin(base.Plugin):
    def query(self, dbg):
        return {"plugin": "toy", "name": "Toy", "description": "SDK test plugin", "vendor": "tests",
                "copyright": "none", "version": "1.0", "required_api_version": "5.0",
                "features": ["SR_ATTACH", "VDI_CREATE"], "configuration": {"path": "a directory"},
                "required_cluster_stack": []}

    def diagnostics(self, dbg):
        print("a stray print from the plugin")                      # must not reach stdout
        sys.stdout.flush()
        os.write(1, b"a stray write to fd 1\n")                      # nor this
        subprocess.run([sys.executable, "-c", "print('a stray print from a child')"], check=True)
        log.info("diagnostics for %s", dbg)
        return "all fine"


class SR(base.SR):
    def attach(self, dbg, configuration):
        path = configuration.get("path")
        if not path or not os.path.isdir(path):
            raise errors.SR_does_not_exist(str(path))
        return path

    def stat(self, dbg, sr):
        return {"sr": sr, "name": "toy", "description": "", "free_space": 1, "total_space": 2,
                "datasources": [], "clustered": False, "health": ["Healthy", ""]}

    def ls(self, dbg, sr):
        out = []
        for n in sorted(os.listdir(sr)):
            with open(os.path.join(sr, n)) as f:
                out.append(json.load(f))
        return out

    def probe(self, dbg, configuration):
        # a tuple where the interface has an array: accepted (written as an array)
        return ({"configuration": configuration, "complete": False, "extra_info": {}},)


class Volume(base.Volume):
    def create(self, dbg, sr, name, description, size, sharable):
        assert isinstance(size, int)  # the SDK decodes digit strings
        key = str(uuid.uuid4())
        vol = {"key": key, "uuid": key, "name": name, "description": description, "read_write": True,
               "sharable": sharable, "virtual_size": size, "physical_utilisation": 0,
               "uri": ["file://" + os.path.join(sr, key)], "keys": {}}
        with open(os.path.join(sr, key), "w") as f:
            json.dump(vol, f)
        return vol

    def stat(self, dbg, sr, key):
        try:
            with open(os.path.join(sr, os.path.basename(key))) as f:
                return json.load(f)
        except FileNotFoundError:
            raise errors.Volume_does_not_exist(key) from None

    def snapshot(self, dbg, sr, key):
        vol = self.stat(dbg, sr, key)
        vol["uuid"] = None                # a plugin bug: null for an optional field
        return vol

    def clone(self, dbg, sr, key):
        vol = self.stat(dbg, sr, key)
        del vol["virtual_size"]           # a plugin bug: a required field missing
        return vol

    def set_name(self, dbg, sr, key, new_name):
        raise errors.XenAPIError("SR_BACKEND_FAILURE_79", ["VDI Invalid size", "shrinking not allowed"])

    def revert(self, dbg, sr, snapshot, key):
        raise ValueError("something broke")

    def resize(self, dbg, sr, key, new_size):
        return {"not": "null"}            # a plugin bug: unit methods return None

    def destroy(self, dbg, sr, key):
        try:
            os.unlink(os.path.join(sr, os.path.basename(key)))
        except FileNotFoundError:
            pass

    def list_changed_blocks(self, dbg, sr, key, key2, offset, length):
        return {"granularity": 65536, "bitmap": f"{offset}:{length}"}

    def set_description(self, dbg, sr, key, new_description):
        sys.exit(3)                        # a plugin that exits by itself


IMPLEMENTATIONS = {"Plugin": Plugin, "SR": SR, "Volume": Volume}
