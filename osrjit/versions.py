"""Versions and the function table: what every backend keeps of compiled code.

A :class:`Version` is one compiled version of a function, loaded by a
backend (its own JIT library natively, placed in emulated memory under
emulation). The :class:`FunctionTable` maps each function name to its
:class:`Function`: the signature, the loaded versions (oldest first) and the
current one. It is the one place that decides which versions are *old*.

The table only records; publishing a version (the store into the function's
slot cell, call patches) is the backend's part (see :mod:`osrjit.backend`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from deopt.framemaps import FrameMap, FrameMapTable

from .abi import FunctionIR, SiteInfo
from .errors import UnknownFunction

__all__ = ["Version", "Function", "FunctionTable"]


class Version:
    """One loaded version of a function.

    ``id``: unique in the runtime (1, 2, ... in link order). ``name``: the
    function's name; ``symbol``: its native symbol. ``entry`` /
    ``resume_entry``: absolute addresses of ``@<symbol>`` and
    ``@<symbol>__resume`` (``i64 (i64 site_id, ptr state)``, see
    :mod:`osrjit.abi`) — native addresses, or emulated ones under emulation.
    ``code_range``: ``(start, end)`` absolute addresses of the object's
    ``.text`` as loaded. ``frame_maps``: a :class:`deopt.framemaps.FrameMapTable`
    (one map per statepoint record, keyed by absolute return address;
    iterable and indexable in stackmap order). ``sites``: the code
    generator's sites. ``object_image``: the ELF object the code was loaded
    from. ``load_addresses``: section name -> absolute address. ``library``:
    what the backend loaded it as (its owner of the code). ``stubs``: its
    per-site return stubs (:mod:`deopt.sitestubs`; the native backend's
    ``VersionStubs``, released with the code), or None.

    Accounting (kept by the runtime): ``pending_returns`` — hijacked slots
    whose frames will return into it; ``pinned`` — a frame may run its code
    without a pending return being recorded (a transfer fell back to the old
    code): never freed automatically; ``executing`` — the last stack scan
    found a frame running it outside any site.

    Lifetime: the code stays mapped until the runtime frees the version or
    closes; after that ``loaded`` is False and every address here is stale
    (the memory may hold another version's code). Calling ``entry`` or
    ``resume_entry`` is only valid while ``loaded``.
    """

    def __init__(self, vid: int, ir: FunctionIR, object_image: bytes,
                 load_addresses: Mapping[str, int], entry: int, resume_entry: int,
                 code_range: tuple[int, int], frame_maps: FrameMapTable, library=None):
        self.id = vid
        self.ir = ir
        self.object_image = object_image
        self.load_addresses = dict(load_addresses)
        self.entry = entry
        self.resume_entry = resume_entry
        self.code_range = code_range
        self.frame_maps = frame_maps
        self.library = library
        self.stubs = None
        self.loaded = True
        self.pending_returns = 0
        self.pinned = False
        self.executing = False

    name = property(lambda self: self.ir.name)
    symbol = property(lambda self: self.ir.symbol)
    sites: Mapping[int, SiteInfo] = property(lambda self: self.ir.sites)
    params = property(lambda self: self.ir.params)

    def frame_map_at(self, return_address: int) -> FrameMap | None:
        """The frame map for absolute ``return_address`` in this version, or None."""
        return self.frame_maps.at(return_address)

    def frame_maps_for_site(self, site_id: int) -> tuple[FrameMap, ...]:
        """Every frame map of ``site_id`` (entry and resume copies)."""
        return self.frame_maps.for_site(site_id)

    def contains(self, address: int) -> bool:
        """Whether absolute ``address`` lies in this version's ``.text``."""
        start, end = self.code_range
        return start <= address < end

    def __repr__(self):
        state = "" if self.loaded else ", unloaded"
        return (f"<Version {self.name} #{self.id} .text [{self.code_range[0]:#x}, "
                f"{self.code_range[1]:#x}) {len(self.frame_maps)} frame maps{state}>")


class Function:
    """Per-name state: the signature, the loaded versions (oldest first), the
    current version, and ``cell``: the backend's slot cell for it (the
    native backend's ``ctypes.c_uint64``, the emulated one's address)."""

    def __init__(self, name: str, params: tuple[str, ...], return_type: str, cell=None):
        self.name = name
        self.params = params
        self.return_type = return_type
        self.cell = cell
        self.versions: list[Version] = []
        self.current: Version | None = None


class FunctionTable:
    """Every compiled function by name, in first-compiled order."""

    def __init__(self):
        self._functions: dict[str, Function] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[Function]:
        return iter(list(self._functions.values()))

    def get(self, name: str) -> Function:
        """The function ``name`` (:class:`UnknownFunction` if none)."""
        fn = self._functions.get(name)
        if fn is None:
            raise UnknownFunction(name)
        return fn

    def find(self, name: str) -> Function | None:
        return self._functions.get(name)

    def add(self, name: str, params, return_type: str, cell=None) -> Function:
        fn = self._functions[name] = Function(name, tuple(params), return_type, cell)
        return fn

    def names(self) -> list[str]:
        return list(self._functions)

    def signatures(self) -> dict[str, tuple[tuple[str, ...], str]]:
        """name -> (params, return type)."""
        return {n: (fn.params, fn.return_type) for n, fn in self._functions.items()}

    def arities(self) -> dict[str, int]:
        return {n: len(fn.params) for n, fn in self._functions.items()}

    def publish(self, version: Version) -> Function:
        """Record ``version`` as its function's current one (the function exists)."""
        fn = self._functions[version.name]
        if fn.current is not version:
            fn.versions.append(version)
            fn.current = version
        return fn

    def remove(self, version: Version) -> None:
        """Forget an old version (it is freed)."""
        fn = self._functions[version.name]
        if fn.current is version:
            raise ValueError(f"{version.name} v{version.id} is current")
        if version in fn.versions:
            fn.versions.remove(version)
        version.loaded = False

    def all_versions(self) -> list[Version]:
        return [v for fn in self._functions.values() for v in fn.versions]

    def is_old(self, version: Version) -> bool:
        """Whether ``version`` is no longer its function's current one."""
        fn = self._functions.get(version.name)
        return fn is None or fn.current is not version

    def old_versions(self) -> list[Version]:
        return [v for v in self.all_versions() if self.is_old(v)]

    def version_at(self, address: int) -> Version | None:
        """The loaded version whose ``.text`` contains absolute ``address``, or None."""
        for fn in self._functions.values():
            for v in fn.versions:
                if v.contains(address):
                    return v
        return None

    def mark_executing(self, executing) -> None:
        """Set :attr:`Version.executing` of every version from a scan's set."""
        for fn in self._functions.values():
            for v in fn.versions:
                v.executing = v in executing
