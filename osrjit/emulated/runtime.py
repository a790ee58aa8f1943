"""The emulated backend of :class:`osrjit.Runtime`: the same versions and stubs on a unicorn CPU.

``Runtime(backend="emulated")`` returns an :class:`EmulatedRuntime`. It runs
the very objects the native runtime links — every version emitted by
:func:`osrjit.runtime.emit_object`, the deopt stub of :mod:`deopt.stub` —
relocated by :mod:`osrjit.emulated.loader` into one :class:`Machine`, and
replaces functions with the same code the native runtime uses:

==========================  ==================================================
stack scan                  :func:`osrjit.stackscan.classify_frames` over
                            :func:`unwinder.walk` (emulated memory)
compatibility               :func:`deopt.framemaps.check_compatible`
hijack                      :class:`deopt.hijack.HijackTable` (writes through
                            :class:`unwinder.UnicornMemory`)
transfer                    the stub calls the ``osrjit_deopt_transfer``
                            hypercall through its transfer cell, which runs
                            :func:`deopt.transfer.return_through_stub`
safepoint slow path         hypercall: parks the thread *inside* it while the
                            world stops (a walk shows the poll's return address
                            in its return slot, as natively)
==========================  ==================================================

What differs from native threads is only how the world stops: emulated
threads run in quanta of a deterministic scheduler, so "stopped" means "not
scheduled". :meth:`EmulatedRuntime.replace` raises the safepoint flag and runs
the threads that still execute JIT code until each parks at a poll; a thread
that has not parked after ``grace`` instructions is stopped where it is (the
counterpart of the native runtime's signal: its innermost frame may be at any
instruction, and the walk starts from its exact registers) — but first, if its
pc is in code being replaced, it is single-stepped out of that code (to its
next poll, into other code, or to its end; at most ``roll_limit``
instructions). A native thread stopped by the signal in such code instead
keeps running it after the replacement (its version counts as executing); the
emulator rolls it forward so that "no old instruction after ``replace()``"
holds exactly. A thread still in replaced code after ``roll_limit`` keeps
that version executing, and its fetches are reported.

Invariants checked while the machine runs (see :attr:`old_code_fetches`):

* after :meth:`~EmulatedRuntime.replace` returns, every instruction fetched
  inside an old version's ``.text`` is recorded as an :class:`OldCodeFetch`
  (a code hook on exactly those ranges);
* a freed version is unmapped, so a fetch there faults; such a fault is an
  old-code fetch too;
* :meth:`~EmulatedRuntime.stub_frames` lists frames that would still return
  into the stub (none may remain once the threads have finished).

Lifetime: the runtime owns its machine; versions stay mapped until freed
(:meth:`collect` or a transfer's reclaim); :meth:`close` drops everything.
Not thread-safe: drive one runtime from one Python thread. The hook and
safepoint services run inside the emulation and must not call
:meth:`replace` (which runs threads itself): :class:`EmulationError`.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unicorn import UC_HOOK_CODE

import unwinder
from deopt.hijack import HijackTable
from deopt.stub import (EXIT_STATE_TO_ENTRY_RSP, RETURN_SYMBOL, STUB_SYMBOL,
                        TRANSFER_CELL_SYMBOL, stub_module_ir)
from deopt.transfer import ResumeTarget, return_through_stub
from osrjit import abi, stackscan
from osrjit.abi import FunctionIR
from osrjit.errors import RuntimeClosed
from osrjit.runtime import check_versions_compatible, replacement_irs, resume_target
from unwinder.x86_64 import RAX, RBP, RBX, R12, R13, R14, R15

from .loader import EmulationError
from .machine import Machine, Scheduler, ThreadState
from .program import EmuVersion, finish

__all__ = ["EmulatedRuntime", "EmulatedFunction", "OldCodeFetch", "TRANSFER_HYPERCALL"]

#: Name of the hypercall the stub's transfer cell points at.
TRANSFER_HYPERCALL = "osrjit_deopt_transfer"

# ExitState as the stub pushes it (deopt.stub): xmm0, r15, r14, r13, r12, rbp, rbx, rax, slot.
_EXIT_STATE = struct.Struct("<16s8Q")
assert _EXIT_STATE.size == EXIT_STATE_TO_ENTRY_RSP
# TransferPlan: rsp rip rdi rsi rax rbx rbp r12 r13 r14 r15 status_ptr, xmm0.
_PLAN = struct.Struct("<12Q16s")
assert _PLAN.size == 112
_SAVED_ORDER = (R15, R14, R13, R12, RBP, RBX, RAX)
_MASK64 = (1 << 64) - 1
#: Instructions run between checks while a thread is inside the deopt stub.
_STUB_STEP = 16


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

    def __init__(self, runtime: "EmulatedRuntime", name: str):
        self._runtime, self.name = runtime, name

    def __call__(self, *args: int) -> int:
        rt = self._runtime
        thread = rt.spawn(self.name, *args)
        rt.run()          # until every thread is done (or every remaining one parked)
        return finish(thread)

    def __repr__(self):
        return f"<EmulatedFunction {self.name}>"


class EmulatedRuntime:
    """A runtime whose code runs on an emulated CPU (see the module docstring).

    ``opt_level``: as :class:`osrjit.Runtime`. ``calls``: only ``"slot"``
    (direct calls are not re-patched in emulated memory). ``seed`` and
    ``quantum`` (instructions, inclusive range) drive the scheduler, so a run
    is replayed exactly. ``grace``: instructions the stopping world runs
    before stopping the threads that did not park at a poll; ``roll_limit``:
    instructions such a thread may still run to leave replaced code.
    ``object_cache``:
    a dict shared between runtimes that load the same versions (a sweep):
    each is compiled once.
    """

    backend = "emulated"

    def __init__(self, *, opt_level: int = 2, calls: str = abi.CALLS_SLOT, seed: int = 0,
                 quantum: tuple[int, int] = (1, 100), grace: int = 10_000,
                 roll_limit: int = 100_000, object_cache: dict | None = None):
        if calls != abi.CALLS_SLOT:
            raise ValueError(f"the emulated backend supports calls={abi.CALLS_SLOT!r} only, "
                             f"not {calls!r}")
        self.calls = calls
        self.grace = int(grace)
        self.machine = m = Machine()
        self.program = m.program(opt_level=opt_level, object_cache=object_cache)
        self.program.on_safepoint(self._safepoint)
        self._scheduler = Scheduler(m, seed, quantum)
        self._stop_seed = seed
        self._user_safepoint: Callable[[], None] | None = None
        self._stopping = False
        self._parked: list = []
        self._closed = False
        # The deopt stub, linked like any object; its transfer cell holds the
        # transfer hypercall's address.
        self._cell = m.alloc_cell(8)
        m.write_u64(self._cell, m.hypercall(TRANSFER_HYPERCALL, self._transfer_service))
        data = self.program.tm.emit_object(_parse(stub_module_ir(self.program.tm.triple)))
        resolve = {TRANSFER_CELL_SYMBOL: self._cell}.get
        self._stub = m.load_object(data, resolve, name="osrjit.deopt-stub", export=False)
        self.stub_address = self._stub.symbol(STUB_SYMBOL)
        self.return_address = self._stub.symbol(RETURN_SYMBOL)
        text = self._stub.load_addresses[".text"]
        self._stub_range = next((lo, hi) for lo, hi in self._stub.ranges if lo == text)
        self._status_cell = m.alloc_cell(8)
        self.table = HijackTable(self.stub_address)
        m.space.add_return_address_filter(self.table.translate)
        self._buffers: dict[int, tuple[int, int, int]] = {}   # thread id -> plan, state, slots
        self._watches: dict[EmuVersion, int] = {}              # old version -> code hook
        self._freed: list[EmuVersion] = []
        self._reclaim_requested = False
        #: Every :class:`OldCodeFetch` seen (the first 1,000; see :attr:`old_code_fetch_count`).
        self.old_code_fetches: list[OldCodeFetch] = []
        self.old_code_fetch_count = 0
        self.transfers = 0
        self.transfer_failures = 0
        self.last_transfer_error: BaseException | None = None
        self.stops = 0
        self.signals_sent = 0
        #: Instructions single-stepped to move threads out of replaced code
        #: before stopping them (see :meth:`replace`).
        self.rolled_forward = 0
        self.roll_limit = int(roll_limit)
        self.last_incomplete_walk: str | None = None
        #: Figures of the last :meth:`replace`: ``time_to_safepoint`` and
        #: ``pause`` in emulated instructions, ``threads``, ``frames_hijacked``,
        #: ``stopped_async`` (threads stopped without reaching a poll).
        self.last_pause: dict | None = None

    # -- life cycle --------------------------------------------------------------

    def close(self):
        """Drop the machine (every version, stub and thread)."""
        self._closed = True
        self.machine = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeClosed("the runtime is closed")
        if self.machine.current_thread is not None:
            raise EmulationError("the emulated runtime cannot compile, replace or run from a "
                                 "service called by emulated code")

    # -- services ----------------------------------------------------------------

    def on_hook(self, fn: Callable[[int], int] | None):
        """Install ``fn(value) -> int`` as the hook service (None removes it)."""
        self.program.on_hook(fn)

    def on_safepoint(self, fn: Callable[[], None] | None):
        """Install ``fn()`` to run when a poll takes its slow path outside a replacement."""
        self._user_safepoint = fn

    @property
    def safepoint_flag(self) -> int:
        return self.program.safepoint_flag

    @safepoint_flag.setter
    def safepoint_flag(self, value: int):
        self.program.safepoint_flag = value

    def _safepoint(self, thread):
        if self._stopping:
            thread.park(in_call=True)            # parked inside the slow path
            self._parked.append(thread)
        elif self._user_safepoint is not None:
            self._user_safepoint()

    # -- compiling and calling -------------------------------------------------------

    def compile(self, source: str, *, polls: bool = True) -> list[str]:
        """Compile reference-language ``source`` and publish its functions."""
        self._check_open()
        return self.program.compile(source, polls=polls)

    def compile_ir(self, function_irs: FunctionIR | Iterable[FunctionIR]) -> list[str]:
        """Load IR authors' functions (see :mod:`osrjit.abi`) and publish them."""
        self._check_open()
        return [v.name for v in self.program.load(function_irs)]

    def function(self, name: str) -> EmulatedFunction:
        self.program.current(name)
        return EmulatedFunction(self, name)

    def names(self) -> list[str]:
        return self.program.names()

    def versions(self, name: str) -> list[EmuVersion]:
        """Loaded versions of ``name``, oldest first (freed ones are gone)."""
        self.program.current(name)
        return self.program.versions(name)

    def current(self, name: str) -> EmuVersion:
        return self.program.current(name)

    def version_at(self, address: int) -> EmuVersion | None:
        return self.program.version_at(address)

    def spawn(self, name: str, *args: int, stack_size: int = 256 * 1024):
        """A new emulated thread that will call the current version of ``name``
        (runs when :meth:`run` schedules it)."""
        self._check_open()
        return self.program.spawn(name, *args, stack_size=stack_size)

    @property
    def instructions(self) -> int:
        """Instructions executed by emulated threads so far (exact)."""
        return self.machine.instructions_executed

    def run(self, max_instructions: int | None = None) -> bool:
        """Run the runnable threads (the runtime's deterministic schedule) until
        none is left (True) or ``max_instructions`` more were executed (False).

        Old versions that transfers left without frames are freed as soon as
        their last pending return is taken.
        """
        self._check_open()
        m = self.machine
        budget = max_instructions
        while True:
            step = budget
            if self._reclaim_requested:   # a thread is still in the stub: step until it left
                step = _STUB_STEP if budget is None else min(budget, _STUB_STEP)
            before = m.instructions_executed
            done = self._scheduler.run(step, raise_on_fault=False)
            if budget is not None:
                budget -= m.instructions_executed - before
            if self._reclaim_requested and not self._in_stub():
                self._reclaim_requested = False
                self._reclaim()
            self._check_fetches()
            if done:
                return True
            if budget is not None and budget <= 0:
                return False
            if self._scheduler.stop_reason not in ("reclaim", "instruction budget"):
                return False          # every remaining thread is parked

    def _in_stub(self) -> bool:
        """Whether a thread is inside the deopt stub (between its entry and the
        jump into a resume entry): the old frame below it must stay
        unwindable, so its version is not freed yet."""
        lo, hi = self._stub_range
        return any(lo <= t.pc < hi for t in self.machine.threads if not _done(t))

    # -- replacement -----------------------------------------------------------------

    def check_compatible(self, old: EmuVersion, new: EmuVersion) -> None:
        check_versions_compatible(old, old.frame_maps.maps, new)

    def replace(self, names, source, *, polls: bool = True) -> list[EmuVersion]:
        """Replace ``names`` with new versions, frames and all (as :meth:`osrjit.Runtime.replace`).

        Steps (nothing is modified before step 5): compile and load the new
        versions unpublished; stop the world (threads in JIT code run to their
        next poll, at most ``grace`` instructions, then the rest are stopped
        where they are); walk every live thread; check compatibility
        (:class:`deopt.IncompatibleVersion`: new versions dropped, stacks
        untouched); publish; hijack; release; free old versions nothing can
        return into; watch the others' code for fetches.
        """
        self._check_open()
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("replace() needs at least one function name")
        for name in names:
            self.program.current(name)
        irs = self._replacement_irs(names, source, polls)
        new = {v.name: v for v in self.program.load(irs, publish=False)}
        m = self.machine
        t0 = m.instructions_executed
        stopped_async = self._stop_world(set(names))
        t1 = m.instructions_executed
        try:
            try:
                pending = self._scan(set(names))
                for old in {p.version for p in pending}:
                    self.check_compatible(old, new[old.name])
            except BaseException:
                for v in new.values():
                    self.program.forget(v)
                raise
            self.program.publish(new.values())
            for p in pending:
                if p.slot is not None:
                    self.table.hijack(p.slot, p.pc, p.frame_map, p.version, m.memory,
                                      thread=p.thread)
                    p.version.pending_returns += 1
        finally:
            self._release_world()
        self.last_pause = {"time_to_safepoint": t1 - t0, "pause": m.instructions_executed - t0,
                           "threads": sum(1 for t in m.threads if not _done(t)),
                           "frames_hijacked": sum(1 for p in pending if p.slot is not None),
                           "stopped_async": stopped_async}
        self._reclaim()
        return [new[n] for n in names]

    def collect(self) -> int:
        """Stop the world, re-scan every stack, free old versions nothing runs;
        returns the number freed."""
        self._check_open()
        before = len(self._freed)
        self._stop_world()
        try:
            self._scan(set())
        finally:
            self._release_world()
        self._reclaim()
        return len(self._freed) - before

    def _replacement_irs(self, names, source, polls):
        known = {n: len(self.program.current(n).ir.params) for n in self.program.names()}
        return replacement_irs(names, source, polls=polls, calls=self.calls, known=known)

    def _stop_world(self, replaced=frozenset()) -> int:
        """Park every live thread (see the module docstring); returns how many
        were stopped without reaching a poll."""
        m = self.machine
        self.stops += 1
        self._stopping = True
        self._parked = []
        self.program.safepoint_flag = 1
        sched = Scheduler(m, self._stop_seed + self.stops, self._scheduler.quantum)
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
            if v is None or not (v.name in replaced or self._is_old(v)):
                return
            m._run_quantum(thread, 1)
            self.rolled_forward += 1
            if thread.state is not ThreadState.RUNNABLE:
                return

    def _release_world(self):
        self.program.safepoint_flag = 0
        self._stopping = False
        for t in self._parked:
            t.unpark()
        self._parked = []

    def _scan(self, replaced: set) -> list[stackscan.PendingFrame]:
        """Classify every live thread's frames; recompute ``executing``."""
        m = self.machine
        pending, executing = [], set()
        incomplete = None
        for t in m.threads:
            if _done(t):
                continue
            regs = t.regs()
            if t in self._parked and not t._resume_in_call:
                # Stopped between two arbitrary instructions: an entry address
                # in a register may be called next.
                for value in regs.values():
                    v = self.program.version_at(value)
                    if v is not None:
                        executing.add(v)
            frames = unwinder.walk(regs, m.memory, m.space, caller_frame=False)
            result = stackscan.classify_frames(frames, self.program.version_at, replaced,
                                               self._is_old, t.id)
            pending.extend(result.pending)
            executing.update(result.executing)
            incomplete = incomplete or result.incomplete
        if incomplete is not None:
            self.last_incomplete_walk = incomplete
            executing.update(v for n in self.program.names() for v in self.program.versions(n)
                             if self._is_old(v))
        for n in self.program.names():
            for v in self.program.versions(n):
                v.executing = v in executing
        return pending

    def _is_old(self, version: EmuVersion) -> bool:
        return self.program.current(version.name) is not version

    # -- the transfer (a hypercall, on the returning thread) ---------------------------

    def _buffers_of(self, thread, n_state: int) -> tuple[int, int]:
        plan, state, slots = self._buffers.get(thread.id, (0, 0, 0))
        if plan == 0:
            plan = self.machine.alloc_cell(_PLAN.size, 16)
        if slots < n_state:
            slots = max(32, 2 * n_state)
            state = self.machine.alloc_cell(8 * slots, 16)
        self._buffers[thread.id] = (plan, state, slots)
        return plan, state

    def _transfer_service(self, machine: Machine, thread) -> int:
        """``TransferPlan* transfer(ExitState*)`` for the stub (RDI = the block)."""
        block = thread.arg(0)
        xmm0, *values = _EXIT_STATE.unpack(machine.read(block, _EXIT_STATE.size))
        saved = dict(zip(_SAVED_ORDER, values))
        out = return_through_stub(self.table, block + EXIT_STATE_TO_ENTRY_RSP, saved,
                                  self._resume_target, machine.memory, machine.space,
                                  self.return_address)
        plan, state = self._buffers_of(thread, len(out.state))
        for i, value in enumerate(out.state):
            machine.write_u64(state + 8 * i, value)
        r = out.regs
        machine.write(plan, _PLAN.pack(out.rsp, out.rip, out.rdi, state if out.ok else 0,
                                       r[RAX], r[RBX], r[RBP], r[R12], r[R13], r[R14], r[R15],
                                       self._status_cell, xmm0 if out.keep_xmm0 else bytes(16)))
        old = out.record.owner
        old.pending_returns -= 1
        if out.ok:
            self.transfers += 1
        else:
            self.transfer_failures += 1
            self.last_transfer_error = out.error
            old.pinned = True
        if old.pending_returns == 0 and self._is_old(old):
            # Free it between two quanta, not under the CPU's feet.
            self._reclaim_requested = True
            machine.request_stop("reclaim")
        return plan

    def _resume_target(self, record) -> ResumeTarget:
        return resume_target(record, self.program.current(record.owner.name))

    # -- reclamation and the old-code watch ---------------------------------------------

    def _reclaim(self):
        """Free every old version nothing can run; watch the others' code.

        Nothing is freed while a thread is inside the deopt stub (the frame it
        transfers lies below the stub and must stay unwindable): the next
        :meth:`run` step retries."""
        busy = self._in_stub()
        self._reclaim_requested = self._reclaim_requested or busy
        for name in self.program.names():
            for v in self.program.versions(name):
                if not self._is_old(v):
                    continue
                if busy or v.pending_returns or v.pinned or v.executing:
                    self._watch(v)
                else:
                    self._free(v)

    def _watch(self, v: EmuVersion):
        if v in self._watches:
            return
        uc = self.machine.uc
        start, end = v.code_range
        label = f"{v.name}#{v.id}"

        def on_fetch(_uc, address, _size, _user):
            thread = self.machine.current_thread
            self._record_fetch(OldCodeFetch(thread.id if thread else 0, address, label,
                                            self.machine.instructions_executed))

        self._watches[v] = uc.hook_add(UC_HOOK_CODE, on_fetch, None, start, end - 1)
        uc.ctl_remove_cache(start, end)      # translated blocks would skip the new hook

    def _free(self, v: EmuVersion):
        hook = self._watches.pop(v, None)
        if hook is not None:
            self.machine.uc.hook_del(hook)
        self.program.forget(v)
        self.machine.uc.ctl_remove_cache(*v.code_range)
        self._freed.append(v)

    def _record_fetch(self, fetch: OldCodeFetch):
        self.old_code_fetch_count += 1
        if len(self.old_code_fetches) < 1000:
            self.old_code_fetches.append(fetch)

    def _check_fetches(self):
        """Turn faults at freed code into old-code fetches (once per thread)."""
        for t in self.machine.threads:
            if t.state is ThreadState.FAULTED and not getattr(t, "_fetch_counted", False):
                t._fetch_counted = True
                pc = t.error.pc
                for v in self._freed:
                    if v.contains(pc):
                        self._record_fetch(OldCodeFetch(t.id, pc, f"{v.name}#{v.id}",
                                                        self.machine.instructions_executed,
                                                        freed=True))

    def stub_frames(self) -> list[tuple[int, int]]:
        """``(thread id, slot)`` of every frame of a live thread that returns into
        the stub (walk with no translation), plus every record left in the table."""
        m = self.machine
        out = []
        for t in m.threads:
            if _done(t):
                continue
            for f in unwinder.walk(t.regs(), m.memory, m.space, caller_frame=False):
                if f.translated:
                    out.append((t.id, f.stored_pc))
        out.extend((r.thread, r.slot) for r in self.table.records())
        return out

    def stats(self) -> dict:
        """Counters with the native runtime's keys (``signals_sent``: threads
        stopped without reaching a poll) plus ``old_code_fetches``,
        ``instructions`` and ``faulted_threads``."""
        self._check_fetches()
        return {
            "live_versions": {n: len(self.program.versions(n)) for n in self.program.names()},
            "pending_returns": len(self.table),
            "freed_versions": len(self._freed),
            "transfers": self.transfers,
            "transfer_failures": self.transfer_failures,
            "hijacks": self.table.hijacks,
            "pinned_versions": sum(1 for n in self.program.names()
                                   for v in self.program.versions(n)
                                   if self._is_old(v) and (v.pinned or v.executing)),
            "stops": self.stops,
            "signals_sent": self.signals_sent,
            "attached_threads": sum(1 for t in self.machine.threads if not _done(t)),
            "old_code_fetches": self.old_code_fetch_count,
            "instructions": self.machine.instructions_executed,
            "faulted_threads": sum(1 for t in self.machine.threads
                                   if t.state is ThreadState.FAULTED),
        }


def _done(thread) -> bool:
    return thread.state in (ThreadState.FINISHED, ThreadState.FAULTED)


def _parse(ir_text: str):
    import llvmlite.binding as llvm
    return llvm.parse_assembly(ir_text)
