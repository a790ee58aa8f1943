"""Native deoptimization: the stub library, the hijack table and both transfers.

:class:`NativeDeopt` belongs to one :class:`~osrjit.runtime.Runtime`. It links
the deopt stub (:mod:`deopt.stub`) into the runtime's LLJIT as its own
library, registers it with the unwinder, owns the
:class:`~deopt.hijack.HijackTable` of every hijacked slot, and provides the
Python transfer function: a ctypes callback that finds the record of the slot
it returned through, asks :func:`deopt.transfer.plan_transfer` where to
resume, and fills a per-thread :class:`~deopt.stub.TransferPlan`.

With ``Runtime(transfer="fast")`` (the default) a :class:`NativeTransferPath` (its
:attr:`NativeDeopt.native`) runs first: the support library's
``osrjit_transfer`` calls its dispatcher (:mod:`deopt.native_transfer`) and
falls back to the Python transfer only when that returns NULL. The hijack
table stays the record of truth; the native path reports what it took
through the LIFO entries' statuses, which the runtime drains.

Lifetimes: the stub code, the transfer callback, the per-thread buffers and
the dispatcher live as long as the runtime's native resources (the stub
library is released after every version). A thread's plan and state buffers
are reused by its next transfer; the stub consumes the plan before that can
happen, and a resume entry reads the state before its first site. A
version's native transfer code lives until the version is freed.
"""
import array
import ctypes
import os
import sys
import threading
import traceback

import llvmlite.binding as llvm

import unwinder
from deopt import native_transfer as ntx
from deopt import plan as frame_plan
from deopt.hijack import HijackTable
from deopt.sitestubs import ENTRY_OFFSET, SiteStubIndex, site_stubs_for, site_stubs_module_ir
from deopt.stub import (EXIT_STATE_TO_ENTRY_RSP, RETURN_SYMBOL, STUB_SYMBOL,
                        TRANSFER_CELL_SYMBOL, TRANSFER_FUNCTION_TYPE, TransferPlan,
                        stub_module_ir)
from deopt.transfer import ResumeTarget, TransferError, return_through_stub
from unwinder.x86_64 import RAX, RBP, RBX, R12, R13, R14, R15

from ..errors import OsrJitError
from ..ir import parse_module

_SAVED = ((RBX, "rbx"), (RBP, "rbp"), (R12, "r12"), (R13, "r13"), (R14, "r14"), (R15, "r15"))


class _ThreadBuffers(threading.local):
    """Per-thread plan and state memory (see the module docstring for lifetimes)."""

    def __init__(self):
        self.plan = TransferPlan()
        self.state = (ctypes.c_uint64 * 16)()


