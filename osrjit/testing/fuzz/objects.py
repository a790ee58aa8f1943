"""Relocatable objects as LLVM emits them, corrupted, and the entries that read them.

See :mod:`osrjit.testing.fuzz`. Offsets of the ELF structures an edit aims
at are read here with :mod:`struct`, independently of the readers under test.
"""
from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .core import SEED_PROGRAMS, Outcome, Target, broken, classify

__all__ = [
    "SeedObject", "seed_objects", "ElfLayout", "OBJECT_EDITS", "mutate", "random_object_edits",
    "run_unwinder", "run_framemaps", "ObjectLoader", "run_patching", "object_targets",
    "SECTION_BASE", "SECTION_STRIDE", "FAR_IMPORT", "STACK_BASE", "STACK_SIZE",
]

#: Where the seeds' allocated sections were "placed": section ``i`` at
#: ``SECTION_BASE + i * SECTION_STRIDE`` (absolute; bytes).
SECTION_BASE = 0x4000_0000
SECTION_STRIDE = 0x1_0000
#: Where the loader target resolves the hook service for odd choices: more
#: than 2 GiB from the arena (absolute; never executed).
FAR_IMPORT = 0x7F00_0000_0000
#: The snapshot stack the walks read (absolute base; bytes).
STACK_BASE = 0x7FFD_0000_0000
STACK_SIZE = 1024


@dataclass(frozen=True)
class SeedObject:
    """One object to mutate. ``data``: the bytes ``emit_object`` produced.
    ``load_addresses``: section name -> absolute address of every allocated
    section. ``function``/``sites``: the FunctionIR's name and sites (for
    frame maps). ``text``: ``(start, end)`` of ``.text`` (absolute).
    ``return_addresses``: absolute return address of every frame map (for
    walks that go on through JIT frames). ``symbols``: defined function
    symbol -> absolute address. ``call_symbols``: the symbols its direct
    calls reference (what the native backend patches). ``layout``: where its
    ELF structures are."""
    name: str
    data: bytes
    load_addresses: dict
    function: str
    sites: dict
    text: tuple
    return_addresses: tuple
    symbols: dict
    call_symbols: tuple
    layout: "ElfLayout"


@functools.cache
def seed_objects() -> tuple[SeedObject, ...]:
    """Every function of :data:`SEED_PROGRAMS`, at ``-O0`` and ``-O2``, with
    slot and direct calls (compiled once per process)."""
    from deopt.framemaps import ObjectImage, frame_maps_for_object
    from osrjit import lang
    from osrjit.compiling import emit_object, target_machine
    from osrjit.native.patching import callee_symbols

    seeds = []
    for opt_level in (0, 2):
        tm = target_machine(opt_level)
        for calls in ("slot", "direct"):
            for program in SEED_PROGRAMS:
                for ir in lang.compile_source(program, calls=calls):
                    data = emit_object(ir, tm, opt_level)
                    layout = ElfLayout.of(data)
                    loads = {s.name: SECTION_BASE + s.index * SECTION_STRIDE
                             for s in layout.sections if s.flags & _SHF_ALLOC}
                    image = ObjectImage(data, loads, name=ir.name)
                    maps = frame_maps_for_object(image, ir.sites, function=ir.name, version=1)
                    seeds.append(SeedObject(
                        name=f"{ir.name}-O{opt_level}-{calls}", data=data, load_addresses=loads,
                        function=ir.name, sites=dict(ir.sites), text=image.code_range,
                        return_addresses=tuple(m.return_address for m in maps),
                        symbols=image.defined_functions,
                        call_symbols=tuple(callee_symbols(ir).values()), layout=layout))
        tm.close()
    return tuple(seeds)


# --------------------------------------------------------------------------
# Where the ELF structures are (read with struct, independently of the code
# under test)
# --------------------------------------------------------------------------

_SHF_ALLOC = 2
_SHT_SYMTAB, _SHT_STRTAB, _SHT_RELA, _SHT_NOBITS = 2, 3, 4, 8
_E_SHOFF = 40
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM_SIZE = _RELA_SIZE = 24

#: ``(name, offset, width)`` of the ELF header fields edits aim at.
EHDR_FIELDS = (("ei_class", 4, 1), ("ei_data", 5, 1), ("e_type", 16, 2), ("e_machine", 18, 2),
               ("e_shoff", 40, 8), ("e_ehsize", 52, 2), ("e_shentsize", 58, 2),
               ("e_shnum", 60, 2), ("e_shstrndx", 62, 2))
