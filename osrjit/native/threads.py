"""Threads: registry, native transitions, safepoints and stop-the-world.

Every thread that runs JIT code has a :class:`ThreadState` — a small native
block that JIT code finds through a pthread key — holding its *status* and,
while it is not running JIT code, an *anchor*: the registers of the last
native frame it left JIT code from (HotSpot's "last Java frame"). The
statuses (:class:`ThreadStatus`):

==================  =====================================================
``DETACHED``        never entered JIT code, or exited
``IN_JIT``          running JIT code (never holds the GIL in this state)
``OUTSIDE``         in the host (a hook, Python, the error service) or idle;
                    its JIT frames, if any, are frozen below the anchor
``PARKED``          stopped at a safepoint poll; anchor = the slow path's frame
``TRANSFERRING``    inside a deopt transfer (short; the stopper waits for it)
``PARKED_SIGNAL``   stopped by the runtime's signal; registers in the ucontext
``SCANNING``        at a poll, scanning its own stack for the stopper as it
                    parks, or writing its own hijacks as it leaves (short;
                    the stopper waits for it and never signals it)
==================  =====================================================

All transitions are native code from the *support library*, linked into the
runtime's LLJIT like any version: hand-written IR (``threads_support.ll``)
and one assembly leaf that saves the anchor (``threads_anchor.s``), both
rendered from :class:`ThreadState`, :class:`ThreadStatus` and the flag bits
(:mod:`unwinder.nativesrc`), plus wrappers and entry thunks generated with
llvmlite's ``IRBuilder``:

* ``osrjit_entry_<sig>(slot, args...)`` — the entry thunk Python calls:
  saves the previous anchor, pushes a resume buffer on the thread's chain
  (``entry_frame``), enters (``IN_JIT``; waits while the world is
  stopped), calls the slot's current version, pops, restores, leaves
  (``OUTSIDE``);
* ``osrjit_abandon(ts, reason)`` — unwinds the thread's JIT frames to its
  innermost entry thunk (``llvm.eh.sjlj.longjmp`` to its buffer), which
  returns as usual with :attr:`ThreadState.abandoned` set; the Python entry
  drops the abandoned frames' hijacks and raises. Called by
  ``osrjit_stack_overflow`` (a function's entry found RSP below the limit
  in the :class:`~.stacklimit.StackLimitSlot`) and by the poll slow path of the main
  thread when :data:`FLAG_INTERRUPT` is set;
* ``osrjit_sigint_handler`` — SIGINT, chained before CPython's handler
  (:class:`SigintHook`): sets :data:`FLAG_INTERRUPT` while the main thread
  has JIT frames;
* ``osrjit_hook`` / ``osrjit_error`` — save the anchor, go ``OUTSIDE``, call
  the Python service, enter again (blocking while the world is stopped);
* ``osrjit_safepoint_slow`` — a poll's slow path: with the STOP bit set it
  saves the anchor, scans its own stack if the stopper asked for it (its
  ``handshake`` block and the ``osrjit_park_scan`` cell are set: the scan
  runs on the thread's own core, whose caches hold its stack), parks on a
  futex (no Python, no GIL) until released, then writes the hijacks the
  stopper left in its block (``osrjit_park_apply``) before it runs JIT code
  again; with the USER bit it calls the Python safepoint service;
* ``osrjit_transfer`` — the deopt stub's transfer: ``TRANSFERRING`` around
  the native transfer (when the runtime installed one in
  ``osrjit_native_transfer``: it gets the thread's transfer block, see
  :mod:`deopt.native_transfer`) and, if that returns NULL, the Python
  transfer; the stub itself stores ``IN_JIT`` after it has moved RSP to the
  rebuilt frame;
* ``osrjit_signal_handler`` — async-signal-safe (no Python, no malloc): a
  thread ``IN_JIT`` when the world is stopping saves its ucontext and parks.

The flag word (``osrjit_safepoint_flag``) that polls test has three bits:
:data:`FLAG_STOP` (stop the world), :data:`FLAG_USER` (call the Python
safepoint service) and :data:`FLAG_INTERRUPT` (SIGINT for the main thread). Entering checks STOP after publishing ``IN_JIT`` with a
locked exchange, and the stopper sets STOP with a locked ``or`` before reading
statuses, so a thread either sees STOP or is seen ``IN_JIT`` (Dekker).
"""
import ctypes
import ctypes.util
import os
import threading
import time
from enum import IntEnum

from llvmlite import ir

from deopt.stub import STATUS_RESUMED
from unwinder import nativesrc
from unwinder.x86_64 import (CALLEE_SAVED, R8, R9, R10, R11, R12, R13, R14, R15, RA, RAX, RBP,
                             RBX, RCX, RDI, RDX, REGISTER_NAMES, RIP, RSI, RSP)

from ..abi import ERROR_SYMBOL, HOOK_SYMBOL
from ..errors import OsrJitError, ResourceExhausted, RuntimeClosed, SafepointTimeout
from ..ir import DOUBLE, I32, I64, PTR, VOID, parse_module
from .stacklimit import stack_limit_slot


class ThreadStatus(IntEnum):
    """A thread's status word (:attr:`ThreadState.status`; see the module docstring)."""
    DETACHED = 0
    #: The deopt stub stores this value itself once RSP is on the rebuilt frame.
    IN_JIT = STATUS_RESUMED
    OUTSIDE = 2
    PARKED = 3
    TRANSFERRING = 4
    PARKED_SIGNAL = 5
    SCANNING = 6


DETACHED, IN_JIT, OUTSIDE, PARKED, TRANSFERRING, PARKED_SIGNAL, SCANNING = ThreadStatus
#: Status value -> name (statuses are 0, 1, 2, ... so a tuple indexes them).
STATUS_NAMES = tuple(s.name for s in ThreadStatus)
assert [int(s) for s in ThreadStatus] == list(range(len(STATUS_NAMES)))
#: Statuses in which a thread runs no JIT code and its stack can be walked.
STOPPED = frozenset((DETACHED, OUTSIDE, PARKED, PARKED_SIGNAL))

