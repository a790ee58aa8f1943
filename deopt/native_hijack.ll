; The native hijack's stack operations: plan, check-then-write, LIFO entries,
; and the single-stack scan (walk + plan). Rendered by deopt/native_hijack.py
; (hijack_module_ir), which documents each function; every layout comes from
; its ctypes structure, every number from its Python constant.

declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)

; --- plan: classify frames[first, n) against the sorted keys and ranges ----
define i64 @${PLAN_SYMBOL}(ptr %f, i64 %n, i64 %first, ptr %keys, ptr %hk, i64 %nk,
                           ptr %counts, ptr %os, ptr %or, ptr %ok, i64 %cap, ptr %ranges,
                           i64 %nr, ptr %rcounts) nounwind {
entry:
  br label %loop
loop:
  %i = phi i64 [ %first, %entry ], [ %inext, %next ]
  %m = phi i64 [ 0, %entry ], [ %m2, %next ]       ; frames to hijack (front)
  %t = phi i64 [ 0, %entry ], [ %t2, %next ]       ; frames already hijacked (back)
  %done = icmp uge i64 %i, %n
  br i1 %done, label %exit, label %body
body:
  %fp = getelementptr %OutFrame, ptr %f, i64 %i
  %pcp = getelementptr %OutFrame, ptr %fp, i32 0, i32 ${OutFrame.pc}
  %pc = load i64, ptr %pcp
  br label %bs
bs:                                                ; binary search of pc in keys
  %lo = phi i64 [ 0, %body ], [ %lo2, %bsstep ]
  %hi = phi i64 [ %nk, %body ], [ %hi2, %bsstep ]
  %more = icmp ult i64 %lo, %hi
  br i1 %more, label %bsmid, label %rs0
bsmid:
  %sum = add i64 %lo, %hi
  %mid = lshr i64 %sum, 1
  %kp = getelementptr i64, ptr %keys, i64 %mid
  %kv = load i64, ptr %kp
  %eq = icmp eq i64 %kv, %pc
  br i1 %eq, label %found, label %bsstep
bsstep:
  %lt = icmp ult i64 %kv, %pc
  %mid1 = add i64 %mid, 1
  %lo2 = select i1 %lt, i64 %mid1, i64 %lo
  %hi2 = select i1 %lt, i64 %hi, i64 %mid
  br label %bs
rs0:                                               ; no key: is pc - 1 in a range?
  %lpc = sub i64 %pc, 1
  br label %rs
rs:
  %rlo = phi i64 [ 0, %rs0 ], [ %rlo2, %rsstep ]
  %rhi = phi i64 [ %nr, %rs0 ], [ %rhi2, %rsstep ]
  %rmore = icmp ult i64 %rlo, %rhi
  br i1 %rmore, label %rsmid, label %next
rsmid:
  %rsum = add i64 %rlo, %rhi
  %rmid = lshr i64 %rsum, 1
  %rstp = getelementptr %CodeRange, ptr %ranges, i64 %rmid, i32 ${CodeRange.start}
  %rstart = load i64, ptr %rstp
  %renp = getelementptr %CodeRange, ptr %ranges, i64 %rmid, i32 ${CodeRange.end}
  %rend = load i64, ptr %renp
  %below = icmp ult i64 %lpc, %rstart
  %inside0 = icmp ult i64 %lpc, %rend
  %notbelow = xor i1 %below, true
  %inside = and i1 %notbelow, %inside0
  br i1 %inside, label %rhit, label %rsstep
rsstep:
  %rmid1 = add i64 %rmid, 1
  %rlo2 = select i1 %below, i64 %rlo, i64 %rmid1
  %rhi2 = select i1 %below, i64 %rmid, i64 %rhi
  br label %rs
rhit:
  %rcp = getelementptr i64, ptr %rcounts, i64 %rmid
  %rcv = load i64, ptr %rcp
  %rcv1 = add i64 %rcv, 1
  store i64 %rcv1, ptr %rcp
  br label %next
found:                                             ; pc is key %mid
  %kc = getelementptr %KeyCounts, ptr %counts, i64 %mid
  %hkp = getelementptr i64, ptr %hk, i64 %mid
  %hkv = load i64, ptr %hkp
  %hko = icmp ne i64 %hkv, 0
  %infop = getelementptr %OutFrame, ptr %fp, i32 0, i32 ${OutFrame.info}
  %info = load i64, ptr %infop
  %tr = and i64 %info, ${FRAME_TRANSLATED}
  %istr = icmp ne i64 %tr, 0
  br i1 %istr, label %translated, label %nottr
translated:                                        ; its slot holds the stub already
  %ctp = getelementptr %KeyCounts, ptr %kc, i32 0, i32 ${KeyCounts.already_hijacked}
  %ctv = load i64, ptr %ctp
  %ctv1 = add i64 %ctv, 1
  store i64 %ctv1, ptr %ctp
  br i1 %hko, label %trback, label %next
trback:
  %back0 = sub i64 %cap, 1
  %back = sub i64 %back0, %t
  %bsp = getelementptr i64, ptr %os, i64 %back
  %hasprev = icmp ugt i64 %i, 0
  br i1 %hasprev, label %trslot, label %trnoslot
trslot:                                            ; frames[i - 1].ra_slot
  %prevsp = getelementptr %OutFrame, ptr %fp, i64 -1, i32 ${OutFrame.ra_slot}
  %trs = load i64, ptr %prevsp
  br label %trstore
trnoslot:
  br label %trstore
trstore:
  %trsv = phi i64 [ %trs, %trslot ], [ 0, %trnoslot ]
  store i64 %trsv, ptr %bsp
  %brp = getelementptr i64, ptr %or, i64 %back
  store i64 %pc, ptr %brp
  %bkp = getelementptr i64, ptr %ok, i64 %back
  store i64 %mid, ptr %bkp
  %t1 = add i64 %t, 1
  br label %next
nottr:                                             ; hijackable: a hijack key, a caller
  %hp0 = icmp ugt i64 %i, 0                        ; frame, its RA in memory, unchanged
  %hp = and i1 %hp0, %hko
  br i1 %hp, label %chkslot, label %unh
chkslot:                                           ; frames[i - 1].ra_slot
  %psp = getelementptr %OutFrame, ptr %fp, i64 -1, i32 ${OutFrame.ra_slot}
  %slot = load i64, ptr %psp
  %nz = icmp ne i64 %slot, 0
  br i1 %nz, label %chkval, label %unh
chkval:
  %slotp = inttoptr i64 %slot to ptr
  %cur = load volatile i64, ptr %slotp
  %same = icmp eq i64 %cur, %pc
  br i1 %same, label %hij, label %unh
hij:
  %osp = getelementptr i64, ptr %os, i64 %m
  store i64 %slot, ptr %osp
  %orp = getelementptr i64, ptr %or, i64 %m
  store i64 %pc, ptr %orp
  %okp = getelementptr i64, ptr %ok, i64 %m
  store i64 %mid, ptr %okp
  %chp = getelementptr %KeyCounts, ptr %kc, i32 0, i32 ${KeyCounts.hijack}
  %chv = load i64, ptr %chp
  %chv1 = add i64 %chv, 1
  store i64 %chv1, ptr %chp
  %m1 = add i64 %m, 1
  br label %next
unh:
  %cup = getelementptr %KeyCounts, ptr %kc, i32 0, i32 ${KeyCounts.not_hijackable}
  %cuv = load i64, ptr %cup
  %cuv1 = add i64 %cuv, 1
  store i64 %cuv1, ptr %cup
  br label %next
next:
  %m2 = phi i64 [ %m, %rs ], [ %m, %rhit ], [ %m, %translated ], [ %m, %trstore ], [ %m1, %hij ], [ %m, %unh ]
  %t2 = phi i64 [ %t, %rs ], [ %t, %rhit ], [ %t, %translated ], [ %t1, %trstore ], [ %t, %hij ], [ %t, %unh ]
  %inext = add i64 %i, 1
  br label %loop
exit:
  ret i64 %m
}

