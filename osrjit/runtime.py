"""The versioned JIT: compile functions into versions, replace them frames and all.

:class:`Runtime` is the one place where osrjit's policy lives, whatever runs
the code: the function table (:mod:`osrjit.versions`), the services
(:mod:`osrjit.services`), the ``replace()`` algorithm, transfer accounting,
reclamation and :meth:`Runtime.stats`. A *backend* runs the code
(:mod:`osrjit.backend` is the seam): ``backend="native"``
(:mod:`osrjit.native`, LLJIT in this process, the default) or
``backend="emulated"`` (:mod:`osrjit.emulated`, the same objects on a
unicorn CPU, for sweeps; it returns an :class:`osrjit.emulated.EmulatedRuntime`,
a :class:`Runtime` with the emulator's controls added).
"""
from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from deopt.errors import DeoptError
from unwinder.errors import UnwindError
from deopt.framemaps import check_compatible as _check_maps
from deopt.transfer import ResumeTarget, TransferError

from . import abi, plainir
from .abi import FunctionIR
from .backend import PauseReport
from .compiling import replacement_irs, validate_batch
from .errors import (IncompatibleVersion, OsrJitError, RuntimeClosed, SafepointTimeout,
                     VersionInUse, wrap_error)
from .reclaim import DEFAULT_INTERVAL, Reclaimer
from .services import Services
from .versions import Function, FunctionTable, Version

__all__ = ["Runtime", "Version", "PauseReport"]

#: ``Runtime(backend=...)`` choices.
BACKENDS = ("native", "emulated")


