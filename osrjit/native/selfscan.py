"""The self-scan handshake: a thread scans and hijacks its own stack as it parks.

For ``replace()`` the stopper asks every other attached thread (whose stack
bounds it knows) to walk and plan its own stack as it parks at a poll, on its
own core, whose caches hold that stack; the stopper then only reads the
answer, and leaves the writing of the hijacks to the thread as it wakes.
HotSpot's thread-local handshakes and ZGC's stack watermarks let threads
process their own stacks the same way. The stopper's side (one block per
thread, its requests and answers) is :class:`osrjit.native.fastscan.SelfScan`; the
thread's side is native code, called from the park path of
:mod:`osrjit.native.threads` (``osrjit_safepoint_slow``) through the
``osrjit_park_scan`` / ``osrjit_park_apply`` cells of the support library.

The block is a :class:`Handshake`; its ``state`` moves so:

==========================  ===============================================
stopper, before the stop    ``IDLE -> REQUESTED`` (plain stores; setting
                            STOP, a locked instruction, publishes them)
thread, as it parks         ``REQUESTED -> SCANNING -> SCANNED``
                            (``osrjit_hj_park_scan``)
stopper, world stopped      ``SCANNED -> APPLY`` (hijacks left to the thread)
thread waking / stopper     ``APPLY -> APPLYING -> APPLIED``
                            (``osrjit_hj_park_apply``; whoever wins the swap)
stopper, after its release  ``REQUESTED`` / ``SCANNED -> IDLE``
                            (``osrjit_hj_cancel``)
==========================  ===============================================

``osrjit_hj_park_scan(handshake, flag)``
    The park path's self-scan (``flag``: the safepoint flag word): if
    ``state`` goes from :data:`HS_REQUESTED` to :data:`HS_SCANNING`
    (compare-and-swap) while :data:`osrjit.native.threads.FLAG_STOP` is set (read
    after the swap: the stop that made the request is in progress), runs
    :data:`deopt.native_hijack.SCAN_SYMBOL` on the block's ``args``, stores
    its status and then :data:`HS_SCANNED`. With STOP clear the thread is
    late from a stop that is over: the state goes back to
    :data:`HS_REQUESTED`, nothing is scanned. Else does nothing.

``osrjit_hj_cancel(handshake)``
    Back to :data:`HS_IDLE` from :data:`HS_REQUESTED` or, once no scan runs
    (it spins while the state is :data:`HS_SCANNING`), from
    :data:`HS_SCANNED` (compare-and-swaps); an apply state is left alone.
    After it no thread scans with the handshake's ``args``.

``osrjit_hj_park_apply(handshake)``
    The park path's self-apply, as the thread wakes (and the stopper's, for
    a thread still stopped since): if ``state`` goes from :data:`HS_APPLY`
    to :data:`HS_APPLYING` (compare-and-swap), writes the stub into the
    ``m`` planned slots (:data:`deopt.native_hijack.APPLY_SYMBOL` with
    ``APPLY_WRITE``), the LIFO entries at ``lifo_entries``
    (:data:`deopt.native_hijack.LIFO_SYMBOL`) and the LIFO block's ``top``,
    then :data:`HS_APPLIED`, timing itself with ``osrjit_hj_now``
    (CLOCK_MONOTONIC nanoseconds). No check: the thread planned its own stack
    as it parked and has not run since (nothing else writes it).

The code is hand-written IR in ``selfscan.ll`` (next to this module),
rendered by :func:`selfscan_module_ir` from :class:`Handshake`, the
``HS_*`` states and :data:`osrjit.native.threads.FLAG_STOP`. :func:`link_hijacker`
links it into :mod:`deopt.native_hijack`'s module (one module: the calls
into deopt's functions are direct) and that into one JIT library.
"""
import ctypes
import time

from deopt import native_hijack
from deopt.native_hijack import APPLY_SYMBOL, APPLY_WRITE, LIFO_SYMBOL, SCAN_SYMBOL, ScanArgs
from deopt.native_transfer import ThreadBlock
from unwinder import nativesrc

from ..ir import parse_module
from . import threads

__all__ = ["Handshake", "HS_IDLE", "HS_REQUESTED", "HS_SCANNING", "HS_SCANNED", "HS_APPLY",
           "HS_APPLYING", "HS_APPLIED", "PARK_SCAN_SYMBOL", "PARK_APPLY_SYMBOL",
           "CANCEL_SYMBOL", "NOW_SYMBOL", "selfscan_module_ir", "SelfScanHijacker",
           "link_hijacker", "EXPORTS", "NATIVE_SOURCES"]

PARK_SCAN_SYMBOL = "osrjit_hj_park_scan"
PARK_APPLY_SYMBOL = "osrjit_hj_park_apply"
CANCEL_SYMBOL = "osrjit_hj_cancel"
NOW_SYMBOL = "osrjit_hj_now"

#: :attr:`Handshake.state` values. The stopper moves IDLE -> REQUESTED before
#: it stops the world, and back to IDLE (``osrjit_hj_cancel``) right after it
#: released it; the thread moves REQUESTED -> SCANNING -> SCANNED while it
#: parks for that stop.
HS_IDLE, HS_REQUESTED, HS_SCANNING, HS_SCANNED = range(4)
#: Then the stopper moves SCANNED -> APPLY before it releases the world, and
#: whoever wins APPLY -> APPLYING (the thread as it wakes, or the next
#: stopper while the thread is still stopped) writes the stubs and the LIFO
#: entries, then APPLIED.
HS_APPLY, HS_APPLYING, HS_APPLIED = 4, 5, 6


