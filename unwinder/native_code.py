"""The native walker's code: ``native_walk.ll``, rendered and compiled once per process.

``unwinder/native_walk.ll`` (package data, next to this module) is the
hand-written LLVM IR of ``osrjit_native_walk`` (signature and contract in
:mod:`unwinder.native`). :func:`walker_ir` renders it through
:mod:`unwinder.nativesrc` with the structures of :mod:`unwinder.native_abi`
(``%T = type {...}`` and field indices) and the constants of
:func:`walker_values`. The per-register part of a step is a loop over the
constant array ``@carried`` (:data:`~unwinder.native_abi.CARRIED_REGISTERS`,
built with :mod:`llvmlite.ir`), which LLVM unrolls fully, so the compiled
step is straight-line code per register.

Exports: :func:`walker_ir`, :data:`NATIVE_SOURCES` (for
``tests/test_nativesrc.py``), :data:`WALK_SYMBOL`, :data:`NATIVE_WALK_TYPE`,
:func:`native_walk_address` and :class:`NativeCode`, the one owner of the
compiled code.
"""
import ctypes
import io
import threading

from . import nativesrc
from .errors import NativeWalkerError
from .native_abi import (CARRIED_REGISTERS, FRAME_EXACT, FRAME_HAS_RA_SLOT, FRAME_SIGNAL,
                         FRAME_TRANSLATED, INFO_END_SHIFT, INFO_MODULE_SHIFT, NO_MODULE,
                         RA_CARRIED, RULE_GAP, RULE_NOT_NATIVE, RULE_SIGNAL, RULE_UNKNOWN,
                         SAME_VALUE_CODE, SLOT_BYTES, STATE_EXACT, STATE_HAS_PREV,
                         STATE_TRANSLATED, UNDEFINED_CODE, WALK_REGISTERS, EndReason,
                         ModuleEntry, OutFrame, RowTable, RuleRecord, TablesHeader,
                         TranslationHeader, TranslationPair, WalkState)
from .space import AddressSpace
from .x86_64 import RA, RSP

__all__ = ["WALK_SYMBOL", "NATIVE_WALK_TYPE", "NATIVE_SOURCES", "NativeCode", "walker_ir",
           "walker_values", "native_walk_address"]

WALK_SYMBOL = "osrjit_native_walk"

#: The structures ``native_walk.ll`` names (``%T`` and ``${T.field}``).
WALKER_STRUCTS = (RuleRecord, RowTable, ModuleEntry, TablesHeader, TranslationHeader, WalkState,
                  OutFrame)
#: Bytes of one u64 word (the IR reads the TranslationPair array as words).
_WORD_BYTES = ctypes.sizeof(ctypes.c_uint64)
assert all(f[1] is ctypes.c_uint64 for f in TranslationPair._fields_)

assert CARRIED_REGISTERS[RA_CARRIED] == RA


