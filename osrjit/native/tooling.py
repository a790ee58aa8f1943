"""perf and gdb see JIT code: perf maps, jitdump files and the GDB JIT interface.

Three outlets, each process-wide (several runtimes share them) and each fed
by the :class:`~.linker.Linker` as it links and releases a JIT library:

* :class:`PerfMap` appends ``START SIZE name`` lines (hex start and size,
  absolute addresses) to ``/tmp/perf-<pid>.map``, the file ``perf report``
  reads for ``[JIT]`` samples. A line is never withdrawn: when freed code's
  addresses are reused, perf sees both names there.
* :class:`JitDump` writes ``jit-<pid>.dump`` (the format of the Linux
  tree's ``tools/perf/Documentation/jitdump-specification.txt``): a header and
  one ``JIT_CODE_LOAD`` record per function, with a copy of its code and a
  ``CLOCK_MONOTONIC`` timestamp, so ``perf inject --jit`` tells apart the
  versions that occupied the same addresses at different times. The file is
  mapped ``PROT_EXEC`` once, which is how ``perf record`` notices it.
* :class:`GdbJitInterface` puts, per library, an in-memory ELF object into the
  list gdb reads (``__jit_debug_descriptor``; gdb stops on
  ``__jit_debug_register_code``). The object is the emitted relocatable
  object with each loaded section's ``sh_addr`` set to its load address and
  its symbols renamed (``osrjit.fn.fib`` -> ``fib@v2``); gdb relocates the
  ``.debug_*`` sections of such an object itself, so DWARF line tables of the
  code (``!dbg``) give ``file:line``.

Which descriptor: gdb reads the descriptor of each loaded file that defines
``__jit_debug_register_code``; here that is only llvmlite's
``libllvmlite.so`` (LLVM's definition, a local symbol found through its
``.symtab``; the Python binary and libpython define none), and LLJIT's own
listener already registers every object there under its original names. Rather than add a second entry for the same
code (gdb would then find two ``osrjit.fn.fib`` objects at one address), the
entry LLVM made for a library is *adopted*: under :data:`JIT_DEBUG_LOCK` it
is withdrawn from gdb, pointed at our object and announced again. LLVM still
owns the entry and withdraws it when the library's tracker is disposed; our
object lives until then. LLVM guards the list with a mutex of its own that
we cannot take, so every list change by an osrjit linker — LLVM's inside
``link`` and ``dispose``, ours — happens under :data:`JIT_DEBUG_LOCK`
(other LLJIT users in the same process are not covered). If LLVM made no
entry, we insert and remove our own.
"""
from __future__ import annotations

import ctypes
import io
import mmap
import os
import struct
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unwinder.elf import open_elf
from unwinder.elfobject import read_object

__all__ = ["PERF_MODES", "JIT_DEBUG_LOCK", "Tools", "PerfMap", "JitDump", "GdbJitInterface",
           "debug_object", "code_symbols", "CodeSymbol", "line_rows", "LineRow"]

#: ``Runtime(perf=...)`` / ``OSRJIT_PERF`` choices (None: off).
PERF_MODES = ("map", "jitdump")

#: Held around every change of the GDB JIT list by an osrjit linker (LLVM's
#: registration in ``link``, its withdrawal in ``dispose``, our adoptions).
JIT_DEBUG_LOCK = threading.RLock()

_STT_FUNC, _STT_SECTION = 2, 3
_SHDR_ADDR, _SHDR_OFFSET, _SHDR_SIZE = 16, 24, 32      # within Elf64_Shdr
_SYM_NAME = 0                                          # within Elf64_Sym
_RELA_ADDEND = 16                                      # within Elf64_Rela


# -- what a library contains ---------------------------------------------------------


@dataclass(frozen=True)
class CodeSymbol:
    """One function of a loaded object: ``start`` absolute address, ``size``
    bytes (``st_size``, or up to the next function / the section end when the
    symbol has none), ``name`` as tools show it."""
    start: int
    size: int
    name: str


