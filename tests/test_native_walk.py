"""The native walker agrees with the Python walker, frame for frame.

* Real stacks: an LLJIT recursion 100 deep (main thread) and 1,000 deep
  (another thread) calls back into Python; from inside the callback both
  walkers go through the JIT frames, libffi, libpython and libc to the
  thread's first frame, and give the same ``(pc, cfa, ra_slot)`` sequence —
  all of it native, no fallback. Hijacking one real return slot with a fake
  stub address is seen through by both.
  Whole tables made up front walk the same stack in one native call.
* Compiled tables from hand-written ``.eh_frame`` bytes: rows, a gap between
  FDEs, an expression row, a signal frame, merging across FDEs; a growing
  table (found through ``.eh_frame_hdr``) compiles one FDE region at a time
  and ends up equal to the whole table.
* A synthetic stack in a ctypes buffer over those FDEs: expression rows and
  gaps fall back to the Python walker (counted), a hijacked slot is
  translated, a signal frame's caller is looked up at its exact pc, and every
  way a walk ends matches; a module the space finds later joins the native
  walk, a removed one leaves it, and four threads growing the same tables
  get the same frames.

Native scenarios run in child processes (``childproc.run_child``).
"""
import ctypes

import pytest

from childproc import run_child
from cfibytes import ADDRESS, CIE_ZR, HDR_ADDRESS, TERMINATOR, fde_bytes, hdr_bytes
from scenarios_ir import RECURSION_IR

from unwinder import AddressSpace, ProcessMemory, UnwindError, walk
from unwinder.cfi import EhFrame, EhFrameHdr
from unwinder.modules import Module
from unwinder.native import (RULE_GAP, RULE_PYTHON, RULE_SIGNAL, RULE_UNKNOWN, UNDEFINED_CODE,
                             EndReason, ModuleTable, NativeWalkerError,
                             NativeRule, ReturnAddressTable, TableRow, compile_module_table,
                             encode_row)
from unwinder.rules import CFARule, RegRule, RuleKind, UnwindRow
from unwinder.walk import (END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO, END_STEP_LIMIT,
                           FALLBACK_FRAME_POINTER)
from unwinder.x86_64 import R12, RA, RBP, RBX, RSP


def frame_key(f):
    """What both walkers must agree on for one frame."""
    return (f.pc, f.cfa, f.ra_slot, f.lookup_pc, f.end_reason, f.module, f.is_signal_frame,
            f.stored_pc, f.fallback)


# ---------------------------------------------------------------------------
# Real stacks: LLJIT recursion -> Python callback -> walk
# ---------------------------------------------------------------------------

