"""osrjit: replace LLVM-JIT-compiled functions while their frames are live.

    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile("def fib(n):\\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\\n")
        rt.function("fib")(20)

Layering: ``osrjit`` uses :mod:`deopt`, which uses :mod:`unwinder`; never the reverse.
"""
from .abi import FunctionIR, LiveValue, SiteInfo, SiteKind
from .errors import (CompileError, HookNotSet, OsrJitError, RuntimeClosed, UnknownFunction,
                     VersionInUse)
from .runtime import JitFunction, Runtime, Version
from .threads import SafepointTimeout

__all__ = [
    "Runtime", "Version", "JitFunction",
    "FunctionIR", "SiteInfo", "SiteKind", "LiveValue",
    "OsrJitError", "CompileError", "UnknownFunction", "RuntimeClosed", "HookNotSet",
    "VersionInUse", "SafepointTimeout",
]
