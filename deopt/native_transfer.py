"""The native deopt transfer: frame maps compiled to code, a per-thread LIFO of hijacks.

The Python transfer (:func:`deopt.transfer.return_through_stub`) finds a
hijack record by slot in a dict, reads the old frame's live values through its
frame map, unwinds the frame once with its CFI and returns a plan. This module
does the same with no Python on the path, in three pieces:

**Per-thread LIFO** (:class:`ThreadBlock`, owned by :class:`ThreadLifo`). At
hijack time (world stopped) every hijacked slot of a thread gets an
:class:`LifoEntry` ``(slot, original return address, descriptor, status)``.
Entries are kept sorted by slot address, highest first, so the *innermost*
pending frame — the one whose callee returns next — is on top: a stack has
one return order, and every pending slot is still on it. The dispatcher
(:data:`DISPATCH_SYMBOL`) takes ``entries[top − 1]`` when its slot is the
stub's ``E − 8`` (the common case), else searches the thread's entries from
the top down (counted in :attr:`ThreadBlock.searches`), and when the slot is
not there returns NULL: the caller then runs the Python transfer (counted in
:attr:`ThreadBlock.misses`).

**Per-version code** (:func:`version_transfer_ir`). One LLVM function per old
version, ``void f(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr
state)``, with one switch case per frame map (per return address) compiled
from :func:`compile_frame_map`: the live values read from the saved
registers, ``[reg + offset]`` stack slots or constants; the old frame's CFA
from its CFI row at ``return address − 1``; the caller's callee-saved
registers from where that row says they are saved (or the frame's own values
when it does not save them). A row that cannot be expressed that way (a DWARF
expression, a return address not at ``CFA − 8``, a value in a caller-saved
register) gets no case: frames at it are never pushed, so they take the
Python transfer (which then gives the same answer or the same error).

**Targets** (:class:`Target`). Where a frame continues is the function's
*current* version at transfer time: each :class:`Descriptor` (one per old
frame map) points at an immutable target ``(resume entry, site id, count,
permutation)`` — ``state[1 + i] = old_values[perm[i]]`` — that the runtime
replaces (one aligned 8-byte store) when it publishes a new version. A NULL
target hands the frame to the Python transfer (which lets it fail the usual
way: it returns into its old code).

Formulas (``E`` = the RSP the stub was entered with; registers as the stub
saved them in :class:`~deopt.stub.ExitState`)::

    entry      = LIFO entry with slot == E − 8 and status PENDING
    *(E − 8)   = entry.original_ra                          (slot restored first)
    values[j]  = frame map location j with RSP = E
    cfa        = regs[row.cfa_register] + row.cfa_offset
    caller.r   = *(cfa + n) | cfa + n | regs[r']            (the row's rule for r)
    state      = [RAX] + [values[perm[i]] for i < count]    (8-byte slots)
    plan       = rsp: cfa − 8, rip: resume entry, rdi: site id, rsi: state,
                 rax: 0, xmm0: 0, callee-saved: caller's, status_ptr: thread status
    entry.status = TAKEN                                    (last store; see below)

Accounting: the dispatcher never calls Python and never allocates. Python
learns which entries were taken by reading their statuses
(:meth:`ThreadLifo.drain`, safe at any time; entries are rewritten only while
the world is stopped, :meth:`ThreadLifo.commit`). The ``TAKEN`` / ``HANDED``
status is the dispatcher's last access to per-version memory (descriptor,
target, per-version code), so once Python has seen every entry of a version
leave ``PENDING`` nothing can run that version's transfer code any more.

Lifetimes: a :class:`ThreadLifo` (block, entry array, plan and state buffer)
lives until its thread has detached and no entry is pending; its state buffer
may be read by a resume entry after the transfer, so it is never moved or
freed while its thread can run JIT code. An entry array is replaced only while
the world is stopped (no thread is in a transfer). Descriptors and targets
live as long as their old version's transfer code, i.e. until the version is
freed.
"""
from __future__ import annotations

import array
import ctypes
import itertools
import operator
from dataclasses import dataclass

from unwinder.compiled import (OP_COPY, OP_GENERAL, OP_LOAD, OP_SAME, OP_UNDEF, OP_VALUE)
from unwinder.x86_64 import CALLEE_SAVED, R12, R13, R14, R15, RA, RBP, RBX, RSP

from .errors import DeoptError
from .stackmaps import LocationKind
from .stub import EXIT_STATE_TO_ENTRY_RSP, ExitState, TransferPlan

__all__ = [
    "DISPATCH_SYMBOL", "STATE_SLOTS", "PENDING", "TAKEN", "HANDED",
    "LifoEntry", "Descriptor", "ThreadBlock", "Target", "NativeFramePlan", "Unsupported",
    "compile_frame_map", "version_transfer_ir", "dispatch_module_ir", "permutation",
    "ThreadLifo", "NativeTransferError",
]

