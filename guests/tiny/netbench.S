/* virtio-net benchmark guest for bench/net.sh, the same image under vmrun
 * and QEMU: finds the first modern virtio-net PCI device (1af4:1041)
 * through its virtio capabilities (so BAR 0 under vmrun, BAR 4 under
 * QEMU), negotiates VERSION_1 only, sets up RX (0) and TX (1) queues of up
 * to 256 entries and, by the command line:
 *   "t SIZE COUNT": transmits COUNT frames of SIZE bytes (broadcast,
 *       ethertype 0x88b5) keeping the TX ring full; kicks only when the
 *       device asks (VRING_USED_F_NO_NOTIFY clear), like Linux;
 *   "r COUNT": keeps 256 2 KiB RX buffers posted, prints "go" at the first
 *       frame, reposts buffers as they are used, and counts COUNT frames.
 * Prints "go" when the timed part starts and "done" when it ends, then
 * the number of ring updates it made ("batches=0x..", in hex), then
 * exits 100 (vmrun's status; QEMU's isa-debug-exit makes it 201). Polls
 * (no interrupts). Needs 64 MiB of RAM. */
        .include "common.S"

        .set RXDESC,  0x200000
        .set RXAVAIL, 0x201000
        .set RXUSED,  0x202000
        .set TXDESC,  0x210000
        .set TXAVAIL, 0x211000
        .set TXUSED,  0x212000
        .set RXBUF,   0x300000          /* 256 x 2 KiB */
        .set FRAME,   0x400000
        .set F_WRITE, 2

        .text
        .globl _start
_start:
        mov $0x80000, %esp
        mov 24(%ebx), %esi              /* hvm_start_info.cmdline_paddr */
        call skipsp
        lodsb
        mov %al, mode
        cmp $'t', %al
        jne 1f
        call number
        mov %eax, size
1:      call number
        mov %eax, count
        cmpl $0, count
        check ne, 1

        call find
        call init

        cmpb $'t', mode
        je txbench

/* RX: every buffer posted; repost each as it is used. */
rxbench:
        xor %ebx, %ebx
1:      mov %ebx, %eax
        shl $4, %eax
        mov %ebx, %edx
        shl $11, %edx
        add $RXBUF, %edx
        movl %edx, RXDESC(%eax)
        movl $0, RXDESC+4(%eax)
        movl $2048, RXDESC+8(%eax)
        movw $F_WRITE, RXDESC+12(%eax)
        movw %bx, RXAVAIL+4(,%ebx,2)
        inc %ebx
        cmp qsize, %ebx
        jb 1b
        movw %bx, RXAVAIL+2
        mov %ebx, rxavail
        xor %eax, %eax
        call kick
        mov $m_ready, %esi
        call puts
        xor %edi, %edi                  /* frames seen */
        xor %ebp, %ebp                  /* used entries consumed (mod 2^16) */
        movl $0, started
rxloop: movzwl RXUSED+2, %eax
        cmp %bp, %ax
        jne 2f
        pause
        jmp rxloop
2:      cmpl $0, started
        jne 3f
        movl $1, started
        push %esi
        mov $m_go, %esi
        call puts
        pop %esi
        xor %edi, %edi
        /* Repost every used buffer up to the used index in EAX. */
3:      mov %ebp, %ecx
        and qmask, %ecx
        mov RXUSED+4(,%ecx,8), %edx     /* used elem id */
        mov rxavail, %ecx
        and qmask, %ecx
        movw %dx, RXAVAIL+4(,%ecx,2)
        incl rxavail
        inc %bp
        inc %edi
        cmp %bp, %ax
        jne 3b
        incl batches
        mov rxavail, %ecx
        movw %cx, RXAVAIL+2
        mfence
        testw $1, RXUSED                /* VRING_USED_F_NO_NOTIFY */
        jnz 4f
        xor %eax, %eax
        call kick
4:      cmp count, %edi
        jb rxloop
        jmp finish

/* TX: COUNT frames of SIZE bytes from one buffer, the ring kept full. */
txbench:
        mov $FRAME, %edi
        mov $(2048/4), %ecx
        xor %eax, %eax
        rep stosl
        movl $0xffffffff, FRAME+12
        movw $0xffff, FRAME+16
        movl $0x00000002, FRAME+18
        movw $0x0100, FRAME+22
        movw $0xb588, FRAME+24
        mov size, %edx
        add $12, %edx
        xor %ebx, %ebx
1:      mov %ebx, %eax
        shl $4, %eax
        movl $FRAME, TXDESC(%eax)
        movl $0, TXDESC+4(%eax)
        movl %edx, TXDESC+8(%eax)
        movw $0, TXDESC+12(%eax)
        inc %ebx
        cmp qsize, %ebx
        jb 1b
        mov $m_go, %esi
        call puts
        xor %edi, %edi                  /* posted */
        xor %ebp, %ebp                  /* completed */
txloop: /* reclaim */
        movzwl TXUSED+2, %eax
        sub %bp, %ax
        movzwl %ax, %eax
        add %eax, %ebp
        cmp count, %ebp
        jae finish
        /* post while there is room */
        mov %edi, %eax
        sub %ebp, %eax
        cmp qsize, %eax
        jae txloop
        mov count, %ecx
        sub %edi, %ecx
        jz txloop
        mov qsize, %eax
        sub %edi, %eax
        add %ebp, %eax                  /* room */
        cmp %eax, %ecx
        jbe 2f
        mov %eax, %ecx
2:      mov %edi, %eax
        and qmask, %eax
        movw %ax, TXAVAIL+4(,%eax,2)
        inc %edi
        loop 2b
        incl batches
        movw %di, TXAVAIL+2
        mfence
        testw $1, TXUSED
        jnz txloop
        mov $1, %eax
        call kick
        jmp txloop

