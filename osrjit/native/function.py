"""The Python entry to a natively compiled function."""
from __future__ import annotations

import ctypes

from ..errors import OsrJitError, RuntimeClosed
from ..services import INT64_MAX, INT64_MIN
from ..versions import Function

__all__ = ["JitFunction"]

#: LLVM return type -> ctypes restype of the entry thunk.
RESTYPES = {"i64": ctypes.c_int64, "i32": ctypes.c_int32, "i8": ctypes.c_int8,
            "i1": ctypes.c_bool, "double": ctypes.c_double, "ptr": ctypes.c_void_p,
            "void": None}


class JitFunction:
    """Python entry to a compiled function; each call runs the *current* version.

    The slot is read at every call, so a call made after a new version was
    published runs the new version. Arguments are Python ints (64-bit signed).
    A pending exception (a hook that raised, a division by zero, ...) is
    raised here when the native call returns.

    Every call goes through the runtime's entry thunk: it marks this thread
    "in JIT" (waiting while the world is stopped), calls the slot's current
    version, and marks it "outside" again. Valid while its runtime is open.
    """

    def __init__(self, backend, fn: Function, reclaimer=None):
        self._services = backend._services
        self._reclaimer = reclaimer
        self._backend = backend
        self._fn = fn
        if fn.return_type not in RESTYPES:
            raise OsrJitError(f"{fn.name}: unsupported return type {fn.return_type!r}")
        self._registry = backend.registry
        thunk = backend.support.entry_thunk(fn.return_type, len(fn.params))
        proto = ctypes.CFUNCTYPE(RESTYPES[fn.return_type], ctypes.c_void_p,
                                 *[ctypes.c_int64] * len(fn.params))
        self._thunk = proto(thunk)
        self._slot_address = ctypes.addressof(fn.cell)

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
            if not INT64_MIN <= a <= INT64_MAX:
                raise OverflowError(f"{fn.name}(): argument {a} does not fit in 64 bits")
        if self._backend.closed:
            raise RuntimeClosed(f"cannot call {fn.name}: the runtime is closed")
        self._registry.current()           # attach this thread on its first call
        outer = self._services.enter()
        try:
            result = self._thunk(self._slot_address, *args)
        finally:
            exc = self._services.leave(outer)
        reclaimer = self._reclaimer
        if reclaimer is not None and reclaimer.wanted:
            reclaimer.wake()             # an old version waits: this thread left JIT code
        if exc is not None:
            raise exc
        return result

    def __repr__(self):
        return f"<JitFunction {self.name}({', '.join(self._fn.params)})>"
