"""Threads: registry, native transitions, safepoints and stop-the-world.

Every thread that runs JIT code has a :class:`ThreadState` — a small native
block that JIT code finds through a pthread key — holding its *status* and,
while it is not running JIT code, an *anchor*: the registers of the last
native frame it left JIT code from (HotSpot's "last Java frame"):

=================  ======================================================
``DETACHED`` 0     never entered JIT code, or exited
``IN_JIT`` 1       running JIT code (never holds the GIL in this state)
``OUTSIDE`` 2      in the host (a hook, Python, the error service) or idle;
                   its JIT frames, if any, are frozen below the anchor
``PARKED`` 3       stopped at a safepoint poll; anchor = the slow path's frame
``TRANSFERRING`` 4 inside a deopt transfer (short; the stopper waits for it)
``PARKED_SIGNAL`` 5 stopped by the runtime's signal; registers in the ucontext
``SCANNING`` 6     at a poll, scanning its own stack for the stopper as it
                   parks, or writing its own hijacks as it leaves (short;
                   the stopper waits for it and never signals it)
=================  ======================================================

All transitions are native code from the *support library*, LLVM IR linked
into the runtime's LLJIT like any version (plus one leaf in ``module asm``
that saves the anchor):

* ``osrjit_entry_<sig>(slot, args...)`` — the entry thunk Python calls:
  saves the previous anchor, enters (``IN_JIT``; waits while the world is
  stopped), calls the slot's current version, restores, leaves (``OUTSIDE``);
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

The flag word (``osrjit_safepoint_flag``) that polls test has two bits:
:data:`FLAG_STOP` (stop the world) and :data:`FLAG_USER` (call the Python
safepoint service). Entering checks STOP after publishing ``IN_JIT`` with a
locked exchange, and the stopper sets STOP with a locked ``or`` before reading
statuses, so a thread either sees STOP or is seen ``IN_JIT`` (Dekker).
"""
import ctypes
import ctypes.util
import os
import threading
import time

import llvmlite.binding as llvm

from .errors import OsrJitError, SafepointTimeout

DETACHED, IN_JIT, OUTSIDE, PARKED, TRANSFERRING, PARKED_SIGNAL, SCANNING = range(7)
STATUS_NAMES = ("DETACHED", "IN_JIT", "OUTSIDE", "PARKED", "TRANSFERRING", "PARKED_SIGNAL",
                "SCANNING")
#: Statuses in which a thread runs no JIT code and its stack can be walked.
STOPPED = frozenset((DETACHED, OUTSIDE, PARKED, PARKED_SIGNAL))

FLAG_STOP = 1
#: Seconds :meth:`World.stop` polls the threads' statuses yielding the CPU
#: (a sleep costs ~60 µs of timer slack) before it polls every 20 µs.
SPIN_SECONDS = 0.0002
FLAG_USER = 2

_SYS_FUTEX = 202
_FUTEX_WAIT_PRIVATE = 128
_FUTEX_WAKE_PRIVATE = 129

# DWARF register numbers (the anchor uses the unwinder's capture layout:
# 17 slots indexed by DWARF number).
_RBX, _RBP, _RSP, _R12, _R13, _R14, _R15, _RIP = 3, 6, 7, 12, 13, 14, 15, 16


class ThreadState(ctypes.Structure):
    """The native per-thread block. Layout shared with the support library IR:
    ``status`` at 0, ``anchor`` (17 u64 by DWARF number) at 8, ``ucontext`` at
    144, ``transfer_block`` at 152: address of the thread's
    :class:`deopt.native_transfer.ThreadBlock` (its hijack LIFO), 0 if none;
    written only while the world is stopped, read by ``osrjit_transfer``;
    ``handshake`` at 160: address of the block the park path hands to
    ``osrjit_park_scan`` (see :class:`osrjit.fastscan.SelfScan`), 0 if none."""
    _fields_ = [("status", ctypes.c_int64),
                ("anchor", ctypes.c_uint64 * 17),
                ("ucontext", ctypes.c_uint64),
                ("transfer_block", ctypes.c_uint64),
                ("handshake", ctypes.c_uint64)]


assert ctypes.sizeof(ThreadState) == 168
assert ThreadState.anchor.offset == 8 and ThreadState.ucontext.offset == 144
assert ThreadState.transfer_block.offset == 152 and ThreadState.handshake.offset == 160

ANCHOR_OFFSET = 8
UCONTEXT_OFFSET = 144
TRANSFER_BLOCK_OFFSET = 152
HANDSHAKE_OFFSET = 160

