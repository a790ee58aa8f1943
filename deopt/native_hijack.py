"""Hijacking a whole stack at C speed: plan, check, write, build LIFO entries, and scan.

The stop-the-world scan of ``Runtime(walker="native")`` walks a stopped
thread with :class:`unwinder.NativeWalker` into an array of
:class:`unwinder.native.OutFrame` (``pc, cfa, ra_slot, info``; 32 bytes
each, innermost first). The runtime hands this module's code a sorted array
of *keys*, the return addresses of every site of the versions it watches
(being replaced, or old), and their code ranges. Everything per frame
happens here, with no Python and no allocation:

``osrjit_hj_plan(frames, n, first, keys, hijack, nkeys, counts, slots, ras, kinds, cap,
ranges, nranges, range_counts) -> m``
    For every frame ``i >= first`` whose pc is a key ``k`` (binary search
    in the sorted ``keys``; ``hijack[k]`` non-zero: a frame to hijack, zero:
    a frame only to count): if the walker translated its pc (its slot
    already holds the stub) ``counts[3k + 2]`` is counted and, for a
    hijack key, the frame written at the *back* of the output (index
    ``cap − 1 − t``); else if it is a hijack key and its return address is
    in memory — ``frames[i − 1].ra_slot`` is non-zero and holds the pc — it
    is written at the front (index ``m``) and ``counts[3k]`` counted; else
    (a count-only key, the innermost frame, a register-held return address)
    ``counts[3k + 1]``: the frame runs its version and cannot be hijacked.
    A frame whose pc is no key but whose lookup pc (``pc − 1``) lies in
    ``ranges[r]`` (sorted, disjoint ``[start, end)`` pairs) counts in
    ``range_counts[r]``: it runs that code outside any site.
    Returns ``m``. ``slots`` / ``ras``: absolute addresses; ``kinds``: key
    indices; each array has ``cap >= n`` entries.

``osrjit_hj_apply(slots, ras, m, stub, write) -> status``
    ``write = 0``: check that ``slots`` rise strictly and every slot still
    holds its ``ras`` entry; 0, or ``j + 1`` for the first entry that does
    not. ``write = 1``: store ``stub`` into every slot (no check; call only
    after a check of every thread passed, so a failure leaves every stack
    untouched).

``osrjit_hj_lifo(entries, slots, ras, kinds, m, descriptors) -> count``
    :class:`~deopt.native_transfer.LifoEntry` records ``(slot, ras, desc,
    PENDING)`` for the hijacked frames whose kind has a descriptor
    (``descriptors[kind] != 0``), *highest slot first* (the LIFO order);
    returns how many were written.

``osrjit_hj_scan(args) -> status``
    One stopped thread from its anchor, in one call: the walk state from the
    anchor (a caller frame; RBX, RBP, RSP, R12–R15, RIP known), the walker
    (its address, tables and translation in ``args``), then the counters
    zeroed and ``osrjit_hj_plan`` from frame 0. ``args`` is a
    :class:`ScanArgs`; its ``n``, ``end_reason`` and ``m`` are written.
    Status 0: planned; :data:`SCAN_NO_ANCHOR` (the anchor's RSP is 0: no JIT
    frame), :data:`SCAN_OUT_OF_BOUNDS` (RSP outside ``[lo, hi)``),
    :data:`SCAN_INCOMPLETE` (the walk stopped for a reason other than the
    three terminal ones, e.g. a table to grow or a frame for the Python
    walker, or produced no frame) and :data:`SCAN_NO_ROOM` (``cap < n``):
    nothing was planned; the caller takes the general path.

``osrjit_hj_park_scan(handshake, flag)``
    The park path's self-scan (the ``osrjit_park_scan`` cell of
    :mod:`osrjit.threads`; ``flag``: the safepoint flag word): if the
    :class:`Handshake`'s ``state`` goes from :data:`HS_REQUESTED` to
    :data:`HS_SCANNING` (compare-and-swap) while the STOP bit is set (read
    after the swap: the stop that made the request is in progress), runs
    ``osrjit_hj_scan`` on its ``args``, stores the status and then
    :data:`HS_SCANNED`. With STOP clear the thread is late from a stop that
    is over: the state goes back to :data:`HS_REQUESTED`, nothing is
    scanned. Else does nothing.

``osrjit_hj_cancel(handshake)``
    Back to :data:`HS_IDLE` from :data:`HS_REQUESTED` or, once no scan runs
    (it spins while the state is :data:`HS_SCANNING`), from
    :data:`HS_SCANNED` (compare-and-swaps); an apply state is left alone.
    After it no thread scans with the handshake's ``args``.

``osrjit_hj_park_apply(handshake)``
    The park path's self-apply, as the thread wakes (and the stopper's, for
    a thread still stopped since): if ``state`` goes from :data:`HS_APPLY`
    to :data:`HS_APPLYING` (compare-and-swap), writes the stub into the
    ``m`` planned slots (as ``osrjit_hj_apply`` with ``write = 1``), the
    LIFO entries at ``lifo_entries`` (``osrjit_hj_lifo``) and the block's
    ``top``, then :data:`HS_APPLIED`. No check: the thread planned its own
    stack as it parked and has not run since (nothing else writes it).

Frames are read from the walker's output only; a slot is read (plan, check)
or written (apply) only at an address the walker itself read a return
address from, inside the thread's stack bounds.
"""
import ctypes