_MASK64 = (1 << 64) - 1

#: Symbol of the native dispatcher: ``ptr dispatch(ptr exit, ptr block, ptr status)``.
#: ``exit``: the stub's :class:`~deopt.stub.ExitState`; ``block``: the calling
#: thread's :class:`ThreadBlock` or NULL; ``status``: the thread's status word
#: (stored into ``plan.status_ptr``). Returns the plan in ``block``, or NULL
#: when the Python transfer must run (the stack and the slot are untouched
#: then; the entry, if there was one, is marked HANDED).
DISPATCH_SYMBOL = "osrjit_ntx_dispatch"

#: 8-byte slots of a thread's state buffer: ``state[0]`` is the call result,
#: so a frame map with up to ``STATE_SLOTS − 1`` live values can be transferred.
STATE_SLOTS = 256

#: :attr:`LifoEntry.status` values. Only the dispatcher moves an entry out of
#: PENDING, and only on the entry's own thread.
PENDING = 0
#: Transferred natively: the record must be dropped by Python (drain).
TAKEN = 1
#: Handed to the Python transfer (no native target): Python takes the record itself.
HANDED = 2


class NativeTransferError(DeoptError):
    """Native transfer code could not be generated for a version (its frames
    then take the Python transfer; see ``NativeTransferPath.build_errors``)."""


class LifoEntry(ctypes.Structure):
    """One hijacked slot of a thread (32 bytes). ``slot`` / ``original_ra``:
    absolute addresses; ``descriptor``: address of its frame map's :class:`Descriptor`."""
    _fields_ = [("slot", ctypes.c_uint64),
                ("original_ra", ctypes.c_uint64),
                ("descriptor", ctypes.c_uint64),
                ("status", ctypes.c_int64)]


class Descriptor(ctypes.Structure):
    """One old frame map as the dispatcher sees it (32 bytes).

    ``code``: the version's transfer function; ``index``: the frame map's case
    in its switch; ``target``: address of the current :class:`Target` (NULL:
    hand the frame to Python); ``version``: the old version's id (debugging).
    """
    _fields_ = [("code", ctypes.c_uint64),
                ("index", ctypes.c_int64),
                ("target", ctypes.c_uint64),
                ("version", ctypes.c_int64)]


class ThreadBlock(ctypes.Structure):
    """A thread's LIFO header, transfer plan and state buffer.

    ``top``: entries ``[0, top)`` may be PENDING, ``entries[top − 1]`` is the
    innermost; ``entries``: address of the :class:`LifoEntry` array;
    ``capacity``: its length (Python only). Counters, written by the owner
    thread only: ``searches`` (records found below the top), ``misses``
    (slots not in the LIFO: Python transfer), ``handed`` (records without a
    native target: Python transfer). ``plan``/``state``: what the stub and the
    resume entry read (reused by the thread's next transfer).
    """
    _fields_ = [("top", ctypes.c_int64),
                ("entries", ctypes.c_uint64),
                ("capacity", ctypes.c_int64),
                ("searches", ctypes.c_int64),
                ("misses", ctypes.c_int64),
                ("handed", ctypes.c_int64),
                ("plan", TransferPlan),
                ("state", ctypes.c_uint64 * STATE_SLOTS)]


# The dispatcher's IR uses these offsets; checked at import.
assert ctypes.sizeof(LifoEntry) == 32 and LifoEntry.status.offset == 24
assert ctypes.sizeof(Descriptor) == 32 and Descriptor.target.offset == 16
assert [ThreadBlock.entries.offset, ThreadBlock.searches.offset, ThreadBlock.misses.offset,
        ThreadBlock.handed.offset, ThreadBlock.plan.offset, ThreadBlock.state.offset] == \
    [8, 24, 32, 40, 48, 160]


def _target_type(count):
    class _Target(ctypes.Structure):
        _fields_ = [("resume_entry", ctypes.c_uint64), ("site_id", ctypes.c_uint64),
                    ("count", ctypes.c_int64), ("perm", ctypes.c_int64 * max(1, count))]
    return _Target


_TARGET_TYPES = {}


class Target:
    """An immutable resume target of one old frame map (native memory it owns).

    ``resume_entry``: absolute address of the new version's resume entry;
    ``site_id``; ``perm``: for each live value of the new site, in state
    order, the index of the old frame map's value that provides it. ``owner``:
    the new version (kept for the runtime's bookkeeping). ``address`` is what
    :attr:`Descriptor.target` holds; the memory lives as long as this object.
    """

    def __init__(self, resume_entry, site_id, perm, owner=None):
        cls = _TARGET_TYPES.get(len(perm))
        if cls is None:
            cls = _TARGET_TYPES[len(perm)] = _target_type(len(perm))
        self._struct = cls(resume_entry, site_id & _MASK64, len(perm))
        for i, p in enumerate(perm):
            self._struct.perm[i] = p
        self.resume_entry = resume_entry
        self.site_id = site_id
        self.perm = tuple(perm)
        self.owner = owner
        self.address = ctypes.addressof(self._struct)