# glibc x86-64 ucontext_t: uc_flags 8, uc_link 8, uc_stack 24, then
# mcontext_t.gregs[23] (REG_R8 = 0 ... REG_RIP = 16).
_UC_GREGS = 40
_GREG_TO_DWARF = {0: 8, 1: 9, 2: 10, 3: 11, 4: 12, 5: 13, 6: 14, 7: 15, 8: 5, 9: 4,
                  10: 6, 11: 3, 12: 1, 13: 0, 14: 2, 15: 7, 16: 16}

_SAVE_ANCHOR_ASM = """
.text
.globl osrjit_save_anchor
.p2align 4
.type osrjit_save_anchor,@function
osrjit_save_anchor:
.cfi_startproc
movq %rbx, 24(%rdi)
movq %rbp, 48(%rdi)
leaq 8(%rsp), %rax
movq %rax, 56(%rdi)
movq %r12, 96(%rdi)
movq %r13, 104(%rdi)
movq %r14, 112(%rdi)
movq %r15, 120(%rdi)
movq (%rsp), %rax
movq %rax, 128(%rdi)
retq
.cfi_endproc
.size osrjit_save_anchor, .-osrjit_save_anchor
"""

SUPPORT_IR = r"""
@osrjit_safepoint_flag = external global i64
@osrjit_tls_key = external global i64
@osrjit_py_hook = external global ptr
@osrjit_py_safepoint = external global ptr
@osrjit_py_error = external global ptr
@osrjit_py_transfer = external global ptr
@osrjit_native_transfer = external global ptr
@osrjit_park_scan = external global ptr
@osrjit_park_apply = external global ptr

declare ptr @pthread_getspecific(i32)
declare i64 @syscall(i64, ...)
declare void @osrjit_save_anchor(ptr)

define ptr @osrjit_current_thread() uwtable {
  %k = load i64, ptr @osrjit_tls_key
  %k32 = trunc i64 %k to i32
  %t = call ptr @pthread_getspecific(i32 %k32)
  ret ptr %t
}

; Block while the STOP bit is set (futex on the flag's low 32 bits).
define void @osrjit_wait_released() uwtable {
entry:
  br label %loop
loop:
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, 1
  %c = icmp eq i64 %stop, 0
  br i1 %c, label %done, label %wait
wait:
  %f32 = trunc i64 %f to i32
  %r = call i64 (i64, ...) @syscall(i64 202, ptr @osrjit_safepoint_flag, i32 128, i32 %f32, ptr null)
  br label %loop
done:
  ret void
}

define void @osrjit_enter(ptr %ts) uwtable {
entry:
  br label %loop
loop:
  %old = atomicrmw xchg ptr %ts, i64 1 seq_cst
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, 1
  %c = icmp eq i64 %stop, 0
  br i1 %c, label %done, label %wait
wait:
  store atomic i64 2, ptr %ts release, align 8
  call void @osrjit_wait_released()
  br label %loop
done:
  ret void
}

define void @osrjit_leave(ptr %ts) uwtable {
  store atomic i64 2, ptr %ts release, align 8
  ret void
}

define void @osrjit_set_flag(i64 %bits) uwtable {
  %o = atomicrmw or ptr @osrjit_safepoint_flag, i64 %bits seq_cst
  ret void
}

define void @osrjit_clear_flag(i64 %bits) uwtable {
  %nb = xor i64 %bits, -1
  %o = atomicrmw and ptr @osrjit_safepoint_flag, i64 %nb seq_cst
  %r = call i64 (i64, ...) @syscall(i64 202, ptr @osrjit_safepoint_flag, i32 129, i32 2147483647)
  ret void
}

define i64 @osrjit_load_status(ptr %ts) uwtable {
  %s = load atomic i64, ptr %ts seq_cst, align 8
  ret i64 %s
}

define void @osrjit_safepoint_slow() uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, 1
  %want = icmp ne i64 %stop, 0
  %park = and i1 %has, %want
  br i1 %park, label %parking, label %user
parking:
  %anchor = getelementptr i8, ptr %ts, i64 8
  call void @osrjit_save_anchor(ptr %anchor)
  %hsp = getelementptr i8, ptr %ts, i64 160
  %hs = load atomic ptr, ptr %hsp acquire, align 8
  %hashs = icmp ne ptr %hs, null
  %ps = load ptr, ptr @osrjit_park_scan
  %hasps = icmp ne ptr %ps, null
  %scan = and i1 %hashs, %hasps
  br i1 %scan, label %selfscan, label %parked
selfscan:
  ; SCANNING: the stopper waits for it and does not signal it (not IN_JIT).
  store atomic i64 6, ptr %ts seq_cst, align 8
  call void %ps(ptr %hs, ptr @osrjit_safepoint_flag)
  br label %parked
parked:
  store atomic i64 3, ptr %ts release, align 8
  call void @osrjit_wait_released()
  %pa = load ptr, ptr @osrjit_park_apply
  %haspa = icmp ne ptr %pa, null
  %apply = and i1 %hashs, %haspa
  br i1 %apply, label %claim, label %resume
claim:
  ; Write what the stopper left for this thread (its own hijacks) before it
  ; runs JIT code. Busy (SCANNING) first, then STOP: a stopper that set STOP
  ; either sees the busy status and waits, or this thread sees STOP and parks
  ; again, leaving the block to that stopper (Dekker, as osrjit_enter).
  %o = atomicrmw xchg ptr %ts, i64 6 seq_cst
  %f2 = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop2 = and i64 %f2, 1
  %again = icmp ne i64 %stop2, 0
  br i1 %again, label %reparked, label %applying
reparked:
  store atomic i64 3, ptr %ts release, align 8
  call void @osrjit_wait_released()
  br label %claim
applying:
  call void %pa(ptr %hs)
  br label %resume
resume:
  call void @osrjit_enter(ptr %ts)
  br label %user
user:
  %g = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %u = and i64 %g, 2
  %call = icmp ne i64 %u, 0
  br i1 %call, label %out, label %done
out:
  br i1 %has, label %anchor2, label %svc
anchor2:
  %anchorb = getelementptr i8, ptr %ts, i64 8
  call void @osrjit_save_anchor(ptr %anchorb)
  store atomic i64 2, ptr %ts release, align 8
  br label %svc
svc:
  %p = load ptr, ptr @osrjit_py_safepoint
  call void %p()
  br i1 %has, label %back, label %done
back:
  call void @osrjit_enter(ptr %ts)
  br label %done
done:
  ret void
}

{SERVICE_WRAPPERS}
; The native transfer (deopt.native_transfer), if installed, runs first:
; ptr native(ptr exit, ptr transfer_block, ptr status) returns the plan, or
; NULL (stack and slot untouched) to ask for the Python transfer.
define ptr @osrjit_transfer(ptr %exit) uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %mark, label %svc
mark:
  %old = atomicrmw xchg ptr %ts, i64 4 seq_cst
  %nt = load ptr, ptr @osrjit_native_transfer
  %hasnt = icmp ne ptr %nt, null
  br i1 %hasnt, label %native, label %svc
native:
  %bp = getelementptr i8, ptr %ts, i64 152
  %block = load ptr, ptr %bp
  %nplan = call ptr %nt(ptr %exit, ptr %block, ptr %ts)
  %ok = icmp ne ptr %nplan, null
  br i1 %ok, label %done, label %svc
done:
  ret ptr %nplan
svc:
  %p = load ptr, ptr @osrjit_py_transfer
  %plan = call ptr %p(ptr %exit)
  ret ptr %plan
}

define void @osrjit_signal_handler(i32 %sig, ptr %info, ptr %uc) uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %check, label %done
check:
  %s = load atomic i64, ptr %ts seq_cst, align 8
  %injit = icmp eq i64 %s, 1
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, 1
  %want = icmp ne i64 %stop, 0
  %park = and i1 %injit, %want
  br i1 %park, label %parking, label %done
parking:
  %ucp = getelementptr i8, ptr %ts, i64 144
  %uci = ptrtoint ptr %uc to i64
  store i64 %uci, ptr %ucp, align 8
  br label %parked
parked:
  store atomic i64 5, ptr %ts seq_cst, align 8
  call void @osrjit_wait_released()
  ; Leave only the way osrjit_enter does: publish IN_JIT, then check STOP.
  ; A stopper that saw PARKED_SIGNAL may be walking this stack right now:
  ; then STOP is set and we park again before running any JIT code.
  %old = atomicrmw xchg ptr %ts, i64 1 seq_cst
  %f2 = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop2 = and i64 %f2, 1
  %again = icmp ne i64 %stop2, 0
  br i1 %again, label %parked, label %resume
resume:
  store i64 0, ptr %ucp, align 8
  br label %done
done:
  ret void
}
"""

