"""Frame maps: where each live value of a suspended frame is, per return address.

Pipeline (each stage a function of the previous one's output)::

    object bytes + section load addresses  --ObjectImage-->  code sections, symbols,
                                                             relocated .llvm_stackmaps
    .llvm_stackmaps bytes                  --stackmaps.parse-->  StackMap
    StackMap + sites + code sections       --build_frame_maps-->  FrameMapTable

A *site* is a statepoint call a frame can be suspended at (see
``osrjit/abi.py``). The code generator knows each site's live values by name
and type (a mapping ``site id -> site``, duck-typed here as :class:`SiteLike`
because :mod:`deopt` never imports :mod:`osrjit`); LLVM knows where each value
ended up (a stackmap record at the call's return address, whose locations after
the :data:`STATEPOINT_HEADER_LOCATIONS` header constants follow the ``"deopt"``
bundle's order). A :class:`FrameMap` joins the two for one return address.

Every record is checked against the machine code: its offset must be the
return address of a call instruction (the bytes right before it decode as an
x86-64 ``call``), else :class:`~deopt.errors.FrameMapError` says which
function, site and offset do not fit. A frame map that points into the middle
of an instruction would make a later deoptimisation read garbage; we refuse it
at load time instead.

Addresses: ``return_address`` and ``function_address`` are absolute (as
loaded); "section offset" means bytes from the start of an ELF section of the
object; a record's ``offset`` is bytes from its function's first instruction.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from unwinder import errors as unwinder_errors
from unwinder.elfobject import (R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32, SHN_UNDEF, STT_FUNC,
                                STT_GNU_IFUNC, Section, Symbol, read_object)

from . import stackmaps
from .errors import FrameMapError, IncompatibleVersion, ObjectFormatError
from .stackmaps import Location, LocationKind, StackMap

__all__ = [
    "STATEPOINT_HEADER_LOCATIONS",
    "STACKMAP_SECTION",
    "SiteLike",
    "LiveSlot",
    "FrameMap",
    "FrameMapTable",
    "CallInstruction",
    "CodeSection",
    "ObjectImage",
    "decode_call_ending_at",
    "build_frame_maps",
    "frame_maps_for_object",
    "check_compatible",
]

#: A statepoint record starts with three Constant locations — calling
#: convention, flags, number of deopt values (LLVM ``StatepointOpers`` /
#: ``docs/Statepoints.rst`` "Stack Map Format") — before the deopt values.
#: ``osrjit.abi.STATEPOINT_HEADER_LOCATIONS`` names the same LLVM fact.
STATEPOINT_HEADER_LOCATIONS = 3
#: Index of the "number of deopt values" header constant.
_DEOPT_COUNT_INDEX = 2

#: Name of the section LLVM writes stackmap records to.
STACKMAP_SECTION = ".llvm_stackmaps"

#: Relocations that can sit on the rel32 of a direct ``call`` (E8).
_CALL_REL32_RELOCS = frozenset({R_X86_64_PC32, R_X86_64_PLT32})
_FUNC_TYPES = (STT_FUNC, STT_GNU_IFUNC)


class SiteLike(Protocol):
    """What :func:`build_frame_maps` needs to know about a site (``osrjit.abi.SiteInfo``).

    ``live`` is a sequence of objects with ``.name`` and ``.type`` in the order
    of the statepoint's ``"deopt"`` bundle; ``kind`` is opaque here (copied
    into :attr:`FrameMap.kind`).
    """
    id: int
    kind: Any
    live: tuple
    has_result: bool


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LiveSlot:
    """One value live across a site: source ``name``, LLVM ``type`` and where it is.

    ``location`` is the stackmap :class:`~deopt.stackmaps.Location` as LLVM
    recorded it for the suspended frame: REGISTER ``dwarf_reg``; INDIRECT
    ``[dwarf_reg + offset]`` (a spill slot); DIRECT ``dwarf_reg + offset``
    (the value *is* that address); CONSTANT / CONSTANT_INDEX (``location.value``).
    Register-relative locations use the frame's register values while its
    call is in flight, i.e. as restored at the return address (x86-64: the
    frame's ``rsp`` equals its callee's CFA).
    """
    name: str
    type: str
    location: Location


@dataclass(frozen=True)
class FrameMap:
    """The state of a frame of one version suspended at one call.

    ``function``: source-level function name. ``version``: the runtime's
    version id. ``site_id``: the statepoint ID (= :attr:`SiteInfo.id`).
    ``kind``: the site's kind as the code generator gave it (an
    ``osrjit.abi.SiteKind``). ``return_address``: absolute address the
    suspended call returns to — the key under which a stack walker finds this
    map. ``values``: one :class:`LiveSlot` per live value in the site's order.
    ``has_result``: whether the continuation uses the call's result.
    ``symbol``: the native function holding the call (the version's entry or
    its resume entry: a site appears once in each that reaches it, possibly
    more often if LLVM duplicated it). ``function_address``: absolute address
    of ``symbol``. ``stack_size``: that function's frame size in bytes below
    its return address (stackmap ``Stack Size``; so ``CFA = rsp + stack_size
    + 8`` at the site), :data:`stackmaps.UNKNOWN_STACK_SIZE` if not static.
    """
    function: str
    version: int
    site_id: int
    kind: Any
    return_address: int
    values: tuple[LiveSlot, ...]
    has_result: bool
    symbol: str | None = None
    function_address: int | None = None
    stack_size: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The live values' names in state order."""
        return tuple(v.name for v in self.values)

    def __repr__(self):
        vals = ", ".join(f"{v.name}:{v.type}={v.location!r}" for v in self.values)
        return (f"FrameMap({self.function} v{self.version} site {self.site_id} "
                f"{getattr(self.kind, 'name', self.kind)} @ {self.return_address:#x} "
                f"in {self.symbol}: [{vals}])")


