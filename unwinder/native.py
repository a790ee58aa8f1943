"""Native fast path: unwind tables compiled to flat arrays, walked by LLVM-compiled code.

The Python walker (:mod:`unwinder.walk`) stays the reference; this module
compiles the same rows into a compact form and walks them with one native
function that needs no Python, no GIL and no allocation, so a park stub or a
signal handler can call it. The layering mirrors the rest of the package
(after the Linux kernel's ORC tables and Parca's flattened rows):

* **compile** (:class:`ModuleTable`): FDEs decoded by
  :func:`unwinder.rules.decode_fde` become rows ``(absolute pc start, 16-byte
  rule record)`` in two parallel sorted arrays. Addresses between FDEs get a
  *gap* row, so a pc there is "no unwind info"; a row the record cannot express
  (CFA or register expressions, ``DW_CFA_register``, ``DW_CFA_val_offset``,
  offsets that are not multiples of 8 bytes within ±1016) is flagged *python*
  and handed back to the Python walker. Equal adjacent records are merged.
  A module with an ``.eh_frame_hdr`` gets a *growing* table: its rows start
  *unknown*, and the FDE around a pc is compiled when a walk first reaches it
  (libc and libpython compiled whole take 0.2 s and 0.5 s here; a first walk
  through them compiles about 20 FDEs in under 2 ms).
* **walk** (``osrjit_native_walk``, hand-written LLVM IR in
  ``unwinder/native_walk.ll``, rendered and compiled once per process into its
  own LLJIT by :mod:`unwinder.native_code`; layouts and constants in
  :mod:`unwinder.native_abi`): module lookup by binary search over sorted module
  ranges, row lookup by binary search (with a last-hit hint), then one step::

      lookup_pc  = pc − 1 for a caller frame; pc for the innermost frame or the
                   caller of a signal frame (rule flag SIGNAL)
      cfa        = regs[rule.cfa_register] + rule.cfa_offset
      caller.r   = regs[r]                  code 0        (same value)
                   unknown                  code −128     (undefined)
                   *(cfa + 8·code)          otherwise     (saved at cfa + 8·code)
                   for r in RA, RBX, RBP, R12..R15
      caller.rsp = cfa
      ra_slot    = cfa + 8·code(RA)         when RA is saved on the stack

  and the Python walker's end tests in its order: CFA not increasing, return
  address undefined, return address 0. A return address equal to the deopt
  stub's address is translated through a sorted ``(slot, original)`` table.
* **API** (:class:`NativeWalker`): the native code stops with ``NO_TABLE``
  where a table is missing or unknown; Python compiles what is missing and
  resumes it. Tables are cached per module and dropped when the
  :class:`~unwinder.space.AddressSpace` loses the module. Whenever the native
  code cannot do a frame (expression row, gap, unknown CFA register, a read
  outside the stack bounds) the Python walker does that one frame
  (:func:`unwinder.step`) and the native walk resumes from its caller; such
  frames are counted in :attr:`NativeWalker.fallbacks`. So
  :meth:`NativeWalker.walk` returns the same frames as :func:`unwinder.walk`.

Memory: stack words are read directly from this process, and only inside the
caller-given stack bounds ``[lo, hi)`` (absolute, bytes); a read outside them
ends the native walk (``OUT_OF_BOUNDS``) instead of faulting. Code addresses of
the space's modules are only compared, never dereferenced, so a synthetic
:class:`~unwinder.space.AddressSpace` works as long as the stack is real
memory of this process.

Native ABI (x86-64 SysV; every integer is little-endian, every address absolute)::

    i64 osrjit_native_walk(const Tables *tables, const Translation *tr /* or NULL */,
                           WalkState *state, OutFrame *out, i64 max_frames,
                           u64 stack_lo, u64 stack_hi)

returns the number of frames written to ``out`` (at most ``max_frames``);
``state->end_reason`` says why it stopped. See :class:`WalkState`,
:class:`OutFrame`, :class:`TablesHeader`, :class:`ModuleEntry`,
:class:`RowTable`, :class:`RuleRecord` and :class:`TranslationHeader` for the
layouts (each checked with ``ctypes.sizeof``; the IR declares the same types).
The function only reads ``tables`` and ``tr``, reads stack memory inside the
bounds, writes ``state`` and ``out[0 .. max_frames)``, calls no function and uses
under 300 bytes of stack: it is async-signal-safe.
"""

import bisect
import collections
import contextlib
import ctypes
import itertools
import struct
import threading
import time
from array import array
from dataclasses import dataclass

from .errors import CFIError, ModuleError, NativeWalkerError, UnwindError
from .memory import ProcessMemory
from .modules import CodeObject, read_proc_maps
from .native_abi import (CARRIED_REGISTERS, FRAME_EXACT, FRAME_HAS_RA_SLOT, FRAME_SIGNAL,
                         FRAME_TRANSLATED, HANDOFF_END_REASONS, INFO_END_SHIFT, INFO_MODULE_SHIFT,
                         MAX_SLOT_CODE, RA_CARRIED, RULE_GAP, RULE_PYTHON, RULE_SIGNAL,
                         RULE_UNKNOWN, SAME_VALUE_CODE, SLOT_BYTES, STATE_EXACT, STATE_HAS_PREV,
                         STATE_TRANSLATED, TERMINAL_END_REASONS, UNDEFINED_CODE, WALK_REGISTERS,
                         EndReason, ModuleEntry, OutFrame, RowTable, RuleRecord, TablesHeader,
                         TranslationHeader, TranslationPair, WalkState)
from .native_code import NATIVE_WALK_TYPE, WALK_SYMBOL, NativeCode, native_walk_address, walker_ir
from .rules import RuleKind, decode_fde
from .space import AddressSpace
from .walk import (DEFAULT_MAX_FRAMES, END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO,
                   END_STEP_LIMIT, step)
from .x86_64 import RA, RSP

_MASK64 = (1 << 64) - 1


#: A :class:`RuleRecord` as bytes: flags, cfa_register, reserved, cfa_offset, codes[8].
_RECORD = struct.Struct("<BBHi8b")
_RECORD_BYTES = ctypes.sizeof(RuleRecord)
assert _RECORD.size == _RECORD_BYTES and RuleRecord.flags.offset == 0


