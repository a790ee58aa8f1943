"""A small DWARF expression evaluator for call-frame information.

Evaluates the DWARF expressions that appear in ``DW_CFA_def_cfa_expression``,
``DW_CFA_expression`` and ``DW_CFA_val_expression`` (DWARF 5 §2.5 "DWARF
Expressions", §6.4.2). Values are 64-bit unsigned integers: arithmetic is
modulo 2**64, and the operations DWARF defines as signed (``DW_OP_div``,
``DW_OP_shra``, ``DW_OP_abs``, the comparisons) reinterpret their operands as
two's complement, as libgcc's ``execute_stack_op`` does.

Only operations meaningful in CFI are accepted. Register location
descriptions (``DW_OP_reg*``, ``DW_OP_regx``), ``DW_OP_fbreg`` and
``DW_OP_call_frame_cfa`` are invalid there (DWARF 5 §6.4.2: "DW_OP_call_frame_cfa
... cannot be used", the expression yields an address or value, not a
location), as are pieces and typed-stack operations; they raise
:class:`ExpressionError`.
"""

import struct

from .cfi import read_sleb128, read_uleb128
from .errors import ExpressionError

_MASK64 = (1 << 64) - 1
_SIGN64 = 1 << 63

#: Evaluation stops with :class:`ExpressionError` after this many operations
#: (DW_OP_bra/DW_OP_skip can loop).
MAX_STEPS = 10_000
#: ... or when the stack holds more than this many values.
MAX_STACK = 1_000

# Opcodes (DWARF 5 §7.7.1, Table 7.9).
DW_OP_addr = 0x03
DW_OP_deref = 0x06
DW_OP_const1u = 0x08
DW_OP_const1s = 0x09
DW_OP_const2u = 0x0A
DW_OP_const2s = 0x0B
DW_OP_const4u = 0x0C
DW_OP_const4s = 0x0D
DW_OP_const8u = 0x0E
DW_OP_const8s = 0x0F
DW_OP_constu = 0x10
DW_OP_consts = 0x11
DW_OP_dup = 0x12
DW_OP_drop = 0x13
DW_OP_over = 0x14
DW_OP_pick = 0x15
DW_OP_swap = 0x16
DW_OP_rot = 0x17
DW_OP_abs = 0x19
DW_OP_and = 0x1A
DW_OP_div = 0x1B
DW_OP_minus = 0x1C
DW_OP_mod = 0x1D
DW_OP_mul = 0x1E
DW_OP_neg = 0x1F
DW_OP_not = 0x20
DW_OP_or = 0x21
DW_OP_plus = 0x22
DW_OP_plus_uconst = 0x23
DW_OP_shl = 0x24
DW_OP_shr = 0x25
DW_OP_shra = 0x26
DW_OP_xor = 0x27
DW_OP_bra = 0x28
DW_OP_eq = 0x29
DW_OP_ge = 0x2A
DW_OP_gt = 0x2B
DW_OP_le = 0x2C
DW_OP_lt = 0x2D
DW_OP_ne = 0x2E
DW_OP_skip = 0x2F
DW_OP_lit0 = 0x30
DW_OP_lit31 = 0x4F
DW_OP_reg0 = 0x50
DW_OP_reg31 = 0x6F
DW_OP_breg0 = 0x70
DW_OP_breg31 = 0x8F
DW_OP_regx = 0x90
DW_OP_fbreg = 0x91
DW_OP_bregx = 0x92
DW_OP_deref_size = 0x94
DW_OP_nop = 0x96
DW_OP_call_frame_cfa = 0x9C

_FIXED_CONSTS = {
    DW_OP_const1u: struct.Struct("<B"),
    DW_OP_const1s: struct.Struct("<b"),
    DW_OP_const2u: struct.Struct("<H"),
    DW_OP_const2s: struct.Struct("<h"),
    DW_OP_const4u: struct.Struct("<I"),
    DW_OP_const4s: struct.Struct("<i"),
    DW_OP_const8u: struct.Struct("<Q"),
    DW_OP_const8s: struct.Struct("<q"),
    DW_OP_addr: struct.Struct("<Q"),
}
_S16 = struct.Struct("<h")

_INVALID_IN_CFI = {
    DW_OP_regx: "DW_OP_regx (a register location) is invalid in CFI",
    DW_OP_fbreg: "DW_OP_fbreg is invalid in CFI (no frame base)",
    DW_OP_call_frame_cfa: "DW_OP_call_frame_cfa is invalid in CFI",
}


