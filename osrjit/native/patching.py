"""Direct calls between versions, retargeted in place: no trampoline in front of calls.

In ``calls="direct"`` mode (see :mod:`osrjit.abi`) a call from a version of
``f`` to function ``g`` is ``E8 rel32`` with an ``R_X86_64_PLT32`` relocation
against ``osrjit.fn.g``; a self-call is the same against ``f``'s own symbol.
When ``g`` gets a new version, every such call in every loaded version must
reach it. This module finds those calls in a loaded object, reads how the JIT
linker resolved each one, and rewrites them under W^X discipline.

Pipeline (each stage a function of the previous one's output)::

    object bytes + section load addresses --call_sites--> CallSite per E8/E9 rel32
    CallSite + live memory               --resolve-->     Resolution (direct | JIT stub)
    Resolution + new target              --plan-->        Patch (rel32 | GOT pointer)
    Patches                              --apply_patches--> memory written, protections restored

:class:`CallSiteIndex` keeps the sites of every loaded version by callee and
plans/applies a retarget for one callee across all of them.

What JITLink does with these relocations
    Measured with llvmlite 0.50 (LLVM 22.1, LLJIT's JITLink linker), x86-64
    ELF objects emitted with ``reloc="pic"``, ``codemodel="small"`` and linked
    one per JIT library (``JITLibraryBuilder``), as :mod:`osrjit.runtime` does:

    * ``PLT32`` against a symbol **defined in the object** (a self-call: the
      function's symbol has default visibility, so the PIC object still
      carries a relocation for it) is resolved **directly**: the rel32 holds
      ``f - return address``. No stub.
    * ``PLT32`` against a symbol **imported** with ``import_symbol(name,
      absolute address)`` always goes **through a stub**, whether the address
      is 12 MiB or 16 TiB away: JITLink appends ``FF 25 disp32`` (``jmp
      [rip + disp32]``) after the object's code, in the same r-x mapping,
      and the rel32 targets that stub; the 8-byte GOT entry it jumps through
      holds the imported address and sits in a separate, writable ``rw-p``
      mapping (seen both as the page just below the code and megabytes
      away). JITLink did not bypass the stub for an in-range absolute
      target. Several sites calling one symbol share one stub and GOT entry.

    So a freshly linked direct-mode caller pays a call plus an indirect jump.
    Retargeting the call site's rel32 at the callee's entry right after
    linking (:meth:`CallSiteIndex.retarget` with the current entry) makes it a
    true direct call; the stub and its GOT entry stay valid (we keep the GOT
    pointing at the current target too), and remain the way to reach a target
    more than ±2 GiB away: then the GOT entry is rewritten and the rel32 is
    pointed back at the stub. A site with no stub (a self-call) and an
    out-of-range target raises :class:`~osrjit.errors.CallTargetOutOfRange`
    before anything is written.

W^X and atomicity
    Code pages are never writable and executable at once: :func:`apply_patches`
    reads each page's protection from ``/proc/self/maps``, ``mprotect``\\ s the
    pages that are not writable to ``PROT_READ | PROT_WRITE``, writes, and
    restores each page's original protection (``r-x`` for code) before
    returning, even if a write fails; pages already writable (the GOT) are left
    alone. While a code page is ``rw-``, a thread executing in it faults
    (SIGSEGV): **patch only while every other thread that may run the patched
    code is stopped** (at a safepoint). The thread doing the patching may have
    frames of the patched code on its own stack (e.g. patch from inside a
    hook): protections are back before it returns into them.

    Each rel32 is one 4-byte store (``ctypes.c_int32.from_address``: CPython
    copies the 4 bytes with a ``memcpy`` of constant size, compiled to one
    32-bit ``mov``); each pointer one 8-byte store. x86-64 makes an unaligned
    store atomic only if it does not cross a cache line
    (:attr:`CallSite.straddles_cache_line`), and a thread that is *executing*
    modified code additionally needs a serializing event before it runs the
    new bytes (Intel SDM vol. 3, 8.1.3 "cross-modifying code"). With the world
    stopped neither matters: the ``mprotect`` calls shoot down the TLBs of
    every CPU running this process (an interrupt, whose ``iret`` serializes),
    and stopped threads resume through the kernel. Every write is read back
    and compared.

Lifetimes
    Everything here reads and writes *live* memory by absolute address: a
    :class:`CallSite` is valid while the code it was found in stays mapped.
    Remove a version from the :class:`CallSiteIndex` *before* its code is
    unmapped, or a later retarget writes into whatever reuses the memory.
    Mappings are checked against ``/proc/self/maps`` before any read or write,
    so an unmapped address is a :class:`~osrjit.errors.PatchError`, not a
    crash.
"""
from __future__ import annotations

