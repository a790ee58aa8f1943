"""Capture the calling thread's registers and walk while they are still valid.

A register state is only worth walking while the frames it describes are
still on the stack: once a ctypes call returns, its native frames are popped
and the next calls overwrite them. So the capture code (55 bytes of x86-64 in
its own executable page, called through ctypes) stores the state of the
native frame that called it and then *calls back* into Python with that
state; the walk runs inside the callback, above a stack that stays put::

    mov [rdi+3*8],  rbx        ; DWARF 3
    mov [rdi+6*8],  rbp        ; DWARF 6
    lea rax, [rsp+8]
    mov [rdi+7*8],  rax        ; DWARF 7: RSP after return
    mov [rdi+12*8], r12        ; DWARF 12..15
    mov [rdi+13*8], r13
    mov [rdi+14*8], r14
    mov [rdi+15*8], r15
    mov rax, [rsp]
    mov [rdi+16*8], rax        ; DWARF 16: the return address
    sub rsp, 8                 ; RSP ≡ 0 (mod 16) at the call (psABI §3.2.2)
    call rsi                   ; callback(regs) — rdi still points at the file
    add rsp, 8
    ret

The stub's own frame lies below the captured state and is never walked, so it
needs no CFI; the walk starts at its caller (libffi's ``ffi_call_unix64``
when called from Python), a *caller* frame looked up at ``return address − 1``.
"""
import ctypes
import mmap
import threading

from .memory import ProcessMemory
from .x86_64 import CALLEE_SAVED, RA, RSP

_CAPTURE_CODE = bytes.fromhex(
    "48895f18"          # mov [rdi+0x18], rbx
    "48896f30"          # mov [rdi+0x30], rbp
    "488d442408"        # lea rax, [rsp+8]
    "48894738"          # mov [rdi+0x38], rax
    "4c896760"          # mov [rdi+0x60], r12
    "4c896f68"          # mov [rdi+0x68], r13
    "4c897770"          # mov [rdi+0x70], r14
    "4c897f78"          # mov [rdi+0x78], r15
    "488b0424"          # mov rax, [rsp]
    "488987" "80000000"  # mov [rdi+0x80], rax
    "4883ec08"          # sub rsp, 8
    "ffd6"              # call rsi
    "4883c408"          # add rsp, 8
    "c3"                # ret
)


class RegisterFile(ctypes.Structure):
    """17 little-endian u64 slots indexed by DWARF register number (0..16).

    This layout must match the stub's store offsets (DWARF number × 8 bytes).
    """
    _fields_ = [("r", ctypes.c_uint64 * 17)]


assert ctypes.sizeof(RegisterFile) == 17 * 8  # the stub writes up to offset 0x80 + 8

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.POINTER(RegisterFile))
_lock = threading.Lock()
_capture_fn = None
_code_page = None


def _capture_function():
    """The stub as a ctypes function (created once, lives as long as the process)."""
    global _capture_fn, _code_page
    with _lock:
        if _capture_fn is None:
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page.write(_CAPTURE_CODE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            _code_page = page
            # PYFUNCTYPE: the GIL stays with this thread into the callback
            # (a CFUNCTYPE call would give it away and take it back twice).
            _capture_fn = ctypes.PYFUNCTYPE(None, ctypes.POINTER(RegisterFile), _CALLBACK)(address)
        return _capture_fn


def with_captured_registers(fn):
    """Call ``fn(regs)`` while the native frame that called the capture stub is live.

    ``regs`` maps DWARF register numbers to values: RIP (16, a return address
    into that frame), RSP (7) and the callee-saved RBX, RBP, R12–R15. Every
    frame from there down to the thread's first frame stays intact until
    ``fn`` returns; returns what ``fn`` returned. Exceptions propagate.
    """
    out = {}

    def callback(p):
        r = p.contents.r
        regs = {reg: r[reg] for reg in (RA, RSP) + CALLEE_SAVED}
        try:
            out["value"] = fn(regs)
        except BaseException as e:  # never let an exception unwind through the stub
            out["error"] = e

    _capture_function()(ctypes.byref(RegisterFile()), _CALLBACK(callback))
    if "error" in out:
        raise out["error"]
    return out["value"]


def backtrace(space=None, skip=0, *, max_frames=None):
    """Frames of the calling thread, innermost first.

    Starts at the native frame that called the capture stub (on CPython:
    libffi's ``ffi_call_unix64``), then libffi, libpython, any JIT frames
    below, libc, down to ``_start`` or ``clone3``. ``skip`` drops that many
    innermost frames. ``space`` defaults to
    :meth:`AddressSpace.current_process`.
    """
    from .space import AddressSpace
    from .walk import DEFAULT_MAX_FRAMES, walk
    if space is None:
        space = AddressSpace.current_process()

    def walk_now(regs):
        # The registers describe a caller frame (RIP is a return address).
        return list(walk(regs, ProcessMemory(page_cache=True), space,
                         max_frames=max_frames or DEFAULT_MAX_FRAMES, caller_frame=True))

    return with_captured_registers(walk_now)[skip:]
