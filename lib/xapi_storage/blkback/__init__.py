"""pyblkback: a userspace Xen block backend (blkif ring server).

Layers (see docs/blkback.md):
    blkif      the ABI: layouts for x86_64-abi and x86_32-abi, request parsing (no I/O)
    ring       ring index arithmetic over a memoryview (no I/O); fence: the real barriers
    xenbus     the backend's XenBus state machine as a table (no I/O)
    queue      one ring's service loop (batch per wake-up, one notify per batch)
    server     devices, the XenStore handshake, the event loop; injected Xen + storage
    backends/  raw file, block device, null, copy-on-write
    toolstack  writing/removing the FE+BE nodes as libxl does
    frontend   a blkfront-like test frontend
    cli        `xapi-storage blkback connect ...`

The one-call API, for demos and tests:

    from xapi_storage.blkback import serve, Frontend
    with serve("sim:/dev/shm/x", "guest1", "/tmp/disk.img", backend="raw") as served:
        with served.frontend() as fe:          # a blkfront in the guest, connected
            fe.write(0, b"x" * 4096)
            assert fe.read(0, 8) == b"x" * 4096
        print(served.stats())
"""

import contextlib
import threading

from .frontend import Frontend, FrontendError  # noqa: F401  (re-exported)

__all__ = ["serve", "Served", "Frontend", "FrontendError"]


class Served:
    """A device being served in a background thread by `serve()`."""

    def __init__(self, xen, guest, devid, name, fe_path, be_path, server, device, spec):
        self.xen = xen
        self.guest = guest
        self.devid = devid
        self.name = name
        self.fe_path = fe_path
        self.be_path = be_path
        self.server = server
        self.device = device
        self.spec = spec
        self.thread = None
        self.error = None

    def stats(self):
        """The device's statistics (a dict; safe to call while it runs)."""
        return self.device.stats_dict()

    def frontend(self, connect=True, **options):
        """A test frontend acting as the guest domain, connected (see frontend.Frontend)."""
        from ..xen import open_xen
        fe = Frontend(open_xen(self.spec, domid=self.guest), self.devid, **options)
        if connect:
            try:
                fe.connect()
            except BaseException:
                fe._free()
                raise
        return fe

    @property
    def alive(self):
        return self.thread is not None and self.thread.is_alive()


@contextlib.contextmanager
def serve(xen_spec, domain, path, backend="raw", readonly=False, size=None, stats_path=None,
          timeout=10.0, **device_options):
    """Plug a vbd into `domain` (name or id) served from `path`, in a background thread.

    `xen_spec` is what `xapi_storage.xen.open_xen` takes ("sim:<dir>" or "real"). `backend`
    is a kind ("raw", "cow", "null", "block") or an already open `backends.Storage`. On exit
    the device is unplugged as a toolstack would (online=0, state=5), the server finishes the
    close, and every node written is removed. `device_options` go to server.Device
    (max_queues, max_ring_page_order, max_indirect, persistent, ...)."""
    from ..xen import open_xen
    from . import toolstack
    from .backends import open_storage
    from .server import Server, XenStore
    xen = open_xen(xen_spec, domid=0)
    server = Server(xen)
    xs = XenStore(xen.xenstore_path)   # ours: the server thread owns server.xs
    storage = None
    fe = be = None
    try:
        guest = toolstack.resolve_domain(xs, domain)
        if isinstance(backend, str):
            storage = open_storage(backend, path, readonly=readonly, size=size)
        else:
            storage, backend = backend, backend.kind
        devid, name, fe, be, created = toolstack.plug_vbd(
            xs, guest, f"{backend}:{path}" if path else backend, backend_domid=xen.domid,
            readonly=readonly)
        device = server.add_device(be, storage, stats_path=stats_path, **device_options)
        storage = None                           # the device owns it now
        served = Served(xen, guest, devid, name, fe, be, server, device, xen_spec)

        def loop():
            try:
                server.run()
            except BaseException as e:           # noqa: BLE001 - surfaced by the caller
                served.error = e
                raise
        served.thread = threading.Thread(target=loop, name=f"blkback-{name}", daemon=True)
        served.thread.start()
        try:
            yield served
        finally:
            if served.thread.is_alive():
                # a toolstack unplug; a frontend that never connected makes it immediate
                try:
                    toolstack.unplug(xs, be)
                except OSError:
                    server.stop(force=True)
                served.thread.join(timeout)
                if served.thread.is_alive():
                    server.stop(force=True)
                    served.thread.join(timeout)
            if served.error is not None:
                raise served.error
    finally:
        if storage is not None:
            storage.close()
        try:
            if fe is not None:
                toolstack.remove_vbd(xs, fe, be, created)
        finally:
            xs.close()
            server.close()
