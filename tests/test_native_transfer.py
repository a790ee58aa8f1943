"""Scenarios: the native deopt transfer (``Runtime(transfer="fast")``, the default).

Bottom-up: a frame map compiled for native code (what is supported and what
falls back), the generated transfer code against the Python transfer on a
synthetic frame that uses every location kind and unwind rule, the
dispatcher's LIFO (top, search, miss, no target), then whole replacements —
every one with every frame transferred natively (``transfers == hijacks ==
native_transfers``, nothing pending, old versions and their transfer code
freed) — and the ways a frame falls back to the Python transfer, counted.
The deopt scenarios of ``test_replace.py`` and ``test_threads.py`` run on
the fast paths and on the reference ones.

Anything that executes generated code runs in a child process (a crash is a
failing test that names its signal).
"""
import ctypes
import random
import threading
import time

import pytest

from childproc import run_child
from deopt import native_transfer as ntx
from deopt import plan as frame_plan
from deopt.framemaps import FrameMap, LiveSlot
from deopt.plan import (CfaFromRegister, Constant, InMemory, InRegister, SameAs, SavedAt,
                        plan_frame)
from deopt.stackmaps import Location, LocationKind as K
from scenarios_native import (CHAIN, PAUSE, SUM_V1, SUM_V2, even_odd_scenario,
                              fib_mixed_reference, fib_scenario, loop_osr_scenario,
                              workers_scenario)
from unwinder.compiled import (CARRIED, OP_COPY, OP_GENERAL, OP_LOAD, OP_SAME, OP_UNDEF,
                               OP_VALUE, StepPlan)
from unwinder.x86_64 import CALLEE_SAVED, R12, R13, R14, R15, RA, RAX, RBP, RBX, RCX, RSP


# --------------------------------------------------------------------------
# Frame plans, and what native code can run (pure: no code runs)
# --------------------------------------------------------------------------

class FakeSpace:
    """An address space with one unwind row for every pc (``unwind_entry``),
    or, given ``rows``, the row ``rows[pc]`` (None, or no such pc: none)."""

    def __init__(self, plan=None, rows=None):
        self.plan = plan
        self.rows = rows

    def unwind_entry(self, pc):
        plan = self.plan if self.rows is None else self.rows.get(pc)
        return None if plan is None else (plan, False, None)

    def find_module(self, pc, refresh=True):
        return None


def _step_plan(cfa_register=RSP, cfa_offset=32, rules=None):
    """A StepPlan: ``rules`` maps register -> (op, operand); others SAME, RA at CFA - 8."""
    rules = dict(rules or {})
    rules.setdefault(RA, (OP_LOAD, -8))
    ops = tuple((r,) + rules.get(r, (OP_SAME, 0)) for r in CARRIED)
    saved = tuple((r, a) for r, o, a in ops if o == OP_LOAD and r != RA)
    return StepPlan(None, cfa_register, cfa_offset, ops, saved,
                    rules[RA][1] if rules[RA][0] == OP_LOAD else None)


def _frame_map(locations, return_address=0x1000, site_id=7):
    values = tuple(LiveSlot(f"v{i}", "i64", loc) for i, loc in enumerate(locations))
    return FrameMap("f", 1, site_id, "call", return_address, values, True)


def test_an_rsp_based_frame_map_plans_a_native_transfer():
    fm = _frame_map([Location(K.INDIRECT, 8, RSP, 8), Location(K.CONSTANT, 8, 0, -1),
                     Location(K.REGISTER, 8, RBX, 0), Location(K.INDIRECT, 4, RBP, -4)])
    plan = plan_frame(fm, FakeSpace(_step_plan(rules={RBX: (OP_LOAD, -16)})))
    assert plan.native and plan.native_error is None
    assert plan.values == (InMemory(RSP, 8, 8), Constant(2 ** 64 - 1), InRegister(RBX),
                           InMemory(RBP, -4, 4))
    assert plan.cfa == CfaFromRegister(RSP, 32)
    assert plan.return_address == SavedAt(-8) and plan.result == RAX
    assert dict(plan.caller)[RBX] == SavedAt(-16) and dict(plan.caller)[R12] == SameAs(R12)


@pytest.mark.parametrize("plan,locations,why", [
    (None, [], "no unwind row"),
    (_step_plan(cfa_register=None), [], "DWARF expression"),
    (_step_plan(cfa_register=RCX), [], "based on DWARF register 2"),
    (_step_plan(rules={RA: (OP_LOAD, -16)}), [], "not saved at CFA - 8"),
    (_step_plan(rules={R13: (OP_GENERAL, 0)}), [], "recovered by an expression"),
    (_step_plan(), [Location(K.REGISTER, 8, RCX, 0)], "not known at the return address"),
    (_step_plan(), [Location(K.INDIRECT, 8, RAX, 8)], "not known at the return address"),
])
def test_what_native_code_cannot_express_is_left_to_the_python_transfer(plan, locations, why):
    out = plan_frame(_frame_map(locations), FakeSpace(plan))
    assert not out.native and why in out.native_error


