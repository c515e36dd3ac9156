/* Drives the first virtio-net PCI device (1af4:1041) directly, polling the
 * used rings (no interrupts), with a host test on the other side of the tap
 * (tests/tests/net_device.rs) that answers the lines printed:
 *   1. prints the offered features and the MAC; negotiates VERSION_1, MAC,
 *      STATUS, MRG_RXBUF, CSUM, GUEST_CSUM;
 *   2. posts three 256-byte RX buffers, prints "rx posted"; the host sends
 *      a 600-byte frame (ethertype 0x88b5, byte j = 7*j): it must arrive in
 *      the three buffers (256, 256, 100 bytes), num_buffers = 3;
 *   3. transmits a 60-byte broadcast frame (ethertype 0x88b5, "vmrun-tiny");
 *   4. a TX chain past the end of RAM: the device must set
 *      DEVICE_NEEDS_RESET (0x40);
 *   5. after a reset, posts an 8-byte RX buffer (shorter than the header),
 *      prints "short rx posted"; the host sends a frame: NEEDS_RESET again;
 *   6. after a reset, posts one 2 KiB buffer, prints "rx posted again"; the
 *      host sends a frame: it arrives (the device works again).
 * Exits 100 when all pass, else the number of the failed check. Needs
 * 64 MiB of RAM. */
        .include "common.S"

        .set RXDESC,  0x200000
        .set RXAVAIL, 0x201000
        .set RXUSED,  0x202000
        .set TXDESC,  0x210000
        .set TXAVAIL, 0x211000
        .set TXUSED,  0x212000
        .set RXBUF,   0x220000          /* 4 KiB apart */
        .set TXBUF,   0x230000
        .set F_NEXT,  1
        .set F_WRITE, 2
        .set QSIZE,   8
        /* MRG_RXBUF | STATUS | MAC | GUEST_CSUM | CSUM */
        .set FEATS,   (1 << 15) | (1 << 16) | (1 << 5) | 2 | 1

.macro desc base, i, addr, len, flags, next
        movl $\addr, \base+\i*16
        movl $0, \base+\i*16+4
        movl $\len, \base+\i*16+8
        movw $\flags, \base+\i*16+12
        movw $\next, \base+\i*16+14
.endm

        .text
        .globl _start
_start:
        mov $0x80000, %esp
        /* Find 1af4:1041 on bus 0. */
        xor %ebx, %ebx
scan:   mov %ebx, %eax
        shl $11, %eax
        or $0x80000000, %eax
        mov %eax, pciaddr
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        cmp $0x10411af4, %eax
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

        /* 1. features and MAC */
        mov bar, %edi
        movl $0, 0x00(%edi)
        mov $m_feat, %esi
        call puts
        mov 0x04(%edi), %eax
        call puthex
        mov $' ', %al
        call putc
        movl $1, 0x00(%edi)
        mov 0x04(%edi), %eax
        call puthex
        call nl
        mov $m_mac, %esi
        call puts
        xor %ebx, %ebx
2:      movb 0x2000(%edi,%ebx), %al
        call puthex2
        inc %ebx
        cmp $6, %ebx
        je 3f
        mov $':', %al
        call putc
        jmp 2b
3:      call nl

        /* 2. a frame over three merged buffers */
        call init
        desc RXDESC, 0, RXBUF, 256, F_WRITE, 0
        desc RXDESC, 1, RXBUF+0x1000, 256, F_WRITE, 0
        desc RXDESC, 2, RXBUF+0x2000, 256, F_WRITE, 0
        mov $0, %ax
        call rxpush
        mov $1, %ax
        call rxpush
        mov $2, %ax
        call rxpush
        call rxkick
        mov $m_rxposted, %esi
        call puts
        mov $3, %ax
        call rxwait
        check e, 3
        cmpw $3, RXBUF+10               /* num_buffers */
        check e, 4
        cmpl $256, RXUSED+8             /* used lengths */
        check e, 5
        cmpl $256, RXUSED+16
        check e, 5
        cmpl $100, RXUSED+24
        check e, 5
        cmpw $0xb588, RXBUF+24          /* ethertype 0x88b5 */
        check e, 6
        cmpb $0xac, RXBUF+0x1000        /* frame byte 244 = 7*244 */
        check e, 7
        cmpb $0x61, RXBUF+0x2000+99     /* frame byte 599 */
        check e, 7
        mov $m_rxmrg, %esi
        call puts

        /* 3. transmit a frame */
        mov $TXBUF, %edi
        mov $(72/4), %ecx
        xor %eax, %eax
        rep stosl
        movl $0xffffffff, TXBUF+12      /* destination: broadcast */
        movw $0xffff, TXBUF+16
        mov bar, %edi
        mov 0x2000(%edi), %eax          /* source: our MAC */
        mov %eax, TXBUF+18
        movw 0x2004(%edi), %ax
        movw %ax, TXBUF+22
        movw $0xb588, TXBUF+24
        mov $m_payload, %esi
        mov $(TXBUF+26), %edi
        mov $10, %ecx
        rep movsb
        desc TXDESC, 0, TXBUF, 72, 0, 0
        mov $0, %ax
        call txpush
        call txkick
        mov $1, %ax
        mov $TXUSED, %ebx
        mov $50000000, %ecx
        call waitidx
        check e, 8
        mov $m_tx, %esi
        call puts

        /* 4. a TX chain past the end of RAM */
        desc TXDESC, 1, 0x3ff0000, 0x20000, 0, 0
        mov $1, %ax
        call txpush
        call txkick
        mov $50000000, %ecx
        call broken
        check e, 9
        mov $m_txbad, %esi
        call puts

        /* 5. an RX buffer shorter than the header */
        call init
        desc RXDESC, 0, RXBUF, 8, F_WRITE, 0
        mov $0, %ax
        call rxpush
        call rxkick
        mov $m_short, %esi
        call puts
        mov $0xffffffff, %ecx
        call broken
        check e, 10
        mov $m_shortok, %esi
        call puts

        /* 6. the device works again after a reset */
        call init
        movw $0, RXBUF+24
        desc RXDESC, 0, RXBUF, 2048, F_WRITE, 0
        mov $0, %ax
        call rxpush
        call rxkick
        mov $m_again, %esi
        call puts
        mov $1, %ax
        call rxwait
        check e, 11
        cmpw $0xb588, RXBUF+24
        check e, 12
        cmpw $1, RXBUF+10
        check e, 12
        mov $m_done, %esi
        call puts
        mov $100, %al
        call exit