def _service_wrapper_ir(name, ret, param_type, cell):
    """IR of a wrapper around a Python service: save the anchor, go OUTSIDE,
    call the service through ``cell``, enter JIT code again (blocking while
    the world is stopped)."""
    result = "%r = " if ret != "void" else ""
    ret_stmt = f"ret {ret} %r" if ret != "void" else "ret void"
    return f"""
define {ret} @{name}({param_type} %x) uwtable {{
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %out, label %svc
out:
  %anchor = getelementptr i8, ptr %ts, i64 8
  call void @osrjit_save_anchor(ptr %anchor)
  store atomic i64 2, ptr %ts release, align 8
  br label %svc
svc:
  %p = load ptr, ptr @{cell}
  {result}call {ret} %p({param_type} %x)
  br i1 %has, label %back, label %done
back:
  call void @osrjit_enter(ptr %ts)
  br label %done
done:
  {ret_stmt}
}}
"""


SUPPORT_IR = SUPPORT_IR.replace("{SERVICE_WRAPPERS}", "".join((
    _service_wrapper_ir("osrjit_hook", "i64", "i64", "osrjit_py_hook"),
    _service_wrapper_ir("osrjit_error", "void", "i64", "osrjit_py_error"))))

_SIGNATURE_TYPES = {"i64": "i64", "i32": "i32", "i8": "i8", "i1": "i1", "double": "double",
                    "ptr": "ptr", "void": "void"}


