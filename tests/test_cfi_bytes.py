"""Scenarios on hand-written ``.eh_frame`` / ``.eh_frame_hdr`` bytes.

Each input is spelled out one field per line, with the field's section
offset where the test depends on it, in the style of pyelftools'
``test/test_callframe.py``. The layout most tests share (the shared bytes and
builders are in ``cfibytes``):

====== ================================================================
0x00   CIE  (24 bytes, "zR", pcrel|sdata4 pointers, CFA=rsp+8, ra=c-8)
0x18   FDE  length
0x1c        CIE_pointer (0x1c: back to offset 0)
0x20        pc_begin (pcrel sdata4)
0x24        pc_range (sdata4)
0x28        augmentation data length (0)
0x29        instructions ...
====== ================================================================
"""

import struct

import pytest

from unwinder import x86_64
from unwinder.cfi import (
    CIE, FDE, EhFrame, EhFrameHdr, DW_EH_PE_datarel, DW_EH_PE_pcrel, DW_EH_PE_sdata4,
    read_sleb128, read_uleb128)
from unwinder.dwarf_expr import evaluate
from unwinder.errors import CFIError, ExpressionError, MemoryReadError, UnwindError
from unwinder.rules import RuleKind, decode_fde

from cfibytes import (ADDRESS, CIE_ZR, FIRST_FDE_INSTRUCTIONS, HDR_ADDRESS, PC, TERMINATOR,
                      fde_bytes, hdr_bytes)


def one_fde(instructions, **kwargs):
    """CIE_ZR + one FDE at 0x18 with ``instructions`` + terminator."""
    return CIE_ZR + fde_bytes(0x18, instructions, **kwargs) + TERMINATOR


def table_of(image, **kwargs):
    eh_frame = EhFrame(image, ADDRESS, **kwargs)
    return decode_fde(eh_frame.fde_at(0x18))


def render(rule):
    """readelf-like short form of a RegRule."""
    kind = rule.kind
    return {
        RuleKind.UNDEFINED: lambda: "u",
        RuleKind.SAME_VALUE: lambda: "s",
        RuleKind.OFFSET: lambda: f"c{rule.offset:+d}",
        RuleKind.VAL_OFFSET: lambda: f"v{rule.offset:+d}",
        RuleKind.REGISTER: lambda: x86_64.REGISTER_NAMES[rule.register],
        RuleKind.EXPRESSION: lambda: "exp:" + rule.expression.hex(),
        RuleKind.VAL_EXPRESSION: lambda: "vexp:" + rule.expression.hex(),
    }[kind]()


def rows_of(table):
    """``[(start, end, cfa, {regname: rule}, args_size)]`` in readable form."""
    result = []
    for row in table.rows:
        if row.cfa.expression is not None:
            cfa = "exp:" + row.cfa.expression.hex()
        else:
            cfa = f"{x86_64.REGISTER_NAMES[row.cfa.register]}{row.cfa.offset:+d}"
        regs = {x86_64.REGISTER_NAMES[r]: render(rule) for r, rule in row.regs}
        result.append((row.start, row.end, cfa, regs, row.args_size))
    return result


# --------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------

def test_cie_and_fde_fields():
    image = one_fde(b"\x00")  # DW_CFA_nop
    eh_frame = EhFrame(image, ADDRESS)
    cie, fde = list(eh_frame.entries())
    assert isinstance(cie, CIE) and isinstance(fde, FDE)
    assert (cie.offset, cie.version, cie.augmentation) == (0, 1, "zR")
    assert cie.code_alignment_factor == 1
    assert cie.data_alignment_factor == -8
    assert cie.return_address_register == x86_64.RA
    assert cie.fde_encoding == DW_EH_PE_pcrel | DW_EH_PE_sdata4
    assert cie.initial_instructions == b"\x0c\x07\x08\x90\x01\x00\x00"
    assert cie.initial_instructions_offset == 0x11
    assert not cie.is_signal_frame and cie.personality is None and cie.lsda_encoding is None
    assert (fde.offset, fde.cie, fde.pc_begin, fde.pc_end) == (0x18, cie, PC, PC + 0x100)
    assert fde.instructions == b"\x00" and fde.instructions_offset == FIRST_FDE_INSTRUCTIONS
    assert fde.lsda is None
    # Cached: the same objects come back.
    assert eh_frame.fde_at(0x18) is fde and eh_frame.cie_at(0) is cie
    assert eh_frame.find_fde(PC) is fde and eh_frame.find_fde(PC + 0xFF) is fde
    assert eh_frame.find_fde(PC - 1) is None and eh_frame.find_fde(PC + 0x100) is None
    # Any buffer works; a memoryview is kept, not copied.
    assert EhFrame(memoryview(bytearray(image)), ADDRESS).fde_at(0x18).pc_begin == PC
    # An all-nop FDE has one row: the CIE's state.
    assert rows_of(decode_fde(fde)) == [(PC, PC + 0x100, "rsp+8", {"rip": "c-8"}, 0)]


def test_entries_stop_at_zero_terminator():
    image = one_fde(b"") + b"garbage after the terminator"
    assert [type(e) for e in EhFrame(image, ADDRESS).entries()] == [CIE, FDE]


