"""Decode LLVM's ``.llvm_stackmaps`` section (StackMap format version 3).

The layout follows ``llvm/docs/StackMaps.rst`` ("Stack Map Format"); field
names below follow that document. All integers are little-endian (x86-64)::

    Header {                                     offset 0
      uint8  : Stack Map Version (3)
      uint8  : Reserved (expected to be 0)
      uint16 : Reserved (expected to be 0)
    }
    uint32 : NumFunctions                        offset 4
    uint32 : NumConstants                        offset 8
    uint32 : NumRecords                          offset 12
    StkSizeRecord[NumFunctions] {                24 bytes each
      uint64 : Function Address
      uint64 : Stack Size (UINT64_MAX if not statically known)
      uint64 : Record Count
    }
    Constants[NumConstants] {                    8 bytes each
      uint64 : LargeConstant
    }
    StkMapRecord[NumRecords] {
      uint64 : PatchPoint ID
      uint32 : Instruction Offset (from the function's address)
      uint16 : Reserved (record flags)
      uint16 : NumLocations
      Location[NumLocations] {                   12 bytes each
        uint8  : Register | Direct | Indirect | Constant | ConstantIndex
        uint8  : Reserved (expected to be 0)
        uint16 : Location Size
        uint16 : Dwarf RegNum
        uint16 : Reserved (expected to be 0)
        int32  : Offset or SmallConstant
      }
      uint32 : Padding (only if required to align to 8 byte)
      uint16 : Padding
      uint16 : NumLiveOuts
      LiveOuts[NumLiveOuts] {                    4 bytes each
        uint16 : Dwarf RegNum
        uint8  : Reserved
        uint8  : Size in Bytes
      }
      uint32 : Padding (only if required to align to 8 byte)
    }

Records are grouped by function: the first ``functions[0].record_count``
records belong to function 0, the next ``functions[1].record_count`` to
function 1, and so on. LLVM preserves the order of functions, records and
locations; that order (plus the record ID and offset) is all a runtime has to
interpret a record.

:func:`parse` is pure: it reads bytes and returns frozen dataclasses. In a
relocatable object the function addresses are 0 and carry ``R_X86_64_64``
relocations in ``.rela.llvm_stackmaps``; the caller resolves those and passes
them in as ``relocations``.

Every decoding failure raises :class:`~deopt.errors.FrameMapError` whose
``offset`` is the byte offset into the section of the offending field.
Reserved and padding bytes are skipped without being checked, as LLVM's own
``StackMapParser`` does.
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import FrameMapError

__all__ = [
    "STACKMAP_VERSION",
    "UNKNOWN_STACK_SIZE",
    "LocationKind",
    "Location",
    "LiveOut",
    "FunctionRecord",
    "StackMapRecord",
    "StackMap",
    "parse",
]

#: The only format version this module decodes.
STACKMAP_VERSION = 3

#: ``Stack Size`` value LLVM writes when a function's frame size is not
#: statically known (for example it has a variable-sized ``alloca``).
UNKNOWN_STACK_SIZE = 0xFFFF_FFFF_FFFF_FFFF

_U64_MASK = 0xFFFF_FFFF_FFFF_FFFF

# Byte sizes of the fixed-size parts, from the layout above.
_HEADER_SIZE = 16           # version, reserved, 3 x uint32 counts
_FUNCTION_SIZE = 24         # StkSizeRecord
_CONSTANT_SIZE = 8          # LargeConstant
_RECORD_HEADER_SIZE = 16    # ID, instruction offset, flags, NumLocations
_LOCATION_SIZE = 12
_LIVE_OUT_SIZE = 4

_HEADER = struct.Struct("<BBHIII")
_FUNCTION = struct.Struct("<QQQ")
_CONSTANT = struct.Struct("<Q")
_RECORD_HEADER = struct.Struct("<QIHH")
_LOCATION = struct.Struct("<BBHHHi")
_LIVE_OUT_HEADER = struct.Struct("<HH")  # Padding, NumLiveOuts
_LIVE_OUT = struct.Struct("<HBB")


class LocationKind(enum.IntEnum):
    """Where a stackmap location's value lives (``Location`` type byte)."""

    #: The value is in register ``dwarf_reg``.
    REGISTER = 1
    #: The value *is* the address ``reg + offset`` (a frame slot's address,
    #: e.g. an ``alloca`` passed to the intrinsic).
    DIRECT = 2
    #: The value is in memory at ``[reg + offset]`` (e.g. a spill slot).
    INDIRECT = 3
    #: The value is the small constant stored in the offset field.
    CONSTANT = 4
    #: The value is ``constants[offset]`` of the section's constant pool.
    CONSTANT_INDEX = 5