; --- apply: check every slot (write = APPLY_CHECK) or write its kind's stub -
define i64 @${APPLY_SYMBOL}(ptr %os, ptr %or, ptr %kinds, i64 %m, ptr %stubs, i64 %write) nounwind {
entry:
  %w = icmp ne i64 %write, ${APPLY_CHECK}
  br i1 %w, label %wloop, label %cloop
cloop:
  %j = phi i64 [ 0, %entry ], [ %j1, %cok ]
  %prev = phi i64 [ 0, %entry ], [ %s, %cok ]
  %cdone = icmp uge i64 %j, %m
  br i1 %cdone, label %ok, label %cbody
cbody:
  %sp = getelementptr i64, ptr %os, i64 %j
  %s = load i64, ptr %sp
  %rp = getelementptr i64, ptr %or, i64 %j
  %r = load i64, ptr %rp
  %rise = icmp ugt i64 %s, %prev
  %sptr = inttoptr i64 %s to ptr
  br i1 %rise, label %cval, label %bad
cval:
  %cur = load volatile i64, ptr %sptr
  %same = icmp eq i64 %cur, %r
  br i1 %same, label %cok, label %bad
cok:
  %j1 = add i64 %j, 1
  br label %cloop
bad:
  %jj = add i64 %j, 1
  ret i64 %jj
wloop:
  %k = phi i64 [ 0, %entry ], [ %k1, %wbody ]
  %wdone = icmp uge i64 %k, %m
  br i1 %wdone, label %ok, label %wbody
wbody:
  %wsp = getelementptr i64, ptr %os, i64 %k
  %ws = load i64, ptr %wsp
  %wptr = inttoptr i64 %ws to ptr
  %wkp = getelementptr i64, ptr %kinds, i64 %k
  %wk = load i64, ptr %wkp
  %wstp = getelementptr i64, ptr %stubs, i64 %wk
  %wst = load i64, ptr %wstp
  store volatile i64 %wst, ptr %wptr
  %k1 = add i64 %k, 1
  br label %wloop
ok:
  ret i64 0                                        ; every slot checked (or written)
}

