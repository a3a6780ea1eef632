"""A toy datapath plugin for the SDK's tests."""
from xapi_storage.sdk import base


class Plugin(base.Plugin):
    def query(self, dbg):
        return {"plugin": "toydp", "name": "Toy datapath", "description": "", "vendor": "tests",
                "copyright": "none", "version": "1.0", "required_api_version": "5.0",
                "features": ["NONPERSISTENT"], "configuration": {}, "required_cluster_stack": []}


class Datapath(base.Datapath):
    def attach(self, dbg, uri, domain):
        path = uri.split("://", 1)[-1]
        return {"implementations": [["XenDisk", {"backend_type": "vbd", "params": path, "extra": {}}],
                                    ["BlockDevice", {"path": path}]]}

    def activate(self, dbg, uri, domain):
        return None

    def open(self, dbg, uri, persistent):
        if not isinstance(persistent, bool):
            raise TypeError("persistent must be a bool")


class Data(base.Data):
    def stat(self, dbg, operation):
        return {"failed": False, "complete": True, "progress": 1}   # an int where a float is: fine


IMPLEMENTATIONS = {"Plugin": Plugin, "Datapath": Datapath, "Data": Data}
