; osrjit_native_walk: the native stack walker (unwinder/native.py describes the
; design; unwinder/native_code.py renders and loads this file).
;
; Rendered by unwinder.nativesrc: the %Type lines prepended to this text come
; from the ctypes structures of unwinder/native_abi.py, a placeholder
; Struct.field is that field's index and every other placeholder a constant
; of native_abi.py (unwinder.native_code.walker_values lists them; END_x is
; EndReason.x), so no layout or number is written here.
;
; i64 osrjit_native_walk(TablesHeader *tables, TranslationHeader *tr or null,
;                        WalkState *state, OutFrame *out, i64 max_frames,
;                        u64 stack_lo, u64 stack_hi)
; returns the frames written to out; state->end_reason says why it stopped.
; It calls nothing (llvm.memcpy.inline is expanded in place), allocates
; nothing and reads memory only inside the tables and [stack_lo, stack_hi):
; async-signal-safe.

; DWARF numbers of the registers a RuleRecord carries, in record code slot order.
@carried = private unnamed_addr constant ${CARRIED_REGISTERS}

declare void @llvm.memcpy.inline.p0.p0.i64(ptr, ptr, i64, i1)

; Locals live in allocas; mem2reg/SROA turns them into SSA values, and the
; loops over @carried are unrolled fully (constant trip count), so each carried
; register gets straight-line code and the per-register arrays become values.
define i64 @osrjit_native_walk(ptr %tables, ptr %tr, ptr %state, ptr %out, i64 %max,
                               i64 %lo, i64 %hi) nounwind uwtable {
entry:
  %regs = alloca [${WALK_REGISTERS} x i64], align 8
  %n.v = alloca i64, align 8
  %known.v = alloca i64, align 8
  %flags.v = alloca i64, align 8
  %prev.v = alloca i64, align 8
  %mhint.v = alloca i64, align 8
  %rhint.v = alloca i64, align 8
  %reason.v = alloca i64, align 8
  %endmod.v = alloca i64, align 8
  %mi.v = alloca i64, align 8
  %j.v = alloca i64, align 8
  %a.v = alloca i64, align 8
  %b.v = alloca i64, align 8
  %reason.e = alloca i64, align 8
  %k.v = alloca i64, align 8
  %kacc.v = alloca i64, align 8
  ; per carried register k: the caller's value, whether it is known (0/1),
  ; where it was read from (0 if not read) and whether it was read (0/1)
  %vals = alloca [${N_CARRIED} x i64], align 8
  %bits = alloca [${N_CARRIED} x i64], align 8
  %slots = alloca [${N_CARRIED} x i64], align 8
  %loads = alloca [${N_CARRIED} x i64], align 8
  %regs.src = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.regs}
  call void @llvm.memcpy.inline.p0.p0.i64(ptr align 8 %regs, ptr align 8 %regs.src,
                                          i64 ${REGS_BYTES}, i1 false)
  %known.p = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.known}
  %known0 = load i64, ptr %known.p, align 8
  store i64 %known0, ptr %known.v, align 8
  %flags.p = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.flags}
  %flags0 = load i64, ptr %flags.p, align 8
  store i64 %flags0, ptr %flags.v, align 8
  %prev.p = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.prev_cfa}
  %prev0 = load i64, ptr %prev.p, align 8
  store i64 %prev0, ptr %prev.v, align 8
  store i64 0, ptr %n.v, align 8
  store i64 0, ptr %mhint.v, align 8
  store i64 0, ptr %rhint.v, align 8
  store i64 ${NO_MODULE}, ptr %endmod.v, align 8
  store i64 ${END_NONE}, ptr %reason.v, align 8
  %mods.p = getelementptr inbounds %TablesHeader, ptr %tables, i64 0, i32 ${TablesHeader.modules}
  %mods = load ptr, ptr %mods.p, align 8
  %nmods.p = getelementptr inbounds %TablesHeader, ptr %tables, i64 0, i32 ${TablesHeader.n_modules}
  %nmods = load i64, ptr %nmods.p, align 8
  %has.tr = icmp ne ptr %tr, null
  br i1 %has.tr, label %tr.load, label %tr.none

