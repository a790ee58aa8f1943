"""Every hand-written ``.ll``/``.s`` file of the three packages renders and verifies,
and the renderer refuses what would let a layout or a constant drift."""
import ctypes
import importlib
import pathlib
import pkgutil

import llvmlite.binding as llvm
import pytest

from unwinder import nativesrc
from unwinder.errors import NativeSourceError

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("unwinder", "deopt", "osrjit")


def _modules():
    for pkg in PACKAGES:
        yield importlib.import_module(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=pkg + "."):
            yield importlib.import_module(info.name)


def _sources():
    """``{(package dir, file name): render}`` from every module's NATIVE_SOURCES."""
    found = {}
    for mod in _modules():
        folder = pathlib.Path(mod.__file__).parent.relative_to(ROOT)
        for filename, render in getattr(mod, "NATIVE_SOURCES", {}).items():
            found[(str(folder), filename)] = render
    return found


def _tm():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    return llvm.Target.from_default_triple().create_target_machine(reloc="pic", codemodel="small")


def test_every_file_is_rendered_by_its_module():
    on_disk = {(str(p.parent.relative_to(ROOT)), p.name)
               for pkg in PACKAGES for ext in ("*.ll", "*.s") for p in (ROOT / pkg).rglob(ext)}
    assert on_disk <= set(_sources()), f"files no module renders: {sorted(on_disk - set(_sources()))}"


@pytest.mark.parametrize("key", sorted(_sources()), ids=lambda k: f"{k[0]}/{k[1]}")
def test_renders_and_verifies(key):
    text = _sources()[key]()
    tm = _tm()
    if key[1].endswith(".s"):
        text = f'target triple = "{tm.triple}"\n' + nativesrc.module_asm(text)
    mod = llvm.parse_assembly(text)
    mod.verify()
    assert tm.emit_object(mod)


class Block(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int64), ("cells", ctypes.c_uint64 * 3),
                ("small", ctypes.c_uint32), ("where", ctypes.c_void_p)]


def test_struct_type_and_field_placeholders_follow_ctypes():
    text = nativesrc.render(
        "define i64 @f(ptr %b) {\n"
        "  %p = getelementptr %Block, ptr %b, i32 0, i32 ${Block.where}\n"
        "  %q = getelementptr i8, ptr %b, i64 ${Block.small@}\n"
        "  ret i64 ${PARKED}\n}\n", structs=[Block], values={"PARKED": 3})
    assert text.splitlines()[0] == "%Block = type { i64, [3 x i64], i32, ptr }"
    assert "i32 0, i32 3" in text and "i64 32" in text and "ret i64 3" in text
    mod = llvm.parse_assembly(text)
    mod.verify()
    td = llvm.create_target_data("e-m:e-p270:32:32-p271:32:32-p272:64:64-i64:64-i128:128-f80:128-n8:16:32:64-S128")
    ty = next(iter(mod.struct_types))
    for i, (fname, *_ ) in enumerate(Block._fields_):
        assert td.get_element_offset(ty, i) == getattr(Block, fname).offset


def test_missing_and_unused_placeholders_are_refused():
    with pytest.raises(NativeSourceError, match="no value.*B"):
        nativesrc.render("${A} ${B}", values={"A": 1})
    with pytest.raises(NativeSourceError, match="unused.*C"):
        nativesrc.render("${A}", values={"A": 1, "C": 2})
    with pytest.raises(NativeSourceError, match="unused.*Block"):
        nativesrc.render("${A}", values={"A": 1}, structs=[Block])
    with pytest.raises(NativeSourceError, match="no field"):
        nativesrc.render("${Block.nope}", structs=[Block])


def test_packed_layout_is_refused():
    class Packed(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64)]
    with pytest.raises(NativeSourceError, match="packed"):
        nativesrc.struct_type(Packed)
