"""An ELF relocatable-object loader for an emulated x86-64 address space.

Input: the bytes :func:`osrjit.compiling.emit_object` produces (ET_REL, x86-64,
``reloc='pic'``, ``codemodel='small'``). Output: a :class:`LoadedObject` whose
sections sit at absolute emulated addresses, relocated, with its symbols'
addresses — the same facts the native runtime learns from LLJIT, so
``AddressSpace.add_code_object(obj.data, obj.load_addresses)`` and
:class:`deopt.framemaps.ObjectImage` work unchanged.

Two phases (so a batch of objects that call each other directly can be
placed before any is linked)::

    place(data, memory)      SHF_ALLOC sections -> three fresh mappings
                               code  (SHF_EXECINSTR)          read + execute
                               rodata (no SHF_WRITE)          read
                               data  (SHF_WRITE, NOBITS too)  read + write
                             and a per-object GOT (read + write)
    link(placed, resolve)    apply every .rela.<section> of a loaded section

Relocations (System V x86-64 psABI §4.4; S symbol value, A addend, P address
of the field, G+GOT address of the symbol's GOT entry, L PLT entry)::

    R_X86_64_64             S + A          8 bytes
    R_X86_64_PC32           S + A - P      4 bytes, signed
    R_X86_64_PLT32          L + A - P      4 bytes, signed; L = S when in range
    R_X86_64_GOTPCREL       G+GOT + A - P  4 bytes, signed (also GOTPCRELX and
    R_X86_64_GOTPCRELX                     REX_GOTPCRELX: we never relax, the
    R_X86_64_REX_GOTPCRELX                 bytes stay a load from the GOT)
    R_X86_64_32             S + A          4 bytes, zero-extended
    R_X86_64_32S            S + A          4 bytes, sign-extended
    R_X86_64_PC64           S + A - P      8 bytes

Bytes that are not a well-formed x86-64 relocatable object are an
:class:`~osrjit.errors.ObjectFormatError` (an :class:`EmulationError` with the
object offset at fault), checked by :func:`unwinder.elfobject.read_object`
before anything is mapped. Any other relocation type is an
:class:`EmulationError` naming the type, the section, the offset and the
symbol. A PLT32 to a symbol more than ±2 GiB away goes
through a stub: a small object assembled by LLVM (so it has ``.eh_frame``
and symbols like any other code) holding ``osrjit.plt.<name>: jmp
*osrjit.got.<name>(%rip)`` and the 8-byte pointer ``osrjit.got.<name>``.

The memory the loader writes to is any object with ``map(size, perms, name)
-> address`` (a fresh, zero-filled, 4 KiB-aligned mapping of ``size`` bytes
rounded up to 4 KiB), ``write(address, data)`` and ``unmap(address)`` (to
give back what a load that failed had mapped) — :class:`~osrjit.emulated.machine.Machine`
is one. Every address here is an absolute emulated address; sizes are bytes.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from unwinder import errors as unwinder_errors
from unwinder.elfobject import (R_X86_64_32, R_X86_64_32S, R_X86_64_64, R_X86_64_GOTPCREL,
                                R_X86_64_GOTPCRELX, R_X86_64_NONE, R_X86_64_PC32, R_X86_64_PC64,
                                R_X86_64_PLT32, R_X86_64_REX_GOTPCRELX, RELOCATION_NAMES,
                                SHN_ABS, SHN_COMMON, SHN_UNDEF, STB_WEAK, STT_FILE, STT_SECTION,
                                RelocatableObject, Relocation, Symbol, read_object)
from unwinder.nativesrc import module_asm

from osrjit.errors import EmulationError, ObjectFormatError

__all__ = [
    "EmulationError", "ObjectFormatError", "LoadedObject", "PlacedObject", "Region",
    "place", "link", "load_object", "unmap_regions", "RELOCATION_NAMES",
    "PROT_READ", "PROT_WRITE", "PROT_EXEC",
]

PAGE_SIZE = 4096
#: Protection bits as unicorn numbers them (``UC_PROT_*``).
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4


# The relocation types we apply (the module docstring says how); their
# numbers and names come from unwinder.elfobject.
R_NONE, R_64, R_PC32, R_PLT32, R_GOTPCREL = (R_X86_64_NONE, R_X86_64_64, R_X86_64_PC32,
                                             R_X86_64_PLT32, R_X86_64_GOTPCREL)
R_32, R_32S, R_PC64, R_GOTPCRELX, R_REX_GOTPCRELX = (R_X86_64_32, R_X86_64_32S, R_X86_64_PC64,
                                                     R_X86_64_GOTPCRELX, R_X86_64_REX_GOTPCRELX)
_GOT_RELOCS = frozenset({R_GOTPCREL, R_GOTPCRELX, R_REX_GOTPCRELX})
_STUB_SIZE = 8          # jmp *disp32(%rip) is 6 bytes; padded with int3
_INT32 = (-(1 << 31), (1 << 31) - 1)
_UINT32 = (0, (1 << 32) - 1)
_MASK64 = (1 << 64) - 1


def _page_round(size: int) -> int:
    return max(PAGE_SIZE, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))


def _align(value: int, alignment: int) -> int:
    alignment = max(1, alignment)
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Region:
    """One mapping made for an object: ``[address, address + size)``, ``size``
    a multiple of 4 KiB, ``perms`` as ``PROT_*`` bits, ``name`` for messages."""
    address: int
    size: int
    perms: int
    name: str

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass
class PlacedObject:
    """An object whose sections have addresses and bytes but are not yet relocated.

    ``object``: the checked object. ``section_addresses``: section index ->
    absolute address. ``symbols``: name -> absolute address of each named
    symbol defined in a loaded section (or ``SHN_ABS``). ``regions``: the
    mappings made for it, owned by whoever holds this object until
    :func:`link` turns it into a :class:`LoadedObject` (unmap them if it is
    never linked). Produced by :func:`place`, consumed by :func:`link`.
    """
    name: str
    data: bytes
    object: RelocatableObject
    section_addresses: dict[int, int]
    symbols: dict[str, int]
    regions: list[Region]
    got_region: Region | None
    got: dict[str, int]               # symbol name -> absolute address of its GOT entry


@dataclass
class LoadedObject:
    """A relocated object in emulated memory.

    ``data``: the object's bytes as emitted (unrelocated, what the unwinder
    and :class:`~deopt.framemaps.ObjectImage` parse). ``load_addresses``:
    section name -> absolute address of its first byte, for every loaded
    (SHF_ALLOC) section. ``symbols``: name -> absolute address of each named
    symbol the object defines. ``ranges``: sorted ``(start, end)`` absolute
    half-open ranges of its executable sections. ``regions``: the mappings
    made for it (code, rodata, data, GOT). ``got``: symbol name -> absolute
    address of its 8-byte GOT entry. ``stubs``: symbol name -> absolute
    address of its PLT stub (far PLT32 targets only); ``stub_object``: the
    :class:`LoadedObject` holding them, or None.

    Lifetime: the addresses stay valid until the owner unmaps ``regions``
    (:meth:`Machine.unload_object`); the stub object is owned by this one.
    """
    name: str
    data: bytes
    load_addresses: dict[str, int]
    symbols: dict[str, int]
    ranges: tuple[tuple[int, int], ...]
    regions: list[Region]
    got: dict[str, int] = field(default_factory=dict)
    stubs: dict[str, int] = field(default_factory=dict)
    stub_object: "LoadedObject | None" = None
    #: Relocation types applied, type number -> count (for tests and reports).
    relocation_counts: dict[int, int] = field(default_factory=dict)
    #: Unwinder registration handle, set by whoever registered the object.
    unwind_handle: object = None

    def symbol(self, name: str) -> int:
        """Absolute address of the defined symbol ``name`` (EmulationError if none)."""
        try:
            return self.symbols[name]
        except KeyError:
            raise EmulationError(f"{self.name}: no symbol {name!r} (defined: "
                                 f"{sorted(self.symbols)})") from None

    def contains(self, address: int) -> bool:
        """Whether absolute ``address`` lies in one of the executable ranges."""
        return any(lo <= address < hi for lo, hi in self.ranges)


# --------------------------------------------------------------------------
# Phase 1: placement
# --------------------------------------------------------------------------

def _read_object(data: bytes, name: str) -> RelocatableObject:
    try:
        return read_object(data, name=name)
    except unwinder_errors.ObjectFormatError as e:
        raise ObjectFormatError(f"cannot read object: {e.reason}", e.offset) from e


def place(data: bytes, memory, *, name: str = "object") -> PlacedObject:
    """Map fresh regions in ``memory`` and copy every SHF_ALLOC section into them.

    Sections keep their ``sh_addralign`` inside a region; SHT_NOBITS sections
    (``.bss``) are left zero. A GOT with one 8-byte entry per symbol that a
    GOTPCREL-family relocation refers to is allocated too (filled by
    :func:`link`). Nothing is relocated yet. If anything fails, the regions
    mapped so far are unmapped again.
    """
    data = bytes(data)
    obj = _read_object(data, name)
    sections = obj.sections
    groups = {"code": [], "rodata": [], "data": []}
    seen_names = {}
    for sec in sections:
        if not sec.alloc:
            continue
        if sec.name in seen_names:
            raise EmulationError(f"{name}: two loadable sections named {sec.name!r} "
                                 f"(indices {seen_names[sec.name]} and {sec.index})")
        seen_names[sec.name] = sec.index
        if sec.executable:
            groups["code"].append(sec.index)
        elif sec.writable or sec.nobits:
            groups["data"].append(sec.index)
        else:
            groups["rodata"].append(sec.index)
    got_names: list[str] = []
    for rel in _loaded_relocations(obj, seen_names.values()):
        if rel.type in _GOT_RELOCS:
            key = _got_key(rel.symbol, obj)
            if key not in got_names:
                got_names.append(key)

    perms = {"code": PROT_READ | PROT_EXEC, "rodata": PROT_READ, "data": PROT_READ | PROT_WRITE}
    section_addresses: dict[int, int] = {}
    regions: list[Region] = []
    got, got_region = {}, None
    try:
        for group, indices in groups.items():
            if not indices:
                continue
            offsets, size = {}, 0
            for index in indices:
                sec = sections[index]
                size = _align(size, sec.addralign)
                offsets[index] = size
                size += sec.size
            mapped = _page_round(size)
            base = memory.map(mapped, perms[group], f"{name} {group}")
            regions.append(Region(base, mapped, perms[group], f"{name} {group}"))
            for index, off in offsets.items():
                sec = sections[index]
                section_addresses[index] = base + off
                if sec.data:
                    memory.write(base + off, sec.data)
        if got_names:
            size = _page_round(8 * len(got_names))
            base = memory.map(size, PROT_READ | PROT_WRITE, f"{name} got")
            got_region = Region(base, size, PROT_READ | PROT_WRITE, f"{name} got")
            regions.append(got_region)
            got = {key: base + 8 * i for i, key in enumerate(got_names)}
    except BaseException:
        unmap_regions(memory, regions)
        raise

    symbols: dict[str, int] = {}
    for sym in obj.symbols:
        if not sym.name or sym.type in (STT_SECTION, STT_FILE):
            continue
        if sym.shndx == SHN_ABS:
            symbols[sym.name] = sym.value
        elif sym.section_index in section_addresses:
            symbols[sym.name] = section_addresses[sym.section_index] + sym.value
    return PlacedObject(name, data, obj, section_addresses, symbols, regions, got_region, got)


def unmap_regions(memory, regions) -> None:
    """Give ``regions`` back to ``memory`` (its ``unmap(address)``), last first."""
    for region in reversed(regions):
        memory.unmap(region.address)


def _loaded_relocations(obj: RelocatableObject, loaded) -> list[Relocation]:
    """The relocations of every section in ``loaded`` (section indices), in object order."""
    return [rel for index in sorted(loaded) for rel in obj.relocations_for(index)]


def _got_key(sym: Symbol, obj: RelocatableObject) -> str:
    """GOT entries are shared per symbol; section symbols are keyed by section."""
    if sym.type == STT_SECTION and sym.section_index is not None:
        return "section:" + obj.sections[sym.section_index].name
    return sym.name


# --------------------------------------------------------------------------
# Phase 2: relocation
# --------------------------------------------------------------------------

def link(placed: PlacedObject, memory, resolve: Callable[[str], int | None] | None = None,
         *, stub_memory=None) -> LoadedObject:
    """Apply the relocations of every loaded section and fill the GOT.

    ``resolve(name) -> address | None`` gives the absolute address of each
    undefined symbol (None or KeyError means "unknown": an EmulationError
    naming the symbol and the first relocation needing it, unless the symbol
    is weak, which then resolves to 0). ``stub_memory`` is where a stub object
    for far PLT32 targets is placed (default ``memory``). Nothing is written
    before every relocation has been computed; on an error ``placed``'s
    regions stay mapped (its holder unmaps them) and a stub object made for
    it is unmapped.
    """
    resolve = resolve or (lambda _name: None)
    obj, addrs = placed.object, placed.section_addresses
    sections = obj.sections
    cache: dict[str, int] = {}

    def symbol_value(sym: Symbol, where: str) -> int:
        if sym.type == STT_SECTION or sym.section_index is not None:
            if sym.section_index not in addrs:
                raise EmulationError(f"{placed.name}: {where} refers to "
                                     f"{sym.name or 'a section symbol'} in section {sym.shndx}, "
                                     "which is not loaded")
            return addrs[sym.section_index] + sym.value
        if sym.shndx == SHN_ABS:
            return sym.value
        if sym.shndx == SHN_COMMON:
            raise EmulationError(f"{placed.name}: common symbol {sym.name!r} is not supported")
        if sym.shndx != SHN_UNDEF:
            raise EmulationError(f"{placed.name}: {where} refers to {sym.name!r} in reserved "
                                 f"section index {sym.shndx:#x}")
        if sym.name in cache:
            return cache[sym.name]
        try:
            value = resolve(sym.name)
        except KeyError:
            value = None
        if value is None:
            if sym.bind == STB_WEAK:
                value = 0
            else:
                raise EmulationError(f"{placed.name}: undefined symbol {sym.name!r} "
                                     f"(first needed by {where})")
        cache[sym.name] = value
        return value

    patches: list[tuple[int, bytes]] = []
    far_plt: dict[str, list[tuple[int, int, str]]] = {}   # name -> [(P, A, where)]
    got_values: dict[str, int] = {}
    counts: dict[int, int] = {}
    for rel in _loaded_relocations(obj, addrs):
        rtype, offset, addend, sym = rel.type, rel.offset, rel.addend, rel.symbol
        target = sections[rel.target]
        label = sym.name or (sections[sym.section_index].name
                             if sym.section_index is not None else "?")
        tname = RELOCATION_NAMES.get(rtype, f"type {rtype}")
        where = f"{tname} at {target.name}+{offset:#x} against {label!r}"
        if offset + 4 > target.size or (rtype in (R_64, R_PC64) and offset + 8 > target.size):
            raise EmulationError(f"{placed.name}: {where} is outside its section")
        if target.nobits:
            raise EmulationError(f"{placed.name}: {where} patches a NOBITS section")
        P = addrs[rel.target] + offset
        counts[rtype] = counts.get(rtype, 0) + 1
        if rtype == R_NONE:
            continue
        if rtype in (R_64, R_PC64, R_PC32, R_32, R_32S):
            S = symbol_value(sym, where)
            if rtype == R_64:
                patches.append((P, struct.pack("<Q", (S + addend) & _MASK64)))
            elif rtype == R_PC64:
                patches.append((P, struct.pack("<Q", (S + addend - P) & _MASK64)))
            elif rtype == R_PC32:
                patches.append((P, _fit32(S + addend - P, _INT32, placed.name, where)))
            elif rtype == R_32:
                patches.append((P, _fit32(S + addend, _UINT32, placed.name, where)))
            else:
                patches.append((P, _fit32(S + addend, _INT32, placed.name, where)))
        elif rtype == R_PLT32:
            S = symbol_value(sym, where)
            value = S + addend - P
            if _INT32[0] <= value <= _INT32[1]:
                patches.append((P, struct.pack("<i", value)))
            elif sym.shndx == SHN_UNDEF:
                far_plt.setdefault(sym.name, []).append((P, addend, where))
            else:
                raise EmulationError(f"{placed.name}: {where}: target {S:#x} is out of "
                                     f"rel32 range of {P:#x} and not external")
        elif rtype in _GOT_RELOCS:
            key = _got_key(sym, obj)
            got_values[key] = symbol_value(sym, where)
            entry = placed.got[key]
            patches.append((P, _fit32(entry + addend - P, _INT32, placed.name, where)))
        else:
            supported = ", ".join(RELOCATION_NAMES[t] for t in sorted(_SUPPORTED))
            raise EmulationError(f"{placed.name}: unsupported relocation {where} "
                                 f"(supported: {supported})")

    stubs, stub_object = {}, None
    if far_plt:
        stub_memory = stub_memory or memory
        stub_object = _load_stubs(sorted(far_plt), cache, stub_memory, f"{placed.name} stubs")
        try:
            for sym_name, uses in far_plt.items():
                stub = stub_object.symbols[_plt_symbol(sym_name)]
                stubs[sym_name] = stub
                for P, addend, where in uses:
                    patches.append((P, _fit32(stub + addend - P, _INT32, placed.name,
                                              where + " (through its stub)")))
        except BaseException:
            unmap_regions(stub_memory, stub_object.regions)
            raise
    for P, blob in patches:
        memory.write(P, blob)
    for key, entry in placed.got.items():
        memory.write(entry, struct.pack("<Q", got_values[key] & _MASK64))

    load_addresses = {sections[i].name: a for i, a in addrs.items()}
    ranges = tuple(sorted((a, a + sections[i].size) for i, a in addrs.items()
                          if sections[i].executable and sections[i].size))
    return LoadedObject(placed.name, placed.data, load_addresses, dict(placed.symbols), ranges,
                        list(placed.regions), dict(placed.got), stubs, stub_object, counts)


_SUPPORTED = frozenset({R_NONE, R_64, R_PC32, R_PLT32, R_GOTPCREL, R_32, R_32S, R_PC64,
                        R_GOTPCRELX, R_REX_GOTPCRELX})


def _fit32(value: int, bounds, name: str, where: str) -> bytes:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise EmulationError(f"{name}: {where}: value {value:#x} does not fit in 32 bits "
                             f"({'signed' if lo < 0 else 'unsigned'})")
    return struct.pack("<i" if lo < 0 else "<I", value)


def load_object(data: bytes, memory, resolve: Callable[[str], int | None] | None = None,
                *, name: str = "object") -> LoadedObject:
    """:func:`place` then :func:`link`: the usual one-object load. If the
    link fails, what :func:`place` mapped is unmapped again."""
    placed = place(data, memory, name=name)
    try:
        return link(placed, memory, resolve)
    except BaseException:
        unmap_regions(memory, placed.regions)
        raise


# --------------------------------------------------------------------------
# PLT stubs for far targets
# --------------------------------------------------------------------------

def _plt_symbol(name: str) -> str:
    return "osrjit.plt." + name


def _got_symbol(name: str) -> str:
    return "osrjit.got." + name


def _quote(symbol: str) -> str:
    if '"' in symbol or "\\" in symbol or "\n" in symbol:
        raise EmulationError(f"cannot make a stub for symbol {symbol!r}")
    return '"' + symbol + '"'


def stub_assembly(names) -> str:
    """AT&T assembly of the stubs for ``names`` (one FDE each: CFA = rsp + 8,
    return address at CFA - 8, the state at any function's first instruction)."""
    lines = ["\t.text"]
    for n in names:
        plt, got = _quote(_plt_symbol(n)), _quote(_got_symbol(n))
        lines += [f"\t.globl {plt}", f"\t.type {plt},@function", "\t.p2align 3, 0xcc",
                  f"{plt}:", "\t.cfi_startproc", f"\tjmpq *{got}(%rip)",
                  "\t.fill 2, 1, 0xcc", "\t.cfi_endproc", f"\t.size {plt}, {_STUB_SIZE}"]
    lines.append("\t.data")
    for n in names:
        got = _quote(_got_symbol(n))
        lines += ["\t.p2align 3", f"{got}:", f"\t.quad {_quote(n)}"]
    return "\n".join(lines) + "\n"


def assemble(asm_text: str) -> bytes:
    """Assemble AT&T ``asm_text`` (module-level inline asm) into an ELF object
    with the runtime's target machine (PIC, small code model)."""
    import llvmlite.binding as llvm

    from osrjit.compiling import target_machine
    tm = target_machine(0)
    try:
        mod = llvm.parse_assembly(module_asm(asm_text))
        mod.triple = tm.triple
        return tm.emit_object(mod)
    except RuntimeError as e:
        raise EmulationError(f"LLVM could not assemble a helper object: {e}") from None
    finally:
        tm.close()


def _load_stubs(names, resolved: Mapping[str, int], memory, name: str) -> LoadedObject:
    obj = assemble(stub_assembly(names))
    # The owner of the main object registers this one with its unwinder too
    # (Machine.load_object does).
    return load_object(obj, memory, lambda s: resolved.get(s), name=name)
