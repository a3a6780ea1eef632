"""The NBD protocol, server side, fixed newstyle: a state machine over bytes, free of I/O.

The wire protocol is the one of NetworkBlockDevice/nbd's doc/proto.md (the reference that
qemu-nbd, nbdkit and the kernel's nbd-client follow). This module never touches a socket: the
caller feeds what it received and sends what the connection produced, h11-style.

    conn = Connection(lookup)            # lookup(name) -> Export, or None if unknown
    sock.sendall(conn.take_output())     # the greeting
    for ev in conn.receive(data):        # bytes from the socket (b"" = the peer closed)
        ...                              # Opened(export) once; then Request(...)s; Closed
        conn.reply(handle, error=0, data=b"")   # one simple reply per request
    sock.sendall(conn.take_output())

Handshake: the server greets (NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES), the client
sends its flags, then options: EXPORT_NAME (the old way: no error possible, an unknown name
closes the connection), GO and INFO (NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE; an unknown
name gets NBD_REP_ERR_UNKNOWN), LIST, ABORT; any other option is answered
NBD_REP_ERR_UNSUP (structured replies are not offered). An option longer than OPTION_MAX
is skipped without buffering it and answered NBD_REP_ERR_TOO_BIG.

Transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC are checked here (range, length,
read-only, what the export can do) and handed over as `Request`s; a request that fails a check
is answered here with its NBD error (EINVAL, ENOSPC, EPERM, EOVERFLOW, ENOTSUP) and never
reaches the caller. A WRITE longer than REQUEST_MAX has its data skipped, not buffered, and
is answered EOVERFLOW. A request with a bad magic ends the connection (nothing after it can
be trusted to be a header): `Closed("protocol error ...")`.
"""

import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_TOO_BIG = 2**31 + 9

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1
TF_READ_ONLY = 2
TF_SEND_FLUSH = 4
TF_SEND_FUA = 8
TF_SEND_TRIM = 32
TF_SEND_WRITE_ZEROES = 64
TF_CAN_MULTI_CONN = 256

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
             CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write-zeroes"}

# errors (the protocol's values, Linux's errno numbers)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95

OPTION_MAX = 4096               # longest option data we read (names are at most 4096)
REQUEST_MAX = 32 << 20          # longest READ/WRITE (qemu's NBD_MAX_BUFFER_SIZE is 32 MiB)
MIN_BLOCK = 1
PREF_BLOCK = 4096

_OPT = struct.Struct(">QII")
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")


class Export:
    """What the caller serves under a name: its size and what it can do."""

    __slots__ = ("name", "size", "readonly", "can_flush", "can_trim")

    def __init__(self, name, size, readonly=False, can_flush=True, can_trim=False):
        self.name = name
        self.size = size
        self.readonly = readonly
        self.can_flush = can_flush
        self.can_trim = can_trim and not readonly

    def flags(self):
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA
        if self.readonly:
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_WRITE_ZEROES
            if self.can_trim:
                f |= TF_SEND_TRIM
        return f


class Opened:
    """Transmission starts on `export`."""

    __slots__ = ("export",)

    def __init__(self, export):
        self.export = export


class Request:
    """A checked command: `type` (CMD_*), `handle`, `offset`, `length`, `flags`, and for
    WRITE its `data` (bytes of `length`). Answer it with Connection.reply(handle, ...)."""

    __slots__ = ("type", "handle", "offset", "length", "flags", "data")

    def __init__(self, type_, handle, offset, length, flags, data=None):
        self.type = type_
        self.handle = handle
        self.offset = offset
        self.length = length
        self.flags = flags
        self.data = data

    def __repr__(self):
        return (f"Request({CMD_NAMES.get(self.type, self.type)}, handle={self.handle}, "
                f"offset={self.offset}, length={self.length})")


class Closed:
    """The connection is over: `reason` ("" for a clean NBD_CMD_DISC or ABORT)."""

    __slots__ = ("reason",)

    def __init__(self, reason=""):
        self.reason = reason


# states
_CLIENT_FLAGS, _OPTION, _TRANSMISSION, _DONE = range(4)
_MORE = object()                # _step made progress without an event