__all__ = ["PLAN_SYMBOL", "APPLY_SYMBOL", "LIFO_SYMBOL", "SCAN_SYMBOL", "hijack_module_ir",
           "NativeHijacker", "ScanArgs", "ANCHOR_KNOWN", "SCAN_NO_ANCHOR", "SCAN_OUT_OF_BOUNDS",
           "SCAN_INCOMPLETE", "SCAN_NO_ROOM", "PARK_SCAN_SYMBOL", "Handshake", "HS_IDLE",
           "HS_REQUESTED", "HS_SCANNING", "HS_SCANNED", "CANCEL_SYMBOL", "PARK_APPLY_SYMBOL",
           "HS_APPLY", "HS_APPLYING", "HS_APPLIED"]

PLAN_SYMBOL = "osrjit_hj_plan"
APPLY_SYMBOL = "osrjit_hj_apply"
LIFO_SYMBOL = "osrjit_hj_lifo"
SCAN_SYMBOL = "osrjit_hj_scan"
PARK_SCAN_SYMBOL = "osrjit_hj_park_scan"
PARK_APPLY_SYMBOL = "osrjit_hj_park_apply"
CANCEL_SYMBOL = "osrjit_hj_cancel"

#: Bit of :attr:`unwinder.native.OutFrame.info`: the pc came through the
#: translation table (the slot held the stub).
_FRAME_TRANSLATED = 2

