/* Prints a line, then spins forever (for signal and pinning tests). */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp
        mov $msg, %esi
        call puts
1:      pause
        jmp 1b
        .section .rodata
msg:    .asciz "spinning\n"