class NativeDeopt:
    """The deopt machinery of one runtime on real threads.

    ``linker``: the runtime's :class:`osrjit.native.linker.Linker` (owns the
    stub library). ``resolve(record) -> ResumeTarget``: where the frame of a
    hijack record continues (the runtime answers with the function's current
    version). ``on_transferred(record, ok, error)``: called after every
    Python transfer (accounting and reclamation; ``error`` when not ``ok``).
    """

    def __init__(self, linker, space, resolve, on_transferred, status_address=None):
        self.space = space
        #: ``status_address() -> int``: address of the calling thread's status
        #: word (the stub marks it "in JIT" when the transfer is complete).
        self._status_address = status_address
        self._dummy_status = ctypes.c_int64(0)
        self._resolve = resolve
        self._on_transferred = on_transferred
        self._buffers = _ThreadBuffers()
        #: The :class:`NativeTransferPath` of a ``Runtime(transfer="fast")``
        #: (set by the runtime), else None.
        self.native = None
        #: Optional ``fn(record)`` called inside every transfer, on the
        #: returning thread, after the original return address is back in its
        #: slot and while the stub's frame is live (debugging and tests: a
        #: backtrace taken there walks through the stub into the old frame).
        self.observer = None
        self._callback = TRANSFER_FUNCTION_TYPE(self._transfer)
        self._cell = ctypes.c_void_p(ctypes.cast(self._callback, ctypes.c_void_p).value)
        linker.keep(self._callback, self._cell, self._dummy_status)

        tm = linker.tm
        obj = tm.emit_object(parse_module(stub_module_ir(tm.triple)))
        self.library = linker.link(
            obj, "osrjit.deopt-stub", exports=(STUB_SYMBOL, RETURN_SYMBOL),
            imports={TRANSFER_CELL_SYMBOL: ctypes.addressof(self._cell)},
            register="osrjit.deopt-stub", space=space)
        self.stub_address = self.library[STUB_SYMBOL]
        self.return_address = self.library[RETURN_SYMBOL]
        #: Every loaded version's per-site stubs (:meth:`link_site_stubs`).
        self.site_stubs = SiteStubIndex()
        self._linker = linker
        #: The ``[start, end)`` stub address range of each :class:`VersionStubs`.
        self.stub_ranges = set()
        self.table = HijackTable(self.stub_address, self.site_stubs)
        space.add_return_address_filter(self.table.translate)
        self.memory = unwinder.ProcessMemory()

    def link_site_stubs(self, frame_maps, name):
        """Link the per-site stubs (:mod:`deopt.sitestubs`) of a version
        whose frame maps are ``frame_maps`` (its code registered with the
        unwinder already: the rows come from there) as a library ``name``,
        registered with the unwinder. Returns their :class:`VersionStubs`
        (None: no frame map), which the version owns."""
        stubs = site_stubs_for(frame_maps, self.space)
        if not stubs:
            return None
        tm = self._linker.tm
        obj = tm.emit_object(parse_module(site_stubs_module_ir(tm.triple, stubs,
                                                               self.stub_address)))
        library = self._linker.link(obj, name, exports=[s.symbol for s in stubs],
                                    own_jit=True, register=name, space=self.space)
        return VersionStubs(self, library, [(s.return_address, library[s.symbol] + ENTRY_OFFSET)
                                            for s in stubs])

    @property
    def callback_address(self):
        """Address of the Python transfer function (``TransferPlan* (ExitState*)``)."""
        return ctypes.cast(self._callback, ctypes.c_void_p).value

    def route_through(self, address):
        """Make the stub call ``address`` (a native transition that calls
        :attr:`callback_address` in turn) instead of the Python transfer directly."""
        self._cell.value = address

    def close(self):
        """Stop translating return addresses and let go of every thread's plan
        and state buffers and of the native transfer's (the code goes with
        the runtime's resources)."""
        self.space.remove_return_address_filter(self.table.translate)
        self._buffers = _ThreadBuffers()
        if self.native is not None:
            self.native.close()

    # -- the transfer (runs on the thread that returned into the stub) ---------

    def _transfer(self, exit_state):
        """``TransferPlan* transfer(ExitState*)`` — never raises into native code."""
        try:
            return self._transfer_or_fall_back(exit_state)
        except BaseException:  # noqa: BLE001 - no exception may unwind into the stub
            # Only reachable if even the fallback failed (no record): there is
            # no return address to go to, so stop loudly rather than run garbage.
            sys.stderr.write("osrjit: fatal error in the deopt transfer\n")
            traceback.print_exc()
            sys.stderr.flush()
            os.abort()

    def _transfer_or_fall_back(self, exit_state):
        es = exit_state.contents
        entry_rsp = ctypes.addressof(es) + EXIT_STATE_TO_ENTRY_RSP
        saved = {reg: getattr(es, name) for reg, name in _SAVED}
        saved[RAX] = es.rax
        # HijackError (no record) propagates: fatal, see _transfer.
        out = return_through_stub(self.table, entry_rsp, saved, self._resolve, self.memory,
                                  self.space, self.return_address,
                                  restore_slot=_store_u64, observer=self.observer)
        buffers = self._buffers
        plan = buffers.plan
        if out.ok:
            if len(buffers.state) < len(out.state):
                buffers.state = (ctypes.c_uint64 * (2 * len(out.state)))()
            state = buffers.state
            for i, v in enumerate(out.state):
                state[i] = v
            plan.rsi = ctypes.addressof(state)
            ctypes.memset(ctypes.addressof(plan) + TransferPlan.xmm0.offset, 0, 16)
        else:
            plan.rsi = 0
            ctypes.memmove(ctypes.addressof(plan) + TransferPlan.xmm0.offset,
                           ctypes.addressof(es), 16)
        plan.rsp, plan.rip, plan.rdi = out.rsp, out.rip, out.rdi
        plan.rax = out.regs[RAX]
        for reg, name in _SAVED:
            setattr(plan, name, out.regs[reg])
        status = self._status_address() if self._status_address is not None else None
        plan.status_ptr = status or ctypes.addressof(self._dummy_status)
        self._on_transferred(out.record, out.ok, None if out.ok else out.error)
        return ctypes.addressof(plan)


