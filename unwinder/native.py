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
* **walk** (``osrjit_native_walk``, LLVM IR below, compiled once per process
  into its own LLJIT): module lookup by binary search over sorted module
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
import enum
import io
import itertools
import struct
import threading
import time
from array import array
from dataclasses import dataclass

from .errors import CFIError, ModuleError, UnwindError
from .memory import ProcessMemory
from .modules import CodeObject, read_proc_maps
from .rules import RuleKind, decode_fde
from .space import AddressSpace
from .walk import (DEFAULT_MAX_FRAMES, END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO,
                   END_STEP_LIMIT, step)
from .x86_64 import RA, RBP, RBX, R12, R13, R14, R15, RSP

_MASK64 = (1 << 64) - 1


class NativeWalkerError(UnwindError):
    """The native walker could not be built or was used wrongly (bad bounds, closed walker)."""


# --------------------------------------------------------------------------
# Record layouts (must match the LLVM types in _IR_HEAD)
# --------------------------------------------------------------------------

#: Registers whose caller values a rule record describes, in record slot order
#: (DWARF numbers): the return address, then the callee-saved registers.
CARRIED_REGISTERS = (RA, RBX, RBP, R12, R13, R14, R15)

#: Rule flag: no FDE covers this range ("no unwind info").
RULE_GAP = 0x01
#: Rule flag: the row needs the Python walker (expression, or a rule the
#: record cannot express).
RULE_PYTHON = 0x02
#: Rule flag: the FDE's CIE has augmentation 'S' (a signal frame); its caller
#: is looked up at its exact pc.
RULE_SIGNAL = 0x04
#: Rule flag: not compiled yet (a growing table): the walk stops with NO_TABLE
#: so that Python compiles the FDE there and resumes.
RULE_UNKNOWN = 0x08

#: Register code "same value": ``caller.r = callee.r``.
SAME_VALUE_CODE = 0
#: Register code "undefined": the caller's value is unrecoverable.
UNDEFINED_CODE = -128
#: Largest ``|code|`` of a stack slot: offsets within ±127·8 = ±1016 bytes of the CFA.
MAX_SLOT_CODE = 127


class RuleRecord(ctypes.Structure):
    """One compiled row, 16 bytes::

        u8  flags          RULE_GAP | RULE_PYTHON | RULE_SIGNAL | RULE_UNKNOWN
        u8  cfa_register   DWARF register number 0..16
        u16 reserved
        i32 cfa_offset     bytes: cfa = regs[cfa_register] + cfa_offset
        i8  codes[8]       per CARRIED_REGISTERS slot (8th unused): 0 same value,
                           −128 undefined, n: saved at cfa + 8·n
    """
    _fields_ = [("flags", ctypes.c_uint8), ("cfa_register", ctypes.c_uint8),
                ("reserved", ctypes.c_uint16), ("cfa_offset", ctypes.c_int32),
                ("codes", ctypes.c_int8 * 8)]


class RowTable(ctypes.Structure):
    """One immutable version of a module's rows, 32 bytes: ``starts`` points at
    ``n_rows`` u64 absolute row starts (sorted), ``rules`` at ``n_rows``
    :class:`RuleRecord`; row i is in force on ``[starts[i], starts[i+1])``."""
    _fields_ = [("starts", ctypes.c_void_p), ("rules", ctypes.c_void_p),
                ("n_rows", ctypes.c_uint64), ("reserved", ctypes.c_uint64)]


class ModuleEntry(ctypes.Structure):
    """One executable range of a module, 32 bytes. ``start``/``end``: absolute,
    half-open. ``table``: the module's current :class:`RowTable`, swapped with
    one 8-byte store when the table grows (NULL = none yet: the walk stops
    with ``NO_TABLE``). ``module_id``: caller's tag (the entry's index)."""
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("table", ctypes.c_void_p), ("module_id", ctypes.c_uint64)]


class TablesHeader(ctypes.Structure):
    """The walker's view of an address space, 32 bytes: ``modules`` points at
    ``n_modules`` :class:`ModuleEntry` sorted by ``start`` (non-overlapping)."""
    _fields_ = [("modules", ctypes.c_void_p), ("n_modules", ctypes.c_uint64),
                ("generation", ctypes.c_uint64), ("reserved", ctypes.c_uint64)]


class TranslationHeader(ctypes.Structure):
    """Return-address translation, 24 bytes: a return address equal to
    ``stub_address`` read from slot ``s`` becomes ``original`` when the pair
    ``(s, original)`` is among the ``n_pairs`` u64 pairs at ``pairs`` (sorted by slot)."""
    _fields_ = [("stub_address", ctypes.c_uint64), ("pairs", ctypes.c_void_p),
                ("n_pairs", ctypes.c_uint64)]


