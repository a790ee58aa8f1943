"""From IR to a relocatable object: the part of compiling every backend shares.

    FunctionIR.module_ir --parse/verify--> llvm Module --O<n> pipeline-->
    --TargetMachine.emit_object--> ELF object (reloc='pic', codemodel='small')

We emit the object ourselves (rather than hand IR to LLJIT) because the
object bytes are what the stackmap records, the call-site check and the
unwinder's ``.eh_frame`` reading all need. The native backend links the
object into its own JIT library; the emulated backend places the same bytes
in emulated memory. :mod:`osrjit.native.compiler` runs :func:`emit_object` in a
child process.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping

import llvmlite.binding as llvm

from . import lang
from .abi import FunctionIR
from .errors import CompileError
from .ir import parse_module

__all__ = ["target_machine", "emit_object", "replacement_irs", "validate_batch",
           "RETURN_TYPES", "EMITTABLE_GCS", "gc_strategies", "check_emittable"]

#: Return types a function may have (the Python entry converts them).
RETURN_TYPES = ("i64", "i32", "i8", "i1", "double", "ptr", "void")

#: The ``gc "<name>"`` strategies this LLVM (llvmlite's) can emit code with
#: statepoints for. Code generation aborts the whole process on any other
#: name: ``report_fatal_error`` "unsupported GC" for names it does not know,
#: "no GCMetadataPrinter registered" for the built-in ``erlang`` and
#: ``ocaml`` (their printers are not linked in), and an assertion for a
#: statepoint in a ``shadow-stack`` function. An empty name means no GC (the
#: verifier then refuses statepoints).
EMITTABLE_GCS = frozenset({"", "statepoint-example", "coreclr"})

# LLVM's assembly lexer (LLLexer), as far as finding the ``gc`` keyword goes:
# a string runs to the next quote (a quote inside one is written \22), ``;``
# comments run to the end of the line, ``/* */`` comments, and names and
# keywords are runs of these characters (so ``%gc`` or ``gc.statepoint`` are
# not the keyword).
_LL_TOKEN = re.compile(r'"[^"]*"|;[^\n]*|/\*.*?\*/|[-\w.$@%!#]+|\S', re.S)
_LL_ESCAPE = re.compile(r"\\(\\|[0-9A-Fa-f]{2})")


def gc_strategies(module_ir: str) -> set[str]:
    """Every GC strategy name a function of ``module_ir`` (LLVM assembly that
    parses) asks for with ``gc "<name>"``, unescaped."""
    names = set()
    tokens = [t for t in _LL_TOKEN.findall(module_ir) if not t.startswith((";", "/*"))]
    for keyword, value in zip(tokens, tokens[1:]):
        if keyword == "gc" and value.startswith('"') and value.endswith('"') and len(value) > 1:
            names.add(_LL_ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\"
                                     else chr(int(m.group(1), 16)), value[1:-1]))
    return names


_llvm_ready = False
_llvm_lock = threading.Lock()


def init_llvm():
    """Initialise LLVM's native target, asm printer and parser (once per process)."""
    global _llvm_ready
    with _llvm_lock:
        if not _llvm_ready:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            _llvm_ready = True


def target_machine(opt_level: int = 2):
    """A host TargetMachine configured as the runtime's (PIC, small code model).

    The caller owns it (``close()`` it, or let it be collected).
    """
    init_llvm()
    return llvm.Target.from_default_triple().create_target_machine(
        opt=opt_level, reloc="pic", codemodel="small")


def emit_object(ir: FunctionIR, tm, opt_level: int = 2) -> bytes:
    """Parse, verify, optimise (new pass manager, ``O<opt_level>``) and emit
    ``ir.module_ir`` as a relocatable ELF object for ``tm``.

    Raises CompileError carrying LLVM's diagnostic if the IR does not parse or
    verify, if it does not define ``@<symbol>`` and ``@<symbol>__resume``, or
    if it is IR that verifies but on which LLVM's code generator would abort
    the process (see :func:`check_emittable`). Pure with respect to the JIT:
    nothing is loaded.
    """
    init_llvm()
    try:
        mod = parse_module(ir.module_ir)
    except (RuntimeError, UnicodeError) as e:
        raise CompileError(f"{ir.name}: LLVM rejected the IR: {_message(e)}") from None
    try:
        mod.verify()
    except (RuntimeError, UnicodeError) as e:
        raise CompileError(f"{ir.name}: LLVM IR does not verify: {_message(e)}") from None
    for symbol in (ir.symbol, ir.resume_symbol):
        try:
            fn = mod.get_function(symbol)
        except NameError:
            fn = None
        if fn is None or fn.is_declaration:
            raise CompileError(f"{ir.name}: the module does not define @{symbol}")
    check_emittable(ir, str(mod))
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    try:
        if opt_level:
            pto = llvm.create_pipeline_tuning_options(speed_level=opt_level)
            pb = llvm.create_pass_builder(tm, pto)
            pb.getModulePassManager().run(mod, pb)
        return tm.emit_object(mod)
    except (RuntimeError, UnicodeError) as e:
        raise CompileError(f"{ir.name}: LLVM could not emit code: {_message(e)}") from None


