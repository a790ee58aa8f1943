"""deopt: frame maps (LLVM stackmaps), return-address hijacking and transfer.

Layering: ``deopt`` uses :mod:`unwinder`; it never imports :mod:`osrjit`.
"""
from .errors import DeoptError, FrameMapError, HijackError, IncompatibleVersion, TransferError

__all__ = ["DeoptError", "FrameMapError", "IncompatibleVersion", "HijackError", "TransferError"]