#: Bits of the safepoint flag word: stop the world; call the Python safepoint
#: service; SIGINT arrived while the main thread ran JIT code (its next poll
#: abandons its JIT frames, see :class:`SigintHook`).
FLAG_STOP = 1
FLAG_USER = 2
FLAG_INTERRUPT = 4
_SIGINT = 2


class AbandonReason(IntEnum):
    """Why ``osrjit_abandon`` unwound a thread's JIT frames to its entry thunk
    (:attr:`ThreadState.abandoned`)."""
    NONE = 0
    STACK_OVERFLOW = 1       #: a function's entry check found RSP below the stack limit
    INTERRUPT = 2            #: a poll of the main thread saw FLAG_INTERRUPT


#: The entry thunk's resume buffer: LLVM's ``llvm.eh.sjlj.setjmp`` buffer
#: (word 0 the frame pointer, 1 the resume address, 2 the stack pointer,
#: 3-4 the target's own), then the enclosing entry's buffer address.
ENTRY_FRAME_WORDS = 6
ENTRY_FRAME_SP = 2
ENTRY_FRAME_PREVIOUS = 5
#: Seconds :meth:`World.stop` polls the threads' statuses yielding the CPU
#: (a sleep costs ~60 µs of timer slack) before it polls every 20 µs.
SPIN_SECONDS = 0.0002

# futex(2) on the flag word, through syscall(2) (Linux x86-64).
_SYS_FUTEX = 202
_FUTEX_WAIT_PRIVATE = 128
_FUTEX_WAKE_PRIVATE = 129
_FUTEX_WAKE_ALL = 2**31 - 1          # INT_MAX waiters

#: An anchor has one u64 slot per DWARF register number 0..RA (the unwinder's
#: register-file layout, :class:`unwinder.capture.RegisterFile`).
ANCHOR_SLOTS = RA + 1
#: The registers an anchor holds (DWARF numbers): the callee-saved ones, RSP
#: after the return and the return address. ``osrjit_save_anchor`` stores them.
ANCHOR_REGISTERS = (*CALLEE_SAVED, RSP, RA)


class ThreadState(ctypes.Structure):
    """The native per-thread block; the support library's ``%ThreadState``
    is derived from it.

    ``status``: a :class:`ThreadStatus`, first, so that the block's address is
    the status word's (the runtime hands it to the deopt stub). ``anchor``:
    :data:`ANCHOR_SLOTS` u64 by DWARF number, :data:`ANCHOR_REGISTERS` filled
    (all zero: no anchor). ``ucontext``: address of a signal-parked thread's
    ``ucontext_t``, 0 otherwise. ``transfer_block``: address of the thread's
    :class:`deopt.native_transfer.ThreadBlock` (its hijack LIFO), 0 if none;
    written only while the world is stopped, read by ``osrjit_transfer``.
    ``handshake``: address of the block the park path hands to
    ``osrjit_park_scan`` (see :class:`osrjit.native.fastscan.SelfScan`), 0 if none.
    ``entry_frame``: address of the innermost entry thunk's resume buffer
    (:data:`ENTRY_FRAME_WORDS` u64 in the thunk's frame, chained through
    word :data:`ENTRY_FRAME_PREVIOUS` to the enclosing entry's), 0 outside
    JIT code. ``abandoned``: the :class:`AbandonReason` ``osrjit_abandon``
    stored, read and cleared by the Python entry; ``abandoned_lo`` /
    ``abandoned_hi``: the absolute byte range ``[lo, hi)`` of the stack it
    abandoned (its own RSP, the thunk's). ``is_main``: 1 on the process's
    main thread (the one CPython raises ``KeyboardInterrupt`` in).
    ``sigint_owed``: 1 while a SIGINT that came as the main thread ran JIT
    code waits to be handed to the previous handler (see :class:`SigintHook`)."""
    _fields_ = [("status", ctypes.c_int64),
                ("anchor", ctypes.c_uint64 * ANCHOR_SLOTS),
                ("ucontext", ctypes.c_uint64),
                ("transfer_block", ctypes.c_uint64),
                ("handshake", ctypes.c_uint64),
                ("entry_frame", ctypes.c_uint64),
                ("abandoned", ctypes.c_int64),
                ("abandoned_lo", ctypes.c_uint64),
                ("abandoned_hi", ctypes.c_uint64),
                ("is_main", ctypes.c_int64),
                ("sigint_owed", ctypes.c_int64)]


assert ThreadState.status.offset == 0
nativesrc.check_layout(ThreadState)


def anchor_slot_offset(regno):
    """Byte offset in a :class:`ThreadState` of DWARF register ``regno``'s anchor slot."""
    return ThreadState.anchor.offset + ctypes.sizeof(ctypes.c_uint64) * regno


# glibc x86-64 ucontext_t: uc_flags 8, uc_link 8, uc_stack 24, then
# mcontext_t.gregs[23], in the order REG_R8 = 0 ... REG_RIP = 16.
_UC_GREGS = 40
_GREG_TO_DWARF = dict(enumerate((R8, R9, R10, R11, R12, R13, R14, R15, RDI, RSI, RBP, RBX,
                                 RDX, RAX, RCX, RSP, RIP)))


# -- native code ------------------------------------------------------------------

def support_ir():
    """The hand-written transitions (``threads_support.ll``), rendered."""
    return nativesrc.render_file(__package__, "threads_support.ll", structs=[ThreadState], values={
        # DETACHED is Python's alone: attaching and detaching are Python.
        **{s.name: int(s) for s in ThreadStatus if s is not ThreadStatus.DETACHED},
        "FLAG_STOP": FLAG_STOP, "FLAG_USER": FLAG_USER, "FLAG_INTERRUPT": FLAG_INTERRUPT,
        "NOT_FLAG_INTERRUPT": ~FLAG_INTERRUPT,
        "STACK_OVERFLOW": int(AbandonReason.STACK_OVERFLOW),
        "INTERRUPT": int(AbandonReason.INTERRUPT),
        "ENTRY_FRAME_SP": ENTRY_FRAME_SP, "RSP": RSP, "SIGINT": _SIGINT,
        "SYS_FUTEX": _SYS_FUTEX,
        "FUTEX_WAIT_PRIVATE": _FUTEX_WAIT_PRIVATE, "FUTEX_WAKE_PRIVATE": _FUTEX_WAKE_PRIVATE,
        "FUTEX_WAKE_ALL": _FUTEX_WAKE_ALL})