; --- lifo: LifoEntry records, highest slot first ---------------------------
define i64 @${LIFO_SYMBOL}(ptr %e, ptr %os, ptr %or, ptr %ok, i64 %m, ptr %descs) nounwind {
entry:
  br label %loop
loop:
  %j = phi i64 [ %m, %entry ], [ %jm, %next ]
  %c = phi i64 [ 0, %entry ], [ %c2, %next ]
  %done = icmp eq i64 %j, 0
  br i1 %done, label %exit, label %body
body:
  %jm = sub i64 %j, 1
  %kp = getelementptr i64, ptr %ok, i64 %jm
  %k = load i64, ptr %kp
  %dp = getelementptr i64, ptr %descs, i64 %k
  %d = load i64, ptr %dp
  %has = icmp ne i64 %d, 0
  br i1 %has, label %put, label %next
put:
  %sp = getelementptr i64, ptr %os, i64 %jm
  %s = load i64, ptr %sp
  %rp = getelementptr i64, ptr %or, i64 %jm
  %r = load i64, ptr %rp
  %e0 = getelementptr %LifoEntry, ptr %e, i64 %c, i32 ${LifoEntry.slot}
  store i64 %s, ptr %e0
  %e1 = getelementptr %LifoEntry, ptr %e, i64 %c, i32 ${LifoEntry.original_ra}
  store i64 %r, ptr %e1
  %e2 = getelementptr %LifoEntry, ptr %e, i64 %c, i32 ${LifoEntry.descriptor}
  store i64 %d, ptr %e2
  %e3 = getelementptr %LifoEntry, ptr %e, i64 %c, i32 ${LifoEntry.status}
  store i64 ${PENDING}, ptr %e3
  %c1 = add i64 %c, 1
  br label %next
next:
  %c2 = phi i64 [ %c, %body ], [ %c1, %put ]
  br label %loop
exit:
  ret i64 %c
}

; --- scan: one stack from its anchor, walk then plan -----------------------
define i64 @${SCAN_SYMBOL}(ptr %a) nounwind {
entry:
  %anchor.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.anchor}
  %anchor = load ptr, ptr %anchor.p
  %rsp.p = getelementptr i64, ptr %anchor, i64 ${RSP}
  %rsp = load i64, ptr %rsp.p
  %none = icmp eq i64 %rsp, 0
  br i1 %none, label %noanchor, label %bounds
bounds:
  %lo.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.lo}
  %lo = load i64, ptr %lo.p
  %hi.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.hi}
  %hi = load i64, ptr %hi.p
  %below = icmp ult i64 %rsp, %lo
  %above = icmp uge i64 %rsp, %hi
  %outside = or i1 %below, %above
  br i1 %outside, label %oob, label %walk
