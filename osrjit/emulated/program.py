"""Reference-language (and IR authors') functions loaded into a :class:`Machine`.

The emulated counterpart of :class:`osrjit.Runtime`'s loading half: every
:class:`~osrjit.abi.FunctionIR` is emitted with :func:`osrjit.compiling.emit_object`
(the same bytes the native runtime links), loaded by
:mod:`osrjit.emulated.loader`, registered with the machine's unwinder, and its
``.llvm_stackmaps`` become :mod:`deopt` frame maps. The runtime services of
:mod:`osrjit.abi` live in emulated memory or are hypercalls:

====================================  ==========================================
``osrjit.slot.<name>``                an 8-byte emulated cell holding the entry
                                      of ``<name>``'s current version
``osrjit.fn.<name>`` (direct calls)   the entry of ``<name>``'s current version
                                      at link time (not re-patched here)
``osrjit_safepoint_flag``             an 8-byte emulated cell (:attr:`safepoint_flag`)
``osrjit_hook``                       hypercall: :meth:`on_hook`'s ``fn(x) -> int``
``osrjit_safepoint_slow``             hypercall: :meth:`on_safepoint`'s ``fn(thread)``
``osrjit_error``                      hypercall: the thread's first error
====================================  ==========================================

Errors behave as in the native runtime: a hook that raises, a hook result
out of int64, a missing hook, or ``osrjit_error`` make the *thread's* first
pending exception (:attr:`EmuThread.pending`); the service returns 0 and
:meth:`EmulatedProgram.call` raises it when the thread finishes.

Lifetime: made for one machine (``EmulatedProgram(machine)``); versions stay
loaded until :meth:`EmulatedProgram.forget` (frames may still return into them).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

from deopt import framemaps as _fm
from deopt.framemaps import FrameMapTable, ObjectImage
from osrjit import abi
from osrjit.abi import FunctionIR
from osrjit.compiling import emit_object, target_machine
from osrjit.errors import CompileError, EmulationError, UnknownFunction
from osrjit.services import Services, call_hook, error_for_code
from osrjit.versions import Version

from .loader import LoadedObject
from .machine import EmuThread, Machine

__all__ = ["EmulatedProgram", "EmuVersion"]



class EmuVersion(Version):
    """One version of a function loaded into emulated memory: a
    :class:`osrjit.versions.Version` whose addresses are emulated ones and
    whose ``library`` (also ``object``) is the :class:`LoadedObject`."""

    def __init__(self, vid: int, ir: FunctionIR, obj: LoadedObject, table: FrameMapTable):
        text = obj.load_addresses[".text"]
        code_range = (text, next(hi for lo, hi in obj.ranges if lo == text))
        super().__init__(vid, ir, obj.data, obj.load_addresses, obj.symbol(ir.symbol),
                         obj.symbol(ir.resume_symbol), code_range, table, library=obj)

    object = property(lambda self: self.library)


class EmulatedProgram:
    """Functions and runtime services in one :class:`Machine` (see the module docstring).

    ``opt_level``: 0-3 for both the IR pipeline and code generation, as in
    :class:`osrjit.Runtime`. ``object_cache``: see :attr:`object_cache`.
    """

    def __init__(self, machine: Machine, *, opt_level: int = 2,
                 object_cache: dict | None = None, services: Services | None = None):
        self.machine = machine
        #: The hook function lives here (shared with a runtime's services).
        self.services = services or Services()
        #: Optional dict shared between programs: (module IR, symbol, opt
        #: level) -> emitted object bytes, so machines that load the same
        #: versions (a sweep) compile each once.
        self.object_cache = object_cache
        self.opt_level = opt_level
        self.tm = target_machine(opt_level)
        self.flag_address = machine.alloc_cell(8)
        self.slots: dict[str, int] = {}
        self._versions: dict[str, list[EmuVersion]] = {}
        self._current: dict[str, EmuVersion] = {}
        self._ids = itertools.count(1)
        self.safepoint_fn: Callable[[EmuThread], None] | None = None
        #: Every value the hook service was called with, in call order.
        self.hook_calls: list[int] = []
        #: Number of times a poll took its slow path.
        self.safepoint_calls = 0
        self._services = {
            abi.HOOK_SYMBOL: machine.hypercall(abi.HOOK_SYMBOL, self._hook_service),
            abi.SAFEPOINT_SLOW_SYMBOL: machine.hypercall(abi.SAFEPOINT_SLOW_SYMBOL,
                                                         self._safepoint_service),
            abi.ERROR_SYMBOL: machine.hypercall(abi.ERROR_SYMBOL, self._error_service),
            abi.SAFEPOINT_FLAG_SYMBOL: self.flag_address,
        }

    # -- services ----------------------------------------------------------------

    def on_hook(self, fn: Callable[[int], int] | None):
        """Install ``fn(value) -> int`` as the hook service (None removes it)."""
        self.services.hook = fn

    @property
    def hook_fn(self) -> Callable[[int], int] | None:
        return self.services.hook

    def on_safepoint(self, fn: Callable[[EmuThread], None] | None):
        """Install ``fn(thread)`` to run when a poll takes its slow path; it may
        clear :attr:`safepoint_flag`, park the thread or stop the world."""
        self.safepoint_fn = fn

    @property
    def safepoint_flag(self) -> int:
        """The emulated word polls test; nonzero sends every poll to its slow path."""
        return self.machine.read_i64(self.flag_address)

    @safepoint_flag.setter
    def safepoint_flag(self, value: int):
        self.machine.write_u64(self.flag_address, int(value))

    @staticmethod
    def _set_pending(thread: EmuThread, exc: BaseException):
        if thread.pending is None:
            thread.pending = exc

    def _hook_service(self, machine: Machine, thread: EmuThread) -> int:
        value = thread.arg(0, signed=True)
        self.hook_calls.append(value)
        if thread.pending is not None:
            return 0
        try:
            return call_hook(self.hook_fn, value, "EmulatedProgram.on_hook")
        except Exception as exc:  # noqa: BLE001 - becomes the thread's pending exception
            self._set_pending(thread, exc)
            return 0

    def _safepoint_service(self, machine: Machine, thread: EmuThread):
        self.safepoint_calls += 1
        if thread.pending is not None:
            return None
        try:
            if self.safepoint_fn is not None:
                self.safepoint_fn(thread)
        except Exception as exc:  # noqa: BLE001
            self._set_pending(thread, exc)
        return None

    def _error_service(self, machine: Machine, thread: EmuThread):
        self._set_pending(thread, error_for_code(thread.arg(0, signed=True)))
        return None

    # -- loading -------------------------------------------------------------------

    def compile(self, source: str, *, polls: bool = True, calls: str = abi.CALLS_SLOT) -> list[str]:
        """Compile reference-language ``source`` (:func:`osrjit.lang.compile_source`)
        and load it; returns the names defined."""
        from osrjit import lang
        known = {name: len(v.ir.params) for name, v in self._current.items()}
        irs = lang.compile_source(source, known=known, polls=polls, calls=calls)
        self.load(irs)
        return [ir.name for ir in irs]

    def load(self, firs: FunctionIR | Iterable[FunctionIR], *,
             publish: bool = True) -> list[EmuVersion]:
        """Emit, place, link and publish a batch of versions (new current versions).

        All objects of the batch are placed before any is linked, so direct
        calls between them (``osrjit.fn.<g>``) resolve to the batch's entries.
        With ``publish=False`` the versions are loaded but not yet callable
        through their slots (see :meth:`publish`).
        """
        if isinstance(firs, FunctionIR):
            firs = [firs]
        firs = list(firs)
        names = [f.name for f in firs]
        if len(set(names)) != len(names):
            raise CompileError(f"a function is defined twice in one batch: {names}")
        m = self.machine
        vids = {f.name: next(self._ids) for f in firs}
        placed, linked = [], []
        try:
            versions = self._link_batch(firs, vids, placed, linked)
        except BaseException:
            # All or nothing: what was placed or linked for the batch goes.
            for p in placed:
                if p is not None:
                    m.discard_placed(p)
            for obj in linked:
                m.unload_object(obj)
            raise
        for v in versions:
            self._versions.setdefault(v.name, []).append(v)
        if publish:
            self.publish(versions)
        return versions

    def _link_batch(self, firs, vids, placed, linked) -> list[EmuVersion]:
        """Emit, place and link ``firs`` and read their frame maps; fills
        ``placed`` (an entry becomes None once linked) and ``linked`` as it
        goes, so that :meth:`load` can undo a batch that fails."""
        m = self.machine
        for f in firs:
            data = self._emit(f)
            placed.append(m.place_object(data, name=f"{f.name}.v{vids[f.name]}"))
        batch_entries = {f.symbol: p.symbols.get(f.symbol) for f, p in zip(firs, placed)}
        batch_names = {abi.DIRECT_CALL_PREFIX + f.name: p.symbols.get(f.symbol)
                       for f, p in zip(firs, placed)}
        for f in firs:
            if f.name not in self.slots:
                self.slots[f.name] = m.alloc_cell(8)

        def resolve(sym: str) -> int | None:
            if sym.startswith(abi.SLOT_PREFIX):
                return self.slots.get(sym[len(abi.SLOT_PREFIX):])
            if sym in self._services:
                return self._services[sym]
            if sym.startswith(abi.DIRECT_CALL_PREFIX):
                if sym in batch_names:
                    return batch_names[sym]
                cur = self._current.get(sym[len(abi.DIRECT_CALL_PREFIX):])
                return None if cur is None else cur.entry
            return batch_entries.get(sym)

        versions = []
        for i, (f, p) in enumerate(zip(firs, list(placed))):
            placed[i] = None                      # link_object unmaps it if it fails
            obj = m.link_object(p, resolve, export=False)
            linked.append(obj)
            image = ObjectImage(obj.data, obj.load_addresses, name=obj.name)
            table = _fm.frame_maps_for_object(image, f.sites, function=f.name,
                                              version=vids[f.name])
            versions.append(EmuVersion(vids[f.name], f, obj, table))
        return versions

    def publish(self, versions: Iterable[EmuVersion]):
        """Make ``versions`` current: new calls through the slots run them."""
        for v in versions:
            self._current[v.name] = v
            self.machine.write_u64(self.slots[v.name], v.entry)

    def forget(self, version: EmuVersion):
        """Drop a version that is not current from the program and unmap its code
        (the caller knows nothing can run it)."""
        if self._current.get(version.name) is version:
            raise EmulationError(f"{version.name} version {version.id} is current")
        self._versions[version.name].remove(version)
        self.machine.unload_object(version.object)

    def _emit(self, f: FunctionIR) -> bytes:
        if self.object_cache is None:
            return emit_object(f, self.tm, self.opt_level)
        key = (f.module_ir, f.symbol, self.opt_level)
        data = self.object_cache.get(key)
        if data is None:
            data = self.object_cache[key] = emit_object(f, self.tm, self.opt_level)
        return data

    # -- queries ---------------------------------------------------------------------

    def current(self, name: str) -> EmuVersion:
        try:
            return self._current[name]
        except KeyError:
            raise UnknownFunction(name) from None

    def versions(self, name: str) -> list[EmuVersion]:
        return list(self._versions.get(name, ()))

    def names(self) -> list[str]:
        return list(self._current)

    def version_at(self, address: int) -> EmuVersion | None:
        """The version whose ``.text`` contains absolute ``address``, or None."""
        for vs in self._versions.values():
            for v in vs:
                if v.contains(address):
                    return v
        return None

    # -- running -----------------------------------------------------------------------

    def spawn(self, name: str, *args: int, **kwargs) -> EmuThread:
        """A thread that calls the current version of ``name`` (through its slot)."""
        v = self.current(name)
        if len(args) != len(v.ir.params):
            raise TypeError(f"{name}() takes {len(v.ir.params)} arguments, {len(args)} given")
        entry = self.machine.read_u64(self.slots[name])
        return self.machine.spawn(entry, args, name=kwargs.pop("thread_name", name), **kwargs)

    def state_buffer(self, values: Iterable[int]) -> int:
        """A fresh emulated array of 8-byte slots holding ``values`` (absolute address)."""
        values = list(values)
        address = self.machine.alloc_cell(8 * max(1, len(values)))
        for i, value in enumerate(values):
            self.machine.write_u64(address + 8 * i, value)
        return address

    def spawn_resume(self, version: EmuVersion, site_id: int, result: int = 0,
                     values: Mapping[str, int] | None = None, **kwargs) -> EmuThread:
        """A thread that calls ``version``'s resume entry at ``site_id`` with a
        state built from ``result`` and the live values by name (see
        :mod:`osrjit.abi`: ``state[0]`` result, ``state[1 + i]`` = ``live[i]``)."""
        values = dict(values or {})
        live = version.sites[site_id].live
        missing = {v.name for v in live} - set(values)
        extra = set(values) - {v.name for v in live}
        if missing or extra:
            raise EmulationError(f"{version.name} site {site_id} needs {[v.name for v in live]}; "
                                 f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        state = [0] * (abi.STATE_LIVE_BASE + len(live))
        state[abi.STATE_RESULT_INDEX] = result
        for i, v in enumerate(live):
            state[abi.STATE_LIVE_BASE + i] = values[v.name]
        address = self.state_buffer(state)
        return self.machine.spawn(version.resume_entry, (site_id, address),
                                  name=kwargs.pop("thread_name", f"{version.name}__resume"),
                                  **kwargs)

    def call(self, name: str, *args: int, seed: int = 0, quantum=(1, 100)) -> int:
        """Run ``name(*args)`` in a new thread (with every other runnable
        thread) and return its result; its pending exception is raised."""
        thread = self.spawn(name, *args)
        self.machine.run(seed, quantum, raise_on_fault=False)
        return finish(thread)


def finish(thread: EmuThread) -> int:
    """The thread's result, raising its fault or pending exception first."""
    result = thread.result
    if thread.pending is not None:
        raise thread.pending
    return result