def code_symbols(obj: bytes, load_addresses: Mapping[str, int],
                 labels: Mapping[str, str]) -> tuple[CodeSymbol, ...]:
    """The function symbols of ``obj`` in its loaded sections (``load_addresses``:
    section name -> absolute address), named by ``labels`` (symbol -> name;
    others keep theirs), in address order."""
    image = read_object(obj)
    out = []
    for section in image.sections:
        if not section.executable or section.name not in load_addresses:
            continue
        base = load_addresses[section.name]
        funcs = sorted((s for s in image.symbols
                        if s.type == _STT_FUNC and s.section_index == section.index and s.name),
                       key=lambda s: s.value)
        for i, sym in enumerate(funcs):
            size = sym.size
            if not size:
                end = funcs[i + 1].value if i + 1 < len(funcs) else section.size
                size = max(end - sym.value, 0)
            out.append(CodeSymbol(base + sym.value, size, labels.get(sym.name, sym.name)))
    return tuple(sorted(out, key=lambda c: c.start))


@dataclass(frozen=True)
class LineRow:
    """One row of a DWARF line table: from absolute ``address`` on, the code
    is source ``filename`` line ``line``."""
    address: int
    line: int
    filename: str


def line_rows(obj: bytes, load_addresses: Mapping[str, int]) -> tuple[LineRow, ...]:
    """The line table of ``obj`` (its ``.debug_line``, relocated) at the load
    address of its ``.text``; () if it has none."""
    text = load_addresses.get(".text")
    if text is None:
        return ()
    elf = open_elf(io.BytesIO(obj))
    if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_line") is None:
        return ()
    dwarf = elf.get_dwarf_info()
    rows = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is None:
            continue
        files, dirs = program["file_entry"], program["include_directory"]
        for entry in program.get_entries():
            state = entry.state
            if state is None or state.end_sequence or not 0 < state.file <= len(files):
                continue
            file = files[state.file - 1]
            name = file.name.decode(errors="replace")
            if file.dir_index:
                name = os.path.join(dirs[file.dir_index - 1].decode(errors="replace"), name)
            rows.append(LineRow(text + state.address, state.line, name))
    return tuple(rows)


def debug_object(obj: bytes, load_addresses: Mapping[str, int],
                 labels: Mapping[str, str], *,
                 section_addresses: Sequence[tuple[str, int]] = ()) -> bytes:
    """``obj`` (a relocatable ELF object) as gdb should see it once loaded.

    Each section named in ``load_addresses`` gets ``sh_addr`` = its absolute
    load address (gdb places an ``ET_REL`` object's sections there and
    applies the ``.debug_*`` and ``.eh_frame`` relocations itself);
    ``section_addresses`` (``(name, sh_addr)`` by section index, read from
    the object LLVM registered, which knows where every section went; used
    only if the section names agree with ``obj``'s) supplies the others. Each symbol named in
    ``labels`` (symbol -> new name) is renamed: the names go into a copy of
    ``.strtab`` appended to the object. DWARF strings equal to a renamed
    symbol get the new name too (a copy of ``.debug_str`` is appended and the
    relocations that point at the old string point at the new one), so the
    subprogram gdb names in ``bt`` carries the version.
    """
    image = read_object(obj)
    out = bytearray(obj)
    if [name for name, _ in section_addresses] != [s.name for s in image.sections]:
        section_addresses = ()
    for section in image.sections:
        address = load_addresses.get(section.name)
        if address is None and section_addresses:
            address = section_addresses[section.index][1] or None
        if address is not None:
            struct.pack_into("<Q", out, section.header_offset + _SHDR_ADDR, address)
    if not labels:
        return bytes(out)

    def append_section(section, data: bytes):
        struct.pack_into("<QQ", out, section.header_offset + _SHDR_OFFSET, len(out), len(data))
        out.extend(data)

    strtab = image.sections[_symtab_link(image)]
    names = bytearray(strtab.data)
    for sym in image.symbols:
        if sym.name in labels:
            struct.pack_into("<I", out, sym.offset + _SYM_NAME, len(names))
            names += labels[sym.name].encode() + b"\0"
    append_section(strtab, bytes(names))

    debug_str = image.section(".debug_str")
    if debug_str is not None:
        strings = bytearray(debug_str.data)
        moved = {}
        for old, new in labels.items():
            at = _string_offset(debug_str.data, old)
            if at is not None:
                moved[at] = len(strings)
                strings += new.encode() + b"\0"
        if moved:
            for relocations in image.relocations.values():
                for rel in relocations:
                    if (rel.symbol.type == _STT_SECTION and rel.symbol.shndx == debug_str.index
                            and rel.addend in moved):
                        struct.pack_into("<q", out, rel.entry_offset + _RELA_ADDEND,
                                         moved[rel.addend])
            append_section(debug_str, bytes(strings))
    return bytes(out)