@dataclass(frozen=True, slots=True)
class NativeRule:
    """A decoded :class:`RuleRecord`. ``flags``: RULE_* bits. ``cfa_register``:
    DWARF number; ``cfa_offset``: bytes. ``codes``: per :data:`CARRIED_REGISTERS`
    (7 entries): :data:`SAME_VALUE_CODE`, :data:`UNDEFINED_CODE`, or n for a
    value saved at ``cfa + 8·n``. Gap, python and unknown rules have all other
    fields 0."""
    flags: int
    cfa_register: int = 0
    cfa_offset: int = 0
    codes: tuple = (SAME_VALUE_CODE,) * len(CARRIED_REGISTERS)

    @property
    def is_gap(self):
        return bool(self.flags & RULE_GAP)

    @property
    def needs_python(self):
        return bool(self.flags & RULE_PYTHON)

    @property
    def is_unknown(self):
        return bool(self.flags & RULE_UNKNOWN)

    @property
    def ra_offset(self):
        """Bytes from the CFA to the return-address slot, or None if RA is not on the stack."""
        code = self.codes[RA_CARRIED]
        return None if code in (SAME_VALUE_CODE, UNDEFINED_CODE) else SLOT_BYTES * code


@dataclass(frozen=True, slots=True)
class TableRow:
    """``rule`` is in force from absolute address ``start`` up to the next row's start."""
    start: int
    rule: NativeRule


@dataclass(frozen=True, slots=True)
class TableStats:
    """What compiling one module's table cost and produced so far.

    ``growing``: the table compiles FDE regions as walks reach them (modules
    with a searchable ``.eh_frame_hdr``), else it was compiled whole.
    ``regions``: FDE selection regions compiled (whole tables: every one);
    ``fdes``: FDEs among them; ``source_rows``: rows the CFI interpreter
    produced (clipped to what the FDE lookup selects); ``rows``: rows in the
    native arrays after merging (gap and unknown rows included);
    ``python_rows`` / ``gap_rows``: rows with RULE_PYTHON / RULE_GAP;
    ``seconds``: wall time spent compiling; ``bytes``: size of the two arrays;
    ``errors``: CFI errors met (those ranges are RULE_PYTHON, so the Python
    walker raises them as :func:`unwinder.walk` would)."""
    growing: bool
    regions: int
    fdes: int
    source_rows: int
    rows: int
    python_rows: int
    gap_rows: int
    seconds: float
    bytes: int
    errors: tuple = ()


_NO_CODES = (SAME_VALUE_CODE,) * len(CARRIED_REGISTERS)
_GAP = (RULE_GAP, 0, 0, _NO_CODES)
_UNKNOWN = (RULE_UNKNOWN, 0, 0, _NO_CODES)
_PYTHON = (RULE_PYTHON, 0, 0, _NO_CODES)
_PYTHON_SIGNAL = (RULE_PYTHON | RULE_SIGNAL, 0, 0, _NO_CODES)
_CODE_OPS = {RuleKind.SAME_VALUE: SAME_VALUE_CODE, RuleKind.UNDEFINED: UNDEFINED_CODE}
_END = 1 << 64          # one past the last address


def encode_row(row, is_signal_frame=False):
    """The record tuple ``(flags, cfa_register, cfa_offset, codes)`` for an
    :class:`~unwinder.rules.UnwindRow` (see :class:`NativeRule`).

    Only the CFA and the :data:`CARRIED_REGISTERS` matter (the Python walker
    carries no other register to callers either); a rule for any other
    register is ignored. Anything not expressible sets RULE_PYTHON.
    """
    signal = RULE_SIGNAL if is_signal_frame else 0
    python = _PYTHON_SIGNAL if signal else _PYTHON
    cfa = row.cfa
    if (cfa.expression is not None or not 0 <= cfa.register < WALK_REGISTERS
            or not -(1 << 31) <= cfa.offset < (1 << 31)):
        return python
    codes = []
    by_reg = dict(row.regs)
    for reg in CARRIED_REGISTERS:
        rule = by_reg.get(reg)
        if rule is None:
            codes.append(SAME_VALUE_CODE)       # DEFAULT_RULE: same value
            continue
        code = _CODE_OPS.get(rule.kind)
        if code is None:
            if rule.kind is not RuleKind.OFFSET:
                return python                   # register / val_offset / expressions
            off = rule.offset
            if off % SLOT_BYTES or not 0 < abs(off) <= SLOT_BYTES * MAX_SLOT_CODE:
                return python                   # not a whole slot within ±1016 bytes
            code = off // 8
        codes.append(code)
    return (signal, cfa.register, cfa.offset, tuple(codes))


def module_eh_frame(module):
    """The :class:`~unwinder.cfi.EhFrame` of ``module`` (absolute addresses), or None.

    ElfModule has ``eh_frame()``; CodeObject keeps its section privately (a
    public accessor would be better there). Raises :class:`ModuleError` for
    other module types without an ``eh_frame()`` method.
    """
    get = getattr(module, "eh_frame", None)
    if callable(get):
        return get()
    if isinstance(module, CodeObject):
        return module._eh_frame
    raise ModuleError(f"{module!r}: cannot enumerate its FDEs (no eh_frame())")


def _fde_at_hdr_address(eh, loc, fde_address):
    """The FDE an ``.eh_frame_hdr`` entry names, or the :class:`CFIError`
    :meth:`EhFrame.find_fde` raises for it."""
    offset = fde_address - eh.address
    try:
        if not 0 <= offset < len(eh.data):
            raise CFIError(f".eh_frame_hdr entry for {loc:#x} points outside .eh_frame "
                           f"({fde_address:#x})", None)
        return eh.fde_at(offset)
    except CFIError as e:
        return e


