"""The contract between code generators (:mod:`osrjit.lang`, :mod:`osrjit.ir`)
and the runtime (:mod:`osrjit.runtime`).

Everything a compiled version may reference outside itself is named here, and
so is the layout of the ``state`` buffer a resume entry reads. A generator
produces one :class:`FunctionIR` per function; the runtime emits an object for
it, links it as its own JIT library (one library per version), and pairs the
object's ``.llvm_stackmaps`` records with :attr:`FunctionIR.sites`.

Frame-map sites
    Every place where a frame of a version can be suspended is a call emitted
    as ``@llvm.experimental.gc.statepoint`` whose *ID* is the site id and whose
    ``"deopt"`` operand bundle lists the live values in the order of
    :attr:`SiteInfo.live`. The function carries ``gc "statepoint-example"``.
    LLVM records such a site exactly at the call's return address; the first
    three stackmap locations are the statepoint header constants, then one
    location per live value.

Resume entry
    ``i64 @<symbol>__resume(i64 %site_id, ptr %state)`` continues the
    function right after site ``site_id``. ``state`` is an array of 8-byte
    slots: ``state[STATE_RESULT_INDEX]`` holds the call's result (ignored for
    sites without one) and ``state[STATE_LIVE_BASE + i]`` the value of
    ``live[i]``. An unknown site id traps (``llvm.trap``). The state buffer is
    read only before the first site of the resumed code is reached, so the
    caller may reuse it after that.
"""
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Mapping

#: ``@osrjit.slot.<name> = external global ptr`` — absolute address of an
#: 8-byte cell holding the entry address of the current version of ``<name>``.
#: Calls to *other* functions load the cell and call through it
#: (:data:`CALLS_SLOT` mode).
SLOT_PREFIX = "osrjit.slot."
#: ``declare <sig> @"osrjit.fn.<name>"`` — in :data:`CALLS_DIRECT` mode a call
#: to another function ``<name>`` is a statepoint whose callee is this
#: external function, so the object holds ``E8 rel32`` with an
#: ``R_X86_64_PLT32`` relocation against the symbol. The runtime resolves it at
#: link time to the entry of ``<name>``'s current version and, when a new
#: version is published, patches the rel32 (or the JIT stub's GOT entry) of
#: every such call in every loaded version (:mod:`osrjit.native.patching`). It is also
#: the default *definition* symbol of a version (``osrjit.ir.default_symbol``),
#: which is why self-calls, direct in both modes, look the same in the object.
DIRECT_CALL_PREFIX = "osrjit.fn."
#: Call modes of the code generators (``compile_source(calls=...)``,
#: ``VersionedFunction(calls=...)``): calls to other functions through slot
#: cells (load + indirect call; publishing is one 8-byte store) ...
CALLS_SLOT = "slot"
#: ... or direct (``E8 rel32``; publishing patches every call site).
CALLS_DIRECT = "direct"
CALL_MODES = (CALLS_SLOT, CALLS_DIRECT)
#: ``declare i64 @osrjit_hook(i64)`` — the runtime's hook service.
HOOK_SYMBOL = "osrjit_hook"
#: ``@osrjit_safepoint_flag = external global i64`` — nonzero asks polls to stop.
SAFEPOINT_FLAG_SYMBOL = "osrjit_safepoint_flag"
#: ``declare void @osrjit_safepoint_slow()`` — a poll's slow path.
SAFEPOINT_SLOW_SYMBOL = "osrjit_safepoint_slow"
#: ``@osrjit_stack_limit_tls = external global i8`` — an absolute symbol whose
#: *value* is the byte offset from ``%fs`` of the thread's stack limit (see
#: :meth:`osrjit.ir.BodyBuilder.stack_check`).
STACK_LIMIT_SYMBOL = "osrjit_stack_limit_tls"
#: ``declare void @osrjit_stack_overflow()`` — the stack check's slow path:
#: abandons the thread's JIT frames (not a site; it does not return when the
#: thread is in an entry).
STACK_OVERFLOW_SYMBOL = "osrjit_stack_overflow"
#: ``declare void @osrjit_error(i64 code)`` — reports a language-level error
#: (an :class:`ErrorCode`). *Not* a site: no frame map, no statepoint, so the
#: service must not wait for a safepoint or walk/replace the calling frame.
#: It returns normally and the generated code continues as if the failing
#: operation produced 0; the runtime remembers the first error of the thread
#: and raises it (see :class:`ErrorCode`) to the Python caller when the
#: outermost JIT call returns.
ERROR_SYMBOL = "osrjit_error"
#: Suffix of a version's resume entry symbol.
RESUME_SUFFIX = "__resume"
#: GC strategy attribute that makes LLVM lower statepoints.
GC_STRATEGY = "statepoint-example"
#: Number of statepoint header constants before the deopt values in a record.
STATEPOINT_HEADER_LOCATIONS = 3
#: Index of the call result in the resume state (8-byte slots).
STATE_RESULT_INDEX = 0
#: Index of the first live value in the resume state (8-byte slots).
STATE_LIVE_BASE = 1


class ErrorCode(IntEnum):
    """The ``code`` argument of ``@osrjit_error``; the runtime raises the named
    Python exception to the caller once the outermost JIT call returns."""
    ZERO_DIVISION = 1  #: ``//`` or ``%`` by zero -> :class:`ZeroDivisionError`


class SiteKind(Enum):
    """What a frame-map site suspends at."""
    CALL = "call"      #: a call to a JIT-compiled function
    HOOK = "hook"      #: a call to the runtime's hook service
    POLL = "poll"      #: a safepoint poll's slow-path call (safepoint() or a loop back-edge)
    EXTERNAL = "external"  #: any other call (IR authors)


@dataclass(frozen=True)
class LiveValue:
    """One value live across a site: its source-level ``name`` and LLVM ``type``
    (``"i64"``, ``"i32"``, ``"double"``, ``"ptr"``; each occupies one 8-byte state slot)."""
    name: str
    type: str = "i64"


@dataclass(frozen=True)
class SiteInfo:
    """Compile-time facts about one site (everything but its machine location)."""
    id: int
    kind: SiteKind
    callee: str | None
    live: tuple[LiveValue, ...]
    has_result: bool = True
    line: int | None = None
    col: int | None = None


@dataclass(frozen=True)
class FunctionIR:
    """One function version ready for the runtime to compile.

    ``module_ir`` is a complete textual LLVM module defining ``@<symbol>`` and
    ``@<symbol>__resume``; ``params`` are the parameter names (all ``i64`` for
    the reference language); ``callees`` are the other functions it calls
    (function names, never itself), through ``osrjit.slot.*`` cells or
    directly; ``direct_callees`` is the subset called directly through
    ``@"osrjit.fn.<name>"`` (:data:`DIRECT_CALL_PREFIX`), whose call sites the
    runtime must patch when ``<name>`` gets a new version.
    """
    name: str
    params: tuple[str, ...]
    module_ir: str
    symbol: str
    sites: Mapping[int, SiteInfo] = field(default_factory=dict)
    callees: frozenset = frozenset()
    return_type: str = "i64"
    direct_callees: frozenset = frozenset()

    @property
    def resume_symbol(self) -> str:
        return self.symbol + RESUME_SUFFIX


def direct_call_symbol(name: str) -> str:
    """The symbol a direct call to function ``name`` references: ``osrjit.fn.<name>``."""
    return DIRECT_CALL_PREFIX + name
