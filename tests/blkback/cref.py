"""A C reference for the ring arithmetic and the blkif layouts, compiled with cffi for the
differential tests. The ring functions are the io/ring.h macros written over plain unsigned
ints (RING_IDX is `unsigned int`), so wrap-around is C's, not ours."""

from cffi import FFI

CDEF = """
unsigned int ring_size(unsigned int bytes, unsigned int entry);
unsigned int unconsumed_requests(unsigned int req_prod, unsigned int req_cons,
                                 unsigned int rsp_prod_pvt, unsigned int size);
int prod_overflow(unsigned int req_prod, unsigned int rsp_prod_pvt, unsigned int size);
int cons_overflow(unsigned int req_cons, unsigned int rsp_prod_pvt, unsigned int size);
int notify_needed(unsigned int new_, unsigned int old, unsigned int event);
unsigned int free_requests(unsigned int req_prod_pvt, unsigned int rsp_cons, unsigned int size);
int off_req(int field);
int off_disc(int field);
int off_ind(int field);
int off_rsp(int field);
int size_of(int which);
"""

SRC = r"""
#include <stdint.h>
#include <stddef.h>
#define __RD2(_x)  (((_x) & 0x00000002) ? 0x2 : ((_x) & 0x1))
#define __RD4(_x)  (((_x) & 0x0000000c) ? __RD2((_x)>>2)<<2    : __RD2(_x))
#define __RD8(_x)  (((_x) & 0x000000f0) ? __RD4((_x)>>4)<<4    : __RD4(_x))
#define __RD16(_x) (((_x) & 0x0000ff00) ? __RD8((_x)>>8)<<8    : __RD8(_x))
#define __RD32(_x) (((_x) & 0xffff0000) ? __RD16((_x)>>16)<<16 : __RD16(_x))
unsigned int ring_size(unsigned int bytes, unsigned int entry) {
    return __RD32((bytes - 64) / entry);
}
unsigned int unconsumed_requests(unsigned int req_prod, unsigned int req_cons,
                                 unsigned int rsp_prod_pvt, unsigned int size) {
    unsigned int req = req_prod - req_cons;
    unsigned int rsp = size - (req_cons - rsp_prod_pvt);
    return req < rsp ? req : rsp;
}
int prod_overflow(unsigned int req_prod, unsigned int rsp_prod_pvt, unsigned int size) {
    return (req_prod - rsp_prod_pvt) > size;
}
int cons_overflow(unsigned int req_cons, unsigned int rsp_prod_pvt, unsigned int size) {
    return (req_cons - rsp_prod_pvt) >= size;
}
int notify_needed(unsigned int new_, unsigned int old, unsigned int event) {
    return (unsigned int)(new_ - event) < (unsigned int)(new_ - old);
}
unsigned int free_requests(unsigned int req_prod_pvt, unsigned int rsp_cons, unsigned int size) {
    return size - (req_prod_pvt - rsp_cons);
}
typedef struct { uint32_t gref; uint8_t first_sect, last_sect; } seg_t;
struct req { uint8_t operation, nr_segments; uint16_t handle; uint64_t id;
             uint64_t sector_number; seg_t seg[11]; };
struct disc { uint8_t operation, flag; uint16_t handle; uint64_t id; uint64_t sector_number;
              uint64_t nr_sectors; };
struct ind { uint8_t operation, indirect_op; uint16_t nr_segments; uint64_t id;
             uint64_t sector_number; uint16_t handle; uint32_t indirect_grefs[8]; };
struct rsp { uint64_t id; uint8_t operation; int16_t status; };
int off_req(int f) { size_t o[] = {offsetof(struct req, operation), offsetof(struct req, nr_segments),
    offsetof(struct req, handle), offsetof(struct req, id), offsetof(struct req, sector_number),
    offsetof(struct req, seg)}; return o[f]; }
int off_disc(int f) { size_t o[] = {offsetof(struct disc, operation), offsetof(struct disc, flag),
    offsetof(struct disc, handle), offsetof(struct disc, id), offsetof(struct disc, sector_number),
    offsetof(struct disc, nr_sectors)}; return o[f]; }
int off_ind(int f) { size_t o[] = {offsetof(struct ind, operation), offsetof(struct ind, indirect_op),
    offsetof(struct ind, nr_segments), offsetof(struct ind, id), offsetof(struct ind, sector_number),
    offsetof(struct ind, handle), offsetof(struct ind, indirect_grefs)}; return o[f]; }
int off_rsp(int f) { size_t o[] = {offsetof(struct rsp, id), offsetof(struct rsp, operation),
    offsetof(struct rsp, status)}; return o[f]; }
int size_of(int w) { size_t s[] = {sizeof(struct req), sizeof(struct disc), sizeof(struct ind),
    sizeof(struct rsp), sizeof(seg_t)}; return s[w]; }
"""


def build(tmpdir):
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_blkif_cref", SRC)
    so = ffi.compile(tmpdir=str(tmpdir))
    import importlib.util
    spec = importlib.util.spec_from_file_location("_blkif_cref", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.lib
