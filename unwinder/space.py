"""Address spaces: which module covers a pc, and the cached unwind row for it.

The cache stage of parse → rules → cache → walk. An :class:`AddressSpace`
holds modules in a sorted, copy-on-write index (so walks never lock) and a
cache ``lookup pc → (row, signal frame?, module)``. Adding a module only
invalidates negative entries; removing one clears the cache — the generation
counter :attr:`AddressSpace.generation` says when that happened.
"""
import bisect
import threading

from .errors import ModuleError, UnwindError
from .memory import ProcessMemory
from .modules import CodeObject, modules_from_maps, read_proc_maps
from .compiled import compile_row
from .rules import decode_fde

_MAX_CACHE = 1 << 17
_MISS = object()


class AddressSpace:
    """The code of one address space: ELF modules and JIT code objects.

    Lifetime: modules stay referenced (and their files mapped) for the life of
    the space. :meth:`current_process` returns one shared instance per process;
    construct others directly for emulated CPUs and snapshots.
    """

    _current = None
    _current_lock = threading.Lock()

    def __init__(self, modules=(), *, refresh=None):
        self._lock = threading.Lock()
        # One immutable pair, swapped in a single store so a reader on another
        # thread never pairs the starts of one version with the entries of
        # another: (starts for bisect, sorted tuple of (start, end, module)).
        self._index = ((), ())
        self._cache = {}
        self._refresh = refresh  # callable returning fresh modules, or None
        self._known_paths = set()
        self.generation = 0
        #: Number of frames the walker unwound by frame pointers (no FDE).
        self.fallback_frames = 0
        #: Callables ``(slot_address, value) -> pc`` consulted for every return
        #: address read from a stack slot (see :meth:`add_return_address_filter`).
        self.return_address_filters = ()
        self._add_modules(modules)

    # -- construction -----------------------------------------------------

    @classmethod
    def current_process(cls):
        """The address space of this process's mapped ELF modules (shared, lazy).

        Modules are discovered from ``/proc/self/maps``; nothing beyond ELF and
        program headers is read until a walk needs it. Libraries loaded later
        are picked up when a pc falls in no known module.
        """
        with cls._current_lock:
            if cls._current is None:
                mem = ProcessMemory()

                def discover():
                    return modules_from_maps(read_proc_maps(), mem.read)

                space = cls(refresh=discover)
                space._add_modules(discover())
                cls._current = space
            return cls._current

    def _add_modules(self, modules):
        with self._lock:
            entries = list(self._index[1])
            for m in modules:
                key = getattr(m, "path", None) or m.name
                if not isinstance(m, CodeObject):
                    if key in self._known_paths:
                        continue
                    self._known_paths.add(key)
                for start, end in m.ranges:
                    entries.append((start, end, m))
            entries.sort(key=lambda e: e[0])
            self._index = (tuple(e[0] for e in entries), tuple(entries))
            # Negative cache entries may now be covered.
            self._cache = {pc: v for pc, v in self._cache.items() if v is not None}

    # -- JIT code objects ---------------------------------------------------

    def add_code_object(self, elf_bytes, load_addresses, name=None):
        """Register a relocatable object whose sections a JIT placed in memory.

        ``load_addresses`` maps section name (e.g. ``".text"``) to the absolute
        address of its first byte. Returns the :class:`~unwinder.modules.CodeObject`
        handle; keep it to remove the object before its memory is freed.
        Raises :class:`~unwinder.errors.ModuleError` if the object overlaps
        code already registered.
        """
        obj = CodeObject(elf_bytes, load_addresses, name=name)
        for start, end in obj.ranges:
            # Registered objects only: JIT memory is anonymous, so no module of
            # /proc/self/maps can overlap it (and re-reading maps costs ~5 ms).
            other = (self.find_module(start, refresh=False)
                     or self.find_module(end - 1, refresh=False))
            if other is not None and other is not obj:
                raise ModuleError(f"{obj.name}: [{start:#x}, {end:#x}) overlaps {other.name}")
        self._add_modules([obj])
        return obj

    def remove_code_object(self, handle):
        """Forget a code object added by :meth:`add_code_object` (clears the cache)."""
        with self._lock:
            entries = tuple(e for e in self._index[1] if e[2] is not handle)
            if len(entries) == len(self._index[1]):
                raise ModuleError(f"{getattr(handle, 'name', handle)!r} is not registered")
            self.generation += 1
            self._index = (tuple(e[0] for e in entries), entries)
            self._cache = {}

    def add_return_address_filter(self, translate):
        """Let walks see through rewritten return addresses.

        ``translate(slot_address, value) -> pc`` is called for each return
        address a walk reads from a stack slot (absolute addresses); returning
        something other than ``value`` makes the caller frame's ``pc`` that
        result, with the raw value kept in :attr:`Frame.stored_pc`. A deopt
        runtime registers one that maps its stub's address back to the
        original return address of each hijacked slot.
        """
        with self._lock:
            self.return_address_filters = self.return_address_filters + (translate,)

    def remove_return_address_filter(self, translate):
        """Undo :meth:`add_return_address_filter` (no error if absent).

        ``translate`` is matched by equality, not identity: ``obj.method``
        makes a new bound-method object at every access, and such objects are
        equal when they bind the same function to the same object.
        """
        with self._lock:
            self.return_address_filters = tuple(f for f in self.return_address_filters
                                                if f != translate)

    # -- lookups ------------------------------------------------------------

    @property
    def modules(self):
        """The registered modules, in address order (each once)."""
        seen, out = set(), []
        for _, _, m in self._index[1]:
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def _find(self, pc):
        starts, entries = self._index
        i = bisect.bisect_right(starts, pc) - 1
        if i >= 0:
            start, end, m = entries[i]
            if start <= pc < end:
                return m
        return None

    def find_module(self, pc, *, refresh=True):
        """The module whose code covers absolute ``pc``, or None.

        With ``refresh``, a miss re-reads the module list once (a library may
        have been loaded since).
        """
        m = self._find(pc)
        if m is None and refresh and self._refresh is not None:
            try:
                fresh = self._refresh()
            except OSError:
                return None
            self._add_modules(fresh)
            m = self._find(pc)
        return m

    def unwind_entry(self, pc):
        """``(plan, is_signal_frame, module)`` for absolute lookup ``pc``, or None.

        ``plan`` is the :class:`~unwinder.compiled.StepPlan` of the
        :class:`~unwinder.rules.UnwindRow` in force at ``pc`` (``plan.row``);
        None when no module or no FDE covers it (the walker then falls back to
        frame pointers). Plans are cached per pc.
        """
        cache = self._cache
        hit = cache.get(pc, _MISS)
        if hit is not _MISS:
            return hit
        generation = self.generation
        module = self.find_module(pc)
        entry = None
        if module is not None:
            fde = module.find_fde(pc)
            if fde is not None:
                row = decode_fde(fde).row_for(pc)
                if row is not None:
                    entry = (compile_row(row), fde.cie.is_signal_frame, module)
        # Another thread may have removed this module meanwhile (and the next
        # object may reuse its addresses): cache only if nothing was removed.
        if generation == self.generation and cache is self._cache:
            if len(cache) >= _MAX_CACHE:
                cache.clear()
            cache[pc] = entry
        return entry

    def __repr__(self):
        return f"<AddressSpace {len(self.modules)} modules, generation {self.generation}>"


__all__ = ["AddressSpace", "UnwindError"]
