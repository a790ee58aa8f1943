"""Compile: FDE rows -> the native walker's flat tables (:class:`ModuleTable`).

FDEs decoded by :func:`unwinder.rules.decode_fde` become rows ``(absolute pc
start, 16-byte rule record)`` in two parallel sorted arrays, laid out as
:class:`~unwinder.native_abi.RowTable` and
:class:`~unwinder.native_abi.RuleRecord`. Addresses between FDEs get a *gap*
row, so a pc there is "no unwind info"; a row the record cannot express (CFA
or register expressions, ``DW_CFA_register``, ``DW_CFA_val_offset``, offsets
that are not multiples of 8 bytes within ±1016) is flagged *python* and handed
back to the Python walker. Equal adjacent records are merged.

A module with an ``.eh_frame_hdr`` gets a *growing* table: its rows start
*unknown*, and the FDE around a pc is compiled when a walk first reaches it
(libc and libpython compiled whole take 0.2 s and 0.5 s here; a first walk
through them compiles about 20 FDEs in under 2 ms).

Exports :class:`ModuleTable`, :func:`compile_module_table`, :func:`encode_row`,
:func:`module_eh_frame` and the decoded views :class:`NativeRule`,
:class:`TableRow`, :class:`TableStats`. No native code here: this module only
writes the arrays ``osrjit_native_walk`` (:mod:`unwinder.native_code`) reads.
"""
import bisect
import ctypes
import struct
import time
from array import array
from dataclasses import dataclass

from .errors import CFIError, ModuleError
from .native_abi import (CARRIED_REGISTERS, MAX_SLOT_CODE, RA_CARRIED, RULE_GAP, RULE_PYTHON,
                         RULE_SIGNAL, RULE_UNKNOWN, SAME_VALUE_CODE, SLOT_BYTES, UNDEFINED_CODE,
                         WALK_REGISTERS, RowTable, RuleRecord)
from .rules import RuleKind, decode_fde

__all__ = ["NativeRule", "TableRow", "TableStats", "ModuleTable", "compile_module_table",
           "encode_row", "module_eh_frame"]

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

    ElfModule and CodeObject have ``eh_frame()``. Raises :class:`ModuleError`
    for other module types without an ``eh_frame()`` method.
    """
    get = getattr(module, "eh_frame", None)
    if callable(get):
        return get()
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