def _section_table(data: bytes) -> list[tuple[str, int]]:
    """``(name, sh_addr)`` of every section of the ELF64 file ``data``, by index
    (headers only: much cheaper than :func:`read_object`)."""
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    _, _, _, _, names_offset, names_size = headers[shstrndx]
    names = data[names_offset:names_offset + names_size]
    return [(names[h[0]:names.index(b"\0", h[0])].decode(errors="replace"), h[3])
            for h in headers]


def _symtab_link(image) -> int:
    for section in image.sections:
        if section.name == ".symtab":
            return section.link
    raise ValueError("the object has no symbol table")


def _string_offset(table: bytes, string: str) -> int | None:
    """Offset of ``string`` as a whole NUL-terminated entry of ``table``, or None."""
    needle = string.encode() + b"\0"
    start = 0
    while True:
        at = table.find(needle, start)
        if at < 0:
            return None
        if at == 0 or table[at - 1] == 0:
            return at
        start = at + 1


# -- perf ----------------------------------------------------------------------------


class _PerPid:
    """A process-wide writer that starts afresh in a forked child (new pid)."""

    _instances: dict = {}
    _lock = threading.Lock()

    @classmethod
    def current(cls):
        with cls._lock:
            pid = os.getpid()
            writer = cls._instances.get(cls)
            if writer is None or writer.pid != pid:
                writer = cls._instances[cls] = cls(pid)
            return writer


class PerfMap(_PerPid):
    """``/tmp/perf-<pid>.map`` (appended to; one line per function, written
    and flushed at load). Lifetime: the file stays after the process — perf
    reads it at report time."""

    def __init__(self, pid: int):
        self.pid = pid
        self.path = f"/tmp/perf-{pid}.map"
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, symbols) -> None:
        lines = "".join(f"{s.start:x} {s.size:x} {s.name}\n" for s in symbols if s.size)
        with self._lock:
            self._file.write(lines)
            self._file.flush()


# jitdump: tools/perf/Documentation/jitdump-specification.txt
_JITDUMP_MAGIC = 0x4A695444            # "JiTD" as a host-endian u32
_JITDUMP_VERSION = 1
_EM_X86_64 = 62
_JIT_CODE_LOAD = 0
_JIT_CODE_DEBUG_INFO = 2
_JITDUMP_HEADER = struct.Struct("<IIIIIIQQ")   # magic, version, total_size, elf_mach,
#                                                pad1, pid, timestamp, flags
_RECORD_HEADER = struct.Struct("<IIQ")         # id, total_size, timestamp
_CODE_LOAD = struct.Struct("<IIQQQQ")          # pid, tid, vma, code_addr, code_size, code_index
_DEBUG_INFO = struct.Struct("<QQ")             # code_addr, nr_entry
_DEBUG_ENTRY = struct.Struct("<QII")           # code_addr, line, discrim; then the file name


