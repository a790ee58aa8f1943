"""The versioned JIT: one LLJIT, one JIT library per function version.

A :class:`Runtime` turns :class:`~osrjit.abi.FunctionIR` into machine code it
can later replace while frames of it are live:

    FunctionIR.module_ir --parse/verify--> llvm Module --O<n> pipeline-->
    --TargetMachine.emit_object--> ELF object --JITLibraryBuilder.link-->
    loaded code (its own JIT library) + unwinder registration + frame maps

We emit the object ourselves (rather than hand IR to LLJIT) because the object
bytes are what the stackmap records, the call-site check and the unwinder's
``.eh_frame`` reading all need. Each version is linked as its own library with
a unique name, so versions of one function coexist and are unloaded one by
one. Calls between functions go through ``osrjit.slot.<name>`` cells holding
the current version's entry, so publishing a version is one 8-byte store.

Native services every version may import (see :mod:`osrjit.abi`):
``osrjit_hook`` (calls the function given to :meth:`Runtime.on_hook`),
``osrjit_safepoint_flag`` / ``osrjit_safepoint_slow`` (polls; the slow path
calls :meth:`Runtime.on_safepoint`'s function) and ``osrjit_error``.

Exceptions never unwind through native frames: a Python exception raised by a
service (or a language error reported through ``osrjit_error``) is caught in
the service, remembered as *pending* for the current thread, and the service
returns 0. The Python entry wrapper (:meth:`Runtime.function`) raises the
pending exception when the native call it made returns. Each entry from
Python starts a fresh pending scope, so a hook that calls back into JIT code
sees that inner call's exception, not its caller's.
"""
from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping

import llvmlite.binding as llvm

import unwinder
from deopt.transfer import ResumeTarget, TransferError

from deopt import framemaps as _fm
from deopt import native_transfer as ntx
from deopt.hijack import HijackBatch, HijackError
from deopt.errors import FrameMapError, IncompatibleVersion
from deopt.framemaps import FrameMap, FrameMapTable, ObjectImage

from . import abi, fastscan, patching, selfscan, stackscan, threads
from .abi import FunctionIR, SiteInfo
from .deoptimizer import NativeDeopt, NativeTransferPath
from .errors import (CompileError, HookNotSet, OsrJitError, RuntimeClosed, UnknownFunction,
                     VersionInUse)

__all__ = ["Runtime", "Version", "JitFunction", "emit_object", "target_machine"]

# The two packages name the same LLVM fact; deopt cannot import osrjit.abi.
assert abi.STATEPOINT_HEADER_LOCATIONS == _fm.STATEPOINT_HEADER_LOCATIONS

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

#: Tracker id of the native hijack code (:func:`osrjit.selfscan.link_hijacker`).
HIJACK_LIBRARY_ID = -2

_HOOK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
_SAFEPOINT_SLOW_TYPE = ctypes.CFUNCTYPE(None)
_ERROR_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int64)

#: LLVM return type -> ctypes restype of the Python entry wrapper.
#: ``Runtime(transfer=...)`` choices.
TRANSFERS = ("python", "native")

_RESTYPES = {"i64": ctypes.c_int64, "i32": ctypes.c_int32, "i8": ctypes.c_int8,
             "i1": ctypes.c_bool, "double": ctypes.c_double, "ptr": ctypes.c_void_p,
             "void": None}

_llvm_ready = False
_llvm_lock = threading.Lock()


def _init_llvm():
    global _llvm_ready
    with _llvm_lock:
        if not _llvm_ready:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            _llvm_ready = True


def _process_symbol(name: str) -> int | None:
    """Address of ``name`` in the current process (libc, libm, ...), or None."""
    try:
        return ctypes.cast(_PROCESS[name], ctypes.c_void_p).value
    except AttributeError:
        return None


_PROCESS = ctypes.CDLL(None)


def target_machine(opt_level: int = 2):
    """A host TargetMachine configured as the runtime's (PIC, small code model).

    The caller owns it (``close()`` it, or let it be collected).
    """
    _init_llvm()
    return llvm.Target.from_default_triple().create_target_machine(
        opt=opt_level, reloc="pic", codemodel="small")


def emit_object(ir: FunctionIR, tm, opt_level: int = 2) -> bytes:
    """Parse, verify, optimise (new pass manager, ``O<opt_level>``) and emit
    ``ir.module_ir`` as a relocatable ELF object for ``tm``.

    Raises CompileError carrying LLVM's diagnostic if the IR does not parse or
    verify, or if it does not define ``@<symbol>`` and ``@<symbol>__resume``.
    Pure with respect to the JIT: nothing is loaded.
    """
    _init_llvm()
    try:
        mod = llvm.parse_assembly(ir.module_ir)
    except RuntimeError as e:
        raise CompileError(f"{ir.name}: LLVM rejected the IR: {e}") from None
    try:
        mod.verify()
    except RuntimeError as e:
        raise CompileError(f"{ir.name}: LLVM IR does not verify: {e}") from None
    for symbol in (ir.symbol, ir.resume_symbol):
        try:
            fn = mod.get_function(symbol)
        except NameError:
            fn = None
        if fn is None or fn.is_declaration:
            raise CompileError(f"{ir.name}: the module does not define @{symbol}")
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    if opt_level:
        pto = llvm.create_pipeline_tuning_options(speed_level=opt_level)
        pb = llvm.create_pass_builder(tm, pto)
        pb.getModulePassManager().run(mod, pb)
    return tm.emit_object(mod)


# --------------------------------------------------------------------------
# Pending exceptions and the native services
# --------------------------------------------------------------------------

def call_hook(fn, value, installer):
    """Run a user hook ``fn(value) -> int`` for compiled code; checks the result.

    Raises :class:`HookNotSet` (naming ``installer``, the API that installs
    one) when ``fn`` is None, TypeError/OverflowError for a result that is not
    a 64-bit int. Callers turn any exception into the thread's pending one.
    """
    if fn is None:
        raise HookNotSet(f"compiled code called the hook with {value} but no hook is "
                         f"installed ({installer})")
    result = fn(value)
    if not isinstance(result, int):
        raise TypeError(f"the hook must return an int, got {type(result).__name__}")
    if not _INT64_MIN <= result <= _INT64_MAX:
        raise OverflowError(f"the hook's result {result} does not fit in 64 bits")
    return result


class _Services:
    """The Python side of the native services, shared by every version.

    Holds the user's hook / safepoint functions and the per-thread pending
    exception. It never references the JIT or the :class:`Runtime`, so the
    ctypes callbacks that call into it create no reference cycle through the
    native resources.
    """

    def __init__(self):
        self.hook: Callable[[int], int] | None = None
        self.safepoint: Callable[[], None] | None = None
        self.tls = threading.local()

    # -- pending exceptions ---------------------------------------------------

    def set_pending(self, exc: BaseException):
        """Remember ``exc`` unless this thread's scope already has one (first wins)."""
        if getattr(self.tls, "pending", None) is None:
            self.tls.pending = exc

    def enter(self):
        """Open a pending scope for a call from Python; returns the outer scope's value."""
        outer = getattr(self.tls, "pending", None)
        self.tls.pending = None
        return outer

    def leave(self, outer):
        """Close the scope: restore the outer value, return this scope's exception."""
        exc = getattr(self.tls, "pending", None)
        self.tls.pending = outer
        return exc

    # -- the services (called from native code through ctypes) ---------------

    def hook_service(self, value: int) -> int:
        try:
            if getattr(self.tls, "pending", None) is not None:
                return 0        # an exception is already on its way out: do not run more Python
            return call_hook(self.hook, value, "Runtime.on_hook")
        except BaseException as exc:  # noqa: BLE001 - must never unwind into native code
            self.set_pending(exc)
            return 0

    def safepoint_service(self) -> None:
        try:
            if getattr(self.tls, "pending", None) is not None:
                return
            fn = self.safepoint
            if fn is not None:
                fn()
        except BaseException as exc:  # noqa: BLE001
            self.set_pending(exc)

    def error_service(self, code: int) -> None:
        try:
            try:
                kind = abi.ErrorCode(code)
            except ValueError:
                raise OsrJitError(f"compiled code reported unknown error code {code}") from None
            if kind is abi.ErrorCode.ZERO_DIVISION:
                raise ZeroDivisionError("integer division or modulo by zero")
            raise OsrJitError(f"compiled code reported {kind.name}")
        except BaseException as exc:  # noqa: BLE001
            self.set_pending(exc)


# --------------------------------------------------------------------------
# The owner of every native resource
# --------------------------------------------------------------------------