class Connection:
    """One client connection (see the module docstring)."""

    def __init__(self, lookup):
        self.lookup = lookup
        self.export = None
        self.no_zeroes = False
        self.state = _CLIENT_FLAGS
        self._in = bytearray()
        self._out = bytearray()
        self._skip = 0                  # bytes of input to drop (an oversized payload)
        self._after_skip = None         # what to answer once they are dropped
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def closed(self):
        return self.state == _DONE

    def take_output(self):
        out = bytes(self._out)
        self._out.clear()
        return out

    def pending_output(self):
        return len(self._out)

    # -- replies ---------------------------------------------------------------------------
    def reply(self, handle, error=0, data=b""):
        """The simple reply to a request (data only for a successful READ)."""
        self._out += _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        if data and not error:
            self._out += data

    def _opt_reply(self, opt, rep, data=b""):
        self._out += _OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rep, len(data)) + data

    # -- input -----------------------------------------------------------------------------
    def receive(self, data):
        """Feed bytes from the peer (b"" when it closed); returns the events they complete."""
        events = []
        if self.state == _DONE:
            return events
        if not data:
            self.state = _DONE
            events.append(Closed("" if not self._in and not self._skip
                                 else "the client closed in the middle of a message"))
            return events
        self._in += data
        while self.state != _DONE:
            if self._skip:
                n = min(self._skip, len(self._in))
                del self._in[:n]
                self._skip -= n
                if self._skip:
                    break
                self._after_skip()
                continue
            ev = self._step()
            if ev is None:
                break
            if ev is not _MORE:
                events.append(ev)
        return events

    def _take(self, n):
        if len(self._in) < n:
            return None
        b = bytes(self._in[:n])
        del self._in[:n]
        return b

    def _close(self, why):
        self.state = _DONE
        self._in.clear()
        return Closed(why)

    def _step(self):
        if self.state == _CLIENT_FLAGS:
            b = self._take(4)
            if b is None:
                return None
            flags = struct.unpack(">I", b)[0]
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                return self._close(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self.state = _OPTION
            return _MORE
        if self.state == _OPTION:
            return self._option()
        return self._request()

    def _option(self):
        if len(self._in) < _OPT.size:
            return None
        magic, opt, length = _OPT.unpack_from(self._in)
        if magic != IHAVEOPT:
            return self._close(f"protocol error: option magic {magic:#x}")
        if length > OPTION_MAX:
            del self._in[:_OPT.size]
            if opt == OPT_EXPORT_NAME:          # cannot be answered with an error
                return self._close(f"export name of {length} bytes")
            self._skip = length
            self._after_skip = lambda: self._opt_reply(opt, REP_ERR_TOO_BIG,
                                                       b"option too long")
            return _MORE
        if len(self._in) < _OPT.size + length:
            return None
        del self._in[:_OPT.size]
        data = self._take(length)
        if opt == OPT_EXPORT_NAME:
            exp = self.lookup(data.decode(errors="replace"))
            if exp is None:
                return self._close(f"unknown export {data[:64]!r}")
            self._out += struct.pack(">QH", exp.size, exp.flags())
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._open(exp)
        if opt == OPT_ABORT:
            self._opt_reply(opt, REP_ACK)
            return self._close("")
        if opt == OPT_LIST:
            if data:
                self._opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")
                return _MORE
            for name in getattr(self.lookup, "names", lambda: [])():
                n = name.encode()
                self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(n)) + n)
            self._opt_reply(opt, REP_ACK)
            return _MORE
        if opt in (OPT_GO, OPT_INFO):
            return self._go(opt, data)
        self._opt_reply(opt, REP_ERR_UNSUP, b"option not supported")
        return _MORE

    def _go(self, opt, data):
        if len(data) < 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"short option")
            return _MORE
        nlen = struct.unpack_from(">I", data)[0]
        if 4 + nlen + 2 > len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"bad name length")
            return _MORE
        name = data[4:4 + nlen].decode(errors="replace")
        nreq = struct.unpack_from(">H", data, 4 + nlen)[0]
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"bad information request count")
            return _MORE
        exp = self.lookup(name)
        if exp is None:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export {name[:64]!r}".encode())
            return _MORE
        self._opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, exp.flags()))
        self._opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK,
                                                   PREF_BLOCK, REQUEST_MAX))
        self._opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            return self._open(exp)
        return _MORE

    def _open(self, exp):
        self.export = exp
        self.state = _TRANSMISSION
        return Opened(exp)

    def _request(self):
        if len(self._in) < _REQ.size:
            return None
        magic, flags, type_, handle, offset, length = _REQ.unpack_from(self._in)
        if magic != REQUEST_MAGIC:
            return self._close(f"protocol error: request magic {magic:#x}")
        exp = self.export
        if type_ == CMD_WRITE:
            if length > REQUEST_MAX:
                del self._in[:_REQ.size]
                self._skip = length
                self._after_skip = lambda: self.reply(handle, EOVERFLOW)
                return _MORE
            if len(self._in) < _REQ.size + length:
                return None
            del self._in[:_REQ.size]
            data = self._take(length)
        else:
            del self._in[:_REQ.size]
            data = None
        if type_ == CMD_DISC:
            return self._close("")
        err = self._check(type_, flags, offset, length, exp)
        if err:
            self.reply(handle, err)
            return _MORE
        return Request(type_, handle, offset, length, flags, data)

    @staticmethod
    def _check(type_, flags, offset, length, exp):
        if type_ not in CMD_NAMES:
            return EINVAL
        if flags & ~(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE):
            return EINVAL
        if type_ == CMD_FLUSH:
            return 0
        if exp.readonly and type_ in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return EPERM
        if type_ == CMD_TRIM and not exp.can_trim:
            return ENOTSUP
        if type_ == CMD_READ and length > REQUEST_MAX:
            return EOVERFLOW
        if offset + length > exp.size:
            return ENOSPC if type_ in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return 0
