"""What a failing sweep point says: where its replacements found the threads, and its replay call.

:func:`describe_replacement` reads an emulated runtime right after a
``replace()`` of a sweep returned — the machine is exactly as the pause left
it, since emulated threads run only inside :meth:`EmulatedRuntime.run` — and
names, per thread, the innermost frame of an old version of a replaced
function: its version, its site (id, kind, callee) and the reference-language
source line of that site (or, for IR written by hand, the line of its
statepoint in the version's IR). :func:`replay_call` writes the one Python call
that runs just that point again (the emulator is deterministic).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ReplacementSeen", "FunctionReplaced", "ThreadSeen", "describe_replacement",
           "replay_call", "site_line"]


@dataclass(frozen=True)
class FunctionReplaced:
    """One function of a replacement: ``name``, the sweep's source indexes
    (``versions[old_source] -> versions[new_source]``) and the runtime's
    version ids (``#old_version -> #new_version``); ``old_*`` are None for a
    function the replacement brought in first."""
    name: str
    old_source: int | None
    new_source: int
    old_version: int | None
    new_version: int

    def __str__(self):
        if self.old_version is None:
            return f"{self.name} (new in versions[{self.new_source}])"
        return (f"{self.name} versions[{self.old_source}] -> versions[{self.new_source}] "
                f"(#{self.old_version} -> #{self.new_version})")


@dataclass(frozen=True)
class ThreadSeen:
    """One emulated thread right after a replacement.

    ``old_frames``: its frames in old versions of the replaced functions.
    Of the innermost of them: ``version`` (``"sum#1"``), ``site_id`` and
    ``site`` (kind and callee: ``"call sum"``, ``"poll"``; both None when
    the frame is at no site — stopped there by the emulated signal — and
    then ``text_offset`` is its pc in bytes from the version's ``.text``),
    ``hijacked`` (its return address points at the deopt stub), ``line``
    (:func:`site_line`). ``finished``: the thread had already returned.
    """
    thread: int
    finished: bool = False
    old_frames: int = 0
    version: str | None = None
    site_id: int | None = None
    site: str | None = None
    hijacked: bool = False
    line: str | None = None
    text_offset: int | None = None

    def __str__(self):
        if self.finished:
            return f"thread {self.thread}: already finished"
        if self.version is None:
            return f"thread {self.thread}: no frame of an old version"
        head = f"thread {self.thread}: innermost of its {self.old_frames} old frames: {self.version}"
        if self.site_id is None:
            return f"{head} at .text+{self.text_offset:#x}, at no site (stopped by the signal)"
        state = "hijacked" if self.hijacked else "not hijacked"
        return f"{head} at site {self.site_id} ({self.site}), {state}, {self.line}"


@dataclass(frozen=True)
class ReplacementSeen:
    """What replacement ``number`` of a sweep point met (``versions[number]``
    came in): the ``functions`` replaced, the instruction counts at the
    request and when the world had stopped, the pause's figures, and each
    thread (:class:`ThreadSeen`)."""
    number: int
    functions: tuple[FunctionReplaced, ...]
    requested_at: int
    stopped_at: int
    frames_hijacked: int
    stopped_async: int
    threads: tuple[ThreadSeen, ...]

    def lines(self) -> list[str]:
        head = (f"replacement {self.number}: {', '.join(map(str, self.functions))}; requested "
                f"after {self.requested_at} instructions, world stopped after {self.stopped_at}; "
                f"{self.frames_hijacked} frames hijacked, {self.stopped_async} threads stopped "
                f"outside a poll")
        return [head] + [f"  {t}" for t in self.threads]

    def __str__(self):
        return "\n".join(self.lines())


def site_line(version, site_id: int, sources: Sequence[str], source_index: int | None) -> str:
    """Where site ``site_id`` of ``version`` is: ``line L of versions[i]: <text>``
    for a reference-language site, ``IR line L: <text>`` otherwise."""
    site = version.sites.get(site_id)
    if site is not None and site.line is not None and source_index is not None:
        lines = sources[source_index].splitlines()
        text = lines[site.line - 1].strip() if 0 < site.line <= len(lines) else "?"
        return f"line {site.line} of versions[{source_index}]: {text}"
    needle = f"(i64 {site_id}, "
    for number, line in enumerate(version.ir.module_ir.splitlines(), 1):
        if "gc.statepoint" in line and needle in line:
            return f"IR line {number}: {line.strip()}"
    return "no source or IR line known"


def _site_words(version, site_id: int) -> str | None:
    site = version.sites.get(site_id)
    if site is None:
        return None
    callee = f" {site.callee}" if site.callee and site.kind.value in ("call", "external") else ""
    return f"{site.kind.value}{callee}"


def describe_replacement(rt, threads, names: Sequence[str], old: Mapping[str, object],
                         new: Sequence[object], *, number: int, requested_at: int,
                         sources: Sequence[str], source_of: Mapping[int, int]) -> ReplacementSeen:
    """What replacement ``number`` met, read right after ``replace()`` returned.

    ``old``: name -> the version that was current before; ``new``: the
    versions ``replace()`` returned; ``requested_at``: the instruction count
    at the request; ``sources``: the sweep's versions; ``source_of``:
    version id -> index of the source that compiled it.
    """
    import unwinder
    from osrjit.emulated.backend import done

    pause = rt.last_pause
    by_name = {v.name: v for v in new}
    functions = tuple(
        FunctionReplaced(name, source_of.get(old[name].id) if name in old else None, number,
                         old[name].id if name in old else None, by_name[name].id)
        for name in names if name in by_name)
    m = rt.machine
    seen = []
    for t in threads:
        if done(t):
            seen.append(ThreadSeen(t.id, finished=True))
            continue
        innermost, count = None, 0
        for frame in unwinder.walk(t.regs(), m.memory, m.space, caller_frame=False):
            v = rt.version_at(frame.lookup_pc)
            if v is not None and v.name in names and v is not rt.current(v.name):
                count += 1
                if innermost is None:
                    innermost = (frame, v)
        if innermost is None:
            seen.append(ThreadSeen(t.id))
            continue
        frame, v = innermost
        fm = v.frame_map_at(frame.pc) if frame.lookup_pc != frame.pc else None
        if fm is None:
            seen.append(ThreadSeen(t.id, old_frames=count, version=f"{v.name}#{v.id}",
                                   text_offset=frame.pc - v.code_range[0]))
        else:
            seen.append(ThreadSeen(t.id, old_frames=count, version=f"{v.name}#{v.id}",
                                   site_id=fm.site_id, site=_site_words(v, fm.site_id),
                                   hijacked=bool(frame.translated),
                                   line=site_line(v, fm.site_id, sources, source_of.get(v.id))))
    stopped = requested_at + (pause.time_to_safepoint_instructions or 0)
    return ReplacementSeen(number, functions, requested_at, stopped, pause.frames_hijacked,
                           pause.stopped_async, tuple(seen))


def _callable_expr(fn: Callable) -> str:
    """An expression naming ``fn`` (importing its module), or a placeholder
    ``<...>`` for a lambda or a local function, which no expression reaches."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and qualname and "<" not in qualname:
        return f"__import__({module!r}, fromlist=['_']).{qualname}"
    code = getattr(fn, "__code__", None)
    where = f" at {code.co_filename}:{code.co_firstlineno}" if code else ""
    name = getattr(fn, "__name__", type(fn).__name__).strip("<>")
    return f"<{name}{where}: pass the same callable>"


def replay_call(sweep: Callable, versions: Sequence[str], entry: str, args: tuple,
                options: Mapping[str, object], k: int) -> str:
    """``osrjit.testing.sweep(...)`` with the arguments of this sweep that
    differ from the defaults and ``points=[k]``: run it (after ``import
    osrjit.testing``) to replay point ``k``. Sources are written out in full."""
    defaults = {name: p.default for name, p in inspect.signature(sweep).parameters.items()
                if p.default is not inspect.Parameter.empty}
    parts = [repr(list(versions)), repr(entry), repr(tuple(args))]
    for name, value in options.items():
        if name in ("points", "progress") or value == defaults.get(name, object()):
            continue
        if callable(value):
            parts.append(f"{name}={_callable_expr(value)}")
        elif name == "poll_free":
            parts.append(f"{name}={tuple(value)!r}")
        else:
            parts.append(f"{name}={value!r}")
    parts.append(f"points=[{k}]")
    return f"osrjit.testing.sweep({', '.join(parts)})"
