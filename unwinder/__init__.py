"""unwinder: a DWARF ``.eh_frame`` stack unwinder for native x86-64 stacks.

Layered as parse → rules → cache → walk:

* :mod:`unwinder.cfi` — ``.eh_frame`` / ``.eh_frame_hdr`` bytes to CIEs and FDEs;
* :mod:`unwinder.rules` — CFI instructions to an unwind table (frozen rows);
* :mod:`unwinder.space` — modules of an address space and a per-pc row cache;
* :mod:`unwinder.walk` — register state + memory reader to :class:`Frame` objects;
* :mod:`unwinder.native` — the same rows compiled to flat arrays and walked by
  LLVM-compiled code (no Python, no GIL): :class:`NativeWalker`.

Memory is read through :mod:`unwinder.memory` (this process, a unicorn CPU, a
snapshot), so one walker serves live threads, emulators and tests.
"""
from .capture import backtrace, with_captured_registers
from .errors import (CFIError, ExpressionError, MemoryReadError, ModuleError, NativeSourceError,
                     ObjectFormatError, UnwindError)
from .memory import Memory, ProcessMemory, SnapshotMemory, UnicornMemory
from .modules import CodeObject, ElfModule, Module
from .space import AddressSpace
from .walk import Frame, step, walk
from .native import FrameArrays, NativeFrame, NativeWalker, NativeWalkerError, ReturnAddressTable

__all__ = [
    "AddressSpace", "Frame", "walk", "step", "backtrace", "with_captured_registers",
    "Memory", "ProcessMemory", "SnapshotMemory", "UnicornMemory",
    "Module", "ElfModule", "CodeObject",
    "UnwindError", "CFIError", "ExpressionError", "MemoryReadError", "ModuleError", "ObjectFormatError",
    "NativeSourceError",
    "NativeWalker", "NativeFrame", "FrameArrays", "ReturnAddressTable", "NativeWalkerError",
]
