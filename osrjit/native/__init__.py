"""The native backend: versions run as machine code in this process (LLJIT).

* :mod:`.linker` — one owner per JIT library (tracker + LLJIT + unwinder registration);
* :mod:`.backend` — :class:`NativeBackend`: loading, publishing, freeing, entries;
* :mod:`.function` — :class:`JitFunction`, the Python entry to a function;
* :mod:`.scan` — which frames to hijack on the stopped stacks (reference and native walks);
* :mod:`.hijack` — writing the stubs and recording the pending returns;
* :mod:`.replace` — one ``replace()`` / ``collect()`` pause, step by step.
* :mod:`.tooling` — what perf and gdb see: perf maps, jitdump, the GDB JIT interface.

The thread protocol (:mod:`osrjit.native.threads`), the stack limit
(:mod:`osrjit.native.stacklimit`), the transfers
(:mod:`osrjit.native.deoptimizer`), the native scans (:mod:`osrjit.native.fastscan`) and
call patching (:mod:`osrjit.native.patching`) are this backend's collaborators.
"""
from .backend import NativeBackend
from .function import JitFunction
from .linker import JitLibrary, Linker

__all__ = ["NativeBackend", "JitFunction", "JitLibrary", "Linker"]