def test_every_opcode_family():
    instructions = (
        b"\x41"                  # 0x29 DW_CFA_advance_loc: 1               -> 0x2001
        b"\x0e\x10"              # 0x2a DW_CFA_def_cfa_offset: 16
        b"\x86\x02"              # 0x2c DW_CFA_offset: r6 (rbp) at cfa-16
        b"\x02\x03"              # 0x2e DW_CFA_advance_loc1: 3              -> 0x2004
        b"\x0d\x06"              # 0x30 DW_CFA_def_cfa_register: r6 (rbp)
        b"\x03\x04\x00"          # 0x32 DW_CFA_advance_loc2: 4              -> 0x2008
        b"\x05\x03\x03"          # 0x35 DW_CFA_offset_extended: r3 (rbx) at cfa-24
        b"\x11\x0c\x7c"          # 0x38 DW_CFA_offset_extended_sf: r12 at cfa+32 (-4*-8)
        b"\x14\x0d\x02"          # 0x3b DW_CFA_val_offset: r13 = cfa-16
        b"\x15\x0e\x7f"          # 0x3e DW_CFA_val_offset_sf: r14 = cfa+8 (-1*-8)
        b"\x04\x08\x00\x00\x00"  # 0x41 DW_CFA_advance_loc4: 8              -> 0x2010
        b"\x07\x0f"              # 0x46 DW_CFA_undefined: r15
        b"\x08\x03"              # 0x48 DW_CFA_same_value: r3 (rbx)
        b"\x09\x0c\x00"          # 0x4a DW_CFA_register: r12 in r0 (rax)
        b"\x2f\x0d\x02"          # 0x4d DW_CFA_GNU_negative_offset_extended: r13 at cfa+16
        b"\x2e\x20"              # 0x50 DW_CFA_GNU_args_size: 32
        b"\x44"                  # 0x52 DW_CFA_advance_loc: 4               -> 0x2014
        b"\x0a"                  # 0x53 DW_CFA_remember_state
        b"\xc6"                  # 0x54 DW_CFA_restore: r6 (not in the CIE -> default)
        b"\x06\x10"              # 0x55 DW_CFA_restore_extended: r16 (the CIE's c-8)
        b"\x0c\x07\x08"          # 0x57 DW_CFA_def_cfa: r7 (rsp) ofs 8
        b"\x41"                  # 0x5a DW_CFA_advance_loc: 1               -> 0x2015
        b"\x0b"                  # 0x5b DW_CFA_restore_state (CFA rbp+16 comes back)
        b"\x13\x7d"              # 0x5c DW_CFA_def_cfa_offset_sf: 24 (-3*-8)
        b"\x12\x07\x7c"          # 0x5e DW_CFA_def_cfa_sf: r7 (rsp) ofs 32 (-4*-8)
        b"\x10\x03\x02\x76\x08"  # 0x61 DW_CFA_expression: r3 at [DW_OP_breg6 +8]
        b"\x16\x0f\x02\x77\x10"  # 0x66 DW_CFA_val_expression: r15 = [DW_OP_breg7 +16]
        b"\x42"                  # 0x6b DW_CFA_advance_loc: 2               -> 0x2017
        b"\x0f\x02\x77\x08"      # 0x6c DW_CFA_def_cfa_expression: [DW_OP_breg7 +8]
        b"\x01"                  # 0x70 DW_CFA_set_loc (operand: pcrel sdata4 at 0x71)
        + struct.pack("<i", PC + 0x20 - (ADDRESS + 0x71))  # 0x71 -> 0x2020
        + b"\x08\x0f"            # 0x75 DW_CFA_same_value: r15
        b"\x00"                  # 0x77 DW_CFA_nop
    )
    table = table_of(one_fde(instructions))
    ra = {"rip": "c-8"}
    saved = {"rbx": "s", "rbp": "c-16", "r12": "rax", "r13": "c+16", "r14": "v+8",
             "r15": "u", **ra}
    assert rows_of(table) == [
        (0x2000, 0x2001, "rsp+8", ra, 0),
        (0x2001, 0x2004, "rsp+16", {"rbp": "c-16", **ra}, 0),
        (0x2004, 0x2008, "rbp+16", {"rbp": "c-16", **ra}, 0),
        (0x2008, 0x2010, "rbp+16", {"rbx": "c-24", "rbp": "c-16", "r12": "c+32",
                                    "r13": "v-16", "r14": "v+8", **ra}, 0),
        (0x2010, 0x2014, "rbp+16", saved, 32),
        (0x2014, 0x2015, "rsp+8", {k: v for k, v in saved.items() if k != "rbp"}, 32),
        (0x2015, 0x2017, "rsp+32", {**saved, "rbx": "exp:7608", "r15": "vexp:7710"}, 32),
        (0x2017, 0x2020, "exp:7708", {**saved, "rbx": "exp:7608", "r15": "vexp:7710"}, 32),
        (0x2020, 0x2100, "exp:7708", {**saved, "rbx": "exp:7608", "r15": "s"}, 32),
    ]
    # Expression blocks remember where they live, for error messages.
    row = table.row_for(0x2016)
    assert row.rule(x86_64.RBX).expression_section_offset == 0x64
    assert table.row_for(0x2017).cfa.expression_section_offset == 0x6e
    # Lookups.
    assert table.row_for(0x1FFF) is None and table.row_for(0x2100) is None
    assert table.row_for(0x2003).start == 0x2001
    assert table.row_for(0x20FF).start == 0x2020
    # Memoised on the FDE.
    assert decode_fde(EhFrame(one_fde(instructions), ADDRESS).fde_at(0x18)) == table
    fde = EhFrame(one_fde(instructions), ADDRESS).fde_at(0x18)
    assert decode_fde(fde) is decode_fde(fde)