tr.load:
  %stub.p = getelementptr inbounds %TranslationHeader, ptr %tr, i64 0, i32 ${TranslationHeader.stub_address}
  %stub.l = load i64, ptr %stub.p, align 8
  %pairs.pp = getelementptr inbounds %TranslationHeader, ptr %tr, i64 0, i32 ${TranslationHeader.pairs}
  %pairs.l = load ptr, ptr %pairs.pp, align 8
  %npairs.p = getelementptr inbounds %TranslationHeader, ptr %tr, i64 0, i32 ${TranslationHeader.n_pairs}
  %npairs.l = load i64, ptr %npairs.p, align 8
  %stubend.p = getelementptr inbounds %TranslationHeader, ptr %tr, i64 0, i32 ${TranslationHeader.stub_end}
  %stubend.l = load i64, ptr %stubend.p, align 8
  %stubspan.l = sub i64 %stubend.l, %stub.l
  br label %args

tr.none:
  br label %args

args:
  %stub = phi i64 [ %stub.l, %tr.load ], [ 0, %tr.none ]
  %pairs = phi ptr [ %pairs.l, %tr.load ], [ null, %tr.none ]
  %npairs = phi i64 [ %npairs.l, %tr.load ], [ 0, %tr.none ]
  %stubspan = phi i64 [ %stubspan.l, %tr.load ], [ 0, %tr.none ]
  ; span = hi − lo bytes; a read of one slot at a is allowed iff
  ; a − lo <= span − SLOT_BYTES (unsigned), a CFA c iff c − lo <= span.
  %span = sub i64 %hi, %lo
  %rdlimit = sub i64 %span, ${SLOT_BYTES}
  %inverted = icmp ult i64 %hi, %lo
  %tiny = icmp ult i64 %span, ${SLOT_BYTES}
  %nobounds = or i1 %inverted, %tiny
  br i1 %nobounds, label %end.oob, label %args.max

args.max:
  %nomax = icmp sle i64 %max, 0
  br i1 %nomax, label %end.max, label %args.mods

args.mods:
  %nomods = icmp eq i64 %nmods, 0
  br i1 %nomods, label %end.noinfo, label %loop

; ---- one frame per iteration ------------------------------------------------
loop:
  %pc.p = getelementptr inbounds [${WALK_REGISTERS} x i64], ptr %regs, i64 0, i64 ${RA}
  %pc = load i64, ptr %pc.p, align 8
  %flags = load i64, ptr %flags.v, align 8
  %known = load i64, ptr %known.v, align 8
  %exact.b = and i64 %flags, ${STATE_EXACT}
  %exact = icmp ne i64 %exact.b, 0
  %pcm1 = add i64 %pc, -1
  ; lookup_pc = pc for the innermost/signal-interrupted frame, pc − 1 for a caller
  %lookup = select i1 %exact, i64 %pc, i64 %pcm1
  %mh = load i64, ptr %mhint.v, align 8
  %hm.start.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mh, i32 ${ModuleEntry.start}
  %hm.start = load i64, ptr %hm.start.p, align 8
  %hm.end.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mh, i32 ${ModuleEntry.end}
  %hm.end = load i64, ptr %hm.end.p, align 8
  %hm.size = sub i64 %hm.end, %hm.start
  %hm.rel = sub i64 %lookup, %hm.start
  %hm.in = icmp ult i64 %hm.rel, %hm.size
  br i1 %hm.in, label %mod.hit, label %mod.search

mod.hit:
  store i64 %mh, ptr %mi.v, align 8
  br label %mod.found

; upper_bound over module starts: first index whose start > lookup
mod.search:
  store i64 0, ptr %a.v, align 8
  store i64 %nmods, ptr %b.v, align 8
  br label %ms.cond

