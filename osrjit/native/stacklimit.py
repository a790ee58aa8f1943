"""The stack limit JIT code checks at every function entry (:class:`osrjit.StackOverflow`).

Each thread's limit is the value of one process-wide pthread key, read by
JIT code with one ``%fs``-relative load (see :class:`StackLimitSlot` and
:meth:`osrjit.ir.BodyBuilder.stack_check`); a thread's limit is set when it
attaches to a runtime (:class:`osrjit.native.threads.ThreadRegistry`).
"""
import ctypes
import ctypes.util
import threading

from ..errors import OsrJitError, ResourceExhausted

__all__ = ["STACK_MARGIN_BYTES", "StackLimitSlot", "stack_limit_slot"]

# PyDLL: none of these blocks.
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.pthread_key_create.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
_libc.pthread_setspecific.argtypes = [ctypes.c_uint, ctypes.c_void_p]
_libc.pthread_self.restype = ctypes.c_ulong

#: Bytes kept free below the stack limit JIT code checks at function entry
#: (at most a quarter of a stack): what runs on a thread deep in a recursion
#: — the slow paths, a hook or safepoint service in Python, the Python
#: transfer, the runtime's and SIGINT's signal handlers — and the abandon.
STACK_MARGIN_BYTES = 256 * 1024
#: glibc's ``PTHREAD_KEY_2NDLEVEL_SIZE``: keys below it live in the thread
#: descriptor itself (``specific_1stblock``), at a fixed offset from %fs.
_KEYS_IN_DESCRIPTOR = 32
#: Bytes of the thread descriptor searched for the key's slot.
_DESCRIPTOR_SCAN_BYTES = 2048


class StackLimitSlot:
    """The process's *stack limit* key: a pthread key, made once per process
    and never deleted, whose value on each thread is the lowest RSP its JIT
    code may run at (absolute address; 0, never checked, on a thread that
    never attached).

    JIT code reads it at function entry with one ``%fs``-relative load: on
    x86-64 glibc, ``%fs`` points at the thread's descriptor, which holds the
    values of keys below :data:`_KEYS_IN_DESCRIPTOR` at a fixed offset.
    :attr:`offset` (bytes from ``%fs``) is found by setting the key to two
    marker values and searching the calling thread's descriptor for them;
    :class:`OsrJitError` if it is not there (not glibc, or 32 keys taken).
    """

    def __init__(self):
        key = ctypes.c_uint(0)
        if _libc.pthread_key_create(ctypes.byref(key), None) != 0:
            raise ResourceExhausted("pthread_key_create failed: the process has no free "
                                    "pthread key (for the stack limit)", resource="pthread key")
        self.key = key.value
        if self.key >= _KEYS_IN_DESCRIPTOR:
            raise OsrJitError(f"the stack limit's pthread key is {self.key}: JIT code can only "
                              f"read keys below {_KEYS_IN_DESCRIPTOR} with one load")
        self.offset = self._find_offset()

    def _find_offset(self):
        words = (ctypes.c_uint64 * (_DESCRIPTOR_SCAN_BYTES // 8)).from_address(_libc.pthread_self())
        found = None
        for marker in (0x6F73726A69740001, 0x6F73726A69740002):
            if _libc.pthread_setspecific(self.key, marker) != 0:
                raise OsrJitError("pthread_setspecific failed for the stack limit key")
            hits = {i for i, w in enumerate(words) if w == marker}
            found = hits if found is None else found & hits
        _libc.pthread_setspecific(self.key, None)
        if len(found or ()) != 1:
            raise OsrJitError("the stack limit key's slot is not in the thread descriptor "
                              "(JIT stack checks need x86-64 glibc)")
        return 8 * found.pop()

    def set_current(self, bounds):
        """Set the calling thread's limit from its stack ``(lo, hi)``
        (:func:`current_stack_bounds`; None: no check on this thread)."""
        limit = 0
        if bounds is not None:
            lo, hi = bounds
            limit = lo + min(STACK_MARGIN_BYTES, (hi - lo) // 4)
        _libc.pthread_setspecific(self.key, limit or None)

    @staticmethod
    def current_limit(offset):
        """The calling thread's limit as JIT code reads it (``%fs:offset``; tests)."""
        return ctypes.c_uint64.from_address(_libc.pthread_self() + offset).value


_stack_limit = None
_stack_limit_lock = threading.Lock()


def stack_limit_slot():
    """The process's :class:`StackLimitSlot` (made on first use), or None if
    it cannot be made (the :class:`OsrJitError` is kept in
    :data:`stack_limit_error`; it is not tried again)."""
    global _stack_limit, stack_limit_error
    with _stack_limit_lock:
        if _stack_limit is None and stack_limit_error is None:
            try:
                _stack_limit = StackLimitSlot()
            except OsrJitError as e:
                stack_limit_error = e
        return _stack_limit


#: Why the process has no :class:`StackLimitSlot` (None: it has one, or it was not asked yet).
stack_limit_error = None
