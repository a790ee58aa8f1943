"""The emulated backend: osrjit's code running on a unicorn x86-64 CPU.

* :mod:`.runtime` — :class:`~.runtime.EmulatedRuntime`, what
  ``osrjit.Runtime(backend="emulated")`` returns: the same versions, deopt
  stub, hijack and transfer as the native runtime, with checked invariants;
* :mod:`.loader` — ELF relocatable objects into emulated memory
  (:func:`~.loader.load_object`, :class:`~.loader.LoadedObject`);
* :mod:`.machine` — one address space with hypercalls, threads and a
  deterministic scheduler (:class:`~.machine.Machine`);
* :mod:`.program` — reference-language functions with the runtime services
  (:class:`~.program.EmulatedProgram`);
* :mod:`.cfi_validator` — checks the unwinder against a shadow call stack at
  every instruction (:func:`~.cfi_validator.validate`).

Layering: this package may use :mod:`osrjit`, :mod:`deopt` and
:mod:`unwinder`; of them only ``osrjit.Runtime.__new__`` imports it (lazily,
for ``backend="emulated"``).
"""
from .loader import EmulationError, LoadedObject, load_object
from .machine import EmulationFault, EmuThread, Machine, Scheduler, ThreadState
from .program import EmulatedProgram, EmuVersion
from .runtime import EmulatedFunction, EmulatedRuntime, OldCodeFetch

__all__ = ["EmulationError", "EmulationFault", "LoadedObject", "load_object", "Machine",
           "EmuThread", "Scheduler", "ThreadState", "EmulatedProgram", "EmuVersion",
           "EmulatedRuntime", "EmulatedFunction", "OldCodeFetch"]
