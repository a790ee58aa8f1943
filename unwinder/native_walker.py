"""Walk: :class:`NativeWalker`, the Python face of ``osrjit_native_walk``.

The walker keeps one :class:`~unwinder.native_tables.ModuleTable` per module
of an :class:`~unwinder.space.AddressSpace` and the module index the native
code searches (:class:`~unwinder.native_abi.TablesHeader` over sorted
:class:`~unwinder.native_abi.ModuleEntry`), calls the compiled walker
(:class:`~unwinder.native_code.NativeCode`, from ``unwinder/native_walk.ll``)
and turns its :class:`~unwinder.native_abi.OutFrame` output into
:class:`NativeFrame` records, :class:`FrameArrays` columns or raw bytes.

Where the native code stops (:class:`~unwinder.native_abi.EndReason`), Python
takes over: NO_TABLE compiles what is missing and resumes; NO_INFO,
NEEDS_PYTHON, OUT_OF_BOUNDS and CFA_REGISTER_UNKNOWN have the Python walker
(:func:`unwinder.step`) do that one frame, counted in
:attr:`NativeWalker.fallbacks`, and the native walk resumes from its caller.
So :meth:`NativeWalker.walk` returns the same frames as :func:`unwinder.walk`.

Exports :class:`NativeWalker`, :class:`NativeFrame`, :class:`FrameArrays`,
:func:`stack_bounds_of` and :func:`state_from_regs`.
"""
import collections
import contextlib
import ctypes
import itertools
import struct
import threading
import time
from dataclasses import dataclass

from .errors import NativeWalkerError, UnwindError
from .memory import ProcessMemory
from .modules import read_proc_maps
from .native_abi import (FRAME_EXACT, FRAME_HAS_RA_SLOT, FRAME_SIGNAL, FRAME_TRANSLATED,
                         HANDOFF_END_REASONS, INFO_END_SHIFT, INFO_MODULE_SHIFT, STATE_EXACT,
                         STATE_HAS_PREV, STATE_TRANSLATED, TERMINAL_END_REASONS, WALK_REGISTERS,
                         EndReason, ModuleEntry, OutFrame, TablesHeader, WalkState)
from .native_code import NativeCode
from .native_tables import ModuleTable
from .space import AddressSpace
from .walk import (DEFAULT_MAX_FRAMES, END_CFA_NOT_INCREASING, END_RA_UNDEFINED, END_RA_ZERO,
                   END_STEP_LIMIT, step)
from .x86_64 import RA, RSP

__all__ = ["NativeWalker", "NativeFrame", "FrameArrays", "stack_bounds_of", "state_from_regs"]

_MASK64 = (1 << 64) - 1
_TERMINAL = TERMINAL_END_REASONS
_HANDOFF = HANDOFF_END_REASONS
#: An :class:`OutFrame` as bytes: pc, cfa, ra_slot, info.
_OUT = struct.Struct("<4Q")
assert _OUT.size == ctypes.sizeof(OutFrame)
#: bytes.translate table: FRAME_* flag byte -> 1 if FRAME_TRANSLATED else 0.
_TRANSLATED_MARKS = bytes(1 if b & FRAME_TRANSLATED else 0 for b in range(256))


@dataclass(frozen=True, slots=True)
class NativeFrame:
    """One frame of a :meth:`NativeWalker.walk`.

    ``pc``: absolute; the return address for caller frames (after
    translation). ``cfa``: absolute canonical frame address, None when the
    Python walker could not compute it. ``ra_slot``: absolute address of the
    8-byte slot holding this frame's return address, or None. ``lookup_pc``:
    where the rule was looked up (``pc − 1`` for callers, ``pc`` for the
    innermost frame and callers of signal frames). ``stored_pc``: the raw
    slot value (the stub's address) when ``pc`` was translated, else None.
    ``native``: False when the Python walker did this frame (a fallback).
    ``fallback``: the Python walker's own fallback (``"frame-pointer"``,
    ``"jump-stub"``) on such frames. ``end_reason``: on the last frame only,
    worded as :mod:`unwinder.walk` words it.
    """
    pc: int
    cfa: int | None
    ra_slot: int | None
    index: int
    lookup_pc: int
    module_ref: object = None
    is_signal_frame: bool = False
    stored_pc: int | None = None
    end_reason: str | None = None
    native: bool = True
    fallback: str | None = None

    @property
    def translated(self):
        return self.stored_pc is not None

    @property
    def module(self):
        return None if self.module_ref is None else self.module_ref.name

    @property
    def symbol(self):
        if self.module_ref is None:
            return None
        hit = self.module_ref.symbolize(self.lookup_pc)
        return None if hit is None else hit[0]

    def __repr__(self):
        cfa = "?" if self.cfa is None else f"{self.cfa:#x}"
        how = "" if self.native else f" [python{': ' + self.fallback if self.fallback else ''}]"
        end = f" end: {self.end_reason}" if self.end_reason else ""
        return (f"NativeFrame(#{self.index} pc={self.pc:#x} cfa={cfa} "
                f"in {self.module or '?'}{how}{end})")


