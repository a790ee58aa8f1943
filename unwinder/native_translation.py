"""Return-address translation: hijacked slots as the native walker sees them.

A deopt stub's address written into a return-address slot hides the caller's
real return address; :class:`ReturnAddressTable` records ``slot → original``
(absolute addresses) for one stub, and :class:`TranslationArrays` is one
immutable native copy of it: a :class:`~unwinder.native_abi.TranslationHeader`
and the :class:`~unwinder.native_abi.TranslationPair` array it points to,
sorted by slot, which ``osrjit_native_walk`` binary-searches whenever it reads
the stub's address from a slot. The same table serves the Python walker as a
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
    array (sorted by slot) it points to, alive as long as this object."""

    def __init__(self, stub_address, mapping):
        flat = array("Q")
        for slot in sorted(mapping):
            flat.append(slot)
            flat.append(mapping[slot])
        n = len(mapping)
        self.stub_address = stub_address
        self.mapping = dict(mapping)
        # At least one pair, so that the header always points at memory.
        self.pairs = (TranslationPair * max(n, 1)).from_buffer_copy(
            flat.tobytes() if n else bytes(ctypes.sizeof(TranslationPair)))
        self.header = TranslationHeader(stub_address, ctypes.addressof(self.pairs), n)
        self.address = ctypes.addressof(self.header)

    def translate(self, slot, value):
        """What the native code does with ``value`` read from ``slot``."""
        if value == self.stub_address:
            return self.mapping.get(slot, value)
        return value


class ReturnAddressTable:
    """Hijacked return-address slots for one stub, mirrored in a native sorted array.

    ``stub_address``: the absolute address written into hijacked slots.
    :meth:`set` / :meth:`discard` record ``slot → original return address``
    (absolute addresses). :meth:`translate` is a return-address filter for
    :meth:`AddressSpace.add_return_address_filter` with the same meaning, so
    :func:`unwinder.walk` and :class:`NativeWalker` see the same frames.

    Lifetime: :meth:`snapshot` builds the native arrays for the current pairs
    (once per change) and keeps them until the next :meth:`set` /
    :meth:`discard`; a native caller holds the :class:`TranslationArrays` it
    got for as long as it uses :attr:`TranslationArrays.address`.
    """

    def __init__(self, stub_address, pairs=None):
        if not (isinstance(stub_address, int) and 0 < stub_address <= _MASK64):
            raise NativeWalkerError(f"bad stub address {stub_address!r}")
        self.stub_address = stub_address
        self._map = {}
        self._lock = threading.Lock()
        self._arrays = None
        for slot, original in (pairs or {}).items():
            self.set(slot, original)

    def __len__(self):
        return len(self._map)

    def set(self, slot, original):
        """Record that ``slot`` (absolute) holds the stub and originally held ``original``."""
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
        if value == self.stub_address:
            return self._map.get(slot, value)
        return value

    def snapshot(self):
        """The :class:`TranslationArrays` of the current pairs."""
        with self._lock:
            if self._arrays is None:
                self._arrays = TranslationArrays(self.stub_address, self._map)
            return self._arrays