def entry_thunk_ir(return_type, arity):
    """IR of ``osrjit_entry_<ret>_<n>(ptr slot, i64 x n)``: the runtime's entry thunk."""
    ret = _SIGNATURE_TYPES[return_type]
    name = f"osrjit_entry_{return_type}_{arity}"
    params = ", ".join(["ptr %slot"] + [f"i64 %a{i}" for i in range(arity)])
    args = ", ".join(f"i64 %a{i}" for i in range(arity))
    call = f"call {ret} %fn({args})"
    result = f"%r = {call}" if ret != "void" else call
    ret_stmt = f"ret {ret} %r" if ret != "void" else "ret void"
    return name, f"""
declare ptr @osrjit_current_thread()
declare void @osrjit_enter(ptr)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define {ret} @{name}({params}) uwtable {{
  %ts = call ptr @osrjit_current_thread()
  %saved = alloca [17 x i64], align 8
  %anchor = getelementptr i8, ptr %ts, i64 8
  call void @llvm.memcpy.p0.p0.i64(ptr %saved, ptr %anchor, i64 136, i1 false)
  call void @osrjit_enter(ptr %ts)
  %fn = load ptr, ptr %slot
  {result}
  call void @llvm.memcpy.p0.p0.i64(ptr %anchor, ptr %saved, i64 136, i1 false)
  store atomic i64 2, ptr %ts release, align 8
  {ret_stmt}
}}
"""


def _module_with_asm(ir_text, asm, triple):
    lines = [f'target triple = "{triple}"']
    for line in asm.strip().splitlines():
        lines.append('module asm "' + line.replace("\\", "\\\\").replace('"', '\\22') + '"')
    return "\n".join(lines) + "\n" + ir_text


# PyDLL: none of these blocks, and the stop-the-world calls some of them
# (pthread_kill, pthread_getattr_np) while it must keep the GIL.
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.pthread_key_create.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
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


