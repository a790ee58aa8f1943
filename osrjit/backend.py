"""What the runtime asks of a backend: the seam between policy and machine.

:class:`osrjit.Runtime` writes every policy once — the function table, the
services, which frames are transferred, the ``replace()`` algorithm,
accounting, reclamation and stats. A backend runs code: the native one
(:mod:`osrjit.native`: LLJIT, real threads, signals) and the emulated one
(:mod:`osrjit.emulated`: a unicorn CPU with deterministic threads) implement
the small protocol below and nothing of the policy.

One ``replace()`` drives a :class:`Pause`::

    link new versions (unpublished)          Backend.link
    plan everything that needs no stopped stack   Backend.pause(names, new)
    stop every other thread                  Pause.stop
    find the frames of those functions       Pause.scan      -> Scan
    (the runtime checks compatibility, records the new versions as current)
    make them callable                       Pause.publish
    point every pending return at the stub   Pause.hijack (checks every slot first)
    (on a failure: the old versions current again   Pause.withdraw, Backend.publish)
    let the threads go                       Pause.release
    free what nothing can return into        Backend.free (runtime's reclaim)

``collect()`` is the same pause with no new versions (stop, scan, release).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .abi import FunctionIR
from .versions import Function, Version

__all__ = ["Backend", "Pause", "Scan", "PauseReport", "FAST", "REFERENCE", "PATHS",
           "PATH_ALIASES", "path_option"]

#: The two implementations of a runtime path (``Runtime(transfer=...)``,
#: ``Runtime(walker=...)``), named for their role: the fast one (native code,
#: the default) and the reference one (Python, what the fast one is checked against).
FAST = "fast"
REFERENCE = "reference"
PATHS = (FAST, REFERENCE)
#: Earlier spellings, still accepted: the language each path is written in.
PATH_ALIASES = {"native": FAST, "python": REFERENCE}


def path_option(option: str, value: str) -> str:
    """The role name (:data:`FAST` or :data:`REFERENCE`) for ``option``'s
    ``value``, which may be an alias (:data:`PATH_ALIASES`); ValueError else."""
    role = PATH_ALIASES.get(value, value)
    if role not in PATHS:
        raise ValueError(f"{option} must be one of {PATHS} (or the aliases "
                         f"{tuple(PATH_ALIASES)}), got {value!r}")
    return role


class Scan(Protocol):
    """What a pause's scan found on every stopped stack.

    ``executing``: versions a frame runs outside any site (or whose entry a
    signal-stopped thread holds in a register): kept loaded. ``quiet``: no
    thread runs code of a watched version outside a site and every walk was
    complete. ``len()``: frames found at sites of the replaced functions."""
    executing: set
    quiet: bool

    def versions(self) -> set:
        """The versions with frames at a site (checked against their new versions)."""

    def __len__(self) -> int: ...


class Pause(Protocol):
    """One stop-the-world of a backend (made by :meth:`Backend.pause`)."""

    #: Threads stopped without reaching a poll (signal, emulated stop).
    stopped_async: int
    #: Threads whose stacks were scanned, the caller's included.
    threads: int

    def stop(self, timeout: float | None) -> None:
        """Stop every other thread running JIT code (SafepointTimeout: nothing changed)."""

    def try_stop(self) -> bool:
        """Stop the world only if no other thread runs JIT code (nobody is
        interrupted or waited for); False — nothing to release — otherwise."""

    def abandon(self) -> None:
        """Undo what :meth:`Backend.pause` prepared, when :meth:`stop` failed."""

    def scan(self) -> Scan: ...

    def publish(self, versions: Iterable[Version]) -> None:
        """Make the new versions callable (they are already current in the table)."""

    def hijack(self, scan: Scan) -> None:
        """Point the return address of every frame of ``scan`` at the deopt stub."""

    def withdraw(self) -> None:
        """The runtime undid :meth:`publish` (a later step failed; the old
        versions are current again): write nothing more for the new ones."""

    def finish(self) -> None:
        """The last writes of the pause (also when a step failed), before
        the release is timed."""

    def release(self) -> None:
        """Let the threads go (also when a step failed), then what must
        happen before the runtime returns."""

    def instructions(self) -> int | None:
        """Emulated instructions executed so far (None natively): pause figures."""


class Backend(Protocol):
    #: ``"native"`` or ``"emulated"``.
    name: str
    #: How frames are rebuilt and stacks walked: :data:`FAST` or :data:`REFERENCE`.
    transfer: str
    walker: str
    #: The hijack table (:class:`deopt.hijack.HijackTable`): every pending return.
    table: object
    #: The user's bit of the safepoint flag (0 or 1), :attr:`osrjit.Runtime.safepoint_flag`.
    user_flag: int
    #: Seconds a pause waits for threads to stop.
    safepoint_timeout: float
    #: Whether the runtime may recheck kept versions from a background
    #: thread (:mod:`osrjit.reclaim`; native), or only from the thread
    #: driving it (emulated).
    background_reclaim: bool
    #: Whether a transfer may free its old version at once (native), or asks
    #: for a reclaim later (:meth:`request_reclaim`, emulated: between quanta).
    reclaim_in_transfer: bool
    #: Whether reference-language functions start with the stack check
    #: (:meth:`osrjit.ir.BodyBuilder.stack_check`): natively, not emulated.
    stack_checks: bool

    def new_cell(self, name: str):
        """A slot cell for a function compiled for the first time."""

    def link(self, irs: list[FunctionIR], cells: Mapping[str, object]) -> list[Version]:
        """Emit and load ``irs`` as new versions, none of them published
        (all-or-nothing: CompileError/FrameMapError and nothing stays loaded).
        ``cells``: the slot cells of functions new in this batch."""

    def discard(self, version: Version) -> None:
        """Unload a version that was never published."""

    def publish(self, versions: Iterable[Version]) -> None:
        """Make versions current outside a pause (compile): slot stores, call patches."""

    def pause(self, names: Iterable[str] = (), new: Mapping[str, Version] | None = None) -> Pause:
        """Plan a pause replacing ``names`` by ``new`` (or, with no names, a collection)."""

    def can_free(self, version: Version) -> bool:
        """Whether the backend lets an old version with no frames go now."""

    def keep(self, version: Version) -> None:
        """An old version stays loaded (the emulated backend watches its code)."""

    def free(self, version: Version) -> None:
        """Unload an old version nothing can run."""

    def entry(self, fn: Function) -> Callable:
        """The Python callable running ``fn``'s current version."""

    def request_reclaim(self, version: Version) -> None:
        """A transfer left an old version maybe free: reclaim when safe."""

    def before_reclaim(self) -> None:
        """Account what the backend learned since (native transfers taken)."""

    def counters(self) -> dict:
        """Backend figures for :meth:`osrjit.Runtime.stats`."""

    def closing(self, timeout: float):
        """Context manager around :meth:`close`: :class:`osrjit.RuntimeBusy`
        while code runs that the close would unmap (waiting up to
        ``timeout`` seconds for other threads to leave it)."""

    def close(self) -> None:
        """Release everything (inside :meth:`closing`)."""

    def before_fork(self) -> None:
        """Before ``fork()``, the runtime lock held."""

    def after_fork_in_parent(self) -> None: ...

    def after_fork_in_child(self) -> None:
        """In the child: only the forking thread exists; forget the others."""


@dataclass(frozen=True)
class PauseReport:
    """The last ``replace()``'s stop-the-world (:attr:`osrjit.Runtime.last_pause`).

    Seconds (``time.perf_counter``): ``time_to_safepoint_seconds`` (request
    -> every other thread stopped), ``scan_seconds`` (-> every stack walked
    and the versions checked), ``hijack_seconds`` (-> published, slots
    written), ``pause_seconds`` (request -> release issued). ``threads``:
    stacks scanned; ``frames_hijacked``: frames found at sites;
    ``stopped_async``: threads stopped without reaching a poll; ``quiet``:
    no thread ran code of a watched version outside a site and every walk
    was complete (then nothing can run old code after the release but a
    failed transfer, and the native backend patches direct calls in old
    code after the release rather than in the pause). Emulated
    runs add the same spans in executed instructions
    (``time_to_safepoint_instructions``, ``pause_instructions``; None
    natively).
    """
    time_to_safepoint_seconds: float
    scan_seconds: float
    hijack_seconds: float
    pause_seconds: float
    threads: int
    frames_hijacked: int
    stopped_async: int
    quiet: bool
    time_to_safepoint_instructions: int | None = None
    pause_instructions: int | None = None
