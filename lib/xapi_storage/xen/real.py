"""The Xen interface on real Xen: /dev/xen/gntdev, /dev/xen/gntalloc, /dev/xen/evtchn and
xenstored's unix socket (specs: blkif-backend.md §4, xen-test-bed.md §4 and §6).

Raw ioctls through fcntl.ioctl rather than cffi over libxengnttab/libxenevtchn: the ioctl
ABI is the kernel's stable UAPI (the libraries are thin wrappers over exactly these calls),
it needs no C library or compiler on the host, and the hot path (notify, read/write of the
evtchn fd, map = one ioctl + one mmap) is one syscall each either way. Two traps handled:
an ioctl argument is always a mutable bytearray with mutate_flag=True, so that the call
returns the ioctl's return value (the port of BIND_*) and out-fields are copied back; and
a freshly bound interdomain port fires once spuriously (callers must cope; the simulated
Xen does the same).
"""

import errno
import os
import struct
import time

from . import (EventChannels, GrantAllocation, GrantAllocator, GrantMapper, GrantMapping,
               PAGE_SIZE, Xen, XenError)
from . import _mem

_IOC_NONE = 0


def _IOC(dir_, type_, nr, size):
    return (dir_ << 30) | (size << 16) | (ord(type_) << 8) | nr


# include/uapi/xen/gntdev.h
GNTDEV_GRANT_REF = struct.Struct("<II")                 # {u32 domid; u32 ref}
GNTDEV_MAP_HDR = struct.Struct("<IIQ")                  # {u32 count; u32 pad; u64 index}
IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, "G", 0, GNTDEV_MAP_HDR.size + GNTDEV_GRANT_REF.size)
GNTDEV_UNMAP = struct.Struct("<QII")                    # {u64 index; u32 count; u32 pad}
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, "G", 1, GNTDEV_UNMAP.size)
GNTDEV_GET_OFFSET = struct.Struct("<QQII")              # {u64 vaddr; u64 offset; u32 count; u32 pad}
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _IOC(_IOC_NONE, "G", 2, GNTDEV_GET_OFFSET.size)
IOCTL_GNTDEV_SET_MAX_GRANTS = _IOC(_IOC_NONE, "G", 3, 4)
GNTDEV_UNMAP_NOTIFY = struct.Struct("<QII")             # {u64 index; u32 action; u32 port}
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, "G", 7, GNTDEV_UNMAP_NOTIFY.size)
GNTDEV_GRANT_COPY = struct.Struct("<I4xQ")              # {u32 count; ptr segments}
IOCTL_GNTDEV_GRANT_COPY = _IOC(_IOC_NONE, "G", 8, GNTDEV_GRANT_COPY.size)

# include/uapi/xen/gntalloc.h
GNTALLOC_ALLOC_HDR = struct.Struct("<HHIQ")             # {u16 domid; u16 flags; u32 count; u64 index}
IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, "G", 5, GNTALLOC_ALLOC_HDR.size + 8)  # + gref_ids[1], padded
GNTALLOC_FLAG_WRITABLE = 1
GNTALLOC_DEALLOC = struct.Struct("<QI4x")               # {u64 index; u32 count}
IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, "G", 6, GNTALLOC_DEALLOC.size)

# include/uapi/xen/evtchn.h
EVTCHN_BIND_INTERDOMAIN = struct.Struct("<II")          # {u32 remote_domain; u32 remote_port}
IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, "E", 0, 4)
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, "E", 1, EVTCHN_BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, "E", 2, 4)
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, "E", 3, 4)
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, 4)
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, "E", 6, 2)

GNTDEV = "/dev/xen/gntdev"
GNTALLOC = "/dev/xen/gntalloc"
EVTCHN = "/dev/xen/evtchn"
_U32 = struct.Struct("<I")

_MODULE = {GNTDEV: "xen-gntdev", GNTALLOC: "xen-gntalloc", EVTCHN: "xen-evtchn"}


