"""deopt: frame maps (LLVM stackmaps), return-address hijacking and transfer.

Layering: ``deopt`` uses :mod:`unwinder`; it never imports :mod:`osrjit`.
"""
from .errors import (DeoptError, FrameMapError, HijackError, IncompatibleVersion,
                     ObjectFormatError, TransferError)

__all__ = ["DeoptError", "FrameMapError", "ObjectFormatError", "IncompatibleVersion",
           "HijackError", "TransferError"]
