"""The interfaces of the Xapi storage API v5, as Python base classes to subclass.

Every method takes `dbg` first and then the interface's named parameters, in the interface's
order, with the interface's names (the SDK calls them by keyword). Values are plain JSON
values exactly as on the wire (dicts, lists, str, int, bool; variants as "Tag" or
["Tag", arg]; optional record fields omitted, never None). Methods a plugin does not override
raise Unimplemented("Interface.method").

The JSON Schemas in schemas/ are the authority on every parameter and result type; the SDK
validates requests before calling these methods and results before printing them.
"""

from .errors import Unimplemented


def unimplemented(method):
    """Decorator for a method written out but not implemented yet (what `xapi-storage
    new-plugin` writes): the installer lays no executable for it, so the daemon neither calls
    it nor advertises its capability (it advertises one for every executable present, e.g.
    VDI_SNAPSHOT for Volume.snapshot). In-process calls still run its body. Remove the
    decorator once the method works."""
    method.xapi_storage_unimplemented = True
    return method


def implements(cls, interface, name):
    """True if class `cls` (a subclass of the base class `interface`) implements method `name`:
    it overrides it, without the @unimplemented mark."""
    fn = getattr(cls, name, None)
    return (fn is not getattr(interface, name, None)
            and not getattr(fn, "xapi_storage_unimplemented", False))


def _unimplemented(name):
    def method(self, dbg, *args, **kwargs):
        raise Unimplemented(name)
    method.__name__ = name.split(".", 1)[1]
    method.__doc__ = f"{name}: not implemented (raises Unimplemented)."
    return method


class _Interface:
    #: the interface's namespace on the wire
    NAMESPACE = None


def query_result(plugin, name, description, features=(), configuration=None, version=None,
                 vendor="xapi-storage-suite",
                 copyright="(C) xapi-storage-suite contributors, BSD-2-Clause"):
    """The Plugin.query record of one of this project's plugins (required_api_version "5.0",
    which the daemon requires; every field present, maps as objects)."""
    if version is None:
        from .. import __version__ as version
    return {"plugin": plugin, "name": name, "description": description, "vendor": vendor,
            "copyright": copyright, "version": version, "required_api_version": "5.0",
            "features": list(features), "configuration": dict(configuration or {}),
            "required_cluster_stack": []}


class Plugin(_Interface):
    NAMESPACE = "Plugin"

    def query(self, dbg):
        """-> query_result record."""
        raise Unimplemented("Plugin.query")

    ls = _unimplemented("Plugin.ls")                    # (dbg) -> [str]
    diagnostics = _unimplemented("Plugin.diagnostics")  # (dbg) -> str


class SR(_Interface):
    NAMESPACE = "SR"
    probe = _unimplemented("SR.probe")                  # (dbg, configuration) -> [probe_result]
    create = _unimplemented("SR.create")                # (dbg, uuid, configuration, name, description) -> configuration
    attach = _unimplemented("SR.attach")                # (dbg, configuration) -> sr
    detach = _unimplemented("SR.detach")                # (dbg, sr) -> None
    destroy = _unimplemented("SR.destroy")              # (dbg, sr) -> None
    stat = _unimplemented("SR.stat")                    # (dbg, sr) -> sr_stat
    set_name = _unimplemented("SR.set_name")            # (dbg, sr, new_name) -> None
    set_description = _unimplemented("SR.set_description")  # (dbg, sr, new_description) -> None
    ls = _unimplemented("SR.ls")                        # (dbg, sr) -> [volume]


class Volume(_Interface):
    NAMESPACE = "Volume"
    create = _unimplemented("Volume.create")            # (dbg, sr, name, description, size, sharable) -> volume
    snapshot = _unimplemented("Volume.snapshot")        # (dbg, sr, key) -> volume
    clone = _unimplemented("Volume.clone")              # (dbg, sr, key) -> volume
    copy = _unimplemented("Volume.copy")                # (dbg, sr, key, dest_sr) -> volume
    destroy = _unimplemented("Volume.destroy")          # (dbg, sr, key) -> None
    revert = _unimplemented("Volume.revert")            # (dbg, sr, snapshot, key) -> None
    set_name = _unimplemented("Volume.set_name")        # (dbg, sr, key, new_name) -> None
    set_description = _unimplemented("Volume.set_description")  # (dbg, sr, key, new_description)
    set = _unimplemented("Volume.set")                  # (dbg, sr, key, k, v) -> None
    unset = _unimplemented("Volume.unset")              # (dbg, sr, key, k) -> None
    resize = _unimplemented("Volume.resize")            # (dbg, sr, key, new_size) -> None
    stat = _unimplemented("Volume.stat")                # (dbg, sr, key) -> volume
    compare = _unimplemented("Volume.compare")          # (dbg, sr, key, key2) -> blocklist
    similar_content = _unimplemented("Volume.similar_content")  # (dbg, sr, key) -> [key]
    enable_cbt = _unimplemented("Volume.enable_cbt")    # (dbg, sr, key) -> None
    disable_cbt = _unimplemented("Volume.disable_cbt")  # (dbg, sr, key) -> None
    data_destroy = _unimplemented("Volume.data_destroy")  # (dbg, sr, key) -> None
    list_changed_blocks = _unimplemented("Volume.list_changed_blocks")  # (dbg, sr, key, key2, offset, length) -> changed_blocks
    compose = _unimplemented("Volume.compose")          # (dbg, sr, key, key2) -> None


class Datapath(_Interface):
    NAMESPACE = "Datapath"
    open = _unimplemented("Datapath.open")              # (dbg, uri, persistent) -> None
    attach = _unimplemented("Datapath.attach")          # (dbg, uri, domain) -> backend
    activate = _unimplemented("Datapath.activate")      # (dbg, uri, domain) -> None
    activate_readonly = _unimplemented("Datapath.activate_readonly")  # (dbg, uri, domain)
    import_activate = _unimplemented("Datapath.import_activate")  # (dbg, uri, domain) -> sock_path
    deactivate = _unimplemented("Datapath.deactivate")  # (dbg, uri, domain) -> None
    detach = _unimplemented("Datapath.detach")          # (dbg, uri, domain) -> None
    close = _unimplemented("Datapath.close")            # (dbg, uri) -> None


class Data(_Interface):
    NAMESPACE = "Data"
    copy = _unimplemented("Data.copy")                  # (dbg, uri, domain, remote, blocklist) -> operation
    mirror = _unimplemented("Data.mirror")              # (dbg, uri, domain, remote) -> operation
    stat = _unimplemented("Data.stat")                  # (dbg, operation) -> status
    cancel = _unimplemented("Data.cancel")              # (dbg, operation) -> None
    destroy = _unimplemented("Data.destroy")            # (dbg, operation) -> None
    ls = _unimplemented("Data.ls")                      # (dbg) -> [operation]


class Task(_Interface):
    NAMESPACE = "Task"
    stat = _unimplemented("Task.stat")                  # (dbg, id) -> task
    cancel = _unimplemented("Task.cancel")              # (dbg, id) -> None
    destroy = _unimplemented("Task.destroy")            # (dbg, id) -> None
    ls = _unimplemented("Task.ls")                      # (dbg) -> [id]
