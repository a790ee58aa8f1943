"""Per-site return stubs: what a hijacked slot holds, with the old frame's CFI.

A hijacked slot cannot hold the common deopt stub (:mod:`deopt.stub`) and
still be walkable by libgcc, gdb or perf: a walker looks the stub up at
``stub − 1`` and would need the *old frame's* rules there, which differ from
site to site. So every return address ``R`` of an old version's site gets a
stub of its own, ``S``, and hijacking writes ``S`` (not the common stub)::

    S − 1:  nop                       ; the symbol; walkers look up S − 1
    S:      movabsq $<common stub>, %r11
            jmpq   *%r11

Its FDE covers the ``nop`` and the code, and holds exactly the row in force
at ``R − 1`` in the old version (the one a walker uses for the old frame):
the CFA rule and every register rule, the return address included, copied.
A walker that reads ``S`` from the slot therefore steps from the stub's
frame to the old frame's caller exactly as it would from the old frame:
same registers, same CFA, same frame count; the hijacked frame shows as the
stub's symbol, ``osrjit.site.<function>@v<version>.<site id>`` (plus
``.<k>`` for the k-th further copy of a site, e.g. in the resume entry). The
symbol starts at the ``nop`` (``S`` is the symbol + :data:`ENTRY_OFFSET`), so
a symbolizer that looks at ``S − 1``, as gdb does, names it too.

The rows hold while the stub runs: ``ret`` entered it with RSP = ``E`` (the
old frame's RSP after its call) and the old frame's callee-saved registers,
which is the state the row describes, and the stub changes only R11 (free at
a return) before it jumps to the common stub. The common stub then describes
itself as a callee whose return address is in the slot — ``S`` until the
transfer restores ``R`` — so a walk from inside the transfer also goes on.

:func:`site_stubs_asm` renders the stubs of one version (AT&T syntax) from
the rows; :func:`site_stubs_module_ir` wraps them as an LLVM module (emit,
link into the runtime's LLJIT, register with the unwinder, look each
:class:`SiteStub` symbol up). The stubs live as long as the version: a slot
that holds one keeps the version loaded.
"""
from dataclasses import dataclass

from unwinder import nativesrc
from unwinder.rules import RuleKind
from unwinder.x86_64 import RA

from .errors import HijackError

__all__ = ["SiteStub", "SiteStubIndex", "ENTRY_OFFSET", "site_stub_symbol", "site_stubs_for",
           "site_stubs_asm", "site_stubs_module_ir", "SITE_STUB_PREFIX"]

#: Prefix of every per-site stub's symbol.
SITE_STUB_PREFIX = "osrjit.site."
#: Bytes from a stub's symbol to its entry (the address written into slots).
ENTRY_OFFSET = 1

# DWARF call frame instructions emitted with .cfi_escape (DWARF 5 §6.4.2).
_DW_CFA_def_cfa_expression = 0x0F
_DW_CFA_expression = 0x10
_DW_CFA_val_offset_sf = 0x15
_DW_CFA_val_expression = 0x16
#: The data alignment factor of the CIE LLVM emits for x86-64.
_DATA_ALIGNMENT = -8


@dataclass(frozen=True)
class SiteStub:
    """The stub of one return address.

    ``return_address``: absolute address ``R`` in the old version the stub
    stands for. ``symbol``: its ELF symbol. ``row``: the
    :class:`unwinder.rules.UnwindRow` in force at ``R − 1`` (its rules are
    copied into the stub's FDE).
    """
    return_address: int
    symbol: str
    row: object


def site_stub_symbol(function, version, site_id, copy=0):
    """``osrjit.site.<function>@v<version>.<site_id>`` (``.<copy>`` appended
    for the further copies of a site)."""
    tail = f".{copy}" if copy else ""
    return f"{SITE_STUB_PREFIX}{function}@v{version}.site{site_id}{tail}"


def site_stubs_for(frame_maps, space):
    """The :class:`SiteStub` of every frame map of ``frame_maps`` (one
    version's) whose return address has a row in ``space`` (anything with
    ``unwind_entry(pc)``, e.g. an :class:`unwinder.AddressSpace` its code is
    registered with); a return address without one gets no stub (its slots
    get the deopt stub)."""
    stubs, copies = [], {}
    for fm in frame_maps:
        entry = space.unwind_entry(fm.return_address - 1)
        if entry is None:
            continue
        copy = copies[fm.site_id] = copies.get(fm.site_id, -1) + 1
        stubs.append(SiteStub(fm.return_address,
                              site_stub_symbol(fm.function, fm.version, fm.site_id, copy),
                              entry[0].row))
    return stubs


