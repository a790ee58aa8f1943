"""The walk stage: from a register state and a memory reader to frames.

One step, for a frame whose registers are known (psABI §3.7; DWARF §6.4.4)::

    row        = rule in force at lookup_pc      (lookup_pc = pc − 1 for a caller frame,
                                                  pc for the innermost or a signal frame)
    cfa        = row.cfa(regs)                   e.g. rsp + 16
    caller.rip = *(cfa + ra_offset)              e.g. *(cfa − 8)
    caller.rsp = cfa
    caller.r   = row.rule(r) applied, for r in RBX, RBP, R12..R15 (same value when no rule)

A pc with no FDE falls back to frame pointers — ``(cfa, rip, rbp) = (rbp + 16,
*(rbp + 8), *rbp)`` — and the frame says so in :attr:`Frame.fallback`.

The walk ends when the return address is undefined or zero (the outermost
frame: ``_start``, ``clone3``), the CFA does not increase, memory cannot be
read, or ``max_frames`` is reached; the last frame records why in
:attr:`Frame.end_reason`.
"""
from dataclasses import dataclass, field, replace
from typing import Mapping

from .errors import MemoryReadError, UnwindError
from .compiled import OP_COPY, OP_LOAD, OP_SAME, OP_UNDEF, OP_VALUE
from .x86_64 import RBP, RA, RSP, CALLEE_SAVED

#: Registers carried from frame to frame (DWARF numbers): the ones a callee
#: must preserve, plus RSP and the return address. Caller-saved registers are
#: unknown in every frame but the innermost.
TRACKED = (RA, RSP) + CALLEE_SAVED
#: Default bound on the number of frames one walk produces.
DEFAULT_MAX_FRAMES = 1 << 20

FALLBACK_FRAME_POINTER = "frame-pointer"
#: The innermost pc sits on ``jmp *disp32(%rip)`` (a linker's PLT/JIT stub,
#: which has no FDE): unwound as at a function's entry, CFA = RSP + 8.
FALLBACK_JUMP_STUB = "jump-stub"
_MASK64 = (1 << 64) - 1

END_RA_UNDEFINED = "end of stack: return address undefined"
END_RA_ZERO = "end of stack: return address is 0"
END_CFA_NOT_INCREASING = "CFA did not increase"
END_STEP_LIMIT = "step limit reached"
END_NO_UNWIND_INFO = "no unwind info and no frame pointer"


@dataclass(frozen=True, eq=False)
class Frame:
    """One native frame.

    ``pc`` is absolute: the current instruction for the innermost frame (and
    for a frame interrupted by a signal), the *return address* for every
    caller frame. ``cfa`` is the absolute canonical frame address (the
    caller's RSP before its ``call``), or None when it could not be computed.
    ``regs`` maps DWARF register numbers to this frame's values (only those
    known: RSP, RIP (16) and the callee-saved ones for callers).
    ``ra_slot`` is the absolute address of the 8-byte stack slot holding this
    frame's return address (where a return-address hijack writes), or None.
    ``saved_at`` maps DWARF register numbers of the *caller's* callee-saved
    registers to the absolute stack address this frame saved them at.
    ``lookup_pc`` is the address the unwind row and symbol were looked up at:
    ``pc − 1`` for a caller frame (the call may be the function's last
    instruction), ``pc`` for the innermost frame and for a frame interrupted
    by a signal (the caller of a frame whose FDE has augmentation ``S``).
    ``is_signal_frame`` is True for a frame whose own FDE has ``S`` (the
    kernel's signal-return trampoline). ``stored_pc`` is the raw value found
    in the return-address slot when a return-address filter translated it
    into ``pc`` (a hijacked return: the slot holds a stub's address), else None.
    """
    pc: int
    cfa: int | None
    regs: Mapping[int, int]
    module_ref: object = None
    ra_slot: int | None = None
    saved_at: Mapping[int, int] = field(default_factory=dict)
    is_signal_frame: bool = False
    fallback: str | None = None
    end_reason: str | None = None
    index: int = 0
    lookup_pc: int | None = None
    stored_pc: int | None = None

    @property
    def translated(self):
        """True when the slot holding this frame's pc held another value
        (:attr:`stored_pc`, e.g. a deopt stub's address) that a return-address
        filter of the space translated (see
        :meth:`AddressSpace.add_return_address_filter`)."""
        return self.stored_pc is not None

    @property
    def module(self):
        """The module's path (ELF files) or name (JIT code objects), or None
        for a pc in no known module. The :class:`~unwinder.modules.Module`
        itself is :attr:`module_ref`."""
        return None if self.module_ref is None else self.module_ref.name

    @property
    def symbol(self):
        """Name of the function symbol containing this frame's code, or None."""
        if self.module_ref is None:
            return None
        hit = self.module_ref.symbolize(self.pc if self.lookup_pc is None else self.lookup_pc)
        return None if hit is None else hit[0]

    def __repr__(self):
        mod = self.module
        return (f"Frame(#{self.index} pc={self.pc:#x} cfa={self.cfa:#x} "
                f"{self.symbol or '?'} in {mod or '?'}"
                f"{' [' + self.fallback + ']' if self.fallback else ''}"
                f"{' end: ' + self.end_reason if self.end_reason else ''})"
                if self.cfa is not None else
                f"Frame(#{self.index} pc={self.pc:#x} in {mod or '?'} end: {self.end_reason})")


