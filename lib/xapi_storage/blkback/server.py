"""The ring server: XenStore handshake + service loop for one or more devices.

The server is given its edges and nothing else:

    server = Server(xen)                        # a xapi_storage.xen.Xen (real or simulated)
    dev = server.add_device(be_path, storage)   # BE directory already written by a toolstack
    server.run()                                # until stop() or every device is destroyed

`xen` supplies grants, event channels and the XenStore socket path (`xen/xsclient.py` speaks
the wire protocol to it); `storage` is a `backends.Storage`. There is no branch on which Xen it is.

One thread runs everything: a selector over the event-channel fd, a wake-up fd that XenStore
watch events and stop() write to, and a 100 ms timer (re-check every ring: belt and braces
against a lost wake-up; re-read the storage size for online resize; write the stats file).
Per device the XenBus state machine (`xenbus.py`) decides, this module acts.
"""

import logging
import os
import selectors
import threading
import time

from ..xen.xsclient import XenStore, XenStoreError, XenStoreLost  # noqa: F401 (re-exported)
from . import blkif, xenbus
from .blkif import Limits
from .queue import MAX_PERSISTENT, FatalRingError, Queue
from .stats import Stats, write_json_atomically

log = logging.getLogger("xapi_storage.blkback")

TICK = 0.1
RESIZE_CHECK = 1.0
XS_TIMEOUT = 10.0          # the longest any XenStore call may take
RECONNECT_MIN = 0.1        # first XenStore reconnect attempt after a loss, then doubling
RECONNECT_MAX = 2.0        # up to this