def _uleb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sleb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def _escape(data):
    return ".cfi_escape " + ", ".join(f"0x{b:02x}" for b in data)


def _row_directives(row, where):
    """``.cfi_*`` lines that make the FDE's first row equal ``row`` (LLVM's
    x86-64 CIE starts at CFA = RSP + 8, return address at CFA − 8)."""
    out = []
    cfa = row.cfa
    if cfa.expression is not None:
        out.append(_escape(bytes([_DW_CFA_def_cfa_expression]) + _uleb(len(cfa.expression))
                           + cfa.expression))
    else:
        out.append(f".cfi_def_cfa {cfa.register}, {cfa.offset}")
    rules = dict(row.regs)
    if RA not in rules:
        rules[RA] = row.rule(RA)     # the CIE's RA rule must not leak into the copy
    for reg, rule in sorted(rules.items()):
        kind = rule.kind
        if kind is RuleKind.OFFSET:
            out.append(f".cfi_offset {reg}, {rule.offset}")
        elif kind is RuleKind.SAME_VALUE:
            out.append(f".cfi_same_value {reg}")
        elif kind is RuleKind.UNDEFINED:
            out.append(f".cfi_undefined {reg}")
        elif kind is RuleKind.REGISTER:
            out.append(f".cfi_register {reg}, {rule.register}")
        elif kind is RuleKind.VAL_OFFSET:
            if rule.offset % _DATA_ALIGNMENT:
                raise HijackError(f"{where}: val_offset {rule.offset} of register {reg} is "
                                  "not a multiple of 8")
            out.append(_escape(bytes([_DW_CFA_val_offset_sf]) + _uleb(reg)
                               + _sleb(rule.offset // _DATA_ALIGNMENT)))
        else:
            op = _DW_CFA_expression if kind is RuleKind.EXPRESSION else _DW_CFA_val_expression
            out.append(_escape(bytes([op]) + _uleb(reg) + _uleb(len(rule.expression))
                               + rule.expression))
    return out


def site_stubs_asm(stubs, common_stub):
    """AT&T assembly of the stubs ``stubs`` (:class:`SiteStub`), each jumping
    to ``common_stub`` (absolute address of :data:`deopt.stub.STUB_SYMBOL`).
    Raises :class:`~deopt.errors.HijackError` for a row it cannot copy."""
    lines = [".text"]
    for stub in stubs:
        name = f'"{stub.symbol}"'
        lines += [".p2align 4", f".globl {name}", f".type {name},@function", f"{name}:",
                  ".cfi_startproc"]
        lines += _row_directives(stub.row, stub.symbol)
        # One nop (ENTRY_OFFSET bytes), then the entry.
        lines += ["nop", f"movabsq ${common_stub:#x}, %r11", "jmpq *%r11",
                  ".cfi_endproc", f".size {name}, .-{name}"]
    return "\n".join(lines) + "\n"


def site_stubs_module_ir(triple, stubs, common_stub):
    """Textual LLVM IR of a module holding only the stubs (``module asm``)."""
    return f'target triple = "{triple}"\n' + nativesrc.module_asm(
        site_stubs_asm(stubs, common_stub))


class SiteStubIndex:
    """The per-site stubs of every loaded version, for whoever writes or
    reads hijacked slots: ``return address → stub`` and back (absolute
    addresses). :meth:`add` when a version's stubs are linked,
    :meth:`remove` before they are unmapped. Reads take no lock (dict
    lookups); writes replace whole entries."""

    def __init__(self):
        self._stub_of = {}
        self._return_of = {}

    def add(self, pairs):
        """Record ``(return address, stub address)`` pairs."""
        for ra, stub in pairs:
            self._stub_of[ra] = stub
            self._return_of[stub] = ra

    def remove(self, pairs):
        """Forget pairs given to :meth:`add`."""
        for ra, stub in pairs:
            if self._stub_of.get(ra) == stub:
                del self._stub_of[ra]
            if self._return_of.get(stub) == ra:
                del self._return_of[stub]

    def stub_of(self, return_address):
        """The stub standing for ``return_address``, or None."""
        return self._stub_of.get(return_address)

    def return_of(self, stub):
        """The return address ``stub`` stands for, or None (not a site stub)."""
        return self._return_of.get(stub)

    def __len__(self):
        return len(self._stub_of)