def _message(error: Exception) -> str:
    """LLVM's diagnostic from a failed llvmlite call. llvmlite decodes it as
    strict UTF-8, which fails when LLVM quotes a line cut inside a multi-byte
    character: then the bytes it was decoding, with replacement characters."""
    if isinstance(error, UnicodeDecodeError):
        return bytes(error.object).decode("utf-8", "replace")
    if isinstance(error, UnicodeEncodeError):
        return f"the IR text cannot be encoded as UTF-8 ({error.reason} at character {error.start})"
    return str(error)


# A local name as LLVM prints it: %name or %"quoted name" (a quote inside is \22).
_LOCAL = r'%"[^"]*"|%[-\w.$]+'
_TOKEN_DEFINITION = re.compile(
    rf'^\s*({_LOCAL}) = (?:[^\n]*\b(?:call|invoke) token [^\n]*@llvm\.experimental\.gc\.statepoint'
    r"|landingpad\b)", re.M)
_TOKEN_USE = re.compile(
    rf"@llvm\.experimental\.gc\.(?:result|relocate)[^\s(]*\(token ({_LOCAL}|[^,)\s]+)")


def check_emittable(ir: FunctionIR, printed: str) -> None:
    """Refuse (CompileError) IR that verifies but on which LLVM's code
    generator aborts the whole process; ``printed`` is the verified module
    as LLVM prints it. Two such things are known:

    * a GC strategy outside :data:`EMITTABLE_GCS`;
    * a ``gc.result`` or ``gc.relocate`` whose token is not a statepoint of
      the same function (``token poison``, ``undef``, ``none``, another
      token): the verifier lets it pass, and instruction selection then
      asserts ("Register use before def!"; found by the IR fuzzer).
    """
    unknown = gc_strategies(ir.module_ir) - EMITTABLE_GCS
    if unknown:
        raise CompileError(f"{ir.name}: LLVM cannot emit code for GC strategy "
                           f"{', '.join(map(repr, sorted(unknown)))} (it would abort the process; "
                           f"supported: {', '.join(sorted(EMITTABLE_GCS - {''}))})")
    for body in printed.split("\ndefine ")[1:]:
        body = body.split("\n}\n", 1)[0]
        statepoints = set(_TOKEN_DEFINITION.findall(body))
        for token in _TOKEN_USE.findall(body):
            if token not in statepoints:
                raise CompileError(
                    f"{ir.name}: a gc.result or gc.relocate takes token {token}, which is not "
                    f"a statepoint of its function (LLVM would abort the process)")


def validate_batch(irs: Iterable[FunctionIR], signatures: Mapping[str, tuple]) -> list[FunctionIR]:
    """Check a batch of FunctionIRs before anything is emitted: each a
    FunctionIR, each name once, a supported return type, and the signature of
    an already compiled function (``signatures``: name -> (params, return
    type)) unchanged. Returns the batch as a list."""
    irs = list(irs)
    seen = set()
    for ir in irs:
        if not isinstance(ir, FunctionIR):
            raise TypeError(f"expected FunctionIR, got {type(ir).__name__}")
        if ir.name in seen:
            raise CompileError(f"function {ir.name!r} is defined twice in one batch")
        seen.add(ir.name)
        old = signatures.get(ir.name)
        if old is not None and (len(old[0]) != len(ir.params) or old[1] != ir.return_type):
            raise CompileError(
                f"cannot redefine {ir.name!r} with a different signature: "
                f"{len(old[0])} parameters -> {len(ir.params)}, returning "
                f"{old[1]} -> {ir.return_type} (compiled callers use the old one)")
        if ir.return_type not in RETURN_TYPES:
            raise CompileError(f"{ir.name}: unsupported return type {ir.return_type!r}")
    return irs


def replacement_irs(names, source, *, polls: bool, calls: str,
                    known: Mapping[str, int], filename: str | None = None,
                    stack_check: bool = False) -> list[FunctionIR]:
    """The FunctionIRs a ``replace(names, source)`` call links, for every backend.

    ``source``: reference-language text (compiled with ``known``: name ->
    arity of the functions already compiled; ``filename`` names it in the
    line tables; ``stack_check`` adds the entry stack check) or FunctionIR object(s). They
    must define exactly ``names``: :class:`CompileError` otherwise.
    """
    if isinstance(source, str):
        irs = lang.compile_source(source, known=known, polls=polls, calls=calls,
                                  filename=filename, stack_check=stack_check)
    else:
        irs = [source] if isinstance(source, FunctionIR) else list(source)
    defined = {ir.name for ir in irs}
    missing = [n for n in names if n not in defined]
    extra = sorted(defined - set(names))
    if missing:
        raise CompileError(f"the replacement does not define {missing}")
    if extra:
        raise CompileError(f"the replacement also defines {extra}, which replace() was not "
                           "asked to replace (compile() them separately)")
    return irs