def _monotonic_ns() -> int:
    # perf record -k mono: the jitdump timestamps must be CLOCK_MONOTONIC.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class JitDump(_PerPid):
    """``jit-<pid>.dump`` in ``$OSRJIT_JITDUMP_DIR`` (default: the current
    directory), for ``perf record -k mono`` + ``perf inject --jit``.

    Each function loaded gets a ``JIT_CODE_LOAD`` record (name, absolute
    address, a copy of its code bytes, a code index unique in the file),
    preceded by a ``JIT_CODE_DEBUG_INFO`` record of its line table rows if
    it has any (``perf inject`` turns them into ``.debug_line``). The
    header is mapped ``PROT_READ|PROT_EXEC`` for the life of the process:
    that ``mmap`` is the marker ``perf inject`` looks for.
    """

    def __init__(self, pid: int):
        self.pid = pid
        directory = os.environ.get("OSRJIT_JITDUMP_DIR", os.getcwd())
        self.path = os.path.join(directory, f"jit-{pid}.dump")
        fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self._index = 0
        self._file.write(_JITDUMP_HEADER.pack(_JITDUMP_MAGIC, _JITDUMP_VERSION,
                                              _JITDUMP_HEADER.size, _EM_X86_64, 0, pid,
                                              _monotonic_ns(), 0))
        self._marker = mmap.mmap(fd, _JITDUMP_HEADER.size, mmap.MAP_PRIVATE,
                                 mmap.PROT_READ | mmap.PROT_EXEC)

    def write(self, symbols, rows=()) -> None:
        tid = threading.get_native_id()
        with self._lock:
            for s in symbols:
                if not s.size:
                    continue
                mine = [r for r in rows if s.start <= r.address < s.start + s.size]
                if mine:
                    entries = b"".join(_DEBUG_ENTRY.pack(r.address, r.line, 0)
                                       + r.filename.encode() + b"\0" for r in mine)
                    size = _RECORD_HEADER.size + _DEBUG_INFO.size + len(entries)
                    self._file.write(_RECORD_HEADER.pack(_JIT_CODE_DEBUG_INFO, size,
                                                         _monotonic_ns())
                                     + _DEBUG_INFO.pack(s.start, len(mine)) + entries)
                name = s.name.encode() + b"\0"
                code = ctypes.string_at(s.start, s.size)
                size = _RECORD_HEADER.size + _CODE_LOAD.size + len(name) + len(code)
                self._file.write(_RECORD_HEADER.pack(_JIT_CODE_LOAD, size, _monotonic_ns())
                                 + _CODE_LOAD.pack(self.pid, tid, s.start, s.start, s.size,
                                                   self._index)
                                 + name + code)
                self._index += 1


# -- gdb -----------------------------------------------------------------------------

_JIT_NOACTION, _JIT_REGISTER, _JIT_UNREGISTER = 0, 1, 2


class _JitCodeEntry(ctypes.Structure):
    pass


_JitCodeEntry._fields_ = [("next_entry", ctypes.POINTER(_JitCodeEntry)),
                          ("prev_entry", ctypes.POINTER(_JitCodeEntry)),
                          ("symfile_addr", ctypes.c_void_p),
                          ("symfile_size", ctypes.c_uint64)]


class _JitDescriptor(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32),
                ("action_flag", ctypes.c_uint32),
                ("relevant_entry", ctypes.POINTER(_JitCodeEntry)),
                ("first_entry", ctypes.POINTER(_JitCodeEntry))]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _local_symbols(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """``st_value`` of the ``.symtab`` symbols ``names`` of the ELF file ``path``."""
    with open(path, "rb") as f:
        data = f.read()
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
               for i in range(shnum)]
    symtab = next((h for h in headers if h[1] == 2), None)       # SHT_SYMTAB
    if symtab is None:
        return {}
    strtab = headers[symtab[6]]
    strings = data[strtab[4]:strtab[4] + strtab[5]]
    wanted = {}
    for name in names:
        at = _string_offset(strings, name)
        if at is not None:
            wanted[at] = name
    found = {}
    for st_name, _info, _other, shndx, value, _size in struct.iter_unpack(
            "<IBBHQQ", data[symtab[4]:symtab[4] + symtab[5]]):
        if st_name in wanted and shndx != 0:
            found[wanted[st_name]] = value
    return found