#: ``(name, offset, width)`` within an ``Elf64_Shdr``.
SHDR_FIELDS = (("sh_name", 0, 4), ("sh_type", 4, 4), ("sh_flags", 8, 8), ("sh_addr", 16, 8),
               ("sh_offset", 24, 8), ("sh_size", 32, 8), ("sh_link", 40, 4), ("sh_info", 44, 4),
               ("sh_addralign", 48, 8), ("sh_entsize", 56, 8))
#: ``(name, offset, width)`` within an ``Elf64_Sym``.
SYM_FIELDS = (("st_name", 0, 4), ("st_info", 4, 1), ("st_other", 5, 1), ("st_shndx", 6, 2),
              ("st_value", 8, 8), ("st_size", 16, 8))
#: ``(name, offset, width)`` within an ``Elf64_Rela`` (``r_info`` split in its halves).
RELA_FIELDS = (("r_offset", 0, 8), ("r_type", 8, 4), ("r_sym", 12, 4), ("r_addend", 16, 8))


@dataclass(frozen=True)
class SectionLayout:
    index: int
    name: str
    type: int
    flags: int
    header_offset: int      # file offset of the Elf64_Shdr
    offset: int             # file offset of the section's bytes
    size: int
    link: int


@dataclass(frozen=True)
class ElfLayout:
    """File offsets of a well-formed object's structures (bytes)."""
    size: int
    shnum: int
    sections: tuple[SectionLayout, ...]
    shstrtab: SectionLayout
    symtab: SectionLayout | None
    strtab: SectionLayout | None
    relas: tuple[SectionLayout, ...]

    @classmethod
    def of(cls, data: bytes) -> "ElfLayout":
        (_ident, _type, _machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize,
         _phnum, _shentsize, shnum, shstrndx) = _EHDR.unpack_from(data, 0)
        headers = [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(shnum)]
        names_at = headers[shstrndx][4]
        sections = []
        for i, (name, stype, flags, _addr, offset, size, link, _info, _align, _ent) in \
                enumerate(headers):
            end = data.index(b"\0", names_at + name)
            sections.append(SectionLayout(i, data[names_at + name:end].decode(), stype, flags,
                                          shoff + i * _SHDR.size, offset, size, link))
        symtab = next((s for s in sections if s.type == _SHT_SYMTAB), None)
        return cls(len(data), shnum, tuple(sections), sections[shstrndx], symtab,
                   sections[symtab.link] if symtab is not None else None,
                   tuple(s for s in sections if s.type == _SHT_RELA))


# --------------------------------------------------------------------------
# Object mutations
# --------------------------------------------------------------------------

def _interesting(width: int, original: int, layout: ElfLayout) -> tuple[int, ...]:
    """Values worth writing into a field of ``width`` bytes (masked to it)."""
    top = (1 << (8 * width)) - 1
    values = (0, 1, 2, 3, 4, 8, 0x18, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
              0xFF00, 0xFFF1, 0xFFF2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32,
              (1 << 63) - 1, 1 << 63, top, top - 7,
              layout.size - 1, layout.size, layout.size + 1, layout.shnum - 1, layout.shnum,
              layout.shnum + 1, original + 1, original - 1, original + 8, original - 8,
              original * 2, original ^ (1 << (8 * width - 1)))
    return tuple(v & top for v in values)


