"""Hand-written ``.eh_frame`` / ``.eh_frame_hdr`` bytes shared by the CFI tests.

Each input is spelled out one field per line, in the style of pyelftools'
``test/test_callframe.py``. Every image starts with :data:`CIE_ZR` at section
offset 0 and is placed at :data:`ADDRESS`; its FDEs come from
:func:`fde_bytes`, the table of an ``.eh_frame_hdr`` at :data:`HDR_ADDRESS`
from :func:`hdr_bytes`:

====== ================================================================
0x00   CIE  (24 bytes, "zR", pcrel|sdata4 pointers, CFA=rsp+8, ra=c-8)
0x18   FDE  length
0x1c        CIE_pointer (0x1c: back to offset 0)
0x20        pc_begin (pcrel sdata4)
0x24        pc_range (sdata4)
0x28        augmentation data length (0)
0x29        instructions ...
====== ================================================================
"""
import struct

__all__ = ["ADDRESS", "PC", "CIE_ZR", "FIRST_FDE_INSTRUCTIONS", "TERMINATOR", "fde_bytes",
           "HDR_ADDRESS", "hdr_bytes"]

#: Absolute address of the first byte of every hand-written .eh_frame.
ADDRESS = 0x1000
#: Where the first FDE's code starts (absolute).
PC = 0x2000

CIE_ZR = (
    b"\x14\x00\x00\x00"  # 0x00 length: 20 bytes follow
    b"\x00\x00\x00\x00"  # 0x04 CIE_id: 0 marks a CIE in .eh_frame
    b"\x01"              # 0x08 version: 1
    b"zR\x00"            # 0x09 augmentation: "zR"
    b"\x01"              # 0x0c code_alignment_factor: 1 (ULEB128)
    b"\x78"              # 0x0d data_alignment_factor: -8 (SLEB128)
    b"\x10"              # 0x0e return_address_register: 16 (ubyte in version 1)
    b"\x01"              # 0x0f augmentation data length: 1
    b"\x1b"              # 0x10 'R': FDE pointers are DW_EH_PE_pcrel|DW_EH_PE_sdata4
    b"\x0c\x07\x08"      # 0x11 DW_CFA_def_cfa: r7 (rsp) ofs 8
    b"\x90\x01"          # 0x14 DW_CFA_offset: r16 (ra) at cfa-8
    b"\x00\x00"          # 0x16 DW_CFA_nop padding
)
assert len(CIE_ZR) == 0x18

FIRST_FDE_INSTRUCTIONS = 0x29  # section offset of the first FDE's instructions
TERMINATOR = b"\x00\x00\x00\x00"  # zero length ends .eh_frame


def fde_bytes(offset, instructions, *, pc_begin=PC, pc_range=0x100, cie_offset=0,
              augmentation_data=b""):
    """An FDE for the "zR" pcrel|sdata4 CIE at ``cie_offset``, placed at section ``offset``."""
    body = (
        struct.pack("<I", offset + 4 - cie_offset)          # CIE_pointer: back from this field
        + struct.pack("<i", pc_begin - (ADDRESS + offset + 8))  # pc_begin: pcrel to its field
        + struct.pack("<i", pc_range)                        # pc_range: bytes
        + bytes([len(augmentation_data)]) + augmentation_data  # augmentation data
        + instructions
    )
    return struct.pack("<I", len(body)) + body              # length


HDR_ADDRESS = 0x800  # .eh_frame_hdr sits below .eh_frame (at ADDRESS)


def hdr_bytes(entries, count=None):
    """An ``.eh_frame_hdr`` at :data:`HDR_ADDRESS` for the ``.eh_frame`` at
    :data:`ADDRESS`; its search table lists ``entries``, ``(initial_location,
    FDE section offset)`` pairs in the given order; ``count`` overrides fde_count."""
    table = b"".join(struct.pack("<ii", loc - HDR_ADDRESS, ADDRESS + off - HDR_ADDRESS)
                     for loc, off in entries)
    return (
        b"\x01"                                          # version 1
        b"\x1b"                                          # eh_frame_ptr_enc: pcrel|sdata4
        b"\x03"                                          # fde_count_enc: udata4
        b"\x3b"                                          # table_enc: datarel|sdata4
        + struct.pack("<i", ADDRESS - (HDR_ADDRESS + 4))  # eh_frame_ptr (pcrel to field)
        + struct.pack("<I", len(entries) if count is None else count)  # fde_count
        + table                                          # (initial_location, fde) pairs
    )