ms.cond:
  %ms.a = load i64, ptr %a.v, align 8
  %ms.b = load i64, ptr %b.v, align 8
  %ms.more = icmp ult i64 %ms.a, %ms.b
  br i1 %ms.more, label %ms.body, label %ms.done

ms.body:
  %ms.sum = add i64 %ms.a, %ms.b
  %ms.mid = lshr i64 %ms.sum, 1
  %ms.start.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %ms.mid, i32 ${ModuleEntry.start}
  %ms.start = load i64, ptr %ms.start.p, align 8
  %ms.le = icmp ule i64 %ms.start, %lookup
  %ms.mid1 = add i64 %ms.mid, 1
  %ms.a2 = select i1 %ms.le, i64 %ms.mid1, i64 %ms.a
  %ms.b2 = select i1 %ms.le, i64 %ms.b, i64 %ms.mid
  store i64 %ms.a2, ptr %a.v, align 8
  store i64 %ms.b2, ptr %b.v, align 8
  br label %ms.cond

ms.done:
  %ms.none = icmp eq i64 %ms.a, 0
  br i1 %ms.none, label %end.noinfo, label %ms.check

ms.check:
  %ms.i = add i64 %ms.a, -1
  %ms.end.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %ms.i, i32 ${ModuleEntry.end}
  %ms.end = load i64, ptr %ms.end.p, align 8
  %ms.in = icmp ult i64 %lookup, %ms.end
  br i1 %ms.in, label %ms.ok, label %end.noinfo

ms.ok:
  store i64 %ms.i, ptr %mi.v, align 8
  br label %mod.found

mod.found:
  %mi = load i64, ptr %mi.v, align 8
  store i64 %mi, ptr %endmod.v, align 8
  ; the module's current RowTable: one pointer, swapped whole when it grows
  %tbl.p = getelementptr inbounds %ModuleEntry, ptr %mods, i64 %mi, i32 ${ModuleEntry.table}
  %tbl = load atomic ptr, ptr %tbl.p acquire, align 8
  %notable = icmp eq ptr %tbl, null
  br i1 %notable, label %end.notable, label %mod.rows

mod.rows:
  %starts.p = getelementptr inbounds %RowTable, ptr %tbl, i64 0, i32 ${RowTable.starts}
  %starts = load ptr, ptr %starts.p, align 8
  %rules.p = getelementptr inbounds %RowTable, ptr %tbl, i64 0, i32 ${RowTable.rules}
  %rules = load ptr, ptr %rules.p, align 8
  %nrows.p = getelementptr inbounds %RowTable, ptr %tbl, i64 0, i32 ${RowTable.n_rows}
  %nrows = load i64, ptr %nrows.p, align 8
  %same.mod = icmp eq i64 %mi, %mh
  br i1 %same.mod, label %rh.idx, label %row.search

; last-hit hint: starts[rh] <= lookup < starts[rh + 1] (or rh is the last row)
rh.idx:
  %rh = load i64, ptr %rhint.v, align 8
  %rh.ok = icmp ult i64 %rh, %nrows
  br i1 %rh.ok, label %rh.lo, label %row.search

rh.lo:
  %rh.s0.p = getelementptr inbounds i64, ptr %starts, i64 %rh
  %rh.s0 = load i64, ptr %rh.s0.p, align 8
  %rh.le = icmp ule i64 %rh.s0, %lookup
  br i1 %rh.le, label %rh.hi, label %row.search

rh.hi:
  %rh1 = add i64 %rh, 1
  %rh.last = icmp eq i64 %rh1, %nrows
  br i1 %rh.last, label %rh.hit, label %rh.next

rh.next:
  %rh.s1.p = getelementptr inbounds i64, ptr %starts, i64 %rh1
  %rh.s1 = load i64, ptr %rh.s1.p, align 8
  %rh.lt = icmp ult i64 %lookup, %rh.s1
  br i1 %rh.lt, label %rh.hit, label %row.search

rh.hit:
  store i64 %rh, ptr %j.v, align 8
  br label %row.found

