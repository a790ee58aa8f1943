"""The stop-the-world stack scan on the native walker.

Same answer as walking each stopped thread with :func:`unwinder.walk` and
classifying with :func:`osrjit.stackscan.classify_frames` — the reference,
which a test compares against — with no per-frame Python:

* :class:`WatchTables` (built before the world stops): every return address
  of a site of a *watched* version (being replaced, or old) and their code
  ranges, as sorted native arrays; versions are found by bisection in one
  sorted array of ``.text`` ranges (:class:`VersionIndex`);
* :func:`plan_native` walks one stopped thread with
  :meth:`unwinder.NativeWalker.walk_out` (or ``walk_raw`` when one native
  call cannot do the walk alone; hijacked slots seen through a
  :class:`unwinder.ReturnAddressTable` mirror of the hijack table, stack
  bounds known per thread or from ``/proc/self/maps``) and hands the raw
  frames to :mod:`deopt.native_hijack`, which finds the frames to hijack,
  checks their slots and counts what runs old code; a :class:`ThreadHijacks`
  holds one thread's answer as arrays, a :class:`ScanPlan` every thread's;
* a thread stopped at a poll or in a hook is scanned from its anchor in one
  native call (:class:`AnchorScan`: walk and plan, ``osrjit_hj_scan``), or,
  for ``replace()``, has scanned itself on its own core while it parked
  (:class:`SelfScan`: the stopper only reads the answer; the thread's side
  and the handshake protocol are :mod:`osrjit.native.selfscan`).

A frame's lookup pc is ``pc − 1`` except for the innermost frame of a walk
started from exact registers (a signal context). A walk the native code
could not do entirely by itself (a frame left to the Python walker, which
may have guessed by frame pointers) is redone by the reference path, so the
answer never depends on the fast path's limits.
"""
import bisect
import ctypes
from array import array

from deopt.native_hijack import KeyCounts, ScanArgs
from unwinder.modules import read_proc_maps
from unwinder.native import EndReason, OutFrame, WalkState
from unwinder.walk import END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO

from .selfscan import HS_APPLIED, HS_APPLY, HS_APPLYING, HS_REQUESTED, HS_SCANNED, Handshake
from ..stackscan import NORMAL_ENDS, PendingFrame, ScanResult, classify_frames

#: osrjit_hj_scan's terminal end reasons, worded as unwinder.walk words them.
_TERMINAL_ENDS = {EndReason.RA_UNDEFINED: END_RA_UNDEFINED, EndReason.RA_ZERO: END_RA_ZERO,
                  EndReason.CFA_NOT_INCREASING: END_CFA_NOT_INCREASING}