def _open_device(path, flags=os.O_RDWR):
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise XenError(errno.ENOENT, f"{path} does not exist: this is not a Xen domain, or the "
                       f"{_MODULE[path]} module is not loaded (modprobe {_MODULE[path]})") from None
    except PermissionError:
        raise XenError(errno.EACCES, f"{path}: permission denied (run as root)") from None
    except OSError as e:
        raise XenError(e.errno, f"{path}: {e.strerror}") from None


def _ioctl(fd, req, buf, what):
    import fcntl
    try:
        return fcntl.ioctl(fd, req, buf, True)
    except OSError as e:
        raise XenError(e.errno, f"{what}: {e.strerror}") from None


def pack_map_grant_ref(domid, refs):
    """The IOCTL_GNTDEV_MAP_GRANT_REF argument for `refs` of `domid` (a bytearray)."""
    n = len(refs)
    buf = bytearray(GNTDEV_MAP_HDR.size + GNTDEV_GRANT_REF.size * max(n, 1))
    GNTDEV_MAP_HDR.pack_into(buf, 0, n, 0, 0)
    off = GNTDEV_MAP_HDR.size
    for i, ref in enumerate(refs):
        GNTDEV_GRANT_REF.pack_into(buf, off + 8 * i, domid, ref)
    return buf


