"""The emulated machine: hypercalls, threads, the deterministic scheduler, exact
instruction counts, and reference-language programs computing what the
native runtime computes.

Everything runs under unicorn in this process except the one comparison
with the native runtime, which runs in a child (``childproc.run_child``).
"""
import pytest
from unicorn import UC_HOOK_CODE

import handir
from childproc import run_child
from osrjit.emulated.program import EmulatedProgram
from osrjit.emulated import EmulationError, EmulationFault, Machine, ThreadState
from osrjit.emulated.loader import assemble
from osrjit.errors import HookNotSet

ASM = r'''
	.text
	.globl add3
	.type add3,@function
add3:                                   # hc_add(a, b) + c
	.cfi_startproc
	pushq %rbx
	.cfi_def_cfa_offset 16
	.cfi_offset %rbx, -16
	movq %rdx, %rbx
	callq hc_add@PLT
	addq %rbx, %rax
	popq %rbx
	.cfi_def_cfa_offset 8
	retq
	.cfi_endproc
	.size add3, .-add3

	.globl redirected
	.type redirected,@function
redirected:                             # 1 if hc_redirect returns, 2 if it redirects to alt
	.cfi_startproc
	callq hc_redirect@PLT
	movl $1, %eax
	retq
	.cfi_endproc
	.size redirected, .-redirected
	.globl alt
	.type alt,@function
alt:
	.cfi_startproc
	movl $2, %eax
	retq
	.cfi_endproc
	.size alt, .-alt

	.globl sum8
	.type sum8,@function
sum8:                                   # 8 arguments: 6 in registers, 2 on the stack
	.cfi_startproc
	leaq (%rdi,%rsi), %rax
	addq %rdx, %rax
	addq %rcx, %rax
	addq %r8, %rax
	addq %r9, %rax
	addq 8(%rsp), %rax
	addq 16(%rsp), %rax
	retq
	.cfi_endproc
	.size sum8, .-sum8

	.globl vecloop
	.type vecloop,@function
vecloop:                                # xmm0 = [rdi, rdi]; add it rsi times; low + high
	.cfi_startproc
	movq %rdi, %xmm1
	punpcklqdq %xmm1, %xmm1
	pxor %xmm0, %xmm0
	xorl %ecx, %ecx
1:	paddq %xmm1, %xmm0
	incq %rcx
	cmpq %rsi, %rcx                     # flags live across a possible switch
	jne 1b
	movq %xmm0, %rax
	pshufd $0xee, %xmm0, %xmm0
	movq %xmm0, %rdx
	addq %rdx, %rax
	retq
	.cfi_endproc
	.size vecloop, .-vecloop

	.globl clobber
	.type clobber,@function
clobber:                                # scribbles xmm0/xmm1/flags/rcx for rdi rounds
	.cfi_startproc
	movq $-1, %rax
	movq %rax, %xmm0
	movq %rax, %xmm1
1:	pcmpeqd %xmm0, %xmm0
	movq $12345, %rcx
	decq %rdi
	jnz 1b
	xorl %eax, %eax
	retq
	.cfi_endproc
	.size clobber, .-clobber

	.globl crash
	.type crash,@function
crash:
	.cfi_startproc
	movq $0xdead000, %rax
	movq (%rax), %rax
	retq
	.cfi_endproc
	.size crash, .-crash
'''


@pytest.fixture(scope="module")
def asm_object():
    return assemble(ASM)


@pytest.fixture
def machine(asm_object):
    m = Machine()
    m.hypercall("hc_add", lambda m, t: t.arg(0) + t.arg(1))
    m.hypercall("hc_redirect", _redirect)
    m.load_object(asm_object, name="asm")
    return m


def _redirect(m, t):
    if t.arg(0):                                  # pop the return address, go to alt
        t.set_reg("rsp", t.reg("rsp") + 8)
        t.set_reg("rip", m.symbols["alt"])


def test_a_hypercall_sees_arguments_and_its_result_is_rax(machine):
    assert machine.call(machine.symbols["add3"], 40, 2, 100) == 142


def test_a_hypercall_can_send_the_thread_elsewhere(machine):
    assert machine.call(machine.symbols["redirected"], 0) == 1
    assert machine.call(machine.symbols["redirected"], 1) == 2


def test_re_registering_a_hypercall_keeps_its_address(machine):
    address = machine.symbols["hc_add"]
    assert machine.hypercall("hc_add", lambda m, t: t.arg(0) * t.arg(1)) == address
    assert machine.call(machine.symbols["add3"], 6, 7, 1) == 43