def test_def_cfa_sf_is_scaled_by_the_data_alignment_factor():
    # DWARF 5 §6.4.2.2: DW_CFA_def_cfa_sf's offset is factored by the *data*
    # alignment factor. Give the CIE a code factor of 4 so that scaling by
    # the wrong one shows.
    cie = (
        b"\x14\x00\x00\x00"  # length: 20
        b"\x00\x00\x00\x00"  # CIE_id
        b"\x01"              # version 1
        b"zR\x00"            # augmentation
        b"\x04"              # code_alignment_factor: 4
        b"\x78"              # data_alignment_factor: -8
        b"\x10"              # return_address_register: 16
        b"\x01"              # augmentation data length
        b"\x1b"              # 'R': pcrel|sdata4
        b"\x0c\x07\x08"      # DW_CFA_def_cfa: rsp+8
        b"\x90\x01"          # DW_CFA_offset: r16 at cfa-8
        b"\x00\x00"          # padding
    )
    instructions = (
        b"\x12\x06\x7e"  # DW_CFA_def_cfa_sf: r6 (rbp), factored -2 -> +16
        b"\x41"          # DW_CFA_advance_loc: 1 * code factor 4 -> PC+4
        b"\x13\x7c"      # DW_CFA_def_cfa_offset_sf: factored -4 -> +32
    )
    image = cie + fde_bytes(0x18, instructions, pc_range=8) + TERMINATOR
    assert rows_of(table_of(image)) == [
        (PC, PC + 4, "rbp+16", {"rip": "c-8"}, 0),
        (PC + 4, PC + 8, "rbp+32", {"rip": "c-8"}, 0),
    ]


def test_remember_and_restore_state_nest():
    instructions = (
        b"\x0e\x10"  # DW_CFA_def_cfa_offset: 16
        b"\x83\x02"  # DW_CFA_offset: r3 (rbx) at cfa-16
        b"\x0a"      # DW_CFA_remember_state         (A: rsp+16, rbx c-16)
        b"\x0e\x08"  # DW_CFA_def_cfa_offset: 8
        b"\xc3"      # DW_CFA_restore: r3
        b"\x0a"      # DW_CFA_remember_state         (B: rsp+8)
        b"\x41"      # advance 1                      -> PC+1 row: B
        b"\x0e\x20"  # DW_CFA_def_cfa_offset: 32
        b"\x41"      # advance 1                      -> PC+2 row: rsp+32
        b"\x0b"      # DW_CFA_restore_state           (B)
        b"\x41"      # advance 1                      -> PC+3 row: B
        b"\x0b"      # DW_CFA_restore_state           (A)
    )
    assert rows_of(table_of(one_fde(instructions, pc_range=4))) == [
        (PC, PC + 1, "rsp+8", {"rip": "c-8"}, 0),
        (PC + 1, PC + 2, "rsp+32", {"rip": "c-8"}, 0),
        (PC + 2, PC + 3, "rsp+8", {"rip": "c-8"}, 0),
        (PC + 3, PC + 4, "rsp+16", {"rbx": "c-16", "rip": "c-8"}, 0),
    ]


def test_64bit_lengths():
    image = (
        b"\xff\xff\xff\xff"                  # 0x00 length escape: 64-bit format
        b"\x14\x00\x00\x00\x00\x00\x00\x00"  # 0x04 length: 20 (u64)
        b"\x00\x00\x00\x00"                  # 0x0c CIE_id: still 4 bytes in .eh_frame
        b"\x01"                              # 0x10 version 1
        b"zR\x00"                            # 0x11 augmentation
        b"\x01"                              # 0x14 code_alignment_factor 1
        b"\x78"                              # 0x15 data_alignment_factor -8
        b"\x10"                              # 0x16 return_address_register 16
        b"\x01"                              # 0x17 augmentation data length
        b"\x04"                              # 0x18 'R': DW_EH_PE_udata8 (absolute)
        b"\x0c\x07\x08"                      # 0x19 DW_CFA_def_cfa: rsp+8
        b"\x90\x01"                          # 0x1c DW_CFA_offset: r16 at cfa-8
        b"\x00\x00"                          # 0x1e padding
        # FDE at 0x20
        b"\xff\xff\xff\xff"                  # 0x20 length escape
        b"\x18\x00\x00\x00\x00\x00\x00\x00"  # 0x24 length: 24 (u64)
        b"\x2c\x00\x00\x00"                  # 0x2c CIE_pointer: 0x2c - 0x2c = CIE at 0
        + struct.pack("<Q", 0x7000)          # 0x30 pc_begin (udata8)
        + struct.pack("<Q", 0x40)            # 0x38 pc_range (udata8)
        + b"\x00"                            # 0x40 augmentation data length
        b"\x0e\x10"                          # 0x41 DW_CFA_def_cfa_offset: 16
        b"\x00"                              # 0x43 DW_CFA_nop
        + TERMINATOR                         # 0x44
    )
    eh_frame = EhFrame(image, ADDRESS)
    cie, fde = list(eh_frame.entries())
    assert (fde.pc_begin, fde.pc_end, fde.cie) == (0x7000, 0x7040, cie)
    assert fde.instructions_offset == 0x41
    assert rows_of(decode_fde(fde)) == [(0x7000, 0x7040, "rsp+16", {"rip": "c-8"}, 0)]


