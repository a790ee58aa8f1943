"""Scenario: a corrupt relocatable object never gets a foreign exception out of a reader.

Start from complete objects as LLVM emits them for reference-language
functions (``osrjit.testing.fuzz.seed_objects``: -O0 and -O2, slot and direct
calls, with ``.text``, ``.llvm_stackmaps``, ``.eh_frame`` and their
relocations), corrupt them -- bytes flipped, set, inserted, deleted,
truncated; sections grown or shrunk with the headers kept consistent; the ELF
header, section headers, the section-name and symbol string tables, symbols
and relocation entries aimed at with values that matter -- and hand each to
every public entry that takes object bytes:

* ``unwinder.AddressSpace.add_code_object``, then walks over a snapshot stack
  from a pc in ``.text`` and from every return address, symbols, removal;
* ``deopt.framemaps.ObjectImage`` and ``frame_maps_for_object``;
* the emulated loader (``Machine.load_object``, then ``unload_object``);
* the native backend's direct call sites (``osrjit.native.patching.call_sites``).

Each must end with its package's own error (``unwinder.UnwindError``,
``deopt.DeoptError``, ``osrjit.OsrJitError``) or a valid result; and a load
that fails leaves no emulated mapping behind. CI runs 6,000 cases
(derandomized); ``-m slow`` runs 100,000.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deopt
import osrjit
import unwinder
from deopt.framemaps import ObjectImage
from osrjit.emulated import Machine
from osrjit.testing import fuzz

_KINDS = list(fuzz.OBJECT_EDITS)
BYTE_EDITS = ("flip", "byte", "insert", "delete", "truncate", "word", "grow", "shrink")
HEADER_EDITS = ("ehdr", "shdr", "shstrtab")
TABLE_EDITS = ("strtab", "symbol", "relocation", "grow", "shrink")


def edits(kinds=tuple(_KINDS), max_size=4):
    """Lists of ``(kind, where, value)`` edits of the given kinds."""
    return st.lists(st.tuples(st.sampled_from([_KINDS.index(k) for k in kinds]),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
                    min_size=1, max_size=max_size)


_targets = None
#: target name -> Tally of every case this module ran (printed at its end).
_tallies = {}


def targets():
    """The object targets, with one emulated loader for the session."""
    global _targets
    if _targets is None:
        _targets = fuzz.object_targets(fuzz.ObjectLoader())
    return _targets


def check_every_target(seed_index, object_edits, choice):
    seed = fuzz.seed_objects()[seed_index % len(fuzz.seed_objects())]
    data = fuzz.mutate(seed, object_edits)
    for target in targets():
        tally = _tallies.setdefault(target.name, fuzz.Tally(target.name))
        outcome = tally.timed(lambda: target.run(seed, data, choice))
        assert not outcome.foreign, (f"{target.name} on {seed.name} after edits "
                                     f"{object_edits}:\n{outcome.detail}")


@pytest.fixture(scope="module", autouse=True)
def outcome_summary(request):
    """After the module: cases and outcomes per target, on the terminal."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not _tallies:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for tally in _tallies.values():
            outcomes = ", ".join(f"{kind} {n}" for kind, n in
                                 sorted(tally.outcomes.items(), key=lambda kv: -kv[1]))
            reporter.write_line(f"object fuzz {tally.target}: {tally.cases} cases, "
                                f"{tally.foreign_count} foreign, {tally.seconds:.1f} s: "
                                f"{outcomes}")


FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_the_seeds_are_valid_for_every_target():
    """(Strict call sites too: the seeds reference their callees only by calls.)"""
    seeds = fuzz.seed_objects()
    assert len(seeds) >= 8
    for seed in seeds:
        assert seed.return_addresses and seed.layout.relas and seed.layout.symtab
        for target in targets():
            assert target.run(seed, seed.data, 0).kind == "valid", (target.name, seed.name)


@settings(max_examples=2500, **FUZZ)
@given(seed=st.integers(0, 255), object_edits=edits(BYTE_EDITS), choice=st.integers(0, 1 << 12))
def test_byte_mutations(seed, object_edits, choice):
    check_every_target(seed, object_edits, choice)


@settings(max_examples=1500, **FUZZ)
@given(seed=st.integers(0, 255), object_edits=edits(HEADER_EDITS), choice=st.integers(0, 1 << 12))
def test_corrupt_headers_and_section_names(seed, object_edits, choice):
    check_every_target(seed, object_edits, choice)


@settings(max_examples=1500, **FUZZ)
@given(seed=st.integers(0, 255), object_edits=edits(TABLE_EDITS), choice=st.integers(0, 1 << 12))
def test_corrupt_symbols_strings_and_relocations(seed, object_edits, choice):
    check_every_target(seed, object_edits, choice)


@settings(max_examples=500, **FUZZ)
@given(seed=st.integers(0, 255), object_edits=edits(max_size=8), choice=st.integers(0, 1 << 12))
def test_every_kind_of_edit_together(seed, object_edits, choice):
    check_every_target(seed, object_edits, choice)


