"""LLVM IR and reference-language source, mutated, and the entries that compile them.

See :mod:`osrjit.testing.fuzz`.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .core import SEED_PROGRAMS, Outcome, broken, classify

__all__ = [
    "seed_irs", "Vocabulary", "IR_VOCABULARY", "SOURCE_VOCABULARY", "TEXT_EDITS", "mutate_text",
    "mutate_ir", "random_text_edits", "run_source", "run_emit", "RuntimeCompiler",
]

# --------------------------------------------------------------------------
# Text mutations: LLVM IR and reference-language source
# --------------------------------------------------------------------------

@functools.cache
def seed_irs() -> tuple:
    """The FunctionIRs of :data:`SEED_PROGRAMS` (slot and direct calls)."""
    from osrjit import lang
    return tuple(ir for calls in ("slot", "direct") for program in SEED_PROGRAMS
                 for ir in lang.compile_source(program, calls=calls))


_IR_TOKEN = re.compile(r'%"[^"]*"|@"[^"]*"|[%@][\w.$-]+|-?\d+|\w+|[^\s\w]')
_SOURCE_TOKEN = re.compile(r"\d+|\w+|//|\*\*|[=!<>]=|[^\s\w]")


@dataclass(frozen=True)
class Vocabulary:
    """How a text is split into tokens (``pattern``) and what may replace one
    (``tokens``: types, opcodes, keywords, constants, punctuation and names
    that exist elsewhere)."""
    pattern: re.Pattern
    tokens: tuple[str, ...]


IR_VOCABULARY = Vocabulary(_IR_TOKEN, (
    "i64", "i32", "i1", "ptr", "void", "token", "label", "add", "sub", "call", "ret", "br",
    "load", "store", "alloca", "icmp", "volatile", "define", "declare", "gc", "uwtable", "0",
    "1", "-1", "9223372036854775807", "undef", "poison", "null", "(", ")", ",", "{", "}", "[",
    "]", "=", "*", '"deopt"', "%entry", '%"var.n"', "@foo",
    '@"llvm.experimental.gc.statepoint.p0"', '@"llvm.experimental.gc.result.i64"',
    '"statepoint-example"', "!prof", "!0", "elementtype(i64 (i64))", ""))
SOURCE_VOCABULARY = Vocabulary(_SOURCE_TOKEN, (
    "def", "return", "if", "elif", "else", "while", "break", "continue", "pass", "and", "or",
    "not", "hook", "safepoint", "lambda", "for", "in", "global", "yield", "class", "import",
    ":", "(", ")", ",", "=", "+=", "+", "-", "*", "//", "%", "/", "**", "<", "==", "[", "]",
    ".", "@", "0", "1", "-1", "9223372036854775807", "9223372036854775808", "1.5", "'s'",
    "n", "x", "fib", "osrjit_x", "None", "True", "  ", "\t", ""))


def _delete_line(lines, where, value, vocabulary):
    if lines:
        del lines[where % len(lines)]


def _duplicate_line(lines, where, value, vocabulary):
    if lines:
        at = where % len(lines)
        lines.insert(value % (len(lines) + 1), lines[at])


def _swap_lines(lines, where, value, vocabulary):
    if len(lines) > 1:
        a, b = where % len(lines), value % len(lines)
        lines[a], lines[b] = lines[b], lines[a]


def _replace_token(lines, where, value, vocabulary):
    if not lines:
        return
    at = where % len(lines)
    tokens = list(vocabulary.pattern.finditer(lines[at]))
    if tokens:
        tok = tokens[value % len(tokens)]
        new = vocabulary.tokens[(value // len(tokens)) % len(vocabulary.tokens)]
        lines[at] = lines[at][:tok.start()] + new + lines[at][tok.end():]


def _copy_token(lines, where, value, vocabulary):
    """Replace a token by another token of the text (a name, a type or a
    constant that exists, so the result often still parses)."""
    if not lines:
        return
    at, other = where % len(lines), value % len(lines)
    tokens = list(vocabulary.pattern.finditer(lines[at]))
    donors = vocabulary.pattern.findall(lines[other])
    if tokens and donors:
        tok = tokens[(value // len(lines)) % len(tokens)]
        new = donors[where // len(lines) % len(donors)]
        lines[at] = lines[at][:tok.start()] + new + lines[at][tok.end():]


def _flip_byte(lines, where, value, vocabulary):
    if not lines:
        return
    at = where % len(lines)
    raw = bytearray(lines[at].encode())
    if raw:
        raw[value % len(raw)] ^= 1 << (where % 8)
        lines[at] = raw.decode("utf-8", "replace")


#: Text edit kinds: name -> function ``(lines, where, value, vocabulary)``
#: changing the list of lines in place.
TEXT_EDITS: dict[str, Callable] = {
    "delete_line": _delete_line, "duplicate_line": _duplicate_line, "swap_lines": _swap_lines,
    "replace_token": _replace_token, "copy_token": _copy_token, "flip_byte": _flip_byte,
}
_TEXT_EDIT_LIST = tuple(TEXT_EDITS.values())


def mutate_text(text: str, edits: Sequence[tuple[int, int, int]],
                vocabulary: Vocabulary) -> str:
    """``text`` with ``edits`` (kinds index :data:`TEXT_EDITS`) applied in order."""
    lines = text.split("\n")
    for kind, where, value in edits:
        _TEXT_EDIT_LIST[kind % len(_TEXT_EDIT_LIST)](lines, where, value, vocabulary)
    return "\n".join(lines)


def mutate_ir(ir, edits: Sequence[tuple[int, int, int]]):
    """A copy of FunctionIR ``ir`` whose ``module_ir`` has ``edits`` applied."""
    from dataclasses import replace
    return replace(ir, module_ir=mutate_text(ir.module_ir, edits, IR_VOCABULARY))


def random_text_edits(rng, max_edits: int = 3) -> list[tuple[int, int, int]]:
    """1 to ``max_edits`` text edits drawn from ``rng``."""
    return [(rng.randrange(len(TEXT_EDITS)), rng.randrange(1 << 16), rng.randrange(1 << 16))
            for _ in range(rng.randint(1, max_edits))]


def run_source(source: str) -> Outcome:
    """``lang.compile_source(source)``: a CompileError or FunctionIRs."""
    from osrjit import lang
    from osrjit.errors import CompileError
    try:
        irs = lang.compile_source(source)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify("compile_source", CompileError, e)
    if not all(ir.module_ir and ir.symbol for ir in irs):
        return broken("compile_source", "a FunctionIR without IR or symbol")
    return classify("compile_source", CompileError, None)


def run_emit(ir, tm) -> Outcome:
    """``emit_object(ir, tm)``: a CompileError or an object."""
    from osrjit.compiling import emit_object
    from osrjit.errors import CompileError
    try:
        obj = emit_object(ir, tm, 2)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify("emit_object", CompileError, e)
    if not obj.startswith(b"\x7fELF"):
        return broken("emit_object", "emit_object returned no ELF object")
    return classify("emit_object", CompileError, None)


class RuntimeCompiler:
    """``Runtime.compile_ir`` (or, with ``method="replace"``,
    ``Runtime.replace``) of one native runtime as a target. A mutated
    FunctionIR keeps its name, so a valid compile gives the function a new
    version; the versions it replaced are unloaded at once (nothing ever
    runs mutated code), so memory stays bounded. :meth:`check_alive`
    compiles and calls a function no case touches. Errors allowed:
    :class:`osrjit.OsrJitError` (``CompileError``, or the ``FrameMapError``
    twin when LLVM accepts IR whose sites no longer match the FunctionIR's)."""

    def __init__(self, runtime, method: str = "compile_ir"):
        if method not in ("compile_ir", "replace"):
            raise ValueError(f"method={method!r}")
        self.runtime = runtime
        self.name = method

    def __call__(self, ir) -> Outcome:
        from osrjit import OsrJitError
        rt = self.runtime
        try:
            if self.name == "replace":
                rt.replace(ir.name, ir)
            else:
                rt.compile_ir(ir)
            for version in rt.versions(ir.name)[:-1]:
                rt.unload(version)
        except Exception as e:                      # noqa: BLE001 - classified below
            return classify(self.name, OsrJitError, e)
        return classify(self.name, OsrJitError, None)

    def check_alive(self, k: int = 0) -> bool:
        """Compile a fresh function and call it: the runtime still works."""
        name = f"alive{k}"
        self.runtime.compile(f"def {name}(a):\n    return a * 3 + {k}\n")
        return self.runtime.function(name)(14) == 42 + k
