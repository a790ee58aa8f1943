"""The native deopt transfer: frame plans compiled to code, dispatched from a per-thread LIFO.

The Python transfer (:func:`deopt.transfer.return_through_stub`) finds a
hijack record by slot in a dict, interprets its frame's
:class:`~deopt.plan.FramePlan` and returns a plan for the stub. This module
does the same with no Python on the path, in three pieces:

**Dispatcher** (:data:`DISPATCH_SYMBOL`, hand-written in
``native_dispatch.ll``). It reads the calling thread's LIFO
(:mod:`deopt.native_lifo`): ``entries[top − 1]`` when its slot is the stub's
``E − 8`` (the common case), else the thread's entries from the top down
(counted in :attr:`ThreadBlock.searches`); when the slot is not there it
returns NULL and the caller runs the Python transfer (counted in
:attr:`ThreadBlock.misses`).

**Per-version code** (:func:`version_transfer_module`). One LLVM function per
old version, ``void f(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr
state)``, with one switch case per frame map (per return address), generated
with llvmlite's ``IRBuilder`` from the frame's :class:`~deopt.plan.FramePlan`
— the same plan the Python transfer interprets. A plan with a
:attr:`~deopt.plan.FramePlan.native_error` gets no case: frames at it are
never pushed, so they take the Python transfer (which then gives the same
answer or the same error).

**Targets** (:class:`Target`). Where a frame continues is the function's
*current* version at transfer time: each :class:`Descriptor` (one per old
frame map) points at an immutable target ``(resume entry, site id, count,
permutation)`` — ``state[1 + i] = old_values[perm[i]]`` — that the runtime
replaces (one aligned 8-byte store) when it publishes a new version. A NULL
target hands the frame to the Python transfer (which lets it fail the usual
way: it returns into its old code).

Formulas (``E`` = the RSP the stub was entered with; registers as the stub
saved them in :class:`~deopt.stub.ExitState`; sources as in :mod:`deopt.plan`)::

    entry      = LIFO entry with slot == E − 8 and status PENDING
    *(E − 8)   = entry.original_ra                          (slot restored first)
    values[j]  = plan.values[j] with RSP = E, RA = entry.original_ra
    cfa        = regs[plan.cfa.register] + plan.cfa.offset
    caller.r   = *(cfa + n) | cfa + n | regs[r']            (plan.caller)
    state      = [regs[plan.result]] + [values[perm[i]] for i < count]   (8-byte slots)
    plan       = rsp: cfa − 8, rip: resume entry, rdi: site id, rsi: state,
                 rax: 0, xmm0: 0, callee-saved: caller's, status_ptr: thread status
    entry.status = TAKEN                                    (last store; see below)

Accounting: the dispatcher never calls Python and never allocates. Python
learns which entries were taken by reading their statuses
(:meth:`ThreadLifo.drain`). The ``TAKEN`` / ``HANDED`` status is the
dispatcher's last access to per-version memory (descriptor, target,
per-version code), so once Python has seen every entry of a version leave
``PENDING`` nothing can run that version's transfer code any more.

Lifetimes: see :mod:`deopt.native_lifo` for a thread's block. Descriptors and
targets live as long as their old version's transfer code, i.e. until the
version is freed.
"""
from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
from llvmlite import ir

from unwinder import nativesrc
from unwinder.x86_64 import CALLEE_SAVED, RA, REGISTER_NAMES, RSP

from .native_lifo import (HANDED, PENDING, TAKEN, LifoEntry, NativeTransferError,
                          ThreadBlock, ThreadLifo)
from .plan import (STATE_SLOTS, Address, CfaPlus, Constant, InMemory, InRegister, SameAs,
                   SavedAt, permutation)
from .stub import EXIT_STATE_TO_ENTRY_RSP, ExitState, TransferPlan

__all__ = [
    "DISPATCH_SYMBOL", "STATE_SLOTS", "PENDING", "TAKEN", "HANDED",
    "LifoEntry", "Descriptor", "ThreadBlock", "TargetHeader", "Target", "permutation",
    "version_transfer_module", "version_transfer_ir", "dispatch_ir", "dispatch_module_ir",
    "ThreadLifo", "NativeTransferError", "NATIVE_SOURCES",
]