def walker_values():
    """The constants ``native_walk.ll`` uses, by placeholder name.

    ``END_<name>`` is ``EndReason.<name>``; ``CARRIED_REGISTERS`` is the
    typed constant ``[N x i64] [i64 16, ...]`` and ``N_CARRIED`` its length;
    ``REGS_BYTES`` the size of ``WalkState.regs`` in bytes; ``PAIR_WORDS``,
    ``PAIR_SLOT_WORD`` and ``PAIR_ORIGINAL_WORD`` the size of a
    :class:`TranslationPair` and the offsets of its fields in u64 words; the
    rest are the :mod:`unwinder.native_abi` constants of the same name.
    """
    from llvmlite import ir
    i64 = ir.IntType(64)
    carried = ir.Constant(ir.ArrayType(i64, len(CARRIED_REGISTERS)), list(CARRIED_REGISTERS))
    values = {f"END_{reason.name}": int(reason) for reason in EndReason}
    values.update(
        CARRIED_REGISTERS=str(carried), N_CARRIED=len(CARRIED_REGISTERS), RA_CARRIED=RA_CARRIED,
        WALK_REGISTERS=WALK_REGISTERS, REGS_BYTES=WalkState.regs.size, RA=RA, RSP=RSP,
        SLOT_BYTES=SLOT_BYTES, SAME_VALUE_CODE=SAME_VALUE_CODE, UNDEFINED_CODE=UNDEFINED_CODE,
        NO_MODULE=NO_MODULE,
        RULE_GAP=RULE_GAP, RULE_UNKNOWN=RULE_UNKNOWN, RULE_SIGNAL=RULE_SIGNAL,
        RULE_NOT_NATIVE=RULE_NOT_NATIVE,
        STATE_EXACT=STATE_EXACT, STATE_TRANSLATED=STATE_TRANSLATED, STATE_HAS_PREV=STATE_HAS_PREV,
        FRAME_SIGNAL=FRAME_SIGNAL, FRAME_TRANSLATED=FRAME_TRANSLATED, FRAME_EXACT=FRAME_EXACT,
        FRAME_HAS_RA_SLOT=FRAME_HAS_RA_SLOT,
        INFO_END_SHIFT=INFO_END_SHIFT, INFO_MODULE_SHIFT=INFO_MODULE_SHIFT,
        PAIR_WORDS=ctypes.sizeof(TranslationPair) // _WORD_BYTES,
        PAIR_SLOT_WORD=TranslationPair.slot.offset // _WORD_BYTES,
        PAIR_ORIGINAL_WORD=TranslationPair.original.offset // _WORD_BYTES)
    return values


def walker_ir():
    """The LLVM IR module text of ``osrjit_native_walk`` (one function, C ABI)."""
    return nativesrc.render_file("unwinder", "native_walk.ll", structs=WALKER_STRUCTS,
                                 values=walker_values())


#: The hand-written native sources of this module (see :mod:`unwinder.nativesrc`).
NATIVE_SOURCES = {"native_walk.ll": walker_ir}

_WALK_ARGS = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64)
#: ``osrjit_native_walk`` as a ctypes prototype (the call releases the GIL).
NATIVE_WALK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, *_WALK_ARGS)
#: The same, keeping the GIL (what :class:`~unwinder.native_walker.NativeWalker`
#: calls): a walk never blocks, and giving the GIL away for microseconds lets
#: another thread take it for up to the interpreter's switch interval (5 ms) —
#: in the middle of a stop-the-world, whose pause that would be.
_WALK_CALL_TYPE = ctypes.PYFUNCTYPE(ctypes.c_int64, *_WALK_ARGS)


class NativeCode:
    """The compiled walker: one LLJIT per process, never unloaded.

    Lifetime: the LLJIT and the resource tracker are kept for the life of the
    process (native callers may hold :attr:`address`), so there is no close.
    The object is registered with :meth:`AddressSpace.current_process` so a
    thread interrupted inside the walker can itself be unwound. Get it with
    :meth:`get`.
    """

    _instance = None
    _lock = threading.Lock()

    def __init__(self):
        import llvmlite.binding as llvm
        from .elf import open_elf
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        tm = llvm.Target.from_default_triple().create_target_machine(
            reloc="pic", codemodel="small", opt=3)
        try:
            mod = llvm.parse_assembly(f'target triple = "{tm.triple}"\n' + walker_ir())
            mod.data_layout = str(tm.target_data)
            mod.verify()
            pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
            pb.getModulePassManager().run(mod, pb)
            mod.verify()
        except RuntimeError as e:
            raise NativeWalkerError(f"cannot compile the native walker: {e}") from e
        self.ir_optimized = str(mod)
        self.obj = tm.emit_object(mod)
        self.tm = tm
        self.lljit = llvm.create_lljit_compiler(tm)
        self.tracker = (llvm.JITLibraryBuilder().add_object_img(self.obj)
                        .export_symbol(WALK_SYMBOL).link(self.lljit, "unwinder.native-walk"))
        self.address = self.tracker[WALK_SYMBOL]
        self.function = _WALK_CALL_TYPE(self.address)
        elf = open_elf(io.BytesIO(self.obj))
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(WALK_SYMBOL)[0]
        text = self.address - sym["st_value"]
        self.handle = AddressSpace.current_process().add_code_object(
            self.obj, {".text": text}, name="unwinder.native-walk")

    @classmethod
    def get(cls):
        """The process's compiled walker (compiled on first use)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def native_walk_address():
    """Absolute address of ``osrjit_native_walk`` (compiles it on first use)."""
    return NativeCode.get().address
