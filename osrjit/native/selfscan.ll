; The thread side of the self-scan handshake: park_scan, park_apply, cancel
; (and a clock). Rendered by osrjit/selfscan.py, which documents the protocol
; and links this module into deopt's native hijack module (the scan, apply
; and LIFO functions declared here are defined there).

declare i64 @${SCAN_SYMBOL}(ptr) nounwind
declare i64 @${APPLY_SYMBOL}(ptr, ptr, ptr, i64, ptr, i64) nounwind
declare i64 @${LIFO_SYMBOL}(ptr, ptr, ptr, ptr, i64, ptr) nounwind
declare i32 @clock_gettime(i32, ptr)

; --- cancel: withdraw a request (the stopper, after its release) ----------
define void @${CANCEL_SYMBOL}(ptr %hs) nounwind {
entry:
  %state = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.state}
  br label %loop
loop:
  %cx = cmpxchg ptr %state, i64 ${HS_REQUESTED}, i64 ${HS_IDLE} seq_cst seq_cst
  %won = extractvalue { i64, i1 } %cx, 1
  br i1 %won, label %done, label %check
check:
  %old = extractvalue { i64, i1 } %cx, 0
  %busy = icmp eq i64 %old, ${HS_SCANNING}
  br i1 %busy, label %loop, label %answered
answered:
  ; SCANNED -> IDLE; IDLE and the apply states are left as they are.
  %cx2 = cmpxchg ptr %state, i64 ${HS_SCANNED}, i64 ${HS_IDLE} seq_cst seq_cst
  br label %done
done:
  ret void
}

; --- park_apply: write the hijacks left in the block (the thread as it wakes,
; or the next stopper while it is still stopped) --------------------------
define void @${PARK_APPLY_SYMBOL}(ptr %hs) nounwind {
entry:
  %state = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.state}
  %cx = cmpxchg ptr %state, i64 ${HS_APPLY}, i64 ${HS_APPLYING} seq_cst seq_cst
  %won = extractvalue { i64, i1 } %cx, 1
  br i1 %won, label %go, label %done
go:
  %t0.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.apply_start_ns}
  %t0 = call i64 @${NOW_SYMBOL}()
  store i64 %t0, ptr %t0.p
  %os.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.args}, i32 ${ScanArgs.slots}
  %os = load ptr, ptr %os.p
  %or.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.args}, i32 ${ScanArgs.ras}
  %or = load ptr, ptr %or.p
  %ok.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.args}, i32 ${ScanArgs.kinds}
  %ok = load ptr, ptr %ok.p
  %m.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.args}, i32 ${ScanArgs.m}
  %m = load i64, ptr %m.p
  %stubs.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.stubs}
  %stubs = load ptr, ptr %stubs.p
  %w0 = call i64 @${APPLY_SYMBOL}(ptr %os, ptr %or, ptr %ok, i64 %m, ptr %stubs, i64 ${APPLY_WRITE})
  %dest.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.lifo_entries}
  %dest = load ptr, ptr %dest.p
  %hasdest = icmp ne ptr %dest, null
  br i1 %hasdest, label %lifo, label %fin
lifo:
  %descs.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.descriptors}
  %descs = load ptr, ptr %descs.p
  %w = call i64 @${LIFO_SYMBOL}(ptr %dest, ptr %os, ptr %or, ptr %ok, i64 %m, ptr %descs)
  %wr.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.written}
  store i64 %w, ptr %wr.p
  %blk.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.lifo_block}
  %blk = load ptr, ptr %blk.p
  %top.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.lifo_top}
  %top = load i64, ptr %top.p
  %blktop = getelementptr i8, ptr %blk, i64 ${LIFO_TOP_OFFSET}
  store atomic i64 %top, ptr %blktop release, align 8
  br label %fin
fin:
  %t1.p = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.apply_end_ns}
  %t1 = call i64 @${NOW_SYMBOL}()
  store i64 %t1, ptr %t1.p
  store atomic i64 ${HS_APPLIED}, ptr %state release, align 8
  br label %done
done:
  ret void
}

; Monotonic nanoseconds (clock_gettime through the vDSO: no system call).
define i64 @${NOW_SYMBOL}() nounwind {
  %ts = alloca %Timespec, align 8
  %r = call i32 @clock_gettime(i32 ${CLOCK_MONOTONIC}, ptr %ts)
  %sp = getelementptr %Timespec, ptr %ts, i32 0, i32 ${Timespec.tv_sec}
  %s = load i64, ptr %sp
  %nsp = getelementptr %Timespec, ptr %ts, i32 0, i32 ${Timespec.tv_nsec}
  %ns = load i64, ptr %nsp
  %sns = mul i64 %s, 1000000000
  %t = add i64 %sns, %ns
  ret i64 %t
}

; --- park_scan: scan the own stack as the thread parks, if asked ----------
define void @${PARK_SCAN_SYMBOL}(ptr %hs, ptr %flag) nounwind {
entry:
  %state = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.state}
  %cx = cmpxchg ptr %state, i64 ${HS_REQUESTED}, i64 ${HS_SCANNING} seq_cst seq_cst
  %won = extractvalue { i64, i1 } %cx, 1
  br i1 %won, label %check, label %done
check:
  ; The request precedes its stop's STOP: with STOP set now, this thread
  ; parks for the stop that asked (which cannot end while the thread scans).
  ; With STOP clear it came here from a stop that is over: not its request.
  %f = load atomic i64, ptr %flag seq_cst, align 8
  %stop = and i64 %f, ${FLAG_STOP}
  %current = icmp ne i64 %stop, 0
  br i1 %current, label %scan, label %giveback
giveback:
  store atomic i64 ${HS_REQUESTED}, ptr %state seq_cst, align 8
  br label %done
scan:
  %args = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.args}
  %r = call i64 @${SCAN_SYMBOL}(ptr %args)
  %st = getelementptr %Handshake, ptr %hs, i32 0, i32 ${Handshake.status}
  store i64 %r, ptr %st
  store atomic i64 ${HS_SCANNED}, ptr %state release, align 8
  br label %done
done:
  ret void
}