def real_stack_scenario(depths):
    import threading
    import unwinder
    from jitutil import load_ir
    from unwinder.native import NativeWalker, OutFrame, stack_bounds_of, state_from_regs
    space = unwinder.AddressSpace.current_process()
    loaded = load_ir(RECURSION_IR, ["rec"], space=space, name="jit:rec")
    walker = NativeWalker(space)
    results = {}
    current = {}

    @ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    def callback(_):
        def inside(regs):
            py = list(walk(regs, ProcessMemory(), space, caller_frame=True))
            before = walker.fallbacks
            native = walker.walk(regs, innermost_is_caller=True)
            arrays = walker.walk_arrays(regs, innermost_is_caller=True)
            # 64 frames per native call: the walk resumes across calls.
            chunked = NativeWalker(space, chunk_frames=64).walk(regs, innermost_is_caller=True)
            r = {"python": [frame_key(f) for f in py], "native": [frame_key(f) for f in native],
                 "fallbacks": walker.fallbacks - before,
                 "chunked": [frame_key(f) for f in chunked],
                 "symbols": [f.symbol for f in native[-3:]],
                 "all_native": all(f.native for f in native),
                 "arrays": (list(arrays.pcs), list(arrays.cfas), list(arrays.ra_slots),
                            arrays.end_reason, arrays.python)}
            # walk_out: the same frames as walk_raw, in the walker's buffer.
            bounds = stack_bounds_of(regs[RSP])
            wo = walker.walk_out(regs, innermost_is_caller=True, stack_bounds=bounds)
            raw, end = walker.walk_raw(regs, innermost_is_caller=True, stack_bounds=bounds)
            r["walk_out"] = (wo is not None and ctypes.string_at(wo[0], 32 * wo[1]) == raw,
                             wo and wo[2] == end, wo and wo[1])
            # The raw entry point alone, tables now compiled: one call does it all.
            state = state_from_regs(regs, innermost_is_caller=True)
            out = (OutFrame * (len(py) + 8))()
            n = walker.call_native(state, out, len(out), stack_bounds_of(regs[RSP]))
            r["raw"] = (n, EndReason(state.end_reason).name,
                        [(out[i].pc, out[i].cfa, out[i].ra_slot) for i in range(n)])
            # Hijack the return slot of the 11th JIT frame from the innermost
            # with a fake stub address (a pc in no module), walk, and put the
            # original back before anything can return through it.
            jit = [f for f in py if f.module == "jit:rec"]
            victim = jit[10]
            mem = ProcessMemory()
            original = mem.read_u64(victim.ra_slot)
            stub = ctypes.addressof(fake_stub)
            table = ReturnAddressTable(stub)
            table.set(victim.ra_slot, original)
            space.add_return_address_filter(table.translate)
            mem.write_u64(victim.ra_slot, stub)
            try:
                py_h = list(walk(regs, ProcessMemory(), space, caller_frame=True))
                native_h = walker.walk(regs, innermost_is_caller=True, translation=table)
                untranslated = walker.walk(regs, innermost_is_caller=True, max_frames=len(py))
            finally:
                mem.write_u64(victim.ra_slot, original)
                space.remove_return_address_filter(table.translate)
                wo = walker.walk_out(regs, innermost_is_caller=True, stack_bounds=bounds,
                                     translation=table)
                raw_h, _ = walker.walk_raw(regs, innermost_is_caller=True,
                                           stack_bounds=bounds, translation=table)
                r["walk_out_hijacked"] = ctypes.string_at(wo[0], 32 * wo[1]) == raw_h
            r["hijacked"] = {"python": [frame_key(f) for f in py_h],
                             "native": [frame_key(f) for f in native_h],
                             "victim_index": py.index(victim), "stub": stub, "original": original,
                             "untranslated_pcs": [f.pc for f in untranslated]}
            results[current["depth"]] = r
            if current["depth"] == 1000:
                # Whole tables for the modules on this stack, made up front:
                # the raw entry point needs no Python at all.
                fresh = NativeWalker(space)
                fresh.prepare({f.module_ref for f in native})
                state = state_from_regs(regs, innermost_is_caller=True)
                n = fresh.call_native(state, out, len(out), stack_bounds_of(regs[RSP]))
                results["prepared"] = (
                    n, EndReason(state.end_reason).name,
                    [(out[i].pc, out[i].cfa, out[i].ra_slot) for i in range(n)],
                    {m.name: (t.stats.fdes,) for m, t in fresh.tables.items()})
        unwinder.with_captured_registers(inside)
        return 0

    fake_stub = ctypes.create_string_buffer(16)
    rec = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(loaded.addresses["rec"])
    for depth, in_thread in depths:
        current["depth"] = depth
        if in_thread:
            t = threading.Thread(target=rec, args=(depth, ctypes.cast(callback, ctypes.c_void_p)))
            t.start()
            t.join()
        else:
            rec(depth, ctypes.cast(callback, ctypes.c_void_p))
    results["compiled"] = {m.name: (t.stats.growing, t.stats.regions, t.stats.fdes)
                           for m, t in walker.tables.items()}
    return results


@pytest.fixture(scope="module")
def real_stacks():
    return run_child(real_stack_scenario, [(100, False), (1000, True)])


@pytest.mark.parametrize("depth", [100, 1000])
def test_native_walk_equals_python_walk_through_jit_libpython_and_libc(real_stacks, depth):
    r = real_stacks[depth]
    assert r["native"] == r["python"] == r["chunked"]
    frames = r["native"]
    assert sum(1 for f in frames if f[5] == "jit:rec") == depth + 1
    assert frames[-1][4] == END_RA_UNDEFINED              # the thread's first frame
    assert all(f[4] is None for f in frames[:-1])
    if depth == 100:                                      # main thread: down to _start
        assert r["symbols"][-1] == "_start"
    else:                                                 # another thread: clone3 in libc
        assert all("libc.so" in (f[5] or "") for f in frames[-2:])
    modules = {f[5] for f in frames}
    assert any("libpython" in (m or "") for m in modules)
    assert any("libffi" in (m or "") for m in modules)
    assert r["all_native"] and r["fallbacks"] == 0
    pcs, cfas, slots, end, python = r["arrays"]
    assert pcs == [f[0] for f in frames] and cfas == [f[1] for f in frames]
    assert slots == [f[2] or 0 for f in frames] and end == END_RA_UNDEFINED and python == ()


