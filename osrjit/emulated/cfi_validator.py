"""The CFI validator: the unwinder checked against a shadow call stack at every
instruction.

A ``UC_HOOK_CODE`` over the chosen code ranges only (default: every code
object of the machine's address space but the idle loop) stops before each
instruction executed there. Per emulated thread a *shadow stack* of the
frames that are really live is kept from what the CPU does, independent of
any unwind information::

    before each instruction at pc, with registers R:
      pop   while top.cfa <= R.rsp                 (its function returned)
      push  if the previous in-range instruction of this thread was a call
            (its bytes decode as E8 rel32 / FF /2), R.rsp == prev.rsp - 8 and
            *R.rsp == prev.pc + prev.size: a new frame with
            cfa = R.rsp + 8, ra = prev.pc + prev.size and the callee-saved
            registers' values at that moment (the caller's values, which the
            callee must preserve)

A thread seen for the first time is at its entry: one frame, ``cfa = rsp +
8`` and ``ra = *rsp`` (the exit hypercall). An address in ``return_entries``
(the deopt stub) is entered by a ``ret`` through a hijacked slot: it pushes a
frame with ``cfa = rsp`` and ``ra`` = the slot's translated value
(``*(rsp − 8)`` through the space's return-address filters). Tail calls (``jmp``) keep the
frame; a call into code outside the ranges that comes back is invisible,
as it should be.

At every hooked instruction, ``unwinder.walk(R, UnicornMemory, machine.space)``
must give, for the k shadow frames (innermost first) ``i = 0 .. k-1``::

    frames[i].cfa == shadow[i].cfa        frames[i].ra_slot == shadow[i].cfa - 8
    frames[i+1].pc == shadow[i].ra        frames[i+1].regs[r] == shadow[i].saved[r]
                                          for r in RBX, RBP, R12-R15
    no frame-pointer fallback;  frames[k] is the exit hypercall, the last frame,
    ending with "return address undefined"

Any difference is a :class:`Failure` naming the thread, the pc as
``symbol+offset``, the frame and the unwind row in force
(``space.unwind_entry(pc)``).

Cost: one Python walk per instruction (tens of µs per frame): keep inputs
small in CI.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from unicorn import UC_HOOK_CODE

import unwinder
from deopt.framemaps import decode_call_ending_at
from unwinder.walk import END_RA_UNDEFINED
from unwinder.x86_64 import CALLEE_SAVED, RA, RSP, REGISTER_NAMES

from .machine import _GPR_DWARF, _GPR_UC, Machine

__all__ = ["CFIValidator", "Failure", "Report", "ShadowFrame", "validate"]


@dataclass(frozen=True)
class ShadowFrame:
    """A frame the CPU really created. ``cfa``: absolute (its caller's RSP
    before the call); ``ra``: absolute return address; ``saved``: DWARF
    register -> the caller's callee-saved value at the call; ``call_pc``:
    absolute address of the call (None for the thread's entry frame)."""
    cfa: int
    ra: int
    saved: dict
    call_pc: int | None = None


@dataclass(frozen=True)
class Failure:
    """The unwinder disagreed with the shadow stack at one instruction.

    ``pc``: absolute; ``where``: ``symbol+0xoff`` (or the bare address);
    ``frame``: index of the first frame that differs (0 = innermost);
    ``differences``: what differs, one string each; ``row``: the unwind row
    in force at ``pc`` (its repr), or None when no FDE covers ``pc``;
    ``expected`` / ``got``: ``(cfa, return address)`` chains, innermost first.
    """
    thread: int
    pc: int
    where: str
    frame: int
    differences: tuple[str, ...]
    row: str | None
    expected: tuple
    got: tuple

    def __str__(self):
        return (f"thread {self.thread} at {self.where} ({self.pc:#x}), frame {self.frame}: "
                f"{'; '.join(self.differences)}; row {self.row}; "
                f"expected {self._chain(self.expected)}, unwinder {self._chain(self.got)}")

    @staticmethod
    def _chain(chain):
        return "[" + ", ".join(f"(cfa {c:#x}, ra {r:#x})" if c is not None and r is not None
                               else f"({c}, {r})" for c, r in chain) + "]"


@dataclass
class Report:
    """What a validation run saw.

    ``instructions_checked``: hooked instructions compared (a count);
    ``failure_count``: of those, how many disagreed; ``failures``: the first
    ``max_failures`` of them; ``by_symbol``: function symbol -> instructions
    checked in it; ``distinct_pcs``: symbol -> number of distinct addresses
    checked; ``max_depth``: deepest shadow stack seen (frames).
    """
    instructions_checked: int = 0
    failure_count: int = 0
    failures: list[Failure] = field(default_factory=list)
    by_symbol: dict[str, int] = field(default_factory=dict)
    distinct_pcs: dict[str, int] = field(default_factory=dict)
    max_depth: int = 0

    @property
    def ok(self) -> bool:
        return self.failure_count == 0

    def summary(self) -> str:
        lines = [f"{self.instructions_checked} instructions checked, {self.failure_count} "
                 f"failures, max depth {self.max_depth}"]
        for sym in sorted(self.by_symbol):
            lines.append(f"  {sym}: {self.by_symbol[sym]} checks at "
                         f"{self.distinct_pcs.get(sym, 0)} distinct pcs")
        lines += [f"  FAIL {f}" for f in self.failures]
        return "\n".join(lines)


class _ThreadShadow:
    __slots__ = ("stack", "prev")

    def __init__(self):
        self.stack: list[ShadowFrame] = []
        self.prev: tuple[int, int, int] | None = None    # (pc, size, rsp)


class CFIValidator:
    """Hooks ``ranges`` of ``machine`` and checks every instruction executed
    there (see the module docstring). Use as a context manager, or call
    :meth:`close` to remove the hooks; :attr:`report` accumulates.

    ``ranges``: absolute half-open ``(start, end)`` byte ranges; default every
    range of every module in ``machine.space`` except the idle loop.
    ``max_failures``: how many :class:`Failure` records to keep.
    """

    def __init__(self, machine: Machine, ranges: Iterable[tuple[int, int]] | None = None, *,
                 max_failures: int = 50, return_entries: Iterable[int] = ()):
        self.machine = machine
        self.return_entries = frozenset(return_entries)
        self.report = Report()
        self.max_failures = max_failures
        self._shadows: dict[int, _ThreadShadow] = {}
        self._pcs: dict[str, set] = {}
        self._symbols: dict[int, str] = {}
        if ranges is None:
            ranges = self.default_ranges(machine)
        self.ranges = sorted(ranges)
        self._hooks = [machine.uc.hook_add(UC_HOOK_CODE, self._on_instruction, None, lo, hi - 1)
                       for lo, hi in self.ranges if hi > lo]

    @staticmethod
    def default_ranges(machine: Machine) -> list[tuple[int, int]]:
        idle_lo, idle_hi = machine.idle_address, machine.idle_address + 16
        out = []
        for module in machine.space.modules:
            for lo, hi in module.ranges:
                if lo <= idle_lo < hi:
                    if lo < idle_lo:
                        out.append((lo, idle_lo))
                    if idle_hi < hi:
                        out.append((idle_hi, hi))
                else:
                    out.append((lo, hi))
        return out

    def cover(self, ranges: Iterable[tuple[int, int]]):
        """Also check ``ranges`` (absolute, half-open), e.g. code loaded after
        the validator started; already translated code there is flushed so
        the new hooks see every instruction."""
        uc = self.machine.uc
        for lo, hi in ranges:
            if hi > lo:
                self._hooks.append(uc.hook_add(UC_HOOK_CODE, self._on_instruction, None,
                                               lo, hi - 1))
                uc.ctl_remove_cache(lo, hi)
                self.ranges.append((lo, hi))
        self.ranges.sort()

    def close(self):
        for h in self._hooks:
            self.machine.uc.hook_del(h)
        self._hooks = []
        self.report.distinct_pcs = {sym: len(pcs) for sym, pcs in self._pcs.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the hook ------------------------------------------------------------------

    def _symbol_of(self, pc: int) -> tuple[str, int]:
        """``(symbol, start)`` of the function containing ``pc`` (cached per pc)."""
        hit = self._symbols.get(pc)
        if hit is None:
            module = self.machine.space.find_module(pc, refresh=False)
            found = None if module is None else module.symbolize(pc)
            hit = self._symbols[pc] = found or (f"{pc:#x}", pc)
        return hit

    def _on_instruction(self, uc, pc, size, _user):
        thread = self.machine.current_thread
        if thread is None:          # the hypercall hook just took the thread off the CPU
            return
        regs = dict(zip(_GPR_DWARF, uc.reg_read_batch(_GPR_UC)))
        regs[RA] = pc
        rsp = regs[RSP]
        read = self.machine.memory.read_u64
        shadow = self._shadows.get(thread.id)
        if shadow is None:
            shadow = self._shadows[thread.id] = _ThreadShadow()
            shadow.stack.append(ShadowFrame(rsp + 8, read(rsp),
                                            {r: regs[r] for r in CALLEE_SAVED}))
        stack = shadow.stack
        while stack and stack[-1].cfa <= rsp:
            stack.pop()
        prev = shadow.prev
        if prev is not None:
            ppc, psize, prsp = prev
            end = ppc + psize
            if rsp == prsp - 8 and self._return_address(rsp) == end and \
                    self._is_call(ppc, psize):
                stack.append(ShadowFrame(rsp + 8, end, {r: regs[r] for r in CALLEE_SAVED}, ppc))
        if pc in self.return_entries:
            # Entered by a return (the deopt stub through a hijacked slot): a
            # callee of the frame whose slot it is, CFA = RSP, return address
            # in the slot at CFA - 8 (as the walk sees it, through the filters).
            stack.append(ShadowFrame(rsp, self._return_address(rsp - 8),
                                     {r: regs[r] for r in CALLEE_SAVED}))
        shadow.prev = (pc, size, rsp)
        rep = self.report
        rep.instructions_checked += 1
        rep.max_depth = max(rep.max_depth, len(stack))
        sym, _start = self._symbol_of(pc)
        rep.by_symbol[sym] = rep.by_symbol.get(sym, 0) + 1
        self._pcs.setdefault(sym, set()).add(pc)
        self._check(thread, pc, regs, stack)

    def _return_address(self, slot: int) -> int:
        """The return address in ``slot`` as a walk sees it: a hijacked slot
        (holding the deopt stub) reads as its original return address."""
        ra = self.machine.memory.read_u64(slot)
        for translate in self.machine.space.return_address_filters:
            ra = translate(slot, ra)
        return ra

    def _is_call(self, pc: int, size: int) -> bool:
        code = self.machine.read(pc, size)
        return any(c.start == 0 for c in decode_call_ending_at(code, size))

    def _check(self, thread, pc, regs, stack):
        m = self.machine
        k = len(stack)
        frames = list(unwinder.walk(regs, m.memory, m.space, max_frames=k + 2))
        diffs, first = [], None
        for i in range(k):
            want = stack[k - 1 - i]
            if i >= len(frames):
                diffs.append(f"frame {i}: missing (walk ended after {len(frames)} frames: "
                             f"{frames[-1].end_reason})")
                first = i if first is None else first
                break
            f = frames[i]
            here = []
            if f.fallback:
                here.append(f"frame {i}: unwound by {f.fallback} (no FDE at {f.lookup_pc:#x})")
            if f.cfa != want.cfa:
                here.append(f"frame {i}: cfa {_hex(f.cfa)} != {want.cfa:#x}")
            if f.ra_slot != want.cfa - 8:
                here.append(f"frame {i}: ra_slot {_hex(f.ra_slot)} != {want.cfa - 8:#x}")
            caller = frames[i + 1] if i + 1 < len(frames) else None
            if caller is None:
                here.append(f"frame {i}: walk ended ({f.end_reason}) but the caller "
                            f"returns to {want.ra:#x}")
            else:
                if caller.pc != want.ra:
                    here.append(f"frame {i + 1}: pc {caller.pc:#x} != return address {want.ra:#x}")
                for r in CALLEE_SAVED:
                    got = caller.regs.get(r)
                    if got != want.saved[r]:
                        here.append(f"frame {i + 1}: {REGISTER_NAMES[r]} {_hex(got)} != "
                                    f"{want.saved[r]:#x} (value at the call)")
            if here:
                diffs += here
                first = i if first is None else first
        if not diffs:
            if len(frames) != k + 1:
                diffs.append(f"walk has {len(frames)} frames, expected {k + 1} (last: "
                             f"{frames[-1]!r})")
                first = min(len(frames), k + 1) - 1
            elif frames[k].end_reason != END_RA_UNDEFINED:
                diffs.append(f"outermost frame {k} ends with {frames[k].end_reason!r}, expected "
                             f"{END_RA_UNDEFINED!r}")
                first = k
        if diffs:
            self._fail(thread, pc, first, diffs, stack, frames)

    def _fail(self, thread, pc, first, diffs, stack, frames):
        rep = self.report
        rep.failure_count += 1
        if len(rep.failures) >= self.max_failures:
            return
        sym, start = self._symbol_of(pc)
        entry = self.machine.space.unwind_entry(pc)
        rep.failures.append(Failure(
            thread=thread.id, pc=pc, where=f"{sym}+{pc - start:#x}", frame=first,
            differences=tuple(diffs), row=None if entry is None else repr(entry[0].row),
            expected=tuple((s.cfa, s.ra) for s in reversed(stack)),
            got=tuple((f.cfa, frames[i + 1].pc if i + 1 < len(frames) else None)
                      for i, f in enumerate(frames))))


def _hex(v):
    return "None" if v is None else f"{v:#x}"


def validate(machine: Machine, ranges=None, *, seed: int = 0, quantum=(1, 100),
             max_instructions: int | None = None, max_failures: int = 50) -> Report:
    """Run ``machine``'s runnable threads (``machine.run(seed, quantum)``) with a
    :class:`CFIValidator` on ``ranges``; returns its :class:`Report`. Thread
    faults are left on the threads (``thread.result`` raises them)."""
    with CFIValidator(machine, ranges, max_failures=max_failures) as v:
        machine.run(seed, quantum, max_instructions=max_instructions, raise_on_fault=False)
    return v.report
