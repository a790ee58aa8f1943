"""osrjit's benchmarks, shipped in the package: ``python -m osrjit bench [--quick] [--json PATH]``.

:mod:`.suite` runs every part in a child process and merges the figures; each
part is a module runnable on its own (``python -m osrjit.bench.stw --help``):

* :mod:`.native_walk` — walking the same stacks: Python walker, native walker, glibc;
* :mod:`.deopt` — returning through 100,000 deopt stubs against plain returns;
* :mod:`.steady` — the call mechanism after a replacement against a fresh compile;
* :mod:`.stw` — the stop-the-world pause against glibc ``backtrace()`` of the same stacks;
* :mod:`.memory` — RSS over many replace cycles;
* :mod:`.unwind` — ``unwinder.backtrace()`` against glibc (not in the suite).

Importing this package imports nothing else; the parts import llvmlite and
the runtime when they run.
"""
