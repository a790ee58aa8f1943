"""What transferring a frame takes: one plan per frame map, read by both transfers.

A hijacked frame is suspended at one return address, so everything about how
to rebuild it is known before it returns: its frame map says where each live
value is, and the CFI row in force at ``return address − 1`` says where its
CFA is and where it saved its caller's registers. :func:`plan_frame` reduces
the pair to a :class:`FramePlan` once. The Python transfer
(:func:`deopt.transfer.plan_transfer`) interprets the plan with the registers
the stub saved; the native transfer (:mod:`deopt.native_transfer`) generates
one switch case from it, or none when :attr:`FramePlan.native_error` says why
the plan cannot be run natively. The question "can this frame be transferred,
and how" is answered here and nowhere else.

The registers a suspended frame has at its return address (DWARF numbers;
``E`` = the RSP the stub was entered with = the frame's RSP right after its
call)::

    RSP = E,   RA (16) = the original return address,   RBX/RBP/R12–R15 = as the stub saved them

The plan, in formulas (``regs`` = those registers, ``read(a, n)`` = the ``n``
bytes at address ``a``, little-endian, zero-extended; every sum is modulo
2**64)::

    value     Constant(bits)            bits
              InRegister(r)             regs[r]
              Address(r, n)             regs[r] + n          (DIRECT: an address in the frame)
              InMemory(r, n, size)      read(regs[r] + n, size), low 8 bytes
              Unavailable(r)            none: r is not known at the return address
    cfa       CfaFromRegister(r, n)     regs[r] + n
              CfaFromExpression(row)    row.cfa_value(regs)  (a DWARF expression)
              None                      no unwind row at return address − 1
    caller.r  SavedAt(n)                *(cfa + n)           (DW_CFA_offset)
              CfaPlus(n)                cfa + n              (DW_CFA_val_offset)
              SameAs(r')                regs[r']             (same value, undefined, register rules)
              Recovered(row, r, o)      row.recover(r) or regs[o]      (a DWARF expression)
              Undefined()               unknown              (only ever the return address)
    state     [regs[result]] + [value[perm[i]] for i < count]      (8-byte slots)
    resume    RSP = cfa − 8 (the caller's return address on top), callee-saved = caller's,
              RAX = XMM0 = 0

A callee-saved register whose rule is *undefined*, or copies a register the
frame does not have, keeps the frame's own value (the caller's value is not
recoverable any other way, and a leaf-like row leaves it untouched). The
return address must be saved at ``cfa − 8`` for the rebuilt frame's ``ret``
to find it.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, fields, replace

from unwinder.compiled import OP_COPY, OP_GENERAL, OP_LOAD, OP_SAME, OP_UNDEF, OP_VALUE
from unwinder.x86_64 import CALLEE_SAVED, RA, RAX, RSP

from .stackmaps import LocationKind

__all__ = [
    "KNOWN_REGISTERS", "STATE_SLOTS", "FramePlan", "plan_frame", "permutation",
    "Constant", "InRegister", "Address", "InMemory", "Unavailable",
    "CfaFromRegister", "CfaFromExpression",
    "SavedAt", "CfaPlus", "SameAs", "Recovered", "Undefined", "RA_AT_CFA_MINUS_8",
    "unavailable_message",
]

_MASK64 = (1 << 64) - 1

#: Registers a suspended frame has at its return address, as the stub sees
#: them (DWARF numbers): RSP, the return address and the callee-saved ones.
KNOWN_REGISTERS = frozenset((RSP, RA) + CALLEE_SAVED)

#: 8-byte slots of a thread's native state buffer: ``state[0]`` is the call's
#: result, so the native transfer takes frames of up to ``STATE_SLOTS − 1``
#: live values.
STATE_SLOTS = 256


# -- where a live value is read ------------------------------------------------

@dataclass(frozen=True)
class Constant:
    """The value is ``bits`` (unsigned 64-bit; CONSTANT and CONSTANT_INDEX)."""
    bits: int


@dataclass(frozen=True)
class InRegister:
    """The value is the frame's register ``register`` (DWARF number)."""
    register: int


@dataclass(frozen=True)
class Address:
    """The value is ``regs[register] + offset`` (DIRECT; offset in bytes)."""
    register: int
    offset: int


@dataclass(frozen=True)
class InMemory:
    """The value is the ``size_bytes`` bytes at ``regs[register] + offset``
    (INDIRECT: a spill slot), zero-extended; the low 8 bytes when larger."""
    register: int
    offset: int
    size_bytes: int


