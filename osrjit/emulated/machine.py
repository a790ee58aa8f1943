"""One emulated x86-64 address space (unicorn) with threads, hypercalls and a
deterministic scheduler.

Memory layout (absolute emulated addresses; every mapping 4 KiB aligned and
followed by an unmapped 4 KiB guard page, so an overrun faults)::

    arena      [arena_base, arena_base + arena_size)   code, rodata, data, GOTs,
               default 0x10000000 .. 0x80000000         cells, the hypercall page
                                                        (below 2 GiB: R_X86_64_32S fits)
    stacks     from stack_base (0x600000000000) up      one mapping per thread

Hypercalls
    :meth:`Machine.hypercall` gives a Python function an address in the
    *hypercall page*. Each hypercall owns a 16-byte slot ``[int3 x 8, ret,
    int3 x 7]``; its address is the ``ret`` (slot + 8), so both the address
    and address − 1 (where an unwinder looks up a return address) lie inside
    the slot's own FDE. The page is an object assembled by LLVM and
    registered with the unwinder like JIT code: a frame stopped in a
    hypercall has CFA = rsp + 8 and is named ``hypercall.<name>``. A
    ``UC_HOOK_CODE`` covers the page only; when the ``ret`` is fetched the
    hook calls ``fn(machine, thread)``, which may read and write registers and
    memory; an int it returns goes to RAX, then the ``ret`` executes (pops
    RIP). If ``fn`` changed RIP, execution continues there instead.

Threads and the scheduler
    :meth:`Machine.spawn` makes an :class:`EmuThread` with its own stack and
    register file (a unicorn context: every GPR, RIP, RFLAGS, XMM0-15, FS/GS
    base, ...), whose first return address is the ``exit`` hypercall: when
    the entry function returns the thread finishes with RAX as its result.
    :meth:`Machine.run` / :class:`Scheduler` run runnable threads one at a
    time for quanta of k instructions (``emu_start(count=k)``), k and the
    next thread drawn from ``random.Random(seed)``: the same seed gives the
    same interleaving and the same instruction trace.

Exact instruction counts
    A quantum normally executes exactly k instructions. When a thread stops
    inside a quantum (it exits, parks, faults in a hypercall, or a hypercall
    asks the world to stop), the hook saves the thread's state as of the end
    of the hypercall (as if its ``ret`` had executed) and sends the CPU to an
    idle loop ``1: inc rcx; jmp 1b`` outside the hooked range, which burns the
    rest of the quantum at native emulation speed; the number of burnt
    instructions is recovered from RCX and RIP, so
    :attr:`Machine.instructions_executed` counts exactly the instructions
    executed on behalf of threads (a hypercall counts as one: its ``ret``).
    Only a CPU fault (unmapped access, ``ud2``) leaves the count of its
    quantum approximate (the whole quantum is counted).

Lifetime: a :class:`Machine` owns its unicorn instance, every mapping, every
loaded object and thread; nothing is freed before the machine is dropped
except by :meth:`Machine.unload_object`. Not thread-safe: use one Python
thread per machine. Hypercall functions must not start emulation themselves.
"""
from __future__ import annotations

import copy
import enum
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc, UcError
from unicorn import x86_const as X

import unwinder
from unwinder import AddressSpace, UnicornMemory

from osrjit.errors import EmulationError, EmulationFault

from .loader import (PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE, LoadedObject,
                     Region, assemble, link, load_object, place, unmap_regions)

__all__ = ["Machine", "EmuThread", "ThreadState", "Scheduler", "Hypercall", "EmulationFault",
           "DWARF_TO_UC", "REGISTER_BY_NAME"]

_MASK64 = (1 << 64) - 1
_U64 = struct.Struct("<Q")

