"""Test programs: hand-written versioned functions (textual LLVM IR following
``osrjit/abi.py``) and reference-language sources (:data:`SOURCE`).

Used by the runtime, frame-map and resume tests so they do not depend on the
reference frontend. Each function is written with one ``alloca`` per variable
(O2's mem2reg makes SSA of them); the *body* text is emitted twice, once after
the entry prologue (parameters stored into their variables) and once after
the resume prologue, which switches on the site id to one block per site that
stores ``state[STATE_LIVE_BASE + i]`` into ``live[i]`` (and ``state[0]`` into
the site's result variable) and branches to the block right after the site.

Programs (site ids in brackets):

``fib(n)``            [1] direct self call ``E8 rel32``; [2] call through
                      ``osrjit.slot.fib`` (indirect ``call *%reg``).
``kinds(n)``          [1] entry poll; loop ``i < n``: [2] ``acc += hook(i)``,
                      [3] back-edge poll; then [4] ``t = twice(acc)`` through
                      a slot; [5] a ``safepoint()`` poll; returns ``t + acc``.
``twice(x)``          ``2 * x``, no sites.
``locs(x)``           [1] hook call whose deopt values are INDIRECT (``x``),
                      DIRECT (an alloca's address), CONSTANT (7) and
                      CONSTANT_INDEX (0x123456789abcdef0).
"""
from osrjit.abi import FunctionIR, LiveValue, SiteInfo, SiteKind

_DECLS = """\
declare token @llvm.experimental.gc.statepoint.p0(i64, i32, ptr, i32, i32, ...)
declare i64 @llvm.experimental.gc.result.i64(token)
declare void @llvm.trap()
"""


class Fn:
    """Collects a function's body, variables and sites, and renders the module."""

    def __init__(self, name, params, variables=(), globals_=""):
        self.name = name
        self.params = tuple(params)
        self.variables = tuple(params) + tuple(variables)
        self.globals = globals_
        self.sites = {}
        self.resume_targets = {}   # site id -> (live names, result var or None, after label)
        self.lines = []
        self._n = 0

    def emit(self, text):
        self.lines.extend(text.strip("\n").splitlines())

    def _tmp(self):
        self._n += 1
        return f"%t{self._n}"

    def site(self, site_id, kind, callee_ptr, fnty, args, live, *, result=None, callee=None,
             after):
        """Emit a statepoint call with site ``site_id``, then ``br label %after``.

        ``callee_ptr``: an IR operand (``@sym`` or a loaded ``%reg``); ``fnty``:
        its function type, e.g. ``i64 (i64)``; ``args``: ``["i64 %x", ...]``;
        ``live``: ``[(name, type)]`` variables (or ``(name, type, literal)`` for
        a literal operand); ``result``: variable receiving the call's result.
        """
        vals = []
        for entry in live:
            name, ty = entry[0], entry[1]
            if len(entry) == 3:
                vals.append(f"{ty} {entry[2]}")
            else:
                t = self._tmp()
                self.emit(f"  {t} = load {ty}, ptr %{name}")
                vals.append(f"{ty} {t}")
        tok = self._tmp()
        argtext = "".join(", " + a for a in args)
        self.emit(f"  {tok} = call token (i64, i32, ptr, i32, i32, ...) "
                  f"@llvm.experimental.gc.statepoint.p0(i64 {site_id}, i32 0, "
                  f"ptr elementtype({fnty}) {callee_ptr}, i32 {len(args)}, i32 0{argtext}, "
                  f"i32 0, i32 0) [ \"deopt\"({', '.join(vals)}) ]")
        if result is not None:
            r = self._tmp()
            self.emit(f"  {r} = call i64 @llvm.experimental.gc.result.i64(token {tok})")
            self.emit(f"  store i64 {r}, ptr %{result}")
        self.emit(f"  br label %{after}")
        self.sites[site_id] = SiteInfo(site_id, kind, callee,
                                       tuple(LiveValue(e[0], e[1]) for e in live),
                                       has_result=result is not None)
        self.resume_targets[site_id] = ([e for e in live], result, after)

    def poll(self, site_id, live, *, after):
        """A safepoint poll: test the flag, slow path is site ``site_id``."""
        f, c = self._tmp(), self._tmp()
        slow = f"slow{site_id}"
        self.emit(f"""
  {f} = load volatile i64, ptr @osrjit_safepoint_flag
  {c} = icmp ne i64 {f}, 0
  br i1 {c}, label %{slow}, label %{after}
{slow}:""")
        self.site(site_id, SiteKind.POLL, "@osrjit_safepoint_slow", "void ()", [], live,
                  after=after)

    def _allocas(self):
        return "\n".join(f"  %{v} = alloca i64" for v in self.variables)

    def module(self):
        body = "\n".join(self.lines)
        params = ", ".join(f"i64 %{p}.arg" for p in self.params)
        stores = "\n".join(f"  store i64 %{p}.arg, ptr %{p}" for p in self.params)
        zero = "\n".join(f"  store i64 0, ptr %{v}" for v in self.variables
                         if v not in self.params)
        cases = " ".join(f"i64 {s}, label %resume.{s}" for s in self.resume_targets)
        blocks = []
        for s, (live, result, after) in self.resume_targets.items():
            blocks.append(f"resume.{s}:")
            for i, entry in enumerate(live):
                if len(entry) == 3:
                    continue
                name, ty = entry[0], entry[1]
                blocks.append(f"  %r{s}.{i}.p = getelementptr i64, ptr %state, i64 {1 + i}")
                blocks.append(f"  %r{s}.{i} = load {ty}, ptr %r{s}.{i}.p")
                blocks.append(f"  store {ty} %r{s}.{i}, ptr %{name}")
            if result is not None:
                blocks.append(f"  %r{s}.res = load i64, ptr %state")
                blocks.append(f"  store i64 %r{s}.res, ptr %{result}")
            blocks.append(f"  br label %{after}")
        resume_blocks = "\n".join(blocks)
        return f"""{_DECLS}{self.globals}
define i64 @{self.name}({params}) gc "statepoint-example" {{
prologue:
{self._allocas()}
{stores}
{zero}
  br label %start
start:
{body}
}}

define i64 @{self.name}__resume(i64 %site, ptr %state) gc "statepoint-example" {{
prologue:
{self._allocas()}
{zero}
  switch i64 %site, label %bad [ {cases} ]
bad:
  call void @llvm.trap()
  unreachable
{resume_blocks}
start:
{body}
}}
"""

    def ir(self, callees=()):
        return FunctionIR(self.name, self.params, self.module(), self.name, dict(self.sites),
                          frozenset(callees))


