"""Plain LLVM IR in: osrjit instruments ordinary functions itself.

:func:`instrument` takes a module of ordinary functions — LLVM IR text or an
:class:`llvmlite.ir.Module`, no statepoints, no resume entries, no osrjit
helpers — and returns one :class:`osrjit.abi.FunctionIR` per defined
function, named by its IR name. Conventions in the plain IR:

* ``declare i64 @osrjit_hook(i64)`` calls the Python hook (a HOOK site);
* ``declare void @osrjit_safepoint()`` is an explicit poll (a POLL site);
* a call to another JIT function (defined in the module, or already known to
  the runtime) is a plain call to its name (a CALL site);
* any other callee is resolved in the process (an EXTERNAL site); calls of
  ``llvm.*`` intrinsics, inline asm, ``@osrjit_error`` and vararg functions
  are not sites (LLVM cannot wrap a vararg call in a statepoint): a frame
  waiting in one keeps running its version until the call returns.

The steps, per function:

1. *Prepare* (module-wide): parse and verify in an LLVM context of its own,
   promote allocas to SSA values (SROA), and give every unnamed argument,
   block and value a name: the source variable a debug record
   (``llvm.dbg.value`` with an empty expression) binds it to, else
   ``osrjit.t<hash>.<n>``, where ``<hash>`` digests the function's text: such
   a value never matches one of an edited version, so frames where one is
   live cannot transfer (a clear :class:`~osrjit.IncompatibleVersion`), while
   an unchanged function keeps its names. With ``polls``, a ``call void
   @osrjit_safepoint()`` is added after the entry block's allocas and after
   the phis of every block that a depth-first search enters through a back
   edge (every cycle has one).
2. *Analyse*: live values (backward dataflow over blocks; a phi's operand is
   live out of its predecessor only). The values live across a site are those
   live right after its call, minus the call's own result, in name order.
   Values are identified across versions by their IR names.
3. *Emit the normal entry* ``@"osrjit.fn.<name>"``: each site becomes
   ``gc.statepoint`` (ID: the stable id of ``(function, kind, callee, k-th
   occurrence)``) with a ``"deopt"`` bundle of the live values, and a
   ``gc.result`` under the call's own name; a poll becomes the flag load and
   the slow call (the sequence :meth:`osrjit.ir.BodyBuilder.poll` emits).
4. *Emit the resume entry* ``@"osrjit.fn.<name>__resume"(i64, ptr)``: the
   same body, in which every value live across a site, every used site
   result and every used parameter lives in an alloca (stored after its
   definition, loaded before each use; a phi's operand is loaded at the end
   of its predecessor). Each site's block is split after the call, and one
   block per site stores ``state[1 + i]`` and ``state[0]`` (the result) into
   the slots before branching there. The O2 pipeline turns the slots back
   into SSA values.

Limits of this first cut (each a :class:`~osrjit.CompileError` naming the
function, the value and its type): values crossing a site are ``i1``,
``i8``, ``i16``, ``i32``, ``i64``, ``float``, ``double`` or ``ptr``; a site
call's result is an integer or ``ptr`` (the transfer restores RAX, not
XMM0); no ``invoke``, ``callbr``, ``musttail`` or ``byval``-style calls
at sites, no vararg JIT functions; the address of a stack slot (an alloca
that SROA could not promote, or a pointer derived from one) cannot cross a
site; a JIT function's address cannot be taken (only called); osrjit's own
symbols (``osrjit.fn.*``, ``osrjit.slot.*``) cannot be referenced; every
global a function references must be a constant (an internal copy goes into
each function's module) or external.

Layout: :mod:`.model` reads a function (names, blocks, liveness, loop
headers), :mod:`.emit` decides the sites and writes the two entries, and
this module prepares the input and is the API.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping

from llvmlite import binding as llvm
from llvmlite import ir as llir

from ..abi import CALL_MODES, HOOK_SYMBOL, FunctionIR
from ..errors import CompileError, SignatureMismatch
from ..ir import parse_module
from .emit import LIVE_TYPES, RESULT_TYPES, Context, function_ir
from .model import PREFIX, SAFEPOINT_SYMBOL, model_of, poll_headers, ref, unref

__all__ = ["instrument", "is_plain_ir", "signature_of", "known_signatures", "check_signatures",
           "SAFEPOINT_SYMBOL", "LIVE_TYPES", "RESULT_TYPES"]


# -- input -----------------------------------------------------------------------

_DEFINE_LINE = re.compile(r"^\s*define\b[^\n]*@", re.M)


def is_plain_ir(source) -> bool:
    """True for an ``llvmlite.ir.Module`` or text with a ``define ... @name``
    line (IR; reference-language source has no ``@``)."""
    if isinstance(source, llir.Module):
        return True
    return isinstance(source, str) and _DEFINE_LINE.search(source) is not None


def signature_of(module_ir: str, symbol: str) -> str:
    """The LLVM function type of ``@symbol`` in ``module_ir``, as LLVM prints it
    (``"double (double, i64)"``). Only the ``define`` line is parsed (and
    cached): the runtime asks for the current version of every known
    function at each plain-IR compile."""
    for form in {ref("@", symbol), f'@"{symbol}"'}:
        start = module_ir.find(form + "(")
        line_start = module_ir.rfind("\n", 0, start) + 1
        if start >= 0 and module_ir.startswith("define ", line_start):
            depth, i = 0, start + len(form)
            while i < len(module_ir):
                depth += {"(": 1, ")": -1}.get(module_ir[i], 0)
                if depth == 0:
                    return _header_signature(module_ir[line_start:i + 1])
                i += 1
    with _parsed(module_ir) as mod:
        return str(mod.get_function(symbol).global_value_type)


@functools.lru_cache(maxsize=4096)
def _header_signature(prototype: str) -> str:
    """The function type of ``define ... @f(params)`` (attributes cut off)."""
    with _parsed(prototype + " {\n  unreachable\n}\n") as mod:
        [fn] = [f for f in mod.functions]
        return str(fn.global_value_type)


def _text_of(module) -> str:
    if isinstance(module, llir.Module):
        return str(module)
    if isinstance(module, str):
        return module
    raise TypeError(f"expected LLVM IR text or an llvmlite.ir.Module, got "
                    f"{type(module).__name__}")


def _parse(text: str):
    try:
        mod = parse_module(text)
        mod.verify()
    except RuntimeError as e:
        raise CompileError(f"LLVM rejected the IR: {e}") from None
    return mod


def _promote(mod) -> None:
    """SROA: allocas only loaded and stored become SSA values (and phis).
    Every pass object is closed here: a PassBuilder left to the garbage
    collector keeps about a kilobyte of native memory for good."""
    from ..compiling import target_machine
    tm = target_machine(0)
    pto = llvm.create_pipeline_tuning_options(speed_level=0)
    pb = llvm.create_pass_builder(tm, pto)
    mpm = llvm.create_new_module_pass_manager()
    try:
        mpm.add_sroa_pass()
        mpm.run(mod, pb)
    finally:
        mpm.close()
        pb.close()
        pto.close()
        tm.close()


_DEBUG_VARIABLE = re.compile(r'^!(\d+) = !DILocalVariable\(name: "([^"]*)"', re.M)
# A debug record or intrinsic binding a value to a variable as it is (empty expression).
_DEBUG_VALUE = re.compile(
    r"(?:#dbg_value\(|call void @llvm\.dbg\.value\(metadata )[^%\n]*?"
    r'(%"[^"]*"|%[-a-zA-Z$._0-9]+), (?:metadata )?!(\d+), (?:metadata )?!DIExpression\(\)')


_LOCATION = re.compile(r"^!(\d+) = !DILocation\(line: (\d+), column: (\d+)", re.M)
_DEFINE = re.compile(r'^define [^@]*@("[^"]*"|[-a-zA-Z$._0-9]+)\(', re.M)


def _function_texts(module_text: str) -> dict[str, str]:
    """Raw function name -> its definition, as the printed module has it
    (metadata numbered module-wide)."""
    out = {}
    for m in _DEFINE.finditer(module_text):
        end = module_text.find("\n}\n", m.start())
        out[unref("%" + m.group(1))] = module_text[m.start():end + 2]
    return out


def _name_everything(fn, printed: str, variables: Mapping[str, str]) -> None:
    """Give every unnamed argument, block and non-void value of ``fn`` (whose
    definition, as the module prints it, is ``printed``) a name: the source
    variable a debug record binds it to (``variables``: metadata number ->
    ``DILocalVariable`` name), else ``osrjit.t<hash>.<n>``."""
    digest = hashlib.blake2b(printed.encode(), digest_size=4).hexdigest()
    bound = {}
    for ref, var in _DEBUG_VALUE.findall(printed):
        if var in variables:
            bound.setdefault(unref(ref), variables[var])
    # LLVM numbers unnamed arguments, then per block the block and its
    # non-void instructions, in order: the numbers the debug records use.
    values = [a for a in fn.arguments]
    blocks = list(fn.blocks)
    for block in blocks:
        values.append(block)
        values.extend(i for i in block.instructions if str(i.type) != "void")
    unnamed = [v for v in values if not v.name]
    for number, value in enumerate(unnamed):
        name = bound.get(str(number))
        if name and not value.is_block:
            value.name = name
    n = 0
    for i, block in enumerate(blocks):
        if not block.name:
            block.name = f"{PREFIX}b{i}"
    for value in values:
        if not value.name:
            value.name = f"{PREFIX}t{digest}.{n}"
            n += 1


def _insert_polls(text: str, fn_names: set[str], mod) -> str:
    """``text`` (the prepared module, printed) with ``call void
    @osrjit_safepoint()`` after the entry block's allocas and after the phis
    of every loop header of the functions ``fn_names``."""
    where: dict[str, tuple[str, set[str]]] = {}
    for name in fn_names:
        fn = mod.get_function(name)
        blocks = model_of(fn)
        where[name] = (blocks[0].name, set(poll_headers(blocks)))
    out = []
    current = None
    entry_pending = False
    header_pending = False
    call = f"  call void {ref('@', SAFEPOINT_SYMBOL)}()"
    for line in text.split("\n"):
        m = re.match(r"define [^@]*@(\"[^\"]*\"|[-a-zA-Z$._0-9]+)\(", line)
        if m:
            current = unref("%" + m.group(1))
            current = current if current in where else None
            entry_pending = current is not None
            out.append(line)
            continue
        if current is None:
            out.append(line)
            continue
        if line == "}":
            current = None
            out.append(line)
            continue
        label = re.match(r'^("[^"]*"|[-a-zA-Z$._0-9]+):', line)
        if label:
            name = unref("%" + label.group(1))
            header_pending = name in where[current][1] and not entry_pending
            out.append(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(";"):
            out.append(line)
            continue
        is_alloca = re.match(r'%("[^"]*"|[-a-zA-Z$._0-9]+) = alloca\b', stripped)
        is_phi = re.match(r'%("[^"]*"|[-a-zA-Z$._0-9]+) = phi\b', stripped)
        if entry_pending and not is_alloca:
            out.append(call)
            entry_pending = False
        if header_pending and not is_phi:
            out.append(call)
            header_pending = False
        out.append(line)
    try:
        mod.get_function(SAFEPOINT_SYMBOL)
    except NameError:
        out.append(f"declare void {ref('@', SAFEPOINT_SYMBOL)}()")
    return "\n".join(out)


def _module_globals(text: str, defined: set[str], mod) -> str:
    """Everything of the printed module but function definitions and the
    declarations of the functions it defines: globals, other declarations,
    attribute groups and metadata. Mutable global variables are refused."""
    for g in mod.global_variables:
        if g.is_declaration:
            continue
        keyword = re.search(r"\b(global|constant)\b", str(g).split("=", 1)[1])
        if keyword is None or keyword.group(1) != "constant":   # the first one, before the type
            raise CompileError(f"global @{g.name} is mutable: a module's functions become "
                               f"separate versions, which cannot share a mutable global; "
                               f"make it a constant or an external global")
        for token in re.findall(r'@("[^"]*"|[-a-zA-Z$._0-9]+)', str(g).split("=", 1)[1]):
            if unref("%" + token) in defined:
                raise CompileError(f"global @{g.name} holds the address of JIT function "
                                   f"{unref('%' + token)!r}; JIT functions can only be called")
    out = []
    skip = False
    for line in text.split("\n"):
        if line.startswith("define "):
            skip = True
            continue
        if skip:
            if line == "}":
                skip = False
            continue
        m = re.match(r"declare [^@]*@(\"[^\"]*\"|[-a-zA-Z$._0-9]+)\(", line)
        if m:
            name = unref("%" + m.group(1))
            if name in defined or name == SAFEPOINT_SYMBOL or name.startswith(
                    ("llvm.experimental.gc.", "llvm.trap")):
                continue
        if line.startswith("source_filename") or line.startswith("; ModuleID"):
            continue
        out.append(line)
    return "\n".join(out)


def _max_metadata_id(text: str) -> int:
    ids = [int(m) for m in re.findall(r"^!(\d+) =", text, re.M)]
    return max(ids, default=-1)


def instrument(module, *, known_signatures: Mapping[str, str] | None = None,
               polls: bool = True, calls: str = "slot",
               stack_check: bool = False) -> list[FunctionIR]:
    """Instrument every function ``module`` defines; one FunctionIR each.

    ``module``: LLVM IR text or an :class:`llvmlite.ir.Module` of ordinary
    functions (see the module docstring for the conventions).
    ``known_signatures``: name -> LLVM function type (``"i64 (i64)"``) of the
    JIT functions already compiled: calls to them are CALL sites, and a
    function redefined here must keep its type (:class:`SignatureMismatch`
    otherwise). ``polls``: safepoint polls at function entry and loop headers.
    ``calls``: ``"slot"`` or ``"direct"`` (see :mod:`osrjit.abi`).
    ``stack_check``: each function starts with the entry stack check, so a
    recursion past its thread's stack limit raises :class:`osrjit.StackOverflow`
    (the native backend asks for it; see :meth:`osrjit.ir.BodyBuilder.stack_check`).
    Raises :class:`CompileError` for IR LLVM rejects or that this first cut
    cannot instrument (naming the function, value and type).
    """
    if calls not in CALL_MODES:
        raise CompileError(f"calls={calls!r}, expected one of {CALL_MODES}")
    known = dict(known_signatures or {})
    with _parsed(_text_of(module)) as mod:
        names, own, text = _prepare(mod, known, polls)
    jit_types = {**known, **own}
    with _parsed(text) as mod:
        declared = {f.name: str(f.global_value_type) for f in mod.functions}
        globals_text = _module_globals(text, set(names), mod)
        prof_id = _max_metadata_id(text) + 1
        headers = {name: body.split("\n", 1)[0] for name, body in _function_texts(text).items()}
        locations = {n: (int(line), int(col)) for n, line, col in _LOCATION.findall(text)}
        out = []
        for name in names:
            ctx = Context(name, jit_types, calls, headers[name], locations)
            out.append(function_ir(ctx, mod.get_function(name), globals_text, prof_id,
                                    declared, stack_check=stack_check))
    return out


@contextlib.contextmanager
def _parsed(text: str):
    """The verified module of ``text``, closed on the way out. Closing it
    explicitly matters when an error is raised: a traceback that keeps the
    module alive can end in a reference cycle, and the garbage collector may
    then free the module's LLVM context before the module (a crash)."""
    mod = _parse(text)
    try:
        yield mod
    finally:
        mod.close()


