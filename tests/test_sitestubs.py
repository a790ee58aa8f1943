"""Per-site return stubs: the row copied into a stub's FDE is the row given.

Each stub is assembled by LLVM and its ``.eh_frame`` decoded by the unwinder:
at the pad byte and at every instruction the row must equal the old frame's
row it was made from, whatever the kinds of its rules.
"""
import llvmlite.binding as llvm
import pytest

import unwinder
from osrjit.compiling import target_machine
from deopt.errors import HijackError
from deopt.sitestubs import (ENTRY_OFFSET, SiteStub, SiteStubIndex, site_stub_symbol,
                             site_stubs_asm, site_stubs_module_ir)
from unwinder.rules import CFARule, RegRule, RuleKind, UnwindRow
from unwinder.x86_64 import RA, RBP, RBX, R12, R13, RSP

COMMON_STUB = 0x7F00_1234_5670
TEXT = 0x40_0000

OFFSET = RuleKind.OFFSET


def _row(cfa, regs):
    return UnwindRow(0, 0, cfa, tuple(sorted(regs.items())))


ROWS = {
    # What LLVM emits at a call in a frame of 24 bytes with RBX saved.
    "rsp-based": _row(CFARule(RSP, 32), {RBX: RegRule(OFFSET, -16), RA: RegRule(OFFSET, -8)}),
    # A frame-pointer frame.
    "rbp-based": _row(CFARule(RBP, 16), {RBP: RegRule(OFFSET, -16), R12: RegRule(OFFSET, -24),
                                         RA: RegRule(OFFSET, -8)}),
    # Every other kind of rule, and a CFA expression (DW_OP_breg7 RSP + 48).
    "unusual": _row(CFARule(expression=bytes([0x77, 48])),
                    {RBX: RegRule(RuleKind.SAME_VALUE), R12: RegRule(RuleKind.UNDEFINED),
                     R13: RegRule(RuleKind.REGISTER, register=RBX),
                     RBP: RegRule(RuleKind.VAL_OFFSET, offset=-32),
                     15: RegRule(RuleKind.EXPRESSION, expression=bytes([0x70, 8])),
                     14: RegRule(RuleKind.VAL_EXPRESSION, expression=bytes([0x71, 16])),
                     RA: RegRule(OFFSET, -8)}),
}


def _assemble(stubs):
    tm = target_machine()
    text = site_stubs_module_ir(tm.triple, stubs, COMMON_STUB)
    return tm.emit_object(llvm.parse_assembly(text))


def test_each_stub_carries_its_row_at_the_pad_and_at_every_instruction():
    stubs = [SiteStub(0x1000 + i, site_stub_symbol("f", 3, 7, i), row)
             for i, row in enumerate(ROWS.values())]
    obj = _assemble(stubs)
    space = unwinder.AddressSpace()
    handle = space.add_code_object(obj, {".text": TEXT}, name="stubs")
    for i, (name, row) in enumerate(ROWS.items()):
        start = TEXT + 16 * i                     # .p2align 4, one stub each
        entry = start + ENTRY_OFFSET
        # The symbol covers the pad: a symbolizer looking at S - 1 names it.
        assert handle.symbolize(entry - 1) == (stubs[i].symbol, start)
        # pad (S - 1: where walkers look), the movabs (10 bytes), the jmp (3).
        for pc in (entry - 1, entry, entry + 10, entry + 12):
            got = space.unwind_entry(pc)[0].row
            assert (got.cfa, got.regs) == (row.cfa, row.regs), (name, hex(pc))
        assert space.unwind_entry(entry + 13) is None      # the FDE ends after the jmp


def test_the_stub_jumps_to_the_common_stub():
    row = ROWS["rsp-based"]
    asm = site_stubs_asm([SiteStub(0x1000, "osrjit.site.f@v1.site2", row)], COMMON_STUB)
    assert f"movabsq ${COMMON_STUB:#x}, %r11" in asm and "jmpq *%r11" in asm
    assert '"osrjit.site.f@v1.site2":' in asm


def test_a_row_it_cannot_copy_is_a_precise_error():
    row = _row(CFARule(RSP, 16), {RBX: RegRule(RuleKind.VAL_OFFSET, offset=-12)})
    with pytest.raises(HijackError, match="val_offset -12 of register 3"):
        site_stubs_asm([SiteStub(0x1000, "s", row)], COMMON_STUB)


def test_symbols_name_function_version_site_and_copy():
    assert site_stub_symbol("fib", 2, 5) == "osrjit.site.fib@v2.site5"
    assert site_stub_symbol("fib", 2, 5, 1) == "osrjit.site.fib@v2.site5.1"


def test_index_maps_both_ways_and_forgets():
    index = SiteStubIndex()
    index.add([(0x10, 0xA0), (0x20, 0xB0)])
    assert (index.stub_of(0x10), index.return_of(0xB0), len(index)) == (0xA0, 0x20, 2)
    index.remove([(0x10, 0xA0)])
    assert index.stub_of(0x10) is None and index.return_of(0xA0) is None and len(index) == 1