@dataclass(frozen=True, slots=True)
class FrameArrays:
    """A walk as columns: frame i is ``(pcs[i], cfas[i], ra_slots[i])``.

    Same meaning as the :class:`NativeFrame` fields (absolute addresses),
    except that ``ra_slots[i]`` is 0 when RA is not on the stack. ``cfas[i]``
    is None only on a last frame the Python walker could not unwind. ``translated``:
    indices of frames whose pc came from the translation table (their slot
    holds the stub). ``python``: indices of frames the Python walker did.
    ``end_reason``: the last frame's, worded as :mod:`unwinder.walk` words it.
    """
    pcs: tuple
    cfas: tuple
    ra_slots: tuple
    translated: frozenset
    python: tuple
    end_reason: str | None

    def __len__(self):
        return len(self.pcs)


def stack_bounds_of(address):
    """``(lo, hi)``: the mapping of this process that contains absolute
    ``address`` (from ``/proc/self/maps``), or ``(address, address)`` (empty)
    when it is in no readable mapping. Costs one read of the maps file."""
    for start, end, perms, _offset, _path in read_proc_maps():
        if start <= address < end:
            return (start, end) if perms.startswith("r") else (address, address)
    return address, address


class _Buffers(threading.local):
    """Per-thread state and output buffers (so walks on several threads never share)."""

    def __init__(self, frames):
        self.state = WalkState()
        self.out = (OutFrame * frames)()


