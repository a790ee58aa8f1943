"""One native stop-the-world: a ``replace()`` (or a ``collect()``) step by step.

:class:`NativePause` implements :class:`osrjit.backend.Pause` for the native
backend. What does not depend on the stopped stacks is done when it is made,
before the world stops: the new versions' native transfer code, the
direct-call patches (planned from one read of ``/proc/self/maps``; those in
the new versions' own code are written at once, since no thread can reach
that code yet), the native transfer targets, the scan's tables and a dry
run of the scan on this thread's own stack (it writes nothing; the pause
then starts with warm caches).

In the pause: the threads that parked at a poll scanned their own stacks on
the way, the others are scanned here; the new versions are published (slot
stores, native targets, the call patches that must be written now); the
stubs are written. Calls in code that becomes old are patched after the
release instead when no thread runs old code outside a site (the scan was
*quiet*), with the hijack table's lock held: the only way back into old code
— a transfer that fails and returns into its frame's old code — takes that
lock first, so no thread runs code whose page is writable for a moment.
"""
from __future__ import annotations

import threading

from deopt.native_hijack import APPLY_CHECK
from unwinder.errors import MemoryReadError

from ..errors import HijackError
from . import patching

__all__ = ["NativePause"]


def calls_in(patches, ranges):
    """``(inside, others)``: the call-site patches of ``patches`` whose
    address lies in one of ``ranges`` (``[start, end)``, absolute), and the
    rest (GOT entries included) in their order."""
    inside, others = [], []
    for p in patches:
        hit = p.site is not None and any(lo <= p.address < hi for lo, hi in ranges)
        (inside if hit else others).append(p)
    return inside, others


