"""Modules: where code lives and where its unwind information comes from.

A :class:`Module` covers one or more absolute address ranges of executable
code and answers two questions lazily: which FDE covers a pc, and which symbol
is nearest below a pc. Two kinds exist:

* :class:`ElfModule` — an ELF file mapped by the dynamic loader (or the vDSO,
  read from memory). Nothing is parsed until the first question; the FDE for a
  pc is found through the ``.eh_frame_hdr`` binary-search table, so a walk
  through libc decodes only the FDEs it visits.
* :class:`CodeObject` — a relocatable object emitted by LLVM whose sections
  were placed at known absolute addresses by a JIT. Its ``.eh_frame`` is small
  and indexed whole; FDE ``pc_begin`` fields are relocated through
  ``.rela.eh_frame`` to the given load addresses.

All addresses handed in and out are absolute (bias already applied) unless a
name says ``vaddr`` (link-time virtual address from the ELF file).
"""
import bisect
import io
import mmap
import os
import struct
import threading

from elftools.common.exceptions import ELFError

from .cfi import EhFrame, EhFrameHdr
from .elf import open_elf
from .elfobject import (R_X86_64_64, R_X86_64_PC32, R_X86_64_PC64, STT_FUNC, STT_GNU_IFUNC,
                        read_object)
from .errors import ModuleError, UnwindError

# ELF relocation types that can sit on an encoded pointer of .eh_frame. Each
# denotes the value S + A (PC-relative ones store S + A - P, and a pcrel
# decode adds P back).
_POINTER_RELOCS = {R_X86_64_64, R_X86_64_PC32, R_X86_64_PC64}
_PAGE = 4096
_ADDRESS_LIMIT = 1 << 64


class Module:
    """Base: a named piece of code with unwind info and symbols.

    ``ranges`` is a sorted tuple of half-open absolute ``(start, end)`` byte
    ranges of executable code.
    """

    name: str
    ranges: tuple

    def find_fde(self, pc):
        """The FDE covering absolute ``pc`` (its pc_begin/pc_end absolute), or None."""
        raise NotImplementedError

    def symbolize(self, pc):
        """``(name, start)`` of the function symbol containing absolute ``pc``, or None."""
        syms = self._symbol_table()
        i = bisect.bisect_right(syms[0], pc) - 1
        if i < 0:
            return None
        start, size, name = syms[0][i], syms[1][i], syms[2][i]
        if size and pc >= start + size:
            return None
        return name, start

    def _symbol_table(self):
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


_SYM = struct.Struct("<IBBHQQ")   # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size


def _symbols_from(elf, address_of):
    """Sorted function symbols of a pyelftools ``elf`` as parallel lists
    (starts, sizes, names) — see :func:`_sorted_functions`.

    ``address_of(st_shndx, st_value)`` maps a symbol to its absolute address
    or None. Symbol tables are decoded with :mod:`struct` straight from the
    section bytes (pyelftools' per-symbol objects cost ~50 µs each, and
    libpython has tens of thousands).
    """
    for secname in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(secname)
        if sec is None or sec["sh_entsize"] != _SYM.size:
            continue
        strtab = elf.get_section(sec["sh_link"]).data()
        data = sec.data()
        candidates = []
        for st_name, st_info, _other, shndx, value, size in _SYM.iter_unpack(data[:len(data) - len(data) % _SYM.size]):
            if (st_info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC) or not st_name or shndx == 0:
                continue
            addr = address_of(shndx, value)
            if addr is None:
                continue
            end = strtab.find(b"\0", st_name)
            candidates.append((addr, size,
                               strtab[st_name:end if end >= 0 else None].decode("utf-8", "replace")))
        if candidates:
            return _sorted_functions(candidates)  # .symtab is a superset of .dynsym when present
    return [], [], []


def _sorted_functions(candidates):
    """``(starts, sizes, names)``, parallel lists sorted by absolute start, from
    ``(address, size, name)`` candidates: one per address, the first with a
    non-zero size (aliases share an address)."""
    found = {}
    for addr, size, name in candidates:
        prev = found.get(addr)
        if prev is None or (not prev[0] and size):
            found[addr] = (size, name)
    starts = sorted(found)
    return starts, [found[a][0] for a in starts], [found[a][1] for a in starts]


