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

Lifetime: a record lives from :meth:`HijackTable.hijack` until the frame's
callee returns into the stub (:meth:`take`). Nothing else may remove it, and
the memory of the version it names must stay mapped until then.
"""
import threading
from dataclasses import dataclass, field

from .errors import DeoptError


class HijackError(DeoptError):
    """A slot could not be hijacked, or a stub return has no record."""


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


class HijackTable:
    """Every hijacked slot of one stub, keyed by absolute slot address.

    ``stub_address``: the value written into hijacked slots. Register
    :meth:`translate` with :meth:`unwinder.AddressSpace.add_return_address_filter`
    so walks see the original return addresses.
    """

    def __init__(self, stub_address):
        self.stub_address = stub_address
        self._records = {}
        self._lock = threading.Lock()
        #: Count of records ever created (hijacks) and taken (returns into the stub).
        self.hijacks = 0
        self.taken = 0
        #: Optional ``set(slot, original_ra)`` / ``discard(slot)`` object kept
        #: in step with the records (e.g. an :class:`unwinder.ReturnAddressTable`
        #: that a native walker reads), updated under the table's lock.
        self.mirror = None

    def __len__(self):
        return len(self._records)

    def get(self, slot):
        """The record for ``slot``, or None."""
        return self._records.get(slot)

    def records(self):
        """A snapshot list of the pending records."""
        with self._lock:
            return list(self._records.values())

    def pending_for(self, owner):
        """Number of pending returns into ``owner``."""
        with self._lock:
            return sum(1 for r in self._records.values() if r.owner is owner)

    def translate(self, slot, value):
        """Return-address filter: the original return address of a hijacked slot."""
        if value == self.stub_address:
            record = self._records.get(slot)
            if record is not None:
                return record.original_ra
        return value

    def hijack(self, slot, original_ra, frame_map, owner, memory, thread=None):
        """Write the stub into ``slot`` (via ``memory.write_u64``) and record it.

        The slot must still hold ``original_ra`` (read back first); a slot
        already in the table raises :class:`HijackError` — a frame is never
        hijacked twice (chained versions retarget at transfer time instead).
        ``thread``: ident of the thread whose stack holds the slot (default:
        the calling thread).
        """
        with self._lock:
            if slot in self._records:
                raise HijackError(f"slot {slot:#x} is already hijacked")
            current = memory.read_u64(slot)
            if current != original_ra:
                raise HijackError(f"slot {slot:#x} holds {current:#x}, expected the return "
                                  f"address {original_ra:#x}")
            record = HijackRecord(slot, original_ra, frame_map, owner,
                                  threading.get_ident() if thread is None else thread)
            memory.write_u64(slot, self.stub_address)
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
            record = self._records.pop(slot, None)
            if record is None:
                raise HijackError(f"the deopt stub was entered through slot {slot:#x}, "
                                  "which has no hijack record")
            if self.mirror is not None:
                self.mirror.discard(slot)
            self.taken += 1
            return record
