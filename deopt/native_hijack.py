"""Hijacking a whole stack at C speed: plan, check, write, and build LIFO entries.

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

Frames are read from the walker's output only; a slot is read (plan, check)
or written (apply) only at an address the walker itself read a return
address from, inside the thread's stack bounds.
"""
import ctypes

__all__ = ["PLAN_SYMBOL", "APPLY_SYMBOL", "LIFO_SYMBOL", "hijack_module_ir", "NativeHijacker"]

PLAN_SYMBOL = "osrjit_hj_plan"
APPLY_SYMBOL = "osrjit_hj_apply"
LIFO_SYMBOL = "osrjit_hj_lifo"

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


def hijack_module_ir(triple, pending=0):
    """Textual LLVM IR of the module holding the three functions above.
    ``pending``: the value of :data:`deopt.native_transfer.PENDING`."""
    return f'target triple = "{triple}"\n' + _IR.format(
        plan=PLAN_SYMBOL, apply=APPLY_SYMBOL, lifo=LIFO_SYMBOL,
        translated=_FRAME_TRANSLATED, pending=pending)


_U64 = ctypes.c_uint64
_PLAN = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, _U64, _U64, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _U64,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)
_APPLY = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, _U64, _U64, _U64)
_LIFO = ctypes.PYFUNCTYPE(_U64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, _U64, ctypes.c_void_p)


class NativeHijacker:
    """Callable wrappers of the three functions, given their absolute addresses
    (the caller owns the code and keeps it mapped while this object is used).
    The calls keep the GIL (they never block; see :mod:`unwinder.native`)."""

    def __init__(self, plan_address, apply_address, lifo_address):
        self.plan = _PLAN(plan_address)
        self.apply = _APPLY(apply_address)
        self.lifo = _LIFO(lifo_address)
