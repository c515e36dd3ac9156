/* Reads the PVH start info: prints the number of e820 entries, the total
 * RAM (type 1) in MiB and the command line, then exits 0. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp              /* a stack in low RAM */
        mov %ebx, %ebp                  /* hvm_start_info */
        mov $m_magic, %esi
        call puts
        mov (%ebp), %eax
        call puthex
        mov $m_entries, %esi
        call puts
        mov 48(%ebp), %ecx              /* memmap_entries */
        mov %ecx, %eax
        call puthex
        mov 40(%ebp), %edi              /* memmap_paddr (low 32 bits) */
        xor %eax, %eax                  /* total in MiB */
5:      cmpl $1, 16(%edi)               /* type == RAM */
        jne 6f
        mov 8(%edi), %edx               /* size low */
        shr $20, %edx
        add %edx, %eax
        mov 12(%edi), %edx              /* size high: 4 GiB units */
        shl $12, %edx
        add %edx, %eax
6:      add $24, %edi
        loop 5b
        mov $m_ram, %esi
        call puts
        call puthex
        mov $m_cmdline, %esi
        call puts
        mov 24(%ebp), %esi              /* cmdline_paddr */
        call puts
        mov $'\n', %al
        call putc
        xor %eax, %eax
        call exit
        .section .rodata
m_magic:   .asciz "magic="
m_entries: .asciz "\ne820="
m_ram:     .asciz "\nram_mib="
m_cmdline: .asciz "\ncmdline="
