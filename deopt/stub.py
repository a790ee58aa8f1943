"""The deopt stub: where a hijacked return lands, and the layouts it shares with Python.

A frame of an old version is suspended at a call site; its return address
sits in a stack slot (its callee's ``ra_slot``). Hijacking writes
:data:`STUB_SYMBOL`'s address there. When the callee returns, ``ret`` pops the
stub address and the stub runs with ``RSP = E``, the old frame's RSP right
after the call (``E − 8`` is the slot), ``RAX``/``XMM0`` holding the call's
result and the callee-saved registers holding the old frame's values.

The stub is written as a *callee of the old frame*: its CFA is ``E`` and its
return address is in the slot (``CFA − 8``), so once the transfer has put the
original return address back into the slot, libgcc, gdb and
:mod:`unwinder` unwind through the stub into the old frame and on to its
callers. It is re-entrant: everything lives on the stack or in per-thread
buffers, nothing in globals.

A walker that meets a hijacked slot sees the stub's address as a return
address and looks it up at ``stub − 1``: one ``nop`` before the entry, inside
the FDE, whose row says "return address undefined", so libgcc and gdb stop
there cleanly instead of looping (:mod:`unwinder` walks on: the runtime's
return-address filter gives it the original address).

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
word, see :mod:`osrjit.threads`) and jumps to ``plan.rip`` — held in R11 from
before that store, so a thread stopped by a signal between the store and the
jump shows its target in its registers (the runtime keeps that version): a version's resume entry (``rdi`` = site id,
``rsi`` = state), or :data:`RETURN_SYMBOL` (a lone ``ret``) to return into the
original address when no transfer is possible.
"""
import ctypes

#: The stub's entry: the value written into hijacked return-address slots.
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
    """The block the stub pushes. Must match the stub's pushes (asserted below)."""
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
    """What the stub loads before ``mov rsp, plan.rsp; jmp *plan.rip``.

    Must match the stub's loads (offsets asserted below).
    """
    _fields_ = [
        ("rsp", ctypes.c_uint64),    # 0
        ("rip", ctypes.c_uint64),    # 8
        ("rdi", ctypes.c_uint64),    # 16
        ("rsi", ctypes.c_uint64),    # 24
        ("rax", ctypes.c_uint64),    # 32
        ("rbx", ctypes.c_uint64),    # 40
        ("rbp", ctypes.c_uint64),    # 48
        ("r12", ctypes.c_uint64),    # 56
        ("r13", ctypes.c_uint64),    # 64
        ("r14", ctypes.c_uint64),    # 72
        ("r15", ctypes.c_uint64),    # 80
        ("status_ptr", ctypes.c_uint64),  # 88: the stub stores STATUS_RESUMED here
        ("xmm0", ctypes.c_uint8 * 16),  # 96
    ]


# "This must match the stub" (LuaJIT's ExitState rule), checked at import.
assert ctypes.sizeof(ExitState) == EXIT_STATE_TO_ENTRY_RSP
assert [ExitState.xmm0.offset, ExitState.r15.offset, ExitState.rbx.offset,
        ExitState.rax.offset, ExitState.slot.offset] == [0, 16, 56, 64, 72]
assert ctypes.sizeof(TransferPlan) == 112
assert [TransferPlan.rsp.offset, TransferPlan.rip.offset, TransferPlan.rdi.offset,
        TransferPlan.rsi.offset, TransferPlan.rax.offset, TransferPlan.rbx.offset,
        TransferPlan.rbp.offset, TransferPlan.r12.offset, TransferPlan.r15.offset,
        TransferPlan.xmm0.offset] == [0, 8, 16, 24, 32, 40, 48, 56, 80, 96]

TRANSFER_FUNCTION_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ExitState))

# AT&T syntax; every push has its CFI so unwinders see the old frame's
# callee-saved registers in the block.
_STUB_ASM = f"""
.text
.globl {STUB_SYMBOL}
.globl {RETURN_SYMBOL}
.p2align 4
osrjit_deopt_stub_pad:
.cfi_startproc
.cfi_undefined %rip
nop
.type {STUB_SYMBOL},@function
{STUB_SYMBOL}:
.cfi_def_cfa_offset 0
.cfi_offset %rip, -8
subq $8, %rsp
.cfi_def_cfa_offset 8
pushq %rax
.cfi_def_cfa_offset 16
pushq %rbx
.cfi_def_cfa_offset 24
.cfi_offset %rbx, -24
pushq %rbp
.cfi_def_cfa_offset 32
.cfi_offset %rbp, -32
pushq %r12
.cfi_def_cfa_offset 40
.cfi_offset %r12, -40
pushq %r13
.cfi_def_cfa_offset 48
.cfi_offset %r13, -48
pushq %r14
.cfi_def_cfa_offset 56
.cfi_offset %r14, -56
pushq %r15
.cfi_def_cfa_offset 64
.cfi_offset %r15, -64
subq $16, %rsp
.cfi_def_cfa_offset 80
movdqu %xmm0, (%rsp)
movq %rsp, %rdi
movq {TRANSFER_CELL_SYMBOL}@GOTPCREL(%rip), %r11
callq *(%r11)
movq %rax, %r11
movdqu 96(%r11), %xmm0
movq 32(%r11), %rax
movq 40(%r11), %rbx
movq 48(%r11), %rbp
movq 56(%r11), %r12
movq 64(%r11), %r13
movq 72(%r11), %r14
movq 80(%r11), %r15
movq 16(%r11), %rdi
movq 24(%r11), %rsi
movq 88(%r11), %r10
movq 0(%r11), %rsp
.cfi_def_cfa %rsp, 8
.cfi_restore %rbx
.cfi_restore %rbp
.cfi_restore %r12
.cfi_restore %r13
.cfi_restore %r14
.cfi_restore %r15
movq 8(%r11), %r11
movq ${STATUS_RESUMED}, (%r10)
jmpq *%r11
{RETURN_SYMBOL}:
retq
.cfi_endproc
.size {STUB_SYMBOL}, .-{STUB_SYMBOL}
"""


def stub_module_ir(triple):
    """Textual LLVM IR of a module holding only the stub (``module asm``).

    Emit it as an object (PIC, small code model) and link it with
    :data:`TRANSFER_CELL_SYMBOL` imported as the address of a pointer-sized
    cell holding the transfer function's address.
    """
    lines = [f'target triple = "{triple}"']
    for line in _STUB_ASM.strip().splitlines():
        lines.append('module asm "' + line.replace("\\", "\\\\").replace('"', '\\22') + '"')
    lines.append(f"@{TRANSFER_CELL_SYMBOL} = external global ptr")
    return "\n".join(lines) + "\n"
