"""The compile stage: an unwind row reduced to a small step plan for the walker.

framehop compiles DWARF rows into tiny rules before caching them; this is the
same idea. A :class:`StepPlan` holds, for the CFA and for each register the
walker carries (RIP, RBX, RBP, R12–R15), the operation and its operand:

    cfa        = regs[cfa_register] + cfa_offset       (or the row's expression)
    OP_LOAD    : caller.r = *(cfa + n)                 (DW_CFA_offset)
    OP_SAME    : caller.r = regs[r]                    (no rule / same_value)
    OP_UNDEF   : caller.r unknown                      (DW_CFA_undefined)
    OP_VALUE   : caller.r = cfa + n                    (DW_CFA_val_offset)
    OP_COPY    : caller.r = regs[n]                    (DW_CFA_register)
    OP_GENERAL : caller.r = row.recover(r, ...)        (expressions: rare)

``saved`` lists ``(register, n)`` for every register the row saves at
``cfa + n``; the return-address slot is among them.
"""
from dataclasses import dataclass

from .rules import RuleKind
from .x86_64 import CALLEE_SAVED, RA

OP_LOAD, OP_SAME, OP_UNDEF, OP_VALUE, OP_COPY, OP_GENERAL = range(6)
_OPS = {RuleKind.OFFSET: OP_LOAD, RuleKind.SAME_VALUE: OP_SAME, RuleKind.UNDEFINED: OP_UNDEF,
        RuleKind.VAL_OFFSET: OP_VALUE, RuleKind.REGISTER: OP_COPY}
#: Registers recovered for the caller, in plan order (DWARF numbers).
CARRIED = (RA,) + CALLEE_SAVED


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One row compiled for the walker. ``cfa_register`` is None for an expression CFA."""
    row: object
    cfa_register: int | None
    cfa_offset: int
    ops: tuple          # ((register, op, operand), ...) for CARRIED
    saved: tuple        # ((register, offset from CFA in bytes), ...)
    ra_offset: int | None  # return-address slot = cfa + ra_offset, when saved there


def compile_row(row):
    """Compile an :class:`~unwinder.rules.UnwindRow` into a :class:`StepPlan`."""
    ops = []
    for reg in CARRIED:
        rule = row.rule(reg)
        op = _OPS.get(rule.kind, OP_GENERAL)
        operand = rule.register if op == OP_COPY else rule.offset
        ops.append((reg, op, operand))
    saved = tuple((reg, rule.offset) for reg, rule in row.regs if rule.kind is RuleKind.OFFSET)
    ra_offset = next((off for reg, off in saved if reg == RA), None)
    cfa = row.cfa
    return StepPlan(row, cfa.register if cfa.expression is None else None, cfa.offset,
                    tuple(ops), tuple((r, o) for r, o in saved if r != RA), ra_offset)
