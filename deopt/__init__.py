"""deopt: frame maps (LLVM stackmaps), return-address hijacking and transfer.

Layering: ``deopt`` uses :mod:`unwinder`; it never imports :mod:`osrjit`.
"""
from .errors import DeoptError, FrameMapError, IncompatibleVersion

__all__ = ["DeoptError", "FrameMapError", "IncompatibleVersion"]
