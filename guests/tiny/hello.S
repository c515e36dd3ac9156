/* Prints a line and exits with status 42. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp              /* a stack in low RAM */
        mov $msg, %esi
        call puts
        mov $42, %al
        call exit
        .section .rodata
msg:    .asciz "Hello from the tiny guest\n"
