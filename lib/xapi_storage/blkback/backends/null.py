"""The null backend: answers every request without doing any I/O (xen-disk's "discard")."""

from . import Storage


class Null(Storage):
    kind = "null"
    can_discard = True
    write_cache = False

    def __init__(self, size, readonly=False):
        self._size = size - size % 512
        self.readonly = readonly

    def size(self):
        return self._size

    def readv(self, offset, iovs, length=None):
        pass

    def writev(self, offset, iovs, length=None):
        pass

    def discard(self, offset, length):
        pass
