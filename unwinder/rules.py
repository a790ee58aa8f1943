"""Rule layer: interpret an FDE's call-frame instructions into an unwind table.

``decode_fde(fde)`` runs the CIE's initial instructions and then the FDE's
instructions (DWARF 5 §6.4.2 "Call Frame Instructions") and returns an
:class:`UnwindTable`: sorted, non-overlapping :class:`UnwindRow` s, each
saying, for the half-open address range ``[start, end)``, how to compute the
CFA and how to recover each register of the caller.

Rule semantics, with ``CFA`` the canonical frame address of the frame being
unwound and ``*(a)`` the 64-bit word at address ``a``:

====================  ==========================================
``CFARule(r, n)``     ``CFA = r + n``
``CFARule(expr)``     ``CFA = eval(expr, stack=[])``
UNDEFINED             caller's value is unrecoverable
SAME_VALUE            ``caller.reg = callee.reg``
OFFSET(n)             ``caller.reg = *(CFA + n)``
VAL_OFFSET(n)         ``caller.reg = CFA + n``
REGISTER(r)           ``caller.reg = callee.r``
EXPRESSION(e)         ``caller.reg = *(eval(e, stack=[CFA]))``
VAL_EXPRESSION(e)     ``caller.reg = eval(e, stack=[CFA])``
====================  ==========================================

Registers that no instruction mentions are absent from :attr:`UnwindRow.regs`;
their rule is :data:`DEFAULT_RULE` (same value), which is what libgcc and
LLVM libunwind assume on x86-64 (DWARF 5 §6.4.1 leaves the default to the
ABI). The caller's RSP is the CFA itself (psABI §3.7) and has no column; the
walker sets it.

Tables are memoised on the FDE (``fde.memo``), CIE initial states on the CIE.
This module never reads the section; it uses only :mod:`unwinder.cfi`
records, so the parse layer stays independent of it.
"""

import bisect
import enum
import struct
from dataclasses import dataclass, field

from .dwarf_expr import evaluate
from .errors import CFIError, ExpressionError
from .cfi import read_sleb128, read_uleb128

_MASK64 = (1 << 64) - 1

# DW_CFA_* opcodes (DWARF 5 §7.24, Table 7.29; GNU extensions from
# binutils include/dwarf2.def). The three "primary" opcodes keep their
# operand in the low 6 bits.
DW_CFA_advance_loc = 0x40
DW_CFA_offset = 0x80
DW_CFA_restore = 0xC0
DW_CFA_nop = 0x00
DW_CFA_set_loc = 0x01
DW_CFA_advance_loc1 = 0x02
DW_CFA_advance_loc2 = 0x03
DW_CFA_advance_loc4 = 0x04
DW_CFA_offset_extended = 0x05
DW_CFA_restore_extended = 0x06
DW_CFA_undefined = 0x07
DW_CFA_same_value = 0x08
DW_CFA_register = 0x09
DW_CFA_remember_state = 0x0A
DW_CFA_restore_state = 0x0B
DW_CFA_def_cfa = 0x0C
DW_CFA_def_cfa_register = 0x0D
DW_CFA_def_cfa_offset = 0x0E
DW_CFA_def_cfa_expression = 0x0F
DW_CFA_expression = 0x10
DW_CFA_offset_extended_sf = 0x11
DW_CFA_def_cfa_sf = 0x12
DW_CFA_def_cfa_offset_sf = 0x13
DW_CFA_val_offset = 0x14
DW_CFA_val_offset_sf = 0x15
DW_CFA_val_expression = 0x16
DW_CFA_MIPS_advance_loc8 = 0x1D
DW_CFA_GNU_window_save = 0x2D
DW_CFA_GNU_args_size = 0x2E
DW_CFA_GNU_negative_offset_extended = 0x2F

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RuleKind(enum.Enum):
    """How a register of the caller is recovered (DWARF 5 §6.4.1 "register rules")."""

    UNDEFINED = "undefined"
    SAME_VALUE = "same_value"
    OFFSET = "offset"
    VAL_OFFSET = "val_offset"
    REGISTER = "register"
    EXPRESSION = "expression"
    VAL_EXPRESSION = "val_expression"


