"""Scenario: our unwind tables agree with binutils ``readelf`` on real libraries.

For every FDE of this machine's libc.so.6 and libpython3.11, and of an object
file emitted by llvmlite, the table from ``rules.decode_fde`` must give the
same CFA rule and register rules as ``readelf --debug-dump=frames-interp`` at
every row address readelf prints. Every FDE must also be reachable through
``.eh_frame_hdr``.

readelf's conventions (binutils ``dwarf.c``, ``display_debug_frames`` and
``frame_display_row``), and how we match them:

* It prints a row at *every* advance instruction, with the state before the
  advance, plus a final row; rows may repeat an address (advance by 0) or
  an unchanged state. We compare the *last* row printed for each address
  against ``table.row_for(address)``; our table merges equal neighbours.
* A row at an address >= ``pc_end`` covers no instruction; we skip it.
* An FDE whose instructions are all ``DW_CFA_nop`` prints no rows: its one
  row is the CIE's state, which readelf prints under the CIE; we compare
  with that.
* Columns are every register the CIE or FDE mentions. A column a register
  has before any instruction sets it, or after ``DW_CFA_restore`` of a
  register the CIE did not mention, prints ``u`` -- the same as
  ``DW_CFA_undefined``. We leave such registers out of the row (default:
  same value), so ``u`` matches "absent or UNDEFINED".
* ``c+N`` is OFFSET(N), ``v+N`` VAL_OFFSET(N), ``s`` SAME_VALUE, ``exp`` /
  ``vexp`` EXPRESSION / VAL_EXPRESSION (the expression itself is not
  shown), and a REGISTER rule prints ``r<N> (<name>)``. The return-address
  column is headed ``ra``.
* The CFA prints as ``<reg name><%+d offset>`` (offset truncated to int) or
  ``exp`` for DW_CFA_def_cfa_expression.
* By default readelf follows ``.gnu_debuglink`` to a separate debug file and
  dumps its (NOBITS) .eh_frame too, then exits 1; we pass
  ``no-follow-links`` and read only the first ``.eh_frame`` dump.
* For relocatable objects readelf applies the ``.rela.eh_frame``
  relocations; we pass the same relocations to :class:`EhFrame`.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from unwinder import x86_64
from unwinder.cfi import CIE, FDE, EhFrame, EhFrameHdr
from unwinder.rules import RuleKind, decode_fde

READELF = shutil.which("readelf")
pytestmark = pytest.mark.skipif(READELF is None, reason="binutils readelf is not installed")


# --------------------------------------------------------------------------
# Locating the libraries
# --------------------------------------------------------------------------

def _mapped_path(fragment):
    """Path of a file mapped into this process whose basename contains ``fragment``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and fragment in os.path.basename(parts[5].strip()):
                    return parts[5].strip()
    except OSError:
        pass
    return None