class WalkState(ctypes.Structure):
    """The frame the walk is at (in and out), 176 bytes.

    ``regs[r]``: value of DWARF register r (0..16; ``regs[16]`` is the pc)
    where bit r of ``known`` is set. ``flags``: STATE_EXACT (look the pc up as
    is), STATE_TRANSLATED (the pc came from the translation table),
    STATE_HAS_PREV (``prev_cfa`` is the CFA of the previous frame). Out:
    ``end_reason`` (:class:`EndReason`) and ``end_module`` (entry index where
    the walk stopped, −1 if none). After a stop that emitted no frame for it
    (NO_INFO, NO_TABLE, NEEDS_PYTHON, OUT_OF_BOUNDS, CFA_REGISTER_UNKNOWN) and
    after MAX_FRAMES the state is the next frame to do, so a walk can resume.
    """
    _fields_ = [("regs", ctypes.c_uint64 * 17), ("known", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("prev_cfa", ctypes.c_uint64),
                ("end_reason", ctypes.c_uint64), ("end_module", ctypes.c_int64)]


assert WalkState.known.offset == 136 and WalkState.prev_cfa.offset == 152

class OutFrame(ctypes.Structure):
    """One frame the walker produced, 32 bytes: ``pc`` (absolute), ``cfa``,
    ``ra_slot`` (0 when RA is not saved on the stack) and ``info``: bits 0–7
    FRAME_* flags, bits 8–15 the :class:`EndReason` of the last frame, bits
    32–63 the :class:`ModuleEntry` index of the module."""
    _fields_ = [("pc", ctypes.c_uint64), ("cfa", ctypes.c_uint64),
                ("ra_slot", ctypes.c_uint64), ("info", ctypes.c_uint64)]


for _cls, _size in ((RuleRecord, 16), (RowTable, 32), (ModuleEntry, 32), (TablesHeader, 32),
                    (TranslationHeader, 24), (WalkState, 176), (OutFrame, 32)):
    assert ctypes.sizeof(_cls) == _size, (_cls, ctypes.sizeof(_cls))

STATE_EXACT = 1
STATE_TRANSLATED = 2
STATE_HAS_PREV = 4

FRAME_SIGNAL = 1        # the frame's own FDE is a signal frame ('S')
FRAME_TRANSLATED = 2    # pc came from the translation table (the slot held the stub)
FRAME_EXACT = 4         # looked up at pc, not pc − 1
FRAME_HAS_RA_SLOT = 8   # ra_slot is valid

_RECORD = struct.Struct("<BBHi8b")
#: bytes.translate table: flag byte -> 1 if FRAME_TRANSLATED else 0.
_TRANSLATED_MARKS = bytes(1 if b & 2 else 0 for b in range(256))
_OUT = struct.Struct("<4Q")
assert _RECORD.size == 16 and _OUT.size == 32


class EndReason(enum.IntEnum):
    """Why ``osrjit_native_walk`` returned."""
    NONE = 0
    #: The caller's return address is undefined (outermost frame). Frame emitted.
    RA_UNDEFINED = 1
    #: The caller's return address is 0. Frame emitted.
    RA_ZERO = 2
    #: This frame's CFA is not above the previous one. Frame emitted.
    CFA_NOT_INCREASING = 3
    #: ``max_frames`` frames written; the state is the next frame.
    MAX_FRAMES = 4
    #: The lookup pc is in no module, or in a gap between FDEs. No frame emitted.
    NO_INFO = 5
    #: The row needs the Python walker (expression etc.). No frame emitted.
    NEEDS_PYTHON = 6
    #: A CFA or stack read fell outside ``[stack_lo, stack_hi)``. No frame emitted.
    OUT_OF_BOUNDS = 7
    #: The CFA register's value is not known in this frame. No frame emitted.
    CFA_REGISTER_UNKNOWN = 8
    #: The module has no table yet, or the row is RULE_UNKNOWN (``end_module``
    #: says which module). No frame emitted.
    NO_TABLE = 9


#: End reasons the native walk reports on a frame it emitted, as the Python
#: walker words them.
_TERMINAL = {EndReason.RA_UNDEFINED: END_RA_UNDEFINED, EndReason.RA_ZERO: END_RA_ZERO,
             EndReason.CFA_NOT_INCREASING: END_CFA_NOT_INCREASING}
_HANDOFF = frozenset((EndReason.NO_INFO, EndReason.NEEDS_PYTHON, EndReason.OUT_OF_BOUNDS,
                      EndReason.CFA_REGISTER_UNKNOWN))


# --------------------------------------------------------------------------
# Compile: FDE rows -> (start, record) arrays
# --------------------------------------------------------------------------

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
    codes: tuple = (0,) * 7

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
        code = self.codes[0]
        return None if code in (SAME_VALUE_CODE, UNDEFINED_CODE) else 8 * code


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


_GAP = (RULE_GAP, 0, 0, (0,) * 7)
_UNKNOWN = (RULE_UNKNOWN, 0, 0, (0,) * 7)
_PYTHON = (RULE_PYTHON, 0, 0, (0,) * 7)
_PYTHON_SIGNAL = (RULE_PYTHON | RULE_SIGNAL, 0, 0, (0,) * 7)
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
    if (cfa.expression is not None or not 0 <= cfa.register <= 16
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
            if off % 8 or not 0 < abs(off) <= 8 * MAX_SLOT_CODE:
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
        if i < 0 or not self._records[16 * i] & RULE_UNKNOWN:
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
        self._records[16 * i:16 * (i + 1)] = records
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
        flags = self._records[0::16]
        return TableStats(
            growing=self.growing, regions=self._regions, fdes=self._fdes,
            source_rows=self._source_rows, rows=n,
            python_rows=sum(1 for f in flags if f & RULE_PYTHON),
            gap_rows=sum(1 for f in flags if f & RULE_GAP),
            seconds=self._seconds, bytes=n * (8 + ctypes.sizeof(RuleRecord)),
            errors=tuple(self._errors))

    def _rule(self, i):
        flags, reg, _reserved, off, *codes = _RECORD.unpack_from(self._records, 16 * i)
        return NativeRule(flags, reg, off, tuple(codes[:7]))

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


# --------------------------------------------------------------------------
# The walker, in LLVM IR
# --------------------------------------------------------------------------

_IR_HEAD = r"""
%Rule = type { i8, i8, i16, i32, [8 x i8] }
%RowTable = type { ptr, ptr, i64, i64 }
%ModuleEntry = type { i64, i64, ptr, i64 }
%Tables = type { ptr, i64, i64, i64 }
%Translation = type { i64, ptr, i64 }
%State = type { [17 x i64], i64, i64, i64, i64, i64 }
%OutFrame = type { i64, i64, i64, i64 }

declare void @llvm.memcpy.inline.p0.p0.i64(ptr, ptr, i64, i1)

; i64 osrjit_native_walk(tables, translation or null, state, out, max_frames, stack_lo, stack_hi)
; Locals live in allocas; mem2reg/SROA turns them into SSA values.
define i64 @osrjit_native_walk(ptr %tables, ptr %tr, ptr %state, ptr %out, i64 %max,
                               i64 %lo, i64 %hi) nounwind uwtable {
entry:
  %regs = alloca [17 x i64], align 8
  %n.v = alloca i64, align 8
  %known.v = alloca i64, align 8
  %flags.v = alloca i64, align 8
  %prev.v = alloca i64, align 8
  %mhint.v = alloca i64, align 8
  %rhint.v = alloca i64, align 8
  %reason.v = alloca i64, align 8
  %endmod.v = alloca i64, align 8
  %mi.v = alloca i64, align 8
  %j.v = alloca i64, align 8
  %a.v = alloca i64, align 8
  %b.v = alloca i64, align 8
  %reason.e = alloca i64, align 8
  call void @llvm.memcpy.inline.p0.p0.i64(ptr align 8 %regs, ptr align 8 %state, i64 136, i1 false)
  %known.p = getelementptr inbounds %State, ptr %state, i64 0, i32 1
  %known0 = load i64, ptr %known.p, align 8
  store i64 %known0, ptr %known.v, align 8
  %flags.p = getelementptr inbounds %State, ptr %state, i64 0, i32 2
  %flags0 = load i64, ptr %flags.p, align 8
  store i64 %flags0, ptr %flags.v, align 8
  %prev.p = getelementptr inbounds %State, ptr %state, i64 0, i32 3
  %prev0 = load i64, ptr %prev.p, align 8
  store i64 %prev0, ptr %prev.v, align 8
  store i64 0, ptr %n.v, align 8
  store i64 0, ptr %mhint.v, align 8
  store i64 0, ptr %rhint.v, align 8
  store i64 -1, ptr %endmod.v, align 8
  store i64 0, ptr %reason.v, align 8
  %mods = load ptr, ptr %tables, align 8
  %nmods.p = getelementptr inbounds %Tables, ptr %tables, i64 0, i32 1
  %nmods = load i64, ptr %nmods.p, align 8
  %has.tr = icmp ne ptr %tr, null
  br i1 %has.tr, label %tr.load, label %tr.none

tr.load:
  %stub.l = load i64, ptr %tr, align 8
  %pairs.pp = getelementptr inbounds %Translation, ptr %tr, i64 0, i32 1
  %pairs.l = load ptr, ptr %pairs.pp, align 8
  %npairs.p = getelementptr inbounds %Translation, ptr %tr, i64 0, i32 2
  %npairs.l = load i64, ptr %npairs.p, align 8
  br label %args

tr.none:
  br label %args

args:
  %stub = phi i64 [ %stub.l, %tr.load ], [ 0, %tr.none ]
  %pairs = phi ptr [ %pairs.l, %tr.load ], [ null, %tr.none ]
  %npairs = phi i64 [ %npairs.l, %tr.load ], [ 0, %tr.none ]
  ; span = hi − lo bytes; a read of 8 bytes at a is allowed iff a − lo <= span − 8
  ; (unsigned), a CFA c iff c − lo <= span.
  %span = sub i64 %hi, %lo
  %rdlimit = sub i64 %span, 8
  %inverted = icmp ult i64 %hi, %lo
  %tiny = icmp ult i64 %span, 8
  %nobounds = or i1 %inverted, %tiny
  br i1 %nobounds, label %end.oob, label %args.max

args.max:
  %nomax = icmp sle i64 %max, 0
  br i1 %nomax, label %end.max, label %args.mods

args.mods:
  %nomods = icmp eq i64 %nmods, 0
  br i1 %nomods, label %end.noinfo, label %loop

; ---- one frame per iteration ------------------------------------------------
loop:
  %pc.p = getelementptr inbounds [17 x i64], ptr %regs, i64 0, i64 16
  %pc = load i64, ptr %pc.p, align 8
  %flags = load i64, ptr %flags.v, align 8
  %known = load i64, ptr %known.v, align 8
  %exact.b = and i64 %flags, 1
  %exact = icmp ne i64 %exact.b, 0
  %pcm1 = add i64 %pc, -1
  ; lookup_pc = pc for the innermost/signal-interrupted frame, pc − 1 for a caller
  %lookup = select i1 %exact, i64 %pc, i64 %pcm1
  %mh = load i64, ptr %mhint.v, align 8
  %hm.start.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mh, i32 0
  %hm.start = load i64, ptr %hm.start.p, align 8
  %hm.end.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mh, i32 1
  %hm.end = load i64, ptr %hm.end.p, align 8
  %hm.size = sub i64 %hm.end, %hm.start
  %hm.rel = sub i64 %lookup, %hm.start
  %hm.in = icmp ult i64 %hm.rel, %hm.size
  br i1 %hm.in, label %mod.hit, label %mod.search

mod.hit:
  store i64 %mh, ptr %mi.v, align 8
  br label %mod.found

; upper_bound over module starts: first index whose start > lookup
mod.search:
  store i64 0, ptr %a.v, align 8
  store i64 %nmods, ptr %b.v, align 8
  br label %ms.cond

ms.cond:
  %ms.a = load i64, ptr %a.v, align 8
  %ms.b = load i64, ptr %b.v, align 8
  %ms.more = icmp ult i64 %ms.a, %ms.b
  br i1 %ms.more, label %ms.body, label %ms.done

ms.body:
  %ms.sum = add i64 %ms.a, %ms.b
  %ms.mid = lshr i64 %ms.sum, 1
  %ms.start.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %ms.mid, i32 0
  %ms.start = load i64, ptr %ms.start.p, align 8
  %ms.le = icmp ule i64 %ms.start, %lookup
  %ms.mid1 = add i64 %ms.mid, 1
  %ms.a2 = select i1 %ms.le, i64 %ms.mid1, i64 %ms.a
  %ms.b2 = select i1 %ms.le, i64 %ms.b, i64 %ms.mid
  store i64 %ms.a2, ptr %a.v, align 8
  store i64 %ms.b2, ptr %b.v, align 8
  br label %ms.cond

ms.done:
  %ms.none = icmp eq i64 %ms.a, 0
  br i1 %ms.none, label %end.noinfo, label %ms.check

ms.check:
  %ms.i = add i64 %ms.a, -1
  %ms.end.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %ms.i, i32 1
  %ms.end = load i64, ptr %ms.end.p, align 8
  %ms.in = icmp ult i64 %lookup, %ms.end
  br i1 %ms.in, label %ms.ok, label %end.noinfo

ms.ok:
  store i64 %ms.i, ptr %mi.v, align 8
  br label %mod.found

mod.found:
  %mi = load i64, ptr %mi.v, align 8
  store i64 %mi, ptr %endmod.v, align 8
  ; the module's current RowTable: one pointer, swapped whole when it grows
  %tbl.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mi, i32 2
  %tbl = load atomic ptr, ptr %tbl.p acquire, align 8
  %notable = icmp eq ptr %tbl, null
  br i1 %notable, label %end.notable, label %mod.rows

mod.rows:
  %starts = load ptr, ptr %tbl, align 8
  %rules.p = getelementptr inbounds %RowTable, ptr %tbl, i64 0, i32 1
  %rules = load ptr, ptr %rules.p, align 8
  %nrows.p = getelementptr inbounds %RowTable, ptr %tbl, i64 0, i32 2
  %nrows = load i64, ptr %nrows.p, align 8
  %same.mod = icmp eq i64 %mi, %mh
  br i1 %same.mod, label %rh.idx, label %row.search

; last-hit hint: starts[rh] <= lookup < starts[rh + 1] (or rh is the last row)
rh.idx:
  %rh = load i64, ptr %rhint.v, align 8
  %rh.ok = icmp ult i64 %rh, %nrows
  br i1 %rh.ok, label %rh.lo, label %row.search

rh.lo:
  %rh.s0.p = getelementptr inbounds i64, ptr %starts, i64 %rh
  %rh.s0 = load i64, ptr %rh.s0.p, align 8
  %rh.le = icmp ule i64 %rh.s0, %lookup
  br i1 %rh.le, label %rh.hi, label %row.search

rh.hi:
  %rh1 = add i64 %rh, 1
  %rh.last = icmp eq i64 %rh1, %nrows
  br i1 %rh.last, label %rh.hit, label %rh.next

rh.next:
  %rh.s1.p = getelementptr inbounds i64, ptr %starts, i64 %rh1
  %rh.s1 = load i64, ptr %rh.s1.p, align 8
  %rh.lt = icmp ult i64 %lookup, %rh.s1
  br i1 %rh.lt, label %rh.hit, label %row.search

rh.hit:
  store i64 %rh, ptr %j.v, align 8
  br label %row.found

; upper_bound over row starts
row.search:
  store i64 0, ptr %a.v, align 8
  store i64 %nrows, ptr %b.v, align 8
  br label %rs.cond

rs.cond:
  %rs.a = load i64, ptr %a.v, align 8
  %rs.b = load i64, ptr %b.v, align 8
  %rs.more = icmp ult i64 %rs.a, %rs.b
  br i1 %rs.more, label %rs.body, label %rs.done

rs.body:
  %rs.sum = add i64 %rs.a, %rs.b
  %rs.mid = lshr i64 %rs.sum, 1
  %rs.start.p = getelementptr inbounds i64, ptr %starts, i64 %rs.mid
  %rs.start = load i64, ptr %rs.start.p, align 8
  %rs.le = icmp ule i64 %rs.start, %lookup
  %rs.mid1 = add i64 %rs.mid, 1
  %rs.a2 = select i1 %rs.le, i64 %rs.mid1, i64 %rs.a
  %rs.b2 = select i1 %rs.le, i64 %rs.b, i64 %rs.mid
  store i64 %rs.a2, ptr %a.v, align 8
  store i64 %rs.b2, ptr %b.v, align 8
  br label %rs.cond

rs.done:
  %rs.none = icmp eq i64 %rs.a, 0
  br i1 %rs.none, label %end.noinfo, label %rs.ok

rs.ok:
  %rs.j = add i64 %rs.a, -1
  store i64 %rs.j, ptr %j.v, align 8
  br label %row.found

row.found:
  %j = load i64, ptr %j.v, align 8
  store i64 %mi, ptr %mhint.v, align 8
  store i64 %j, ptr %rhint.v, align 8
  %rule = getelementptr inbounds %Rule, ptr %rules, i64 %j
  %rflags8 = load i8, ptr %rule, align 1
  %rflags = zext i8 %rflags8 to i64
  ; GAP | PYTHON | UNKNOWN: the native code cannot do this frame
  %special.b = and i64 %rflags, 11
  %special = icmp ne i64 %special.b, 0
  br i1 %special, label %rule.gap, label %rule.cfa

rule.gap:
  %gap.b = and i64 %rflags, 1
  %gap = icmp ne i64 %gap.b, 0
  br i1 %gap, label %end.noinfo, label %rule.unknown

rule.unknown:
  %unk.b = and i64 %rflags, 8
  %unk = icmp ne i64 %unk.b, 0
  br i1 %unk, label %end.notable, label %end.python

rule.cfa:
  %creg.p = getelementptr inbounds %Rule, ptr %rule, i64 0, i32 1
  %creg8 = load i8, ptr %creg.p, align 1
  %creg = zext i8 %creg8 to i64
  %creg.bad = icmp ugt i64 %creg, 16
  br i1 %creg.bad, label %end.python, label %rule.cfa.known

rule.cfa.known:
  %cbit.s = lshr i64 %known, %creg
  %cbit = and i64 %cbit.s, 1
  %cunknown = icmp eq i64 %cbit, 0
  br i1 %cunknown, label %end.cfaunknown, label %rule.cfa.value

rule.cfa.value:
  %cbase.p = getelementptr inbounds [17 x i64], ptr %regs, i64 0, i64 %creg
  %cbase = load i64, ptr %cbase.p, align 8
  %coff.p = getelementptr inbounds %Rule, ptr %rule, i64 0, i32 3
  %coff32 = load i32, ptr %coff.p, align 4
  %coff = sext i32 %coff32 to i64
  ; cfa = regs[cfa_register] + cfa_offset
  %cfa = add i64 %cbase, %coff
  %cfa.rel = sub i64 %cfa, %lo
  %cfa.in = icmp ule i64 %cfa.rel, %span
  br i1 %cfa.in, label %r0.begin, label %end.oob
"""

_IR_REGISTER = r"""
; ---- caller's DWARF register {d} (record code slot {k}) ----
r{k}.begin:
  %c{k}.p = getelementptr inbounds %Rule, ptr %rule, i64 0, i32 4, i64 {k}
  %c{k} = load i8, ptr %c{k}.p, align 1
  %c{k}.same = icmp eq i8 %c{k}, 0
  br i1 %c{k}.same, label %r{k}.same, label %r{k}.notsame

r{k}.same:
  ; code 0: caller.r = callee.r (known iff known in the callee)
  %old{k}.p = getelementptr inbounds [17 x i64], ptr %regs, i64 0, i64 {d}
  %old{k} = load i64, ptr %old{k}.p, align 8
  %oldbit{k}.s = lshr i64 %known, {d}
  %oldbit{k} = and i64 %oldbit{k}.s, 1
  br label %r{k}.done

r{k}.notsame:
  %c{k}.undef = icmp eq i8 %c{k}, -128
  br i1 %c{k}.undef, label %r{k}.done, label %r{k}.load

r{k}.load:
  ; code n: caller.r = *(cfa + 8·n), if the 8 bytes lie in [lo, hi)
  %off{k}.s = sext i8 %c{k} to i64
  %off{k} = shl i64 %off{k}.s, 3
  %addr{k} = add i64 %cfa, %off{k}
  %rel{k} = sub i64 %addr{k}, %lo
  %ok{k} = icmp ule i64 %rel{k}, %rdlimit
  br i1 %ok{k}, label %r{k}.read, label %end.oob

r{k}.read:
  %ap{k} = inttoptr i64 %addr{k} to ptr
  %ld{k} = load i64, ptr %ap{k}, align 1
  br label %r{k}.done

r{k}.done:
  %v{k} = phi i64 [ %old{k}, %r{k}.same ], [ 0, %r{k}.notsame ], [ %ld{k}, %r{k}.read ]
  %bit{k} = phi i64 [ %oldbit{k}, %r{k}.same ], [ 0, %r{k}.notsame ], [ 1, %r{k}.read ]
  %slot{k} = phi i64 [ 0, %r{k}.same ], [ 0, %r{k}.notsame ], [ %addr{k}, %r{k}.read ]
  %isload{k} = phi i64 [ 0, %r{k}.same ], [ 0, %r{k}.notsame ], [ 1, %r{k}.read ]
  br label %{next}
"""

_IR_TAIL = r"""
; ---- every read succeeded: emit the frame, then the Python walker's end tests
frame:
  %n = load i64, ptr %n.v, align 8
  %sig.b = lshr i64 %rflags, 2
  %sig = and i64 %sig.b, 1
  %trn = and i64 %flags, 2
  %exact.i = shl i64 %exact.b, 2
  %hasslot = shl i64 %isload0, 3
  %mod.bits = shl i64 %mi, 32
  %info1 = or i64 %sig, %trn
  %info2 = or i64 %info1, %exact.i
  %info3 = or i64 %info2, %hasslot
  %info = or i64 %info3, %mod.bits
  %o.pc = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 0
  store i64 %pc, ptr %o.pc, align 8
  %o.cfa = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 1
  store i64 %cfa, ptr %o.cfa, align 8
  %o.slot = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 2
  store i64 %slot0, ptr %o.slot, align 8
  %o.info = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 3
  store i64 %info, ptr %o.info, align 8
  %prev = load i64, ptr %prev.v, align 8
  %hasprev.b = and i64 %flags, 4
  %hasprev = icmp ne i64 %hasprev.b, 0
  %notabove = icmp ule i64 %cfa, %prev
  %notinc = and i1 %hasprev, %notabove
  br i1 %notinc, label %end.notinc, label %t.raundef

t.raundef:
  %raundef = icmp eq i64 %bit0, 0
  br i1 %raundef, label %end.raundef, label %t.razero

t.razero:
  %razero = icmp eq i64 %v0, 0
  br i1 %razero, label %end.razero, label %t.stub

; a return address equal to the stub, read from a slot: binary-search the slot
t.stub:
  %isstub = icmp eq i64 %v0, %stub
  %fromslot = icmp ne i64 %isload0, 0
  %trytr = and i1 %isstub, %fromslot
  br i1 %trytr, label %ts.start, label %commit

ts.start:
  store i64 0, ptr %a.v, align 8
  store i64 %npairs, ptr %b.v, align 8
  br label %ts.cond

ts.cond:
  %ts.a = load i64, ptr %a.v, align 8
  %ts.b = load i64, ptr %b.v, align 8
  %ts.more = icmp ult i64 %ts.a, %ts.b
  br i1 %ts.more, label %ts.body, label %ts.done

ts.body:
  %ts.sum = add i64 %ts.a, %ts.b
  %ts.mid = lshr i64 %ts.sum, 1
  %ts.k = shl i64 %ts.mid, 1
  %ts.slot.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.k
  %ts.slot = load i64, ptr %ts.slot.p, align 8
  %ts.le = icmp ule i64 %ts.slot, %slot0
  %ts.mid1 = add i64 %ts.mid, 1
  %ts.a2 = select i1 %ts.le, i64 %ts.mid1, i64 %ts.a
  %ts.b2 = select i1 %ts.le, i64 %ts.b, i64 %ts.mid
  store i64 %ts.a2, ptr %a.v, align 8
  store i64 %ts.b2, ptr %b.v, align 8
  br label %ts.cond

ts.done:
  %ts.none = icmp eq i64 %ts.a, 0
  br i1 %ts.none, label %commit, label %ts.check

ts.check:
  %ts.i = add i64 %ts.a, -1
  %ts.ki = shl i64 %ts.i, 1
  %ts.found.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.ki
  %ts.found = load i64, ptr %ts.found.p, align 8
  %ts.eq = icmp eq i64 %ts.found, %slot0
  br i1 %ts.eq, label %ts.hit, label %commit

ts.hit:
  %ts.ko = add i64 %ts.ki, 1
  %ts.orig.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.ko
  %ts.orig = load i64, ptr %ts.orig.p, align 8
  br label %commit

; the caller becomes the current frame
commit:
  %ra = phi i64 [ %v0, %t.stub ], [ %v0, %ts.done ], [ %v0, %ts.check ], [ %ts.orig, %ts.hit ]
  %trbit = phi i64 [ 0, %t.stub ], [ 0, %ts.done ], [ 0, %ts.check ], [ 2, %ts.hit ]
{commit_stores}
  %cfa.slot = getelementptr inbounds [17 x i64], ptr %regs, i64 0, i64 7
  store i64 %cfa, ptr %cfa.slot, align 8
  store i64 %ra, ptr %pc.p, align 8
{known_bits}
  store i64 %known.next, ptr %known.v, align 8
  ; flags' = EXACT if this frame is a signal frame | TRANSLATED | HAS_PREV
  %flags.n1 = or i64 %sig, %trbit
  %flags.next = or i64 %flags.n1, 4
  store i64 %flags.next, ptr %flags.v, align 8
  store i64 %cfa, ptr %prev.v, align 8
  %n.next = add i64 %n, 1
  store i64 %n.next, ptr %n.v, align 8
  %full = icmp eq i64 %n.next, %max
  br i1 %full, label %end.max, label %loop

; ---- ends that emitted the current frame
end.notinc:
  store i64 3, ptr %reason.e, align 8
  br label %end.emitted

end.raundef:
  store i64 1, ptr %reason.e, align 8
  br label %end.emitted

end.razero:
  store i64 2, ptr %reason.e, align 8
  br label %end.emitted

end.emitted:
  %re = load i64, ptr %reason.e, align 8
  %re.bits = shl i64 %re, 8
  %info.end = or i64 %info, %re.bits
  store i64 %info.end, ptr %o.info, align 8
  %n.e = add i64 %n, 1
  store i64 %n.e, ptr %n.v, align 8
  store i64 %re, ptr %reason.v, align 8
  br label %finish

; ---- ends that leave the state at the frame not done
end.max:
  store i64 4, ptr %reason.v, align 8
  br label %finish

end.noinfo:
  store i64 5, ptr %reason.v, align 8
  br label %finish

end.python:
  store i64 6, ptr %reason.v, align 8
  br label %finish

end.oob:
  store i64 7, ptr %reason.v, align 8
  br label %finish

end.cfaunknown:
  store i64 8, ptr %reason.v, align 8
  br label %finish

end.notable:
  store i64 9, ptr %reason.v, align 8
  br label %finish

finish:
  call void @llvm.memcpy.inline.p0.p0.i64(ptr align 8 %state, ptr align 8 %regs, i64 136, i1 false)
  %f.known = load i64, ptr %known.v, align 8
  store i64 %f.known, ptr %known.p, align 8
  %f.flags = load i64, ptr %flags.v, align 8
  store i64 %f.flags, ptr %flags.p, align 8
  %f.prev = load i64, ptr %prev.v, align 8
  store i64 %f.prev, ptr %prev.p, align 8
  %f.reason = load i64, ptr %reason.v, align 8
  %f.reason.p = getelementptr inbounds %State, ptr %state, i64 0, i32 4
  store i64 %f.reason, ptr %f.reason.p, align 8
  %f.mod = load i64, ptr %endmod.v, align 8
  %f.mod.p = getelementptr inbounds %State, ptr %state, i64 0, i32 5
  store i64 %f.mod, ptr %f.mod.p, align 8
  %f.n = load i64, ptr %n.v, align 8
  ret i64 %f.n
}
"""

WALK_SYMBOL = "osrjit_native_walk"


def walker_ir():
    """The LLVM IR module text of ``osrjit_native_walk`` (one function, C ABI)."""
    parts = [_IR_HEAD]
    for k, reg in enumerate(CARRIED_REGISTERS):
        nxt = f"r{k + 1}.begin" if k + 1 < len(CARRIED_REGISTERS) else "frame"
        parts.append(_IR_REGISTER.format(k=k, d=reg, next=nxt))
    stores = []
    for k, reg in enumerate(CARRIED_REGISTERS[1:], start=1):
        stores.append(f"  %st{k}.p = getelementptr inbounds [17 x i64], ptr %regs, i64 0, "
                      f"i64 {reg}\n  store i64 %v{k}, ptr %st{k}.p, align 8")
    # known' = RSP | RA·bit0 | Σ bit_k << reg_k: the caller knows RSP (= CFA),
    # its return address when defined, and each callee-saved register the rule
    # restores or keeps; every other register is unknown in a caller.
    bits = [f"  %kb0 = shl i64 %bit0, {RA}", f"  %kacc0 = or i64 %kb0, {1 << RSP}"]
    for k, reg in enumerate(CARRIED_REGISTERS[1:], start=1):
        bits.append(f"  %kb{k} = shl i64 %bit{k}, {reg}")
        bits.append(f"  %kacc{k} = or i64 %kacc{k - 1}, %kb{k}")
    bits.append(f"  %known.next = or i64 %kacc{len(CARRIED_REGISTERS) - 1}, 0")
    parts.append(_IR_TAIL.replace("{commit_stores}", "\n".join(stores))
                 .replace("{known_bits}", "\n".join(bits)))
    return "".join(parts)


#: ``osrjit_native_walk`` as a ctypes prototype (the call releases the GIL).
NATIVE_WALK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_uint64, ctypes.c_uint64)
#: The same, keeping the GIL (what :class:`NativeWalker` calls): a walk never
#: blocks, and giving the GIL away for microseconds lets another thread take
#: it for up to the interpreter's switch interval (5 ms) — in the middle of a
#: stop-the-world, whose pause that would be.
_WALK_CALL_TYPE = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_uint64, ctypes.c_uint64)