class VersionStubs:
    """The per-site stubs of one version: ``library`` (their code, registered
    with the unwinder) and ``pairs`` ``[(return address, stub address)]``
    (absolute). Lifetime: from :meth:`NativeDeopt.link_site_stubs` until
    :meth:`release`, which the version's unloading calls once no slot holds
    one of them (no pending return into the version)."""

    def __init__(self, deopt, library, pairs):
        self.library = library
        self.pairs = pairs
        self._deopt = deopt
        addresses = [stub for _, stub in pairs]
        #: ``[start, end)``: every stub address of the version lies in it.
        self.range = (min(addresses), max(addresses) + 1)
        deopt.site_stubs.add(pairs)
        deopt.stub_ranges.add(self.range)
        mirror = deopt.table.mirror
        if mirror is not None:
            mirror.add_stub_range(*self.range)

    def release(self):
        """Forget the stubs, then unmap them. Idempotent."""
        if self.library.released:
            return
        deopt = self._deopt
        try:
            deopt.site_stubs.remove(self.pairs)
            deopt.stub_ranges.discard(self.range)
            mirror = deopt.table.mirror
            if mirror is not None:
                mirror.remove_stub_range(*self.range)
        finally:
            self.library.release()


def _store_u64(address, value):
    ctypes.c_uint64.from_address(address).value = value


# --------------------------------------------------------------------------
# The native transfer (Runtime(transfer="fast"))
# --------------------------------------------------------------------------



class _VersionTransfer:
    """The native transfer code of one version and the descriptors of its frame maps.

    ``plans[k]``: the :class:`~deopt.plan.FramePlan` of frame map ``k``
    (``version.frame_maps[k]``); it has a native case unless its
    ``native_error`` says why not. ``descriptors[k]``: what a
    LIFO entry points at. ``targets[k]``: the
    :class:`~deopt.native_transfer.Target` ``descriptors[k].target`` holds
    (None: NULL). Replaced targets are kept in ``retired`` (a transfer that
    read one without the world stopped may still be reading it) until the
    version goes. Lifetime: until :meth:`NativeTransferPath.forget` (the
    version is freed) or the runtime closes.
    """

    def __init__(self, version, plans, code_address, library):
        self.version_id = version.id
        self.frame_maps = version.frame_maps
        self.plans = plans
        self.library = library
        self.descriptors = (ntx.Descriptor * max(1, len(plans)))()
        for k in range(len(plans)):
            self.descriptors[k].code = code_address
            self.descriptors[k].index = k
            self.descriptors[k].target = 0
            self.descriptors[k].version = version.id
        self.targets = [None] * len(plans)
        self.retired = []
        self.index_by_ra = {fm.return_address: k for k, fm in enumerate(self.frame_maps)
                            if plans[k].native}
        self.native_cases = frozenset(self.index_by_ra.values())

    def descriptor_address(self, k):
        return ctypes.addressof(self.descriptors) + k * ctypes.sizeof(ntx.Descriptor)