import bisect
import ctypes
import enum
import mmap
import os
import threading
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from unwinder.elfobject import R_X86_64_PC32, R_X86_64_PLT32, STT_FUNC, STT_GNU_IFUNC, read_object
from unwinder.errors import ObjectFormatError

from ..abi import FunctionIR, direct_call_symbol
from ..errors import (CallTargetOutOfRange, NotACallSite, PatchError, UnpatchableReference)

__all__ = [
    "CALL_OPCODE", "JMP_OPCODE", "STUB_OPCODE", "PAGE_SIZE",
    "CallSite", "call_sites", "direct_call_sites", "callee_symbols",
    "Region", "MemoryMap",
    "LinkKind", "Resolution", "resolve",
    "Patch", "rel32_patch", "pointer_patch", "apply_patches", "patch_rel32", "patch_pointer",
    "IndexedSite", "CallSiteIndex", "placeholder_address", "fits_rel32",
]

#: ``call rel32`` (5 bytes: E8 + rel32, rel32 relative to the next instruction).
CALL_OPCODE = 0xE8
#: ``jmp rel32`` (a tail call; same encoding, same patching).
JMP_OPCODE = 0xE9
#: ``jmp [rip + disp32]`` — ``FF 25 disp32``, JITLink's x86-64 pointer-jump stub.
STUB_OPCODE = b"\xff\x25"
_STUB_LENGTH = 6
_REL32_OPCODES = (CALL_OPCODE, JMP_OPCODE)
PAGE_SIZE = mmap.PAGESIZE
_CACHE_LINE = 64

_REL32_RELOCS = frozenset({R_X86_64_PC32, R_X86_64_PLT32})
#: A call's rel32 is relative to the end of the 4-byte field: S + A - P with A = -4.
_CALL_ADDEND = -4
_FUNC_TYPES = (STT_FUNC, STT_GNU_IFUNC)

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def fits_rel32(displacement: int) -> bool:
    """Whether ``displacement`` (bytes) fits a signed 32-bit rel32 field."""
    return _INT32_MIN <= displacement <= _INT32_MAX


# --------------------------------------------------------------------------
# Finding call sites in an object
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CallSite:
    """One ``E8 rel32`` call (or ``E9 rel32`` tail jump) to ``symbol`` as loaded.

    ``instruction_address``: absolute address of the opcode byte;
    ``rel32_address``: absolute address of the 4-byte displacement (=
    ``instruction_address + 1``, where the relocation applies);
    ``return_address``: the end of the instruction, which the rel32 is
    relative to. ``section`` / ``section_offset``: where the opcode byte is in
    the object. ``function``: the function symbol containing the call
    (``osrjit.fn.f`` or ``osrjit.fn.f__resume``), None if none covers it.
    ``relocation_type``: ``R_X86_64_PLT32`` (4) or ``R_X86_64_PC32`` (2).
    """
    symbol: str
    instruction_address: int
    rel32_address: int
    opcode: int = CALL_OPCODE
    section: str = ".text"
    section_offset: int = 0
    function: str | None = None
    relocation_type: int = R_X86_64_PLT32

    @property
    def return_address(self) -> int:
        return self.rel32_address + 4

    @property
    def is_tail_jump(self) -> bool:
        return self.opcode == JMP_OPCODE

    @property
    def straddles_cache_line(self) -> bool:
        """Whether the rel32's 4 bytes cross a 64-byte cache line (then a store
        to it is not single-copy atomic for a concurrently executing thread)."""
        return self.rel32_address // _CACHE_LINE != (self.rel32_address + 3) // _CACHE_LINE

    def displacement_to(self, target: int) -> int:
        """The rel32 that makes this instruction reach absolute ``target``."""
        return target - self.return_address

    def __repr__(self):
        where = f"{self.function}+{self.section_offset:#x}" if self.function else \
            f"{self.section}+{self.section_offset:#x}"
        kind = "jmp" if self.is_tail_jump else "call"
        return f"CallSite({kind} {self.symbol} at {self.instruction_address:#x} [{where}])"


