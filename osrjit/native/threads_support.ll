; The support library's hand-written transitions, rendered by osrjit/threads.py
; (unwinder.nativesrc): %ThreadState and its field indices come from the ctypes
; ThreadState, the statuses from ThreadStatus, the flag bits from FLAG_STOP and
; FLAG_USER. The service wrappers (osrjit_hook, osrjit_error) are generated
; with llvmlite's IRBuilder and linked into the same module;
; osrjit_save_anchor is assembly (threads_anchor.s).

@osrjit_safepoint_flag = external global i64
@osrjit_tls_key = external global i64
@osrjit_py_safepoint = external global ptr
@osrjit_py_transfer = external global ptr
@osrjit_native_transfer = external global ptr
@osrjit_park_scan = external global ptr
@osrjit_park_apply = external global ptr
@osrjit_sigint_previous = external global ptr
@osrjit_main_thread = external global ptr

declare ptr @pthread_getspecific(i32)
declare i64 @syscall(i64, ...)
; Saves the caller's callee-saved registers, RSP after return and return
; address into the thread's anchor (threads_anchor.s).
declare void @osrjit_save_anchor(ptr)
declare ptr @llvm.stacksave.p0()
declare void @llvm.eh.sjlj.longjmp(ptr) noreturn

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
  %stop = and i64 %f, ${FLAG_STOP}
  %c = icmp eq i64 %stop, 0
  br i1 %c, label %done, label %wait
wait:
  %f32 = trunc i64 %f to i32
  %r = call i64 (i64, ...) @syscall(i64 ${SYS_FUTEX}, ptr @osrjit_safepoint_flag, i32 ${FUTEX_WAIT_PRIVATE}, i32 %f32, ptr null)
  br label %loop
done:
  ret void
}

; Publish IN_JIT with a locked exchange, then check STOP (Dekker with the
; stopper's locked `or` of STOP before it reads statuses).
define void @osrjit_enter(ptr %ts) uwtable {
entry:
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  br label %loop
loop:
  %old = atomicrmw xchg ptr %status, i64 ${IN_JIT} seq_cst
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, ${FLAG_STOP}
  %c = icmp eq i64 %stop, 0
  br i1 %c, label %done, label %wait
wait:
  store atomic i64 ${OUTSIDE}, ptr %status release, align 8
  call void @osrjit_wait_released()
  br label %loop
done:
  ret void
}

define void @osrjit_leave(ptr %ts) uwtable {
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  store atomic i64 ${OUTSIDE}, ptr %status release, align 8
  ret void
}

define void @osrjit_set_flag(i64 %bits) uwtable {
  %o = atomicrmw or ptr @osrjit_safepoint_flag, i64 %bits seq_cst
  ret void
}

define void @osrjit_clear_flag(i64 %bits) uwtable {
  %nb = xor i64 %bits, -1
  %o = atomicrmw and ptr @osrjit_safepoint_flag, i64 %nb seq_cst
  %r = call i64 (i64, ...) @syscall(i64 ${SYS_FUTEX}, ptr @osrjit_safepoint_flag, i32 ${FUTEX_WAKE_PRIVATE}, i32 ${FUTEX_WAKE_ALL})
  ret void
}

define i64 @osrjit_load_status(ptr %ts) uwtable {
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  %s = load atomic i64, ptr %status seq_cst, align 8
  ret i64 %s
}

define void @osrjit_safepoint_slow() uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  %has = icmp ne ptr %ts, null
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, ${FLAG_STOP}
  %want = icmp ne i64 %stop, 0
  %park = and i1 %has, %want
  br i1 %park, label %parking, label %user
parking:
  call void @osrjit_save_anchor(ptr %ts)
  %hsp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.handshake}
  %hs = load atomic ptr, ptr %hsp acquire, align 8
  %hashs = icmp ne ptr %hs, null
  %ps = load ptr, ptr @osrjit_park_scan
  %hasps = icmp ne ptr %ps, null
  %scan = and i1 %hashs, %hasps
  br i1 %scan, label %selfscan, label %parked
selfscan:
  ; SCANNING: the stopper waits for it and does not signal it (not IN_JIT).
  store atomic i64 ${SCANNING}, ptr %status seq_cst, align 8
  call void %ps(ptr %hs, ptr @osrjit_safepoint_flag)
  br label %parked
parked:
  store atomic i64 ${PARKED}, ptr %status release, align 8
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
  %o = atomicrmw xchg ptr %status, i64 ${SCANNING} seq_cst
  %f2 = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop2 = and i64 %f2, ${FLAG_STOP}
  %again = icmp ne i64 %stop2, 0
  br i1 %again, label %reparked, label %applying