def permutation(frame_map, live_names):
    """Indices into ``frame_map.values`` for ``live_names`` (the new site's order).

    None if a name is missing (the Python transfer then reports it).
    """
    index = {v.name: i for i, v in enumerate(frame_map.values)}
    try:
        return tuple(index[n] for n in live_names)
    except KeyError:
        return None


# --------------------------------------------------------------------------
# Frame maps compiled for native code
# --------------------------------------------------------------------------

#: Registers a suspended frame has at its return address, as the stub sees them:
#: RSP = E, the callee-saved registers, and the original return address.
_KNOWN = frozenset((RSP, RA) + CALLEE_SAVED)


@dataclass(frozen=True)
class Unsupported:
    """Why a frame map has no native case (its frames take the Python transfer)."""
    reason: str


@dataclass(frozen=True)
class NativeFramePlan:
    """A frame map and its CFI row reduced to what the generated code does.

    ``values``: per live value, one of ``("const", v)``, ``("reg", r)``,
    ``("addr", r, offset)`` (DIRECT: ``r + offset``), ``("load", r, offset,
    size)`` (INDIRECT: ``size`` bytes at ``[r + offset]``, zero-extended; the
    low 8 bytes when larger). ``cfa``: ``(register, offset)``. ``caller``: per
    callee-saved register (DWARF number), ``("load", n)`` (``*(cfa + n)``),
    ``("cfa", n)`` (``cfa + n``), ``("own", r)`` (the frame's value of
    ``r``, which may be RSP or RA). Registers are DWARF numbers from
    :data:`_KNOWN`; offsets in bytes.
    """
    frame_map: object
    values: tuple
    cfa: tuple
    caller: tuple


def compile_frame_map(frame_map, space):
    """A :class:`NativeFramePlan` for ``frame_map``, or :class:`Unsupported`.

    ``space``: the :class:`unwinder.AddressSpace` holding the version's CFI
    (the row in force at ``return_address − 1``, exactly as the Python
    transfer's :func:`unwinder.step` finds it). Mirrors
    :func:`deopt.transfer.plan_transfer`: whatever it would refuse is
    Unsupported here.
    """
    if len(frame_map.values) > STATE_SLOTS - 1:
        return Unsupported(f"{len(frame_map.values)} live values (at most {STATE_SLOTS - 1})")
    values = []
    for slot in frame_map.values:
        loc = slot.location
        if loc.kind in (LocationKind.CONSTANT, LocationKind.CONSTANT_INDEX):
            values.append(("const", loc.value & _MASK64))
            continue
        if loc.dwarf_reg not in _KNOWN:
            return Unsupported(f"value {slot.name!r} lives in DWARF register {loc.dwarf_reg}, "
                               "which is not known at the return address")
        if loc.kind is LocationKind.REGISTER:
            values.append(("reg", loc.dwarf_reg))
        elif loc.kind is LocationKind.DIRECT:
            values.append(("addr", loc.dwarf_reg, loc.offset))
        elif loc.kind is LocationKind.INDIRECT:
            if loc.size < 1:
                return Unsupported(f"value {slot.name!r} has size {loc.size}")
            values.append(("load", loc.dwarf_reg, loc.offset, min(loc.size, 8)))
        else:  # pragma: no cover - the parser admits only the five kinds
            return Unsupported(f"unknown location kind {loc.kind!r}")
    entry = space.unwind_entry(frame_map.return_address - 1)
    if entry is None:
        return Unsupported(f"no unwind row at {frame_map.return_address - 1:#x}")
    plan = entry[0]
    if plan.cfa_register is None:
        return Unsupported("the CFA is a DWARF expression")
    if plan.cfa_register not in _KNOWN - {RA}:
        return Unsupported(f"the CFA is based on DWARF register {plan.cfa_register}")
    ops = {reg: (op, arg) for reg, op, arg in plan.ops}
    if ops.get(RA) != (OP_LOAD, -8):
        return Unsupported(f"the return address is not saved at CFA - 8 ({ops.get(RA)})")
    caller = []
    for reg in CALLEE_SAVED:
        op, arg = ops[reg]
        if op == OP_LOAD:
            caller.append((reg, ("load", arg)))
        elif op == OP_VALUE:
            caller.append((reg, ("cfa", arg)))
        elif op in (OP_SAME, OP_UNDEF):
            # Not saved by the frame: the caller's value is the frame's own
            # (an undefined rule keeps it too, as the Python transfer does).
            caller.append((reg, ("own", reg)))
        elif op == OP_COPY:
            caller.append((reg, ("own", arg if arg in _KNOWN else reg)))
        else:
            assert op == OP_GENERAL
            return Unsupported(f"DWARF register {reg} is recovered by an expression")
    return NativeFramePlan(frame_map, tuple(values), (plan.cfa_register, plan.cfa_offset),
                           tuple(caller))