class ElfModule(Module):
    """An ELF image mapped in this process at load ``bias`` (absolute = vaddr + bias).

    ``path`` is the file on disk; for the vDSO pass ``image`` (its bytes read
    from memory) instead. The file is mapped read-only on first use and kept
    mapped for the module's lifetime.
    """

    def __init__(self, path, bias, ranges, *, image=None, name=None):
        self.path = path
        self.name = name or path
        self.bias = bias
        self.ranges = tuple(sorted(ranges))
        self._image = image
        self._lock = threading.Lock()
        self._elf = None
        self._data = None
        self._eh_frame = None
        self._eh_loaded = False
        self._symbols = None

    def _open(self):
        if self._elf is None:
            try:
                if self._image is not None:
                    data = memoryview(self._image)
                    stream = io.BytesIO(self._image)
                else:
                    stream = open(self.path, "rb")
                    data = memoryview(mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ))
                self._elf = open_elf(stream)
                self._data = data
            except (OSError, ELFError, ValueError) as e:
                raise ModuleError(f"cannot read ELF module {self.name}: {e}") from e
        return self._elf

    def _section_bytes(self, sec):
        off, size = sec["sh_offset"], sec["sh_size"]
        if off + size > len(self._data):
            raise ModuleError(f"{self.name}: section {sec.name} lies past the end of the file")
        return self._data[off:off + size]

    def eh_frame(self):
        """The module's :class:`~unwinder.cfi.EhFrame` (absolute addresses), or None."""
        if self._eh_loaded:
            return self._eh_frame
        with self._lock:
            if not self._eh_loaded:
                elf = self._open()
                eh = elf.get_section_by_name(".eh_frame")
                hdr_sec = elf.get_section_by_name(".eh_frame_hdr")
                if eh is not None:
                    hdr = None
                    if hdr_sec is not None:
                        hdr = EhFrameHdr(self._section_bytes(hdr_sec), hdr_sec["sh_addr"] + self.bias)
                    self._eh_frame = EhFrame(self._section_bytes(eh), eh["sh_addr"] + self.bias, hdr=hdr)
                self._eh_loaded = True
        return self._eh_frame

    def find_fde(self, pc):
        eh = self.eh_frame()
        return None if eh is None else eh.find_fde(pc)

    def _symbol_table(self):
        if self._symbols is None:
            elf = self._open()
            bias = self.bias
            self._symbols = _symbols_from(elf, lambda shndx, value: value + bias)
        return self._symbols


class CodeObject(Module):
    """A relocatable ELF object (as LLVM's ``emit_object`` produces) loaded by a JIT.

    ``load_addresses`` maps a section name (``".text"``, ...) to the absolute
    address its first byte was placed at. Only sections named there count as
    loaded; executable ones (of non-zero size) form :attr:`ranges`. The
    object is read and checked once (:func:`~unwinder.elfobject.read_object`:
    :class:`~unwinder.errors.ObjectFormatError` for malformed bytes) and kept as
    :attr:`object`; the handle stays valid until
    :meth:`AddressSpace.remove_code_object`.
    """

    def __init__(self, elf_bytes, load_addresses, *, name=None):
        self.name = name or "jit-object"
        self.load_addresses = dict(load_addresses)
        #: The checked :class:`~unwinder.elfobject.RelocatableObject`.
        self.object = read_object(elf_bytes, name=self.name)
        sections = self.object.sections
        unknown = set(self.load_addresses) - {s.name for s in sections}
        if unknown:
            raise ModuleError(f"{self.name}: no section named {sorted(unknown)}")
        ranges = []
        for sec in sections:
            if sec.name in self.load_addresses and sec.executable and sec.size:
                start = self.load_addresses[sec.name]
                if not 0 <= start <= start + sec.size <= _ADDRESS_LIMIT:
                    raise ModuleError(f"{self.name}: section {sec.name} ({sec.size:#x} bytes) "
                                      f"placed at {start:#x} does not fit the address space")
                ranges.append((start, start + sec.size))
        self.ranges = tuple(sorted(ranges))
        self._eh_frame = self._load_eh_frame()
        self._symbols = None

    def _section_address(self, index):
        """Absolute address of section ``index`` if it was loaded, else None."""
        if index is None:
            return None
        return self.load_addresses.get(self.object.sections[index].name)

    def _load_eh_frame(self):
        eh = self.object.section(".eh_frame")
        if eh is None:
            return None
        relocations = {}
        for rel in self.object.relocations_for(eh.index):
            if rel.type not in _POINTER_RELOCS:
                raise ModuleError(f"{self.name}: unsupported .eh_frame relocation type "
                                  f"{rel.type} at offset {rel.offset:#x}")
            base = self._section_address(rel.symbol.section_index)
            if base is not None:
                relocations[rel.offset] = base + rel.symbol.value + rel.addend
        # An unloaded .eh_frame gets a nominal address: only relocated fields
        # (pc_begin, LSDA) depend on where it lives, and those are overridden.
        address = self.load_addresses.get(".eh_frame", 0)
        return EhFrame(eh.data, address, relocations=relocations)

    def eh_frame(self):
        """The object's :class:`~unwinder.cfi.EhFrame` (pc_begin fields relocated
        to absolute addresses), or None if it has no ``.eh_frame``."""
        return self._eh_frame

    def find_fde(self, pc):
        return None if self._eh_frame is None else self._eh_frame.find_fde(pc)

    def _symbol_table(self):
        if self._symbols is None:
            candidates = []
            for sym in self.object.symbols:
                if sym.type in (STT_FUNC, STT_GNU_IFUNC) and sym.name:
                    base = self._section_address(sym.section_index)
                    if base is not None:
                        candidates.append((base + sym.value, sym.size, sym.name))
            self._symbols = _sorted_functions(candidates)
        return self._symbols


