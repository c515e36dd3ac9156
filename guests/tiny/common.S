/* Shared pieces of the tiny test guests: a PVH ELF note so vmrun enters
 * _start in 32-bit protected mode, serial/exit helpers, and `check`: jump
 * to `fail` (print "FAILED check N", exit N) unless a condition holds.
 * Registers: EBX holds the PVH hvm_start_info address at entry. */
        .section .note.Xen, "a", @note
        .align 4
        .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

.macro check cond, code
        j\cond 1f
        mov $\code, %al
        jmp fail
1:
.endm

        .text
        .code32
/* putc: write AL to COM1. */
putc:
        push %edx
        mov $0x3f8, %dx
        out %al, %dx
        pop %edx
        ret
/* puts: write the NUL-terminated string at ESI. */
puts:
        push %eax
1:      lodsb
        test %al, %al
        jz 2f
        call putc
        jmp 1b
2:      pop %eax
        ret
/* puthex: write EAX as 8 hex digits. */
puthex:
        push %ecx
        push %eax
        mov $8, %ecx
        jmp 1f
/* puthex2: write AL as 2 hex digits. */
puthex2:
        push %ecx
        push %eax
        shl $24, %eax
        mov $2, %ecx
1:      rol $4, %eax
        push %eax
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 2f
        add $('a' - '0' - 10), %al
2:      call putc
        pop %eax
        loop 1b
        pop %eax
        pop %ecx
        ret
/* exit: stop the VM with status AL (debug-exit port). */
exit:
        mov $0x501, %dx
        out %al, %dx
3:      hlt
        jmp 3b
/* fail: print "FAILED check " and AL in hex, exit with status AL. */
fail:   movzbl %al, %eax
        push %eax
        mov $m_fail, %esi
        call puts
        pop %eax
        push %eax
        call puthex
        call nl
        pop %eax
        call exit

nl:     mov $'\n', %al
        jmp putc
m_fail: .asciz "FAILED check "