; upper_bound over row starts
row.search:
  store i64 0, ptr %a.v, align 8
  store i64 %nrows, ptr %b.v, align 8
  br label %rs.cond

rs.cond:
  %rs.a = load i64, ptr %a.v, align 8
  %rs.b = load i64, ptr %b.v, align 8
  %rs.more = icmp ult i64 %rs.a, %rs.b
  br i1 %rs.more, label %rs.body, label %rs.done

rs.body:
  %rs.sum = add i64 %rs.a, %rs.b
  %rs.mid = lshr i64 %rs.sum, 1
  %rs.start.p = getelementptr inbounds i64, ptr %starts, i64 %rs.mid
  %rs.start = load i64, ptr %rs.start.p, align 8
  %rs.le = icmp ule i64 %rs.start, %lookup
  %rs.mid1 = add i64 %rs.mid, 1
  %rs.a2 = select i1 %rs.le, i64 %rs.mid1, i64 %rs.a
  %rs.b2 = select i1 %rs.le, i64 %rs.b, i64 %rs.mid
  store i64 %rs.a2, ptr %a.v, align 8
  store i64 %rs.b2, ptr %b.v, align 8
  br label %rs.cond

rs.done:
  %rs.none = icmp eq i64 %rs.a, 0
  br i1 %rs.none, label %end.noinfo, label %rs.ok

rs.ok:
  %rs.j = add i64 %rs.a, -1
  store i64 %rs.j, ptr %j.v, align 8
  br label %row.found

; ---- the step: the record's kind decides ------------------------------------
; GAP -> NO_INFO, UNKNOWN -> NO_TABLE, PYTHON -> NEEDS_PYTHON (no frame emitted);
; otherwise cfa from the record, then each carried register by its code
; (same value / undefined / saved at cfa + SLOT_BYTES·code).
row.found:
  %j = load i64, ptr %j.v, align 8
  store i64 %mi, ptr %mhint.v, align 8
  store i64 %j, ptr %rhint.v, align 8
  %rule = getelementptr inbounds %RuleRecord, ptr %rules, i64 %j
  %rflags.p = getelementptr inbounds %RuleRecord, ptr %rule, i64 0, i32 ${RuleRecord.flags}
  %rflags8 = load i8, ptr %rflags.p, align 1
  %rflags = zext i8 %rflags8 to i64
  ; GAP | PYTHON | UNKNOWN: the native code cannot do this frame
  %special.b = and i64 %rflags, ${RULE_NOT_NATIVE}
  %special = icmp ne i64 %special.b, 0
  br i1 %special, label %rule.gap, label %rule.cfa

rule.gap:
  %gap.b = and i64 %rflags, ${RULE_GAP}
  %gap = icmp ne i64 %gap.b, 0
  br i1 %gap, label %end.noinfo, label %rule.unknown

rule.unknown:
  %unk.b = and i64 %rflags, ${RULE_UNKNOWN}
  %unk = icmp ne i64 %unk.b, 0
  br i1 %unk, label %end.notable, label %end.python

rule.cfa:
  %creg.p = getelementptr inbounds %RuleRecord, ptr %rule, i64 0, i32 ${RuleRecord.cfa_register}
  %creg8 = load i8, ptr %creg.p, align 1
  %creg = zext i8 %creg8 to i64
  %creg.bad = icmp uge i64 %creg, ${WALK_REGISTERS}
  br i1 %creg.bad, label %end.python, label %rule.cfa.known

rule.cfa.known:
  %cbit.s = lshr i64 %known, %creg
  %cbit = and i64 %cbit.s, 1
  %cunknown = icmp eq i64 %cbit, 0
  br i1 %cunknown, label %end.cfaunknown, label %rule.cfa.value