def xenstore_socket():
    """xenstored's unix socket, as libxenstore finds it."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    rundir = os.environ.get("XENSTORED_RUNDIR")
    candidates = [os.path.join(rundir, "socket")] if rundir else []
    candidates += ["/run/xenstored/socket", "/var/run/xenstored/socket"]
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]


class RealGrantMapping(GrantMapping):
    def __init__(self, mapper, refs, index, region):
        self._mapper, self.refs, self._index, self._region = mapper, refs, index, region
        self.buffer = region.buffer

    def unmap(self):
        if self._region is None:
            return
        # munmap (our anonymous overlay replaces the gntdev VMA), then drop the
        # reservation: the grant is released when both are gone
        self._region.release()
        self._region = None
        self.buffer = None
        self._mapper._live.discard(self)
        _ioctl(self._mapper.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF,
               bytearray(GNTDEV_UNMAP.pack(self._index, len(self.refs), 0)), "gntdev unmap")


class RealGrantMapper(GrantMapper):
    def __init__(self):
        self.fd = _open_device(GNTDEV)
        self._live = set()

    def map(self, domid, refs, writable):
        refs = tuple(refs)
        n = len(refs)
        if not n:
            raise XenError(errno.EINVAL, "map: no grant references")
        buf = pack_map_grant_ref(domid, refs)
        _ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, buf, f"gntdev map of {n} refs of domain {domid}")
        index = GNTDEV_MAP_HDR.unpack_from(buf)[2]
        tries = 0
        while True:
            try:
                region = _mem.Region(n * PAGE_SIZE, writable, [(self.fd, index, n * PAGE_SIZE)])
                break
            except OSError as e:
                if e.errno == errno.EAGAIN and tries < 100:      # paged out: retry
                    tries += 1
                    time.sleep(0.001)
                    continue
                _ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                       bytearray(GNTDEV_UNMAP.pack(index, n, 0)), "gntdev unmap")
                raise XenError(e.errno, f"grant map of refs {list(refs)} of domain {domid} "
                               f"({'rw' if writable else 'ro'}) failed: {e.strerror}") from None
        m = RealGrantMapping(self, refs, index, region)
        self._live.add(m)
        return m

    def close(self):
        for m in list(self._live):
            m.unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RealGrantAllocation(GrantAllocation):
    def __init__(self, allocator, index, refs, region):
        self._a, self._index, self.refs, self._region = allocator, index, refs, region
        self.buffer = region.buffer

    def revoke(self):
        if self._region is None:
            return
        self._region.release()          # views kept past revoke() read zeros from now on
        self._region = None
        self.buffer = None
        _ioctl(self._a.fd, IOCTL_GNTALLOC_DEALLOC_GREF,
               bytearray(GNTALLOC_DEALLOC.pack(self._index, len(self.refs))), "gntalloc dealloc")


class RealGrantAllocator(GrantAllocator):
    def __init__(self):
        self.fd = _open_device(GNTALLOC)

    def grant(self, domid, npages, writable=True):
        if npages < 1:
            raise XenError(errno.EINVAL, f"grant: bad page count {npages!r}")
        buf = bytearray(GNTALLOC_ALLOC_HDR.size + 4 * max(npages, 2))
        GNTALLOC_ALLOC_HDR.pack_into(buf, 0, domid, GNTALLOC_FLAG_WRITABLE if writable else 0,
                                     npages, 0)
        _ioctl(self.fd, IOCTL_GNTALLOC_ALLOC_GREF, buf, f"gntalloc of {npages} pages for domain {domid}")
        index = GNTALLOC_ALLOC_HDR.unpack_from(buf)[3]
        refs = struct.unpack_from(f"<{npages}I", buf, GNTALLOC_ALLOC_HDR.size)
        size = npages * PAGE_SIZE
        try:
            region = _mem.Region(size, True, [(self.fd, index, size)])
        except OSError as e:
            _ioctl(self.fd, IOCTL_GNTALLOC_DEALLOC_GREF,
                   bytearray(GNTALLOC_DEALLOC.pack(index, npages)), "gntalloc dealloc")
            raise XenError(e.errno, f"gntalloc mmap: {e.strerror}") from None
        return RealGrantAllocation(self, index, refs, region)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RealEventChannels(EventChannels):
    def __init__(self):
        self.fd = _open_device(EVTCHN, os.O_RDWR | os.O_NONBLOCK)
        self._ports = set()

    def _port_ioctl(self, req, port, what):
        return _ioctl(self.fd, req, bytearray(_U32.pack(port)), what)

    def bind_interdomain(self, domid, remote_port):
        port = _ioctl(self.fd, IOCTL_EVTCHN_BIND_INTERDOMAIN,
                      bytearray(EVTCHN_BIND_INTERDOMAIN.pack(domid, remote_port)),
                      f"bind to port {remote_port} of domain {domid}")
        self._ports.add(port)
        return port

    def alloc_unbound(self, remote_domid):
        port = self._port_ioctl(IOCTL_EVTCHN_BIND_UNBOUND_PORT, remote_domid,
                                f"alloc unbound port for domain {remote_domid}")
        self._ports.add(port)
        return port

    def notify(self, port):
        self._port_ioctl(IOCTL_EVTCHN_NOTIFY, port, f"notify port {port}")

    def unbind(self, port):
        if port in self._ports:
            self._ports.discard(port)
            self._port_ioctl(IOCTL_EVTCHN_UNBIND, port, f"unbind port {port}")

    def fileno(self):
        return self.fd

    def pending(self):
        ports = []
        while True:
            try:
                data = os.read(self.fd, 4 * 64)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EFBIG:          # the kernel's ring overflowed
                    _ioctl(self.fd, IOCTL_EVTCHN_RESET, bytearray(4), "evtchn reset")
                    ports.extend(self._ports)       # we may have lost some: report all
                    break
                raise XenError(e.errno, f"{EVTCHN} read: {e.strerror}") from None
            if not data:
                break
            ports.extend(p for (p,) in _U32.iter_unpack(data[:len(data) & ~3]))
        if not ports:
            return []
        seen = list(dict.fromkeys(ports))
        os.write(self.fd, b"".join(_U32.pack(p) for p in seen if p in self._ports))  # unmask
        return seen

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RealXen(Xen):
    def __init__(self, domid=None):
        self.xenstore_path = xenstore_socket()
        if domid is None:
            domid = _own_domid(self.xenstore_path)
        self.domid = domid

    def grant_mapper(self):
        return RealGrantMapper()

    def grant_allocator(self):
        return RealGrantAllocator()

    def event_channels(self):
        return RealEventChannels()


def _own_domid(xs_path):
    try:
        with open("/proc/xen/capabilities") as f:
            if "control_d" in f.read():
                return 0
    except OSError:
        pass
    try:
        from pyxs import Client
        with Client(unix_socket_path=xs_path) as c:
            return int(c.read(b"domid"))
    except Exception:
        return 0
