"""The walker over its three memory backends, and walks that must end cleanly.

* A live stack copied into a :class:`SnapshotMemory` walks exactly like the
  live one; a truncated copy ends with the unreadable address recorded.
* The same JIT code run under unicorn walks through :class:`UnicornMemory`.
* A pc in no module falls back to frame pointers and says so; a frame-pointer
  loop, a step limit and unreadable memory end the walk with a reason.
"""
import ctypes
import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

import unwinder
from unwinder import AddressSpace, MemoryReadError, ProcessMemory, SnapshotMemory, UnicornMemory, walk
from unwinder.walk import END_CFA_NOT_INCREASING, END_RA_ZERO, END_STEP_LIMIT, FALLBACK_FRAME_POINTER
from unwinder.x86_64 import RA, RBP, RSP

from childproc import run_child
from scenarios_ir import RECURSION_IR


def snapshot_scenario(depth):
    from jitutil import load_ir
    space = AddressSpace.current_process()
    loaded = load_ir(RECURSION_IR, ["rec"], space=space, name="jit:rec")
    out = {}

    @ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    def callback(_):
        def inside(regs):
            live = list(walk(regs, ProcessMemory(), space, caller_frame=True))
            top = live[-1].cfa
            base = regs[RSP]
            data = ProcessMemory().read(base, top - base)
            snap = list(walk(regs, SnapshotMemory(base, data), space, caller_frame=True))
            # Cut the copy in the middle of the JIT frames.
            cut = live[len(live) // 2].cfa
            short = list(walk(regs, SnapshotMemory(base, data[:cut - base]), space, caller_frame=True))
            key = lambda fs: [(f.pc, f.cfa, f.ra_slot, f.module, f.end_reason) for f in fs]
            out.update(live=key(live), snap=key(snap), short=key(short), cut=cut)
        unwinder.with_captured_registers(inside)
        return 0

    rec = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(loaded.addresses["rec"])
    rec(depth, ctypes.cast(callback, ctypes.c_void_p))
    return out


def test_snapshot_walk_equals_live_walk_and_truncation_is_reported():
    out = run_child(snapshot_scenario, 40)
    assert out["snap"] == out["live"]
    short = out["short"]
    assert short[:-1] == out["live"][:len(short) - 1]
    reason = short[-1][4]
    assert reason.startswith("cannot read stack memory at ")
    assert int(reason.rsplit(" ", 1)[1], 16) >= out["cut"] - 64


# --- unicorn: the same machine code on an emulated CPU -----------------------

_R_X86_64_PC32, _R_X86_64_PLT32 = 2, 4
CODE_BASE = 0x400000
STACK_BASE, STACK_SIZE = 0x7F0000, 0x10000
CALLBACK = 0x500000        # "callback" address: emulation stops when it is fetched
EXIT = 0x501000            # the outermost return address: nothing runs there


def relocate_text(obj, base):
    """Apply .rela.text of a one-section object loaded at ``base`` (PC32/PLT32 only)."""
    elf = ELFFile(io.BytesIO(obj))
    text = bytearray(elf.get_section_by_name(".text").data())
    rela = elf.get_section_by_name(".rela.text")
    symtab = elf.get_section_by_name(".symtab")
    text_index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".text")
    for rel in (rela.iter_relocations() if rela is not None else ()):
        sym = symtab.get_symbol(rel["r_info_sym"])
        assert rel["r_info_type"] in (_R_X86_64_PC32, _R_X86_64_PLT32)
        assert sym["st_shndx"] == text_index, sym.name
        value = base + sym["st_value"] + rel["r_addend"] - (base + rel["r_offset"])
        struct.pack_into("<i", text, rel["r_offset"], value)
    return bytes(text)


