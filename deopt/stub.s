# The deopt stub (deopt/stub.py renders this file; AT&T syntax). Entered by
# a per-site stub's jump (or the `ret` of a hijacked callee) with RSP = E (the
# CFA: the old frame's RSP after its call). It pushes an ExitState below E, field by field: once a
# field is pushed, the CFA is RSP + EXIT_STATE_BYTES - the field's offset,
# and a register saved there lies at CFA + its offset - EXIT_STATE_BYTES.
# Every push has its CFI, so unwinders see the old frame's callee-saved
# registers in the block.
.text
.globl ${STUB}
.globl ${RETURN}
.p2align 4
${STUB}_pad:
.cfi_startproc
.cfi_undefined %rip
nop
.type ${STUB},@function
${STUB}:
.cfi_def_cfa_offset 0
.cfi_offset %rip, ${ExitState.slot@}-${EXIT_STATE_BYTES}
subq $8, %rsp
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.slot@}
pushq %rax
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.rax@}
pushq %rbx
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.rbx@}
.cfi_offset %rbx, ${ExitState.rbx@}-${EXIT_STATE_BYTES}
pushq %rbp
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.rbp@}
.cfi_offset %rbp, ${ExitState.rbp@}-${EXIT_STATE_BYTES}
pushq %r12
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.r12@}
.cfi_offset %r12, ${ExitState.r12@}-${EXIT_STATE_BYTES}
pushq %r13
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.r13@}
.cfi_offset %r13, ${ExitState.r13@}-${EXIT_STATE_BYTES}
pushq %r14
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.r14@}
.cfi_offset %r14, ${ExitState.r14@}-${EXIT_STATE_BYTES}
pushq %r15
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.r15@}
.cfi_offset %r15, ${ExitState.r15@}-${EXIT_STATE_BYTES}
subq $16, %rsp
.cfi_def_cfa_offset ${EXIT_STATE_BYTES}-${ExitState.xmm0@}
movdqu %xmm0, ${ExitState.xmm0@}(%rsp)
# RSP = the ExitState: TransferPlan *transfer(ExitState *) through the cell.
movq %rsp, %rdi
movq ${TRANSFER_CELL}@GOTPCREL(%rip), %r11
callq *(%r11)
movq %rax, %r11
movdqu ${TransferPlan.xmm0@}(%r11), %xmm0
movq ${TransferPlan.rax@}(%r11), %rax
movq ${TransferPlan.rbx@}(%r11), %rbx
movq ${TransferPlan.rbp@}(%r11), %rbp
movq ${TransferPlan.r12@}(%r11), %r12
movq ${TransferPlan.r13@}(%r11), %r13
movq ${TransferPlan.r14@}(%r11), %r14
movq ${TransferPlan.r15@}(%r11), %r15
movq ${TransferPlan.rdi@}(%r11), %rdi
movq ${TransferPlan.rsi@}(%r11), %rsi
movq ${TransferPlan.status_ptr@}(%r11), %r10
movq ${TransferPlan.rsp@}(%r11), %rsp
.cfi_def_cfa %rsp, 8
.cfi_restore %rbx
.cfi_restore %rbp
.cfi_restore %r12
.cfi_restore %r13
.cfi_restore %r14
.cfi_restore %r15
# The target goes into R11 before the status store: a thread stopped by a
# signal between the store and the jump shows it in its registers.
movq ${TransferPlan.rip@}(%r11), %r11
movq $${STATUS_RESUMED}, (%r10)
jmpq *%r11
${RETURN}:
retq
.cfi_endproc
.size ${STUB}, .-${STUB}
