"""The emulated backend's ELF loader: objects from the frontend and from the
assembler placed in unicorn memory, every relocation type checked against its
psABI formula with known symbol addresses, and the loaded objects' unwind
information found by the unwinder.

Emulation only: nothing here runs native JIT code, so no child processes.
"""
import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

import handir
from osrjit.emulated.program import EmulatedProgram
from osrjit import lang
from osrjit.emulated import EmulationError, Machine
from osrjit.emulated.loader import (PROT_EXEC, PROT_READ, PROT_WRITE, RELOCATION_NAMES,
                                    assemble, load_object)
from osrjit.compiling import emit_object, target_machine

# Symbol addresses the resolver hands out (absolute, emulated).
NEAR = 0x1800_0000            # within rel32 of the arena
FAR = 0x7F00_1234_5678        # > 2 GiB away: PLT32 needs a stub
ABS32 = 0xFFFF_F000           # fits R_X86_64_32 (unsigned), not 32S
ABS32S = 0x7FFF_F000          # fits both

RELOC_ASM = r'''
	.text
	.globl f
	.type f,@function
f:
	.cfi_startproc
	callq ext_near@PLT                      # +0x00 PLT32, in range: direct
	movq ext_got@GOTPCREL(%rip), %rax       # +0x05 REX_GOTPCRELX
	callq *ext_gotx@GOTPCREL(%rip)          # +0x0c GOTPCRELX
	movl $ext_abs32, %eax                   # +0x12 R_X86_64_32
	movq $ext_abs32s, %rax                  # +0x17 R_X86_64_32S
	leaq local_data(%rip), %rax             # +0x1e PC32 against .data
	callq ext_far@PLT                       # +0x25 PLT32, out of range: stub
	retq
	.cfi_endproc
	.size f, .-f
	.data
	.p2align 3
local_data:
	.quad ext_abs64                         # +0x00 R_X86_64_64
	.quad ext_pc64 - .                      # +0x08 R_X86_64_PC64
	.long ext_pc32 - .                      # +0x10 R_X86_64_PC32
	.long ext_gotpcrel@GOTPCREL             # +0x14 R_X86_64_GOTPCREL
	.quad f                                 # +0x18 R_X86_64_64 (defined symbol)
	.bss
	.globl zeros
zeros:
	.zero 64
'''

RESOLVED = {
    "ext_near": NEAR, "ext_got": 0x1111_2222_3333, "ext_gotx": 0x4444_5555_6666,
    "ext_abs32": ABS32, "ext_abs32s": ABS32S, "ext_far": FAR,
    "ext_abs64": 0xDEAD_BEEF_CAFE_F00D, "ext_pc64": 0x7000_0000_0000, "ext_pc32": NEAR + 0x40,
    "ext_gotpcrel": 0x5555_0000_1000,
}


def _rel32(m, address):
    return struct.unpack("<i", m.read(address, 4))[0]


@pytest.fixture(scope="module")
def reloc_object():
    return assemble(RELOC_ASM)


def test_every_supported_relocation_type_gets_its_psabi_value(reloc_object):
    m = Machine()
    obj = m.load_object(reloc_object, RESOLVED.get, name="relocs")
    f = obj.symbols["f"]
    data = obj.load_addresses[".data"]
    # PLT32 in range: a direct call, S + A - P with A = -4 (P = f + 1).
    assert f + 5 + _rel32(m, f + 1) == NEAR
    # GOTPCREL family: the field points at a GOT entry holding the symbol.
    for field_at, insn_end, name in ((f + 8, f + 12, "ext_got"), (f + 14, f + 18, "ext_gotx")):
        entry = insn_end + _rel32(m, field_at)
        assert entry == obj.got[name]
        assert m.read_u64(entry) == RESOLVED[name]
    # R_X86_64_32 (zero-extended) and 32S (sign-extended).
    assert struct.unpack("<I", m.read(f + 0x13, 4))[0] == ABS32
    assert struct.unpack("<i", m.read(f + 0x1a, 4))[0] == ABS32S
    # PC32 against a section symbol: lea lands on .data.
    assert f + 0x25 + _rel32(m, f + 0x21) == data
    # PLT32 out of range: the call goes to a stub that jumps through its own pointer.
    stub = f + 0x2a + _rel32(m, f + 0x26)
    assert obj.stubs == {"ext_far": stub}
    assert m.read(stub, 2) == b"\xff\x25"                   # jmp *disp32(%rip)
    assert m.read_u64(stub + 6 + _rel32(m, stub + 2)) == FAR
    # Data relocations.
    assert m.read_u64(data) == RESOLVED["ext_abs64"]
    assert m.read_u64(data + 8) == (RESOLVED["ext_pc64"] - (data + 8)) & (2**64 - 1)
    assert data + 0x10 + _rel32(m, data + 0x10) == RESOLVED["ext_pc32"]
    gotpcrel_entry = data + 0x14 + _rel32(m, data + 0x14)
    assert m.read_u64(gotpcrel_entry) == RESOLVED["ext_gotpcrel"]
    assert m.read_u64(data + 0x18) == f
    # .bss is mapped and zero.
    assert m.read(obj.symbols["zeros"], 64) == bytes(64)
    applied = {RELOCATION_NAMES[t] for t in obj.relocation_counts}
    assert applied >= {"R_X86_64_64", "R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_GOTPCREL",
                       "R_X86_64_GOTPCRELX", "R_X86_64_REX_GOTPCRELX", "R_X86_64_32",
                       "R_X86_64_32S", "R_X86_64_PC64"}