_MASK64 = (1 << 64) - 1

#: Symbol of the native dispatcher: ``ptr dispatch(ptr exit, ptr block, ptr status)``.
#: ``exit``: the stub's :class:`~deopt.stub.ExitState`; ``block``: the calling
#: thread's :class:`ThreadBlock` or NULL; ``status``: the thread's status word
#: (stored into ``plan.status_ptr``). Returns the plan in ``block``, or NULL
#: when the Python transfer must run (the stack and the slot are untouched
#: then; the entry, if there was one, is marked HANDED).
DISPATCH_SYMBOL = "osrjit_ntx_dispatch"


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


class TargetHeader(ctypes.Structure):
    """The fixed part of a :class:`Target` in memory; ``count`` ``i64``
    permutation entries follow it (``perm``, at ``sizeof(TargetHeader)``)."""
    _fields_ = [("resume_entry", ctypes.c_uint64),
                ("site_id", ctypes.c_uint64),
                ("count", ctypes.c_int64)]


def _target_type(count):
    class _Target(TargetHeader):
        _fields_ = [("perm", ctypes.c_int64 * max(1, count))]
    assert _Target.perm.offset == ctypes.sizeof(TargetHeader)
    return _Target


_TARGET_TYPES = {}


class Target:
    """An immutable resume target of one old frame map (native memory it owns).

    ``resume_entry``: absolute address of the new version's resume entry;
    ``site_id``; ``perm``: for each live value of the new site, in state
    order, the index of the old frame map's value that provides it
    (:func:`deopt.plan.permutation`). ``owner``: the new version (kept for
    the runtime's bookkeeping). ``address`` is what :attr:`Descriptor.target`
    holds; the memory lives as long as this object.
    """

    def __init__(self, resume_entry, site_id, perm, owner=None):
        cls = _TARGET_TYPES.get(len(perm))
        if cls is None:
            cls = _TARGET_TYPES[len(perm)] = _target_type(len(perm))
        self._struct = cls(resume_entry=resume_entry, site_id=site_id & _MASK64,
                           count=len(perm))
        for i, p in enumerate(perm):
            self._struct.perm[i] = p
        self.resume_entry = resume_entry
        self.site_id = site_id
        self.perm = tuple(perm)
        self.owner = owner
        self.address = ctypes.addressof(self._struct)


# --------------------------------------------------------------------------
# Per-version code, generated from frame plans
# --------------------------------------------------------------------------

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_PTR = ir.PointerType()
_VOID = ir.VoidType()


def _field_ptr(b, base, field, name):
    """``getelementptr inbounds i8, ptr base, i64 <field's byte offset>``
    (``field``: a ctypes field descriptor, e.g. ``ExitState.rbx``)."""
    if field.offset == 0:
        return base
    return b.gep(base, [_I64(field.offset)], inbounds=True, source_etype=_I8, name=name)


def _load_field(b, base, field, name):
    return b.load(_field_ptr(b, base, field, name + ".p"), name=name, typ=_I64, align=8)


def _store_field(b, value, base, field, name):
    b.store(value, _field_ptr(b, base, field, name + ".p"), align=8)


def _memory_ptr(b, address, name):
    return b.inttoptr(address, _PTR, name=name + ".p")


