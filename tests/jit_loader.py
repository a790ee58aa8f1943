"""A test-only stand-in for the runtime: load :class:`FunctionIR` versions into
an LLJIT and call them (and their resume entries) through ctypes.

It provides every runtime-side symbol a generated module may reference
(:mod:`osrjit.abi`): slot cells (``c_uint64``), the safepoint flag
(``c_int64``), and the hook / safepoint slow path / error services as ctypes
callbacks. No frames are ever replaced: this exercises code generation only.

Lifetimes: a :class:`JitLoader` owns the LLJIT, one ResourceTracker per loaded
version (the code lives exactly as long as its tracker), the slot cells and the
callback objects (the native thunks die with them). Keep the loader alive while
calling anything it returned; :meth:`close` releases it all.
Native crashes kill the process: use it inside ``childproc.run_child``.
"""
import ctypes

import llvmlite.binding as llvm

from osrjit.abi import (ERROR_SYMBOL, HOOK_SYMBOL, SAFEPOINT_FLAG_SYMBOL,
                        SAFEPOINT_SLOW_SYMBOL, SLOT_PREFIX, STATE_LIVE_BASE,
                        ErrorCode, FunctionIR)

HOOK_T = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
SLOW_T = ctypes.CFUNCTYPE(None)
ERROR_T = ctypes.CFUNCTYPE(None, ctypes.c_int64)


def _target_machine():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_default_triple().create_target_machine(
        reloc="pic", codemodel="small", opt=2)


class JitLoader:
    """``hook(x)`` answers the hook service (default: ``x * 10``);
    ``on_slow()`` runs in the safepoint slow path (default: clear the flag)."""

    def __init__(self, hook=None, on_slow=None):
        self.tm = _target_machine()
        self.jit = llvm.create_lljit_compiler(self.tm)
        self.flag = ctypes.c_int64(0)
        self.slots: dict[str, ctypes.c_uint64] = {}
        self.hook_calls: list[int] = []
        self.slow_calls = 0
        self.errors: list[int] = []
        self._hook = hook or (lambda x: x * 10)
        self._on_slow = on_slow or (lambda: setattr(self.flag, "value", 0))
        self._hook_cb = HOOK_T(self._hook_service)
        self._slow_cb = SLOW_T(self._slow_service)
        self._error_cb = ERROR_T(self._error_service)
        self._trackers = []
        self.versions: dict[str, tuple[FunctionIR, int, int]] = {}  # name -> (fir, entry, resume)

    # -- services (called from JIT code) --

    def _hook_service(self, x):
        self.hook_calls.append(x)
        return self._hook(x)

    def _slow_service(self):
        self.slow_calls += 1
        self._on_slow()

    def _error_service(self, code):
        self.errors.append(code)

    # -- loading --

    def slot(self, name: str) -> ctypes.c_uint64:
        return self.slots.setdefault(name, ctypes.c_uint64(0))

    def optimized(self, fir: FunctionIR) -> llvm.ModuleRef:
        mod = llvm.parse_assembly(fir.module_ir)
        mod.triple = self.tm.triple
        mod.data_layout = str(self.tm.target_data)
        mod.verify()
        pto = llvm.create_pipeline_tuning_options(speed_level=2)
        pb = llvm.create_pass_builder(self.tm, pto)
        pb.getModulePassManager().run(mod, pb)
        mod.verify()
        return mod

    def load(self, *firs: FunctionIR, symbols=None) -> "JitLoader":
        """Compile and link each version as its own library; ``symbols`` maps
        extra undefined symbols (e.g. an IR author's external callee) to addresses."""
        for fir in firs:
            obj = self.tm.emit_object(self.optimized(fir))
            builder = llvm.JITLibraryBuilder().add_object_img(obj)
            for name in sorted(fir.callees | {fir.name}):
                builder.import_symbol(SLOT_PREFIX + name, ctypes.addressof(self.slot(name)))
            for symbol, cb in ((HOOK_SYMBOL, self._hook_cb), (SAFEPOINT_SLOW_SYMBOL, self._slow_cb),
                               (ERROR_SYMBOL, self._error_cb)):
                builder.import_symbol(symbol, ctypes.cast(cb, ctypes.c_void_p).value)
            builder.import_symbol(SAFEPOINT_FLAG_SYMBOL, ctypes.addressof(self.flag))
            for symbol, address in (symbols or {}).items():
                builder.import_symbol(symbol, address)
            builder.export_symbol(fir.symbol).export_symbol(fir.resume_symbol)
            tracker = builder.link(self.jit, f"{fir.name}.v{len(self._trackers)}")
            self._trackers.append(tracker)
            entry, resume = tracker[fir.symbol], tracker[fir.resume_symbol]
            self.versions[fir.name] = (fir, entry, resume)
            self.slot(fir.name).value = entry
        return self

    # -- calling --

    def _checked(self, value):
        """Like the runtime: raise the first reported error once the JIT call returned.
        ``last_value`` keeps what the function returned anyway."""
        self.last_value = value
        errors, self.errors = self.errors, []
        if errors:
            assert errors[0] == ErrorCode.ZERO_DIVISION
            raise ZeroDivisionError("integer division or modulo by zero")
        return value

    def call(self, name: str, *args: int) -> int:
        """Call the current version of ``name``; raises ZeroDivisionError like the runtime."""
        fir, entry, _ = self.versions[name]
        fn = ctypes.CFUNCTYPE(ctypes.c_int64, *[ctypes.c_int64] * len(fir.params))(entry)
        return self._checked(fn(*args))

    def resume(self, name: str, site_id: int, live: dict[str, int], result: int = 0) -> int:
        """Call ``<symbol>__resume(site_id, state)`` with a hand-built state:
        ``state[0] = result``, ``state[1 + i] = live[<name of live[i]>]``."""
        fir, _, resume = self.versions[name]
        info = fir.sites[site_id]
        assert set(live) == {lv.name for lv in info.live}, (live, info.live)
        state = (ctypes.c_int64 * (STATE_LIVE_BASE + len(info.live)))()
        state[0] = result
        for i, lv in enumerate(info.live):
            state[STATE_LIVE_BASE + i] = live[lv.name]
        fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(resume)
        return self._checked(fn(site_id, ctypes.addressof(state)))

    def close(self) -> None:
        self._trackers.clear()
        self.jit.close()