# --------------------------------------------------------------------------
# IR
# --------------------------------------------------------------------------

_EXIT_OFFSET = {RBX: ExitState.rbx.offset, RBP: ExitState.rbp.offset,
                R12: ExitState.r12.offset, R13: ExitState.r13.offset,
                R14: ExitState.r14.offset, R15: ExitState.r15.offset}
_PLAN_OFFSET = {RBX: TransferPlan.rbx.offset, RBP: TransferPlan.rbp.offset,
                R12: TransferPlan.r12.offset, R13: TransferPlan.r13.offset,
                R14: TransferPlan.r14.offset, R15: TransferPlan.r15.offset}
_REG_NAME = {RSP: "%rsp", RA: "%ra", RBX: "%rbx", RBP: "%rbp", R12: "%r12", R13: "%r13",
             R14: "%r14", R15: "%r15"}


def _i64(value):
    """An LLVM ``i64`` literal for an unsigned 64-bit bit pattern."""
    value &= _MASK64
    return str(value - (1 << 64) if value >= 1 << 63 else value)


def _case_ir(k, fp, out):
    """Append the IR of switch case ``k`` (frame plan ``fp``) to ``out``."""
    p = f"%c{k}."
    out.append(f"fm{k}:")
    for j, v in enumerate(fp.values):
        name = f"{p}v{j}"
        if v[0] == "const":
            out.append(f"  {name} = add i64 0, {_i64(v[1])}")
        elif v[0] == "reg":
            out.append(f"  {name} = add i64 {_REG_NAME[v[1]]}, 0")
        elif v[0] == "addr":
            out.append(f"  {name} = add i64 {_REG_NAME[v[1]]}, {v[2]}")
        else:
            _, reg, offset, size = v
            bits = 8 * size
            out.append(f"  {name}.a = add i64 {_REG_NAME[reg]}, {offset}")
            out.append(f"  {name}.p = inttoptr i64 {name}.a to ptr")
            if bits == 64:
                out.append(f"  {name} = load i64, ptr {name}.p, align 1")
            else:
                out.append(f"  {name}.n = load i{bits}, ptr {name}.p, align 1")
                out.append(f"  {name} = zext i{bits} {name}.n to i64")
        out.append(f"  {name}.s = getelementptr inbounds i64, ptr %vals, i64 {j}")
        out.append(f"  store i64 {name}, ptr {name}.s, align 8")
    reg, offset = fp.cfa
    out.append(f"  {p}cfa = add i64 {_REG_NAME[reg]}, {offset}")
    out.append(f"  {p}rsp = sub i64 {p}cfa, 8")
    out.append(f"  store i64 {p}rsp, ptr %plan, align 8")
    for reg, rule in fp.caller:
        r = f"{p}r{reg}"
        if rule[0] == "load":
            out.append(f"  {r}.a = add i64 {p}cfa, {rule[1]}")
            out.append(f"  {r}.p = inttoptr i64 {r}.a to ptr")
            out.append(f"  {r} = load i64, ptr {r}.p, align 8")
        elif rule[0] == "cfa":
            out.append(f"  {r} = add i64 {p}cfa, {rule[1]}")
        else:
            out.append(f"  {r} = add i64 {_REG_NAME[rule[1]]}, 0")
        out.append(f"  {r}.d = getelementptr inbounds i8, ptr %plan, i64 {_PLAN_OFFSET[reg]}")
        out.append(f"  store i64 {r}, ptr {r}.d, align 8")
    out.append("  br label %tail")