def call_sites(obj: bytes, load_addresses: Mapping[str, int],
               symbols: Iterable[str] | None = None, *,
               strict: bool = True) -> dict[str, list[CallSite]]:
    """Every ``E8``/``E9 rel32`` in the object's loaded executable sections whose
    ``PC32``/``PLT32`` relocation targets one of ``symbols`` (all symbols if
    None), by symbol, in address order.

    ``obj``: the relocatable ELF object as emitted; ``load_addresses``: section
    name -> absolute address of its first byte (sections not named were not
    loaded and are skipped). With ``strict``, any other reference to one of
    ``symbols`` from executable code (a rel32 relocation not on an E8/E9, an
    addend other than -4, another relocation type such as ``GOTPCRELX``)
    raises :class:`~osrjit.errors.UnpatchableReference`: retargeting the calls
    would leave that reference stale. References from data sections (the
    ``.llvm_stackmaps`` function-address fields, a function-pointer table) are
    not calls and are not reported.
    """
    wanted = None if symbols is None else set(symbols)
    try:
        elf = read_object(obj)
    except ObjectFormatError as e:
        raise PatchError(f"cannot read object: {e}") from e
    out: dict[str, list[CallSite]] = {s: [] for s in (wanted or ())}
    for target in elf.sections:
        relocations = elf.relocations_for(target.index)
        if not relocations or not target.executable or target.name not in load_addresses:
            continue
        base = load_addresses[target.name]
        data = target.data
        functions = sorted((s.value, s.value + s.size, s.name) for s in elf.symbols
                           if s.type in _FUNC_TYPES and s.section_index == target.index)
        for rel in relocations:
            sym = rel.symbol
            if not sym.name or (wanted is not None and sym.name not in wanted):
                continue
            rtype, offset, addend = rel.type, rel.offset, rel.addend
            # The opcode before the field, if the whole 4-byte field is in the section.
            opcode = data[offset - 1] if 0 < offset <= len(data) - 4 else None
            if rtype in _REL32_RELOCS and addend == _CALL_ADDEND and opcode in _REL32_OPCODES:
                start = offset - 1
                function = next((name for lo, hi, name in functions if lo <= start < hi), None)
                out.setdefault(sym.name, []).append(CallSite(
                    symbol=sym.name, instruction_address=base + start,
                    rel32_address=base + offset, opcode=opcode, section=target.name,
                    section_offset=start, function=function, relocation_type=rtype))
            elif strict:
                what = (f"byte {opcode:#04x} before it" if opcode is not None
                        else "its 4 bytes are not all inside the section, or nothing is before them")
                raise UnpatchableReference(
                    f"{target.name}+{offset:#x}: relocation type {rtype} (addend {addend}) "
                    f"against {sym.name!r} is not the rel32 of an E8/E9 call ({what}); "
                    f"its reference could not be retargeted",
                    address=base + offset, relocation_type=rtype)
    for sites in out.values():
        sites.sort(key=lambda s: s.instruction_address)
    return out


def direct_call_sites(obj: bytes, load_addresses: Mapping[str, int], symbol: str, *,
                      strict: bool = True) -> list[CallSite]:
    """Every ``E8 rel32`` call (and ``E9`` tail jump) to ``symbol`` in the loaded
    object, self-calls included (see :func:`call_sites`)."""
    return call_sites(obj, load_addresses, [symbol], strict=strict)[symbol]


def callee_symbols(function_ir: FunctionIR) -> dict[str, str]:
    """Function name -> referenced symbol of every *direct* call a version makes:
    ``osrjit.fn.<g>`` for each of :attr:`FunctionIR.direct_callees` and the
    version's own symbol for its self-calls (which are direct in both modes)."""
    out = {name: direct_call_symbol(name) for name in function_ir.direct_callees}
    out[function_ir.name] = function_ir.symbol
    return out


# --------------------------------------------------------------------------
# The process's mappings
# --------------------------------------------------------------------------

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4


@dataclass(frozen=True)
class Region:
    """One line of ``/proc/self/maps``: ``[start, end)`` absolute, ``perms`` as
    printed (``"r-xp"``), ``path`` (may be empty or ``[heap]`` etc.)."""
    start: int
    end: int
    perms: str
    path: str = ""

    @property
    def protection(self) -> int:
        """The ``PROT_*`` flags of ``perms``."""
        return ((PROT_READ if self.perms[0] == "r" else 0)
                | (PROT_WRITE if self.perms[1] == "w" else 0)
                | (PROT_EXEC if self.perms[2] == "x" else 0))

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"