def test_regions_are_page_aligned_with_code_rx_rodata_r_data_rw(reloc_object):
    m = Machine()
    obj = m.load_object(reloc_object, RESOLVED.get, name="relocs")
    perms = {lo: p for lo, _hi, p in m.uc.mem_regions()}
    by_name = {r.name.split()[-1]: r for r in obj.regions}
    assert set(by_name) == {"code", "rodata", "data", "got"}
    for region in obj.regions:
        assert region.address % 4096 == 0 and region.size % 4096 == 0
    assert perms[by_name["code"].address] == PROT_READ | PROT_EXEC
    assert perms[by_name["rodata"].address] == PROT_READ          # .eh_frame
    assert perms[by_name["data"].address] == PROT_READ | PROT_WRITE
    assert perms[by_name["got"].address] == PROT_READ | PROT_WRITE
    code = by_name["code"]
    assert obj.ranges == ((obj.load_addresses[".text"],
                           obj.load_addresses[".text"] + 0x2b),)
    assert code.address <= obj.ranges[0][0] < obj.ranges[0][1] <= code.end
    # The stub object is code too, registered with the unwinder, and named.
    stub = obj.stubs["ext_far"]
    assert m.symbolize(stub) == "osrjit.plt.ext_far+0x0"
    plan = m.space.unwind_entry(stub)[0]
    assert (plan.cfa_register, plan.cfa_offset, plan.ra_offset) == (7, 8, -8)


def test_unknown_relocation_type_is_a_precise_error():
    tls = assemble("\t.text\n\tmovq tlsvar@GOTTPOFF(%rip), %rax\n")
    with pytest.raises(EmulationError, match=r"unsupported relocation R_X86_64_GOTTPOFF at "
                                             r"\.text\+0x3 against 'tlsvar'"):
        load_object(tls, Machine(), {"tlsvar": 0x1000}.get)


def test_undefined_symbol_is_named_with_its_first_use(reloc_object):
    with pytest.raises(EmulationError, match=r"undefined symbol 'ext_near' \(first needed by "
                                             r"R_X86_64_PLT32 at \.text\+0x1"):
        Machine().load_object(reloc_object, {}.get)


def test_values_that_do_not_fit_are_refused(reloc_object):
    too_far = dict(RESOLVED, ext_pc32=FAR)
    with pytest.raises(EmulationError, match=r"R_X86_64_PC32 at \.data\+0x10 against "
                                             r"'ext_pc32'.*does not fit in 32 bits \(signed\)"):
        Machine().load_object(reloc_object, too_far.get)
    negative = dict(RESOLVED, ext_abs32s=0x8000_0000)
    with pytest.raises(EmulationError, match=r"R_X86_64_32S .* does not fit"):
        Machine().load_object(reloc_object, negative.get)


def test_not_an_object():
    with pytest.raises(EmulationError, match="cannot read object"):
        Machine().load_object(b"\x7fELF" + bytes(60))


