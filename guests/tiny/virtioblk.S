/* Drives the first virtio-blk PCI device (1af4:1042) directly: finds it with
 * configuration mechanism #1, enables BAR 0, sets the device up through the
 * modern common configuration, then
 *   1. writes sector 0 with a pattern, reads it back, compares;
 *   2. asks for the serial (GET_ID) and prints it;
 *   3. reads past the end: expects status IOERR;
 *   4. submits malformed chains, resetting the device after each: a loop,
 *      a buffer outside guest RAM, an oversized length, a next index past
 *      the queue; after each the device must set DEVICE_NEEDS_RESET (0x40);
 *   5. after a last reset, reads sector 0 again (the device works again).
 * Polls the used ring (no interrupts). Prints each step; exits 100 when all
 * pass, else the number of the failed check. Needs at least 16 MiB of RAM. */
        .include "common.S"

        .set DESC,   0x200000
        .set AVAIL,  0x201000
        .set USED,   0x202000
        .set HDR,    0x203000
        .set STATUS, 0x203100
        .set IDBUF,  0x203200
        .set WBUF,   0x204000
        .set RBUF,   0x205000
        .set F_NEXT, 1
        .set F_WRITE, 2
        .set QSIZE,  8

.macro setdesc i, addr, len, flags, next
        movl $\addr, DESC+\i*16
        movl $0, DESC+\i*16+4
        movl $\len, DESC+\i*16+8
        movw $\flags, DESC+\i*16+12
        movw $\next, DESC+\i*16+14
.endm

.macro check cond, code
        j\cond 1f
        mov $\code, %al
        jmp fail
1:
.endm

        .globl _start
_start:
        mov $0x80000, %esp
        /* Find 1af4:1042 on bus 0. */
        xor %ebx, %ebx                  /* slot */
scan:   mov %ebx, %eax
        shl $11, %eax
        or $0x80000000, %eax
        mov %eax, pciaddr
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        cmp $0x10421af4, %eax
        je found
        inc %ebx
        cmp $32, %ebx
        jb scan
        mov $1, %al
        jmp fail
found:  mov pciaddr, %eax
        or $0x10, %eax                  /* BAR 0 */
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        and $0xfffffff0, %eax
        mov %eax, bar
        mov pciaddr, %eax
        or $0x04, %eax                  /* command: memory + bus master */
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        mov $0x6, %ax
        out %ax, %dx
        mov $m_found, %esi
        call puts
        mov bar, %eax
        call puthex
        call nl

        call init
        /* 1. write sector 0 */
        mov $WBUF, %edi
        mov $128, %ecx
        mov $0x4b534944, %eax           /* "DISK" */
2:      mov %eax, (%edi)
        add $4, %edi
        inc %eax
        loop 2b
        movl $1, HDR                    /* VIRTIO_BLK_T_OUT */
        movl $0, HDR+4
        movl $0, HDR+8
        movl $0, HDR+12
        setdesc 0, HDR, 16, F_NEXT, 1
        setdesc 1, WBUF, 512, F_NEXT, 2
        setdesc 2, STATUS, 1, F_WRITE, 0
        call request
        check e, 3
        mov $m_write, %esi
        call puts
        /* read it back */
        movl $0, HDR                    /* VIRTIO_BLK_T_IN */
        setdesc 1, RBUF, 512, F_NEXT|F_WRITE, 2
        call request
        check e, 4
        mov $WBUF, %esi
        mov $RBUF, %edi
        mov $128, %ecx
        repe cmpsl
        check e, 5
        mov $m_read, %esi
        call puts
        /* 2. GET_ID */
        movl $8, HDR
        setdesc 1, IDBUF, 20, F_NEXT|F_WRITE, 2
        call request
        check e, 6
        mov $m_serial, %esi
        call puts
        mov $IDBUF, %esi
        call puts
        call nl
        /* 3. read past the end: sector = capacity */
        mov bar, %edi
        mov 0x2000(%edi), %eax
        mov %eax, HDR+8
        mov 0x2004(%edi), %eax
        mov %eax, HDR+12
        movl $0, HDR
        setdesc 1, RBUF, 512, F_NEXT|F_WRITE, 2
        call request
        cmp $1, %al                     /* VIRTIO_BLK_S_IOERR */
        check e, 7
        mov $m_oob, %esi
        call puts
        movl $0, HDR+8
        movl $0, HDR+12

        /* 4. malformed chains */
        setdesc 0, HDR, 16, F_NEXT, 1   /* a loop: 0 -> 1 -> 0 */
        setdesc 1, RBUF, 512, F_NEXT|F_WRITE, 0
        call broken
        check e, 8
        mov $m_loop, %esi
        call puts

        call init
        setdesc 0, HDR, 16, F_NEXT, 1   /* buffer in the PCI hole */
        setdesc 1, 0xd0000000, 512, F_NEXT|F_WRITE, 2
        setdesc 2, STATUS, 1, F_WRITE, 0
        call broken
        check e, 9
        mov $m_addr, %esi
        call puts

        call init
        setdesc 0, HDR, 16, F_NEXT, 1   /* 4 GiB - 16 bytes long */
        setdesc 1, RBUF, 0xfffffff0, F_NEXT|F_WRITE, 2
        setdesc 2, STATUS, 1, F_WRITE, 0
        call broken
        check e, 10
        mov $m_len, %esi
        call puts

        call init
        setdesc 0, HDR, 16, F_NEXT, 200 /* next index past the queue */
        call broken
        check e, 11
        mov $m_index, %esi
        call puts

        /* 5. the device works again after a reset */
        call init
        movl $0, HDR
        setdesc 0, HDR, 16, F_NEXT, 1
        setdesc 1, RBUF, 512, F_NEXT|F_WRITE, 2
        setdesc 2, STATUS, 1, F_WRITE, 0
        movl $0, RBUF
        call request
        check e, 12
        cmpl $0x4b534944, RBUF
        check e, 13
        mov $m_done, %esi
        call puts
        mov $100, %al
        call exit

