"""The osrjit package's exception hierarchy (root: :class:`OsrJitError`).

Everything :class:`osrjit.Runtime` raises is an :class:`OsrJitError` (or a
plain ``TypeError``/``ValueError`` for a call that is wrong in itself). The
:mod:`deopt` package's errors reach the runtime's callers as the twins
below, which are both an :class:`OsrJitError` and the :mod:`deopt` class
(``except deopt.IncompatibleVersion`` keeps working); the original is the
twin's ``__cause__`` and its attributes are copied.
"""
import deopt.errors as _deopt
import unwinder.errors as _unwinder


class OsrJitError(Exception):
    """Root of every exception raised by :mod:`osrjit` itself."""


class CompileError(OsrJitError):
    """Source outside the reference language, or IR that LLVM rejects.

    ``line`` and ``col`` (1-based line, 0-based column as in :mod:`ast`) locate
    the offending construct in reference-language source; both are ``None`` for
    errors in user IR, where the message carries LLVM's own diagnostic.
    """

    def __init__(self, message, line=None, col=None):
        where = f"line {line}, column {col}: " if line is not None else ""
        super().__init__(where + message)
        self.line = line
        self.col = col
        self.detail = message


# --- runtime (osrjit.runtime) ------------------------------------------------

class SignatureMismatch(CompileError):
    """A new version of function ``name`` has another LLVM function type than
    the compiled one (``old`` and ``new``, e.g. ``"i64 (i64)"``); compiled
    callers use the old one, so nothing is compiled or published."""

    def __init__(self, name, old, new):
        super().__init__(f"cannot redefine {name!r} as {new}: it is {old}, and compiled "
                         f"callers use that signature")
        self.name = name
        self.old = old
        self.new = new


class UnknownFunction(OsrJitError, LookupError):
    """No function of that name has been compiled into the runtime.

    ``name`` is the name asked for.
    """

    def __init__(self, name):
        super().__init__(f"no function named {name!r} has been compiled")
        self.name = name


class RuntimeClosed(OsrJitError):
    """The :class:`~osrjit.runtime.Runtime` was closed; its code is unmapped."""


class ResourceExhausted(OsrJitError):
    """A runtime could not be made: the process has none left of something
    each open native runtime holds one of. ``resource``: ``"pthread key"``
    or ``"real-time signal"``. Closing a runtime gives its own back."""

    def __init__(self, message, resource=None):
        super().__init__(message)
        self.resource = resource


class HookNotSet(OsrJitError):
    """Compiled code called the hook service but no hook was installed
    (:meth:`~osrjit.runtime.Runtime.on_hook`)."""


class VersionInUse(OsrJitError):
    """Code cannot be unloaded while something uses it: a version that is
    still its function's current one, or, for :meth:`~osrjit.runtime.Runtime.close`,
    hijacked frames not yet returned or threads inside compiled code
    (:class:`RuntimeBusy`)."""


class RuntimeBusy(VersionInUse):
    """:meth:`~osrjit.runtime.Runtime.close` refused: threads are inside the
    runtime's compiled code (running it, or in a hook or service called from
    it — the caller itself, if it closes from a hook) or hijacked frames have
    not returned yet. Nothing was released; the runtime works as before.

    ``threads``: ``[(thread name, function entered from Python or None,
    where)]`` of the threads that held it (``where``: a status name, or
    ``"in a hook or service called from JIT code"``); ``pending_returns``:
    hijacked frames not yet returned through the stub.
    """

    def __init__(self, message, threads=(), pending_returns=0):
        super().__init__(message)
        self.threads = list(threads)
        self.pending_returns = pending_returns


# --- call-site patching (osrjit.native.patching) --------------------------------------

class PatchError(OsrJitError):
    """A direct call site (or a JIT stub's pointer) could not be patched.

    ``address`` is the absolute address the patch was about (the call
    instruction, its rel32 field or the pointer), None if not about one place.
    Raised before anything is written whenever the problem can be seen in
    advance; a failure after writing (mprotect, read-back mismatch) says so.
    """

    def __init__(self, message, address=None):
        super().__init__(message)
        self.address = address


class NotACallSite(PatchError):
    """The bytes at a call site are not the expected ``E8 rel32`` call (or
    ``E9 rel32`` jump). ``found`` holds the bytes read at ``address``."""

    def __init__(self, message, address=None, found=b""):
        super().__init__(message, address)
        self.found = bytes(found)


class CallTargetOutOfRange(PatchError):
    """The new target is more than ±2 GiB from a site whose call cannot reach
    it through a JIT stub. ``target`` is the wanted absolute address,
    ``displacement`` ``target - return address`` (does not fit in int32)."""

    def __init__(self, message, address=None, target=None, displacement=None):
        super().__init__(message, address)
        self.target = target
        self.displacement = displacement


