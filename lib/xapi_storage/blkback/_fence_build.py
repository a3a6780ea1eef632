"""cffi build script for xapi_storage.blkback._fence: the ring's memory barriers.

Built at install time (setup.py `cffi_modules`). Also runnable by hand:
    python lib/xapi_storage/blkback/_fence_build.py
"""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
    void xs_mb(void);
    void xs_wmb(void);
    void xs_rmb(void);
""")
ffibuilder.set_source("xapi_storage.blkback._fence", r"""
    /* Full barrier: on x86-64 gcc emits mfence; on arm64 dmb ish. */
    static void xs_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    /* Store-store and load-load: compiler barriers on x86 (TSO), dmb on arm. */
    static void xs_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static void xs_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
""")

if __name__ == "__main__":
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.join(here, "..", ".."), verbose=True)