@pytest.mark.slow
@settings(max_examples=100_000, **FUZZ)
@given(seed=st.integers(0, 255), object_edits=edits(max_size=6), choice=st.integers(0, 1 << 12))
def test_100k_mutated_objects(seed, object_edits, choice):
    check_every_target(seed, object_edits, choice)


# --------------------------------------------------------------------------
# Errors name what is wrong and where
# --------------------------------------------------------------------------

def _u(data, at, fmt, value):
    struct.pack_into(fmt, data, at, value)


def _past_the_end(data, layout):
    """e_shoff (object offset 40) points past the end of the object."""
    _u(data, 40, "<Q", len(data))
    return 40, "the section header table at 0x[0-9a-f]+ lies past the end"


def _name_outside_the_table(data, layout):
    """.text's sh_name is far outside the section-name table (pyelftools
    raised OverflowError from parse_cstring_from_stream here)."""
    text = next(s for s in layout.sections if s.name == ".text")
    _u(data, text.header_offset, "<I", 0xFFFF_FFFF)
    return text.header_offset, "section 2's name starts at 0xffffffff, outside its string table"


def _bytes_past_the_end(data, layout):
    """.text's sh_size reaches past the end of the object."""
    text = next(s for s in layout.sections if s.name == ".text")
    _u(data, text.header_offset + 32, "<Q", len(data))
    return text.header_offset + 24, "section 2's bytes .* lie past the end"


def _symbol_in_no_section(data, layout):
    """Symbol 1's st_shndx names a section that does not exist."""
    at = layout.symtab.offset + 24
    _u(data, at + 6, "<H", layout.shnum + 3)
    return at + 6, f"symbol 1 is in section {layout.shnum + 3}, which does not exist"


def _relocation_of_no_symbol(data, layout):
    """The first relocation of .rela.eh_frame refers to symbol 0xffff (pyelftools'
    callers met AttributeError/IndexError here)."""
    rela = next(s for s in layout.relas if s.name == ".rela.eh_frame")
    _u(data, rela.offset + 12, "<I", 0xFFFF)
    return rela.offset + 12, "relocation 0 of .rela.eh_frame refers to symbol 65535"


def _relocations_linked_to_a_string_table(data, layout):
    """.rela.eh_frame's sh_link names the string table, not the symbol table
    (pyelftools' callers met AttributeError: no get_symbol)."""
    rela = next(s for s in layout.relas if s.name == ".rela.eh_frame")
    _u(data, rela.header_offset + 40, "<I", layout.strtab.index)
    return rela.header_offset + 40, (r"relocation section 8 \(\.rela\.eh_frame\) links section 1, "
                                     "which is not the symbol table")


@pytest.mark.parametrize("corrupt", [_past_the_end, _name_outside_the_table, _bytes_past_the_end,
                                     _symbol_in_no_section, _relocation_of_no_symbol,
                                     _relocations_linked_to_a_string_table],
                         ids=lambda f: f.__name__.strip("_"))
def test_each_reader_says_what_is_wrong_and_where(corrupt):
    seed = fuzz.seed_objects()[0]
    data = bytearray(seed.data)
    offset, reason = corrupt(data, seed.layout)
    data = bytes(data)

    with pytest.raises(unwinder.ObjectFormatError, match=reason) as unwound:
        unwinder.AddressSpace().add_code_object(data, seed.load_addresses, name="jit")
    assert unwound.value.offset == offset
    assert isinstance(unwound.value, unwinder.ModuleError)

    with pytest.raises(deopt.ObjectFormatError, match=reason) as mapped:
        ObjectImage(data, seed.load_addresses, name="jit")
    assert mapped.value.offset == offset
    assert isinstance(mapped.value.__cause__, unwinder.ObjectFormatError)

    machine = Machine()
    regions = list(machine.regions)
    with pytest.raises(osrjit.ObjectFormatError, match="cannot read object: jit: " + reason) as loaded:
        machine.load_object(data, name="jit")
    assert loaded.value.offset == offset and isinstance(loaded.value, osrjit.EmulationError)
    assert machine.regions == regions


def test_a_load_that_fails_late_unmaps_what_it_mapped():
    """An undefined symbol is found after the sections and the GOT were
    placed: their mappings are given back, and nothing is registered with
    the unwinder."""
    seed = next(s for s in fuzz.seed_objects() if s.name.startswith("g-O2-slot"))
    machine = Machine()
    machine.space
    before = (list(machine.regions), len(machine.space.modules), len(machine.objects))
    with pytest.raises(osrjit.EmulationError, match="undefined symbol 'osrjit_safepoint_flag'"):
        machine.load_object(seed.data, {"osrjit_hook": 0x1000}.get, name="g")
    assert (list(machine.regions), len(machine.space.modules), len(machine.objects)) == before