class _NativeResources:
    """Sole owner of the LLJIT, the TargetMachine, every version's
    ResourceTracker and unwinder registration, and every cell and callback
    compiled code can reach.

    Lifetimes: a tracker keeps its version's code mapped; disposing it unmaps
    the code at once (and the next library may reuse the address), so a
    tracker is disposed only by :meth:`release` (an explicit unload) or
    :meth:`close`. Trackers must be disposed before the LLJIT they belong to,
    and the unwinder must forget an object before its memory is unmapped;
    :meth:`close` does it in that order. Slot cells, the safepoint flag and the
    ctypes callbacks are referenced here until this object dies, so they
    outlive every piece of code that can reach them.

    The llvmlite objects are marked ``_owned`` so that their own finalizers
    never dispose them: only this class disposes, in order. If this object is
    collected as part of an unreachable cycle together with its llvmlite
    objects, their finalizers may run first and merely detach; the code then
    leaks but is never freed out of order.
    """

    def __init__(self, opt_level: int):
        self.tm = target_machine(opt_level)
        self.lljit = llvm.create_lljit_compiler(self.tm)
        self.lljit._owned = True            # disposed by close(), after the trackers
        self.trackers: dict[int, object] = {}      # version id -> ResourceTracker
        # version id -> the LLJIT holding only that version. llvmlite cannot
        # remove a JITDylib from an LLJIT (each library stays, ~10 KB, for the
        # LLJIT's life), so each version gets its own LLJIT, disposed with it.
        self.version_jits: dict[int, object] = {}
        self.registrations: dict[int, object] = {}  # version id -> unwinder handle
        self.keepalive: list = []            # cells and callbacks reachable from code
        self.closed = False
        self._lock = threading.Lock()

    def jit_for(self, version_id: int):
        """A fresh LLJIT owned by ``version_id`` (disposed by :meth:`release`)."""
        jit = llvm.create_lljit_compiler(self.tm)
        jit._owned = True
        with self._lock:
            self.version_jits[version_id] = jit
        return jit

    def adopt(self, version_id: int, tracker, registration):
        tracker._owned = True               # disposed by release()/close() only
        self.trackers[version_id] = tracker
        if registration is not None:
            self.registrations[version_id] = registration

    def release(self, version_id: int):
        """Forget a version in the unwinder, then unmap its code (even if forgetting failed)."""
        with self._lock:
            handle = self.registrations.pop(version_id, None)
            tracker = self.trackers.pop(version_id, None)
            jit = self.version_jits.pop(version_id, None)
        try:
            if handle is not None:
                _unregister(handle)
        finally:
            try:
                if tracker is not None:
                    try:
                        tracker._dispose()
                    finally:
                        tracker.detach()
            finally:
                if jit is not None:       # after its only tracker
                    try:
                        jit._dispose()
                    finally:
                        jit.detach()

    def close(self):
        """Release every version, then the LLJIT, then the TargetMachine. Idempotent.

        Every version is released even if one fails; the first error is
        re-raised after the LLJIT is gone.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            # Versions first, the deopt stub library (id 0) last: nothing may
            # return into the stub once the code that could is gone.
            ids = sorted(set(self.trackers) | set(self.version_jits), reverse=True)
        error = None
        for vid in ids:
            try:
                self.release(vid)
            except Exception as e:  # noqa: BLE001 - keep releasing, report the first
                error = error or e
        try:
            self.lljit._dispose()
        finally:
            self.lljit.detach()
            self.tm.close()
        if error is not None:
            raise error

    def __del__(self):
        if not sys.is_finalizing() and not getattr(self, "closed", True):
            self.close()


def _register(obj: bytes, load_addresses: Mapping[str, int], name: str):
    """Register a loaded object with the process's unwinder; None if it cannot yet."""
    import unwinder
    space_cls = getattr(unwinder, "AddressSpace", None)
    if space_cls is None or not hasattr(space_cls, "current_process"):
        return None
    space = space_cls.current_process()
    if not hasattr(space, "add_code_object"):
        return None
    return space, space.add_code_object(obj, dict(load_addresses), name=name)


def _unregister(registration):
    space, handle = registration
    space.remove_code_object(handle)


# --------------------------------------------------------------------------
# Versions and functions
# --------------------------------------------------------------------------

def _calls_in(patches, ranges):
    """``(inside, others)``: the call-site patches of ``patches`` whose
    address lies in one of ``ranges`` (``[start, end)``, absolute), and the
    rest (GOT entries included) in their order."""
    inside, others = [], []
    for p in patches:
        hit = p.site is not None and any(lo <= p.address < hi for lo, hi in ranges)
        (inside if hit else others).append(p)
    return inside, others


def replacement_irs(names, source, *, polls: bool, calls: str,
                    known: Mapping[str, int]) -> list[FunctionIR]:
    """The FunctionIRs a ``replace(names, source)`` call links, for every backend.

    ``source``: reference-language text (compiled with ``known``: name ->
    arity of the functions already compiled) or FunctionIR object(s). They
    must define exactly ``names``: :class:`CompileError` otherwise.
    """
    if isinstance(source, str):
        from . import lang
        irs = lang.compile_source(source, known=known, polls=polls, calls=calls)
    else:
        irs = [source] if isinstance(source, FunctionIR) else list(source)
    defined = {ir.name for ir in irs}
    missing = [n for n in names if n not in defined]
    extra = sorted(defined - set(names))
    if missing:
        raise CompileError(f"the replacement does not define {missing}")
    if extra:
        raise CompileError(f"the replacement also defines {extra}, which replace() was not "
                           "asked to replace (compile() them separately)")
    return irs


def check_versions_compatible(old, old_maps, new) -> None:
    """Raise :class:`deopt.IncompatibleVersion` unless frames of ``old`` (its
    frame maps ``old_maps``) can resume in ``new``; both are version objects
    with ``.name`` (and ``new.sites``) of either backend."""
    if old.name != new.name:
        from deopt.errors import IncompatibleVersion
        raise IncompatibleVersion(f"versions of different functions: {old.name!r} "
                                  f"and {new.name!r}", reason="different functions")
    _fm.check_compatible(old_maps, new.sites)


def resume_target(record, new) -> ResumeTarget:
    """Where the frame of hijack ``record`` continues in version ``new`` (its
    function's current version): :class:`TransferError` if ``new`` lacks the site."""
    site = new.sites.get(record.frame_map.site_id)
    if site is None:
        raise TransferError(f"{record.owner.name} v{new.id} has no site "
                            f"{record.frame_map.site_id}")
    return ResumeTarget(new.resume_entry, site.id, tuple(lv.name for lv in site.live), new)


class Version:
    """One compiled version of a function: its own JIT library.

    ``id``: unique in the runtime (1, 2, ... in link order). ``name``: the
    function's name; ``symbol``: its native symbol. ``entry`` /
    ``resume_entry``: absolute addresses of ``@<symbol>`` and
    ``@<symbol>__resume`` (``i64 (i64 site_id, ptr state)``, see
    :mod:`osrjit.abi`). ``code_range``: ``(start, end)`` absolute addresses of
    the object's ``.text`` as loaded. ``frame_maps``: every frame map (one per
    statepoint record, keyed by absolute return address). ``sites``: the code
    generator's sites. ``object_image``: the ELF object the code was loaded
    from. ``load_addresses``: section name -> absolute address.

    Lifetime: the code stays mapped until :meth:`_unload` or
    :meth:`Runtime.close`; after that ``loaded`` is False and every address
    here is stale (the memory may hold another version's code). Calling
    ``entry`` or ``resume_entry`` is only valid while ``loaded``.
    """

    def __init__(self, runtime: "Runtime", vid: int, ir: FunctionIR, obj: bytes,
                 load_addresses: Mapping[str, int], entry: int, resume_entry: int,
                 code_range: tuple[int, int], table: FrameMapTable):
        self._runtime = weakref.ref(runtime)
        self.id = vid
        self.ir = ir
        self.object_image = obj
        self.load_addresses = dict(load_addresses)
        self.entry = entry
        self.resume_entry = resume_entry
        self.code_range = code_range
        self._table = table
        self.loaded = True
        #: Hijacked slots whose frames will return into this version (count).
        self.pending_returns = 0
        #: Set when a frame of this version may run its code without a pending
        #: return being recorded (a frame suspended outside any site, or a
        #: transfer that fell back to the old code): the version is then never
        #: freed automatically.
        self.pinned = False
        #: Set by the last stack scan: a frame was running this version
        #: outside any site (it is freed by a later scan that finds none).
        self.executing = False

    name = property(lambda self: self.ir.name)
    symbol = property(lambda self: self.ir.symbol)
    sites: Mapping[int, SiteInfo] = property(lambda self: self.ir.sites)
    params = property(lambda self: self.ir.params)

    @property
    def frame_maps(self) -> tuple[FrameMap, ...]:
        return self._table.maps

    def frame_map_at(self, return_address: int) -> FrameMap | None:
        """The frame map for absolute ``return_address`` in this version, or None."""
        return self._table.at(return_address)

    def frame_maps_for_site(self, site_id: int) -> tuple[FrameMap, ...]:
        """Every frame map of ``site_id`` (entry and resume copies)."""
        return self._table.for_site(site_id)

    def contains(self, address: int) -> bool:
        """Whether absolute ``address`` lies in this version's ``.text``."""
        start, end = self.code_range
        return start <= address < end

    def _unload(self):
        """Unmap this version's code and forget it in the unwinder.

        Only a version that is not current can be unloaded
        (:class:`~osrjit.errors.VersionInUse` otherwise); the caller must know
        that no frame of it is live and no thread is about to enter it.
        """
        runtime = self._runtime()
        if runtime is None:
            raise RuntimeClosed("the runtime of this version is gone")
        runtime._unload_version(self)

    def __repr__(self):
        state = "" if self.loaded else ", unloaded"
        return (f"<Version {self.name} #{self.id} .text [{self.code_range[0]:#x}, "
                f"{self.code_range[1]:#x}) {len(self.frame_maps)} frame maps{state}>")


