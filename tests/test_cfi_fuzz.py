"""Scenario: corrupt call-frame information never crashes the decoder.

Start from real ``.eh_frame`` images -- slices of this machine's libc (plain
FDEs, the PLT's CFA expression, the signal trampoline's 'S' CIE with
DW_CFA_expression rules, a 'zPLR' CIE with personality and LSDA) and the
``.eh_frame`` of an object emitted by llvmlite (with its relocations) --
flip, insert, delete and truncate bytes, then decode every entry, every
table, and evaluate every rule against fake registers and memory. The only
acceptable failures are :class:`UnwindError` subclasses; every table that
does decode must be well formed.
"""

import functools
import io
import struct

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unwinder.cfi import FDE, EhFrame, EhFrameHdr
from unwinder.dwarf_expr import evaluate
from unwinder.errors import MemoryReadError, UnwindError
from unwinder.rules import RuleKind, decode_fde

from cfibytes import CIE_ZR

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
MASK64 = (1 << 64) - 1


def _eh_frame_of(elf_bytes):
    """``(data, sh_addr, relocations | None)`` of an ELF image's .eh_frame."""
    elf = ELFFile(io.BytesIO(elf_bytes))
    section = elf.get_section_by_name(".eh_frame")
    relocations = None
    rela = elf.get_section_by_name(".rela.eh_frame")
    if isinstance(rela, RelocationSection):
        symtab = elf.get_section(rela["sh_link"])
        relocations = {
            r["r_offset"]: symtab.get_symbol(r["r_info_sym"])["st_value"] + r["r_addend"]
            for r in rela.iter_relocations()
        }
    return section.data(), section["sh_addr"], relocations


def _slice(data, address, start, max_fdes):
    """Entries of ``data`` from section offset ``start`` (a CIE) through ``max_fdes`` FDEs.

    CIE_pointers are relative, so a slice that starts at its CIE stays valid
    when given the address of its first byte.
    """
    end, fdes = start, 0
    for entry in EhFrame(data, address).entries():
        if entry.offset < start:
            continue
        if isinstance(entry, FDE):
            if entry.cie.offset < start:
                break  # belongs to a CIE outside the slice
            fdes += 1
        end = entry.end_offset
        if fdes >= max_fdes:
            break
    return bytes(data[start:end]) + b"\0\0\0\0", address + start


LLVM_IR = r"""
declare i64 @ext(i64)
define i64 @fp(i64 %x) "frame-pointer"="all" {
  %a = call i64 @ext(i64 %x)
  ret i64 %a
}
define i64 @big(i64 %x) {
  %buf = alloca [40 x i64]
  %p = getelementptr [40 x i64], ptr %buf, i64 0, i64 %x
  store volatile i64 %x, ptr %p
  %a = call i64 @ext(i64 %x)
  %b = call i64 @ext(i64 %a)
  %c = add i64 %a, %b
  ret i64 %c
}
"""


@functools.cache
def seeds():
    """``[(image bytes, address, relocations | None)]`` to mutate."""
    result = []
    try:
        with open(LIBC, "rb") as f:
            data, address, _ = _eh_frame_of(f.read())
    except OSError:
        data = None
    if data is not None:
        eh_frame = EhFrame(data, address)
        cies = {}
        for entry in eh_frame.entries():
            if not isinstance(entry, FDE):
                cies[entry.augmentation] = cies.get(entry.augmentation, entry.offset)
        result.append(_slice(data, address, 0, 8) + (None,))  # first FDE: PLT expression
        for augmentation in ("zRS", "zPLR"):
            if augmentation in cies:
                result.append(_slice(data, address, cies[augmentation], 4) + (None,))
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(
        reloc="pic", codemodel="default")
    obj = machine.emit_object(llvm.parse_assembly(LLVM_IR))
    eh_data, _, relocations = _eh_frame_of(obj)
    result.append((bytes(eh_data), 0x40000, relocations))  # relocated .o
    result.append((bytes(eh_data), 0x40000, None))         # same bytes, raw pcrel zeros
    return result