def test_too_many_live_values_for_the_state_buffer_are_left_to_python():
    fm = _frame_map([Location(K.CONSTANT, 8, 0, i) for i in range(ntx.STATE_SLOTS)])
    assert "at most" in plan_frame(fm, FakeSpace(_step_plan())).native_error


def test_permutation_maps_the_new_sites_order_onto_the_old_frame():
    fm = _frame_map([Location(K.CONSTANT, 8, 0, i) for i in range(3)])
    assert ntx.permutation(fm, ["v2", "v0"]) == (2, 0)
    assert ntx.permutation(fm, []) == ()
    assert ntx.permutation(fm, ["v0", "nope"]) is None


def test_the_transfer_option_is_checked():
    import osrjit
    with pytest.raises(ValueError, match="transfer must be one of"):
        osrjit.Runtime(transfer="turbo")
    with pytest.raises(ValueError, match="walker must be one of"):
        osrjit.Runtime(walker="jit")


# --------------------------------------------------------------------------
# Generated code against the Python transfer, case by case
# --------------------------------------------------------------------------

# Every location kind and every unwind rule the generated code handles.
SYNTHETIC_LOCATIONS = [
    Location(K.INDIRECT, 8, RSP, 8),            # a spill slot
    Location(K.INDIRECT, 4, RSP, 16),           # a 32-bit value (zero-extended)
    Location(K.INDIRECT, 1, RBP, -40),          # a byte, RBP-based
    Location(K.REGISTER, 8, RBX, 0),            # a callee-saved register
    Location(K.REGISTER, 8, RSP, 0),            # RSP itself (= E)
    Location(K.DIRECT, 8, RBP, 16),             # an address in the frame
    Location(K.CONSTANT, 8, 0, -1),             # a small constant
    Location(K.CONSTANT_INDEX, 8, 0, 0, constant=0x8000_0000_0000_0001),
]
# CFA = RBP + 16 (a frame-pointer frame); the caller's RBX and RBP are saved,
# R12 is a value rule, R13 a copy of R14, R14 same value, R15 undefined.
SYNTHETIC_RULES = {RBX: (OP_LOAD, -24), RBP: (OP_LOAD, -16), R12: (OP_VALUE, 8),
                   R13: (OP_COPY, R14), R14: (OP_SAME, 0), R15: (OP_UNDEF, 0)}
#: The synthetic stack: 128 words, the ExitState at its start, E = start + 80.
STACK_WORDS = 128
#: The hijacked frames' original return address (DWARF register 16).
ORIGINAL_RA = 0xBEEF


def _synthetic_frame(seed=0):
    """A fake stack: ExitState at its start (E = base + 80), the old frame above,
    every other word pseudo-random (``seed``).

    Returns (buffer, exit address, E, saved registers by DWARF number).
    """
    from deopt.stub import ExitState
    rng = random.Random(seed)
    words = (ctypes.c_uint64 * STACK_WORDS)(*(rng.getrandbits(64) | 1
                                              for _ in range(STACK_WORDS)))
    base = ctypes.addressof(words)
    E = base + 80
    rbp = E + 64                                   # CFA = rbp + 16 = E + 80
    saved = {RAX: 0x4242, RBX: 0x1111, RBP: rbp, R12: 0x1212, R13: 0x1313, R14: 0x1414,
             R15: 0x1515}
    _set_exit_state(ExitState.from_address(base), saved)

    def put(address, value):
        ctypes.c_uint64.from_address(address).value = value

    put(E + 8, 0x1122334455667788)
    put(E + 16, 0xAAAAAAAA_DEADBEEF)
    put(rbp - 40, 0xFFFFFFFF_FFFFFF9C)            # byte 0x9c
    cfa = rbp + 16
    put(cfa - 24, 0xCA11E4B8)                     # the caller's RBX
    put(cfa - 16, 0xCA11E4B9)                     # the caller's RBP
    put(cfa - 8, 0x5151)                          # the caller's return address
    saved[RSP] = E
    return words, base, E, saved


def _set_exit_state(es, saved):
    for reg, name in ((RAX, "rax"), (RBX, "rbx"), (RBP, "rbp"), (R12, "r12"), (R13, "r13"),
                      (R14, "r14"), (R15, "r15")):
        setattr(es, name, saved[reg])


