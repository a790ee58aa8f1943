"""The compile worker: the same objects as in-process compilation, from a child process."""
import pytest

from osrjit import Runtime, lang
from osrjit.native.compiler import CompileWorker
from osrjit.errors import CompileError
from osrjit.compiling import emit_object, target_machine

FIB = """
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)
"""


def test_worker_emits_the_same_object_as_the_runtime_process():
    (ir,) = lang.compile_source(FIB)
    worker = CompileWorker()
    try:
        assert worker.emit(ir, 2) == emit_object(ir, target_machine(2), 2)
        assert worker.compiles == 1 and worker.restarts == 1
    finally:
        worker.close()


def test_llvm_diagnostics_come_back_as_compile_errors():
    (ir,) = lang.compile_source(FIB)
    broken = type(ir)(name="bad", params=(), module_ir="define i64 @bad( {", symbol="bad")
    worker = CompileWorker()
    try:
        with pytest.raises(CompileError, match="bad: LLVM rejected the IR"):
            worker.emit(broken, 2)
        assert worker.emit(ir, 2)          # the worker survives a bad request
    finally:
        worker.close()


def test_worker_is_recycled_and_restarted_after_it_dies():
    (ir,) = lang.compile_source(FIB)
    worker = CompileWorker(recycle_after=2)
    try:
        for _ in range(5):
            worker.emit(ir, 1)
        assert worker.compiles == 5 and worker.restarts == 3
        worker._proc.kill()
        worker._proc.wait()
        with pytest.raises(CompileError, match="compile worker failed"):
            worker.emit(ir, 1)
        assert worker.emit(ir, 1) and worker.restarts == 4
    finally:
        worker.close()


def test_runtime_with_the_worker_replaces_and_runs():
    with Runtime(compiler="worker") as rt:
        rt.compile(FIB)
        assert rt.function("fib")(20) == 6765
        rt.replace("fib", FIB.replace("fib(n - 1) + fib(n - 2)", "fib(n - 2) + fib(n - 1)"))
        assert rt.function("fib")(21) == 10946
        assert rt.stats()["freed_versions"] == 1
    with pytest.raises(ValueError, match="compiler"):
        Runtime(compiler="remote")