fail:   push %eax
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

/* init: reset the device and set up queue 0 (8 entries); ring memory zeroed. */
init:   push %edi
        mov $DESC, %edi
        mov $(0x3000/4), %ecx
        xor %eax, %eax
        rep stosl
        movw $0, availidx
        mov bar, %edi
        movb $0, 0x14(%edi)
        movb $1, 0x14(%edi)
        movb $3, 0x14(%edi)
        movl $1, 0x08(%edi)
        movl $1, 0x0c(%edi)             /* VIRTIO_F_VERSION_1 */
        movl $0, 0x08(%edi)
        movl $0, 0x0c(%edi)
        movb $0xb, 0x14(%edi)
        movb 0x14(%edi), %al
        test $8, %al
        jnz 1f
        mov $2, %al
        jmp fail
1:      movw $0, 0x16(%edi)
        movw $QSIZE, 0x18(%edi)
        movl $DESC, 0x20(%edi)
        movl $0, 0x24(%edi)
        movl $AVAIL, 0x28(%edi)
        movl $0, 0x2c(%edi)
        movl $USED, 0x30(%edi)
        movl $0, 0x34(%edi)
        movw $1, 0x1c(%edi)
        movb $0xf, 0x14(%edi)
        pop %edi
        ret

/* submit: make chain 0 available and notify queue 0. */
submit: movzwl availidx, %ecx
        mov %ecx, %edx
        and $(QSIZE-1), %edx
        movw $0, AVAIL+4(,%edx,2)
        inc %ecx
        mov %cx, availidx
        mov %cx, AVAIL+2
        mov bar, %edi
        movw $0, 0x3000(%edi)
        ret

/* request: submit chain 0 and wait for it; AL = status byte (0xee on timeout);
 * ZF set when the status is 0. */
request:
        movb $0xee, STATUS
        call submit
        mov $50000000, %ecx
1:      movw USED+2, %ax
        cmpw availidx, %ax
        je 2f
        pause
        loop 1b
        mov $0xee, %al
        cmp $0, %al
        ret
2:      movb STATUS, %al
        cmp $0, %al
        ret

/* broken: submit chain 0 and wait for DEVICE_NEEDS_RESET; ZF set when seen. */
broken: call submit
        mov bar, %edi
        mov $50000000, %ecx
1:      movb 0x14(%edi), %al
        test $0x40, %al
        jnz 2f
        pause
        loop 1b
        cmp $0, %esp                    /* ZF clear: timeout */
        ret
2:      cmp %eax, %eax
        ret

        .section .rodata
m_found:  .asciz "virtio-blk BAR0="
m_write:  .asciz "write ok\n"
m_read:   .asciz "read back ok\n"
m_serial: .asciz "serial="
m_oob:    .asciz "read past the end: IOERR ok\n"
m_loop:   .asciz "loop chain: NEEDS_RESET ok\n"
m_addr:   .asciz "address outside RAM: NEEDS_RESET ok\n"
m_len:    .asciz "oversized length: NEEDS_RESET ok\n"
m_index:  .asciz "next index past the queue: NEEDS_RESET ok\n"
m_done:   .asciz "read after reset ok\n"
m_fail:   .asciz "FAILED check "
        .data
pciaddr:  .long 0
bar:      .long 0
availidx: .word 0