reparked:
  store atomic i64 ${PARKED}, ptr %status release, align 8
  call void @osrjit_wait_released()
  br label %claim
applying:
  call void %pa(ptr %hs)
  br label %resume
resume:
  call void @osrjit_enter(ptr %ts)
  br label %user
user:
  ; SIGINT while the main thread ran JIT code: abandon its JIT frames
  ; (osrjit_sigint_handler set the bit; the Python entry raises).
  %fi = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %int = and i64 %fi, ${FLAG_INTERRUPT}
  %isint = icmp ne i64 %int, 0
  %mine = and i1 %has, %isint
  br i1 %mine, label %main, label %user2
main:
  %mp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.is_main}
  %m = load i64, ptr %mp, align 8
  %ism = icmp ne i64 %m, 0
  br i1 %ism, label %interrupted, label %user2
interrupted:
  %oi = atomicrmw and ptr @osrjit_safepoint_flag, i64 ${NOT_FLAG_INTERRUPT} seq_cst
  call void @osrjit_abandon(ptr %ts, i64 ${INTERRUPT})
  br label %user2
user2:
  %g = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %u = and i64 %g, ${FLAG_USER}
  %call = icmp ne i64 %u, 0
  br i1 %call, label %out, label %done
out:
  br i1 %has, label %anchor, label %svc
anchor:
  call void @osrjit_save_anchor(ptr %ts)
  store atomic i64 ${OUTSIDE}, ptr %status release, align 8
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

; The native transfer (deopt.native_transfer), if installed, runs first:
; ptr native(ptr exit, ptr transfer_block, ptr status) returns the plan, or
; NULL (stack and slot untouched) to ask for the Python transfer.
define ptr @osrjit_transfer(ptr %exit) uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %mark, label %svc
mark:
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  %old = atomicrmw xchg ptr %status, i64 ${TRANSFERRING} seq_cst
  %nt = load ptr, ptr @osrjit_native_transfer
  %hasnt = icmp ne ptr %nt, null
  br i1 %hasnt, label %native, label %svc
native:
  %bp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.transfer_block}
  %block = load ptr, ptr %bp
  %nplan = call ptr %nt(ptr %exit, ptr %block, ptr %status)
  %ok = icmp ne ptr %nplan, null
  br i1 %ok, label %done, label %svc
done:
  ret ptr %nplan
svc:
  %p = load ptr, ptr @osrjit_py_transfer
  %plan = call ptr %p(ptr %exit)
  ret ptr %plan
}

; Async-signal-safe (no Python, no malloc): a thread IN_JIT while the world
; is stopping keeps its ucontext in the block and parks.
define void @osrjit_signal_handler(i32 %sig, ptr %info, ptr %uc) uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %check, label %done
check:
  %status = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.status}
  %s = load atomic i64, ptr %status seq_cst, align 8
  %injit = icmp eq i64 %s, ${IN_JIT}
  %f = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop = and i64 %f, ${FLAG_STOP}
  %want = icmp ne i64 %stop, 0
  %park = and i1 %injit, %want
  br i1 %park, label %parking, label %done
parking:
  %ucp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.ucontext}
  %uci = ptrtoint ptr %uc to i64
  store i64 %uci, ptr %ucp, align 8
  br label %parked
parked:
  store atomic i64 ${PARKED_SIGNAL}, ptr %status seq_cst, align 8
  call void @osrjit_wait_released()
  ; Leave only the way osrjit_enter does: publish IN_JIT, then check STOP.
  ; A stopper that saw PARKED_SIGNAL may be walking this stack right now:
  ; then STOP is set and we park again before running any JIT code.
  %old = atomicrmw xchg ptr %status, i64 ${IN_JIT} seq_cst
  %f2 = load atomic i64, ptr @osrjit_safepoint_flag seq_cst, align 8
  %stop2 = and i64 %f2, ${FLAG_STOP}
  %again = icmp ne i64 %stop2, 0
  br i1 %again, label %parked, label %resume
resume:
  store i64 0, ptr %ucp, align 8
  br label %done
done:
  ret void
}

; Unwind this thread's JIT frames to its innermost entry thunk, which then
; returns with ThreadState.abandoned = %reason and [abandoned_lo,
; abandoned_hi) = the stack given up (this frame's RSP, the thunk's). Returns
; without doing anything when the thread is in no entry.
define void @osrjit_abandon(ptr %ts, i64 %reason) uwtable {
entry:
  %fp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.entry_frame}
  %buf = load ptr, ptr %fp, align 8
  %has = icmp ne ptr %buf, null
  br i1 %has, label %go, label %done