_IR = r"""
define i64 @{plan}(ptr %f, i64 %n, i64 %first, ptr %keys, ptr %hk, i64 %nk, ptr %counts,
                   ptr %os, ptr %or, ptr %ok, i64 %cap, ptr %ranges, i64 %nr,
                   ptr %rcounts) nounwind {{
entry:
  br label %loop
loop:
  %i = phi i64 [ %first, %entry ], [ %inext, %next ]
  %m = phi i64 [ 0, %entry ], [ %m2, %next ]
  %t = phi i64 [ 0, %entry ], [ %t2, %next ]
  %done = icmp uge i64 %i, %n
  br i1 %done, label %exit, label %body
body:
  %fi = shl i64 %i, 2
  %pcp = getelementptr i64, ptr %f, i64 %fi
  %pc = load i64, ptr %pcp
  br label %bs
bs:
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
rs0:
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
  %rsi = shl i64 %rmid, 1
  %rstp = getelementptr i64, ptr %ranges, i64 %rsi
  %rstart = load i64, ptr %rstp
  %renp = getelementptr i64, ptr %rstp, i64 1
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
found:
  %cb = mul i64 %mid, 3
  %hkp = getelementptr i64, ptr %hk, i64 %mid
  %hkv = load i64, ptr %hkp
  %hko = icmp ne i64 %hkv, 0
  %ii = add i64 %fi, 3
  %infop = getelementptr i64, ptr %f, i64 %ii
  %info = load i64, ptr %infop
  %tr = and i64 %info, {translated}
  %istr = icmp ne i64 %tr, 0
  br i1 %istr, label %translated, label %nottr
translated:
  %ct = add i64 %cb, 2
  %ctp = getelementptr i64, ptr %counts, i64 %ct
  %ctv = load i64, ptr %ctp
  %ctv1 = add i64 %ctv, 1
  store i64 %ctv1, ptr %ctp
  br i1 %hko, label %trback, label %next
trback:
  %back0 = sub i64 %cap, 1
  %back = sub i64 %back0, %t
  %bsp = getelementptr i64, ptr %os, i64 %back
  %prevs = sub i64 %fi, 2
  %prevsp = getelementptr i64, ptr %f, i64 %prevs
  %hasprev = icmp ugt i64 %i, 0
  br i1 %hasprev, label %trslot, label %trnoslot
trslot:
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
nottr:
  %hp0 = icmp ugt i64 %i, 0
  %hp = and i1 %hp0, %hko
  br i1 %hp, label %chkslot, label %unh
chkslot:
  %psi = sub i64 %fi, 2
  %psp = getelementptr i64, ptr %f, i64 %psi
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
  %chp = getelementptr i64, ptr %counts, i64 %cb
  %chv = load i64, ptr %chp
  %chv1 = add i64 %chv, 1
  store i64 %chv1, ptr %chp
  %m1 = add i64 %m, 1
  br label %next
unh:
  %cu = add i64 %cb, 1
  %cup = getelementptr i64, ptr %counts, i64 %cu
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
}}

define i64 @{apply}(ptr %os, ptr %or, i64 %m, i64 %stub, i64 %write) nounwind {{
entry:
  %w = icmp ne i64 %write, 0
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
  store volatile i64 %stub, ptr %wptr
  %k1 = add i64 %k, 1
  br label %wloop
ok:
  ret i64 0
}}

define i64 @{lifo}(ptr %e, ptr %os, ptr %or, ptr %ok, i64 %m, ptr %descs) nounwind {{
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
  %eo = shl i64 %c, 2
  %e0 = getelementptr i64, ptr %e, i64 %eo
  store i64 %s, ptr %e0
  %e1 = getelementptr i64, ptr %e0, i64 1
  store i64 %r, ptr %e1
  %e2 = getelementptr i64, ptr %e0, i64 2
  store i64 %d, ptr %e2
  %e3 = getelementptr i64, ptr %e0, i64 3
  store i64 {pending}, ptr %e3
  %c1 = add i64 %c, 1
  br label %next
next:
  %c2 = phi i64 [ %c, %body ], [ %c1, %put ]
  br label %loop
exit:
  ret i64 %c
}}
"""