def _write(data: bytearray, at: int, width: int, value: int):
    """Store ``value`` modulo 2**(8 * width) at ``at``, if the field is inside ``data``."""
    if 0 <= at and at + width <= len(data):
        data[at:at + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")


def _read(data: bytes, at: int, width: int) -> int:
    return int.from_bytes(data[at:at + width], "little")


def _aimed_field(data, layout, at, width, value):
    """Write the ``value``-th interesting value into the field at ``at``."""
    table = _interesting(width, _read(data, at, width), layout)
    _write(data, at, width, table[value % len(table)])


def _edit_flip(data, layout, where, value):
    if data:
        data[where % len(data)] ^= 1 << (value % 8)


def _edit_byte(data, layout, where, value):
    if data:
        data[where % len(data)] = (0x00, 0xFF, 0x7F, 0x80, 0x2E, 0x01, value & 0xFF)[value % 7]


def _edit_insert(data, layout, where, value):
    at = where % (len(data) + 1)
    data[at:at] = bytes([value & 0xFF]) * (1 + value % 8)


def _edit_delete(data, layout, where, value):
    if data:
        at = where % len(data)
        del data[at:at + 1 + value % 16]


def _edit_truncate(data, layout, where, value):
    del data[where % (len(data) + 1):]


def _edit_word(data, layout, where, value):
    width = (4, 8)[value % 2]
    if len(data) >= width:
        _aimed_field(data, layout, where % (len(data) - width + 1), width, value // 2)


def _resize_section(data, layout, where, delta, fill):
    """Insert (``delta > 0``) or delete bytes inside a section and move every
    later section and the header table along, so the headers still agree
    and the readers get past them to the section contents (whose offsets,
    such as relocations' ``r_offset``, are now stale)."""
    sections = [s for s in layout.sections if s.size and s.type != _SHT_NOBITS]
    if not sections or len(data) < _EHDR.size:
        return
    section = sections[where % len(sections)]
    shoff = _read(data, _E_SHOFF, 8)
    header = shoff + section.index * _SHDR.size
    if header + _SHDR.size > len(data):
        return
    offset, size = _read(data, header + 24, 8), _read(data, header + 32, 8)
    if not size or offset + size > len(data):
        return
    at = offset + (where // len(sections)) % (size + 1)
    if section.type in (_SHT_SYMTAB, _SHT_RELA) and fill % 2:
        # A whole entry, at an entry boundary: the table stays well formed.
        at -= (at - offset) % _SYM_SIZE
        delta = _SYM_SIZE if delta > 0 else -_SYM_SIZE
    if delta > 0:
        data[at:at] = bytes([fill >> 1 & 0xFF]) * delta
    else:
        delta = -min(-delta, offset + size - at)
        del data[at:at - delta]
    if shoff >= at:
        shoff += delta
        _write(data, _E_SHOFF, 8, shoff)
    for other in layout.sections:
        h = shoff + other.index * _SHDR.size
        if other.index != section.index and h + _SHDR.size <= len(data):
            if _read(data, h + 24, 8) >= at and _read(data, h + 4, 4) != _SHT_NOBITS:
                _write(data, h + 24, 8, _read(data, h + 24, 8) + delta)
    _write(data, shoff + section.index * _SHDR.size + 32, 8, size + delta)


def _edit_grow(data, layout, where, value):
    _resize_section(data, layout, where, 1 + value % 24, value >> 5)


def _edit_shrink(data, layout, where, value):
    _resize_section(data, layout, where, -(1 + value % 24), value >> 5)


def _edit_ehdr(data, layout, where, value):
    _name, off, width = EHDR_FIELDS[where % len(EHDR_FIELDS)]
    _aimed_field(data, layout, off, width, value)


def _edit_shdr(data, layout, where, value):
    section = layout.sections[where % len(layout.sections)]
    _name, off, width = SHDR_FIELDS[(where // len(layout.sections)) % len(SHDR_FIELDS)]
    _aimed_field(data, layout, section.header_offset + off, width, value)


def _edit_string_table(table, data, where, value):
    """Damage a string table: end a name early, make one unterminated (the
    table's last NUL, or any), or put a byte that is no UTF-8 or a dot in it."""
    if table is None or not table.size:
        return
    if value % 4 == 0:                       # the terminator at the very end
        at = table.offset + table.size - 1
    else:
        at = table.offset + where % table.size
    if at < len(data):
        data[at] = (0x41, 0x00, 0xFF, 0x2E, value & 0xFF)[value % 5]


def _edit_shstrtab(data, layout, where, value):
    _edit_string_table(layout.shstrtab, data, where, value)


def _edit_strtab(data, layout, where, value):
    _edit_string_table(layout.strtab, data, where, value)


def _edit_symbol(data, layout, where, value):
    table = layout.symtab
    if table is None or table.size < _SYM_SIZE:
        return
    count = table.size // _SYM_SIZE
    _name, off, width = SYM_FIELDS[(where // count) % len(SYM_FIELDS)]
    _aimed_field(data, layout, table.offset + (where % count) * _SYM_SIZE + off, width, value)


def _edit_relocation(data, layout, where, value):
    if not layout.relas:
        return
    table = layout.relas[where % len(layout.relas)]
    where //= len(layout.relas)
    count = max(1, table.size // _RELA_SIZE)
    _name, off, width = RELA_FIELDS[(where // count) % len(RELA_FIELDS)]
    _aimed_field(data, layout, table.offset + (where % count) * _RELA_SIZE + off, width, value)


#: Edit kinds (``kind`` of an edit indexes this): name -> function
#: ``(bytearray, layout, where, value)`` changing the bytes in place.
OBJECT_EDITS: dict[str, Callable] = {
    "flip": _edit_flip, "byte": _edit_byte, "insert": _edit_insert, "delete": _edit_delete,
    "truncate": _edit_truncate, "word": _edit_word, "grow": _edit_grow, "shrink": _edit_shrink,
    "ehdr": _edit_ehdr, "shdr": _edit_shdr, "shstrtab": _edit_shstrtab, "strtab": _edit_strtab,
    "symbol": _edit_symbol, "relocation": _edit_relocation,
}
_OBJECT_EDIT_LIST = tuple(OBJECT_EDITS.values())


def mutate(seed: SeedObject, edits: Sequence[tuple[int, int, int]]) -> bytes:
    """``seed``'s bytes with ``edits`` applied in order. Aimed edits use the
    seed's layout (after an insertion or deletion they hit nearby bytes: that
    is fine)."""
    data = bytearray(seed.data)
    for kind, where, value in edits:
        _OBJECT_EDIT_LIST[kind % len(_OBJECT_EDIT_LIST)](data, seed.layout, where, value)
    return bytes(data)


def random_object_edits(rng, max_edits: int = 4) -> list[tuple[int, int, int]]:
    """1 to ``max_edits`` edits drawn from ``rng`` (a :class:`random.Random`)."""
    return [(rng.randrange(len(OBJECT_EDITS)), rng.randrange(1 << 16), rng.randrange(1 << 16))
            for _ in range(rng.randint(1, max_edits))]


# --------------------------------------------------------------------------
# Object targets
# --------------------------------------------------------------------------

def _snapshot_stack(seed: SeedObject):
    """A stack holding return addresses into ``seed``'s code, frame-pointer
    links within itself, and zeros (so walks go on through JIT frames)."""
    from unwinder import SnapshotMemory
    words = []
    ras = seed.return_addresses or (seed.text[0] + 1,)
    for i in range(STACK_SIZE // 8):
        if i % 4 == 1:
            words.append(ras[(i // 4) % len(ras)])
        elif i % 4 == 0:
            words.append(STACK_BASE + 8 * (i + 4))       # a saved rbp: the next frame
        else:
            words.append(0 if i > STACK_SIZE // 8 - 8 else 0x1000 * i)
    return SnapshotMemory(STACK_BASE, struct.pack(f"<{len(words)}Q", *words))


def run_unwinder(seed: SeedObject, data: bytes, choice: int = 0) -> Outcome:
    """``AddressSpace.add_code_object`` with the seed's load addresses, then
    walks from a pc in ``.text`` (``choice`` picks it) and at every return
    address of the seed, row lookups and symbols at those pcs, and removal."""
    from unwinder import AddressSpace, UnwindError, walk
    from unwinder.x86_64 import CALLEE_SAVED, RA, RBP, RSP

    name = "unwinder"
    space = AddressSpace()
    try:
        handle = space.add_code_object(data, seed.load_addresses, name=seed.name)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify(name, UnwindError, e)
    memory = _snapshot_stack(seed)
    start, end = seed.text
    pcs = [start + choice % max(1, end - start), start] + list(seed.return_addresses)
    for low, high in handle.ranges:
        if not low < high:
            return broken(name, f"empty or reversed range {(low, high)}")
    try:
        for pc in pcs:
            entry = space.unwind_entry(pc)
            if entry is not None and entry[2] is not handle:
                return broken(name, f"row for {pc:#x} from another module {entry[2]}")
            handle.symbolize(pc)
            regs = {RA: pc, RSP: STACK_BASE + 64, RBP: STACK_BASE + 128}
            regs.update({r: 0x1111 * r for r in CALLEE_SAVED if r != RBP})
            for frame in walk(regs, memory, space, max_frames=8, caller_frame=pc != pcs[0]):
                frame.symbol                         # symbols of the object, lazily read
        space.remove_code_object(handle)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify(name, UnwindError, e)
    return classify(name, UnwindError, None)


def run_framemaps(seed: SeedObject, data: bytes, choice: int = 0) -> Outcome:
    """``ObjectImage`` with the seed's load addresses, its symbol queries and
    code range, ``frame_maps_for_object`` with the seed's sites, and
    ``ObjectImage.infer_load_addresses`` from the seed's symbols."""
    from deopt import DeoptError
    from deopt.framemaps import ObjectImage, frame_maps_for_object

    name = "framemaps"
    try:
        image = ObjectImage(data, seed.load_addresses, name=seed.name)
        image.undefined_symbols
        image.defined_functions
        code = image.code_range
        table = frame_maps_for_object(image, seed.sites, function=seed.function, version=1)
        for fm in table:
            if not any(cs.contains(fm.return_address) for cs in image.code_sections()):
                return broken(name, f"{fm!r} lies outside the code")
        if code is not None and not code[0] <= code[1]:
            return broken(name, f"code range {code}")
        ObjectImage.infer_load_addresses(data, seed.symbols)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify(name, DeoptError, e)
    return classify(name, DeoptError, None)


class ObjectLoader:
    """The emulated loader as a target: ``Machine.load_object`` then
    ``unload_object``, on one :class:`~osrjit.emulated.Machine` replaced every
    ``cases_per_machine`` cases (its arena never reuses addresses). Imports
    resolve to a page of the arena, or (odd ``choice``) the hook service to
    :data:`FAR_IMPORT`, so calls to it go through PLT stubs. After each
    case the machine must hold exactly what it held before (mappings, objects,
    unwinder modules): a case that leaks emulated memory is ``broken``."""

    name = "loader"

    def __init__(self, cases_per_machine: int = 2000):
        self.cases_per_machine = cases_per_machine
        self._machine = None
        self._imports = None
        self._cases = 0

    def _fresh(self):
        from osrjit.emulated import Machine
        from osrjit.emulated.loader import PROT_EXEC, PROT_READ
        machine = Machine()
        # Every symbol the seeds import resolves to a page of int3.
        self._imports = machine.map(4096, PROT_READ | PROT_EXEC, "imports")
        machine.write(self._imports, b"\xcc" * 4096)
        machine.space                               # builds the hypercall object now
        return machine

    def __call__(self, seed: SeedObject, data: bytes, choice: int = 0) -> Outcome:
        from osrjit import OsrJitError
        if self._machine is None or self._cases >= self.cases_per_machine:
            self._machine, self._cases = self._fresh(), 0
        self._cases += 1
        m = self._machine
        before = (len(m.regions), len(m.objects), len(m.space.modules))
        error = None
        far = choice % 2 == 1

        def resolve(symbol):
            if not symbol.startswith("osrjit"):
                return None
            # An odd choice puts the hook service out of rel32 reach: PLT stubs.
            return FAR_IMPORT if far and "hook" in symbol else self._imports

        try:
            obj = m.load_object(data, resolve, name=seed.name, export=False)
            try:
                for start, end in obj.ranges:
                    if not start < end:
                        return broken(self.name, f"empty code range {(start, end)}")
            finally:
                m.unload_object(obj)
        except Exception as e:                      # noqa: BLE001 - classified below
            error = e
        outcome = classify(self.name, OsrJitError, error)
        after = (len(m.regions), len(m.objects), len(m.space.modules))
        if after != before:
            self._machine = None                    # do not let one leak spoil later cases
            if not outcome.foreign:
                return broken(self.name, f"(regions, objects, modules) {before} -> {after} "
                                          f"after {outcome.kind}")
        return outcome


def run_patching(seed: SeedObject, data: bytes, choice: int = 0) -> Outcome:
    """``osrjit.native.patching.call_sites`` of the seed's direct-call symbols
    (strict for even ``choice``): the call sites the native backend would
    patch, each inside its section."""
    from osrjit import OsrJitError
    from osrjit.native.patching import call_sites

    name = "patching"
    try:
        found = call_sites(data, seed.load_addresses, seed.call_symbols,
                           strict=choice % 2 == 0)
    except Exception as e:                          # noqa: BLE001 - classified below
        return classify(name, OsrJitError, e)
    from unwinder.elfobject import read_object
    for sites in found.values():
        for site in sites:
            start = seed.load_addresses[site.section]
            size = read_object(data).section(site.section).size
            if not start <= site.instruction_address < site.rel32_address + 4 <= start + size:
                return broken(name, f"call site outside its section: {site}")
    return classify(name, OsrJitError, None)


def object_targets(loader: ObjectLoader | None = None) -> tuple[Target, ...]:
    """The object targets (``loader``: an :class:`ObjectLoader` to reuse)."""
    from deopt import DeoptError
    from osrjit import OsrJitError
    from unwinder import UnwindError
    return (Target("unwinder", run_unwinder, UnwindError),
            Target("framemaps", run_framemaps, DeoptError),
            Target("loader", loader or ObjectLoader(), OsrJitError),
            Target("patching", run_patching, OsrJitError))