@dataclass(frozen=True)
class FrameMapTable:
    """All frame maps of one loaded version, indexed two ways.

    ``maps``: in stackmap order. :meth:`at` finds the map for an absolute
    return address (what a stack walker has); :meth:`for_site` every map of a
    site id (entry and resume copies).
    """
    maps: tuple[FrameMap, ...] = ()
    _by_address: Mapping[int, FrameMap] = field(default_factory=dict, repr=False, compare=False)
    _by_site: Mapping[int, tuple[FrameMap, ...]] = field(default_factory=dict, repr=False,
                                                          compare=False)

    @classmethod
    def of(cls, maps: Iterable[FrameMap]) -> "FrameMapTable":
        """Index ``maps``; two maps at one return address raise FrameMapError."""
        maps = tuple(maps)
        by_address, by_site = {}, {}
        for fm in maps:
            other = by_address.get(fm.return_address)
            if other is not None:
                raise FrameMapError(
                    f"{fm.function}: sites {other.site_id} and {fm.site_id} both claim return "
                    f"address {fm.return_address:#x}")
            by_address[fm.return_address] = fm
            by_site.setdefault(fm.site_id, []).append(fm)
        return cls(maps, by_address, {k: tuple(v) for k, v in by_site.items()})

    def at(self, return_address: int) -> FrameMap | None:
        """The frame map whose absolute return address is ``return_address``, or None."""
        return self._by_address.get(return_address)

    def for_site(self, site_id: int) -> tuple[FrameMap, ...]:
        """Every frame map of ``site_id`` (empty if LLVM removed the site)."""
        return self._by_site.get(site_id, ())

    @property
    def site_ids(self) -> frozenset[int]:
        return frozenset(self._by_site)

    def __iter__(self):
        return iter(self.maps)

    def __len__(self):
        return len(self.maps)

    def __getitem__(self, k: int) -> FrameMap:
        """The ``k``-th frame map in stackmap order."""
        return self.maps[k]


# --------------------------------------------------------------------------
# x86-64 call decoding
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CallInstruction:
    """A call instruction found to end at a given section offset.

    ``start`` / ``end``: section offsets (``end`` is the return address).
    ``direct``: ``E8 rel32``; then ``target`` is the section offset
    ``end + rel32`` as encoded (meaningless if a relocation patches the rel32).
    ``indirect``: ``FF /2`` (``call r/m64``); ``target`` is None.
    """
    start: int
    end: int
    direct: bool
    target: int | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