def test_walk_an_emulated_stack_through_unicorn_memory():
    from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
    from unicorn.x86_const import (UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
                                   UC_X86_REG_RBP, UC_X86_REG_RBX, UC_X86_REG_RDI, UC_X86_REG_RIP,
                                   UC_X86_REG_RSI, UC_X86_REG_RSP)
    from jitutil import symbol_value, target_machine
    import llvmlite.binding as llvm

    obj = target_machine().emit_object(llvm.parse_assembly(RECURSION_IR))
    text = relocate_text(obj, CODE_BASE)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE_BASE, 0x1000)
    uc.mem_write(CODE_BASE, text)
    uc.mem_map(STACK_BASE, STACK_SIZE)
    uc.mem_map(CALLBACK, 0x2000)
    sp = STACK_BASE + STACK_SIZE - 0x100
    uc.mem_write(sp, struct.pack("<Q", EXIT))      # return address of the outermost call
    uc.reg_write(UC_X86_REG_RSP, sp)
    uc.reg_write(UC_X86_REG_RDI, 7)
    uc.reg_write(UC_X86_REG_RSI, CALLBACK)
    uc.hook_add(UC_HOOK_CODE, lambda uc, addr, size, _: uc.emu_stop(), begin=CALLBACK, end=CALLBACK)
    uc.emu_start(CODE_BASE + symbol_value(obj, "rec"), EXIT)
    assert uc.reg_read(UC_X86_REG_RIP) == CALLBACK

    space = AddressSpace()
    space.add_code_object(obj, {".text": CODE_BASE}, name="emulated:rec")
    regs = {RA: uc.reg_read(UC_X86_REG_RIP), RSP: uc.reg_read(UC_X86_REG_RSP)}
    for dwarf, ucreg in ((3, UC_X86_REG_RBX), (6, UC_X86_REG_RBP), (12, UC_X86_REG_R12),
                         (13, UC_X86_REG_R13), (14, UC_X86_REG_R14), (15, UC_X86_REG_R15)):
        regs[dwarf] = uc.reg_read(ucreg)
    frames = list(walk(regs, UnicornMemory(uc), space))
    # Frame 0: the callback address (no module: frame-pointer fallback would be
    # wrong there, so stop the walk from it by stepping to its caller by hand).
    assert frames[0].pc == CALLBACK and frames[0].module is None
    # From the callback's return address on, the JIT frames are walked by CFI.
    ret = UnicornMemory(uc).read_u64(regs[RSP])
    regs2 = {**regs, RA: ret, RSP: regs[RSP] + 8}
    frames = list(walk(regs2, UnicornMemory(uc), space, caller_frame=True))
    assert [f.symbol for f in frames[:8]] == ["rec"] * 8
    assert all(f.module == "emulated:rec" and f.fallback is None for f in frames[:8])
    assert frames[8].pc == EXIT
    # The outermost rec frame's return-address slot is the one we wrote.
    assert frames[7].ra_slot == sp
    assert [f.cfa for f in frames[:8]] == sorted(f.cfa for f in frames[:8])


def test_unicorn_memory_reports_unmapped_reads():
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x10000, 0x1000)
    uc.mem_write(0x10008, struct.pack("<Q", 0x1122334455667788))
    mem = UnicornMemory(uc)
    assert mem.read_u64(0x10008) == 0x1122334455667788
    with pytest.raises(MemoryReadError) as e:
        mem.read_u64(0x20000)
    assert e.value.address == 0x20000


# --- walks that end for a reason --------------------------------------------

def _fp_stack(chain, base=0x10000):
    """A snapshot of frame-pointer records: chain = [(saved_rbp, return_address), ...]."""
    data = bytearray(0x1000)
    for i, (rbp, ra) in enumerate(chain):
        struct.pack_into("<QQ", data, i * 0x20, rbp, ra)
    return SnapshotMemory(base, bytes(data))


def test_pc_in_no_module_falls_back_to_frame_pointers_and_says_so():
    base = 0x10000
    mem = _fp_stack([(base + 0x20, 0x1234), (base + 0x40, 0x5678), (0, 0)], base)
    space = AddressSpace()
    regs = {RA: 0x9999, RSP: base - 0x10, RBP: base}
    frames = list(walk(regs, mem, space))
    assert [f.pc for f in frames] == [0x9999, 0x1234, 0x5678]
    assert all(f.fallback == FALLBACK_FRAME_POINTER for f in frames)
    assert frames[-1].end_reason == END_RA_ZERO
    assert [f.ra_slot for f in frames] == [base + 8, base + 0x28, base + 0x48]
    assert space.fallback_frames == 3