class _NativeCode:
    """The compiled walker: one LLJIT per process, never unloaded.

    Lifetime: the LLJIT and the resource tracker are kept for the life of the
    process (native callers may hold :attr:`address`), so there is no close.
    The object is registered with :meth:`AddressSpace.current_process` so a
    thread interrupted inside the walker can itself be unwound.
    """

    _instance = None
    _lock = threading.Lock()

    def __init__(self):
        import llvmlite.binding as llvm
        from .elf import open_elf
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        tm = llvm.Target.from_default_triple().create_target_machine(
            reloc="pic", codemodel="small", opt=3)
        try:
            mod = llvm.parse_assembly(f'target triple = "{tm.triple}"\n' + walker_ir())
            mod.data_layout = str(tm.target_data)
            mod.verify()
            pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
            pb.getModulePassManager().run(mod, pb)
            mod.verify()
        except RuntimeError as e:
            raise NativeWalkerError(f"cannot compile the native walker: {e}") from e
        self.ir_optimized = str(mod)
        self.obj = tm.emit_object(mod)
        self.tm = tm
        self.lljit = llvm.create_lljit_compiler(tm)
        self.tracker = (llvm.JITLibraryBuilder().add_object_img(self.obj)
                        .export_symbol(WALK_SYMBOL).link(self.lljit, "unwinder.native-walk"))
        self.address = self.tracker[WALK_SYMBOL]
        self.function = _WALK_CALL_TYPE(self.address)
        elf = open_elf(io.BytesIO(self.obj))
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(WALK_SYMBOL)[0]
        text = self.address - sym["st_value"]
        self.handle = AddressSpace.current_process().add_code_object(
            self.obj, {".text": text}, name="unwinder.native-walk")

    @classmethod
    def get(cls):
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def native_walk_address():
    """Absolute address of ``osrjit_native_walk`` (compiles it on first use)."""
    return _NativeCode.get().address