class NativeWalker:
    """Walk this process's native stacks with compiled tables.

    ``space``: the :class:`AddressSpace` whose modules describe the code
    (default: :meth:`AddressSpace.current_process`). Stack memory is read from
    this process directly (see the module docstring).

    Tables: a module's table is made the first time a walk lands in it —
    growing (:meth:`ModuleTable.for_module`) for ELF modules with an
    ``.eh_frame_hdr``, so only the FDEs walks reach get compiled; whole for JIT
    code objects. :meth:`prepare` compiles whole tables up front, for native
    callers that cannot stop for Python. :attr:`compile_seconds` sums the cost.
    The walker notices removed modules through ``space.generation`` and added
    ones when a walk meets a pc of a module it does not know; either rebuilds
    the module index (:meth:`refresh`).

    For native callers: :attr:`entry_address` is ``osrjit_native_walk``,
    :attr:`tables_address` the :class:`TablesHeader` to pass it. Native code
    may read a header, module entries and row tables while Python replaces
    them (a refresh, a table that grows); replaced ones are freed only when no
    walk started through this object is inside native code and nobody holds a
    :meth:`pin`. A native caller that uses :attr:`tables_address` on its own
    (a park stub, a signal handler) must hold a pin for as long as it may.

    ``chunk_frames``: frames one native call may write (each thread gets an
    output buffer of that many 32-byte :class:`OutFrame`); longer walks take
    several calls.

    Thread-safe: walks may run on several threads at once.
    """

    def __init__(self, space=None, *, chunk_frames=4096):
        if not (isinstance(chunk_frames, int) and chunk_frames > 0):
            raise NativeWalkerError(f"chunk_frames must be a positive int, got {chunk_frames!r}")
        self.space = space if space is not None else AddressSpace.current_process()
        self._code = NativeCode.get()
        self._lock = threading.RLock()
        self._tables = {}          # id(module) -> ModuleTable
        self._retired = []         # replaced native objects, freed when nothing runs
        self._active = 0           # walks of this object inside native code
        self._pins = 0
        self._index = None         # (header, entries array, modules by entry, module ids)
        self._generation = None
        self._buffers = _Buffers(chunk_frames)
        self._closed = False
        #: Frames unwound by the Python walker instead (expression rows, gaps,
        #: unknown CFA registers, reads outside the stack bounds).
        self.fallbacks = 0
        #: :class:`EndReason` name -> number of such frames.
        self.fallback_reasons = collections.Counter()
        self.refresh()

    # -- tables ---------------------------------------------------------------

    @property
    def entry_address(self):
        """Absolute address of ``osrjit_native_walk``."""
        return self._code.address

    @property
    def tables_address(self):
        """Address of the current :class:`TablesHeader` (refreshed if the space changed)."""
        self._check_generation()
        return ctypes.addressof(self._index[0])

    @property
    def tables(self):
        """The :class:`ModuleTable` s made so far, by module (a snapshot dict)."""
        with self._lock:
            return {t.module: t for t in self._tables.values()}

    @property
    def compile_seconds(self):
        """Seconds spent compiling the current tables (sum of their ``stats.seconds``)."""
        with self._lock:
            return sum(t.stats.seconds for t in self._tables.values())

    def table_for(self, module, *, create=True):
        """The :class:`ModuleTable` of ``module`` (made now, growing when
        possible, if ``create``; else None when there is none yet)."""
        with self._lock:
            table = self._tables.get(id(module))
            if table is None and create:
                table = ModuleTable.for_module(module)
                self._install(module, table)
            return table

    def prepare(self, modules=None):
        """Compile whole tables for ``modules`` (default: every module of the
        space) now, so native callers never meet NO_TABLE. Returns the seconds
        spent. Modules loaded later still need a walk (or another call)."""
        self._check_generation()
        t0 = time.perf_counter()
        for m in (self.space.modules if modules is None else modules):
            with self._lock:
                table = self._tables.get(id(m))
                if table is None or table.growing:
                    self._install(m, ModuleTable.whole(m))
        return time.perf_counter() - t0

    def _install(self, module, table):
        """Make ``table`` the module's table and point its entries at it (lock held)."""
        old = self._tables.get(id(module))
        if old is not None:
            self._retire(old)
        self._tables[id(module)] = table
        self._point_entries(module, table)

    def _point_entries(self, module, table):
        _header, entries, modules, _ids = self._index
        address = table.block_address
        for i, m in enumerate(modules):
            if m is module:
                entries[i].table = address        # one 8-byte store per entry

    def _grow(self, module, pc):
        """Compile what the table of ``module`` lacks at absolute ``pc``; True
        if the native walk can now do that frame (lock held)."""
        table = self._tables.get(id(module))
        if table is None:
            table = ModuleTable.for_module(module)
            self._install(module, table)
        replaced = table.grow(pc)
        if replaced:
            self._retire(replaced)
            self._point_entries(module, table)
        rule = table.rule_for(pc)
        return rule is not None and not rule.is_unknown

    def _retire(self, obj):
        self._retired.append(obj)
        self._release_if_idle()

    def _release_if_idle(self):
        if not self._active and not self._pins and self._retired:
            self._retired.clear()

    def refresh(self):
        """Rebuild the module index from the space (tables are kept for modules
        still present; those of removed modules are retired)."""
        with self._lock:
            if self._closed:
                raise NativeWalkerError("the native walker is closed")
            generation = self.space.generation
            ranges = sorted(((start, end, m) for m in self.space.modules
                             for start, end in m.ranges), key=lambda r: r[0])
            entries = (ModuleEntry * max(len(ranges), 1))()
            modules = tuple(m for _, _, m in ranges)
            ids = {id(m) for m in modules}
            for i, (start, end, m) in enumerate(ranges):
                table = self._tables.get(id(m))
                entries[i] = ModuleEntry(start, end, table.block_address if table else None, i)
            header = TablesHeader(ctypes.addressof(entries), len(ranges), generation, 0)
            for key in [k for k in self._tables if k not in ids]:
                self._retired.append(self._tables.pop(key))
            if self._index is not None:
                self._retired.append(self._index)
            self._index = (header, entries, modules, ids)
            self._generation = generation
            self._release_if_idle()

    def _check_generation(self):
        if self._closed:
            raise NativeWalkerError("the native walker is closed")
        if self.space.generation != self._generation:
            self.refresh()

    @contextlib.contextmanager
    def pin(self):
        """Keep every header and table handed out so far alive while the
        ``with`` block runs (for native code that uses :attr:`tables_address`)."""
        with self._lock:
            self._pins += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pins -= 1
                self._release_if_idle()

    def close(self):
        """Stop walking and drop every table and index — once no walk of this
        object is inside native code and no pin is held (walks still running
        finish safely). Addresses obtained from this walker are invalid after
        that. The walker code itself stays (it belongs to the process)."""
        with self._lock:
            self._closed = True
            self._retired.extend(self._tables.values())
            self._tables.clear()
            if self._index is not None:
                self._retired.append(self._index)
            self._index = None
            self._release_if_idle()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- walking --------------------------------------------------------------

    def _call(self, state, out, max_frames, lo, hi, translation_arrays):
        """``osrjit_native_walk`` on the current index; ``(n, index used)``."""
        with self._lock:
            if self._closed:
                raise NativeWalkerError("the native walker is closed")
            self._active += 1
            index = self._index
        try:
            n = self._code.function(
                ctypes.addressof(index[0]),
                translation_arrays.address if translation_arrays is not None else None,
                ctypes.addressof(state), ctypes.addressof(out), max_frames, lo, hi)
        finally:
            with self._lock:
                self._active -= 1
                self._release_if_idle()
        return n, index

    def call_native(self, state, out, max_frames, stack_bounds, translation=None):
        """One call of ``osrjit_native_walk`` with this walker's tables: the raw
        path (no fallback, no compilation). ``state``: a :class:`WalkState`
        (in/out); ``out``: an array of at least ``max_frames`` :class:`OutFrame`;
        ``stack_bounds``: ``(lo, hi)`` absolute; ``translation``: a
        :class:`ReturnAddressTable` or None. Returns the number of frames written."""
        self._check_generation()
        lo, hi = _check_bounds(stack_bounds)
        if not isinstance(state, WalkState) or getattr(out, "_type_", None) is not OutFrame:
            raise NativeWalkerError("call_native needs a WalkState and an array of OutFrame")
        if not 0 <= max_frames <= len(out):
            raise NativeWalkerError(f"max_frames {max_frames} does not fit the output "
                                    f"array of {len(out)} frames")
        arrays = translation.snapshot() if translation is not None else None
        return self._call(state, out, max_frames, lo, hi, arrays)[0]

    def walk(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
             stack_bounds=None, translation=None):
        """Frames from a register state of this process, innermost first.

        ``regs``: DWARF register number -> value; needs RIP (16) and RSP (7),
        and the callee-saved registers for exact results (as :func:`unwinder.walk`).
        ``innermost_is_caller``: ``regs`` hold a return address (a state
        captured at a call, as :func:`unwinder.with_captured_registers` gives),
        so the first frame is looked up at ``pc − 1``. ``stack_bounds``:
        ``(lo, hi)`` absolute byte range the stack lies in; default: the
        mapping that contains RSP (one read of ``/proc/self/maps``).
        ``translation``: a :class:`ReturnAddressTable` applied to every return
        address read from a slot (the space's Python filters are not called;
        register the table's :meth:`~ReturnAddressTable.translate` with the
        space to make :func:`unwinder.walk` agree).

        Returns a list of :class:`NativeFrame`. Frames the native code cannot
        do are done by the Python walker and counted in :attr:`fallbacks`; the
        sequence equals :func:`unwinder.walk`'s. Raises :class:`UnwindError`
        for missing registers, :class:`NativeWalkerError` for bad bounds, and
        whatever the Python walker raises for corrupt CFI. Building the
        records costs about 1–2 µs per frame; :meth:`walk_arrays` returns the
        same walk as columns for a fraction of that.
        """
        frames = []
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        for seg in segments:
            if isinstance(seg, NativeFrame):
                frames.append(seg)
                continue
            raw, base, modules, arrays = seg
            for i, (pc, cfa, slot, info) in enumerate(_OUT.iter_unpack(raw), base):
                stored = None
                if info & FRAME_TRANSLATED:
                    # The slot it was read from is the previous frame's.
                    stored = arrays.stored(frames[-1].ra_slot if frames else None)
                frames.append(NativeFrame(
                    pc, cfa, slot if info & FRAME_HAS_RA_SLOT else None, i,
                    pc if info & FRAME_EXACT else (pc - 1) & _MASK64, modules[info >> INFO_MODULE_SHIFT],
                    bool(info & FRAME_SIGNAL), stored,
                    _TERMINAL.get((info >> INFO_END_SHIFT) & 0xFF)))
        if limited and frames[-1].end_reason is None:
            last = frames[-1]
            frames[-1] = NativeFrame(last.pc, last.cfa, last.ra_slot, last.index, last.lookup_pc,
                                     last.module_ref, last.is_signal_frame, last.stored_pc,
                                     END_STEP_LIMIT, last.native, last.fallback)
        return frames

    def walk_arrays(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
                    stack_bounds=None, translation=None):
        """The walk of :meth:`walk` as :class:`FrameArrays`: columns sliced
        straight out of the native output, no per-frame Python objects."""
        pcs, cfas, slots, translated, python = [], [], [], [], []
        end = None
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        for seg in segments:
            if isinstance(seg, NativeFrame):
                python.append(len(pcs))
                if seg.stored_pc is not None:
                    translated.append(len(pcs))
                pcs.append(seg.pc)
                cfas.append(seg.cfa)
                slots.append(seg.ra_slot or 0)
                end = seg.end_reason
                continue
            raw, base, _modules, arrays = seg
            words = memoryview(raw).cast("Q")
            pcs += words[0::4].tolist()
            cfas += words[1::4].tolist()
            slots += words[2::4].tolist()
            if arrays is not None:
                # The low byte of each info word holds the FRAME_* flags: mark the
                # translated ones and find them without a per-frame loop.
                marks = raw[OutFrame.info.offset::_OUT.size].translate(_TRANSLATED_MARKS)
                translated += itertools.compress(range(base, base + len(marks)), marks)
            end = _TERMINAL.get((words[-1] >> INFO_END_SHIFT) & 0xFF)
        if limited and end is None:
            end = END_STEP_LIMIT
        return FrameArrays(tuple(pcs), tuple(cfas), tuple(slots), frozenset(translated),
                           tuple(python), end)

    def walk_raw(self, regs, *, max_frames=DEFAULT_MAX_FRAMES, innermost_is_caller=False,
                 stack_bounds=None, translation=None):
        """The walk of :meth:`walk` as ``(raw, end_reason)`` when native code
        did every frame, else None (some frame needed the Python walker: use
        :meth:`walk` or :meth:`walk_arrays`, which give the whole answer).
        ``raw``: ``bytes`` of :class:`OutFrame` (32 bytes a frame, innermost
        first, absolute addresses); ``end_reason`` as in :class:`FrameArrays`."""
        segments, limited = self._segments(regs, max_frames, innermost_is_caller,
                                           stack_bounds, translation)
        if any(isinstance(seg, NativeFrame) for seg in segments):
            return None
        raw = b"".join(seg[0] for seg in segments)
        end = None
        if raw:
            end = _TERMINAL.get((int.from_bytes(raw[-8:], "little") >> INFO_END_SHIFT) & 0xFF)
        if limited and end is None:
            end = END_STEP_LIMIT
        return raw, end

    def walk_out(self, regs, *, innermost_is_caller=False, stack_bounds, translation=None):
        """The walk of :meth:`walk_raw` without a copy, when one native call
        does it whole: ``(address, n, end_reason)`` with the ``n`` frames as
        :class:`OutFrame` at ``address`` (absolute) in this thread's output
        buffer of this walker — valid until this thread's next walk with it —,
        else None (a table to grow, a frame for the Python walker, more frames
        than the buffer holds: use :meth:`walk_raw`). ``stack_bounds``
        ``(lo, hi)`` is required. For the stop-the-world scan, where every
        microsecond of Python counts.
        """
        lo, hi, state, out = self._begin(regs, innermost_is_caller, stack_bounds)
        arrays = translation.snapshot() if translation is not None else None
        n, _index = self._call(state, out, len(out), lo, hi, arrays)
        if state.end_reason not in _TERMINAL or not n:
            return None
        return (ctypes.addressof(out), n,
                _TERMINAL.get((out[n - 1].info >> INFO_END_SHIFT) & 0xFF))

    def _begin(self, regs, innermost_is_caller, stack_bounds):
        """Check ``regs`` and ``stack_bounds``, refresh the tables if the space
        changed and load this thread's walk state: ``(lo, hi, state, out)``."""
        if RA not in regs or RSP not in regs:
            raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
        lo, hi = _check_bounds(stack_bounds)
        self._check_generation()
        buffers = self._buffers
        _load_state(buffers.state, regs, 0 if innermost_is_caller else STATE_EXACT, 0)
        return lo, hi, buffers.state, buffers.out

    def _segments(self, regs, max_frames, innermost_is_caller, stack_bounds, translation):
        """The core loop. Returns ``(segments, limited)``: each segment is
        ``(raw OutFrame bytes, index of its first frame, modules by entry, the
        translation's arrays)`` for frames the native code did, or a :class:`NativeFrame`
        the Python walker did; ``limited``: ``max_frames`` frames were produced
        and the last one has no end reason of its own."""
        if RA not in regs or RSP not in regs:
            raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
        if max_frames <= 0:
            return [], False
        if stack_bounds is None:
            stack_bounds = stack_bounds_of(regs[RSP] & _MASK64)
        lo, hi, state, out = self._begin(regs, innermost_is_caller, stack_bounds)
        # One snapshot for the whole walk: native and Python steps translate alike.
        arrays = translation.snapshot() if translation is not None else None
        segments = []
        count = 0
        memory = None
        original = regs        # the caller's own dict serves a first Python step
        stored_pc = None       # raw slot value of the current frame after a Python step
        last_slot = None       # ra_slot of the last frame produced
        while True:
            n, index = self._call(state, out, min(max_frames - count, len(out)), lo, hi, arrays)
            if n:
                segments.append((ctypes.string_at(ctypes.addressof(out), n * _OUT.size),
                                 count, index[2], arrays))
                last_slot = ctypes.c_uint64.from_buffer_copy(
                    out, (n - 1) * _OUT.size + OutFrame.ra_slot.offset).value
                count += n
                original = stored_pc = None
            reason = EndReason(state.end_reason)
            if reason in _TERMINAL:
                return segments, False
            if reason is EndReason.MAX_FRAMES:
                if count >= max_frames:
                    return segments, True
                continue
            if reason is EndReason.NO_TABLE:
                pc = state.regs[RA]
                lookup = pc if state.flags & STATE_EXACT else (pc - 1) & _MASK64
                with self._lock:
                    if self._index is index and self._grow(index[2][state.end_module], lookup):
                        continue
                # The index changed meanwhile, or the table cannot say: do
                # this frame in Python.
                reason = EndReason.NEEDS_PYTHON
            if reason not in _HANDOFF:
                raise NativeWalkerError(f"native walk returned {reason!r}")
            # The Python walker does one frame; the native walk resumes at its caller.
            if memory is None:
                # Uncached: a failed read names the exact address, as in walk().
                memory = ProcessMemory()
            frame, caller = self._python_step(state, original, reason, memory, count,
                                              stored_pc, arrays, last_slot)
            segments.append(frame)
            count += 1
            last_slot = frame.ra_slot
            original = stored_pc = None
            if frame.end_reason is not None:
                return segments, False
            if count >= max_frames:
                return segments, True
            raw_ra = caller[RA]
            if arrays is not None and frame.ra_slot is not None:
                pc = arrays.translate(frame.ra_slot, raw_ra)
                if pc != raw_ra:
                    caller = {**caller, RA: pc}
                    stored_pc = raw_ra
            _load_state(state, caller,
                        (STATE_EXACT if frame.is_signal_frame else 0)
                        | (STATE_TRANSLATED if stored_pc is not None else 0) | STATE_HAS_PREV,
                        frame.cfa)
            if frame.module_ref is not None and id(frame.module_ref) not in self._index[3]:
                self.refresh()    # a module the space found after our index was built

    def _python_step(self, state, original, reason, memory, index, stored_pc, arrays,
                     last_slot):
        """One frame by :func:`unwinder.step` from ``state``; returns ``(NativeFrame, caller)``."""
        if original is not None:
            regs = dict(original)
        else:
            known = state.known
            regs = {r: state.regs[r] for r in range(WALK_REGISTERS) if known >> r & 1}
        exact = bool(state.flags & STATE_EXACT)
        frame, caller = step(regs, memory, self.space, caller_frame=not exact)
        end = frame.end_reason
        if (state.flags & STATE_HAS_PREV and frame.cfa is not None
                and frame.cfa <= state.prev_cfa and end in (None, END_RA_UNDEFINED, END_RA_ZERO)):
            # walk() tests the CFA before the return address; step() cannot.
            end, caller = END_CFA_NOT_INCREASING, None
        if stored_pc is None and state.flags & STATE_TRANSLATED:
            # the native code translated this frame's pc, read from last_slot
            stored_pc = arrays.stored(last_slot) if arrays is not None else None
        with self._lock:
            self.fallbacks += 1
            self.fallback_reasons[reason.name] += 1
        return NativeFrame(frame.pc, frame.cfa, frame.ra_slot, index, frame.lookup_pc,
                           frame.module_ref, frame.is_signal_frame, stored_pc, end,
                           native=False, fallback=frame.fallback), caller

    def __repr__(self):
        n = len(self._index[2]) if self._index else 0
        return f"<NativeWalker {n} ranges, {len(self._tables)} tables, {self.fallbacks} fallbacks>"