def _fde_selection(eh):
    """``[(select_from, select_to, fde_or_error)]``: for pcs in ``[select_from,
    select_to)`` :meth:`EhFrame.find_fde` considers exactly that FDE (it still
    checks the FDE's own range). Mirrors find_fde: with a searchable
    ``.eh_frame_hdr`` the greatest table entry ≤ pc (the last of equal ones),
    else the sorted index of every FDE (the last of equal ``(pc_begin, pc_end)``)."""
    keys = []
    hdr = eh.hdr
    if hdr is not None and hdr.has_table:
        for i in range(len(hdr)):
            loc, fde_address = hdr.table_entry(i)
            if keys and loc < keys[-1][0]:
                raise CFIError(".eh_frame_hdr table is not sorted", None)
            item = _fde_at_hdr_address(eh, loc, fde_address)
            if keys and keys[-1][0] == loc:
                keys[-1] = (loc, item)           # the binary search lands on the last
            else:
                keys.append((loc, item))
    else:
        for fde in sorted(eh.fdes(), key=lambda f: (f.pc_begin, f.pc_end)):
            if keys and keys[-1][0] == fde.pc_begin:
                keys[-1] = (fde.pc_begin, fde)
            else:
                keys.append((fde.pc_begin, fde))
    return [(loc, keys[i + 1][0] if i + 1 < len(keys) else _END, item)
            for i, (loc, item) in enumerate(keys)]


def _hdr_region(eh, pc):
    """``(select_from, select_to, fde_or_error_or_None)`` of the one
    ``.eh_frame_hdr`` selection region containing ``pc`` (binary search over
    the table, as :meth:`EhFrameHdr.lookup`; None below the first entry)."""
    hdr = eh.hdr
    lo, hi = 0, len(hdr)
    while lo < hi:                  # upper bound: first entry whose location > pc
        mid = (lo + hi) >> 1
        if hdr.table_entry(mid)[0] <= pc:
            lo = mid + 1
        else:
            hi = mid
    select_to = hdr.table_entry(lo)[0] if lo < len(hdr) else _END
    if lo == 0:
        return 0, select_to, None
    loc, fde_address = hdr.table_entry(lo - 1)
    return loc, select_to, _fde_at_hdr_address(eh, loc, fde_address)


def _region_rows(select_from, select_to, item, cache, errors):
    """Rows ``[(start, end, record)]`` of one selection region (sorted; ranges
    no FDE covers are left out) and whether an FDE contributed."""
    if item is None:
        return [], False
    if isinstance(item, CFIError):
        errors.append(str(item))
        return [(select_from, select_to, _PYTHON)], False
    fde = item
    lo, hi = max(select_from, fde.pc_begin), min(select_to, fde.pc_end)
    if lo >= hi:
        return [], False
    signal = fde.cie.is_signal_frame
    try:
        table = decode_fde(fde)
    except CFIError as e:
        errors.append(str(e))
        return [(lo, hi, _PYTHON_SIGNAL if signal else _PYTHON)], True
    rows = []
    for row in table.rows:
        start, end = max(row.start, lo), min(row.end, hi)
        if start >= end:
            continue
        key = (row.cfa, row.regs, signal)
        record = cache.get(key)
        if record is None:
            record = cache[key] = encode_row(row, signal)
        rows.append((start, end, record))
    return rows, True


def _entries(rows, region_from, region_to):
    """Row starts and records ``[(start, record)]`` for sorted ``rows`` inside
    ``[region_from, region_to)``: a gap row wherever no row covers (up to
    ``region_to``), equal adjacent records merged."""
    entries = []
    at = region_from
    for start, end, record in rows:
        if start > at:
            entries.append((at, _GAP))
        if not entries or entries[-1][1] != record:
            entries.append((start, record))
        at = end
    if at < region_to and (not entries or entries[-1][1] != _GAP):
        entries.append((at, _GAP))
    return entries


def _pack(entries):
    return (array("Q", [s for s, _ in entries]),
            bytearray(b"".join(_RECORD.pack(flags, reg, 0, off, *codes, 0)
                               for _, (flags, reg, off, codes) in entries)))