class GdbJitInterface:
    """The process's GDB JIT descriptor (see the module docstring), or
    :attr:`available` False if it cannot be found (then nothing is registered).

    Lifetime of what it registers: a :class:`GdbRegistration` holds its ELF
    object (and its own entry, if LLVM made none) until it is withdrawn.
    """

    _instance = None
    _lock = threading.Lock()

    @classmethod
    def current(cls) -> "GdbJitInterface":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self.descriptor = None
        self._notify = None
        self.reason = None
        import llvmlite.binding.ffi as ffi
        info = _DlInfo()
        libc = ctypes.CDLL(None)
        ffi.lib.LLVMPY_CreateLLJITCompiler       # loads the library if not yet loaded
        anchor = ctypes.cast(ffi.lib._lib_handle.LLVMPY_CreateLLJITCompiler, ctypes.c_void_p)
        if not libc.dladdr(anchor, ctypes.byref(info)) or not info.dli_fname:
            self.reason = "dladdr found no file for llvmlite's library"
            return
        path = os.fsdecode(info.dli_fname)
        symbols = _local_symbols(path, ("__jit_debug_descriptor", "__jit_debug_register_code"))
        if len(symbols) != 2:
            self.reason = f"{path} has no __jit_debug_descriptor in its symbol table"
            return
        base = info.dli_fbase
        self.descriptor = _JitDescriptor.from_address(base + symbols["__jit_debug_descriptor"])
        if self.descriptor.version != 1:
            self.reason = f"__jit_debug_descriptor has version {self.descriptor.version}"
            self.descriptor = None
            return
        self._notify = ctypes.CFUNCTYPE(None)(base + symbols["__jit_debug_register_code"])
        self.path = path

    @property
    def available(self) -> bool:
        return self.descriptor is not None

    def head(self) -> int:
        """Address of the first entry (0 if none). Call under :data:`JIT_DEBUG_LOCK`."""
        return ctypes.cast(self.descriptor.first_entry, ctypes.c_void_p).value or 0

    def entries_since(self, head: int) -> list[int]:
        """Entries inserted before ``head`` (an earlier :meth:`head`), newest first."""
        out = []
        entry = self.descriptor.first_entry
        while entry and ctypes.cast(entry, ctypes.c_void_p).value != head:
            out.append(ctypes.cast(entry, ctypes.c_void_p).value)
            entry = entry.contents.next_entry
        return out

    def registered_objects(self) -> list[bytes]:
        """Copies of every object in the list gdb reads, newest first."""
        out = []
        with JIT_DEBUG_LOCK:
            entry = self.descriptor.first_entry
            while entry:
                e = entry.contents
                out.append(ctypes.string_at(e.symfile_addr, e.symfile_size))
                entry = e.next_entry
        return out

    @staticmethod
    def section_addresses(entry: int) -> list[tuple[str, int]]:
        """``(name, sh_addr)`` of every section of the object registered at
        ``entry`` (LLVM's copy of an object, with its load addresses); [] if it
        is not an ELF object we can read."""
        e = _JitCodeEntry.from_address(entry)
        try:
            return _section_table(ctypes.string_at(e.symfile_addr, e.symfile_size))
        except (struct.error, ValueError):
            return []

    def _announce(self, action: int, entry) -> None:
        self.descriptor.action_flag = action
        self.descriptor.relevant_entry = entry
        self._notify()
        self.descriptor.action_flag = _JIT_NOACTION

    def register(self, symfile: bytes, llvm_entry: int | None) -> "GdbRegistration":
        """Show gdb ``symfile`` (an ELF object) through LLVM's entry at
        ``llvm_entry`` (adopted, see the module docstring) or a new entry."""
        buffer = ctypes.create_string_buffer(symfile, len(symfile))
        with JIT_DEBUG_LOCK:
            if llvm_entry:
                entry = ctypes.pointer(_JitCodeEntry.from_address(llvm_entry))
                self._announce(_JIT_UNREGISTER, entry)
                own = None
            else:
                own = _JitCodeEntry()
                entry = ctypes.pointer(own)
                first = self.descriptor.first_entry
                own.next_entry = first
                if first:
                    first.contents.prev_entry = entry
                self.descriptor.first_entry = entry
            entry.contents.symfile_addr = ctypes.addressof(buffer)
            entry.contents.symfile_size = len(symfile)
            self._announce(_JIT_REGISTER, entry)
        return GdbRegistration(self, buffer, entry, own)

    def unregister_own(self, entry) -> None:
        with JIT_DEBUG_LOCK:
            e = entry.contents
            if e.next_entry:
                e.next_entry.contents.prev_entry = e.prev_entry
            if e.prev_entry:
                e.prev_entry.contents.next_entry = e.next_entry
            else:
                self.descriptor.first_entry = e.next_entry
            self._announce(_JIT_UNREGISTER, entry)