class _Function:
    """Per-name state: the slot cell, the signature and the loaded versions."""

    def __init__(self, name: str, params: tuple[str, ...], return_type: str, slot):
        self.name = name
        self.params = params
        self.return_type = return_type
        self.slot = slot                 # ctypes.c_uint64: current entry address
        self.versions: list[Version] = []
        self.current: Version | None = None


class JitFunction:
    """Python entry to a compiled function; each call runs the *current* version.

    The slot is read at every call, so a call made after a new version was
    published runs the new version. Arguments are Python ints (64-bit signed).
    A pending exception (a hook that raised, a division by zero, ...) is
    raised here when the native call returns.
    """

    def __init__(self, runtime: "Runtime", fn: _Function):
        self._services = runtime._services
        self._native = runtime._native
        self._fn = fn
        restype = _RESTYPES.get(fn.return_type)
        if fn.return_type not in _RESTYPES:
            raise OsrJitError(f"{fn.name}: unsupported return type {fn.return_type!r}")
        # Every call goes through the runtime's entry thunk: it marks this
        # thread "in JIT" (waiting while the world is stopped), calls the
        # slot's current version, and marks it "outside" again.
        self._registry = runtime._registry
        thunk = runtime._support.entry_thunk(fn.return_type, len(fn.params))
        proto = ctypes.CFUNCTYPE(restype, ctypes.c_void_p, *[ctypes.c_int64] * len(fn.params))
        self._thunk = proto(thunk)
        self._slot_address = ctypes.addressof(fn.slot)

    @property
    def name(self) -> str:
        return self._fn.name

    @property
    def arity(self) -> int:
        return len(self._fn.params)

    def __call__(self, *args):
        fn = self._fn
        if len(args) != len(fn.params):
            raise TypeError(f"{fn.name}() takes {len(fn.params)} arguments "
                            f"({', '.join(fn.params)}), {len(args)} given")
        for a in args:
            if not isinstance(a, int):
                raise TypeError(f"{fn.name}() takes ints, got {type(a).__name__}")
            if not _INT64_MIN <= a <= _INT64_MAX:
                raise OverflowError(f"{fn.name}(): argument {a} does not fit in 64 bits")
        if self._native.closed:
            raise RuntimeClosed(f"cannot call {fn.name}: the runtime is closed")
        self._registry.current()           # attach this thread on its first call
        outer = self._services.enter()
        try:
            result = self._thunk(self._slot_address, *args)
        finally:
            exc = self._services.leave(outer)
        if exc is not None:
            raise exc
        return result

    def __repr__(self):
        return f"<JitFunction {self.name}({', '.join(self._fn.params)})>"


# --------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------