class ModuleTable:
    """The compiled rows of one module, and the native :class:`RowTable` for them.

    Two kinds (see :func:`compile_module_table`, :meth:`growing`): *whole*
    (every FDE compiled at once) and *growing* (rows start as RULE_UNKNOWN
    and :meth:`grow` compiles the FDE selection region around a pc, as
    walks reach it). Rows are absolute and sorted; row i is in force on
    ``[start_i, start_i+1)``; the last row is a gap (whole) or unknown.

    Lifetime: every :meth:`grow` publishes a new immutable :class:`RowTable`
    (:attr:`block_address`); earlier ones are returned by :meth:`grow` so the
    owner can keep them alive while native code may still read them.
    """

    def __init__(self, module, entries, *, growing, eh=None, regions=0, fdes=0, source_rows=0,
                 seconds=0.0, errors=()):
        self.module = module
        self.growing = growing
        self._eh = eh
        self._starts, self._records = _pack(entries)
        self._regions = regions
        self._fdes = fdes
        self._source_rows = source_rows
        self._seconds = seconds
        self._errors = list(errors)
        self._cache = {}
        self._block = None
        self._publish()

    @classmethod
    def whole(cls, module):
        """Compile every FDE of ``module`` now (see :func:`compile_module_table`)."""
        t0 = time.perf_counter()
        errors = []
        cache = {}
        try:
            eh = module_eh_frame(module)
            selection = [] if eh is None else _fde_selection(eh)
        except (CFIError, ModuleError) as e:
            # The Python walker meets the same error at its first lookup here.
            return cls(module, [(0, _PYTHON)], growing=False, source_rows=1,
                       seconds=time.perf_counter() - t0, errors=[str(e)])
        rows, fdes = [], 0
        for select_from, select_to, item in selection:
            region, had_fde = _region_rows(select_from, select_to, item, cache, errors)
            rows += region
            fdes += had_fde
        # Below the first row the native search finds nothing: "no info" too.
        entries = _entries(rows, rows[0][0] if rows else 0, _END)
        return cls(module, entries, growing=False, regions=len(selection), fdes=fdes,
                   source_rows=len(rows), seconds=time.perf_counter() - t0, errors=errors)

    @classmethod
    def for_module(cls, module):
        """A growing table when ``module`` has a searchable ``.eh_frame_hdr``
        (nothing compiled yet), else a whole one."""
        try:
            eh = module_eh_frame(module)
        except (CFIError, ModuleError):
            eh = None
        if eh is not None and eh.hdr is not None and eh.hdr.has_table:
            return cls(module, [(0, _UNKNOWN)], growing=True, eh=eh)
        return cls.whole(module)

    # -- growing ----------------------------------------------------------------

    def grow(self, pc):
        """Compile the FDE selection region containing absolute ``pc`` if its
        rows are unknown. Returns the :class:`RowTable` objects this replaced
        (empty if nothing changed); the caller keeps them alive as long as
        native code may read them."""
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0 or not self._records[_RECORD_BYTES * i] & RULE_UNKNOWN:
            return []
        t0 = time.perf_counter()
        select_from, select_to, item = _hdr_region(self._eh, pc)
        rows, had_fde = _region_rows(select_from, select_to, item, self._cache, self._errors)
        # Replace unknown row i, which covers [unknown_from, unknown_to) ⊇ the region.
        unknown_from = self._starts[i]
        unknown_to = self._starts[i + 1] if i + 1 < len(self._starts) else _END
        new = [(unknown_from, _UNKNOWN)] if unknown_from < select_from else []
        new += _entries(rows, select_from, select_to)
        if select_to < unknown_to:
            new.append((select_to, _UNKNOWN))         # else row i + 1 starts there
        starts, records = _pack(new)
        self._starts[i:i + 1] = starts
        self._records[_RECORD_BYTES * i:_RECORD_BYTES * (i + 1)] = records
        self._regions += 1
        self._fdes += had_fde
        self._source_rows += len(rows)
        self._seconds += time.perf_counter() - t0
        return [self._publish()]

    def _publish(self):
        """Copy the rows into fresh native arrays and a new :class:`RowTable`;
        returns the previous ``(block, starts, records)`` owner tuple."""
        n = len(self._starts)
        starts = (ctypes.c_uint64 * n).from_buffer_copy(self._starts)
        records = (RuleRecord * n).from_buffer_copy(self._records)
        block = RowTable(ctypes.addressof(starts), ctypes.addressof(records), n, 0)
        old, self._block = self._block, (block, starts, records)
        return old

    # -- views ------------------------------------------------------------------

    @property
    def block_address(self):
        """Address of the current :class:`RowTable` (what :class:`ModuleEntry` points at)."""
        return ctypes.addressof(self._block[0])

    @property
    def n_rows(self):
        return len(self._starts)

    @property
    def stats(self):
        n = len(self._starts)
        flags = self._records[0::_RECORD_BYTES]
        return TableStats(
            growing=self.growing, regions=self._regions, fdes=self._fdes,
            source_rows=self._source_rows, rows=n,
            python_rows=sum(1 for f in flags if f & RULE_PYTHON),
            gap_rows=sum(1 for f in flags if f & RULE_GAP),
            seconds=self._seconds, bytes=n * (8 + ctypes.sizeof(RuleRecord)),
            errors=tuple(self._errors))

    def _rule(self, i):
        flags, reg, _reserved, off, *codes = _RECORD.unpack_from(self._records, _RECORD_BYTES * i)
        return NativeRule(flags, reg, off, tuple(codes[:len(CARRIED_REGISTERS)]))

    def rows(self):
        """Every row as a :class:`TableRow` (absolute starts)."""
        return [TableRow(self._starts[i], self._rule(i)) for i in range(len(self._starts))]

    def rule_for(self, pc):
        """The :class:`NativeRule` in force at absolute ``pc`` (the native code's
        search), or None below the first row."""
        i = bisect.bisect_right(self._starts, pc) - 1
        return None if i < 0 else self._rule(i)

    def __repr__(self):
        kind = "growing" if self.growing else "whole"
        return f"<ModuleTable {self.module.name} {kind}, {self.n_rows} rows>"


def compile_module_table(module):
    """Compile every FDE of ``module`` into a whole :class:`ModuleTable`.

    Uses the package's own CFI interpreter (:func:`unwinder.rules.decode_fde`),
    so rows equal what the Python walker applies. Adjacent rows with equal
    records merge (also across FDE boundaries); a gap row marks every range
    that no FDE covers, from each FDE's end to the next FDE's start and after
    the last one. Cost on this machine: libc.so.6 (3,713 FDEs) about 0.3 s,
    libpython3.11 (5,359 FDEs) about 0.5 s — which is why walks use growing
    tables (:meth:`ModuleTable.for_module`) unless :meth:`NativeWalker.prepare`
    asks for whole ones.
    """
    return ModuleTable.whole(module)




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


_TERMINAL = TERMINAL_END_REASONS
_HANDOFF = HANDOFF_END_REASONS
#: An :class:`OutFrame` as bytes: pc, cfa, ra_slot, info.
_OUT = struct.Struct("<4Q")
assert _OUT.size == ctypes.sizeof(OutFrame)
#: bytes.translate table: FRAME_* flag byte -> 1 if FRAME_TRANSLATED else 0.
_TRANSLATED_MARKS = bytes(1 if b & FRAME_TRANSLATED else 0 for b in range(256))


@dataclass(frozen=True, slots=True)
class NativeFrame:
    """One frame of a :meth:`NativeWalker.walk`.

    ``pc``: absolute; the return address for caller frames (after
    translation). ``cfa``: absolute canonical frame address, None when the
    Python walker could not compute it. ``ra_slot``: absolute address of the
    8-byte slot holding this frame's return address, or None. ``lookup_pc``:
    where the rule was looked up (``pc − 1`` for callers, ``pc`` for the
    innermost frame and callers of signal frames). ``stored_pc``: the raw
    slot value (the stub's address) when ``pc`` was translated, else None.
    ``native``: False when the Python walker did this frame (a fallback).
    ``fallback``: the Python walker's own fallback (``"frame-pointer"``,
    ``"jump-stub"``) on such frames. ``end_reason``: on the last frame only,
    worded as :mod:`unwinder.walk` words it.
    """
    pc: int
    cfa: int | None
    ra_slot: int | None
    index: int
    lookup_pc: int
    module_ref: object = None
    is_signal_frame: bool = False
    stored_pc: int | None = None
    end_reason: str | None = None
    native: bool = True
    fallback: str | None = None

    @property
    def translated(self):
        return self.stored_pc is not None

    @property
    def module(self):
        return None if self.module_ref is None else self.module_ref.name

    @property
    def symbol(self):
        if self.module_ref is None:
            return None
        hit = self.module_ref.symbolize(self.lookup_pc)
        return None if hit is None else hit[0]

    def __repr__(self):
        cfa = "?" if self.cfa is None else f"{self.cfa:#x}"
        how = "" if self.native else f" [python{': ' + self.fallback if self.fallback else ''}]"
        end = f" end: {self.end_reason}" if self.end_reason else ""
        return (f"NativeFrame(#{self.index} pc={self.pc:#x} cfa={cfa} "
                f"in {self.module or '?'}{how}{end})")


