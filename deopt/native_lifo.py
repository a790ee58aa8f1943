"""A thread's LIFO of hijacked returns: the native records the dispatcher reads.

At hijack time (world stopped) every hijacked slot of a thread gets a
:class:`LifoEntry` ``(slot, original return address, descriptor, status)``
in the thread's :class:`ThreadBlock`, owned by a :class:`ThreadLifo`.
Entries are kept sorted by slot address, highest first, so the *innermost*
pending frame — the one whose callee returns next — is on top: a stack has
one return order, and every pending slot is still on it. The dispatcher
(:mod:`deopt.native_transfer`) takes ``entries[top − 1]`` when its slot is
the stub's ``E − 8``, else searches below it, and moves the entry out of
:data:`PENDING`; Python learns which entries were taken by reading their
statuses (:meth:`ThreadLifo.drain`, safe at any time) and rewrites the array
only while the world is stopped (:meth:`ThreadLifo.commit`).

Lifetimes: a :class:`ThreadLifo` (block, entry array, plan and state buffer)
lives until its thread has detached and no entry is pending; its state buffer
may be read by a resume entry after the transfer, so it is never moved or
freed while its thread can run JIT code. An entry array is replaced only while
the world is stopped (no thread is in a transfer).
"""
from __future__ import annotations

import array
import ctypes
import itertools
import operator

from .errors import NativeTransferError
from .plan import STATE_SLOTS
from .stub import TransferPlan

__all__ = ["PENDING", "TAKEN", "HANDED", "LifoEntry", "ThreadBlock", "ThreadLifo",
           "NativeTransferError"]

#: :attr:`LifoEntry.status` values. Only the dispatcher moves an entry out of
#: PENDING, and only on the entry's own thread.
PENDING = 0
#: Transferred natively: the record must be dropped by Python (drain).
TAKEN = 1
#: Handed to the Python transfer (no native target): Python takes the record itself.
HANDED = 2


class LifoEntry(ctypes.Structure):
    """One hijacked slot of a thread (32 bytes). ``slot`` / ``original_ra``:
    absolute addresses; ``descriptor``: address of its frame map's
    :class:`deopt.native_transfer.Descriptor`."""
    _fields_ = [("slot", ctypes.c_uint64),
                ("original_ra", ctypes.c_uint64),
                ("descriptor", ctypes.c_uint64),
                ("status", ctypes.c_int64)]


class ThreadBlock(ctypes.Structure):
    """A thread's LIFO header, transfer plan and state buffer.

    ``top``: entries ``[0, top)`` may be PENDING, ``entries[top − 1]`` is the
    innermost; ``entries``: address of the :class:`LifoEntry` array;
    ``capacity``: its length (Python only). Counters, written by the owner
    thread only: ``searches`` (records found below the top), ``misses``
    (slots not in the LIFO: Python transfer), ``handed`` (records without a
    native target: Python transfer). ``plan``/``state``: what the stub and the
    resume entry read (reused by the thread's next transfer).
    """
    _fields_ = [("top", ctypes.c_int64),
                ("entries", ctypes.c_uint64),
                ("capacity", ctypes.c_int64),
                ("searches", ctypes.c_int64),
                ("misses", ctypes.c_int64),
                ("handed", ctypes.c_int64),
                ("plan", TransferPlan),
                ("state", ctypes.c_uint64 * STATE_SLOTS)]


# drain() and commit() read entries as four 8-byte words each.
assert ctypes.sizeof(LifoEntry) == 4 * 8 and LifoEntry.status.offset == 3 * 8