# --------------------------------------------------------------------------
# Checking one image
# --------------------------------------------------------------------------

FAKE_REGS = {regno: 0x7FFF0000 + 0x100 * regno for regno in range(17)}


def fake_read_u64(address):
    if address % 8 or not 0x7FFE0000 <= address < 0x80010000:
        raise MemoryReadError(address)
    return (address * 0x9E3779B97F4A7C15) & MASK64


def check_table(fde, table):
    """A decoded table is sorted, contiguous, within the FDE and internally consistent."""
    assert table.pc_begin == fde.pc_begin and table.pc_end == fde.pc_end
    position = fde.pc_begin
    for row in table.rows:
        assert row.start == position and row.start < row.end <= fde.pc_end
        position = row.end
        assert (row.cfa.register is None) != (row.cfa.expression is None)
        regnos = [regno for regno, _ in row.regs]
        assert regnos == sorted(set(regnos))
        for _, rule in row.regs:
            if rule.kind in (RuleKind.EXPRESSION, RuleKind.VAL_EXPRESSION):
                assert isinstance(rule.expression, bytes)
            if rule.kind is RuleKind.REGISTER:
                assert rule.register is not None
        assert table.row_for(row.start) is row and table.row_for(row.end - 1) is row
    if table.rows:
        assert position == fde.pc_end
    # Evaluate every rule (bounded: a few rows) -- only UnwindErrors allowed.
    for row in table.rows[:4]:
        try:
            cfa = row.cfa_value(FAKE_REGS, fake_read_u64)
        except UnwindError:
            cfa = 0x7FFF8000
        assert 0 <= cfa <= MASK64
        for regno, _ in row.regs:
            try:
                value = row.recover(regno, cfa, FAKE_REGS, fake_read_u64)
            except UnwindError:
                continue
            assert value is None or 0 <= value <= MASK64


def exercise(image, address, relocations):
    """Decode everything reachable in ``image``; raise only UnwindError."""
    eh_frame = EhFrame(image, address, relocations)
    fdes = []
    try:
        for entry in eh_frame.entries():
            if isinstance(entry, FDE):
                fdes.append(entry)
    except UnwindError:
        pass
    for fde in fdes:
        try:
            table = decode_fde(fde)
        except UnwindError:
            continue
        check_table(fde, table)
    try:
        for fde in fdes[:3]:
            found = eh_frame.find_fde(fde.pc_begin)
            assert found is None or found.pc_begin <= fde.pc_begin < found.pc_end
    except UnwindError:
        pass


def mutate(image, edits):
    data = bytearray(image)
    for kind, where, value in edits:
        if not data:
            break
        position = where % (len(data) + (kind == "insert"))
        if kind == "set":
            data[position % len(data)] = value
        elif kind == "xor":
            data[position % len(data)] ^= 1 << (value % 8)
        elif kind == "insert":
            data[position:position] = bytes([value]) * (1 + value % 4)
        elif kind == "delete":
            del data[position:position + 1 + value % 8]
        elif kind == "truncate":
            del data[position:]
        elif kind == "u32":  # plausible-looking length / pointer values
            position = position % max(1, len(data) - 3)
            data[position:position + 4] = struct.pack(
                "<I", (0, 1, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x80000000, 4, 8)[value % 8])
    return bytes(data)


# Byte values worth writing: every DW_CFA_* opcode, the primary opcodes'
# high bits, LEB128 continuation bytes, DW_EH_PE_omit/indirect.
INTERESTING_BYTES = st.sampled_from(
    list(range(0x00, 0x17)) + [0x1D, 0x2D, 0x2E, 0x2F, 0x40, 0x7F, 0x80, 0x9B, 0xC0, 0xFF])