def version_transfer_ir(symbol, plans):
    """Textual IR of the transfer function of one version's frame maps:
    ``void @<symbol>(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr state)``.

    ``plans``: the :class:`NativeFramePlan` of each case, by index (None: no
    case; the dispatcher never calls with such an index because no entry is
    pushed for it). ``ra`` is the frame's original return address (for rules
    and locations based on DWARF register 16). Any other index traps.
    """
    nvals = max([len(fp.values) for fp in plans if fp is not None] + [1])
    out = [f"define void @{symbol}(ptr %exit, i64 %index, i64 %ra, ptr %target, ptr %plan, "
           "ptr %state) nounwind {",
           "entry:",
           f"  %vals = alloca [{nvals} x i64], align 8",
           "  %exit.i = ptrtoint ptr %exit to i64",
           f"  %rsp = add i64 %exit.i, {EXIT_STATE_TO_ENTRY_RSP}"]
    for reg, offset in _EXIT_OFFSET.items():
        name = _REG_NAME[reg]
        out.append(f"  {name}.p = getelementptr inbounds i8, ptr %exit, i64 {offset}")
        out.append(f"  {name} = load i64, ptr {name}.p, align 8")
    cases = " ".join(f"i64 {k}, label %fm{k}" for k, fp in enumerate(plans) if fp is not None)
    out.append(f"  switch i64 %index, label %bad [ {cases} ]")
    for k, fp in enumerate(plans):
        if fp is not None:
            _case_ir(k, fp, out)
    rax, resume, site = ExitState.rax.offset, TransferPlan.rip.offset, TransferPlan.rdi.offset
    out.extend([
        "tail:",
        f"  %rax.p = getelementptr inbounds i8, ptr %exit, i64 {rax}",
        "  %rax = load i64, ptr %rax.p, align 8",
        "  store i64 %rax, ptr %state, align 8",
        "  %count.p = getelementptr inbounds i8, ptr %target, i64 16",
        "  %count = load i64, ptr %count.p, align 8",
        "  %perm = getelementptr inbounds i8, ptr %target, i64 24",
        "  %any = icmp sgt i64 %count, 0",
        "  br i1 %any, label %copy, label %fill",
        "copy:",
        "  %i = phi i64 [ 0, %tail ], [ %i.next, %copy ]",
        "  %pi.p = getelementptr inbounds i64, ptr %perm, i64 %i",
        "  %pi = load i64, ptr %pi.p, align 8",
        "  %val.p = getelementptr inbounds i64, ptr %vals, i64 %pi",
        "  %val = load i64, ptr %val.p, align 8",
        "  %i.next = add nuw i64 %i, 1",
        "  %dst = getelementptr inbounds i64, ptr %state, i64 %i.next",
        "  store i64 %val, ptr %dst, align 8",
        "  %more = icmp slt i64 %i.next, %count",
        "  br i1 %more, label %copy, label %fill",
        "fill:",
        "  %resume = load i64, ptr %target, align 8",
        f"  %rip.p = getelementptr inbounds i8, ptr %plan, i64 {resume}",
        "  store i64 %resume, ptr %rip.p, align 8",
        "  %site.p = getelementptr inbounds i8, ptr %target, i64 8",
        "  %site = load i64, ptr %site.p, align 8",
        f"  %rdi.p = getelementptr inbounds i8, ptr %plan, i64 {site}",
        "  store i64 %site, ptr %rdi.p, align 8",
        "  %state.i = ptrtoint ptr %state to i64",
        f"  %rsi.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.rsi.offset}",
        "  store i64 %state.i, ptr %rsi.p, align 8",
        f"  %prax.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.rax.offset}",
        "  store i64 0, ptr %prax.p, align 8",
        f"  %x0.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.xmm0.offset}",
        "  store i64 0, ptr %x0.p, align 8",
        f"  %x1.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.xmm0.offset + 8}",
        "  store i64 0, ptr %x1.p, align 8",
        "  ret void",
        "bad:",
        "  call void @llvm.trap()",
        "  unreachable",
        "}",
        "declare void @llvm.trap() cold noreturn nounwind",
    ])
    return "\n".join(out) + "\n"