class Case:
    """One frame map of the version under test: its locations, its unwind row
    (a StepPlan, or None), the callee-saved registers the stub saved for it
    (``("E", n)``: the address ``E + n`` in the synthetic stack; else a
    value; missing: the synthetic frame's) and the new site's live names."""

    def __init__(self, locations, row, live, regs=None):
        self.locations, self.row, self.live, self.regs = locations, row, live, regs or {}


def random_case(rng):
    """A frame map the native transfer can run, with everything drawn from
    ``rng``: values of every kind and size over registers that point into
    the synthetic stack, a CFA based on one of them, every rule kind."""
    pointers = rng.sample(list(CALLEE_SAVED), rng.randint(0, 4))
    regs = {r: ("E", 8 * rng.randint(8, 60)) if r in pointers else rng.getrandbits(64)
            for r in CALLEE_SAVED}
    position = {RSP: 0, **{r: regs[r][1] for r in pointers}}     # bytes above E
    bases = [RSP] + pointers
    cfa_register = rng.choice(bases)
    cfa_offset = 8 * rng.randint(16, 70) - position[cfa_register]
    rules = {}
    for reg in CALLEE_SAVED:
        rules[reg] = rng.choice([(OP_LOAD, -8 * rng.randint(2, 8)),
                                 (OP_VALUE, 8 * rng.randint(-4, 4)),
                                 (OP_COPY, rng.choice((RSP, RA, RAX, RCX) + CALLEE_SAVED)),
                                 (OP_SAME, 0), (OP_UNDEF, 0)])
    known = (RSP, RA) + CALLEE_SAVED
    locations = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.choice(list(K))
        if kind is K.INDIRECT:
            locations.append(Location(K.INDIRECT, rng.choice((1, 2, 4, 8, 16)),
                                      rng.choice(bases), rng.randint(-48, 48)))
        elif kind is K.REGISTER:
            locations.append(Location(K.REGISTER, 8, rng.choice(known), 0))
        elif kind is K.DIRECT:
            locations.append(Location(K.DIRECT, 8, rng.choice(known), rng.randint(-99, 99)))
        elif kind is K.CONSTANT:
            locations.append(Location(K.CONSTANT, 8, 0, rng.randint(-2 ** 31, 2 ** 31 - 1)))
        else:
            locations.append(Location(K.CONSTANT_INDEX, 8, 0, 0, constant=rng.getrandbits(64)))
    names = [f"v{i}" for i in range(len(locations))]
    live = rng.sample(names, rng.randint(0, len(names)))
    return Case(locations, _step_plan(cfa_register, cfa_offset, rules), live, regs)


def equivalence_scenario(cases):
    """One version whose frame map ``k`` is ``cases[k]`` (None: no frame map
    there): its generated code run on every case that has a native case, and
    the Python transfer on every case, both on the synthetic stack. Returns
    per index ``{"native": ..., "ref": ...}`` (a plan's fields; ``ref`` is an
    error's text when the Python transfer refuses) and ``"E"``."""
    import unwinder
    from deopt.hijack import HijackRecord
    from deopt.stub import ExitState, TransferPlan
    from deopt.transfer import ResumeTarget, plan_transfer
    from jitutil import load_ir

    frame_maps = {k: _frame_map(c.locations, return_address=0x1000 + 16 * k, site_id=100 + k)
                  for k, c in enumerate(cases) if c is not None}
    space = FakeSpace(rows={fm.return_address - 1: cases[k].row
                            for k, fm in frame_maps.items()})
    plans = [None if c is None else plan_frame(frame_maps[k], space)
             for k, c in enumerate(cases)]
    loaded = load_ir(ntx.version_transfer_ir("vt", plans), ["vt"])
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        loaded.addresses["vt"])
    words, base, E, synthetic = _synthetic_frame()
    out = {"E": E}
    for k, fm in frame_maps.items():
        case = cases[k]
        saved = dict(synthetic)
        for reg, value in case.regs.items():
            saved[reg] = E + value[1] if isinstance(value, tuple) else value
        _set_exit_state(ExitState.from_address(base), saved)
        resume = ResumeTarget(0xFEED0 + k, 100 + k, tuple(case.live))
        try:
            ref = plan_transfer(HijackRecord(E - 8, ORIGINAL_RA, fm, None), resume, saved,
                                unwinder.ProcessMemory(), space)
        except Exception as e:  # noqa: BLE001 - reported, compared by the test
            ref = f"{type(e).__name__}: {e}"
        else:
            ref = {"rsp": ref.rsp, "rip": ref.rip, "rdi": ref.site_id,
                   "state": list(ref.state), "regs": dict(ref.caller_regs)}
        native = None
        if plans[k].native:
            target = ntx.Target(resume.resume_entry, resume.site_id,
                                ntx.permutation(fm, case.live))
            p, state = TransferPlan(), (ctypes.c_uint64 * 16)()
            p.xmm0[3] = 9
            p.rax = 5
            fn(base, k, ORIGINAL_RA, target.address, ctypes.addressof(p),
               ctypes.addressof(state))
            native = {"rsp": p.rsp, "rip": p.rip, "rdi": p.rdi,
                      "state": list(state[:1 + len(case.live)]),
                      "regs": {r: getattr(p, n) for r, n in ((RBX, "rbx"), (RBP, "rbp"),
                                                              (R12, "r12"), (R13, "r13"),
                                                              (R14, "r14"), (R15, "r15"))},
                      "rsi_is_state": p.rsi == ctypes.addressof(state), "rax": p.rax,
                      "xmm0": bytes(p.xmm0)}
        out[k] = {"native": native, "ref": ref, "native_error": plans[k].native_error}
    del loaded
    return out