def libc_path():
    for candidate in ("/lib/x86_64-linux-gnu/libc.so.6", _mapped_path("libc.so.6")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("libc.so.6 not found")


def libpython_path():
    """The shared libpython of the running interpreter (mapped, or from sysconfig)."""
    candidates = [_mapped_path(f"libpython{sys.version_info.major}.{sys.version_info.minor}")]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    for name in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
        if name:
            candidates.append(os.path.join(libdir, name))
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and ".so" in candidate:
            return os.path.realpath(candidate)
    pytest.skip("this Python has no shared libpython")


# --------------------------------------------------------------------------
# ELF helpers
# --------------------------------------------------------------------------

def load_sections(path):
    """``(eh_frame_bytes, eh_frame_addr, hdr_bytes | None, hdr_addr, relocations | None)``."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        eh = elf.get_section_by_name(".eh_frame")
        data, address = eh.data(), eh["sh_addr"]
        hdr = elf.get_section_by_name(".eh_frame_hdr")
        hdr_data = hdr.data() if hdr is not None else None
        hdr_address = hdr["sh_addr"] if hdr is not None else None
        relocations = None
        rela = elf.get_section_by_name(".rela.eh_frame")
        if isinstance(rela, RelocationSection):
            # An ET_REL's sections are at address 0, so S + A is the
            # .text-relative address readelf shows.
            symtab = elf.get_section(rela["sh_link"])
            relocations = {}
            for reloc in rela.iter_relocations():
                symbol = symtab.get_symbol(reloc["r_info_sym"])
                relocations[reloc["r_offset"]] = symbol["st_value"] + reloc["r_addend"]
    return data, address, hdr_data, hdr_address, relocations


# --------------------------------------------------------------------------
# readelf output
# --------------------------------------------------------------------------

_ENTRY_RE = re.compile(
    r"^([0-9a-f]{8}) [0-9a-f]+ [0-9a-f]+ "
    r"(?:(CIE) .*|(FDE) cie=[0-9a-f]{8} pc=([0-9a-f]+)\.\.([0-9a-f]+))$")
# A REGISTER rule prints as "r12 (r12)"; fold it into one token "=12".
_REGISTER_RULE_RE = re.compile(r"\br(\d+) \([^)]*\)")


class ReadelfEntry:
    __slots__ = ("offset", "kind", "pc_begin", "pc_end", "columns", "rows")

    def __init__(self, offset, kind, pc_begin=None, pc_end=None):
        self.offset = offset
        self.kind = kind
        self.pc_begin = pc_begin
        self.pc_end = pc_end
        self.columns = []
        self.rows = {}  # loc -> (cfa text, [column texts]); last row per loc wins


def parse_readelf(text):
    """``{section offset: ReadelfEntry}`` for the first .eh_frame dump in ``text``."""
    entries = {}
    current = None
    seen_contents = False
    for line in text.splitlines():
        if not line:
            continue
        first = line[0]
        if first == "C" and line.startswith("Contents of"):
            if seen_contents:
                break  # a second dump (e.g. the .gnu_debuglink file): not ours
            seen_contents = True
            continue
        if first == "s" and line.startswith("section '"):
            break
        if first == " ":
            if line.lstrip().startswith("LOC") and current is not None:
                current.columns = line.split()[2:]
            continue
        match = _ENTRY_RE.match(line)
        if match:
            offset = int(match.group(1), 16)
            if match.group(2):
                current = ReadelfEntry(offset, "CIE")
            else:
                current = ReadelfEntry(offset, "FDE", int(match.group(4), 16),
                                       int(match.group(5), 16))
            entries[offset] = current
            continue
        if current is None or "ZERO terminator" in line:
            continue
        fields = _REGISTER_RULE_RE.sub(r"=\1", line).split()
        current.rows[int(fields[0], 16)] = (fields[1], fields[2:])
    return entries


def run_readelf(path):
    # no-follow-links: do not also dump the .gnu_debuglink file (readelf
    # exits 1 on its NOBITS .eh_frame).
    result = subprocess.run(
        [READELF, "--debug-dump=frames-interp,no-follow-links", path],
        capture_output=True, text=True)
    assert result.returncode == 0 and "Contents of the .eh_frame section" in result.stdout, (
        result.returncode, result.stderr[:2000])
    return parse_readelf(result.stdout)


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def _column_regno(name, cie):
    if name == "ra":
        return cie.return_address_register
    if name in x86_64.REGISTER_NUMBERS:
        return x86_64.REGISTER_NUMBERS[name]
    if re.fullmatch(r"r\d+", name):
        return int(name[1:])
    raise AssertionError(f"unknown readelf column {name!r}")


def _render_cfa(cfa):
    if cfa.expression is not None:
        return "exp"
    offset = (cfa.offset + 2**31) % 2**32 - 2**31  # readelf prints (int)
    name = x86_64.REGISTER_NAMES.get(cfa.register, f"r{cfa.register}")
    return f"{name}{offset:+d}"


def _rule_matches(text, rule):
    """Whether readelf's column text agrees with our rule (None = register absent)."""
    if text == "u":
        return rule is None or rule.kind is RuleKind.UNDEFINED
    if rule is None:
        return False
    kind = rule.kind
    if text == "s":
        return kind is RuleKind.SAME_VALUE
    if text == "exp":
        return kind is RuleKind.EXPRESSION
    if text == "vexp":
        return kind is RuleKind.VAL_EXPRESSION
    if text[0] == "=":
        return kind is RuleKind.REGISTER and rule.register == int(text[1:])
    if text[0] in "cv":
        wanted = RuleKind.OFFSET if text[0] == "c" else RuleKind.VAL_OFFSET
        offset = (rule.offset + 2**31) % 2**32 - 2**31
        return kind is wanted and offset == int(text[1:])
    raise AssertionError(f"unknown readelf rule {text!r}")


def compare_fde(fde, table, expected, cie_entry):
    """Mismatch descriptions between our table and readelf's entry for ``fde``."""
    problems = []
    where = f"FDE@{fde.offset:#x}"
    if (fde.pc_begin, fde.pc_end) != (expected.pc_begin, expected.pc_end):
        return [f"{where}: pc range {fde.pc_begin:#x}..{fde.pc_end:#x} != "
                f"{expected.pc_begin:#x}..{expected.pc_end:#x}"]
    if expected.rows:
        columns, rows = expected.columns, expected.rows
    else:
        # All-nops FDE: readelf prints nothing; its state is the CIE's row.
        columns = cie_entry.columns
        rows = {fde.pc_begin: row for row in cie_entry.rows.values()}
    regnos = [_column_regno(name, fde.cie) for name in columns]
    column_set = set(regnos)
    for loc, (cfa_text, values) in rows.items():
        if not fde.pc_begin <= loc < fde.pc_end:
            continue  # covers no instruction (see module docstring)
        row = table.row_for(loc)
        if row is None:
            problems.append(f"{where}: no row at {loc:#x}")
            continue
        ours = _render_cfa(row.cfa)
        if ours != cfa_text:
            problems.append(f"{where} @{loc:#x}: CFA {ours} != readelf {cfa_text}")
        if len(values) != len(regnos):
            problems.append(f"{where} @{loc:#x}: cannot split readelf row {values}")
            continue
        explicit = dict(row.regs)
        for regno, text in zip(regnos, values):
            if not _rule_matches(text, explicit.get(regno)):
                problems.append(
                    f"{where} @{loc:#x}: r{regno} {explicit.get(regno)} != readelf {text}")
        extra = set(explicit) - column_set
        if extra:
            problems.append(f"{where} @{loc:#x}: registers {sorted(extra)} not in readelf columns")
    return problems


def check_against_readelf(path, expect_hdr=True):
    data, address, hdr_data, hdr_address, relocations = load_sections(path)
    expected = run_readelf(path)
    eh_frame = EhFrame(data, address, relocations)

    problems = []
    fdes = []
    for entry in eh_frame.entries():
        readelf_entry = expected.get(entry.offset)
        if readelf_entry is None:
            problems.append(f"entry@{entry.offset:#x}: readelf has no entry there")
            continue
        if isinstance(entry, CIE):
            assert readelf_entry.kind == "CIE", entry
            continue
        assert isinstance(entry, FDE)
        fdes.append(entry)
        table = decode_fde(entry)
        problems += compare_fde(entry, table, readelf_entry, expected[entry.cie.offset])
    readelf_fdes = sum(1 for e in expected.values() if e.kind == "FDE")
    assert len(fdes) == readelf_fdes, (len(fdes), readelf_fdes)
    assert not problems, f"{len(problems)} mismatches, first ones:\n" + "\n".join(problems[:30])

    if expect_hdr:
        check_hdr(data, address, hdr_data, hdr_address, fdes)
    return fdes


def check_hdr(data, address, hdr_data, hdr_address, fdes):
    """Every FDE's pc_begin (and last byte) is found through .eh_frame_hdr alone."""
    assert hdr_data is not None
    hdr = EhFrameHdr(hdr_data, hdr_address)
    assert hdr.eh_frame_address == address
    assert hdr.has_table and hdr.fde_count == len(fdes)

    # A fresh EhFrame with the hdr decodes only the FDE it finds and its CIE.
    probe = max(fdes, key=lambda f: f.offset)
    lazy = EhFrame(data, address, hdr=hdr)
    found = lazy.find_fde(probe.pc_begin)
    assert found is not None and found.offset == probe.offset
    assert list(lazy._fdes) == [probe.offset]
    assert list(lazy._cies) == [probe.cie.offset]

    starts = {}
    for fde in fdes:
        starts[fde.pc_begin] = starts.get(fde.pc_begin, 0) + 1
    misses = []
    for fde in fdes:
        if fde.pc_begin == fde.pc_end or starts[fde.pc_begin] > 1:
            continue  # empty or ambiguous: no pc belongs to exactly this FDE
        assert hdr.lookup(fde.pc_begin) == address + fde.offset
        for pc in (fde.pc_begin, fde.pc_end - 1):
            found = lazy.find_fde(pc)
            if found is None or found.offset != fde.offset:
                misses.append((hex(pc), fde.offset, found and found.offset))
        # The index-based lookup agrees.
        assert fde.section.find_fde(fde.pc_begin).offset == fde.offset
    assert not misses, misses[:10]
    below = min(f.pc_begin for f in fdes) - 1
    assert lazy.find_fde(below) is None


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------

def test_libc_matches_readelf():
    started = time.perf_counter()
    fdes = check_against_readelf(libc_path())
    assert len(fdes) > 1000
    assert time.perf_counter() - started < 30


def test_libpython_matches_readelf():
    started = time.perf_counter()
    fdes = check_against_readelf(libpython_path())
    assert len(fdes) > 1000
    assert time.perf_counter() - started < 30


LLVM_IR = r"""
declare i64 @ext(i64)
declare void @ext_many(i64, i64, i64, i64, i64, i64, i64, i64, i64)

define i64 @with_frame_pointer(i64 %x) "frame-pointer"="all" {
  %a = call i64 @ext(i64 %x)
  %b = add i64 %a, 1
  ret i64 %b
}

define i64 @big_frame(i64 %x) {
  %buf = alloca [64 x i64]
  %p = getelementptr [64 x i64], ptr %buf, i64 0, i64 %x
  store volatile i64 %x, ptr %p
  %c = call i64 @ext(i64 %x)
  %d = call i64 @ext(i64 %c)
  %e = add i64 %c, %d
  ret i64 %e
}

define i64 @callee_saved(i64 %a, i64 %b, i64 %c, i64 %d, i64 %e, i64 %f) {
  %r1 = call i64 @ext(i64 %a)
  %r2 = call i64 @ext(i64 %b)
  %r3 = call i64 @ext(i64 %c)
  %r4 = call i64 @ext(i64 %d)
  %r5 = call i64 @ext(i64 %e)
  call void @ext_many(i64 %r1, i64 %r2, i64 %r3, i64 %r4, i64 %r5, i64 %f, i64 %a, i64 %b, i64 %c)
  %s1 = add i64 %r1, %r2
  %s2 = add i64 %s1, %r3
  %s3 = add i64 %s2, %r4
  %s4 = add i64 %s3, %r5
  %s5 = add i64 %s4, %a
  %s6 = add i64 %s5, %b
  %s7 = add i64 %s6, %c
  ret i64 %s7
}
"""


def llvm_object_bytes():
    """An x86-64 ELF relocatable object emitted by llvmlite from :data:`LLVM_IR`."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(LLVM_IR)
    module.verify()
    target = llvm.Target.from_triple("x86_64-unknown-linux-gnu")
    machine = target.create_target_machine(reloc="pic", codemodel="default")
    return machine.emit_object(module)


def test_llvmlite_object_matches_readelf(tmp_path):
    path = tmp_path / "jit.o"
    path.write_bytes(llvm_object_bytes())
    _, _, _, _, relocations = load_sections(str(path))
    assert relocations, "LLVM relocates .eh_frame pc_begin fields"
    fdes = check_against_readelf(str(path), expect_hdr=False)
    assert len(fdes) == 3
    # pc_begin comes from the relocation (.text + addend), not the stored 0.
    assert fdes[0].pc_begin == 0
    assert [f.pc_begin < f.pc_end for f in fdes] == [True] * 3
    assert fdes[1].pc_begin >= fdes[0].pc_end
