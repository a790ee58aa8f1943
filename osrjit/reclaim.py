"""Automatic reclamation: old versions freed without ``collect()``.

An old version stays loaded while something may still run it: a pending
return (a hijacked frame that has not returned yet), or a frame that a stop
found *executing* it outside a site (a thread the signal stopped inside old
code, an old entry address in a stopped thread's register, a walk that did
not reach the thread's first frame). The runtime rechecks those versions

* when a replacement or :meth:`osrjit.Runtime.collect` stops the world again,
* when :meth:`osrjit.Runtime.stats` is read,
* when a thread leaves JIT code while a version is kept by an executing
  frame (the entry's return to Python wakes the :class:`Reclaimer`), and
* at a low-rate background pass (every :attr:`Reclaimer.interval` seconds;
  pending returns the fast transfer took are accounted there).

A thread that stays in JIT code is seen to have moved on by a background
pass's stop, where it parks at its next poll (or the signal stops it).

A recheck first accounts the transfers taken since and frees what nothing
can return into. A version still kept because a frame executed it is then
rescanned: *quietly* when no other thread runs JIT code (the stop flag is
raised, every thread is seen outside JIT code or parked, the stacks are
scanned and the flag cleared — no thread is interrupted or waited for),
else, on a background tick only, by a real stop-the-world bounded by
:attr:`Reclaimer.stop_timeout` (a stop that does not complete in time
modifies nothing and is retried on the next tick). Code is freed only by
a scan that proves no thread can return into or is executing it.
"""
from __future__ import annotations

import threading
import time
import weakref

__all__ = ["Reclaimer"]

#: Seconds between two background passes while a version is kept.
DEFAULT_INTERVAL = 1.0
#: Seconds a background stop-the-world waits for the threads before it gives up.
STOP_TIMEOUT = 0.1
#: Least seconds between two passes woken by threads leaving JIT code.
MIN_WAKE_GAP = 0.01


class Reclaimer:
    """The background half of reclamation for one runtime.

    A daemon thread (``osrjit-reclaim``) runs only while some old version
    is kept by a pending return or an executing frame: :meth:`want` starts
    it, it ends by itself once a pass finds nothing kept, and :meth:`close`
    (the runtime's) stops and joins it. It reaches its runtime through a
    weak reference, so it never keeps a dropped runtime alive.

    ``interval``: seconds between background passes (None: no thread; the
    other rechecks still happen). :attr:`wanted` is read without a lock by
    every return from JIT code to Python (one attribute load): it is set
    only while a version is kept by an *executing* frame, the case a thread
    leaving JIT code may end (pending returns are accounted at the ticks).
    """

    def __init__(self, runtime, interval: float | None = DEFAULT_INTERVAL):
        if interval is not None and not interval > 0:
            raise ValueError(f"reclaim_interval must be positive seconds or None, got {interval!r}")
        self.interval = interval
        self.stop_timeout = STOP_TIMEOUT
        #: A version is kept by an executing frame: returns to Python wake the thread.
        self.wanted = False
        #: Passes the thread ran.
        self.passes = 0
        #: The last exception a pass raised (the pass is retried), or None.
        self.last_error: BaseException | None = None
        self._runtime = weakref.ref(runtime)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False
        self._closed = False

    def want(self, executing: bool = False) -> None:
        """An old version is kept (``executing``: by a frame executing it):
        make sure a pass comes (any thread)."""
        with self._lock:
            if self._closed or self.interval is None:
                return
            self.wanted = executing
            self._again = True
            if self._thread is None or not self._thread.is_alive():   # none yet, or forked
                self._thread = threading.Thread(target=self._run, name="osrjit-reclaim",
                                                daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """A thread left JIT code: pass soon (no stop-the-world)."""
        self._wake.set()

    def close(self) -> None:
        """Stop the thread and wait for it (idempotent). The caller may hold
        the runtime lock: a thread waiting for it gives up within 0.05 s."""
        with self._lock:
            self._closed = True
            self.wanted = False
            thread, self._thread = self._thread, None
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def after_fork_in_child(self) -> None:
        """In a fork child (runtime lock held): the thread did not survive,
        and its lock or event may have been held by a thread that did not
        either. Made anew; the next :meth:`want` starts a thread."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None

    def _run(self):
        while not self._closed:
            woken = self._wake.wait(self.interval)
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                self._again = False
            if not self._pass(stop=not woken):
                with self._lock:
                    if not self._again:
                        if self._thread is threading.current_thread():
                            self._thread = None
                            self.wanted = False
                        return
            if woken:
                # Threads leaving JIT code wake us at their rate: passes at ours.
                time.sleep(MIN_WAKE_GAP)

    def _pass(self, *, stop: bool) -> bool:
        """One recheck under the runtime lock; whether a version is still kept."""
        rt = self._runtime()
        if rt is None:
            return False
        lock = rt._lock
        while not lock.acquire(timeout=0.05):
            if self._closed:
                return False
        try:
            if self._closed:
                return False
            self.passes += 1
            try:
                still = rt._reclaim_pass(stop=stop, timeout=self.stop_timeout)
                self.wanted = still and rt._kept_executing()
                return still
            except Exception as e:  # noqa: BLE001 - kept for inspection; the next pass retries
                self.last_error = e
                return True
        finally:
            lock.release()