class Runtime:
    """Compiles functions into versions and runs the current one.

    ``opt_level``: 0-3, for both the IR pipeline and code generation.
    ``compiler``: ``"inprocess"`` (default) or ``"worker"`` — optimise and
    emit versions in a child process (:mod:`osrjit.compiler`); use it in
    long-lived processes that replace often: llvmlite's pass pipeline leaks
    about 60 KB of native memory per compile in the process that runs it.
    ``walker``: how :meth:`replace` walks the stopped stacks — ``"python"``
    (:func:`unwinder.walk`, the reference) or ``"native"``
    (:class:`unwinder.NativeWalker`, same frames, a walk that needed Python
    anywhere is redone by the reference).
    ``calls``: how reference-language code calls *other* functions —
    ``"slot"`` (load the callee's ``osrjit.slot.<name>`` cell and call through
    it: publishing a version is one store) or ``"direct"`` (``call rel32``,
    patched to the new version on every replacement: no indirection at run
    time). Self-calls are direct in both modes and patched the same way.

    ``transfer``: how a hijacked frame is rebuilt when its callee returns into
    the deopt stub — ``"python"`` (:func:`deopt.transfer.return_through_stub`
    called back through ctypes) or ``"native"`` (:mod:`deopt.native_transfer`:
    per-version code generated from the frame maps and a per-thread LIFO of
    hijacks, no Python on the path; a frame it cannot handle takes the Python
    transfer, counted in :meth:`stats`).

    Lifetime: owns one LLJIT for its runtime stubs, one LLJIT per version
    (llvmlite cannot drop a JITDylib, so a version's LLJIT goes with it) and
    every version's code (through a private owner, see
    :class:`_NativeResources`). :meth:`close` (or leaving a ``with`` block)
    unmaps all code, trackers before their LLJIT; no compiled function may be
    running then. Thread-safe for compiling and calling.
    """

    def __new__(cls, *, backend: str = "native", **kwargs):
        if backend == "emulated":
            from .emulated.runtime import EmulatedRuntime   # the one upward import, lazy
            # Native-only choices: the emulated backend has one transfer (a
            # hypercall running the Python one), the Python walker and no LLJIT.
            for option, only in (("transfer", "python"), ("walker", "python"),
                                 ("compiler", "inprocess")):
                if kwargs.pop(option, only) != only:
                    raise ValueError(f"the emulated backend supports {option}={only!r} only")
            return EmulatedRuntime(**kwargs)
        if backend != "native":
            raise ValueError(f"unknown backend {backend!r} (use 'native' or 'emulated')")
        return super().__new__(cls)

    def __init__(self, *, opt_level: int = 2, calls: str = abi.CALLS_SLOT,
                 backend: str = "native", compiler: str = "inprocess",
                 transfer: str = "python", walker: str = "python"):
        if not 0 <= opt_level <= 3:
            raise ValueError(f"opt_level must be 0..3, got {opt_level}")
        if calls not in abi.CALL_MODES:
            raise ValueError(f"calls must be one of {abi.CALL_MODES}, got {calls!r}")
        if compiler not in ("inprocess", "worker"):
            raise ValueError(f"compiler must be 'inprocess' or 'worker', got {compiler!r}")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        if walker not in ("python", "native"):
            raise ValueError(f"walker must be 'python' or 'native', got {walker!r}")
        #: How hijacked frames are rebuilt: ``"python"`` or ``"native"``.
        self.transfer = transfer
        #: How stopped stacks are walked in :meth:`replace` / :meth:`collect`:
        #: ``"python"`` (:func:`unwinder.walk`, the reference) or ``"native"``
        #: (:class:`unwinder.NativeWalker` via :mod:`osrjit.fastscan`).
        self.walker = walker
        self._walker_instance = None
        self._hijacker = None
        self._scan_buffers = fastscan.ScanBuffers()
        self._anchor_scan = fastscan.AnchorScan() if walker == "native" else None
        self._self_scans = {}             # addressof(ThreadState) -> fastscan.SelfScan
        # Counters of stats(): self-scans whose answer was used, applies left
        # to threads, and those the next stop-the-world did instead.
        self.self_scans_used = self.self_applies_left = self.self_applies_by_stopper = 0
        self._last_left = []              # (thread ident, SelfScan) of the last replace()
        self.opt_level = opt_level
        #: Where versions are optimised and emitted: ``"inprocess"``, or
        #: ``"worker"`` (:mod:`osrjit.compiler`: a child process, because
        #: llvmlite's pass pipeline leaks ~60 KB of native memory per run).
        self.compiler = compiler
        self.calls = calls
        self._call_sites = patching.CallSiteIndex()
        self._lock = threading.RLock()
        self._native = _NativeResources(opt_level)
        self._services = _Services()
        self._functions: dict[str, _Function] = {}
        self._ids = itertools.count(1)
        self._safepoint_flag = ctypes.c_int64(0)
        services = self._services
        self._native.keepalive.append(self._safepoint_flag)
        self._freed_versions = 0
        self._reclaim_later = []
        self._count_lock = threading.Lock()
        #: Why the last incomplete stack walk ended (old versions were kept), or None.
        self.last_incomplete_walk = None
        self.last_pause = None
        self._space = unwinder.AddressSpace.current_process()
        # Native transitions (entry thunks, hook/safepoint/error wrappers, the
        # transfer's status marking, the signal handler) and the threads.
        support = self._support = threads.SupportLibrary(self._native, self._space,
                                                         self._safepoint_flag)
        self._registry = threads.ThreadRegistry(support.key)
        try:
            self._signal = threads.RuntimeSignal(support.addresses["osrjit_signal_handler"])
        except OsrJitError:
            self._signal = None             # no free signal: stops rely on polls only
        self._world = threads.World(support, self._registry, self._signal)
        self._service_addresses = {
            abi.HOOK_SYMBOL: support.addresses["osrjit_hook"],
            abi.SAFEPOINT_SLOW_SYMBOL: support.addresses["osrjit_safepoint_slow"],
            abi.ERROR_SYMBOL: support.addresses["osrjit_error"],
            abi.SAFEPOINT_FLAG_SYMBOL: ctypes.addressof(self._safepoint_flag),
        }
        for cell, cb in (("osrjit_py_hook", _HOOK_TYPE(services.hook_service)),
                         ("osrjit_py_safepoint", _SAFEPOINT_SLOW_TYPE(services.safepoint_service)),
                         ("osrjit_py_error", _ERROR_TYPE(services.error_service))):
            self._native.keepalive.append(cb)
            support.set_service(cell, ctypes.cast(cb, ctypes.c_void_p).value)
        me = weakref.ref(self)
        registry = self._registry
        self._deopt = NativeDeopt(self._native, self._space,
                                  lambda record: me()._resume_target(record),
                                  lambda record, ok: me()._after_transfer(record, ok),
                                  lambda: ctypes.addressof(registry.current()))
        support.set_service("osrjit_py_transfer", self._deopt.callback_address)
        self._deopt.route_through(support.addresses["osrjit_transfer"])
        if walker == "native":
            self._translation_mirror()
        if transfer == "native":
            self._deopt.native = NativeTransferPath(
                self._native, self._space, lambda ts: ts.status == threads.DETACHED)
            support.set_service("osrjit_native_transfer", self._deopt.native.dispatch_address)

    # -- life cycle ------------------------------------------------------------

    def close(self):
        """Unmap every version and release the LLJIT. Idempotent.

        No compiled code may be running, and no hijacked frame may be pending
        (``stats()["pending_returns"] == 0``): their stubs go with the code.
        """
        with self._lock:
            if not self._native.closed:
                self._native_drain()
                pending = len(self._deopt.table)
                if pending:
                    raise VersionInUse(f"cannot close the runtime: {pending} hijacked frames "
                                       "have not returned yet (their stub and code would go)")
                self._support.set_service("osrjit_park_scan", 0)
                self._support.set_service("osrjit_park_apply", 0)
                for _ident, st, _name in self._registry.snapshot():
                    st.handshake = 0
                self._self_scans.clear()
                self._deopt.close()
                if self._signal is not None:
                    self._signal.close()
                if self._walker_instance is not None:
                    self._walker_instance.close()
            for fn in self._functions.values():
                for v in fn.versions:
                    v.loaded = False
            self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._native.closed:
            raise RuntimeClosed("the runtime is closed")

    # -- services --------------------------------------------------------------

    def on_hook(self, fn: Callable[[int], int] | None):
        """Install ``fn(value) -> int`` as the hook service (None removes it)."""
        self._services.hook = fn

    def on_safepoint(self, fn: Callable[[], None] | None):
        """Install ``fn()`` to run when a poll takes its slow path (None removes it)."""
        self._services.safepoint = fn

    @property
    def safepoint_flag(self) -> int:
        """1 while polls call the Python safepoint service (:meth:`on_safepoint`), else 0.

        Setting it nonzero sends every poll to its slow path, which calls the
        service; the runtime's own stop-the-world bit is separate.
        """
        return 1 if self._safepoint_flag.value & threads.FLAG_USER else 0

    @safepoint_flag.setter
    def safepoint_flag(self, value: int):
        if value:
            self._support.set_flag(threads.FLAG_USER)
        else:
            self._support.clear_flag(threads.FLAG_USER)

    # -- compiling -------------------------------------------------------------

    def compile(self, source: str, *, polls: bool = True) -> list[str]:
        """Compile reference-language ``source``; returns the names it defines.

        Functions already compiled may be called from ``source``; a name
        defined again gets a new version, which becomes current.
        """
        from . import lang
        with self._lock:
            known = {name: len(fn.params) for name, fn in self._functions.items()}
            irs = lang.compile_source(source, known=known, polls=polls, calls=self.calls)
            return self.compile_ir(irs)

    def compile_ir(self, function_irs: FunctionIR | Iterable[FunctionIR]) -> list[str]:
        """Compile IR authors' functions (see :mod:`osrjit.abi`); returns their names.

        All-or-nothing: every function is linked as a new version before any
        becomes current; if one fails (CompileError for IR LLVM rejects or
        symbols nobody provides, FrameMapError for records that do not fit
        their code), none of the batch is published.
        """
        if isinstance(function_irs, FunctionIR):
            function_irs = [function_irs]
        irs = list(function_irs)
        with self._lock:
            self._check_open()
            self._validate_batch(irs)
            new_slots = {ir.name: ctypes.c_uint64(0) for ir in irs if ir.name not in self._functions}
            linked: list[Version] = []
            try:
                for ir in irs:
                    linked.append(self._load(ir, new_slots))
            except BaseException:
                for v in linked:
                    self._discard(v)
                raise
            for cell in new_slots.values():
                self._native.keepalive.append(cell)
            for ir, v in zip(irs, linked):
                fn = self._functions.get(ir.name)
                if fn is None:
                    fn = self._functions[ir.name] = _Function(
                        ir.name, tuple(ir.params), ir.return_type, new_slots[ir.name])
                fn.versions.append(v)
                fn.current = v
                fn.slot.value = v.entry      # publish: callers read the slot at each call
                self._retarget_native(fn)
            self._retarget_direct_calls(irs)
            return [ir.name for ir in irs]

    def _validate_batch(self, irs: list[FunctionIR]):
        seen = set()
        for ir in irs:
            if not isinstance(ir, FunctionIR):
                raise TypeError(f"expected FunctionIR, got {type(ir).__name__}")
            if ir.name in seen:
                raise CompileError(f"function {ir.name!r} is defined twice in one batch")
            seen.add(ir.name)
            old = self._functions.get(ir.name)
            if old is not None and (len(old.params) != len(ir.params)
                                    or old.return_type != ir.return_type):
                raise CompileError(
                    f"cannot redefine {ir.name!r} with a different signature: "
                    f"{len(old.params)} parameters -> {len(ir.params)}, returning "
                    f"{old.return_type} -> {ir.return_type} (compiled callers use the old one)")
            if ir.return_type not in _RESTYPES:
                raise CompileError(f"{ir.name}: unsupported return type {ir.return_type!r}")

    def _emit(self, ir: FunctionIR) -> bytes:
        if self.compiler == "worker":
            from .compiler import shared_worker
            return shared_worker().emit(ir, self.opt_level)
        return emit_object(ir, self._native.tm, self.opt_level)

    def _imports(self, ir: FunctionIR, image: ObjectImage,
                 new_slots: Mapping[str, ctypes.c_uint64]) -> dict[str, int]:
        """Address of every symbol the object needs; CompileError for unknown ones."""
        imports = {}
        for sym in image.undefined_symbols:
            if sym.startswith(abi.SLOT_PREFIX):
                callee = sym[len(abi.SLOT_PREFIX):]
                fn = self._functions.get(callee)
                cell = fn.slot if fn is not None else new_slots.get(callee)
                if cell is None:
                    raise CompileError(f"{ir.name} calls {callee!r}, which is neither compiled "
                                       "nor in this batch")
                imports[sym] = ctypes.addressof(cell)
            elif sym.startswith(abi.DIRECT_CALL_PREFIX):
                # Linked through a stub for now; _retarget_direct_calls points
                # the call itself at the callee once every version is linked.
                callee = sym[len(abi.DIRECT_CALL_PREFIX):]
                fn = self._functions.get(callee)
                if fn is not None and fn.current is not None:
                    imports[sym] = fn.current.entry
                elif callee in new_slots:
                    imports[sym] = patching.placeholder_address()
                else:
                    raise CompileError(f"{ir.name} calls {callee!r}, which is neither compiled "
                                       "nor in this batch")
            elif sym in self._service_addresses:
                imports[sym] = self._service_addresses[sym]
            else:
                address = _process_symbol(sym)
                if address is None:
                    raise CompileError(f"{ir.name}: undefined symbol {sym!r}")
                imports[sym] = address
        return imports

    def _load(self, ir: FunctionIR, new_slots) -> Version:
        obj = self._emit(ir)
        imports = self._imports(ir, ObjectImage(obj, {}, name=ir.name), new_slots)
        vid = next(self._ids)
        library = f"osrjit.{vid}.{ir.name}"
        builder = llvm.JITLibraryBuilder().add_object_img(obj)
        for sym, address in imports.items():
            builder.import_symbol(sym, address)
        builder.export_symbol(ir.symbol).export_symbol(ir.resume_symbol)
        jit = self._native.jit_for(vid)
        try:
            tracker = builder.link(jit, library)
        except RuntimeError as e:
            self._native.release(vid)
            raise CompileError(f"{ir.name}: linking failed: {e}") from None
        self._native.adopt(vid, tracker, None)
        try:
            entry, resume = tracker[ir.symbol], tracker[ir.resume_symbol]
            load_addresses = ObjectImage.infer_load_addresses(
                obj, {ir.symbol: entry, ir.resume_symbol: resume})
            image = ObjectImage(obj, load_addresses, name=f"{ir.name} v{vid}")
            code_range = image.code_range
            if code_range is None:
                raise FrameMapError(f"{ir.name} v{vid}: .text was not loaded")
            table = _fm.frame_maps_for_object(image, ir.sites, function=ir.name, version=vid)
            self._call_sites.add(vid, obj, load_addresses, patching.callee_symbols(ir))
            registration = _register(obj, load_addresses, f"{ir.name}.v{vid}")
            if registration is not None:
                self._native.adopt(vid, tracker, registration)
                if self.walker == "native":
                    # Its unwind table now, not in the pause of the first
                    # stop-the-world that meets its frames.
                    self._native_walker().prepare([registration[1]])
        except BaseException:
            if vid in self._call_sites:
                self._call_sites.remove(vid)
            self._native.release(vid)
            raise
        return Version(self, vid, ir, obj, load_addresses, entry, resume, code_range, table)

    # -- queries ---------------------------------------------------------------

    def _function(self, name: str) -> _Function:
        fn = self._functions.get(name)
        if fn is None:
            raise UnknownFunction(name)
        return fn

    def function(self, name: str) -> JitFunction:
        """A Python callable running the current version of ``name`` (UnknownFunction if none)."""
        self._check_open()
        return JitFunction(self, self._function(name))

    def names(self) -> list[str]:
        """Every compiled function's name, in first-compiled order."""
        return list(self._functions)

    def versions(self, name: str) -> list[Version]:
        """The loaded versions of ``name``, oldest first (the last is not
        necessarily current after an unload; see :meth:`current`)."""
        return list(self._function(name).versions)

    def current(self, name: str) -> Version:
        """The version the slot of ``name`` points at."""
        return self._function(name).current

    def version_at(self, address: int) -> Version | None:
        """The loaded version whose ``.text`` contains absolute ``address``, or None."""
        for fn in self._functions.values():
            for v in fn.versions:
                if v.contains(address):
                    return v
        return None

    def check_compatible(self, old: Version, new: Version) -> None:
        """Raise :class:`deopt.IncompatibleVersion` unless frames of ``old`` can
        resume in ``new`` (see :func:`deopt.framemaps.check_compatible`)."""
        check_versions_compatible(old, old.frame_maps, new)

    # -- replacement -------------------------------------------------------------

    def replace(self, names, source, *, polls: bool = True,
                timeout: float | None = None) -> list[Version]:
        """Replace the functions ``names`` with new versions, frames and all.

        ``names``: a function name or a list of them. ``source``:
        reference-language source defining exactly those functions (it may call
        any compiled function), or :class:`~osrjit.abi.FunctionIR` object(s)
        for IR authors. Steps, in order (nothing that can run is modified
        before step 4):

        1. compile and link the new versions (not yet callable); plan
           everything that does not depend on the stacks (direct-call
           patches — those in the new code are written now —, native
           transfer targets, which old versions are compatible, the scan's
           tables);
        2. walk every thread's stack (seeing through hijacked slots) and
           find every frame of an old version of a replaced function;
        3. check that every old version with frames can resume in its new
           version (:class:`deopt.IncompatibleVersion` otherwise; the new
           versions are discarded and the stack is left untouched);
        4. publish the new versions (new calls run them; direct calls in
           current code are patched; those in old code too, or, if no thread
           runs old code outside a site, right after step 5's release);
        5. hijack: the return-address slot of every such frame now points at
           the deopt stub; when its callee returns, the frame is rebuilt in the
           *current* version of its function and continues there. Frames
           already hijacked toward an older replacement need no new write: a
           transfer always targets the current version;
        6. free every old version with no pending returns.

        May be called from any thread, also from a hook, i.e. from inside JIT
        code (the frame that called the hook is suspended at that site and
        transfers when the hook returns). Steps 2-5 run with the world stopped:
        every other thread that runs JIT code parks at its next safepoint poll,
        or, if it does not within a short grace period (poll-free code), on the
        runtime's signal; threads in a hook or idle count as stopped (their
        JIT frames are frozen below their last transition). If some thread
        does not stop within ``timeout`` seconds (default
        ``rt.safepoint_timeout``), :class:`osrjit.threads.SafepointTimeout`
        names it and nothing is modified. Returns the new versions.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("replace() needs at least one function name")
        with self._lock:
            self._check_open()
            for name in names:
                self._function(name)          # UnknownFunction before compiling anything
            irs = self._replacement_irs(names, source, polls)
            new_versions = self._link_batch(irs)
            try:
                # Before the pause: the native transfer code, the direct-call
                # patches (planned from one read of /proc/self/maps; nothing
                # maps or unmaps the runtime's code while its lock is held)
                # and the hijack records the native transfer took meanwhile.
                self._prepare_native(names)
                patches, memory = self._plan_direct_calls(
                    irs, {n: v.entry for n, v in new_versions.items()})
                # Calls in the new versions' own code can be patched now: no
                # thread can reach it before it is published.
                early, patches = _calls_in(
                    patches, [v.code_range for v in new_versions.values()])
                patching.apply_patches(early, memory)
                # Calls in code that is old once the new versions are published
                # may be patched after the release if no thread runs old code
                # (see the end of this method); the others in the pause.
                deferrable, current = _calls_in(
                    patches, [v.code_range for fn in self._functions.values()
                              for v in fn.versions if fn.name in names or v is not fn.current])
                targets = self._plan_native_targets(names, new_versions)
                self._native_drain()
                # Which loaded versions could not resume in their new version
                # (raised in the pause only if one of them has frames), and
                # what the scan looks for.
                incompatible = self._incompatible_versions(names, new_versions)
                context = self._scan_context(set(names))
                self._warm_scan(context, set(names))
            except BaseException:
                for v in new_versions.values():
                    self._discard(v)
                raise
            # The threads that park at a poll walk and plan their own stacks
            # on the way (SelfScan); the others are scanned in the pause.
            requests = None
            try:
                requests = self._request_self_scans(context)
                t0 = time.perf_counter()
                others = self._world.stop(timeout=timeout)
            except BaseException:
                self._end_self_scans(requests)
                for v in new_versions.values():
                    self._discard(v)
                raise
            t1 = time.perf_counter()
            batches = deferred = []
            try:
                try:
                    self._settle_self_applies(stopped=True)
                    self._native_drain(settle=False)
                    stack = (self._collect_self_scanned(others, context)
                             or self._collect_frames(set(names), others, context))
                    if incompatible:
                        for old in stack.versions():
                            if old in incompatible:
                                raise incompatible[old]
                    t_scan = time.perf_counter()
                except BaseException:
                    for v in new_versions.values():
                        self._discard(v)
                    raise
                deferred = deferrable if stack.quiet else []
                now = current if stack.quiet else patches
                self._publish(irs, new_versions, (now, memory), targets)
                batches = self._hijack(stack, context)
            finally:
                try:
                    self._native_commit()
                finally:
                    t2 = time.perf_counter()
                    # Deferred patches are written with the table's lock held:
                    # the only way back into old code — a transfer that fails
                    # and returns into its frame's old code — takes that lock
                    # first (the Python transfer's take()), so no thread runs
                    # code whose page is writable for a moment.
                    table = self._deopt.table
                    if deferred:
                        table.lock.acquire()
                    self._world.release()
                    try:
                        self._end_self_scans(requests)
                        if deferred:
                            patching.apply_patches(deferred, memory)
                    finally:
                        try:
                            if batches:
                                self._record_batches(batches)
                        finally:
                            if deferred:
                                table.lock.release()
            #: Seconds of the last replace(): ``time_to_safepoint`` (request ->
            #: all other threads stopped), ``scan`` (stopped -> every stack
            #: walked and the versions checked), ``hijack`` (-> published,
            #: slots written, LIFOs committed) and ``pause`` (request ->
            #: release issued: the flag cleared and parked threads woken right
            #: after — how soon this thread runs again once they compete for
            #: the CPUs is not part of the pause), plus ``threads`` and
            #: ``frames_hijacked``.
            self.last_pause = {"time_to_safepoint": t1 - t0, "scan": t_scan - t1,
                               "hijack": t2 - t_scan, "pause": t2 - t0,
                               "threads": len(others) + 1, "frames_hijacked": len(stack)}
            self._deopt.table.flush_mirror()      # the pause hijacked them; now their mirror
            self._reclaim_all()
            return [new_versions[name] for name in names]

    def _replacement_irs(self, names, source, polls):
        return replacement_irs(names, source, polls=polls, calls=self.calls,
                               known={n: len(fn.params) for n, fn in self._functions.items()})

    def _link_batch(self, irs):
        """Link ``irs`` as new versions without publishing them: {name: Version}."""
        self._validate_batch(irs)
        linked = {}
        try:
            for ir in irs:
                linked[ir.name] = self._load(ir, {})
        except BaseException:
            for v in linked.values():
                self._discard(v)
            raise
        return linked

    def _publish(self, irs, versions, patches, targets):
        """Make ``versions`` current; ``patches``: from :meth:`_plan_direct_calls`;
        ``targets``: from :meth:`_plan_native_targets`."""
        for ir in irs:
            fn = self._functions[ir.name]
            v = versions[ir.name]
            fn.versions.append(v)
            fn.current = v
            fn.slot.value = v.entry
        if self._deopt.native is not None:
            self._deopt.native.apply_retarget(targets)
        patching.apply_patches(*patches)

    def _plan_native_targets(self, names, new_versions):
        """Native transfer targets pointing the loaded versions of ``names`` at
        their new versions, made before the pause (stored by :meth:`_publish`)."""
        ntx_path = self._deopt.native
        if ntx_path is None:
            return []
        plan = []
        for name in names:
            plan += ntx_path.plan_retarget(self._functions[name].versions, new_versions[name])
        return plan

    def _retarget_direct_calls(self, irs):
        """Point every direct call to a function of ``irs`` — in every loaded
        version, old ones included — and every call ``irs`` make directly at
        the callee's current entry (fills link-time placeholders, bypasses
        the linker's stubs). All patches are planned before any is written."""
        patching.apply_patches(*self._plan_direct_calls(irs, {}))

    def _plan_direct_calls(self, irs, entries):
        """``(patches, memory map)`` for :meth:`_retarget_direct_calls`, to be
        applied with :func:`osrjit.patching.apply_patches` before any mapping
        of the runtime's code changes (the runtime lock held throughout).
        ``entries``: name -> entry address for functions whose new version is
        not published yet (else the current version's entry)."""
        names = {ir.name for ir in irs}
        for ir in irs:
            names |= set(ir.direct_callees)
        plans = []
        memory = None            # one read of /proc/self/maps for all of it
        for name in sorted(names):
            fn = self._functions.get(name)
            entry = entries.get(name)
            if entry is None and fn is not None and fn.current is not None:
                entry = fn.current.entry
            if entry is not None:
                memory = memory or patching.MemoryMap.current()
                plans.extend(self._call_sites.plan_retarget(name, entry, memory))
        return plans, memory

    def _discard(self, version):
        """Unmap a version that was never published."""
        version.loaded = False
        if self._deopt.native is not None:
            self._deopt.native.forget(version)
        if version.id in self._call_sites:
            self._call_sites.remove(version.id)
        self._native.release(version.id)

    @staticmethod
    def _new_for(old, new_versions):
        return new_versions[old.name]

    def _incompatible_versions(self, names, new_versions):
        """``{loaded version of names: IncompatibleVersion}`` for those whose
        frames could not resume in their new version."""
        out = {}
        for name in names:
            for old in self._functions[name].versions:
                try:
                    self.check_compatible(old, self._new_for(old, new_versions))
                except IncompatibleVersion as e:
                    out[old] = e
        return out

    def _scan_context(self, names):
        """What a native scan for ``names`` needs that does not depend on the
        stopped stacks (built before the world stops; valid while the runtime
        lock is held and no version is published or freed), or None for the
        reference walker."""
        if self.walker != "native":
            return None
        versions = [v for fn in self._functions.values() for v in fn.versions]
        translation = self._translation_mirror()
        translation.snapshot()            # built now; again in the pause only if it changed
        tables = fastscan.WatchTables(versions, names, self._is_old)
        ntx_path = self._deopt.native
        self._scan_buffers.reset()        # the previous scan's arrays are no longer used
        walker, hijacker = self._native_walker(), self._native_hijacker()
        if self._anchor_scan is not None:
            self._anchor_scan.prepare(hijacker, walker, tables, self._scan_buffers)
            self._anchor_scan.translate(translation.snapshot())
        return {"index": fastscan.VersionIndex(versions), "tables": tables,
                "translation": translation, "walker": walker, "hijacker": hijacker,
                "anchor_scan": self._anchor_scan,
                "descriptors": None if ntx_path is None else ntx_path.descriptors(tables.meta)}

    def _request_self_scans(self, context):
        """Ask every other attached thread with known stack bounds to scan
        itself when it parks (:class:`osrjit.fastscan.SelfScan`); before the
        world stops. Returns what :meth:`_end_self_scans` takes (also on
        error: what was requested is withdrawn and the walker unpinned)."""
        if context is None or self._hijacker is None:
            return None
        # Applies threads finished: their LIFO entries count now (also those
        # of threads that exited since; a block still applying is kept).
        for scan in self._self_scans.values():
            scan.settle()
        walker = context["walker"]
        pin = walker.pin()
        pin.__enter__()                   # the tables handed out stay until the end
        requested = {}
        try:
            me = threading.get_ident()
            translation = context["translation"].snapshot()
            entry, tables_address = walker.entry_address, walker.tables_address
            attached = self._registry.snapshot()
            keys = {ctypes.addressof(st) for _, st, _ in attached}
            # Forget the blocks of threads gone (none of them can be in use).
            self._self_scans = {k: v for k, v in self._self_scans.items()
                                if k in keys or v.applying() or v.pending_lifo is not None}
            for ident, st, _ in attached:
                key = ctypes.addressof(st)
                scan = self._self_scans.get(key)
                if scan is None:
                    scan = self._self_scans[key] = fastscan.SelfScan()
                if ident == me or scan.applying():
                    continue              # (an apply left to it comes first: the pause does it)
                bounds = self._registry.stack_bounds(ident)
                if bounds is None:
                    continue
                requested[key] = scan
                scan.request(entry, tables_address, translation, context["tables"], bounds, st)
                st.handshake = scan.address
        except BaseException:
            self._end_self_scans((requested, pin, None))
            raise
        context["self_scans"] = requested
        return requested, pin, translation

    def _settle_self_applies(self, stopped):
        """Settle the applies left to threads (:meth:`_hijack`) that are done;
        with the world ``stopped``, first do here those a thread has not
        done yet (it is stopped, so it cannot be doing it)."""
        if not self._self_scans:
            return
        apply = self._hijacker.park_apply
        for scan in self._self_scans.values():
            if stopped and scan.applying():
                apply(scan.address)
                self.self_applies_by_stopper += 1
            scan.settle()

    def _end_self_scans(self, requests):
        """Withdraw :meth:`_request_self_scans`' requests (answered or not) and
        unpin the walker; no thread uses their arguments afterwards."""
        if requests is None:
            return
        requested, pin, _translation = requests
        try:
            cancel = self._hijacker.cancel
            for scan in requested.values():
                cancel(scan.address)
        finally:
            pin.__exit__(None, None, None)

    def _is_old(self, v):
        """Whether version ``v`` is no longer its function's current one."""
        return self._functions[v.name].current is not v

    def _warm_scan(self, context, names):
        """Run the native scan's code once on this thread's own stack, writing
        nothing, just before the world stops: the pause then starts with that
        code and its tables in the caches instead of after the compile."""
        if context is None:
            return

        def scan(regs):
            fastscan.plan_native(
                context["hijacker"], context["walker"], regs, caller_frame=True,
                index=context["index"], tables=context["tables"], replaced=names,
                is_old=self._is_old, thread=threading.get_ident(),
                translation=context["translation"],
                bounds=lambda rsp, thread: threads.current_stack_bounds(),
                reference=lambda: iter(()), buffers=self._scan_buffers)
        try:
            unwinder.with_captured_registers(scan)
        except Exception:  # noqa: BLE001 - a warm-up only: the scan proper reports problems
            pass
        finally:
            self._scan_buffers.reset()    # its arrays serve the scan proper

    def _collect_self_scanned(self, others, context):
        """What :meth:`_collect_frames` returns, when every other thread parked
        at a poll and scanned itself completely and this thread has no JIT
        frame (the common case, read straight from the answers); else None."""
        self_scans = None if context is None else context.get("self_scans")
        if not self_scans or len(self_scans) != len(others):
            return None
        mine = self._registry.attached()
        if mine is not None and mine.anchor[7]:
            return None                   # JIT frames of ours below a hook: the general path
        tables = context["tables"]
        answers = []
        for ident, state, _ in others:
            scan = self_scans.get(ctypes.addressof(state))
            if scan is None or threads.settled_status(state) != threads.PARKED:
                return None
            done = scan.answer(tables, ident)
            if done is None or done[0].incomplete is not None:
                return None
            done[1].state = state
            answers.append(done)
        plan = fastscan.ScanPlan()
        executing = set()
        for result, arrays in answers:
            plan.threads.append(arrays)
            executing |= result.executing
        self.self_scans_used += len(answers)
        self._mark_executing(executing)
        plan.quiet = not executing
        return plan

    def _collect_frames(self, names, others=(), context=None) -> fastscan.ScanPlan:
        """Frames of versions of ``names`` on every stopped thread's stack.

        ``context``: from :meth:`_scan_context` (made here if None).
        Returns a :class:`osrjit.fastscan.ScanPlan`: the pending frames, as
        tuples ``(version, frame map, slot, pc, thread ident)`` (``slot`` None
        for a frame already hijacked: its slot holds the stub) or, from the
        native scan, as per-thread arrays. Nothing is written.
        Recomputes :attr:`Version.executing` for every old version: a frame of
        it that is not suspended at a site (an innermost frame interrupted by
        the runtime's signal, or a call that is not a site), or an entry
        address of it in a signal-stopped thread's registers, keeps it loaded.
        ``others``: ``(ident, ThreadState, name)`` of the stopped other threads.
        """
        executing = set()
        plan = fastscan.ScanPlan()
        found = plan.tuples
        incomplete = []
        # Every stack read here is stopped (other threads parked, ours below
        # the capture point), so 4 KiB pages can be cached for this scan
        # (made on first need: the native paths read no memory from Python).
        cache = []

        def memory():
            if not cache:
                cache.append(unwinder.ProcessMemory(page_cache=True))
            return cache[0]
        is_old = self._is_old

        if self.walker == "native":
            if context is None:
                context = self._scan_context(names)
            index, tables = context["index"], context["tables"]
            translation = context["translation"]
            native_walker, hijacker = context["walker"], context["hijacker"]
            me = threading.get_ident()
            own = threads.current_stack_bounds()

            def known_bounds(ident):
                return own if ident == me else self._registry.stack_bounds(ident)
            bounds = fastscan.scan_bounds(known_bounds)
            anchor_scan = context["anchor_scan"]
            translated = []               # anchor_scan given the translation (on first use)

        self_scans = (context or {}).get("self_scans") or {}

        def from_anchor(state, ident, parked):
            # The thread's own scan, made while it parked at a poll for this
            # stop; else one native call here for the whole thread when it can.
            done = None
            scan = self_scans.get(ctypes.addressof(state)) if parked else None
            if scan is not None:
                done = scan.answer(tables, ident)
                if done is not None:
                    self.self_scans_used += 1
            if done is None and self.walker == "native" and anchor_scan is not None:
                if not translated:
                    anchor_scan.translate(translation.snapshot())
                    translated.append(True)
                done = anchor_scan.thread(state, ident, known_bounds(ident))
            if done is not None:
                result, arrays = done
                arrays.state = state
                plan.threads.append(arrays)
                executing.update(result.executing)
                if result.incomplete is not None:
                    incomplete_walk(result.incomplete)
                return
            aregs = threads.anchor_registers(state)
            if aregs is not None:
                classify(aregs, ident, True, state)

        def incomplete_walk(reason):
            # Frames of old versions may hide below: free none of them this time.
            self.last_incomplete_walk = reason
            incomplete.append(reason)
            for fn in self._functions.values():
                executing.update(v for v in fn.versions if v is not fn.current)

        def classify(regs, ident, caller_frame, state=None):
            def reference():
                return unwinder.walk(regs, memory(), self._space, caller_frame=caller_frame)
            if self.walker == "native":
                result, arrays = fastscan.plan_native(
                    hijacker, native_walker, regs, caller_frame=caller_frame, index=index,
                    tables=tables, replaced=names, is_old=is_old, thread=ident,
                    translation=translation, bounds=bounds, reference=reference,
                    buffers=self._scan_buffers)
                found.extend(result.pending)
                if arrays is not None:
                    arrays.state = state
                    plan.threads.append(arrays)
            else:
                result = stackscan.classify_frames(reference(), self.version_at, names,
                                                   is_old, ident)
                found.extend((p.version, p.frame_map, p.slot, p.pc, p.thread)
                             for p in result.pending)
            executing.update(result.executing)
            if result.incomplete is not None:
                incomplete_walk(result.incomplete)

        def scan(regs):
            if regs is not None:
                # Our own stack: walked from inside the capture, so it stays put.
                classify(regs, threading.get_ident(), True)
            else:
                # Our own JIT frames lie below our last transition out of JIT
                # code (a hook's anchor), frozen while we run above it — the
                # rule the other threads' scans follow too. No anchor: no
                # JIT call of ours is active on this thread.
                mine = self._registry.attached()
                if mine is not None:
                    from_anchor(mine, threading.get_ident(), False)
            for ident, state, _ in others:
                status = threads.settled_status(state)
                if status == threads.PARKED_SIGNAL and state.ucontext:
                    uregs = threads.ucontext_registers(state, memory())
                    for value in uregs.values():    # an entry loaded, not yet called
                        v = self.version_at(value)
                        if v is not None:
                            executing.add(v)
                    classify(uregs, ident, False, state)
                elif status in (threads.PARKED, threads.OUTSIDE):
                    from_anchor(state, ident, status == threads.PARKED)

        if self.walker == "native":
            scan(None)
        else:
            unwinder.with_captured_registers(scan)
        self._mark_executing(executing)
        plan.quiet = not executing and not incomplete
        return plan

    def _mark_executing(self, executing):
        """Set :attr:`Version.executing` of every version from a scan's set."""
        for fn in self._functions.values():
            for v in fn.versions:
                v.executing = v in executing

    def _native_walker(self):
        """This runtime's :class:`unwinder.NativeWalker` (made on first use)."""
        if self._walker_instance is None:
            self._walker_instance = unwinder.NativeWalker(self._space)
        return self._walker_instance

    def _translation_mirror(self):
        """Keep an :class:`unwinder.ReturnAddressTable` in step with the hijack
        table, for the native walker (installed before the first hijack)."""
        table = self._deopt.table
        if table.mirror is None:
            table.mirror = unwinder.ReturnAddressTable(
                self._deopt.stub_address, {r.slot: r.original_ra for r in table.records()})
        table.flush_mirror()
        return table.mirror

    def _native_hijacker(self):
        """This runtime's :class:`osrjit.selfscan.SelfScanHijacker` (compiled on first use)."""
        if self._hijacker is None:
            self._hijacker = selfscan.link_hijacker(self._native, HIJACK_LIBRARY_ID,
                                                    f"osrjit.hijack.{id(self):x}")
            # Threads scan themselves when they park for a replace(), and
            # write their own hijacks as they wake (SelfScan).
            self._support.set_service("osrjit_park_scan", self._hijacker.park_scan_address)
            self._support.set_service("osrjit_park_apply", self._hijacker.park_apply_address)
        return self._hijacker

    def _hijack(self, plan, context=None):
        """Write the stub into every slot of ``plan`` (world stopped) and
        record the pending returns (hijack table, counts, native LIFOs);
        ``context``: the scan's (:meth:`_scan_context`), if any. Returns the
        natively hijacked batches, whose records :meth:`_record_batches` makes
        (it must be called, also on error: the table's lock is held until then)."""
        memory = self._deopt.memory
        ntx_path = self._deopt.native
        self._last_left = []
        states = ({i: st for i, st, _ in self._registry.snapshot()}
                  if ntx_path is not None and plan.tuples else {})
        for version, fm, slot, pc, ident in plan.tuples:
            if slot is None:
                continue                      # already hijacked: retargeted at transfer time
            record = self._deopt.table.hijack(slot, pc, fm, version, memory, thread=ident)
            with self._count_lock:
                version.pending_returns += 1
            if ntx_path is not None:
                ntx_path.push(record, states.get(ident))
        batches = [h for h in plan.threads if h.m]
        if not batches:
            return []
        hijacker = self._native_hijacker()
        stub = self._deopt.stub_address
        descriptors_of = {}               # id(meta) -> descriptor per kind
        if context is not None and context.get("descriptors") is not None:
            descriptors_of[id(context["tables"].meta)] = context["descriptors"]

        def descriptors_for(h):
            descriptors = descriptors_of.get(id(h.meta))
            if descriptors is None:
                descriptors = descriptors_of[id(h.meta)] = ntx_path.descriptors(h.meta)
            return descriptors
        # Frames a thread planned itself as it parked are written by that
        # thread as it wakes (on its own core, before it runs JIT code): no
        # check, it has not run since. The others are checked here, every
        # thread before any is written: a failure leaves every stack as it was.
        own = [h for h in batches if h.self_scan is not None]
        here = [h for h in batches if h.self_scan is None]
        for h in here:
            bad = hijacker.apply(h.slots, h.ras, h.m, stub, 0)
            if bad:
                raise HijackError(f"slot {h.slots[bad - 1]:#x} of thread {h.thread} no longer "
                                  f"holds the return address {h.ras[bad - 1]:#x}, or the "
                                  f"slots do not rise")
        # From the first stub written (or left to write) until the records
        # exist (after the world is released: see _record_batches) a
        # transfer's take() must wait.
        self._deopt.table.lock.acquire()
        done = []                         # written, or left to write: to record
        try:
            for h in own:
                if ntx_path is None:
                    h.self_scan.leave_apply(stub)
                    done.append(h)
                    continue
                descriptors = descriptors_for(h)
                expected = sum(c for k, c in h.hijacked_per_kind().items() if descriptors[k])
                room = (ntx_path.reserve_hijacked(h.state, expected, h.slots[h.m - 1])
                        if expected and h.state is not None else None)
                if expected and room is None:
                    here.append(h)        # its LIFO needs a merge: written here
                    continue
                ntx_path.unsupported += h.m - expected
                if room is None:
                    h.self_scan.leave_apply(stub)
                else:
                    lifo, address, top = room
                    try:
                        h.self_scan.leave_apply(stub, descriptors, lifo, address, top)
                    except BaseException:
                        lifo.unreserve()
                        raise
                done.append(h)
            self._last_left = [(h.thread, h.self_scan) for h in done]
            self.self_applies_left += len(done)
            for h in here:
                hijacker.apply(h.slots, h.ras, h.m, stub, 1)
                done.append(h)
                if ntx_path is not None:
                    d = descriptors_for(h).buffer_info()[0]
                    ntx_path.push_hijacked(
                        h.state,
                        lambda address, h=h, d=d: hijacker.lifo(address, h.slots, h.ras,
                                                                h.kinds, h.m, d),
                        h.m, h.slots[h.m - 1])
        except BaseException:
            self._record_batches(done)        # the stubs written or left: record them now
            raise
        return batches

    def _record_batches(self, batches):
        """The hijack records and counts of what :meth:`_hijack` wrote natively
        (after the world is released, the table's lock still held from
        :meth:`_hijack`; released here)."""
        table = self._deopt.table
        try:
            for h in batches:
                slots, ras, kinds = h.hijack_arrays()
                per_kind = h.hijacked_per_kind()
                table.add_batch(HijackBatch(slots, ras, kinds, h.meta, h.thread, per_kind))
                with self._count_lock:
                    for k, c in per_kind.items():
                        h.meta[k][1].pending_returns += c
        finally:
            table.lock.release()

    # -- the native transfer's bookkeeping (runtime lock held) ----------------

    def _prepare_native(self, names):
        """Compile the native transfer code of every loaded version of ``names``."""
        ntx = self._deopt.native
        if ntx is not None:
            for name in names:
                for v in self._functions[name].versions:
                    ntx.prepare(v)

    def _retarget_native(self, fn):
        """Point the old versions' native frame maps at ``fn.current``."""
        if self._deopt.native is not None:
            self._deopt.native.retarget(fn.versions, fn.current)

    def _native_drain(self, settle=True):
        """Drop the hijack records the native transfer took (any time; first,
        unless ``settle`` is False, settle the applies threads have done)."""
        if settle:
            self._settle_self_applies(stopped=False)
        if self._deopt.native is not None:
            self._account_native(self._deopt.native.drain())

    def _native_commit(self):
        """Write the threads' LIFOs before the world is released (its callers
        drained right after the world stopped)."""
        if self._deopt.native is not None:
            self._account_native(self._deopt.native.commit(drain=False))

    def _account_native(self, taken):
        """What :meth:`_after_transfer` does for Python transfers, for the
        ``taken`` slots (transferred natively)."""
        if not taken:
            return
        owners = self._deopt.table.take_many(taken)
        with self._count_lock:
            for owner, n in owners.items():
                owner.pending_returns -= n
        self._deopt.native.transfers += len(taken)
        self._reclaim_later.extend(owners)

    def collect(self, *, timeout: float | None = None) -> int:
        """Stop the world, re-scan every stack, free old versions nothing runs.

        Versions kept because a thread was executing them outside any site
        are freed by the first collection that finds no such frame. Returns
        the number of versions freed.
        """
        with self._lock:
            self._check_open()
            before = self._freed_versions
            self._world.stop(timeout=timeout)
            try:
                self._settle_self_applies(stopped=True)
                self._native_drain(settle=False)
                others = [t for t in self._registry.snapshot() if t[0] != threading.get_ident()]
                self._collect_frames(set(), others)
            finally:
                try:
                    self._native_commit()
                finally:
                    self._world.release()
            self._reclaim_all()
            return self._freed_versions - before

    def _reclaim_all(self):
        self._native_drain()
        if self._deopt.native is not None:
            self._deopt.native.prune()    # LIFOs of threads gone, outside the pause
        for fn in list(self._functions.values()):
            for v in list(fn.versions):
                self._maybe_reclaim(v)
        while self._reclaim_later:
            self._maybe_reclaim(self._reclaim_later.pop())

    def _resume_target(self, record) -> ResumeTarget:
        """Where the frame of a hijack record continues: the current version."""
        old = record.owner
        fn = self._functions.get(old.name)
        if fn is None or fn.current is None:
            raise TransferError(f"{old.name} has no current version")
        return resume_target(record, fn.current)

    def _after_transfer(self, record, ok):
        old = record.owner
        with self._count_lock:
            old.pending_returns -= 1
            if not ok:
                old.pinned = True             # the frame runs the old code after all
        # Never wait for the runtime lock here: a replace() holding it may be
        # waiting for this very transfer to finish (stop-the-world).
        if self._lock.acquire(blocking=False):
            try:
                self._maybe_reclaim(old)
            finally:
                self._lock.release()
        else:
            self._reclaim_later.append(old)

    def _maybe_reclaim(self, version):
        """Free ``version`` if nothing can run it any more."""
        fn = self._functions.get(version.name)
        if (fn is None or fn.current is version or not version.loaded
                or version.pending_returns or version.pinned or version.executing):
            return False
        if self._call_sites.sites_reaching(*version.code_range):
            version.pinned = True             # a direct call still leads into it
            return False
        self._unload_version(version)
        self._freed_versions += 1
        return True

    def stats(self) -> dict:
        """Counters: ``live_versions`` (name -> loaded versions), ``pending_returns``
        (hijacked slots not yet returned through), ``freed_versions``,
        ``transfers`` (frames rebuilt in a new version), ``transfer_failures``
        (frames that returned into old code instead; see
        ``last_transfer_error``), ``hijacks`` (slots ever hijacked),
        ``pinned_versions`` (old versions kept because a frame may still run them),
        ``stops`` (stop-the-world pauses), ``signals_sent`` (threads stopped by the
        runtime's signal rather than at a poll), ``attached_threads``.

        How frames were transferred: ``native_transfers`` (by the native
        transfer) and ``python_transfers`` (by the Python one: every transfer
        with ``transfer="python"``, the fallbacks with ``"native"``);
        ``native_unsupported`` (hijacked frames the native transfer cannot
        rebuild: no native case for their frame map, or no thread block),
        ``lifo_searches`` (records found below the top of their thread's LIFO),
        ``lifo_misses`` (stub returns whose slot was not in the LIFO) and
        ``native_handed`` (records found whose frame has no target in the
        current version: the Python transfer reports the failure); 0 with
        ``transfer="python"``.

        Threads that did their own part (``walker="native"``; see
        :class:`osrjit.fastscan.SelfScan`): ``self_scans`` (stacks a thread
        walked and planned itself as it parked for a ``replace()``),
        ``self_applies`` (hijacks left to a thread to write as it woke) and
        ``self_applies_by_stopper`` (of those, the ones the next
        stop-the-world wrote because the thread had not woken yet).

        Records the native transfer took are dropped here (and at every
        stop-the-world), so counts are exact when no thread is transferring."""
        with self._lock:
            self._native_drain()
            # Reclaims a transfer had to defer (the lock was busy) happen now.
            while self._reclaim_later:
                self._maybe_reclaim(self._reclaim_later.pop())
            ntx = self._deopt.native
            native = ({"lifo_searches": 0, "lifo_misses": 0, "handed_to_python": 0}
                      if ntx is None else ntx.counters())
            return {
                "live_versions": {n: len(fn.versions) for n, fn in self._functions.items()},
                "pending_returns": len(self._deopt.table),
                "freed_versions": self._freed_versions,
                "transfers": self._deopt.transfers + (ntx.transfers if ntx else 0),
                "native_transfers": ntx.transfers if ntx else 0,
                "python_transfers": self._deopt.transfers,
                "native_unsupported": ntx.unsupported if ntx else 0,
                "lifo_searches": native["lifo_searches"],
                "lifo_misses": native["lifo_misses"],
                "native_handed": native["handed_to_python"],
                "transfer_failures": self._deopt.failures,
                "hijacks": self._deopt.table.hijacks,
                "pinned_versions": sum(1 for fn in self._functions.values() for v in fn.versions
                                       if (v.pinned or v.executing) and v is not fn.current),
                "stops": self._world.stops,
                "signals_sent": self._world.signals_sent,
                "attached_threads": len(self._registry.snapshot()),
                "self_scans": self.self_scans_used,
                "self_applies": self.self_applies_left,
                "self_applies_by_stopper": self.self_applies_by_stopper,
            }

    def self_apply_times(self, *, timeout: float = 1.0) -> list:
        """``[(thread ident, seconds)]``: how long each thread that wrote its
        own hijacks after the last :meth:`replace` took to write them (stubs,
        LIFO entries; measured by the thread, CLOCK_MONOTONIC), once it woke.
        A thread does that before it runs JIT code again, so for it the world
        stood still that much longer than ``last_pause["pause"]``. Waits up to
        ``timeout`` seconds for threads not done yet (None for those). Valid
        until the next ``replace()``."""
        deadline = time.monotonic() + timeout
        out = []
        for ident, scan in list(self._last_left):
            while scan.applying() and time.monotonic() < deadline:
                time.sleep(0.0001)
            b = scan.block
            done = not scan.applying() and b.apply_end_ns
            out.append((ident, (b.apply_end_ns - b.apply_start_ns) / 1e9 if done else None))
        return out

    @property
    def safepoint_timeout(self) -> float:
        """Seconds :meth:`replace` waits for other threads to stop (default 5)."""
        return self._world.timeout

    @safepoint_timeout.setter
    def safepoint_timeout(self, seconds: float):
        self._world.timeout = float(seconds)

    @property
    def last_transfer_error(self):
        """The exception of the last transfer that fell back to old code, or None."""
        return self._deopt.last_error

    def _unload_version(self, version: Version):
        with self._lock:
            fn = self._function(version.name)
            if fn.current is version:
                raise VersionInUse(f"{version.name} version {version.id} is current; publish "
                                   "another version before unloading it")
            if version not in fn.versions:
                return
            fn.versions.remove(version)
            version.loaded = False
            if version.id in self._call_sites:
                self._call_sites.remove(version.id)
            self._native.release(version.id)
            if self._deopt.native is not None:
                # No LIFO entry of it is pending (pending_returns is 0), so
                # no thread runs or will run its transfer code.
                self._deopt.native.forget(version)