@pytest.mark.parametrize("encoding, field, pc_range, pc_begin, kwargs", [
    (0x00, struct.pack("<Q", 0x5000), b"\x10" + b"\x00" * 7, 0x5000, {}),     # absptr
    (0x01, b"\x80\xa0\x01", b"\x10", 0x5000, {}),                           # uleb128
    (0x02, struct.pack("<H", 0x5000), b"\x10\x00", 0x5000, {}),               # udata2
    (0x03, struct.pack("<I", 0x5000), b"\x10\x00\x00\x00", 0x5000, {}),       # udata4
    (0x04, struct.pack("<Q", 0x5000), b"\x10" + b"\x00" * 7, 0x5000, {}),     # udata8
    (0x09, b"\x80\xa0\x01", b"\x10", 0x5000, {}),                           # sleb128
    (0x0A, struct.pack("<h", 0x5000), b"\x10\x00", 0x5000, {}),               # sdata2
    (0x0C, struct.pack("<q", 0x5000), b"\x10" + b"\x00" * 7, 0x5000, {}),     # sdata8
    (0x13, struct.pack("<I", 0x4000), b"\x10\x00\x00\x00",
     ADDRESS + 0x20 + 0x4000, {}),                                           # pcrel|udata4
    (0x1B, struct.pack("<i", -0x20), b"\x10\x00\x00\x00", ADDRESS, {}),      # pcrel|sdata4
    (0x19, b"\x60", b"\x10", ADDRESS, {}),                                   # pcrel|sleb128 -32
    (0x1C, struct.pack("<q", 0x10), b"\x10" + b"\x00" * 7, ADDRESS + 0x30, {}),  # pcrel|sdata8
    (0x3B, struct.pack("<i", -0x100), b"\x10\x00\x00\x00", 0x9F00,
     {"data_base": 0xA000}),                                                 # datarel|sdata4
    (0x23, struct.pack("<I", 0x40), b"\x10\x00\x00\x00", 0x8040,
     {"text_base": 0x8000}),                                                 # textrel|udata4
])
def test_fde_pointer_encodings(encoding, field, pc_range, pc_begin, kwargs):
    cie = (
        b"\x14\x00\x00\x00"    # 0x00 length: 20
        b"\x00\x00\x00\x00"    # 0x04 CIE_id
        b"\x01"                # 0x08 version
        b"zR\x00"              # 0x09 augmentation
        b"\x01"                # 0x0c code_alignment_factor
        b"\x78"                # 0x0d data_alignment_factor
        b"\x10"                # 0x0e return_address_register
        b"\x01"                # 0x0f augmentation data length
        + bytes([encoding])    # 0x10 'R': the encoding under test
        + b"\x0c\x07\x08"      # 0x11 DW_CFA_def_cfa: rsp+8
        b"\x00\x00\x00\x00"    # 0x14 DW_CFA_nop padding
    )
    body = (
        b"\x1c\x00\x00\x00"    # 0x1c CIE_pointer: 0x1c - 0x1c = CIE at 0
        + field                # 0x20 pc_begin
        + pc_range             # pc_range: 16 bytes, same format, no application
        + b"\x00"              # augmentation data length
    )
    image = cie + struct.pack("<I", len(body)) + body + TERMINATOR  # 0x18 FDE length
    fde = EhFrame(image, ADDRESS, **kwargs).fde_at(0x18)
    assert (fde.pc_begin, fde.pc_end) == (pc_begin, pc_begin + 16)


def test_pointer_bases_are_required():
    image = CIE_ZR[:0x10] + b"\x3b" + CIE_ZR[0x11:] + fde_bytes(0x18, b"") + TERMINATOR
    with pytest.raises(CFIError) as info:  # datarel|sdata4 without a data base
        EhFrame(image, ADDRESS).fde_at(0x18)
    assert info.value.offset == 0x20  # the pc_begin field


def test_relocations_override_stored_pc_begin():
    image = one_fde(b"", pc_begin=ADDRESS + 0x20)  # stored 0, as in an unrelocated .o
    assert EhFrame(image, ADDRESS).fde_at(0x18).pc_begin == ADDRESS + 0x20
    fde = EhFrame(image, ADDRESS, relocations={0x20: 0x7F0000001000}).fde_at(0x18)
    assert (fde.pc_begin, fde.pc_end) == (0x7F0000001000, 0x7F0000001100)


