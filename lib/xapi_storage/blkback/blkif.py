"""The blkif ABI: constants, ring-entry layouts for both guest ABIs, request parsing.

No I/O here. A request is copied out of the shared ring once (the caller does that, into
`bytes`), and everything below reads only that private copy (XSA-155). Parsing a hostile
request never raises anything but `BadRequest`, which carries the status to answer with.

Layouts (little-endian; offsets checked against gcc -m64 / -m32, see the spec §1.3):

    x86_64-abi (and arm-abi)               x86_32-abi
    request  112 B: op nseg handle pad4    108 B: op nseg handle
                    id@8 sector@16 seg@24          id@4 sector@12 seg@20
    discard   32 B: ... nr_sectors@24       28 B: nr_sectors@20
    indirect  64 B: op iop nseg(u16) id@8   64 B: id@4 sector@12 handle@20
                    sector@16 handle@24            grefs@24
                    grefs@28
    response  16 B: id op pad status pad4   12 B: id op pad status
    segment    8 B: gref u32, first u8, last u8, pad u16 (both ABIs)
"""

import struct

# operations (blkif.h)
OP_READ = 0
OP_WRITE = 1
OP_WRITE_BARRIER = 2
OP_FLUSH_DISKCACHE = 3
OP_RESERVED_1 = 4
OP_DISCARD = 5
OP_INDIRECT = 6

OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_WRITE_BARRIER: "barrier",
            OP_FLUSH_DISKCACHE: "flush", OP_DISCARD: "discard", OP_INDIRECT: "indirect"}

# response status
RSP_OKAY = 0
RSP_ERROR = -1
RSP_EOPNOTSUPP = -2

MAX_SEGMENTS_PER_REQUEST = 11
MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENTS_PER_INDIRECT_PAGE = 512          # 4096 / 8
DISCARD_SECURE = 1

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

SECTOR_SIZE = 512
PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
SRING_HEADER = 64

# the frontend's `protocol` key
PROTO_X86_64 = "x86_64-abi"
PROTO_X86_32 = "x86_32-abi"
PROTO_ARM = "arm-abi"

SEGMENT = struct.Struct("<IBB2x")


class BadRequest(Exception):
    """The frontend sent a request we refuse. Answered with `status`; never fatal.

    `id` and `op` are what the response must echo (op is the inner op for indirect)."""

    def __init__(self, req_id, op, status, reason):
        super().__init__(f"frontend error: {reason} (request id {req_id}, op {op})")
        self.id = req_id
        self.op = op
        self.status = status
        self.reason = reason


class Abi:
    """One guest ABI: entry size and the struct layouts."""

    def __init__(self, name, entry_size, req, disc, ind, rsp, seg_offset):
        self.name = name
        self.entry_size = entry_size
        #: op, nseg, handle, id, sector, then 11 x (gref, first, last)
        self.req = req
        #: op, flag, handle, id, sector, nr_sectors
        self.disc = disc
        #: op, indirect_op, nseg, id, sector, handle, 8 grefs
        self.ind = ind
        #: id, op, status  (padding written as zero by pack)
        self.rsp = rsp
        self.seg_offset = seg_offset

    def __repr__(self):
        return f"Abi({self.name})"


_SEGS = "IBB2x" * MAX_SEGMENTS_PER_REQUEST
ABI_X86_64 = Abi(PROTO_X86_64, 112,
                 struct.Struct("<BBH4xQQ" + _SEGS),
                 struct.Struct("<BBH4xQQQ"),
                 struct.Struct("<BBH4xQQH2x8I4x"),
                 struct.Struct("<QBxh4x"),
                 24)
ABI_X86_32 = Abi(PROTO_X86_32, 108,
                 struct.Struct("<BBHQQ" + _SEGS),
                 struct.Struct("<BBHQQQ"),
                 struct.Struct("<BBHQQH2x8I8x"),
                 struct.Struct("<QBxh"),
                 20)
assert ABI_X86_64.req.size == 112 and ABI_X86_32.req.size == 108
assert ABI_X86_64.ind.size == 64 and ABI_X86_32.ind.size == 64
assert ABI_X86_64.rsp.size == 16 and ABI_X86_32.rsp.size == 12

