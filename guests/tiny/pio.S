/* Benchmark guest: writes N times to an I/O port, then exits with status 0.
 * The command line (PVH hvm_start_info.cmdline_paddr, offset 24) gives
 * "N [PORT]" in decimal; no command line or no number means N=0, and the
 * port defaults to 0x1234, which no device claims. Prints nothing. */
        .include "common.S"
        .globl _start
_start:
        mov $0x80000, %esp              /* a stack in low RAM */
        xor %esi, %esi
        test %ebx, %ebx
        jz 1f
        mov 24(%ebx), %esi              /* cmdline_paddr (low 32 bits) */
1:      call number                     /* EAX = N */
        mov %eax, %ecx
        call number                     /* EAX = PORT, 0 if absent */
        mov $0x1234, %edx
        test %eax, %eax
        jz 2f
        mov %eax, %edx
2:      test %ecx, %ecx
        jz 4f
        xor %eax, %eax
3:      out %al, %dx
        dec %ecx
        jnz 3b
4:      xor %eax, %eax
        call exit

/* number: skip spaces at ESI, parse a decimal number into EAX (0 if none);
 * ESI = 0 means no string. */
number:
        xor %eax, %eax
        test %esi, %esi
        jz 9f
        push %ebx
5:      cmpb $' ', (%esi)
        jne 6f
        inc %esi
        jmp 5b
6:      movzbl (%esi), %ebx
        sub $'0', %ebx
        cmp $9, %ebx
        ja 8f
        imul $10, %eax
        add %ebx, %eax
        inc %esi
        jmp 6b
8:      pop %ebx
9:      ret
