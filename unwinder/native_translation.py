"""Return-address translation: hijacked slots as the native walker sees them.

A stub's address written into a return-address slot (the deopt stub, or a
per-site stub of :mod:`deopt.sitestubs`) hides the caller's real return
address; :class:`ReturnAddressTable` records ``slot → original`` (absolute
addresses), and :class:`TranslationArrays` is one
immutable native copy of it: a :class:`~unwinder.native_abi.TranslationHeader`
and the :class:`~unwinder.native_abi.TranslationPair` array it points to,
sorted by slot, which ``osrjit_native_walk`` binary-searches whenever it reads
an address among the stubs from a slot. The same table serves the Python walker as a
return-address filter (:meth:`ReturnAddressTable.translate`), so both walkers
see the same frames.
"""
import ctypes
import threading
from array import array

from .errors import NativeWalkerError
from .native_abi import TranslationHeader, TranslationPair

__all__ = ["ReturnAddressTable", "TranslationArrays"]

_MASK64 = (1 << 64) - 1


class TranslationArrays:
    """One immutable native version of a :class:`ReturnAddressTable`: the
    :class:`TranslationHeader` at :attr:`address` and the :class:`TranslationPair`
    array (sorted by slot) it points to, alive as long as this object.

    ``stub_range``: ``[start, end)`` (absolute) holding every stub address a
    hijacked slot may hold; ``stub_of(original) -> address | None``: the stub
    written over the return address ``original`` (None: the deopt stub)."""

    def __init__(self, stub_address, mapping, stub_range=None, stub_of=None):
        flat = array("Q")
        for slot in sorted(mapping):
            flat.append(slot)
            flat.append(mapping[slot])
        n = len(mapping)
        self.stub_address = stub_address
        self.stub_range = stub_range or (stub_address, stub_address + 1)
        self.mapping = dict(mapping)
        self.stub_of = stub_of
        # At least one pair, so that the header always points at memory.
        self.pairs = (TranslationPair * max(n, 1)).from_buffer_copy(
            flat.tobytes() if n else bytes(ctypes.sizeof(TranslationPair)))
        self.header = TranslationHeader(self.stub_range[0], ctypes.addressof(self.pairs), n,
                                        self.stub_range[1])
        self.address = ctypes.addressof(self.header)

    def translate(self, slot, value):
        """What the native code does with ``value`` read from ``slot``."""
        start, end = self.stub_range
        if start <= value < end:
            return self.mapping.get(slot, value)
        return value

    def stored(self, slot):
        """The stub address a translated ``slot`` held."""
        original = self.mapping.get(slot)
        stub = None
        if original is not None and self.stub_of is not None:
            stub = self.stub_of(original)
        return self.stub_address if stub is None else stub


class ReturnAddressTable:
    """Hijacked return-address slots, mirrored in a native sorted array.

    ``stub_address``: the absolute address of the deopt stub. ``stub_of(original)
    -> address | None``: the stub hijacking writes over the return address
    ``original``, if not the deopt stub (it names the raw slot values of
    translated frames).
    :meth:`add_stub_range` / :meth:`remove_stub_range` declare the code of
    further stubs hijacking writes (the per-site stubs of
    :mod:`deopt.sitestubs`); a slot value inside none of them is never
    translated. :meth:`set` / :meth:`discard` record ``slot → original return
    address`` (absolute addresses). :meth:`translate` is a return-address
    filter for :meth:`AddressSpace.add_return_address_filter` with the same
    meaning, so :func:`unwinder.walk` and :class:`NativeWalker` see the same
    frames.

    Lifetime: :meth:`snapshot` builds the native arrays for the current pairs
    (once per change) and keeps them until the next change; a native caller
    holds the :class:`TranslationArrays` it got for as long as it uses
    :attr:`TranslationArrays.address`.
    """

    def __init__(self, stub_address, pairs=None, stub_of=None):
        if not (isinstance(stub_address, int) and 0 < stub_address <= _MASK64):
            raise NativeWalkerError(f"bad stub address {stub_address!r}")
        self.stub_address = stub_address
        self._map = {}
        self._stub_of = stub_of
        self._ranges = {}             # (start, end) -> count
        self._hull = (stub_address, stub_address + 1)
        self._lock = threading.Lock()
        self._arrays = None
        for slot, original in (pairs or {}).items():
            self.set(slot, original)

    def __len__(self):
        return len(self._map)

    def add_stub_range(self, start, end):
        """Stubs live in ``[start, end)`` (absolute) until :meth:`remove_stub_range`."""
        if not (isinstance(start, int) and isinstance(end, int) and 0 < start < end <= _MASK64):
            raise NativeWalkerError(f"bad stub range {start!r}, {end!r}")
        with self._lock:
            self._ranges[(start, end)] = self._ranges.get((start, end), 0) + 1
            self._rehull()

    def remove_stub_range(self, start, end):
        """Forget one :meth:`add_stub_range` of ``[start, end)`` (no error if absent)."""
        with self._lock:
            count = self._ranges.pop((start, end), 0)
            if count > 1:
                self._ranges[(start, end)] = count - 1
            self._rehull()

    def _rehull(self):
        """The smallest range holding the stub and every stub range (lock held)."""
        starts = [self.stub_address] + [s for s, _ in self._ranges]
        ends = [self.stub_address + 1] + [e for _, e in self._ranges]
        hull = (min(starts), max(ends))
        if hull != self._hull:
            self._hull = hull
            self._arrays = None

    @property
    def stub_range(self):
        """``[start, end)``: every address a hijacked slot may hold lies in it."""
        return self._hull

    def set(self, slot, original):
        """Record that ``slot`` (absolute) holds a stub and originally held ``original``."""
        if not all(isinstance(v, int) and 0 <= v <= _MASK64 for v in (slot, original)):
            raise NativeWalkerError(f"slot and return address must be 64-bit addresses, "
                                    f"got {slot!r}, {original!r}")
        with self._lock:
            self._map[slot] = original
            self._arrays = None

    def update(self, slots, originals):
        """:meth:`set` for each pair of the sequences ``slots`` / ``originals``
        (``array('Q')`` or lists of ints; absolute addresses)."""
        if len(slots) != len(originals):
            raise NativeWalkerError("update() needs as many return addresses as slots")
        if not len(slots):
            return
        for seq in (slots, originals):
            if getattr(seq, "typecode", None) != "Q" and not all(
                    isinstance(v, int) and 0 <= v <= _MASK64 for v in seq):
                raise NativeWalkerError("slots and return addresses must be 64-bit addresses")
        with self._lock:
            self._map.update(zip(slots, originals))
            self._arrays = None

    def discard(self, slot):
        """Forget ``slot`` (no error if absent)."""
        with self._lock:
            if self._map.pop(slot, None) is not None:
                self._arrays = None

    def translate(self, slot, value):
        """Return-address filter: the original return address of a hijacked slot."""
        start, end = self._hull
        if start <= value < end:
            return self._map.get(slot, value)
        return value

    def snapshot(self):
        """The :class:`TranslationArrays` of the current pairs."""
        with self._lock:
            if self._arrays is None:
                self._arrays = TranslationArrays(self.stub_address, self._map, self._hull,
                                                 self._stub_of)
            return self._arrays