def _step_cfi(plan, regs, read_u64):
    """Apply one compiled row: ``(cfa, caller_regs, ra_slot, saved_at)``."""
    if plan.cfa_register is not None:
        base = regs.get(plan.cfa_register)
        if base is None:
            raise UnwindError(f"CFA register {plan.cfa_register} is unknown in this frame")
        cfa = (base + plan.cfa_offset) & _MASK64
    else:
        cfa = plan.row.cfa_value(regs, read_u64)
    caller = {RSP: cfa}
    for reg, op, arg in plan.ops:
        if op == OP_LOAD:
            caller[reg] = read_u64((cfa + arg) & _MASK64)
        elif op == OP_SAME:
            v = regs.get(reg)
            if v is not None:
                caller[reg] = v
        elif op == OP_UNDEF:
            continue
        elif op == OP_VALUE:
            caller[reg] = (cfa + arg) & _MASK64
        elif op == OP_COPY:
            v = regs.get(arg)
            if v is not None:
                caller[reg] = v
        else:
            v = plan.row.recover(reg, cfa, regs, read_u64)
            if v is not None:
                caller[reg] = v
    ra_slot = None if plan.ra_offset is None else (cfa + plan.ra_offset) & _MASK64
    saved_at = {reg: (cfa + off) & _MASK64 for reg, off in plan.saved}
    return cfa, caller, ra_slot, saved_at


def _is_jump_stub(pc, read_u64):
    """Whether the bytes at ``pc`` are ``FF 25 disp32`` (``jmp *disp32(%rip)``)."""
    try:
        return read_u64(pc) & 0xFFFF == 0x25FF
    except MemoryReadError:
        return False


def _step_entry(regs, read_u64):
    """At a function's first instruction: ``(cfa, rip) = (rsp + 8, *rsp)``; others unchanged."""
    rsp = regs[RSP]
    caller = {r: regs[r] for r in CALLEE_SAVED if r in regs}
    caller[RSP] = rsp + 8
    caller[RA] = read_u64(rsp)
    return rsp + 8, caller, rsp, {}


def _step_frame_pointer(regs, read_u64):
    """``(cfa, rip, rbp) = (rbp + 16, *(rbp + 8), *rbp)``; others keep their value."""
    rbp = regs.get(RBP)
    if not rbp:
        raise UnwindError(END_NO_UNWIND_INFO)
    cfa = rbp + 16
    caller = {r: regs[r] for r in CALLEE_SAVED if r in regs}
    caller[RSP] = cfa
    caller[RA] = read_u64(rbp + 8)
    caller[RBP] = read_u64(rbp)
    return cfa, caller, rbp + 8, {RBP: rbp}