class GdbRegistration:
    """One library's object as gdb sees it. :meth:`withdraw` before the code is
    unmapped removes an entry of our own; an adopted entry is removed by
    LLVM when the tracker is disposed, and :meth:`release` (after that) lets
    go of the object's bytes."""

    def __init__(self, interface, buffer, entry, own):
        self._interface = interface
        self._buffer = buffer
        self._entry = entry
        self._own = own

    def withdraw(self) -> None:
        if self._own is not None:
            self._interface.unregister_own(self._entry)
            self._own = None

    def release(self) -> None:
        self.withdraw()
        self._buffer = self._entry = None


# -- per runtime ---------------------------------------------------------------------


class Tools:
    """A runtime's choice of outlets: ``perf`` (None, ``"map"`` or
    ``"jitdump"``) and ``gdb`` (bool). Defaults come from ``OSRJIT_PERF`` and
    ``OSRJIT_GDB`` (``0`` turns gdb registration off)."""

    def __init__(self, perf: str | None = None, gdb: bool | None = None):
        if perf is None:
            perf = os.environ.get("OSRJIT_PERF") or None
        if perf is not None and perf not in PERF_MODES:
            raise ValueError(f"perf must be None or one of {PERF_MODES}, got {perf!r}")
        if gdb is None:
            gdb = os.environ.get("OSRJIT_GDB", "1") not in ("0", "")
        self.perf = perf
        self.gdb = GdbJitInterface.current() if gdb else None
        if self.gdb is not None and not self.gdb.available:
            self.gdb = None

    @property
    def active(self) -> bool:
        return self.perf is not None or self.gdb is not None

    def loaded(self, obj: bytes, load_addresses: Mapping[str, int],
               labels: Mapping[str, str], llvm_entries: list[int]) -> GdbRegistration | None:
        """A library was linked: write its perf lines, register it with gdb.

        Tools only watch: if writing or registering fails (a full disk, an
        object gdb could not be shown), the runtime goes on and a
        :class:`RuntimeWarning` says what was not recorded."""
        try:
            if self.perf is not None:
                symbols = code_symbols(obj, load_addresses, labels)
                if self.perf == "map":
                    PerfMap.current().write(symbols)
                else:
                    JitDump.current().write(symbols, line_rows(obj, load_addresses))
        except Exception as e:  # noqa: BLE001 - see the docstring
            warnings.warn(f"osrjit: perf={self.perf!r}: {e}", RuntimeWarning, stacklevel=2)
        if self.gdb is None:
            return None
        try:
            llvm_entry = llvm_entries[0] if len(llvm_entries) == 1 else None
            addresses = self.gdb.section_addresses(llvm_entry) if llvm_entry else ()
            symfile = debug_object(obj, load_addresses, labels, section_addresses=addresses)
        except Exception as e:  # noqa: BLE001 - see the docstring
            warnings.warn(f"osrjit: not registered with gdb: {e}", RuntimeWarning, stacklevel=2)
            return None
        return self.gdb.register(symfile, llvm_entry)
