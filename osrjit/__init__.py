"""osrjit: replace LLVM-JIT-compiled functions while their frames are live.

    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile("def fib(n):\\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\\n")
        rt.function("fib")(20)

Layering: ``osrjit`` uses :mod:`deopt`, which uses :mod:`unwinder`; never the reverse.
Everything :class:`Runtime` raises is an :class:`OsrJitError`.
"""
#: The package version; the one source of it (pyproject.toml reads it from here).
__version__ = "0.1.0"

from .abi import FunctionIR, LiveValue, SiteInfo, SiteKind
from .backend import PauseReport
from .errors import (CallTargetOutOfRange, CompileError, DeoptFailure, EmulationError,
                     EmulationFault, FrameMapError, HijackError, HookNotSet, IncompatibleVersion,
                     NotACallSite, ObjectFormatError, OsrJitError, PatchError, ResourceExhausted,
                     RuntimeBusy, RuntimeClosed,
                     SafepointTimeout, SignatureMismatch, StackOverflow, TransferError,
                     UnknownFunction, UnpatchableReference,
                     UnwindFailure, VersionInUse)
from .runtime import Runtime
from .versions import Version
from .native.function import JitFunction
from . import emulated as _emulated       # registers Runtime(backend="emulated")

__all__ = [
    "Runtime", "Version", "JitFunction", "PauseReport",
    "FunctionIR", "SiteInfo", "SiteKind", "LiveValue",
    "OsrJitError", "CompileError", "UnknownFunction", "RuntimeClosed", "RuntimeBusy", "HookNotSet",
    "VersionInUse", "SafepointTimeout", "IncompatibleVersion", "FrameMapError", "HijackError",
    "TransferError", "DeoptFailure", "UnwindFailure", "PatchError", "EmulationError",
    "EmulationFault", "ObjectFormatError", "NotACallSite", "CallTargetOutOfRange",
    "UnpatchableReference", "ResourceExhausted", "SignatureMismatch", "StackOverflow",
]