def test_a_hypercall_can_register_another_while_threads_run(machine):
    def add_and_register(m, t):
        if "late" not in m.symbols:
            m.hypercall("late", lambda m, t: 99)     # rewrites the page being executed
        return t.arg(0) + t.arg(1)
    machine.hypercall("hc_add", add_and_register)
    ts = [machine.spawn(machine.symbols["add3"], [i, 1, 1]) for i in range(3)]
    machine.run(quantum=(1, 3))
    assert [t.result for t in ts] == [2, 3, 4]
    assert machine.call(machine.symbols["late"]) == 99
    assert machine.symbolize(machine.symbols["late"]) == "hypercall.late+0x8"


def test_spawn_passes_stack_arguments_and_aligns_the_stack(machine):
    t = machine.spawn(machine.symbols["sum8"], [1, 2, 3, 4, 5, 6, 70, 800])
    assert (t.sp + 8) % 16 == 0 and machine.read_u64(t.sp) == machine.exit_address
    machine.run()
    assert t.result == 891
    assert machine.call(machine.symbols["sum8"], -1, -2, -3, -4, -5, -6, -7, -8) == -36


def test_context_switches_keep_xmm_registers_flags_and_gprs(machine):
    """Quanta of 1-3 instructions switch between a loop that keeps its state in
    xmm0/xmm1/rcx/flags and threads that scribble on all of them."""
    v = machine.spawn(machine.symbols["vecloop"], [7, 300])
    others = [machine.spawn(machine.symbols["clobber"], [200]) for _ in range(2)]
    sched = machine.run(seed=3, quantum=(1, 3))
    assert v.result == 2 * 7 * 300
    assert all(o.result == 0 for o in others)
    assert len(sched.trace) > 300                   # it really switched often


def test_a_cpu_fault_names_the_thread_and_function(machine):
    t = machine.spawn(machine.symbols["crash"], [])
    with pytest.raises(EmulationFault, match=r"thread 1 \(thread-1\) faulted at 0x[0-9a-f]+ "
                                             r"\(crash\+0x7\)") as info:
        machine.run()
    assert info.value.thread is t and t.state is ThreadState.FAULTED
    with pytest.raises(EmulationFault):
        t.result


def test_registers_as_dwarf_numbers_and_a_walk_from_a_hypercall(machine):
    seen = {}

    def look(m, t):
        seen["regs"] = t.regs()
        seen["frames"] = m.walk(t)
        return t.arg(0) + t.arg(1)
    machine.hypercall("hc_add", look)
    assert machine.call(machine.symbols["add3"], 1, 2, 3) == 6
    regs = seen["regs"]
    assert sorted(regs) == list(range(17))
    assert regs[16] == machine.symbols["hc_add"] and (regs[5], regs[4], regs[3]) == (1, 2, 3)
    names = [f.symbol for f in seen["frames"]]
    assert names == ["hypercall.hc_add", "add3", "hypercall.exit"]
    assert seen["frames"][-1].end_reason == "end of stack: return address undefined"


# --------------------------------------------------------------------------
# The scheduler: determinism, exact counts, stopping the world
# --------------------------------------------------------------------------

SOURCE = handir.SOURCE + """
def worker(k):
    s = 0
    i = 0
    while i < k:
        s += hook(i)
        i += 1
    return s
"""


def _world(seed, quantum=(1, 40), stop_at=()):
    """Four threads under one scheduler; returns (trace, results, hook log, stops)."""
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile(SOURCE)
    log = []
    current = {}

    def hook(x):
        log.append((current["t"], x))
        return x + 1
    prog.on_hook(hook)

    def note(m_, t):                      # wrap the hook service to see the thread
        current["t"] = t.id
        return service(m_, t)
    service = m._hypercalls["osrjit_hook"].fn
    m.hypercall("osrjit_hook", note)
    threads = [prog.spawn("worker", 6), prog.spawn("fib", 9), prog.spawn("worker", 4),
               prog.spawn("ack", 2, 2)]
    sched = m.scheduler(seed, quantum)
    stops = []
    for k in stop_at:
        assert sched.run(max_instructions=k - m.instructions_executed) is False
        stops.append((m.instructions_executed, [t.pc for t in threads]))
    assert sched.run() is True
    return sched.trace, [t.result for t in threads], log, stops, m.instructions_executed


def test_same_seed_same_interleaving_different_seed_different_one():
    a, b, c = _world(7), _world(7), _world(8)
    assert a[0] == b[0] and a[2] == b[2]            # trace of (thread, rip, quantum); hook order
    assert a[0] != c[0]
    assert a[1] == c[1] == [21, handir.py_fib(9), 10, handir.py_ack(2, 2)]
    assert a[4] == c[4]                             # the same work, however interleaved


