/* Writes the first virtio-blk disk forever, one 4 KiB request every 64 KiB
 * (so a qcow2 image keeps allocating clusters), wrapping at the end of the
 * disk. Prints "writing" once the first write completed; exits with the
 * failed check's number if a request fails. For crash-safety tests that
 * kill vmrun while the guest writes. */
        .include "common.S"
        .include "virtio.inc"
        .globl _start
_start:
        mov $0x80000, %esp
        call find_blk
        call init
        mov bar, %edi
        mov 0x2000(%edi), %eax          /* capacity in sectors (low 32 bits) */
        mov %eax, capacity
        xor %ebx, %ebx                  /* sector */
        xor %esi, %esi                  /* request count */
        movl $1, HDR                    /* VIRTIO_BLK_T_OUT */
        movl $0, HDR+4
        movl $0, HDR+12
        setdesc 0, HDR, 16, F_NEXT, 1
        setdesc 1, WBUF, 4096, F_NEXT, 2
        setdesc 2, STATUS, 1, F_WRITE, 0
loop:   mov %ebx, HDR+8
        mov %esi, WBUF                  /* a different pattern each time */
        mov %ebx, WBUF+4
        call request
        check e, 3
        test %esi, %esi
        jnz 1f
        push %esi
        mov $m_writing, %esi
        call puts
        pop %esi
1:      inc %esi
        add $128, %ebx
        mov %ebx, %eax
        add $8, %eax
        cmp capacity, %eax
        jbe loop
        xor %ebx, %ebx
        jmp loop
        .section .rodata
m_writing: .asciz "writing\n"
        .data
capacity: .long 0