def fib():
    f = Fn("fib", ["n"], ["a", "b"], '@"osrjit.slot.fib" = external global ptr\n')
    f.emit("""
  %n0 = load i64, ptr %n
  %small = icmp slt i64 %n0, 2
  br i1 %small, label %base, label %rec
base:
  ret i64 %n0
rec:
  %n1 = load i64, ptr %n
  %m1 = sub i64 %n1, 1""")
    f.site(1, SiteKind.CALL, "@fib", "i64 (i64)", ["i64 %m1"], [("n", "i64")], result="a",
           callee="fib", after="second")
    f.emit("""second:
  %n2 = load i64, ptr %n
  %m2 = sub i64 %n2, 2
  %fp = load ptr, ptr @"osrjit.slot.fib\"""")
    f.site(2, SiteKind.CALL, "%fp", "i64 (i64)", ["i64 %m2"], [("a", "i64")], result="b",
           callee="fib", after="sum")
    f.emit("""sum:
  %av = load i64, ptr %a
  %bv = load i64, ptr %b
  %s = add i64 %av, %bv
  ret i64 %s""")
    return f.ir({"fib"})


_SERVICES = """\
@osrjit_safepoint_flag = external global i64
declare void @osrjit_safepoint_slow()
declare i64 @osrjit_hook(i64)
"""