def _modrm_tail_length(code: bytes, modrm_at: int) -> int | None:
    """Bytes taken by a ModRM byte at ``modrm_at`` plus its SIB and displacement.

    64-bit addressing (Intel SDM vol. 2, tables 2-2/2-3): mod=11 register;
    mod=00 rm=101 ``[rip + disp32]``; rm=100 (mod!=11) adds a SIB byte, whose
    base=101 under mod=00 means ``disp32`` with no base; mod=01 adds disp8,
    mod=10 disp32. None if the bytes run out.
    """
    if modrm_at >= len(code):
        return None
    modrm = code[modrm_at]
    mod, rm = modrm >> 6, modrm & 7
    length = 1
    if mod == 3:
        return length
    if rm == 4:                       # SIB follows
        if modrm_at + 1 >= len(code):
            return None
        length += 1
        if mod == 0 and code[modrm_at + 1] & 7 == 5:
            length += 4               # [index*scale + disp32]
    elif mod == 0 and rm == 5:
        length += 4                   # [rip + disp32]
    if mod == 1:
        length += 1
    elif mod == 2:
        length += 4
    return length


def decode_call_ending_at(code: bytes, end: int) -> list[CallInstruction]:
    """Every way the bytes before section offset ``end`` decode as a call ending there.

    Direct ``E8 rel32`` (5 bytes) and indirect ``[REX] FF /2`` with any ModRM
    form (2 to 8 bytes: REX, FF, ModRM, SIB, disp32). Several interpretations
    may fit the same bytes; the caller decides which is credible (see
    :func:`_verify_call`). Legacy prefixes are not decoded: LLVM emits none on
    the calls a statepoint lowers to.
    """
    found = []
    if 5 <= end <= len(code) and code[end - 5] == 0xE8:
        rel32 = int.from_bytes(code[end - 4:end], "little", signed=True)
        found.append(CallInstruction(end - 5, end, True, end + rel32))
    for length in range(2, 9):
        start = end - length
        if start < 0:
            break
        for has_rex in (False, True):
            op_at = start + 1 if has_rex else start
            if has_rex and not 0x40 <= code[start] <= 0x4F:
                continue
            if op_at + 1 >= end or code[op_at] != 0xFF:
                continue
            if (code[op_at + 1] >> 3) & 7 != 2:      # /2 = call r/m64
                continue
            tail = _modrm_tail_length(code, op_at + 1)
            if tail is not None and op_at + 1 + tail == end:
                found.append(CallInstruction(start, end, False))
    return found


# --------------------------------------------------------------------------
# The object as loaded
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeSection:
    """One executable section of an object as loaded.

    ``load_address``: absolute address of the section's first byte.
    ``data``: the section's bytes as emitted (before relocation).
    ``call_relocations``: section offsets of ``R_X86_64_PC32`` / ``PLT32``
    relocations (the rel32 field of a direct call to a symbol).
    ``functions``: section offset -> name of each function symbol defined here.
    """
    name: str
    load_address: int
    data: bytes
    call_relocations: frozenset[int] = frozenset()
    functions: Mapping[int, str] = field(default_factory=dict)

    @property
    def end_address(self) -> int:
        return self.load_address + len(self.data)

    def contains(self, address: int) -> bool:
        """Whether absolute ``address`` is in ``[load_address, end_address]``.

        The end is included: a call can be the last instruction, its return
        address one past the section.
        """
        return self.load_address <= address <= self.end_address