def save_anchor_asm():
    """``osrjit_save_anchor(ThreadState*)`` (``threads_anchor.s``), rendered:
    ``ANCHOR_<REG>`` is :func:`anchor_slot_offset` of each of :data:`ANCHOR_REGISTERS`."""
    return nativesrc.render_file(__package__, "threads_anchor.s", values={
        f"ANCHOR_{REGISTER_NAMES[r].upper()}": anchor_slot_offset(r) for r in ANCHOR_REGISTERS})


NATIVE_SOURCES = {"threads_support.ll": support_ir, "threads_anchor.s": save_anchor_asm}

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_SIGNATURE_TYPES = {"i64": I64, "i32": I32, "i8": _I8, "i1": _I1, "double": DOUBLE,
                    "ptr": PTR, "void": VOID}
#: Generated wrappers around Python services: (symbol, return type, service cell).
_SERVICE_WRAPPERS = ((HOOK_SYMBOL, I64, "osrjit_py_hook"), (ERROR_SYMBOL, VOID, "osrjit_py_error"))


class _Emitter:
    """An ``IRBuilder`` for generated transitions, with the support library's
    functions declared in its module."""

    def __init__(self, module):
        self.module = module
        self.current_thread = ir.Function(module, ir.FunctionType(PTR, []), "osrjit_current_thread")
        self.enter = ir.Function(module, ir.FunctionType(VOID, [PTR]), "osrjit_enter")
        self.builder = None

    def function(self, name, return_type, param_types):
        """Start ``name`` (``uwtable``, so walkers unwind through it) at its entry block."""
        fn = ir.Function(self.module, ir.FunctionType(return_type, param_types), name)
        fn.attributes.add("uwtable")
        self.builder = ir.IRBuilder(fn.append_basic_block("entry"))
        return fn

    def field(self, ts, name):
        """Address of ThreadState field ``name`` of ``ts`` (ctypes offset)."""
        return self.builder.gep(ts, [I64(getattr(ThreadState, name).offset)],
                                source_etype=_I8, name=name)

    def store_status(self, ts, status):
        """``store atomic`` (release) of ``status`` into ``ts``'s status word."""
        store = ir.instructions.StoreAtomicInstr(self.builder.block, I64(int(status)),
                                                 self.field(ts, "status"), "release", 8)
        # llvmlite's store_atomic wants a typed pointer; it has no public way
        # to insert an instruction built by hand.
        self.builder._insert(store)

    def call_cell(self, cell, return_type, args):
        """Call the function whose address the ``ptr`` at ``cell`` holds. (The
        load names the callee's type through a typed pointer, which llvmlite
        needs for the call; LLVM reads that type as ``ptr``.)"""
        fn_type = ir.FunctionType(return_type, [a.type for a in args])
        fn = self.builder.load(cell, typ=fn_type.as_pointer(), name="fn")
        return self.builder.call(fn, args, name="" if return_type == VOID else "r")

    def ret(self, value):
        if value.type == VOID:
            self.builder.ret_void()
        else:
            self.builder.ret(value)


def service_wrappers_ir(triple):
    """IR of the Python services' wrappers (:data:`_SERVICE_WRAPPERS`), each
    ``ret name(i64 x)``: save the anchor, go ``OUTSIDE``, call the service
    through its cell, enter JIT code again (blocking while the world is
    stopped). A thread without a :class:`ThreadState` just calls the service."""
    module = ir.Module("osrjit.support.services")
    module.triple = triple
    e = _Emitter(module)
    save_anchor = ir.Function(module, ir.FunctionType(VOID, [PTR]), "osrjit_save_anchor")
    for name, return_type, cell_name in _SERVICE_WRAPPERS:
        cell = ir.GlobalVariable(module, PTR, cell_name)
        fn = e.function(name, return_type, [I64])
        fn.args[0].name = "x"
        out, svc, back, done = (fn.append_basic_block(n) for n in ("out", "svc", "back", "done"))
        b = e.builder
        ts = b.call(e.current_thread, [], name="ts")
        has = b.icmp_unsigned("!=", ts, ir.Constant(PTR, None), name="has")
        b.cbranch(has, out, svc)
        b.position_at_end(out)
        b.call(save_anchor, [ts])
        e.store_status(ts, OUTSIDE)
        b.branch(svc)
        b.position_at_end(svc)
        result = e.call_cell(cell, return_type, [fn.args[0]])
        b.cbranch(has, back, done)
        b.position_at_end(back)
        b.call(e.enter, [ts])
        b.branch(done)
        b.position_at_end(done)
        e.ret(result)
    return str(module)