def _same_as_reference(got):
    """Assert that a case's native plan is the Python transfer's, field by field."""
    native, ref = got["native"], got["ref"]
    assert isinstance(ref, dict), ref
    for key in ("state", "regs", "rsp", "rip", "rdi"):
        assert native[key] == ref[key], key
    assert native["rsi_is_state"] and native["rax"] == 0 and native["xmm0"] == bytes(16)


def test_generated_code_rebuilds_a_frame_exactly_like_the_python_transfer():
    synthetic = Case(SYNTHETIC_LOCATIONS,
                     _step_plan(cfa_register=RBP, cfa_offset=16, rules=SYNTHETIC_RULES),
                     ["v4", "v0", "v3", "v7", "v1", "v2", "v5", "v6"])
    empty = Case([], _step_plan(), [])
    # Case 0 missing, case 1 the synthetic frame, case 2 an empty RSP-based one.
    out = run_child(equivalence_scenario, [None, synthetic, empty])
    E = out["E"]
    _same_as_reference(out[1])
    got = out[1]["native"]
    assert got["state"][0] == 0x4242                        # RAX: the call's result
    # live = v4 (RSP = E), v0, v3 (RBX), v7, v1, v2 (a byte), v5 (RBP + 16), v6 (-1).
    assert got["state"][1:] == [E, 0x1122334455667788, 0x1111, 0x8000000000000001,
                                0xDEADBEEF, 0x9C, E + 80, 2 ** 64 - 1]
    assert got["regs"] == {RBX: 0xCA11E4B8, RBP: 0xCA11E4B9, R12: E + 80 + 8, R13: 0x1414,
                           R14: 0x1414, R15: 0x1515}
    assert got["rsp"] == E + 80 - 8
    # The empty RSP-based frame: CFA = E + 32, callee-saved registers its own.
    _same_as_reference(out[2])
    assert out[2]["native"]["rsp"] == E + 24 and out[2]["native"]["state"] == [0x4242]
    assert out[2]["native"]["regs"][R14] == 0x1414


def test_generated_code_and_the_python_transfer_agree_on_every_frame_map_of_a_version():
    rng = random.Random(20261203)
    cases = [random_case(rng) for _ in range(60)]
    # Frame maps that get no native case, between the others: the Python
    # transfer refuses the first three and rebuilds the last one.
    refused = [Case([Location(K.REGISTER, 8, RCX, 0)], _step_plan(), ["v0"]),
               Case([], _step_plan(rules={RA: (OP_LOAD, -16)}), []),
               Case([], None, []),
               Case([Location(K.INDIRECT, 0, RSP, 8)], _step_plan(), ["v0"])]
    for i, case in enumerate(refused):
        cases.insert(7 * i + 3, case)
    out = run_child(equivalence_scenario, cases)
    for k, case in enumerate(cases):
        got = out[k]
        if case in refused:
            assert got["native"] is None and got["native_error"]
            continue
        assert got["native_error"] is None, (k, got["native_error"])
        _same_as_reference(got)
    ref_of = [out[cases.index(c)]["ref"] for c in refused]
    assert "not known at the return address" in ref_of[0]
    assert "not at CFA - 8" in ref_of[1]
    assert "no unwind row" in ref_of[2]
    assert ref_of[3]["state"][1:] == [0]                   # a 0-byte value reads as 0


# --------------------------------------------------------------------------
# The dispatcher and a thread's LIFO
# --------------------------------------------------------------------------

class FakeRecord:
    def __init__(self, slot, original_ra):
        self.slot, self.original_ra = slot, original_ra


