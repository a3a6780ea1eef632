"""The edge between our code and Xen: grant tables, event channels and XenStore.

Everything that touches Xen goes through the small interface below, so that the same ring
server and the same test frontend run on real Xen (`xapi_storage.xen.real`: /dev/xen/gntdev,
/dev/xen/gntalloc, /dev/xen/evtchn, xenstored's unix socket) and on the simulated Xen
(`xapi_storage.xen.sim`: shared-memory files, an event-channel broker and a XenStore server
speaking the real wire protocol on a unix socket), with no branch on which one it is.

XenStore is not wrapped: both sides speak the real XenStore wire protocol, so callers use
`pyxs.Client(unix_socket_path=xen.xenstore_path)`; a simulated domain other than dom0 gets a
socket of its own, so its requests carry its domid, as a guest's xenbus ring does.

The interface (see the classes below for the exact contract):

    xen = open_xen()                   # by XAPI_STORAGE_XEN: "real" or "sim:<dir>"
    xen.domid                          # the domain this process acts as (0 for a backend)
    xen.xenstore_path                  # unix socket path for pyxs
    g = xen.grant_mapper()             # backend side: map the peer's grants
    m = g.map(domid, [ref, ...], writable=True)   # -> GrantMapping; m.buffer is a memoryview
    m.unmap()
    e = xen.event_channels()           # both sides
    port = e.bind_interdomain(domid, remote_port) ; e.notify(port) ; e.unbind(port)
    port = e.alloc_unbound(remote_domid)           # frontend side
    e.fileno()                         # readable when some bound port has fired
    e.pending() -> list of ports       # consume the pending events (and unmask them)
    xen.gone()                         # True once a simulated Xen's daemon has exited
    a = xen.grant_allocator()          # frontend side: share our own pages with a peer
    ga = a.grant(domid, npages, writable=True)     # -> GrantAllocation: .refs, .buffer
    ga.revoke()
"""

import abc
import os

PAGE_SIZE = 4096


class XenError(OSError):
    """A Xen operation failed (bad grant reference, unknown port, device missing, ...)."""


class GrantMapping(abc.ABC):
    """Pages of another domain mapped into this process."""

    #: the refs mapped, in order; page i of `buffer` is refs[i]
    refs: tuple
    #: memoryview over len(refs) * PAGE_SIZE bytes of shared memory (writable if mapped so)
    buffer: memoryview

    @abc.abstractmethod
    def unmap(self) -> None:
        """Release the mapping. Idempotent. `buffer` must not be used afterwards."""


class GrantMapper(abc.ABC):
    """Backend side of the grant table (/dev/xen/gntdev on real Xen)."""

    @abc.abstractmethod
    def map(self, domid: int, refs, writable: bool) -> GrantMapping:
        """Map the pages granted by `domid` under `refs` (one contiguous mapping).

        Raises XenError if any ref is not granted to us, or granted read-only while
        `writable` is asked; nothing stays mapped after a failure."""

    def close(self) -> None:
        """Release the device; mappings still open are unmapped."""


class GrantAllocation(abc.ABC):
    """Pages of ours that a peer may map."""

    refs: tuple
    buffer: memoryview

    @abc.abstractmethod
    def revoke(self) -> None:
        """End access to the pages. Idempotent.

        The simulated Xen raises XenError(EBUSY) while the peer still maps some of the
        pages (as a guest's gnttab_end_foreign_access fails); those stay granted, call
        again once the peer has unmapped them."""


class GrantAllocator(abc.ABC):
    """Frontend side of the grant table (/dev/xen/gntalloc on real Xen)."""

    @abc.abstractmethod
    def grant(self, domid: int, npages: int, writable: bool = True) -> GrantAllocation:
        """Allocate `npages` zeroed pages and grant `domid` access to each."""

    def close(self) -> None:
        pass


class EventChannels(abc.ABC):
    """One handle on the event channel device (/dev/xen/evtchn on real Xen).

    Ports are local port numbers. An event that fires on a port is remembered (pending) until
    `pending()` consumes it; several notifications before that count once, as in Xen. On real
    Xen (Linux evtchn) a notification that arrives after the kernel queued the port for us but
    before `pending()` unmasks it is delivered once more after the unmask: a consumer must
    take an event as "look at the ring", never count them."""

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to the peer's unbound port; return the local port."""

    @abc.abstractmethod
    def alloc_unbound(self, remote_domid: int) -> int:
        """Allocate a port that `remote_domid` may bind to; return it."""

    @abc.abstractmethod
    def notify(self, port: int) -> None:
        """Send an event to the peer of local `port`."""

    @abc.abstractmethod
    def unbind(self, port: int) -> None:
        """Close local `port`. Idempotent."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """A file descriptor that polls readable while some port is pending."""

    @abc.abstractmethod
    def pending(self) -> list:
        """Consume and return the ports that fired since the last call (never blocks).

        May return [] even when fileno() polled readable (a spurious wake-up)."""

    def close(self) -> None:
        pass


class Xen(abc.ABC):
    """A view of Xen from one domain."""

    domid: int
    xenstore_path: str

    @abc.abstractmethod
    def grant_mapper(self) -> GrantMapper: ...

    @abc.abstractmethod
    def grant_allocator(self) -> GrantAllocator: ...

    @abc.abstractmethod
    def event_channels(self) -> EventChannels: ...

    def gone(self) -> bool:
        """True if this Xen has stopped for good (a simulated Xen whose daemon exited). A real
        xenstored that restarts is not gone: a server waits for it and reconnects."""
        return False


def open_xen(spec=None, domid=None) -> Xen:
    """Open real or simulated Xen.

    `spec` (default: $XAPI_STORAGE_XEN, else "real") is "real", or "sim:<dir>" for the
    simulated Xen whose state lives in <dir> (see docs/simxen.md). `domid` picks the domain to
    act as on the simulated Xen (default 0); on real Xen it must be None or this domain's id."""
    spec = spec or os.environ.get("XAPI_STORAGE_XEN", "real")
    if spec == "real":
        from .real import RealXen
        return RealXen()
    if spec.startswith("sim:"):
        from .sim import SimXen
        return SimXen(spec[4:], domid=domid or 0)
    raise ValueError(f"unknown Xen {spec!r}: expected 'real' or 'sim:<dir>'")
