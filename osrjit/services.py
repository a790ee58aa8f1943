"""The Python side of the services compiled code calls, for every backend.

Compiled code calls ``osrjit_hook(x)`` (the user's hook), the safepoint slow
path (the user's safepoint function) and ``osrjit_error(code)`` (a language
error such as a division by zero); see :mod:`osrjit.abi`.

Exceptions never unwind through native frames: a Python exception raised by
a service (or a language error) is caught, remembered as *pending* for the
current thread, and the service returns 0. The Python entry raises the
pending exception when the native call it made returns. Each entry from
Python starts a fresh pending scope, so a hook that calls back into JIT code
sees that inner call's exception, not its caller's. The emulated backend
keeps the pending exception on its emulated thread instead of a
thread-local, with the same first-wins rule.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from . import abi
from .errors import HookNotSet, OsrJitError

__all__ = ["Services", "call_hook", "error_for_code", "INT64_MIN", "INT64_MAX"]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def call_hook(fn, value, installer):
    """Run a user hook ``fn(value) -> int`` for compiled code; checks the result.

    Raises :class:`HookNotSet` (naming ``installer``, the API that installs
    one) when ``fn`` is None, TypeError/OverflowError for a result that is not
    a 64-bit int. Callers turn any exception into the thread's pending one.
    """
    if fn is None:
        raise HookNotSet(f"compiled code called the hook with {value} but no hook is "
                         f"installed ({installer})")
    result = fn(value)
    if not isinstance(result, int):
        raise TypeError(f"the hook must return an int, got {type(result).__name__}")
    if not INT64_MIN <= result <= INT64_MAX:
        raise OverflowError(f"the hook's result {result} does not fit in 64 bits")
    return result


def error_for_code(code: int) -> BaseException:
    """The exception a ``osrjit_error(code)`` call stands for."""
    try:
        kind = abi.ErrorCode(code)
    except ValueError:
        return OsrJitError(f"compiled code reported unknown error code {code}")
    if kind is abi.ErrorCode.ZERO_DIVISION:
        return ZeroDivisionError("integer division or modulo by zero")
    return OsrJitError(f"compiled code reported {kind.name}")


class Services:
    """The user's hook and safepoint functions and the per-thread pending
    exception (native backend: a thread-local scope per entry from Python).

    It never references the JIT or the runtime, so the ctypes callbacks that
    call into it create no reference cycle through native resources.
    """

    def __init__(self):
        self.hook: Callable[[int], int] | None = None
        self.safepoint: Callable[[], None] | None = None
        self.tls = threading.local()

    # -- pending exceptions ---------------------------------------------------

    def set_pending(self, exc: BaseException):
        """Remember ``exc`` unless this thread's scope already has one (first wins)."""
        if getattr(self.tls, "pending", None) is None:
            self.tls.pending = exc

    def has_pending(self) -> bool:
        return getattr(self.tls, "pending", None) is not None

    def enter(self):
        """Open a pending scope for a call from Python; returns the outer scope's value."""
        outer = getattr(self.tls, "pending", None)
        self.tls.pending = None
        return outer

    def leave(self, outer):
        """Close the scope: restore the outer value, return this scope's exception."""
        exc = getattr(self.tls, "pending", None)
        self.tls.pending = outer
        return exc

    # -- the services (called from native code through ctypes) ---------------

    def hook_service(self, value: int) -> int:
        try:
            if self.has_pending():
                return 0        # an exception is already on its way out: do not run more Python
            return call_hook(self.hook, value, "Runtime.on_hook")
        except BaseException as exc:  # noqa: BLE001 - must never unwind into native code
            self.set_pending(exc)
            return 0

    def safepoint_service(self) -> None:
        try:
            if self.has_pending():
                return
            fn = self.safepoint
            if fn is not None:
                fn()
        except BaseException as exc:  # noqa: BLE001
            self.set_pending(exc)

    def error_service(self, code: int) -> None:
        self.set_pending(error_for_code(code))