@dataclass(frozen=True)
class Unavailable:
    """The value lives in ``register``, which the frame does not have at its
    return address (a caller-saved register): the frame cannot be rebuilt."""
    register: int


# -- where the CFA comes from ----------------------------------------------------

@dataclass(frozen=True)
class CfaFromRegister:
    """``cfa = regs[register] + offset`` (bytes)."""
    register: int
    offset: int


@dataclass(frozen=True)
class CfaFromExpression:
    """``cfa = row.cfa_value(regs, read_u64)`` (a DWARF expression; Python only)."""
    row: object


# -- where a register of the caller is restored from -------------------------------

@dataclass(frozen=True)
class SavedAt:
    """``caller.r = *(cfa + offset)`` (8 bytes; DW_CFA_offset)."""
    offset: int


@dataclass(frozen=True)
class CfaPlus:
    """``caller.r = cfa + offset`` (DW_CFA_val_offset)."""
    offset: int


@dataclass(frozen=True)
class SameAs:
    """``caller.r = regs[register]``: the frame's own value of ``register``."""
    register: int


@dataclass(frozen=True)
class Recovered:
    """``caller.r = row.recover(register, ...)`` (a DWARF expression; Python
    only), else ``regs[otherwise]`` (``otherwise`` None: undefined)."""
    row: object
    register: int
    otherwise: int | None


@dataclass(frozen=True)
class Undefined:
    """The caller's value is unknown (only ever the return address)."""


#: The only return-address rule a rebuilt frame can use: ``*(cfa − 8)``.
RA_AT_CFA_MINUS_8 = SavedAt(-8)


@dataclass(frozen=True)
class FramePlan:
    """Everything a transfer of a frame suspended at ``frame_map`` needs.

    ``values``: per live value of ``frame_map`` (same order) where it is read
    (:class:`Constant`, :class:`InRegister`, :class:`Address`,
    :class:`InMemory`, :class:`Unavailable`). ``cfa``: where the frame's CFA
    comes from, None when no unwind row covers ``return_address − 1``.
    ``caller``: ``((register, source), ...)`` for RBX, RBP, R12–R15 (DWARF
    numbers), where the caller's value comes from. ``return_address``: where
    the caller's return address is (:data:`RA_AT_CFA_MINUS_8` for every
    frame that can be rebuilt). ``result``: the register (DWARF number)
    holding the call's result, copied to ``state[0]``. ``native_error``:
    why the native transfer has no case for this plan, None when it has one
    (the Python transfer interprets every plan; it fails on the frames no
    transfer can rebuild). Registers are those of :data:`KNOWN_REGISTERS`
    except where a source says otherwise; offsets are in bytes.
    """
    frame_map: object
    values: tuple
    cfa: CfaFromRegister | CfaFromExpression | None
    caller: tuple
    return_address: object
    result: int = RAX
    native_error: str | None = None

    @property
    def native(self):
        """Whether the native transfer has a case for this plan."""
        return self.native_error is None


#: :class:`FramePlan`'s fields after ``frame_map``, in order.
_PLAN_PARTS = tuple(f.name for f in fields(FramePlan))[1:]


def plan_frame(frame_map, space):
    """The :class:`FramePlan` of ``frame_map``.

    ``space``: anything with ``unwind_entry(pc) -> (StepPlan, signal, module)
    | None`` (an :class:`unwinder.AddressSpace`); the row is the one in force
    at ``frame_map.return_address − 1`` (absolute), as a walker finds it for a
    caller frame. Memoised per frame map (by identity) and row, so the Python
    transfer plans each frame map once. The memo holds the frame map only
    weakly and neither the row's module nor its object: an entry goes when
    its frame map does (its version freed), and pins none of it meanwhile.
    """
    entry = space.unwind_entry(frame_map.return_address - 1)
    step = None if entry is None else entry[0]
    key = id(frame_map)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is frame_map and hit[1] is step:
        return FramePlan(frame_map, *hit[2])
    plan = _plan(frame_map, entry)
    if len(_PLANS) >= _PLANS_LIMIT:
        _PLANS.clear()
    # Everything of the plan but the frame map, which the memo must not keep alive.
    parts = tuple(getattr(plan, f) for f in _PLAN_PARTS)
    _PLANS[key] = (weakref.ref(frame_map, functools.partial(_forget_plan, key)), step, parts)
    return plan