class NativePause:
    """One pause of a :class:`~.backend.NativeBackend` (see the module docstring).

    ``names``/``new``: the functions replaced and their new versions (linked,
    not published); none for a collection. With ``names`` but no ``new``
    versions, a *probe*: the pause stops and scans for ``names`` as a
    replacement would (threads parked at a poll scan themselves), and
    publishes and hijacks nothing — a seam for tools and tests, reached
    through :meth:`~.backend.NativeBackend.pause`.

    After :meth:`stop`: ``others`` — ``(ident, ThreadState, name)`` of the
    stopped threads; ``context`` — the scan's :class:`~.scan.ScanContext`
    (None for the reference walker or a collection).
    """

    def __init__(self, backend, names, new):
        self._backend = backend
        self._names = set(names)
        self._new = new
        self._replacing = bool(names)
        self._requests = None
        self.others = []
        self._scan = None
        self._batches = []
        self._deferred = []
        self._patches = self._current = []
        self._memory = None
        self._targets = []
        self.context = None
        self.threads = 1
        self.stopped_async = 0
        if self._replacing:
            self._prepare()

    def _prepare(self):
        backend, functions = self._backend, self._backend.functions
        if not self._new:                 # a probe: only the scan's context
            backend.drain()
            self.context = backend.scanner.context(self._names)
            self._request_self_scans()
            return
        ntx_path = backend.deopt.native
        if ntx_path is not None:
            for name in self._names:
                for v in functions.get(name).versions:
                    ntx_path.prepare(v)
        patches, memory = backend.plan_direct_calls(
            [v.ir for v in self._new.values()], {n: v.entry for n, v in self._new.items()})
        early, patches = calls_in(patches, [v.code_range for v in self._new.values()])
        patching.apply_patches(early, memory)
        # Calls in code that is old once the new versions are published may
        # be patched after the release if no thread runs old code; the others
        # in the pause.
        deferrable, current = calls_in(
            patches, [v.code_range for fn in functions for v in fn.versions
                      if fn.name in self._names or v is not fn.current])
        self._patches, self._memory = patches, memory
        self._deferrable, self._current = deferrable, current
        if ntx_path is not None:
            for name in self._names:
                self._targets += ntx_path.plan_retarget(functions.get(name).versions,
                                                        self._new[name])
        backend.drain()
        self.context = backend.scanner.context(self._names)
        backend.scanner.warm_scan(self.context, self._names)
        self._request_self_scans()

    def _request_self_scans(self):
        # The threads that park at a poll walk and plan their own stacks on
        # the way (SelfScan); the others are scanned in the pause. Asked
        # last, just before the world stops (withdrawn by abandon()).
        self._requests = self._backend.scanner.request_self_scans(self.context)

    def instructions(self):
        return None

    # -- the pause -----------------------------------------------------------------

    def stop(self, timeout):
        backend = self._backend
        signals = backend.world.signals_sent
        self.others = backend.world.stop(timeout=timeout)
        self.stopped_async = backend.world.signals_sent - signals

    def try_stop(self):
        others = self._backend.world.try_stop()
        if others is None:
            return False
        self.others, self.stopped_async = others, 0
        return True

    def abandon(self):
        self._backend.scanner.end_self_scans(self._requests)
        self._requests = None

    def scan(self, *, mode=None):
        """The stopped stacks' :class:`osrjit.native.fastscan.ScanPlan`. ``mode``
        (probes): ``"python"`` or ``"native"`` walks every stack with that
        walker, ``"self"`` uses the threads' own scans where they answered;
        default: the answers when every thread scanned itself, else the
        backend's walker."""
        backend = self._backend
        backend.hijacker.settle_self_applies(stopped=True)
        backend.drain(settle=False)
        scanner = backend.scanner
        if mode is not None:
            others = self.others
            context = self.context if mode == "self" else None
            scan = scanner.collect_frames(self._names, self.others, context,
                                          mode="python" if mode == "python" else "native")
        elif self._replacing:
            others = self.others
            scan = (scanner.collect_self_scanned(others, self.context)
                    or scanner.collect_frames(self._names, others, self.context))
        else:
            me = threading.get_ident()
            others = [t for t in backend.registry.snapshot() if t[0] != me]
            scan = scanner.collect_frames(set(), others)
        self.threads = len(others) + 1
        self._scan = scan
        return scan

    def publish(self, versions):
        backend = self._backend
        quiet = self._scan.quiet
        self._deferred = self._deferrable if quiet else []
        now = self._current if quiet else self._patches
        for v in versions:
            backend.functions.get(v.name).cell.value = v.entry
        if backend.deopt.native is not None:
            backend.deopt.native.apply_retarget(self._targets)
        patching.apply_patches(now, self._memory)

    def withdraw(self):
        """The runtime undid the publish (a later step failed): the call
        patches left for after the release are not written."""
        self._deferred = []

    def hijack(self, scan):
        """Write the stubs: every slot is checked first, so a
        :class:`HijackError` leaves every stack as it was."""
        self.check_slots(scan)
        self._batches = self._backend.hijacker.hijack(scan, self.context)

    def check_slots(self, scan):
        """:class:`HijackError` unless every slot ``scan`` would hijack —
        reference frames and the native batches written here (not those a
        thread writes itself as it wakes: it has not run since it planned
        them) — still holds its return address and is not hijacked yet."""
        backend = self._backend
        table, memory = backend.deopt.table, backend.deopt.memory
        for p in scan.pending:
            if p.slot is None:
                continue
            if table.get(p.slot) is not None:
                raise HijackError(f"slot {p.slot:#x} is already hijacked")
            try:
                held = memory.read_u64(p.slot)
            except MemoryReadError as e:
                raise HijackError(f"slot {p.slot:#x} of thread {p.thread} cannot be "
                                  f"read: {e}") from e
            if held != p.pc:
                raise HijackError(f"slot {p.slot:#x} of thread {p.thread} holds {held:#x}, "
                                  f"expected the return address {p.pc:#x}")
        batches = [h for h in getattr(scan, "threads", ()) if h.m and h.self_scan is None]
        if batches:
            native = backend.scanner.native()
            for h in batches:
                bad = native.apply(h.slots, h.ras, h.kinds, h.m, h.tables.stub_array,
                                   APPLY_CHECK)
                if bad:
                    raise HijackError(f"slot {h.slots[bad - 1]:#x} of thread {h.thread} no "
                                      f"longer holds the return address {h.ras[bad - 1]:#x}, "
                                      f"or the slots do not rise")

    def finish(self):
        self._backend.commit()

    def release(self):
        backend = self._backend
        table = backend.deopt.table
        deferred, batches = self._deferred, self._batches
        if deferred:
            table.lock.acquire()
        backend.world.release()
        try:
            backend.scanner.end_self_scans(self._requests)
            if deferred:
                patching.apply_patches(deferred, self._memory)
        finally:
            try:
                if batches:
                    backend.hijacker.record_batches(batches)
            finally:
                if deferred:
                    table.lock.release()
        table.flush_mirror()              # the pause hijacked them; now their mirror