rule.cfa.value:
  %cbase.p = getelementptr inbounds [${WALK_REGISTERS} x i64], ptr %regs, i64 0, i64 %creg
  %cbase = load i64, ptr %cbase.p, align 8
  %coff.p = getelementptr inbounds %RuleRecord, ptr %rule, i64 0, i32 ${RuleRecord.cfa_offset}
  %coff32 = load i32, ptr %coff.p, align 4
  %coff = sext i32 %coff32 to i64
  ; cfa = regs[cfa_register] + cfa_offset
  %cfa = add i64 %cbase, %coff
  %cfa.rel = sub i64 %cfa, %lo
  %cfa.in = icmp ule i64 %cfa.rel, %span
  br i1 %cfa.in, label %carry.start, label %end.oob

; ---- the caller's carried registers: for k = 0 .. N_CARRIED − 1, r = carried[k]
carry.start:
  store i64 0, ptr %k.v, align 8
  br label %carry.reg

carry.reg:
  %k = load i64, ptr %k.v, align 8
  %d.p = getelementptr inbounds [${N_CARRIED} x i64], ptr @carried, i64 0, i64 %k
  %d = load i64, ptr %d.p, align 8
  %code.p = getelementptr inbounds %RuleRecord, ptr %rule, i64 0, i32 ${RuleRecord.codes}, i64 %k
  %code = load i8, ptr %code.p, align 1
  ; code −128 (undefined): caller.r is unknown
  switch i8 %code, label %carry.saved [ i8 ${SAME_VALUE_CODE}, label %carry.same
                                        i8 ${UNDEFINED_CODE}, label %carry.done ]

carry.same:
  ; code 0 (same value): caller.r = callee.r (known iff known in the callee)
  %old.p = getelementptr inbounds [${WALK_REGISTERS} x i64], ptr %regs, i64 0, i64 %d
  %old = load i64, ptr %old.p, align 8
  %oldbit.s = lshr i64 %known, %d
  %oldbit = and i64 %oldbit.s, 1
  br label %carry.done

carry.saved:
  ; code n: caller.r = *(cfa + SLOT_BYTES·n), if the slot lies in [lo, hi)
  %off.s = sext i8 %code to i64
  %off = mul i64 %off.s, ${SLOT_BYTES}
  %addr = add i64 %cfa, %off
  %rel = sub i64 %addr, %lo
  %ok = icmp ule i64 %rel, %rdlimit
  br i1 %ok, label %carry.read, label %end.oob

carry.read:
  %ap = inttoptr i64 %addr to ptr
  %ld = load i64, ptr %ap, align 1
  br label %carry.done

carry.done:
  %v = phi i64 [ %old, %carry.same ], [ 0, %carry.reg ], [ %ld, %carry.read ]
  %bit = phi i64 [ %oldbit, %carry.same ], [ 0, %carry.reg ], [ 1, %carry.read ]
  %slot = phi i64 [ 0, %carry.same ], [ 0, %carry.reg ], [ %addr, %carry.read ]
  %isload = phi i64 [ 0, %carry.same ], [ 0, %carry.reg ], [ 1, %carry.read ]
  %v.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %vals, i64 0, i64 %k
  store i64 %v, ptr %v.p, align 8
  %bit.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %bits, i64 0, i64 %k
  store i64 %bit, ptr %bit.p, align 8
  %slot.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %slots, i64 0, i64 %k
  store i64 %slot, ptr %slot.p, align 8
  %isload.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %loads, i64 0, i64 %k
  store i64 %isload, ptr %isload.p, align 8
  %k.n = add i64 %k, 1
  store i64 %k.n, ptr %k.v, align 8
  %k.more = icmp ult i64 %k.n, ${N_CARRIED}
  br i1 %k.more, label %carry.reg, label %frame

