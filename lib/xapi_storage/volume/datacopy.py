"""Copy a raw image file: a reflink where the filesystem shares extents, else a sparse copy.

    clone_or_copy(src_fd, dst_fd) -> "reflink" | "copy"
    copy_block_device(src_fd, dst_fd, size)     every byte, for block devices (lvm-raw)

The destination must be an empty regular file open for writing. A reflink (ioctl FICLONE:
XFS with reflink=1, btrfs, OCFS2, bcachefs, NFS 4.2 servers that support CLONE) is instant and
shares blocks copy-on-write. Otherwise the data extents of the source are found with
SEEK_DATA/SEEK_HOLE and copied with copy_file_range (which the kernel may still accelerate);
holes stay holes, so a sparse source gives an equally sparse copy.

Setting XAPI_STORAGE_NO_REFLINK=1 in the environment skips the reflink attempt (tests use it to
exercise the copy path on reflink-capable filesystems).
"""

import errno
import fcntl
import os

from ..compat import copy_file_range

FICLONE = 0x40049409        # _IOW(0x94, 9, int), linux/fs.h
CHUNK = 64 << 20            # bytes per copy_file_range call

# errno values meaning "this filesystem (pair) cannot reflink": fall back to copying
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
               errno.EBADF, errno.EPERM}
# errno values meaning "copy_file_range cannot do this pair": fall back to read/write
_NO_CFR = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def reflink_disabled():
    return os.environ.get("XAPI_STORAGE_NO_REFLINK", "") not in ("", "0")


def clone_or_copy(src_fd, dst_fd, progress=None):
    """Make dst (empty) a copy of src; returns the method used ("reflink" or "copy")."""
    if not reflink_disabled():
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return "reflink"
        except OSError as e:
            if e.errno not in _NO_REFLINK:
                raise
    sparse_copy(src_fd, dst_fd, progress=progress)
    return "copy"


def data_extents(fd, size):
    """Yield (offset, length) of the data regions of fd below `size` (holes skipped)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after off
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        off = end


def sparse_copy(src_fd, dst_fd, progress=None):
    """Copy the data extents of src into dst at the same offsets; dst gets src's size."""
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    use_cfr = True
    for start, length in data_extents(src_fd, size):
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            pos = start + done
            copied = 0
            if use_cfr:
                try:
                    copied = copy_file_range(src_fd, dst_fd, n, pos, pos)
                except OSError as e:
                    if e.errno not in _NO_CFR:
                        raise
                    use_cfr = False
                if copied == 0:
                    # 0 means end of file, but some kernel/filesystem pairs say it wrongly
                    # (data would be silently missing): let a read decide, and stop using it
                    use_cfr = False
            if not use_cfr:
                buf = os.pread(src_fd, min(n, 1 << 20), pos)
                copied = os.pwrite(dst_fd, buf, pos) if buf else 0
            if copied == 0:     # the source shrank under us: the rest reads as zeroes
                return
            done += copied
            if progress is not None:
                progress(pos + copied)


BLOCK_CHUNK = 4 << 20       # bytes per read/write of a block-device copy


def copy_block_device(src_fd, dst_fd, size, progress=None):
    """Copy the first `size` bytes of one block device (or file) to another, every byte:
    a block device has no holes to skip, and a new thick LV holds whatever was on its
    extents before, so zeroes are written too. The caller fsyncs dst."""
    pos = 0
    while pos < size:
        buf = os.pread(src_fd, min(BLOCK_CHUNK, size - pos), pos)
        if not buf:
            raise OSError(errno.EIO, f"source ended at byte {pos} of {size}")
        view = memoryview(buf)
        while view:
            n = os.pwrite(dst_fd, view, pos)
            view = view[n:]
            pos += n
        if progress is not None:
            progress(pos)
