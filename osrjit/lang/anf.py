"""The lowered (A-normal) form of the reference language, and the naming of sites.

The key and id scheme of sites is described in :mod:`osrjit.lang`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

from osrjit.abi import SiteKind


# -- site keys -------------------------------------------------------------------


def site_key(function: str, kind: SiteKind | str, name: str, ordinal: int) -> str:
    """``"<function>:<kind>:<name>:<ordinal>"``, e.g. ``site_key("fib", "call", "fib", 1)``."""
    kind = kind.value if isinstance(kind, SiteKind) else kind
    return f"{function}:{kind}:{name}:{ordinal}"


def site_id(key: str) -> int:
    """The stable 63-bit, nonzero site id of ``key`` (see :mod:`osrjit.lang`)."""
    digest = hashlib.blake2b(key.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)) or 1


def temporary_name(key: str) -> str:
    """Name of the result temporary of site ``key``: the key without its function."""
    return key.split(":", 1)[1]


# -- the lowered (A-normal) form -------------------------------------------------
# Pure expressions contain no sites; they may still branch (short-circuit,
# division by zero), which codegen handles without variables.


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Bin:
    op: str  # "+", "-", "*", "//", "%"
    left: object
    right: object


@dataclass(frozen=True)
class Neg:
    operand: object


@dataclass(frozen=True)
class Not:
    operand: object


@dataclass(frozen=True)
class Cmp:
    op: str  # "==", "!=", "<", "<=", ">", ">="
    left: object
    right: object


@dataclass(frozen=True)
class Chain:
    """``operands[0] ops[0] operands[1] ops[1] ...`` with short-circuit."""
    operands: tuple
    ops: tuple


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    values: tuple


@dataclass(frozen=True)
class Cond:
    test: object
    body: object
    orelse: object


#: ``line`` of a statement: the source line it comes from (None: unknown),
#: for the DWARF line table; it takes no part in equality.


@dataclass(frozen=True)
class Assign:
    target: str
    value: object
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Eval:
    value: object
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Site:
    key: str
    id: int
    kind: SiteKind
    callee: str | None      # call: function name; hook/poll: None
    args: tuple = ()        # pure expressions
    result: str | None = None
    line: int | None = None
    col: int | None = None


@dataclass(frozen=True)
class If:
    test: object
    body: tuple
    orelse: tuple
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class While:
    header: tuple           # statements re-run before each test
    test: object
    body: tuple
    latch: Site | None      # back-edge poll
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Return:
    value: object
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Break:
    pass


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class LoweredFunction:
    """One function in A-normal form, with the live set after each site."""
    name: str
    params: tuple[str, ...]
    variables: tuple[str, ...]     # params, locals, temporaries (declaration order)
    body: tuple
    sites: tuple[Site, ...]        # evaluation order
    live: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> sorted names
    line: int | None = None        # of the ``def``