class NativeTransferPath:
    """The native deopt transfer of one runtime (:mod:`deopt.native_transfer`).

    Owns the dispatcher library, every old version's transfer code and
    descriptors, and every thread's :class:`~deopt.native_transfer.ThreadLifo`.
    The runtime calls, with its lock held:

    * :meth:`prepare` before stopping the world (compiles the transfer code
      of versions that may get hijacked frames, so the pause does not);
    * :meth:`retarget` when it publishes a new current version;
    * :meth:`push` for every slot it hijacks (or :meth:`push_hijacked` for a
      thread's natively built entries, :meth:`reserve_hijacked` for entries
      the thread writes itself), then :meth:`commit` before it releases the
      world;
    * :meth:`drain` (any time) and :meth:`commit` (world stopped) return the
      slots of the hijack records the native transfer took, which the
      runtime drops from its hijack table (``pending_returns``, reclamation,
      ``transfers``);
    * :meth:`forget` when it frees a version (no entry of it is pending).

    ``native``: the runtime's resource owner (LLJIT, target machine,
    trackers); ``space``: the unwinder's address space (CFI rows of the
    versions; the dispatcher is registered there). ``detached(ts)``: whether
    the thread of a :class:`~osrjit.native.threads.ThreadState` has exited (its LIFO
    can then be freed once nothing is pending).
    """

    #: Code generation level of versions' transfer code (0: FastISel, ~4x
    #: faster to emit than 2 for these straight-line functions).
    CODEGEN_OPT = 0

    def __init__(self, native, space, detached):
        self._native = native
        self._space = space
        self._detached = detached
        tm = native.tm
        obj = tm.emit_object(self._module(ntx.dispatch_module_ir(tm.triple)))
        self.library = native.link(obj, "osrjit.ntx-dispatch", exports=(ntx.DISPATCH_SYMBOL,),
                                   register="osrjit.ntx-dispatch", space=space)
        self.dispatch_address = self.library[ntx.DISPATCH_SYMBOL]
        self._tm = None
        self._versions = {}          # version id -> _VersionTransfer
        self._lifos = {}             # addressof(ThreadState) -> ThreadLifo (token: ThreadState)
        self._scratch = None         # push_hijacked()'s buffer when entries must be merged
        self._queued = set()         # keys of the LIFOs with pushes for the next commit
        #: Records the native transfer took (counted when drained).
        self.transfers = 0
        #: Hijacked frames pushed to no LIFO (their frame map has no native
        #: case, their version no transfer code, or their thread no block):
        #: they take the Python transfer.
        self.unsupported = 0
        #: Versions whose transfer code could not be built, with the error
        #: (their frames take the Python transfer).
        self.build_errors = {}
        self._dropped = [0, 0, 0]    # searches, misses, handed of dropped LIFOs
        #: Tests: ``fn([(record, descriptor address)]) -> list`` applied to
        #: each thread's sorted LIFO at commit (reorder to force the fallback
        #: search; drop to force the Python transfer).
        self.reorder = None

    def _module(self, text):
        # No IR pass pipeline: the generated IR is already in SSA form (only
        # the value array is memory), code generation optimises at the
        # target machine's level, and llvmlite's pipeline leaks native memory
        # on every run (see osrjit.native.compiler).
        mod = parse_module(text)
        mod.verify()
        tm = self._native.tm
        mod.triple = tm.triple
        mod.data_layout = str(tm.target_data)
        return mod

    def _codegen_tm(self):
        """The target machine that emits versions' transfer code (created on first use)."""
        if self._tm is None:
            self._tm = llvm.Target.from_default_triple().create_target_machine(
                opt=self.CODEGEN_OPT, reloc="pic", codemodel="small")
        return self._tm

    # -- versions ----------------------------------------------------------------

    def prepare(self, version):
        """Compile ``version``'s transfer code unless it exists (world running).

        A failure is recorded in :attr:`build_errors` and the version's frames
        take the Python transfer.
        """
        if version.id in self._versions or version.id in self.build_errors:
            return
        plans = [frame_plan.plan_frame(fm, self._space) for fm in version.frame_maps]
        symbol = f"osrjit_ntx_v{version.id}"
        try:
            tm = self._codegen_tm()
            text = ntx.version_transfer_ir(symbol, plans, tm.triple)
            obj = tm.emit_object(self._module(text))
        except RuntimeError as e:
            self.build_errors[version.id] = ntx.NativeTransferError(
                f"{version.name} v{version.id}: {e}")
            return
        # Its own LLJIT (a JITDylib cannot be removed from an LLJIT),
        # released with it. Not registered with the unwinder (that costs more
        # than compiling): only a TRANSFERRING thread runs this code, and no
        # stack is walked while a thread is TRANSFERRING (stop-the-world
        # waits, the signal handler does not park it, no Python runs inside).
        try:
            library = self._native.link(obj, f"osrjit.ntx.{version.id}", exports=(symbol,),
                                        own_jit=True)
        except OsrJitError as e:
            self.build_errors[version.id] = ntx.NativeTransferError(
                f"{version.name} v{version.id}: {e}")
            return
        self._versions[version.id] = _VersionTransfer(version, plans, library[symbol], library)

    def retarget(self, versions, current):
        """Point every frame map of the old ``versions`` (with transfer code) at ``current``.

        One 8-byte store per descriptor; a site ``current`` lacks, or live
        values the old frame does not record, leave NULL (Python transfer,
        which reports the error). Safe while threads run (each transfer
        reads one target pointer once).
        """
        self.apply_retarget(self.plan_retarget(versions, current))

    def plan_retarget(self, versions, current):
        """The :class:`~deopt.native_transfer.Target` objects :meth:`retarget`
        would store, made now (allocation, permutations) for
        :meth:`apply_retarget` to store later; ``current`` need not be
        published yet. Valid while no version of ``versions`` is forgotten."""
        plan = []
        for v in versions:
            vt = self._versions.get(v.id)
            if vt is None or v is current:
                continue
            cache = {}
            for k, fm in enumerate(vt.frame_maps):
                if k not in vt.native_cases:
                    continue
                site = current.sites.get(fm.site_id)
                perm = None if site is None else ntx.permutation(
                    fm, [lv.name for lv in site.live])
                target = None
                if perm is not None:
                    key = (site.id, perm)
                    target = cache.get(key)
                    if target is None:
                        target = cache[key] = ntx.Target(current.resume_entry, site.id, perm,
                                                         current)
                plan.append((vt, k, target))
        return plan

    def apply_retarget(self, plan):
        """Store the targets of a :meth:`plan_retarget` (one 8-byte store each)."""
        for vt, k, target in plan:
            old = vt.targets[k]
            vt.targets[k] = target
            vt.descriptors[k].target = 0 if target is None else target.address
            if old is not None:
                vt.retired.append(old)

    def forget(self, version):
        """Free ``version``'s transfer code (no LIFO entry of it may be pending)."""
        vt = self._versions.pop(version.id, None)
        self.build_errors.pop(version.id, None)
        if vt is not None:
            vt.library.release()

    def has_code(self, version):
        return version.id in self._versions

    # -- threads ---------------------------------------------------------------

    def push(self, record, thread_state):
        """Queue ``record`` (just hijacked, world stopped) on its thread's LIFO.

        ``thread_state``: the :class:`~osrjit.native.threads.ThreadState` of the
        thread whose stack holds the slot, or None. Returns False (counted in
        :attr:`unsupported`) when the frame will take the Python transfer.
        """
        descriptor = self._descriptor(record.owner, record.original_ra)
        if not descriptor or thread_state is None:
            self.unsupported += 1
            return False
        self._lifo(thread_state, queue=True).push(record, descriptor)
        return True

    def descriptors(self, meta):
        """Per kind of ``meta`` (``[(frame map, owner version)]``) the address
        of its :class:`~deopt.native_transfer.Descriptor`, or 0 when frames of
        that kind take the Python transfer (``array('Q')``)."""
        return array.array("Q", (self._descriptor(owner, fm.return_address)
                                 for fm, owner in meta))

    def _descriptor(self, version, return_address):
        """Address of the Descriptor of ``version``'s frame map at absolute
        ``return_address``, or 0 (no transfer code or no native case there)."""
        vt = self._versions.get(version.id)
        k = None if vt is None else vt.index_by_ra.get(return_address)
        return 0 if k is None else vt.descriptor_address(k)

    def push_hijacked(self, thread_state, build, m, highest_slot):
        """LIFO entries of ``m`` frames just hijacked natively on the thread of
        ``thread_state`` (None: the thread has no block; they take the Python
        transfer), world stopped. ``build(address) -> written`` writes their
        :class:`~deopt.native_transfer.LifoEntry` records, highest slot first,
        every slot at most ``highest_slot`` (absolute): straight into the
        thread's LIFO when they go on top of it (no copy, no sort), else into a
        scratch buffer kept for the next time, queued for :meth:`commit`. The
        hijacked frames that got no entry are counted in :attr:`unsupported`.
        """
        if thread_state is None:
            self.unsupported += m
            return
        lifo = self._lifo(thread_state)
        written = lifo.append(build, m, highest_slot)
        if written is None:
            size = ctypes.sizeof(ntx.LifoEntry)
            if self._scratch is None or len(self._scratch) < size * m:
                self._scratch = ctypes.create_string_buffer(size * max(m, 1024))
            written = build(ctypes.addressof(self._scratch))
            self._lifo(thread_state, queue=True).push_entries(
                ctypes.string_at(self._scratch, size * written))
        self.unsupported += m - written

    def reserve_hijacked(self, thread_state, n, highest_slot):
        """Room on top of the thread's LIFO for ``n`` entries of frames just
        planned (world stopped), written later by
        ``osrjit_hj_park_apply``: ``(ThreadLifo, address, top)`` (see
        :meth:`deopt.native_transfer.ThreadLifo.reserve`), or None when the
        entries must be merged (the caller then writes them itself with
        :meth:`push_hijacked`)."""
        lifo = self._lifo(thread_state)
        room = lifo.reserve(n, highest_slot)
        return None if room is None else (lifo, *room)

    def _lifo(self, thread_state, queue=False):
        """The thread's LIFO (made on first use); ``queue``: pushes follow,
        for the next :meth:`commit`."""
        key = ctypes.addressof(thread_state)
        lifo = self._lifos.get(key)
        if lifo is None:
            lifo = self._lifos[key] = ntx.ThreadLifo(thread_state)
            thread_state.transfer_block = lifo.address
        if queue:
            self._queued.add(key)
        return lifo

    def drain(self):
        """Slots of the hijack records the native transfer took since the last
        drain (any time)."""
        out = []
        for lifo in list(self._lifos.values()):
            out.extend(lifo.drain()[0])
        return out

    def commit(self, drain=True):
        """Write every thread's LIFO (world stopped); returns the slots drained meanwhile.

        ``drain=False``: :meth:`drain` was called after the world stopped
        (nothing can have moved since; nothing is returned), and only the
        LIFOs with queued pushes are visited (entries :meth:`push_hijacked`
        wrote in place need no commit). LIFOs of threads that detached with
        nothing pending are freed (here with ``drain``, else by :meth:`prune`).
        """
        out = []
        keys = list(self._lifos) if drain or self.reorder is not None else list(self._queued)
        self._queued.clear()
        for key in keys:
            lifo = self._lifos.get(key)
            if lifo is not None:
                out.extend(lifo.commit(self.reorder, drain)[0])
        if drain:
            self.prune()
        return out

    def prune(self):
        """Free the LIFOs of threads that detached with nothing pending (runtime
        lock held; their dispatcher cannot run any more)."""
        for key, lifo in list(self._lifos.items()):
            ts = lifo.token
            if not lifo.pending and self._detached(ts):
                ts.transfer_block = 0
                b = lifo.block
                self._dropped[0] += b.searches
                self._dropped[1] += b.misses
                self._dropped[2] += b.handed
                del self._lifos[key]
                self._queued.discard(key)

    @property
    def thread_lifos(self) -> int:
        """Threads with a LIFO (freed when a thread is gone: :meth:`prune`)."""
        return len(self._lifos)

    def counters(self):
        """``{"lifo_searches", "lifo_misses", "handed_to_python"}`` summed over threads."""
        s, m, h = self._dropped
        for lifo in list(self._lifos.values()):
            b = lifo.block
            s, m, h = s + b.searches, m + b.misses, h + b.handed
        return {"lifo_searches": s, "lifo_misses": m, "handed_to_python": h}

    def close(self):
        """Forget every thread's block (LIFO) and every version's descriptors,
        and release the code-generation target machine (the runtime closes;
        no JIT code runs any more). The generated code goes with the
        runtime's other trackers."""
        for lifo in self._lifos.values():
            lifo.token.transfer_block = 0
        self._lifos.clear()
        self._queued.clear()
        self._versions.clear()
        self._scratch = None
        if self._tm is not None:
            self._tm.close()
            self._tm = None

    def lifo_of(self, thread_state):
        """The :class:`~deopt.native_transfer.ThreadLifo` of a thread, or None (tests)."""
        return self._lifos.get(ctypes.addressof(thread_state))


__all__ = ["NativeDeopt", "NativeTransferPath", "ResumeTarget", "TransferError"]