def test_signal_frame_personality_and_lsda():
    cie = (
        b"\x1c\x00\x00\x00"    # 0x00 length: 28
        b"\x00\x00\x00\x00"    # 0x04 CIE_id
        b"\x01"                # 0x08 version
        b"zPLRS\x00"           # 0x09 augmentation: personality, LSDA, FDE enc, signal
        b"\x01"                # 0x0f code_alignment_factor
        b"\x78"                # 0x10 data_alignment_factor
        b"\x10"                # 0x11 return_address_register
        b"\x07"                # 0x12 augmentation data length: 7
        b"\x9b"                # 0x13 'P' encoding: indirect|pcrel|sdata4
        + struct.pack("<i", 0x300 - 0x14)  # 0x14 personality: slot at ADDRESS+0x300
        + b"\x1b"              # 0x18 'L' encoding: pcrel|sdata4
        b"\x1b"                # 0x19 'R' encoding: pcrel|sdata4
        b"\x0c\x07\x08"        # 0x1a DW_CFA_def_cfa: rsp+8
        b"\x00"                # 0x1d DW_CFA_nop
        b"\x00\x00"            # 0x1e padding
    )
    assert len(cie) == 0x20
    lsda_field = 0x20 + 17     # FDE at 0x20: length, CIE_ptr, pc_begin, range, aug len
    fde = fde_bytes(0x20, b"", augmentation_data=struct.pack("<i", 0x500 - lsda_field))
    eh_frame = EhFrame(cie + fde + TERMINATOR, ADDRESS)
    parsed = eh_frame.fde_at(0x20)
    assert parsed.cie.is_signal_frame
    assert parsed.cie.augmentation == "zPLRS"
    assert parsed.cie.personality == ADDRESS + 0x300 and parsed.cie.personality_indirect
    assert parsed.cie.lsda_encoding == 0x1B
    assert parsed.lsda == ADDRESS + 0x500
    table = decode_fde(parsed)
    assert table.is_signal_frame and table.return_address_register == 16
    # A stored 0 LSDA is a null pointer (libgcc), not "pc of the field + 0".
    null = fde_bytes(0x20, b"", augmentation_data=b"\x00\x00\x00\x00")
    assert EhFrame(cie + null + TERMINATOR, ADDRESS).fde_at(0x20).lsda is None


@pytest.mark.parametrize("version, ra_field", [(3, b"\x10"), (4, b"\x08\x00\x10")])
def test_cie_versions_3_and_4(version, ra_field):
    # Version 3 stores the RA column as ULEB128; version 4 adds address_size
    # and segment_selector_size after the augmentation string.
    body = (
        b"\x00\x00\x00\x00"  # CIE_id
        + bytes([version])   # version
        + b"zR\x00"          # augmentation
        + (ra_field[:2] if version == 4 else b"")  # v4: address_size 8, segment size 0
        + b"\x01"            # code_alignment_factor
        b"\x78"              # data_alignment_factor
        + ra_field[-1:]      # return_address_register: 16 (ULEB128)
        + b"\x01\x1b"        # augmentation data: 'R' pcrel|sdata4
        b"\x0c\x07\x08"      # DW_CFA_def_cfa: rsp+8
    )
    cie = struct.pack("<I", len(body)) + body
    cie_len = len(cie)
    image = cie + fde_bytes(cie_len, b"\x0e\x10") + TERMINATOR
    fde = EhFrame(image, ADDRESS).fde_at(cie_len)
    assert fde.cie.version == version and fde.cie.return_address_register == 16
    assert rows_of(decode_fde(fde)) == [(PC, PC + 0x100, "rsp+16", {}, 0)]


# --------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------

# libc's PLT CFA expression (readelf: DW_OP_breg7 (rsp): 8; DW_OP_breg16 (rip):
# 0; DW_OP_lit15; DW_OP_and; DW_OP_lit11; DW_OP_ge; DW_OP_lit3; DW_OP_shl;
# DW_OP_plus): CFA = rsp + 8 + ((rip & 15) >= 11 ? 8 : 0).
PLT_CFA = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22])


def no_memory(address):
    raise MemoryReadError(address)


def test_plt_cfa_expression():
    instructions = b"\x0f" + bytes([len(PLT_CFA)]) + PLT_CFA  # DW_CFA_def_cfa_expression
    row = table_of(one_fde(instructions)).row_for(PC)
    assert row.cfa_value({7: 0x7FF0, 16: 0x4006}, no_memory) == 0x7FF8
    assert row.cfa_value({7: 0x7FF0, 16: 0x400B}, no_memory) == 0x8000
    with pytest.raises(ExpressionError) as info:
        row.cfa_value({7: 0x7FF0}, no_memory)  # no rip
    assert info.value.offset == FIRST_FDE_INSTRUCTIONS + 2 + 2  # the DW_OP_breg16