@dataclass(frozen=True, slots=True)
class FrameArrays:
    """A walk as columns: frame i is ``(pcs[i], cfas[i], ra_slots[i])``.

    Same meaning as the :class:`NativeFrame` fields (absolute addresses),
    except that ``ra_slots[i]`` is 0 when RA is not on the stack. ``cfas[i]``
    is None only on a last frame the Python walker could not unwind. ``translated``:
    indices of frames whose pc came from the translation table (their slot
    holds the stub). ``python``: indices of frames the Python walker did.
    ``end_reason``: the last frame's, worded as :mod:`unwinder.walk` words it.
    """
    pcs: tuple
    cfas: tuple
    ra_slots: tuple
    translated: frozenset
    python: tuple
    end_reason: str | None

    def __len__(self):
        return len(self.pcs)


def stack_bounds_of(address):
    """``(lo, hi)``: the mapping of this process that contains absolute
    ``address`` (from ``/proc/self/maps``), or ``(address, address)`` (empty)
    when it is in no readable mapping. Costs one read of the maps file."""
    for start, end, perms, _offset, _path in read_proc_maps():
        if start <= address < end:
            return (start, end) if perms.startswith("r") else (address, address)
    return address, address


class _Buffers(threading.local):
    """Per-thread state and output buffers (so walks on several threads never share)."""

    def __init__(self, frames):
        self.state = WalkState()
        self.out = (OutFrame * frames)()