; ---- every read succeeded: emit the frame, then the Python walker's end tests
frame:
  %v0.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %vals, i64 0, i64 ${RA_CARRIED}
  %v0 = load i64, ptr %v0.p, align 8
  %bit0.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %bits, i64 0, i64 ${RA_CARRIED}
  %bit0 = load i64, ptr %bit0.p, align 8
  %slot0.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %slots, i64 0, i64 ${RA_CARRIED}
  %slot0 = load i64, ptr %slot0.p, align 8
  %isload0.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %loads, i64 0, i64 ${RA_CARRIED}
  %isload0 = load i64, ptr %isload0.p, align 8
  %n = load i64, ptr %n.v, align 8
  %sig.b = and i64 %rflags, ${RULE_SIGNAL}
  %sig = icmp ne i64 %sig.b, 0
  %trn.b = and i64 %flags, ${STATE_TRANSLATED}
  %trn = icmp ne i64 %trn.b, 0
  ; info = FRAME_* flags | module entry index << INFO_MODULE_SHIFT
  %f.sig = select i1 %sig, i64 ${FRAME_SIGNAL}, i64 0
  %f.trn = select i1 %trn, i64 ${FRAME_TRANSLATED}, i64 0
  %f.exact = select i1 %exact, i64 ${FRAME_EXACT}, i64 0
  %f.slot = mul i64 %isload0, ${FRAME_HAS_RA_SLOT}          ; isload0 is 0 or 1
  %mod.bits = shl i64 %mi, ${INFO_MODULE_SHIFT}
  %info1 = or i64 %f.sig, %f.trn
  %info2 = or i64 %info1, %f.exact
  %info3 = or i64 %info2, %f.slot
  %info = or i64 %info3, %mod.bits
  %o.pc = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 ${OutFrame.pc}
  store i64 %pc, ptr %o.pc, align 8
  %o.cfa = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 ${OutFrame.cfa}
  store i64 %cfa, ptr %o.cfa, align 8
  %o.slot = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 ${OutFrame.ra_slot}
  store i64 %slot0, ptr %o.slot, align 8
  %o.info = getelementptr inbounds %OutFrame, ptr %out, i64 %n, i32 ${OutFrame.info}
  store i64 %info, ptr %o.info, align 8
  %prev = load i64, ptr %prev.v, align 8
  %hasprev.b = and i64 %flags, ${STATE_HAS_PREV}
  %hasprev = icmp ne i64 %hasprev.b, 0
  %notabove = icmp ule i64 %cfa, %prev
  %notinc = and i1 %hasprev, %notabove
  br i1 %notinc, label %end.notinc, label %t.raundef

t.raundef:
  %raundef = icmp eq i64 %bit0, 0
  br i1 %raundef, label %end.raundef, label %t.razero

t.razero:
  %razero = icmp eq i64 %v0, 0
  br i1 %razero, label %end.razero, label %t.stub