def entry_thunk_ir(return_type, arity, triple):
    """``(name, IR)`` of ``osrjit_entry_<ret>_<n>(ptr slot, i64 x n)``, the
    runtime's entry thunk: keep the thread's anchor (an entry nested in a
    hook must not lose the outer one) and push a resume buffer on the
    thread's chain of entries (``llvm.eh.sjlj.setjmp``: ``osrjit_abandon``
    comes back here with the JIT frames above abandoned), enter
    (``IN_JIT``; waits while the world is stopped), call the slot's current
    version, pop the buffer, put the anchor back, leave (``OUTSIDE``), hand
    a SIGINT owed to Python over (``osrjit_sigint_deliver``: Python's handler
    then runs as the call returns). After an abandon it returns 0 (the Python entry reads
    :attr:`ThreadState.abandoned`)."""
    name = f"osrjit_entry_{return_type}_{arity}"
    module = ir.Module(name)
    module.triple = triple
    e = _Emitter(module)
    deliver = ir.Function(module, ir.FunctionType(VOID, [PTR]), "osrjit_sigint_deliver")
    anchor_type = ir.ArrayType(I64, ANCHOR_SLOTS)
    anchor_bytes = I64(ThreadState.anchor.size)
    memcpy = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, I64, _I1]),
                         "llvm.memcpy.p0.p0.i64")
    frameaddress = ir.Function(module, ir.FunctionType(PTR, [I32]), "llvm.frameaddress.p0")
    stacksave = ir.Function(module, ir.FunctionType(PTR, []), "llvm.stacksave.p0")
    setjmp = ir.Function(module, ir.FunctionType(I32, [PTR]), "llvm.eh.sjlj.setjmp")
    ret_type = _SIGNATURE_TYPES[return_type]
    fn = e.function(name, ret_type, [PTR] + [I64] * arity)
    slot, *args = fn.args
    slot.name = "slot"
    for i, a in enumerate(args):
        a.name = f"a{i}"
    run, abandoned, done = (fn.append_basic_block(n) for n in ("run", "abandoned", "done"))
    b = e.builder
    ts = b.call(e.current_thread, [], name="ts")
    saved = b.alloca(anchor_type, name="saved")
    saved.align = 8
    buf = b.alloca(ir.ArrayType(I64, ENTRY_FRAME_WORDS), name="resume")
    buf.align = 8
    anchor = e.field(ts, "anchor")
    b.call(memcpy, [saved, anchor, anchor_bytes, _I1(0)])
    chain = e.field(ts, "entry_frame")
    previous = b.load(chain, typ=I64, name="previous")

    def word(i):
        return b.gep(buf, [I64(0), I32(i)], inbounds=True)
    b.store(previous, word(ENTRY_FRAME_PREVIOUS))
    b.store(b.ptrtoint(b.call(frameaddress, [I32(0)]), I64), word(0))
    b.store(b.ptrtoint(b.call(stacksave, []), I64), word(ENTRY_FRAME_SP))
    b.store(b.ptrtoint(buf, I64), chain)
    again = b.call(setjmp, [buf], name="again")
    b.cbranch(b.icmp_signed("==", again, I32(0)), run, abandoned)
    b.position_at_end(run)
    b.call(e.enter, [ts])
    result = e.call_cell(slot, ret_type, args)
    b.branch(done)
    b.position_at_end(abandoned)
    b.branch(done)
    b.position_at_end(done)
    if ret_type != VOID:
        phi = b.phi(ret_type, name="result")
        phi.add_incoming(result, run)
        phi.add_incoming(ir.Constant(ret_type, None), abandoned)
        result = phi
    b.store(previous, chain)
    b.call(memcpy, [anchor, saved, anchor_bytes, _I1(0)])
    e.store_status(ts, OUTSIDE)
    b.call(deliver, [ts])
    e.ret(result)
    return name, str(module)


# PyDLL: none of these blocks, and the stop-the-world calls some of them
# (pthread_kill, pthread_getattr_np) while it must keep the GIL.
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.pthread_key_create.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
_libc.pthread_key_delete.argtypes = [ctypes.c_uint]
_libc.pthread_setspecific.argtypes = [ctypes.c_uint, ctypes.c_void_p]
_libc.pthread_kill.argtypes = [ctypes.c_ulong, ctypes.c_int]
_libc.pthread_self.restype = ctypes.c_ulong
_libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
_libc.pthread_attr_getstack.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_size_t)]
_libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]


_stack_bounds = threading.local()


def current_stack_bounds():
    """``(lo, hi)``: absolute byte range of the calling thread's stack
    (``pthread_getattr_np``; for the main thread ``lo`` is the lowest address
    the stack may grow to, so only ``[rsp, hi)`` is known to be mapped), or
    None if glibc cannot say. Asked once per thread (for the main thread glibc
    reads ``/proc/self/maps``, about 0.4 ms) and kept in a thread-local."""
    known = getattr(_stack_bounds, "value", False)
    if known is False:
        known = _stack_bounds.value = _query_stack_bounds()
    return known


def _query_stack_bounds():
    attr = ctypes.create_string_buffer(128)         # pthread_attr_t is 56 bytes on x86-64
    if _libc.pthread_getattr_np(_libc.pthread_self(), attr) != 0:
        return None
    try:
        addr, size = ctypes.c_void_p(), ctypes.c_size_t()
        if _libc.pthread_attr_getstack(attr, ctypes.byref(addr), ctypes.byref(size)) != 0:
            return None
        return addr.value, addr.value + size.value
    finally:
        _libc.pthread_attr_destroy(attr)


_ENTER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# PYFUNCTYPE: called with the GIL held (these never block). Releasing it
# around clear_flag would let the threads it wakes take the GIL first, and the
# stopper would wait a whole switch interval (5 ms) to get it back before
# replace() can return. (Made once: PYFUNCTYPE makes a new class per call.)
_FLAG_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_int64)
_LOAD_STATUS_CALL = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)


