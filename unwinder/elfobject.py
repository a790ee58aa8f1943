"""Relocatable ELF objects (ELF64, little-endian, x86-64) read once, checked, into frozen records.

JIT code arrives as the bytes LLVM's ``emit_object`` produces, and three
readers need their structure: the unwinder (``.eh_frame``, its relocations,
function symbols), deopt's frame maps (code, ``.llvm_stackmaps``, symbols,
relocations) and the emulated loader (all of it). They all take it from
:func:`read_object`, so an object a language runtime hands us is checked in
one place: a malformed one is an :class:`~unwinder.errors.ObjectFormatError`
that says what is wrong and carries the byte offset (into the object) of the
header, entry or field at fault. Nothing that reads a
:class:`RelocatableObject` can then fail on the object's structure: every
section's bytes lie inside the object, every name is a terminated string
inside its table, every symbol's section index and every relocation's symbol
index exists, every relocation section links the symbol table.

Read with :mod:`struct` rather than pyelftools (which :mod:`unwinder.elf`
uses for mapped shared libraries): each field read here has a known offset to
report, and pyelftools, given hostile headers, reads section names and bytes
past their section and past the end of the file without complaint, raises
``OverflowError``, ``AttributeError`` or its own ``ELFError`` from deep inside
lazy accessors, and builds a Python object per symbol (~50 µs each).

Layouts (System V gABI 4.1, "ELF Header", "Sections", "Symbol Table",
"Relocation"; ELF64, little-endian)::

    Elf64_Ehdr (64 bytes)  e_ident[16] e_type:H e_machine:H e_version:I e_entry:Q e_phoff:Q
                           e_shoff:Q e_flags:I e_ehsize:H e_phentsize:H e_phnum:H
                           e_shentsize:H e_shnum:H e_shstrndx:H
    Elf64_Shdr (64 bytes)  sh_name:I sh_type:I sh_flags:Q sh_addr:Q sh_offset:Q sh_size:Q
                           sh_link:I sh_info:I sh_addralign:Q sh_entsize:Q
    Elf64_Sym  (24 bytes)  st_name:I st_info:B (bind << 4 | type) st_other:B st_shndx:H
                           st_value:Q st_size:Q
    Elf64_Rela (24 bytes)  r_offset:Q r_info:Q (symbol << 32 | type) r_addend:q

Extended section numbering is followed (``e_shnum == 0``: the count is
section 0's ``sh_size``; ``e_shstrndx == SHN_XINDEX``: section 0's
``sh_link``); extended symbol section indices (``SHT_SYMTAB_SHNDX``) and
addend-less ``SHT_REL`` relocations, which LLVM never emits for x86-64, are
refused. Offsets named ``offset`` are bytes from the start of the object
unless the field says otherwise (``Relocation.offset`` is ``r_offset``: bytes
into the section it patches; ``Symbol.value`` is ``st_value``: bytes into its
section).
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ObjectFormatError

__all__ = [
    "read_object", "RelocatableObject", "Section", "Symbol", "Relocation",
    "SHT_NULL", "SHT_PROGBITS", "SHT_SYMTAB", "SHT_STRTAB", "SHT_RELA", "SHT_NOBITS", "SHT_REL",
    "SHT_SYMTAB_SHNDX", "SHF_WRITE", "SHF_ALLOC", "SHF_EXECINSTR", "SHF_COMPRESSED",
    "SHN_UNDEF", "SHN_LORESERVE", "SHN_ABS", "SHN_COMMON", "SHN_XINDEX",
    "STT_NOTYPE", "STT_OBJECT", "STT_FUNC", "STT_SECTION", "STT_FILE", "STT_GNU_IFUNC",
    "STB_LOCAL", "STB_GLOBAL", "STB_WEAK",
    "R_X86_64_NONE", "R_X86_64_64", "R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_GOTPCREL",
    "R_X86_64_32", "R_X86_64_32S", "R_X86_64_PC64", "R_X86_64_GOTPCRELX",
    "R_X86_64_REX_GOTPCRELX", "RELOCATION_NAMES",
]

# e_ident, e_type, e_machine (gABI "ELF Header"; psABI x86-64).
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_REL = 1
_EM_X86_64 = 62

# Section types and flags (gABI "Sections").
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOBITS, SHT_REL, SHT_SYMTAB_SHNDX = 8, 9, 18
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_COMPRESSED = 0x1, 0x2, 0x4, 0x800

# Special section indices (gABI "Sections", Figure 4-7).
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFF00, 0xFFF1, 0xFFF2, 0xFFFF

# Symbol types and bindings (gABI "Symbol Table"; STT_GNU_IFUNC from the GNU extensions).
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE, STT_GNU_IFUNC = 0, 1, 2, 3, 4, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

# Relocation types (x86-64 psABI, Table 4.9), named once for the whole house.
R_X86_64_NONE, R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_GOTPCREL = 0, 1, 2, 4, 9
R_X86_64_32, R_X86_64_32S, R_X86_64_PC64 = 10, 11, 24
R_X86_64_GOTPCRELX, R_X86_64_REX_GOTPCRELX = 41, 42
#: Every x86-64 relocation type by number, for messages.
RELOCATION_NAMES = {
    0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32", 3: "R_X86_64_GOT32",
    4: "R_X86_64_PLT32", 5: "R_X86_64_COPY", 6: "R_X86_64_GLOB_DAT",
    7: "R_X86_64_JUMP_SLOT", 8: "R_X86_64_RELATIVE", 9: "R_X86_64_GOTPCREL",
    10: "R_X86_64_32", 11: "R_X86_64_32S", 12: "R_X86_64_16", 13: "R_X86_64_PC16",
    14: "R_X86_64_8", 15: "R_X86_64_PC8", 16: "R_X86_64_DTPMOD64", 17: "R_X86_64_DTPOFF64",
    18: "R_X86_64_TPOFF64", 19: "R_X86_64_TLSGD", 20: "R_X86_64_TLSLD",
    21: "R_X86_64_DTPOFF32", 22: "R_X86_64_GOTTPOFF", 23: "R_X86_64_TPOFF32",
    24: "R_X86_64_PC64", 25: "R_X86_64_GOTOFF64", 26: "R_X86_64_GOTPC32",
    27: "R_X86_64_GOT64", 28: "R_X86_64_GOTPCREL64", 29: "R_X86_64_GOTPC64",
    30: "R_X86_64_GOTPLT64", 31: "R_X86_64_PLTOFF64", 32: "R_X86_64_SIZE32",
    33: "R_X86_64_SIZE64", 34: "R_X86_64_GOTPC32_TLSDESC", 35: "R_X86_64_TLSDESC_CALL",
    36: "R_X86_64_TLSDESC", 37: "R_X86_64_IRELATIVE", 38: "R_X86_64_RELATIVE64",
    41: "R_X86_64_GOTPCRELX", 42: "R_X86_64_REX_GOTPCRELX",
}

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
# Field offsets used in messages: within Elf64_Ehdr ...
_E_TYPE, _E_MACHINE, _E_SHOFF, _E_SHENTSIZE, _E_SHNUM, _E_SHSTRNDX = 16, 18, 40, 58, 60, 62
# ... within Elf64_Shdr ...
_SH_FLAGS, _SH_OFFSET, _SH_SIZE, _SH_LINK, _SH_INFO, _SH_ENTSIZE = 8, 24, 32, 40, 44, 56
# ... within Elf64_Sym and Elf64_Rela.
_ST_SHNDX, _R_INFO_SYM = 6, 12


@dataclass(frozen=True)
class Section:
    """One section header and its bytes.

    ``offset``/``size``: where its bytes are in the object and how many
    (``SHT_NOBITS`` sections occupy ``size`` bytes in memory but none in the
    object: their ``data`` is empty). ``type``/``flags``: ``SHT_*``/``SHF_*``.
    ``header_offset``: object offset of its ``Elf64_Shdr``.
    """
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int
    header_offset: int
    data: bytes = field(repr=False)

    @property
    def alloc(self) -> bool:
        """Occupies memory when loaded (``SHF_ALLOC``)."""
        return bool(self.flags & SHF_ALLOC)

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def writable(self) -> bool:
        return bool(self.flags & SHF_WRITE)

    @property
    def nobits(self) -> bool:
        return self.type == SHT_NOBITS


@dataclass(frozen=True)
class Symbol:
    """One ``Elf64_Sym`` of the symbol table (``index`` is its position there).

    ``value``: ``st_value`` (in a relocatable object, bytes into the section
    ``shndx`` names). ``shndx``: ``SHN_UNDEF``, a section index below
    ``SHN_LORESERVE`` (checked to exist), or a reserved index such as
    ``SHN_ABS``/``SHN_COMMON``. ``type``/``bind``: ``STT_*``/``STB_*``.
    ``offset``: object offset of the entry.
    """
    index: int
    name: str
    value: int
    size: int
    type: int
    bind: int
    shndx: int
    offset: int

    @property
    def section_index(self) -> int | None:
        """The index of the section the symbol is defined in, None if undefined,
        absolute, common or in another reserved index."""
        return self.shndx if SHN_UNDEF < self.shndx < SHN_LORESERVE else None


@dataclass(frozen=True)
class Relocation:
    """One ``Elf64_Rela``: patch the field ``offset`` bytes into section
    ``target`` with relocation ``type`` (``R_X86_64_*``) of ``symbol`` plus
    ``addend``. ``entry_offset``: object offset of the entry."""
    offset: int
    type: int
    symbol: Symbol
    addend: int
    target: int
    entry_offset: int


@dataclass(frozen=True, eq=False)
class RelocatableObject:
    """A checked relocatable object (see the module docstring).

    ``sections``: every section by index (index 0 is the null section).
    ``symbols``: the symbol table (empty if the object has none).
    ``relocations``: target section index -> its relocations, in object order.
    """
    name: str
    data: bytes = field(repr=False)
    sections: tuple[Section, ...]
    symbols: tuple[Symbol, ...]
    relocations: Mapping[int, tuple[Relocation, ...]] = field(repr=False)

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def relocations_for(self, section_index: int) -> tuple[Relocation, ...]:
        """The relocations that patch section ``section_index`` (maybe none)."""
        return self.relocations.get(section_index, ())


def read_object(data: bytes, *, name: str = "object") -> RelocatableObject:
    """Read and check an x86-64 ELF64 relocatable object.

    Raises :class:`~unwinder.errors.ObjectFormatError` (``offset``: the
    object offset of what is wrong) for bytes that are not one; ``name``
    labels the messages.
    """
    data = bytes(data)

    def fail(reason, offset):
        raise ObjectFormatError(f"{name}: {reason}", offset)

    if len(data) < _EHDR.size:
        fail(f"{len(data)} bytes are shorter than an ELF header ({_EHDR.size})", 0)
    (ident, e_type, e_machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize,
     _phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(data, 0)
    if ident[:4] != _ELF_MAGIC:
        fail("not an ELF object (bad magic)", 0)
    if ident[4] != _ELFCLASS64:
        fail(f"not ELF64 (EI_CLASS {ident[4]})", 4)
    if ident[5] != _ELFDATA2LSB:
        fail(f"not little-endian (EI_DATA {ident[5]})", 5)
    if e_type != _ET_REL:
        fail(f"not a relocatable object (e_type {e_type})", _E_TYPE)
    if e_machine != _EM_X86_64:
        fail(f"not an x86-64 object (e_machine {e_machine})", _E_MACHINE)

    headers = _section_headers(data, shoff, shentsize, shnum, fail)
    if headers and shstrndx == SHN_XINDEX:
        shstrndx = headers[0][6]                     # sh_link of section 0
    if headers and not shstrndx < len(headers):
        fail(f"e_shstrndx {shstrndx} names no section (there are {len(headers)})", _E_SHSTRNDX)

    raw = []                                         # (header fields, header offset, bytes)
    for index, header in enumerate(headers):
        at = shoff + index * _SHDR.size
        _name, stype, flags, _addr, offset, size, *_ = header
        if flags & SHF_COMPRESSED:
            fail(f"section {index} is compressed (SHF_COMPRESSED is not supported)",
                 at + _SH_FLAGS)
        body = b""
        if stype != SHT_NOBITS and index:
            if offset + size > len(data):
                fail(f"section {index}'s bytes [{offset:#x}, {offset + size:#x}) lie past the end "
                     f"of the object ({len(data):#x} bytes)", at + _SH_OFFSET)
            body = data[offset:offset + size]
        raw.append((header, at, body))

    names = None
    if raw:
        names_header, names_at, names = raw[shstrndx]
        if names_header[1] != SHT_STRTAB:
            fail(f"section-name table (section {shstrndx}) is not a string table "
                 f"(sh_type {names_header[1]})", names_at + 4)
    sections = tuple(
        Section(index, _string(names, h[0], f"section {index}'s name", at, fail) if index else "",
                h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], at, body)
        for index, (h, at, body) in enumerate(raw))

    symtab, symbols = _symbols(sections, fail)
    relocations = _relocations(sections, symtab, symbols, fail)
    return RelocatableObject(name, data, sections, symbols, relocations)


def _section_headers(data, shoff, shentsize, shnum, fail):
    """The raw ``Elf64_Shdr`` tuples (checked to lie inside the object)."""
    if shoff == 0:
        if shnum:
            fail(f"e_shnum is {shnum} but there is no section header table (e_shoff 0)",
                 _E_SHNUM)
        return []
    if shentsize != _SHDR.size:
        fail(f"e_shentsize {shentsize} is not the size of an Elf64_Shdr ({_SHDR.size})",
             _E_SHENTSIZE)
    if shoff + _SHDR.size > len(data):
        fail(f"the section header table at {shoff:#x} lies past the end of the object "
             f"({len(data):#x} bytes)", _E_SHOFF)
    count = shnum or _SHDR.unpack_from(data, shoff)[5]   # extended numbering: sh_size of section 0
    if shoff + count * _SHDR.size > len(data):
        fail(f"{count} section headers at {shoff:#x} run past the end of the object "
             f"({len(data):#x} bytes)", _E_SHNUM if shnum else shoff + _SH_SIZE)
    return [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(count)]


def _string(table: bytes | None, index: int, what: str, offset: int, fail) -> str:
    """The NUL-terminated string at ``index`` of string table bytes ``table``."""
    if table is None or index >= len(table):
        fail(f"{what} starts at {index:#x}, outside its string table "
             f"({0 if table is None else len(table):#x} bytes)", offset)
    end = table.find(b"\0", index)
    if end < 0:
        fail(f"{what} (at {index:#x} of its string table) is not NUL-terminated", offset)
    return table[index:end].decode("utf-8", "replace")


def _symbols(sections, fail) -> tuple[Section | None, tuple[Symbol, ...]]:
    """The symbol table section (or None) and its symbols."""
    tables = [s for s in sections if s.type == SHT_SYMTAB]
    for s in sections:
        if s.type == SHT_SYMTAB_SHNDX:
            fail(f"section {s.index} holds extended symbol section indices "
                 "(SHT_SYMTAB_SHNDX is not supported)", s.header_offset + 4)
    if not tables:
        return None, ()
    if len(tables) > 1:
        fail(f"two symbol tables (sections {tables[0].index} and {tables[1].index})",
             tables[1].header_offset + 4)
    table = tables[0]
    _check_table(table, _SYM.size, fail)
    if not table.link < len(sections) or sections[table.link].type != SHT_STRTAB:
        fail(f"symbol table (section {table.index}) links section {table.link}, which is not "
             "a string table", table.header_offset + _SH_LINK)
    names = sections[table.link].data
    symbols = []
    for index, (st_name, st_info, _other, shndx, value, size) in enumerate(
            _SYM.iter_unpack(table.data)):
        at = table.offset + index * _SYM.size
        if shndx == SHN_XINDEX:
            fail(f"symbol {index} has an extended section index (SHN_XINDEX is not supported)",
                 at + _ST_SHNDX)
        if SHN_UNDEF < shndx < SHN_LORESERVE and shndx >= len(sections):
            fail(f"symbol {index} is in section {shndx}, which does not exist "
                 f"(there are {len(sections)})", at + _ST_SHNDX)
        symbols.append(Symbol(index, _string(names, st_name, f"symbol {index}'s name", at, fail),
                              value, size, st_info & 0xF, st_info >> 4, shndx, at))
    return table, tuple(symbols)


def _relocations(sections, symtab, symbols, fail) -> dict[int, tuple[Relocation, ...]]:
    out: dict[int, list[Relocation]] = {}
    for s in sections:
        if s.type == SHT_REL:
            fail(f"section {s.index} ({s.name}) holds SHT_REL relocations, which have no "
                 "addends (x86-64 uses SHT_RELA)", s.header_offset + 4)
        if s.type != SHT_RELA:
            continue
        _check_table(s, _RELA.size, fail)
        if symtab is None or s.link != symtab.index:
            fail(f"relocation section {s.index} ({s.name}) links section {s.link}, which is not "
                 "the symbol table", s.header_offset + _SH_LINK)
        if not 0 < s.info < len(sections):
            fail(f"relocation section {s.index} ({s.name}) patches section {s.info}, which does "
                 "not exist", s.header_offset + _SH_INFO)
        entries = out.setdefault(s.info, [])
        for k, (r_offset, r_info, r_addend) in enumerate(_RELA.iter_unpack(s.data)):
            at = s.offset + k * _RELA.size
            sym = r_info >> 32
            if sym >= len(symbols):
                fail(f"relocation {k} of {s.name} refers to symbol {sym}, which does not exist "
                     f"(there are {len(symbols)})", at + _R_INFO_SYM)
            entries.append(Relocation(r_offset, r_info & 0xFFFF_FFFF, symbols[sym], r_addend,
                                      s.info, at))
    return {k: tuple(v) for k, v in out.items()}


def _check_table(section: Section, entry_size: int, fail):
    """A table section holds whole entries of ``entry_size`` bytes."""
    if section.entsize != entry_size:
        fail(f"section {section.index} ({section.name}): sh_entsize {section.entsize}, expected "
             f"{entry_size}", section.header_offset + _SH_ENTSIZE)
    if section.size % entry_size:
        fail(f"section {section.index} ({section.name}): {section.size} bytes is not a whole "
             f"number of {entry_size}-byte entries", section.header_offset + _SH_SIZE)