def dispatcher_scenario():
    """Drive the dispatcher on a synthetic thread block; report what it did."""
    from jitutil import load_ir, target_machine
    from deopt.stub import ExitState

    tm = target_machine()
    empty = plan_frame(_frame_map([]), FakeSpace(_step_plan()))
    vt = load_ir(ntx.version_transfer_ir("vt", [empty]), ["vt"])
    disp = load_ir(ntx.dispatch_module_ir(tm.triple), [ntx.DISPATCH_SYMBOL])
    dispatch = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p)(disp.addresses[ntx.DISPATCH_SYMBOL])
    target = ntx.Target(0xFEED, 3, ())
    descs = (ntx.Descriptor * 2)()
    descs[0].code, descs[0].index, descs[0].target = vt.addresses["vt"], 0, target.address
    descs[1].code, descs[1].index, descs[1].target = vt.addresses["vt"], 0, 0   # no target
    d0, d1 = ctypes.addressof(descs[0]), ctypes.addressof(descs[1])
    stacks = [(ctypes.c_uint64 * 32)() for _ in range(4)]
    exits = [ctypes.addressof(s) for s in stacks]            # ExitState at each start
    slots = [e + ExitState.slot.offset for e in exits]
    stub = 0x5700
    for s in slots:
        ctypes.c_uint64.from_address(s).value = stub
    status = ctypes.c_int64(4)
    lifo = ntx.ThreadLifo()
    records = [FakeRecord(slots[i], 0xA000 + i) for i in range(4)]
    # commit() sorts by slot (highest first); reorder imposes this order instead.
    for r, d in zip(records, (d0, d0, d1, d0)):
        lifo.push(r, d)
    order = [records[1].slot, records[0].slot, records[2].slot, records[3].slot]  # top: [3]
    lifo.commit(lambda entries: sorted(entries, key=lambda e: order.index(e[0])))
    out = {"top0": lifo.block.top}

    def call(i):
        plan = dispatch(exits[i], lifo.address, ctypes.addressof(status))
        b = lifo.block
        return {"plan": plan, "slot": ctypes.c_uint64.from_address(slots[i]).value,
                "top": b.top, "searches": b.searches, "misses": b.misses, "handed": b.handed}

    out["top_hit"] = call(3)                       # entries[top - 1]
    out["search_hit"] = call(0)                    # below the top: searched
    out["again"] = call(3)                         # already taken: a miss
    out["handed"] = call(2)                        # no target: to Python, slot untouched
    out["last"] = call(1)
    ra_of = {r.slot: r.original_ra for r in records}
    out["drain"] = [[ra_of[slot] for slot in part] for part in lifo.drain()]
    out["block_plan"] = ctypes.addressof(lifo.block.plan)
    out["plan_status"] = lifo.block.plan.status_ptr
    out["status_address"] = ctypes.addressof(status)
    out["rip"] = lifo.block.plan.rip
    out["null_block"] = dispatch(exits[0], None, ctypes.addressof(status))
    del vt, disp
    return out


def test_dispatcher_takes_the_top_searches_below_and_leaves_misses_to_python():
    out = run_child(dispatcher_scenario)
    plan = out["block_plan"]
    assert out["top0"] == 4
    top = out["top_hit"]
    assert top["plan"] == plan and top["slot"] == 0xA003 and top["top"] == 3
    assert top["searches"] == 0
    hit = out["search_hit"]
    assert hit["plan"] == plan and hit["slot"] == 0xA000 and hit["searches"] == 1
    assert hit["top"] == 3                         # a hole below the top stays
    again = out["again"]
    assert again["plan"] is None and again["misses"] == 1 and again["slot"] == 0xA003
    handed = out["handed"]
    assert handed["plan"] is None and handed["handed"] == 1 and handed["slot"] == 0x5700
    assert handed["top"] == 1                      # popped, and the taken hole below it
    last = out["last"]
    assert last["plan"] == plan and last["slot"] == 0xA001 and last["top"] == 0
    # Taken and handed, in LIFO order (bottom first).
    assert out["drain"] == [[0xA001, 0xA000, 0xA003], [0xA002]]
    assert out["plan_status"] == out["status_address"] and out["rip"] == 0xFEED
    assert out["null_block"] is None


# --------------------------------------------------------------------------
# Whole replacements with the native transfer
# --------------------------------------------------------------------------

def _all_native(stats):
    """Every hijacked frame was rebuilt by the native transfer; nothing is left."""
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0, stats
    assert stats["transfers"] == stats["hijacks"] == stats["native_transfers"] > 0, stats
    assert stats["python_transfers"] == 0 and stats["native_unsupported"] == 0, stats
    assert stats["lifo_misses"] == stats["native_handed"] == 0, stats