def _osrjit_errors(method):
    """Raise :mod:`deopt`'s and :mod:`unwinder`'s errors out of ``method`` as
    their :class:`OsrJitError` twins (the original as ``__cause__``)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OsrJitError:
            raise
        except (DeoptError, UnwindError) as e:
            raise wrap_error(e) from e
    return wrapper


class Runtime:
    """Compiles functions into versions and runs the current one.

    ``backend``: ``"native"`` (default) or ``"emulated"`` (see the module
    docstring; the emulated backend's own options are documented on
    :class:`osrjit.emulated.EmulatedRuntime`). ``opt_level``: 0-3, for both
    the IR pipeline and code generation. ``calls``: how reference-language
    code calls *other* functions — ``"slot"`` (through the callee's
    ``osrjit.slot.<name>`` cell: publishing is one store) or ``"direct"``
    (``call rel32``, patched on every replacement; native only). The native
    backend's options (``compiler``, ``transfer``, ``walker``: the fast
    paths by default, ``"reference"`` for the Python ones) are documented
    on :class:`osrjit.native.NativeBackend`. ``reclaim_interval``: seconds
    between background rechecks of old versions kept by a pending return
    or an executing frame (native backend; None: no background thread; see
    :mod:`osrjit.reclaim`).

    Lifetime: owns its backend and every version's code; :meth:`close` (or
    leaving a ``with`` block) unmaps it all; no compiled function may be
    running then. Thread-safe for compiling, calling and replacing (the
    emulated backend: one Python thread).
    """

    #: backend name -> the Runtime subclass that adds its controls (a
    #: subclass registers itself: ``class EmulatedRuntime(Runtime, backend="emulated")``).
    _subclasses: dict[str, type] = {}

    def __init_subclass__(cls, *, backend: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if backend is not None:
            Runtime._subclasses[backend] = cls

    def __new__(cls, *args, backend: str = "native", **kwargs):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (use 'native' or 'emulated')")
        if cls is Runtime:
            cls = Runtime._subclasses.get(backend, Runtime)
        return super().__new__(cls)

    def __init__(self, *, backend: str = "native", opt_level: int = 2,
                 calls: str = abi.CALLS_SLOT, reclaim_interval: float | None = DEFAULT_INTERVAL,
                 **options):
        if not 0 <= opt_level <= 3:
            raise ValueError(f"opt_level must be 0..3, got {opt_level}")
        if calls not in abi.CALL_MODES:
            raise ValueError(f"calls must be one of {abi.CALL_MODES}, got {calls!r}")
        self.opt_level = opt_level
        self.calls = calls
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._services = Services()
        self._functions = FunctionTable()
        self._freed_versions = 0
        self._reclaim_later: list[Version] = []
        self._closed = False
        #: stats() once closed (see close()).
        self._final_stats: dict | None = None
        #: ``fn()`` run in a fork child after the backend forgot the other
        #: threads, runtime lock held (see :meth:`_after_fork_in_child`): a
        #: collaborator that owns a thread or a lock of its own appends here.
        self._after_fork_hooks: list[Callable[[], None]] = []
        self._reclaimer = Reclaimer(self, reclaim_interval)
        self._after_fork_hooks.append(self._reclaimer.after_fork_in_child)
        #: Rescans of kept versions that stopped no thread; stops the
        #: background reclamation made (also counted in ``stops``).
        self._quiet_rescans = 0
        self._reclaim_stops = 0
        #: Frames rebuilt in a new version, by the Python and the native transfer.
        self.python_transfers = 0
        self.native_transfers = 0
        self.transfer_failures = 0
        #: The exception of the last transfer that fell back to old code, or None.
        self.last_transfer_error: BaseException | None = None
        #: Why the last incomplete stack walk ended (old versions were kept), or None.
        self.last_incomplete_walk: str | None = None
        #: The last replace()'s :class:`PauseReport`, or None.
        self.last_pause: PauseReport | None = None
        self._backend = self._make_backend(backend, options)
        _LIVE.add(self)
        if not self._backend.background_reclaim:
            self._reclaimer.interval = None

    def _make_backend(self, backend, options):
        from .native import NativeBackend
        return NativeBackend(self, **options)

    # -- life cycle ------------------------------------------------------------

    @_osrjit_errors
    def close(self, *, timeout: float = 0.0):
        """Unload every version and release the backend: everything the
        runtime took from the process (natively its pthread key, real-time
        signal, LLJITs, unwinder registrations, native buffers and every
        attached thread's block; see :class:`osrjit.native.NativeBackend`).
        Idempotent. A closed runtime holds no reference cycle that keeps it
        alive. Afterwards every method raises :class:`RuntimeClosed` but
        :meth:`close` and :meth:`stats` (which reports the last figures with
        nothing loaded) and the properties naming its configuration
        (:attr:`closed`, :attr:`backend`, :attr:`transfer`, :attr:`walker`,
        :attr:`compiler`).

        Waits up to ``timeout`` seconds (default 0: not at all) for other
        threads to leave compiled code — calls from Python starting
        meanwhile wait for the outcome — then raises :class:`RuntimeBusy`,
        releasing nothing and leaving the runtime working, if a thread is
        still inside compiled code (running it, or in a hook or service
        called from it) or a hijacked frame has not returned yet
        (``stats()["pending_returns"]``): their code and stubs would go.
        Called from a hook or service (the caller's own frames are below
        it), it raises at once.
        """
        if self._closed:
            return
        with self._backend.closing(timeout):
            with self._lock:
                if self._closed:
                    return
                final = self.stats()
                self._backend.close()
                self._closed = True
                self._reclaimer.close()
                for v in self._functions.all_versions():
                    v.loaded = False
                self._final_stats = final | {key: 0 for key in self._LOADED_FIGURES}
                self._final_stats["live_versions"] = {}
                self._after_fork_hooks.clear()

    #: stats() figures about what is loaded or attached: zero once closed.
    _LOADED_FIGURES = ("pending_returns", "pinned_versions", "attached_threads")

    # -- fork ------------------------------------------------------------------

    def _before_fork(self):
        # Held across fork(): the child starts with no replace, compile or
        # collect half done (the forking thread may hold the lock already).
        self._lock.acquire()
        self._backend.before_fork()

    def _after_fork_in_parent(self):
        self._backend.after_fork_in_parent()
        self._lock.release()

    def _after_fork_in_child(self):
        """The child of a ``fork()`` keeps using this runtime from the forking
        thread (the only thread there): the backend forgets the other
        threads and makes anew what they may have held, then
        :attr:`_after_fork_hooks` run (e.g. a background thread restarting)."""
        self._count_lock = threading.Lock()
        try:
            self._backend.after_fork_in_child()
            for hook in list(self._after_fork_hooks):
                hook()
        finally:
            self._lock.release()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> str:
        """``"native"`` or ``"emulated"``."""
        return self._backend.name

    @property
    def native_backend(self):
        """The :class:`osrjit.native.NativeBackend` (native runtimes): the seam
        tools and tests use to reach its collaborators (``world``,
        ``registry``, ``deopt``, ``scanner``, ``hijacker``, ``call_sites``,
        ``linker``). :class:`OsrJitError` on another backend."""
        self._check_open()
        if self._backend.name != "native":
            raise OsrJitError(f"this runtime's backend is {self._backend.name!r}")
        return self._backend

    @property
    def transfer(self) -> str:
        """How hijacked frames are rebuilt: ``"fast"`` (native code, the
        native backend's default) or ``"reference"`` (Python)."""
        return self._backend.transfer

    @property
    def walker(self) -> str:
        """How stopped stacks are walked: ``"fast"`` (native code, the native
        backend's default) or ``"reference"`` (Python)."""
        return self._backend.walker

    @property
    def compiler(self) -> str:
        """Where versions are emitted: ``"inprocess"`` or ``"worker"``."""
        return getattr(self._backend, "compiler", "inprocess")

    def self_apply_times(self, *, timeout: float = 1.0) -> list:
        """``[(thread ident, seconds)]``: how long each thread that wrote its
        own hijacks after the last :meth:`replace` took to write them (stubs,
        LIFO entries; measured by the thread, CLOCK_MONOTONIC), once it woke
        (``walker="fast"``; empty otherwise). A thread does that before it
        runs JIT code again, so for it the world stood still that much longer
        than ``last_pause.pause_seconds``. Waits up to ``timeout`` seconds
        for threads not done yet (None for those). Valid until the next
        ``replace()``."""
        self._check_open()
        hijacker = getattr(self._backend, "hijacker", None)
        return [] if hijacker is None else hijacker.apply_times(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeClosed("the runtime is closed")

    # -- services --------------------------------------------------------------

    def on_hook(self, fn: Callable[[int], int] | None):
        """Install ``fn(value) -> int`` as the hook service (None removes it)."""
        self._check_open()
        self._services.hook = fn

    def on_safepoint(self, fn: Callable[[], None] | None):
        """Install ``fn()`` to run when a poll takes its slow path (None removes it)."""
        self._check_open()
        self._services.safepoint = fn

    @property
    def safepoint_flag(self) -> int:
        """1 while polls call the safepoint service (:meth:`on_safepoint`), else 0.

        Setting it nonzero sends every poll to its slow path, which calls the
        service; the runtime's own stop-the-world bit is separate.
        """
        self._check_open()
        return self._backend.user_flag

    @safepoint_flag.setter
    def safepoint_flag(self, value: int):
        self._check_open()
        self._backend.user_flag = 1 if value else 0

    # -- compiling -------------------------------------------------------------

    def compile(self, source: str, *, polls: bool = True,
                filename: str | None = None) -> list[str]:
        """Compile reference-language ``source``; returns the names it defines.

        ``filename``: with it, the code carries DWARF line tables naming it
        (gdb's ``bt`` prints ``filename:line`` for its frames; see *perf and
        gdb* in the README).

        Functions already compiled may be called from ``source``; a name
        defined again gets a new version, which becomes current.
        """
        from . import lang
        with self._lock:
            self._check_open()
            irs = lang.compile_source(source, known=self._functions.arities(), polls=polls,
                                      calls=self.calls, filename=filename,
                                      stack_check=self._backend.stack_checks)
            return self.compile_ir(irs)

    @_osrjit_errors
    def compile_ir(self, function_irs, *, polls: bool = True) -> list[str]:
        """Compile IR authors' functions; returns their names.

        ``function_irs``: plain LLVM IR — text or an ``llvmlite.ir.Module``
        of ordinary functions, which osrjit instruments itself
        (:mod:`osrjit.plainir`; ``polls``: safepoint polls at function entry
        and loop headers) — or :class:`~osrjit.abi.FunctionIR` object(s)
        (see :mod:`osrjit.abi`).

        All-or-nothing: every function is linked as a new version before any
        becomes current; if one fails (CompileError for IR LLVM rejects or
        symbols nobody provides, FrameMapError for records that do not fit
        their code), none of the batch is published.
        """
        if isinstance(function_irs, FunctionIR):
            function_irs = [function_irs]
        with self._lock:
            self._check_open()
            function_irs = self._instrumented(function_irs, polls)
            irs = validate_batch(function_irs, self._functions.signatures())
            plainir.check_signatures(irs, self._functions)
            new_cells = {ir.name: self._backend.new_cell(ir.name)
                         for ir in irs if ir.name not in self._functions}
            linked = self._backend.link(irs, new_cells)
            for ir in irs:
                if ir.name not in self._functions:
                    self._functions.add(ir.name, ir.params, ir.return_type, new_cells[ir.name])
            for v in linked:
                self._functions.publish(v)
            self._backend.publish(linked)
            return [ir.name for ir in irs]

    def _instrumented(self, source, polls: bool):
        """``source`` as FunctionIRs if it is plain LLVM IR (text with a
        ``define`` line, or an ``llvmlite.ir.Module``); else unchanged."""
        if not plainir.is_plain_ir(source):
            return source
        return plainir.instrument(source, polls=polls, calls=self.calls,
                                  known_signatures=plainir.known_signatures(self._functions),
                                  stack_check=self._backend.stack_checks)

    # -- queries ---------------------------------------------------------------

    def function(self, name: str):
        """A Python callable running the current version of ``name`` (UnknownFunction if none)."""
        with self._lock:                      # its entry thunk may be linked: not while closing
            self._check_open()
            return self._backend.entry(self._functions.get(name))

    def names(self) -> list[str]:
        """Every compiled function's name, in first-compiled order."""
        self._check_open()
        return self._functions.names()

    def versions(self, name: str) -> list[Version]:
        """The loaded versions of ``name``, oldest first."""
        self._check_open()
        return list(self._functions.get(name).versions)

    def current(self, name: str) -> Version:
        """The version calls to ``name`` run now."""
        self._check_open()
        return self._functions.get(name).current

    def version_at(self, address: int) -> Version | None:
        """The loaded version whose ``.text`` contains absolute ``address``, or None."""
        self._check_open()
        return self._functions.version_at(address)

    def check_compatible(self, old: Version, new: Version) -> None:
        """Raise :class:`osrjit.IncompatibleVersion` unless frames of ``old`` can
        resume in ``new`` (see :func:`deopt.framemaps.check_compatible`)."""
        self._check_open()
        if old.name != new.name:
            raise IncompatibleVersion(f"versions of different functions: {old.name!r} "
                                      f"and {new.name!r}", reason="different functions")
        try:
            _check_maps(old.frame_maps, new.sites)
        except DeoptError as e:
            raise wrap_error(e) from e

    # -- replacement -------------------------------------------------------------

    @_osrjit_errors
    def replace(self, names, source, *, polls: bool = True,
                timeout: float | None = None, filename: str | None = None) -> list[Version]:
        """Replace the functions ``names`` with new versions, frames and all.

        ``names``: a function name or a list of them. ``source``:
        reference-language source defining exactly those functions (it may call
        any compiled function), plain LLVM IR (text or ``llvmlite.ir.Module``,
        see :meth:`compile_ir`), or :class:`~osrjit.abi.FunctionIR` object(s)
        for IR authors; ``filename`` names reference-language source in its
        line tables (as in :meth:`compile`). Steps, in order (nothing that can run is modified
        before step 4):

        1. compile and link the new versions (not yet callable); plan
           everything that does not depend on the stacks (which loaded
           versions could not resume in their new version; the backend's
           own plans: call patches, transfer targets, scan tables);
        2. stop every other thread running JIT code, walk every thread's
           stack (seeing through hijacked slots) and find every frame of a
           version of a replaced function;
        3. check that every old version with frames can resume in its new
           version (:class:`osrjit.IncompatibleVersion` otherwise; the new
           versions are discarded and every stack is left untouched);
        4. publish the new versions (new calls run them);
        5. hijack: the return-address slot of every such frame now points at
           its site's return stub (whose CFI lets debuggers and profilers walk
           on), which enters the deopt stub; when its callee returns, the frame
           is rebuilt in the *current* version of its function and continues
           there (every slot is checked before any is written);
        6. release the threads and free every old version with no pending
           returns.

        May be called from any thread, also from a hook, i.e. from inside JIT
        code (the frame that called the hook is suspended at that site and
        transfers when the hook returns). If some thread does not stop within
        ``timeout`` seconds (default :attr:`safepoint_timeout`),
        :class:`osrjit.SafepointTimeout` names it and nothing is modified.
        Every failure is an :class:`osrjit.OsrJitError` and publishes
        nothing: a step that fails after step 4 has the old versions made
        current and callable again before the threads are released, and the
        new ones discarded; the stacks are as before. Returns the new
        versions; :attr:`last_pause` reports the stop.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("replace() needs at least one function name")
        with self._lock:
            self._check_open()
            for name in names:
                self._functions.get(name)          # UnknownFunction before compiling anything
            irs = replacement_irs(names, self._instrumented(source, polls), polls=polls,
                                  calls=self.calls, known=self._functions.arities(),
                                  filename=filename, stack_check=self._backend.stack_checks)
            irs = validate_batch(irs, self._functions.signatures())
            plainir.check_signatures(irs, self._functions)
            linked = self._backend.link(irs, {})
            new = {v.name: v for v in linked}
            try:
                incompatible = self._incompatible_versions(names, new)
                pause = self._backend.pause(names, new)
            except BaseException:
                self._discard(linked)
                raise
            clock = time.perf_counter
            i0 = pause.instructions()
            t0 = clock()
            try:
                pause.stop(timeout)
            except BaseException:
                pause.abandon()
                self._discard(linked)
                raise
            t1, i1 = clock(), pause.instructions()
            scan = None
            try:
                try:
                    scan = pause.scan()
                    if incompatible:
                        for old in scan.versions():
                            if old in incompatible:
                                raise incompatible[old]
                    t_scan = clock()
                except BaseException:
                    if scan is not None:
                        self._functions.mark_executing(scan.executing)
                    self._discard(linked)
                    raise
                previous = [self._functions.get(v.name).current for v in linked]
                try:
                    for v in linked:
                        self._functions.publish(v)
                    pause.publish(linked)
                    pause.hijack(scan)         # every slot checked before any is written
                except BaseException:
                    self._functions.mark_executing(scan.executing)
                    self._unpublish(linked, previous, pause)
                    raise
            finally:
                try:
                    pause.finish()
                finally:
                    t2 = clock()
                    pause.release()
            i2 = pause.instructions()
            # Which old versions a frame still executes: only reclamation,
            # after the release, reads it.
            self._functions.mark_executing(scan.executing)
            self.last_pause = PauseReport(
                time_to_safepoint_seconds=t1 - t0, scan_seconds=t_scan - t1,
                hijack_seconds=t2 - t_scan, pause_seconds=t2 - t0, threads=pause.threads,
                frames_hijacked=len(scan), stopped_async=pause.stopped_async, quiet=scan.quiet,
                time_to_safepoint_instructions=None if i0 is None else i1 - i0,
                pause_instructions=None if i0 is None else i2 - i0)
            self._reclaim()
            self._recheck_later()
            return [new[name] for name in names]

    def _incompatible_versions(self, names, new):
        """``{loaded version of names: IncompatibleVersion}`` for those whose
        frames could not resume in their new version (raised in the pause
        only if one of them has frames)."""
        out = {}
        for name in names:
            for old in self._functions.get(name).versions:
                try:
                    self.check_compatible(old, new[name])
                except IncompatibleVersion as e:
                    out[old] = e
        return out

    def _unpublish(self, linked, previous, pause):
        """Undo a publish in the pause (a later step failed): ``previous``
        (the versions current before, in ``linked``'s order) are current and
        callable again, ``linked`` discarded. A frame hijacked before the
        failure transfers into its function's current version, the old one."""
        for v, old in zip(linked, previous):
            fn = self._functions.get(v.name)
            if v in fn.versions:
                fn.versions.remove(v)
            fn.current = old
        pause.withdraw()
        self._backend.publish(previous)
        self._discard(linked)

    def _discard(self, versions):
        for v in versions:
            v.loaded = False
            self._backend.discard(v)

    @_osrjit_errors
    def collect(self, *, timeout: float | None = None) -> int:
        """Stop the world now, re-scan every stack, free old versions nothing runs.

        Versions kept because a thread was executing them outside any site
        are freed by the first scan that finds no such frame; the runtime
        also rescans them by itself (:mod:`osrjit.reclaim`), ``collect()``
        only does it at once. Returns the number of versions freed.
        """
        with self._lock:
            self._check_open()
            before = self._freed_versions
            self._rescan(stop=True, timeout=timeout)
            self._recheck_later()
            return self._freed_versions - before

    def _rescan(self, *, stop: bool, timeout: float | None = None) -> bool:
        """Re-scan every stack, mark the versions a frame executes, reclaim
        (runtime lock held). ``stop`` False: only if no other thread runs
        JIT code (a quiet pause: nobody is interrupted or waited for);
        returns whether the stacks were scanned."""
        pause = self._backend.pause()
        if stop:
            try:
                pause.stop(timeout)
            except BaseException:
                pause.abandon()
                raise
        elif pause.try_stop():
            self._quiet_rescans += 1
        else:
            return False
        try:
            self._functions.mark_executing(pause.scan().executing)
        finally:
            try:
                pause.finish()
            finally:
                pause.release()
        self._reclaim()
        return True

    def _reclaim_wanted(self) -> bool:
        """Whether an old version waits for something that can end by
        itself: a pending return, or a frame executing it (runtime lock held)."""
        return bool(self._reclaim_later) or any(
            v.pending_returns or v.executing
            for v in self._functions.old_versions() if not v.pinned)

    def _may_recheck(self) -> bool:
        """Whether this thread may free versions now (not from inside emulated code)."""
        return True

    def _recheck_later(self):
        if self._reclaim_wanted():
            self._reclaimer.want(self._kept_executing())

    def _kept_executing(self) -> bool:
        return any(v.executing for v in self._functions.old_versions() if not v.pinned)

    def _reclaim_pass(self, *, stop: bool, timeout: float | None = None) -> bool:
        """A recheck (runtime lock held): account transfers, free what is
        free, rescan versions kept by an executing frame — quietly (no other
        thread runs JIT code), else with ``stop`` by a stop-the-world of at
        most ``timeout`` seconds (one that times out modifies nothing).
        Returns whether a version is still kept by something that can end
        by itself."""
        if self._closed:
            return False
        self._reclaim()
        if self._kept_executing():
            if not self._rescan(stop=False) and stop:
                try:
                    self._rescan(stop=True, timeout=timeout)
                    self._reclaim_stops += 1
                except SafepointTimeout:
                    pass                   # nothing was modified: the next tick retries
        return self._reclaim_wanted()

    @_osrjit_errors
    def unload(self, version: Version) -> None:
        """Unmap an old ``version`` now and forget it in the unwinder.

        Only a version that is not current can be unloaded
        (:class:`VersionInUse` otherwise); the caller must know that no frame
        of it is live and no thread is about to enter it (:meth:`collect`
        frees versions when it can prove that).
        """
        with self._lock:
            self._check_open()
            fn = self._functions.get(version.name)
            if fn.current is version:
                raise VersionInUse(f"{version.name} version {version.id} is current; publish "
                                   "another version before unloading it")
            if version not in fn.versions:
                return
            self._functions.remove(version)
            self._backend.free(version)

    # -- transfers and reclamation ----------------------------------------------

    def _resume_target(self, record) -> ResumeTarget:
        """Where the frame of a hijack record continues: its function's current
        version (:class:`TransferError` if that version lacks the site)."""
        fn = self._functions.find(record.owner.name)
        new = None if fn is None else fn.current
        if new is None:
            raise TransferError(f"{record.owner.name} has no current version")
        site = new.sites.get(record.frame_map.site_id)
        if site is None:
            raise TransferError(f"{record.owner.name} v{new.id} has no site "
                                f"{record.frame_map.site_id}")
        return ResumeTarget(new.resume_entry, site.id, tuple(lv.name for lv in site.live), new)

    def _after_transfer(self, record, ok: bool, error: BaseException | None = None):
        """A frame of ``record.owner`` returned through the stub (any thread):
        account it, and free its version if nothing else can return into it."""
        old = record.owner
        with self._count_lock:
            old.pending_returns -= 1
            if ok:
                self.python_transfers += 1
            else:
                self.transfer_failures += 1
                self.last_transfer_error = error
                old.pinned = True             # the frame runs the old code after all
        if not self._backend.reclaim_in_transfer:
            self._backend.request_reclaim(old)
            return
        # Never wait for the runtime lock here: a replace() holding it may be
        # waiting for this very transfer to finish (stop-the-world).
        if self._lock.acquire(blocking=False):
            try:
                self._maybe_reclaim(old)
            finally:
                self._lock.release()
        else:
            self._reclaim_later.append(old)
            self._reclaimer.want()

    def _native_transfers_taken(self, owners):
        """Frames the native transfer rebuilt: ``{old version: count}``."""
        with self._count_lock:
            for owner, n in owners.items():
                owner.pending_returns -= n
                self.native_transfers += n
        self._reclaim_later.extend(owners)

    def _frames_abandoned(self, owners):
        """Hijacked frames that will never return (their thread abandoned
        them, :class:`StackOverflow` or an interrupt): ``{old version: count}``
        (runtime lock held)."""
        with self._count_lock:
            for owner, n in owners.items():
                owner.pending_returns -= n
        self._reclaim_later.extend(owners)
        self._reclaim()

    def _reclaim(self):
        """Free every old version nothing can return into or is executing."""
        self._backend.before_reclaim()
        for v in self._functions.old_versions():
            self._maybe_reclaim(v)
        while self._reclaim_later:
            self._maybe_reclaim(self._reclaim_later.pop())

    def _maybe_reclaim(self, version) -> bool:
        """Free ``version`` if nothing can run it any more."""
        if (not version.loaded or not self._functions.is_old(version)
                or version.name not in self._functions):
            return False
        if (version.pending_returns or version.pinned or version.executing
                or not self._backend.can_free(version)):
            self._backend.keep(version)
            return False
        self._functions.remove(version)
        self._backend.free(version)
        self._freed_versions += 1
        return True

    # -- figures -----------------------------------------------------------------

    @_osrjit_errors
    def stats(self) -> dict:
        """Counters: ``live_versions`` (name -> loaded versions),
        ``pending_returns`` (hijacked slots not yet returned through),
        ``freed_versions``, ``transfers`` (frames rebuilt in a new version),
        ``native_transfers`` / ``python_transfers`` (of those, by the native
        transfer and by the Python one), ``transfer_failures`` (frames that
        returned into old code instead; see :attr:`last_transfer_error`),
        ``hijacks`` (slots ever hijacked), ``pinned_versions`` (old versions
        kept because a frame may still run them), ``stops`` (stop-the-world
        pauses), ``signals_sent`` (threads stopped without reaching a poll),
        ``attached_threads``, ``reclaim_rescans`` (rescans of kept versions
        that stopped no thread), ``reclaim_stops`` (stops the background
        reclamation made, part of ``stops``); then the backend's own figures
        (documented on :meth:`osrjit.native.NativeBackend.counters` and
        :meth:`osrjit.emulated.EmulatedBackend.counters`).

        A recheck runs first (see :mod:`osrjit.reclaim`): records a native
        transfer took are accounted, old versions nothing can run are freed,
        and versions kept by an executing frame are rescanned if no other
        thread runs JIT code. So the counts are exact when no other thread
        runs JIT code. Once the runtime is closed: the figures at the close,
        with nothing loaded (``live_versions`` empty; ``pending_returns``,
        ``pinned_versions`` and ``attached_threads`` 0)."""
        if self._closed:
            return dict(self._final_stats)
        with self._lock:
            if self._closed or not self._may_recheck():
                self._backend.before_reclaim()
            elif self._reclaim_pass(stop=False):
                self._reclaimer.want(self._kept_executing())
            fns = list(self._functions)
            out = {
                "live_versions": {fn.name: len(fn.versions) for fn in fns},
                "pending_returns": len(self._backend.table),
                "freed_versions": self._freed_versions,
                "transfers": self.python_transfers + self.native_transfers,
                "native_transfers": self.native_transfers,
                "python_transfers": self.python_transfers,
                "transfer_failures": self.transfer_failures,
                "hijacks": self._backend.table.hijacks,
                "pinned_versions": sum(1 for fn in fns for v in fn.versions
                                       if (v.pinned or v.executing) and v is not fn.current),
                "reclaim_rescans": self._quiet_rescans,
                "reclaim_stops": self._reclaim_stops,
            }
            out.update(self._backend.counters())
            return out

    @property
    def safepoint_timeout(self) -> float:
        """Seconds :meth:`replace` waits for other threads to stop (default 5)."""
        self._check_open()
        return self._backend.safepoint_timeout

    @safepoint_timeout.setter
    def safepoint_timeout(self, seconds: float):
        self._check_open()
        self._backend.safepoint_timeout = float(seconds)


#: Open runtimes, for the fork handlers (weakly: a dropped runtime is not kept).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_FORKING: list[Runtime] = []


def _before_fork():
    for rt in list(_LIVE):
        if not rt._closed:
            rt._before_fork()
            _FORKING.append(rt)


def _after_fork_in_parent():
    while _FORKING:
        _FORKING.pop()._after_fork_in_parent()


def _after_fork_in_child():
    while _FORKING:
        _FORKING.pop()._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
