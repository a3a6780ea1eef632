"""Where everything of a simulated Xen lives inside its directory, and the shared formats.

    DIR/simxen.pid            the daemon's pid; appears when the daemon is ready
    DIR/control.sock          control: domains, frame/ref reservations (JSON lines)
    DIR/evtchn.sock           event-channel broker (JSON lines)
    DIR/xenstore/d<N>         XenStore wire protocol, the connection acts as domain N
    DIR/mem/d<N>              domain N's memory: frame f = bytes [f*4096, (f+1)*4096)
    DIR/gnttab/d<N>           domain N's grant table v1: entry r = bytes [r*8, r*8+8)
    DIR/evtchn/h<H>.sock      event-channel handle H's wake-up datagram socket
    DIR/evtchn/h<H>.pending   handle H's event counters: u32 p counts notifications of local
                              port p (it is pending while it differs from the last value seen)

See docs/simxen.md for the protocols.
"""

import errno
import os
import stat
import struct

PAGE = 4096

# grant_entry_v1 (xen/include/public/grant_table.h): {u16 flags; u16 domid; u32 frame}
GRANT_ENTRY = struct.Struct("<HHI")
GRANT_ENTRY_SIZE = 8
GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
NR_RESERVED_ENTRIES = 8       # GNTTAB_NR_RESERVED_ENTRIES: refs 0..7 are never handed out

DEFAULT_MEM_MB = 1024
DEFAULT_GRANT_ENTRIES = 65536
MAX_PORTS = 4096              # local ports 1..4095 per domain (port 0 is never valid)
PENDING_SIZE = MAX_PORTS * 4  # one u32 event counter per port


def pid_file(d):
    return os.path.join(d, "simxen.pid")


def control_sock(d):
    return os.path.join(d, "control.sock")


def evtchn_sock(d):
    return os.path.join(d, "evtchn.sock")


def xenstore_sock(d, domid):
    return os.path.join(d, "xenstore", f"d{domid}")


def mem_file(d, domid):
    return os.path.join(d, "mem", f"d{domid}")


def gnttab_file(d, domid):
    return os.path.join(d, "gnttab", f"d{domid}")


def handle_sock(d, handle):
    return os.path.join(d, "evtchn", f"h{handle}.sock")


def handle_pending(d, handle):
    return os.path.join(d, "evtchn", f"h{handle}.pending")


SUBDIRS = ("xenstore", "mem", "gnttab", "evtchn")


def open_regular(path, min_size=0):
    """Open a file of the simulated Xen read-write, never blocking (a FIFO put in its place
    cannot hang the caller) and only if it is a regular file of at least `min_size` bytes."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < min_size:
            raise OSError(errno.EINVAL, f"{path} is not a simxen file (regular, "
                          f">= {min_size} bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pid_alive(pid):
    """True if process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