#: DWARF register number (x86-64 psABI Figure 3.36) -> unicorn register id.
DWARF_TO_UC = {
    0: X.UC_X86_REG_RAX, 1: X.UC_X86_REG_RDX, 2: X.UC_X86_REG_RCX, 3: X.UC_X86_REG_RBX,
    4: X.UC_X86_REG_RSI, 5: X.UC_X86_REG_RDI, 6: X.UC_X86_REG_RBP, 7: X.UC_X86_REG_RSP,
    8: X.UC_X86_REG_R8, 9: X.UC_X86_REG_R9, 10: X.UC_X86_REG_R10, 11: X.UC_X86_REG_R11,
    12: X.UC_X86_REG_R12, 13: X.UC_X86_REG_R13, 14: X.UC_X86_REG_R14, 15: X.UC_X86_REG_R15,
    16: X.UC_X86_REG_RIP,
    **{17 + i: getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
}
#: Register name -> unicorn id: the 16 GPRs, rip, rflags, fs_base, gs_base, xmm0-15.
REGISTER_BY_NAME = {
    **{n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip")},
    "rflags": X.UC_X86_REG_EFLAGS, "fs_base": X.UC_X86_REG_FS_BASE,
    "gs_base": X.UC_X86_REG_GS_BASE,
    **{f"xmm{i}": getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
}
_GPR_DWARF = tuple(range(17))                       # RAX..R15 and RIP (16)
_GPR_UC = tuple(DWARF_TO_UC[r] for r in _GPR_DWARF)
_ARG_REGS = (X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX, X.UC_X86_REG_RCX,
             X.UC_X86_REG_R8, X.UC_X86_REG_R9)
_RIP, _RSP, _RAX, _RCX = X.UC_X86_REG_RIP, X.UC_X86_REG_RSP, X.UC_X86_REG_RAX, X.UC_X86_REG_RCX

_SLOT_SIZE = 16       # bytes per hypercall slot
_SLOT_ENTRY = 8       # offset of the hypercall address (the ret) in its slot
_IDLE_JMP_OFFSET = 3  # idle loop: +0 inc rcx (3 bytes), +3 jmp (2 bytes)
EXIT_HYPERCALL = "exit"


def _uc_reg(reg) -> int:
    """A DWARF register number or a register name -> unicorn register id."""
    if isinstance(reg, str):
        try:
            return REGISTER_BY_NAME[reg.lower()]
        except KeyError:
            raise EmulationError(f"unknown register {reg!r}") from None
    try:
        return DWARF_TO_UC[reg]
    except KeyError:
        raise EmulationError(f"no DWARF register {reg!r} on x86-64") from None


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


class ThreadState(enum.Enum):
    RUNNABLE = "runnable"
    PARKED = "parked"       #: waits for :meth:`EmuThread.unpark`
    FINISHED = "finished"   #: returned to the exit hypercall; :attr:`EmuThread.result`
    FAULTED = "faulted"     #: :attr:`EmuThread.error` says why


@dataclass(frozen=True)
class Hypercall:
    """A Python function reachable at an emulated ``address`` (absolute)."""
    name: str
    address: int
    fn: Callable
    index: int


class EmuThread:
    """One emulated thread: a register file (a unicorn context) and a stack.

    ``id``: 1, 2, ... in spawn order. ``stack``: its :class:`Region`
    (``stack.end`` is the initial top). ``instructions``: instructions it has
    executed (exact, see the module docstring). ``result``: RAX at exit, as a
    signed int64. ``error``: an :class:`EmulationFault` once faulted.
    ``pending``: free for services (the first pending exception of a call).

    Registers are read and written through :meth:`reg` / :meth:`set_reg`:
    while the thread runs (inside a hypercall) they are the CPU's, otherwise
    the saved context's, so a stopped thread can be inspected and modified
    (e.g. a hijacked return address, a redirected RIP) before it resumes.
    """

    def __init__(self, machine: "Machine", tid: int, name: str, stack: Region, ctx, entry: int):
        self.machine = machine
        self.id = tid
        self.name = name
        self.stack = stack
        self.entry = entry
        self.state = ThreadState.RUNNABLE
        self.instructions = 0
        self.error: EmulationFault | None = None
        self.pending: BaseException | None = None
        self._ctx = ctx
        self._result: int | None = None
        self._park_in_call = False
        self._resume_in_call = False

    # -- registers ---------------------------------------------------------------

    def _live(self) -> bool:
        return self.machine._live is self

    def reg(self, reg) -> int:
        """Value of ``reg`` (DWARF number or name such as ``"rax"``, ``"xmm3"``), unsigned."""
        r = _uc_reg(reg)
        return self.machine.uc.reg_read(r) if self._live() else self._ctx.reg_read(r)

    def set_reg(self, reg, value: int):
        """Set ``reg`` (DWARF number or name); ints are taken modulo 2**64 (2**128 for XMM)."""
        r = _uc_reg(reg)
        width = 128 if isinstance(reg, str) and reg.lower().startswith("xmm") or \
            isinstance(reg, int) and reg >= 17 else 64
        value &= (1 << width) - 1
        if self._live():
            self.machine.uc.reg_write(r, value)
        else:
            self._ctx.reg_write(r, value)

    def regs(self) -> dict[int, int]:
        """DWARF register number -> value for RAX..R15 (0..15) and RIP (16), as
        :func:`unwinder.walk` takes them."""
        src = self.machine.uc if self._live() else self._ctx
        return dict(zip(_GPR_DWARF, src.reg_read_batch(_GPR_UC)))

    @property
    def pc(self) -> int:
        """Absolute address of the next instruction (RIP)."""
        return self.reg("rip")

    @property
    def sp(self) -> int:
        return self.reg("rsp")

    def arg(self, index: int, *, signed: bool = False) -> int:
        """Integer argument ``index`` (0-5: RDI, RSI, RDX, RCX, R8, R9) as seen at a
        hypercall's entry."""
        if not 0 <= index < len(_ARG_REGS):
            raise EmulationError(f"argument {index} is not in a register")
        src = self.machine.uc if self._live() else self._ctx
        value = src.reg_read(_ARG_REGS[index])
        return _signed64(value) if signed else value

    # -- life cycle --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state is ThreadState.FINISHED

    @property
    def result(self) -> int:
        """RAX when the thread returned to the exit hypercall (signed int64).

        Raises the thread's :class:`EmulationFault` if it faulted, and
        EmulationError if it has not finished.
        """
        if self.state is ThreadState.FAULTED:
            raise self.error
        if self.state is not ThreadState.FINISHED:
            raise EmulationError(f"thread {self.id} ({self.name}) has not finished "
                                 f"({self.state.value})")
        return self._result

    def park(self, *, in_call: bool = False):
        """Stop scheduling this thread until :meth:`unpark`.

        From a hypercall, by default the thread parks as if the hypercall had
        returned. With ``in_call`` it parks *inside* it, like a native thread
        blocked in a service: RIP stays at the hypercall and its return
        address stays on the stack (a walk shows the hypercall frame, and the
        caller's return-address slot can be hijacked); on resumption the
        ``ret`` executes without calling the function again (so that
        hypercall counts as two instructions).
        """
        if self.state is ThreadState.RUNNABLE:
            self.state = ThreadState.PARKED
            self._park_in_call = in_call and self._live()

    def unpark(self):
        """Make a parked thread runnable again (no effect otherwise)."""
        if self.state is ThreadState.PARKED:
            self.state = ThreadState.RUNNABLE

    def __repr__(self):
        return f"<EmuThread {self.id} {self.name} {self.state.value} pc={self.pc:#x}>"


class _HypercallMemory:
    """Placement adapter: the hypercall object's code goes to the fixed page;
    its other sections (``.eh_frame``) to the arena, or, for a page outside
    the arena, to pages right after it (PC32 relocations must reach)."""

    def __init__(self, machine, page: Region, in_arena: bool):
        self.machine, self.page, self.regions = machine, page, []
        self._next = None if in_arena else page.end + PAGE_SIZE

    def map(self, size, perms, name):
        if perms & PROT_EXEC:
            if size > self.page.size:
                raise EmulationError(f"hypercall page too small ({size} > {self.page.size} bytes)")
            return self.page.address
        if self._next is None:
            address = self.machine.map(size, perms, name)
        else:
            address = self.machine._map_at(self._next, size, perms, name).address
            self._next = address + ((size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)) + PAGE_SIZE
        self.regions.append(address)
        return address

    def unmap(self, address):
        """Give back a mapping :meth:`map` made (the fixed page stays)."""
        if address in self.regions:
            self.regions.remove(address)
            self.machine.unmap(address)

    def write(self, address, data):
        page = self.page
        if page.address <= address < page.end:
            # Rewrite only what changed: a hypercall may register another one
            # while the CPU executes this page (unicorn then drops stale TBs).
            old = self.machine.read(address, len(data))
            diff = [i for i in range(len(data)) if old[i] != data[i]]
            if diff:
                self.machine.write(address + diff[0], data[diff[0]:diff[-1] + 1])
            return
        self.machine.write(address, data)


class Machine:
    """An emulated x86-64 address space with threads (see the module docstring).

    ``arena_base`` / ``arena_size``: where code and data mappings go (bytes,
    absolute). ``stack_base``: where stacks go. ``hypercall_base``: absolute
    4 KiB-aligned address of the hypercall page, default the first mapping of
    the arena; put it more than 2 GiB away from the arena to make every call
    to a service go through a PLT stub. ``hypercall_capacity``: number of
    hypercall slots.

    Attributes: ``uc`` (the unicorn ``Uc``), ``space`` (an
    :class:`unwinder.AddressSpace` holding every loaded object, the stubs and
    the hypercall page), ``memory`` (:class:`unwinder.UnicornMemory`),
    ``threads`` (spawn order), ``objects`` (loaded, in load order),
    ``symbols`` (name -> absolute address: hypercalls and every symbol of the
    loaded objects, later loads winning), ``instructions_executed``.
    """

    def __init__(self, *, arena_base: int = 0x1000_0000, arena_size: int = 0x7000_0000,
                 stack_base: int = 0x6000_0000_0000, hypercall_base: int | None = None,
                 hypercall_capacity: int = 255):
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._space = AddressSpace()
        self.memory = UnicornMemory(self.uc)
        self.threads: list[EmuThread] = []
        self.objects: list[LoadedObject] = []
        self.symbols: dict[str, int] = {}
        self.instructions_executed = 0
        self.regions: list[Region] = []
        self._arena = [arena_base, arena_base + arena_size]
        self._stacks_next = stack_base
        self._cells: Region | None = None
        self._cells_used = 0
        self._live: EmuThread | None = None
        self._burn = False
        self._stop_request: str | None = None
        self._pristine = self.uc.context_save()
        # The hypercall page: slot 0 holds the idle loop (not hooked).
        size = (hypercall_capacity + 1) * _SLOT_SIZE
        self._hypercalls_in_arena = hypercall_base is None
        if hypercall_base is None:
            self.hypercall_page = self._map_in_arena(size, PROT_READ | PROT_EXEC, "hypercall page")
        else:
            self.hypercall_page = self._map_at(hypercall_base, size, PROT_READ | PROT_EXEC,
                                               "hypercall page")
        page = self.hypercall_page
        self.write(page.address, b"\xcc" * page.size)
        self.idle_address = page.address
        self._capacity = hypercall_capacity
        self._hypercalls: dict[str, Hypercall] = {}
        self._by_address: dict[int, Hypercall] = {}
        self._hc_object: LoadedObject | None = None
        self._hc_dirty = False
        self._hc_regions: list[int] = []
        self.uc.hook_add(UC_HOOK_CODE, self._on_hypercall, None,
                         page.address + _SLOT_SIZE, page.address + size - 1)
        self.exit_address = self.hypercall(EXIT_HYPERCALL, _exit_hypercall)

    @property
    def space(self) -> AddressSpace:
        """The unwinder's view of this machine's code (hypercall page included)."""
        if self._hc_dirty:
            self._rebuild_hypercall_object()
        return self._space

    # -- memory ------------------------------------------------------------------

    def _map_at(self, address, size, perms, name) -> Region:
        if address % PAGE_SIZE:
            raise EmulationError(f"{name}: {address:#x} is not 4 KiB aligned")
        size = max(PAGE_SIZE, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        try:
            self.uc.mem_map(address, size, perms)
        except UcError as e:
            raise EmulationError(f"cannot map {name} at {address:#x} ({size} bytes): {e}") from None
        region = Region(address, size, perms, name)
        self.regions.append(region)
        return region

    def _map_in_arena(self, size, perms, name) -> Region:
        size = max(PAGE_SIZE, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        address = self._arena[0]
        if address + size > self._arena[1]:
            raise EmulationError(f"arena exhausted mapping {name} ({size} bytes)")
        self._arena[0] = address + size + PAGE_SIZE
        return self._map_at(address, size, perms, name)

    def map(self, size: int, perms: int = PROT_READ | PROT_WRITE, name: str = "data") -> int:
        """Map ``size`` bytes (rounded up to 4 KiB) of zeroed memory in the arena
        with ``perms`` (``PROT_*`` bits); returns its absolute address (the
        loader's interface). A 4 KiB guard page stays unmapped after it."""
        return self._map_in_arena(size, perms, name).address

    def unmap(self, address: int):
        """Unmap the region that starts at absolute ``address`` (its addresses are never reused)."""
        for region in self.regions:
            if region.address == address:
                self.uc.mem_unmap(region.address, region.size)
                self.regions.remove(region)
                return
        raise EmulationError(f"no mapping starts at {address:#x}")

    def alloc_cell(self, size: int = 8, align: int = 8) -> int:
        """``size`` zeroed bytes of read-write memory for a cell (slot cells,
        flags, state buffers); lives as long as the machine."""
        if size > PAGE_SIZE:
            return self.map(size, PROT_READ | PROT_WRITE, "cells")
        offset = (self._cells_used + align - 1) // align * align
        if self._cells is None or offset + size > self._cells.size:
            self._cells = Region(self.map(PAGE_SIZE, PROT_READ | PROT_WRITE, "cells"),
                                 PAGE_SIZE, PROT_READ | PROT_WRITE, "cells")
            offset = 0
        self._cells_used = offset + size
        return self._cells.address + offset

    def read(self, address: int, size: int) -> bytes:
        try:
            return bytes(self.uc.mem_read(address, size))
        except UcError as e:
            raise EmulationError(f"cannot read {size} bytes at {address:#x}: {e}") from None

    def write(self, address: int, data: bytes):
        """Write bytes at absolute ``address`` (ignores page protection, like a debugger)."""
        try:
            self.uc.mem_write(address, bytes(data))
        except UcError as e:
            raise EmulationError(f"cannot write {len(data)} bytes at {address:#x}: {e}") from None

    def read_u64(self, address: int) -> int:
        return _U64.unpack(self.read(address, 8))[0]

    def read_i64(self, address: int) -> int:
        return _signed64(self.read_u64(address))

    def write_u64(self, address: int, value: int):
        """Store ``value`` modulo 2**64 (so negative int64s work too)."""
        self.write(address, _U64.pack(value & _MASK64))

    # -- objects -------------------------------------------------------------------

    def resolve(self, name: str) -> int | None:
        """The default resolver for :meth:`load_object`: :attr:`symbols`."""
        return self.symbols.get(name)

    def load_object(self, data: bytes, resolve: Callable[[str], int | None] | None = None, *,
                    name: str = "object", export: bool = True) -> LoadedObject:
        """Load and relocate an object (see :mod:`osrjit.emulated.loader`) and
        register it (and its stubs) with :attr:`space`. ``resolve`` defaults to
        :meth:`resolve`; with ``export`` its symbols join :attr:`symbols`.
        Raises :class:`EmulationError` (:class:`~osrjit.errors.ObjectFormatError`
        for bytes that are no object), and then nothing stays mapped or
        registered."""
        return self.link_object(self.place_object(data, name=name), resolve, export=export)

    def place_object(self, data: bytes, *, name: str = "object"):
        """Phase 1 of :meth:`load_object` (a batch places all, then links all).
        The machine owns the placed regions: :meth:`link_object` either turns
        them into a loaded object or unmaps them; unmap them with
        :meth:`discard_placed` if the object is never linked."""
        return place(data, self, name=name)

    def discard_placed(self, placed):
        """Unmap the regions of a placed object that will not be linked."""
        unmap_regions(self, placed.regions)

    def link_object(self, placed, resolve=None, *, export: bool = True) -> LoadedObject:
        """Phase 2 of :meth:`load_object`; on an error the placed regions are
        unmapped."""
        try:
            obj = link(placed, self, resolve or self.resolve)
        except BaseException:
            self.discard_placed(placed)
            raise
        self._register(obj)
        if export:
            self.symbols.update(obj.symbols)
        return obj

    def _register(self, obj: LoadedObject):
        """Register ``obj`` and its stubs with the unwinder; if the unwinder
        refuses one (an :class:`unwinder.UnwindError`), unmap the object and
        raise an :class:`EmulationError` from it."""
        try:
            for o in (obj, obj.stub_object):
                if o is not None and o.ranges:
                    o.unwind_handle = self._space.add_code_object(o.data, o.load_addresses,
                                                                  name=o.name)
        except unwinder.UnwindError as e:
            self._unmap_object(obj)
            raise EmulationError(f"{obj.name}: the unwinder cannot use it: {e}") from e
        self.objects.append(obj)

    def _unmap_object(self, obj: LoadedObject):
        """Forget ``obj`` (and its stubs) in the unwinder and unmap their regions."""
        for o in (obj, obj.stub_object):
            if o is None:
                continue
            if o.unwind_handle is not None:
                self._space.remove_code_object(o.unwind_handle)
                o.unwind_handle = None
            unmap_regions(self, o.regions)

    def unload_object(self, obj: LoadedObject):
        """Forget ``obj`` in the unwinder, then unmap its regions (and its stubs').
        Its addresses are never mapped again, so a stale jump faults."""
        self._unmap_object(obj)
        if obj in self.objects:
            self.objects.remove(obj)
        for key in [k for k, v in self.symbols.items() if obj.symbols.get(k) == v]:
            del self.symbols[key]

    def symbolize(self, address: int) -> str | None:
        """``symbol+0xoff`` for absolute ``address`` in known code, else None."""
        module = self.space.find_module(address, refresh=False)
        hit = None if module is None else module.symbolize(address)
        if hit is None:
            return None
        return f"{hit[0]}+{address - hit[1]:#x}"

    # -- hypercalls ------------------------------------------------------------------

    def hypercall(self, name: str, fn: Callable[["Machine", EmuThread], int | None]) -> int:
        """The absolute address at which emulated code reaches ``fn(machine, thread)``.

        Call or jump to it like to a function (its frame: CFA = rsp + 8).
        ``fn`` returns an int for RAX or None (RAX unchanged); then the
        hypercall returns to ``[rsp]``. Registering a name again replaces its
        function and keeps its address. Names are also symbols
        (:attr:`symbols`), so objects importing ``name`` resolve to it.
        """
        known = self._hypercalls.get(name)
        if known is not None:
            hc = Hypercall(name, known.address, fn, known.index)
            self._hypercalls[name] = hc
            self._by_address[hc.address] = hc
            return hc.address
        index = len(self._hypercalls) + 1
        if index > self._capacity:
            raise EmulationError(f"no hypercall slot left for {name!r} (capacity {self._capacity})")
        address = self.hypercall_page.address + index * _SLOT_SIZE + _SLOT_ENTRY
        hc = Hypercall(name, address, fn, index)
        self._hypercalls[name] = hc
        self._by_address[address] = hc
        self.symbols[name] = address
        self._hc_dirty = True       # rebuilt once, before the next run or walk
        return address

    def _rebuild_hypercall_object(self):
        """Assemble the page's code and unwind info afresh and re-register it."""
        lines = ["\t.text", '\t.globl "osrjit.idle"', '\t.type "osrjit.idle",@function',
                 '"osrjit.idle":', "\t.cfi_startproc", "\t.cfi_undefined %rip",
                 "1:\tincq %rcx", "\tjmp 1b", "\t.fill 11, 1, 0xcc", "\t.cfi_endproc",
                 '\t.size "osrjit.idle", 16']
        for hc in sorted(self._hypercalls.values(), key=lambda h: h.index):
            sym = f'"hypercall.{hc.name}"'
            lines += [f"\t.globl {sym}", f"\t.type {sym},@function", f"{sym}:",
                      "\t.cfi_startproc"]
            if hc.name == EXIT_HYPERCALL:
                lines.append("\t.cfi_undefined %rip")   # the outermost frame of a thread
            lines += [f"\t.fill {_SLOT_ENTRY}, 1, 0xcc", "\tret",
                      f"\t.fill {_SLOT_SIZE - _SLOT_ENTRY - 1}, 1, 0xcc", "\t.cfi_endproc",
                      f"\t.size {sym}, {_SLOT_SIZE}"]
        self._hc_dirty = False
        data = _assemble_cached("\n".join(lines) + "\n")
        if self._hc_object is not None:
            self._space.remove_code_object(self._hc_object.unwind_handle)
            for address in self._hc_regions:
                self.unmap(address)
        adapter = _HypercallMemory(self, self.hypercall_page, self._hypercalls_in_arena)
        obj = load_object(data, adapter, name="hypercalls")
        obj.unwind_handle = self._space.add_code_object(obj.data, obj.load_addresses,
                                                       name="hypercalls")
        self._hc_object, self._hc_regions = obj, adapter.regions

    def _on_hypercall(self, uc, address, size, _user):
        thread = self._live
        if thread._resume_in_call:
            thread._resume_in_call = False      # parked inside: the ret just runs now
            return
        hc = self._by_address.get(address)
        if hc is None:
            self._fault(thread, address, f"executed the hypercall page at {address:#x}, "
                                         "which holds no hypercall")
            return
        try:
            value = hc.fn(self, thread)
            if value is not None:
                uc.reg_write(_RAX, int(value) & _MASK64)
        except BaseException as exc:  # noqa: BLE001 - never unwind through unicorn
            self._fault(thread, address, exc)
            return
        if thread.state is ThreadState.RUNNABLE and self._stop_request is None:
            return     # the ret executes natively (or fn redirected RIP: continue there)
        if thread.state is ThreadState.PARKED and thread._park_in_call:
            thread._park_in_call = False
            if uc.reg_read(_RIP) == address:
                thread._resume_in_call = True
        elif thread.state is not ThreadState.FINISHED and uc.reg_read(_RIP) == address:
            # Complete the ret on the thread's behalf, so its saved state is
            # "the hypercall returned".
            rsp = uc.reg_read(_RSP)
            uc.reg_write(_RIP, self.read_u64(rsp))
            uc.reg_write(_RSP, rsp + 8)
        self._leave_cpu(thread)

    def _leave_cpu(self, thread: EmuThread):
        """Save ``thread``'s registers and burn the rest of the quantum in the idle loop."""
        self.uc.context_update(thread._ctx)
        self._live = None
        self._burn = True
        self.uc.reg_write(_RCX, 0)
        self.uc.reg_write(_RIP, self.idle_address)

    def _fault(self, thread: EmuThread, pc: int, cause):
        thread.state = ThreadState.FAULTED
        thread.error = EmulationFault(thread, pc, self.symbolize(pc), cause)
        if isinstance(cause, BaseException):
            thread.error.__cause__ = cause
        self._leave_cpu(thread)

    @property
    def current_thread(self) -> EmuThread | None:
        """The thread whose registers are on the CPU (inside a hook), else None."""
        return self._live

    def request_stop(self, reason: str = "requested"):
        """From a hypercall: end the current :meth:`Scheduler.run` once this
        hypercall returns (the thread keeps the rest of its quantum)."""
        self._stop_request = reason

    # -- threads -------------------------------------------------------------------

    def spawn(self, entry: int, args: Iterable[int] = (), *, stack_size: int = 64 * 1024,
              name: str | None = None) -> EmuThread:
        """A new runnable thread that will call ``entry(*args)`` (System V ABI:
        integer arguments in RDI, RSI, RDX, RCX, R8, R9, then on the stack).

        ``stack_size`` in bytes (rounded up to 4 KiB; a guard page below it).
        Initial state: RIP = entry, RSP = top − 8 − 8·(stack args) holding the
        exit hypercall's address, every other GPR 0, RFLAGS 0x202.
        May be called from a hypercall; the new thread runs when scheduled.
        """
        args = [int(a) & _MASK64 for a in args]
        size = max(PAGE_SIZE, (stack_size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        base = self._stacks_next + PAGE_SIZE          # guard page below
        self._stacks_next = base + size
        tid = len(self.threads) + 1
        stack = self._map_at(base, size, PROT_READ | PROT_WRITE, f"stack of thread {tid}")
        stack_args = args[6:]
        rsp = stack.end - 8 * len(stack_args) - 8
        if (rsp + 8) % 16:
            rsp -= 8
        self.write_u64(rsp, self.exit_address)
        for i, a in enumerate(stack_args):
            self.write_u64(rsp + 8 + 8 * i, a)
        ctx = copy.copy(self._pristine)
        for reg, value in zip(_ARG_REGS, args):
            ctx.reg_write(reg, value)
        ctx.reg_write(_RSP, rsp)
        ctx.reg_write(_RIP, entry)
        ctx.reg_write(X.UC_X86_REG_EFLAGS, 0x202)
        thread = EmuThread(self, tid, name or f"thread-{tid}", stack, ctx, entry)
        self.threads.append(thread)
        return thread

    def _run_quantum(self, thread: EmuThread, count: int) -> int:
        """Run ``thread`` for at most ``count`` instructions; returns how many it executed."""
        if self._hc_dirty:
            self._rebuild_hypercall_object()
        uc = self.uc
        uc.context_restore(thread._ctx)
        self._live, self._burn = thread, False
        try:
            uc.emu_start(thread._ctx.reg_read(_RIP), 0, 0, count)
        except UcError as e:
            if self._live is thread:            # a CPU fault, not a burnt quantum
                pc = uc.reg_read(_RIP)
                uc.context_update(thread._ctx)
                self._live = None
                thread.state = ThreadState.FAULTED
                thread.error = EmulationFault(thread, pc, self.symbolize(pc), e)
                thread.instructions += count
                self.instructions_executed += count
                return count
            raise EmulationError(f"the idle loop faulted: {e}") from e
        executed = count
        if self._burn:
            rcx, rip = uc.reg_read(_RCX), uc.reg_read(_RIP)
            if rip == self.idle_address:
                burnt = 2 * rcx
            elif rip == self.idle_address + _IDLE_JMP_OFFSET:
                burnt = 2 * rcx - 1
            else:
                raise EmulationError(f"burnt quantum ended outside the idle loop at {rip:#x}")
            executed -= burnt
        else:
            uc.context_update(thread._ctx)
            self._live = None
        thread.instructions += executed
        self.instructions_executed += executed
        return executed

    def scheduler(self, seed: int = 0, quantum: tuple[int, int] = (1, 100)) -> "Scheduler":
        """A deterministic scheduler over this machine's threads (see :class:`Scheduler`)."""
        return Scheduler(self, seed, quantum)

    def run(self, seed: int = 0, quantum: tuple[int, int] = (1, 100), *,
            max_instructions: int | None = None, raise_on_fault: bool = True) -> "Scheduler":
        """Run runnable threads until none is left (or ``max_instructions``
        more instructions were executed); returns the :class:`Scheduler`
        (``.trace``, ``.instructions``; call its :meth:`~Scheduler.run` to go on)."""
        sched = Scheduler(self, seed, quantum)
        sched.run(max_instructions, raise_on_fault=raise_on_fault)
        return sched

    def call(self, entry: int, *args: int, seed: int = 0, quantum=(1, 100)) -> int:
        """Spawn a thread at ``entry(*args)``, run every runnable thread, return
        its signed result (raising its fault, if any)."""
        thread = self.spawn(entry, args)
        self.run(seed, quantum, raise_on_fault=False)
        return thread.result

    def walk(self, thread: EmuThread, *, max_frames: int = 4096) -> list:
        """The unwinder's frames of ``thread`` (innermost first), read from its
        current registers and the emulated memory."""
        return list(unwinder.walk(thread.regs(), self.memory, self.space, max_frames=max_frames))


_ASSEMBLED: dict[str, bytes] = {}


def _assemble_cached(text: str) -> bytes:
    """:func:`assemble`, memoised: every machine with the same hypercalls
    assembles the same page."""
    data = _ASSEMBLED.get(text)
    if data is None:
        data = _ASSEMBLED[text] = assemble(text)
    return data


def _exit_hypercall(machine: Machine, thread: EmuThread):
    thread._result = _signed64(machine.uc.reg_read(_RAX))
    thread.state = ThreadState.FINISHED
    return None


class Scheduler:
    """Runs a machine's runnable threads in quanta, deterministically.

    Each time a quantum ends, the next thread is ``rng.randrange`` over the
    runnable threads in spawn order and its quantum ``rng.randint(lo, hi)``
    instructions (``rng = random.Random(seed)``), so the same seed and the same
    threads give the same interleaving. ``trace``: one ``(thread id, rip,
    quantum)`` per switch-in. ``instructions``: executed under this scheduler.

    :meth:`run` may stop early (``max_instructions``, or a hypercall's
    :meth:`Machine.request_stop`); calling it again continues exactly where it
    stopped — the interrupted thread finishes its quantum first — so a run
    stopped after k instructions and resumed is instruction-for-instruction
    the run that was never stopped.
    """

    def __init__(self, machine: Machine, seed: int, quantum: tuple[int, int]):
        lo, hi = quantum
        if not 1 <= lo <= hi:
            raise EmulationError(f"quantum must be 1 <= lo <= hi, got {quantum}")
        self.machine, self.seed, self.quantum = machine, seed, (lo, hi)
        self.rng = random.Random(seed)
        self.trace: list[tuple[int, int, int]] = []
        self.instructions = 0
        self.stop_reason: str | None = None
        self._current: EmuThread | None = None
        self._remaining = 0

    def run(self, max_instructions: int | None = None, *, raise_on_fault: bool = True) -> bool:
        """Run until no thread is runnable (returns True) or until
        ``max_instructions`` more instructions were executed or a stop was
        requested (returns False; :attr:`stop_reason` says which). Raises the
        first :class:`EmulationFault` if ``raise_on_fault`` (the faulted
        thread is not scheduled again either way)."""
        m = self.machine
        budget = max_instructions
        self.stop_reason = None
        while True:
            if m._stop_request is not None:
                self.stop_reason, m._stop_request = m._stop_request, None
                return False
            if budget is not None and budget <= 0:
                self.stop_reason = "instruction budget"
                return False
            t = self._current
            if t is None or self._remaining <= 0 or t.state is not ThreadState.RUNNABLE:
                runnable = [x for x in m.threads if x.state is ThreadState.RUNNABLE]
                if not runnable:
                    self._current = None
                    if any(x.state is ThreadState.PARKED for x in m.threads):
                        self.stop_reason = "every remaining thread is parked"
                        return False
                    return True
                t = runnable[self.rng.randrange(len(runnable))]
                self._remaining = self.rng.randint(*self.quantum)
                self._current = t
                self.trace.append((t.id, t.pc, self._remaining))
            k = self._remaining if budget is None else min(self._remaining, budget)
            executed = m._run_quantum(t, k)
            self._remaining -= executed
            self.instructions += executed
            if budget is not None:
                budget -= executed
            if t.state is ThreadState.FAULTED and raise_on_fault:
                raise t.error