class Handshake(ctypes.Structure):
    """A thread's self-scan and self-apply block (every address absolute).

    ``state`` (``HS_*``); ``status``: ``osrjit_hj_scan``'s, once SCANNED;
    ``args``: the :class:`deopt.native_hijack.ScanArgs` it scans with (its
    ``slots`` / ``ras`` / ``kinds`` / ``m`` are what ``osrjit_hj_park_apply``
    writes); for the apply: ``stubs`` (per kind: what its slots get, as
    ``osrjit_hj_apply``), ``descriptors`` (per kind, as
    ``osrjit_hj_lifo``), ``lifo_entries`` (where its LIFO entries go, 0:
    none), ``lifo_block`` (the :class:`deopt.native_transfer.ThreadBlock`
    whose ``top`` becomes ``lifo_top`` after them); out: ``written``
    entries, ``apply_start_ns`` / ``apply_end_ns`` (CLOCK_MONOTONIC) around
    the apply."""
    _fields_ = [("state", ctypes.c_int64), ("status", ctypes.c_int64), ("args", ScanArgs),
                ("stubs", ctypes.c_uint64), ("descriptors", ctypes.c_uint64),
                ("lifo_entries", ctypes.c_uint64), ("lifo_block", ctypes.c_uint64),
                ("lifo_top", ctypes.c_int64), ("written", ctypes.c_int64),
                ("apply_start_ns", ctypes.c_int64), ("apply_end_ns", ctypes.c_int64)]


class Timespec(ctypes.Structure):
    """glibc x86-64 ``struct timespec`` (what ``clock_gettime`` fills)."""
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


def _render():
    """``selfscan.ll`` with its layouts and numbers filled in (no triple)."""
    return nativesrc.render_file(
        __package__, "selfscan.ll", structs=[ScanArgs, Handshake, Timespec],
        values={"SCAN_SYMBOL": SCAN_SYMBOL, "APPLY_SYMBOL": APPLY_SYMBOL,
                "LIFO_SYMBOL": LIFO_SYMBOL, "CANCEL_SYMBOL": CANCEL_SYMBOL,
                "PARK_APPLY_SYMBOL": PARK_APPLY_SYMBOL, "PARK_SCAN_SYMBOL": PARK_SCAN_SYMBOL,
                "NOW_SYMBOL": NOW_SYMBOL, "HS_IDLE": HS_IDLE, "HS_REQUESTED": HS_REQUESTED,
                "HS_SCANNING": HS_SCANNING, "HS_SCANNED": HS_SCANNED, "HS_APPLY": HS_APPLY,
                "HS_APPLYING": HS_APPLYING, "HS_APPLIED": HS_APPLIED,
                "FLAG_STOP": threads.FLAG_STOP, "APPLY_WRITE": APPLY_WRITE,
                "LIFO_TOP_OFFSET": ThreadBlock.top.offset,
                "CLOCK_MONOTONIC": time.CLOCK_MONOTONIC})


#: The hand-written native code of this module (see :mod:`unwinder.nativesrc`).
NATIVE_SOURCES = {"selfscan.ll": _render}


def selfscan_module_ir(triple):
    """Textual LLVM IR of the handshake's functions for the target ``triple``
    (the deopt functions it calls are only declared)."""
    return f'target triple = "{triple}"\n' + _render()


_HANDSHAKE_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)


class SelfScanHijacker(native_hijack.NativeHijacker):
    """:class:`deopt.native_hijack.NativeHijacker` (``plan``, ``apply``,
    ``lifo``, ``scan``) plus the handshake's stopper-side calls ``cancel``
    and ``park_apply`` (each ``(handshake address)``, GIL kept), and the
    absolute addresses ``park_scan_address`` / ``park_apply_address`` for the
    support library's ``osrjit_park_scan`` / ``osrjit_park_apply`` cells.
    Made by :func:`link_hijacker`; valid while its library is mapped."""

    def __init__(self, addresses):
        super().__init__(addresses[native_hijack.PLAN_SYMBOL], addresses[APPLY_SYMBOL],
                         addresses[LIFO_SYMBOL], addresses[SCAN_SYMBOL])
        self.cancel = _HANDSHAKE_CALL(addresses[CANCEL_SYMBOL])
        self.park_apply = _HANDSHAKE_CALL(addresses[PARK_APPLY_SYMBOL])
        self.park_scan_address = addresses[PARK_SCAN_SYMBOL]
        self.park_apply_address = addresses[PARK_APPLY_SYMBOL]


#: The symbols :func:`link_hijacker` exports.
EXPORTS = (native_hijack.PLAN_SYMBOL, APPLY_SYMBOL, LIFO_SYMBOL, SCAN_SYMBOL, CANCEL_SYMBOL,
           PARK_APPLY_SYMBOL, PARK_SCAN_SYMBOL)


def link_hijacker(linker):
    """Compile deopt's native hijack module with :func:`selfscan_module_ir`
    linked in (one module), link it as a library of ``linker`` (the
    runtime's :class:`osrjit.native.linker.Linker`, which owns it) and
    return the :class:`SelfScanHijacker` of its functions."""
    tm = linker.tm
    mod = parse_module(native_hijack.hijack_module_ir(tm.triple), selfscan_module_ir(tm.triple))
    mod.verify()
    obj = tm.emit_object(mod)
    clock = ctypes.cast(threads._libc.clock_gettime, ctypes.c_void_p).value
    library = linker.link(obj, "osrjit.hijack", exports=EXPORTS,
                          imports={"clock_gettime": clock})
    return SelfScanHijacker(dict(library.addresses))
