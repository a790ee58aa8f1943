"""Which frames of a stopped thread must be hijacked, and which versions still run.

Shared by the native runtime (:class:`osrjit.Runtime`) and the emulated one
(:class:`osrjit.emulated.EmulatedRuntime`): both walk a stopped thread with
:func:`unwinder.walk` and hand the frames to :func:`classify_frames`.

A frame of version ``v`` (found by its lookup pc) is, in order of the tests:

* a **pending return to create**: ``v``'s function is being replaced, the
  frame is a caller frame suspended at a site (its return address has a frame
  map) and its callee's return-address slot is known — hijack ``slot``;
* an **existing pending return**: it is already hijacked (the walk translated
  the stub address back), nothing to write — a transfer always targets the
  function's current version;
* otherwise, if ``v`` is being replaced or is an old version, it **executes**
  ``v``'s code (an innermost frame interrupted at an arbitrary instruction, or
  a call that is not a site), so ``v`` must stay loaded.

A walk that ends for another reason than "return address undefined" (the
thread's first frame), or guesses a frame by frame pointers (JIT code keeps
none), may hide frames of old versions below: :attr:`ScanResult.incomplete`
says why, and the caller then frees no old version this time.
"""
from dataclasses import dataclass, field

from unwinder.walk import END_RA_UNDEFINED, FALLBACK_FRAME_POINTER

__all__ = ["PendingFrame", "ScanResult", "classify_frames"]

#: Walk end reasons that mean "reached the thread's first frame".
NORMAL_ENDS = (END_RA_UNDEFINED,)


@dataclass(frozen=True)
class PendingFrame:
    """A frame of an old version suspended at a site.

    ``version``: the runtime's version object; ``frame_map``: its
    :class:`~deopt.framemaps.FrameMap` at ``pc`` (absolute return address);
    ``slot``: absolute address of the 8-byte slot holding ``pc`` (None: the
    slot is already hijacked); ``thread``: the backend's thread identifier.
    """
    version: object
    frame_map: object
    slot: int | None
    pc: int
    thread: object


@dataclass
class ScanResult:
    """:func:`classify_frames`' answer for one thread."""
    pending: list = field(default_factory=list)
    executing: set = field(default_factory=set)
    incomplete: str | None = None


def classify_frames(frames, version_at, replaced, is_old, thread=None) -> ScanResult:
    """Classify the frames of one walk (innermost first; see the module docstring).

    ``version_at(address)``: the version whose code holds absolute
    ``address``, or None. ``replaced``: names of the functions being replaced
    (empty for a re-scan). ``is_old(version)``: whether it is no longer its
    function's current version.
    """
    out = ScanResult()
    prev = frame = None
    guessed = False
    for frame in frames:
        guessed = guessed or frame.fallback == FALLBACK_FRAME_POINTER
        v = version_at(frame.lookup_pc)
        if v is not None and (v.name in replaced or is_old(v)):
            fm = v.frame_map_at(frame.pc) if frame.lookup_pc != frame.pc else None
            if (fm is not None and prev is not None and v.name in replaced
                    and (frame.translated or prev.ra_slot is not None)):
                out.pending.append(PendingFrame(v, fm, None if frame.translated else prev.ra_slot,
                                                frame.pc, thread))
            elif not (fm is not None and frame.translated):
                out.executing.add(v)
        prev = frame
    if frame is None:
        out.incomplete = "no frames"
    elif frame.end_reason not in NORMAL_ENDS:
        out.incomplete = frame.end_reason
    elif guessed:
        out.incomplete = "a frame was found by frame pointers"
    return out