class SupportLibrary:
    """The runtime's native transition code, linked into its LLJIT.

    ``linker``: the runtime's :class:`osrjit.native.linker.Linker` (it owns
    this library and the entry thunks, released after every version linked
    later). ``space``: the
    unwinder's address space (the library is registered so walks through
    transitions use its CFI). ``flag``: the safepoint flag cell (c_int64).
    Cells for the Python services are filled with :meth:`set_service`.
    """

    SERVICES = ("osrjit_py_hook", "osrjit_py_safepoint", "osrjit_py_error", "osrjit_py_transfer",
                "osrjit_native_transfer", "osrjit_park_scan", "osrjit_park_apply")
    EXPORTS = ("osrjit_current_thread", "osrjit_enter", "osrjit_leave", "osrjit_set_flag",
               "osrjit_clear_flag", "osrjit_load_status", "osrjit_safepoint_slow", "osrjit_hook",
               "osrjit_error", "osrjit_transfer", "osrjit_signal_handler", "osrjit_save_anchor")
    def __init__(self, linker, space, flag):
        self._linker = linker
        self._space = space
        key = ctypes.c_uint(0)
        if _libc.pthread_key_create(ctypes.byref(key), None) != 0:
            raise OsrJitError("pthread_key_create failed")
        self.key = key.value
        self._key_cell = ctypes.c_int64(self.key)
        self._service_cells = {name: ctypes.c_void_p(0) for name in self.SERVICES}
        linker.keep(self._key_cell, *self._service_cells.values())
        tm = linker.tm
        text = _module_with_asm(SUPPORT_IR, _SAVE_ANCHOR_ASM, tm.triple)
        mod = llvm.parse_assembly(text)
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
        self.enter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(a["osrjit_enter"])
        # PYFUNCTYPE: called with the GIL held (these never block). Releasing
        # it around clear_flag would let the threads it wakes take the GIL
        # first, and the stopper would wait a whole switch interval (5 ms) to
        # get it back before replace() can return.
        self.set_flag = ctypes.PYFUNCTYPE(None, ctypes.c_int64)(a["osrjit_set_flag"])
        self.clear_flag = ctypes.PYFUNCTYPE(None, ctypes.c_int64)(a["osrjit_clear_flag"])
        self.load_status = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(
            a["osrjit_load_status"])
        self._thunks = {}
        self._thunk_lock = threading.Lock()

    def set_service(self, name, address):
        """Point the cell of service ``name`` (one of :data:`SERVICES`) at ``address``."""
        self._service_cells[name].value = address

    def entry_thunk(self, return_type, arity):
        """Address of the entry thunk for functions ``(i64 x arity) -> return_type``."""
        key = (return_type, arity)
        with self._thunk_lock:
            address = self._thunks.get(key)
            if address is None:
                name, text = entry_thunk_ir(return_type, arity)
                tm = self._linker.tm
                obj = self._linker.emit(f'target triple = "{tm.triple}"\n' + text)
                thunk = self._linker.link(obj, f"osrjit.entry.{name}", exports=(name,),
                                          libraries=(self.library,),
                                          register=f"osrjit.entry.{name}", space=self._space)
                address = self._thunks[key] = thunk[name]
            return address


class ThreadRegistry:
    """Attached threads. A thread attaches on its first entry into JIT code and
    detaches when it exits (its thread-local block is collected)."""

    def __init__(self, key):
        self._key = key
        self._lock = threading.Lock()
        self._states = {}              # ident -> (ThreadState, thread name)
        self._bounds = {}              # ident -> (lo, hi) of its stack
        self._local = threading.local()

    def current(self):
        """This thread's :class:`ThreadState`, attaching it if needed."""
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = _Holder(self)
            self._local.holder = holder
        return holder.state

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
        st.status = OUTSIDE
        if _libc.pthread_setspecific(self._key, ctypes.addressof(st)) != 0:
            raise OsrJitError("pthread_setspecific failed")
        bounds = current_stack_bounds()
        with self._lock:
            self._states[holder.ident] = (st, threading.current_thread().name)
            if bounds is not None:
                self._bounds[holder.ident] = bounds

    def _detach(self, holder):
        holder.state.status = DETACHED
        with self._lock:
            # A thread's block may be collected after a new thread reused its
            # ident and attached: only forget the entry if it is still ours.
            entry = self._states.get(holder.ident)
            if entry is not None and entry[0] is holder.state:
                del self._states[holder.ident]
                self._bounds.pop(holder.ident, None)


class _Holder:
    """Owns one thread's :class:`ThreadState`; collected when the thread exits."""

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
    if not a[_RSP]:
        return None
    return {r: a[r] for r in (_RBX, _RBP, _RSP, _R12, _R13, _R14, _R15, _RIP)}


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
    (signals someone else handles are left alone), installs the native handler
    with ``SA_SIGINFO | SA_RESTART`` and restores the previous action on
    :meth:`close`.
    """

    def __init__(self, handler_address):
        # getattr: a double-underscore name inside a class body would be mangled.
        lo = getattr(_libc, "__libc_current_sigrtmin")()
        hi = getattr(_libc, "__libc_current_sigrtmax")()
        self.signal = None
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
            raise OsrJitError("no free real-time signal for the runtime's async stop")

    def send(self, ident):
        """Send the signal to the thread with pthread id ``ident`` (True if sent)."""
        return _libc.pthread_kill(ident, self.signal) == 0

    def close(self):
        if self.signal is not None:
            _libc.sigaction(self.signal, ctypes.byref(self._old), None)
            self.signal = None


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

    def release(self):
        """Clear STOP and wake every parked thread."""
        self.support.clear_flag(FLAG_STOP)
