"""Hijacking a whole stack at C speed: plan, check, write, build LIFO entries, and scan.

A stop-the-world scan walks a stopped thread with
:class:`unwinder.NativeWalker` into an array of
:class:`unwinder.native.OutFrame` (``pc, cfa, ra_slot, info``; 32 bytes
each, innermost first). The caller hands this module's code a sorted array
of *keys*, the return addresses of every site of the versions it watches
(being replaced, or old), and their code ranges (:class:`CodeRange`).
Everything per frame happens here, with no Python and no allocation:

``osrjit_hj_plan(frames, n, first, keys, hijack, nkeys, counts, slots, ras, kinds, cap,
ranges, nranges, range_counts) -> m``
    For every frame ``i >= first`` whose pc is a key ``k`` (binary search
    in the sorted ``keys``; ``hijack[k]`` non-zero: a frame to hijack, zero:
    a frame only to count): if the walker translated its pc (its slot
    already holds the stub) ``counts[k].already_hijacked`` is counted and,
    for a hijack key, the frame written at the *back* of the output (index
    ``cap − 1 − t``); else if it is a hijack key and its return address is
    in memory — ``frames[i − 1].ra_slot`` is non-zero and holds the pc — it
    is written at the front (index ``m``) and ``counts[k].hijack`` counted;
    else (a count-only key, the innermost frame, a register-held return
    address) ``counts[k].not_hijackable``: the frame runs its version and
    cannot be hijacked (``counts``: one :class:`KeyCounts` per key).
    A frame whose pc is no key but whose lookup pc (``pc − 1``) lies in
    ``ranges[r]`` (sorted, disjoint :class:`CodeRange`) counts in
    ``range_counts[r]``: it runs that code outside any site.
    Returns ``m``. ``slots`` / ``ras``: absolute addresses; ``kinds``: key
    indices; each array has ``cap >= n`` entries.

``osrjit_hj_apply(slots, ras, kinds, m, stubs, write) -> status``
    ``write =`` :data:`APPLY_CHECK`: check that ``slots`` rise strictly and
    every slot still holds its ``ras`` entry; 0, or ``j + 1`` for the first
    entry that does not. Else (:data:`APPLY_WRITE`): store ``stubs[kinds[j]]``
    (the per-site stub of that key, :mod:`deopt.sitestubs`, or the deopt
    stub) into every slot ``slots[j]`` (no check; call only after a check of
    every thread passed, so a failure leaves every stack untouched).

``osrjit_hj_lifo(entries, slots, ras, kinds, m, descriptors) -> count``
    :class:`~deopt.native_transfer.LifoEntry` records ``(slot, ras, desc,
    PENDING)`` for the hijacked frames whose kind has a descriptor
    (``descriptors[kind] != 0``), *highest slot first* (the LIFO order);
    returns how many were written.

``osrjit_hj_scan(args) -> status``
    One stopped thread from its anchor, in one call: the walk state from the
    anchor (a caller frame; RBX, RBP, RSP, R12–R15, RIP known), the walker
    (its address, tables and translation in ``args``), then the counters
    zeroed and ``osrjit_hj_plan`` from frame 0. ``args`` is a
    :class:`ScanArgs`; its ``n``, ``end_reason`` and ``m`` are written.
    Status :data:`SCAN_PLANNED` (0); else :data:`SCAN_NO_ANCHOR` (the
    anchor's RSP is 0: no frame to walk), :data:`SCAN_OUT_OF_BOUNDS` (RSP
    outside ``[lo, hi)``), :data:`SCAN_INCOMPLETE` (the walk stopped for a reason other than the
    three terminal ones, e.g. a table to grow or a frame for the Python
    walker, or produced no frame) and :data:`SCAN_NO_ROOM` (``cap < n``):
    nothing was planned; the caller takes the general path.

Frames are read from the walker's output only; a slot is read (plan, check)
or written (apply) only at an address the walker itself read a return
address from, inside the thread's stack bounds.

The code is hand-written IR in ``native_hijack.ll`` (next to this module),
rendered by :func:`hijack_module_ir` through :mod:`unwinder.nativesrc`:
:class:`ScanArgs`, :class:`KeyCounts`, :class:`CodeRange`,
:class:`unwinder.native.OutFrame` / :class:`~unwinder.native.WalkState` and
:class:`deopt.native_transfer.LifoEntry` give the layouts, the constants
here the numbers. Whoever links it owns the code (see
:class:`NativeHijacker`); it may link its own IR that calls these functions
into the same module (they are external, ``nounwind`` and use no globals).
"""
import ctypes

from unwinder import nativesrc
from unwinder.native import FRAME_TRANSLATED, EndReason, OutFrame, WalkState
from unwinder.x86_64 import CALLEE_SAVED, RA, RSP

from .native_transfer import PENDING, LifoEntry

__all__ = ["PLAN_SYMBOL", "APPLY_SYMBOL", "LIFO_SYMBOL", "SCAN_SYMBOL", "hijack_module_ir",
           "NativeHijacker", "ScanArgs", "KeyCounts", "CodeRange", "ANCHOR_KNOWN",
           "APPLY_CHECK", "APPLY_WRITE", "SCAN_PLANNED", "SCAN_NO_ANCHOR",
           "SCAN_OUT_OF_BOUNDS", "SCAN_INCOMPLETE", "SCAN_NO_ROOM", "NATIVE_SOURCES"]

