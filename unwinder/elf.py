"""ELF files that reference counting alone can free (pyelftools).

Mapped libraries (:class:`~unwinder.modules.ElfModule`) and the native
walker's own object are read through pyelftools, here. JIT objects handed to
the packages are not: :mod:`unwinder.elfobject` reads and checks those.

pyelftools 0.33 leaves two reference cycles behind every :class:`ELFFile`:
``ELFStructs`` keeps ``Elf_Prop`` (the ``.note.gnu.property`` parser), whose
closures capture the ``ELFStructs`` itself, and the cached section-header
string table is a section that points back at its file. So every parse —
about 80 KiB of objects — waits for a full cyclic collection, and between
those the interpreter's allocator keeps growing. :func:`open_elf` returns an
:class:`ELFFile` without those cycles: the same sections and answers, freed
as soon as the last reference goes.

If a pyelftools release changes the internals used here, :func:`open_elf`
still returns a working file (with its cycles: correct, freed later);
``tests/test_elf.py`` reports that.
"""
import functools
import types

from elftools.elf.elffile import ELFFile
from elftools.elf.structs import ELFStructs

__all__ = ["open_elf", "AcyclicELFFile"]


class AcyclicELFFile(ELFFile):
    """An :class:`ELFFile` whose parse leaves no reference cycle (see the module docstring)."""

    def __init__(self, stream, *args, **kwargs):
        super().__init__(stream, *args, **kwargs)
        _break_structs_cycle(self.structs)


_CACHED = getattr(ELFFile, "_section_header_stringtable", None)
if isinstance(_CACHED, functools.cached_property):
    # Looked up each time instead of cached on the instance (a cached Section
    # would point back at this file).
    AcyclicELFFile._section_header_stringtable = property(_CACHED.func)


def _break_structs_cycle(structs):
    """Rebuild ``structs.Elf_Prop`` with closures over a small namespace
    instead of ``structs`` itself."""
    make = getattr(ELFStructs, "_create_gnu_property", None)
    if make is None or not hasattr(structs, "Elf_Prop"):
        return
    proxy = types.SimpleNamespace(**{name: getattr(structs, name) for name in
                                     ("elfclass", "Elf_word", "Elf_word64")
                                     if hasattr(structs, name)})
    try:
        make(proxy)
    except AttributeError:      # another pyelftools: keep its own (cyclic) parser
        return
    structs.Elf_Prop = proxy.Elf_Prop
    del proxy.Elf_Prop          # the closures keep the proxy; it must not keep them


def open_elf(stream):
    """An :class:`AcyclicELFFile` reading ``stream`` (a binary file object);
    ``ELFError`` / ``ValueError`` on input pyelftools cannot read, as :class:`ELFFile`."""
    return AcyclicELFFile(stream)