@pytest.fixture(scope="module")
def frontend_objects():
    """(FunctionIR, object bytes) for every function of the test programs."""
    tm = target_machine()
    irs = lang.compile_source(handir.SOURCE)
    irs += lang.compile_source(handir.SOURCE, calls="direct")   # same names: export=False below
    irs += [handir.fib(), handir.kinds(), handir.twice(), handir.locs()]
    return [(ir, emit_object(ir, tm)) for ir in irs]


def test_frontend_objects_load_with_the_relocation_types_llvm_emits(frontend_objects):
    """Every relocation in the frontend's objects is one we apply, and the
    unwinder finds every function's FDE at the loaded addresses."""
    m = Machine()
    seen = {}
    services = {n: m.hypercall(n, lambda m, t: 0) for n in
                ("osrjit_hook", "osrjit_safepoint_slow", "osrjit_error")}
    cells = {}

    def resolve(sym):
        if sym in services:
            return services[sym]
        return cells.setdefault(sym, m.alloc_cell(8))   # slots, flag, direct callees

    for ir, data in frontend_objects:
        obj = m.load_object(data, resolve, name=ir.name, export=False)
        for t, n in obj.relocation_counts.items():
            seen[RELOCATION_NAMES[t]] = seen.get(RELOCATION_NAMES[t], 0) + n
        elf = ELFFile(io.BytesIO(data))
        # Functions with an FDE: each FDE's pc_begin has one PC32 relocation
        # against .text in .rela.eh_frame (addend = the function's offset).
        rela = elf.get_section_by_name(".rela.eh_frame")
        fde_offsets = {r["r_addend"] for r in rela.iter_relocations()} if rela else set()
        text = obj.load_addresses[".text"]
        for symbol in (ir.symbol, ir.resume_symbol):
            address = obj.symbol(symbol)
            # (LLVM emits no CFI for a function it infers nounwind, e.g. one
            # without calls: handir's twice, locs__resume.)
            assert (m.space.unwind_entry(address) is not None) == \
                (address - text in fde_offsets), symbol
            assert m.symbolize(address) == f"{symbol}+0x0"
        for sec in elf.iter_sections():
            if sec["sh_flags"] & 2:                                  # SHF_ALLOC
                assert sec.name in obj.load_addresses
                if sec["sh_type"] != "SHT_NOBITS" and not sec.name.startswith(".rela"):
                    assert len(m.read(obj.load_addresses[sec.name], sec["sh_size"])) == \
                        sec["sh_size"]
    # What LLVM 22 emits for small-PIC code: calls (PLT32), slot and flag
    # loads (REX_GOTPCRELX), .eh_frame pc_begin (PC32), stackmap function
    # addresses (R_X86_64_64).
    assert {"R_X86_64_PLT32", "R_X86_64_REX_GOTPCRELX", "R_X86_64_PC32",
            "R_X86_64_64"} <= set(seen), seen


def test_far_services_go_through_stubs_and_programs_still_run():
    """With the hypercall page 126 TiB away, every service call is a PLT32 out
    of range: each object gets stubs, and the programs compute the same."""
    m = Machine(hypercall_base=0x7E00_0000_0000)
    prog = EmulatedProgram(m)
    prog.compile(handir.SOURCE)
    prog.on_hook(lambda x: x * 100)
    hooky = prog.current("hooky")
    assert set(hooky.object.stubs) == {"osrjit_hook", "osrjit_safepoint_slow"}
    for name, stub in hooky.object.stubs.items():
        assert m.symbolize(stub) == f"osrjit.plt.{name}+0x0"
    assert prog.call("hooky", 3) == 300 + 2 * 400           # hook(3) + 2 * hook(4)
    assert prog.call("fib", 12) == handir.py_fib(12)
    prog.safepoint_flag = 1
    assert prog.call("loops", 4) == handir.py_loops_from(0, 0, 4, 0)
    assert prog.safepoint_calls > 0


def test_unload_unmaps_and_forgets_the_code(reloc_object):
    m = Machine()
    obj = m.load_object(reloc_object, RESOLVED.get, name="relocs")
    f, stub = obj.symbols["f"], obj.stubs["ext_far"]
    assert m.space.find_module(f) is not None
    m.unload_object(obj)
    assert m.space.find_module(f, refresh=False) is None
    assert m.space.find_module(stub, refresh=False) is None
    with pytest.raises(EmulationError, match="cannot read"):
        m.read(f, 1)
    assert "f" not in m.symbols
