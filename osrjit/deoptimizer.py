"""Native deoptimization: the stub library, the hijack table and the Python transfer.

:class:`NativeDeopt` belongs to one :class:`~osrjit.runtime.Runtime`. It links
the deopt stub (:mod:`deopt.stub`) into the runtime's LLJIT as its own
library, registers it with the unwinder, owns the
:class:`~deopt.hijack.HijackTable` of every hijacked slot, and provides the
transfer function the stub calls: a ctypes callback that finds the record of
the slot it returned through, asks :func:`deopt.transfer.plan_transfer` where
to resume, and fills a per-thread :class:`~deopt.stub.TransferPlan`.

Lifetimes: the stub code, the transfer callback and the per-thread buffers
live as long as the runtime's native resources (the stub library is released
after every version). A thread's plan and state buffers are reused by its
next transfer; the stub consumes the plan before that can happen, and a
resume entry reads the state before its first site.
"""
import ctypes
import os
import sys
import threading
import traceback

import llvmlite.binding as llvm

import unwinder
from deopt.framemaps import ObjectImage
from deopt.hijack import HijackTable
from deopt.stub import (EXIT_STATE_TO_ENTRY_RSP, RETURN_SYMBOL, STUB_SYMBOL,
                        TRANSFER_CELL_SYMBOL, TRANSFER_FUNCTION_TYPE, TransferPlan,
                        stub_module_ir)
from deopt.transfer import ResumeTarget, TransferError, return_through_stub
from unwinder.x86_64 import RAX, RBP, RBX, R12, R13, R14, R15

#: Version id under which the stub library's tracker is kept (versions start at 1).
STUB_LIBRARY_ID = 0

_SAVED = ((RBX, "rbx"), (RBP, "rbp"), (R12, "r12"), (R13, "r13"), (R14, "r14"), (R15, "r15"))


class _ThreadBuffers(threading.local):
    """Per-thread plan and state memory (see the module docstring for lifetimes)."""

    def __init__(self):
        self.plan = TransferPlan()
        self.state = (ctypes.c_uint64 * 16)()


class NativeDeopt:
    """The deopt machinery of one runtime on real threads.

    ``native``: the runtime's resource owner (LLJIT, target machine,
    trackers). ``resolve(record) -> ResumeTarget``: where the frame of a hijack
    record continues (the runtime answers with the function's current
    version). ``on_transferred(record, ok)``: called after every transfer
    (accounting and reclamation).
    """

    def __init__(self, native, space, resolve, on_transferred, status_address=None):
        self.space = space
        #: ``status_address() -> int``: address of the calling thread's status
        #: word (the stub marks it "in JIT" when the transfer is complete).
        self._status_address = status_address
        self._dummy_status = ctypes.c_int64(0)
        self._count_lock = threading.Lock()
        self._resolve = resolve
        self._on_transferred = on_transferred
        self._buffers = _ThreadBuffers()
        self.transfers = 0
        self.failures = 0
        self.last_error = None
        #: Optional ``fn(record)`` called inside every transfer, on the
        #: returning thread, after the original return address is back in its
        #: slot and while the stub's frame is live (debugging and tests: a
        #: backtrace taken there walks through the stub into the old frame).
        self.observer = None
        self._callback = TRANSFER_FUNCTION_TYPE(self._transfer)
        self._cell = ctypes.c_void_p(ctypes.cast(self._callback, ctypes.c_void_p).value)
        native.keepalive.extend([self._callback, self._cell, self._dummy_status])

        tm = native.tm
        obj = tm.emit_object(llvm.parse_assembly(stub_module_ir(tm.triple)))
        tracker = (llvm.JITLibraryBuilder().add_object_img(obj)
                   .import_symbol(TRANSFER_CELL_SYMBOL, ctypes.addressof(self._cell))
                   .export_symbol(STUB_SYMBOL).export_symbol(RETURN_SYMBOL)
                   .link(native.lljit, f"osrjit.deopt-stub.{id(self):x}"))
        self.stub_address = tracker[STUB_SYMBOL]
        self.return_address = tracker[RETURN_SYMBOL]
        load_addresses = ObjectImage.infer_load_addresses(obj, {STUB_SYMBOL: self.stub_address})
        handle = space.add_code_object(obj, load_addresses, name="osrjit.deopt-stub")
        native.adopt(STUB_LIBRARY_ID, tracker, (space, handle))
        self.table = HijackTable(self.stub_address)
        space.add_return_address_filter(self.table.translate)
        self.memory = unwinder.ProcessMemory()

    @property
    def callback_address(self):
        """Address of the Python transfer function (``TransferPlan* (ExitState*)``)."""
        return ctypes.cast(self._callback, ctypes.c_void_p).value

    def route_through(self, address):
        """Make the stub call ``address`` (a native transition that calls
        :attr:`callback_address` in turn) instead of the Python transfer directly."""
        self._cell.value = address

    def close(self):
        """Stop translating return addresses (the code goes with the runtime's resources)."""
        self.space.remove_return_address_filter(self.table.translate)

    # -- the transfer (runs on the thread that returned into the stub) ---------

    def _transfer(self, exit_state):
        """``TransferPlan* transfer(ExitState*)`` — never raises into native code."""
        try:
            return self._transfer_or_fall_back(exit_state)
        except BaseException:  # noqa: BLE001 - no exception may unwind into the stub
            # Only reachable if even the fallback failed (no record): there is
            # no return address to go to, so stop loudly rather than run garbage.
            sys.stderr.write("osrjit: fatal error in the deopt transfer\n")
            traceback.print_exc()
            sys.stderr.flush()
            os.abort()

    def _transfer_or_fall_back(self, exit_state):
        es = exit_state.contents
        entry_rsp = ctypes.addressof(es) + EXIT_STATE_TO_ENTRY_RSP
        saved = {reg: getattr(es, name) for reg, name in _SAVED}
        saved[RAX] = es.rax
        # HijackError (no record) propagates: fatal, see _transfer.
        out = return_through_stub(self.table, entry_rsp, saved, self._resolve, self.memory,
                                  self.space, self.return_address,
                                  restore_slot=_store_u64, observer=self.observer)
        buffers = self._buffers
        plan = buffers.plan
        if out.ok:
            if len(buffers.state) < len(out.state):
                buffers.state = (ctypes.c_uint64 * (2 * len(out.state)))()
            state = buffers.state
            for i, v in enumerate(out.state):
                state[i] = v
            plan.rsi = ctypes.addressof(state)
            ctypes.memset(ctypes.addressof(plan) + TransferPlan.xmm0.offset, 0, 16)
            with self._count_lock:
                self.transfers += 1
        else:
            with self._count_lock:
                self.failures += 1
            self.last_error = out.error
            plan.rsi = 0
            ctypes.memmove(ctypes.addressof(plan) + TransferPlan.xmm0.offset,
                           ctypes.addressof(es), 16)
        plan.rsp, plan.rip, plan.rdi = out.rsp, out.rip, out.rdi
        plan.rax = out.regs[RAX]
        for reg, name in _SAVED:
            setattr(plan, name, out.regs[reg])
        status = self._status_address() if self._status_address is not None else None
        plan.status_ptr = status or ctypes.addressof(self._dummy_status)
        self._on_transferred(out.record, out.ok)
        return ctypes.addressof(plan)


def _store_u64(address, value):
    ctypes.c_uint64.from_address(address).value = value


__all__ = ["NativeDeopt", "ResumeTarget", "TransferError", "STUB_LIBRARY_ID"]
