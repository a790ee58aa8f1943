"""The stop-the-world stack scan on the native walker.

Same answer as walking each stopped thread with :func:`unwinder.walk` and
classifying with :func:`osrjit.stackscan.classify_frames` — the reference,
which a test compares against — but the walk is
:meth:`unwinder.NativeWalker.walk_arrays` (columns, no per-frame objects) and
the classification reads those columns:

* versions are found by bisection in one sorted array of ``.text`` ranges
  built per scan (:class:`VersionIndex`);
* a frame's lookup pc is ``pc − 1`` except for the innermost frame of a walk
  started from exact registers (a signal context);
* hijacked slots are seen through a :class:`unwinder.ReturnAddressTable`
  mirror of the hijack table built per scan;
* stack bounds come from one read of ``/proc/self/maps`` per scan.

A walk the native code could not do entirely by itself (a frame left to the
Python walker, which may have guessed by frame pointers) is redone by the
reference path, so the answer never depends on the fast path's limits.
"""
import bisect

from unwinder.modules import read_proc_maps

from .stackscan import NORMAL_ENDS, ScanResult, classify_frames

__all__ = ["VersionIndex", "scan_bounds", "classify_native"]


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


def classify_native(walker, regs, *, caller_frame, index, replaced, is_old, thread,
                    translation, bounds, reference):
    """:class:`~osrjit.stackscan.ScanResult` of one stopped thread, with its
    pending frames as plain tuples ``(version, frame map, slot, pc, thread)``
    (the fields of :class:`~osrjit.stackscan.PendingFrame`; no object per frame).

    ``walker``: a :class:`unwinder.NativeWalker`; ``regs``: the thread's
    registers (DWARF numbers); ``caller_frame``: the first frame is a caller
    frame (an anchor or a capture), not an interrupted pc; ``index``:
    :class:`VersionIndex`; ``replaced`` / ``is_old`` / ``thread``: as
    :func:`~osrjit.stackscan.classify_frames`; ``translation``: the
    :class:`unwinder.ReturnAddressTable` of hijacked slots; ``bounds``: from
    :func:`scan_bounds`; ``reference()``: the reference frames (a
    :func:`unwinder.walk` iterator), used when the native walk needed Python.
    """
    arrays = walker.walk_arrays(regs, innermost_is_caller=caller_frame,
                                stack_bounds=bounds(regs[7], thread), translation=translation)
    if arrays.python:
        out = classify_frames(reference(), index.at, replaced, is_old, thread)
        out.pending = [(p.version, p.frame_map, p.slot, p.pc, p.thread) for p in out.pending]
        return out
    out = ScanResult()
    pcs, slots, translated = arrays.pcs, arrays.ra_slots, arrays.translated
    at = index.at
    executing, pending = out.executing, out.pending
    first = 0
    if pcs and not caller_frame:
        first = 1
        v = at(pcs[0])                   # an interrupted pc: never at a site
        if v is not None and (v.name in replaced or is_old(v)):
            executing.add(v)
    # Classify each distinct return address once (a recursion repeats a few
    # of them thousands of times), then visit only the frames that matter.
    info = {}
    for pc in set(pcs[first:]):
        v = at(pc - 1)
        if v is not None and (v.name in replaced or is_old(v)):
            info[pc] = (v, v.frame_map_at(pc), v.name in replaced)
    if info:
        for i in [i for i, pc in enumerate(pcs) if pc in info and i >= first]:
            pc = pcs[i]
            v, fm, is_replaced = info[pc]
            if i in translated:          # already hijacked: seen through
                if fm is None:
                    executing.add(v)
                elif is_replaced:
                    pending.append((v, fm, None, pc, thread))
            elif fm is not None and is_replaced and i > 0 and slots[i - 1]:
                pending.append((v, fm, slots[i - 1], pc, thread))
            else:
                executing.add(v)
    if not pcs:
        out.incomplete = "no frames"
    elif arrays.end_reason not in NORMAL_ENDS:
        out.incomplete = arrays.end_reason
    return out