EDITS = st.lists(
    st.tuples(st.sampled_from(["set", "xor", "xor", "insert", "delete", "truncate", "u32"]),
              st.integers(0, 1 << 20), st.one_of(st.integers(0, 255), INTERESTING_BYTES)),
    min_size=1, max_size=6)


def test_seeds_decode_cleanly():
    assert len(seeds()) >= 3
    for image, address, relocations in seeds():
        eh_frame = EhFrame(image, address, relocations)
        fdes = eh_frame.fdes()
        assert fdes
        for fde in fdes:
            check_table(fde, decode_fde(fde))


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), edits=EDITS)
def test_mutated_eh_frame_raises_only_unwind_errors(seed, edits):
    image, address, relocations = seeds()[seed % len(seeds())]
    exercise(mutate(image, edits), address, relocations)


def _hdr_for(image, address, hdr_address):
    """A correct .eh_frame_hdr (pcrel ptr, udata4 count, datarel|sdata4 table) for ``image``."""
    fdes = sorted(EhFrame(image, address).fdes(), key=lambda f: f.pc_begin)
    return (
        b"\x01\x1b\x03\x3b"
        + struct.pack("<i", address - (hdr_address + 4))
        + struct.pack("<I", len(fdes))
        + b"".join(struct.pack("<ii", f.pc_begin - hdr_address, address + f.offset - hdr_address)
                   for f in fdes)
    ), fdes


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), edits=EDITS)
def test_mutated_eh_frame_hdr_raises_only_unwind_errors(seed, edits):
    image, address, _ = seeds()[seed % len(seeds())]
    hdr_address = address - 0x1000
    hdr_bytes, fdes = _hdr_for(image, address, hdr_address)
    try:
        hdr = EhFrameHdr(mutate(hdr_bytes, edits), hdr_address)
        eh_frame = EhFrame(image, address, hdr=hdr)
    except UnwindError:
        return
    for fde in fdes:
        for pc in (fde.pc_begin, fde.pc_end - 1, fde.pc_end):
            try:
                found = eh_frame.find_fde(pc)
            except UnwindError:
                continue
            assert found is None or found.pc_begin <= pc < found.pc_end


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(instructions=st.lists(st.one_of(INTERESTING_BYTES, st.integers(0, 255)),
                             max_size=40).map(bytes),
       pc_range=st.sampled_from([0, 1, 0x10, 0x1000]))
def test_random_instruction_streams(instructions, pc_range):
    """Random opcodes/operands in a well-formed FDE: often truncated at the end."""
    body = (struct.pack("<I", 0x1C) + struct.pack("<i", 0x1000) + struct.pack("<i", pc_range)
            + b"\x00" + instructions)
    image = CIE_ZR + struct.pack("<I", len(body)) + body + b"\0\0\0\0"
    exercise(image, 0x400000, None)


# Every DW_OP the evaluator knows, plus CFI-invalid ones it must reject.
DW_OPS = st.sampled_from(
    [0x03, 0x06] + list(range(0x08, 0x30)) + [0x30, 0x31, 0x3F, 0x50, 0x70, 0x77, 0x80, 0x8F,
                                             0x90, 0x91, 0x92, 0x94, 0x96, 0x9C, 0x9F, 0xE0])


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.lists(st.one_of(DW_OPS, st.integers(0, 255)), max_size=30).map(bytes),
       stack=st.lists(st.integers(0, MASK64), max_size=3))
def test_random_expressions_raise_only_unwind_errors(expr, stack):
    try:
        value = evaluate(expr, FAKE_REGS, fake_read_u64, stack, section_offset=0x10)
    except UnwindError:
        return
    assert 0 <= value <= MASK64


@pytest.mark.parametrize("length", range(0, 64, 7))
def test_every_truncation_of_a_real_image(length):
    for image, address, relocations in seeds():
        for cut in range(length, len(image), 64):
            exercise(image[:cut], address, relocations)