def test_stopping_after_exactly_k_instructions_and_resuming_is_the_same_run():
    full = _world(11)
    stopped = _world(11, stop_at=(1, 17, 500, 1234))
    assert [s[0] for s in stopped[3]] == [1, 17, 500, 1234]
    assert stopped[0] == full[0] and stopped[2] == full[2] and stopped[1] == full[1]
    assert stopped[4] == full[4]


def _stepping_world(step, far):
    m = Machine(hypercall_base=0x7E00_0000_0000 if far else None)
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE)
    prog.on_hook(lambda x: x + 1)
    prog.safepoint_flag = 1                      # every poll calls the slow path
    threads = [prog.spawn("hooky", 2), prog.spawn("fib", 4), prog.spawn("loops", 2)]
    sched = m.scheduler(2, (1, 30))
    walks = 0
    while not sched.run(max_instructions=step):
        for t in threads:
            if t.state is ThreadState.RUNNABLE:
                frames = m.walk(t)
                assert frames[-1].symbol == "hypercall.exit", (t, frames)
                assert frames[-1].end_reason == "end of stack: return address undefined"
                assert not any(f.fallback for f in frames), frames
                walks += 1
    return sched.trace, [t.result for t in threads], m.instructions_executed, walks


@pytest.mark.parametrize("far", [False, True], ids=["near", "far-stubs"])
def test_stopping_at_every_instruction_boundary(far):
    """Stop the world after every single instruction: the run is the same as
    an unstopped one, and every stopped thread (in JIT code, a stub, a
    hypercall's slot) unwinds to its exit frame by CFI alone."""
    once = _stepping_world(None, far)
    stepped = _stepping_world(1, far)
    assert stepped[:3] == once[:3]
    assert once[1] == [3 + 2 * 4, 3, handir.py_loops_from(0, 0, 2, 0)]
    assert stepped[3] > once[2]                  # walked at least once per instruction


def test_instruction_counts_are_exact(machine):
    """An independent count (a Python hook on all memory, idle loop excluded)
    equals the machine's, with threads exiting, calling hypercalls and
    parking mid-quantum."""
    counted = [0]
    idle = machine.idle_address

    def count(uc, address, size, _):
        if not idle <= address < idle + 16:
            counted[0] += 1
    machine.uc.hook_add(UC_HOOK_CODE, count, None, 1, 0)
    parked = []

    def park_once(m, t):
        if not parked:
            parked.append(t)
            t.park()
        return t.arg(0) + t.arg(1)
    machine.hypercall("hc_add", park_once)
    ts = [machine.spawn(machine.symbols["add3"], [i, i, i]) for i in range(3)]
    ts.append(machine.spawn(machine.symbols["vecloop"], [1, 50]))
    sched = machine.scheduler(5, (1, 9))
    assert sched.run() is False and sched.stop_reason == "every remaining thread is parked"
    parked[0].unpark()
    assert sched.run() is True
    assert [t.result for t in ts] == [0, 3, 6, 100]
    assert machine.instructions_executed == counted[0] == sum(t.instructions for t in ts)


def test_a_hypercall_can_stop_the_world_and_the_run_goes_on():
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE)
    prog.on_hook(lambda x: x * 100)

    def stop_then_return(m_, t):
        m_.request_stop("hook")
        return service(m_, t)
    service = m._hypercalls["osrjit_hook"].fn
    m.hypercall("osrjit_hook", stop_then_return)
    t = prog.spawn("hooky", 3)
    sched = m.scheduler(0, (1000, 1000))
    assert sched.run() is False and sched.stop_reason == "hook"
    # Stopped as the hook returned: RAX holds its result, RIP the return address.
    assert t.reg("rax") == 300 and prog.current("hooky").contains(t.pc)
    frames = m.walk(t)
    assert [f.symbol for f in frames] == ["osrjit.fn.hooky", "hypercall.exit"]
    assert sched.run() is False                     # the second hook stops again
    assert sched.run() is True and t.result == 1100


# --------------------------------------------------------------------------
# Reference-language programs
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def program():
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE)
    return prog