class MemoryMap:
    """A snapshot of ``/proc/self/maps`` (sorted regions), for lookups by address."""

    def __init__(self, regions: Iterable[Region]):
        self.regions = tuple(sorted(regions, key=lambda r: r.start))
        self._starts = [r.start for r in self.regions]

    @classmethod
    def current(cls) -> "MemoryMap":
        regions = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = parts[0].split("-")
                path = parts[5].strip() if len(parts) > 5 else ""
                regions.append(Region(int(lo, 16), int(hi, 16), parts[1], path))
        return cls(regions)

    def region(self, address: int) -> Region | None:
        """The region containing absolute ``address``, or None if unmapped."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self.regions[i].start <= address < self.regions[i].end:
            return self.regions[i]
        return None

    def regions_covering(self, address: int, size: int) -> list[Region] | None:
        """The regions covering ``[address, address + size)``, None if any byte is unmapped."""
        out, at, end = [], address, address + size
        while at < end:
            r = self.region(at)
            if r is None:
                return None
            out.append(r)
            at = r.end
        return out

    def is_readable(self, address: int, size: int) -> bool:
        regions = self.regions_covering(address, size)
        return regions is not None and all(r.readable for r in regions)

    def require_readable(self, address: int, size: int, what: str) -> None:
        if not self.is_readable(address, size):
            raise PatchError(f"{what}: {size} bytes at {address:#x} are not mapped readable",
                             address)

    def writable_executable(self) -> list[Region]:
        """Regions mapped both writable and executable (W^X violations)."""
        return [r for r in self.regions if r.writable and r.executable]


# --------------------------------------------------------------------------
# How a site resolves now
# --------------------------------------------------------------------------

class LinkKind(enum.Enum):
    """How a call site reaches its target."""
    DIRECT = "direct"  #: the rel32 points at the target itself
    STUB = "stub"      #: the rel32 points at a ``jmp [rip + disp32]`` stub through a GOT entry


@dataclass(frozen=True)
class Resolution:
    """Where a call site goes, read from live memory.

    ``target``: the absolute address the rel32 reaches now. ``kind``: whether
    that is the callee (:attr:`LinkKind.DIRECT`) or a JIT stub
    (:attr:`LinkKind.STUB`; then ``stub`` = ``target``, ``got`` = absolute
    address of the 8-byte entry the stub jumps through). ``final_target``: the
    address execution arrives at (the GOT entry's value for a stub).
    """
    site: CallSite
    kind: LinkKind
    target: int
    final_target: int
    stub: int | None = None
    got: int | None = None


def _read(address: int, size: int) -> bytes:
    return ctypes.string_at(address, size)


def _check_opcode(site: CallSite, memory: MemoryMap) -> None:
    memory.require_readable(site.instruction_address, 5, repr(site))
    found = _read(site.instruction_address, 5)
    if found[0] != site.opcode or found[0] not in _REL32_OPCODES:
        raise NotACallSite(
            f"{site!r}: expected {site.opcode:#04x} rel32 at {site.instruction_address:#x}, "
            f"found bytes [{found.hex(' ')}]", address=site.instruction_address, found=found)


def resolve(site: CallSite, memory: MemoryMap | None = None, *,
            expect: int | None = None) -> Resolution:
    """Read the live rel32 of ``site`` and follow a JIT stub if it points at one.

    ``expect``: the callee's known address; a rel32 that reaches it is
    :attr:`LinkKind.DIRECT` even if the callee happened to begin with the stub's
    bytes. Raises :class:`NotACallSite` if the opcode byte changed and
    :class:`PatchError` if the memory is not mapped.
    """
    memory = memory or MemoryMap.current()
    _check_opcode(site, memory)
    rel32 = int.from_bytes(_read(site.rel32_address, 4), "little", signed=True)
    target = site.return_address + rel32
    if target != expect and memory.is_readable(target, _STUB_LENGTH):
        head = _read(target, _STUB_LENGTH)
        if head[:2] == STUB_OPCODE:
            got = target + _STUB_LENGTH + int.from_bytes(head[2:6], "little", signed=True)
            memory.require_readable(got, 8, f"GOT entry of the stub at {target:#x}")
            final = int.from_bytes(_read(got, 8), "little")
            return Resolution(site, LinkKind.STUB, target, final, stub=target, got=got)
    return Resolution(site, LinkKind.DIRECT, target, target)


# --------------------------------------------------------------------------
# Patches and how they are written
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Patch:
    """One store to live memory: ``size`` (4: a rel32, 8: a pointer) bytes at
    absolute ``address``, from ``old`` to ``new`` (both as the stored integer:
    the signed displacement for a rel32, the address for a pointer). ``site``:
    the call site of a rel32 patch (its opcode is re-checked before writing).
    ``target``: the absolute address the patched instruction / pointer leads to.
    """
    address: int
    size: int
    old: int
    new: int
    target: int
    site: CallSite | None = None

    @property
    def kind(self) -> str:
        return "rel32" if self.size == 4 else "pointer"

    def undo(self) -> "Patch":
        """The patch that writes ``old`` back."""
        old_target = self.old if self.site is None else self.site.return_address + self.old
        return Patch(self.address, self.size, self.new, self.old, old_target, self.site)


def rel32_patch(site: CallSite, new_target: int, memory: MemoryMap | None = None) -> Patch:
    """The patch making ``site`` reach ``new_target`` directly (checked now:
    opcode, range; nothing is written)."""
    memory = memory or MemoryMap.current()
    _check_opcode(site, memory)
    displacement = site.displacement_to(new_target)
    if not fits_rel32(displacement):
        raise CallTargetOutOfRange(
            f"{site!r}: target {new_target:#x} is {displacement:+#x} bytes from the return "
            f"address {site.return_address:#x}, beyond the ±2 GiB of a rel32",
            address=site.instruction_address, target=new_target, displacement=displacement)
    old = int.from_bytes(_read(site.rel32_address, 4), "little", signed=True)
    return Patch(site.rel32_address, 4, old, displacement, new_target, site)


def pointer_patch(address: int, new_value: int, memory: MemoryMap | None = None) -> Patch:
    """The patch storing the 8-byte ``new_value`` at ``address`` (nothing is written)."""
    memory = memory or MemoryMap.current()
    if not 0 <= new_value < 1 << 64:
        raise PatchError(f"pointer value {new_value:#x} does not fit in 8 bytes", address)
    memory.require_readable(address, 8, "pointer")
    old = int.from_bytes(_read(address, 8), "little")
    return Patch(address, 8, old, new_value, new_value)


# PyDLL: the GIL stays held across mprotect (it never blocks), so a patch made
# while the world is stopped never waits for another Python thread.
_libc = ctypes.PyDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int
#: Serializes patchers: two threads must not flip the same page's protection.
_PATCH_LOCK = threading.Lock()


def _set_protection(page: int, size: int, prot: int) -> None:
    if _mprotect(page, size, prot) != 0:
        errno = ctypes.get_errno()
        raise PatchError(f"mprotect({page:#x}, {size:#x}, {prot}) failed: "
                         f"{os.strerror(errno)} (errno {errno})", page)


def _store(address: int, size: int, value: int) -> None:
    """One ``size``-byte store (see the module docstring on atomicity)."""
    if size == 4:
        ctypes.c_int32.from_address(address).value = value
    else:
        ctypes.c_uint64.from_address(address).value = value


def _stored(address: int, size: int) -> int:
    return int.from_bytes(_read(address, size), "little", signed=size == 4)


def _pages(address: int, size: int) -> range:
    first = address - address % PAGE_SIZE
    return range(first, address + size, PAGE_SIZE)


def apply_patches(patches: Iterable[Patch], memory: "MemoryMap | None" = None) -> list[Patch]:
    """Write ``patches`` in order, under W^X; returns them.

    Before anything is written, every patch is checked against live memory:
    mapped, still holding ``old`` (else someone else patched it since it was
    planned: :class:`PatchError`), and for a rel32 still behind its opcode
    (:class:`NotACallSite`). Then the pages that are not writable are made
    ``rw-`` (never ``rwx``), the stores are done, and every page gets its
    original protection back (also when a store or an ``mprotect`` fails).
    Finally each store is read back. Only one thread patches at a time.
    ``memory``: a :class:`MemoryMap` read since the patches were planned (no
    mapping may have changed in between), else read here.
    """
    patches = list(patches)
    if not patches:
        return patches
    with _PATCH_LOCK:
        memory = memory or MemoryMap.current()
        original: dict[int, Region] = {}
        for p in patches:
            if p.site is not None:
                _check_opcode(p.site, memory)
            memory.require_readable(p.address, p.size, f"{p.kind} patch")
            current = _stored(p.address, p.size)
            if current != p.old:
                raise PatchError(f"{p.kind} at {p.address:#x} holds {current:#x}, not the "
                                 f"{p.old:#x} the patch was planned from", p.address)
            for page in _pages(p.address, p.size):
                original[page] = memory.region(page)
        flipped: list[tuple[int, int]] = []   # (page, original protection)
        error = None
        try:
            for page, region in sorted(original.items()):
                if not region.writable:
                    _set_protection(page, PAGE_SIZE, PROT_READ | PROT_WRITE)
                    flipped.append((page, region.protection))
            for p in patches:
                _store(p.address, p.size, p.new)
        finally:
            for page, prot in flipped:
                try:
                    _set_protection(page, PAGE_SIZE, prot)
                except PatchError as e:  # keep restoring the others; report the first
                    error = error or e
        if error is not None:
            raise error
        for p in patches:
            back = _stored(p.address, p.size)
            if back != p.new:
                raise PatchError(f"{p.kind} at {p.address:#x} reads back {back:#x} after "
                                 f"writing {p.new:#x}", p.address)
    return patches


def patch_rel32(site: CallSite, new_target: int) -> int:
    """Make ``site`` call ``new_target`` directly; returns the target it reached before.

    Raises :class:`NotACallSite` if the live opcode byte is not the site's
    ``E8``/``E9``, :class:`CallTargetOutOfRange` if ``new_target`` is beyond
    ±2 GiB of the return address (nothing is written in either case).
    """
    p = apply_patches([rel32_patch(site, new_target)])[0]
    return site.return_address + p.old


def patch_pointer(address: int, new_value: int) -> int:
    """Store the 8-byte ``new_value`` at ``address`` (e.g. a JIT stub's GOT
    entry), W^X as :func:`apply_patches`; returns the old value."""
    return apply_patches([pointer_patch(address, new_value)])[0].old


def placeholder_address() -> int:
    """An address to import for a callee that is not linked yet (libc's
    ``abort``: a call that was never retargeted kills the process loudly
    instead of running garbage). Imported symbols always get a JIT stub, so
    the placeholder needs no particular distance from the code."""
    return ctypes.cast(_libc.abort, ctypes.c_void_p).value


# --------------------------------------------------------------------------
# Every direct call site of every loaded version
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexedSite:
    """A call site in the index: ``owner`` is the key of the version holding
    the call, ``callee`` the function it calls (name). ``stub`` / ``got``: the
    JIT stub the linker routed this site through and its GOT entry (absolute;
    None if the site was linked directly), recorded when the version was added
    so the stub stays usable after the rel32 was pointed elsewhere."""
    owner: Hashable
    callee: str
    site: CallSite
    stub: int | None = None
    got: int | None = None


@dataclass
class _Entry:
    sites: dict[str, tuple[IndexedSite, ...]] = field(default_factory=dict)


class CallSiteIndex:
    """Callee name -> every direct call site reaching it, across loaded versions.

    A *version* is added with a hashable ``key`` (e.g. the runtime's version
    id), its object bytes and section load addresses, and its callees (name ->
    referenced symbol, see :func:`callee_symbols`; self-calls included). The
    index reads how the linker resolved each site at once, so add a version
    right after linking it, before anything was patched.

    Lifetime: the index holds absolute addresses into live code. Call
    :meth:`remove` before a version's code is unmapped. It owns no native
    resource. Not thread-safe by itself: the runtime serializes add / remove /
    retarget (patching itself is serialized by :func:`apply_patches`).
    """

    def __init__(self):
        self._entries: dict[Hashable, _Entry] = {}

    # -- versions --

    def add(self, key: Hashable, obj: bytes, load_addresses: Mapping[str, int],
            callees: Mapping[str, str] | Iterable[str], *,
            strict: bool = True) -> tuple[IndexedSite, ...]:
        """Index the direct call sites of one loaded version; returns them.

        ``callees``: function name -> symbol its calls reference, or names
        (each then references ``osrjit.fn.<name>``). Raises ``KeyError`` if
        ``key`` is already indexed, :class:`UnpatchableReference` (with
        ``strict``) for a non-call reference to one of the symbols.
        """
        if key in self._entries:
            raise KeyError(f"version {key!r} is already in the call-site index")
        if not isinstance(callees, Mapping):
            callees = {name: direct_call_symbol(name) for name in callees}
        by_symbol = call_sites(obj, load_addresses, set(callees.values()), strict=strict)
        memory = MemoryMap.current()
        entry = _Entry()
        for name, symbol in callees.items():
            indexed = []
            for site in by_symbol.get(symbol, ()):
                r = resolve(site, memory)
                indexed.append(IndexedSite(key, name, site, r.stub, r.got))
            entry.sites[name] = tuple(indexed)
        self._entries[key] = entry
        return tuple(s for sites in entry.sites.values() for s in sites)

    def remove(self, key: Hashable) -> None:
        """Forget a version (before its code is unmapped). ``KeyError`` if unknown."""
        del self._entries[key]

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self) -> list:
        return list(self._entries)

    # -- queries --

    def sites(self, callee: str) -> tuple[IndexedSite, ...]:
        """Every indexed site calling ``callee``, in version-add then address order."""
        return tuple(s for e in self._entries.values() for s in e.sites.get(callee, ()))

    def sites_of(self, key: Hashable) -> tuple[IndexedSite, ...]:
        """Every indexed site in version ``key``."""
        return tuple(s for sites in self._entries[key].sites.values() for s in sites)

    def callees(self) -> set[str]:
        return {name for e in self._entries.values() for name, s in e.sites.items() if s}

    def resolutions(self, callee: str) -> list[tuple[IndexedSite, Resolution]]:
        """Where each site calling ``callee`` goes now (live memory)."""
        memory = MemoryMap.current()
        return [(s, resolve(s.site, memory)) for s in self.sites(callee)]

    def sites_reaching(self, start: int, end: int) -> list[tuple[IndexedSite, Resolution]]:
        """Indexed sites whose call arrives in ``[start, end)`` (e.g. the code of a
        version about to be unloaded: it must be empty first)."""
        memory = MemoryMap.current()
        out = []
        for e in self._entries.values():
            for sites in e.sites.values():
                for s in sites:
                    r = resolve(s.site, memory)
                    if start <= r.final_target < end:
                        out.append((s, r))
        return out

    # -- retargeting --

    def plan_retarget(self, callee: str, new_target: int,
                      memory: "MemoryMap | None" = None) -> list[Patch]:
        """The patches that make every site calling ``callee`` reach ``new_target``.

        Per site: if ``new_target`` is within ±2 GiB of the call, its rel32 is
        pointed at it; the site's GOT entry (if the linker made a stub) is set
        to ``new_target`` as well, so the stub leads to the same place. If not
        in range and the site has a stub, the GOT entry is set and the rel32
        pointed back at the stub. Otherwise :class:`CallTargetOutOfRange`. A
        GOT entry shared by several sites is patched once; stores that would
        not change anything are left out. Raises before anything is written.
        """
        memory = memory or MemoryMap.current()
        patches: list[Patch] = []
        gots: set[int] = set()

        def set_got(s: IndexedSite):
            if s.got is not None and s.got not in gots:
                gots.add(s.got)
                p = pointer_patch(s.got, new_target, memory)
                if p.old != p.new:
                    patches.append(p)

        for s in self.sites(callee):
            current = resolve(s.site, memory)
            if fits_rel32(s.site.displacement_to(new_target)):
                set_got(s)
                if current.target != new_target:
                    patches.append(rel32_patch(s.site, new_target, memory))
            elif s.stub is not None:
                set_got(s)
                if current.target != s.stub:
                    patches.append(rel32_patch(s.site, s.stub, memory))
            else:
                displacement = s.site.displacement_to(new_target)
                raise CallTargetOutOfRange(
                    f"{s.site!r} in version {s.owner!r}: {callee} target {new_target:#x} is "
                    f"{displacement:+#x} bytes away, beyond ±2 GiB, and the linker made no "
                    f"stub for this site to jump through",
                    address=s.site.instruction_address, target=new_target,
                    displacement=displacement)
        return patches

    def retarget(self, callee: str, new_target: int) -> list[Patch]:
        """Plan and apply (see :meth:`plan_retarget`); returns the patches written.

        Call with the current entry right after adding a version to bypass the
        linker's stubs. Only while no other thread can run the patched code.
        """
        return apply_patches(self.plan_retarget(callee, new_target))
