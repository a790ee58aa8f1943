"""A compile worker: LLVM's optimisation pipeline in a child process.

Why: every run of llvmlite 0.50's new-pass-manager pipeline leaks native
memory in the calling process — ``LLVMPY_CreatePassBuilder`` allocates a
``PassInstrumentationCallbacks`` that ``LLVMPY_DisposePassBuilder`` never
frees, and ``LLVMPY_RunNewModulePassManager`` registers a fresh
``StandardInstrumentations``' callbacks into it on every run (measured here:
about 60 KB per ``O2`` run, even for a one-instruction function; ``O0`` does
not leak). A runtime that replaces functions for days cannot afford that, so
``Runtime(compiler="worker")`` sends each version's IR to a child process
that parses, verifies, optimises and emits it (:func:`osrjit.compiling.emit_object`,
the very code the in-process path runs) and sends the object back. The child
is replaced after ``recycle_after`` compiles, which returns its leak to the
OS.

Protocol: requests and answers are pickled tuples, each framed by an 8-byte
little-endian length, over the child's stdin/stdout:
``("emit", module_ir, name, symbol, resume_symbol, opt_level)`` →
``("ok", object_bytes)`` or ``("error", message)``.

Lifetime: one worker per process (:func:`shared_worker`), started on first
use and shared by every runtime; it exits when its stdin closes (this
process exiting, or :meth:`CompileWorker.close`). Thread-safe: one request
at a time.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading

from ..errors import CompileError

__all__ = ["CompileWorker", "shared_worker"]

_LEN = struct.Struct("<Q")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CompileWorker:
    """A child process that emits objects (see the module docstring).

    ``recycle_after``: compiles per child before it is replaced.
    ``compiles``: total compiles served; ``restarts``: children started.
    """

    def __init__(self, *, recycle_after: int = 256):
        if recycle_after < 1:
            raise ValueError("recycle_after must be >= 1")
        self.recycle_after = recycle_after
        self._proc: subprocess.Popen | None = None
        self._served = 0
        self._lock = threading.Lock()
        self.compiles = 0
        self.restarts = 0

    def _start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "osrjit.native.compiler"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env, close_fds=True)
        self._served = 0
        self.restarts += 1

    def _stop(self):
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def emit(self, ir, opt_level: int) -> bytes:
        """Object bytes for :class:`~osrjit.abi.FunctionIR` ``ir`` at ``O<opt_level>``.

        Raises :class:`CompileError` with LLVM's diagnostic, or if the worker
        dies (it is restarted on the next request).
        """
        request = pickle.dumps(("emit", ir.module_ir, ir.name, ir.symbol, ir.resume_symbol,
                                opt_level))
        with self._lock:
            if self._proc is None or self._served >= self.recycle_after:
                self._stop()
                self._start()
            try:
                _write_frame(self._proc.stdin, request)
                answer = pickle.loads(_read_frame(self._proc.stdout))
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                code = self._proc.poll()
                self._stop()
                raise CompileError(f"{ir.name}: the compile worker failed "
                                   f"(exit status {code}): {e}") from None
            self._served += 1
            self.compiles += 1
        kind, payload = answer
        if kind == "ok":
            return payload
        raise CompileError(payload)

    def close(self):
        """Stop the child (a later :meth:`emit` starts another)."""
        with self._lock:
            self._stop()


_shared: CompileWorker | None = None
_shared_lock = threading.Lock()


def _forget_worker_in_child():
    # A fork child must not talk to the parent's worker over the pipes it
    # inherited (the parent may be using them): it starts its own.
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_worker_in_child)


def shared_worker() -> CompileWorker:
    """The process's compile worker (made on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CompileWorker()
        return _shared


def _write_frame(stream, data: bytes):
    stream.write(_LEN.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream) -> bytes:
    header = stream.read(_LEN.size)
    if len(header) < _LEN.size:
        raise EOFError("the compile worker closed its output")
    (size,) = _LEN.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the compile worker's answer was cut short")
    return data


def _serve(stdin, stdout):
    """The child's loop: answer requests until stdin closes."""
    from ..abi import FunctionIR
    from ..compiling import emit_object, target_machine
    machines = {}
    while True:
        try:
            request = pickle.loads(_read_frame(stdin))
        except EOFError:
            return
        _, module_ir, name, symbol, resume_symbol, opt_level = request
        tm = machines.get(opt_level)
        if tm is None:
            tm = machines[opt_level] = target_machine(opt_level)
        ir = FunctionIR(name=name, params=(), module_ir=module_ir, symbol=symbol)
        assert ir.resume_symbol == resume_symbol
        try:
            answer = ("ok", emit_object(ir, tm, opt_level))
        except CompileError as e:
            answer = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the parent, the child goes on
            answer = ("error", f"{name}: {type(e).__name__}: {e}")
        _write_frame(stdout, pickle.dumps(answer))


if __name__ == "__main__":
    # Requests on fd 0, answers on fd 1; nothing else may write to fd 1.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, out)
