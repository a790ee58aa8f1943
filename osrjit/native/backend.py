"""The native backend: versions as machine code in this process, run by real threads.

Each version is its own JIT library (:mod:`.linker`), in its own LLJIT
(llvmlite cannot remove a JITDylib, so the LLJIT goes with the version),
built from the object :func:`osrjit.compiling.emit_object` emits, so the
bytes we parse are the bytes that run and each version can be unloaded
alone. On load the object is registered with the unwinder and its
``.llvm_stackmaps`` become frame maps. Calls between functions go through
``osrjit.slot.<name>`` cells holding the current version's entry (publishing
is one 8-byte store), or, with ``calls="direct"``, through ``call rel32``
sites patched on every replacement (:mod:`osrjit.native.patching`).

Collaborators, each with one job: the :class:`~.linker.Linker` (every JIT
library and its owner), :class:`osrjit.native.threads.SupportLibrary` (native
transitions, the thread registry, the world that stops and releases
threads), :class:`osrjit.native.deoptimizer.NativeDeopt` (the stub, the hijack
table, the Python and native transfers), :class:`~.scan.Scanner` (which
frames to hijack) and :class:`~.hijack.Hijacker` (writing the stubs); one
pause is a :class:`~.replace.NativePause`.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping

import unwinder
from deopt import framemaps as _fm
from deopt.framemaps import ObjectImage

from .. import abi
from ..abi import FunctionIR
from ..backend import FAST, path_option
from ..compiling import emit_object
from ..errors import CompileError, FrameMapError, RuntimeBusy
from ..versions import Function, FunctionTable, Version
from . import patching, stacklimit, threads
from .deoptimizer import NativeDeopt, NativeTransferPath
from .function import JitFunction
from .hijack import Hijacker
from .linker import Linker, address_of
from .replace import NativePause
from .scan import Scanner
from .tooling import Tools

__all__ = ["NativeBackend", "TRANSFERS", "WALKERS", "COMPILERS"]

#: ``Runtime(transfer=...)``, ``Runtime(walker=...)``, ``Runtime(compiler=...)`` choices
#: (``transfer`` and ``walker`` also take the aliases of :data:`osrjit.backend.PATH_ALIASES`).
TRANSFERS = ("fast", "reference")
WALKERS = ("fast", "reference")
COMPILERS = ("inprocess", "worker")

_HOOK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
_SAFEPOINT_SLOW_TYPE = ctypes.CFUNCTYPE(None)
_ERROR_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int64)

_PROCESS = ctypes.CDLL(None)


def process_symbol(name: str) -> int | None:
    """Address of ``name`` in the current process (libc, libm, ...), or None."""
    try:
        return ctypes.cast(_PROCESS[name], ctypes.c_void_p).value
    except AttributeError:
        return None


class NativeBackend:
    """Runs versions natively (see the module docstring).

    ``compiler``: ``"inprocess"`` (default) or ``"worker"`` — optimise and
    emit versions in a child process (:mod:`osrjit.native.compiler`), because
    llvmlite's pass pipeline leaks about 60 KB of native memory per compile
    in the process that runs it. ``walker``: how stopped stacks are walked
    — ``"fast"`` (default: :class:`unwinder.NativeWalker` and the native scan
    of :mod:`osrjit.native.fastscan`; a walk that needed Python anywhere is
    redone by the reference) or ``"reference"`` (:func:`unwinder.walk`).
    ``transfer``: how a hijacked frame is rebuilt — ``"fast"`` (default:
    :mod:`deopt.native_transfer`: code generated per version, a per-thread
    LIFO of hijacks, no Python on the path; a frame it cannot handle takes
    the reference transfer) or ``"reference"``
    (:func:`deopt.transfer.return_through_stub` called back through ctypes).
    ``"native"`` and ``"python"`` are accepted as aliases of ``"fast"`` and
    ``"reference"``; :attr:`transfer` and :attr:`walker` hold the role name.

    Lifetime: made and owned by its :class:`osrjit.Runtime`. Everything it
    takes from the process is released by :meth:`close`, newest first (also
    when the constructor fails half-way): the native walker and the scan's
    tables, the threads' self-scan blocks and LIFOs, the hijack table's
    return-address filter in the process's unwinder space, the real-time
    signal (previous action restored), every attached thread (its block is
    freed), the pthread key, and through the :class:`~.linker.Linker` every
    JIT library (unwinder registration, tracker, LLJIT), the shared LLJIT,
    the target machine and the cells and callbacks compiled code could reach.
    No thread is started; the compile worker (``compiler="worker"``) is one
    child process per process, shared by every runtime, and outlives them.
    A closed backend holds no reference cycle that outlives its runtime
    (callbacks reach the runtime through a weak reference).
    """

    name = "native"
    #: A transfer may free its version at once (the runtime lock permitting).
    reclaim_in_transfer = True
    #: Reference-language functions start with the stack check (StackOverflow);
    #: False, per instance, in a process without a stack limit key
    #: (:data:`osrjit.native.stacklimit.stack_limit_error` says why).
    stack_checks = True
    #: Kept versions are rechecked by a background thread too.
    background_reclaim = True

    def __init__(self, runtime, *, compiler: str = "inprocess", transfer: str = FAST,
                 walker: str = FAST, perf: str | None = None, gdb: bool | None = None):
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        transfer = path_option("transfer", transfer)
        walker = path_option("walker", walker)
        self.compiler, self.transfer, self.walker = compiler, transfer, walker
        self.tools = Tools(perf, gdb)       # ValueError for a bad perf mode
        self.opt_level = runtime.opt_level
        self.calls = runtime.calls
        self.functions: FunctionTable = runtime._functions
        self._services = runtime._services
        self.call_sites = patching.CallSiteIndex()
        self.space = unwinder.AddressSpace.current_process()
        self.closed = False
        #: Who is inside compiled code, entered from Python; what close() shuts.
        self.gate = threads.EntryGate()
        self._ids = itertools.count(1)      # version ids, in link order
        #: name -> versions linked so far: N in the ``<name>@v<N>`` perf and gdb show.
        self._version_numbers: collections.Counter[str] = collections.Counter()
        self._runtime = weakref.ref(runtime)
        # What close() releases, newest first (see the class docstring).
        self._resources = contextlib.ExitStack()
        try:
            self._take_resources(transfer)
        except BaseException:
            self.closed = True
            self._resources.close()
            raise

    def _take_resources(self, transfer):
        me = self._runtime
        release = self._resources.callback
        self.linker = Linker(self.opt_level, self.tools)
        release(self.linker.close)

        # The native transitions (entry thunks, service wrappers, the
        # transfer's status marking, the signal handler) and the threads.
        self.flag = self.linker.keep(ctypes.c_int64(0))
        support = self.support = threads.SupportLibrary(self.linker, self.space, self.flag)
        release(support.close)
        self.registry = threads.ThreadRegistry(support.key, support.cell("osrjit_main_thread"))
        release(self.registry.close)
        self.signal = threads.RuntimeSignal(support.addresses["osrjit_signal_handler"])
        release(self.signal.close)
        self.sigint = threads.SigintHook(support.addresses["osrjit_sigint_handler"],
                                         support.cell("osrjit_sigint_previous"))
        release(self.sigint.close)
        self.world = threads.World(support, self.registry, self.signal)
        self.service_addresses = {
            abi.HOOK_SYMBOL: support.addresses["osrjit_hook"],
            abi.SAFEPOINT_SLOW_SYMBOL: support.addresses["osrjit_safepoint_slow"],
            abi.ERROR_SYMBOL: support.addresses["osrjit_error"],
            abi.SAFEPOINT_FLAG_SYMBOL: ctypes.addressof(self.flag),
            abi.STACK_OVERFLOW_SYMBOL: support.addresses["osrjit_stack_overflow"],
        }
        stack_limit = stacklimit.stack_limit_slot()
        if stack_limit is None:
            self.stack_checks = False         # IR with stack_check() then fails to link
        else:
            self.service_addresses[abi.STACK_LIMIT_SYMBOL] = stack_limit.offset
        services = self._services
        for cell, cb in (("osrjit_py_hook", _HOOK_TYPE(services.hook_service)),
                         ("osrjit_py_safepoint", _SAFEPOINT_SLOW_TYPE(services.safepoint_service)),
                         ("osrjit_py_error", _ERROR_TYPE(services.error_service))):
            support.set_service(cell, address_of(self.linker.keep(cb)))
        registry = self.registry
        self.deopt = NativeDeopt(self.linker, self.space,
                                 lambda record: me()._resume_target(record),
                                 lambda record, ok, error=None: me()._after_transfer(
                                     record, ok, error),
                                 lambda: ctypes.addressof(registry.current()))
        release(self.deopt.close)
        support.set_service("osrjit_py_transfer", self.deopt.callback_address)
        self.deopt.route_through(support.addresses["osrjit_transfer"])
        if transfer == FAST:
            self.deopt.native = NativeTransferPath(
                self.linker, self.space, lambda ts: ts.status == threads.DETACHED)
            support.set_service("osrjit_native_transfer", self.deopt.native.dispatch_address)
        self.scanner = Scanner(self)
        release(self.scanner.close)
        self.hijacker = Hijacker(self)

    @property
    def table(self):
        """The hijack table (:class:`deopt.hijack.HijackTable`): every pending return."""
        return self.deopt.table

    # -- life cycle ----------------------------------------------------------------

    @contextlib.contextmanager
    def closing(self, timeout: float):
        """Around :meth:`close`: wait up to ``timeout`` seconds for every
        other thread to leave compiled code (new calls from Python wait
        meanwhile), or raise :class:`RuntimeBusy` naming the threads still
        inside — at once for the calling thread's own frames (a hook), which
        cannot leave while it waits. Calls held back go on if the close
        fails and raise :class:`RuntimeClosed` once it succeeded."""
        busy = self.gate.shut(timeout)
        if busy:
            raise self._busy(busy)
        try:
            yield
        finally:
            if self.closed:
                self.gate.close()
            else:
                self.gate.reopen()

    def _busy(self, inside):
        """The :class:`RuntimeBusy` for threads ``{ident: function}`` inside compiled code."""
        me = threading.get_ident()
        names = {ident: name for ident, _st, name in self.registry.snapshot()}
        where = dict(self.registry.whereabouts())
        held = []
        for ident, function in inside.items():
            name = names.get(ident, f"thread {ident}")
            place = where.get(ident, "entering")
            if ident == me:
                place += "; the caller of close(): its own frames cannot leave"
            held.append((name, function, place))
        text = "; ".join(f"{name} in {function} ({place})" for name, function, place in held)
        pending = len(self.deopt.table)
        frames = (f"{pending} hijacked frames have not returned yet (their stub and code "
                  "would go), and " if pending else "")
        return RuntimeBusy(f"cannot close the runtime: {frames}threads are inside its compiled "
                           f"code: {text}", threads=held, pending_returns=pending)

    def close(self):
        """Release everything the backend took (see the class docstring).
        :class:`RuntimeBusy`, with nothing released, while hijacked frames
        are pending or a thread is inside compiled code (running it, or in a
        hook or service called from it): their stub and code would go.
        Call it inside :meth:`closing`, which waits for other threads."""
        if self.closed:
            return
        self.drain()
        pending = len(self.deopt.table)
        if pending:
            raise RuntimeBusy(f"cannot close the runtime: {pending} hijacked frames "
                              "have not returned yet (their stub and code would go)",
                              pending_returns=pending)
        inside = self.gate.inside()
        if inside:
            raise self._busy(inside)
        busy = self.registry.in_jit_code()
        if busy:
            names = ", ".join(f"{name} ({status})" for name, status in busy)
            raise RuntimeBusy(f"cannot close the runtime: threads are inside its compiled "
                              f"code: {names}", threads=[(n, None, w) for n, w in busy])
        self.closed = True
        self.gate.close()
        self._resources.close()

    def before_fork(self):
        """Before ``fork()`` (the runtime lock held): no entry thunk is being
        linked either, so no thread is inside LLJIT when the process forks."""
        self.support.thunk_lock.acquire()

    def after_fork_in_parent(self):
        self.support.thunk_lock.release()

    def after_fork_in_child(self):
        """In a fork child (the forking thread holds the runtime lock, so no
        replace, compile or collect was under way, and the stop bit is
        clear): only the forking thread exists. Forget the others (registry,
        gate, their pending returns: those frames never return); make anew
        the locks a vanished thread may have held."""
        self.support.thunk_lock.release()
        me = threading.get_ident()
        self.registry.after_fork(me)
        self.gate.after_fork(me)
        self.world.lock = threading.RLock()
        table = self.deopt.table
        if table.lock.acquire(blocking=False):
            table.lock.release()
        else:                             # held by a thread caught in a transfer
            table.lock = table._lock = threading.RLock()
        runtime = self._runtime()
        self.hijacker._count_lock = runtime._count_lock
        # Transfers the native code logged before the fork (any thread's) are
        # accounted first, while their records exist; then the frames of the
        # vanished threads, which never return: their pending returns go.
        self.drain(settle=False)
        gone = [r.slot for r in table.records() if r.thread != me]
        if gone:
            for owner, n in table.take_many(gone).items():
                owner.pending_returns -= n

    def __del__(self):
        # A runtime dropped without close(): nothing can run its code any
        # more (a JitFunction would keep this object alive), so give the
        # process its key, its signal and its JIT libraries back.
        if not sys.is_finalizing() and not getattr(self, "closed", True):
            self.close()

    # -- flags and services ----------------------------------------------------------

    @property
    def user_flag(self) -> int:
        return 1 if self.flag.value & threads.FLAG_USER else 0

    @user_flag.setter
    def user_flag(self, value: int):
        if value:
            self.support.set_flag(threads.FLAG_USER)
        else:
            self.support.clear_flag(threads.FLAG_USER)

    @property
    def safepoint_timeout(self) -> float:
        return self.world.timeout

    @safepoint_timeout.setter
    def safepoint_timeout(self, seconds: float):
        self.world.timeout = float(seconds)

    def entry(self, fn: Function) -> JitFunction:
        return JitFunction(self, fn, self._runtime()._reclaimer)

    # -- loading ---------------------------------------------------------------------

    def new_cell(self, name: str):
        return ctypes.c_uint64(0)

    def link(self, irs: list[FunctionIR], cells: Mapping[str, ctypes.c_uint64]) -> list[Version]:
        linked: list[Version] = []
        try:
            for ir in irs:
                linked.append(self._load(ir, cells))
        except BaseException:
            for v in linked:
                self.discard(v)
            raise
        for cell in cells.values():
            self.linker.keep(cell)
        return linked

    def _emit(self, ir: FunctionIR) -> bytes:
        if self.compiler == "worker":
            from .compiler import shared_worker
            return shared_worker().emit(ir, self.opt_level)
        return emit_object(ir, self.linker.tm, self.opt_level)

    def _imports(self, ir: FunctionIR, image: ObjectImage,
                 cells: Mapping[str, ctypes.c_uint64]) -> dict[str, int]:
        """Address of every symbol the object needs; CompileError for unknown ones."""
        imports = {}
        for sym in image.undefined_symbols:
            if sym.startswith(abi.SLOT_PREFIX):
                callee = sym[len(abi.SLOT_PREFIX):]
                fn = self.functions.find(callee)
                cell = fn.cell if fn is not None else cells.get(callee)
                if cell is None:
                    raise CompileError(f"{ir.name} calls {callee!r}, which is neither compiled "
                                       "nor in this batch")
                imports[sym] = ctypes.addressof(cell)
            elif sym.startswith(abi.DIRECT_CALL_PREFIX):
                # Linked through a stub for now; publish() points the call
                # itself at the callee once every version is linked.
                callee = sym[len(abi.DIRECT_CALL_PREFIX):]
                fn = self.functions.find(callee)
                if fn is not None and fn.current is not None:
                    imports[sym] = fn.current.entry
                elif callee in cells:
                    imports[sym] = patching.placeholder_address()
                else:
                    raise CompileError(f"{ir.name} calls {callee!r}, which is neither compiled "
                                       "nor in this batch")
            elif sym in self.service_addresses:
                imports[sym] = self.service_addresses[sym]
            else:
                address = process_symbol(sym)
                if address is None:
                    raise CompileError(f"{ir.name}: undefined symbol {sym!r}")
                imports[sym] = address
        return imports

    def _load(self, ir: FunctionIR, cells) -> Version:
        obj = self._emit(ir)
        imports = self._imports(ir, ObjectImage(obj, {}, name=ir.name), cells)
        self._version_numbers[ir.name] += 1
        label = f"{ir.name}@v{self._version_numbers[ir.name]}"
        library = self.linker.link(obj, f"osrjit.{ir.name}", imports=imports,
                                   exports=(ir.symbol, ir.resume_symbol), own_jit=True,
                                   labels={ir.symbol: label,
                                           ir.resume_symbol: f"{label}.resume"})
        vid = self._next_id()
        stubs = None
        try:
            image = ObjectImage(obj, library.load_addresses, name=f"{ir.name} v{vid}")
            code_range = image.code_range
            if code_range is None:
                raise FrameMapError(f"{ir.name} v{vid}: .text was not loaded")
            table = _fm.frame_maps_for_object(image, ir.sites, function=ir.name, version=vid)
            self.call_sites.add(vid, obj, library.load_addresses, patching.callee_symbols(ir))
            handle = library.register(self.space, obj, f"{ir.name}.v{vid}")
            # What hijacked slots of its frames will hold: stubs carrying its rows.
            stubs = self.deopt.link_site_stubs(table, f"osrjit.site.{ir.name}.v{vid}")
            if self.walker == FAST:
                # Its unwind tables now, not in the pause of the first
                # stop-the-world that meets its frames.
                handles = [handle]
                if stubs is not None:
                    handles.append(stubs.library.registration[1])
                self.scanner.walker().prepare(handles)
        except BaseException:
            if vid in self.call_sites:
                self.call_sites.remove(vid)
            if stubs is not None:
                stubs.release()
            library.release()
            raise
        version = Version(vid, ir, obj, library.load_addresses, library[ir.symbol],
                          library[ir.resume_symbol], code_range, table, library)
        version.stubs = stubs
        return version

    def _next_id(self) -> int:
        return next(self._ids)

    def discard(self, version: Version):
        """Unmap a version that was never published."""
        self._unload(version)

    def free(self, version: Version):
        """Unmap an old version nothing can run."""
        self._unload(version)

    def _unload(self, version: Version):
        version.loaded = False
        if self.deopt.native is not None:
            # No LIFO entry of it is pending (pending_returns is 0), so no
            # thread runs or will run its transfer code.
            self.deopt.native.forget(version)
        if version.id in self.call_sites:
            self.call_sites.remove(version.id)
        try:
            if version.stubs is not None:
                version.stubs.release()
        finally:
            version.library.release()

    def can_free(self, version: Version) -> bool:
        if self.call_sites.sites_reaching(*version.code_range):
            version.pinned = True             # a direct call still leads into it
            return False
        return True

    def keep(self, version: Version):
        pass

    # -- publishing ------------------------------------------------------------------

    def publish(self, versions: Iterable[Version]):
        """Make ``versions`` (already current in the table) callable outside a
        pause: slot stores, native transfer targets, every direct call to or
        from them retargeted (all planned before any is written)."""
        versions = list(versions)
        for v in versions:
            self.store_slot(v)
        self.retarget_direct_calls(versions)

    def store_slot(self, version: Version):
        """Publish one version: callers read the slot at each call."""
        fn = self.functions.get(version.name)
        fn.cell.value = version.entry
        if self.deopt.native is not None:
            self.deopt.native.retarget(fn.versions, fn.current)

    def retarget_direct_calls(self, versions):
        patching.apply_patches(*self.plan_direct_calls([v.ir for v in versions], {}))

    def plan_direct_calls(self, irs, entries):
        """``(patches, memory map)``: every direct call to a function of
        ``irs`` — in every loaded version — and every call ``irs`` make
        directly, pointed at the callee's entry (``entries``: name -> entry
        for versions not yet published, else the current one's), to be
        applied with :func:`osrjit.native.patching.apply_patches` before any
        mapping of the runtime's code changes (runtime lock held)."""
        names = {ir.name for ir in irs}
        for ir in irs:
            names |= set(ir.direct_callees)
        plans = []
        memory = None            # one read of /proc/self/maps for all of it
        for name in sorted(names):
            fn = self.functions.find(name)
            entry = entries.get(name)
            if entry is None and fn is not None and fn.current is not None:
                entry = fn.current.entry
            if entry is not None:
                memory = memory or patching.MemoryMap.current()
                plans.extend(self.call_sites.plan_retarget(name, entry, memory))
        return plans, memory

    # -- pauses and accounting ----------------------------------------------------------

    def pause(self, names: Iterable[str] = (), new: Mapping[str, Version] | None = None):
        return NativePause(self, list(names), dict(new or {}))

    def drain(self, settle: bool = True):
        """Account the hijack records the native transfer took (any time;
        first, unless ``settle`` is False, settle the applies threads have done)."""
        if settle:
            self.hijacker.settle_self_applies(stopped=False)
        ntx = self.deopt.native
        if ntx is not None:
            self.account_native(ntx.drain())

    def commit(self):
        """Write the threads' LIFOs before the world is released (its callers
        drained right after the world stopped)."""
        ntx = self.deopt.native
        if ntx is not None:
            self.account_native(ntx.commit(drain=False))

    def abandoned(self, state):
        """Forget the JIT frames ``osrjit_abandon`` gave up on the calling
        thread (its :class:`~.threads.ThreadState` ``state``): every pending
        return whose slot lies in ``[abandoned_lo, abandoned_hi)`` leaves the
        hijack table and the thread's native LIFO (those frames will never
        return), and its version's count (runtime lock held, so no pause
        writes hijacks meanwhile). The thread runs no JIT code of this entry
        any more, and only it reads its LIFO."""
        lo, hi = state.abandoned_lo, state.abandoned_hi
        runtime = self._runtime()
        with runtime._lock:
            self.drain()
            table = self.deopt.table
            with table.lock:
                dead = [r.slot for r in table.records() if lo <= r.slot < hi]
                owners = table.take_many(dead) if dead else {}
            ntx = self.deopt.native
            lifo = None if ntx is None else ntx.lifo_of(state)
            if lifo is not None and any(lo <= e[0] < hi for e in lifo.entries()):
                self.account_native(lifo.commit(
                    lambda keep: [e for e in keep if not lo <= e[0] < hi])[0])
            runtime._frames_abandoned(owners)

    def account_native(self, taken):
        """The runtime's accounting for ``taken`` slots (transferred natively)."""
        if not taken:
            return
        owners = self.deopt.table.take_many(taken)
        self._runtime()._native_transfers_taken(owners)

    def before_reclaim(self):
        self.drain()
        if self.deopt.native is not None:
            self.deopt.native.prune()     # LIFOs of threads gone, outside the pause

    def request_reclaim(self, version):
        pass

    def counters(self) -> dict:
        """``stops``, ``signals_sent`` (threads stopped by the runtime's signal
        rather than at a poll), ``attached_threads``; the native transfer's
        ``native_unsupported`` (hijacked frames it cannot rebuild: no native
        case for their frame map, or no thread block), ``lifo_searches``
        (records found below the top of their thread's LIFO), ``lifo_misses``
        (stub returns whose slot was not in the LIFO), ``native_handed``
        (records whose frame has no target in the current version: the
        Python transfer reports the failure); threads that did their own
        part (``walker="fast"``, see :class:`osrjit.native.fastscan.SelfScan`):
        ``self_scans``, ``self_applies``, ``self_applies_by_stopper``."""
        ntx = self.deopt.native
        native = ({"lifo_searches": 0, "lifo_misses": 0, "handed_to_python": 0}
                  if ntx is None else ntx.counters())
        return {
            "stops": self.world.stops,
            "signals_sent": self.world.signals_sent,
            "attached_threads": len(self.registry.snapshot()),
            "native_unsupported": ntx.unsupported if ntx else 0,
            "lifo_searches": native["lifo_searches"],
            "lifo_misses": native["lifo_misses"],
            "native_handed": native["handed_to_python"],
            "self_scans": self.scanner.self_scans_used,
            "self_applies": self.hijacker.self_applies_left,
            "self_applies_by_stopper": self.hijacker.self_applies_by_stopper,
        }
