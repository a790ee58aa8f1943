"""DWARF register numbers for x86-64 (System V psABI, Figure 3.36 "DWARF Register Number Mapping").

Constants only. The numbering is *not* the hardware encoding order: DWARF
swaps RDX/RCX and RBX relative to the ModRM encoding (RAX=0, RDX=1, RCX=2,
RBX=3), and the return address has its own column, 16, which the psABI names
"Return Address RA" and which the CIEs of GCC and LLVM on Linux use as their
``return_address_register``.

Facts the walker relies on (psABI §3.7 and §6.2):

* The CFA is the value RSP had in the caller just before the ``call``
  instruction, so the caller's RSP is the CFA itself; CFI normally has no
  rule for column 7.
* The return address is saved at CFA-8 on entry to every function
  (the CIE's initial instructions say ``DW_CFA_offset r16, 1`` with a data
  alignment factor of -8).
"""

RAX = 0
RDX = 1
RCX = 2
RBX = 3
RSI = 4
RDI = 5
RBP = 6
RSP = 7
R8 = 8
R9 = 9
R10 = 10
R11 = 11
R12 = 12
R13 = 13
R14 = 14
R15 = 15
#: The return-address column (the psABI's "RA"); unwinders read RIP of the
#: caller from it.
RA = 16
RIP = RA

#: DWARF register number of the first SSE register; XMM0..XMM15 are 17..32.
XMM0 = 17

#: Registers a callee must preserve (psABI §3.2.1), as DWARF register numbers.
CALLEE_SAVED = (RBX, RBP, R12, R13, R14, R15)

#: Address size of the architecture, in bytes (DW_EH_PE_absptr width).
ADDRESS_SIZE = 8

#: DWARF register number -> lower-case name, as binutils ``readelf`` prints it.
REGISTER_NAMES = {
    RAX: "rax", RDX: "rdx", RCX: "rcx", RBX: "rbx",
    RSI: "rsi", RDI: "rdi", RBP: "rbp", RSP: "rsp",
    R8: "r8", R9: "r9", R10: "r10", R11: "r11",
    R12: "r12", R13: "r13", R14: "r14", R15: "r15",
    RIP: "rip",
    **{XMM0 + i: f"xmm{i}" for i in range(16)},
}

#: Name -> DWARF register number (inverse of :data:`REGISTER_NAMES`).
REGISTER_NUMBERS = {name: regno for regno, name in REGISTER_NAMES.items()}