@dataclass(frozen=True, slots=True)
class RegRule:
    """One register's rule. See the module docstring for the formulas.

    ``offset`` is in bytes from the CFA (already multiplied by the data
    alignment factor) for OFFSET / VAL_OFFSET; ``register`` is a DWARF
    register number for REGISTER; ``expression`` holds the DWARF expression
    bytes for EXPRESSION / VAL_EXPRESSION, and ``expression_section_offset``
    its ``.eh_frame`` offset (for error messages; not part of equality).
    """

    kind: RuleKind
    offset: int = 0
    register: int | None = None
    expression: bytes | None = None
    expression_section_offset: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CFARule:
    """How to compute the CFA: ``register + offset`` (bytes), or an expression.

    Exactly one of ``register`` / ``expression`` is not None.
    """

    register: int | None = None
    offset: int = 0
    expression: bytes | None = None
    expression_section_offset: int | None = field(default=None, compare=False)

    def value(self, regs, read_u64):
        """The CFA (absolute address) given the callee's registers ``regs`` (DWARF regno -> value)."""
        if self.expression is not None:
            return evaluate(self.expression, regs, read_u64,
                            section_offset=self.expression_section_offset)
        base = regs.get(self.register)
        if base is None:
            raise ExpressionError(f"CFA register {self.register} is not available")
        return (base + self.offset) & _MASK64


UNDEFINED = RegRule(RuleKind.UNDEFINED)
SAME_VALUE = RegRule(RuleKind.SAME_VALUE)
#: Rule of a register that no instruction mentions (see module docstring).
DEFAULT_RULE = SAME_VALUE


@dataclass(frozen=True, slots=True)
class UnwindRow:
    """The rules in force for absolute addresses ``[start, end)``.

    ``regs`` holds ``(DWARF regno, RegRule)`` pairs sorted by regno, only for
    registers the CIE/FDE mentions; ``args_size`` is the last
    ``DW_CFA_GNU_args_size`` (bytes of outgoing arguments pushed, used when
    resuming at a landing pad).
    """

    start: int
    end: int
    cfa: CFARule
    regs: tuple
    args_size: int = 0

    def rule(self, regno):
        """The rule for DWARF register ``regno`` (:data:`DEFAULT_RULE` if not mentioned)."""
        for r, rule in self.regs:
            if r == regno:
                return rule
        return DEFAULT_RULE

    def cfa_value(self, regs, read_u64):
        """The CFA (absolute address) of the frame whose registers are ``regs``.

        ``regs``: DWARF regno -> 64-bit value in the frame being unwound.
        ``read_u64(address)`` reads a word of that frame's memory.
        """
        return self.cfa.value(regs, read_u64)

    def recover(self, regno, cfa, regs, read_u64):
        """The caller's value of DWARF register ``regno``, or None if unknown.

        ``cfa`` is this row's CFA (from :meth:`cfa_value`). Returns None when
        the rule is UNDEFINED (for the return-address column: the outermost
        frame), or when it copies a register (SAME_VALUE, REGISTER) whose
        value is not in ``regs``. Memory reads that fail raise whatever
        ``read_u64`` raises (:class:`MemoryReadError`); expressions that need
        a missing register raise :class:`ExpressionError`.
        """
        rule = self.rule(regno)
        kind = rule.kind
        if kind is RuleKind.OFFSET:
            return read_u64((cfa + rule.offset) & _MASK64)
        if kind is RuleKind.SAME_VALUE:
            return regs.get(regno)
        if kind is RuleKind.UNDEFINED:
            return None
        if kind is RuleKind.VAL_OFFSET:
            return (cfa + rule.offset) & _MASK64
        if kind is RuleKind.REGISTER:
            return regs.get(rule.register)
        value = evaluate(rule.expression, regs, read_u64, (cfa,),
                         section_offset=rule.expression_section_offset)
        if kind is RuleKind.EXPRESSION:
            return read_u64(value)
        return value  # VAL_EXPRESSION


