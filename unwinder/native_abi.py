"""The native walker's ABI: record layouts and constants, shared by Python and the IR.

Everything ``osrjit_native_walk`` reads or writes is laid out here once, as
ctypes structures, and every number it tests is a constant here:
:mod:`unwinder.native_code` renders ``unwinder/native_walk.ll`` from these
structures (``%T = type {...}`` and field indices) and constants (see
:func:`unwinder.native_code.walker_values`), so the IR writes no field offset,
flag or end-reason number of its own. :mod:`unwinder.native_tables` fills the
tables, :mod:`unwinder.native_walker` the state and reads the output.

Units: every address is absolute (bytes), every register a DWARF number
(:mod:`unwinder.x86_64`), every integer little-endian. Each layout's size is
asserted with ``ctypes.sizeof``; :func:`unwinder.nativesrc.check_layout` checks
that LLVM lays out the ``%T`` twin the same way.
"""
import ctypes
import enum

from .walk import END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO
from .x86_64 import RA, RBP, RBX, R12, R13, R14, R15

__all__ = [
    "CARRIED_REGISTERS", "RA_CARRIED", "WALK_REGISTERS", "SLOT_BYTES",
    "RULE_GAP", "RULE_PYTHON", "RULE_SIGNAL", "RULE_UNKNOWN", "RULE_NOT_NATIVE",
    "SAME_VALUE_CODE", "UNDEFINED_CODE", "MAX_SLOT_CODE",
    "RuleRecord", "RowTable", "ModuleEntry", "TablesHeader", "TranslationPair",
    "TranslationHeader", "WalkState", "OutFrame",
    "STATE_EXACT", "STATE_TRANSLATED", "STATE_HAS_PREV", "NO_MODULE",
    "FRAME_SIGNAL", "FRAME_TRANSLATED", "FRAME_EXACT", "FRAME_HAS_RA_SLOT",
    "INFO_END_SHIFT", "INFO_MODULE_SHIFT", "EndReason", "TERMINAL_END_REASONS",
    "HANDOFF_END_REASONS",
]

#: Registers whose caller values a rule record describes, in record slot order
#: (DWARF numbers): the return address, then the callee-saved registers.
CARRIED_REGISTERS = (RA, RBX, RBP, R12, R13, R14, R15)
#: Record code slot of the return address.
RA_CARRIED = CARRIED_REGISTERS.index(RA)
#: DWARF registers 0 .. WALK_REGISTERS − 1 a :class:`WalkState` holds
#: (the last, RA = 16, is the pc).
WALK_REGISTERS = 17
#: Bytes of one stack slot: a saved register is read as one slot at
#: ``cfa + SLOT_BYTES·code``.
SLOT_BYTES = 8

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
#: Rule flags of a row the native code does not step itself.
RULE_NOT_NATIVE = RULE_GAP | RULE_PYTHON | RULE_UNKNOWN

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


class TranslationPair(ctypes.Structure):
    """One hijacked slot, 16 bytes: the absolute address of the return-address
    ``slot`` and the ``original`` return address it held."""
    _fields_ = [("slot", ctypes.c_uint64), ("original", ctypes.c_uint64)]


class TranslationHeader(ctypes.Structure):
    """Return-address translation, 32 bytes: a return address in
    ``[stub_address, stub_end)`` (the stubs hijacking writes: the deopt stub
    and the per-site stubs) read from slot ``s`` becomes ``original`` when the
    pair ``(s, original)`` is among the ``n_pairs`` :class:`TranslationPair`
    at ``pairs`` (sorted by slot)."""
    _fields_ = [("stub_address", ctypes.c_uint64), ("pairs", ctypes.c_void_p),
                ("n_pairs", ctypes.c_uint64), ("stub_end", ctypes.c_uint64)]


class WalkState(ctypes.Structure):
    """The frame the walk is at (in and out), 176 bytes.

    ``regs[r]``: value of DWARF register r (0..16; ``regs[16]`` is the pc)
    where bit r of ``known`` is set. ``flags``: STATE_EXACT (look the pc up as
    is), STATE_TRANSLATED (the pc came from the translation table),
    STATE_HAS_PREV (``prev_cfa`` is the CFA of the previous frame). Out:
    ``end_reason`` (:class:`EndReason`) and ``end_module`` (entry index where
    the walk stopped, :data:`NO_MODULE` if none). After a stop that emitted no
    frame for it (NO_INFO, NO_TABLE, NEEDS_PYTHON, OUT_OF_BOUNDS,
    CFA_REGISTER_UNKNOWN) and after MAX_FRAMES the state is the next frame to
    do, so a walk can resume.
    """
    _fields_ = [("regs", ctypes.c_uint64 * WALK_REGISTERS), ("known", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("prev_cfa", ctypes.c_uint64),
                ("end_reason", ctypes.c_uint64), ("end_module", ctypes.c_int64)]


class OutFrame(ctypes.Structure):
    """One frame the walker produced, 32 bytes: ``pc`` (absolute), ``cfa``,
    ``ra_slot`` (0 when RA is not saved on the stack) and ``info``: bits 0–7
    FRAME_* flags, bits 8–15 (:data:`INFO_END_SHIFT`) the :class:`EndReason`
    of the last frame, bits 32–63 (:data:`INFO_MODULE_SHIFT`) the
    :class:`ModuleEntry` index of the module."""
    _fields_ = [("pc", ctypes.c_uint64), ("cfa", ctypes.c_uint64),
                ("ra_slot", ctypes.c_uint64), ("info", ctypes.c_uint64)]


for _cls, _size in ((RuleRecord, 16), (RowTable, 32), (ModuleEntry, 32), (TablesHeader, 32),
                    (TranslationPair, 16), (TranslationHeader, 32), (WalkState, 176),
                    (OutFrame, 32)):
    assert ctypes.sizeof(_cls) == _size, (_cls, ctypes.sizeof(_cls))
assert RuleRecord.codes.size >= len(CARRIED_REGISTERS)        # one i8 code per carried register

#: WalkState.flags: look the pc up as is (innermost frame, caller of a signal frame).
STATE_EXACT = 1
#: WalkState.flags: the pc came from the translation table.
STATE_TRANSLATED = 2
#: WalkState.flags: ``prev_cfa`` is the previous frame's CFA.
STATE_HAS_PREV = 4
#: WalkState.end_module when the walk stopped in no module.
NO_MODULE = -1

FRAME_SIGNAL = 1        # the frame's own FDE is a signal frame ('S')
FRAME_TRANSLATED = 2    # pc came from the translation table (the slot held the stub)
FRAME_EXACT = 4         # looked up at pc, not pc − 1
FRAME_HAS_RA_SLOT = 8   # ra_slot is valid
#: OutFrame.info: ``(info >> INFO_END_SHIFT) & 0xFF`` is the EndReason (last frame).
INFO_END_SHIFT = 8
#: OutFrame.info: ``info >> INFO_MODULE_SHIFT`` is the ModuleEntry index.
INFO_MODULE_SHIFT = 32


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
TERMINAL_END_REASONS = {EndReason.RA_UNDEFINED: END_RA_UNDEFINED, EndReason.RA_ZERO: END_RA_ZERO,
                        EndReason.CFA_NOT_INCREASING: END_CFA_NOT_INCREASING}
#: End reasons after which the Python walker does the frame the native code stopped at.
HANDOFF_END_REASONS = frozenset((EndReason.NO_INFO, EndReason.NEEDS_PYTHON,
                                 EndReason.OUT_OF_BOUNDS, EndReason.CFA_REGISTER_UNKNOWN))