@pytest.mark.parametrize("depth", [100, 1000])
def test_raw_entry_point_walks_the_whole_stack_in_one_call(real_stacks, depth):
    r = real_stacks[depth]
    n, reason, frames = r["raw"]
    assert reason == "RA_UNDEFINED"
    assert frames == [(f[0], f[1], f[2] or 0) for f in r["python"]]


@pytest.mark.parametrize("depth", [100, 1000])
def test_walk_out_gives_walk_raw_frames_without_a_copy(real_stacks, depth):
    r = real_stacks[depth]
    same, same_end, n = r["walk_out"]
    assert same and same_end and n == len(r["python"])
    assert r["walk_out_hijacked"]                 # through the translation table too


@pytest.mark.parametrize("depth", [100, 1000])
def test_hijacked_real_slot_is_translated(real_stacks, depth):
    h = real_stacks[depth]["hijacked"]
    assert h["native"] == h["python"]
    k = h["victim_index"] + 1                  # the frame whose pc the slot holds
    assert h["native"][k][0] == h["original"] and h["native"][k][7] == h["stub"]
    assert [f[0] for f in h["native"]] == [f[0] for f in real_stacks[depth]["native"]]
    assert h["untranslated_pcs"][k] == h["stub"]  # without the table the stub shows


def test_only_the_fdes_walks_reach_are_compiled(real_stacks):
    compiled = real_stacks["compiled"]
    growing, regions, fdes = next(v for k, v in compiled.items() if "libc.so" in k)
    assert growing and 0 < fdes <= regions < 50      # of libc's 3,713 FDEs
    assert compiled["jit:rec"][:2] == (False, 1)      # a JIT object: compiled whole


def test_whole_tables_walk_the_same_stack(real_stacks):
    n, reason, frames, whole = real_stacks["prepared"]
    assert reason == "RA_UNDEFINED" and frames == real_stacks[1000]["raw"][2]
    libc = next(v for k, v in whole.items() if "libc.so" in k)
    assert libc[0] > 3000                              # every FDE of libc


# ---------------------------------------------------------------------------
# Hand-written .eh_frame: compiled rows
# ---------------------------------------------------------------------------

CODE = 0x10000
#: A second CIE, like CIE_ZR but with augmentation "zRS": its FDEs are signal frames.
CIE_ZRS = (
    b"\x14\x00\x00\x00"  # length: 20 bytes follow
    b"\x00\x00\x00\x00"  # CIE_id: 0
    b"\x01"              # version: 1
    b"zRS\x00"           # augmentation: "zRS" (S: signal frame)
    b"\x01"              # code_alignment_factor: 1
    b"\x78"              # data_alignment_factor: -8
    b"\x10"              # return_address_register: 16
    b"\x01"              # augmentation data length: 1
    b"\x1b"              # 'R': DW_EH_PE_pcrel|DW_EH_PE_sdata4
    b"\x0c\x07\x08"      # DW_CFA_def_cfa: rsp+8
    b"\x90\x01"          # DW_CFA_offset: ra at cfa-8
    b"\x00"              # DW_CFA_nop
)
assert len(CIE_ZRS) == 24

# (pc_begin - module base, instructions, signal CIE?) — every FDE is 0x100 bytes long.
HAND_FDES = [
    # A: a normal prologue. [+0, +1): CFA=rsp+8; [+1, +0x100): CFA=rsp+16, rbp at cfa-16.
    (0x000, b"\x41"                 # DW_CFA_advance_loc: 1
                   b"\x0e\x10"      # DW_CFA_def_cfa_offset: 16
                   b"\x86\x02", False),  # DW_CFA_offset: rbp at cfa-16
    # (gap: CODE+0x100 .. CODE+0x200 has no FDE)
    # B: CFA by expression: DW_OP_breg7 (rsp) +16.
    (0x200, b"\x0f\x02\x77\x10", False),  # DW_CFA_def_cfa_expression, 2 bytes
    # C and D: identical rules, adjacent: one merged row.
    (0x300, b"\x0e\x20"             # DW_CFA_def_cfa_offset: 32
                   b"\x83\x02"      # DW_CFA_offset: rbx at cfa-16
                   b"\x8c\x03", False),  # DW_CFA_offset: r12 at cfa-24
    (0x400, b"\x0e\x20\x83\x02\x8c\x03", False),
    # (gap: CODE+0x500 .. CODE+0x600)
    # E: a signal frame (CIE "zRS"): CFA=rsp+16, ra at cfa-8.
    (0x600, b"\x0e\x10", True),
    # F: a frame-pointer function: CFA=rbp+16, rbp at cfa-16.
    (0x700, b"\x0c\x06\x10"         # DW_CFA_def_cfa: rbp+16
                   b"\x86\x02", False),  # DW_CFA_offset: rbp at cfa-16
]
CODE_END = CODE + 0x900


