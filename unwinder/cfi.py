"""Parse layer: ``.eh_frame`` CIEs and FDEs, and the ``.eh_frame_hdr`` search table.

This module turns section bytes into frozen :class:`CIE` / :class:`FDE`
records. It does not interpret call-frame instructions; that is
:mod:`unwinder.rules` (``rules.decode_fde(fde)`` -> rule table). The split
follows pyelftools' ``callframe.py``: bytes -> entries -> decoded table, each
step lazy and memoised.

Formats, and where their rules come from:

* ``.eh_frame`` is the Linux Standard Base variant of DWARF ``.debug_frame``
  (LSB Core 5.0, §10.6 "Exception Frames"; DWARF 5 §6.4 "Call Frame
  Information"). Differences from ``.debug_frame`` that matter here: the CIE
  id is 0 (not 0xffffffff), the FDE's CIE_pointer is a *reverse displacement
  from the CIE_pointer field itself*, and addresses are "encoded pointers"
  (``DW_EH_PE_*``) chosen by the CIE's augmentation data.
* ``.eh_frame_hdr`` is described in LSB Core §10.6.2 "The .eh_frame_hdr
  section": a version byte, three encodings, a pointer to ``.eh_frame``, an
  FDE count, and a table of (initial_location, FDE address) pairs sorted by
  initial_location for binary search.

Addresses: every address this module returns is *absolute* in the address
space of the ``address`` the caller passed for the section (for an ELF file
view pass ``sh_addr``; for a loaded module pass ``sh_addr + load_bias``).
Offsets (``offset``, ``instructions_offset``, :attr:`CFIError.offset`) are
byte offsets from the first byte of the section.
"""

import bisect
import struct
from dataclasses import dataclass, field

from .errors import CFIError

# DW_EH_PE_* pointer encodings (LSB Core §10.5.1 "DWARF Exception Header
# Encoding"). The low nibble is the value format, bits 4-6 the application
# (what the value is relative to), bit 7 the indirect flag.
DW_EH_PE_absptr = 0x00
DW_EH_PE_uleb128 = 0x01
DW_EH_PE_udata2 = 0x02
DW_EH_PE_udata4 = 0x03
DW_EH_PE_udata8 = 0x04
DW_EH_PE_signed = 0x08
DW_EH_PE_sleb128 = 0x09
DW_EH_PE_sdata2 = 0x0A
DW_EH_PE_sdata4 = 0x0B
DW_EH_PE_sdata8 = 0x0C

DW_EH_PE_pcrel = 0x10
DW_EH_PE_textrel = 0x20
DW_EH_PE_datarel = 0x30
DW_EH_PE_funcrel = 0x40
DW_EH_PE_aligned = 0x50

DW_EH_PE_indirect = 0x80
DW_EH_PE_omit = 0xFF

#: Address size of the targets this package supports (x86-64), in bytes.
ADDRESS_SIZE = 8

_MASK64 = (1 << 64) - 1

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Fixed-size value formats: low nibble -> struct. DW_EH_PE_absptr and
# DW_EH_PE_signed are address-sized (8 bytes on x86-64).
_FIXED_FORMATS = {
    DW_EH_PE_absptr: struct.Struct("<Q"),
    DW_EH_PE_udata2: struct.Struct("<H"),
    DW_EH_PE_udata4: struct.Struct("<I"),
    DW_EH_PE_udata8: struct.Struct("<Q"),
    DW_EH_PE_signed: struct.Struct("<q"),
    DW_EH_PE_sdata2: struct.Struct("<h"),
    DW_EH_PE_sdata4: struct.Struct("<i"),
    DW_EH_PE_sdata8: struct.Struct("<q"),
}
_VALID_APPLICATIONS = frozenset(
    (0, DW_EH_PE_pcrel, DW_EH_PE_textrel, DW_EH_PE_datarel, DW_EH_PE_funcrel, DW_EH_PE_aligned)
)

# LEB128 of a 64-bit value needs at most ceil(64/7) = 10 bytes. Allow a little
# padding (assemblers pad with 0x80 bytes for relaxation), but bound the loop
# so corrupt input cannot build huge integers.
_MAX_LEB128_BYTES = 16