@dataclass(frozen=True, slots=True)
class UnwindTable:
    """Rows of one FDE, sorted by ``start`` and non-overlapping.

    Covers ``[pc_begin, pc_end)`` (absolute). Consecutive rows with equal
    rules are merged, so a row may span several DW_CFA_advance_loc steps.
    """

    fde_offset: int
    pc_begin: int
    pc_end: int
    rows: tuple
    #: DWARF register number of the return-address column (from the CIE).
    return_address_register: int
    #: The CIE's 'S' augmentation: look the pc up as-is, not pc - 1.
    is_signal_frame: bool
    _starts: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_starts", tuple(row.start for row in self.rows))

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def row_for(self, pc):
        """The row covering absolute address ``pc``, or None outside the FDE."""
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0:
            return None
        row = self.rows[i]
        return row if pc < row.end else None


# Small caches of immutable rules so that the hot opcodes
# (def_cfa_offset, offset) do not allocate. Bounded so corrupt input cannot
# grow them without limit.
_CACHE_LIMIT = 4096
_offset_rules = {}
_cfa_rules = {}  # register -> {offset: CFARule}
_NO_RULES = {}


def _offset_rule(offset):
    rule = _offset_rules.get(offset)
    if rule is None:
        rule = RegRule(RuleKind.OFFSET, offset)
        if len(_offset_rules) < _CACHE_LIMIT:
            _offset_rules[offset] = rule
    return rule


def _cfa_rule(register, offset):
    by_offset = _cfa_rules.get(register)
    if by_offset is None and len(_cfa_rules) < 64:
        by_offset = _cfa_rules[register] = {}
    rule = by_offset.get(offset) if by_offset is not None else None
    if rule is None:
        rule = CFARule(register, offset)
        if by_offset is not None and len(by_offset) < _CACHE_LIMIT:
            by_offset[offset] = rule
    return rule


def cie_initial_state(cie):
    """``(CFARule | None, ((regno, RegRule), ...))`` after the CIE's initial instructions.

    Memoised on the CIE. Raises :class:`CFIError` if the initial instructions
    are malformed or create rows (advance/set_loc) or use restore ops, which
    have no meaning before an FDE exists.
    """
    state = cie.memo.get("initial_state")
    if state is None:
        cfa, regs, _ = _execute(cie.initial_instructions, cie.initial_instructions_offset,
                                cie, None, None, {}, None)
        state = (cfa, tuple(sorted(regs.items())))
        cie.memo["initial_state"] = state
    return state


def decode_fde(fde):
    """The :class:`UnwindTable` of ``fde`` (a :class:`unwinder.cfi.FDE`). Memoised on the FDE.

    Raises :class:`CFIError` (with the section offset of the offending
    instruction) on unknown opcodes, truncated operands, restore_state
    without remember_state, a location advanced past ``pc_end`` or moved
    backwards, or rows without a CFA rule.
    """
    table = fde.memo.get("unwind_table")
    if table is not None:
        return table
    cie = fde.cie
    cfa, initial = cie_initial_state(cie)
    initial_regs = dict(initial)
    cfa, regs, rows = _execute(fde.instructions, fde.instructions_offset, cie, fde, cfa,
                               dict(initial_regs), initial_regs)
    table = UnwindTable(
        fde_offset=fde.offset,
        pc_begin=fde.pc_begin,
        pc_end=fde.pc_end,
        rows=rows,
        return_address_register=cie.return_address_register,
        is_signal_frame=cie.is_signal_frame,
    )
    fde.memo["unwind_table"] = table
    return table


