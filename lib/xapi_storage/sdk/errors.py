"""Errors a plugin raises, and how each is written on the wire.

    StorageError(Exception)                   anything with a wire (code, params)
    ├── XenAPIError(code, params)             any XenAPI code, e.g. SR_BACKEND_FAILURE_79
    └── InterfaceError                        the interface's own variants, written as
        │                                     code=SR_BACKEND_FAILURE, params=[Name, arg]
        ├── Sr_not_attached(sr)
        ├── SR_does_not_exist(sr)
        ├── Volume_does_not_exist(key)
        ├── Unimplemented(method)
        ├── Cancelled(what)
        └── Activated_on_another_host(host_uuid)

The SDK writes the error record {"code", "params", "backtrace"} on stdout and exits 1
(see xapi_storage.sdk.wire). The names keep the interface's spelling on purpose: they are
what an operator sees in `xe` output and in SMlog.
"""


class StorageError(Exception):
    code = "SR_BACKEND_FAILURE"

    @property
    def params(self):
        return [type(self).__name__, str(self)]


class XenAPIError(StorageError):
    """A XenAPI error with an explicit code and string params."""

    def __init__(self, code, params=()):
        self.code = str(code)
        self._params = [str(p) for p in params]
        super().__init__(self.code, *self._params)

    @property
    def params(self):
        return list(self._params)

    def __str__(self):
        return f"{self.code}: {', '.join(self._params)}" if self._params else self.code


class InterfaceError(StorageError):
    """An error variant of the storage interface, with one string argument."""

    def __init__(self, arg=""):
        super().__init__(str(arg))

    @property
    def params(self):
        return [type(self).__name__, str(self)]


class Sr_not_attached(InterfaceError):
    """The SR must be attached to access its volumes."""


class SR_does_not_exist(InterfaceError):
    """No SR was found."""


class Volume_does_not_exist(InterfaceError):
    """No volume with this key in the SR."""


class Unimplemented(InterfaceError):
    """The plugin does not implement this operation."""


class Cancelled(InterfaceError):
    """The operation was cancelled."""


class Activated_on_another_host(InterfaceError):
    """The volume is active on another host (argument: that host's installation uuid)."""


# Errors the SDK itself raises. Same wire shape as the interface's variants:
# code SR_BACKEND_FAILURE, params [Name, ...], with the fields below; see docs/sdk.md.

class SDKError(StorageError):
    """An error found by the SDK rather than raised by the plugin's own code."""
    NAME = "SDK_error"

    def __init__(self, *params):
        self._params = [str(p) for p in params]
        super().__init__(": ".join(self._params))

    @property
    def params(self):
        return [self.NAME] + self._params


class InvalidRequest(SDKError):
    """The caller's fault: the request does not match the interface's schema.
    params: ["Invalid_request", method, field, rule, message]"""
    NAME = "Invalid_request"

    def __init__(self, method, field, rule, message):
        super().__init__(method, field, rule, message)
        self.method, self.field, self.rule, self.message = method, field, rule, message


class InvalidResult(SDKError):
    """The plugin's bug: its result does not match the interface's schema (or is not JSON).
    params: ["Invalid_result", method, field, rule, message]"""
    NAME = "Invalid_result"

    def __init__(self, method, field, rule, message):
        super().__init__(method, field, rule, message)
        self.method, self.field, self.rule, self.message = method, field, rule, message


class UnknownMethod(SDKError):
    """The executable's name (or the name passed to wire.call) is not a method of the
    interfaces this plugin implements. params: ["Unknown_method", name, supported names]"""
    NAME = "Unknown_method"

    def __init__(self, name, supported=()):
        super().__init__(name, " ".join(supported))
        self.name = name
        self.supported = list(supported)


class PluginLoadError(SDKError):
    """The plugin module cannot be imported, or does not export a usable IMPLEMENTATIONS.
    params: ["Plugin_load_failed", module, reason]"""
    NAME = "Plugin_load_failed"

    def __init__(self, module, reason):
        super().__init__(module, reason)
        self.module, self.reason = module, reason