def _check_bounds(bounds):
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise NativeWalkerError(f"stack bounds must be (lo, hi), got {bounds!r}") from None
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= _MASK64):
        raise NativeWalkerError(f"bad stack bounds ({lo!r}, {hi!r}): need 0 <= lo <= hi < 2**64")
    return lo, hi


def _load_state(state, regs, flags, prev_cfa):
    """Fill ``state`` from ``regs`` (DWARF number -> value; keys outside 0..16 ignored)."""
    keys = tuple(regs)
    known = _KNOWN_BITS.get(keys)
    if known is None:
        known = sum(1 << r for r in keys if isinstance(r, int) and 0 <= r < WALK_REGISTERS)
        if len(_KNOWN_BITS) < 64:
            _KNOWN_BITS[keys] = known
    # One pack into the structure's buffer (a walk starts in a stopped world:
    # ctypes field assignments cost several times as much).
    values = list(map(regs.get, _REGISTER_NUMBERS, _NO_VALUES))
    try:
        _STATE_HEAD.pack_into(state, 0, *values, known, flags, prev_cfa)
    except struct.error:        # a value outside 0 .. 2**64 - 1: keep its low 64 bits
        _STATE_HEAD.pack_into(state, 0, *[v & _MASK64 for v in values], known, flags,
                              prev_cfa & _MASK64)


#: ``tuple(regs)`` -> bit mask of the DWARF numbers 0..16 in it (key sets repeat).
_KNOWN_BITS = {}
#: WalkState.regs, known, flags, prev_cfa.
_STATE_HEAD = struct.Struct(f"<{WALK_REGISTERS + 3}Q")
assert _STATE_HEAD.size == WalkState.end_reason.offset
_REGISTER_NUMBERS = range(WALK_REGISTERS)
_NO_VALUES = (0,) * WALK_REGISTERS


def state_from_regs(regs, *, innermost_is_caller=False):
    """A fresh :class:`WalkState` for ``regs`` (DWARF number -> value), for
    :meth:`NativeWalker.call_native`."""
    if RA not in regs or RSP not in regs:
        raise UnwindError("walk needs RIP (16) and RSP (7) in the initial registers")
    state = WalkState()
    _load_state(state, regs, 0 if innermost_is_caller else STATE_EXACT, 0)
    return state