; a return address among the stubs ([stub, stub + stubspan): the deopt stub
; and the per-site stubs), read from a slot: binary-search the slot
; among the TranslationPairs, read as u64 words: pair i is the words
; PAIR_WORDS·i + PAIR_SLOT_WORD (its slot) and PAIR_WORDS·i + PAIR_ORIGINAL_WORD
; (the slot's original return address). Why words: addressed as
; %TranslationPair, this cold search changes how LLVM allocates registers in
; the whole function, and the hot path measured 3% slower per frame.
t.stub:
  %stubrel = sub i64 %v0, %stub
  %isstub = icmp ult i64 %stubrel, %stubspan
  %fromslot = icmp ne i64 %isload0, 0
  %trytr = and i1 %isstub, %fromslot
  br i1 %trytr, label %ts.start, label %commit

ts.start:
  store i64 0, ptr %a.v, align 8
  store i64 %npairs, ptr %b.v, align 8
  br label %ts.cond

ts.cond:
  %ts.a = load i64, ptr %a.v, align 8
  %ts.b = load i64, ptr %b.v, align 8
  %ts.more = icmp ult i64 %ts.a, %ts.b
  br i1 %ts.more, label %ts.body, label %ts.done

ts.body:
  %ts.sum = add i64 %ts.a, %ts.b
  %ts.mid = lshr i64 %ts.sum, 1
  %ts.midw = mul i64 %ts.mid, ${PAIR_WORDS}
  %ts.slotw = add i64 %ts.midw, ${PAIR_SLOT_WORD}
  %ts.slot.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.slotw
  %ts.slot = load i64, ptr %ts.slot.p, align 8
  %ts.le = icmp ule i64 %ts.slot, %slot0
  %ts.mid1 = add i64 %ts.mid, 1
  %ts.a2 = select i1 %ts.le, i64 %ts.mid1, i64 %ts.a
  %ts.b2 = select i1 %ts.le, i64 %ts.b, i64 %ts.mid
  store i64 %ts.a2, ptr %a.v, align 8
  store i64 %ts.b2, ptr %b.v, align 8
  br label %ts.cond

ts.done:
  %ts.none = icmp eq i64 %ts.a, 0
  br i1 %ts.none, label %commit, label %ts.check

ts.check:
  %ts.i = add i64 %ts.a, -1
  %ts.iw = mul i64 %ts.i, ${PAIR_WORDS}
  %ts.foundw = add i64 %ts.iw, ${PAIR_SLOT_WORD}
  %ts.found.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.foundw
  %ts.found = load i64, ptr %ts.found.p, align 8
  %ts.eq = icmp eq i64 %ts.found, %slot0
  br i1 %ts.eq, label %ts.hit, label %commit

ts.hit:
  %ts.origw = add i64 %ts.iw, ${PAIR_ORIGINAL_WORD}
  %ts.orig.p = getelementptr inbounds i64, ptr %pairs, i64 %ts.origw
  %ts.orig = load i64, ptr %ts.orig.p, align 8
  br label %commit

; the caller becomes the current frame
commit:
  %ra = phi i64 [ %v0, %t.stub ], [ %v0, %ts.done ], [ %v0, %ts.check ], [ %ts.orig, %ts.hit ]
  %translated = phi i1 [ false, %t.stub ], [ false, %ts.done ], [ false, %ts.check ], [ true, %ts.hit ]
  store i64 0, ptr %k.v, align 8
  br label %commit.reg

commit.reg:
  ; regs[carried[k]] = caller's value (RA's is replaced by %ra below)
  %ck = load i64, ptr %k.v, align 8
  %cd.p = getelementptr inbounds [${N_CARRIED} x i64], ptr @carried, i64 0, i64 %ck
  %cd = load i64, ptr %cd.p, align 8
  %cv.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %vals, i64 0, i64 %ck
  %cv = load i64, ptr %cv.p, align 8
  %cst.p = getelementptr inbounds [${WALK_REGISTERS} x i64], ptr %regs, i64 0, i64 %cd
  store i64 %cv, ptr %cst.p, align 8
  %ck.n = add i64 %ck, 1
  store i64 %ck.n, ptr %k.v, align 8
  %ck.more = icmp ult i64 %ck.n, ${N_CARRIED}
  br i1 %ck.more, label %commit.reg, label %commit.frame

commit.frame:
  %cfa.slot = getelementptr inbounds [${WALK_REGISTERS} x i64], ptr %regs, i64 0, i64 ${RSP}
  store i64 %cfa, ptr %cfa.slot, align 8
  store i64 %ra, ptr %pc.p, align 8
  ; known' = RSP | Σ known(caller.r) << r: the caller knows RSP (= CFA) and
  ; each carried register its rule restores or keeps; no other register.
  %rsp.bit = shl i64 1, ${RSP}
  store i64 %rsp.bit, ptr %kacc.v, align 8
  store i64 0, ptr %k.v, align 8
  br label %commit.known

commit.known:
  %kk = load i64, ptr %k.v, align 8
  %kd.p = getelementptr inbounds [${N_CARRIED} x i64], ptr @carried, i64 0, i64 %kk
  %kd = load i64, ptr %kd.p, align 8
  %kb.p = getelementptr inbounds [${N_CARRIED} x i64], ptr %bits, i64 0, i64 %kk
  %kb = load i64, ptr %kb.p, align 8
  %kacc = load i64, ptr %kacc.v, align 8
  %kbit = shl i64 %kb, %kd
  %kacc.n = or i64 %kacc, %kbit
  store i64 %kacc.n, ptr %kacc.v, align 8
  %kk.n = add i64 %kk, 1
  store i64 %kk.n, ptr %k.v, align 8
  %kk.more = icmp ult i64 %kk.n, ${N_CARRIED}
  br i1 %kk.more, label %commit.known, label %commit.flags

