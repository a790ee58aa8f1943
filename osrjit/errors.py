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


# --- runtime (osrjit.runtime) ------------------------------------------------

class UnknownFunction(OsrJitError, LookupError):
    """No function of that name has been compiled into the runtime.

    ``name`` is the name asked for.
    """

    def __init__(self, name):
        super().__init__(f"no function named {name!r} has been compiled")
        self.name = name


class RuntimeClosed(OsrJitError):
    """The :class:`~osrjit.runtime.Runtime` was closed; its code is unmapped."""


class HookNotSet(OsrJitError):
    """Compiled code called the hook service but no hook was installed
    (:meth:`~osrjit.runtime.Runtime.on_hook`)."""


class VersionInUse(OsrJitError):
    """A version cannot be unloaded: it is still the function's current version."""