ABIS = {PROTO_X86_64: ABI_X86_64, PROTO_ARM: ABI_X86_64, PROTO_X86_32: ABI_X86_32}


def abi_for_protocol(value):
    """The ABI named by the frontend's `protocol` key (None/absent means x86_32, as Linux
    blkback assumes on x86). Raises ValueError for anything else (blkback: -ENOSYS)."""
    if value is None or value == "":
        return ABI_X86_32
    try:
        return ABIS[value]
    except KeyError:
        raise ValueError(f"frontend error: unknown protocol {value!r}") from None


def ring_size(ring_bytes, entry_size):
    """Entries in a ring of `ring_bytes` (ring.h __RING_SIZE): round down to a power of 2."""
    n = (ring_bytes - SRING_HEADER) // entry_size
    if n < 1:
        raise ValueError("ring too small")
    return 1 << (n.bit_length() - 1)


# --- parsed requests -------------------------------------------------------------------------
# A parsed request is a plain tuple, so parsing allocates nothing but the tuple itself:
#   (kind, id, op, sector, nr_sectors, segs, extra)
# kind: one of the K_* values below; op: the op to echo in the response;
# segs: tuple of (gref, first_sect, last_sect) for data requests, () otherwise;
# extra: discard flag, or the indirect grefs (tuple) for K_INDIRECT before its pages are read.
K_READ = 0
K_WRITE = 1
K_BARRIER = 2
K_FLUSH = 3
K_DISCARD = 5
K_INDIRECT = 6          # header parsed; segments still in the indirect pages


class Limits:
    """What the device accepts: size, read-only, advertised indirect segments."""

    __slots__ = ("sectors", "readonly", "max_indirect", "logical_sectors", "discard")

    def __init__(self, sectors, readonly=False, max_indirect=256, sector_size=512,
                 discard=True):
        self.sectors = sectors
        self.readonly = readonly
        self.max_indirect = max_indirect
        self.logical_sectors = sector_size // SECTOR_SIZE
        self.discard = discard


def _check_segments(segs, req_id, op):
    """Validate (gref, first, last) triples; return the number of sectors they cover."""
    n = 0
    for _gref, first, last in segs:
        if first > last or last >= SECTORS_PER_PAGE:
            raise BadRequest(req_id, op, RSP_ERROR,
                             f"segment sectors {first}..{last} outside a 4 KiB page")
        n += last - first + 1
    return n


def check_range(limits, sector, nsect, req_id, op):
    if sector + nsect > limits.sectors:
        raise BadRequest(req_id, op, RSP_ERROR,
                         f"sectors {sector}+{nsect} beyond the disk end {limits.sectors}")
    m = limits.logical_sectors - 1
    if m and (sector | nsect) & m:
        raise BadRequest(req_id, op, RSP_ERROR, "request not aligned to sector-size")


