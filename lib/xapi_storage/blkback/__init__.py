"""pyblkback: a userspace Xen block backend (blkif ring server)."""
