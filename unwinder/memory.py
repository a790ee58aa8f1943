"""Memory readers: one small interface, three backends.

The walker reads stack memory only through a :class:`Memory`, so one walker
serves the live process, an emulated CPU and a saved snapshot (framehop's
``read_stack`` idea). Every address is absolute; every size is in bytes. A
read that cannot be satisfied raises :class:`~unwinder.errors.MemoryReadError`
carrying the address — a reader never dereferences an unchecked pointer.
"""
import ctypes
import ctypes.util
import os
import struct

from .errors import MemoryReadError

_U64 = struct.Struct("<Q")
PAGE_SIZE = 4096


class Memory:
    """Interface: ``read(address, size) -> bytes`` and ``read_u64(address) -> int``.

    Subclasses implement :meth:`read`; :meth:`read_u64` decodes a little-endian
    unsigned 64-bit value (x86-64).
    """

    def read(self, address: int, size: int) -> bytes:
        raise NotImplementedError

    def read_u64(self, address: int) -> int:
        return _U64.unpack(self.read(address, 8))[0]

    def write_u64(self, address: int, value: int) -> None:
        """Store a little-endian u64 (backends that can write: process, unicorn)."""
        raise MemoryReadError(address, 8, "write")


class SnapshotMemory(Memory):
    """A plain snapshot: ``data`` holds the bytes that lived at absolute ``base``.

    Several regions may be given as ``[(base, data), ...]`` through
    :meth:`from_regions`. Used by tests and to walk a stack copied elsewhere.
    """

    def __init__(self, base: int, data: bytes):
        self._regions = [(base, bytes(data))]

    @classmethod
    def from_regions(cls, regions):
        self = cls.__new__(cls)
        self._regions = sorted((b, bytes(d)) for b, d in regions)
        return self

    def read(self, address, size):
        for base, data in self._regions:
            off = address - base
            if 0 <= off and off + size <= len(data):
                return data[off:off + size]
        raise MemoryReadError(address, size)


class UnicornMemory(Memory):
    """Memory of a unicorn ``Uc`` instance (the emulated CPU's address space)."""

    def __init__(self, uc):
        self._uc = uc

    def read(self, address, size):
        from unicorn import UcError
        try:
            return bytes(self._uc.mem_read(address, size))
        except (UcError, OverflowError):
            raise MemoryReadError(address, size) from None

    def write_u64(self, address, value):
        from unicorn import UcError
        try:
            self._uc.mem_write(address, _U64.pack(value))
        except (UcError, OverflowError):
            raise MemoryReadError(address, 8, "write") from None


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# PyDLL: reading this process's own memory never blocks, so the GIL stays
# held (a stop-the-world scan must not wait for another Python thread).
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                              ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
_process_vm_writev.argtypes = _process_vm_readv.argtypes


#: This process's id, as ``process_vm_readv`` needs it: ``[pid]``, set anew
#: in a fork child (a reader made in the parent must not read the parent).
_THIS_PROCESS = [os.getpid()]


def _after_fork_in_child():
    _THIS_PROCESS[0] = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessMemory(Memory):
    """Memory of this process, read with ``process_vm_readv(2)``.

    The kernel checks that the source range is mapped and readable, so an
    arbitrary (possibly garbage) address yields :class:`MemoryReadError`,
    never a fault. Safe to share between threads (without ``page_cache``). ``page_cache=True`` keeps each 4 KiB page it has read for
    the reader's lifetime: make one such reader per walk of a stopped stack,
    never keep it across changes of the memory it caches. ``pid``: the
    process to read, default this one — resolved at each read, so a reader
    made before a ``fork()`` reads the child's own memory in the child.
    """

    def __init__(self, pid: int | None = None, *, page_cache: bool = False):
        self._pid = pid                   # None: whichever process runs the read
        self._pages = {} if page_cache else None

    @property
    def pid(self) -> int:
        """The process read: ``pid`` as given, else this process — after a
        ``fork()``, the child in the child."""
        return _THIS_PROCESS[0] if self._pid is None else self._pid

    def _readv(self, address, size):
        # A fresh buffer per read: the syscall runs without the GIL, so a
        # buffer shared between threads would hand one thread another's bytes.
        if address < 0 or address + size > 1 << 64:
            raise MemoryReadError(address, size)
        buf = ctypes.create_string_buffer(size)
        local = _IOVec(ctypes.addressof(buf), size)
        remote = _IOVec(address, size)
        n = _process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n != size:
            raise MemoryReadError(address, size)
        return buf.raw[:size]

    def read(self, address, size):
        pages = self._pages
        if pages is None or size > PAGE_SIZE:
            return self._readv(address, size)
        page = address & ~(PAGE_SIZE - 1)
        off = address - page
        if off + size > PAGE_SIZE:  # straddles two pages: read it directly
            return self._readv(address, size)
        data = pages.get(page)
        if data is None:
            try:
                data = self._readv(page, PAGE_SIZE)
            except MemoryReadError:
                raise MemoryReadError(address, size) from None   # name the address asked for
            pages[page] = data
        return data[off:off + size]

    def read_u64(self, address):
        return _U64.unpack(self.read(address, 8))[0]

    def write_u64(self, address, value):
        """Store 8 bytes with ``process_vm_writev(2)``: an unmapped or read-only
        target is a :class:`MemoryReadError`, never a fault. Drops this
        reader's cached copy of that page."""
        buf = ctypes.create_string_buffer(_U64.pack(value), 8)
        local = _IOVec(ctypes.addressof(buf), 8)
        remote = _IOVec(address, 8)
        if address < 0 or address + 8 > 1 << 64 or _process_vm_writev(
                self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != 8:
            raise MemoryReadError(address, 8, "write")
        if self._pages is not None:
            self._pages.pop(address & ~(PAGE_SIZE - 1), None)
            self._pages.pop((address + 7) & ~(PAGE_SIZE - 1), None)
