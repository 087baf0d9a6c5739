"""``SharedBuffer``: memory shared with forked and same-host workers without copying.

Backed by an anonymous ``memfd`` (or an unlinked-on-close file in ``/dev/shm`` where memfd is
missing) mapped ``MAP_SHARED``: a forked Worker inherits the mapping; another process on the same
host re-maps it through ``/proc/<pid>/fd/<fd>`` when the buffer is pickled to it.
"""

import mmap
import os
import tempfile


class SharedBuffer:
    """``size`` bytes of shared memory; ``ndarray(shape, dtype)`` views it as numpy, zero-copy.

    >>> buf = SharedBuffer(8 * 1024)
    >>> a = buf.ndarray((1024,), "float64")
    >>> w = Worker(lambda h: h.send(float(a.sum())), codec="pickle")  # doctest: +SKIP

    Pickling (pickle codec) sends a reference, not the bytes: it is valid on the same host while
    the creating process keeps the buffer open.
    """

    def __init__(self, size, name="miniray-shared"):
        if size <= 0:
            raise ValueError(f"SharedBuffer size must be positive, got {size}")
        self.size = int(size)
        self._owner = True
        self._unlink = None
        try:
            self._fd = os.memfd_create(name, 0)  # stays open across fork: children inherit it
        except (AttributeError, OSError):
            fd, path = tempfile.mkstemp(prefix=name + "-", dir="/dev/shm")
            self._fd, self._unlink = fd, path
        os.ftruncate(self._fd, self.size)
        self.path = self._unlink or f"/proc/{os.getpid()}/fd/{self._fd}"
        self._mmap = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)

    @classmethod
    def attach(cls, path, size):
        """Map a buffer created by another process on this host (see ``path``)."""
        self = cls.__new__(cls)
        self.size, self.path, self._owner, self._unlink = int(size), path, False, None
        self._fd = os.open(path, os.O_RDWR)
        self._mmap = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
        return self

    def __reduce__(self):
        return (SharedBuffer.attach, (self.path, self.size))

    def __repr__(self):
        return f"<SharedBuffer {self.size} bytes at {self.path}>"

    def __len__(self):
        return self.size

    @property
    def buffer(self):
        """A writable memoryview of the whole buffer."""
        return memoryview(self._mmap)

    def ndarray(self, shape, dtype, offset=0):
        """A numpy array over the buffer (no copy): writes are seen by every mapper."""
        import numpy as np

        return np.ndarray(shape, dtype=dtype, buffer=self._mmap, offset=offset)

    def close(self):
        """Unmap and close; views still alive keep the mapping until they are collected."""
        try:
            self._mmap.close()
        except BufferError:
            pass  # numpy views still export the buffer: the kernel unmaps when they go
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._owner and self._unlink:
            os.unlink(self._unlink)
            self._unlink = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
