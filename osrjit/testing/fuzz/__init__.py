"""Hostile input for every public entry that takes object bytes or LLVM IR text.

A language runtime feeds osrjit whatever its code generator produces, for as
long as the process lives. Whatever the bytes, each entry must end with its
own package's error or with a valid result, never with an exception from the
libraries underneath (pyelftools, :mod:`struct`, llvmlite) or from a bug of
ours. This package is the harness osrjit's fuzz tests and
``scripts/fuzz_report.py`` share; it decides nothing about how cases are drawn
(Hypothesis in the tests, :class:`random.Random` in the script).
:mod:`.core` holds what every target shares (seed programs, outcomes, counts),
:mod:`.objects` the object side, :mod:`.text` the IR and source side.

Objects (:func:`object_targets`)::

    seed_objects()              complete relocatable objects as LLVM emits them for
                                reference-language functions, with where a JIT put
                                their sections (cached per process)
    mutate(seed, edits)         bytes flipped, set, inserted, deleted, truncated, and
                                aimed at the ELF header, section headers, section-name
                                and symbol string tables, symbols and relocations
                                (offsets from :class:`ElfLayout`, read here with struct)
    run_unwinder(seed, data)    AddressSpace.add_code_object + walks + row lookups
    run_framemaps(seed, data)   ObjectImage + frame_maps_for_object + symbol queries
    ObjectLoader()(seed, data)  the emulated loader (Machine.load_object), then unload
    run_patching(seed, data)    the native backend's direct call sites (patching.call_sites)

Text: :func:`mutate_text` deletes, duplicates and swaps lines, replaces
tokens and flips bytes of LLVM IR (a seed function's ``module_ir``,
:func:`mutate_ir`) or of reference-language source; :func:`run_emit` hands IR
to :func:`osrjit.compiling.emit_object`, :class:`RuntimeCompiler` to
``Runtime.compile_ir`` or ``Runtime.replace`` (run both in a child process:
LLVM may abort), and
:func:`run_source` hands source to :func:`osrjit.lang.compile_source`.

An edit is a triple of non-negative integers ``(kind, where, value)``: ``kind``
indexes :data:`OBJECT_EDITS` (or :data:`TEXT_EDITS`), ``where`` and ``value`` are
reduced modulo whatever they choose from, so any integers are a valid edit and
a failing case is replayed from its edits alone.

Every target returns an :class:`Outcome`: ``"valid"`` or the class name of the
error it ended with, and whether that error is *foreign* (not a subclass of
the target's :attr:`Target.allowed` root).
"""
from .core import SEED_PROGRAMS, Outcome, Tally, Target
from .objects import (FAR_IMPORT, OBJECT_EDITS, ElfLayout, ObjectLoader, SeedObject, mutate,
                      object_targets, random_object_edits, run_framemaps, run_patching,
                      run_unwinder, seed_objects)
from .text import (IR_VOCABULARY, SOURCE_VOCABULARY, TEXT_EDITS, RuntimeCompiler, Vocabulary,
                   mutate_ir, mutate_text, random_text_edits, run_emit, run_source, seed_irs)

__all__ = [
    "SEED_PROGRAMS", "Outcome", "Target", "Tally",
    "SeedObject", "seed_objects", "ElfLayout", "OBJECT_EDITS", "mutate", "random_object_edits",
    "run_unwinder", "run_framemaps", "ObjectLoader", "run_patching", "object_targets",
    "FAR_IMPORT",
    "seed_irs", "Vocabulary", "IR_VOCABULARY", "SOURCE_VOCABULARY", "TEXT_EDITS", "mutate_text",
    "mutate_ir", "random_text_edits", "run_emit", "run_source", "RuntimeCompiler",
]
