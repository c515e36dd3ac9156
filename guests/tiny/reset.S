/* Prints a line, then resets the machine through the i8042 (what Linux's
 * reboot=k does): vmrun -no-reboot exits 0; without it the guest boots again. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp
        mov $msg, %esi
        call puts
        mov $0x64, %dx
        mov $0xfe, %al
        out %al, %dx
1:      hlt
        jmp 1b
        .section .rodata
msg:    .asciz "booting\n"