_SCAN_IR = r"""
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)

define i64 @{scan}(ptr %a) nounwind {{
entry:
  %anchor.p = getelementptr i64, ptr %a, i64 8
  %anchor = load ptr, ptr %anchor.p
  %rsp.p = getelementptr i64, ptr %anchor, i64 7
  %rsp = load i64, ptr %rsp.p
  %none = icmp eq i64 %rsp, 0
  br i1 %none, label %noanchor, label %bounds
bounds:
  %lo.p = getelementptr i64, ptr %a, i64 6
  %lo = load i64, ptr %lo.p
  %hi.p = getelementptr i64, ptr %a, i64 7
  %hi = load i64, ptr %hi.p
  %below = icmp ult i64 %rsp, %lo
  %above = icmp uge i64 %rsp, %hi
  %outside = or i1 %below, %above
  br i1 %outside, label %oob, label %walk
walk:
  %state.p = getelementptr i64, ptr %a, i64 3
  %state = load ptr, ptr %state.p
  call void @llvm.memcpy.p0.p0.i64(ptr %state, ptr %anchor, i64 136, i1 false)
  %known.p = getelementptr i64, ptr %state, i64 17
  store i64 {known}, ptr %known.p
  %flags.p = getelementptr i64, ptr %state, i64 18
  store i64 0, ptr %flags.p
  %prev.p = getelementptr i64, ptr %state, i64 19
  store i64 0, ptr %prev.p
  %fn = load ptr, ptr %a
  %tables.p = getelementptr i64, ptr %a, i64 1
  %tables = load ptr, ptr %tables.p
  %tr.p = getelementptr i64, ptr %a, i64 2
  %tr = load ptr, ptr %tr.p
  %out.p = getelementptr i64, ptr %a, i64 4
  %out = load ptr, ptr %out.p
  %ocap.p = getelementptr i64, ptr %a, i64 5
  %ocap = load i64, ptr %ocap.p
  %n = call i64 %fn(ptr %tables, ptr %tr, ptr %state, ptr %out, i64 %ocap, i64 %lo, i64 %hi)
  %n.p = getelementptr i64, ptr %a, i64 20
  store i64 %n, ptr %n.p
  %er.p = getelementptr i64, ptr %state, i64 20
  %er = load i64, ptr %er.p
  %ero.p = getelementptr i64, ptr %a, i64 21
  store i64 %er, ptr %ero.p
  ; end reasons 1, 2, 3 (RA undefined, RA zero, CFA not increasing) end a walk
  %erm1 = add i64 %er, -1
  %terminal = icmp ult i64 %erm1, 3
  %some = icmp ne i64 %n, 0
  %whole = and i1 %terminal, %some
  br i1 %whole, label %room, label %incomplete
room:
  %cap.p = getelementptr i64, ptr %a, i64 16
  %cap = load i64, ptr %cap.p
  %fits = icmp uge i64 %cap, %n
  br i1 %fits, label %plan, label %noroom
plan:
  %keys.p = getelementptr i64, ptr %a, i64 9
  %keys = load ptr, ptr %keys.p
  %hk.p = getelementptr i64, ptr %a, i64 10
  %hk = load ptr, ptr %hk.p
  %nk.p = getelementptr i64, ptr %a, i64 11
  %nk = load i64, ptr %nk.p
  %counts.p = getelementptr i64, ptr %a, i64 12
  %counts = load ptr, ptr %counts.p
  %cbytes = mul i64 %nk, 24
  call void @llvm.memset.p0.i64(ptr %counts, i8 0, i64 %cbytes, i1 false)
  %os.p = getelementptr i64, ptr %a, i64 13
  %os = load ptr, ptr %os.p
  %or.p = getelementptr i64, ptr %a, i64 14
  %or = load ptr, ptr %or.p
  %ok.p = getelementptr i64, ptr %a, i64 15
  %ok = load ptr, ptr %ok.p
  %ranges.p = getelementptr i64, ptr %a, i64 17
  %ranges = load ptr, ptr %ranges.p
  %nr.p = getelementptr i64, ptr %a, i64 18
  %nr = load i64, ptr %nr.p
  %rc.p = getelementptr i64, ptr %a, i64 19
  %rc = load ptr, ptr %rc.p
  %rbytes = mul i64 %nr, 8
  call void @llvm.memset.p0.i64(ptr %rc, i8 0, i64 %rbytes, i1 false)
  %m = call i64 @{plan}(ptr %out, i64 %n, i64 0, ptr %keys, ptr %hk, i64 %nk, ptr %counts,
                        ptr %os, ptr %or, ptr %ok, i64 %cap, ptr %ranges, i64 %nr, ptr %rc)
  %m.p = getelementptr i64, ptr %a, i64 22
  store i64 %m, ptr %m.p
  ret i64 0
noanchor:
  ret i64 {no_anchor}
oob:
  ret i64 {out_of_bounds}
incomplete:
  ret i64 {incomplete}
noroom:
  ret i64 {no_room}
}}

define void @{cancel}(ptr %hs) nounwind {{
entry:
  br label %loop
loop:
  %cx = cmpxchg ptr %hs, i64 {requested}, i64 {idle} seq_cst seq_cst
  %won = extractvalue {{ i64, i1 }} %cx, 1
  br i1 %won, label %done, label %check
check:
  %old = extractvalue {{ i64, i1 }} %cx, 0
  %busy = icmp eq i64 %old, {scanning}
  br i1 %busy, label %loop, label %answered
answered:
  ; SCANNED -> IDLE; IDLE and the apply states are left as they are.
  %cx2 = cmpxchg ptr %hs, i64 {scanned}, i64 {idle} seq_cst seq_cst
  br label %done
done:
  ret void
}}

define void @{park_apply}(ptr %hs) nounwind {{
entry:
  %cx = cmpxchg ptr %hs, i64 {apply_state}, i64 {applying} seq_cst seq_cst
  %won = extractvalue {{ i64, i1 }} %cx, 1
  br i1 %won, label %go, label %done
go:
  %t0.p = getelementptr i64, ptr %hs, i64 31
  %t0 = call i64 @{now}()
  store i64 %t0, ptr %t0.p
  %os.p = getelementptr i64, ptr %hs, i64 15
  %os = load ptr, ptr %os.p
  %or.p = getelementptr i64, ptr %hs, i64 16
  %or = load ptr, ptr %or.p
  %ok.p = getelementptr i64, ptr %hs, i64 17
  %ok = load ptr, ptr %ok.p
  %m.p = getelementptr i64, ptr %hs, i64 24
  %m = load i64, ptr %m.p
  %stub.p = getelementptr i64, ptr %hs, i64 25
  %stub = load i64, ptr %stub.p
  %w0 = call i64 @{apply}(ptr %os, ptr %or, i64 %m, i64 %stub, i64 1)
  %dest.p = getelementptr i64, ptr %hs, i64 27
  %dest = load ptr, ptr %dest.p
  %hasdest = icmp ne ptr %dest, null
  br i1 %hasdest, label %lifo, label %fin
lifo:
  %descs.p = getelementptr i64, ptr %hs, i64 26
  %descs = load ptr, ptr %descs.p
  %w = call i64 @{lifo}(ptr %dest, ptr %os, ptr %or, ptr %ok, i64 %m, ptr %descs)
  %wr.p = getelementptr i64, ptr %hs, i64 30
  store i64 %w, ptr %wr.p
  %blk.p = getelementptr i64, ptr %hs, i64 28
  %blk = load ptr, ptr %blk.p
  %top.p = getelementptr i64, ptr %hs, i64 29
  %top = load i64, ptr %top.p
  store atomic i64 %top, ptr %blk release, align 8
  br label %fin
fin:
  %t1.p = getelementptr i64, ptr %hs, i64 32
  %t1 = call i64 @{now}()
  store i64 %t1, ptr %t1.p
  store atomic i64 {applied}, ptr %hs release, align 8
  br label %done
done:
  ret void
}}

; Monotonic nanoseconds (clock_gettime through the vDSO: no system call).
declare i32 @clock_gettime(i32, ptr)
define i64 @{now}() nounwind {{
  %ts = alloca [2 x i64], align 8
  %r = call i32 @clock_gettime(i32 1, ptr %ts)
  %s = load i64, ptr %ts
  %nsp = getelementptr i64, ptr %ts, i64 1
  %ns = load i64, ptr %nsp
  %sns = mul i64 %s, 1000000000
  %t = add i64 %sns, %ns
  ret i64 %t
}}

define void @{park_scan}(ptr %hs, ptr %flag) nounwind {{
entry:
  %cx = cmpxchg ptr %hs, i64 {requested}, i64 {scanning} seq_cst seq_cst
  %won = extractvalue {{ i64, i1 }} %cx, 1
  br i1 %won, label %check, label %done
check:
  ; The request precedes its stop's STOP: with STOP set now, this thread
  ; parks for the stop that asked (which cannot end while the thread scans).
  ; With STOP clear it came here from a stop that is over: not its request.
  %f = load atomic i64, ptr %flag seq_cst, align 8
  %stop = and i64 %f, 1
  %current = icmp ne i64 %stop, 0
  br i1 %current, label %scan, label %giveback
giveback:
  store atomic i64 {requested}, ptr %hs seq_cst, align 8
  br label %done
scan:
  %args = getelementptr i8, ptr %hs, i64 16
  %r = call i64 @{scan}(ptr %args)
  %st = getelementptr i8, ptr %hs, i64 8
  store i64 %r, ptr %st
  store atomic i64 {scanned}, ptr %hs release, align 8
  br label %done
done:
  ret void
}}
"""