def _execute(code, code_offset, cie, fde, cfa, regs, initial_regs):
    """Run call-frame instructions ``code`` (whose first byte is at section offset ``code_offset``).

    ``fde`` is None while running a CIE's initial instructions; then row
    creating and restore instructions are errors. ``regs`` is mutated.
    ``initial_regs`` is the state after the CIE (the target of
    DW_CFA_restore). Returns ``(cfa, regs, rows)``; ``rows`` is a tuple of
    :class:`UnwindRow` (empty for a CIE).
    """
    caf = cie.code_alignment_factor
    daf = cie.data_alignment_factor
    end = len(code)
    pos = 0
    args_size = 0
    stack = []  # remember_state: (cfa, regs copy, regs_tuple)
    pending = []  # [start, end, cfa, regs_tuple, args_size] lists, merged
    regs_tuple = None  # cached tuple(sorted(regs.items())), None when stale
    if fde is not None:
        loc = fde.pc_begin
        pc_end = fde.pc_end
    else:
        loc = pc_end = 0

    while pos < end:
        op_pos = pos
        op = code[pos]
        pos += 1
        high = op & 0xC0
        if high:
            low = op & 0x3F
            if high == DW_CFA_advance_loc:
                new_loc = loc + low * caf
            elif high == DW_CFA_offset:
                # DW_CFA_offset: reg in low 6 bits, ULEB128 factored offset.
                factored, pos = read_uleb128(code, pos, end, code_offset)
                regs[low] = _offset_rule(factored * daf)
                regs_tuple = None
                continue
            else:  # DW_CFA_restore
                if fde is None:
                    raise CFIError("DW_CFA_restore in CIE initial instructions",
                                   code_offset + op_pos)
                _restore(regs, initial_regs, low)
                regs_tuple = None
                continue
        elif op == DW_CFA_def_cfa_offset:
            offset, pos = read_uleb128(code, pos, end, code_offset)
            # Inlined _redefine_cfa_offset: the most frequent opcode.
            if cfa is None or cfa.register is None:
                _redefine_cfa_offset(cfa, offset, code_offset + op_pos)  # raises
            rule = _cfa_rules.get(cfa.register, _NO_RULES).get(offset)
            cfa = rule if rule is not None else _cfa_rule(cfa.register, offset)
            continue
        elif op == DW_CFA_nop:
            continue
        elif op == DW_CFA_remember_state:
            # Saves the CFA rule too: libgcc (frame_state_reg_info), LLVM
            # libunwind and readelf all do, and compilers rely on it when
            # they emit .cfi_remember_state before an epilogue.
            stack.append((cfa, dict(regs), regs_tuple))
            continue
        elif op == DW_CFA_restore_state:
            if not stack:
                raise CFIError("DW_CFA_restore_state without DW_CFA_remember_state",
                               code_offset + op_pos)
            cfa, regs, regs_tuple = stack.pop()
            continue
        elif op == DW_CFA_advance_loc1:
            if pos + 1 > end:
                raise CFIError("truncated DW_CFA_advance_loc1", code_offset + pos)
            new_loc = loc + code[pos] * caf
            pos += 1
        elif op == DW_CFA_advance_loc2:
            if pos + 2 > end:
                raise CFIError("truncated DW_CFA_advance_loc2", code_offset + pos)
            new_loc = loc + _U16.unpack_from(code, pos)[0] * caf
            pos += 2
        elif op == DW_CFA_advance_loc4:
            if pos + 4 > end:
                raise CFIError("truncated DW_CFA_advance_loc4", code_offset + pos)
            new_loc = loc + _U32.unpack_from(code, pos)[0] * caf
            pos += 4
        elif op == DW_CFA_MIPS_advance_loc8:
            if pos + 8 > end:
                raise CFIError("truncated DW_CFA_MIPS_advance_loc8", code_offset + pos)
            new_loc = loc + _U64.unpack_from(code, pos)[0] * caf
            pos += 8
        elif op == DW_CFA_set_loc:
            if fde is None:
                raise CFIError("DW_CFA_set_loc in CIE initial instructions",
                               code_offset + op_pos)
            # The operand is an address in the CIE's FDE pointer encoding
            # (LSB §10.6.1.1 'R'); a pcrel value is relative to the operand
            # field, so decode it in place in the section.
            new_loc, next_offset = fde.section.read_pointer(
                code_offset + pos, code_offset + end, cie.fde_encoding,
                func_base=fde.pc_begin)
            pos = next_offset - code_offset
            if new_loc < loc:
                raise CFIError(f"DW_CFA_set_loc moves backwards to {new_loc:#x}",
                               code_offset + op_pos)
        elif op == DW_CFA_def_cfa or op == DW_CFA_def_cfa_sf:
            register, pos = read_uleb128(code, pos, end, code_offset)
            if op == DW_CFA_def_cfa:
                offset, pos = read_uleb128(code, pos, end, code_offset)
            else:
                # Factored by the *data* alignment factor (DWARF 5
                # §6.4.2.2); pyelftools wrongly uses the code factor.
                factored, pos = read_sleb128(code, pos, end, code_offset)
                offset = factored * daf
            cfa = _cfa_rule(register, offset)
            continue
        elif op == DW_CFA_def_cfa_register:
            register, pos = read_uleb128(code, pos, end, code_offset)
            # "valid only if the current CFA rule is defined to use a
            # register and offset" (DWARF 5 §6.4.2.2).
            if cfa is None or cfa.register is None:
                raise CFIError("DW_CFA_def_cfa_register without a register-based CFA rule",
                               code_offset + op_pos)
            cfa = _cfa_rule(register, cfa.offset)
            continue
        elif op == DW_CFA_def_cfa_offset_sf:
            factored, pos = read_sleb128(code, pos, end, code_offset)
            cfa = _redefine_cfa_offset(cfa, factored * daf, code_offset + op_pos)
            continue
        elif op == DW_CFA_def_cfa_expression:
            block, block_offset, pos = _read_block(code, pos, end, code_offset)
            cfa = CFARule(expression=block, expression_section_offset=block_offset)
            continue
        elif op in (DW_CFA_offset_extended, DW_CFA_offset_extended_sf, DW_CFA_val_offset,
                    DW_CFA_val_offset_sf, DW_CFA_GNU_negative_offset_extended):
            register, pos = read_uleb128(code, pos, end, code_offset)
            if op in (DW_CFA_offset_extended_sf, DW_CFA_val_offset_sf):
                factored, pos = read_sleb128(code, pos, end, code_offset)
            else:
                factored, pos = read_uleb128(code, pos, end, code_offset)
            if op == DW_CFA_GNU_negative_offset_extended:
                # ULEB128 operand, negated (libgcc unwind-dw2.c).
                factored = -factored
            offset = factored * daf
            if op in (DW_CFA_val_offset, DW_CFA_val_offset_sf):
                regs[register] = RegRule(RuleKind.VAL_OFFSET, offset)
            else:
                regs[register] = _offset_rule(offset)
            regs_tuple = None
            continue
        elif op == DW_CFA_restore_extended:
            register, pos = read_uleb128(code, pos, end, code_offset)
            if fde is None:
                raise CFIError("DW_CFA_restore_extended in CIE initial instructions",
                               code_offset + op_pos)
            _restore(regs, initial_regs, register)
            regs_tuple = None
            continue
        elif op == DW_CFA_undefined or op == DW_CFA_same_value:
            register, pos = read_uleb128(code, pos, end, code_offset)
            regs[register] = UNDEFINED if op == DW_CFA_undefined else SAME_VALUE
            regs_tuple = None
            continue
        elif op == DW_CFA_register:
            register, pos = read_uleb128(code, pos, end, code_offset)
            source, pos = read_uleb128(code, pos, end, code_offset)
            regs[register] = RegRule(RuleKind.REGISTER, register=source)
            regs_tuple = None
            continue
        elif op == DW_CFA_expression or op == DW_CFA_val_expression:
            register, pos = read_uleb128(code, pos, end, code_offset)
            block, block_offset, pos = _read_block(code, pos, end, code_offset)
            kind = RuleKind.EXPRESSION if op == DW_CFA_expression else RuleKind.VAL_EXPRESSION
            regs[register] = RegRule(kind, expression=block,
                                     expression_section_offset=block_offset)
            regs_tuple = None
            continue
        elif op == DW_CFA_GNU_args_size:
            args_size, pos = read_uleb128(code, pos, end, code_offset)
            continue
        elif op == DW_CFA_GNU_window_save:
            raise CFIError("DW_CFA_GNU_window_save is SPARC/AArch64-only",
                           code_offset + op_pos)
        else:
            raise CFIError(f"unknown call frame instruction {op:#04x}", code_offset + op_pos)

        # Only row-creating instructions (advance_loc*, set_loc) get here,
        # with the new location in ``new_loc``.
        if fde is None:
            raise CFIError("row-creating instruction in CIE initial instructions",
                           code_offset + op_pos)
        if new_loc > pc_end:
            raise CFIError(f"location {new_loc:#x} advanced past the FDE end {pc_end:#x}",
                           code_offset + op_pos)
        if new_loc > loc:
            if cfa is None:
                raise CFIError("row has no CFA rule", code_offset + op_pos)
            if regs_tuple is None:
                regs_tuple = tuple(sorted(regs.items()))
            # Inlined _append_row (one call per advance is measurable).
            last = pending[-1] if pending else None
            if (last is not None and last[4] == args_size
                    and (last[2] is cfa or last[2] == cfa)
                    and (last[3] is regs_tuple or last[3] == regs_tuple)):
                last[1] = new_loc
            else:
                pending.append([loc, new_loc, cfa, regs_tuple, args_size])
            loc = new_loc

    if fde is None:
        return cfa, regs, ()
    if loc < pc_end:
        if cfa is None:
            raise CFIError("row has no CFA rule", code_offset + end)
        if regs_tuple is None:
            regs_tuple = tuple(sorted(regs.items()))
        _append_row(pending, loc, pc_end, cfa, regs_tuple, args_size)
    return cfa, regs, tuple(UnwindRow(*p) for p in pending)


