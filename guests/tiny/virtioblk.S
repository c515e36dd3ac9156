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
        .include "virtio.inc"

        .globl _start
_start:
        mov $0x80000, %esp
        call find_blk
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