def hand_eh_frame(base=CODE, with_hdr=False):
    """CIE_ZR at 0, FDEs A-D and F, then CIE_ZRS and FDE E, then the terminator,
    for code at ``base``; with an ``.eh_frame_hdr`` search table if ``with_hdr``."""
    image = bytearray(CIE_ZR)
    signal_fdes = []
    hdr_entries = []
    for offset, instructions, signal in HAND_FDES:
        pc = base + offset
        if signal:
            signal_fdes.append((pc, instructions))
            continue
        hdr_entries.append((pc, len(image)))
        image += fde_bytes(len(image), instructions, pc_begin=pc)
    zrs = len(image)
    image += CIE_ZRS
    for pc, instructions in signal_fdes:
        hdr_entries.append((pc, len(image)))
        image += fde_bytes(len(image), instructions, pc_begin=pc, cie_offset=zrs)
    image += TERMINATOR
    hdr = EhFrameHdr(hdr_bytes(sorted(hdr_entries)), HDR_ADDRESS) if with_hdr else None
    return EhFrame(bytes(image), ADDRESS, hdr=hdr)


class HandModule(Module):
    """A module at ``base`` (CODE..CODE_END by default) whose FDEs are the
    hand-written ones (no code bytes). With ``with_hdr`` its FDEs are found
    through an ``.eh_frame_hdr`` table, so the native walker gives it a
    growing table."""

    def __init__(self, with_hdr=False, *, base=CODE, name="hand"):
        self.name = name
        self.ranges = ((base, base + CODE_END - CODE),)
        self._eh = hand_eh_frame(base, with_hdr)

    def eh_frame(self):
        return self._eh

    def find_fde(self, pc):
        return self._eh.find_fde(pc)

    def _symbol_table(self):
        return [], [], []


SAME, UNDEF = 0, UNDEFINED_CODE


def rule(cfa_register, cfa_offset, *, ra=-1, rbx=SAME, rbp=SAME, r12=SAME, flags=0):
    return NativeRule(flags, cfa_register, cfa_offset, (ra, rbx, rbp, r12, SAME, SAME, SAME))


GAP = NativeRule(RULE_GAP)
PYTHON = NativeRule(RULE_PYTHON)


def test_hand_written_fdes_compile_to_rows_with_gaps_and_fallbacks():
    table = compile_module_table(HandModule())
    assert table.rows() == [
        TableRow(CODE + 0x000, rule(RSP, 8)),
        TableRow(CODE + 0x001, rule(RSP, 16, rbp=-2)),
        TableRow(CODE + 0x100, GAP),                       # between A and B
        TableRow(CODE + 0x200, PYTHON),                    # B: CFA expression
        TableRow(CODE + 0x300, rule(RSP, 32, rbx=-2, r12=-3)),  # C and D merged
        TableRow(CODE + 0x500, GAP),
        TableRow(CODE + 0x600, rule(RSP, 16, flags=RULE_SIGNAL)),
        TableRow(CODE + 0x700, rule(RBP, 16, rbp=-2)),
        TableRow(CODE + 0x800, GAP),                       # after the last FDE
    ]
    stats = table.stats
    assert not stats.growing
    assert (stats.regions, stats.fdes, stats.source_rows, stats.rows) == (6, 6, 7, 9)
    assert (stats.python_rows, stats.gap_rows, stats.errors) == (1, 3, ())
    assert stats.bytes == 9 * 24
    assert table.rule_for(CODE + 0x1FF).is_gap and table.rule_for(CODE - 1) is None
    assert table.rule_for(CODE + 0x4FF).ra_offset == -8
    assert table.rule_for(CODE + 0x250).needs_python


UNKNOWN = NativeRule(RULE_UNKNOWN)