class UnpatchableReference(PatchError):
    """The code refers to a direct-call symbol other than through a patchable
    ``E8``/``E9`` rel32 (e.g. takes its address), so retargeting it by patching
    calls would leave a stale reference. ``relocation_type`` is the ELF
    ``R_X86_64_*`` number."""

    def __init__(self, message, address=None, relocation_type=None):
        super().__init__(message, address)
        self.relocation_type = relocation_type


class StackOverflow(OsrJitError, RecursionError):
    """JIT code would have run past its thread's stack: a function's entry
    check found less than the margin left (``osrjit.native.stacklimit.STACK_MARGIN_BYTES``,
    at most a quarter of the stack). The thread's JIT frames of that call were
    abandoned (their pending hijacks dropped); the runtime stays usable."""


class SafepointTimeout(OsrJitError):
    """Threads did not stop in time; nothing was modified.

    ``threads`` lists ``(name, status name)`` of the threads that did not stop.
    """

    def __init__(self, threads, seconds):
        names = ", ".join(f"{n} ({s})" for n, s in threads)
        super().__init__(f"time-to-safepoint exceeded {seconds:.3f} s; not stopped: {names}; "
                         "no stack was modified")
        self.threads = threads


# --- the emulated backend (osrjit.emulated) ----------------------------------

class EmulationError(OsrJitError):
    """Something the emulated backend cannot do or found wrong: an object it
    cannot load (unknown relocation, undefined symbol, value out of range), a
    fault of an emulated thread, a misuse of the machine."""


class ObjectFormatError(EmulationError):
    """Bytes given to the emulated loader that are not a well-formed x86-64
    ELF relocatable object. ``offset`` is the byte offset into the object of
    the header, entry or field found wrong (None when not known); ``reason``
    says what is wrong; ``__cause__`` is the :class:`unwinder.ObjectFormatError`
    of the reader."""

    def __init__(self, reason, offset=None):
        message = reason if offset is None else f"{reason} (at object offset {offset:#x})"
        super().__init__(message)
        self.reason = reason
        self.offset = offset


class EmulationFault(EmulationError):
    """An emulated thread faulted: ``thread``, absolute ``pc``, ``symbol``
    (``name+0xoff`` or None) and the unicorn or Python ``cause``."""

    def __init__(self, thread, pc, symbol, cause):
        where = f"{pc:#x}" + (f" ({symbol})" if symbol else "")
        super().__init__(f"thread {thread.id} ({thread.name}) faulted at {where}: {cause}")
        self.thread, self.pc, self.symbol, self.cause = thread, pc, symbol, cause


# --- deopt's errors, as the runtime raises them --------------------------------

class DeoptFailure(OsrJitError, _deopt.DeoptError):
    """A :mod:`deopt` error the runtime met (``__cause__``: the original)."""


class FrameMapError(DeoptFailure, _deopt.FrameMapError):
    """Stackmap records that do not decode or do not fit their code (see
    :class:`deopt.FrameMapError`; ``offset``)."""


class IncompatibleVersion(DeoptFailure, _deopt.IncompatibleVersion):
    """A new version cannot take over frames of an old one; nothing was
    modified (see :class:`deopt.IncompatibleVersion`; ``site_id``, ``reason``)."""


class HijackError(DeoptFailure, _deopt.HijackError):
    """A return-address slot changed under a hijack; every stack was left as
    it was (see :class:`deopt.HijackError`)."""


class TransferError(DeoptFailure, _deopt.TransferError):
    """A hijacked frame could not be rebuilt (see :class:`deopt.TransferError`)."""


class UnwindFailure(OsrJitError, _unwinder.UnwindError):
    """An :mod:`unwinder` error the runtime met (``__cause__``: the original)."""


_TWINS = {_deopt.FrameMapError: FrameMapError, _deopt.IncompatibleVersion: IncompatibleVersion,
          _deopt.HijackError: HijackError, _deopt.TransferError: TransferError}


def wrap_error(error: BaseException) -> BaseException:
    """The :class:`OsrJitError` twin of a :mod:`deopt` or :mod:`unwinder`
    error (``error`` itself if it is one already, or neither); raise it
    ``from error``."""
    if isinstance(error, OsrJitError):
        return error
    if isinstance(error, _deopt.DeoptError):
        twin_class = next((twin for cls, twin in _TWINS.items() if isinstance(error, cls)),
                          DeoptFailure)
    elif isinstance(error, _unwinder.UnwindError):
        twin_class = UnwindFailure
    else:
        return error
    twin = twin_class.__new__(twin_class)
    Exception.__init__(twin, *error.args)
    twin.__dict__.update(error.__dict__)
    return twin
