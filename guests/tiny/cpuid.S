/* Prints the CPUID vendor, brand string and leaf 1 EAX/EBX, exits 0. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp              /* a stack in low RAM */
        mov $m_vendor, %esi
        call puts
        xor %eax, %eax
        cpuid
        mov %ebx, buf
        mov %edx, buf+4
        mov %ecx, buf+8
        movb $0, buf+12
        mov $buf, %esi
        call puts
        mov $m_brand, %esi
        call puts
        mov $0x80000002, %edi
        mov $buf, %ebp
4:      mov %edi, %eax
        cpuid
        mov %eax, (%ebp)
        mov %ebx, 4(%ebp)
        mov %ecx, 8(%ebp)
        mov %edx, 12(%ebp)
        add $16, %ebp
        inc %edi
        cmp $0x80000005, %edi
        jne 4b
        movb $0, (%ebp)
        mov $buf, %esi
        call puts
        mov $m_l1, %esi
        call puts
        mov $1, %eax
        cpuid
        push %ebx
        call puthex
        mov $' ', %al
        call putc
        pop %eax
        call puthex
        mov $'\n', %al
        call putc
        xor %eax, %eax
        call exit
        .section .rodata
m_vendor: .asciz "vendor="
m_brand:  .asciz "\nbrand="
m_l1:     .asciz "\nleaf1="
        .bss
buf:    .skip 64
