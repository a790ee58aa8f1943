"""Which frames to hijack: the stopped stacks scanned, by the reference walker or natively.

A :class:`Scanner` answers one question for a pause: which frames of which
versions sit at a site of a function being replaced (to hijack), and which
old versions a frame runs outside any site (to keep loaded). Two walkers
give the same answer:

* ``walker="reference"``: :func:`unwinder.walk` over every stopped stack and
  :func:`osrjit.stackscan.classify_frames` (the reference);
* ``walker="fast"`` (the default): :class:`unwinder.NativeWalker` and the native
  classification of :mod:`deopt.native_hijack`, driven by
  :mod:`osrjit.native.fastscan` — a thread parked at a poll scans its own stack as
  it parks (:class:`osrjit.native.fastscan.SelfScan`), the others are scanned here
  from their anchors (their last transition out of JIT code); a walk that
  needed Python anywhere is redone by the reference walker.

Stacks are read only while their threads are stopped (other threads parked,
ours below the capture point). The result is a :class:`osrjit.native.fastscan.ScanPlan`.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

import unwinder

from .. import stackscan
from ..backend import FAST
from . import fastscan, selfscan, threads

__all__ = ["Scanner", "ScanContext"]


@dataclass(frozen=True)
class ScanContext:
    """What a native scan needs that does not depend on the stopped stacks
    (built before the world stops; valid while the runtime lock is held and
    no version is published or freed). ``self_scans``: the threads asked to
    scan themselves (``addressof(ThreadState)`` -> SelfScan), filled by
    :meth:`Scanner.request_self_scans`."""
    index: fastscan.VersionIndex
    tables: fastscan.WatchTables
    translation: object
    walker: object
    hijacker: object
    anchor_scan: object
    descriptors: object
    self_scans: dict = field(default_factory=dict)


class Scanner:
    """The native backend's stack scans (see the module docstring).

    Owns the native walker and the native hijack code (compiled on first
    use), the scan buffers and each thread's self-scan block. ``mode``:
    ``"python"`` (the reference walker) or ``"native"`` (the fast one), from
    the backend's ``walker`` option.
    """

    def __init__(self, backend):
        self._backend = backend
        self.mode = "native" if backend.walker == FAST else "python"
        self.functions = backend.functions
        self.registry = backend.registry
        self.space = backend.space
        self.deopt = backend.deopt
        self.support = backend.support
        self.linker = backend.linker
        self._walker = None
        self._native = None
        self.buffers = fastscan.ScanBuffers()
        self.anchor_scan = fastscan.AnchorScan() if self.mode == "native" else None
        self.self_scans = {}          # addressof(ThreadState) -> fastscan.SelfScan
        #: Self-scans whose answer a pause used (``stats()["self_scans"]``).
        self.self_scans_used = 0
        if self.mode == "native":
            self.translation_mirror()

    def close(self):
        """Stop using the threads' handshake blocks and the native walker, and
        let go of every buffer: the walker (its tables, each thread's output
        buffer), the anchor scan's, the scan buffers, the self-scan blocks."""
        self.support.set_service("osrjit_park_scan", 0)
        self.support.set_service("osrjit_park_apply", 0)
        for _ident, st, _name in self.registry.snapshot():
            st.handshake = 0
        self.self_scans.clear()
        walker, self._walker, self._native = self._walker, None, None
        self.buffers = fastscan.ScanBuffers()
        self.anchor_scan = None
        if walker is not None:
            walker.close()

    def context(self, names):
        """What a native scan for ``names`` needs that does not depend on the
        stopped stacks (built before the world stops; valid while the runtime
        lock is held and no version is published or freed), or None for the
        reference walker."""
        if self.mode != "native":
            return None
        versions = [v for fn in self.functions for v in fn.versions]
        translation = self.translation_mirror()
        translation.snapshot()            # built now; again in the pause only if it changed
        tables = fastscan.WatchTables(versions, names, self.functions.is_old,
                                      self.deopt.table.stub_for)
        ntx_path = self.deopt.native
        self.buffers.reset()        # the previous scan's arrays are no longer used
        walker, hijacker = self.walker(), self.native()
        if self.anchor_scan is not None:
            self.anchor_scan.prepare(hijacker, walker, tables, self.buffers)
            self.anchor_scan.translate(translation.snapshot())
        return ScanContext(
            index=fastscan.VersionIndex(versions), tables=tables, translation=translation,
            walker=walker, hijacker=hijacker, anchor_scan=self.anchor_scan,
            descriptors=None if ntx_path is None else ntx_path.descriptors(tables.meta))

    def request_self_scans(self, context):
        """Ask every other attached thread with known stack bounds to scan
        itself when it parks (:class:`osrjit.native.fastscan.SelfScan`); before the
        world stops. Returns what :meth:`end_self_scans` takes (also on
        error: what was requested is withdrawn and the walker unpinned)."""
        if context is None or self._native is None:
            return None
        # Applies threads finished: their LIFO entries count now (also those
        # of threads that exited since; a block still applying is kept).
        for scan in self.self_scans.values():
            scan.settle()
        walker = context.walker
        pin = walker.pin()
        pin.__enter__()                   # the tables handed out stay until the end
        requested = {}
        try:
            me = threading.get_ident()
            translation = context.translation.snapshot()
            entry, tables_address = walker.entry_address, walker.tables_address
            attached = self.registry.snapshot()
            keys = {ctypes.addressof(st) for _, st, _ in attached}
            # Forget the blocks of threads gone (none of them can be in use).
            self.self_scans = {k: v for k, v in self.self_scans.items()
                                if k in keys or v.applying() or v.pending_lifo is not None}
            for ident, st, _ in attached:
                key = ctypes.addressof(st)
                scan = self.self_scans.get(key)
                if scan is None:
                    scan = self.self_scans[key] = fastscan.SelfScan()
                if ident == me or scan.applying():
                    continue              # (an apply left to it comes first: the pause does it)
                bounds = self.registry.stack_bounds(ident)
                if bounds is None:
                    continue
                requested[key] = scan
                scan.request(entry, tables_address, translation, context.tables, bounds, st)
                st.handshake = scan.address
        except BaseException:
            self.end_self_scans((requested, pin, None))
            raise
        context.self_scans.update(requested)
        return requested, pin, translation

    def end_self_scans(self, requests):
        """Withdraw :meth:`request_self_scans`' requests (answered or not) and
        unpin the walker; no thread uses their arguments afterwards."""
        if requests is None:
            return
        requested, pin, _translation = requests
        try:
            cancel = self._native.cancel
            for scan in requested.values():
                cancel(scan.address)
        finally:
            pin.__exit__(None, None, None)

    def warm_scan(self, context, names):
        """Run the native scan's code once on this thread's own stack, writing
        nothing, just before the world stops: the pause then starts with that
        code and its tables in the caches instead of after the compile."""
        if context is None:
            return

        def scan(regs):
            fastscan.plan_native(
                context.hijacker, context.walker, regs, caller_frame=True,
                index=context.index, tables=context.tables, replaced=names,
                is_old=self.functions.is_old, thread=threading.get_ident(),
                translation=context.translation,
                bounds=lambda rsp, thread: threads.current_stack_bounds(),
                reference=lambda: iter(()), buffers=self.buffers)
        try:
            unwinder.with_captured_registers(scan)
        except Exception:  # noqa: BLE001 - a warm-up only: the scan proper reports problems
            pass
        finally:
            self.buffers.reset()    # its arrays serve the scan proper

    def collect_self_scanned(self, others, context):
        """What :meth:`_collect_frames` returns, when every other thread parked
        at a poll and scanned itself completely and this thread has no JIT
        frame (the common case, read straight from the answers); else None."""
        self_scans = None if context is None else context.self_scans
        if not self_scans or len(self_scans) != len(others):
            return None
        mine = self.registry.attached()
        if mine is not None and mine.anchor[7]:
            return None                   # JIT frames of ours below a hook: the general path
        tables = context.tables
        answers = []
        for ident, state, _ in others:
            scan = self_scans.get(ctypes.addressof(state))
            if scan is None or threads.settled_status(state) != threads.PARKED:
                return None
            done = scan.answer(tables, ident)
            if done is None or done[0].incomplete is not None:
                return None
            done[1].state = state
            answers.append(done)
        plan = fastscan.ScanPlan()
        executing = set()
        for result, arrays in answers:
            plan.threads.append(arrays)
            executing |= result.executing
        self.self_scans_used += len(answers)
        plan.executing = executing
        plan.quiet = not executing
        return plan

    def collect_frames(self, names, others=(), context=None, *, mode=None) -> fastscan.ScanPlan:
        """Frames of versions of ``names`` on every stopped thread's stack.

        ``context``: from :meth:`context` (made here if None).
        Returns a :class:`osrjit.native.fastscan.ScanPlan`: the pending frames, as
        :class:`~osrjit.stackscan.PendingFrame` (``slot`` None for a frame
        already hijacked: its slot holds the stub) or, from the native scan,
        as per-thread arrays. Nothing is written.
        The plan's ``executing``: every old version a frame runs outside a
        site (an innermost frame interrupted by the runtime's signal, or a
        call that is not a site), or whose entry address a signal-stopped
        thread holds in a register (the runtime keeps those loaded).
        ``others``: ``(ident, ThreadState, name)`` of the stopped other threads.
        ``mode``: ``"python"`` or ``"native"`` to walk with (default: the
        backend's ``walker`` option; tests compare both on one stop).
        """
        mode = mode or self.mode
        executing = set()
        plan = fastscan.ScanPlan()
        found = plan.pending
        incomplete = []
        # Every stack read here is stopped (other threads parked, ours below
        # the capture point), so 4 KiB pages can be cached for this scan
        # (made on first need: the native paths read no memory from Python).
        cache = []

        def memory():
            if not cache:
                cache.append(unwinder.ProcessMemory(page_cache=True))
            return cache[0]
        is_old = self.functions.is_old

        if mode == "native":
            if context is None:
                context = self.context(names)
            index, tables = context.index, context.tables
            translation = context.translation
            native_walker, hijacker = context.walker, context.hijacker
            me = threading.get_ident()
            own = threads.current_stack_bounds()

            def known_bounds(ident):
                return own if ident == me else self.registry.stack_bounds(ident)
            bounds = fastscan.scan_bounds(known_bounds)
            anchor_scan = context.anchor_scan
            translated = []               # anchor_scan given the translation (on first use)

        self_scans = {} if context is None else context.self_scans

        def from_anchor(state, ident, parked):
            # The thread's own scan, made while it parked at a poll for this
            # stop; else one native call here for the whole thread when it can.
            done = None
            scan = self_scans.get(ctypes.addressof(state)) if parked else None
            if scan is not None:
                done = scan.answer(tables, ident)
                if done is not None:
                    self.self_scans_used += 1
            if done is None and mode == "native" and anchor_scan is not None:
                if not translated:
                    anchor_scan.translate(translation.snapshot())
                    translated.append(True)
                done = anchor_scan.thread(state, ident, known_bounds(ident))
            if done is not None:
                result, arrays = done
                arrays.state = state
                plan.threads.append(arrays)
                executing.update(result.executing)
                if result.incomplete is not None:
                    incomplete_walk(result.incomplete)
                return
            aregs = threads.anchor_registers(state)
            if aregs is not None:
                classify(aregs, ident, True, state)

        def incomplete_walk(reason):
            # Frames of old versions may hide below: free none of them this time.
            self._backend._runtime().last_incomplete_walk = reason
            incomplete.append(reason)
            for fn in self.functions:
                executing.update(v for v in fn.versions if v is not fn.current)

        def classify(regs, ident, caller_frame, state=None):
            def reference():
                return unwinder.walk(regs, memory(), self.space, caller_frame=caller_frame)
            if mode == "native":
                result, arrays = fastscan.plan_native(
                    hijacker, native_walker, regs, caller_frame=caller_frame, index=index,
                    tables=tables, replaced=names, is_old=is_old, thread=ident,
                    translation=translation, bounds=bounds, reference=reference,
                    buffers=self.buffers)
                found.extend(result.pending)
                if arrays is not None:
                    arrays.state = state
                    plan.threads.append(arrays)
            else:
                result = stackscan.classify_frames(reference(), self.functions.version_at, names,
                                                   is_old, ident)
                found.extend(result.pending)
            executing.update(result.executing)
            if result.incomplete is not None:
                incomplete_walk(result.incomplete)

        def scan(regs):
            if regs is not None:
                # Our own stack: walked from inside the capture, so it stays put.
                classify(regs, threading.get_ident(), True)
            else:
                # Our own JIT frames lie below our last transition out of JIT
                # code (a hook's anchor), frozen while we run above it — the
                # rule the other threads' scans follow too. No anchor: no
                # JIT call of ours is active on this thread.
                mine = self.registry.attached()
                if mine is not None:
                    from_anchor(mine, threading.get_ident(), False)
            for ident, state, _ in others:
                status = threads.settled_status(state)
                if status == threads.PARKED_SIGNAL and state.ucontext:
                    uregs = threads.ucontext_registers(state, memory())
                    for value in uregs.values():    # an entry loaded, not yet called
                        v = self.functions.version_at(value)
                        if v is not None:
                            executing.add(v)
                    classify(uregs, ident, False, state)
                elif status in (threads.PARKED, threads.OUTSIDE):
                    from_anchor(state, ident, status == threads.PARKED)

        if mode == "native":
            scan(None)
        else:
            unwinder.with_captured_registers(scan)
        plan.executing = executing
        plan.quiet = not executing and not incomplete
        return plan

    def walker(self):
        """This runtime's :class:`unwinder.NativeWalker` (made on first use)."""
        if self._walker is None:
            self._walker = unwinder.NativeWalker(self.space)
        return self._walker

    def translation_mirror(self):
        """Keep an :class:`unwinder.ReturnAddressTable` in step with the hijack
        table, for the native walker (installed before the first hijack)."""
        table = self.deopt.table
        if table.mirror is None:
            mirror = unwinder.ReturnAddressTable(
                self.deopt.stub_address, {r.slot: r.original_ra for r in table.records()},
                stub_of=self.deopt.site_stubs.stub_of)
            for start, end in list(self.deopt.stub_ranges):
                mirror.add_stub_range(start, end)
            table.mirror = mirror
        table.flush_mirror()
        return table.mirror

    def native(self):
        """This runtime's :class:`osrjit.native.selfscan.SelfScanHijacker` (compiled on first use)."""
        if self._native is None:
            self._native = selfscan.link_hijacker(self.linker)
            # Threads scan themselves when they park for a replace(), and
            # write their own hijacks as they wake (SelfScan).
            self.support.set_service("osrjit_park_scan", self._native.park_scan_address)
            self.support.set_service("osrjit_park_apply", self._native.park_apply_address)
        return self._native