def parse_request(abi, raw, limits, offset=0):
    """Parse and validate the ring entry at raw[offset:offset+abi.entry_size].

    `raw` must be private memory (a copy of the ring slot). Returns the request tuple
    described above; raises BadRequest with the status to answer."""
    op = raw[offset]
    if op == OP_READ or op == OP_WRITE or op == OP_WRITE_BARRIER or op == OP_FLUSH_DISKCACHE:
        f = abi.req.unpack_from(raw, offset)
        nseg = f[1]
        req_id = f[3]
        sector = f[4]
        if op <= OP_WRITE:
            if nseg < 1 or nseg > MAX_SEGMENTS_PER_REQUEST:
                raise BadRequest(req_id, op, RSP_ERROR, f"{nseg} segments in a read/write")
        elif nseg > MAX_SEGMENTS_PER_REQUEST:
            raise BadRequest(req_id, op, RSP_ERROR, f"{nseg} segments in a flush/barrier")
        if op != OP_READ and limits.readonly:
            raise BadRequest(req_id, op, RSP_ERROR, "write to a read-only device")
        segs = tuple(zip(f[5:5 + 3 * nseg:3], f[6:6 + 3 * nseg:3], f[7:7 + 3 * nseg:3]))
        nsect = _check_segments(segs, req_id, op)
        if nseg:
            check_range(limits, sector, nsect, req_id, op)
        return (op, req_id, op, sector, nsect, segs, None)
    if op == OP_DISCARD:
        _op, flag, _handle, req_id, sector, nsect = abi.disc.unpack_from(raw, offset)
        if not limits.discard:
            raise BadRequest(req_id, op, RSP_EOPNOTSUPP, "discard not supported")
        if limits.readonly:
            raise BadRequest(req_id, op, RSP_ERROR, "discard on a read-only device")
        check_range(limits, sector, nsect, req_id, op)
        return (K_DISCARD, req_id, op, sector, nsect, (), flag)
    if op == OP_INDIRECT:
        f = abi.ind.unpack_from(raw, offset)
        iop = f[1]
        nseg = f[2]
        req_id = f[3]
        sector = f[4]
        if limits.max_indirect == 0:
            raise BadRequest(req_id, iop if iop <= OP_WRITE else op, RSP_EOPNOTSUPP,
                             "indirect requests not advertised")
        if iop != OP_READ and iop != OP_WRITE:
            # Linux blkback: error with the indirect op we were given
            raise BadRequest(req_id, op, RSP_ERROR, f"indirect op {iop} is not read or write")
        if nseg < 1 or nseg > limits.max_indirect:
            raise BadRequest(req_id, iop, RSP_ERROR,
                             f"{nseg} indirect segments (1..{limits.max_indirect} allowed)")
        if iop == OP_WRITE and limits.readonly:
            raise BadRequest(req_id, iop, RSP_ERROR, "write to a read-only device")
        npages = (nseg + SEGMENTS_PER_INDIRECT_PAGE - 1) // SEGMENTS_PER_INDIRECT_PAGE
        return (K_INDIRECT, req_id, iop, sector, nseg, (), f[6:6 + npages])
    req_id = abi.disc.unpack_from(raw, offset)[3]
    raise BadRequest(req_id, op, RSP_EOPNOTSUPP, f"unknown operation {op}")


def parse_indirect_segments(header, segbytes, limits):
    """Second half of an indirect request: `segbytes` is a private copy of the first
    nseg*8 bytes of its indirect pages (in gref order). Returns the full read/write tuple."""
    _k, req_id, iop, sector, nseg, _s, _g = header
    if len(segbytes) < nseg * SEGMENT.size:
        raise BadRequest(req_id, iop, RSP_ERROR, "indirect segment list truncated")
    segs = tuple(SEGMENT.iter_unpack(segbytes[:nseg * SEGMENT.size]))
    nsect = _check_segments(segs, req_id, iop)
    check_range(limits, sector, nsect, req_id, iop)
    return (iop, req_id, iop, sector, nsect, segs, None)


# --- building entries (the frontend's side; also used by tests) ------------------------------

def pack_request(abi, buf, offset, op, req_id, sector, segs, handle=0):
    """Write a read/write/flush/barrier request with `segs` [(gref, first, last), ...]."""
    flat = []
    for s in segs:
        flat.extend(s)
    flat.extend((0, 0, 0) * (MAX_SEGMENTS_PER_REQUEST - len(segs)))
    abi.req.pack_into(buf, offset, op, len(segs), handle, req_id, sector, *flat)


def pack_discard(abi, buf, offset, req_id, sector, nr_sectors, flag=0, handle=0):
    buf[offset:offset + abi.entry_size] = bytes(abi.entry_size)
    abi.disc.pack_into(buf, offset, OP_DISCARD, flag, handle, req_id, sector, nr_sectors)


def pack_indirect(abi, buf, offset, iop, req_id, sector, nseg, grefs, handle=0):
    g = list(grefs) + [0] * (MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
    buf[offset:offset + abi.entry_size] = bytes(abi.entry_size)
    abi.ind.pack_into(buf, offset, OP_INDIRECT, iop, nseg, req_id, sector, handle, *g)