_DISPATCH_IR = """
define ptr @{sym}(ptr %exit, ptr %block, ptr %status) nounwind {{
entry:
  %noblock = icmp eq ptr %block, null
  br i1 %noblock, label %none, label %look
none:
  ret ptr null
look:
  %slotp = getelementptr inbounds i8, ptr %exit, i64 {slot_off}
  %slot = ptrtoint ptr %slotp to i64
  %top = load i64, ptr %block, align 8
  %entries.p = getelementptr inbounds i8, ptr %block, i64 8
  %entries = load ptr, ptr %entries.p, align 8
  %empty = icmp eq i64 %top, 0
  br i1 %empty, label %miss, label %checktop
checktop:
  %ti = sub i64 %top, 1
  %te.o = mul i64 %ti, 32
  %te = getelementptr inbounds i8, ptr %entries, i64 %te.o
  %te.slot = load i64, ptr %te, align 8
  %te.st.p = getelementptr inbounds i8, ptr %te, i64 24
  %te.st = load i64, ptr %te.st.p, align 8
  %te.m1 = icmp eq i64 %te.slot, %slot
  %te.m2 = icmp eq i64 %te.st, 0
  %te.m = and i1 %te.m1, %te.m2
  br i1 %te.m, label %found, label %search
search:
  %i = phi i64 [ %ti, %checktop ], [ %in, %next ]
  %more = icmp sgt i64 %i, 0
  br i1 %more, label %probe, label %miss
probe:
  %in = sub i64 %i, 1
  %e.o = mul i64 %in, 32
  %e = getelementptr inbounds i8, ptr %entries, i64 %e.o
  %e.slot = load i64, ptr %e, align 8
  %e.st.p = getelementptr inbounds i8, ptr %e, i64 24
  %e.st = load i64, ptr %e.st.p, align 8
  %e.m1 = icmp eq i64 %e.slot, %slot
  %e.m2 = icmp eq i64 %e.st, 0
  %e.m = and i1 %e.m1, %e.m2
  br i1 %e.m, label %searched, label %next
next:
  br label %search
searched:
  %sc.p = getelementptr inbounds i8, ptr %block, i64 24
  %sc = load i64, ptr %sc.p, align 8
  %sc1 = add i64 %sc, 1
  store i64 %sc1, ptr %sc.p, align 8
  br label %found
found:
  %fe = phi ptr [ %te, %checktop ], [ %e, %searched ]
  %fe.st = getelementptr inbounds i8, ptr %fe, i64 24
  %desc.p = getelementptr inbounds i8, ptr %fe, i64 16
  %desc = load ptr, ptr %desc.p, align 8
  %target.p = getelementptr inbounds i8, ptr %desc, i64 16
  %target = load atomic ptr, ptr %target.p acquire, align 8
  %notarget = icmp eq ptr %target, null
  br i1 %notarget, label %hand, label %go
hand:
  store atomic i64 {handed}, ptr %fe.st release, align 8
  %hc.p = getelementptr inbounds i8, ptr %block, i64 40
  %hc = load i64, ptr %hc.p, align 8
  %hc1 = add i64 %hc, 1
  store i64 %hc1, ptr %hc.p, align 8
  br label %pop
go:
  %ra.p = getelementptr inbounds i8, ptr %fe, i64 8
  %ra = load i64, ptr %ra.p, align 8
  store i64 %ra, ptr %slotp, align 8
  %code = load ptr, ptr %desc, align 8
  %index.p = getelementptr inbounds i8, ptr %desc, i64 8
  %index = load i64, ptr %index.p, align 8
  %plan = getelementptr inbounds i8, ptr %block, i64 {plan_off}
  %state = getelementptr inbounds i8, ptr %block, i64 {state_off}
  call void %code(ptr %exit, i64 %index, i64 %ra, ptr %target, ptr %plan, ptr %state)
  %status.i = ptrtoint ptr %status to i64
  %sp.p = getelementptr inbounds i8, ptr %plan, i64 {status_off}
  store i64 %status.i, ptr %sp.p, align 8
  ; The last access to per-version memory was above: from here on Python
  ; may free the old version's transfer code.
  store atomic i64 {taken}, ptr %fe.st release, align 8
  br label %pop
pop:
  %result = phi ptr [ %plan, %go ], [ null, %hand ]
  br label %poploop
poploop:
  %t = phi i64 [ %top, %pop ], [ %tn, %popcheck ]
  %nonempty = icmp sgt i64 %t, 0
  br i1 %nonempty, label %popcheck, label %popdone
popcheck:
  %tn = sub i64 %t, 1
  %pe.o = mul i64 %tn, 32
  %pe.st.o = add i64 %pe.o, 24
  %pe.st.p = getelementptr inbounds i8, ptr %entries, i64 %pe.st.o
  %pe.st = load i64, ptr %pe.st.p, align 8
  %gone = icmp ne i64 %pe.st, 0
  br i1 %gone, label %poploop, label %popdone
popdone:
  store i64 %t, ptr %block, align 8
  ret ptr %result
miss:
  %mc.p = getelementptr inbounds i8, ptr %block, i64 32
  %mc = load i64, ptr %mc.p, align 8
  %mc1 = add i64 %mc, 1
  store i64 %mc1, ptr %mc.p, align 8
  ret ptr null
}}
"""


def dispatch_module_ir(triple):
    """Textual IR of a module holding only the dispatcher (:data:`DISPATCH_SYMBOL`)."""
    body = _DISPATCH_IR.format(
        sym=DISPATCH_SYMBOL, slot_off=ExitState.slot.offset, plan_off=ThreadBlock.plan.offset,
        state_off=ThreadBlock.state.offset, status_off=TransferPlan.status_ptr.offset,
        taken=TAKEN, handed=HANDED)
    return f'target triple = "{triple}"\n' + body


# --------------------------------------------------------------------------
# One thread's LIFO, Python side
# --------------------------------------------------------------------------