def test_recover_every_rule_kind():
    instructions = (
        b"\x0c\x06\x10"          # DW_CFA_def_cfa: r6 (rbp) ofs 16
        b"\x86\x02"              # DW_CFA_offset: rbp at cfa-16
        b"\x14\x03\x01"          # DW_CFA_val_offset: rbx = cfa-8
        b"\x09\x0c\x00"          # DW_CFA_register: r12 in rax
        b"\x07\x0d"              # DW_CFA_undefined: r13
        b"\x08\x0e"              # DW_CFA_same_value: r14
        b"\x10\x0f\x02\x77\x08"  # DW_CFA_expression: r15 at [rsp+8]
        b"\x16\x05\x02\x12\x22"  # DW_CFA_val_expression: rdi = [dup; plus] = cfa + cfa
    )
    row = table_of(one_fde(instructions)).row_for(PC)
    regs = {6: 0x1000, 7: 0x2000, 0: 0xAAAA, 14: 0xEEEE}
    memory = {0x1000: 0x5555, 0x1008: 0x1234, 0x2008: 0xF15F15}
    read = memory.__getitem__
    cfa = row.cfa_value(regs, read)
    assert cfa == 0x1010
    assert row.recover(x86_64.RBP, cfa, regs, read) == 0x5555           # *(cfa-16)
    assert row.recover(x86_64.RBX, cfa, regs, read) == 0x1008           # cfa-8
    assert row.recover(x86_64.R12, cfa, regs, read) == 0xAAAA           # rax
    assert row.recover(x86_64.R13, cfa, regs, read) is None             # undefined
    assert row.recover(x86_64.R14, cfa, regs, read) == 0xEEEE           # same value
    assert row.recover(x86_64.R15, cfa, regs, read) == 0xF15F15         # *(rsp+8)
    assert row.recover(x86_64.RDI, cfa, regs, read) == 0x2020           # cfa+cfa
    assert row.recover(x86_64.RA, cfa, regs, read) == 0x1234            # CIE: *(cfa-8)
    assert row.recover(x86_64.RSI, cfa, regs, read) is None  # default same value, unknown
    assert row.rule(x86_64.RSI).kind is RuleKind.SAME_VALUE
    with pytest.raises(MemoryReadError):
        row.recover(x86_64.RBP, cfa, regs, no_memory)


@pytest.mark.parametrize("expr, stack, expected", [
    (b"\x08\xff", (), 0xFF),                                   # const1u
    (b"\x09\xff", (), 2**64 - 1),                              # const1s -1
    (b"\x0b\x00\x80", (), 2**64 - 0x8000),                     # const2s
    (b"\x0c\x78\x56\x34\x12", (), 0x12345678),                 # const4u
    (b"\x10\xe5\x8e\x26", (), 624485),                         # constu
    (b"\x11\x7f", (), 2**64 - 1),                              # consts -1
    (b"\x31\x32\x1c", (), 2**64 - 1),                          # 1 - 2 wraps
    (b"\x31\x12\x22", (), 2),                                  # dup plus
    (b"\x31\x32\x13", (), 1),                                  # drop
    (b"\x31\x32\x14", (), 1),                                  # over
    (b"\x31\x32\x33\x15\x02", (), 1),                          # pick 2
    (b"\x31\x32\x16", (), 1),                                  # swap
    (b"\x31\x32\x33\x17", (), 2),                              # rot: (1,2,3) -> (3,1,2)
    (b"\x11\x79\x19", (), 7),                                  # abs(-7)
    (b"\x11\x79\x32\x1b", (), 2**64 - 3),                      # -7 / 2 = -3 (truncates)
    (b"\x11\x79\x32\x1d", (), 1),                              # unsigned (2**64-7) % 2
    (b"\x33\x34\x1e", (), 12),                                 # mul
    (b"\x33\x1f", (), 2**64 - 3),                              # neg
    (b"\x30\x20", (), 2**64 - 1),                              # not
    (b"\x33\x34\x21", (), 7),                                  # or
    (b"\x36\x33\x27", (), 5),                                  # xor
    (b"\x31\x08\x40\x24", (), 0),                              # shl by 64 -> 0
    (b"\x11\x70\x32\x26", (), 2**64 - 4),                      # shra -16 >> 2
    (b"\x11\x70\x32\x25", (), (2**64 - 16) >> 2),              # shr
    (b"\x11\x7f\x30\x2d", (), 1),                              # -1 < 0 (signed)
    (b"\x33\x33\x29", (), 1),                                  # eq
    (b"\x33\x34\x2e", (), 1),                                  # ne
    (b"\x34\x33\x2b", (), 1),                                  # gt
    (b"\x33\x33\x2c", (), 1),                                  # le
    (b"\x23\x10", (0x100,), 0x110),                            # plus_uconst on initial stack
    (b"\x2f\x01\x00\x31\x32", (), 2),                          # skip over lit1
    (b"\x31\x28\x01\x00\x35\x36", (), 6),                      # bra taken skips lit5
    (b"\x30\x28\x01\x00\x35", (), 5),                          # bra not taken
    (b"\x96\x35", (), 5),                                      # nop
    (b"\x77\x08\x06", (), 0xBEEF),                             # breg7 +8; deref
    (b"\x92\x07\x78\x94\x01", (), 0xEF),                       # bregx r7 -8; deref_size 1
    (b"\x03" + struct.pack("<Q", 0x1122), (), 0x1122),         # addr
])
def test_expression_ops(expr, stack, expected):
    memory = {0x1008: 0xBEEF, 0x0FF8: 0xABCDEF}
    assert evaluate(expr, {7: 0x1000}, memory.__getitem__, stack) == expected