class _VersionCode:
    """One version's transfer function while it is being emitted: the entry
    block (the frame's registers, the value array), a block per case, the
    tail and the trap. Lives only during :func:`version_transfer_module`."""

    def __init__(self, module, symbol, nvals):
        fn = ir.Function(module, ir.FunctionType(_VOID, [_PTR, _I64, _I64, _PTR, _PTR, _PTR]),
                         symbol)
        fn.attributes.add("nounwind")
        for arg, name in zip(fn.args, ("exit", "index", "ra", "target", "plan", "state")):
            arg.name = name
        self.fn = fn
        self.exit, self.index, self.ra, self.target, self.plan, self.state = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        self.vals = b.alloca(ir.ArrayType(_I64, nvals), name="vals")
        self.vals.align = 8
        exit_i = b.ptrtoint(self.exit, _I64, name="exit.i")
        #: The frame's registers at its return address (DWARF number -> value).
        self.regs = {RSP: b.add(exit_i, _I64(EXIT_STATE_TO_ENTRY_RSP), name="rsp"), RA: self.ra}
        for reg in CALLEE_SAVED:
            name = REGISTER_NAMES[reg]
            self.regs[reg] = _load_field(b, self.exit, getattr(ExitState, name), name)
        self.entry = b
        self.tail = fn.append_basic_block("tail")
        self.bad = fn.append_basic_block("bad")

    def val_ptr(self, b, j, name):
        """``&vals[j]`` (``j``: an int or an ``i64`` value)."""
        j = _I64(j) if isinstance(j, int) else j
        return b.gep(self.vals, [_I64(0), j], inbounds=True, name=name)

    def case(self, k, plan):
        """Switch case ``k``, emitted from :class:`~deopt.plan.FramePlan`
        ``plan`` (the module docstring's formulas); returns its block."""
        b = ir.IRBuilder(self.fn.append_basic_block(f"fm{k}"))
        p = f"c{k}."
        for j, source in enumerate(plan.values):
            value = self.live_value(b, source, f"{p}v{j}")
            b.store(value, self.val_ptr(b, j, f"{p}v{j}.s"), align=8)
        result = REGISTER_NAMES[plan.result]
        b.store(_load_field(b, self.exit, getattr(ExitState, result), p + result), self.state,
                align=8)                                                # state[0]
        cfa = b.add(self.regs[plan.cfa.register], _I64(plan.cfa.offset), name=p + "cfa")
        rsp = b.add(cfa, _I64(plan.return_address.offset), name=p + "rsp")
        _store_field(b, rsp, self.plan, TransferPlan.rsp, p + "rsp.d")
        for reg, source in plan.caller:
            name = p + REGISTER_NAMES[reg]
            _store_field(b, self.caller_value(b, source, cfa, name), self.plan,
                         getattr(TransferPlan, REGISTER_NAMES[reg]), name + ".d")
        b.branch(self.tail)
        return b.block

    def live_value(self, b, source, name):
        """A live value read from ``source`` (:class:`~deopt.plan.Constant`,
        :class:`~deopt.plan.InRegister`, :class:`~deopt.plan.Address` or
        :class:`~deopt.plan.InMemory`), as an ``i64``."""
        if isinstance(source, Constant):
            return _I64(source.bits)
        base = self.regs[source.register]
        if isinstance(source, InRegister):
            return base
        if isinstance(source, Address):
            return b.add(base, _I64(source.offset), name=name)
        assert isinstance(source, InMemory), source
        address = b.add(base, _I64(source.offset), name=name + ".a")
        bits = 8 * min(source.size_bytes, 8)
        value = b.load(_memory_ptr(b, address, name), name=name + ".n", typ=ir.IntType(bits),
                       align=1)
        return value if bits == 64 else b.zext(value, _I64, name=name)

    def caller_value(self, b, source, cfa, name):
        """A caller's register restored from ``source`` (:class:`~deopt.plan.SavedAt`,
        :class:`~deopt.plan.CfaPlus` or :class:`~deopt.plan.SameAs`), as an ``i64``."""
        if isinstance(source, SavedAt):
            address = b.add(cfa, _I64(source.offset), name=name + ".a")
            return b.load(_memory_ptr(b, address, name), name=name, typ=_I64, align=8)
        if isinstance(source, CfaPlus):
            return b.add(cfa, _I64(source.offset), name=name)
        assert isinstance(source, SameAs), source
        return self.regs[source.register]

    def finish(self, cases, trap):
        """The switch over ``cases`` (``{index: block}``), the tail that fills
        the state and the plan from the target, and the trap for any other index."""
        sw = self.entry.switch(self.index, self.bad)
        for k, block in cases.items():
            sw.add_case(_I64(k), block)
        # Lay the blocks out as entry, cases, tail, trap.
        blocks = self.fn.blocks
        blocks.remove(self.tail)
        blocks.remove(self.bad)
        blocks.append(self.tail)
        b = ir.IRBuilder(self.tail)
        count = _load_field(b, self.target, TargetHeader.count, "count")
        perm = b.gep(self.target, [_I64(ctypes.sizeof(TargetHeader))], inbounds=True,
                     source_etype=_I8, name="perm")
        copy = self.fn.append_basic_block("copy")
        fill = self.fn.append_basic_block("fill")
        b.cbranch(b.icmp_signed(">", count, _I64(0), name="any"), copy, fill)
        b.position_at_end(copy)
        i = b.phi(_I64, name="i")
        pi_p = b.gep(perm, [i], inbounds=True, source_etype=_I64, name="pi.p")
        pi = b.load(pi_p, name="pi", typ=_I64, align=8)
        val = b.load(self.val_ptr(b, pi, "val.p"), name="val", typ=_I64, align=8)
        i_next = b.add(i, _I64(1), name="i.next", flags=["nuw"])
        dst = b.gep(self.state, [i_next], inbounds=True, source_etype=_I64, name="dst")
        b.store(val, dst, align=8)
        i.add_incoming(_I64(0), self.tail)
        i.add_incoming(i_next, copy)
        b.cbranch(b.icmp_signed("<", i_next, count, name="more"), copy, fill)
        b.position_at_end(fill)
        _store_field(b, _load_field(b, self.target, TargetHeader.resume_entry, "resume"),
                     self.plan, TransferPlan.rip, "rip")
        _store_field(b, _load_field(b, self.target, TargetHeader.site_id, "site"),
                     self.plan, TransferPlan.rdi, "rdi")
        _store_field(b, b.ptrtoint(self.state, _I64, name="state.i"), self.plan,
                     TransferPlan.rsi, "rsi")
        _store_field(b, _I64(0), self.plan, TransferPlan.rax, "rax")
        xmm0 = _field_ptr(b, self.plan, TransferPlan.xmm0, "xmm0.p")
        b.store(_I64(0), xmm0, align=8)
        b.store(_I64(0), b.gep(xmm0, [_I64(8)], inbounds=True, source_etype=_I8,
                               name="xmm0.hi"), align=8)
        b.ret_void()
        blocks.append(self.bad)
        b.position_at_end(self.bad)
        b.call(trap, [])
        b.unreachable()