def _signed(value):
    """Two's-complement reading of a 64-bit unsigned value."""
    return value - (1 << 64) if value & _SIGN64 else value


def evaluate(expr, regs, read_u64, initial_stack=(), *, section_offset=None,
             max_steps=MAX_STEPS):
    """Evaluate DWARF expression ``expr`` (bytes) and return the top of the stack.

    ``regs`` maps DWARF register numbers to their 64-bit values in the frame
    being unwound (the callee's registers). ``read_u64(address)`` returns the
    little-endian 64-bit word at an absolute address; a
    :class:`MemoryReadError` it raises propagates unchanged. ``initial_stack``
    is pushed first, bottom to top (CFI pushes the CFA for
    ``DW_CFA_expression`` / ``DW_CFA_val_expression``, DWARF 5 §6.4.2.3).
    ``section_offset`` is the ``.eh_frame`` offset of ``expr[0]``, used only to
    locate errors.

    Returns an int in [0, 2**64). Raises :class:`ExpressionError` on an
    unknown or CFI-invalid opcode, truncated operand, stack underflow,
    missing register, division by zero, a branch outside the expression, or
    more than ``max_steps`` operations.
    """
    base = section_offset if section_offset is not None else 0

    def fail(message, pos):
        if section_offset is None:
            raise ExpressionError(f"{message} (at expression byte {pos})")
        raise ExpressionError(message, base + pos)

    stack = [v & _MASK64 for v in initial_stack]
    end = len(expr)
    pos = 0
    steps = 0
    while pos < end:
        steps += 1
        if steps > max_steps:
            fail(f"more than {max_steps} operations", pos)
        if len(stack) > MAX_STACK:
            fail(f"stack deeper than {MAX_STACK}", pos)
        op_pos = pos
        op = expr[pos]
        pos += 1

        if DW_OP_breg0 <= op <= DW_OP_breg31 or op == DW_OP_bregx:
            # DW_OP_bregN: push register N + signed offset.
            if op == DW_OP_bregx:
                regno, pos = read_uleb128(expr, pos, end, base, ExpressionError)
            else:
                regno = op - DW_OP_breg0
            offset, pos = read_sleb128(expr, pos, end, base, ExpressionError)
            value = regs.get(regno)
            if value is None:
                fail(f"register {regno} is not available", op_pos)
            stack.append((value + offset) & _MASK64)
        elif DW_OP_lit0 <= op <= DW_OP_lit31:
            stack.append(op - DW_OP_lit0)
        elif op == DW_OP_deref or op == DW_OP_deref_size:
            if not stack:
                fail("stack underflow", op_pos)
            address = stack.pop()
            if op == DW_OP_deref_size:
                if pos >= end:
                    fail("truncated DW_OP_deref_size operand", pos)
                size = expr[pos]
                pos += 1
                if not 1 <= size <= 8:
                    fail(f"DW_OP_deref_size of {size} bytes", op_pos)
                # Reads a whole word and keeps the low ``size`` bytes
                # (little-endian), zero-extended as DWARF 5 §2.5.1.3 requires.
                stack.append(read_u64(address) & ((1 << (8 * size)) - 1))
            else:
                stack.append(read_u64(address) & _MASK64)
        elif op == DW_OP_plus_uconst:
            if not stack:
                fail("stack underflow", op_pos)
            addend, pos = read_uleb128(expr, pos, end, base, ExpressionError)
            stack[-1] = (stack[-1] + addend) & _MASK64
        elif op in _FIXED_CONSTS:
            fmt = _FIXED_CONSTS[op]
            if pos + fmt.size > end:
                fail("truncated constant operand", pos)
            (value,) = fmt.unpack_from(expr, pos)
            pos += fmt.size
            stack.append(value & _MASK64)
        elif op == DW_OP_constu:
            value, pos = read_uleb128(expr, pos, end, base, ExpressionError)
            stack.append(value)
        elif op == DW_OP_consts:
            value, pos = read_sleb128(expr, pos, end, base, ExpressionError)
            stack.append(value & _MASK64)
        elif op == DW_OP_dup:
            if not stack:
                fail("stack underflow", op_pos)
            stack.append(stack[-1])
        elif op == DW_OP_drop:
            if not stack:
                fail("stack underflow", op_pos)
            stack.pop()
        elif op == DW_OP_over:
            if len(stack) < 2:
                fail("stack underflow", op_pos)
            stack.append(stack[-2])
        elif op == DW_OP_pick:
            if pos >= end:
                fail("truncated DW_OP_pick operand", pos)
            index = expr[pos]
            pos += 1
            if index >= len(stack):
                fail(f"DW_OP_pick {index} with {len(stack)} values on the stack", op_pos)
            stack.append(stack[-1 - index])
        elif op == DW_OP_swap:
            if len(stack) < 2:
                fail("stack underflow", op_pos)
            stack[-1], stack[-2] = stack[-2], stack[-1]
        elif op == DW_OP_rot:
            # (..., c, b, a) -> (..., a, c, b): top moves to third.
            if len(stack) < 3:
                fail("stack underflow", op_pos)
            stack[-3], stack[-2], stack[-1] = stack[-1], stack[-3], stack[-2]
        elif op in (DW_OP_abs, DW_OP_neg, DW_OP_not):
            if not stack:
                fail("stack underflow", op_pos)
            value = stack[-1]
            if op == DW_OP_abs:
                value = abs(_signed(value))
            elif op == DW_OP_neg:
                value = -value
            else:
                value = ~value
            stack[-1] = value & _MASK64
        elif op == DW_OP_skip or op == DW_OP_bra:
            if pos + 2 > end:
                fail("truncated branch offset", pos)
            (delta,) = _S16.unpack_from(expr, pos)
            pos += 2
            if op == DW_OP_bra:
                if not stack:
                    fail("stack underflow", op_pos)
                taken = stack.pop() != 0
            else:
                taken = True
            if taken:
                target = pos + delta
                if not 0 <= target <= end:
                    fail(f"branch to expression byte {target} outside [0, {end}]", op_pos)
                pos = target
        elif DW_OP_and <= op <= DW_OP_xor or DW_OP_eq <= op <= DW_OP_ne:
            # Binary operations: ``first`` is the top, ``second`` below it;
            # the result is ``second OP first`` (DWARF 5 §2.5.1.4).
            if len(stack) < 2:
                fail("stack underflow", op_pos)
            first = stack.pop()
            second = stack.pop()
            if op == DW_OP_plus:
                value = second + first
            elif op == DW_OP_minus:
                value = second - first
            elif op == DW_OP_and:
                value = second & first
            elif op == DW_OP_or:
                value = second | first
            elif op == DW_OP_xor:
                value = second ^ first
            elif op == DW_OP_mul:
                value = second * first
            elif op == DW_OP_div:
                if first == 0:
                    fail("division by zero", op_pos)
                a, b = _signed(second), _signed(first)
                quotient = abs(a) // abs(b)  # C semantics: truncate toward zero
                value = quotient if (a < 0) == (b < 0) else -quotient
            elif op == DW_OP_mod:
                if first == 0:
                    fail("modulo by zero", op_pos)
                value = second % first  # unsigned, as libgcc
            elif op == DW_OP_shl:
                value = second << first if first < 64 else 0
            elif op == DW_OP_shr:
                value = second >> first if first < 64 else 0
            elif op == DW_OP_shra:
                value = _signed(second) >> min(first, 63)
            elif op == DW_OP_eq:
                value = int(second == first)
            elif op == DW_OP_ne:
                value = int(second != first)
            else:
                a, b = _signed(second), _signed(first)
                if op == DW_OP_ge:
                    value = int(a >= b)
                elif op == DW_OP_gt:
                    value = int(a > b)
                elif op == DW_OP_le:
                    value = int(a <= b)
                elif op == DW_OP_lt:
                    value = int(a < b)
                else:  # 0x19 abs / 0x1f neg / 0x20 not are handled above
                    fail(f"unhandled binary opcode {op:#04x}", op_pos)
            stack.append(value & _MASK64)
        elif op == DW_OP_nop:
            pass
        elif DW_OP_reg0 <= op <= DW_OP_reg31:
            fail(f"DW_OP_reg{op - DW_OP_reg0} (a register location) is invalid in CFI", op_pos)
        elif op in _INVALID_IN_CFI:
            fail(_INVALID_IN_CFI[op], op_pos)
        else:
            fail(f"unsupported DWARF expression opcode {op:#04x}", op_pos)

    if not stack:
        fail("expression left an empty stack", end)
    return stack[-1]