#: :func:`osrjit_hj_scan` statuses other than 0 (planned).
SCAN_NO_ANCHOR, SCAN_OUT_OF_BOUNDS, SCAN_INCOMPLETE, SCAN_NO_ROOM = 1, 2, 3, 4
#: Walk-state ``known`` bits of an anchor: RBX 3, RBP 6, RSP 7, R12–R15, RIP 16.
ANCHOR_KNOWN = sum(1 << r for r in (3, 6, 7, 12, 13, 14, 15, 16))


class ScanArgs(ctypes.Structure):
    """Arguments and results of ``osrjit_hj_scan`` (23 × 8 bytes; every
    address absolute). In: ``walk_fn`` (``osrjit_native_walk``), ``tables``
    (the walker's tables header), ``translation`` (its translation header, or
    0), ``state`` (a :class:`unwinder.native.WalkState`), ``out`` /
    ``out_cap`` (:class:`unwinder.native.OutFrame` array and its length),
    ``lo`` / ``hi`` (the thread's stack bounds, bytes), ``anchor`` (17 u64 by
    DWARF number: a :class:`osrjit.threads.ThreadState`'s anchor), then the
    plan's arrays as in ``osrjit_hj_plan`` (``cap`` entries each for
    ``slots`` / ``ras`` / ``kinds``). Out: ``n`` frames, the walk's
    ``end_reason`` (:class:`unwinder.native.EndReason` value), ``m`` frames
    to hijack. The arrays must outlive the call; nothing is kept after it."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "walk_fn", "tables", "translation", "state", "out", "out_cap", "lo", "hi", "anchor",
        "keys", "hijack", "nkeys", "counts", "slots", "ras", "kinds", "cap", "ranges",
        "nranges", "range_counts", "n", "end_reason", "m")]


assert ctypes.sizeof(ScanArgs) == 23 * 8 and ScanArgs.anchor.offset == 64
assert ScanArgs.cap.offset == 128 and ScanArgs.m.offset == 176

#: :attr:`Handshake.state` values. The stopper moves IDLE -> REQUESTED before
#: it stops the world, and back to IDLE (``osrjit_hj_cancel``) right after it
#: released it; the thread moves REQUESTED -> SCANNING -> SCANNED while it
#: parks for that stop.
HS_IDLE, HS_REQUESTED, HS_SCANNING, HS_SCANNED = range(4)
#: Then the stopper moves SCANNED -> APPLY before it releases the world, and
#: whoever wins APPLY -> APPLYING (the thread as it wakes, or the next
#: stopper while the thread is still stopped) writes the stubs and the LIFO
#: entries, then APPLIED.
HS_APPLY, HS_APPLYING, HS_APPLIED = 4, 5, 6


class Handshake(ctypes.Structure):
    """A thread's self-scan and self-apply block (every address absolute).

    ``state`` (``HS_*``); ``status``: ``osrjit_hj_scan``'s, once SCANNED;
    ``args``: the :class:`ScanArgs` it scans with (its ``slots`` / ``ras`` /
    ``kinds`` / ``m`` are what ``osrjit_hj_park_apply`` writes); for the
    apply: ``stub``, ``descriptors`` (per kind, as ``osrjit_hj_lifo``),
    ``lifo_entries`` (where its LIFO entries go, 0: none), ``lifo_block``
    (the :class:`deopt.native_transfer.ThreadBlock` whose ``top`` becomes
    ``lifo_top`` after them); out: ``written`` entries, ``apply_start_ns`` /
    ``apply_end_ns`` (CLOCK_MONOTONIC) around the apply."""
    _fields_ = [("state", ctypes.c_int64), ("status", ctypes.c_int64), ("args", ScanArgs),
                ("stub", ctypes.c_uint64), ("descriptors", ctypes.c_uint64),
                ("lifo_entries", ctypes.c_uint64), ("lifo_block", ctypes.c_uint64),
                ("lifo_top", ctypes.c_int64), ("written", ctypes.c_int64),
                ("apply_start_ns", ctypes.c_int64), ("apply_end_ns", ctypes.c_int64)]


assert Handshake.args.offset == 16 and Handshake.stub.offset == 25 * 8
assert Handshake.apply_end_ns.offset == 32 * 8


def hijack_module_ir(triple, pending=0):
    """Textual LLVM IR of the module holding the three functions above.
    ``pending``: the value of :data:`deopt.native_transfer.PENDING`."""
    return f'target triple = "{triple}"\n' + _IR.format(
        plan=PLAN_SYMBOL, apply=APPLY_SYMBOL, lifo=LIFO_SYMBOL,
        translated=_FRAME_TRANSLATED, pending=pending) + _SCAN_IR.format(
        scan=SCAN_SYMBOL, plan=PLAN_SYMBOL, known=ANCHOR_KNOWN, no_anchor=SCAN_NO_ANCHOR,
        out_of_bounds=SCAN_OUT_OF_BOUNDS, incomplete=SCAN_INCOMPLETE, no_room=SCAN_NO_ROOM,
        park_scan=PARK_SCAN_SYMBOL, cancel=CANCEL_SYMBOL, idle=HS_IDLE, requested=HS_REQUESTED,
        scanning=HS_SCANNING, scanned=HS_SCANNED, park_apply=PARK_APPLY_SYMBOL,
        apply=APPLY_SYMBOL, lifo=LIFO_SYMBOL, now="osrjit_hj_now", applying=HS_APPLYING,
        applied=HS_APPLIED, apply_state=HS_APPLY)


_U64 = ctypes.c_uint64
_PLAN = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, _U64, _U64, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)
_APPLY = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, _U64, _U64, _U64)
_LIFO = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)


_SCAN = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p)
_CANCEL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)


class NativeHijacker:
    """Callable wrappers of the functions, given their absolute addresses
    (the caller owns the code and keeps it mapped while this object is used).
    The calls keep the GIL (they never block; see :mod:`unwinder.native`).
    ``scan`` / ``cancel`` / ``park_apply`` are None when no address is given
    for them."""

    def __init__(self, plan_address, apply_address, lifo_address, scan_address=None,
                 cancel_address=None, park_apply_address=None):
        self.plan = _PLAN(plan_address)
        self.apply = _APPLY(apply_address)
        self.lifo = _LIFO(lifo_address)
        self.scan = None if scan_address is None else _SCAN(scan_address)
        self.cancel = None if cancel_address is None else _CANCEL(cancel_address)
        self.park_apply = None if park_apply_address is None else _CANCEL(park_apply_address)
