"""The Python entry to a natively compiled function."""
from __future__ import annotations

import ctypes

from ..errors import OsrJitError, StackOverflow
from ..services import INT64_MAX, INT64_MIN
from ..versions import Function
from unwinder.x86_64 import RSP

from .threads import FLAG_INTERRUPT, AbandonReason

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
    version, and marks it "outside" again. Valid while its runtime is open
    (:class:`osrjit.RuntimeClosed` afterwards); a call made while another
    thread is in :meth:`osrjit.Runtime.close` waits for its outcome.

    A call whose JIT frames were abandoned raises: :class:`osrjit.StackOverflow`
    when a function's entry found the stack nearly full; on SIGINT while the
    main thread ran JIT code with polls, whatever Python's SIGINT handler
    raises (``KeyboardInterrupt`` by default; ``KeyboardInterrupt`` too if
    that handler returns). Their pending hijacks are dropped first.
    """

    def __init__(self, backend, fn: Function, reclaimer=None):
        self._services = backend._services
        self._reclaimer = reclaimer
        self._backend = backend
        self._fn = fn
        if fn.return_type not in RESTYPES:
            raise OsrJitError(f"{fn.name}: unsupported return type {fn.return_type!r}")
        self._registry = backend.registry
        self._gate = backend.gate
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
        gate = self._gate
        gate.enter(fn.name)                # RuntimeClosed; waits while close() decides
        try:
            state = self._registry.current()   # attach this thread on its first call
            outer = self._services.enter()
            try:
                result = self._thunk(self._slot_address, *args)
            finally:
                # (A KeyboardInterrupt from Python's SIGINT handler is raised as
                # the thunk call returns, so this runs in either case.)
                exc = self._services.leave(outer)
                reason = state.abandoned
                if reason:
                    state.abandoned = AbandonReason.NONE
                    self._backend.abandoned(state)
                if state.is_main and (reason == AbandonReason.INTERRUPT
                                      or self._backend.flag.value & FLAG_INTERRUPT):
                    if state.anchor[RSP]:
                        # JIT frames of an outer call (this one came from a hook):
                        # they stop at their next poll too.
                        self._backend.support.set_flag(FLAG_INTERRUPT)
                    else:
                        # None left (or SIGINT came as they returned without a poll).
                        self._backend.support.clear_flag(FLAG_INTERRUPT)
        finally:
            gate.leave()
        reclaimer = self._reclaimer
        if reclaimer is not None and reclaimer.wanted:
            reclaimer.wake()             # an old version waits: this thread left JIT code
        if reason == AbandonReason.STACK_OVERFLOW:
            raise StackOverflow(f"{fn.name}(): the JIT code ran out of stack (less than "
                                f"the margin was left); its frames were abandoned")
        if reason == AbandonReason.INTERRUPT:
            raise exc if isinstance(exc, KeyboardInterrupt) else KeyboardInterrupt()
        if exc is not None:
            raise exc
        return result

    def __repr__(self):
        return f"<JitFunction {self.name}({', '.join(self._fn.params)})>"
