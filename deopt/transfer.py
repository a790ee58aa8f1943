"""The transfer: an old frame at a site → the state for the new version's resume entry.

One routine, shaped like LuaJIT's ``lj_snap_restore``: it takes the register
file the stub saved and the :class:`~deopt.plan.FramePlan` of the site,
reads every live value (:func:`read_live_values`, like ``snap_restoreval``:
constant, register, stack slot), unwinds the frame by the plan's rules
(:func:`unwind_frame`) and returns where to resume. Both the Python transfer
and the emulated backend use it; registers and memory arrive as plain ints and
a :class:`~unwinder.memory.Memory`. The native transfer
(:mod:`deopt.native_transfer`) is generated from the same plans.

Frame replacement, in formulas (``E`` = the RSP the stub was entered with =
the old frame's RSP right after its call; the sources are the plan's, see
:mod:`deopt.plan`)::

    regs        = {RSP: E, RA: original_ra, RBX/RBP/R12–R15: as saved by the stub}
    values[n]   = plan.values[n] evaluated with regs
    cfa         = plan.cfa evaluated with regs
    caller.r    = plan.caller[r] evaluated with regs and cfa
    state       = [regs[plan.result]] + [values[n] for n in new_site.live]  (8-byte slots)
    resume with   RSP = cfa − 8  (the caller's return address on top),
                  callee-saved registers = caller's, RDI = site id, RSI = state

so the resume entry runs as if the old frame's caller had just called it, and
its ``ret`` returns the result to that caller (or into the stub again, if the
caller's own return was hijacked too).
"""
from dataclasses import dataclass

from unwinder import MemoryReadError, UnwindError
from unwinder.walk import END_RA_UNDEFINED, END_RA_ZERO
from unwinder.x86_64 import CALLEE_SAVED, RA, RAX, RSP

from .errors import TransferError
from .plan import (Address, CfaFromExpression, CfaFromRegister, CfaPlus, Constant, InMemory,
                   InRegister, Recovered, SameAs, SavedAt, Unavailable, Undefined, permutation,
                   plan_frame, unavailable_message)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ResumeTarget:
    """Where a transferred frame continues.

    ``resume_entry``: absolute address of ``@<symbol>__resume``; ``site_id``;
    ``live``: names of the values the new version reads, in state order
    (``state[1 + i]`` is ``live[i]``); ``owner``: the runtime's version object.
    """
    resume_entry: int
    site_id: int
    live: tuple
    owner: object = None


@dataclass(frozen=True)
class Transfer:
    """Register values to load before jumping to ``rip`` with ``rsp``.

    ``state`` is the list of 8-byte values for the resume entry's state buffer
    (the caller copies it into per-thread memory and passes its address as
    ``rsi``). ``caller_regs``: DWARF number -> value for RBX, RBP, R12–R15.
    """
    rsp: int
    rip: int
    site_id: int
    state: tuple
    caller_regs: dict
    cfa: int


def _read_sized(memory, address, size):
    data = memory.read(address, size)
    return int.from_bytes(data, "little", signed=False)


def read_live_values(plan, regs, memory):
    """Values of the live slots of ``plan`` (a :class:`~deopt.plan.FramePlan`)
    in the frame whose registers are ``regs``, in frame-map order.

    ``regs`` are the frame's own registers at the site's return address
    (DWARF numbers). Values are unsigned 64-bit ints (narrower values
    zero-extended; the resume entry reads the low bytes). A value in a
    register the frame does not have at its return point (a caller-saved
    one) is a :class:`TransferError`.
    """
    fm = plan.frame_map
    out = []
    for slot, source in zip(fm.values, plan.values):
        if isinstance(source, Constant):
            out.append(source.bits)
            continue
        base = None if isinstance(source, Unavailable) else regs.get(source.register)
        if base is None:
            raise TransferError(f"{fm}: {unavailable_message(slot.name, source.register)}")
        if isinstance(source, InRegister):
            value = base
        elif isinstance(source, Address):
            # The value is an address in the old frame (an alloca), which
            # dies with the frame; frames built by osrjit.ir never carry one.
            value = base + source.offset
        else:
            assert isinstance(source, InMemory)
            value = _read_sized(memory, (base + source.offset) & _MASK64, source.size_bytes)
        out.append(value & _MASK64)
    return tuple(out)


