"""``Runtime(backend="emulated")``: a :class:`osrjit.Runtime` whose code runs on a unicorn CPU.

Every policy is the runtime's (:mod:`osrjit.runtime`); the machine is
:class:`~.backend.EmulatedBackend`'s. :class:`EmulatedRuntime` only adds the
controls an emulator has and a native process has not: spawning emulated
threads, running them for an exact number of instructions, and what the
emulator checks (old-code fetches, stubs left on stacks).

Not thread-safe: drive one runtime from one Python thread. The hook and
safepoint services run inside the emulation and must not call
:meth:`~osrjit.Runtime.replace` (which runs threads itself): :class:`EmulationError`.
"""
from __future__ import annotations

import unwinder

from ..backend import REFERENCE, path_option
from ..errors import EmulationError
from ..runtime import Runtime
from .backend import STUB_STEP, EmulatedBackend, EmulatedFunction, OldCodeFetch, done

__all__ = ["EmulatedRuntime", "EmulatedFunction", "OldCodeFetch"]


class EmulatedRuntime(Runtime, backend="emulated"):
    """A runtime on an emulated CPU (``Runtime(backend="emulated", ...)``).

    Options besides :class:`osrjit.Runtime`'s (``calls`` must be
    ``"slot"``): ``seed``, ``quantum``, ``grace``, ``roll_limit`` and
    ``object_cache``, documented on :class:`~.backend.EmulatedBackend`.
    ``last_pause`` adds ``time_to_safepoint_instructions`` and
    ``pause_instructions``.
    """

    def __init__(self, *, backend: str = "emulated", **options):
        super().__init__(backend=backend, **options)

    def _make_backend(self, backend, options):
        # Native-only choices: the emulated backend has one transfer (a
        # hypercall running the reference one), the reference walker and no LLJIT.
        # Its code is not in this process's address space: nothing for perf or gdb.
        for option in ("transfer", "walker"):
            if path_option(option, options.pop(option, REFERENCE)) != REFERENCE:
                raise ValueError(f"the emulated backend supports {option}={REFERENCE!r} only")
        for option, only in (("compiler", "inprocess"), ("perf", None), ("gdb", None)):
            if options.pop(option, only) != only:
                raise ValueError(f"the emulated backend supports {option}={only!r} only")
        return EmulatedBackend(self, **options)

    def _may_recheck(self):
        # A service called by emulated code reads stats(): free nothing
        # under the CPU's feet (the machine's run() rechecks between quanta).
        return self._backend.machine.current_thread is None

    def _check_open(self):
        # Also from a service: the properties call Runtime._check_open (closed only).
        super()._check_open()
        if self._backend.machine.current_thread is not None:
            raise EmulationError("the emulated runtime cannot compile, replace or run from a "
                                 "service called by emulated code")

    # -- the emulator's controls ------------------------------------------------------

    @property
    def machine(self):
        """The :class:`~.machine.Machine` (its memory, threads and unwinder)."""
        Runtime._check_open(self)
        return self._backend.machine

    @property
    def program(self):
        """The :class:`~.program.EmulatedProgram` holding the loaded objects."""
        Runtime._check_open(self)
        return self._backend.program

    @property
    def stub_address(self) -> int:
        """Emulated address of the deopt stub."""
        Runtime._check_open(self)
        return self._backend.stub_address

    @property
    def grace(self) -> int:
        Runtime._check_open(self)
        return self._backend.grace

    @property
    def old_code_fetches(self) -> list[OldCodeFetch]:
        """Every :class:`OldCodeFetch` seen (the first 1,000)."""
        Runtime._check_open(self)
        return self._backend.old_code_fetches

    @property
    def old_code_fetch_count(self) -> int:
        Runtime._check_open(self)
        return self._backend.old_code_fetch_count

    @property
    def rolled_forward(self) -> int:
        """Instructions single-stepped to move threads out of replaced code
        before stopping them."""
        Runtime._check_open(self)
        return self._backend.rolled_forward

    def spawn(self, name: str, *args: int, stack_size: int = 256 * 1024):
        """A new emulated thread that will call the current version of ``name``
        (runs when :meth:`run` schedules it)."""
        self._check_open()
        self._functions.get(name)
        return self._backend.program.spawn(name, *args, stack_size=stack_size)

    @property
    def instructions(self) -> int:
        """Instructions executed by emulated threads so far (exact)."""
        Runtime._check_open(self)
        return self._backend.machine.instructions_executed

    def run(self, max_instructions: int | None = None) -> bool:
        """Run the runnable threads (the runtime's deterministic schedule) until
        none is left (True) or ``max_instructions`` more were executed (False).

        Old versions that transfers left without frames are freed as soon as
        their last pending return is taken; those a thread was executing,
        once every thread has finished (see :mod:`osrjit.reclaim`).
        """
        self._check_open()
        b = self._backend
        m = b.machine
        budget = max_instructions
        while True:
            step = budget
            if b.reclaim_requested:   # a thread is still in the stub: step until it left
                step = STUB_STEP if budget is None else min(budget, STUB_STEP)
            before = m.instructions_executed
            finished = b.scheduler.run(step, raise_on_fault=False)
            if budget is not None:
                budget -= m.instructions_executed - before
            if b.reclaim_requested and not b.in_stub():
                b.reclaim_requested = False
                self._reclaim()
            b.check_fetches()
            if finished:
                self._reclaim_pass(stop=False)
                return True
            if budget is not None and budget <= 0:
                return False
            if b.scheduler.stop_reason not in ("reclaim", "instruction budget"):
                return False          # every remaining thread is parked

    def stub_frames(self) -> list[tuple[int, int]]:
        """``(thread id, slot)`` of every frame of a live thread that returns into
        the stub (walk with no translation), plus every record left in the table."""
        Runtime._check_open(self)
        m = self._backend.machine
        out = []
        for t in m.threads:
            if done(t):
                continue
            for f in unwinder.walk(t.regs(), m.memory, m.space, caller_frame=False):
                if f.translated:
                    out.append((t.id, f.stored_pc))
        out.extend((r.thread, r.slot) for r in self._backend.table.records())
        return out
