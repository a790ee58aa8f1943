"""Return-address hijacking: the table of rewritten slots and the stack pass.

A *pending return* is a frame of an old version suspended at a site, whose
return address (in its callee's ``ra_slot``) has been replaced by the deopt
stub's address. The :class:`HijackTable` owns every such slot: it remembers
the original return address and the frame map that describes the frame
there, it is the only code that writes the stub into a slot, and it gives the
slot back (:meth:`HijackTable.take`) exactly once, to the transfer running on
the thread whose callee just returned into the stub. HotSpot keeps the
original pc of a deoptimized frame the same way; CoreCLR's return-address
hijacking keeps one per thread.

Lifetime: a record lives from :meth:`HijackTable.hijack` (or
:meth:`HijackTable.add_batch`) until the frame's callee returns into the stub
(:meth:`take` / :meth:`take_many`). Nothing else may remove it, and the memory
of the version it names must stay mapped until then.

A stop-the-world that hijacks thousands of frames adds them as one
:class:`HijackBatch` (arrays, no object per slot); a :class:`HijackRecord` is
made for a batch entry only when someone asks for it (:meth:`HijackTable.get`,
:meth:`~HijackTable.take`, :meth:`~HijackTable.records`).
"""
import bisect
import collections
import itertools
import threading
from dataclasses import dataclass, field

from .errors import HijackError


@dataclass(eq=False)
class HijackRecord:
    """One pending return.

    ``slot``: absolute address of the 8-byte return-address slot.
    ``original_ra``: the absolute return address it held (into the old code).
    ``frame_map``: the old version's :class:`~deopt.framemaps.FrameMap` at
    ``original_ra``. ``owner``: opaque token of the old version (the runtime's
    ``Version``) for accounting. ``thread``: ident of the thread whose stack
    holds the slot.
    """
    slot: int
    original_ra: int
    frame_map: object
    owner: object
    thread: int = field(default_factory=threading.get_ident)


class HijackBatch:
    """Slots of one thread hijacked together, as arrays.

    ``slots``: absolute slot addresses, strictly rising (``array('Q')``);
    ``ras``: the original return address of each (``array('Q')``);
    ``kinds``: per slot an index into ``meta`` (``array('Q')``); ``meta``:
    ``[(frame map, owner)]`` — what a :class:`HijackRecord` of that kind
    holds; ``thread``: ident of the thread whose stack holds the slots;
    ``kind_counts``: ``{kind: number of entries}`` if the caller has it
    (else counted here).
    Entries leave (:meth:`HijackTable.take`) one by one; :attr:`live` counts
    those still pending.
    """

    __slots__ = ("slots", "ras", "kinds", "meta", "thread", "gone", "live", "by_owner")

    def __init__(self, slots, ras, kinds, meta, thread, kind_counts=None):
        if not (len(slots) == len(ras) == len(kinds)):
            raise HijackError("a hijack batch needs as many return addresses and kinds as slots")
        self.slots, self.ras, self.kinds, self.meta = slots, ras, kinds, meta
        self.thread = thread
        self.gone = bytearray(len(slots))
        self.live = len(slots)
        if kind_counts is None:                 # {kind: entries}, when the caller knows them
            kind_counts = collections.Counter(kinds)
        #: owner -> entries of it still pending
        self.by_owner = {}
        for k, c in kind_counts.items():
            if c:
                owner = meta[k][1]
                self.by_owner[owner] = self.by_owner.get(owner, 0) + c

    def index(self, slot):
        """Index of the pending entry for ``slot``, or -1."""
        i = bisect.bisect_left(self.slots, slot)
        if i < len(self.slots) and self.slots[i] == slot and not self.gone[i]:
            return i
        return -1

    def record(self, i):
        fm, owner = self.meta[self.kinds[i]]
        return HijackRecord(self.slots[i], self.ras[i], fm, owner, self.thread)

    def remove(self, i):
        """Mark entry ``i`` taken; returns its owner."""
        self.gone[i] = 1
        self.live -= 1
        owner = self.meta[self.kinds[i]][1]
        self.by_owner[owner] -= 1
        return owner

    def pending(self):
        """Indices of the entries still pending."""
        return [i for i, g in enumerate(self.gone) if not g]