class SupportLibrary:
    """The runtime's native transition code, linked into its LLJIT.

    ``linker``: the runtime's :class:`osrjit.native.linker.Linker` (it owns
    this library and the entry thunks, released after every version linked
    later). ``space``: the
    unwinder's address space (the library is registered so walks through
    transitions use its CFI). ``flag``: the safepoint flag cell (c_int64).
    Cells for the Python services are filled with :meth:`set_service`.

    Owns the runtime's pthread key (:attr:`key`: JIT code finds a thread's
    :class:`ThreadState` through it): created here, deleted by :meth:`close`
    once no thread can attach any more (:meth:`ThreadRegistry.close`). A
    value a thread still holds for a deleted key is never read again: glibc
    gives every key a sequence number and ``pthread_getspecific`` answers
    NULL for a value set under an older one, also after a later
    ``pthread_key_create`` reuses the key's index. The code goes with the
    linker (released after this).
    """

    SERVICES = ("osrjit_py_hook", "osrjit_py_safepoint", "osrjit_py_error", "osrjit_py_transfer",
                "osrjit_native_transfer", "osrjit_park_scan", "osrjit_park_apply",
                # Not services, cells all the same (see SigintHook):
                "osrjit_sigint_previous", "osrjit_main_thread")
    EXPORTS = ("osrjit_current_thread", "osrjit_enter", "osrjit_leave", "osrjit_set_flag",
               "osrjit_clear_flag", "osrjit_load_status", "osrjit_safepoint_slow", "osrjit_hook",
               "osrjit_error", "osrjit_transfer", "osrjit_signal_handler", "osrjit_save_anchor",
               "osrjit_stack_overflow", "osrjit_sigint_handler", "osrjit_sigint_deliver")

    def __init__(self, linker, space, flag):
        self._linker = linker
        self._space = space
        key = ctypes.c_uint(0)
        if _libc.pthread_key_create(ctypes.byref(key), None) != 0:
            raise ResourceExhausted("pthread_key_create failed: the process has no free "
                                    "pthread key (each open native runtime holds one)",
                                    resource="pthread key")
        self.key = key.value
        self.key_deleted = False
        try:
            self._link_transitions(linker, space, flag)
        except BaseException:
            self.close()
            raise

    def _link_transitions(self, linker, space, flag):
        self._key_cell = ctypes.c_int64(self.key)
        self._service_cells = {name: ctypes.c_void_p(0) for name in self.SERVICES}
        linker.keep(self._key_cell, *self._service_cells.values())
        tm = linker.tm
        mod = parse_module(f'target triple = "{tm.triple}"\n'
                           + nativesrc.module_asm(save_anchor_asm()) + support_ir(),
                           service_wrappers_ir(tm.triple))
        mod.verify()
        mod.data_layout = str(tm.target_data)
        obj = tm.emit_object(mod)
        imports = {"osrjit_safepoint_flag": ctypes.addressof(flag),
                   "osrjit_tls_key": ctypes.addressof(self._key_cell)}
        imports.update((name, ctypes.addressof(cell)) for name, cell in self._service_cells.items())
        for sym in ("pthread_getspecific", "syscall"):
            imports[sym] = ctypes.cast(getattr(_libc, sym), ctypes.c_void_p).value
        self.library = linker.link(obj, "osrjit.support", exports=self.EXPORTS, imports=imports,
                                   register="osrjit.support", space=space)
        self.addresses = a = dict(self.library.addresses)
        self.enter = _ENTER_TYPE(a["osrjit_enter"])
        self.set_flag = _FLAG_CALL(a["osrjit_set_flag"])
        self.clear_flag = _FLAG_CALL(a["osrjit_clear_flag"])
        self.load_status = _LOAD_STATUS_CALL(a["osrjit_load_status"])
        self._thunks = {}
        #: Held while an entry thunk is made (and across ``fork()``).
        self.thunk_lock = threading.Lock()

    def close(self):
        """Delete the pthread key (idempotent). Only after :meth:`ThreadRegistry.close`:
        no thread may attach, and no JIT code of the runtime may run, any more."""
        if not self.key_deleted:
            self.key_deleted = True
            if _libc.pthread_key_delete(self.key) != 0:
                raise OsrJitError(f"pthread_key_delete({self.key}) failed")

    def set_service(self, name, address):
        """Point the cell of service ``name`` (one of :data:`SERVICES`) at ``address``."""
        self._service_cells[name].value = address

    def service(self, name):
        """The address the cell of service ``name`` points at (0: none)."""
        return self._service_cells[name].value or 0

    def cell(self, name):
        """The ``c_void_p`` cell of service ``name`` (kept alive by the linker)."""
        return self._service_cells[name]

    def entry_thunk(self, return_type, arity):
        """Address of the entry thunk for functions ``(i64 x arity) -> return_type``."""
        key = (return_type, arity)
        with self.thunk_lock:
            address = self._thunks.get(key)
            if address is None:
                tm = self._linker.tm
                name, text = entry_thunk_ir(return_type, arity, tm.triple)
                obj = self._linker.emit(text)
                thunk = self._linker.link(obj, f"osrjit.entry.{name}", exports=(name,),
                                          libraries=(self.library,),
                                          register=f"osrjit.entry.{name}", space=self._space)
                address = self._thunks[key] = thunk[name]
            return address


