"""A test-only loader for direct-call (``calls="direct"``) versions, built on
:class:`jit_loader.JitLoader` (whose behaviour it does not change).

Each :meth:`DirectLoader.load_version` links one version as its own JIT library
and also imports ``osrjit.fn.<g>`` for every direct callee ``g``: the address
given in ``direct`` or else the entry of ``g``'s newest loaded version (a
callee not loaded yet is an error unless ``direct`` names it, e.g. with
:func:`osrjit.native.patching.placeholder_address`). It keeps every version (object
bytes, load addresses, entries), not only the newest, so tests can patch old
ones. Lifetimes as :class:`JitLoader`: keep the loader alive while calling
anything it returned; native crashes kill the process (use ``run_child``).
"""
import ctypes
from dataclasses import dataclass

import llvmlite.binding as llvm

from deopt.framemaps import ObjectImage
from jit_loader import JitLoader
from osrjit.abi import (ERROR_SYMBOL, HOOK_SYMBOL, SAFEPOINT_FLAG_SYMBOL,
                        SAFEPOINT_SLOW_SYMBOL, SLOT_PREFIX, FunctionIR, direct_call_symbol)


@dataclass
class Loaded:
    """One linked version: ``entry`` / ``resume`` absolute, ``load_addresses``
    section -> absolute, ``obj`` the object bytes that were linked."""
    fir: FunctionIR
    obj: bytes
    entry: int
    resume: int
    load_addresses: dict
    library: str

    @property
    def text_range(self):
        """``(start, end)`` absolute of the loaded ``.text``."""
        return ObjectImage(self.obj, self.load_addresses).code_range

    def call(self, *args):
        proto = ctypes.CFUNCTYPE(ctypes.c_int64, *[ctypes.c_int64] * len(self.fir.params))
        return proto(self.entry)(*args)


class DirectLoader(JitLoader):
    def __init__(self, hook=None, on_slow=None):
        super().__init__(hook=hook, on_slow=on_slow)
        self.all_versions: dict[str, list[Loaded]] = {}

    def newest(self, name: str) -> Loaded:
        return self.all_versions[name][-1]

    def load_version(self, fir: FunctionIR, direct=None) -> Loaded:
        """Link ``fir``; ``direct`` maps callee names to the address to import for
        ``osrjit.fn.<name>`` (default: the newest loaded version's entry)."""
        direct = dict(direct or {})
        obj = self.tm.emit_object(self.optimized(fir))
        builder = llvm.JITLibraryBuilder().add_object_img(obj)
        for name in sorted(fir.callees - fir.direct_callees):
            builder.import_symbol(SLOT_PREFIX + name, ctypes.addressof(self.slot(name)))
        for name in sorted(fir.direct_callees):
            address = direct[name] if name in direct else self.newest(name).entry
            builder.import_symbol(direct_call_symbol(name), address)
        for symbol, cb in ((HOOK_SYMBOL, self._hook_cb), (SAFEPOINT_SLOW_SYMBOL, self._slow_cb),
                           (ERROR_SYMBOL, self._error_cb)):
            builder.import_symbol(symbol, ctypes.cast(cb, ctypes.c_void_p).value)
        builder.import_symbol(SAFEPOINT_FLAG_SYMBOL, ctypes.addressof(self.flag))
        builder.export_symbol(fir.symbol).export_symbol(fir.resume_symbol)
        versions = self.all_versions.setdefault(fir.name, [])
        library = f"{fir.name}.direct.v{len(versions)}"
        tracker = builder.link(self.jit, library)
        self._trackers.append(tracker)
        entry, resume = tracker[fir.symbol], tracker[fir.resume_symbol]
        load_addresses = ObjectImage.infer_load_addresses(
            obj, {fir.symbol: entry, fir.resume_symbol: resume})
        loaded = Loaded(fir, obj, entry, resume, load_addresses, library)
        versions.append(loaded)
        self.versions[fir.name] = (fir, entry, resume)
        self.slot(fir.name).value = entry
        return loaded