@dataclass(frozen=True, slots=True, repr=False)
class Location:
    """One location of a record: where one live value can be found.

    ``kind``: a :class:`LocationKind`.
    ``size``: the value's size in bytes (``Location Size``).
    ``dwarf_reg``: a DWARF register number (x86-64: 0 rax, 1 rdx, 2 rcx,
    3 rbx, 4 rsi, 5 rdi, 6 rbp, 7 rsp, 8-15 r8-r15); meaningful for REGISTER,
    DIRECT and INDIRECT, 0 for the constant kinds.
    ``offset``: the signed 32-bit ``Offset or SmallConstant`` field exactly as
    in the section: a byte offset from ``dwarf_reg`` for DIRECT and INDIRECT,
    the constant itself for CONSTANT, the index into
    :attr:`StackMap.constants` for CONSTANT_INDEX.
    ``constant``: for CONSTANT_INDEX the resolved 64-bit constant (unsigned
    bit pattern, as stored in the pool); ``None`` for every other kind.
    ``section_offset``: byte offset of this location in the section, for
    error reports; not part of equality.
    """

    kind: LocationKind
    size: int
    dwarf_reg: int
    offset: int
    constant: int | None = None
    section_offset: int | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "kind", LocationKind(self.kind))
        if (self.kind is LocationKind.CONSTANT_INDEX) != (self.constant is not None):
            raise ValueError(
                "constant must be given exactly for CONSTANT_INDEX locations, "
                f"got kind={self.kind.name} constant={self.constant!r}"
            )

    @property
    def is_constant(self) -> bool:
        """True when the value is known statically (CONSTANT, CONSTANT_INDEX)."""
        return self.kind in (LocationKind.CONSTANT, LocationKind.CONSTANT_INDEX)

    @property
    def value(self) -> int | None:
        """The statically known value as an unsigned 64-bit bit pattern.

        CONSTANT: the small constant sign-extended to 64 bits (LLVM uses it for
        values that fit in an ``int32``), so ``-1`` reads as ``2**64 - 1``.
        CONSTANT_INDEX: the pool constant. Other kinds: ``None`` (the value is
        only known at run time, in a register or frame slot).
        """
        if self.kind is LocationKind.CONSTANT:
            return self.offset & _U64_MASK
        if self.kind is LocationKind.CONSTANT_INDEX:
            return self.constant
        return None

    def __repr__(self):
        k = LocationKind
        if self.kind is k.REGISTER:
            where = f"R#{self.dwarf_reg}"
        elif self.kind is k.DIRECT:
            where = f"R#{self.dwarf_reg} + {self.offset}"
        elif self.kind is k.INDIRECT:
            where = f"[R#{self.dwarf_reg} + {self.offset}]"
        elif self.kind is k.CONSTANT:
            where = f"{self.offset}"
        else:
            where = f"#{self.offset} ({self.constant})"
        return f"Location({self.kind.name} {where}, size={self.size})"


@dataclass(frozen=True, slots=True, repr=False)
class LiveOut:
    """A register live after a patchpoint (``LiveOuts`` entry).

    ``dwarf_reg``: DWARF register number. ``size``: bytes live in it.
    ``section_offset``: byte offset in the section; not part of equality.
    """

    dwarf_reg: int
    size: int
    section_offset: int | None = field(default=None, compare=False)

    def __repr__(self):
        return f"LiveOut(R#{self.dwarf_reg}, size={self.size})"


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """A function with stackmap records (``StkSizeRecord``).

    ``address``: the function's entry address (absolute once relocated; 0 in
    a relocatable object unless ``relocations`` supplied it).
    ``stack_size``: the frame size in bytes below the return address (saved
    registers, including a pushed frame pointer, plus locals), so at any
    record ``CFA = rsp + stack_size + 8`` on x86-64;
    :data:`UNKNOWN_STACK_SIZE` if not statically known.
    ``record_count``: how many consecutive records belong to this function.
    ``index``: position in :attr:`StackMap.functions`.
    ``section_offset``: byte offset in the section; not part of equality.
    """

    address: int
    stack_size: int
    record_count: int
    index: int = 0
    section_offset: int | None = field(default=None, compare=False, repr=False)

    @property
    def has_static_stack_size(self) -> bool:
        """False when LLVM wrote :data:`UNKNOWN_STACK_SIZE`."""
        return self.stack_size != UNKNOWN_STACK_SIZE