class ThreadLifo:
    """Owns one thread's :class:`ThreadBlock` and entry array.

    ``token``: the runtime's handle of the thread (opaque here; kept alive with
    this object). The native array is the only record of the entries: its
    first :attr:`size` :class:`LifoEntry` were written by the last
    :meth:`commit`; :meth:`drain` reports, by slot, those the dispatcher has
    moved out of PENDING since; :meth:`commit` (world stopped only) rewrites
    the array from the still-pending entries and the ones queued since
    (:meth:`push` one by one, :meth:`push_entries` as ready-made native
    records).
    """

    def __init__(self, token=None):
        self.token = token
        self.block = ThreadBlock()
        self.address = ctypes.addressof(self.block)
        self._array = None
        #: Entries written by the last commit.
        self.size = 0
        self._seen = bytearray()   # 1: status already reported by drain()
        self._new = []             # (slot, original_ra, descriptor) pushed one by one
        self._raw_new = []         # LifoEntry bytes, highest slot first, per push_entries()
        self._pending = 0          # entries reserve()d above size, not settled yet

    def __len__(self):
        """Entries written that drain() has not yet seen leave PENDING, plus
        pushes and reserved entries."""
        return (self._seen.count(0) + len(self._new) + self._pending
                + sum(len(r) for r in self._raw_new) // _ENTRY_SIZE)

    def push(self, record, descriptor_address):
        """Queue ``record`` (``slot``, ``original_ra``) for the next :meth:`commit`."""
        self._new.append((record.slot, record.original_ra, descriptor_address))

    def push_entries(self, raw):
        """Queue ready-made :class:`LifoEntry` records (``bytes``, PENDING,
        highest slot first) for the next :meth:`commit`."""
        if len(raw) % _ENTRY_SIZE:
            raise NativeTransferError(f"{len(raw)} bytes are not whole LIFO entries")
        if raw:
            self._raw_new.append(bytes(raw))

    def _raw(self):
        return ctypes.string_at(ctypes.addressof(self._array), self.size * _ENTRY_SIZE)

    def append(self, fill, n, highest_slot):
        """Write up to ``n`` new entries straight into the native array, world stopped.

        ``fill(address) -> written`` writes that many :class:`LifoEntry`
        records (PENDING, highest slot first, every slot at most
        ``highest_slot``, absolute) at ``address``. They go on top of the
        entries written before when every entry drain() has not yet seen
        leave PENDING lies above ``highest_slot`` (the new frames are
        deeper), or at the bottom when there is none; nothing needs sorting
        then, nor a copy. Returns ``written``, or None when that does not
        hold or pushes are queued: then use :meth:`push_entries` and
        :meth:`commit`. Entries written here need no :meth:`commit`.
        """
        room = self.reserve(n, highest_slot)
        if room is None:
            return None
        written = fill(room[0])
        self._pending = written
        self.settle()
        self.block.top = self.size
        return written

    def reserve(self, n, highest_slot):
        """Room for ``n`` new entries on top, for another thread of control to
        write later (world stopped): the conditions of :meth:`append`, else
        None (see :meth:`append`).
        Until :meth:`settle` the array holds only the entries below them (a
        drain does not look at the room) and ``block.top`` is theirs. Returns
        ``(address, top)``: ``top`` is what ``block.top`` becomes once they
        are written."""
        if self._new or self._raw_new or self._pending:
            return None
        seen = self._seen
        live = seen.rfind(0) if self.size else -1
        if live >= 0:
            top_slot = int.from_bytes(ctypes.string_at(
                ctypes.addressof(self._array) + live * _ENTRY_SIZE, 8), "little")
            if top_slot <= highest_slot:
                return None
            base = self.size          # after every entry drain() has not reported yet
        else:
            base = 0                  # drain() reported every entry: start afresh
            self.size = 0
            self._seen = bytearray()
        self._reserve(base + n)
        self.block.top = base
        self._pending = n
        return ctypes.addressof(self._array) + base * _ENTRY_SIZE, base + n

    def unreserve(self):
        """Give back the room :meth:`reserve` made (nothing was written there)."""
        self._pending = 0

    def settle(self):
        """The :meth:`reserve` d entries were written (and ``block.top`` set):
        from now on they are entries like the others."""
        n, self._pending = self._pending, 0
        self.size += n
        self._seen.extend(bytes(n))

    def _reserve(self, n):
        """Make the array hold at least ``n`` entries, keeping the first :attr:`size`."""
        if self._array is not None and len(self._array) >= n:
            return
        array_ = (LifoEntry * max(16, 2 * n))()
        if self.size:
            _memmove(array_, self._array, self.size * _ENTRY_SIZE)
        self._array = array_
        self.block.entries = ctypes.addressof(array_)
        self.block.capacity = len(array_)

    def drain(self):
        """``(taken, handed)``: slots whose entries left PENDING since the last drain.

        ``taken``: transferred natively (the caller drops them from its hijack
        table); ``handed``: given to the Python transfer (which took them).
        Safe while threads run: only statuses are read.
        """
        n = self.size
        seen = self._seen
        if n == 0 or seen.count(0) == 0:
            return [], []
        raw = self._raw()
        marks = raw[LifoEntry.status.offset::_ENTRY_SIZE]              # low byte of each status
        moved = marks.translate(_MOVED)           # 1: not PENDING
        if moved == seen:
            return [], []
        words = memoryview(raw).cast("Q")
        taken, handed = [], []
        for i in itertools.compress(range(n), map(operator.ne, moved, seen)):
            seen[i] = 1
            (taken if marks[i] == TAKEN else handed).append(words[4 * i])
        return taken, handed

    def entries(self):
        """``[(slot, original_ra, descriptor)]`` of the entries written and
        not yet seen leave PENDING, in native order (tests, debugging)."""
        if not self.size:
            return []
        words = memoryview(self._raw()).cast("Q")
        return [(words[4 * i], words[4 * i + 1], words[4 * i + 2])
                for i in range(self.size) if not self._seen[i]]

    def commit(self, reorder=None, drain=True):
        """Rewrite the native LIFO: pending entries plus new pushes, innermost on top.

        World stopped only (no thread may be in a transfer). Drains first and
        returns that drain's ``(taken, handed)`` (see :meth:`drain`): the
        caller must account for them like for any drain. With nothing queued
        the array is left as it is.
        ``reorder(list) -> list`` (tests) may permute or drop entries of the
        sorted list ``[(slot, original_ra, descriptor)]``; a dropped entry is
        no longer native: its transfer falls back to Python.
        ``drain=False``: the caller drained while the world was already
        stopped (no entry can have moved since): with nothing queued the
        statuses are not read again and ``([], [])`` is returned (an array
        that is rewritten is always drained first).
        """
        queued = self._new or self._raw_new or reorder is not None
        if not queued and not drain:
            return [], []
        drained = self.drain()
        if self._pending:
            # Room reserved for entries another thread of control writes:
            # nothing is merged meanwhile (pushes never meet a reservation).
            if self._new or self._raw_new:
                raise NativeTransferError("entries pushed to a LIFO with reserved room")
            return drained
        if not queued:
            return drained
        pieces = []
        if self.size and self._seen.count(0):
            raw = self._raw()
            if self._seen.count(1) == 0:
                pieces.append(raw)
            else:
                pieces.append(b"".join(raw[i * _ENTRY_SIZE:(i + 1) * _ENTRY_SIZE]
                                       for i in range(self.size) if not self._seen[i]))
        pieces += self._raw_new
        self._raw_new = []
        new, self._new = self._new, []
        # Highest slot first: the innermost frame (lowest slot) returns first.
        # Every piece is sorted; joined they are when each one starts below
        # where the previous one ended.
        ordered = not new and reorder is None and all(
            _first_slot(b) < _last_slot(a) for a, b in zip(pieces, pieces[1:]))
        if ordered:
            data = b"".join(pieces)
        else:
            keep = new
            for piece in pieces:
                w = memoryview(piece).cast("Q")
                keep += zip(w[0::4], w[1::4], w[2::4])
            keep.sort(key=lambda e: e[0], reverse=True)
            if reorder is not None:
                keep = list(reorder(keep))
            words = array.array("Q")
            for slot, ra, desc in keep:
                words.extend((slot, ra, desc, PENDING))
            data = words.tobytes()
        n = len(data) // _ENTRY_SIZE
        block = self.block
        if self._array is None or len(self._array) < n:
            self.size = 0             # the old entries are all in data
            self._reserve(n)
        if n:
            _memmove(self._array, data, len(data))
        block.top = n
        self.size = n
        self._seen = bytearray(n)
        return drained

    @property
    def pending(self):
        """Whether an entry may still be PENDING (or a push is waiting for commit)."""
        return len(self) > 0


_ENTRY_SIZE = ctypes.sizeof(LifoEntry)
#: memmove keeping the GIL (``ctypes.memmove`` gives it away, and a commit
#: runs while the world is stopped: it must not wait for another thread).
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_size_t)(ctypes._memmove_addr)
#: bytes.translate table: status low byte -> 1 unless PENDING.
_MOVED = bytes(0 if b == PENDING else 1 for b in range(256))


def _first_slot(raw):
    return int.from_bytes(raw[:8], "little")


def _last_slot(raw):
    return int.from_bytes(raw[-_ENTRY_SIZE:-_ENTRY_SIZE + 8], "little")