class ThreadLifo:
    """Owns one thread's :class:`ThreadBlock` and entry array.

    ``token``: the runtime's handle of the thread (opaque here; kept alive with
    this object). The native array is the only record of the entries: its
    first :attr:`size` :class:`LifoEntry` were written by the last
    :meth:`commit`; :meth:`drain` reports, by slot, those the dispatcher has
    moved out of PENDING since; :meth:`commit` (world stopped only) rewrites
    the array from the still-pending entries and the ones queued since
    (:meth:`push` one by one, :meth:`push_entries` as ready-made native
    records).
    """

    def __init__(self, token=None):
        self.token = token
        self.block = ThreadBlock()
        self.address = ctypes.addressof(self.block)
        self._array = None
        #: Entries written by the last commit.
        self.size = 0
        self._seen = bytearray()   # 1: status already reported by drain()
        self._new = []             # (slot, original_ra, descriptor) pushed one by one
        self._raw_new = []         # LifoEntry bytes, highest slot first, per push_entries()
        self._pending = 0          # entries reserve()d above size, not settled yet

    def __len__(self):
        """Entries written that drain() has not yet seen leave PENDING, plus
        pushes and reserved entries."""
        return (self._seen.count(0) + len(self._new) + self._pending
                + sum(len(r) for r in self._raw_new) // _ENTRY_SIZE)

    def push(self, record, descriptor_address):
        """Queue ``record`` (``slot``, ``original_ra``) for the next :meth:`commit`."""
        self._new.append((record.slot, record.original_ra, descriptor_address))

    def push_entries(self, raw):
        """Queue ready-made :class:`LifoEntry` records (``bytes``, PENDING,
        highest slot first) for the next :meth:`commit`."""
        if len(raw) % _ENTRY_SIZE:
            raise NativeTransferError(f"{len(raw)} bytes are not whole LIFO entries")
        if raw:
            self._raw_new.append(bytes(raw))

    def _raw(self):
        return ctypes.string_at(ctypes.addressof(self._array), self.size * _ENTRY_SIZE)

    def append(self, fill, n, highest_slot):
        """Write up to ``n`` new entries straight into the native array, world stopped.

        ``fill(address) -> written`` writes that many :class:`LifoEntry`
        records (PENDING, highest slot first, every slot at most
        ``highest_slot``, absolute) at ``address``. They go on top of the
        entries written before when every entry drain() has not yet seen
        leave PENDING lies above ``highest_slot`` (the new frames are
        deeper), or at the bottom when there is none; nothing needs sorting
        then, nor a copy. Returns ``written``, or None when that does not
        hold or pushes are queued: then use :meth:`push_entries` and
        :meth:`commit`. Entries written here need no :meth:`commit`.
        """
        room = self.reserve(n, highest_slot)
        if room is None:
            return None
        written = fill(room[0])
        self._pending = written
        self.settle()
        self.block.top = self.size
        return written

    def reserve(self, n, highest_slot):
        """Room for ``n`` new entries on top, for another thread of control to
        write later (world stopped): the conditions of :meth:`append`, else
        None (see :meth:`append`).
        Until :meth:`settle` the array holds only the entries below them (a
        drain does not look at the room) and ``block.top`` is theirs. Returns
        ``(address, top)``: ``top`` is what ``block.top`` becomes once they
        are written."""
        if self._new or self._raw_new or self._pending:
            return None
        seen = self._seen
        live = seen.rfind(0) if self.size else -1
        if live >= 0:
            top_slot = int.from_bytes(ctypes.string_at(
                ctypes.addressof(self._array) + live * _ENTRY_SIZE, 8), "little")
            if top_slot <= highest_slot:
                return None
            base = self.size          # after every entry drain() has not reported yet
        else:
            base = 0                  # drain() reported every entry: start afresh
            self.size = 0
            self._seen = bytearray()
        self._reserve(base + n)
        self.block.top = base
        self._pending = n
        return ctypes.addressof(self._array) + base * _ENTRY_SIZE, base + n

    def unreserve(self):
        """Give back the room :meth:`reserve` made (nothing was written there)."""
        self._pending = 0

    def settle(self):
        """The :meth:`reserve` d entries were written (and ``block.top`` set):
        from now on they are entries like the others."""
        n, self._pending = self._pending, 0
        self.size += n
        self._seen.extend(bytes(n))

    def _reserve(self, n):
        """Make the array hold at least ``n`` entries, keeping the first :attr:`size`."""
        if self._array is not None and len(self._array) >= n:
            return
        array_ = (LifoEntry * max(16, 2 * n))()
        if self.size:
            _memmove(array_, self._array, self.size * _ENTRY_SIZE)
        self._array = array_
        self.block.entries = ctypes.addressof(array_)
        self.block.capacity = len(array_)

    def drain(self):
        """``(taken, handed)``: slots whose entries left PENDING since the last drain.

        ``taken``: transferred natively (the caller drops them from its hijack
        table); ``handed``: given to the Python transfer (which took them).
        Safe while threads run: only statuses are read.
        """
        n = self.size
        seen = self._seen
        if n == 0 or seen.count(0) == 0:
            return [], []
        raw = self._raw()
        marks = raw[24::_ENTRY_SIZE]              # low byte of each status
        moved = marks.translate(_MOVED)           # 1: not PENDING
        if moved == seen:
            return [], []
        words = memoryview(raw).cast("Q")
        taken, handed = [], []
        for i in itertools.compress(range(n), map(operator.ne, moved, seen)):
            seen[i] = 1
            (taken if marks[i] == TAKEN else handed).append(words[4 * i])
        return taken, handed

    def entries(self):
        """``[(slot, original_ra, descriptor)]`` of the entries written and
        not yet seen leave PENDING, in native order (tests, debugging)."""
        if not self.size:
            return []
        words = memoryview(self._raw()).cast("Q")
        return [(words[4 * i], words[4 * i + 1], words[4 * i + 2])
                for i in range(self.size) if not self._seen[i]]

    def commit(self, reorder=None, drain=True):
        """Rewrite the native LIFO: pending entries plus new pushes, innermost on top.

        World stopped only (no thread may be in a transfer). Drains first and
        returns that drain's ``(taken, handed)`` (see :meth:`drain`): the
        caller must account for them like for any drain. With nothing queued
        the array is left as it is.
        ``reorder(list) -> list`` (tests) may permute or drop entries of the
        sorted list ``[(slot, original_ra, descriptor)]``; a dropped entry is
        no longer native: its transfer falls back to Python.
        ``drain=False``: the caller drained while the world was already
        stopped (no entry can have moved since): with nothing queued the
        statuses are not read again and ``([], [])`` is returned (an array
        that is rewritten is always drained first).
        """
        queued = self._new or self._raw_new or reorder is not None
        if not queued and not drain:
            return [], []
        drained = self.drain()
        if self._pending:
            # Room reserved for entries another thread of control writes:
            # nothing is merged meanwhile (pushes never meet a reservation).
            if self._new or self._raw_new:
                raise NativeTransferError("entries pushed to a LIFO with reserved room")
            return drained
        if not queued:
            return drained
        pieces = []
        if self.size and self._seen.count(0):
            raw = self._raw()
            if self._seen.count(1) == 0:
                pieces.append(raw)
            else:
                pieces.append(b"".join(raw[i * _ENTRY_SIZE:(i + 1) * _ENTRY_SIZE]
                                       for i in range(self.size) if not self._seen[i]))
        pieces += self._raw_new
        self._raw_new = []
        new, self._new = self._new, []
        # Highest slot first: the innermost frame (lowest slot) returns first.
        # Every piece is sorted; joined they are when each one starts below
        # where the previous one ended.
        ordered = not new and reorder is None and all(
            _first_slot(b) < _last_slot(a) for a, b in zip(pieces, pieces[1:]))
        if ordered:
            data = b"".join(pieces)
        else:
            keep = new
            for piece in pieces:
                w = memoryview(piece).cast("Q")
                keep += zip(w[0::4], w[1::4], w[2::4])
            keep.sort(key=lambda e: e[0], reverse=True)
            if reorder is not None:
                keep = list(reorder(keep))
            words = array.array("Q")
            for slot, ra, desc in keep:
                words.extend((slot, ra, desc, PENDING))
            data = words.tobytes()
        n = len(data) // _ENTRY_SIZE
        block = self.block
        if self._array is None or len(self._array) < n:
            self.size = 0             # the old entries are all in data
            self._reserve(n)
        if n:
            _memmove(self._array, data, len(data))
        block.top = n
        self.size = n
        self._seen = bytearray(n)
        return drained

    @property
    def pending(self):
        """Whether an entry may still be PENDING (or a push is waiting for commit)."""
        return len(self) > 0


_ENTRY_SIZE = ctypes.sizeof(LifoEntry)
#: memmove keeping the GIL (``ctypes.memmove`` gives it away, and a commit
#: runs while the world is stopped: it must not wait for another thread).
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_size_t)(ctypes._memmove_addr)
#: bytes.translate table: status low byte -> 1 unless PENDING.
_MOVED = bytes(0 if b == PENDING else 1 for b in range(256))


def _first_slot(raw):
    return int.from_bytes(raw[:8], "little")


def _last_slot(raw):
    return int.from_bytes(raw[-_ENTRY_SIZE:-_ENTRY_SIZE + 8], "little")
