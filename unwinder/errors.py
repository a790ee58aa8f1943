"""The unwinder's exception hierarchy.

Every error the package raises derives from :class:`UnwindError`. Errors about
bytes carry the byte offset into the section that holds them; errors about the
stack carry the absolute address involved.
"""


class UnwindError(Exception):
    """Root of every exception raised by :mod:`unwinder`."""


class CFIError(UnwindError):
    """Malformed or unsupported call-frame information.

    ``offset`` is the byte offset into the ``.eh_frame`` (or ``.eh_frame_hdr``)
    section where decoding failed, or ``None`` when not known.
    """

    def __init__(self, message, offset=None):
        if offset is not None:
            message = f"{message} (at section offset {offset:#x})"
        super().__init__(message)
        self.offset = offset


class ExpressionError(CFIError):
    """A DWARF expression could not be evaluated (unknown opcode, stack underflow, ...)."""


class MemoryReadError(UnwindError):
    """Memory at ``address`` (absolute) could not be read (or, with
    ``access="write"``, written); ``size`` is in bytes."""

    def __init__(self, address, size=8, access="read"):
        super().__init__(f"cannot {access} {size} bytes at {address:#x}")
        self.address = address
        self.size = size
        self.access = access


class ModuleError(UnwindError):
    """An ELF module or JIT code object could not be loaded or is inconsistent."""


class ObjectFormatError(ModuleError):
    """Bytes that are not a well-formed x86-64 ELF64 relocatable object (see
    :mod:`unwinder.elfobject`).

    ``offset`` is the byte offset into the object of the header, entry or
    field found wrong; ``reason`` says what is wrong (the message without the
    offset).
    """

    def __init__(self, reason, offset=None):
        message = reason if offset is None else f"{reason} (at object offset {offset:#x})"
        super().__init__(message)
        self.reason = reason
        self.offset = offset


class NativeSourceError(UnwindError):
    """A hand-written ``.ll``/``.s`` file could not be rendered: a missing or
    unused placeholder, a layout LLVM would not share (see
    :mod:`unwinder.nativesrc`). Always a bug in the package, never bad input."""


class NativeWalkerError(UnwindError):
    """The native walker could not be built or was used wrongly (bad bounds, closed walker)."""
