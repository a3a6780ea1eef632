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
