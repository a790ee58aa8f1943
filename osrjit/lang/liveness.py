"""Backward liveness over the A-normal form: the variables live after each site."""
from __future__ import annotations

from dataclasses import dataclass

from .anf import (Assign, Bin, BoolOp, Break, Chain, Cmp, Cond, Const, Continue, Eval, If,
                  LoweredFunction, Neg, Not, Return, Site, Var, While)

__all__ = ["site_live_sets"]


def _uses(e) -> frozenset:
    if isinstance(e, Var):
        return frozenset((e.name,))
    if isinstance(e, Const):
        return frozenset()
    if isinstance(e, (Bin, Cmp)):
        return _uses(e.left) | _uses(e.right)
    if isinstance(e, (Neg, Not)):
        return _uses(e.operand)
    if isinstance(e, Chain):
        return frozenset().union(*map(_uses, e.operands))
    if isinstance(e, BoolOp):
        return frozenset().union(*map(_uses, e.values))
    if isinstance(e, Cond):
        return _uses(e.test) | _uses(e.body) | _uses(e.orelse)
    raise TypeError(e)


@dataclass(frozen=True)
class _LoopExits:
    on_break: frozenset      # live after the loop
    on_continue: frozenset   # live at the latch


class _Liveness:
    """Backward liveness over the structured A-normal form.

    ``live_after[key]`` = variables live right after site ``key`` returns,
    minus its result. Loops iterate to a fixpoint from the empty set; the
    sites' sets are those of the last (stable) iteration.
    """

    def __init__(self):
        self.live_after: dict[str, frozenset] = {}

    def block(self, stmts, out: frozenset, loop: _LoopExits | None) -> frozenset:
        live = out
        for s in reversed(stmts):
            live = self.stmt(s, live, loop)
        return live

    def stmt(self, s, out: frozenset, loop: _LoopExits | None) -> frozenset:
        if isinstance(s, Assign):
            return (out - {s.target}) | _uses(s.value)
        if isinstance(s, Eval):
            return out | _uses(s.value)
        if isinstance(s, Site):
            after = out - {s.result}
            self.live_after[s.key] = after
            return after.union(*map(_uses, s.args))
        if isinstance(s, If):
            return _uses(s.test) | self.block(s.body, out, loop) | self.block(s.orelse, out, loop)
        if isinstance(s, Return):
            return _uses(s.value)
        if isinstance(s, Break):
            return loop.on_break
        if isinstance(s, Continue):
            return loop.on_continue
        if isinstance(s, While):
            head = frozenset()
            while True:
                latch = self.stmt(s.latch, head, loop) if s.latch else head
                body = self.block(s.body, latch, _LoopExits(out, latch))
                new = self.block(s.header, _uses(s.test) | body | out, loop)
                if new == head:
                    return head
                head = new
        raise TypeError(s)


def site_live_sets(fn: LoweredFunction) -> dict[str, tuple[str, ...]]:
    """Site key -> the variables live right after the site returns, minus its
    result, sorted by name (what :attr:`LoweredFunction.live` holds)."""
    liveness = _Liveness()
    liveness.block(fn.body, frozenset(), None)
    return {s.key: tuple(sorted(liveness.live_after.get(s.key, frozenset())))
            for s in fn.sites}
