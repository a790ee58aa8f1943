; The native transfer's dispatcher (deopt.native_transfer, DISPATCH_SYMBOL):
;
;   ptr dispatch(ptr exit, ptr block, ptr status)
;
; exit: the stub's %ExitState; block: the calling thread's %ThreadBlock or
; NULL; status: the thread's status word. Finds the PENDING %LifoEntry whose
; slot is the stub's E - 8 (entries[top - 1], else searched from the top
; down), and, when its %Descriptor has a target, puts the original return
; address back into the slot, calls the version's transfer code and returns
; the block's plan. Returns NULL when the Python transfer must run: no block,
; the slot not in the LIFO (counted in misses; slot untouched), or no target
; (entry marked HANDED, counted in handed; slot untouched). No Python, no
; allocation.

define ptr @${DISPATCH_SYMBOL}(ptr %exit, ptr %block, ptr %status) nounwind {
entry:
  %noblock = icmp eq ptr %block, null
  br i1 %noblock, label %none, label %look
none:
  ret ptr null
look:
  %slotp = getelementptr inbounds %ExitState, ptr %exit, i32 0, i32 ${ExitState.slot}
  %slot = ptrtoint ptr %slotp to i64
  %top.p = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.top}
  %top = load i64, ptr %top.p, align 8
  %entries.p = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.entries}
  %entries = load ptr, ptr %entries.p, align 8
  %empty = icmp eq i64 %top, 0
  br i1 %empty, label %miss, label %checktop
checktop:
  ; The common case: the innermost pending frame returns first.
  %ti = sub i64 %top, 1
  %te = getelementptr inbounds %LifoEntry, ptr %entries, i64 %ti
  %te.slot.p = getelementptr inbounds %LifoEntry, ptr %te, i32 0, i32 ${LifoEntry.slot}
  %te.slot = load i64, ptr %te.slot.p, align 8
  %te.st.p = getelementptr inbounds %LifoEntry, ptr %te, i32 0, i32 ${LifoEntry.status}
  %te.st = load i64, ptr %te.st.p, align 8
  %te.m1 = icmp eq i64 %te.slot, %slot
  %te.m2 = icmp eq i64 %te.st, ${PENDING}
  %te.m = and i1 %te.m1, %te.m2
  br i1 %te.m, label %found, label %search
search:
  %i = phi i64 [ %ti, %checktop ], [ %in, %next ]
  %more = icmp sgt i64 %i, 0
  br i1 %more, label %probe, label %miss
probe:
  %in = sub i64 %i, 1
  %e = getelementptr inbounds %LifoEntry, ptr %entries, i64 %in
  %e.slot.p = getelementptr inbounds %LifoEntry, ptr %e, i32 0, i32 ${LifoEntry.slot}
  %e.slot = load i64, ptr %e.slot.p, align 8
  %e.st.p = getelementptr inbounds %LifoEntry, ptr %e, i32 0, i32 ${LifoEntry.status}
  %e.st = load i64, ptr %e.st.p, align 8
  %e.m1 = icmp eq i64 %e.slot, %slot
  %e.m2 = icmp eq i64 %e.st, ${PENDING}
  %e.m = and i1 %e.m1, %e.m2
  br i1 %e.m, label %searched, label %next
next:
  br label %search
searched:
  %sc.p = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.searches}
  %sc = load i64, ptr %sc.p, align 8
  %sc1 = add i64 %sc, 1
  store i64 %sc1, ptr %sc.p, align 8
  br label %found
found:
  %fe = phi ptr [ %te, %checktop ], [ %e, %searched ]
  %fe.st = getelementptr inbounds %LifoEntry, ptr %fe, i32 0, i32 ${LifoEntry.status}
  %desc.p = getelementptr inbounds %LifoEntry, ptr %fe, i32 0, i32 ${LifoEntry.descriptor}
  %desc = load ptr, ptr %desc.p, align 8
  %target.p = getelementptr inbounds %Descriptor, ptr %desc, i32 0, i32 ${Descriptor.target}
  %target = load atomic ptr, ptr %target.p acquire, align 8
  %notarget = icmp eq ptr %target, null
  br i1 %notarget, label %hand, label %go
hand:
  store atomic i64 ${HANDED}, ptr %fe.st release, align 8
  %hc.p = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.handed}
  %hc = load i64, ptr %hc.p, align 8
  %hc1 = add i64 %hc, 1
  store i64 %hc1, ptr %hc.p, align 8
  br label %pop
go:
  %ra.p = getelementptr inbounds %LifoEntry, ptr %fe, i32 0, i32 ${LifoEntry.original_ra}
  %ra = load i64, ptr %ra.p, align 8
  store i64 %ra, ptr %slotp, align 8
  %code.p = getelementptr inbounds %Descriptor, ptr %desc, i32 0, i32 ${Descriptor.code}
  %code = load ptr, ptr %code.p, align 8
  %index.p = getelementptr inbounds %Descriptor, ptr %desc, i32 0, i32 ${Descriptor.index}
  %index = load i64, ptr %index.p, align 8
  %plan = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.plan}
  %state = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.state}
  call void %code(ptr %exit, i64 %index, i64 %ra, ptr %target, ptr %plan, ptr %state)
  %status.i = ptrtoint ptr %status to i64
  %sp.p = getelementptr inbounds %TransferPlan, ptr %plan, i32 0, i32 ${TransferPlan.status_ptr}
  store i64 %status.i, ptr %sp.p, align 8
  ; The last access to per-version memory was above: from here on Python
  ; may free the old version's transfer code.
  store atomic i64 ${TAKEN}, ptr %fe.st release, align 8
  br label %pop
pop:
  %result = phi ptr [ %plan, %go ], [ null, %hand ]
  br label %poploop
poploop:
  ; Drop the entries on top that are no longer PENDING.
  %t = phi i64 [ %top, %pop ], [ %tn, %popcheck ]
  %nonempty = icmp sgt i64 %t, 0
  br i1 %nonempty, label %popcheck, label %popdone
popcheck:
  %tn = sub i64 %t, 1
  %pe = getelementptr inbounds %LifoEntry, ptr %entries, i64 %tn
  %pe.st.p = getelementptr inbounds %LifoEntry, ptr %pe, i32 0, i32 ${LifoEntry.status}
  %pe.st = load i64, ptr %pe.st.p, align 8
  %gone = icmp ne i64 %pe.st, ${PENDING}
  br i1 %gone, label %poploop, label %popdone
popdone:
  store i64 %t, ptr %top.p, align 8
  ret ptr %result
miss:
  %mc.p = getelementptr inbounds %ThreadBlock, ptr %block, i32 0, i32 ${ThreadBlock.misses}
  %mc = load i64, ptr %mc.p, align 8
  %mc1 = add i64 %mc, 1
  store i64 %mc1, ptr %mc.p, align 8
  ret ptr null
}