@dataclass(frozen=True, slots=True)
class StackMapRecord:
    """One stackmap / patchpoint / statepoint site (``StkMapRecord``).

    ``id``: the ``PatchPoint ID`` given to the intrinsic (not unique: LLVM may
    duplicate a site, e.g. when inlining or unrolling).
    ``offset``: instruction offset in bytes from ``function.address``. For a
    statepoint this is the call's *return address*; for
    ``llvm.experimental.stackmap`` it is the position of the intrinsic (the
    following instruction); for a patchpoint it is the start of the patchable
    call sequence.
    ``flags``: the reserved ``uint16`` after the offset (0 today).
    ``locations``: the intrinsic's live values in operand order (for a
    statepoint: 3 header constants, then deopt values, then gc pairs).
    ``live_outs``: registers live after the site (patchpoints only).
    ``function_index`` / ``function``: the owning :class:`FunctionRecord`.
    ``section_offset``: byte offset of the record; not part of equality.
    """

    id: int
    offset: int
    flags: int
    locations: tuple[Location, ...]
    live_outs: tuple[LiveOut, ...]
    function_index: int
    function: FunctionRecord = field(repr=False)
    section_offset: int | None = field(default=None, compare=False, repr=False)

    @property
    def instruction_address(self) -> int:
        """``function.address + offset``: absolute address of the site, bytes.

        For a statepoint this is the return address of the call. Only
        meaningful when the function address is known (see :func:`parse`).
        """
        return self.function.address + self.offset


@dataclass(frozen=True, slots=True, repr=False)
class StackMap:
    """A decoded ``.llvm_stackmaps`` section.

    ``version``: always :data:`STACKMAP_VERSION`.
    ``functions``: :class:`FunctionRecord` s in section order.
    ``constants``: the constant pool, unsigned 64-bit ints.
    ``records``: :class:`StackMapRecord` s in section order (grouped by
    function, see :meth:`records_for`).
    """

    version: int
    functions: tuple[FunctionRecord, ...]
    constants: tuple[int, ...]
    records: tuple[StackMapRecord, ...]

    def records_for(self, function_index: int) -> tuple[StackMapRecord, ...]:
        """The records of ``functions[function_index]``, in section order."""
        if not 0 <= function_index < len(self.functions):
            raise IndexError(
                f"function index {function_index} out of range: "
                f"the stackmap has {len(self.functions)} functions"
            )
        start = sum(f.record_count for f in self.functions[:function_index])
        return self.records[start:start + self.functions[function_index].record_count]

    def records_with_id(self, record_id: int) -> tuple[StackMapRecord, ...]:
        """Every record whose ``id`` is ``record_id`` (IDs may repeat)."""
        return tuple(r for r in self.records if r.id == record_id)

    def __repr__(self):
        return (
            f"StackMap(version={self.version}, functions={len(self.functions)}, "
            f"constants={len(self.constants)}, records={len(self.records)})"
        )


