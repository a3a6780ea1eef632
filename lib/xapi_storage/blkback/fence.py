"""Memory barriers for the shared ring.

`mb()` is a real full fence, `__atomic_thread_fence(__ATOMIC_SEQ_CST)` (gcc emits a locked
`or` to the stack on x86-64, as Xen's xen_mb does), from the tiny cffi extension `_fence`
that setup.py compiles at install time. If the extension is missing (an install without a
compiler), we fall back to a lock round trip: CPython's lock acquire is an atomic
read-modify-write (`lock cmpxchg` on x86), which is a full barrier there.
`KIND` says which one is in use; `xapi-storage blkback connect` prints it.
"""

try:
    from ._fence import lib as _lib
except ImportError:                        # pragma: no cover - depends on the install
    import platform
    import threading
    import warnings

    _lock = threading.Lock()
    _acquire = _lock.acquire
    _release = _lock.release

    def mb():
        _acquire()
        _release()

    if platform.machine() in ("x86_64", "AMD64", "i686", "i386"):
        KIND = "lock round trip (x86 locked instruction); build the cffi _fence module"

        def wmb():
            pass

        rmb = wmb
    else:
        KIND = "lock round trip on a weakly ordered CPU: NOT a proven barrier"
        warnings.warn("xapi_storage.blkback._fence is not built: " + KIND)
        wmb = rmb = mb
else:
    KIND = "cffi __atomic_thread_fence(__ATOMIC_SEQ_CST)"
    mb = _lib.xs_mb
    wmb = _lib.xs_wmb
    rmb = _lib.xs_rmb