def test_growing_table_compiles_the_region_around_a_pc():
    table = ModuleTable.for_module(HandModule(with_hdr=True))
    assert table.growing and table.rows() == [TableRow(0, UNKNOWN)]
    table.grow(CODE + 0x310)                     # C's region: [C, D)
    assert table.rows() == [TableRow(0, UNKNOWN),
                            TableRow(CODE + 0x300, rule(RSP, 32, rbx=-2, r12=-3)),
                            TableRow(CODE + 0x400, UNKNOWN)]
    table.grow(CODE + 0x150)                     # A's region [A, B): A's rows, then a gap
    assert table.rows() == [TableRow(0, UNKNOWN),
                            TableRow(CODE + 0x000, rule(RSP, 8)),
                            TableRow(CODE + 0x001, rule(RSP, 16, rbp=-2)),
                            TableRow(CODE + 0x100, GAP),
                            TableRow(CODE + 0x200, UNKNOWN),
                            TableRow(CODE + 0x300, rule(RSP, 32, rbx=-2, r12=-3)),
                            TableRow(CODE + 0x400, UNKNOWN)]
    assert table.grow(CODE + 0x20) == []         # already known: nothing replaced
    table.grow(CODE - 5)                         # below the first entry: no FDE
    assert table.rows()[0] == TableRow(0, GAP)
    assert (table.stats.regions, table.stats.fdes) == (3, 2)


def test_growing_table_ends_up_equal_to_the_whole_table():
    whole = compile_module_table(HandModule())
    growing = ModuleTable.for_module(HandModule(with_hdr=True))
    for pc in range(CODE - 0x10, CODE_END + 0x10, 0x8):
        growing.grow(pc)
        assert growing.rule_for(pc) == (whole.rule_for(pc) or GAP), hex(pc)
    assert not any(r.rule.is_unknown for r in growing.rows()[:-1])


@pytest.mark.parametrize("cfa, expected", [
    (CFARule(RSP, 16), (0, RSP, 16, (0,) * 7)),
    (CFARule(RBP, -(1 << 31)), (0, RBP, -(1 << 31), (0,) * 7)),
    (CFARule(RSP, 1 << 31), (RULE_PYTHON, 0, 0, (0,) * 7)),         # offset beyond i32
    (CFARule(17, 8), (RULE_PYTHON, 0, 0, (0,) * 7)),                # not a DWARF GPR/RA
    (CFARule(expression=b"\x77\x10"), (RULE_PYTHON, 0, 0, (0,) * 7)),
])
def test_encode_cfa(cfa, expected):
    assert encode_row(UnwindRow(0, 1, cfa, ())) == expected


@pytest.mark.parametrize("reg_rule, expected", [
    (RegRule(RuleKind.OFFSET, -8), -1),
    (RegRule(RuleKind.OFFSET, -1016), -127),
    (RegRule(RuleKind.OFFSET, 1016), 127),
    (RegRule(RuleKind.UNDEFINED), UNDEFINED_CODE),
    (RegRule(RuleKind.SAME_VALUE), 0),
    (RegRule(RuleKind.OFFSET, -1024), None),       # beyond ±127 slots
    (RegRule(RuleKind.OFFSET, -12), None),         # not a whole slot
    (RegRule(RuleKind.OFFSET, 0), None),           # code 0 means "same value"
    (RegRule(RuleKind.VAL_OFFSET, -8), None),
    (RegRule(RuleKind.REGISTER, register=RBP), None),
    (RegRule(RuleKind.EXPRESSION, expression=b"\x77\x00"), None),
])
def test_encode_register_rules(reg_rule, expected):
    encoded = encode_row(UnwindRow(0, 1, CFARule(RSP, 16), ((RBX, reg_rule),)))
    if expected is None:
        assert encoded[0] == RULE_PYTHON
    else:
        assert encoded == (0, RSP, 16, (0, expected, 0, 0, 0, 0, 0))


def test_rules_for_registers_the_walker_does_not_carry_are_ignored():
    # DW_CFA_expression for RAX (as in __restore_rt) does not need Python.
    rax = RegRule(RuleKind.EXPRESSION, expression=b"\x70\x00")       # DW_OP_breg0 0
    row = UnwindRow(0, 1, CFARule(RSP, 16), ((0, rax), (RA, RegRule(RuleKind.OFFSET, -8))))
    assert encode_row(row, is_signal_frame=True) == (RULE_SIGNAL, RSP, 16, (-1, 0, 0, 0, 0, 0, 0))


def test_module_without_eh_frame_is_one_gap():
    class Empty(HandModule):
        def eh_frame(self):
            return None
    assert compile_module_table(Empty()).rows() == [TableRow(0, GAP)]


def test_module_with_a_bad_fde_hands_its_range_to_python():
    class Bad(HandModule):
        def __init__(self):
            super().__init__()
            fde = self._eh.find_fde(CODE + 0x300)
            object.__setattr__(fde, "instructions", b"\x0b")   # restore_state, nothing remembered
            fde.memo.clear()
    table = compile_module_table(Bad())
    assert table.rule_for(CODE + 0x350) == PYTHON
    assert table.rule_for(CODE + 0x450) == rule(RSP, 32, rbx=-2, r12=-3)
    assert len(table.stats.errors) == 1 and "restore_state" in table.stats.errors[0]