class ThreadRegistry:
    """Attached threads. A thread attaches on its first entry into JIT code and
    detaches when it exits (its thread-local block is collected).

    ``key``: the runtime's pthread key (:class:`SupportLibrary` owns it).
    Lifetime: :meth:`close` detaches every thread and lets go of their
    blocks; attaching afterwards raises :class:`RuntimeClosed`.
    """

    def __init__(self, key, main_cell=None):
        self._key = key
        #: ``c_void_p`` set to the main thread's block while it is attached
        #: (``osrjit_main_thread``, read by the SIGINT handler), or None.
        self._main_cell = main_cell
        self._lock = threading.Lock()
        self._states = {}              # ident -> (ThreadState, thread name)
        self._bounds = {}              # ident -> (lo, hi) of its stack
        self._local = threading.local()
        self.closed = False

    def current(self):
        """This thread's :class:`ThreadState`, attaching it if needed."""
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = _Holder(self)
            self._local.holder = holder
        return holder.state

    def in_jit_code(self):
        """``[(name, where)]`` of the attached threads with JIT frames of the
        runtime on their stacks: running them (``where``: the status name,
        any but ``OUTSIDE`` or ``DETACHED``), or ``OUTSIDE`` in a hook or
        service with JIT frames below (its anchor is set; the entry thunk
        restores the empty one when the outermost call returns)."""
        out = []
        for _, st, name in self.snapshot():
            status = st.status
            if status not in (OUTSIDE, DETACHED):
                out.append((name, STATUS_NAMES[status]))
            elif st.anchor[RSP]:
                out.append((name, "in a hook or service called from JIT code"))
        return out

    def whereabouts(self):
        """``[(ident, where)]`` of every attached thread: its status name, or
        ``"in a hook or service called from JIT code"`` when it is
        ``OUTSIDE`` with JIT frames below its anchor."""
        out = []
        for ident, st, _name in self.snapshot():
            status = st.status
            out.append((ident, "in a hook or service called from JIT code"
                        if status == OUTSIDE and st.anchor[RSP] else STATUS_NAMES[status]))
        return out

    def close(self):
        """Detach every thread (idempotent): each block becomes ``DETACHED``
        and is freed once nothing else holds it (the registry lets go of every
        thread's holder, not only at thread exit). No JIT code of the runtime
        may run any more; the pthread key may be deleted afterwards."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            states = [st for st, _name in self._states.values()]
            self._states.clear()
            self._bounds.clear()
            if self._main_cell is not None:
                self._main_cell.value = None
        for st in states:
            st.status = DETACHED
        # A new thread-local: the old one goes, and with it every thread's
        # holder (whose finalizer takes the lock: outside it).
        self._local = threading.local()

    def after_fork(self, keep_ident):
        """In a fork child: forget every thread but ``keep_ident`` (the
        forking thread; the others do not exist in the child). Their blocks
        become ``DETACHED`` and stay allocated while something holds them,
        but nothing waits for them any more. The lock is made anew (a thread
        that no longer exists may have held it)."""
        self._lock = threading.Lock()
        gone = [st for ident, (st, _name) in self._states.items() if ident != keep_ident]
        self._states = {i: e for i, e in self._states.items() if i == keep_ident}
        self._bounds = {i: b for i, b in self._bounds.items() if i == keep_ident}
        for st in gone:
            st.status = DETACHED

    def stack_bounds(self, ident):
        """``(lo, hi)`` of attached thread ``ident``'s stack (see
        :func:`current_stack_bounds`), or None."""
        with self._lock:
            return self._bounds.get(ident)

    def attached(self):
        """This thread's :class:`ThreadState` if it is attached, else None (never attaches)."""
        holder = getattr(self._local, "holder", None)
        return None if holder is None else holder.state

    def snapshot(self):
        """``[(ident, ThreadState, name)]`` of every attached thread."""
        with self._lock:
            return [(ident, st, name) for ident, (st, name) in self._states.items()]

    def _attach(self, holder):
        st = holder.state
        bounds = current_stack_bounds()
        slot = stack_limit_slot()
        if slot is not None:
            slot.set_current(bounds)
        name = threading.current_thread().name
        st.is_main = int(threading.current_thread() is threading.main_thread())
        # Under the lock: once close() has run, no thread sets a value for
        # the key (it may be deleted, and its index reused by another runtime).
        with self._lock:
            if self.closed:
                raise RuntimeClosed("the runtime is closed")
            st.status = OUTSIDE
            if _libc.pthread_setspecific(self._key, ctypes.addressof(st)) != 0:
                raise OsrJitError("pthread_setspecific failed")
            self._states[holder.ident] = (st, name)
            if st.is_main and self._main_cell is not None:
                self._main_cell.value = ctypes.addressof(st)
            if bounds is not None:
                self._bounds[holder.ident] = bounds

    def _detach(self, holder):
        holder.state.status = DETACHED
        with self._lock:
            # A thread's block may be collected after a new thread reused its
            # ident and attached: only forget the entry if it is still ours.
            entry = self._states.get(holder.ident)
            if entry is not None and entry[0] is holder.state:
                if self._main_cell is not None and self._main_cell.value == ctypes.addressof(
                        holder.state):
                    self._main_cell.value = None
                del self._states[holder.ident]
                self._bounds.pop(holder.ident, None)


