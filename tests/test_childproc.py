"""The child-process harness turns crashes into failures that name the signal."""
import ctypes

import pytest

from childproc import ChildCrashed, run_child


def _add(a, b):
    return a + b


def _segfault():
    ctypes.cast(8, ctypes.POINTER(ctypes.c_int64)).contents.value = 1


def _raise():
    raise ValueError("boom")


def test_result_comes_back():
    assert run_child(_add, 2, b=3) == 5


def test_segfault_is_a_failure_naming_the_signal():
    with pytest.raises(ChildCrashed, match="SIGSEGV"):
        run_child(_segfault)


def test_exception_carries_the_child_traceback():
    with pytest.raises(AssertionError, match="ValueError: boom"):
        run_child(_raise)
