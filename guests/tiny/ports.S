/* Reads an unmapped port and the UART's line status, writes an unmapped
 * port, prints what it read and exits with status 7. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp              /* a stack in low RAM */
        mov $0x1234, %dx
        mov $0x55, %al
        out %al, %dx                    /* unmapped write: ignored */
        xor %eax, %eax
        in %dx, %al                     /* unmapped read: 0xff */
        mov %eax, %ebx
        mov $0x3fd, %dx
        xor %eax, %eax
        in %dx, %al                     /* LSR: 0x60 when idle */
        push %eax
        mov $m_unmapped, %esi
        call puts
        mov %ebx, %eax
        call puthex
        mov $m_lsr, %esi
        call puts
        pop %eax
        call puthex
        mov $'\n', %al
        call putc
        mov $7, %al
        call exit
        .section .rodata
m_unmapped: .asciz "unmapped="
m_lsr:      .asciz "\nlsr="
