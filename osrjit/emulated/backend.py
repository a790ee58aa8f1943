"""The emulated backend: the same versions and stubs on a unicorn CPU.

:class:`EmulatedBackend` implements :class:`osrjit.backend.Backend` for
``Runtime(backend="emulated")``. It runs the very objects the native backend
links — every version emitted by :func:`osrjit.compiling.emit_object`, the
deopt stub of :mod:`deopt.stub` — relocated by :mod:`osrjit.emulated.loader`
into one :class:`~.machine.Machine`:

==========================  ==================================================
stack scan                  :func:`osrjit.stackscan.classify_frames` over
                            :func:`unwinder.walk` (emulated memory)
hijack                      :class:`deopt.hijack.HijackTable` (writes through
                            :class:`unwinder.UnicornMemory`)
transfer                    the stub calls the ``osrjit_deopt_transfer``
                            hypercall through its transfer cell, which runs
                            :func:`deopt.transfer.return_through_stub`
safepoint slow path         hypercall: parks the thread *inside* it while the
                            world stops (a walk shows the poll's return address
                            in its return slot, as natively)
==========================  ==================================================

What differs from native threads is how the world stops: emulated threads
run in quanta of a deterministic scheduler, so "stopped" means "not
scheduled". A pause raises the safepoint flag and runs the threads that still
execute JIT code until each parks at a poll; a thread that has not parked
after ``grace`` instructions is stopped where it is (the counterpart of the
native runtime's signal: its innermost frame may be at any instruction, and
the walk starts from its exact registers) — but first, if its pc is in code
being replaced, it is single-stepped out of that code (to its next poll, into
other code, or to its end; at most ``roll_limit`` instructions). A native
thread stopped by the signal in such code instead keeps running it after the
replacement (its version counts as executing); the emulator rolls it forward
so that "no old instruction after ``replace()``" holds exactly.

Invariants checked while the machine runs: after a replacement every
instruction fetched inside an old version's ``.text`` is an
:class:`OldCodeFetch` (a code hook on exactly those ranges); a freed version
is unmapped, so a fetch there faults and counts too.
"""
from __future__ import annotations

import contextlib
import ctypes
import weakref
from dataclasses import dataclass

from unicorn import UC_HOOK_CODE

import llvmlite.binding as llvm

import unwinder
from deopt.hijack import HijackTable
from deopt.stub import (EXIT_STATE_TO_ENTRY_RSP, RETURN_SYMBOL, STUB_SYMBOL,
                        TRANSFER_CELL_SYMBOL, ExitState, TransferPlan, stub_module_ir)
from deopt.sitestubs import ENTRY_OFFSET, SiteStubIndex, site_stubs_for, site_stubs_module_ir
from deopt.transfer import return_through_stub
from osrjit import abi, stackscan
from osrjit.backend import REFERENCE
from osrjit.errors import HijackError, RuntimeBusy
from unwinder.x86_64 import RAX, RBP, RBX, R12, R13, R14, R15

from .machine import Machine, Scheduler, ThreadState
from .program import EmulatedProgram, finish

__all__ = ["EmulatedBackend", "EmulatedFunction", "OldCodeFetch", "TRANSFER_HYPERCALL"]

#: Name of the hypercall the stub's transfer cell points at.
TRANSFER_HYPERCALL = "osrjit_deopt_transfer"

#: The stub's saved registers (:class:`deopt.stub.ExitState` fields) by DWARF number.
_SAVED = ((RBX, "rbx"), (RBP, "rbp"), (R12, "r12"), (R13, "r13"), (R14, "r14"), (R15, "r15"),
          (RAX, "rax"))
#: Instructions run between checks while a thread is inside the deopt stub.
STUB_STEP = 16


@dataclass(frozen=True)
class OldCodeFetch:
    """An instruction fetched from an old version after a replacement completed.

    ``thread``: emulated thread id; ``pc``: absolute address; ``version``:
    ``"name#id"``; ``instruction``: the machine's instruction count then;
    ``freed``: the version was already unmapped (the fetch faulted).
    """
    thread: int
    pc: int
    version: str
    instruction: int
    freed: bool = False

    def __str__(self):
        state = "freed " if self.freed else ""
        return (f"thread {self.thread} fetched {self.pc:#x} in {state}version {self.version} "
                f"at instruction {self.instruction}")