finish: mov $m_done, %esi
        call puts
        mov $m_batches, %esi            /* ring updates: frames per batch */
        call puts
        mov batches, %eax
        call puthex
        mov $'\n', %al
        call putc
        mov $100, %al
        call exit

/* skipsp: skip spaces at ESI. */
skipsp: cmpb $' ', (%esi)
        jne 1f
        inc %esi
        jmp skipsp
1:      ret

/* number: parse a decimal number at ESI (after spaces) into EAX. */
number: call skipsp
        xor %eax, %eax
        xor %ecx, %ecx
1:      movb (%esi), %cl
        sub $'0', %cl
        cmp $9, %cl
        ja 2f
        imul $10, %eax
        add %ecx, %eax
        inc %esi
        jmp 1b
2:      ret

/* pcicfg: read the config dword at offset EAX of the device into EAX. */
pcicfg: or pciaddr, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        ret

/* find: the device, its common configuration and notify area. */
find:   xor %ebx, %ebx
1:      mov %ebx, %eax
        shl $11, %eax
        or $0x80000000, %eax
        mov %eax, pciaddr
        xor %eax, %eax
        call pcicfg
        cmp $0x10411af4, %eax
        je 2f
        inc %ebx
        cmp $32, %ebx
        jb 1b
        mov $2, %al
        jmp fail
2:      mov pciaddr, %eax               /* command: memory + bus master */
        or $0x04, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %ax
        or $0x6, %ax
        out %ax, %dx
        mov $0x34, %eax
        call pcicfg
        movzbl %al, %ebx                /* capability pointer */
3:      test %ebx, %ebx
        jz 6f
        mov %ebx, %eax
        call pcicfg
        cmp $0x09, %al                  /* vendor-specific: virtio */
        jne 5f
        shr $24, %eax                   /* cfg_type */
        mov %eax, %edi
        mov %ebx, %eax
        add $4, %eax
        call pcicfg
        movzbl %al, %eax                /* bar */
        shl $2, %eax
        add $0x10, %eax
        mov %eax, baroff
        call pcicfg
        mov %eax, %ebp                  /* the BAR's low dword */
        test $0x04, %al                 /* 64-bit: must be below 4 GiB */
        jz 4f
        mov baroff, %eax
        add $4, %eax
        call pcicfg
        test %eax, %eax
        check z, 3
4:      and $0xfffffff0, %ebp
        mov %ebx, %eax
        add $8, %eax
        call pcicfg
        add %eax, %ebp                  /* structure address */
        cmp $1, %edi
        jne 7f
        mov %ebp, common
        jmp 5f
7:      cmp $2, %edi
        jne 5f
        mov %ebp, notify
        mov %ebx, %eax
        add $16, %eax
        call pcicfg
        mov %eax, notifymul
5:      mov %ebx, %eax                  /* next capability */
        call pcicfg
        movzbl %ah, %ebx
        jmp 3b
6:      cmpl $0, common
        check ne, 4
        cmpl $0, notify
        check ne, 5
        ret

/* init: reset, VERSION_1, queues 0 and 1, DRIVER_OK. */
init:   mov $RXDESC, %edi
        mov $(0x13000/4), %ecx
        xor %eax, %eax
        rep stosl
        mov common, %edi
        movb $0, 0x14(%edi)
        movb $1, 0x14(%edi)
        movb $3, 0x14(%edi)
        movl $1, 0x08(%edi)
        movl $1, 0x0c(%edi)
        movl $0, 0x08(%edi)
        movl $0, 0x0c(%edi)
        movb $0xb, 0x14(%edi)
        movb 0x14(%edi), %al
        test $8, %al
        check nz, 6
        movw $0, 0x16(%edi)
        movzwl 0x18(%edi), %eax
        cmp $256, %eax
        jbe 1f
        mov $256, %eax
1:      mov %eax, qsize
        dec %eax
        mov %eax, qmask
        xor %eax, %eax
        mov $RXDESC, %edx
        call setq
        mov $1, %eax
        mov $TXDESC, %edx
        call setq
        movb $0xf, 0x14(%edi)
        ret

/* setq: queue AX, rings at EDX, +0x1000, +0x2000; remembers its notify
 * address. EDI = common configuration. */
setq:   movw %ax, 0x16(%edi)
        push %eax
        mov qsize, %ecx
        movw %cx, 0x18(%edi)
        movl %edx, 0x20(%edi)
        movl $0, 0x24(%edi)
        lea 0x1000(%edx), %ecx
        movl %ecx, 0x28(%edi)
        movl $0, 0x2c(%edi)
        lea 0x2000(%edx), %ecx
        movl %ecx, 0x30(%edi)
        movl $0, 0x34(%edi)
        movzwl 0x1e(%edi), %eax         /* queue_notify_off */
        imul notifymul, %eax
        add notify, %eax
        pop %ecx
        mov %eax, qnotify(,%ecx,4)
        movw $1, 0x1c(%edi)
        ret

/* kick: notify queue EAX. */
kick:   push %edx
        mov qnotify(,%eax,4), %edx
        movw %ax, (%edx)
        pop %edx
        ret

        .section .rodata
m_ready: .asciz "ready\n"
m_go:    .asciz "go\n"
m_done:  .asciz "done\n"
m_batches: .asciz "batches=0x"
        .data
mode:      .long 0
size:      .long 64
count:     .long 0
pciaddr:   .long 0
common:    .long 0
notify:    .long 0
notifymul: .long 0
qsize:     .long 0
qmask:     .long 0
rxavail:   .long 0
started:   .long 0
batches:   .long 0
qnotify:   .long 0, 0
baroff:    .long 0