@pytest.mark.parametrize("expr, message, position", [
    (b"\x13", "underflow", 0),
    (b"\x31\x22", "underflow", 1),
    (b"\x50", "register location", 0),                   # DW_OP_reg0
    (b"\x90\x07", "register location", 0),                # DW_OP_regx
    (b"\x9c", "call_frame_cfa", 0),
    (b"\x76\x00", "register 6", 0),                       # breg6, no rbp
    (b"\xe0", "unsupported", 0),
    (b"\x2f\xfd\xff", "operations", 0),                   # skip -3: loops forever
    (b"\x2f\x10\x00", "outside", 0),
    (b"\x31\x30\x1b", "division by zero", 2),
    (b"\x0c\x00", "truncated", 1),
    (b"\x10\x80", "ULEB128", 1),
    (b"", "empty stack", 0),
])
def test_expression_errors(expr, message, position):
    with pytest.raises(ExpressionError) as info:
        evaluate(expr, {7: 0}, no_memory, section_offset=0x100)
    assert message in str(info.value)
    assert info.value.offset == 0x100 + position


def test_leb128():
    assert read_uleb128(b"\xe5\x8e\x26", 0, 3) == (624485, 3)
    assert read_sleb128(b"\xc0\xbb\x78", 0, 3) == (-123456, 3)
    assert read_sleb128(b"\x7f", 0, 1) == (-1, 1)
    with pytest.raises(CFIError) as info:
        read_uleb128(b"\x80" * 30, 0, 30, base=0x40)
    assert info.value.offset == 0x40


# --------------------------------------------------------------------------
# .eh_frame_hdr
# --------------------------------------------------------------------------

def two_fde_image():
    """CIE at 0, FDE@0x18 covers [0x2000, 0x2100), FDE@0x30 covers [0x3000, 0x3010)."""
    first = fde_bytes(0x18, b"\x00" * 7)              # 7 DW_CFA_nops: 0x18 bytes long
    second = fde_bytes(0x30, b"\x0e\x10", pc_begin=0x3000, pc_range=0x10, cie_offset=0)
    return CIE_ZR + first + second + TERMINATOR


def test_hand_built_eh_frame_hdr():
    hdr = EhFrameHdr(hdr_bytes([(0x2000, 0x18), (0x3000, 0x30)]), HDR_ADDRESS)
    assert hdr.eh_frame_address == ADDRESS and hdr.fde_count == 2 and hdr.has_table
    assert hdr.table_entry(1) == (0x3000, ADDRESS + 0x30)
    assert hdr.lookup(0x1FFF) is None
    assert hdr.lookup(0x2000) == ADDRESS + 0x18
    assert hdr.lookup(0x2FFF) == ADDRESS + 0x18  # the table has no range ends
    assert hdr.lookup(0x3000) == ADDRESS + 0x30
    assert hdr.lookup(0xFFFFFFFF) == ADDRESS + 0x30

    eh_frame = EhFrame(two_fde_image(), ADDRESS, hdr=hdr)
    assert eh_frame.find_fde(0x3008).offset == 0x30
    assert eh_frame._fdes.keys() == {0x30}  # only that FDE was decoded
    assert eh_frame.find_fde(0x2050).offset == 0x18
    assert eh_frame.find_fde(0x2100) is None  # between the FDEs
    assert eh_frame.find_fde(0x3010) is None


def test_hdr_and_eh_frame_must_share_an_address_space():
    hdr = EhFrameHdr(hdr_bytes([(0x2000, 0x18)]), HDR_ADDRESS)
    with pytest.raises(CFIError):
        EhFrame(two_fde_image(), ADDRESS + 0x1000, hdr=hdr)


def test_hdr_without_table_falls_back_to_the_index():
    hdr = EhFrameHdr(b"\x01\x1b\xff\xff" + struct.pack("<i", ADDRESS - (HDR_ADDRESS + 4)),
                     HDR_ADDRESS)
    assert not hdr.has_table and hdr.lookup(0x2000) is None
    assert EhFrame(two_fde_image(), ADDRESS, hdr=hdr).find_fde(0x3000).offset == 0x30


# --------------------------------------------------------------------------
# Malformed input: CFIError with the offset of the bad field
# --------------------------------------------------------------------------

def patched(image, offset, new):
    return image[:offset] + new + image[offset + len(new):]


GOOD = one_fde(b"\x0e\x10")  # instructions at 0x29: DW_CFA_def_cfa_offset 16


def decode_all(image, **kwargs):
    eh_frame = EhFrame(image, ADDRESS, **kwargs)
    for entry in eh_frame.entries():
        if isinstance(entry, FDE):
            decode_fde(entry)


