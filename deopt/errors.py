"""The deopt package's exception hierarchy (root: :class:`DeoptError`)."""


class DeoptError(Exception):
    """Root of every exception raised by :mod:`deopt`."""


class FrameMapError(DeoptError):
    """Malformed stackmap bytes or a frame map that does not fit its code.

    ``offset`` is the byte offset into the ``.llvm_stackmaps`` section where
    decoding failed, or ``None`` when the problem is not about a byte position.
    """

    def __init__(self, message, offset=None):
        if offset is not None:
            message = f"{message} (at stackmap offset {offset:#x})"
        super().__init__(message)
        self.offset = offset


class ObjectFormatError(DeoptError):
    """The bytes given to :class:`deopt.framemaps.ObjectImage` are not a
    well-formed x86-64 relocatable object, so no frame map can be read from
    them.

    ``offset`` is the byte offset into the object of the header, entry or
    field found wrong (None when not known); ``reason`` says what is wrong.
    ``__cause__`` is the :class:`unwinder.ObjectFormatError` of the reader.
    """

    def __init__(self, reason, offset=None):
        message = reason if offset is None else f"{reason} (at object offset {offset:#x})"
        super().__init__(message)
        self.reason = reason
        self.offset = offset


class IncompatibleVersion(DeoptError):
    """A new version cannot take over frames of an old one.

    ``site_id`` names the old version's site that the new version cannot
    resume; ``reason`` says what differs.
    """

    def __init__(self, message, site_id=None, reason=None):
        super().__init__(message)
        self.site_id = site_id
        self.reason = reason


class HijackError(DeoptError):
    """A slot could not be hijacked, or a stub return has no record."""


class TransferError(DeoptError):
    """A frame could not be transferred; the frame then returns into its old code."""


class NativeTransferError(DeoptError):
    """Native transfer code could not be generated for a version (its frames
    then take the Python transfer; see ``NativeTransferPath.build_errors``)."""
