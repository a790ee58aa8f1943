"""The deopt stub: where a hijacked return lands, and the layouts it shares with Python.

A frame of an old version is suspended at a call site; its return address
sits in a stack slot (its callee's ``ra_slot``). Hijacking writes the address
of that site's return stub (:mod:`deopt.sitestubs`, whose CFI is the old
frame's row there) into the slot; the site stub jumps here. So when the
callee returns, the stub runs with ``RSP = E``, the old frame's RSP right
after the call (``E − 8`` is the slot), ``RAX``/``XMM0`` holding the call's
result, the callee-saved registers holding the old frame's values and R11
clobbered.

The stub is written as a *callee of the old frame*: its CFA is ``E`` and its
return address is in the slot (``CFA − 8``). The slot holds the site stub
until the transfer puts the original return address back, and either one
unwinds into the old frame's caller exactly as the old frame would, so
libgcc, gdb and :mod:`unwinder` walk through this stub at every instruction.
It is re-entrant: everything lives on the stack or in per-thread buffers,
nothing in globals.

A return address without a site stub (its version has no CFI row there)
gets this stub's own address written into its slot; a walker looks that up
at ``stub − 1``: one ``nop`` before the entry, inside the FDE, whose row
says "return address undefined", so libgcc and gdb stop there cleanly
instead of looping (:mod:`unwinder` walks on: the runtime's return-address
filter gives it the original address).

Layout of the saved block (:class:`ExitState`, at ``RSP = E − 80`` when the
transfer function is called; 16-byte aligned because ``E`` is — RSP was
16-byte aligned at the old frame's ``call``)::

    E − 80  xmm0 (16 bytes)        E − 40  r12
    E − 64  r15                    E − 32  rbp
    E − 56  r14                    E − 24  rbx
    E − 48  r13                    E − 16  rax
                                   E − 8   the slot (stub address until restored)

The transfer function, ``TransferPlan* transfer(ExitState*)``, is called
through the cell :data:`TRANSFER_CELL_SYMBOL` (so a native transfer can later
replace the Python one). It returns a plan; the stub loads every register
from it, sets ``RSP = plan.rsp`` — where a return address now sits on top —
stores :data:`STATUS_RESUMED` at ``plan.status_ptr`` (the thread's status
word, see :mod:`osrjit.native.threads`) and jumps to ``plan.rip`` — held in R11 from
before that store, so a thread stopped by a signal between the store and the
jump shows its target in its registers (the runtime keeps that version): a version's resume entry (``rdi`` = site id,
``rsi`` = state), or :data:`RETURN_SYMBOL` (a lone ``ret``) to return into the
original address when no transfer is possible.
"""
import ctypes

from unwinder import nativesrc

#: The stub's entry: where the per-site stubs jump (and the value written
#: into a hijacked slot whose return address has none).
STUB_SYMBOL = "osrjit_deopt_stub"
#: A ``ret`` inside the stub's FDE, used to return into old code after all.
RETURN_SYMBOL = "osrjit_deopt_return"
#: ``external global ptr`` — holds the address of the transfer function.
TRANSFER_CELL_SYMBOL = "osrjit_deopt_transfer_cell"

#: Value the stub stores at ``plan.status_ptr`` once RSP points at the rebuilt
#: frame (or back at the original return address): the thread's status word
#: becomes "running JIT code" only when no half-transferred frame is left.
STATUS_RESUMED = 1

#: Bytes between the saved block and ``E`` (the RSP the stub was entered with).
EXIT_STATE_TO_ENTRY_RSP = 80


class ExitState(ctypes.Structure):
    """The block the stub pushes, lowest address first. The pushes in
    ``stub.s`` are written by hand (its CFI takes these offsets): asserted below."""
    _fields_ = [
        ("xmm0", ctypes.c_uint8 * 16),
        ("r15", ctypes.c_uint64),
        ("r14", ctypes.c_uint64),
        ("r13", ctypes.c_uint64),
        ("r12", ctypes.c_uint64),
        ("rbp", ctypes.c_uint64),
        ("rbx", ctypes.c_uint64),
        ("rax", ctypes.c_uint64),
        ("slot", ctypes.c_uint64),
    ]


class TransferPlan(ctypes.Structure):
    """What the stub loads before ``mov rsp, plan.rsp; jmp *plan.rip``
    (``stub.s`` takes the offsets from here)."""
    _fields_ = [
        ("rsp", ctypes.c_uint64),
        ("rip", ctypes.c_uint64),
        ("rdi", ctypes.c_uint64),
        ("rsi", ctypes.c_uint64),
        ("rax", ctypes.c_uint64),
        ("rbx", ctypes.c_uint64),
        ("rbp", ctypes.c_uint64),
        ("r12", ctypes.c_uint64),
        ("r13", ctypes.c_uint64),
        ("r14", ctypes.c_uint64),
        ("r15", ctypes.c_uint64),
        ("status_ptr", ctypes.c_uint64),  # the stub stores STATUS_RESUMED here
        ("xmm0", ctypes.c_uint8 * 16),
    ]


# "This must match the stub" (LuaJIT's ExitState rule), checked at import:
# from E down the stub makes room for the slot (8 bytes), pushes RAX, RBX,
# RBP, R12-R15 (8 each) and makes room for XMM0 (16).
assert [(name, getattr(ExitState, name).offset) for name, _ in ExitState._fields_] == [
    ("xmm0", 0), ("r15", 16), ("r14", 24), ("r13", 32), ("r12", 40), ("rbp", 48),
    ("rbx", 56), ("rax", 64), ("slot", 72)]
assert ctypes.sizeof(ExitState) == EXIT_STATE_TO_ENTRY_RSP
nativesrc.check_layout(TransferPlan)

TRANSFER_FUNCTION_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ExitState))


def stub_asm():
    """The stub's AT&T assembly (``stub.s``), rendered: offsets from
    :class:`ExitState` and :class:`TransferPlan`, the symbols and
    :data:`STATUS_RESUMED` from this module."""
    return nativesrc.render_file(__package__, "stub.s", structs=[ExitState, TransferPlan],
                                 type_header=False, values={
                                     "STUB": STUB_SYMBOL, "RETURN": RETURN_SYMBOL,
                                     "TRANSFER_CELL": TRANSFER_CELL_SYMBOL,
                                     "STATUS_RESUMED": STATUS_RESUMED,
                                     "EXIT_STATE_BYTES": EXIT_STATE_TO_ENTRY_RSP})


NATIVE_SOURCES = {"stub.s": stub_asm}


def stub_module_ir(triple):
    """Textual LLVM IR of a module holding only the stub (``module asm``).

    Emit it as an object (PIC, small code model) and link it with
    :data:`TRANSFER_CELL_SYMBOL` imported as the address of a pointer-sized
    cell holding the transfer function's address.
    """
    return (f'target triple = "{triple}"\n' + nativesrc.module_asm(stub_asm())
            + f"@{TRANSFER_CELL_SYMBOL} = external global ptr\n")