def test_frame_pointer_loop_ends_with_cfa_not_increasing():
    base = 0x10000
    mem = _fp_stack([(base + 0x20, 0x1234), (base, 0x5678)], base)   # rbp chain loops
    frames = list(walk({RA: 0x9999, RSP: base - 0x10, RBP: base}, mem, AddressSpace()))
    assert frames[-1].end_reason == END_CFA_NOT_INCREASING
    assert len(frames) == 3


def test_step_limit_and_unreadable_memory():
    base = 0x10000
    chain = [(base + 0x20 * (i + 1), 0x1000 + i) for i in range(100)]
    mem = _fp_stack(chain, base)
    frames = list(walk({RA: 0x9999, RSP: base - 0x10, RBP: base}, mem, AddressSpace(), max_frames=5))
    assert len(frames) == 5 and frames[-1].end_reason == END_STEP_LIMIT
    frames = list(walk({RA: 0x9999, RSP: base - 0x10, RBP: 0xdead0000}, mem, AddressSpace()))
    assert frames[-1].end_reason == "cannot read stack memory at 0xdead0008"


def test_process_memory_never_faults_on_garbage_addresses():
    mem = ProcessMemory()
    for addr in (0, 8, 0xdeadbeef, 1 << 47, (1 << 64) - 8):
        with pytest.raises(MemoryReadError):
            mem.read_u64(addr)
    x = ctypes.c_uint64(0xfeedface)
    assert mem.read_u64(ctypes.addressof(x)) == 0xfeedface


def test_walk_requires_pc_and_sp():
    with pytest.raises(unwinder.UnwindError):
        list(walk({RA: 1}, SnapshotMemory(0, b""), AddressSpace()))


def test_code_object_registration_errors():
    from jitutil import target_machine
    import llvmlite.binding as llvm
    obj = target_machine().emit_object(llvm.parse_assembly(RECURSION_IR))
    space = AddressSpace()
    h = space.add_code_object(obj, {".text": 0x400000})
    with pytest.raises(unwinder.ModuleError, match="overlaps"):
        space.add_code_object(obj, {".text": 0x400010})
    with pytest.raises(unwinder.ModuleError, match="no section"):
        space.add_code_object(obj, {".nope": 0x800000})
    with pytest.raises(unwinder.ModuleError):
        space.add_code_object(b"\x7fELF garbage", {".text": 0x900000})
    fde = h.find_fde(0x400000)
    assert fde is not None and fde.pc_begin == 0x400000
    gen = space.generation
    space.remove_code_object(h)
    assert space.generation == gen + 1 and space.find_module(0x400000) is None
    with pytest.raises(unwinder.ModuleError, match="not registered"):
        space.remove_code_object(h)


def test_a_pc_on_a_jump_stub_unwinds_as_at_a_function_entry():
    # jmp *0(%rip) at 0x20000; the stack holds the caller's return address.
    code = bytes.fromhex("ff2500000000") + bytes(10)
    stack = struct.pack("<QQ", 0x4444, 0)
    mem = SnapshotMemory.from_regions([(0x20000, code), (0x10000, stack)])
    frames = list(walk({RA: 0x20000, RSP: 0x10000, RBP: 0}, mem, AddressSpace(), max_frames=2))
    assert frames[0].fallback == "jump-stub" and frames[0].cfa == 0x10008
    assert frames[0].ra_slot == 0x10000 and frames[1].pc == 0x4444


def test_one_process_memory_reader_serves_several_threads():
    # The read syscall runs without the GIL: each read must use its own buffer.
    import threading
    mem = ProcessMemory()
    errors = []

    def reader(value):
        cell = ctypes.c_uint64(value)
        for _ in range(20000):
            if mem.read_u64(ctypes.addressof(cell)) != value:
                errors.append(value)
                return

    ts = [threading.Thread(target=reader, args=(v,)) for v in (0x1111, 0x2222, 0x3333, 0x4444)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