class _Reader:
    """Bounds-checked little-endian reads that fail with FrameMapError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def need(self, size: int, what: str):
        at = self.pos
        remaining = len(self.data) - at
        if size > remaining:
            raise FrameMapError(
                f"truncated stackmap: {what} needs {size} bytes, "
                f"{max(remaining, 0)} remain",
                at,
            )

    def read(self, st: struct.Struct, what: str) -> tuple:
        self.need(st.size, what)
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def align8(self, what: str):
        pad = -self.pos % 8
        if pad:
            self.need(pad, what)
            self.pos += pad


def parse(data: bytes, relocations: Mapping[int, int] | None = None) -> StackMap:
    """Decode a ``.llvm_stackmaps`` section.

    ``data``: the section's bytes (exactly one stackmap; trailing bytes are an
    error). ``relocations``: optional map from the byte offset (into ``data``)
    of a function's ``Function Address`` field to the absolute address to use
    instead of the stored value, e.g. each ``R_X86_64_64`` entry of
    ``.rela.llvm_stackmaps`` resolved as ``S + A``. Offsets that are not a
    ``Function Address`` field, or values outside ``[0, 2**64)``, raise
    :class:`FrameMapError`.

    Raises :class:`FrameMapError` (with the section byte offset) on a version
    other than 3, truncated data, counts that disagree with each other or with
    the data length, an unknown location kind, or a ConstantIndex outside the
    constant pool.
    """
    try:
        data = bytes(memoryview(data))  # memoryview: refuse bytes(int)'s zero fill
    except TypeError as exc:
        raise TypeError(f"stackmap data must be bytes-like, not {type(data).__name__}") from exc
    r = _Reader(data)

    r.need(1, "Stack Map Version")
    if data[0] != STACKMAP_VERSION:
        raise FrameMapError(
            f"unsupported stackmap version {data[0]} (only {STACKMAP_VERSION} is supported)", 0
        )
    _version, _res8, _res16, num_functions, num_constants, num_records = r.read(
        _HEADER, "header")

    # Check the fixed-size tables fit before looping, so a corrupt count
    # cannot make us allocate or iterate billions of times.
    r.need(num_functions * _FUNCTION_SIZE, f"{num_functions} StkSizeRecords")
    relocated = dict(relocations or {})
    for at in relocated:
        if not isinstance(at, int):
            raise TypeError(f"relocation offsets must be ints, got {at!r}")
    function_field_offsets = set()
    functions = []
    for index in range(num_functions):
        at = r.pos
        address, stack_size, record_count = r.read(_FUNCTION, "StkSizeRecord")
        function_field_offsets.add(at)
        if at in relocated:
            address = relocated[at]
        functions.append(FunctionRecord(address, stack_size, record_count, index, at))
    for at, value in relocated.items():
        if at not in function_field_offsets:
            raise FrameMapError(
                f"relocation at offset {at} does not target a Function Address field", at)
        if not (isinstance(value, int) and 0 <= value <= _U64_MASK):
            raise FrameMapError(
                f"relocated function address {value!r} is not an unsigned 64-bit value", at)

    constants_at = r.pos
    r.need(num_constants * _CONSTANT_SIZE, f"{num_constants} Constants")
    constants = tuple(
        _CONSTANT.unpack_from(data, constants_at + i * _CONSTANT_SIZE)[0]
        for i in range(num_constants)
    )
    r.pos += num_constants * _CONSTANT_SIZE

    total = sum(f.record_count for f in functions)
    if total != num_records:
        raise FrameMapError(
            f"NumRecords is {num_records} but the functions' record counts sum to {total}", 12)

    records = []
    function_iter = iter(functions)
    function = None
    left_in_function = 0
    for _ in range(num_records):
        while left_in_function == 0:
            # Cannot run out: the counts sum to num_records (checked above).
            function = next(function_iter)
            left_in_function = function.record_count
        left_in_function -= 1
        records.append(_parse_record(r, function, constants, constants_at))

    if r.pos != len(data):
        raise FrameMapError(
            f"{len(data) - r.pos} trailing bytes after the last of {num_records} records", r.pos)
    return StackMap(STACKMAP_VERSION, tuple(functions), constants, tuple(records))


def _parse_record(r: _Reader, function: FunctionRecord, constants: tuple[int, ...],
                  constants_at: int) -> StackMapRecord:
    record_at = r.pos
    record_id, insn_offset, flags, num_locations = r.read(
        _RECORD_HEADER, "StkMapRecord header")
    r.need(num_locations * _LOCATION_SIZE, f"{num_locations} Locations")
    locations = []
    for _ in range(num_locations):
        at = r.pos
        kind_byte, _res8, size, dwarf_reg, _res16, offset = r.read(_LOCATION, "Location")
        try:
            kind = LocationKind(kind_byte)
        except ValueError:
            raise FrameMapError(f"unknown location kind {kind_byte}", at) from None
        constant = None
        if kind is LocationKind.CONSTANT_INDEX:
            if not 0 <= offset < len(constants):
                raise FrameMapError(
                    f"ConstantIndex {offset} outside the constant pool of "
                    f"{len(constants)} (pool at offset {constants_at})",
                    at + 8,  # the Offset or SmallConstant field
                )
            constant = constants[offset]
        locations.append(Location(kind, size, dwarf_reg, offset, constant, at))
    r.align8("padding after Locations")
    _padding, num_live_outs = r.read(_LIVE_OUT_HEADER, "NumLiveOuts")
    r.need(num_live_outs * _LIVE_OUT_SIZE, f"{num_live_outs} LiveOuts")
    live_outs = []
    for _ in range(num_live_outs):
        at = r.pos
        dwarf_reg, _res8, size = r.read(_LIVE_OUT, "LiveOut")
        live_outs.append(LiveOut(dwarf_reg, size, at))
    r.align8("padding after LiveOuts")
    return StackMapRecord(record_id, insn_offset, flags, tuple(locations), tuple(live_outs),
                          function.index, function, record_at)