# --------------------------------------------------------------------------
# Primitive readers. ``buf`` is a bytes-like object indexable to ints; ``pos``
# and ``end`` are indexes into it; ``base`` is added to a position to turn it
# into the section offset reported in errors.
# --------------------------------------------------------------------------

def read_uleb128(buf, pos, end, base=0, error=CFIError):
    """Decode an unsigned LEB128 (DWARF 5 §7.6) at ``buf[pos]``.

    Returns ``(value, next_pos)``. Raises ``error(message, base + pos)`` if
    the number runs past ``end`` or does not fit in 64 bits.
    """
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # one-byte fast path: almost every CFI operand
            return byte, pos + 1
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise error("truncated ULEB128", base + start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if pos - start >= _MAX_LEB128_BYTES:
            raise error("ULEB128 too long", base + start)
    if result > _MASK64:
        raise error("ULEB128 does not fit in 64 bits", base + start)
    return result, pos


def read_sleb128(buf, pos, end, base=0, error=CFIError):
    """Decode a signed LEB128 (DWARF 5 §7.6) at ``buf[pos]``.

    Returns ``(value, next_pos)`` with ``value`` a Python int in
    [-2**63, 2**63). Errors as :func:`read_uleb128`.
    """
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # one-byte fast path
            return (byte - 0x80 if byte & 0x40 else byte), pos + 1
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise error("truncated SLEB128", base + start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
        if pos - start >= _MAX_LEB128_BYTES:
            raise error("SLEB128 too long", base + start)
    if byte & 0x40:
        result -= 1 << shift
    if not -(1 << 63) <= result < (1 << 63):
        raise error("SLEB128 does not fit in 64 bits", base + start)
    return result, pos


def encoded_pointer_size(encoding):
    """Size in bytes of a fixed-size ``DW_EH_PE_*`` value format, or ``None`` for LEB128."""
    fmt = _FIXED_FORMATS.get(encoding & 0x0F)
    if fmt is None:
        return None
    return fmt.size


def check_encoding(encoding, offset, what):
    """Raise :class:`CFIError` unless ``encoding`` is a well-formed ``DW_EH_PE_*`` byte."""
    fmt = encoding & 0x0F
    if fmt not in _FIXED_FORMATS and fmt not in (DW_EH_PE_uleb128, DW_EH_PE_sleb128):
        raise CFIError(f"invalid {what} pointer format {encoding:#04x}", offset)
    if (encoding & 0x70) not in _VALID_APPLICATIONS:
        raise CFIError(f"invalid {what} pointer application {encoding:#04x}", offset)


def read_encoded_pointer(buf, pos, end, encoding, section_address, *,
                         relocations=None, data_base=None, text_base=None,
                         func_base=None, null_is_zero=False):
    """Decode one ``DW_EH_PE_*`` encoded pointer at section offset ``pos``.

    ``buf`` is the whole section and ``section_address`` the absolute address
    of ``buf[0]``, so a pcrel value is relative to ``section_address + pos``
    (the address of the field itself, LSB §10.5.1).

    ``relocations`` maps a field's section offset to the absolute address the
    field denotes; when it has ``pos`` the stored bytes are skipped, not read
    (an unrelocated object file stores 0 there). ``data_base`` / ``text_base``
    / ``func_base`` are the bases for datarel / textrel / funcrel; using an
    application whose base is ``None`` raises :class:`CFIError`.

    ``null_is_zero``: for personality and LSDA pointers libgcc
    (``read_encoded_value_with_base`` in ``unwind-pe.h``) treats a stored 0 as
    a null pointer and does not apply pcrel etc.; pass True for those.

    The indirect flag (0x80) is not followed: the returned value is the
    address *of* the pointer. Returns ``(value, next_pos)`` with ``value``
    reduced modulo 2**64.
    """
    if encoding == DW_EH_PE_omit:
        raise CFIError("DW_EH_PE_omit used for a present pointer", pos)
    application = encoding & 0x70
    if application == DW_EH_PE_aligned:
        # The value is an absolute address-sized word at the next
        # address-size-aligned address.
        misalign = (section_address + pos) % ADDRESS_SIZE
        if misalign:
            pos += ADDRESS_SIZE - misalign
        fmt = _FIXED_FORMATS[DW_EH_PE_absptr]
    else:
        fmt = _FIXED_FORMATS.get(encoding & 0x0F)
    field_pos = pos
    if fmt is not None:
        next_pos = pos + fmt.size
        if next_pos > end:
            raise CFIError("truncated encoded pointer", pos)
        if relocations is not None and pos in relocations:
            return relocations[pos] & _MASK64, next_pos
        (value,) = fmt.unpack_from(buf, pos)
    elif encoding & 0x0F == DW_EH_PE_uleb128:
        value, next_pos = read_uleb128(buf, pos, end)
    elif encoding & 0x0F == DW_EH_PE_sleb128:
        value, next_pos = read_sleb128(buf, pos, end)
    else:
        raise CFIError(f"invalid pointer encoding {encoding:#04x}", pos)
    if relocations is not None and field_pos in relocations:
        return relocations[field_pos] & _MASK64, next_pos
    if null_is_zero and value == 0:
        return 0, next_pos
    if application == DW_EH_PE_pcrel:
        value += section_address + field_pos
    elif application == DW_EH_PE_datarel:
        if data_base is None:
            raise CFIError("DW_EH_PE_datarel pointer but no data base given", field_pos)
        value += data_base
    elif application == DW_EH_PE_textrel:
        if text_base is None:
            raise CFIError("DW_EH_PE_textrel pointer but no text base given", field_pos)
        value += text_base
    elif application == DW_EH_PE_funcrel:
        if func_base is None:
            raise CFIError("DW_EH_PE_funcrel pointer outside an FDE", field_pos)
        value += func_base
    elif application not in (0, DW_EH_PE_aligned):
        raise CFIError(f"invalid pointer application {encoding:#04x}", field_pos)
    return value & _MASK64, next_pos


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CIE:
    """A Common Information Entry (DWARF 5 §6.4.1; LSB §10.6.1.1).

    Identity-compared and hashable by identity; :class:`EhFrame` caches one
    object per offset.
    """

    #: Section offset (bytes) of the CIE's length field.
    offset: int
    #: Section offset one past the CIE's last byte.
    end_offset: int
    #: CIE version: 1 (GCC, LLVM), 3 or 4.
    version: int
    #: Augmentation string, e.g. ``"zR"``, ``"zPLR"``, ``"zRS"``.
    augmentation: str
    #: Multiplier (bytes) for advance_loc deltas.
    code_alignment_factor: int
    #: Multiplier (bytes, usually -8) for factored register/CFA offsets.
    data_alignment_factor: int
    #: DWARF register number of the return-address column (16 on x86-64).
    return_address_register: int
    #: ``DW_EH_PE_*`` encoding of FDE pc_begin/pc_range and DW_CFA_set_loc ('R');
    #: ``DW_EH_PE_absptr`` when the augmentation has no 'R'.
    fde_encoding: int
    #: ``DW_EH_PE_*`` encoding of the FDE's LSDA pointer ('L'), or None.
    lsda_encoding: int | None
    #: Personality routine address ('P'), absolute, or None. When
    #: :attr:`personality_indirect` is set this is the address of a word that
    #: holds the routine's address (typically a ``DW.ref.__gxx_personality_v0``
    #: slot); it is not dereferenced here.
    personality: int | None
    personality_indirect: bool
    #: 'S': frames of this CIE are signal frames. The walker must look up the
    #: caller's pc as-is, not ``return_address - 1`` (libgcc ``_Unwind_Find_FDE``
    #: callers; the interrupted instruction has not executed).
    is_signal_frame: bool
    #: Raw initial instructions (bytes) that define each FDE's first row.
    initial_instructions: bytes
    #: Section offset of ``initial_instructions[0]``.
    initial_instructions_offset: int
    #: Cache for derived data owned by upper layers (``rules`` stores the
    #: decoded initial state here). Lives as long as the CIE.
    memo: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class FDE:
    """A Frame Description Entry (DWARF 5 §6.4.1; LSB §10.6.1.2).

    ``pc_begin``/``pc_end`` are absolute addresses, half-open
    ``[pc_begin, pc_end)``. Identity-compared; :class:`EhFrame` caches one
    object per offset so that ``rules.decode_fde`` memoises per FDE.
    """

    #: Section offset (bytes) of the FDE's length field.
    offset: int
    #: Section offset one past the FDE's last byte.
    end_offset: int
    cie: CIE
    #: First address covered (absolute; "initial_location" in DWARF).
    pc_begin: int
    #: One past the last address covered (absolute; pc_begin + "address_range").
    pc_end: int
    #: Absolute LSDA address ('L' augmentation), or None.
    lsda: int | None
    #: Raw call-frame instructions (bytes).
    instructions: bytes
    #: Section offset of ``instructions[0]``.
    instructions_offset: int
    #: The section this FDE came from (for DW_CFA_set_loc operands).
    section: "EhFrame" = field(repr=False, compare=False)
    #: Cache for derived data owned by upper layers (``rules.decode_fde``
    #: stores the table here). Lives as long as the FDE.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __contains__(self, pc):
        return self.pc_begin <= pc < self.pc_end


# --------------------------------------------------------------------------
# .eh_frame_hdr
# --------------------------------------------------------------------------

class EhFrameHdr:
    """The ``.eh_frame_hdr`` section: binary-search table over FDEs.

    ``data`` is the section's bytes and ``address`` the absolute address of
    its first byte (same address space as the :class:`EhFrame` it indexes).
    Layout (LSB Core §10.6.2)::

        u8  version            = 1
        u8  eh_frame_ptr_enc
        u8  fde_count_enc
        u8  table_enc          (typically DW_EH_PE_datarel|DW_EH_PE_sdata4)
        enc eh_frame_ptr
        enc fde_count
        { enc initial_location; enc fde_address } [fde_count]

    ``datarel`` in this section is relative to the start of
    ``.eh_frame_hdr`` itself (LSB §10.6.2; libgcc ``unwind-dw2-fde-dip.c``).
    Holds a reference to ``data`` for its lifetime.
    """

    def __init__(self, data, address):
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        self.data = data
        self.address = address
        size = len(data)
        if size < 4:
            raise CFIError(".eh_frame_hdr shorter than its 4-byte header", 0)
        version, ptr_enc, count_enc, table_enc = data[0], data[1], data[2], data[3]
        if version != 1:
            raise CFIError(f"unsupported .eh_frame_hdr version {version}", 0)
        if ptr_enc == DW_EH_PE_omit:
            raise CFIError(".eh_frame_hdr eh_frame_ptr_enc is DW_EH_PE_omit", 1)
        check_encoding(ptr_enc, 1, "eh_frame_ptr")
        self.eh_frame_ptr_enc = ptr_enc
        self.fde_count_enc = count_enc
        self.table_enc = table_enc
        #: Absolute address of the ``.eh_frame`` section this header indexes.
        self.eh_frame_address, pos = read_encoded_pointer(
            data, 4, size, ptr_enc, address, data_base=address)
        self.fde_count = 0
        self._table_pos = pos
        self._entry = None
        if count_enc == DW_EH_PE_omit or table_enc == DW_EH_PE_omit:
            return
        check_encoding(count_enc, 2, "fde_count")
        check_encoding(table_enc, 3, "table")
        count, pos = read_encoded_pointer(data, pos, size, count_enc, address, data_base=address)
        fmt = _FIXED_FORMATS.get(table_enc & 0x0F)
        if fmt is None or table_enc & 0x70 not in (0, DW_EH_PE_pcrel, DW_EH_PE_datarel):
            # LEB128 entries cannot be binary-searched; libgcc falls back to a
            # linear search of .eh_frame in that case, and so do we.
            return
        if pos + 2 * fmt.size * count > size:
            raise CFIError(f".eh_frame_hdr table of {count} entries runs past the section", pos)
        self.fde_count = count
        self._table_pos = pos
        self._entry_size = 2 * fmt.size
        self._entry = struct.Struct("<" + fmt.format[1:] * 2)
        application = table_enc & 0x70
        # Per-entry base: datarel -> hdr start; pcrel -> field address;
        # absptr -> 0.
        self._datarel = address if application == DW_EH_PE_datarel else 0
        self._pcrel = application == DW_EH_PE_pcrel
        self._field_size = fmt.size

    @property
    def has_table(self):
        """True if the header carries a binary-searchable table (fixed-size entries)."""
        return self._entry is not None

    def __len__(self):
        return self.fde_count

    def table_entry(self, index):
        """``(initial_location, fde_address)`` of table entry ``index``, both absolute."""
        if not 0 <= index < self.fde_count:
            raise IndexError(index)
        return self._decode_entry(index)

    def _decode_entry(self, index):
        pos = self._table_pos + index * self._entry_size
        loc, fde = self._entry.unpack_from(self.data, pos)
        if self._pcrel:
            field_address = self.address + pos
            return ((loc + field_address) & _MASK64,
                    (fde + field_address + self._field_size) & _MASK64)
        base = self._datarel
        return (loc + base) & _MASK64, (fde + base) & _MASK64

    def lookup(self, pc):
        """Absolute address of the FDE whose initial_location is the greatest one <= ``pc``.

        Returns None if ``pc`` is below every entry or there is no table.
        The caller must still check the FDE's ``pc_end``: the table does not
        record range ends.
        """
        count = self.fde_count
        if not count:
            return None
        entry = self._entry
        data = self.data
        table_pos = self._table_pos
        entry_size = self._entry_size
        if not self._pcrel:
            # Fast path (the universal sdata4|datarel case): compare raw
            # stored values against pc - base, no per-probe address math.
            # Raw values are signed or unsigned exactly as stored, and the
            # sorted order of (raw + base) equals the order of raw, so a
            # plain binary search over raw values is valid.
            target = pc - self._datarel
            lo, hi = 0, count
            while lo < hi:
                mid = (lo + hi) >> 1
                if entry.unpack_from(data, table_pos + mid * entry_size)[0] <= target:
                    lo = mid + 1
                else:
                    hi = mid
        else:
            lo, hi = 0, count
            while lo < hi:
                mid = (lo + hi) >> 1
                if self._decode_entry(mid)[0] <= pc:
                    lo = mid + 1
                else:
                    hi = mid
        if lo == 0:
            return None
        return self._decode_entry(lo - 1)[1]


# --------------------------------------------------------------------------
# .eh_frame
# --------------------------------------------------------------------------

class EhFrame:
    """The ``.eh_frame`` section: lazily decoded CIEs and FDEs.

    ``data``: the section bytes (``bytes`` or any buffer; a memoryview is
    kept, not copied, so the buffer must outlive this object).
    ``address``: absolute address of ``data[0]`` in the address space FDE pc
    ranges should be reported in (``sh_addr``, or ``sh_addr + load_bias``).
    ``relocations``: section offset of an encoded pointer field (FDE
    pc_begin, personality, LSDA, DW_CFA_set_loc operand) -> absolute address
    that field denotes. Used for relocatable objects (LLVM emits
    ``R_X86_64_PC32`` relocations on ``.eh_frame`` pc_begin fields), whose
    stored bytes are then ignored.
    ``hdr``: an :class:`EhFrameHdr` for the same address space; when given
    (with a table), :meth:`find_fde` decodes only the FDE it finds and its CIE.
    ``data_base`` / ``text_base``: bases for ``DW_EH_PE_datarel`` /
    ``DW_EH_PE_textrel`` pointers (x86-64 toolchains do not emit them).
    """

    def __init__(self, data, address, relocations=None, hdr=None, *, data_base=None,
                 text_base=None):
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        self.data = data
        self.address = address
        self.relocations = relocations if relocations else None
        self.hdr = hdr
        self.data_base = data_base
        self.text_base = text_base
        self._cies = {}
        self._fdes = {}
        self._index = None  # (pc_begins, fdes), built by _build_index
        if hdr is not None and hdr.eh_frame_address != address:
            raise CFIError(
                f".eh_frame_hdr points at {hdr.eh_frame_address:#x} but .eh_frame is at "
                f"{address:#x} (different address spaces?)", 4)

    def __len__(self):
        return len(self.data)

    # -- pointer decoding shared with the rule layer ------------------------

    def read_pointer(self, offset, end, encoding, func_base=None):
        """Decode an encoded pointer at section ``offset`` (bytes) with ``end`` as limit.

        Returns ``(absolute_value, next_offset)``; see :func:`read_encoded_pointer`.
        Used by ``rules`` for DW_CFA_set_loc.
        """
        return read_encoded_pointer(
            self.data, offset, end, encoding, self.address,
            relocations=self.relocations, data_base=self.data_base,
            text_base=self.text_base, func_base=func_base)

    # -- entry iteration ----------------------------------------------------

    def _entry_header(self, offset):
        """Decode the length and CIE id/pointer of the entry at ``offset``.

        Returns None for a zero terminator, else ``(end, id_pos, cie_id)``
        with ``end`` the section offset one past the entry.
        """
        data = self.data
        size = len(data)
        if offset < 0 or offset + 4 > size:
            raise CFIError("truncated entry length", offset)
        (length,) = _U32.unpack_from(data, offset)
        pos = offset + 4
        if length == 0:
            return None
        if length == 0xFFFFFFFF:
            # 64-bit DWARF format (DWARF 5 §7.4): the real length follows.
            if pos + 8 > size:
                raise CFIError("truncated 64-bit entry length", offset)
            (length,) = _U64.unpack_from(data, pos)
            pos += 8
        elif length >= 0xFFFFFFF0:
            raise CFIError(f"reserved initial length {length:#x}", offset)
        end = pos + length
        if end > size:
            raise CFIError(f"entry length {length:#x} runs past end of section", offset)
        # The CIE id / CIE_pointer is 4 bytes in .eh_frame even in the 64-bit
        # format (LSB §10.6.1: "a 4 byte unsigned value"; libunwind and gimli
        # agree; readelf reads 8 bytes there, but no producer emits 64-bit
        # .eh_frame entries).
        if pos + 4 > end:
            raise CFIError("entry too short for its CIE id", pos)
        (cie_id,) = _U32.unpack_from(data, pos)
        return end, pos, cie_id

    def entries(self):
        """Iterate the section's CIEs and FDEs in section order.

        Stops at a zero terminator (LSB §10.6.1: "a 0 length ... indicates the
        end of the .eh_frame section") or at the end of the data. Raises
        :class:`CFIError` on the first malformed entry.
        """
        offset = 0
        size = len(self.data)
        while offset < size:
            header = self._entry_header(offset)
            if header is None:
                return
            end, id_pos, cie_id = header
            if cie_id == 0:
                yield self._cie_at(offset, header)
            else:
                yield self._fde_at(offset, header)
            offset = end

    def cie_at(self, offset):
        """The CIE at section ``offset`` (bytes). Cached."""
        cie = self._cies.get(offset)
        if cie is None:
            cie = self._cie_at(offset, self._entry_header(offset))
        return cie

    def fde_at(self, offset):
        """The FDE at section ``offset`` (bytes). Cached."""
        fde = self._fdes.get(offset)
        if fde is None:
            fde = self._fde_at(offset, self._entry_header(offset))
        return fde

    # -- CIE ----------------------------------------------------------------

    def _cie_at(self, offset, header):
        cie = self._cies.get(offset)
        if cie is not None:
            return cie
        if header is None:
            raise CFIError("expected a CIE, found a zero terminator", offset)
        end, id_pos, cie_id = header
        if cie_id != 0:
            raise CFIError("expected a CIE (id 0), found an FDE", id_pos)
        data = self.data
        pos = id_pos + 4
        if pos >= end:
            raise CFIError("truncated CIE version", pos)
        version = data[pos]
        if version not in (1, 3, 4):
            raise CFIError(f"unsupported CIE version {version}", pos)
        pos += 1
        rest = bytes(data[pos:end])
        nul = rest.find(b"\0")
        if nul < 0:
            raise CFIError("unterminated CIE augmentation string", pos)
        try:
            augmentation = rest[:nul].decode("ascii")
        except UnicodeDecodeError:
            raise CFIError("non-ASCII CIE augmentation string", pos) from None
        if "eh" in augmentation:
            # Pre-"z" GCC (before 3.0) put an eh_ptr word after the string; no
            # current toolchain emits it.
            raise CFIError(f"unsupported legacy augmentation {augmentation!r}", pos)
        pos += nul + 1
        if version >= 4:
            # DWARF 4 added address_size and segment_selector_size here.
            if pos + 2 > end:
                raise CFIError("truncated CIE address/segment size", pos)
            if data[pos] != ADDRESS_SIZE:
                raise CFIError(f"unsupported CIE address_size {data[pos]}", pos)
            if data[pos + 1] != 0:
                raise CFIError(f"unsupported CIE segment_selector_size {data[pos + 1]}", pos + 1)
            pos += 2
        code_alignment_factor, pos = read_uleb128(data, pos, end)
        data_alignment_factor, pos = read_sleb128(data, pos, end)
        if version == 1:
            # Version 1 stores the return-address column as a ubyte
            # (DWARF 2 §6.4.1); version 3 made it a ULEB128.
            if pos >= end:
                raise CFIError("truncated CIE return_address_register", pos)
            return_address_register = data[pos]
            pos += 1
        else:
            return_address_register, pos = read_uleb128(data, pos, end)

        fde_encoding = DW_EH_PE_absptr
        lsda_encoding = None
        personality = None
        personality_indirect = False
        is_signal_frame = False
        if augmentation.startswith("z"):
            aug_len, pos = read_uleb128(data, pos, end)
            aug_end = pos + aug_len
            if aug_end > end:
                raise CFIError("CIE augmentation data runs past the entry", pos)
            for letter in augmentation[1:]:
                if letter == "R":
                    if pos >= aug_end:
                        raise CFIError("truncated 'R' augmentation data", pos)
                    fde_encoding = data[pos]
                    if fde_encoding == DW_EH_PE_omit or fde_encoding & DW_EH_PE_indirect:
                        raise CFIError(f"invalid FDE pointer encoding {fde_encoding:#04x}", pos)
                    check_encoding(fde_encoding, pos, "FDE")
                    pos += 1
                elif letter == "P":
                    if pos >= aug_end:
                        raise CFIError("truncated 'P' augmentation data", pos)
                    encoding = data[pos]
                    if encoding == DW_EH_PE_omit:
                        raise CFIError("personality encoding is DW_EH_PE_omit", pos)
                    check_encoding(encoding, pos, "personality")
                    pos += 1
                    personality, pos = read_encoded_pointer(
                        data, pos, aug_end, encoding, self.address,
                        relocations=self.relocations, data_base=self.data_base,
                        text_base=self.text_base, null_is_zero=True)
                    personality_indirect = bool(encoding & DW_EH_PE_indirect)
                elif letter == "L":
                    if pos >= aug_end:
                        raise CFIError("truncated 'L' augmentation data", pos)
                    lsda_encoding = data[pos]
                    if lsda_encoding != DW_EH_PE_omit:
                        check_encoding(lsda_encoding, pos, "LSDA")
                    pos += 1
                elif letter == "S":
                    is_signal_frame = True
                else:
                    # Unknown letter (e.g. AArch64 'B', MTE 'G'): with a 'z'
                    # prefix the data length lets us skip the rest (libgcc
                    # extract_cie_info does the same).
                    break
            pos = aug_end
        elif augmentation:
            raise CFIError(f"unsupported augmentation {augmentation!r} without 'z'", id_pos + 5)

        cie = CIE(
            offset=offset,
            end_offset=end,
            version=version,
            augmentation=augmentation,
            code_alignment_factor=code_alignment_factor,
            data_alignment_factor=data_alignment_factor,
            return_address_register=return_address_register,
            fde_encoding=fde_encoding,
            lsda_encoding=lsda_encoding,
            personality=personality,
            personality_indirect=personality_indirect,
            is_signal_frame=is_signal_frame,
            initial_instructions=bytes(data[pos:end]),
            initial_instructions_offset=pos,
        )
        self._cies[offset] = cie
        return cie

    # -- FDE ----------------------------------------------------------------

    def _fde_at(self, offset, header):
        fde = self._fdes.get(offset)
        if fde is not None:
            return fde
        if header is None:
            raise CFIError("expected an FDE, found a zero terminator", offset)
        end, id_pos, cie_pointer = header
        if cie_pointer == 0:
            raise CFIError("expected an FDE, found a CIE", id_pos)
        # CIE_pointer is a reverse displacement from the CIE_pointer field
        # itself, not from the FDE's start (LSB §10.6.1.2).
        cie_offset = id_pos - cie_pointer
        if cie_offset < 0:
            raise CFIError(f"CIE_pointer {cie_pointer:#x} points before the section", id_pos)
        cie = self._cies.get(cie_offset)
        if cie is None:
            try:
                cie = self._cie_at(cie_offset, self._entry_header(cie_offset))
            except CFIError as exc:
                raise CFIError(f"FDE's CIE is invalid: {exc}", id_pos) from exc

        data = self.data
        pos = id_pos + 4
        encoding = cie.fde_encoding
        pc_begin_pos = pos
        if encoding & 0x70 == DW_EH_PE_funcrel:
            raise CFIError("DW_EH_PE_funcrel used for FDE pc_begin", pos)
        pc_begin, pos = read_encoded_pointer(
            data, pos, end, encoding, self.address, relocations=self.relocations,
            data_base=self.data_base, text_base=self.text_base)
        # address_range uses the format of the FDE encoding but no
        # application: it is a size in bytes, not an address.
        pc_range, pos = read_encoded_pointer(data, pos, end, encoding & 0x0F, 0)
        if encoding & 0x0F in (DW_EH_PE_signed, DW_EH_PE_sdata2, DW_EH_PE_sdata4,
                               DW_EH_PE_sdata8, DW_EH_PE_sleb128) and pc_range >> 63:
            raise CFIError("negative FDE address_range", pc_begin_pos)
        pc_end = pc_begin + pc_range
        if pc_end > _MASK64:
            raise CFIError("FDE address range wraps past 2**64", pc_begin_pos)

        lsda = None
        if cie.augmentation.startswith("z"):
            aug_len, pos = read_uleb128(data, pos, end)
            aug_end = pos + aug_len
            if aug_end > end:
                raise CFIError("FDE augmentation data runs past the entry", pos)
            if cie.lsda_encoding is not None and cie.lsda_encoding != DW_EH_PE_omit:
                lsda, _ = read_encoded_pointer(
                    data, pos, aug_end, cie.lsda_encoding, self.address,
                    relocations=self.relocations, data_base=self.data_base,
                    text_base=self.text_base, func_base=pc_begin, null_is_zero=True)
                if lsda == 0:
                    lsda = None
            pos = aug_end

        fde = FDE(
            offset=offset,
            end_offset=end,
            cie=cie,
            pc_begin=pc_begin,
            pc_end=pc_end,
            lsda=lsda,
            instructions=bytes(data[pos:end]),
            instructions_offset=pos,
            section=self,
        )
        self._fdes[offset] = fde
        return fde

    # -- lookup -------------------------------------------------------------

    def fdes(self):
        """All FDEs in section order (decodes the whole section)."""
        return [entry for entry in self.entries() if isinstance(entry, FDE)]

    def _build_index(self):
        fdes = sorted(self.fdes(), key=lambda f: (f.pc_begin, f.pc_end))
        self._index = ([f.pc_begin for f in fdes], fdes)
        return self._index

    def find_fde(self, pc):
        """The FDE covering absolute address ``pc``, or None.

        With an :class:`EhFrameHdr` that has a table, binary-searches it and
        decodes only the FDE found and its CIE. Otherwise builds (once) a
        sorted index of every FDE in the section.
        """
        hdr = self.hdr
        if hdr is not None and hdr.has_table:
            fde_address = hdr.lookup(pc)
            if fde_address is None:
                return None
            offset = fde_address - self.address
            if not 0 <= offset < len(self.data):
                raise CFIError(
                    f".eh_frame_hdr entry for {pc:#x} points outside .eh_frame "
                    f"({fde_address:#x})", None)
            fde = self.fde_at(offset)
        else:
            index = self._index or self._build_index()
            starts, fdes = index
            i = bisect.bisect_right(starts, pc)
            if i == 0:
                return None
            fde = fdes[i - 1]
        if fde.pc_begin <= pc < fde.pc_end:
            return fde
        return None
