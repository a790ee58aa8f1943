"""One owner per JIT library: the linked code, its LLJIT and its unwinder registration.

Every piece of native code the runtime links — a function version, the
thread support library, an entry thunk, the deopt stub, the native transfer
code, the hijack code — is a :class:`JitLibrary`, made by the runtime's
:class:`Linker`. A library releases what it holds in the one safe order:

1. forget the object in the unwinder (no walk may read its CFI afterwards);
2. dispose its ResourceTracker (this unmaps the code at once, and the next
   library may reuse the addresses);
3. dispose its own LLJIT, if it has one (llvmlite cannot remove a JITDylib
   from an LLJIT, so code that is freed alone gets an LLJIT of its own).

The llvmlite objects are marked ``_owned`` so that their own finalizers never
dispose them: only their library does, in that order. The linker releases
every library it made, newest first, before its shared LLJIT and target
machine (:meth:`Linker.close`), and keeps the cells and callbacks compiled
code can reach alive until then (:meth:`Linker.keep`).
"""
from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterable, Mapping

import llvmlite.binding as llvm

from deopt.framemaps import ObjectImage

from ..compiling import target_machine
from ..errors import CompileError
from ..ir import parse_module
from .tooling import JIT_DEBUG_LOCK, Tools

__all__ = ["JitLibrary", "Linker"]


class JitLibrary:
    """One linked object and everything that keeps it mapped and walkable.

    ``name``: the JITDylib's (unique) name. ``addresses``: exported symbol ->
    absolute address. ``load_addresses``: section name -> absolute address
    (inferred from the exports; empty if none was given). ``registration``:
    ``(space, handle)`` in the unwinder, or None.

    Lifetime: the code is mapped until :meth:`release` (idempotent) or the
    linker's :meth:`Linker.close`; after that every address is stale.
    """

    def __init__(self, linker: "Linker", name: str, tracker, jit, addresses, load_addresses):
        self._linker = linker
        self.name = name
        self._tracker = tracker
        self._jit = jit                       # its own LLJIT, or None (the shared one)
        self.addresses = addresses
        self.load_addresses = load_addresses
        self.registration = None
        #: Its object as gdb sees it (:class:`~.tooling.GdbRegistration`), or None.
        self.debug_registration = None
        self.released = False

    def __getitem__(self, symbol: str) -> int:
        return self.addresses[symbol]

    def register(self, space, obj: bytes, name: str):
        """Register the object with the unwinder ``space`` (released with the library)."""
        self.registration = (space, space.add_code_object(obj, dict(self.load_addresses),
                                                          name=name))
        return self.registration[1]

    def release(self):
        """Unregister, unmap, dispose the own LLJIT — in that order, each even if
        the one before failed. Idempotent."""
        if self.released:
            return
        self.released = True
        self._linker._forget(self)
        registration, tracker, jit = self.registration, self._tracker, self._jit
        debug, self.debug_registration = self.debug_registration, None
        self.registration = self._tracker = self._jit = None
        try:
            if registration is not None:
                space, handle = registration
                space.remove_code_object(handle)
            if debug is not None:
                debug.withdraw()
        finally:
            try:
                if tracker is not None:
                    try:
                        with JIT_DEBUG_LOCK:        # LLVM withdraws its gdb entry here
                            tracker._dispose()
                    finally:
                        tracker.detach()
            finally:
                try:
                    if jit is not None:
                        try:
                            with JIT_DEBUG_LOCK:
                                jit._dispose()
                        finally:
                            jit.detach()
                finally:
                    if debug is not None:
                        debug.release()

    def __repr__(self):
        state = " released" if self.released else ""
        return f"<JitLibrary {self.name}{state}>"