commit.flags:
  %known.next = load i64, ptr %kacc.v, align 8
  store i64 %known.next, ptr %known.v, align 8
  ; flags' = EXACT if this frame is a signal frame | TRANSLATED | HAS_PREV
  %s.exact = select i1 %sig, i64 ${STATE_EXACT}, i64 0
  %s.trn = select i1 %translated, i64 ${STATE_TRANSLATED}, i64 0
  %flags.n1 = or i64 %s.exact, %s.trn
  %flags.next = or i64 %flags.n1, ${STATE_HAS_PREV}
  store i64 %flags.next, ptr %flags.v, align 8
  store i64 %cfa, ptr %prev.v, align 8
  %n.next = add i64 %n, 1
  store i64 %n.next, ptr %n.v, align 8
  %full = icmp eq i64 %n.next, %max
  br i1 %full, label %end.max, label %loop

; ---- ends that emitted the current frame
end.notinc:
  store i64 ${END_CFA_NOT_INCREASING}, ptr %reason.e, align 8
  br label %end.emitted

end.raundef:
  store i64 ${END_RA_UNDEFINED}, ptr %reason.e, align 8
  br label %end.emitted

end.razero:
  store i64 ${END_RA_ZERO}, ptr %reason.e, align 8
  br label %end.emitted

end.emitted:
  %re = load i64, ptr %reason.e, align 8
  %re.bits = shl i64 %re, ${INFO_END_SHIFT}
  %info.end = or i64 %info, %re.bits
  store i64 %info.end, ptr %o.info, align 8
  %n.e = add i64 %n, 1
  store i64 %n.e, ptr %n.v, align 8
  store i64 %re, ptr %reason.v, align 8
  br label %finish

; ---- ends that leave the state at the frame not done
end.max:
  store i64 ${END_MAX_FRAMES}, ptr %reason.v, align 8
  br label %finish

end.noinfo:
  store i64 ${END_NO_INFO}, ptr %reason.v, align 8
  br label %finish

end.python:
  store i64 ${END_NEEDS_PYTHON}, ptr %reason.v, align 8
  br label %finish

end.oob:
  store i64 ${END_OUT_OF_BOUNDS}, ptr %reason.v, align 8
  br label %finish

end.cfaunknown:
  store i64 ${END_CFA_REGISTER_UNKNOWN}, ptr %reason.v, align 8
  br label %finish

end.notable:
  store i64 ${END_NO_TABLE}, ptr %reason.v, align 8
  br label %finish

finish:
  call void @llvm.memcpy.inline.p0.p0.i64(ptr align 8 %regs.src, ptr align 8 %regs,
                                          i64 ${REGS_BYTES}, i1 false)
  %f.known = load i64, ptr %known.v, align 8
  store i64 %f.known, ptr %known.p, align 8
  %f.flags = load i64, ptr %flags.v, align 8
  store i64 %f.flags, ptr %flags.p, align 8
  %f.prev = load i64, ptr %prev.v, align 8
  store i64 %f.prev, ptr %prev.p, align 8
  %f.reason = load i64, ptr %reason.v, align 8
  %f.reason.p = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.end_reason}
  store i64 %f.reason, ptr %f.reason.p, align 8
  %f.mod = load i64, ptr %endmod.v, align 8
  %f.mod.p = getelementptr inbounds %WalkState, ptr %state, i64 0, i32 ${WalkState.end_module}
  store i64 %f.mod, ptr %f.mod.p, align 8
  %f.n = load i64, ptr %n.v, align 8
  ret i64 %f.n
}