def native_sum_scenario(depth, reorder=None, walker="fast"):
    """sum(depth) replaced at its deepest frame; LIFO facts seen from the hook."""
    import osrjit
    out = {}
    with osrjit.Runtime(transfer="native", walker=walker) as rt:
        rt.compile(SUM_V1)
        v1 = rt.current("sum")
        ntx_path = rt.native_backend.deopt.native
        if reorder == "reversed":
            ntx_path.reorder = lambda entries: entries[::-1]
        elif reorder == "drop-every-third":
            ntx_path.reorder = lambda entries: [e for i, e in enumerate(entries) if i % 3]

        def on_hook(_):
            if "during" not in out:
                rt.replace("sum", SUM_V2)
                lifo = ntx_path.lifo_of(rt.native_backend.registry.current())
                slots = [slot for slot, _ra, _desc in lifo.entries()]
                out["lifo"] = (lifo.block.top, len(slots),
                               slots == sorted(slots, reverse=True))
                out["during"] = rt.stats()
                out["code_during"] = ntx_path.has_code(v1)
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("sum")(depth)
        out["after"] = rt.stats()
        out["v1_loaded"] = v1.loaded
        out["code_after"] = ntx_path.has_code(v1)
        out["error"] = repr(rt.last_transfer_error)
    return out


@pytest.mark.parametrize("walker", ["fast", "reference"])
def test_sum_at_depth_1000_returns_through_1001_native_transfers(walker):
    # walker="fast": the replacing thread's own frames (below the hook's
    # anchor) are found, hijacked and pushed by the native scan.
    out = run_child(native_sum_scenario, 1000, None, walker)
    assert out["result"] == 1000 * 1001, out["error"]
    assert out["lifo"] == (1001, 1001, True)      # one entry per frame, innermost on top
    assert out["during"]["pending_returns"] == 1001 and out["code_during"]
    _all_native(out["after"])
    assert out["after"]["transfers"] == 1001 and out["after"]["lifo_searches"] == 0
    assert out["after"]["freed_versions"] == 1 and out["after"]["live_versions"] == {"sum": 1}
    assert not out["v1_loaded"] and not out["code_after"]      # v1 and its transfer code freed


def test_a_lifo_out_of_order_is_searched():
    out = run_child(native_sum_scenario, 1000, "reversed")
    assert out["result"] == 1000 * 1001, out["error"]
    after = out["after"]
    _all_native(after)
    # Outermost on top: every lookup but the last one (the outermost frame,
    # alone at the end) searches below the top.
    assert after["lifo_searches"] == 1000
    assert not out["v1_loaded"]


@pytest.mark.parametrize("walker", ["fast", "reference"])
def test_frames_missing_from_the_lifo_take_the_python_transfer_counted(walker):
    # walker="fast": the Python transfer takes records made lazily from a batch.
    out = run_child(native_sum_scenario, 1000, "drop-every-third", walker)
    assert out["result"] == 1000 * 1001, out["error"]
    after = out["after"]
    dropped = len(range(0, 1001, 3))
    assert after["pending_returns"] == 0 and after["transfer_failures"] == 0
    assert after["transfers"] == after["hijacks"] == 1001
    assert after["python_transfers"] == after["lifo_misses"] == dropped
    assert after["native_transfers"] == 1001 - dropped
    assert not out["v1_loaded"]


@pytest.mark.parametrize("replace_at", [1, 17, 55])
def test_fibonacci_replaced_mid_tree_transfers_natively(replace_at):
    result, stats = run_child(fib_scenario, 15, replace_at, "slot", "native")
    assert result == fib_mixed_reference(15, replace_at)
    _all_native(stats)
    assert stats["live_versions"] == {"fib": 1} and stats["freed_versions"] == 1


@pytest.mark.parametrize("which", ["both", "odd"])
def test_mutual_recursion_transfers_natively(which):
    result, stats, again, _ = run_child(even_odd_scenario, 40, which, "slot", "native")
    assert result == again == 1 + 100 * 20 + (10 * 20 if which == "both" else 0)
    _all_native(stats)
    assert stats["freed_versions"] == (2 if which == "both" else 1)


