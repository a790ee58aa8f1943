# osrjit_save_anchor(ThreadState *ts): store the caller's anchor into ts,
# rendered by osrjit/threads.py. ANCHOR_<reg> is the byte offset of the
# register's slot in the ThreadState (the anchor's offset + 8 x its DWARF
# number). A leaf without a frame: RSP after the return is rsp + 8 and the
# return address is at (%rsp). Clobbers RAX only.
.text
.globl osrjit_save_anchor
.p2align 4
.type osrjit_save_anchor,@function
osrjit_save_anchor:
.cfi_startproc
movq %rbx, ${ANCHOR_RBX}(%rdi)
movq %rbp, ${ANCHOR_RBP}(%rdi)
leaq 8(%rsp), %rax
movq %rax, ${ANCHOR_RSP}(%rdi)
movq %r12, ${ANCHOR_R12}(%rdi)
movq %r13, ${ANCHOR_R13}(%rdi)
movq %r14, ${ANCHOR_R14}(%rdi)
movq %r15, ${ANCHOR_R15}(%rdi)
movq (%rsp), %rax
movq %rax, ${ANCHOR_RIP}(%rdi)
retq
.cfi_endproc
.size osrjit_save_anchor, .-osrjit_save_anchor