def walk(regs, memory, space=None, *, max_frames=DEFAULT_MAX_FRAMES, caller_frame=False):
    """Frames from an explicit register state, innermost first (a generator).

    ``regs`` maps DWARF register numbers to values; it needs at least RIP (16)
    and RSP (7), and the callee-saved registers for exact results. ``memory``
    is a :class:`~unwinder.memory.Memory`; ``space`` an
    :class:`~unwinder.space.AddressSpace` (default: this process).
    The innermost frame is looked up at its exact pc unless ``caller_frame``
    says that ``regs`` hold a return address (a state captured at a call).
    """
    if space is None:
        from .space import AddressSpace
        space = AddressSpace.current_process()
    read_u64 = memory.read_u64
    regs = dict(regs)
    if RA not in regs or RSP not in regs:
        raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
    exact_pc = not caller_frame  # innermost frame, or the frame a signal interrupted
    prev_cfa = None
    stored_pc = None
    filters = space.return_address_filters
    for index in range(max_frames):
        frame, caller = _unwind_one(space, regs, read_u64, exact_pc, index, prev_cfa, stored_pc)
        if frame.end_reason is None and index == max_frames - 1:
            frame = replace(frame, end_reason=END_STEP_LIMIT)
        yield frame
        if frame.end_reason is not None:
            return
        stored_pc = None
        if filters and frame.ra_slot is not None:
            raw = caller[RA]
            for translate in filters:
                pc = translate(frame.ra_slot, raw)
                if pc != raw:
                    caller[RA] = pc
                    stored_pc = raw
                    break
        prev_cfa = frame.cfa
        exact_pc = frame.is_signal_frame
        regs = caller


def _unwind_one(space, regs, read_u64, exact_pc, index=0, prev_cfa=None, stored_pc=None):
    """One frame and its caller's registers (None when the walk ends here)."""
    pc = regs[RA]
    lookup_pc = pc if exact_pc else pc - 1
    entry = space.unwind_entry(lookup_pc)
    module = entry[2] if entry is not None else space.find_module(lookup_pc, refresh=False)
    signal = bool(entry and entry[1])
    fallback = None
    end = None
    cfa = caller = ra_slot = None
    saved_at = {}
    try:
        if entry is not None:
            cfa, caller, ra_slot, saved_at = _step_cfi(entry[0], regs, read_u64)
        elif exact_pc and _is_jump_stub(pc, read_u64):
            fallback = FALLBACK_JUMP_STUB
            space.fallback_frames += 1
            cfa, caller, ra_slot, saved_at = _step_entry(regs, read_u64)
        else:
            fallback = FALLBACK_FRAME_POINTER
            space.fallback_frames += 1
            cfa, caller, ra_slot, saved_at = _step_frame_pointer(regs, read_u64)
    except MemoryReadError as e:
        end = f"cannot read stack memory at {e.address:#x}"
    except UnwindError as e:
        end = str(e)
    if end is None:
        if prev_cfa is not None and cfa <= prev_cfa:
            end = END_CFA_NOT_INCREASING
        elif caller.get(RA) is None:
            end = END_RA_UNDEFINED
        elif caller[RA] == 0:
            end = END_RA_ZERO
    frame = Frame(pc=pc, cfa=cfa, regs=regs, module_ref=module, ra_slot=ra_slot,
                  saved_at=saved_at, is_signal_frame=signal, fallback=fallback,
                  end_reason=end, index=index, lookup_pc=lookup_pc, stored_pc=stored_pc)
    return frame, (caller if end is None else None)


def step(regs, memory, space=None, *, caller_frame=True):
    """Unwind one frame: ``(frame, caller_regs)`` without translating return addresses.

    ``caller_regs`` (DWARF number -> value: RSP, RIP and the callee-saved
    registers the frame restores) is None when the frame is the last one
    (``frame.end_reason`` says why). Used by the deopt transfer to find the
    caller's registers of a frame it replaces.
    """
    if space is None:
        from .space import AddressSpace
        space = AddressSpace.current_process()
    return _unwind_one(space, dict(regs), memory.read_u64, not caller_frame)