class NativeWalker:
    """Walk this process's native stacks with compiled tables.

    ``space``: the :class:`AddressSpace` whose modules describe the code
    (default: :meth:`AddressSpace.current_process`). Stack memory is read from
    this process directly (see the module docstring).

    Tables: a module's table is made the first time a walk lands in it —
    growing (:meth:`ModuleTable.for_module`) for ELF modules with an
    ``.eh_frame_hdr``, so only the FDEs walks reach get compiled; whole for JIT
    code objects. :meth:`prepare` compiles whole tables up front, for native
    callers that cannot stop for Python. :attr:`compile_seconds` sums the cost.
    The walker notices removed modules through ``space.generation`` and added
    ones when a walk meets a pc of a module it does not know; either rebuilds
    the module index (:meth:`refresh`).

    For native callers: :attr:`entry_address` is ``osrjit_native_walk``,
    :attr:`tables_address` the :class:`TablesHeader` to pass it. Native code
    may read a header, module entries and row tables while Python replaces
    them (a refresh, a table that grows); replaced ones are freed only when no
    walk started through this object is inside native code and nobody holds a
    :meth:`pin`. A native caller that uses :attr:`tables_address` on its own
    (a park stub, a signal handler) must hold a pin for as long as it may.

    ``chunk_frames``: frames one native call may write (each thread gets an
    output buffer of that many 32-byte :class:`OutFrame`); longer walks take
    several calls.

    Thread-safe: walks may run on several threads at once.
    """

    def __init__(self, space=None, *, chunk_frames=4096):
        if not (isinstance(chunk_frames, int) and chunk_frames > 0):
            raise NativeWalkerError(f"chunk_frames must be a positive int, got {chunk_frames!r}")
        self.space = space if space is not None else AddressSpace.current_process()
        self._code = NativeCode.get()
        self._lock = threading.RLock()
        self._tables = {}          # id(module) -> ModuleTable
        self._retired = []         # replaced native objects, freed when nothing runs
        self._active = 0           # walks of this object inside native code
        self._pins = 0
        self._index = None         # (header, entries array, modules by entry, module ids)
        self._generation = None
        self._buffers = _Buffers(chunk_frames)
        self._closed = False
        #: Frames unwound by the Python walker instead (expression rows, gaps,
        #: unknown CFA registers, reads outside the stack bounds).
        self.fallbacks = 0
        #: :class:`EndReason` name -> number of such frames.
        self.fallback_reasons = collections.Counter()
        self.refresh()

    # -- tables ---------------------------------------------------------------

    @property
    def entry_address(self):
        """Absolute address of ``osrjit_native_walk``."""
        return self._code.address

    @property
    def tables_address(self):
        """Address of the current :class:`TablesHeader` (refreshed if the space changed)."""
        self._check_generation()
        return ctypes.addressof(self._index[0])

    @property
    def tables(self):
        """The :class:`ModuleTable` s made so far, by module (a snapshot dict)."""
        with self._lock:
            return {t.module: t for t in self._tables.values()}

    @property
    def compile_seconds(self):
        """Seconds spent compiling the current tables (sum of their ``stats.seconds``)."""
        with self._lock:
            return sum(t.stats.seconds for t in self._tables.values())

    def table_for(self, module, *, create=True):
        """The :class:`ModuleTable` of ``module`` (made now, growing when
        possible, if ``create``; else None when there is none yet)."""
        with self._lock:
            table = self._tables.get(id(module))
            if table is None and create:
                table = ModuleTable.for_module(module)
                self._install(module, table)
            return table

    def prepare(self, modules=None):
        """Compile whole tables for ``modules`` (default: every module of the
        space) now, so native callers never meet NO_TABLE. Returns the seconds
        spent. Modules loaded later still need a walk (or another call)."""
        self._check_generation()
        t0 = time.perf_counter()
        for m in (self.space.modules if modules is None else modules):
            with self._lock:
                table = self._tables.get(id(m))
                if table is None or table.growing:
                    self._install(m, ModuleTable.whole(m))
        return time.perf_counter() - t0

    def _install(self, module, table):
        """Make ``table`` the module's table and point its entries at it (lock held)."""
        old = self._tables.get(id(module))
        if old is not None:
            self._retire(old)
        self._tables[id(module)] = table
        self._point_entries(module, table)

    def _point_entries(self, module, table):
        _header, entries, modules, _ids = self._index
        address = table.block_address
        for i, m in enumerate(modules):
            if m is module:
                entries[i].table = address        # one 8-byte store per entry

    def _grow(self, module, pc):
        """Compile what the table of ``module`` lacks at absolute ``pc``; True
        if the native walk can now do that frame (lock held)."""
        table = self._tables.get(id(module))
        if table is None:
            table = ModuleTable.for_module(module)
            self._install(module, table)
        replaced = table.grow(pc)
        if replaced:
            self._retire(replaced)
            self._point_entries(module, table)
        rule = table.rule_for(pc)
        return rule is not None and not rule.is_unknown

    def _retire(self, obj):
        self._retired.append(obj)
        self._release_if_idle()

    def _release_if_idle(self):
        if not self._active and not self._pins and self._retired:
            self._retired.clear()

    def refresh(self):
        """Rebuild the module index from the space (tables are kept for modules
        still present; those of removed modules are retired)."""
        with self._lock:
            if self._closed:
                raise NativeWalkerError("the native walker is closed")
            generation = self.space.generation
            ranges = sorted(((start, end, m) for m in self.space.modules
                             for start, end in m.ranges), key=lambda r: r[0])
            entries = (ModuleEntry * max(len(ranges), 1))()
            modules = tuple(m for _, _, m in ranges)
            ids = {id(m) for m in modules}
            for i, (start, end, m) in enumerate(ranges):
                table = self._tables.get(id(m))
                entries[i] = ModuleEntry(start, end, table.block_address if table else None, i)
            header = TablesHeader(ctypes.addressof(entries), len(ranges), generation, 0)
            for key in [k for k in self._tables if k not in ids]:
                self._retired.append(self._tables.pop(key))
            if self._index is not None:
                self._retired.append(self._index)
            self._index = (header, entries, modules, ids)
            self._generation = generation
            self._release_if_idle()

    def _check_generation(self):
        if self._closed:
            raise NativeWalkerError("the native walker is closed")
        if self.space.generation != self._generation:
            self.refresh()

    @contextlib.contextmanager
    def pin(self):
        """Keep every header and table handed out so far alive while the
        ``with`` block runs (for native code that uses :attr:`tables_address`)."""
        with self._lock:
            self._pins += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pins -= 1
                self._release_if_idle()

    def close(self):
        """Stop walking and drop every table and index — once no walk of this
        object is inside native code and no pin is held (walks still running
        finish safely). Addresses obtained from this walker are invalid after
        that. The walker code itself stays (it belongs to the process)."""
        with self._lock:
            self._closed = True
            self._retired.extend(self._tables.values())
            self._tables.clear()
            if self._index is not None:
                self._retired.append(self._index)
            self._index = None
            self._release_if_idle()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- walking --------------------------------------------------------------

    def _call(self, state, out, max_frames, lo, hi, translation_arrays):
        """``osrjit_native_walk`` on the current index; ``(n, index used)``."""
        with self._lock:
            if self._closed:
                raise NativeWalkerError("the native walker is closed")
            self._active += 1
            index = self._index
        try:
            n = self._code.function(
                ctypes.addressof(index[0]),
                translation_arrays.address if translation_arrays is not None else None,
                ctypes.addressof(state), ctypes.addressof(out), max_frames, lo, hi)
        finally:
            with self._lock:
                self._active -= 1
                self._release_if_idle()
        return n, index

    def call_native(self, state, out, max_frames, stack_bounds, translation=None):
        """One call of ``osrjit_native_walk`` with this walker's tables: the raw
        path (no fallback, no compilation). ``state``: a :class:`WalkState`
        (in/out); ``out``: an array of at least ``max_frames`` :class:`OutFrame`;
        ``stack_bounds``: ``(lo, hi)`` absolute; ``translation``: a
        :class:`ReturnAddressTable` or None. Returns the number of frames written."""
        self._check_generation()
        lo, hi = _check_bounds(stack_bounds)
        if not isinstance(state, WalkState) or getattr(out, "_type_", None) is not OutFrame:
            raise NativeWalkerError("call_native needs a WalkState and an array of OutFrame")
        if not 0 <= max_frames <= len(out):
            raise NativeWalkerError(f"max_frames {max_frames} does not fit the output "
                                    f"array of {len(out)} frames")
        arrays = translation.snapshot() if translation is not None else None
        return self._call(state, out, max_frames, lo, hi, arrays)[0]

    def walk(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
             stack_bounds=None, translation=None):
        """Frames from a register state of this process, innermost first.

        ``regs``: DWARF register number -> value; needs RIP (16) and RSP (7),
        and the callee-saved registers for exact results (as :func:`unwinder.walk`).
        ``innermost_is_caller``: ``regs`` hold a return address (a state
        captured at a call, as :func:`unwinder.with_captured_registers` gives),
        so the first frame is looked up at ``pc − 1``. ``stack_bounds``:
        ``(lo, hi)`` absolute byte range the stack lies in; default: the
        mapping that contains RSP (one read of ``/proc/self/maps``).
        ``translation``: a :class:`ReturnAddressTable` applied to every return
        address read from a slot (the space's Python filters are not called;
        register the table's :meth:`~ReturnAddressTable.translate` with the
        space to make :func:`unwinder.walk` agree).

        Returns a list of :class:`NativeFrame`. Frames the native code cannot
        do are done by the Python walker and counted in :attr:`fallbacks`; the
        sequence equals :func:`unwinder.walk`'s. Raises :class:`UnwindError`
        for missing registers, :class:`NativeWalkerError` for bad bounds, and
        whatever the Python walker raises for corrupt CFI. Building the
        records costs about 1–2 µs per frame; :meth:`walk_arrays` returns the
        same walk as columns for a fraction of that.
        """
        frames = []
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        for seg in segments:
            if isinstance(seg, NativeFrame):
                frames.append(seg)
                continue
            raw, base, modules, stub = seg
            for i, (pc, cfa, slot, info) in enumerate(_OUT.iter_unpack(raw), base):
                frames.append(NativeFrame(
                    pc, cfa, slot if info & FRAME_HAS_RA_SLOT else None, i,
                    pc if info & FRAME_EXACT else (pc - 1) & _MASK64, modules[info >> INFO_MODULE_SHIFT],
                    bool(info & FRAME_SIGNAL), stub if info & FRAME_TRANSLATED else None,
                    _TERMINAL.get((info >> INFO_END_SHIFT) & 0xFF)))
        if limited and frames[-1].end_reason is None:
            last = frames[-1]
            frames[-1] = NativeFrame(last.pc, last.cfa, last.ra_slot, last.index, last.lookup_pc,
                                     last.module_ref, last.is_signal_frame, last.stored_pc,
                                     END_STEP_LIMIT, last.native, last.fallback)
        return frames

    def walk_arrays(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
                    stack_bounds=None, translation=None):
        """The walk of :meth:`walk` as :class:`FrameArrays`: columns sliced
        straight out of the native output, no per-frame Python objects."""
        pcs, cfas, slots, translated, python = [], [], [], [], []
        end = None
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        for seg in segments:
            if isinstance(seg, NativeFrame):
                python.append(len(pcs))
                if seg.stored_pc is not None:
                    translated.append(len(pcs))
                pcs.append(seg.pc)
                cfas.append(seg.cfa)
                slots.append(seg.ra_slot or 0)
                end = seg.end_reason
                continue
            raw, base, _modules, stub = seg
            words = memoryview(raw).cast("Q")
            pcs += words[0::4].tolist()
            cfas += words[1::4].tolist()
            slots += words[2::4].tolist()
            if stub is not None:
                # The low byte of each info word holds the FRAME_* flags: mark the
                # translated ones and find them without a per-frame loop.
                marks = raw[OutFrame.info.offset::_OUT.size].translate(_TRANSLATED_MARKS)
                translated += itertools.compress(range(base, base + len(marks)), marks)
            end = _TERMINAL.get((words[-1] >> INFO_END_SHIFT) & 0xFF)
        if limited and end is None:
            end = END_STEP_LIMIT
        return FrameArrays(tuple(pcs), tuple(cfas), tuple(slots), frozenset(translated),
                           tuple(python), end)

    def walk_raw(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
                 stack_bounds=None, translation=None):
        """The walk of :meth:`walk` as ``(raw, end_reason)`` when native code
        did every frame, else None (some frame needed the Python walker: use
        :meth:`walk` or :meth:`walk_arrays`, which give the whole answer).
        ``raw``: ``bytes`` of :class:`OutFrame` (32 bytes a frame, innermost
        first, absolute addresses); ``end_reason`` as in :class:`FrameArrays`."""
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        if any(isinstance(seg, NativeFrame) for seg in segments):
            return None
        raw = b"".join(seg[0] for seg in segments)
        end = None
        if raw:
            end = _TERMINAL.get((int.from_bytes(raw[-8:], "little") >> INFO_END_SHIFT) & 0xFF)
        if limited and end is None:
            end = END_STEP_LIMIT
        return raw, end

    def walk_out(self, regs, *, innermost_is_caller=False, stack_bounds, translation=None):
        """The walk of :meth:`walk_raw` without a copy, when one native call
        does it whole: ``(address, n, end_reason)`` with the ``n`` frames as
        :class:`OutFrame` at ``address`` (absolute) in this thread's output
        buffer of this walker — valid until this thread's next walk with it —,
        else None (a table to grow, a frame for the Python walker, more frames
        than the buffer holds: use :meth:`walk_raw`). ``stack_bounds``
        ``(lo, hi)`` is required. For the stop-the-world scan, where every
        microsecond of Python counts.
        """
        lo, hi, state, out = self._begin(regs, innermost_is_caller, stack_bounds)
        arrays = translation.snapshot() if translation is not None else None
        n, _index = self._call(state, out, len(out), lo, hi, arrays)
        if state.end_reason not in _TERMINAL or not n:
            return None
        return (ctypes.addressof(out), n,
                _TERMINAL.get((out[n - 1].info >> INFO_END_SHIFT) & 0xFF))

    def _begin(self, regs, innermost_is_caller, stack_bounds):
        """Check ``regs`` and ``stack_bounds``, refresh the tables if the space
        changed and load this thread's walk state: ``(lo, hi, state, out)``."""
        if RA not in regs or RSP not in regs:
            raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
        lo, hi = _check_bounds(stack_bounds)
        self._check_generation()
        buffers = self._buffers
        _load_state(buffers.state, regs, 0 if innermost_is_caller else STATE_EXACT, 0)
        return lo, hi, buffers.state, buffers.out

    def _segments(self, regs, max_frames, innermost_is_caller, stack_bounds, translation):
        """The core loop. Returns ``(segments, limited)``: each segment is
        ``(raw OutFrame bytes, index of its first frame, modules by entry, stub
        address)`` for frames the native code did, or a :class:`NativeFrame`
        the Python walker did; ``limited``: ``max_frames`` frames were produced
        and the last one has no end reason of its own."""
        if RA not in regs or RSP not in regs:
            raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
        if max_frames <= 0:
            return [], False
        if stack_bounds is None:
            stack_bounds = stack_bounds_of(regs[RSP] & _MASK64)
        lo, hi, state, out = self._begin(regs, innermost_is_caller, stack_bounds)
        # One snapshot for the whole walk: native and Python steps translate alike.
        arrays = translation.snapshot() if translation is not None else None
        stub = translation.stub_address if translation is not None else None
        segments = []
        count = 0
        memory = None
        original = regs        # the caller's own dict serves a first Python step
        stored_pc = None       # raw slot value of the current frame after a Python step
        while True:
            n, index = self._call(state, out, min(max_frames - count, len(out)), lo, hi, arrays)
            if n:
                segments.append((ctypes.string_at(ctypes.addressof(out), n * _OUT.size),
                                 count, index[2], stub))
                count += n
                original = stored_pc = None
            reason = EndReason(state.end_reason)
            if reason in _TERMINAL:
                return segments, False
            if reason is EndReason.MAX_FRAMES:
                if count >= max_frames:
                    return segments, True
                continue
            if reason is EndReason.NO_TABLE:
                pc = state.regs[RA]
                lookup = pc if state.flags & STATE_EXACT else (pc - 1) & _MASK64
                with self._lock:
                    if self._index is index and self._grow(index[2][state.end_module], lookup):
                        continue
                # The index changed meanwhile, or the table cannot say: do
                # this frame in Python.
                reason = EndReason.NEEDS_PYTHON
            if reason not in _HANDOFF:
                raise NativeWalkerError(f"native walk returned {reason!r}")
            # The Python walker does one frame; the native walk resumes at its caller.
            if memory is None:
                # Uncached: a failed read names the exact address, as in walk().
                memory = ProcessMemory()
            frame, caller = self._python_step(state, original, reason, memory, count,
                                              stored_pc, stub)
            segments.append(frame)
            count += 1
            original = stored_pc = None
            if frame.end_reason is not None:
                return segments, False
            if count >= max_frames:
                return segments, True
            raw_ra = caller[RA]
            if arrays is not None and frame.ra_slot is not None:
                pc = arrays.translate(frame.ra_slot, raw_ra)
                if pc != raw_ra:
                    caller = {**caller, RA: pc}
                    stored_pc = raw_ra
            _load_state(state, caller,
                        (STATE_EXACT if frame.is_signal_frame else 0)
                        | (STATE_TRANSLATED if stored_pc is not None else 0) | STATE_HAS_PREV,
                        frame.cfa)
            if frame.module_ref is not None and id(frame.module_ref) not in self._index[3]:
                self.refresh()    # a module the space found after our index was built

    def _python_step(self, state, original, reason, memory, index, stored_pc, stub):
        """One frame by :func:`unwinder.step` from ``state``; returns ``(NativeFrame, caller)``."""
        if original is not None:
            regs = dict(original)
        else:
            known = state.known
            regs = {r: state.regs[r] for r in range(WALK_REGISTERS) if known >> r & 1}
        exact = bool(state.flags & STATE_EXACT)
        frame, caller = step(regs, memory, self.space, caller_frame=not exact)
        end = frame.end_reason
        if (state.flags & STATE_HAS_PREV and frame.cfa is not None
                and frame.cfa <= state.prev_cfa and end in (None, END_RA_UNDEFINED, END_RA_ZERO)):
            # walk() tests the CFA before the return address; step() cannot.
            end, caller = END_CFA_NOT_INCREASING, None
        if stored_pc is None and state.flags & STATE_TRANSLATED:
            stored_pc = stub    # the native code translated this frame's pc
        with self._lock:
            self.fallbacks += 1
            self.fallback_reasons[reason.name] += 1
        return NativeFrame(frame.pc, frame.cfa, frame.ra_slot, index, frame.lookup_pc,
                           frame.module_ref, frame.is_signal_frame, stored_pc, end,
                           native=False, fallback=frame.fallback), caller

    def __repr__(self):
        n = len(self._index[2]) if self._index else 0
        return f"<NativeWalker {n} ranges, {len(self._tables)} tables, {self.fallbacks} fallbacks>"