def chained_targets_scenario(depth):
    """v1 -> v2 -> v3 with frames of v1 pending: their targets follow the current version."""
    import osrjit
    out = {}
    with osrjit.Runtime(transfer="native") as rt:
        rt.compile(CHAIN.format(k=1))
        v1 = rt.current("sum")
        ntx_path = rt.native_backend.deopt.native

        def targets(v):
            vt = ntx_path._versions[v.id]
            return {t.resume_entry for t in vt.targets if t is not None}

        def on_hook(n):
            if n == 60:
                rt.replace("sum", CHAIN.format(k=2))
                out["v1_targets_v2"] = targets(v1) == {rt.current("sum").resume_entry}
            elif n == 30:
                v2 = out["v2"] = rt.current("sum")
                rt.replace("sum", CHAIN.format(k=3))
                v3 = rt.current("sum")
                out["retargeted"] = (targets(v1) == {v3.resume_entry},
                                     targets(v2) == {v3.resume_entry})
                out["during"] = rt.stats()
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("sum")(depth)
        out["after"] = rt.stats()
        out["loaded"] = (v1.loaded, out.pop("v2").loaded)
        out["codes_left"] = len(ntx_path._versions)
    return out


def test_chained_versions_retarget_native_frames_to_the_newest():
    out = run_child(chained_targets_scenario, 100)
    assert out["result"] == 3 * 100 * 101 // 2            # every frame ends in v3
    assert out["v1_targets_v2"] and out["retargeted"] == (True, True)
    assert out["during"]["hijacks"] == 72 and out["during"]["pending_returns"] == 71
    _all_native(out["after"])
    assert out["after"]["transfers"] == 72 and out["after"]["freed_versions"] == 2
    assert out["loaded"] == (False, False) and out["codes_left"] == 0


def test_loop_osr_at_a_poll_transfers_natively():
    n, at_poll = 100, 11
    result, polls, stats = run_child(loop_osr_scenario, n, at_poll, "native")
    switched = at_poll - 1
    assert result == sum(range(switched)) + sum(2 * i for i in range(switched, n))
    _all_native(stats)
    assert stats["transfers"] == 1 and stats["freed_versions"] == 1


REDEFINED_WITHOUT_THE_CALL = """
def sum(n):
    return hook(n)
"""


def lost_site_scenario(depth, transfer):
    """compile() redefines sum without its recursive call while frames are hijacked:
    they have no resume target and return into their old code (both transfers)."""
    import osrjit
    out = {}
    with osrjit.Runtime(transfer=transfer) as rt:
        rt.compile(SUM_V1)
        v1 = rt.current("sum")
        calls = [0]

        def on_hook(_):
            calls[0] += 1
            if calls[0] == 1:
                rt.replace("sum", SUM_V2)
                rt.compile(REDEFINED_WITHOUT_THE_CALL)
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("sum")(depth)
        out["stats"] = rt.stats()
        out["v1_loaded"] = v1.loaded
        out["error"] = type(rt.last_transfer_error).__name__
    return out


def test_a_frame_without_a_native_target_is_handed_to_python_like_the_python_transfer():
    native = run_child(lost_site_scenario, 50, "native")
    python = run_child(lost_site_scenario, 50, "python")
    # The v1 frames at the recursive call have no site in the newest version:
    # they return into v1 (n + ...); the innermost, at its hook, resumes.
    assert native["result"] == python["result"] == 50 * 51 // 2
    for out in (native, python):
        s = out["stats"]
        assert s["transfer_failures"] == 50 and s["transfers"] == 1 and s["pending_returns"] == 0
        assert out["v1_loaded"] and out["error"] == "TransferError"    # pinned: frames ran it
    s = native["stats"]
    assert s["native_transfers"] == 1 and s["python_transfers"] == 0
    assert s["native_handed"] == 50 and s["lifo_misses"] == 0


def unsupported_scenario(depth):
    """Frame maps of hook sites get no native case: those frames take the Python transfer."""
    import dataclasses
    from osrjit.abi import SiteKind
    real = frame_plan.plan_frame

    def no_hooks(fm, space):
        plan = real(fm, space)
        if fm.kind is SiteKind.HOOK:
            return dataclasses.replace(plan, native_error="test: no hook sites")
        return plan

    frame_plan.plan_frame = no_hooks
    try:
        out = native_sum_scenario(depth)
    finally:
        frame_plan.plan_frame = real
    return out


def test_frames_the_native_transfer_cannot_express_take_the_python_transfer():
    out = run_child(unsupported_scenario, 200)
    assert out["result"] == 200 * 201, out["error"]
    s = out["after"]
    assert s["transfers"] == s["hijacks"] == 201 and s["pending_returns"] == 0
    assert s["native_unsupported"] == s["python_transfers"] == 1        # sum(0), at its hook
    assert s["native_transfers"] == 200 and not out["v1_loaded"]


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------

