"""Writing the hijacks: every pending return pointed at the deopt stub, and recorded.

With the world stopped, :meth:`Hijacker.hijack` writes the stub's address
into the return-address slot of every frame a scan found (reference frames
one by one through the hijack table; native batches checked first — every
slot of every thread before any is written, so a changed slot raises
:class:`~osrjit.errors.HijackError` with every stack untouched — then
written natively), pushes the native transfer's LIFO entries, and leaves to
each thread that planned its own stack the writes for its frames (it does
them as it wakes, :class:`osrjit.native.fastscan.SelfScan`). The records of the
native batches are made after the world is released
(:meth:`Hijacker.record_batches`), with the hijack table's lock held from
the first stub written until then, so a Python transfer waits for its record.
"""
from __future__ import annotations

import time

from deopt.hijack import HijackBatch

from ..errors import HijackError

__all__ = ["Hijacker"]


class Hijacker:
    """The native backend's hijack writes (see the module docstring)."""

    def __init__(self, backend):
        self.scanner = backend.scanner
        self.registry = backend.registry
        self.deopt = backend.deopt
        self._count_lock = backend._runtime()._count_lock
        #: ``(thread ident, SelfScan)`` left to write their own hijacks by the last replace().
        self.last_left = []
        #: Hijacks left to threads to write as they woke, and those the next
        #: stop-the-world wrote because the thread had not woken yet.
        self.self_applies_left = 0
        self.self_applies_by_stopper = 0

    def settle_self_applies(self, stopped):
        """Settle the applies left to threads (:meth:`hijack`) that are done;
        with the world ``stopped``, first do here those a thread has not
        done yet (it is stopped, so it cannot be doing it)."""
        if not self.scanner.self_scans:
            return
        apply = self.scanner.native().park_apply
        for scan in self.scanner.self_scans.values():
            if stopped and scan.applying():
                apply(scan.address)
                self.self_applies_by_stopper += 1
            scan.settle()

    def hijack(self, plan, context=None):
        """Write its site's stub (:mod:`deopt.sitestubs`) into every slot of
        ``plan`` (world stopped) and record the pending returns (hijack table, counts, native LIFOs);
        ``context``: the scan's (:meth:`Scanner.context`), if any. Returns the
        natively hijacked batches, whose records :meth:`record_batches` makes
        (it must be called, also on error: the table's lock is held until then)."""
        memory = self.deopt.memory
        ntx_path = self.deopt.native
        self.last_left = []
        states = ({i: st for i, st, _ in self.registry.snapshot()}
                  if ntx_path is not None and plan.pending else {})
        for p in plan.pending:
            if p.slot is None:
                continue                      # already hijacked: retargeted at transfer time
            record = self.deopt.table.hijack(p.slot, p.pc, p.frame_map, p.version, memory,
                                             thread=p.thread)
            with self._count_lock:
                p.version.pending_returns += 1
            if ntx_path is not None:
                ntx_path.push(record, states.get(p.thread))
        batches = [h for h in plan.threads if h.m]
        if not batches:
            return []
        hijacker = self.scanner.native()
        descriptors_of = {}               # id(meta) -> descriptor per kind
        if context is not None and context.descriptors is not None:
            descriptors_of[id(context.tables.meta)] = context.descriptors

        def descriptors_for(h):
            descriptors = descriptors_of.get(id(h.meta))
            if descriptors is None:
                descriptors = descriptors_of[id(h.meta)] = ntx_path.descriptors(h.meta)
            return descriptors
        # Frames a thread planned itself as it parked are written by that
        # thread as it wakes (on its own core, before it runs JIT code): no
        # check, it has not run since. The others are checked here, every
        # thread before any is written: a failure leaves every stack as it was.
        own = [h for h in batches if h.self_scan is not None]
        here = [h for h in batches if h.self_scan is None]
        for h in here:
            bad = hijacker.apply(h.slots, h.ras, h.kinds, h.m, h.tables.stub_array, 0)
            if bad:
                raise HijackError(f"slot {h.slots[bad - 1]:#x} of thread {h.thread} no longer "
                                  f"holds the return address {h.ras[bad - 1]:#x}, or the "
                                  f"slots do not rise")
        # From the first stub written (or left to write) until the records
        # exist (after the world is released: see record_batches) a
        # transfer's take() must wait.
        self.deopt.table.lock.acquire()
        done = []                         # written, or left to write: to record
        try:
            for h in own:
                stubs = h.tables.stub_array
                if ntx_path is None:
                    h.self_scan.leave_apply(stubs)
                    done.append(h)
                    continue
                descriptors = descriptors_for(h)
                expected = sum(c for k, c in h.hijacked_per_kind().items() if descriptors[k])
                room = (ntx_path.reserve_hijacked(h.state, expected, h.slots[h.m - 1])
                        if expected and h.state is not None else None)
                if expected and room is None:
                    here.append(h)        # its LIFO needs a merge: written here
                    continue
                ntx_path.unsupported += h.m - expected
                if room is None:
                    h.self_scan.leave_apply(stubs)
                else:
                    lifo, address, top = room
                    try:
                        h.self_scan.leave_apply(stubs, descriptors, lifo, address, top)
                    except BaseException:
                        lifo.unreserve()
                        raise
                done.append(h)
            self.last_left = [(h.thread, h.self_scan) for h in done]
            self.self_applies_left += len(done)
            for h in here:
                hijacker.apply(h.slots, h.ras, h.kinds, h.m, h.tables.stub_array, 1)
                done.append(h)
                if ntx_path is not None:
                    d = descriptors_for(h).buffer_info()[0]
                    ntx_path.push_hijacked(
                        h.state,
                        lambda address, h=h, d=d: hijacker.lifo(address, h.slots, h.ras,
                                                                h.kinds, h.m, d),
                        h.m, h.slots[h.m - 1])
        except BaseException:
            self.record_batches(done)        # the stubs written or left: record them now
            raise
        return batches

    def record_batches(self, batches):
        """The hijack records and counts of what :meth:`hijack` wrote natively
        (after the world is released, the table's lock still held from
        :meth:`hijack`; released here)."""
        table = self.deopt.table
        try:
            for h in batches:
                slots, ras, kinds = h.hijack_arrays()
                per_kind = h.hijacked_per_kind()
                table.add_batch(HijackBatch(slots, ras, kinds, h.meta, h.thread, per_kind))
                with self._count_lock:
                    for k, c in per_kind.items():
                        h.meta[k][1].pending_returns += c
        finally:
            table.lock.release()

    def apply_times(self, timeout: float) -> list:
        """See :meth:`osrjit.Runtime.self_apply_times`."""
        deadline = time.monotonic() + timeout
        out = []
        for ident, scan in list(self.last_left):
            while scan.applying() and time.monotonic() < deadline:
                time.sleep(0.0001)
            b = scan.block
            done = not scan.applying() and b.apply_end_ns
            out.append((ident, (b.apply_end_ns - b.apply_start_ns) / 1e9 if done else None))
        return out