def _check_bounds(bounds):
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise NativeWalkerError(f"stack bounds must be (lo, hi), got {bounds!r}") from None
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= _MASK64):
        raise NativeWalkerError(f"bad stack bounds ({lo!r}, {hi!r}): need 0 <= lo <= hi < 2**64")
    return lo, hi


def _load_state(state, regs, flags, prev_cfa):
    """Fill ``state`` from ``regs`` (DWARF number -> value; keys outside 0..16 ignored)."""
    keys = tuple(regs)
    known = _KNOWN_BITS.get(keys)
    if known is None:
        known = sum(1 << r for r in keys if isinstance(r, int) and 0 <= r < WALK_REGISTERS)
        if len(_KNOWN_BITS) < 64:
            _KNOWN_BITS[keys] = known
    # One pack into the structure's buffer (a walk starts in a stopped world:
    # ctypes field assignments cost several times as much).
    values = list(map(regs.get, _REGISTER_NUMBERS, _NO_VALUES))
    try:
        _STATE_HEAD.pack_into(state, 0, *values, known, flags, prev_cfa)
    except struct.error:        # a value outside 0 .. 2**64 - 1: keep its low 64 bits
        _STATE_HEAD.pack_into(state, 0, *[v & _MASK64 for v in values], known, flags,
                              prev_cfa & _MASK64)