def _forget_plan(key, ref):
    """The frame map of ``_PLANS[key]`` is gone: drop its entry (unless a new
    frame map took the id since)."""
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is ref:
        _PLANS.pop(key, None)


#: id(frame map) -> (weak reference to it, the StepPlan its plan was made
#: from, the plan's fields after ``frame_map``).
_PLANS = {}
_PLANS_LIMIT = 4096


def _plan(frame_map, entry):
    values = tuple(_value_source(slot.location) for slot in frame_map.values)
    if entry is None:
        cfa, caller, ra = None, (), Undefined()
    else:
        row = entry[0]
        cfa = (CfaFromExpression(row.row) if row.cfa_register is None
               else CfaFromRegister(row.cfa_register, row.cfa_offset))
        ops = {reg: (op, arg) for reg, op, arg in row.ops}
        caller = tuple((reg, _register_source(row.row, reg, *ops[reg], otherwise=reg))
                       for reg in CALLEE_SAVED)
        ra = _register_source(row.row, RA, *ops[RA], otherwise=None)
    plan = FramePlan(frame_map, values, cfa, caller, ra)
    why = _native_error(plan)
    return plan if why is None else replace(plan, native_error=why)


def _value_source(loc):
    kind = loc.kind
    if kind in (LocationKind.CONSTANT, LocationKind.CONSTANT_INDEX):
        return Constant(loc.value & _MASK64)
    if loc.dwarf_reg not in KNOWN_REGISTERS:
        return Unavailable(loc.dwarf_reg)
    if kind is LocationKind.REGISTER:
        return InRegister(loc.dwarf_reg)
    if kind is LocationKind.DIRECT:
        return Address(loc.dwarf_reg, loc.offset)
    if kind is LocationKind.INDIRECT:
        return InMemory(loc.dwarf_reg, loc.offset, loc.size)
    raise ValueError(f"unknown location kind {kind!r}")  # pragma: no cover - five kinds only


def _register_source(row, reg, op, arg, otherwise):
    """Where the caller's ``reg`` comes from under the compiled rule ``(op, arg)``.

    ``otherwise``: the frame's register whose value the caller keeps when the
    rule gives none (``reg`` itself for a callee-saved register, None for the
    return address: undefined).
    """
    if op == OP_LOAD:
        return SavedAt(arg)
    if op == OP_VALUE:
        return CfaPlus(arg)
    if op == OP_SAME:
        return SameAs(reg)
    if op == OP_COPY and arg in KNOWN_REGISTERS:
        return SameAs(arg)
    if op == OP_GENERAL:
        return Recovered(row, reg, otherwise)
    assert op in (OP_UNDEF, OP_COPY)
    return Undefined() if otherwise is None else SameAs(otherwise)


def _native_error(plan):
    """Why generated code cannot run ``plan`` (None: it can)."""
    fm = plan.frame_map
    if len(plan.values) > STATE_SLOTS - 1:
        return f"{len(plan.values)} live values (at most {STATE_SLOTS - 1})"
    for slot, source in zip(fm.values, plan.values):
        if isinstance(source, Unavailable):
            return unavailable_message(slot.name, source.register)
        if isinstance(source, InMemory) and source.size_bytes < 1:
            return f"value {slot.name!r} has size {source.size_bytes}"
    if plan.cfa is None:
        return f"no unwind row at {fm.return_address - 1:#x}"
    if isinstance(plan.cfa, CfaFromExpression):
        return "the CFA is a DWARF expression"
    if plan.cfa.register not in KNOWN_REGISTERS - {RA}:
        return f"the CFA is based on DWARF register {plan.cfa.register}"
    if plan.return_address != RA_AT_CFA_MINUS_8:
        return f"the return address is not saved at CFA - 8 ({plan.return_address})"
    for reg, source in plan.caller:
        if isinstance(source, Recovered):
            return f"DWARF register {reg} is recovered by an expression"
    return None


def permutation(frame_map, live_names):
    """Indices into ``frame_map.values`` for ``live_names`` (a new site's state
    order): ``state[1 + i] = value[perm[i]]``. None if a name is missing (the
    frame cannot continue at that site)."""
    index = {v.name: i for i, v in enumerate(frame_map.values)}
    try:
        return tuple(index[n] for n in live_names)
    except KeyError:
        return None


def unavailable_message(name, register):
    """Why a value in ``register`` cannot be read (both transfers say it)."""
    return (f"value {name!r} lives in DWARF register {register}, "
            "which is not known at the return address")