def test_bad_input_raises_from_the_unwinder_hierarchy():
    with pytest.raises(NativeWalkerError):
        ReturnAddressTable(0)
    assert issubclass(NativeWalkerError, UnwindError)
    from unwinder.native import NativeWalker, state_from_regs
    from unwinder.native_walker import _check_bounds
    with pytest.raises(NativeWalkerError):
        NativeWalker(AddressSpace(), chunk_frames=0)
    with pytest.raises(NativeWalkerError):
        ReturnAddressTable(STUB, {-8: 1})
    with pytest.raises(NativeWalkerError):
        _check_bounds((10, 5))
    with pytest.raises(NativeWalkerError):
        _check_bounds(None)
    with pytest.raises(UnwindError):
        state_from_regs({RSP: 0x1000})


# ---------------------------------------------------------------------------
# A synthetic stack over the hand-written FDEs (native code: child process)
# ---------------------------------------------------------------------------

STUB = 0xDEAD0000        # a "deopt stub" address: in no module

# pc of each frame -> why it is there
#  0  A+0x10   innermost, exact: CFA=rsp+16, rbp saved at cfa-16
#  1  C+0x11   CFA=rsp+32, rbx at cfa-16, r12 at cfa-24
#  2  B+0x11   CFA by expression                     -> Python fallback
#  3  gap+0x81 no FDE: frame pointers                -> Python fallback
#  4  A+0x21   its return slot holds STUB (hijacked) -> translated to E+0x11
#  5  E+0x11   signal frame: its caller is looked up at its exact pc
#  6  A+0x00   exact lookup: the entry row, CFA=rsp+8
#  7  C+0x11   return address 0: end


def build_stack(base):
    """``(words, regs)``: the stack as {offset from base: u64} and the innermost registers."""
    S = base + 0x100                    # innermost RSP
    R = S + 80                          # frame 3's RBP (saved by frame 0)
    words = {
        0: R, 8: CODE + 0x311,                                   # frame 0 (cfa S+16)
        24: 0x1212, 32: 0xB0B0, 40: CODE + 0x211,                # frame 1 (cfa S+48)
        56: CODE + 0x181,                                        # frame 2 (cfa S+64)
        80: 0xBB00, 88: CODE + 0x021,                            # frame 3 (cfa R+16 = S+96)
        96: 0x5555, 104: STUB,                                   # frame 4 (cfa S+112)
        120: CODE,                                               # frame 5 (cfa S+128)
        128: CODE + 0x311,                                       # frame 6 (cfa S+136)
        144: 0x1313, 152: 0xB1B1, 160: 0,                        # frame 7 (cfa S+168)
    }
    regs = {RA: CODE + 0x10, RSP: S, RBP: 0x4242, RBX: 0x33, R12: 0x44, 13: 0, 14: 0, 15: 0}
    return {0x100 + off: v for off, v in words.items()}, regs


LATE = 0x20000           # where a module appears after the walker was made