class EntryGate:
    """Who is inside the runtime's compiled code, entered from Python, and
    the door :meth:`~osrjit.Runtime.close` shuts.

    Every call from Python into JIT code (:class:`osrjit.JitFunction`) passes
    :meth:`enter` before the entry thunk and :meth:`leave` after it; calls
    nest (a hook calling a compiled function). A thread with an entry open
    has JIT frames on its stack — running, parked, or frozen below a hook —
    so the runtime's code must stay mapped until it leaves. :meth:`shut`
    waits for every other thread to leave and, while it waits, holds new
    outermost entries back (nested ones pass: their thread must be able to
    finish); it never waits for the calling thread's own entries, which
    cannot leave while it is in :meth:`shut`.

    Lifetime: made with its :class:`~.backend.NativeBackend`; once
    :meth:`close` has run every :meth:`enter` raises :class:`RuntimeClosed`.
    A fork child keeps only the forking thread's entries (:meth:`after_fork`).
    """

    def __init__(self):
        # No lock on a call's path. A thread's entry in _inside is changed
        # only by that thread; the interpreter lock orders each dict
        # operation and attribute read between threads. An outermost
        # enter() publishes its entry, then looks for a closer; shut()
        # publishes the closer, then looks at the entries (under the lock):
        # one of the two sees the other (Dekker). The condition is waited on
        # only while a close() is deciding.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inside = {}              # ident -> [nested entries, outermost function name]
        self._closer = None            # ident of the thread in shut(), or None
        self.closed = False

    def enter(self, function_name):
        """Open an entry of this thread (``function_name``: what it calls).
        Waits while another thread shuts the gate; :class:`RuntimeClosed`
        once it is closed."""
        me = threading.get_ident()
        inside = self._inside
        entry = inside.get(me)
        if entry is not None:
            entry[0] += 1
            return
        inside[me] = [1, function_name]
        if self._closer is not None or self.closed:
            self._enter_held_back(me, function_name)

    def _enter_held_back(self, me, function_name):
        with self._lock:
            del self._inside[me]
            self._cond.notify_all()            # shut() may be waiting for it to go
            while self._closer is not None and not self.closed:
                self._cond.wait()
            if self.closed:
                raise RuntimeClosed(f"cannot call {function_name}: the runtime is closed")
            self._inside[me] = [1, function_name]

    def leave(self):
        """Close this thread's innermost entry."""
        me = threading.get_ident()
        entry = self._inside[me]
        entry[0] -= 1
        if not entry[0]:
            del self._inside[me]
            if self._closer is not None:
                with self._lock:
                    self._cond.notify_all()

    def _snapshot(self):
        return {ident: entry[1] for ident, entry in list(self._inside.items())}

    def inside(self):
        """``{ident: outermost function name}`` of the threads with entries open."""
        return self._snapshot()

    def shut(self, timeout):
        """Wait up to ``timeout`` seconds (0: not at all) for every other
        thread to leave, holding new outermost entries back meanwhile.
        Returns ``{}`` with the gate held shut (then :meth:`close` or
        :meth:`reopen`), or ``{ident: function name}`` of the threads still
        inside — the caller among them if it has an entry open — with the
        gate open again."""
        me = threading.get_ident()
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._closer is not None:
                # Another thread is closing: wait for its decision first.
                while self._closer is not None and not self.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._snapshot()
                    self._cond.wait(left)
            if self.closed:
                return {}
            if me not in self._inside:
                self._closer = me
                while self._inside:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            busy = self._snapshot()
            if busy:
                self._closer = None
                self._cond.notify_all()
            return busy

    def reopen(self):
        """Let held-back entries in again (the close failed after :meth:`shut`)."""
        with self._cond:
            self._closer = None
            self._cond.notify_all()

    def close(self):
        """Closed for good: every waiting and later :meth:`enter` raises :class:`RuntimeClosed`."""
        with self._cond:
            self.closed = True
            self._closer = None
            self._cond.notify_all()

    def after_fork(self, keep_ident):
        """In a fork child: forget every entry but thread ``keep_ident``'s
        (the other threads do not exist here) and any close in progress;
        the condition's lock is made anew (it may have been held)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inside = {i: e for i, e in list(self._inside.items()) if i == keep_ident}
        self._closer = None


class _Holder:
    """Owns one thread's :class:`ThreadState`; collected when the thread
    exits or its registry closes."""

    def __init__(self, registry):
        self.state = ThreadState()
        self.ident = threading.get_ident()
        self._registry = registry
        registry._attach(self)

    def __del__(self):
        try:
            self._registry._detach(self)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def settled_status(state, timeout=1.0):
    """The status of a thread that :meth:`World.stop` saw stopped, read once
    it is stopped again: such a thread cannot run JIT code before the
    release, but it may flicker for a moment — leaving a futex wait it was
    woken from before this stop, it publishes ``IN_JIT`` (``osrjit_enter``,
    the signal handler) or ``SCANNING`` (the park path's claim), sees STOP and
    stops again. Raises :class:`OsrJitError` if it does not within
    ``timeout`` seconds (it would be running: a bug)."""
    status = state.status
    if status in STOPPED:
        return status
    deadline = time.monotonic() + timeout
    while status not in STOPPED:
        if time.monotonic() > deadline:
            raise OsrJitError(f"a stopped thread is {STATUS_NAMES[status]} in the pause")
        os.sched_yield()
        status = state.status
    return status


def anchor_registers(state):
    """Registers of a thread's anchor (a caller frame), or None if it has none."""
    a = state.anchor
    if not a[RSP]:
        return None
    return {r: a[r] for r in ANCHOR_REGISTERS}


def ucontext_registers(state, memory):
    """Registers saved in a signal-parked thread's ucontext (the exact interrupted state)."""
    base = state.ucontext + _UC_GREGS
    return {dwarf: memory.read_u64(base + 8 * greg) for greg, dwarf in _GREG_TO_DWARF.items()}


# -- the runtime's signal ---------------------------------------------------------

class _Sigaction(ctypes.Structure):
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_uint64 * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4
_SA_RESTART = 0x10000000
_libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.POINTER(_Sigaction)]


class RuntimeSignal:
    """One real-time signal owned by the runtime, whose handler parks threads.

    Picks the first signal from ``SIGRTMIN + 4`` whose action is the default
    (signals someone else handles — another open runtime among them — are
    left alone), installs the native handler with ``SA_SIGINFO | SA_RESTART``
    and restores the previous action on :meth:`close`. Runtimes alive at once
    never share a signal: each handler knows only its own runtime's threads.
    :class:`ResourceExhausted` when every one of them is taken (27 on
    x86-64 glibc, ``SIGRTMIN + 4`` .. ``SIGRTMAX``).
    """

    def __init__(self, handler_address):
        # getattr: a double-underscore name inside a class body would be mangled.
        lo = getattr(_libc, "__libc_current_sigrtmin")()
        hi = getattr(_libc, "__libc_current_sigrtmax")()
        self.signal = None
        # One runtime at a time reads and takes a signal: two made at once on
        # two threads must not both see the same one free.
        with _SIGNALS_LOCK:
            for sig in range(lo + 4, hi + 1):
                old = _Sigaction()
                if _libc.sigaction(sig, None, ctypes.byref(old)) == 0 and not old.sa_sigaction \
                        and not old.sa_flags & _SA_SIGINFO:
                    new = _Sigaction()
                    new.sa_sigaction = handler_address
                    new.sa_flags = _SA_SIGINFO | _SA_RESTART
                    if _libc.sigaction(sig, ctypes.byref(new), ctypes.byref(old)) == 0:
                        self.signal, self._old = sig, old
                        break
        if self.signal is None:
            raise ResourceExhausted(
                f"no free real-time signal for the runtime's async stop: every one of "
                f"SIGRTMIN+4..SIGRTMAX ({lo + 4}..{hi}) has a handler (each open native "
                f"runtime holds one); close a runtime first", resource="real-time signal")

    def send(self, ident):
        """Send the signal to the thread with pthread id ``ident`` (True if sent)."""
        return _libc.pthread_kill(ident, self.signal) == 0

    def close(self):
        """Restore the signal's previous action (idempotent)."""
        with _SIGNALS_LOCK:
            if self.signal is not None:
                _libc.sigaction(self.signal, ctypes.byref(self._old), None)
                self.signal = None


_SIGNALS_LOCK = threading.Lock()


