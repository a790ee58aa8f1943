"""Native fast path: unwind tables compiled to flat arrays, walked by LLVM-compiled code.

The Python walker (:mod:`unwinder.walk`) stays the reference; the native path
compiles the same rows into a compact form and walks them with one native
function that needs no Python, no GIL and no allocation, so a park stub or a
signal handler can call it. The layering mirrors the rest of the package
(after the Linux kernel's ORC tables and Parca's flattened rows), one module
per stage; this module gathers their public names:

* **ABI** (:mod:`unwinder.native_abi`): the record layouts as ctypes
  structures and every constant the native code tests (rule flags, state and
  frame flags, :class:`EndReason`), defined once for Python and the IR.
* **compile** (:mod:`unwinder.native_tables`, :class:`ModuleTable`): FDEs
  decoded by :func:`unwinder.rules.decode_fde` become rows ``(absolute pc
  start, 16-byte rule record)`` in two parallel sorted arrays; gap rows mark
  "no unwind info", rows the record cannot express are flagged *python*.
  Tables of modules with an ``.eh_frame_hdr`` *grow*: the FDE around a pc is
  compiled when a walk first reaches it.
* **walk** (``osrjit_native_walk``: hand-written LLVM IR in
  ``unwinder/native_walk.ll``, rendered from the ABI module and compiled once
  per process into its own LLJIT by :mod:`unwinder.native_code`): module
  lookup by binary search over sorted module ranges, row lookup by binary
  search (with a last-hit hint), then one step::

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
  stub's address is translated through a sorted ``(slot, original)`` table
  (:mod:`unwinder.native_translation`, :class:`ReturnAddressTable`).
* **API** (:mod:`unwinder.native_walker`, :class:`NativeWalker`): the native
  code stops with ``NO_TABLE`` where a table is missing or unknown; Python
  compiles what is missing and resumes it. Tables are cached per module and
  dropped when the :class:`~unwinder.space.AddressSpace` loses the module.
  Whenever the native code cannot do a frame (expression row, gap, unknown CFA
  register, a read outside the stack bounds) the Python walker does that one
  frame (:func:`unwinder.step`) and the native walk resumes from its caller;
  such frames are counted in :attr:`NativeWalker.fallbacks`. So
  :meth:`NativeWalker.walk` returns the same frames as :func:`unwinder.walk`.

Memory: stack words are read directly from this process, and only inside the
caller-given stack bounds ``[lo, hi)`` (absolute, bytes); a read outside them
ends the native walk (``OUT_OF_BOUNDS``) instead of faulting. Code addresses of
the space's modules are only compared, never dereferenced, so a synthetic
:class:`~unwinder.space.AddressSpace` works as long as the stack is real
memory of this process.

Native ABI (x86-64 SysV; every integer is little-endian, every address absolute)::

    i64 osrjit_native_walk(const TablesHeader *tables,
                           const TranslationHeader *tr /* or NULL */,
                           WalkState *state, OutFrame *out, i64 max_frames,
                           u64 stack_lo, u64 stack_hi)

returns the number of frames written to ``out`` (at most ``max_frames``);
``state->end_reason`` says why it stopped. See :class:`WalkState`,
:class:`OutFrame`, :class:`TablesHeader`, :class:`ModuleEntry`,
:class:`RowTable`, :class:`RuleRecord`, :class:`TranslationHeader` and
:class:`TranslationPair` for the layouts (each checked with ``ctypes.sizeof``;
the IR's ``%T`` types are derived from them). The function only reads
``tables`` and ``tr``, reads stack memory inside the bounds, writes ``state``
and ``out[0 .. max_frames)``, calls no function and uses under 300 bytes of
stack: it is async-signal-safe.
"""
from .errors import NativeWalkerError
from .native_abi import (CARRIED_REGISTERS, FRAME_EXACT, FRAME_HAS_RA_SLOT, FRAME_SIGNAL,
                         FRAME_TRANSLATED, INFO_END_SHIFT, INFO_MODULE_SHIFT, MAX_SLOT_CODE,
                         NO_MODULE, RA_CARRIED, RULE_GAP, RULE_NOT_NATIVE, RULE_PYTHON,
                         RULE_SIGNAL, RULE_UNKNOWN, SAME_VALUE_CODE, SLOT_BYTES, STATE_EXACT,
                         STATE_HAS_PREV, STATE_TRANSLATED, UNDEFINED_CODE, WALK_REGISTERS,
                         EndReason, ModuleEntry, OutFrame, RowTable, RuleRecord, TablesHeader,
                         TranslationHeader, TranslationPair, WalkState)
from .native_code import NATIVE_WALK_TYPE, WALK_SYMBOL, native_walk_address, walker_ir
from .native_tables import (ModuleTable, NativeRule, TableRow, TableStats, compile_module_table,
                            encode_row, module_eh_frame)
from .native_translation import ReturnAddressTable, TranslationArrays
from .native_walker import (FrameArrays, NativeFrame, NativeWalker, stack_bounds_of,
                            state_from_regs)

__all__ = [
    "NativeWalker", "NativeFrame", "FrameArrays", "NativeWalkerError", "ReturnAddressTable",
    "TranslationArrays", "EndReason", "RowTable", "RULE_GAP", "RULE_PYTHON", "RULE_SIGNAL",
    "RULE_UNKNOWN",
    "compile_module_table", "encode_row", "ModuleTable", "NativeRule", "TableRow", "TableStats",
    "WalkState", "OutFrame", "RuleRecord", "ModuleEntry", "TablesHeader", "TranslationHeader",
    "NATIVE_WALK_TYPE", "CARRIED_REGISTERS", "native_walk_address", "walker_ir",
    "state_from_regs", "stack_bounds_of", "module_eh_frame",
    # the ABI constants and the native code's symbol
    "TranslationPair", "RULE_NOT_NATIVE", "RA_CARRIED", "WALK_REGISTERS", "SLOT_BYTES",
    "SAME_VALUE_CODE", "UNDEFINED_CODE", "MAX_SLOT_CODE", "STATE_EXACT", "STATE_TRANSLATED",
    "STATE_HAS_PREV", "NO_MODULE", "FRAME_SIGNAL", "FRAME_TRANSLATED", "FRAME_EXACT",
    "FRAME_HAS_RA_SLOT", "INFO_END_SHIFT", "INFO_MODULE_SHIFT", "WALK_SYMBOL",
]