#: ``tuple(regs)`` -> bit mask of the DWARF numbers 0..16 in it (key sets repeat).
_KNOWN_BITS = {}
#: WalkState.regs, known, flags, prev_cfa.
_STATE_HEAD = struct.Struct(f"<{WALK_REGISTERS + 3}Q")
assert _STATE_HEAD.size == WalkState.end_reason.offset
_REGISTER_NUMBERS = range(WALK_REGISTERS)
_NO_VALUES = (0,) * WALK_REGISTERS


def state_from_regs(regs, *, innermost_is_caller=False):
    """A fresh :class:`WalkState` for ``regs`` (DWARF number -> value), for
    :meth:`NativeWalker.call_native`."""
    if RA not in regs or RSP not in regs:
        raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
    state = WalkState()
    _load_state(state, regs, 0 if innermost_is_caller else STATE_EXACT, 0)
    return state


__all__ = [
    "NativeWalker", "NativeFrame", "FrameArrays", "NativeWalkerError", "ReturnAddressTable",
    "TranslationArrays", "EndReason", "RowTable", "RULE_GAP", "RULE_PYTHON", "RULE_SIGNAL",
    "RULE_UNKNOWN",
    "compile_module_table", "encode_row", "ModuleTable", "NativeRule", "TableRow", "TableStats",
    "WalkState", "OutFrame", "RuleRecord", "ModuleEntry", "TablesHeader", "TranslationHeader",
    "NATIVE_WALK_TYPE", "CARRIED_REGISTERS", "native_walk_address", "walker_ir",
    "state_from_regs", "stack_bounds_of", "module_eh_frame",
]