def _prepare(mod, known: Mapping[str, str], polls: bool):
    """Step 1 on ``mod``: returns (defined names, name -> function type,
    the prepared module's text with polls inserted)."""
    defined = [f for f in mod.functions if not f.is_declaration]
    if not defined:
        raise CompileError("the module defines no function")
    names = [f.name for f in defined]
    for name in names:
        if name.startswith(("llvm.", PREFIX)) or name in (HOOK_SYMBOL, SAFEPOINT_SYMBOL):
            raise CompileError(f"cannot define a JIT function named {name!r}")
    own = {f.name: str(f.global_value_type) for f in defined}
    for name, sig in own.items():
        if sig.endswith("...)"):
            raise CompileError(f"{name}: JIT functions cannot be vararg ({sig})")
        old = known.get(name)
        if old is not None and old != sig:
            raise SignatureMismatch(name, old, sig)
    if " = alloca " in str(mod):
        _promote(mod)   # not otherwise: every pass-manager run keeps ~1.5 KiB of LLVM's
    printed = str(mod)
    variables = dict(_DEBUG_VARIABLE.findall(printed))
    texts = _function_texts(printed)
    for fn in defined:
        _name_everything(fn, texts[fn.name], variables)
    for g in mod.global_variables:
        if not g.is_declaration:
            g.linkage = "internal"   # a private copy in every function's module
    text = str(mod)
    if polls:
        text = _insert_polls(text, set(names), mod)
    return names, own, text


def known_signatures(functions: Iterable) -> dict[str, str]:
    """name -> LLVM function type of each :class:`osrjit.versions.Function`'s
    current version (the runtime's table)."""
    out = {}
    for fn in functions:
        v = fn.current
        if v is not None:
            out[fn.name] = signature_of(v.ir.module_ir, v.ir.symbol)
    return out


def check_signatures(irs: Iterable[FunctionIR], functions) -> None:
    """Raise :class:`SignatureMismatch` if a FunctionIR of ``irs`` redefines a
    function of ``functions`` (the runtime's table) with another LLVM function
    type — whatever produced it. Reads only ``define`` lines."""
    for ir in irs:
        fn = functions.find(ir.name)
        if fn is None or fn.current is None:
            continue
        old = signature_of(fn.current.ir.module_ir, fn.current.ir.symbol)
        new = signature_of(ir.module_ir, ir.symbol)
        if old != new:
            raise SignatureMismatch(ir.name, old, new)