MALFORMED = [
    ("truncated length", GOOD[:2], 0x00),
    ("entry runs past the end", GOOD[:0x28], 0x18),
    ("reserved length", patched(GOOD, 0x18, b"\xf0\xff\xff\xff"), 0x18),
    ("truncated 64-bit length", b"\xff\xff\xff\xff\x10\x00", 0x00),
    ("length too short for CIE id", b"\x02\x00\x00\x00\x00\x00", 0x04),
    ("CIE version 2", patched(GOOD, 0x08, b"\x02"), 0x08),
    ("unterminated augmentation", patched(GOOD, 0x09, b"zRzRzRzRzRzRzRzR"), 0x09),
    ("legacy eh augmentation", patched(GOOD, 0x09, b"eh\x00"), 0x09),
    ("augmentation without z", patched(GOOD, 0x09, b"xR\x00"), 0x09),
    ("non-ASCII augmentation", patched(GOOD, 0x09, b"z\xff\x00"), 0x09),
    ("bad FDE encoding", patched(GOOD, 0x10, b"\x0f"), 0x10),
    ("indirect FDE encoding", patched(GOOD, 0x10, b"\x9b"), 0x10),
    ("augmentation data past the entry", patched(GOOD, 0x0f, b"\x7f"), 0x10),
    ("CIE_pointer before the section", patched(GOOD, 0x1c, b"\x00\x01\x00\x00"), 0x1c),
    ("CIE_pointer to an FDE",  # GOOD's FDE ends at 0x2b
     GOOD[:-4] + fde_bytes(0x2b, b"", cie_offset=0x18) + TERMINATOR, 0x2f),
    ("truncated pc_begin", patched(GOOD, 0x18, b"\x06\x00\x00\x00"), 0x20),
    ("unknown CFA opcode", one_fde(b"\x0e\x10\x3f"), 0x2b),
    ("DW_CFA_GNU_window_save", one_fde(b"\x00\x2d"), 0x2a),
    ("restore_state without remember", one_fde(b"\x41\x0b"), 0x2a),
    ("advance past pc_end", one_fde(b"\x02\x20", pc_range=0x10), 0x29),
    ("set_loc backwards", one_fde(b"\x41\x01" + struct.pack("<i", 0)), 0x2a),
    ("truncated ULEB128 operand", one_fde(b"\x0e\x80"), 0x2a),
    ("truncated advance_loc2", one_fde(b"\x03\x01"), 0x2a),
    ("expression block too long", one_fde(b"\x0f\x09\x77"), 0x2b),
    ("def_cfa_offset after an expression CFA", one_fde(b"\x0f\x01\x30\x0e\x08"), 0x2c),
    ("def_cfa_register after an expression CFA", one_fde(b"\x0f\x01\x30\x0d\x06"), 0x2c),
    ("advance in CIE initial instructions", patched(GOOD, 0x16, b"\x41"), 0x16),
    ("restore in CIE initial instructions", patched(GOOD, 0x16, b"\xc6"), 0x16),
    ("no CFA rule at all", patched(GOOD, 0x11, b"\x00\x00\x00") [:0x29] + b"\x00\x41", 0x2a),
]


@pytest.mark.parametrize("name, image, offset", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_eh_frame(name, image, offset):
    with pytest.raises(CFIError) as info:
        decode_all(image)
    assert info.value.offset == offset, str(info.value)


def test_malformed_expression_reports_its_section_offset():
    instructions = b"\x0f\x03\x77\x00\xe0"  # DW_CFA_def_cfa_expression [breg7 0; 0xe0]
    row = table_of(one_fde(instructions)).row_for(PC)
    with pytest.raises(ExpressionError) as info:
        row.cfa_value({7: 0}, no_memory)
    assert info.value.offset == FIRST_FDE_INSTRUCTIONS + 4


@pytest.mark.parametrize("name, data, offset", [
    ("empty", b"", 0),
    ("version 2", b"\x02\x1b\x03\x3b\x00\x00\x00\x00", 0),
    ("omitted eh_frame_ptr", b"\x01\xff\x03\x3b", 1),
    ("bad table encoding", hdr_bytes([(0x2000, 0x18)])[:3] + b"\x0f" + hdr_bytes([])[4:], 3),
    ("table past the end", hdr_bytes([(0x2000, 0x18)], count=1000), 12),
    ("truncated eh_frame_ptr", b"\x01\x1b\x03\x3b\x00", 4),
])
def test_malformed_eh_frame_hdr(name, data, offset):
    with pytest.raises(CFIError) as info:
        EhFrameHdr(data, HDR_ADDRESS)
    assert info.value.offset == offset, str(info.value)


def test_hdr_pointing_outside_eh_frame():
    hdr = EhFrameHdr(hdr_bytes([(0x2000, 0x4000)]), HDR_ADDRESS)
    with pytest.raises(CFIError):
        EhFrame(two_fde_image(), ADDRESS, hdr=hdr).find_fde(0x2000)


def test_hdr_pointing_at_a_cie():
    hdr = EhFrameHdr(hdr_bytes([(0x2000, 0x0)]), HDR_ADDRESS)
    with pytest.raises(CFIError):
        EhFrame(two_fde_image(), ADDRESS, hdr=hdr).find_fde(0x2000)


def test_errors_are_unwind_errors():
    assert issubclass(CFIError, UnwindError) and issubclass(ExpressionError, CFIError)