class SigintHook:
    """The runtime's SIGINT handler, chained in front of the process's.

    ``handler_address``: ``osrjit_sigint_handler``; ``previous_cell``: its
    ``osrjit_sigint_previous`` cell. Installed only over a handler that is a
    function (CPython's, normally; not ``SIG_DFL``/``SIG_IGN``): the native
    handler calls it first, so Python's own SIGINT behaviour (its flag, a
    ``signal.signal`` handler, ``KeyboardInterrupt``) is unchanged, then sets
    :data:`FLAG_INTERRUPT` if the main thread has JIT frames: its next poll
    abandons them. If the main thread is *running* JIT code (not in a hook
    called from it), the previous handler is called later instead, by the
    entry thunk as the call returns to Python (``sigint_owed``): CPython
    would otherwise raise ``KeyboardInterrupt`` in the first Python callback
    the thread makes — a Python deopt transfer among them, which must not
    fail. In a hook, Python raises there, the hook's exception is pending,
    and the poll after the hook abandons the frames. Same flags as the previous action (CPython
    wants ``EINTR``: no ``SA_RESTART``), plus ``SA_SIGINFO``.

    Runtimes open at once chain their hooks; :meth:`close` restores the
    previous action when this hook is the installed one, else unlinks it
    from the hook installed over it. A ``signal.signal(SIGINT, ...)`` made
    after the runtime opened replaces the chain (JIT loops then no longer
    stop on SIGINT; Python's behaviour is whatever that call asked for).
    """

    def __init__(self, handler_address, previous_cell):
        self.handler = handler_address
        self.previous = previous_cell
        self.installed = False
        with _SIGNALS_LOCK:
            old = _Sigaction()
            if _libc.sigaction(_SIGINT, None, ctypes.byref(old)) != 0 or \
                    (old.sa_sigaction or 0) in (0, 1):
                return
            new = _Sigaction()
            new.sa_sigaction = handler_address
            new.sa_mask = old.sa_mask
            new.sa_flags = old.sa_flags | _SA_SIGINFO
            previous_cell.value = old.sa_sigaction
            if _libc.sigaction(_SIGINT, ctypes.byref(new), None) != 0:
                previous_cell.value = None
                return
            self._old = old
            self.installed = True
            _SIGINT_HOOKS.append(self)

    def close(self):
        """Take the handler out of the chain (idempotent)."""
        with _SIGNALS_LOCK:
            if not self.installed:
                return
            self.installed = False
            _SIGINT_HOOKS.remove(self)
            current = _Sigaction()
            _libc.sigaction(_SIGINT, None, ctypes.byref(current))
            if current.sa_sigaction == self.handler:
                _libc.sigaction(_SIGINT, ctypes.byref(self._old), None)
                return
            for other in _SIGINT_HOOKS:
                if other.previous.value == self.handler:
                    other.previous.value = self._old.sa_sigaction
                    other._old = self._old


_SIGINT_HOOKS = []


def _signals_lock_after_fork():
    # A thread that no longer exists in the child may have held it.
    global _SIGNALS_LOCK
    _SIGNALS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_signals_lock_after_fork)


class World:
    """Stops and releases every attached thread but the caller.

    ``grace``: seconds to wait for polls before signalling threads still
    ``IN_JIT``; ``timeout``: seconds before :class:`SafepointTimeout`.
    """

    def __init__(self, support, registry, signal, *, grace=0.002, timeout=5.0):
        self.support = support
        self.registry = registry
        self.signal = signal
        self.grace = grace
        self.timeout = timeout
        self.lock = threading.RLock()
        #: Counters: stops, signals sent, last time-to-safepoint (seconds).
        self.stops = 0
        self.signals_sent = 0
        self.last_time_to_safepoint = 0.0

    def stop(self, *, timeout=None, async_stop=True):
        """Stop the world: returns ``[(ident, state, name)]`` of the other threads.

        The caller must :meth:`release` afterwards (also after an exception
        from its own work). Raises :class:`SafepointTimeout` — with the world
        already released and nothing modified — if some thread does not stop.
        """
        timeout = self.timeout if timeout is None else timeout
        me = threading.get_ident()
        load = self.support.load_status
        self.support.set_flag(FLAG_STOP)
        start = time.perf_counter()
        signalled = {}                      # ident -> time of the last signal
        while True:
            others = [t for t in self.registry.snapshot() if t[0] != me]
            running = [t for t in others if load(ctypes.addressof(t[1])) not in STOPPED]
            if not running:
                break
            elapsed = time.perf_counter() - start
            if elapsed > timeout:
                self.release()
                raise SafepointTimeout([(name, STATUS_NAMES[load(ctypes.addressof(st))])
                                        for _, st, name in running], timeout)
            if async_stop and self.signal is not None and elapsed > self.grace:
                for ident, st, _ in running:
                    # Signal a thread still running JIT code; again after a
                    # grace if it was, e.g., transferring when the first came.
                    last = signalled.get(ident)
                    if (load(ctypes.addressof(st)) == IN_JIT
                            and (last is None or elapsed - last > 10 * self.grace)):
                        if self.signal.send(ident):
                            signalled[ident] = elapsed
                            self.signals_sent += 1
            if elapsed > SPIN_SECONDS:
                time.sleep(0.00002)
            else:
                # Give the CPU (and the GIL) to a thread that needs it to reach
                # its poll, without a sleep's timer slack.
                os.sched_yield()
        self.stops += 1
        self.last_time_to_safepoint = time.perf_counter() - start
        return others

    def try_stop(self):
        """Stop the world only if every other thread is already out of JIT
        code or parked: ``[(ident, state, name)]`` of the other threads, or
        None. STOP is raised only if the statuses read before say so, then
        they are read again (Dekker, as :meth:`stop`); a thread that entered
        JIT code in between sees STOP, waits a moment, and STOP is cleared
        again. Nobody is signalled or waited for; not counted in
        :attr:`stops`. The caller must :meth:`release` after a success."""
        me = threading.get_ident()
        load = self.support.load_status

        def all_stopped(others):
            return all(load(ctypes.addressof(st)) in STOPPED for _, st, _ in others)
        if not all_stopped([t for t in self.registry.snapshot() if t[0] != me]):
            return None
        self.support.set_flag(FLAG_STOP)
        others = [t for t in self.registry.snapshot() if t[0] != me]
        if not all_stopped(others):
            self.release()
            return None
        return others

    def release(self):
        """Clear STOP and wake every parked thread."""
        self.support.clear_flag(FLAG_STOP)
