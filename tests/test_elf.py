"""unwinder.elf: ELF files freed by reference counting alone, same answers as ELFFile."""
import gc
import io

from elftools.elf.elffile import ELFFile

from jitutil import target_machine
from unwinder.elf import open_elf

IR = """
define i64 @f(i64 %x) {
  %y = mul i64 %x, 3
  ret i64 %y
}
"""


def _object():
    import llvmlite.binding as llvm
    tm = target_machine()
    mod = llvm.parse_assembly(f'target triple = "{tm.triple}"\n' + IR)
    return tm.emit_object(mod)


def _garbage_after(parse):
    """Objects only the cyclic collector would free, left by one ``parse()``."""
    gc.collect()
    gc.disable()
    try:
        parse()
        return gc.collect()
    finally:
        gc.enable()


def _touch(elf):
    names = [s.name for s in elf.iter_sections()]
    symtab = elf.get_section_by_name(".symtab")
    return names, [s.name for s in symtab.iter_symbols()]


def test_open_elf_reads_what_elffile_reads_and_leaves_no_cycles():
    obj = _object()
    assert _touch(open_elf(io.BytesIO(obj))) == _touch(ELFFile(io.BytesIO(obj)))
    # The stock file leaves cyclic garbage (so this test can tell the difference) ...
    assert _garbage_after(lambda: _touch(ELFFile(io.BytesIO(obj)))) > 100
    # ... open_elf's leaves none.
    assert _garbage_after(lambda: _touch(open_elf(io.BytesIO(obj)))) == 0


def test_open_elf_on_libc_sections_and_notes():
    import ctypes.util
    import os
    path = "/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(path):
        path = ctypes.util.find_library("c")
    with open(path, "rb") as f:
        data = f.read()
    ours, stock = open_elf(io.BytesIO(data)), ELFFile(io.BytesIO(data))
    assert [s.name for s in ours.iter_sections()] == [s.name for s in stock.iter_sections()]
    # Notes (parsed with the rebuilt .note.gnu.property parser) read the same.
    notes = [(n["n_type"], str(n.get("n_desc"))) for s in ours.iter_sections()
             if s["sh_type"] == "SHT_NOTE" for n in s.iter_notes()]
    assert notes == [(n["n_type"], str(n.get("n_desc"))) for s in stock.iter_sections()
                     if s["sh_type"] == "SHT_NOTE" for n in s.iter_notes()]
    if os.path.realpath(path).startswith("/usr/lib/x86_64-linux-gnu/libc.so"):
        # This machine's libc has one; other libcs may not.
        assert any(t == "NT_GNU_PROPERTY_TYPE_0" for t, _ in notes)
    assert _garbage_after(lambda: [s.name for s in open_elf(io.BytesIO(data)).iter_sections()]) == 0