#: The plan's counters as a flat u64 array: :class:`deopt.native_hijack.KeyCounts`
#: per key, so key k's counter ``c`` is at ``_PER_KEY * k + c``.
_PER_KEY = ctypes.sizeof(KeyCounts) // 8
_HIJACK, _NOT_HIJACKABLE, _ALREADY_HIJACKED = (
    getattr(KeyCounts, name).offset // 8 for name in ("hijack", "not_hijackable", "already_hijacked"))

__all__ = ["VersionIndex", "scan_bounds", "plan_native", "ThreadHijacks", "ScanPlan",
           "ScanBuffers", "WatchTables", "AnchorScan", "SelfScan"]


class VersionIndex:
    """Sorted ``.text`` ranges of ``versions`` for :meth:`at` (absolute addresses)."""

    def __init__(self, versions):
        ranges = sorted((v.code_range[0], v.code_range[1], v) for v in versions)
        self._starts = [r[0] for r in ranges]
        self._ranges = ranges

    def at(self, address):
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            start, end, v = self._ranges[i]
            if start <= address < end:
                return v
        return None


def scan_bounds(known=None):
    """``bounds(rsp, thread) -> (lo, hi)``: the stack holding ``rsp``.

    ``known(thread)``: the thread's stack range if the caller knows it
    (``pthread_getattr_np`` at attach time), else None; ranges not known are
    the readable mapping holding ``rsp``, from one read of ``/proc/self/maps``
    per scan (made on first need; about 0.7 ms here), then bisection.
    """
    maps = starts = None

    def bounds(rsp, thread=None):
        nonlocal maps, starts
        r = known(thread) if known is not None else None
        if r is not None and r[0] <= rsp < r[1]:
            return r
        if maps is None:
            maps = sorted((start, end) for start, end, perms, _o, _p in read_proc_maps()
                          if perms.startswith("r"))
            starts = [m[0] for m in maps]
        i = bisect.bisect_right(starts, rsp) - 1
        if i >= 0 and maps[i][0] <= rsp < maps[i][1]:
            return maps[i]
        return rsp, rsp
    return bounds


class WatchTables:
    """What :func:`plan_native` looks for, built once per scan: the versions
    being replaced or old (*watched*), their sites and their code.

    ``keys``: every return address of a watched version's frame maps
    (sorted, absolute) with ``meta[k] = (frame map, version)`` and
    ``hijack[k]`` (1: the version is being replaced, its frames there are to
    be hijacked; 0: an old version, frames there are only counted);
    ``ranges``: the watched versions' ``.text`` ``[start, end)`` pairs, sorted,
    with ``range_versions[r]``; ``stub_array[k]``: what a hijacked slot of
    key ``k`` gets, ``stub_for(keys[k])`` (absolute; see
    :meth:`deopt.hijack.HijackTable.stub_for`). The ctypes arrays live as
    long as this object.
    """

    def __init__(self, versions, replaced, is_old, stub_for):
        keys, watched = [], []
        for v in versions:
            is_replaced = v.name in replaced
            if is_replaced or is_old(v):
                watched.append(v)
                flag = 1 if is_replaced else 0
                keys.extend((fm.return_address, flag, fm, v) for fm in v.frame_maps)
        keys.sort(key=lambda e: e[0])
        watched.sort(key=lambda v: v.code_range[0])
        self.keys = [e[0] for e in keys]
        self.hijack = [e[1] for e in keys]
        self.meta = [(e[2], e[3]) for e in keys]
        self.range_versions = watched
        nk, nr = len(keys), len(watched)
        self.key_array = (ctypes.c_uint64 * max(nk, 1))(*self.keys)
        self.hijack_array = (ctypes.c_uint64 * max(nk, 1))(*self.hijack)
        self.stub_array = (ctypes.c_uint64 * max(nk, 1))(*map(stub_for, self.keys))
        flat = [a for v in watched for a in v.code_range]
        self.range_array = (ctypes.c_uint64 * max(2 * nr, 2))(*flat)
        # Output counters, reused by each thread's plan (zeroed before it).
        self.counts_array = (ctypes.c_uint64 * max(_PER_KEY * nk, 1))()
        self.range_counts_array = (ctypes.c_uint64 * max(nr, 1))()
        self.zero_counts = [0] * len(self.counts_array)
        self.zero_range_counts = [0] * len(self.range_counts_array)

    def __bool__(self):
        return bool(self.range_versions)


class ScanBuffers:
    """Output arrays for :class:`ThreadHijacks` (slots, return addresses,
    kinds), kept by the runtime from one scan to the next: a scan should not
    allocate them (nor make a ctypes array type per stack depth) while the
    world is stopped. :meth:`take` hands out a set of at least ``n`` entries
    (capacities are powers of two); :meth:`reset` makes every set available
    again — call it only when no :class:`ThreadHijacks` of the last scan is
    used any more."""

    def __init__(self):
        self._sets = []
        self._used = 0

    def take(self, n):
        sets, i = self._sets, self._used
        while i < len(sets) and len(sets[i][0]) < n:
            i += 1
        if i == len(sets):
            cap = 1 << max(10, (max(n, 1) - 1).bit_length())
            sets.append(tuple((ctypes.c_uint64 * cap)() for _ in range(3)))
        # Keep the used ones at the front.
        sets[self._used], sets[i] = sets[i], sets[self._used]
        self._used += 1
        return sets[self._used - 1]

    def reset(self):
        self._used = 0

    def give_back(self):
        """Make the set the last :meth:`take` handed out available again."""
        self._used -= 1


class ThreadHijacks:
    """One stopped thread's frames of watched versions, as arrays.

    Made from ``n`` walker frames ``raw`` (:class:`unwinder.native.OutFrame`
    records as ``bytes``, or their absolute address; read only here) from
    index ``first`` on. ``tables``: the scan's :class:`WatchTables`; ``counts``: per key
    ``[hijack, not hijackable, already hijacked]`` (a flat list of
    :class:`deopt.native_hijack.KeyCounts`); ``range_counts``: per
    watched version, frames running it outside any site; ``m``: frames to
    hijack, in ``slots[:m]`` / ``ras[:m]`` / ``kinds[:m]`` (slot addresses
    rising, absolute; kinds index the keys); ``t``: frames already hijacked,
    at ``slots[cap - t:]`` etc. (their slot: where the stub sits). Lifetime:
    one stop-the-world; the arrays are ctypes arrays the native code wrote.
    ``state``: the thread's :class:`osrjit.native.threads.ThreadState` (set by the
    runtime's scan; None when not known); ``self_scan``: the
    :class:`SelfScan` whose answer this is (the thread planned it), or None.
    """

    __slots__ = ("thread", "tables", "meta", "counts", "range_counts", "m", "t", "cap",
                 "slots", "ras", "kinds", "state", "self_scan")

    def __init__(self, hijacker, raw, n, first, tables, thread, buffers=None):
        buffers = buffers or ScanBuffers()
        slots, ras, kinds = buffers.take(n)
        nk, nr = len(tables.keys), len(tables.range_versions)
        counts, range_counts = tables.counts_array, tables.range_counts_array
        counts[:] = tables.zero_counts                # (ctypes.memset would give the GIL away)
        range_counts[:] = tables.zero_range_counts
        m = hijacker.plan(raw, n, first, tables.key_array, tables.hijack_array, nk,
                          counts, slots, ras, kinds, len(slots),
                          tables.range_array, nr, range_counts)
        self._finish(tables, thread, slots, ras, kinds, m)

    @classmethod
    def planned(cls, tables, thread, slots, ras, kinds, m, counts=None, range_counts=None):
        """The answer of a plan already made into ``slots`` / ``ras`` /
        ``kinds`` and ``counts`` / ``range_counts`` (default: ``tables``'
        counters) by ``osrjit_hj_scan``."""
        self = cls.__new__(cls)
        self._finish(tables, thread, slots, ras, kinds, m, counts, range_counts)
        return self

    def _finish(self, tables, thread, slots, ras, kinds, m, counts=None, range_counts=None):
        self.thread = thread
        self.state = None          # the thread's ThreadState, when the scan knows it
        self.self_scan = None      # the SelfScan that made it, if the thread did
        self.tables = tables
        self.meta = tables.meta
        self.slots, self.ras, self.kinds = slots, ras, kinds
        self.cap = len(slots)
        self.m = m
        nk, nr = len(tables.keys), len(tables.range_versions)
        counts = tables.counts_array if counts is None else counts
        range_counts = tables.range_counts_array if range_counts is None else range_counts
        self.counts = counts[:_PER_KEY * nk]   # lists from here on
        self.range_counts = range_counts[:nr]
        self.t = self._translated()

    def _translated(self):
        counts, hijack = self.counts, self.tables.hijack
        return sum(counts[_PER_KEY * k + _ALREADY_HIJACKED]
                   for k in range(len(hijack)) if hijack[k])

    def executing(self):
        """Watched versions with a frame that runs them (not hijackable)."""
        out = {self.tables.range_versions[r] for r, c in enumerate(self.range_counts) if c}
        counts = self.counts
        out.update(v for k, (_fm, v) in enumerate(self.meta)
                   if counts[_PER_KEY * k + _NOT_HIJACKABLE])
        return out

    def versions(self):
        """Versions being replaced with pending frames here (new or already hijacked)."""
        counts, hijack = self.counts, self.tables.hijack
        return {v for k, (_fm, v) in enumerate(self.meta)
                if hijack[k] and (counts[_PER_KEY * k + _HIJACK]
                                  or counts[_PER_KEY * k + _ALREADY_HIJACKED])}

    def hijacked_per_kind(self):
        """``{kind: frames to hijack}`` for the kinds with any."""
        counts = self.counts
        return {k: counts[_PER_KEY * k + _HIJACK] for k in range(len(self.meta))
                if counts[_PER_KEY * k + _HIJACK]}

    def frames(self):
        """Every frame as the reference scan's :class:`~osrjit.stackscan.PendingFrame`
        (``slot`` None: already hijacked)."""
        out = []
        for i in range(self.m):
            fm, v = self.meta[self.kinds[i]]
            out.append(PendingFrame(v, fm, self.slots[i], self.ras[i], self.thread))
        for i in range(self.cap - self.t, self.cap):
            fm, v = self.meta[self.kinds[i]]
            out.append(PendingFrame(v, fm, None, self.ras[i], self.thread))
        return out

    def hijack_arrays(self):
        """``(slots, ras, kinds)`` of the frames to hijack as ``array('Q')``."""
        size = 8 * self.m
        out = []
        for a in (self.slots, self.ras, self.kinds):
            col = array("Q")
            col.frombytes(ctypes.string_at(a, size))
            out.append(col)
        return tuple(out)


class ScanPlan:
    """What a stop-the-world scan found on every thread (an
    :class:`osrjit.backend.Scan`): pending frames as
    :class:`~osrjit.stackscan.PendingFrame` in :attr:`pending` (reference
    walker, fallbacks) and as arrays in :attr:`threads` (:class:`ThreadHijacks`,
    the native scan); ``executing``: the old versions a frame runs outside a site."""

    def __init__(self):
        self.pending = []
        self.threads = []
        self.executing = set()
        #: No thread runs code of a watched version outside a site (every
        #: such frame is at a site, hijacked or about to be) and every walk
        #: was complete: after the hijack, no thread can execute old code
        #: except by a transfer that fails.
        self.quiet = False

    def __len__(self):
        return len(self.pending) + sum(h.m + h.t for h in self.threads)

    def versions(self):
        """The versions with pending frames (to check against their new versions)."""
        out = {p.version for p in self.pending}
        for h in self.threads:
            out |= h.versions()
        return out

    def frames(self):
        """Every pending frame as a :class:`~osrjit.stackscan.PendingFrame`."""
        out = list(self.pending)
        for h in self.threads:
            out.extend(h.frames())
        return out


class AnchorScan:
    """Scans of stopped threads from their anchors with one native call each
    (``osrjit_hj_scan``: walk and plan, no Python per frame, no copy).

    Owns the call's :class:`~deopt.native_hijack.ScanArgs`, a walk state and
    an output array of :attr:`FRAMES` frames, kept from one stop-the-world to
    the next. :meth:`prepare` points them at one scan's walker and tables,
    :meth:`translate` at the hijacked slots' translation; :meth:`thread`
    scans one thread. A thread it cannot do alone
    (no room, a table to grow, a frame for the Python walker, RSP outside the
    known bounds) gives None: the caller uses :func:`plan_native`.
    """

    #: Frames one call walks at most (a deeper stack takes the general path).
    FRAMES = 2048

    def __init__(self):
        self.args = ScanArgs()
        self._state = WalkState()
        self._out = (OutFrame * self.FRAMES)()
        self.args.state = ctypes.addressof(self._state)
        self.args.out = ctypes.addressof(self._out)
        self.args.out_cap = self.FRAMES

    def prepare(self, hijacker, walker, tables, buffers):
        """Point the call at ``walker`` (a :class:`unwinder.NativeWalker`;
        each scan pins it and takes its current tables), :class:`WatchTables`
        ``tables`` and :class:`ScanBuffers` ``buffers`` (kept alive by the
        caller while this object is used with them); before the world stops."""
        a = self.args
        a.walk_fn = walker.entry_address
        a.translation = 0
        self._translation = None
        a.keys = ctypes.addressof(tables.key_array)
        a.hijack = ctypes.addressof(tables.hijack_array)
        a.nkeys = len(tables.keys)
        a.counts = ctypes.addressof(tables.counts_array)
        a.ranges = ctypes.addressof(tables.range_array)
        a.nranges = len(tables.range_versions)
        a.range_counts = ctypes.addressof(tables.range_counts_array)
        self._hijacker, self._walker, self._tables = hijacker, walker, tables
        self._buffers = buffers

    def translate(self, translation):
        """Walk through the :class:`unwinder.TranslationArrays`
        ``translation`` (or None), kept alive here until the next call."""
        if translation is not self._translation:
            self.args.translation = translation.address if translation is not None else 0
            self._translation = translation

    def thread(self, state, thread, bounds):
        """``(ScanResult, ThreadHijacks or None)`` of the thread whose
        :class:`osrjit.native.threads.ThreadState` is ``state`` (stopped, scanned from
        its anchor), or None to take the general path; ``bounds``: its stack's
        ``(lo, hi)`` (absolute) or None."""
        if bounds is None or not self._tables:
            return None
        a = self.args
        slots, ras, kinds = self._buffers.take(self.FRAMES)
        a.slots, a.ras, a.kinds = (ctypes.addressof(slots), ctypes.addressof(ras),
                                   ctypes.addressof(kinds))
        a.cap = len(slots)
        a.lo, a.hi = bounds
        a.anchor = ctypes.addressof(state.anchor)
        # The walker's current tables (a walk of the general path may have
        # grown them since), alive while its pin is held.
        with self._walker.pin():
            a.tables = self._walker.tables_address
            status = self._hijacker.scan(ctypes.addressof(a))
        if status:
            self._buffers.give_back()
            return None
        found = ThreadHijacks.planned(self._tables, thread, slots, ras, kinds, a.m)
        return _scan_answer(found, a.end_reason), found


def _scan_answer(found, end_reason):
    """The :class:`ScanResult` of an ``osrjit_hj_scan`` that planned ``found``."""
    out = ScanResult()
    out.executing = found.executing()
    end = _TERMINAL_ENDS[end_reason]
    if end not in NORMAL_ENDS:
        out.incomplete = end
    return out


class SelfScan:
    """One thread's self-scan: it walks and plans its own stack while it parks
    for a stop-the-world, on its own core (whose caches hold its stack), so
    the stopper only reads the answer. HotSpot's thread-local handshakes and
    ZGC's stack watermarks let threads process their own stacks the same way.

    Owns the thread's :class:`~osrjit.native.selfscan.Handshake` (its address
    goes into the thread's :class:`osrjit.native.threads.ThreadState`; the states
    and the native calls are documented in :mod:`osrjit.native.selfscan`) and the
    arrays ``osrjit_hj_scan`` writes: a walk state, :data:`FRAMES` output
    frames, slots / return addresses / kinds and counters. Protocol, all by
    the stopper with the runtime's lock held: :meth:`request` before it stops
    the world (the walker pinned until the requests are withdrawn),
    :meth:`answer` once the thread is stopped (only for a thread parked at a
    poll), :meth:`leave_apply` for the hijacks, then, right after the
    release, ``osrjit_hj_cancel`` on every request (answered or not; an
    apply left is not touched), and :meth:`settle` once the apply is done.
    Lifetime: as long as the thread is attached and no apply is pending.
    """

    FRAMES = AnchorScan.FRAMES

    def __init__(self):
        self.block = Handshake()
        self.address = ctypes.addressof(self.block)
        self._state = WalkState()
        self._out = (OutFrame * self.FRAMES)()
        self.slots, self.ras, self.kinds = ((ctypes.c_uint64 * self.FRAMES)() for _ in range(3))
        self._counts = self._range_counts = None
        self.pending_lifo = None
        self._descriptors = None
        self._stubs = None
        a = self.block.args
        a.state, a.out, a.out_cap = ctypes.addressof(self._state), ctypes.addressof(self._out), \
            self.FRAMES
        a.slots, a.ras, a.kinds = (ctypes.addressof(x) for x in (self.slots, self.ras, self.kinds))
        a.cap = self.FRAMES

    def request(self, walker_entry, tables_address, translation, tables, bounds, thread_state):
        """Ask the thread of ``thread_state`` to scan itself when it next
        parks. ``walker_entry`` / ``tables_address``: the pinned walker's
        (absolute); ``translation``: :class:`unwinder.TranslationArrays` or
        None; ``tables``: the scan's :class:`WatchTables`; ``bounds``: the
        thread's stack ``(lo, hi)``. The caller keeps all of them alive until
        the request is withdrawn (``osrjit_hj_cancel``). Plain stores: the
        thread takes the request only when it sees STOP set after it took it
        (``osrjit_hj_park_scan``), and setting STOP (a locked instruction)
        publishes them first."""
        nk, nr = len(tables.keys), len(tables.range_versions)
        if self._counts is None or len(self._counts) < _PER_KEY * nk:
            self._counts = (ctypes.c_uint64 * max(_PER_KEY * nk, 16))()
        if self._range_counts is None or len(self._range_counts) < nr:
            self._range_counts = (ctypes.c_uint64 * max(nr, 16))()
        a = self.block.args
        a.walk_fn, a.tables = walker_entry, tables_address
        a.translation = translation.address if translation is not None else 0
        a.lo, a.hi = bounds
        a.anchor = ctypes.addressof(thread_state.anchor)
        a.keys, a.hijack, a.nkeys = (ctypes.addressof(tables.key_array),
                                     ctypes.addressof(tables.hijack_array), nk)
        a.counts = ctypes.addressof(self._counts)
        a.ranges, a.nranges = ctypes.addressof(tables.range_array), nr
        a.range_counts = ctypes.addressof(self._range_counts)
        self.block.status = -1
        self.block.state = HS_REQUESTED

    def answer(self, tables, thread):
        """``(ScanResult, ThreadHijacks)`` if the thread scanned itself
        completely, else None (it was not parked at a poll, or its walk needs
        the general path). The world is stopped."""
        b = self.block
        if b.state != HS_SCANNED or b.status != 0:
            return None
        found = ThreadHijacks.planned(tables, thread, self.slots, self.ras, self.kinds, b.args.m,
                                      self._counts, self._range_counts)
        found.self_scan = self
        return _scan_answer(found, b.args.end_reason), found

    def leave_apply(self, stubs, descriptors=None, lifo=None, lifo_entries=0, lifo_top=0):
        """Leave the writing of the hijacks this thread planned to the thread
        itself as it wakes (or to the next stopper), world stopped:
        ``stubs[kind]`` into every planned slot (``stubs``: a
        :attr:`WatchTables.stub_array`, kept here until the next apply),
        then, with ``lifo_entries`` (an absolute address :meth:`deopt.native_transfer.ThreadLifo.reserve`
        gave, 0: none), LIFO entries there by ``descriptors`` (the per-kind
        ``array('Q')``, kept here until the next apply: the thread reads it
        after the world is released) and ``lifo_top`` into ``lifo`` 's
        block. ``lifo`` is settled by :meth:`settle` once the block says
        APPLIED."""
        b = self.block
        self._descriptors = descriptors
        self._stubs = stubs
        b.stubs = ctypes.addressof(stubs)
        b.descriptors = descriptors.buffer_info()[0] if descriptors is not None else 0
        b.lifo_entries = lifo_entries
        b.lifo_block = lifo.address if lifo is not None and lifo_entries else 0
        b.lifo_top = lifo_top
        b.written = b.apply_start_ns = b.apply_end_ns = 0
        self.pending_lifo = lifo if lifo_entries else None
        b.state = HS_APPLY

    def applying(self):
        """Whether an apply was left and is not finished."""
        return self.block.state in (HS_APPLY, HS_APPLYING)

    def settle(self):
        """Once the apply left is done: its LIFO entries count as written
        (:meth:`deopt.native_transfer.ThreadLifo.settle`). Call it before the
        block is requested again."""
        if self.pending_lifo is not None and self.block.state == HS_APPLIED:
            self.pending_lifo.settle()
            self.pending_lifo = None


def plan_native(hijacker, walker, regs, *, caller_frame, index, tables, replaced, is_old,
                thread, translation, bounds, reference, buffers=None):
    """``(ScanResult, ThreadHijacks or None)`` of one stopped thread.

    ``hijacker``: a :class:`deopt.native_hijack.NativeHijacker` (only
    ``plan`` is called);
    ``walker``: a :class:`unwinder.NativeWalker`; ``regs``: the thread's
    registers (DWARF numbers); ``caller_frame``: the first frame is a caller
    frame (an anchor), not an interrupted pc; ``index``: :class:`VersionIndex`;
    ``tables``: the scan's :class:`WatchTables`; ``replaced`` / ``is_old`` /
    ``thread``: as :func:`~osrjit.stackscan.classify_frames`;
    ``translation``: the :class:`unwinder.ReturnAddressTable` of hijacked
    slots; ``bounds``: from :func:`scan_bounds`; ``reference()``: the
    reference frames (a :func:`unwinder.walk` iterator), used when the native
    walk needed Python; ``buffers``: :class:`ScanBuffers` to take the output
    arrays from (default: new ones). The ScanResult holds the executing versions and
    ``incomplete``; its ``pending`` (:class:`~osrjit.stackscan.PendingFrame`) is filled only when
    the walk needed Python (then the reference path classified it).
    """
    stack = bounds(regs[7], thread)
    # One native call without a copy (the common case), else the whole
    # walk_raw protocol (tables to grow, frames for the Python walker).
    walked = walker.walk_out(regs, innermost_is_caller=caller_frame, stack_bounds=stack,
                             translation=translation)
    if walked is not None:
        raw, n, end = walked
    else:
        walked = walker.walk_raw(regs, innermost_is_caller=caller_frame, stack_bounds=stack,
                                 translation=translation)
        if walked is None:
            return classify_frames(reference(), index.at, replaced, is_old, thread), None
        raw, end = walked
        n = len(raw) // 32
    out = ScanResult()
    first = 0
    if n and not caller_frame:
        first = 1
        pc = (ctypes.c_uint64.from_address(raw).value if isinstance(raw, int)
              else int.from_bytes(raw[:8], "little"))
        v = index.at(pc)                  # an interrupted pc: never at a site
        if v is not None and (v.name in replaced or is_old(v)):
            out.executing.add(v)
    found = None
    if tables and n > first:
        found = ThreadHijacks(hijacker, raw, n, first, tables, thread, buffers)
        out.executing |= found.executing()
    if not n:
        out.incomplete = "no frames"
    elif end not in NORMAL_ENDS:
        out.incomplete = end
    return out, found