/* init: reset the device, negotiate FEATS, set up RX (0) and TX (1). */
init:   mov $RXDESC, %edi
        mov $(0x13000/4), %ecx
        xor %eax, %eax
        rep stosl
        movw $0, rxidx
        movw $0, txidx
        mov bar, %edi
        movb $0, 0x14(%edi)
        movb $1, 0x14(%edi)
        movb $3, 0x14(%edi)
        movl $1, 0x08(%edi)
        movl $1, 0x0c(%edi)             /* VIRTIO_F_VERSION_1 */
        movl $0, 0x08(%edi)
        movl $FEATS, 0x0c(%edi)
        movb $0xb, 0x14(%edi)
        movb 0x14(%edi), %al
        test $8, %al
        jnz 1f
        mov $2, %al
        jmp fail
1:      xor %eax, %eax
        mov $RXDESC, %edx
        call setq
        mov $1, %eax
        mov $TXDESC, %edx
        call setq
        movb $0xf, 0x14(%edi)
        ret

/* setq: queue AX with its rings at EDX (desc), +0x1000 (avail), +0x2000
 * (used). EDI = BAR. */
setq:   movw %ax, 0x16(%edi)
        movw $QSIZE, 0x18(%edi)
        movl %edx, 0x20(%edi)
        movl $0, 0x24(%edi)
        lea 0x1000(%edx), %ecx
        movl %ecx, 0x28(%edi)
        movl $0, 0x2c(%edi)
        lea 0x2000(%edx), %ecx
        movl %ecx, 0x30(%edi)
        movl $0, 0x34(%edi)
        movw $1, 0x1c(%edi)
        ret

/* rxpush / txpush: make the chain with head AX available. */
rxpush: movzwl rxidx, %ecx
        mov %ecx, %edx
        and $(QSIZE-1), %edx
        movw %ax, RXAVAIL+4(,%edx,2)
        inc %ecx
        mov %cx, rxidx
        mov %cx, RXAVAIL+2
        ret
txpush: movzwl txidx, %ecx
        mov %ecx, %edx
        and $(QSIZE-1), %edx
        movw %ax, TXAVAIL+4(,%edx,2)
        inc %ecx
        mov %cx, txidx
        mov %cx, TXAVAIL+2
        ret
rxkick: mov bar, %edi
        movw $0, 0x3000(%edi)
        ret
txkick: mov bar, %edi
        movw $1, 0x3004(%edi)
        ret

/* rxwait: wait (for the host, without a bound) until the RX used index is
 * AX; ZF set when it is. */
rxwait: mov $RXUSED, %ebx
        mov $0xffffffff, %ecx
/* waitidx: wait until the used index at EBX+2 is AX, at most ECX rounds;
 * ZF set when it is. */
waitidx:
1:      cmpw 2(%ebx), %ax
        je 2f
        pause
        loop 1b
        cmp $0, %esp                    /* ZF clear: timeout */
2:      ret

/* broken: wait until the device status has NEEDS_RESET, at most ECX
 * rounds; ZF set when it has. */
broken: mov bar, %edi
1:      movb 0x14(%edi), %al
        test $0x40, %al
        jnz 2f
        pause
        loop 1b
        cmp $0, %esp
        ret
2:      cmp %eax, %eax
        ret

        .section .rodata
m_feat:     .asciz "features="
m_mac:      .asciz "mac="
m_rxposted: .asciz "rx posted\n"
m_rxmrg:    .asciz "rx merged 3 buffers ok\n"
m_payload:  .ascii "vmrun-tiny"
m_tx:       .asciz "tx ok\n"
m_txbad:    .asciz "tx chain past RAM: NEEDS_RESET ok\n"
m_short:    .asciz "short rx posted\n"
m_shortok:  .asciz "short rx buffer: NEEDS_RESET ok\n"
m_again:    .asciz "rx posted again\n"
m_done:     .asciz "rx after reset ok\n"
        .data
pciaddr:  .long 0
bar:      .long 0
rxidx:    .word 0
txidx:    .word 0