class Linker:
    """The runtime's target machine, shared LLJIT and the owner of every
    :class:`JitLibrary` (see the module docstring).

    ``opt_level``: of the target machine (0-3). ``tools``: the
    :class:`~.tooling.Tools` every library is announced to (perf, gdb);
    default: what the environment asks for.
    """

    def __init__(self, opt_level: int = 2, tools: Tools | None = None):
        self.tools = tools if tools is not None else Tools()
        self.tm = target_machine(opt_level)
        self.lljit = llvm.create_lljit_compiler(self.tm)
        self.lljit._owned = True          # disposed by close(), after every library
        self._libraries: dict[int, JitLibrary] = {}   # id(library) -> library, in link order
        self._keepalive: list = []
        self._counter = 0
        self._lock = threading.Lock()
        self.closed = False

    def keep(self, *objects):
        """Keep cells and callbacks compiled code can reach alive until :meth:`close`."""
        self._keepalive.extend(objects)
        return objects[0] if len(objects) == 1 else objects

    def emit(self, module_text: str, *, tm=None) -> bytes:
        """Parse and verify hand-written or generated IR text (no pass pipeline)
        and emit it as an object with ``tm`` (default: the runtime's)."""
        tm = tm or self.tm
        mod = parse_module(module_text)
        mod.verify()
        mod.triple = tm.triple
        mod.data_layout = str(tm.target_data)
        return tm.emit_object(mod)

    def link(self, obj: bytes, name: str, *, exports: Iterable[str],
             imports: Mapping[str, int] | None = None, own_jit: bool = False,
             libraries: Iterable[JitLibrary] = (), register: str | None = None,
             space=None, labels: Mapping[str, str] | None = None) -> JitLibrary:
        """Link ``obj`` as a new library named ``name`` (made unique).

        ``exports``: symbols to look up (their addresses; at least one, to
        infer the load addresses). ``imports``: symbol -> absolute address.
        ``libraries``: libraries of the shared LLJIT whose symbols it may use.
        ``own_jit``: link into an LLJIT of its own (freed with it). With
        ``register`` (a name) the object is registered with the unwinder
        ``space``. ``labels``: symbol -> the name perf and gdb show for it
        (e.g. ``fib@v2``; other symbols keep theirs). Raises
        :class:`CompileError` when linking fails.
        """
        exports = list(exports)
        with self._lock:
            if self.closed:
                raise RuntimeError("the linker is closed")
            self._counter += 1
            unique = f"{name}.{self._counter}.{id(self):x}"
        builder = llvm.JITLibraryBuilder().add_object_img(obj)
        for sym, address in (imports or {}).items():
            builder.import_symbol(sym, address)
        for lib in libraries:
            builder.add_jit_library(lib.name)
        for sym in exports:
            builder.export_symbol(sym)
        jit = None
        if own_jit:
            jit = llvm.create_lljit_compiler(self.tm)
            jit._owned = True
        gdb = self.tools.gdb
        try:
            with JIT_DEBUG_LOCK:    # LLVM adds its gdb entry here (see .tooling)
                head = gdb.head() if gdb is not None else 0
                tracker = builder.link(jit or self.lljit, unique)
                llvm_entries = gdb.entries_since(head) if gdb is not None else []
        except RuntimeError as e:
            if jit is not None:
                with JIT_DEBUG_LOCK:
                    jit._dispose()
                jit.detach()
            raise CompileError(f"{name}: linking failed: {e}") from None
        tracker._owned = True
        addresses = {sym: tracker[sym] for sym in exports}
        library = JitLibrary(self, unique, tracker, jit, addresses, {})
        with self._lock:
            self._libraries[id(library)] = library
        try:
            if addresses:
                library.load_addresses = ObjectImage.infer_load_addresses(obj, addresses)
            if register is not None:
                library.register(space, obj, register)
            if self.tools.active:
                library.debug_registration = self.tools.loaded(
                    obj, library.load_addresses, labels or {}, llvm_entries)
        except BaseException:
            library.release()
            raise
        return library

    def _forget(self, library: JitLibrary):
        with self._lock:
            self._libraries.pop(id(library), None)

    def libraries(self) -> list[JitLibrary]:
        """The libraries not yet released, oldest first."""
        with self._lock:
            return list(self._libraries.values())

    def close(self):
        """Release every library (newest first), then the shared LLJIT, then the
        target machine, then let go of what :meth:`keep` kept. Idempotent. Every library is released even if one
        fails; the first error is re-raised at the end."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        error = None
        for library in reversed(self.libraries()):
            try:
                library.release()
            except Exception as e:  # noqa: BLE001 - keep releasing, report the first
                error = error or e
        try:
            with JIT_DEBUG_LOCK:
                self.lljit._dispose()
        finally:
            self.lljit.detach()
            self.tm.close()
            # No code is mapped any more: nothing can reach the cells and
            # callbacks (a callback may hold the runtime's services, hooks and all).
            self._keepalive.clear()
        if error is not None:
            raise error

    def __del__(self):
        if not sys.is_finalizing() and not getattr(self, "closed", True):
            self.close()


def address_of(cfunc) -> int:
    """Absolute address of a ctypes function pointer or callback."""
    return ctypes.cast(cfunc, ctypes.c_void_p).value