class HijackTable:
    """Every hijacked slot, keyed by absolute slot address.

    ``stub_address``: the deopt stub (:data:`deopt.stub.STUB_SYMBOL`).
    ``site_stubs``: a :class:`deopt.sitestubs.SiteStubIndex`; a return
    address with a per-site stub there gets that stub written into its slot
    instead of the deopt stub. Register
    :meth:`translate` with :meth:`unwinder.AddressSpace.add_return_address_filter`
    so walks see the original return addresses.
    """

    def __init__(self, stub_address, site_stubs=None):
        self.stub_address = stub_address
        self.site_stubs = site_stubs
        self._records = {}
        self._batches = []            # HijackBatch with live entries
        self._unmirrored = []         # batches not yet given to the mirror
        #: Held by every method. A caller that has written the stub into
        #: slots it records only later (:meth:`add_batch`) holds it from before
        #: the first of those slots can be returned through, so a transfer's
        #: :meth:`take` waits for the record instead of missing it. Reentrant.
        self.lock = self._lock = threading.RLock()
        #: Count of records ever created (hijacks) and taken (returns into the stub).
        self.hijacks = 0
        self.taken = 0
        #: Optional ``set(slot, original_ra)`` / ``discard(slot)`` object kept
        #: in step with the records (e.g. an :class:`unwinder.ReturnAddressTable`
        #: that a native walker reads), updated under the table's lock.
        self.mirror = None

    def __len__(self):
        return len(self._records) + sum(b.live for b in self._batches)

    def _find(self, slot):
        """``(batch, index)`` of a pending batch entry for ``slot``, or None (lock held)."""
        for b in self._batches:
            i = b.index(slot)
            if i >= 0:
                return b, i
        return None

    def get(self, slot):
        """The record for ``slot``, or None."""
        with self._lock:
            record = self._records.get(slot)
            if record is None and self._batches:
                found = self._find(slot)
                if found is not None:
                    record = found[0].record(found[1])
            return record

    def records(self):
        """A snapshot list of the pending records."""
        with self._lock:
            out = list(self._records.values())
            for b in self._batches:
                out.extend(b.record(i) for i in b.pending())
            return out

    def pending_for(self, owner):
        """Number of pending returns into ``owner``."""
        with self._lock:
            return (sum(1 for r in self._records.values() if r.owner is owner)
                    + sum(b.by_owner.get(owner, 0) for b in self._batches))

    def stub_for(self, original_ra):
        """The address :meth:`hijack` writes over ``original_ra``."""
        stub = self.site_stubs.stub_of(original_ra) if self.site_stubs is not None else None
        return self.stub_address if stub is None else stub

    def translate(self, slot, value):
        """Return-address filter: the original return address of a hijacked slot."""
        if value == self.stub_address or (self.site_stubs is not None
                                          and self.site_stubs.return_of(value) is not None):
            record = self._records.get(slot)
            if record is not None:
                return record.original_ra
            if self._batches:
                with self._lock:
                    found = self._find(slot)
                    if found is not None:
                        return found[0].ras[found[1]]
        return value

    def add_batch(self, batch):
        """Record a :class:`HijackBatch` whose slots the caller has written
        the stub into (none of them is in the table; see :attr:`lock`).
        The mirror learns them at the next :meth:`flush_mirror`."""
        with self._lock:
            if batch.live:
                self._batches.append(batch)
                self._unmirrored.append(batch)
                self.hijacks += batch.live

    def flush_mirror(self):
        """Give the mirror the batch entries still pending (call before it is read)."""
        with self._lock:
            batches, self._unmirrored = self._unmirrored, []
            if self.mirror is None:
                return
            for b in batches:
                if b.live == len(b.slots):
                    self.mirror.update(b.slots, b.ras)
                elif b.live:
                    keep = [not g for g in b.gone]
                    self.mirror.update(list(itertools.compress(b.slots, keep)),
                                       list(itertools.compress(b.ras, keep)))

    def hijack(self, slot, original_ra, frame_map, owner, memory, thread=None):
        """Write the stub of ``original_ra`` (:meth:`stub_for`) into ``slot``
        (via ``memory.write_u64``) and record it.

        The slot must still hold ``original_ra`` (read back first); a slot
        already in the table raises :class:`HijackError` — a frame is never
        hijacked twice (chained versions retarget at transfer time instead).
        ``thread``: ident of the thread whose stack holds the slot (default:
        the calling thread).
        """
        with self._lock:
            if slot in self._records or (self._batches and self._find(slot) is not None):
                raise HijackError(f"slot {slot:#x} is already hijacked")
            current = memory.read_u64(slot)
            if current != original_ra:
                raise HijackError(f"slot {slot:#x} holds {current:#x}, expected the return "
                                  f"address {original_ra:#x}")
            record = HijackRecord(slot, original_ra, frame_map, owner,
                                  threading.get_ident() if thread is None else thread)
            memory.write_u64(slot, self.stub_for(original_ra))
            self._records[slot] = record
            if self.mirror is not None:
                self.mirror.set(slot, original_ra)
            self.hijacks += 1
            return record

    def take(self, slot):
        """Remove and return the record of ``slot`` (the stub returned through it).

        Raises :class:`HijackError` if there is none: the stub was entered
        through a slot nobody hijacked, which is a bug in the caller.
        """
        with self._lock:
            return self._pop(slot, True)

    def take_many(self, slots):
        """:meth:`take` for every slot of ``slots`` (returned through the stub),
        without making records; returns ``{owner: count}``. Raises
        :class:`HijackError` (having taken the ones before it) for a slot with
        no record."""
        out = {}
        with self._lock:
            for slot in slots:
                owner = self._pop(slot, False)
                out[owner] = out.get(owner, 0) + 1
        return out

    def _pop(self, slot, want_record):
        """Remove the pending return of ``slot`` (lock held); its
        :class:`HijackRecord` if ``want_record``, else only its owner."""
        record = self._records.pop(slot, None)
        if record is not None:
            out = record if want_record else record.owner
        else:
            found = self._find(slot) if self._batches else None
            if found is None:
                raise HijackError(f"the deopt stub was entered through slot {slot:#x}, "
                                  "which has no hijack record")
            b, i = found
            out = b.record(i) if want_record else None
            owner = b.remove(i)
            if not want_record:
                out = owner
            if not b.live:
                self._batches.remove(b)
        if self.mirror is not None:
            self.mirror.discard(slot)
        self.taken += 1
        return out