class EmulatedFunction:
    """``rt.function(name)``: calling it runs ``name(*args)`` in a new emulated
    thread, together with every other runnable thread, until it finishes."""

    def __init__(self, runtime, name: str):
        self._runtime, self.name = runtime, name

    def __call__(self, *args: int) -> int:
        rt = self._runtime
        thread = rt.spawn(self.name, *args)
        rt.run()          # until every thread is done (or every remaining one parked)
        return finish(thread)

    def __repr__(self):
        return f"<EmulatedFunction {self.name}>"


def done(thread) -> bool:
    return thread.state in (ThreadState.FINISHED, ThreadState.FAULTED)


class EmulatedScan:
    """The frames an emulated pause found (:class:`osrjit.backend.Scan`)."""

    def __init__(self, pending, executing, quiet):
        self.pending = pending
        self.executing = executing
        self.quiet = quiet

    def versions(self):
        return {p.version for p in self.pending}

    def __len__(self):
        return sum(1 for p in self.pending if p.slot is not None)


class EmulatedPause:
    """One stop of the emulated world (see the module docstring)."""

    def __init__(self, backend, names):
        self._backend = backend
        self._replaced = set(names)
        self.stopped_async = 0
        self.threads = 0

    def instructions(self):
        return self._backend.machine.instructions_executed

    def stop(self, timeout):
        self.stopped_async = self._backend.stop_world(self._replaced)

    def try_stop(self):
        # Between runs nothing executes; "no thread runs JIT code" means
        # every emulated thread has finished.
        return all(done(t) for t in self._backend.machine.threads)

    def abandon(self):
        self._backend.release_world()

    def scan(self):
        return self._backend.scan(self._replaced)

    def publish(self, versions):
        self._backend.program.publish(versions)

    def hijack(self, scan):
        b = self._backend
        memory = b.machine.memory
        # Every slot checked before any is written: a HijackError leaves the stacks as they were.
        for p in scan.pending:
            if p.slot is None:
                continue
            if b.table.get(p.slot) is not None:
                raise HijackError(f"slot {p.slot:#x} is already hijacked")
            held = memory.read_u64(p.slot)
            if held != p.pc:
                raise HijackError(f"slot {p.slot:#x} of thread {p.thread} holds {held:#x}, "
                                  f"expected the return address {p.pc:#x}")
        for p in scan.pending:
            if p.slot is not None:
                b.table.hijack(p.slot, p.pc, p.frame_map, p.version, b.machine.memory,
                               thread=p.thread)
                p.version.pending_returns += 1

    def withdraw(self):
        pass

    def finish(self):
        pass

    def release(self):
        b = self._backend
        b.release_world()
        self.threads = sum(1 for t in b.machine.threads if not done(t))