walk:
  %state.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.state}
  %state = load ptr, ptr %state.p
  %regs.p = getelementptr %WalkState, ptr %state, i32 0, i32 ${WalkState.regs}
  call void @llvm.memcpy.p0.p0.i64(ptr %regs.p, ptr %anchor, i64 ${REGS_BYTES}, i1 false)
  %known.p = getelementptr %WalkState, ptr %state, i32 0, i32 ${WalkState.known}
  store i64 ${ANCHOR_KNOWN}, ptr %known.p
  %flags.p = getelementptr %WalkState, ptr %state, i32 0, i32 ${WalkState.flags}
  store i64 0, ptr %flags.p                        ; a caller frame: looked up at pc - 1
  %prev.p = getelementptr %WalkState, ptr %state, i32 0, i32 ${WalkState.prev_cfa}
  store i64 0, ptr %prev.p
  %fn.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.walk_fn}
  %fn = load ptr, ptr %fn.p
  %tables.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.tables}
  %tables = load ptr, ptr %tables.p
  %tr.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.translation}
  %tr = load ptr, ptr %tr.p
  %out.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.out}
  %out = load ptr, ptr %out.p
  %ocap.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.out_cap}
  %ocap = load i64, ptr %ocap.p
  %n = call i64 %fn(ptr %tables, ptr %tr, ptr %state, ptr %out, i64 %ocap, i64 %lo, i64 %hi)
  %n.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.n}
  store i64 %n, ptr %n.p
  %er.p = getelementptr %WalkState, ptr %state, i32 0, i32 ${WalkState.end_reason}
  %er = load i64, ptr %er.p
  %ero.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.end_reason}
  store i64 %er, ptr %ero.p
  ; Only the three terminal end reasons end a whole walk.
  %undef = icmp eq i64 %er, ${END_RA_UNDEFINED}
  %zero = icmp eq i64 %er, ${END_RA_ZERO}
  %notinc = icmp eq i64 %er, ${END_CFA_NOT_INCREASING}
  %term2 = or i1 %undef, %zero
  %terminal = or i1 %term2, %notinc
  %some = icmp ne i64 %n, 0
  %whole = and i1 %terminal, %some
  br i1 %whole, label %room, label %incomplete
room:
  %cap.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.cap}
  %cap = load i64, ptr %cap.p
  %fits = icmp uge i64 %cap, %n
  br i1 %fits, label %plan, label %noroom
plan:
  %keys.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.keys}
  %keys = load ptr, ptr %keys.p
  %hk.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.hijack}
  %hk = load ptr, ptr %hk.p
  %nk.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.nkeys}
  %nk = load i64, ptr %nk.p
  %counts.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.counts}
  %counts = load ptr, ptr %counts.p
  %cend = getelementptr %KeyCounts, ptr null, i64 %nk     ; nk * sizeof(%KeyCounts)
  %cbytes = ptrtoint ptr %cend to i64
  call void @llvm.memset.p0.i64(ptr %counts, i8 0, i64 %cbytes, i1 false)
  %os.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.slots}
  %os = load ptr, ptr %os.p
  %or.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.ras}
  %or = load ptr, ptr %or.p
  %ok.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.kinds}
  %ok = load ptr, ptr %ok.p
  %ranges.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.ranges}
  %ranges = load ptr, ptr %ranges.p
  %nr.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.nranges}
  %nr = load i64, ptr %nr.p
  %rc.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.range_counts}
  %rc = load ptr, ptr %rc.p
  %rend = getelementptr i64, ptr null, i64 %nr            ; nr counters of 8 bytes
  %rbytes = ptrtoint ptr %rend to i64
  call void @llvm.memset.p0.i64(ptr %rc, i8 0, i64 %rbytes, i1 false)
  %m = call i64 @${PLAN_SYMBOL}(ptr %out, i64 %n, i64 0, ptr %keys, ptr %hk, i64 %nk,
                                ptr %counts, ptr %os, ptr %or, ptr %ok, i64 %cap,
                                ptr %ranges, i64 %nr, ptr %rc)
  %m.p = getelementptr %ScanArgs, ptr %a, i32 0, i32 ${ScanArgs.m}
  store i64 %m, ptr %m.p
  ret i64 ${SCAN_PLANNED}
noanchor:
  ret i64 ${SCAN_NO_ANCHOR}
oob:
  ret i64 ${SCAN_OUT_OF_BOUNDS}
incomplete:
  ret i64 ${SCAN_INCOMPLETE}
noroom:
  ret i64 ${SCAN_NO_ROOM}
}
