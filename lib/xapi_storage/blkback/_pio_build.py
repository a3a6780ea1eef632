"""cffi build script for xapi_storage.blkback._pio: a batch of positional reads/writes.

The profile of 4 KiB requests on the raw backend showed most of the time in the Python calls
around each preadv/pwritev (one wrapper, one iovec list, one result check per request). This
runs a whole batch of single-buffer jobs in C, without the GIL, merging jobs that continue
each other on disk (same op) into one preadv/pwritev. Built at install time (setup.py).

A job is 32 bytes: {u64 addr; u32 len; u32 op (0 read, 1 write); i64 offset; i64 result}
(result: 0, or -errno). The caller guarantees that addr..addr+len is memory it has mapped.
"""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
    int pio_run(int fd, void *jobs, int n);
""")
ffibuilder.set_source("xapi_storage.blkback._pio", r"""
    #define _GNU_SOURCE
    #include <errno.h>
    #include <stdint.h>
    #include <sys/types.h>
    #include <sys/uio.h>
    #include <unistd.h>

    struct pio_job { uint64_t addr; uint32_t len; uint32_t op; int64_t off; int64_t res; };
    #define PIO_IOV_MAX 1024

    /* All `total` bytes of iov[0..cnt) at off, or -errno (-EIO for no progress). */
    static int64_t full_rw(int fd, int write, struct iovec *iov, int cnt, off_t off,
                           size_t total)
    {
        while (total) {
            ssize_t r = write ? pwritev(fd, iov, cnt, off) : preadv(fd, iov, cnt, off);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (r == 0)
                return -EIO;
            total -= (size_t)r;
            off += r;
            while (cnt && (size_t)r >= iov->iov_len) {
                r -= (ssize_t)iov->iov_len;
                iov++;
                cnt--;
            }
            if (cnt && r) {
                iov->iov_base = (char *)iov->iov_base + r;
                iov->iov_len -= (size_t)r;
            }
        }
        return 0;
    }

    static int pio_run(int fd, void *jobs, int n)
    {
        struct pio_job *j = (struct pio_job *)jobs;
        struct iovec iov[PIO_IOV_MAX];
        int i = 0, failed = 0;
        while (i < n) {
            int k = i, cnt = 0;
            size_t total = 0;
            off_t off = (off_t)j[i].off;
            while (k < n && cnt < PIO_IOV_MAX && j[k].op == j[i].op
                   && (k == i || j[k].off == off + (off_t)total)) {
                iov[cnt].iov_base = (void *)(uintptr_t)j[k].addr;
                iov[cnt].iov_len = j[k].len;
                total += j[k].len;
                cnt++;
                k++;
            }
            int64_t res = full_rw(fd, j[i].op == 1, iov, cnt, off, total);
            for (int m = i; m < k; m++) {
                j[m].res = res;
                if (res)
                    failed++;
            }
            i = k;
        }
        return failed;
    }
""")

if __name__ == "__main__":
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.join(here, "..", ".."), verbose=True)
