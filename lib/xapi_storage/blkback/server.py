"""The ring server: XenStore handshake + service loop for one or more devices.

The server is given its edges and nothing else:

    server = Server(xen)                        # a xapi_storage.xen.Xen (real or simulated)
    dev = server.add_device(be_path, storage)   # BE directory already written by a toolstack
    server.run()                                # until stop() or every device is destroyed

`xen` supplies grants, event channels and the XenStore socket path (pyxs speaks the wire
protocol to it); `storage` is a `backends.Storage`. There is no branch on which Xen it is.

One thread runs everything: a selector over the event-channel fd, a wake-up fd that XenStore
watch events and stop() write to, and a 100 ms timer (re-check every ring: belt and braces
against a lost wake-up; re-read the storage size for online resize; write the stats file).
Per device the XenBus state machine (`xenbus.py`) decides, this module acts.
"""

import errno
import logging
import os
import queue as _queue
import selectors
import threading
import time

from pyxs import Client
from pyxs.client import Monitor
from pyxs.exceptions import PyXSError

from .. import compat
from . import blkif, xenbus
from .blkif import Limits
from .queue import FatalRingError, Queue
from .stats import Stats, write_json_atomically

log = logging.getLogger("xapi_storage.blkback")

TICK = 0.1
RESIZE_CHECK = 1.0


def _s(v):
    return v if isinstance(v, bytes) else str(v).encode()


class _WakingQueue(_queue.Queue):
    """pyxs puts watch events here from its router thread; we also poke an eventfd."""

    def __init__(self, wake_fd):
        super().__init__()
        self.wake_fd = wake_fd

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        try:
            compat.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass


class _Monitor(Monitor):
    def __init__(self, client, wake_fd):
        super().__init__(client)
        self.events = _WakingQueue(wake_fd)


class XenStoreError(OSError):
    """A XenStore request failed (errno from the XS_ERROR reply)."""


def _oserror(e, what):
    code = e.args[0] if e.args and isinstance(e.args[0], int) else errno.EIO
    return XenStoreError(code, f"XenStore {what}: {os.strerror(code)}")


class XenStore:
    """The few XenStore operations we need, on one pyxs connection, with str paths.
    Failures are XenStoreError (an OSError with the errno XenStore answered)."""

    def __init__(self, path, wake_fd=None):
        self.client = Client(unix_socket_path=path)
        self.client.connect()
        self.monitor = _Monitor(self.client, wake_fd) if wake_fd is not None else None

    def read(self, path, default=None):
        """The value, or `default` if the node does not exist (or we may not read it)."""
        try:
            return self.client.read(_s(path)).decode(errors="replace")
        except PyXSError as e:
            if e.args and e.args[0] in (errno.ENOENT, errno.EACCES):
                return default
            raise _oserror(e, f"read {path}") from None

    def list(self, path):
        try:
            return [x.decode() for x in self.client.list(_s(path))]
        except PyXSError as e:
            if e.args and e.args[0] in (errno.ENOENT, errno.EACCES):
                return []
            raise _oserror(e, f"directory {path}") from None

    def write(self, path, value):
        try:
            self.client.write(_s(path), _s(value))
        except PyXSError as e:
            raise _oserror(e, f"write {path}") from None

    def mkdir(self, path):
        try:
            self.client.mkdir(_s(path))
        except PyXSError as e:
            raise _oserror(e, f"mkdir {path}") from None

    def rm(self, path):
        try:
            self.client.delete(_s(path))
        except PyXSError as e:
            if not (e.args and e.args[0] == errno.ENOENT):
                raise _oserror(e, f"rm {path}") from None

    def set_perms(self, path, perms):
        try:
            self.client.set_perms(_s(path), [_s(p) for p in perms])
        except PyXSError as e:
            raise _oserror(e, f"set_perms {path}") from None

    def transaction(self, fn, attempts=50):
        """Run fn() inside a transaction; redo it on EAGAIN. fn's result is returned."""
        for _ in range(attempts):
            try:
                self.client.transaction()
            except PyXSError as e:
                raise _oserror(e, "transaction start") from None
            try:
                result = fn()
            except BaseException:
                try:
                    self.client.rollback()
                except PyXSError:
                    pass
                raise
            try:
                if self.client.commit():
                    return result
            except PyXSError as e:
                raise _oserror(e, "transaction commit") from None
            time.sleep(0.001)
        raise XenStoreError(errno.EAGAIN, "XenStore transaction kept conflicting")

    def watch(self, path, token):
        try:
            self.monitor.watch(_s(path), _s(token))
        except PyXSError as e:
            raise _oserror(e, f"watch {path}") from None

    def unwatch(self, path, token):
        try:
            self.monitor.unwatch(_s(path), _s(token))
        except (PyXSError, KeyError, ValueError):
            pass

    def events(self):
        """Watch events that arrived, without blocking: [(path, token), ...]."""
        out = []
        q = self.monitor.events
        while True:
            try:
                out.append(q.get_nowait())
            except _queue.Empty:
                return out

    def close(self):
        try:
            self.client.close()
        except Exception:                                  # noqa: BLE001 - best effort
            pass