class ObjectImage:
    """A relocatable ELF object (as ``TargetMachine.emit_object`` produces) and
    where its sections were loaded.

    ``data``: the object's bytes (copied). ``load_addresses``: section name ->
    absolute address of its first byte; sections not named there are treated
    as not loaded. ``object``: the checked
    :class:`~unwinder.elfobject.RelocatableObject` (sections, symbols,
    relocations); bytes that are not one raise
    :class:`~deopt.errors.ObjectFormatError` here, so nothing later fails on
    the object's structure. Nothing here refers to live memory: the object is
    read from ``data`` only, so an image can outlive the code it describes.
    """

    def __init__(self, data: bytes, load_addresses: Mapping[str, int], *, name: str = "object"):
        self.data = bytes(data)
        self.load_addresses = dict(load_addresses)
        self.name = name
        try:
            self.object = read_object(self.data, name=name)
        except unwinder_errors.ObjectFormatError as e:
            raise ObjectFormatError(e.reason, e.offset) from e
        known = {s.name for s in self.object.sections}
        unknown = set(self.load_addresses) - known
        if unknown:
            raise FrameMapError(f"{name}: no section named {sorted(unknown)}")

    # -- symbols ---------------------------------------------------------------

    @staticmethod
    def infer_load_addresses(data: bytes, symbol_addresses: Mapping[str, int]) -> dict[str, int]:
        """Section load addresses implied by where some symbols ended up.

        For each ``symbol -> absolute address`` (e.g. a JIT's exported
        symbols): the section defining it was loaded at ``address -
        st_value``. Two symbols of one section that disagree raise
        FrameMapError.
        """
        image = ObjectImage(data, {})
        out: dict[str, int] = {}
        for sym in image.object.symbols:
            if sym.name not in symbol_addresses:
                continue
            section = image._section_of(sym)
            if section is None:
                raise FrameMapError(f"symbol {sym.name!r} is not defined in the object")
            base = symbol_addresses[sym.name] - sym.value
            if out.setdefault(section.name, base) != base:
                raise FrameMapError(
                    f"section {section.name}: symbol {sym.name!r} implies load address "
                    f"{base:#x}, another symbol {out[section.name]:#x}")
        missing = set(symbol_addresses) - {s.name for s in image.object.symbols}
        if missing:
            raise FrameMapError(f"symbols {sorted(missing)} are not in the object")
        return out

    def _section_of(self, sym: Symbol) -> Section | None:
        index = sym.section_index
        return None if index is None else self.object.sections[index]

    def symbol_address(self, sym: Symbol) -> int | None:
        """Absolute address of a symbol of :attr:`object` in a loaded section, else None."""
        section = self._section_of(sym)
        if section is None or section.name not in self.load_addresses:
            return None
        return self.load_addresses[section.name] + sym.value

    @property
    def undefined_symbols(self) -> tuple[str, ...]:
        """Names the object needs from outside (``SHN_UNDEF`` named symbols)."""
        return tuple(s.name for s in self.object.symbols if s.name and s.shndx == SHN_UNDEF)

    @property
    def defined_functions(self) -> dict[str, int]:
        """Function symbol name -> absolute address, for loaded sections."""
        out = {}
        for sym in self.object.symbols:
            if sym.type in _FUNC_TYPES:
                address = self.symbol_address(sym)
                if address is not None:
                    out[sym.name] = address
        return out

    # -- sections --------------------------------------------------------------

    def code_sections(self) -> tuple[CodeSection, ...]:
        """The loaded executable sections, with call relocations and function symbols."""
        out = []
        for sec in self.object.sections:
            if not sec.executable or sec.name not in self.load_addresses:
                continue
            calls = {rel.offset for rel in self.object.relocations_for(sec.index)
                     if rel.type in _CALL_REL32_RELOCS}
            functions = {sym.value: sym.name for sym in self.object.symbols
                         if sym.type in _FUNC_TYPES and sym.section_index == sec.index}
            out.append(CodeSection(sec.name, self.load_addresses[sec.name], sec.data,
                                   frozenset(calls), functions))
        return tuple(out)

    @property
    def code_range(self) -> tuple[int, int] | None:
        """``(start, end)`` absolute of ``.text`` as loaded, None if not loaded."""
        for cs in self.code_sections():
            if cs.name == ".text":
                return cs.load_address, cs.end_address
        return None

    def stackmap_bytes(self) -> bytes | None:
        """The ``.llvm_stackmaps`` section's bytes, or None if the object has none."""
        sec = self.object.section(STACKMAP_SECTION)
        return None if sec is None else sec.data

    def stackmap_relocations(self) -> dict[int, int]:
        """Resolved ``.rela.llvm_stackmaps``: field offset -> ``S + A`` (absolute).

        In the object every ``Function Address`` field is 0 with an
        ``R_X86_64_64`` relocation against the function's symbol (or its
        section symbol plus an addend). A relocation of another type, or
        against a symbol in a section that was not loaded, raises
        FrameMapError.
        """
        sec = self.object.section(STACKMAP_SECTION)
        if sec is None:
            return {}
        out = {}
        for rel in self.object.relocations_for(sec.index):
            sym = rel.symbol
            if rel.type != R_X86_64_64:
                raise FrameMapError(
                    f"{self.name}: unexpected relocation type {rel.type} against "
                    f"{sym.name or 'a section'} in {STACKMAP_SECTION}", rel.offset)
            address = self.symbol_address(sym)
            if address is None:
                raise FrameMapError(
                    f"{self.name}: {STACKMAP_SECTION} refers to {sym.name or 'a section'!r} "
                    f"whose section was not loaded", rel.offset)
            out[rel.offset] = address + rel.addend
        return out

    def parse_stackmap(self) -> StackMap | None:
        """The relocated stackmap (absolute function addresses), None if none."""
        data = self.stackmap_bytes()
        if data is None:
            return None
        return stackmaps.parse(data, self.stackmap_relocations())