PLAN_SYMBOL = "osrjit_hj_plan"
APPLY_SYMBOL = "osrjit_hj_apply"
LIFO_SYMBOL = "osrjit_hj_lifo"
SCAN_SYMBOL = "osrjit_hj_scan"

#: ``osrjit_hj_apply``'s ``write`` argument: check only, or write the stub.
APPLY_CHECK, APPLY_WRITE = 0, 1
#: ``osrjit_hj_scan``'s statuses: planned, or nothing planned because ...
SCAN_PLANNED, SCAN_NO_ANCHOR, SCAN_OUT_OF_BOUNDS, SCAN_INCOMPLETE, SCAN_NO_ROOM = range(5)
#: Walk-state ``known`` bits of an anchor (DWARF numbers): the callee-saved
#: registers RBX, RBP, R12–R15, then RSP and the return address (RIP, 16).
ANCHOR_KNOWN = sum(1 << r for r in (*CALLEE_SAVED, RSP, RA))


class ScanArgs(ctypes.Structure):
    """Arguments and results of ``osrjit_hj_scan`` (23 × 8 bytes; every
    address absolute). In: ``walk_fn`` (``osrjit_native_walk``), ``tables``
    (the walker's tables header), ``translation`` (its translation header, or
    0), ``state`` (a :class:`unwinder.native.WalkState`), ``out`` /
    ``out_cap`` (:class:`unwinder.native.OutFrame` array and its length),
    ``lo`` / ``hi`` (the thread's stack bounds, bytes), ``anchor`` (17 u64 by
    DWARF number: the registers of the caller frame to start from, those of
    :data:`ANCHOR_KNOWN` set; RSP 0: none), then the plan's arrays as in
    ``osrjit_hj_plan`` (``cap`` entries each for ``slots`` / ``ras`` /
    ``kinds``). Out: ``n`` frames, the walk's ``end_reason``
    (:class:`unwinder.native.EndReason` value), ``m`` frames to hijack. The
    arrays must outlive the call; nothing is kept after it."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "walk_fn", "tables", "translation", "state", "out", "out_cap", "lo", "hi", "anchor",
        "keys", "hijack", "nkeys", "counts", "slots", "ras", "kinds", "cap", "ranges",
        "nranges", "range_counts", "n", "end_reason", "m")]


class KeyCounts(ctypes.Structure):
    """``osrjit_hj_plan``'s counters of one key (frames at that site): to
    ``hijack`` now, ``not_hijackable`` (they run the version), and
    ``already_hijacked`` (their slot holds the stub)."""
    _fields_ = [("hijack", ctypes.c_uint64), ("not_hijackable", ctypes.c_uint64),
                ("already_hijacked", ctypes.c_uint64)]


class CodeRange(ctypes.Structure):
    """One watched version's code, ``[start, end)`` (absolute addresses)."""
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


assert ctypes.sizeof(ScanArgs) == 23 * 8 and ctypes.sizeof(KeyCounts) == 24


def _render():
    """``native_hijack.ll`` with its layouts and numbers filled in (no triple)."""
    regs = dict(WalkState._fields_)["regs"]
    return nativesrc.render_file(
        __package__, "native_hijack.ll",
        structs=[ScanArgs, KeyCounts, CodeRange, OutFrame, WalkState, LifoEntry],
        values={"PLAN_SYMBOL": PLAN_SYMBOL, "APPLY_SYMBOL": APPLY_SYMBOL,
                "LIFO_SYMBOL": LIFO_SYMBOL, "SCAN_SYMBOL": SCAN_SYMBOL,
                "FRAME_TRANSLATED": FRAME_TRANSLATED, "PENDING": PENDING,
                "APPLY_CHECK": APPLY_CHECK, "RSP": RSP, "REGS_BYTES": ctypes.sizeof(regs),
                "ANCHOR_KNOWN": ANCHOR_KNOWN,
                "END_RA_UNDEFINED": int(EndReason.RA_UNDEFINED),
                "END_RA_ZERO": int(EndReason.RA_ZERO),
                "END_CFA_NOT_INCREASING": int(EndReason.CFA_NOT_INCREASING),
                "SCAN_PLANNED": SCAN_PLANNED, "SCAN_NO_ANCHOR": SCAN_NO_ANCHOR,
                "SCAN_OUT_OF_BOUNDS": SCAN_OUT_OF_BOUNDS, "SCAN_INCOMPLETE": SCAN_INCOMPLETE,
                "SCAN_NO_ROOM": SCAN_NO_ROOM})


#: The hand-written native code of this module (see :mod:`unwinder.nativesrc`).
NATIVE_SOURCES = {"native_hijack.ll": _render}


def hijack_module_ir(triple):
    """Textual LLVM IR of the module holding the four functions above, for
    the target ``triple``."""
    return f'target triple = "{triple}"\n' + _render()


_U64 = ctypes.c_uint64
_PLAN = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, _U64, _U64, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)
_APPLY = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _U64,
                          ctypes.c_void_p, _U64)
_LIFO = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)
_SCAN = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p)


class NativeHijacker:
    """Callable wrappers of the functions, given their absolute addresses
    (the caller owns the code and keeps it mapped while this object is used).
    The calls keep the GIL (they never block; see :mod:`unwinder.native`).
    ``scan`` is None when no address is given for it."""

    def __init__(self, plan_address, apply_address, lifo_address, scan_address=None):
        self.plan = _PLAN(plan_address)
        self.apply = _APPLY(apply_address)
        self.lifo = _LIFO(lifo_address)
        self.scan = None if scan_address is None else _SCAN(scan_address)