class Device:
    """One virtual block device: BE directory, state machine, rings, storage, stats."""

    def __init__(self, server, be_path, storage, *, max_ring_page_order=4, max_queues=4,
                 max_indirect=256, persistent=True, max_persistent=16384, stats_path=None,
                 on_destroy=None, sector_size=512, io_threads=2):
        self.server = server
        self.be_path = be_path.rstrip("/")
        self.storage = storage
        self.readonly = storage.readonly
        self.max_ring_page_order = max_ring_page_order
        self.max_queues = max_queues
        self.max_indirect = max_indirect
        self.persistent = persistent
        self.max_persistent = max_persistent
        self.stats_path = stats_path
        self.on_destroy = on_destroy
        self.sector_size = sector_size
        self.mapper = server.mapper
        self.io_pool = None
        self.machine = xenbus.Machine()
        self.stats = Stats()
        self.queues = []
        self.use_persistent = False
        self.token = f"pyblkback:{id(self):x}"
        self.written_state = None
        self.error_path = None
        self.bad_logged = 0
        self.next_resize = 0.0
        self.last_size = storage.size()
        self.limits = Limits(self.last_size // 512, readonly=self.readonly,
                             max_indirect=max_indirect, sector_size=sector_size,
                             discard=storage.can_discard)
        xs = server.xs
        self.fe_path = xs.read(f"{self.be_path}/frontend")
        fe_id = xs.read(f"{self.be_path}/frontend-id")
        if not self.fe_path or fe_id is None or not fe_id.isdigit():
            raise ValueError(f"toolstack error: {self.be_path} has no valid frontend/"
                             "frontend-id")
        self.fe_domid = int(fe_id)
        mode = xs.read(f"{self.be_path}/mode", "w")
        if "w" not in mode:
            self.readonly = True
            self.limits.readonly = True
        # the toolstack may turn discard off (libxl: discard-enable, default on if writable)
        self.discard = storage.can_discard and not self.readonly and \
            xs.read(f"{self.be_path}/discard-enable", "1").strip() != "0"
        self.limits.discard = self.discard
        self.name = f"{self.fe_domid}/{self.be_path.rsplit('/', 1)[-1]}"
        self.stats.sectors_size = self.limits.sectors
        # large reads/writes of a batch run in parallel in these threads (GIL released)
        if io_threads and getattr(storage, "parallel_io", False):
            from concurrent.futures import ThreadPoolExecutor
            self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="blkback-io")

    # -- XenStore ---------------------------------------------------------------------------
    def switch_state(self, state, extra=None):
        """In one transaction: the `extra` keys, then BE/state (if the node still exists)."""
        xs = self.server.xs

        def tx():
            if xs.read(f"{self.be_path}/state") is None:
                return False
            for k, v in (extra or {}).items():
                xs.write(f"{self.be_path}/{k}", str(v))
            xs.write(f"{self.be_path}/state", str(state))
            return True
        self.written_state = str(state)
        ok = xs.transaction(tx)
        self.stats.state = xenbus.STATE_NAMES.get(state, str(state))
        return ok

    def refresh(self):
        """Re-read FE state, BE state, BE online; feed what changed into the machine."""
        xs = self.server.xs
        m = self.machine
        be_state = xs.read(f"{self.be_path}/state")
        if be_state is None:
            self._apply(*m.feed(xenbus.BE_GONE))
            return
        if self.written_state is not None and be_state != self.written_state:
            self._apply(*m.on_backend_state(be_state))
        online = xs.read(f"{self.be_path}/online", "0")
        if online.strip() != "1" and m.online:
            self._apply(*m.feed(xenbus.OFFLINE))
        fe_state = xs.read(f"{self.fe_path}/state")
        try:
            changed = fe_state is None or int(fe_state) != m.fe_state
        except ValueError:
            changed = True
        if changed and m.state != xenbus.DESTROYED:
            self._apply(*m.on_frontend_state(fe_state))

    def feed(self, event):
        self._apply(*self.machine.feed(event))

    def _apply(self, old, new, actions):
        if old != new or actions:
            log.info("%s: %s -> %s %s", self.name, xenbus.STATE_NAMES[old],
                     xenbus.STATE_NAMES[new], ",".join(actions))
        for a in actions:
            if a == xenbus.PUBLISH:
                self._publish()
                continue
            if a == xenbus.CONNECT:
                try:
                    self._connect()
                except Exception as e:                       # noqa: BLE001 - reported
                    log.warning("%s: connect failed: %s", self.name, e)
                    self._report_error(str(e))
                    self._apply(*self.machine.feed(xenbus.CONNECT_FAILED))
                else:
                    self._apply(*self.machine.feed(xenbus.CONNECTED_OK))
                return               # the nested feed wrote the state
            if a == xenbus.ANNOUNCE:
                self._announce()
                continue
            if a == xenbus.DISCONNECT:
                self._disconnect()
            elif a == xenbus.DESTROY:
                self._destroy()
                return
        if new != old and xenbus.PUBLISH not in actions and xenbus.ANNOUNCE not in actions:
            self.switch_state(new)

    def _publish(self):
        keys = {"feature-max-indirect-segments": self.max_indirect,
                "max-ring-page-order": self.max_ring_page_order,
                "max-ring-pages": 1 << self.max_ring_page_order,
                "multi-queue-max-queues": self.max_queues,
                "feature-persistent": int(self.persistent)}
        if self.max_indirect == 0:
            del keys["feature-max-indirect-segments"]
        self.switch_state(xenbus.INITWAIT, keys)

    def _announce(self):
        st = self.storage
        info = blkif.VDISK_READONLY if self.readonly else 0
        keys = {"feature-flush-cache": int(st.write_cache),
                "feature-barrier": int(st.write_cache),
                "feature-discard": int(self.discard),
                "discard-granularity": 4096, "discard-alignment": 0, "discard-secure": 0,
                "feature-persistent": int(self.persistent),
                "sectors": self.limits.sectors, "info": info,
                "sector-size": self.sector_size, "physical-sector-size": self.sector_size}
        if not keys["feature-discard"]:
            for k in ("discard-granularity", "discard-alignment", "discard-secure"):
                del keys[k]
        self.switch_state(xenbus.CONNECTED, keys)

    def _report_error(self, message):
        """Like xenbus_dev_error: <our home>/error/<backend path>/error."""
        xs = self.server.xs
        self.error_path = f"/local/domain/{self.server.xen.domid}/error{self.be_path}"
        try:
            xs.write(f"{self.error_path}/error", message[:1000])
        except OSError:
            pass

    # -- connect / disconnect ---------------------------------------------------------------
    def _connect(self):
        if self.queues:
            return
        xs = self.server.xs
        fe = self.fe_path
        proto = xs.read(f"{fe}/protocol")
        abi = blkif.abi_for_protocol(proto)
        order = xs.read(f"{fe}/ring-page-order")
        if order is None:
            pages = xs.read(f"{fe}/num-ring-pages")
            order = 0 if pages is None else max(int(pages), 1).bit_length() - 1
        order = int(order)
        if not 0 <= order <= self.max_ring_page_order:
            raise ValueError(f"frontend error: ring-page-order {order} > "
                             f"{self.max_ring_page_order}")
        nq = xs.read(f"{fe}/multi-queue-num-queues")
        nq = 1 if nq is None else int(nq)
        if not 1 <= nq <= self.max_queues:
            raise ValueError(f"frontend error: multi-queue-num-queues {nq} not in "
                             f"1..{self.max_queues}")
        fp = xs.read(f"{fe}/feature-persistent", "0")
        self.use_persistent = self.persistent and fp.strip() == "1"
        dirs = [fe] if nq == 1 else [f"{fe}/queue-{i}" for i in range(nq)]
        try:
            for i, d in enumerate(dirs):
                refs = []
                for k in range(1 << order):
                    r = xs.read(f"{d}/ring-ref{k}")
                    if r is None and order == 0:
                        r = xs.read(f"{d}/ring-ref")
                    if r is None:
                        raise ValueError(f"frontend error: {d}/ring-ref{k} missing")
                    refs.append(int(r))
                port = xs.read(f"{d}/event-channel")
                if port is None:
                    raise ValueError(f"frontend error: {d}/event-channel missing")
                mapping = self.mapper.map(self.fe_domid, refs, writable=True)
                try:
                    local = self.server.evtchn.bind_interdomain(self.fe_domid, int(port))
                except BaseException:
                    mapping.unmap()
                    raise
                try:
                    q = Queue(i, self, mapping, abi, local)
                except BaseException:
                    self.server.evtchn.unbind(local)
                    mapping.unmap()
                    raise
                self.queues.append(q)
                self.server.ports[local] = q
        except BaseException:
            self._disconnect()
            raise
        log.info("%s: connected: %s, %d queue(s) of %d slots, persistent grants %s",
                 self.name, abi.name, nq, self.queues[0].ring.size,
                 "on" if self.use_persistent else "off")

    def _disconnect(self):
        qs, self.queues = self.queues, []
        for q in qs:
            try:
                q.close()
            except Exception as e:                              # noqa: BLE001 - keep going
                log.warning("%s: queue %d teardown: %s", self.name, q.index, e)
        self.stats.persistent_grants = 0

    def _destroy(self):
        self._disconnect()
        try:
            self.switch_state(xenbus.CLOSED)         # only if our node is still there
        except OSError:
            pass
        self.stats.state = "Destroyed"
        self.server._forget(self)
        if self.error_path:
            # remove our error node and the parents it needed, up to <home>/error if empty
            home = f"/local/domain/{self.server.xen.domid}"
            p = self.error_path
            try:
                self.server.xs.rm(p)
                while len(p) > len(home) + len("/error"):
                    p = p.rsplit("/", 1)[0]
                    if self.server.xs.list(p):
                        break
                    self.server.xs.rm(p)
            except OSError:
                pass
        if self.io_pool is not None:
            self.io_pool.shutdown(wait=True)
        try:
            self.storage.close()
        finally:
            if self.on_destroy:
                self.on_destroy(self)

    # -- runtime ----------------------------------------------------------------------------
    def fatal(self, why):
        log.error("%s: %s; closing the device", self.name, why)
        self._report_error(why)
        self.feed(xenbus.FATAL)

    def flush_failed(self, e):
        # blkfront treats a failed empty flush as success and stops flushing: never let
        # that pass silently. Answer ERROR and close the device.
        self.server.later.append((self, lambda: self.fatal(f"flush failed: {e}")))

    def log_bad(self, e):
        if self.bad_logged < 20:
            log.warning("%s: %s", self.name, e)
        self.bad_logged += 1

    def log_io_error(self, op, offset, e):
        log.error("%s: storage error on %s at byte %d: %s", self.name,
                  blkif.OP_NAMES.get(op, op), offset, e)

    def check_resize(self):
        try:
            size = self.storage.size()
        except OSError:
            return
        if size == self.last_size:
            return
        self.last_size = size
        self.limits.sectors = size // 512
        self.stats.sectors_size = self.limits.sectors
        if self.machine.state == xenbus.CONNECTED:
            log.info("%s: resized to %d sectors", self.name, self.limits.sectors)
            # new `sectors`, then state=4 again: the write fires blkfront's watch
            self.switch_state(xenbus.CONNECTED, {"sectors": self.limits.sectors})

    def resize(self):
        """Announce the storage's current size to a connected frontend (online resize)."""
        self.check_resize()

    def stats_dict(self):
        d = self.stats.as_dict()
        d.update({"device": self.name, "backend_path": self.be_path,
                  "frontend_path": self.fe_path, "storage": self.storage.kind,
                  "readonly": self.readonly, "queues": len(self.queues),
                  "ring_slots": self.queues[0].ring.size if self.queues else 0,
                  "persistent_negotiated": self.use_persistent})
        return d

    def write_stats(self):
        if self.stats_path:
            try:
                write_json_atomically(self.stats_path, self.stats_dict())
            except OSError as e:
                log.warning("%s: cannot write stats to %s: %s", self.name, self.stats_path, e)