class Device:
    """One virtual block device: BE directory, state machine, rings, storage, stats."""

    def __init__(self, server, be_path, storage, *, max_ring_page_order=4, max_queues=4,
                 max_indirect=256, persistent=True, max_persistent=MAX_PERSISTENT,
                 stats_path=None,
                 on_destroy=None, sector_size=512, io_threads=2, owns_nodes=True):
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
        self.owns_nodes = owns_nodes        # we wrote the directories (connect, serve())
        self.sector_size = sector_size
        self.mapper = server.mapper
        self.io_pool = None
        self.machine = xenbus.Machine()
        self.stats = Stats()
        self.queues = []
        self.use_persistent = False
        self.token = f"pyblkback:{id(self):x}"
        self.written_state = None
        self.adopted = False                # taken over connected (see adopt, _connect)
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
        # a cdrom is announced as one (VDISK_CDROM), and is never written; like Linux's
        # blkback we read `device-type` where the toolstack writes it: in the frontend
        self.cdrom = xs.read(f"{self.fe_path}/device-type", "disk").strip() == "cdrom"
        if self.cdrom:
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
        self.stats.state = xenbus.STATE_NAMES.get(state, str(state))
        ok = xs.transaction(tx)
        self.written_state = str(state)      # only once committed: see resync()
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

    def adopt(self, be_state):
        """Take the device over in the state another backend (or our dead self) left it."""
        m = self.machine
        self.adopted = be_state == 4
        m.state = {2: xenbus.INITWAIT, 3: xenbus.INITWAIT, 4: xenbus.INITWAIT,
                   5: xenbus.CLOSING, 6: xenbus.CLOSED}[be_state]
        self.written_state = str(be_state)
        self.stats.state = xenbus.STATE_NAMES[m.state]
        log.info("%s: adopted in state %s", self.name, be_state)
        m.fe_state = -1                      # feed the frontend's state, whatever it is
        self.refresh()

    def resync(self):
        """After a XenStore reconnect: write again the state we could not write while it was
        gone (unless the toolstack has written that node since), then re-read everything as
        if every watch had fired, the frontend's state included."""
        m = self.machine
        if m.state == xenbus.DESTROYED:
            return
        be_state = self.server.xs.read(f"{self.be_path}/state")
        if be_state is None:
            self._apply(*m.feed(xenbus.BE_GONE))
            return
        if be_state == self.written_state and be_state != str(m.state):
            log.info("%s: writing state %s again after the XenStore reconnect", self.name,
                     xenbus.STATE_NAMES[m.state])
            if m.state == xenbus.INITWAIT:
                self._publish()
            elif m.state == xenbus.CONNECTED:
                self._announce()
            else:
                self.switch_state(m.state)
        m.fe_state = -1                      # re-feed the frontend's state, whatever it is
        self.refresh()

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
                except XenStoreLost:
                    raise                    # not the frontend's fault: resync() retries
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
            extra = None
            if new == xenbus.CLOSING and self.machine.stopping and self.owns_nodes:
                # we plugged it, we unplug it as a toolstack does: online=0 with state=5 in
                # one transaction (the Windows PV drivers eject the disk only then)
                extra = {"online": 0}
            self.switch_state(new, extra)

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
        info = (blkif.VDISK_READONLY if self.readonly else 0) | (
            blkif.VDISK_CDROM if self.cdrom else 0)
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
                    q = Queue(i, self, mapping, abi, local, ident=(refs[0], int(port)),
                              journal=self.server.journal_path(self, i))
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
        if self.adopted:
            # Taken over from a server that died: requests it took but did not answer are
            # back in their slots (queue.Journal). Serve them now, and send the frontend an
            # event, which the dead server may have owed it for responses it published.
            for q in self.queues:
                if q.restored:           # worth an operator's eye: a server died under load
                    log.warning("%s: queue %d: %d request(s) of the previous server served "
                                "again", self.name, q.index, q.restored)
                self.server.evtchn.notify(q.port)
                if q not in self.server.ready:
                    self.server.ready.append(q)

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
            self.storage.close_for_good()        # gone: not for a successor to take over
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
        self.limits.sectors = size // 512
        self.stats.sectors_size = self.limits.sectors
        if self.machine.state == xenbus.CONNECTED:
            log.info("%s: resized to %d sectors", self.name, self.limits.sectors)
            # new `sectors`, then state=4 again: the write fires blkfront's watch
            self.switch_state(xenbus.CONNECTED, {"sectors": self.limits.sectors})
        self.last_size = size                # announced (a failed write is tried again)

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
    """The service loop (see the module docstring).

    XenStore is not needed to serve rings: if its connection is lost (xenstored restarted,
    stalled past `xs_timeout`, or our socket broke) the rings keep being served, every
    device keeps its state, and the server reconnects (after 0.1 s, then backing off to
    RECONNECT_MAX), registers its watches again and re-reads every device (Device.resync).
    While a XenStore call waits for its reply, the rings are served too. A Xen that is gone
    for good (`xen.gone()`: a simulated Xen's daemon exited) ends every device at once
    (grants unmapped, storage closed) and `run()` returns. A stop with XenStore unreachable
    ends the devices at once too: nothing could be written anyway."""

    def __init__(self, xen, xs_timeout=None, journal_prefix=None):
        self.xen = xen
        # where each ring keeps the batch it is answering (queue.Journal), so that a server
        # started again after a crash serves it again: `<prefix><domid>-<devid>-<queue>`.
        # None: not kept (a server nobody restarts)
        self.journal_prefix = journal_prefix
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.xs = XenStore(xen.xenstore_path,
                           timeout=xs_timeout if xs_timeout is not None else XS_TIMEOUT)
        self.evtchn = xen.event_channels()
        self.mapper = xen.grant_mapper()
        self.devices = {}
        self.ports = {}
        self.nbd = []                       # nbdsock.NbdListener: NBD exports in this loop
        self.extra_watch = {}               # watch token -> fn([paths]) (volume_server)
        self.xen_gone = False
        # persistent grant mappings held by all rings (each is a VMA; see queue.MAX_PMAPS)
        self.persistent_maps = 0
        self.max_persistent_maps = 32768
        self.later = []
        self.ready = []
        self._stop = False
        self._stopping = False
        self._force = False
        self._lock = threading.Lock()
        self._idle_busy = False
        self._idle_tick = 0.0
        self.xs_lost_since = None           # monotonic time the connection was lost
        self.xs_reconnects = 0
        self._retry_at = 0.0
        self._retry_delay = RECONNECT_MIN
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(self.evtchn.fileno(), selectors.EVENT_READ, "evtchn")
        self.sel.register(self.xs.fileno(), selectors.EVENT_READ, "xs")
        self.xs.on_drop = self._xs_dropped
        self.xs.idle = self._idle
        self.xs.idle_fds = (self.evtchn.fileno(),)
        self._last_slow = 0.0

    def add_device(self, be_path, storage, adopt=False, **options):
        """Serve the device whose backend directory is `be_path` (state must be 1).

        `adopt`: the device may be further on (a server restarted, or another backend
        stopped): its state is taken as written. A device Connected (4) whose frontend is
        Initialised or Connected has its rings mapped again and its event channels bound
        again (the dead backend's end closed, so they are unbound again, as in Xen); requests
        published and not answered are served again from the ring's `rsp_prod` (reads and
        writes may run twice, as after a backend crash). InitWait (2) waits for the
        frontend; Closing and Closed go on closing."""
        dev = Device(self, be_path, storage, **options)
        self.devices[dev.token] = dev
        try:
            for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
                self.xs.watch(p, dev.token)
            be_state = self.xs.read(f"{dev.be_path}/state", "1") if adopt else "1"
            if be_state.strip() in ("2", "3", "4", "5", "6"):
                dev.adopt(int(be_state))
            else:
                dev.feed(xenbus.START)
        except BaseException:
            self.devices.pop(dev.token, None)
            for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
                self.xs.unwatch(p, dev.token)
            raise
        return dev

    def _forget(self, dev):
        self.devices.pop(dev.token, None)
        for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
            self.xs.unwatch(p, dev.token)

    def stop_soon(self):
        """Wake the loop (safe from signal handlers) without asking the devices anything:
        the caller's loop condition decides (volume_server)."""
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def journal_path(self, dev, index):
        if self.journal_prefix is None:
            return None
        return f"{self.journal_prefix}{dev.fe_domid}-{dev.be_path.rsplit('/', 1)[-1]}-{index}"

    def let_go_all(self):
        """Stop serving every device without a word to XenStore: rings unmapped, ports
        unbound, storage closed; the nodes stay as they are, for a backend that takes the
        devices over (a restarted volume server adopts them)."""
        for dev in list(self.devices.values()):
            dev._disconnect()
            self.devices.pop(dev.token, None)
            for p in (f"{dev.be_path}/state", f"{dev.be_path}/online", f"{dev.fe_path}/state"):
                self.xs.unwatch(p, dev.token)
            if dev.io_pool is not None:
                dev.io_pool.shutdown(wait=True)
            dev.storage.close()

    def stop(self, force=False):
        """Ask every device to close (safe from signal handlers and other threads)."""
        self._stop = True
        self._force = self._force or force
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    # -- XenStore connection ----------------------------------------------------------------
    def _xs_dropped(self, fd):
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _xs_lost(self, e):
        if self.xs.connected:                # an error that did not drop it: drop it now
            self.xs.close()
        if self.xs_lost_since is None:
            self.xs_lost_since = time.monotonic()
            self._retry_at = self.xs_lost_since + RECONNECT_MIN
            self._retry_delay = RECONNECT_MIN
            log.warning("XenStore connection lost (%s); serving the rings and reconnecting",
                        e)

    def _xs_reconnect(self):
        """One reconnect attempt (when due). A Xen gone for good ends every device."""
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            self.xs.reconnect()
        except XenStoreLost as e:
            if self.xen.gone():
                log.error("Xen is gone (%s): ending every device", e)
                self.xen_gone = True
                self._end_all()
                return
            self._retry_delay = min(self._retry_delay * 2, RECONNECT_MAX)
            self._retry_at = time.monotonic() + self._retry_delay
            return
        self.sel.register(self.xs.fileno(), selectors.EVENT_READ, "xs")
        self.xs_reconnects += 1
        log.warning("XenStore reconnected after %.1f s; re-reading %d device(s)",
                    now - self.xs_lost_since, len(self.devices))
        self.xs_lost_since = None
        for dev in list(self.devices.values()):
            self._guarded(dev, dev.resync)

    def _end_all(self):
        """End every device now, without waiting for anyone (grants unmapped, storage
        closed); XenStore writes are attempted and their failures ignored."""
        for dev in list(self.devices.values()):
            try:
                dev.feed(xenbus.FORCE)
            except Exception:                      # noqa: BLE001 - forget it anyway
                log.exception("%s: ending it", dev.name)
                dev._disconnect()
                self.devices.pop(dev.token, None)

    def _idle(self, waited):
        """Run while a XenStore call waits for its reply: serve the rings (errors are handled
        after the call, by step()). True abandons the call (we are asked to stop)."""
        if not self._idle_busy:
            self._idle_busy = True
            try:
                for port in self.evtchn.pending():
                    q = self.ports.get(port)
                    if q is not None:
                        self._service(q, defer=True, event=True)
                now = time.monotonic()
                if now - self._idle_tick >= TICK:
                    self._idle_tick = now
                    for dev in list(self.devices.values()):
                        for q in list(dev.queues):
                            self._service(q, defer=True)
            finally:
                self._idle_busy = False
        return self._stop and waited >= 1.0

    # -- the loop ---------------------------------------------------------------------------
    def step(self, timeout=TICK):
        """Wait up to `timeout` for something to do, then do it."""
        if self.ready or self.xs.pending_events:   # events a call took in with its reply
            timeout = 0
        xs_ready = False
        for key, mask in self.sel.select(timeout):
            if not isinstance(key.data, str):
                self._nbd_event(key.data, mask)
            elif key.data == "evtchn":
                for port in self.evtchn.pending():
                    q = self.ports.get(port)
                    if q is not None:
                        self._service(q, event=True)
            elif key.data == "xs":
                xs_ready = True
            else:
                try:
                    while os.read(self.wake_r, 64):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
        if self._stop:
            self._stop = False
            self._stopping = True
            ev = xenbus.FORCE if self._force else xenbus.SHUTDOWN
            for dev in list(self.devices.values()):
                self._guarded(dev, lambda d=dev: d.feed(ev))
        if self.xs_lost_since is not None:
            if self._stopping:
                log.warning("stopping with XenStore unreachable: ending every device now")
                self._end_all()
            else:
                self._xs_reconnect()
        if self.xs.connected and (xs_ready or self.xs.pending_events):
            try:
                events = self.xs.events()
            except XenStoreLost as e:
                self._xs_lost(e)
                events = []
            tokens = {t for _p, t in events}
            for tok in tokens:
                dev = self.devices.get(tok)
                if dev is not None:
                    self._guarded(dev, dev.refresh)
                elif tok in self.extra_watch:
                    try:
                        self.extra_watch[tok]([p for p, t in events if t == tok])
                    except XenStoreLost as e:
                        self._xs_lost(e)
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
                    q.age()
                if now >= dev.next_resize:
                    dev.next_resize = now + RESIZE_CHECK
                    self._guarded(dev, dev.check_resize)
                    dev.write_stats()

    def _guarded(self, dev, fn):
        """Run fn() for one device; an unexpected error closes that device, not the server.
        A lost XenStore connection is nobody's fault: the device is re-read on reconnect."""
        try:
            fn()
        except XenStoreLost as e:
            self._xs_lost(e)
        except Exception as e:                     # noqa: BLE001 - one device, not the server
            log.exception("%s: internal error", dev.name)
            try:
                dev.fatal(f"internal error: {e!r}")
            except XenStoreLost as e2:
                self._xs_lost(e2)
            except Exception:                      # noqa: BLE001
                log.exception("%s: cannot close it; forgetting it", dev.name)
                dev._disconnect()
                self._forget(dev)

    def _service(self, q, defer=False, event=False):
        """Serve one ring (`event`: because its event channel fired). With `defer` (inside a
        XenStore call) a ring error is handled later by step(): handling it writes to
        XenStore. A throttled ring (a flood: queue.FLOOD_RATE) waits for its pause to end;
        the 100 ms timer looks at it then."""
        if q.dead or (q.throttled_until and q.throttled_until > time.monotonic()):
            return
        try:
            if q.service(event) and q not in self.ready:
                self.ready.append(q)
        except FatalRingError as e:
            why = str(e)
            if defer:
                self.later.append((q.dev, lambda: q.dev.fatal(why)))
            else:
                self._guarded(q.dev, lambda: q.dev.fatal(why))
        except Exception as e:                     # noqa: BLE001 - one device, not the server
            log.exception("%s: internal error serving queue %d", q.dev.name, q.index)
            q.dead = True
            why = f"internal error: {e!r}"
            if defer:
                self.later.append((q.dev, lambda: q.dev.fatal(why)))
            else:
                self._guarded(q.dev, lambda: q.dev.fatal(why))

    def run(self, until=None):
        """Serve until every device is destroyed and no NBD export is left (or `until()`
        is true)."""
        while (self.devices or any(n.exports for n in self.nbd)) and not (until and until()):
            self.step()

    @staticmethod
    def _nbd_event(endpoint, mask):
        """An NBD listener or client is ready; an unexpected error drops that client (or
        stops that listener), never the server."""
        try:
            endpoint.on_event(mask)
        except Exception:                          # noqa: BLE001 - one client, not the server
            log.exception("NBD: internal error; dropping %r", endpoint)
            endpoint.close()

    def listen_nbd(self, path):
        """Serve NBD on the unix socket `path` in this loop; returns the NbdListener, whose
        add_export(name, storage, readonly=None) exports a storage (see nbdsock.py)."""
        from .nbdsock import NbdListener
        return NbdListener(self, path)

    def close(self):
        for listener in list(self.nbd):
            listener.close()
        self._end_all()
        self.sel.close()
        try:
            self.mapper.close()
        finally:
            self.evtchn.close()
            self.xs.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