class _EmulatedStubs:
    """The per-site stubs of one emulated version: ``obj`` (their
    :class:`~osrjit.emulated.loader.LoadedObject`) and ``pairs`` ``[(return
    address, stub address)]``. Lifetime: until :meth:`release`, when the
    version is freed or discarded."""

    def __init__(self, backend, obj, pairs):
        self.obj, self.pairs = obj, pairs
        self._backend = backend
        backend.site_stubs.add(pairs)

    def release(self):
        """Forget the stubs, then unmap them. Idempotent."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.site_stubs.remove(self.pairs)
            backend.machine.unload_object(self.obj)


class EmulatedBackend:
    """Runs versions on an emulated CPU (see the module docstring).

    ``seed`` and ``quantum`` (instructions, inclusive range) drive the
    scheduler, so a run is replayed exactly. ``grace``: instructions the
    stopping world runs before stopping the threads that did not park at a
    poll; ``roll_limit``: instructions such a thread may still run to leave
    replaced code. ``object_cache``: a dict shared between runtimes that load
    the same versions (a sweep): each is compiled once.

    Lifetime: owns its machine; versions stay mapped until freed.
    """

    name = "emulated"
    #: The paths (:data:`osrjit.backend.PATHS`): the transfer is a hypercall
    #: running the reference one; stacks are walked by the reference walker.
    transfer = walker = REFERENCE
    #: A transfer runs inside a hypercall: versions are freed between quanta.
    reclaim_in_transfer = False
    #: No entry stack checks (the emulator has no %fs thread block).
    stack_checks = False
    #: One Python thread drives the machine: no background rechecks.
    background_reclaim = False

    def __init__(self, runtime, *, seed: int = 0, quantum: tuple[int, int] = (1, 100),
                 grace: int = 10_000, roll_limit: int = 100_000,
                 object_cache: dict | None = None):
        if runtime.calls != abi.CALLS_SLOT:
            raise ValueError(f"the emulated backend supports calls={abi.CALLS_SLOT!r} only, "
                             f"not {runtime.calls!r}")
        self._runtime = weakref.ref(runtime)
        self.functions = runtime._functions
        self.grace = int(grace)
        self.roll_limit = int(roll_limit)
        self.machine = m = Machine()
        self.program = EmulatedProgram(m, opt_level=runtime.opt_level, object_cache=object_cache,
                                       services=runtime._services)
        self.program.on_safepoint(self._safepoint)
        self._services = runtime._services
        self.scheduler = Scheduler(m, seed, quantum)
        self._stop_seed = seed
        self._stopping = False
        self._parked: list = []
        #: Unused by emulated pauses (they stop after ``grace`` instructions).
        self.safepoint_timeout = 5.0
        # The deopt stub, linked like any object; its transfer cell holds the
        # transfer hypercall's address.
        self._cell = m.alloc_cell(8)
        m.write_u64(self._cell, m.hypercall(TRANSFER_HYPERCALL, self._transfer_service))
        tm = self.program.tm
        data = tm.emit_object(llvm.parse_assembly(stub_module_ir(tm.triple)))
        resolve = {TRANSFER_CELL_SYMBOL: self._cell}.get
        self._stub = m.load_object(data, resolve, name="osrjit.deopt-stub", export=False)
        self.stub_address = self._stub.symbol(STUB_SYMBOL)
        self.return_address = self._stub.symbol(RETURN_SYMBOL)
        text = self._stub.load_addresses[".text"]
        self._stub_range = next((lo, hi) for lo, hi in self._stub.ranges if lo == text)
        self._status_cell = m.alloc_cell(8)
        #: Every loaded version's per-site stubs (see :meth:`link`).
        self.site_stubs = SiteStubIndex()
        self.table = HijackTable(self.stub_address, self.site_stubs)
        m.space.add_return_address_filter(self.table.translate)
        self._buffers: dict[int, tuple[int, int, int]] = {}   # thread id -> plan, state, slots
        self._watches: dict = {}                              # old version -> code hook
        self.freed: list = []
        self.reclaim_requested = False
        #: Every :class:`OldCodeFetch` seen (the first 1,000; see :attr:`old_code_fetch_count`).
        self.old_code_fetches: list[OldCodeFetch] = []
        self.old_code_fetch_count = 0
        self.stops = 0
        self.signals_sent = 0
        #: Instructions single-stepped to move threads out of replaced code.
        self.rolled_forward = 0

    @contextlib.contextmanager
    def closing(self, timeout: float):
        """Around :meth:`close`: :class:`RuntimeBusy` from a service called
        by emulated code (that thread's frames are below it); ``timeout``
        is moot, one Python thread drives the machine."""
        thread = self.machine.current_thread if self.machine is not None else None
        if thread is not None:
            raise RuntimeBusy(f"cannot close the runtime from a service called by emulated "
                              f"thread {thread.id} ({thread.name}): its frames are below it",
                              threads=[(thread.name, None, "in a hook or service")])
        yield

    def close(self):
        self.machine = None

    # fork(): nothing but the Python objects; one Python thread drives the machine.
    def before_fork(self):
        pass

    def after_fork_in_parent(self):
        pass

    def after_fork_in_child(self):
        pass

    # -- services and flags ----------------------------------------------------------

    @property
    def user_flag(self) -> int:
        return self.program.safepoint_flag

    @user_flag.setter
    def user_flag(self, value: int):
        self.program.safepoint_flag = value

    def _safepoint(self, thread):
        if self._stopping:
            thread.park(in_call=True)            # parked inside the slow path
            self._parked.append(thread)
        elif self._services.safepoint is not None:
            self._services.safepoint()

    def entry(self, fn):
        return EmulatedFunction(self._runtime(), fn.name)

    # -- loading, publishing, freeing ---------------------------------------------------

    def new_cell(self, name):
        return None                   # the program allocates the slot cell when it loads

    def link(self, irs, cells):
        versions = self.program.load(irs, publish=False)
        try:
            for v in versions:
                v.stubs = self._load_site_stubs(v)
        except BaseException:
            for v in versions:
                self.discard(v)
            raise
        return versions

    def _load_site_stubs(self, version):
        """The per-site stubs of ``version`` (:mod:`deopt.sitestubs`), loaded
        like any object and registered with the machine's unwinder; None if
        it has no site."""
        stubs = site_stubs_for(version.frame_maps, self.machine.space)
        if not stubs:
            return None
        tm = self.program.tm
        data = tm.emit_object(llvm.parse_assembly(
            site_stubs_module_ir(tm.triple, stubs, self.stub_address)))
        obj = self.machine.load_object(data, name=f"osrjit.site.{version.name}.v{version.id}",
                                       export=False)
        return _EmulatedStubs(self, obj, [(s.return_address, obj.symbol(s.symbol) + ENTRY_OFFSET)
                                          for s in stubs])

    def discard(self, version):
        if version.stubs is not None:
            version.stubs.release()
        self.program.forget(version)

    def publish(self, versions):
        self.program.publish(versions)

    def can_free(self, version) -> bool:
        """Nothing is freed while a thread is inside the deopt stub (the frame
        it transfers lies below the stub and must stay unwindable): a later
        :meth:`EmulatedRuntime.run` step retries."""
        return not self.in_stub()

    def keep(self, version):
        self._watch(version)

    def free(self, version):
        hook = self._watches.pop(version, None)
        if hook is not None:
            self.machine.uc.hook_del(hook)
        if version.stubs is not None:
            version.stubs.release()
        self.program.forget(version)
        self.machine.uc.ctl_remove_cache(*version.code_range)
        self.freed.append(version)

    def in_stub(self) -> bool:
        """Whether a thread is inside the deopt stub (between its entry and the
        jump into a resume entry)."""
        lo, hi = self._stub_range
        return any(lo <= t.pc < hi for t in self.machine.threads if not done(t))

    def before_reclaim(self):
        if self.in_stub():
            self.reclaim_requested = True

    def request_reclaim(self, version):
        if version.pending_returns == 0 and self.functions.is_old(version):
            # Free it between two quanta, not under the CPU's feet.
            self.reclaim_requested = True
            self.machine.request_stop("reclaim")

    # -- the pause -------------------------------------------------------------------------

    def pause(self, names=(), new=None):
        return EmulatedPause(self, names)

    def stop_world(self, replaced=frozenset()) -> int:
        """Park every live thread (see the module docstring); returns how many
        were stopped without reaching a poll."""
        m = self.machine
        self.stops += 1
        self._stopping = True
        self._parked = []
        self.program.safepoint_flag = 1
        sched = Scheduler(m, self._stop_seed + self.stops, self.scheduler.quantum)
        budget = self.grace
        while budget > 0:
            before = m.instructions_executed
            if sched.run(budget, raise_on_fault=False) or sched.stop_reason != "reclaim":
                break
            budget -= m.instructions_executed - before
        stopped_async = 0
        for t in m.threads:
            if t.state is not ThreadState.RUNNABLE:
                continue
            self._roll_forward(t, replaced)
            if t.state is ThreadState.RUNNABLE:
                t.park()                     # stopped where it is (the "signal")
                self._parked.append(t)
                stopped_async += 1
        self.signals_sent += stopped_async
        return stopped_async

    def _roll_forward(self, thread, replaced):
        """Single-step ``thread`` while its pc is in code that is being replaced
        (or old), at most ``roll_limit`` instructions, so that it is stopped
        where it will not run such code after the replacement: at a poll (it
        parks), in other code, or finished."""
        m = self.machine
        for _ in range(self.roll_limit):
            v = self.program.version_at(thread.pc)
            if v is None or not (v.name in replaced or self.functions.is_old(v)):
                return
            m._run_quantum(thread, 1)
            self.rolled_forward += 1
            if thread.state is not ThreadState.RUNNABLE:
                return

    def release_world(self):
        self.program.safepoint_flag = 0
        self._stopping = False
        for t in self._parked:
            t.unpark()
        self._parked = []

    def scan(self, replaced: set) -> EmulatedScan:
        """Classify every live thread's frames."""
        m = self.machine
        pending, executing = [], set()
        incomplete = None
        version_at = self.functions.version_at
        for t in m.threads:
            if done(t):
                continue
            regs = t.regs()
            if t in self._parked and not t._resume_in_call:
                # Stopped between two arbitrary instructions: an entry address
                # in a register may be called next.
                for value in regs.values():
                    v = version_at(value)
                    if v is not None:
                        executing.add(v)
            frames = unwinder.walk(regs, m.memory, m.space, caller_frame=False)
            result = stackscan.classify_frames(frames, version_at, replaced,
                                               self.functions.is_old, t.id)
            pending.extend(result.pending)
            executing.update(result.executing)
            incomplete = incomplete or result.incomplete
        if incomplete is not None:
            self._runtime().last_incomplete_walk = incomplete
            executing.update(self.functions.old_versions())
        return EmulatedScan(pending, executing, not executing and incomplete is None)

    # -- the transfer (a hypercall, on the returning thread) ---------------------------

    def _buffers_of(self, thread, n_state: int) -> tuple[int, int]:
        plan, state, slots = self._buffers.get(thread.id, (0, 0, 0))
        if plan == 0:
            plan = self.machine.alloc_cell(ctypes.sizeof(TransferPlan), 16)
        if slots < n_state:
            slots = max(32, 2 * n_state)
            state = self.machine.alloc_cell(8 * slots, 16)
        self._buffers[thread.id] = (plan, state, slots)
        return plan, state

    def _transfer_service(self, machine: Machine, thread) -> int:
        """``TransferPlan* transfer(ExitState*)`` for the stub (RDI = the block)."""
        runtime = self._runtime()
        block = thread.arg(0)
        es = ExitState.from_buffer_copy(machine.read(block, ctypes.sizeof(ExitState)))
        saved = {reg: getattr(es, name) for reg, name in _SAVED}
        out = return_through_stub(self.table, block + EXIT_STATE_TO_ENTRY_RSP, saved,
                                  runtime._resume_target, machine.memory, machine.space,
                                  self.return_address)
        plan, state = self._buffers_of(thread, len(out.state))
        for i, value in enumerate(out.state):
            machine.write_u64(state + 8 * i, value)
        p = TransferPlan(rsp=out.rsp, rip=out.rip, rdi=out.rdi, rsi=state if out.ok else 0,
                         status_ptr=self._status_cell)
        for reg, name in _SAVED:
            setattr(p, name, out.regs[reg])
        if out.keep_xmm0:
            p.xmm0 = es.xmm0
        machine.write(plan, bytes(p))
        runtime._after_transfer(out.record, out.ok, out.error)
        return plan

    # -- the old-code watch ------------------------------------------------------------------

    def _watch(self, v):
        if v in self._watches:
            return
        uc = self.machine.uc
        start, end = v.code_range
        label = f"{v.name}#{v.id}"

        def on_fetch(_uc, address, _size, _user):
            thread = self.machine.current_thread
            self.record_fetch(OldCodeFetch(thread.id if thread else 0, address, label,
                                           self.machine.instructions_executed))

        self._watches[v] = uc.hook_add(UC_HOOK_CODE, on_fetch, None, start, end - 1)
        uc.ctl_remove_cache(start, end)      # translated blocks would skip the new hook

    def record_fetch(self, fetch: OldCodeFetch):
        self.old_code_fetch_count += 1
        if len(self.old_code_fetches) < 1000:
            self.old_code_fetches.append(fetch)

    def check_fetches(self):
        """Turn faults at freed code into old-code fetches (once per thread)."""
        for t in self.machine.threads:
            if t.state is ThreadState.FAULTED and not getattr(t, "_fetch_counted", False):
                t._fetch_counted = True
                pc = t.error.pc
                for v in self.freed:
                    if v.contains(pc):
                        self.record_fetch(OldCodeFetch(t.id, pc, f"{v.name}#{v.id}",
                                                       self.machine.instructions_executed,
                                                       freed=True))

    def counters(self) -> dict:
        """``stops``, ``signals_sent`` (threads stopped without reaching a
        poll), ``attached_threads`` (live emulated threads), the native
        backend's transfer and self-scan keys (0 here: the emulated transfer
        is the Python one), and ``old_code_fetches``, ``instructions``,
        ``faulted_threads``."""
        self.check_fetches()
        threads = self.machine.threads
        return {
            "stops": self.stops,
            "signals_sent": self.signals_sent,
            "attached_threads": sum(1 for t in threads if not done(t)),
            "native_unsupported": 0, "lifo_searches": 0, "lifo_misses": 0, "native_handed": 0,
            "self_scans": 0, "self_applies": 0, "self_applies_by_stopper": 0,
            "old_code_fetches": self.old_code_fetch_count,
            "instructions": self.machine.instructions_executed,
            "faulted_threads": sum(1 for t in threads if t.state is ThreadState.FAULTED),
        }
