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

__all__ = ["describe_replacement", "replay_call", "site_line"]


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


def _site_words(version, site_id: int) -> str:
    site = version.sites.get(site_id)
    if site is None:
        return f"site {site_id}"
    callee = f" {site.callee}" if site.callee and site.kind.value in ("call", "external") else ""
    return f"site {site_id} ({site.kind.value}{callee})"


def describe_replacement(rt, threads, names: Sequence[str], old: Mapping[str, object],
                         new: Sequence[object], *, number: int, requested_at: int,
                         sources: Sequence[str], source_of: Mapping[int, int]) -> list[str]:
    """Lines saying what replacement ``number`` (1-based: ``versions[number]``
    came in) met, read right after ``replace()`` returned.

    ``old``: name -> the version that was current before; ``new``: the
    versions ``replace()`` returned; ``requested_at``: the instruction count
    at the request; ``sources``: the sweep's versions; ``source_of``:
    version id -> index of the source that compiled it.
    """
    import unwinder
    from osrjit.emulated.backend import done

    pause = rt.last_pause
    by_name = {v.name: v for v in new}
    arrows = ", ".join(
        f"{name} versions[{source_of.get(old[name].id, '?')}] -> versions[{number}] "
        f"(#{old[name].id} -> #{by_name[name].id})" if name in old and name in by_name
        else f"{name} (new)" for name in names)
    stopped = requested_at + (pause.time_to_safepoint_instructions or 0)
    lines = [f"replacement {number}: {arrows}; requested after {requested_at} instructions, "
             f"world stopped after {stopped}; {pause.frames_hijacked} frames hijacked, "
             f"{pause.stopped_async} threads stopped outside a poll"]
    m = rt.machine
    for t in threads:
        if done(t):
            lines.append(f"  thread {t.id}: already finished")
            continue
        innermost, count = None, 0
        for frame in unwinder.walk(t.regs(), m.memory, m.space, caller_frame=False):
            v = rt.version_at(frame.lookup_pc)
            if v is not None and v.name in names and v is not rt.current(v.name):
                count += 1
                if innermost is None:
                    innermost = (frame, v)
        if innermost is None:
            lines.append(f"  thread {t.id}: no frame of an old version of {', '.join(names)}")
            continue
        frame, v = innermost
        fm = v.frame_map_at(frame.pc) if frame.lookup_pc != frame.pc else None
        if fm is None:
            where = (f"at .text+{frame.pc - v.code_range[0]:#x}, at no site "
                     f"(stopped there by the emulated signal)")
        else:
            state = "hijacked" if frame.translated else "not hijacked"
            where = (f"at {_site_words(v, fm.site_id)}, {state}, "
                     f"{site_line(v, fm.site_id, sources, source_of.get(v.id))}")
        lines.append(f"  thread {t.id}: innermost of its {count} old frames: "
                     f"{v.name}#{v.id} {where}")
    return lines


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