def test_four_threads_sixty_replacements_native():
    results, errors, stats, depths = run_child(workers_scenario, 4, 1000, 60, 1, "native",
                                               timeout=600)
    assert not errors and results
    assert all(d <= r <= 2 * d for d, r in results)
    _all_native(stats)
    assert stats["live_versions"] == {"pause": 1, "work": 1}
    assert stats["freed_versions"] == 60 and stats["stops"] - stats["reclaim_stops"] == 60


# Like scenarios_native.WORK, with a short loop at the bottom: threads spend most
# of their time unwinding (through native transfers once a replacement hijacked
# their frames), where there is no poll. drive() stays in JIT code (no GIL
# round trip per call) and counts the results that mixed two versions; a
# result outside [n, 2n] makes it return -1.
UNWIND = """
def work(n):
    if n == 0:
        return pause(100)
    return {k} + work(n - 1)
"""
DRIVE = """
def drive(n, reps):
    mixed = 0
    i = 0
    while i < reps:
        r = work(n)
        if r < n or r > 2 * n:
            return -1
        if r != n and r != 2 * n:
            mixed = mixed + 1
        i = i + 1
    return mixed
"""


def unwinding_threads_scenario(n_threads, depth, replacements, seed, grace):
    """Threads recurse and unwind through native transfers while the main thread
    replaces their function; a short grace sends the signal while they unwind
    (no polls there), so stops land in stubs, transfers and resume entries.
    Returns ``[(depth, mixed results or -1)]`` per drive() call, errors, stats."""
    import osrjit
    results, errors = [], []
    stop = threading.Event()
    with osrjit.Runtime(transfer="native") as rt:
        rt.compile(PAUSE + UNWIND.format(k=1))
        rt.compile(DRIVE)
        rt.native_backend.world.grace = grace
        drive = rt.function("drive")

        def worker(d):
            try:
                while not stop.is_set():
                    results.append((d, drive(d, 20)))
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        threading.stack_size(64 << 20)
        rng = random.Random(seed)
        depths = [rng.randint(depth, 3 * depth) for _ in range(n_threads)]
        ts = [threading.Thread(target=worker, args=(d,)) for d in depths]
        for t in ts:
            t.start()
        time.sleep(0.05)
        for i in range(replacements):
            rt.replace("work", UNWIND.format(k=2 if i % 2 == 0 else 1))
            time.sleep(rng.random() * 0.002)
        stop.set()
        for t in ts:
            t.join()
        stats = rt.stats()
        # A version a signal-stopped thread was executing (e.g. in a resume
        # entry, outside any site) is freed by the next scan.
        rt.collect()
        final = rt.stats()
        lifos_left = rt.native_backend.deopt.native.thread_lifos       # threads exited: LIFOs freed
    return results, errors, stats, final, lifos_left


def test_threads_stopped_while_unwinding_through_native_transfers():
    results, errors, stats, final, lifos_left = run_child(unwinding_threads_scenario, 3, 5000,
                                                          30, 3, 0.0, timeout=600)
    assert not errors and results
    assert all(m >= 0 for _, m in results)              # every result in [n, 2n]
    # Stops caught threads half-way through unwinding: frames of one call
    # finished in two versions.
    assert sum(m for _, m in results) > 0, (len(results), stats)
    assert stats["signals_sent"] > 0
    _all_native(stats)
    assert final["live_versions"] == {"drive": 1, "pause": 1, "work": 1}
    assert final["freed_versions"] == 30 and lifos_left == 0


def test_the_fast_paths_are_the_default():
    # A deep replace on Runtime() with no options: every frame is rebuilt by
    # the native transfer, none by the reference one.
    result = run_child(default_paths_scenario, 1000)
    assert (result["transfer"], result["walker"]) == ("fast", "fast")
    assert result["native"]
    s = result["stats"]
    assert s["transfers"] == s["native_transfers"] == s["hijacks"] == 1001
    assert s["python_transfers"] == s["lifo_searches"] == s["lifo_misses"] == 0
    assert s["pending_returns"] == 0 and s["live_versions"] == {"sum": 1}
    # The old spellings are aliases of the role names.
    assert result["aliases"] == [("fast", "reference"), ("reference", "fast")]


def default_paths_scenario(depth):
    import osrjit
    aliases = []
    for transfer, walker in (("native", "python"), ("python", "native")):
        with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
            aliases.append((rt.transfer, rt.walker))
    with osrjit.Runtime() as rt:
        rt.compile(SUM_V1)

        def on_hook(_):
            rt.replace("sum", SUM_V2)
            rt.on_hook(lambda x: 0)
            return 0

        rt.on_hook(on_hook)
        rt.function("sum")(depth)
        return {"transfer": rt.transfer, "walker": rt.walker, "aliases": aliases,
                "native": rt.native_backend.deopt.native is not None, "stats": rt.stats()}