def version_transfer_module(symbol, plans, triple=None):
    """The ``ir.Module`` of one version's transfer function:
    ``void @<symbol>(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr state)``.

    ``plans``: the :class:`~deopt.plan.FramePlan` of each case, by index
    (None, or a plan with a ``native_error``: no case; the dispatcher never
    calls with such an index because no entry is pushed for it). ``ra`` is
    the frame's original return address (DWARF register 16). Any other index
    traps. ``triple``: the module's target triple (default: this process's).
    """
    module = ir.Module(name=symbol)
    module.triple = triple or llvm.get_process_triple()
    trap = ir.Function(module, ir.FunctionType(_VOID, []), "llvm.trap")
    for attribute in ("cold", "noreturn", "nounwind"):
        trap.attributes.add(attribute)
    native = {k: p for k, p in enumerate(plans) if p is not None and p.native}
    code = _VersionCode(module, symbol, max([len(p.values) for p in native.values()] + [1]))
    code.finish({k: code.case(k, p) for k, p in native.items()}, trap)
    return module


def version_transfer_ir(symbol, plans, triple=None):
    """Textual IR of :func:`version_transfer_module`."""
    return str(version_transfer_module(symbol, plans, triple))


# --------------------------------------------------------------------------
# The dispatcher (hand-written)
# --------------------------------------------------------------------------

def dispatch_ir():
    """``native_dispatch.ll`` rendered: the dispatcher (:data:`DISPATCH_SYMBOL`)."""
    return nativesrc.render_file(
        __package__, "native_dispatch.ll",
        structs=[ThreadBlock, TransferPlan, LifoEntry, Descriptor, ExitState],
        values={"DISPATCH_SYMBOL": DISPATCH_SYMBOL, "PENDING": PENDING, "TAKEN": TAKEN,
                "HANDED": HANDED})


def dispatch_module_ir(triple):
    """Textual IR of a module holding only the dispatcher (:data:`DISPATCH_SYMBOL`)."""
    return f'target triple = "{triple}"\n' + dispatch_ir()


NATIVE_SOURCES = {"native_dispatch.ll": dispatch_ir}