# --------------------------------------------------------------------------
# Pairing records with sites
# --------------------------------------------------------------------------

def _verify_call(section: CodeSection, end: int) -> CallInstruction | None:
    """The call instruction ending at section offset ``end``, if credible.

    A direct ``E8 rel32`` counts if a PC32/PLT32 relocation sits on its rel32
    (a call to a symbol resolved at load time) or, unrelocated, if it targets
    the start of a function defined in the section. Any well-formed ``FF /2``
    counts.
    """
    for call in decode_call_ending_at(section.data, end):
        if call.direct:
            if end - 4 in section.call_relocations or call.target in section.functions:
                return call
        else:
            return call
    return None


def _function_section(sections, address: int) -> CodeSection | None:
    for cs in sections:
        if cs.load_address <= address < cs.end_address:
            return cs
    return None


def build_frame_maps(sites: Mapping[int, SiteLike], stackmap: StackMap,
                     sections: Iterable[CodeSection], *, function: str,
                     version: int) -> FrameMapTable:
    """Pair every statepoint record of ``stackmap`` with its site.

    ``sites``: site id -> site (the code generator's facts). ``stackmap``:
    parsed with absolute function addresses. ``sections``: the executable
    sections as loaded, to check each record against the machine code.
    ``function`` / ``version`` label the maps.

    Raises FrameMapError, naming function, site and offset, when a record has
    an id that is not a site, lacks the statepoint header, carries a number of
    deopt values different from its header or from the site's live values, or
    does not sit at the return address of a call instruction.
    """
    sections = tuple(sections)
    maps = []
    for record in stackmap.records:
        func = stackmap.functions[record.function_index]
        section = _function_section(sections, func.address)
        symbol = None
        if section is not None:
            symbol = section.functions.get(func.address - section.load_address)
        where = (f"{function} (version {version}, {symbol or hex(func.address)}): "
                 f"site {record.id} at offset {record.offset:#x}")
        site = sites.get(record.id)
        if site is None:
            raise FrameMapError(f"{where}: no such site (known: {sorted(sites)})",
                                record.section_offset)
        values = _deopt_values(record, site, where)
        if section is None:
            raise FrameMapError(f"{where}: function address {func.address:#x} is in no loaded "
                                f"code section", record.section_offset)
        end = func.address - section.load_address + record.offset
        if not 0 < end <= len(section.data) or _verify_call(section, end) is None:
            before = section.data[max(0, end - 8):max(0, end)].hex(" ")
            raise FrameMapError(
                f"{where}: not the return address of a call instruction "
                f"({section.name} offset {end:#x}, preceding bytes [{before}])",
                record.section_offset)
        maps.append(FrameMap(
            function=function, version=version, site_id=record.id, kind=site.kind,
            return_address=func.address + record.offset, values=values,
            has_result=site.has_result, symbol=symbol, function_address=func.address,
            stack_size=func.stack_size))
    return FrameMapTable.of(maps)


