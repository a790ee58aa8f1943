"""Code generation: a :class:`~.anf.LoweredFunction` -> LLVM IR, through
:class:`osrjit.ir.BodyBuilder` (once per call mode)."""
from __future__ import annotations

from llvmlite import ir

from osrjit.abi import ErrorCode, SiteKind
from osrjit.ir import I64, BodyBuilder

from .anf import (Assign, Bin, BoolOp, Break, Chain, Cmp, Cond, Const, Continue, Eval, If,
                  LoweredFunction, Neg, Not, Return, Site, Var, While)

__all__ = ["emitter_for"]

#: Weights (error, fine) of the division-by-zero branch.
_ERROR_BRANCH_WEIGHTS = (1, 2000)


class _Emitter:
    """Emits a :class:`LoweredFunction` through a :class:`BodyBuilder` (once per mode)."""

    def __init__(self, fn: LoweredFunction, fb: BodyBuilder):
        self.fn = fn
        self.fb = fb
        self.b = fb.builder
        self.loops: list[tuple[ir.Block, ir.Block]] = []  # (exit, latch)

    def emit(self) -> None:
        for name in self.fn.variables[len(self.fn.params):]:
            self.fb.declare(name)
        self.block(self.fn.body)
        if not self.b.block.is_terminated:
            self.b.ret(I64(0))  # falling off the end returns 0

    def _new_block(self, name: str) -> ir.Block:
        return self.b.append_basic_block(name)

    def block(self, stmts) -> None:
        for s in stmts:
            if self.b.block.is_terminated:
                # Code after return/break/continue: still emitted (its sites stay
                # resumable), in a block without predecessors.
                self.b.position_at_end(self._new_block("dead"))
            self.stmt(s)

    def stmt(self, s) -> None:
        self.fb.set_line(getattr(s, "line", None))
        if isinstance(s, Assign):
            self.fb.store(s.target, self.expr(s.value))
        elif isinstance(s, Eval):
            self.expr(s.value)
        elif isinstance(s, Site):
            self.site(s)
        elif isinstance(s, If):
            self.if_(s)
        elif isinstance(s, While):
            self.while_(s)
        elif isinstance(s, Return):
            self.b.ret(self.expr(s.value))
        elif isinstance(s, Break):
            self.b.branch(self.loops[-1][0])
        elif isinstance(s, Continue):
            self.b.branch(self.loops[-1][1])
        else:
            raise TypeError(s)

    def site(self, s: Site) -> None:
        self.fb.set_line(s.line, s.col)
        live = self.fn.live[s.key]
        if s.kind is SiteKind.POLL:
            self.fb.poll(s.id, live=live, line=s.line, col=s.col)
        elif s.kind is SiteKind.HOOK:
            [arg] = s.args
            self.fb.hook(s.id, self.expr(arg), live=live, result=s.result,
                         line=s.line, col=s.col)
        else:
            self.fb.call_function(s.id, s.callee, [self.expr(a) for a in s.args],
                                  live=live, result=s.result, line=s.line, col=s.col)

    def if_(self, s: If) -> None:
        then, orelse, join = (self._new_block("if.then"), self._new_block("if.else"),
                              self._new_block("if.end"))
        self.b.cbranch(self.truth(s.test), then, orelse)
        for target, stmts in ((then, s.body), (orelse, s.orelse)):
            self.b.position_at_end(target)
            self.block(stmts)
            if not self.b.block.is_terminated:
                self.b.branch(join)
        self.b.position_at_end(join)

    def while_(self, s: While) -> None:
        head, body, latch, exit_ = (self._new_block("while.head"), self._new_block("while.body"),
                                    self._new_block("while.latch"), self._new_block("while.exit"))
        self.b.branch(head)
        self.b.position_at_end(head)
        self.fb.set_line(s.line)
        self.block(s.header)
        self.b.cbranch(self.truth(s.test), body, exit_)
        self.b.position_at_end(body)
        self.loops.append((exit_, latch))
        self.block(s.body)
        self.loops.pop()
        if not self.b.block.is_terminated:
            self.b.branch(latch)
        self.b.position_at_end(latch)
        if s.latch is not None:
            self.site(s.latch)
        self.b.branch(head)
        self.b.position_at_end(exit_)

    # -- pure expressions -> i64 values --

    def truth(self, e) -> ir.Value:
        return self.b.icmp_signed("!=", self.expr(e), I64(0))

    def expr(self, e) -> ir.Value:
        b = self.b
        if isinstance(e, Const):
            return I64(e.value)
        if isinstance(e, Var):
            return self.fb.load(e.name)
        if isinstance(e, Bin):
            left, right = self.expr(e.left), self.expr(e.right)
            if e.op == "+":
                return b.add(left, right)  # no nsw: int64 arithmetic wraps
            if e.op == "-":
                return b.sub(left, right)
            if e.op == "*":
                return b.mul(left, right)
            return self.floor_divmod(left, right, e.op)
        if isinstance(e, Neg):
            return b.sub(I64(0), self.expr(e.operand))
        if isinstance(e, Not):
            return b.zext(b.icmp_signed("==", self.expr(e.operand), I64(0)), I64)
        if isinstance(e, Cmp):
            return b.zext(b.icmp_signed(e.op, self.expr(e.left), self.expr(e.right)), I64)
        if isinstance(e, Chain):
            return self.chain(e)
        if isinstance(e, BoolOp):
            return self.boolop(e)
        if isinstance(e, Cond):
            return self.cond(e)
        raise TypeError(e)

    def floor_divmod(self, a: ir.Value, d: ir.Value, op: str) -> ir.Value:
        """Python ``a // d`` or ``a % d`` on int64, wrapping; by zero: report, yield 0.

        ``sdiv``/``srem`` truncate, so the quotient is lowered by one (and the
        remainder moved by ``d``) when the remainder is nonzero and its sign
        differs from ``d``'s. ``d == -1`` divides by 1 and negates instead,
        because ``INT64_MIN sdiv -1`` is undefined (x86 raises SIGFPE).
        """
        b = self.b
        zero, fine, join = (self._new_block("div.zero"), self._new_block("div.ok"),
                            self._new_block("div.end"))
        b.cbranch(b.icmp_signed("==", d, I64(0)), zero, fine).set_weights(_ERROR_BRANCH_WEIGHTS)
        b.position_at_end(zero)
        self.fb.report_error(ErrorCode.ZERO_DIVISION)
        b.branch(join)
        b.position_at_end(fine)
        minus_one = b.icmp_signed("==", d, I64(-1))
        safe_d = b.select(minus_one, I64(1), d)
        q = b.select(minus_one, b.sub(I64(0), a), b.sdiv(a, safe_d))
        r = b.srem(a, safe_d)  # 0 when d == -1
        adjust = b.and_(b.icmp_signed("!=", r, I64(0)),
                        b.icmp_signed("<", b.xor(r, d), I64(0)))
        if op == "//":
            value = b.sub(q, b.zext(adjust, I64))
        else:
            value = b.add(r, b.select(adjust, d, I64(0)))
        fine_end = b.block
        b.branch(join)
        b.position_at_end(join)
        phi = b.phi(I64, name="floordiv" if op == "//" else "mod")
        phi.add_incoming(I64(0), zero)
        phi.add_incoming(value, fine_end)
        return phi

    def _short_circuit(self, steps, name: str) -> ir.Value:
        """Evaluate ``steps`` (callables returning (value, stop-flag)) in order;
        the first step whose flag is true, or the last, gives the result."""
        b = self.b
        join = self._new_block(f"{name}.end")
        incoming = []
        for i, step in enumerate(steps):
            value, stop = step()
            incoming.append((value, b.block))
            if i == len(steps) - 1:
                b.branch(join)
            else:
                more = self._new_block(f"{name}.more")
                b.cbranch(stop, join, more)
                b.position_at_end(more)
        b.position_at_end(join)
        phi = b.phi(I64, name=name)
        for value, block in incoming:
            phi.add_incoming(value, block)
        return phi

    def boolop(self, e: BoolOp) -> ir.Value:
        def step(operand):
            def run():
                v = self.expr(operand)
                stop = self.b.icmp_signed("==" if e.op == "and" else "!=", v, I64(0))
                return v, stop
            return run
        return self._short_circuit([step(v) for v in e.values], e.op)

    def chain(self, e: Chain) -> ir.Value:
        values = {0: None}

        def step(i):
            def run():
                if i == 0:
                    values[0] = self.expr(e.operands[0])
                right = self.expr(e.operands[i + 1])
                held = self.b.icmp_signed(e.ops[i], values[0], right)
                values[0] = right
                return self.b.zext(held, I64), self.b.not_(held)
            return run
        return self._short_circuit([step(i) for i in range(len(e.ops))], "chain")

    def cond(self, e: Cond) -> ir.Value:
        b = self.b
        then, orelse, join = (self._new_block("cond.then"), self._new_block("cond.else"),
                              self._new_block("cond.end"))
        b.cbranch(self.truth(e.test), then, orelse)
        incoming = []
        for target, operand in ((then, e.body), (orelse, e.orelse)):
            b.position_at_end(target)
            v = self.expr(operand)
            incoming.append((v, b.block))
            b.branch(join)
        b.position_at_end(join)
        phi = b.phi(I64, name="cond")
        for v, block in incoming:
            phi.add_incoming(v, block)
        return phi


def emitter_for(fn: LoweredFunction, *, stack_check: bool = False):
    """The body callback for :meth:`osrjit.ir.VersionedFunction.build` that
    emits ``fn``, starting with the entry stack check
    (:meth:`osrjit.ir.BodyBuilder.stack_check`) if ``stack_check``."""
    def body(fb):
        if stack_check:
            fb.stack_check()
        _Emitter(fn, fb).emit()
    return body