def unwind_frame(plan, regs, memory):
    """``(cfa, caller_regs)`` of the frame whose registers are ``regs``, by the
    plan's rules; ``caller_regs``: DWARF number -> value for RBX, RBP,
    R12–R15. Raises :class:`TransferError` when the frame cannot be unwound,
    or its caller's return address is not at ``cfa − 8``."""
    fm = plan.frame_map
    if plan.cfa is None:
        raise TransferError(f"{fm}: no unwind row for the old frame at {regs[RA]:#x} "
                            "(would guess by frame-pointer)")
    read_u64 = memory.read_u64
    end = None
    try:
        cfa = _cfa(plan.cfa, regs, read_u64)
        ra = _caller_value(plan.return_address, cfa, regs, read_u64)
        caller = {reg: _caller_value(source, cfa, regs, read_u64) for reg, source in plan.caller}
    except MemoryReadError as e:
        end = f"cannot read stack memory at {e.address:#x}"
    except UnwindError as e:
        end = str(e)
    else:
        if ra is None:
            end = END_RA_UNDEFINED
        elif ra == 0:
            end = END_RA_ZERO
    if end is not None:
        raise TransferError(f"{fm}: cannot unwind the old frame: {end}")
    source = plan.return_address
    ra_slot = (cfa + source.offset) & _MASK64 if isinstance(source, SavedAt) else None
    if ra_slot != cfa - 8:
        raise TransferError(f"{fm}: the caller's return address is at {ra_slot}, "
                            f"not at CFA - 8 = {cfa - 8:#x}")
    return cfa, caller


def _cfa(source, regs, read_u64):
    if isinstance(source, CfaFromExpression):
        return source.row.cfa_value(regs, read_u64)
    assert isinstance(source, CfaFromRegister)
    base = regs.get(source.register)
    if base is None:
        raise UnwindError(f"CFA register {source.register} is unknown in this frame")
    return (base + source.offset) & _MASK64


def _caller_value(source, cfa, regs, read_u64):
    """The caller's value of a register restored from ``source`` (None: unknown)."""
    if isinstance(source, SavedAt):
        return read_u64((cfa + source.offset) & _MASK64)
    if isinstance(source, CfaPlus):
        return (cfa + source.offset) & _MASK64
    if isinstance(source, SameAs):
        return regs.get(source.register)
    if isinstance(source, Recovered):
        value = source.row.recover(source.register, cfa, regs, read_u64)
        if value is None and source.otherwise is not None:
            value = regs.get(source.otherwise)
        return value
    assert isinstance(source, Undefined)
    return None


def plan_transfer(record, target, saved, memory, space):
    """Compute the :class:`Transfer` of the hijacked frame of ``record``.

    ``saved``: the registers the stub saved (DWARF numbers: RAX, RBX, RBP,
    R12–R15) and RSP = ``E``. ``target``: the :class:`ResumeTarget`.
    ``memory``/``space``: the unwinder's view of the thread's memory and code
    (the frame's plan is :func:`deopt.plan.plan_frame` of its frame map in
    ``space``). Raises :class:`TransferError` when the frame cannot be rebuilt
    (the caller then lets it return into the old code, which therefore stays
    loaded).
    """
    return restore_frame(plan_frame(record.frame_map, space), record, target, saved, memory)


