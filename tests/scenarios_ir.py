"""Hand-written LLVM IR shared by the unwinder scenarios (backtrace, walk, native walk).

Plain textual IR, independent of :mod:`osrjit`; load it with ``jitutil.load_ir``.
"""

__all__ = ["RECURSION_IR"]

# rec(n, cb): n == 0 ? cb(0) + 1 : rec(n - 1, cb) + 1 — the "+ 1" keeps every
# call out of tail position, so each level leaves a real frame.
RECURSION_IR = r"""
define i64 @rec(i64 %n, ptr %cb) {
entry:
  %z = icmp eq i64 %n, 0
  br i1 %z, label %leaf, label %down
leaf:
  %r0 = call i64 %cb(i64 0)
  %s0 = add i64 %r0, 1
  ret i64 %s0
down:
  %m = sub i64 %n, 1
  %r1 = call i64 @rec(i64 %m, ptr %cb)
  %s1 = add i64 %r1, 1
  ret i64 %s1
}
"""