@pytest.mark.parametrize("name,args,expected", [
    ("fib", (15,), handir.py_fib(15)),
    ("ack", (2, 3), handir.py_ack(2, 3)),
    ("is_even", (10,), 1), ("is_even", (7,), 0), ("is_odd", (7,), 1),
    ("loops", (5,), handir.py_loops_from(0, 0, 5, 0)),
    ("div", (-7, 2), -7 // 2 + -7 % 2),
])
def test_programs_compute_what_python_computes(program, name, args, expected):
    assert program.call(name, *args) == expected


def test_hook_round_trips(program):
    program.on_hook(lambda x: 3 * x + 1)
    before = len(program.hook_calls)
    assert program.call("hooky", 5) == 16 + 2 * 19
    assert program.hook_calls[before:] == [5, 6]


def test_safepoint_flag_sends_polls_to_the_slow_path(program):
    calls = []

    def slow(thread):
        calls.append(program.machine.read_u64(thread.sp))     # the poll's return address
        if len(calls) == 20:
            program.safepoint_flag = 0
    program.on_safepoint(slow)
    program.safepoint_flag = 1
    try:
        assert program.call("loops", 6) == handir.py_loops_from(0, 0, 6, 0)
    finally:
        program.safepoint_flag = 0
        program.on_safepoint(None)
    assert len(calls) == 20
    assert all(program.current("loops").contains(ra) for ra in calls)


def test_errors_reach_the_caller_like_natively(program):
    with pytest.raises(ZeroDivisionError):
        program.call("div", 1, 0)

    def bad(x):
        raise ValueError(f"hook {x}")
    program.on_hook(bad)
    with pytest.raises(ValueError, match="hook 3"):
        program.call("hooky", 3)
    program.on_hook(None)
    with pytest.raises(HookNotSet):
        program.call("hooky", 3)


def test_many_threads_with_tiny_quanta(program):
    program.on_hook(lambda x: x)
    m = program.machine
    ts = [program.spawn("fib", 10 + i % 3) for i in range(4)]
    ts += [program.spawn("is_even", 9), program.spawn("hooky", 2), program.spawn("ack", 1, 5)]
    m.run(seed=1, quantum=(1, 5))
    assert [t.result for t in ts] == [55, 89, 144, 55, 0, 2 + 2 * 3, handir.py_ack(1, 5)]


def test_direct_call_mode():
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE, calls="direct")
    assert prog.call("is_even", 12) == 1 and prog.call("ack", 2, 2) == 7


def test_a_batch_that_fails_to_link_leaves_nothing_behind():
    """The batch's second function calls one nobody defines: the first object
    was already linked, the second placed; neither stays mapped or registered."""
    from osrjit.lang import compile_source
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile("def one(x):\n    return x + 1\n")
    modules = len(m.space.modules)          # (builds the hypercall object first)
    before = (list(m.regions), modules, len(m.objects))
    batch = compile_source("def two(x):\n    return x + 2\n\ndef three(x):\n    return gone(x)\n",
                           known={"gone": 1})
    with pytest.raises(EmulationError, match="undefined symbol 'osrjit.slot.gone'"):
        prog.load(batch)
    assert (list(m.regions), len(m.space.modules), len(m.objects)) == before
    assert prog.call("one", 41) == 42


def test_resume_entries_with_hand_built_states(program):
    """The emulated twins of tests/test_resume.py's reference-language cases."""
    from osrjit.lang import site_id, site_key
    fib, ack = program.current("fib"), program.current("ack")
    s0 = site_id(site_key("fib", "call", "fib", 0))
    t = program.spawn_resume(fib, s0, 377, {"n": 15})
    s1 = site_id(site_key("fib", "call", "fib", 1))
    t1 = program.spawn_resume(fib, s1, 233, {v.name: 377 for v in fib.sites[s1].live})
    sa = site_id(site_key("ack", "call", "ack", 1))
    t2 = program.spawn_resume(ack, sa, 7, {"m": 2})
    program.machine.run()
    assert (t.result, t1.result, t2.result) == (610, 610, handir.py_ack(1, 7))
    bad = program.machine.spawn(fib.resume_entry, (12345, program.state_buffer([0])))
    with pytest.raises(EmulationFault, match=r"osrjit\.fn\.fib__resume\+0x"):
        program.machine.run()
    assert bad.state is ThreadState.FAULTED


def test_misuse_is_reported():
    m = Machine(hypercall_capacity=2)
    m.hypercall("a", lambda m, t: 0)
    with pytest.raises(EmulationError, match="no hypercall slot left"):
        m.hypercall("b", lambda m, t: 0)
    t = m.spawn(m.symbols["a"], [])
    with pytest.raises(EmulationError, match="has not finished"):
        t.result
    with pytest.raises(EmulationError, match="unknown register"):
        t.reg("eip")


NATIVE_CALLS = [("fib", (15,)), ("ack", (2, 3)), ("is_even", (9,)), ("loops", (5,)),
                ("hooky", (4,)), ("div", (-9, 4))]


def scenario_native_results():
    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile(handir.SOURCE)
        rt.on_hook(lambda x: 7 * x - 1)
        return [rt.function(name)(*args) for name, args in NATIVE_CALLS]


def test_emulated_results_equal_the_native_runtime():
    native = run_child(scenario_native_results)
    m = Machine()
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE)
    prog.on_hook(lambda x: 7 * x - 1)
    assert [prog.call(name, *args) for name, args in NATIVE_CALLS] == native