def kinds():
    f = Fn("kinds", ["n"], ["i", "acc", "h", "t"],
           _SERVICES + '@"osrjit.slot.twice" = external global ptr\n')
    f.poll(1, [("n", "i64")], after="loop")
    f.emit("""loop:
  %iv = load i64, ptr %i
  %nv = load i64, ptr %n
  %more = icmp slt i64 %iv, %nv
  br i1 %more, label %body, label %exit
body:
  %ib = load i64, ptr %i""")
    f.site(2, SiteKind.HOOK, "@osrjit_hook", "i64 (i64)", ["i64 %ib"],
           [("n", "i64"), ("i", "i64"), ("acc", "i64")], result="h", after="gothook")
    f.emit("""gothook:
  %hv = load i64, ptr %h
  %a0 = load i64, ptr %acc
  %a1 = add i64 %a0, %hv
  store i64 %a1, ptr %acc
  %i0 = load i64, ptr %i
  %i1 = add i64 %i0, 1
  store i64 %i1, ptr %i""")
    f.poll(3, [("n", "i64"), ("i", "i64"), ("acc", "i64")], after="loop")
    f.emit("""exit:
  %ax = load i64, ptr %acc
  %tw = load ptr, ptr @"osrjit.slot.twice\"""")
    f.site(4, SiteKind.CALL, "%tw", "i64 (i64)", ["i64 %ax"], [("acc", "i64")], result="t",
           callee="twice", after="aftertwice")
    f.emit("aftertwice:")
    f.poll(5, [("acc", "i64"), ("t", "i64")], after="done")
    f.emit("""done:
  %tv = load i64, ptr %t
  %av = load i64, ptr %acc
  %r = add i64 %tv, %av
  ret i64 %r""")
    return f.ir({"twice"})


def twice():
    f = Fn("twice", ["x"])
    f.emit("""
  %x0 = load i64, ptr %x
  %r = shl i64 %x0, 1
  ret i64 %r""")
    # No sites: the resume entry's switch has no cases and always traps.
    return f.ir()


#: The large constant ``locs`` passes as a deopt value (no int32: ConstantIndex).
BIG = 0x123456789ABCDEF0


def locs():
    """One hook site whose deopt values exercise four location kinds.

    The body is hand-written (no allocas for ``buf``'s address to be promoted).
    """
    ir = f"""{_DECLS}{_SERVICES}
define i64 @locs(i64 %x) gc "statepoint-example" {{
entry:
  %buf = alloca i64
  store volatile i64 %x, ptr %buf
  %t = call token (i64, i32, ptr, i32, i32, ...) @llvm.experimental.gc.statepoint.p0(i64 1, i32 0, ptr elementtype(i64 (i64)) @osrjit_hook, i32 1, i32 0, i64 %x, i32 0, i32 0) [ "deopt"(i64 %x, ptr %buf, i64 7, i64 {BIG}) ]
  %r = call i64 @llvm.experimental.gc.result.i64(token %t)
  %v = load volatile i64, ptr %buf
  %s = add i64 %r, %v
  ret i64 %s
}}

define i64 @locs__resume(i64 %site, ptr %state) {{
entry:
  %c = icmp eq i64 %site, 1
  br i1 %c, label %ok, label %bad
bad:
  call void @llvm.trap()
  unreachable
ok:
  %r = load i64, ptr %state
  %xp = getelementptr i64, ptr %state, i64 1
  %x = load i64, ptr %xp
  %s = add i64 %r, %x
  ret i64 %s
}}
"""
    live = (LiveValue("x"), LiveValue("buf", "ptr"), LiveValue("seven"), LiveValue("big"))
    return FunctionIR("locs", ("x",), ir, "locs", {1: SiteInfo(1, SiteKind.HOOK, None, live)})


#: Reference-language programs used by the runtime and resume tests.
SOURCE = """
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

def ack(m, n):
    if m == 0:
        return n + 1
    if n == 0:
        return ack(m - 1, 1)
    return ack(m - 1, ack(m, n - 1))

def loops(n):
    s = 0
    i = 0
    while i < n:
        j = 0
        while j < n:
            s += i * j + 1
            safepoint()
            j += 1
        i += 1
    return s

def is_even(n):
    if n == 0:
        return 1
    return is_odd(n - 1)

def is_odd(n):
    if n == 0:
        return 0
    return is_even(n - 1)

def hooky(x):
    return hook(x) + 2 * hook(x + 1)

def div(a, b):
    return a // b + a % b
"""


def py_fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def py_ack(m, n):
    if m == 0:
        return n + 1
    if n == 0:
        return py_ack(m - 1, 1)
    return py_ack(m - 1, py_ack(m, n - 1))


def py_loops_from(i, j, n, s):
    """``loops`` continued from the inner loop's head with these variables."""
    while i < n:
        while j < n:
            s += i * j + 1
            j += 1
        i += 1
        j = 0
    return s