class Server:
    """The service loop (see the module docstring)."""

    def __init__(self, xen):
        self.xen = xen
        self.wake_fd = compat.eventfd(0, compat.EFD_NONBLOCK | compat.EFD_CLOEXEC)
        self.xs = XenStore(xen.xenstore_path, self.wake_fd)
        self.evtchn = xen.event_channels()
        self.mapper = xen.grant_mapper()
        self.devices = {}
        self.ports = {}
        # persistent grant mappings held by all rings (each is a VMA; see queue.MAX_PMAPS)
        self.persistent_maps = 0
        self.max_persistent_maps = 32768
        self.later = []
        self.ready = []
        self._stop = False
        self._force = False
        self._lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_fd, selectors.EVENT_READ, "wake")
        self.sel.register(self.evtchn.fileno(), selectors.EVENT_READ, "evtchn")
        self._last_slow = 0.0

    def add_device(self, be_path, storage, **options):
        """Serve the device whose backend directory is `be_path` (state must be 1)."""
        dev = Device(self, be_path, storage, **options)
        self.devices[dev.token] = dev
        for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
            self.xs.watch(p, dev.token)
        dev.feed(xenbus.START)
        return dev

    def _forget(self, dev):
        self.devices.pop(dev.token, None)
        for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
            self.xs.unwatch(p, dev.token)

    def stop(self, force=False):
        """Ask every device to close (safe from signal handlers and other threads)."""
        self._stop = True
        self._force = self._force or force
        try:
            compat.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def step(self, timeout=TICK):
        """Wait up to `timeout` for something to do, then do it."""
        if self.ready:
            timeout = 0
        for key, _ in self.sel.select(timeout):
            if key.data == "evtchn":
                for port in self.evtchn.pending():
                    q = self.ports.get(port)
                    if q is not None:
                        self._service(q)
            else:
                try:
                    compat.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
        if self._stop:
            self._stop = False
            ev = xenbus.FORCE if self._force else xenbus.SHUTDOWN
            for dev in list(self.devices.values()):
                self._guarded(dev, lambda d=dev: d.feed(ev))
        events = self.xs.events()
        if events:
            tokens = {t.decode() if isinstance(t, bytes) else t for _p, t in events}
            for tok in tokens:
                dev = self.devices.get(tok)
                if dev is not None:
                    self._guarded(dev, dev.refresh)
        while self.later:
            dev, fn = self.later.pop(0)
            self._guarded(dev, fn)
        if self.ready:                             # rings left with work by a busy turn
            ready, self.ready = self.ready, []
            for q in ready:
                self._service(q)
        now = time.monotonic()
        if now - self._last_slow >= TICK:
            self._last_slow = now
            for dev in list(self.devices.values()):
                for q in list(dev.queues):
                    self._service(q)
                if now >= dev.next_resize:
                    dev.next_resize = now + RESIZE_CHECK
                    self._guarded(dev, dev.check_resize)
                    dev.write_stats()

    def _guarded(self, dev, fn):
        """Run fn() for one device; an unexpected error closes that device, not the server."""
        try:
            fn()
        except Exception as e:                     # noqa: BLE001 - one device, not the server
            log.exception("%s: internal error", dev.name)
            try:
                dev.fatal(f"internal error: {e!r}")
            except Exception:                      # noqa: BLE001
                log.exception("%s: cannot close it; forgetting it", dev.name)
                dev._disconnect()
                self._forget(dev)

    def _service(self, q):
        if q.dead:
            return
        try:
            if q.service() and q not in self.ready:
                self.ready.append(q)
        except FatalRingError as e:
            why = str(e)
            self._guarded(q.dev, lambda: q.dev.fatal(why))
        except Exception as e:                     # noqa: BLE001 - one device, not the server
            log.exception("%s: internal error serving queue %d", q.dev.name, q.index)
            q.dead = True
            why = f"internal error: {e!r}"
            self._guarded(q.dev, lambda: q.dev.fatal(why))

    def run(self, until=None):
        """Serve until every device is destroyed (or `until()` is true)."""
        while self.devices and not (until and until()):
            self.step()

    def close(self):
        for dev in list(self.devices.values()):
            dev.feed(xenbus.FORCE)
        self.sel.close()
        try:
            self.mapper.close()
        finally:
            self.evtchn.close()
            self.xs.close()
            os.close(self.wake_fd)