def read_proc_maps(pid="self"):
    """Parse ``/proc/<pid>/maps`` into ``(start, end, perms, offset, path)`` tuples."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            lo, hi = parts[0].split("-")
            path = parts[5].strip() if len(parts) == 6 else ""
            out.append((int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), path))
    return out


_EHDR = struct.Struct("<4s12xHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1


def _load_segments(image):
    """``(p_offset, p_vaddr, p_filesz)`` of each PT_LOAD in an ELF64 image prefix.

    Reads only the ELF and program headers (with :mod:`struct`), so module
    discovery costs a few hundred bytes per file.
    """
    if len(image) < _EHDR.size:
        return []
    magic, _type, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = \
        _EHDR.unpack_from(image, 0)
    if magic != b"\x7fELF" or image[4] != 2 or phentsize < _PHDR.size:
        return []
    segs = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + _PHDR.size > len(image):
            return []
        p_type, _fl, p_offset, p_vaddr, _pa, p_filesz, _memsz, _align = _PHDR.unpack_from(image, off)
        if p_type == _PT_LOAD:
            segs.append((p_offset, p_vaddr, p_filesz))
    return segs


def modules_from_maps(maps, read_memory=None):
    """Build :class:`ElfModule` objects from parsed maps lines.

    Only files (and ``[vdso]``) with executable mappings become modules. The
    bias comes from the mapping of the first ``PT_LOAD`` segment; an
    executable mapping whose placement disagrees with that bias (for example
    libffi's trampoline pages, which map the same file again elsewhere) is not
    attributed to the module. ``read_memory(address, size)`` reads the vDSO
    image; without it the vDSO is skipped. Nothing but the ELF and program
    headers is read here.
    """
    by_path = {}
    for start, end, perms, offset, path in maps:
        if not path or (not path.startswith("/") and path != "[vdso]"):
            continue
        by_path.setdefault(path, []).append((start, end, perms, offset))
    modules = []
    for path, maps_of in by_path.items():
        if not any("x" in perms for _, _, perms, _ in maps_of):
            continue
        image = None
        try:
            if path == "[vdso]":
                if read_memory is None:
                    continue
                start, end = maps_of[0][0], maps_of[-1][1]
                image = bytes(read_memory(start, end - start))
                head = image
            else:
                with open(path, "rb") as f:
                    head = f.read(8192)
        except (OSError, UnwindError):
            continue  # a file that vanished or cannot be read is not a module
        segs = _load_segments(head)
        if not segs:
            continue
        first_off, first_vaddr, _ = min(segs, key=lambda s: s[1])
        first_off &= ~(_PAGE - 1)
        first_vaddr &= ~(_PAGE - 1)
        if path == "[vdso]":
            bias = maps_of[0][0] - first_vaddr
        else:
            base = [m[0] for m in maps_of if m[3] == first_off]
            if not base:
                continue
            bias = min(base) - first_vaddr
        ranges = []
        for start, end, perms, offset in maps_of:
            if "x" not in perms:
                continue
            # The loader maps file offset ``offset`` of a PT_LOAD at vaddr
            # p_vaddr - p_offset + offset (page-aligned); anything else is an
            # alias mapping of the same file.
            consistent = any(
                (p_off & ~(_PAGE - 1)) <= offset < p_off + max(p_filesz, 1)
                and start - bias == (p_vaddr & ~(_PAGE - 1)) + offset - (p_off & ~(_PAGE - 1))
                for p_off, p_vaddr, p_filesz in segs)
            if consistent or path == "[vdso]":
                ranges.append((start, end))
        if ranges:
            modules.append(ElfModule(None if image is not None else path, bias, ranges,
                                     image=image, name=path))
    return modules


def module_basename(module):
    """A short display name for ``module`` (file name of a path)."""
    if module is None:
        return "?"
    return os.path.basename(module.name) if module.name.startswith("/") else module.name


__all__ = ["Module", "ElfModule", "CodeObject", "modules_from_maps", "read_proc_maps",
           "module_basename"]
