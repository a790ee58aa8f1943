"""The osrjit package's exception hierarchy (root: :class:`OsrJitError`)."""


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
