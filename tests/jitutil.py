"""Test-side helper: compile textual LLVM IR into LLJIT and register it with the unwinder.

Kept independent of :mod:`osrjit` so the unwinder's tests exercise only the
unwinder. The returned :class:`Loaded` owns the JIT and the resource tracker:
keep it alive while calling its code.
"""
import io
from dataclasses import dataclass

import llvmlite.binding as llvm
from elftools.elf.elffile import ELFFile

_initialized = False


def _init():
    global _initialized
    if not _initialized:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _initialized = True


def target_machine(opt=2):
    _init()
    return llvm.Target.from_default_triple().create_target_machine(
        reloc="pic", codemodel="small", opt=opt)


@dataclass
class Loaded:
    jit: object
    tracker: object
    obj: bytes
    addresses: dict
    text_address: int
    text_size: int
    handle: object = None

    @property
    def text_range(self):
        return self.text_address, self.text_address + self.text_size


def symbol_value(obj, name):
    """``st_value`` of symbol ``name`` in a relocatable object (offset in its section)."""
    elf = ELFFile(io.BytesIO(obj))
    sym = elf.get_section_by_name(".symtab").get_symbol_by_name(name)[0]
    return sym["st_value"]


def load_ir(ir_text, exports, imports=None, *, space=None, name="test", jit=None):
    """Emit ``ir_text`` as an object, link it into LLJIT, register it with ``space``."""
    tm = target_machine()
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    obj = tm.emit_object(mod)
    jit = jit or llvm.create_lljit_compiler(tm)
    builder = llvm.JITLibraryBuilder().add_object_img(obj)
    for sym, addr in (imports or {}).items():
        builder.import_symbol(sym, addr)
    for sym in exports:
        builder.export_symbol(sym)
    tracker = builder.link(jit, name)
    addresses = {s: tracker[s] for s in exports}
    text_address = addresses[exports[0]] - symbol_value(obj, exports[0])
    text_size = ELFFile(io.BytesIO(obj)).get_section_by_name(".text")["sh_size"]
    loaded = Loaded(jit, tracker, obj, addresses, text_address, text_size)
    if space is not None:
        loaded.handle = space.add_code_object(obj, {".text": text_address}, name=name)
    return loaded