def restore_frame(plan, record, target, saved, memory):
    """:func:`plan_transfer` with the frame's :class:`~deopt.plan.FramePlan` given."""
    fm = plan.frame_map
    regs = {r: saved[r] for r in CALLEE_SAVED if r in saved}
    regs[RSP] = saved[RSP]
    regs[RA] = record.original_ra
    values = read_live_values(plan, regs, memory)
    perm = permutation(fm, target.live)
    if perm is None:
        missing = [n for n in target.live if n not in fm.names]
        raise TransferError(f"{fm}: the new version needs {missing}, which the old frame "
                            "does not record")
    state = (saved.get(plan.result, 0) & _MASK64,) + tuple(values[i] for i in perm)
    cfa, caller = unwind_frame(plan, regs, memory)
    # A register whose caller value is unknown keeps the frame's own.
    caller_regs = {r: regs.get(r) if caller.get(r) is None else caller[r] for r in CALLEE_SAVED}
    return Transfer(rsp=cfa - 8, rip=target.resume_entry, site_id=target.site_id,
                    state=state, caller_regs=caller_regs, cfa=cfa)


@dataclass(frozen=True)
class StubReturn:
    """What the deopt stub does after a hijacked return (see :func:`return_through_stub`).

    ``ok``: the frame was rebuilt in a new version; then ``rip`` is its resume
    entry, ``rdi`` the site id and ``state`` the 8-byte values for the state
    buffer (``rsi`` is the buffer's address, chosen by the backend).
    Otherwise (``ok`` False, ``error`` says why) the frame returns into its
    old code: ``rsp`` is the slot (holding the original return address
    again), ``rip`` the stub's lone ``ret`` and ``state`` is empty.
    ``regs``: DWARF number -> value for RAX, RBX, RBP, R12–R15 to load.
    ``keep_xmm0``: load XMM0 from the stub's saved block (fallback) rather
    than clear it. ``record``: the :class:`~deopt.hijack.HijackRecord` taken.
    """
    record: object
    ok: bool
    rsp: int
    rip: int
    rdi: int
    state: tuple
    regs: dict
    keep_xmm0: bool
    error: BaseException | None = None


def return_through_stub(table, entry_rsp, saved, resolve, memory, space, return_address, *,
                        restore_slot=None, observer=None):
    """The transfer the deopt stub asks for, shared by every backend.

    A callee returned into the stub with ``RSP = entry_rsp`` (``E`` in the
    module docstring; its slot is ``E − 8``). In order:

    1. take the slot's :class:`~deopt.hijack.HijackRecord` from ``table``
       (:class:`~deopt.hijack.HijackError` if there is none: a bug, the
       caller must not continue the thread);
    2. write the original return address back into the slot
       (``restore_slot(slot, value)``, default ``memory.write_u64``): from
       here on libgcc, gdb and the unwinder walk through the stub into the
       old frame;
    3. ``observer(record)`` if given (tests, debugging);
    4. ``resolve(record) -> ResumeTarget`` and :func:`plan_transfer`.

    ``saved``: DWARF number -> value for RAX, RBX, RBP, R12–R15 as the stub
    saved them. ``return_address``: absolute address of the stub's ``ret``
    (:data:`deopt.stub.RETURN_SYMBOL`). Any exception in steps 3–4 makes the
    frame return into its old code instead (``ok`` False); it never
    propagates.
    """
    slot = entry_rsp - 8
    record = table.take(slot)
    if restore_slot is None:
        memory.write_u64(slot, record.original_ra)
    else:
        restore_slot(slot, record.original_ra)
    regs_in = dict(saved)
    regs_in[RSP] = entry_rsp
    try:
        if observer is not None:
            observer(record)
        target = resolve(record)
        t = plan_transfer(record, target, regs_in, memory, space)
    except Exception as e:  # noqa: BLE001 - the frame falls back to its old code
        regs = {r: saved.get(r, 0) for r in CALLEE_SAVED}
        regs[RAX] = saved.get(RAX, 0)
        return StubReturn(record, False, slot, return_address, 0, (), regs, True, e)
    regs = dict(t.caller_regs)
    regs[RAX] = 0
    return StubReturn(record, True, t.rsp, t.rip, t.site_id, t.state, regs, False)
