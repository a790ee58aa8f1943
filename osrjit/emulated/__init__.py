"""The emulated backend: osrjit's code running on a unicorn x86-64 CPU.

* :mod:`.backend` — :class:`~.backend.EmulatedBackend`, the
  :class:`osrjit.backend.Backend` that runs versions on the emulated CPU;
* :mod:`.runtime` — :class:`~.runtime.EmulatedRuntime`, what
  ``osrjit.Runtime(backend="emulated")`` returns: an :class:`osrjit.Runtime`
  with the emulator's controls (spawn, run, checked invariants);
* :mod:`.loader` — ELF relocatable objects into emulated memory
  (:func:`~.loader.load_object`, :class:`~.loader.LoadedObject`);
* :mod:`.machine` — one address space with hypercalls, threads and a
  deterministic scheduler (:class:`~.machine.Machine`);
* :mod:`.program` — reference-language functions with the runtime services
  (:class:`~.program.EmulatedProgram`);
* :mod:`.cfi_validator` — checks the unwinder against a shadow call stack at
  every instruction (:func:`~.cfi_validator.validate`).

Layering: this package uses :mod:`osrjit`'s core, :mod:`deopt` and
:mod:`unwinder`; ``osrjit.Runtime`` finds it through ``Runtime.__new__``
(``backend="emulated"``).
"""
from ..errors import EmulationError, EmulationFault, ObjectFormatError
from .backend import EmulatedBackend, EmulatedFunction, OldCodeFetch
from .loader import LoadedObject, load_object
from .machine import EmuThread, Machine, Scheduler, ThreadState
from .program import EmulatedProgram, EmuVersion
from .runtime import EmulatedRuntime

__all__ = ["EmulationError", "EmulationFault", "ObjectFormatError", "LoadedObject", "load_object", "Machine",
           "EmuThread", "Scheduler", "ThreadState", "EmulatedProgram", "EmuVersion",
           "EmulatedRuntime", "EmulatedBackend", "EmulatedFunction", "OldCodeFetch"]