# --------------------------------------------------------------------------
# Return-address translation
# --------------------------------------------------------------------------

class TranslationArrays:
    """One immutable native version of a :class:`ReturnAddressTable`: the
    :class:`TranslationHeader` at :attr:`address` and the pairs it points to,
    alive as long as this object."""

    def __init__(self, stub_address, mapping):
        flat = array("Q")
        for slot in sorted(mapping):
            flat.append(slot)
            flat.append(mapping[slot])
        n = len(mapping)
        self.stub_address = stub_address
        self.mapping = dict(mapping)
        self.pairs = (ctypes.c_uint64 * max(2 * n, 2)).from_buffer_copy(
            flat.tobytes() if n else bytes(16))
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


# --------------------------------------------------------------------------
# Frames and the walker
# --------------------------------------------------------------------------

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
        self._code = _NativeCode.get()
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
                    pc if info & FRAME_EXACT else (pc - 1) & _MASK64, modules[info >> 32],
                    bool(info & FRAME_SIGNAL), stub if info & FRAME_TRANSLATED else None,
                    _TERMINAL.get((info >> 8) & 0xFF)))
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
                # Byte 0 of each info word holds the FRAME_* flags: mark the
                # translated ones and find them without a per-frame loop.
                marks = raw[3 * 8::_OUT.size].translate(_TRANSLATED_MARKS)
                translated += itertools.compress(range(base, base + len(marks)), marks)
            end = _TERMINAL.get((words[-1] >> 8) & 0xFF)
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
            end = _TERMINAL.get((int.from_bytes(raw[-8:], "little") >> 8) & 0xFF)
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
                _TERMINAL.get((out[n - 1].info >> 8) & 0xFF))

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
            regs = {r: state.regs[r] for r in range(17) if known >> r & 1}
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
        known = sum(1 << r for r in keys if isinstance(r, int) and 0 <= r <= 16)
        if len(_KNOWN_BITS) < 64:
            _KNOWN_BITS[keys] = known
    # One pack into the structure's buffer (a walk starts in a stopped world:
    # ctypes field assignments cost several times as much).
    values = list(map(regs.get, _DWARF_0_16, _ZEROS_17))
    try:
        _STATE_HEAD.pack_into(state, 0, *values, known, flags, prev_cfa)
    except struct.error:        # a value outside 0 .. 2**64 - 1: keep its low 64 bits
        _STATE_HEAD.pack_into(state, 0, *[v & _MASK64 for v in values], known, flags,
                              prev_cfa & _MASK64)


#: ``tuple(regs)`` -> bit mask of the DWARF numbers 0..16 in it (key sets repeat).
_KNOWN_BITS = {}
#: WalkState.regs, known, flags, prev_cfa.
_STATE_HEAD = struct.Struct("<20Q")
_DWARF_0_16 = range(17)
_ZEROS_17 = (0,) * 17


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