go:
  %sp = call ptr @llvm.stacksave.p0()
  %spi = ptrtoint ptr %sp to i64
  %lop = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.abandoned_lo}
  store i64 %spi, ptr %lop, align 8
  %bsp = getelementptr i64, ptr %buf, i64 ${ENTRY_FRAME_SP}
  %hi = load i64, ptr %bsp, align 8
  %hip = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.abandoned_hi}
  store i64 %hi, ptr %hip, align 8
  %rp = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.abandoned}
  store i64 %reason, ptr %rp, align 8
  call void @llvm.eh.sjlj.longjmp(ptr %buf)
  unreachable
done:
  ret void
}

; A function's entry check found RSP below the thread's stack limit.
define void @osrjit_stack_overflow() uwtable {
entry:
  %ts = call ptr @osrjit_current_thread()
  %has = icmp ne ptr %ts, null
  br i1 %has, label %abandon, label %done
abandon:
  call void @osrjit_abandon(ptr %ts, i64 ${STACK_OVERFLOW})
  br label %done
done:
  ret void
}

; What the previous SIGINT handler gets when it is called late: a siginfo_t
; (128 bytes) with si_signo = SIGINT, no ucontext.
@osrjit_sigint_info = internal global [16 x i64] [i64 ${SIGINT}, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0, i64 0]

; SIGINT (async-signal-safe). If the main thread has no JIT frames (it is
; OUTSIDE without an anchor), only the previous handler runs (CPython's:
; KeyboardInterrupt at the main thread's next bytecode). If it has, set
; FLAG_INTERRUPT so its next poll abandons them; and if it is running JIT
; code rather than a hook or service, owe the previous handler's call to
; the entry thunk, which makes it as the call returns to Python
; (osrjit_sigint_deliver): no Python callback of the thread (a Python deopt
; transfer) may meet the KeyboardInterrupt first.
define void @osrjit_sigint_handler(i32 %sig, ptr %info, ptr %uc) uwtable {
entry:
  %mt = load atomic ptr, ptr @osrjit_main_thread acquire, align 8
  %hasmt = icmp ne ptr %mt, null
  br i1 %hasmt, label %check, label %chain
check:
  %status = getelementptr %ThreadState, ptr %mt, i32 0, i32 ${ThreadState.status}
  %s = load atomic i64, ptr %status seq_cst, align 8
  %out = icmp eq i64 %s, ${OUTSIDE}
  br i1 %out, label %anchored, label %owe
anchored:
  %asp = getelementptr %ThreadState, ptr %mt, i32 0, i32 ${ThreadState.anchor}, i64 ${RSP}
  %a = load atomic i64, ptr %asp monotonic, align 8
  %hasa = icmp ne i64 %a, 0
  br i1 %hasa, label %set, label %chain
owe:
  %op = getelementptr %ThreadState, ptr %mt, i32 0, i32 ${ThreadState.sigint_owed}
  store atomic i64 1, ptr %op seq_cst, align 8
  %o1 = atomicrmw or ptr @osrjit_safepoint_flag, i64 ${FLAG_INTERRUPT} seq_cst
  br label %done
set:
  %o2 = atomicrmw or ptr @osrjit_safepoint_flag, i64 ${FLAG_INTERRUPT} seq_cst
  br label %chain
chain:
  %prev = load atomic ptr, ptr @osrjit_sigint_previous acquire, align 8
  %hasprev = icmp ne ptr %prev, null
  br i1 %hasprev, label %call, label %done
call:
  call void %prev(i32 %sig, ptr %info, ptr %uc)
  br label %done
done:
  ret void
}

; The entry thunk, as it returns to Python: make the previous SIGINT
; handler's call that osrjit_sigint_handler owed this thread (if any).
define void @osrjit_sigint_deliver(ptr %ts) uwtable {
entry:
  %op = getelementptr %ThreadState, ptr %ts, i32 0, i32 ${ThreadState.sigint_owed}
  %owed = atomicrmw xchg ptr %op, i64 0 seq_cst
  %is = icmp ne i64 %owed, 0
  br i1 %is, label %chain, label %done
chain:
  %prev = load atomic ptr, ptr @osrjit_sigint_previous acquire, align 8
  %hasprev = icmp ne ptr %prev, null
  br i1 %hasprev, label %call, label %done
call:
  call void %prev(i32 ${SIGINT}, ptr @osrjit_sigint_info, ptr null)
  br label %done
done:
  ret void
}