def _append_row(pending, start, end, cfa, regs_tuple, args_size):
    """Add ``[start, end)`` to ``pending``, extending the last row if its rules are equal."""
    if pending:
        last = pending[-1]
        if (last[1] == start and last[4] == args_size
                and (last[2] is cfa or last[2] == cfa)
                and (last[3] is regs_tuple or last[3] == regs_tuple)):
            last[1] = end
            return
    pending.append([start, end, cfa, regs_tuple, args_size])


def _restore(regs, initial_regs, register):
    """DW_CFA_restore: back to the rule the CIE's initial instructions gave (or the default)."""
    rule = initial_regs.get(register)
    if rule is None:
        regs.pop(register, None)
    else:
        regs[register] = rule


def _redefine_cfa_offset(cfa, offset, op_offset):
    # "valid only if the current CFA rule is defined to use a register and
    # offset" (DWARF 5 §6.4.2.2, DW_CFA_def_cfa_offset).
    if cfa is None or cfa.register is None:
        raise CFIError("CFA offset changed without a register-based CFA rule", op_offset)
    return _cfa_rule(cfa.register, offset)


def _read_block(code, pos, end, code_offset):
    """ULEB128 length + that many bytes. Returns ``(bytes, section_offset, next_pos)``."""
    length, pos = read_uleb128(code, pos, end, code_offset)
    if length > end - pos:
        raise CFIError(f"expression block of {length} bytes runs past the instructions",
                       code_offset + pos)
    return bytes(code[pos:pos + length]), code_offset + pos, pos + length