def synthetic_scenario():
    import threading
    from unwinder.native import NativeWalker, OutFrame, state_from_regs
    late = HandModule(with_hdr=True, base=LATE, name="late")
    armed, discovered = [], []

    def discover():             # once armed, the space finds "late" on a miss
        if not armed:
            return []
        discovered.append(True)
        return [late]

    space = AddressSpace([HandModule(with_hdr=True)], refresh=discover)  # growing tables
    walker = NativeWalker(space)
    buf = (ctypes.c_uint64 * 128)()
    base = ctypes.addressof(buf)
    bounds = (base, base + ctypes.sizeof(buf))
    words, regs = build_stack(base)
    for off, value in words.items():
        buf[off // 8] = value
    S = regs[RSP]
    table = ReturnAddressTable(STUB)
    table.set(S + 104, CODE + 0x611)
    table.set(S + 4096, 1)                       # other slots do not matter
    space.add_return_address_filter(table.translate)

    def both(r, **kw):
        caller = kw.pop("innermost_is_caller", False)
        py = list(walk(r, ProcessMemory(), space, caller_frame=caller, **kw))
        before = walker.fallbacks
        native = walker.walk(r, innermost_is_caller=caller, stack_bounds=bounds,
                             translation=table, **kw)
        return ([frame_key(f) for f in py], [frame_key(f) for f in native],
                [f.native for f in native], walker.fallbacks - before)

    out = {"S": S, "main": both(regs)}
    out["fallback_reasons"] = dict(walker.fallback_reasons)
    # Frames for the Python walker: walk_out declines (walk_raw does too).
    out["walk_out_declines"] = (
        walker.walk_out(regs, stack_bounds=bounds, translation=table) is None,
        walker.walk_raw(regs, stack_bounds=bounds, translation=table) is None)
    # Tight bounds: reads above them go to the Python walker, same frames.
    before = walker.fallbacks
    tight = walker.walk(regs, stack_bounds=(S, S + 64), translation=table)
    out["tight"] = ([frame_key(f) for f in tight], walker.fallbacks - before)
    out["limit"] = both(regs, max_frames=3)
    # Frame 0 at A's entry (exact): CFA=rsp+8; its caller in F with a small RBP,
    # so F's CFA (rbp+16) lies below: CFA did not increase.
    low = {RA: CODE, RSP: S + 64, RBP: S - 64, RBX: 0, R12: 0, 13: 0, 14: 0, 15: 0}
    buf[(S + 64 - base) // 8] = CODE + 0x711
    out["not_increasing"] = both(low)
    # The same without RBP: F's CFA register is unknown.
    out["cfa_unknown"] = both({k: v for k, v in low.items() if k != RBP})
    # Without the table entry the stub stays (and ends the walk in Python).
    table.discard(S + 104)
    out["no_translation"] = both(regs)
    table.set(S + 104, CODE + 0x611)
    # The raw entry point: stops at the expression row, state = frame 2.
    state = state_from_regs(regs)
    frames = (OutFrame * 16)()
    n = walker.call_native(state, frames, 16, bounds, table)
    out["raw"] = (n, EndReason(state.end_reason).name, state.regs[RA], state.regs[RSP],
                  [(frames[i].pc, frames[i].cfa, frames[i].ra_slot, frames[i].info & 0xFF)
                   for i in range(n)])
    # A fresh walker has no tables: the raw call reports NO_TABLE and module 0.
    fresh = NativeWalker(space)
    state = state_from_regs(regs)
    n = fresh.call_native(state, frames, 16, bounds, table)
    out["fresh"] = (n, EndReason(state.end_reason).name, state.end_module)
    # Empty bounds: nothing can be read.
    state = state_from_regs(regs)
    n = walker.call_native(state, frames, 16, (base, base + 4), table)
    out["empty_bounds"] = (n, EndReason(state.end_reason).name)
    arrays = walker.walk_arrays(regs, stack_bounds=bounds, translation=table)
    out["arrays"] = (list(arrays.pcs), sorted(arrays.translated), arrays.python, arrays.end_reason)

    # A module the walker has never seen: frame 1 and 2 are in "late" (C),
    # frame 2 returns to 0. The native walk runs first, so its Python step
    # is what makes the space discover the module.
    T = base + 0x280
    for off, value in {8: LATE + 0x311, 40: LATE + 0x311, 72: 0}.items():
        buf[(T + off - base) // 8] = value
    late_regs = {RA: CODE + 0x10, RSP: T, RBP: 0, RBX: 0, R12: 0, 13: 0, 14: 0, 15: 0}
    armed.append(True)
    before = walker.fallbacks
    native = walker.walk(late_regs, stack_bounds=bounds)
    py = list(walk(late_regs, ProcessMemory(), space))
    out["late"] = ([frame_key(f) for f in py], [frame_key(f) for f in native],
                   [f.native for f in native], walker.fallbacks - before, len(discovered),
                   sorted(m.name for m in walker.tables))
    # Removing it bumps the space's generation: the walker drops its table.
    space.remove_code_object(late)
    native = walker.walk(late_regs, stack_bounds=bounds)
    py = list(walk(late_regs, ProcessMemory(), space))
    out["removed"] = ([frame_key(f) for f in py], [frame_key(f) for f in native],
                      sorted(m.name for m in walker.tables))

    # Four threads walk at once with a fresh walker, growing its tables concurrently.
    racing = NativeWalker(space)
    results = []

    def run():
        for _ in range(50):
            results.append([frame_key(f) for f in racing.walk(regs, stack_bounds=bounds,
                                                               translation=table)])
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["racing"] = (len(results), all(r == out["main"][0] for r in results))
    return out


@pytest.fixture(scope="module")
def synthetic():
    return run_child(synthetic_scenario)


def test_synthetic_stack_matches_python_walker_with_fallbacks(synthetic):
    py, native, is_native, fallbacks = synthetic["main"]
    assert native == py
    S = synthetic["S"]
    assert [f[0] for f in native] == [CODE + 0x10, CODE + 0x311, CODE + 0x211, CODE + 0x181,
                                      CODE + 0x021, CODE + 0x611, CODE, CODE + 0x311]
    assert [f[1] for f in native] == [S + 16, S + 48, S + 64, S + 96, S + 112, S + 128,
                                      S + 136, S + 168]
    assert is_native == [True, True, False, False, True, True, True, True]
    assert fallbacks == 2
    assert synthetic["fallback_reasons"] == {"NEEDS_PYTHON": 1, "NO_INFO": 1}
    assert native[3][8] == FALLBACK_FRAME_POINTER               # the gap: frame pointers
    assert native[5][7] == STUB                                  # translated: stored_pc = stub
    assert native[5][6] and native[6][3] == CODE                 # signal frame: exact caller lookup
    assert native[-1][4] == END_RA_ZERO


def test_walk_out_declines_walks_that_need_python(synthetic):
    assert synthetic["walk_out_declines"] == (True, True)


def test_reads_outside_the_bounds_go_to_python(synthetic):
    frames, fallbacks = synthetic["tight"]
    assert frames == synthetic["main"][0]
    assert fallbacks > 2


@pytest.mark.parametrize("case, end", [("limit", END_STEP_LIMIT),
                                       ("not_increasing", END_CFA_NOT_INCREASING),
                                       ("cfa_unknown", "CFA register 6 is unknown in this frame")])
def test_walks_end_alike(synthetic, case, end):
    py, native, _, _ = synthetic[case]
    assert native == py
    assert native[-1][4] == end


def test_stub_without_table_entry_is_not_translated(synthetic):
    py, native, _, _ = synthetic["no_translation"]
    assert native == py
    assert native[5][0] == STUB and native[5][7] is None


def test_raw_entry_point_stops_where_python_is_needed(synthetic):
    n, reason, pc, rsp, frames = synthetic["raw"]
    S = synthetic["S"]
    assert (n, reason) == (2, "NEEDS_PYTHON")
    assert (pc, rsp) == (CODE + 0x211, S + 48)                   # the state is frame 2
    assert frames == [(CODE + 0x10, S + 16, S + 8, 4 | 8),       # exact, has ra slot
                      (CODE + 0x311, S + 48, S + 40, 8)]
    assert synthetic["fresh"] == (0, "NO_TABLE", 0)
    assert synthetic["empty_bounds"] == (0, "OUT_OF_BOUNDS")


def test_frame_arrays(synthetic):
    pcs, translated, python, end = synthetic["arrays"]
    assert pcs == [f[0] for f in synthetic["main"][1]]
    assert translated == [5] and python == (2, 3) and end == END_RA_ZERO


def test_return_address_table_translate_and_layout():
    table = ReturnAddressTable(STUB, {0x30: 3, 0x10: 1})
    table.set(0x20, 2)
    assert table.translate(0x20, STUB) == 2
    assert table.translate(0x20, 7) == 7                # not the stub: unchanged
    assert table.translate(0x40, STUB) == STUB          # not hijacked: unchanged
    from unwinder.native import TranslationHeader
    snap = table.snapshot()
    assert table.snapshot() is snap                     # rebuilt only after a change
    header = TranslationHeader.from_address(snap.address)
    assert (header.stub_address, header.n_pairs) == (STUB, 3)
    pairs = (ctypes.c_uint64 * 6).from_address(header.pairs)
    assert list(pairs) == [0x10, 1, 0x20, 2, 0x30, 3]   # sorted by slot
    table.discard(0x20)
    assert TranslationHeader.from_address(table.snapshot().address).n_pairs == 2
    assert header.n_pairs == 3 and snap.translate(0x20, STUB) == 2  # the old one is intact


def test_a_module_found_after_the_walker_was_made_joins_the_native_walk(synthetic):
    py, native, is_native, fallbacks, discovered, tables = synthetic["late"]
    assert native == py and discovered == 1
    assert [f[5] for f in native] == ["hand", "late", "late"] and native[-1][4] == END_RA_ZERO
    assert is_native == [True, False, True] and fallbacks == 1
    assert tables == ["hand", "late"]


def test_a_removed_module_leaves_the_walker(synthetic):
    py, native, tables = synthetic["removed"]
    assert native == py and native[1][5] is None       # its pcs are in no module now
    assert tables == ["hand"]


def test_concurrent_walks_grow_the_same_tables(synthetic):
    assert synthetic["racing"] == (200, True)