def _deopt_values(record, site, where) -> tuple[LiveSlot, ...]:
    locations = record.locations
    header = locations[:STATEPOINT_HEADER_LOCATIONS]
    if len(header) < STATEPOINT_HEADER_LOCATIONS or any(
            loc.kind is not LocationKind.CONSTANT for loc in header):
        raise FrameMapError(f"{where}: not a statepoint record (expected "
                            f"{STATEPOINT_HEADER_LOCATIONS} header constants, got {header})",
                            record.section_offset)
    count = header[_DEOPT_COUNT_INDEX].offset
    deopt = locations[STATEPOINT_HEADER_LOCATIONS:]
    if count != len(deopt):
        raise FrameMapError(
            f"{where}: header says {count} deopt values but the record has {len(deopt)} "
            f"locations after the header (gc-live values are not supported)",
            record.section_offset)
    live = tuple(site.live)
    if count != len(live):
        raise FrameMapError(
            f"{where}: record has {count} deopt values but the site lists {len(live)} live "
            f"values {[v.name for v in live]}", record.section_offset)
    return tuple(LiveSlot(v.name, v.type, loc) for v, loc in zip(live, deopt))


def frame_maps_for_object(image: ObjectImage, sites: Mapping[int, SiteLike], *,
                          function: str, version: int) -> FrameMapTable:
    """Parse ``image``'s stackmap and build its frame maps (empty without one)."""
    stackmap = image.parse_stackmap()
    if stackmap is None:
        return FrameMapTable.of(())
    return build_frame_maps(sites, stackmap, image.code_sections(), function=function,
                            version=version)


# --------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------

def check_compatible(old_maps: Iterable[FrameMap], new_sites: Mapping[int, SiteLike]) -> None:
    """Raise IncompatibleVersion unless every old frame can resume in the new version.

    A frame of the old version suspended at site ``s`` (any of ``old_maps``)
    can be continued by the new version's resume entry iff:

    * the new version has a site with id ``s`` (its resume entry handles it);
    * every live value the new site needs is provided by the old frame under
      the same name with the same type — ``new.live ⊆ old.live`` by name,
      types equal; the new version may need fewer values, never more;
    * if the new site uses the call's result, so did the old one (otherwise
      the old frame's call may not produce a value the new code can use).

    Site kinds and callees are not compared: the site id is the contract. The
    first incompatible site (lowest id) is reported with every difference.
    """
    by_site: dict[int, list[FrameMap]] = {}
    for fm in old_maps:
        by_site.setdefault(fm.site_id, []).append(fm)
    for site_id in sorted(by_site):
        for fm in by_site[site_id]:
            reasons = _differences(fm, new_sites.get(site_id))
            if reasons:
                reason = "; ".join(reasons)
                raise IncompatibleVersion(
                    f"{fm.function}: frames of version {fm.version} at site {site_id} "
                    f"({getattr(fm.kind, 'value', fm.kind)}) cannot resume in the new version: "
                    f"{reason}", site_id=site_id, reason=reason)


def _differences(fm: FrameMap, new_site) -> list[str]:
    if new_site is None:
        return ["the new version has no resume entry for this site"]
    reasons = []
    provided = {v.name: v.type for v in fm.values}
    missing = [v for v in new_site.live if v.name not in provided]
    if missing:
        reasons.append("new version needs " + ", ".join(f"{v.name!r} ({v.type})" for v in missing)
                       + f" which the old frame does not provide (old provides "
                       f"{sorted(provided) or 'nothing'})")
    mistyped = [(v, provided[v.name]) for v in new_site.live
                if v.name in provided and provided[v.name] != v.type]
    if mistyped:
        reasons.append("type of " + ", ".join(f"{v.name!r} differs: old {old}, new {v.type}"
                                              for v, old in mistyped))
    if new_site.has_result and not fm.has_result:
        reasons.append("new version uses the call's result but the old site has none")
    return reasons
