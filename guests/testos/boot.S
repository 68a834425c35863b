/*
 * testos: entry points and low-level glue.
 *
 * - PVH entry (32-bit protected mode, paging off) -> long mode -> kmain().
 * - AP real-mode trampoline (copied below 1 MiB) -> 32-bit -> long mode -> ap_main().
 * - Interrupt stubs for all 256 vectors -> isr_dispatch().
 * - enter_user() / syscall_entry: a round trip to CPL3 and back.
 *
 * Kernel code runs in KVM's instruction emulator on our hosts, so everything here
 * uses plain, old instructions only.
 */
#include "testos.h"

        .section .note.GNU-stack, "", @progbits

/* PVH ELF note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, desc = 32-bit entry. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4
        .long 4
        .long 18
        .asciz "Xen"
        .balign 4
        .long pvh_entry
        .balign 4

/* ------------------------------------------------------------------------- */
/* Enable long mode from 32-bit protected mode (flat segments, paging off).  */
.macro ENTER_LONG_MODE target
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER */
        rdmsr
        orl $0x101, %eax                /* LME | SCE */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        ljmp $SEL_KCODE64, $\target
.endm

        .section .text.entry, "ax"
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        cld
        movl %ebx, pvh_start_info
        lgdt gdt_ptr
        ljmp $SEL_KCODE32, $1f
1:      movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl %eax, %fs
        movl %eax, %gs
        /* Zero .bss (the loader may not). */
        movl $__bss_start, %edi
        movl $__bss_end, %ecx
        subl %edi, %ecx
        shrl $2, %ecx
        xorl %eax, %eax
        rep stosl
        ENTER_LONG_MODE bsp_long

        .globl ap_pm32
ap_pm32:
        movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl %eax, %fs
        movl %eax, %gs
        ENTER_LONG_MODE ap_long

        .code64
bsp_long:
        movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movabsq $boot_stack_top, %rsp
        call kmain
2:      cli
        hlt
        jmp 2b

ap_long:
        movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movq ap_stack_top(%rip), %rsp
        movl ap_cpu_index(%rip), %edi
        call ap_main
3:      cli
        hlt
        jmp 3b

/* ------------------------------------------------------------------------- */
/* AP trampoline: copied to TRAMPOLINE_ADDR, entered by SIPI in real mode.    */
        .section .rodata.trampoline, "a"
        .code16
        .globl trampoline_start, trampoline_end
trampoline_start:
        cli
        cld
        movw %cs, %ax
        movw %ax, %ds
        lgdtl (tramp_gdtr - trampoline_start)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $SEL_KCODE32, $ap_pm32
        .balign 8
tramp_gdtr:
        .word gdt_end - gdt - 1
        .long gdt
trampoline_end:

/* ------------------------------------------------------------------------- */
/* Interrupt stubs: 16 bytes each, vector n at isr_stubs + 16 * n.            */
/* Like Linux's entry text, the entry code (interrupt stubs, the system-call and
 * int $0x80 entries, enter_user) has a section of its own, padded with int3 to a
 * page boundary (linker.ld).                                                 */
        .section .entry.text, "ax"
        .code64
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr

isr_common:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rbx
        pushq %rbp
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        cld
        call isr_dispatch
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rbp
        popq %rbx
        popq %rdx
        popq %rcx
        popq %rax
        addq $16, %rsp
        iretq

/* ------------------------------------------------------------------------- */
/* uint64_t enter_user(uint64_t rip, uint64_t rsp, uint64_t arg)
 * Drops to CPL3 at rip with stack rsp and arg in rdi, interrupts enabled.
 * "Returns" when user code executes syscall: the result is the user's rdi. */
        .globl enter_user
enter_user:
        pushq %rbx
        pushq %rbp
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %gs:PERCPU_KSP
        movq %gs:PERCPU_TSS, %rax
        movq %rsp, 4(%rax)              /* tss.rsp0: interrupts from CPL3 land below us */
        pushq $SEL_UDATA
        pushq %rsi
        pushq $0x202
        pushq $SEL_UCODE64
        pushq %rdi
        movq %rdx, %rdi
        xorl %eax, %eax
        xorl %ebx, %ebx
        xorl %ecx, %ecx
        xorl %edx, %edx
        xorl %esi, %esi
        xorl %ebp, %ebp
        xorl %r8d, %r8d
        xorl %r9d, %r9d
        xorl %r10d, %r10d
        xorl %r11d, %r11d
        xorl %r12d, %r12d
        xorl %r13d, %r13d
        xorl %r14d, %r14d
        xorl %r15d, %r15d
        iretq

/* syscall from CPL3 (IF cleared by FMASK), by number in RAX:
 * - SYS_ECHO: RAX = RDI + 1, R8/R9/R10 = SS/CS/RFLAGS as found here, RDX clobbered;
 *   back by sysretq (RFLAGS are read on the kernel stack below enter_user's frame);
 * - SYS_EXIT: switch back to the kernel stack saved by enter_user and return from it
 *   with rax = user rdi;
 * - anything else counts in PERCPU_SYS_BAD and returns (user code that jumped here
 *   itself, if the VMM wrongly made that a kernel entry). */
        .globl syscall_entry
syscall_entry:
        cmpq $SYS_ECHO, %rax
        je 1f
        testq %rax, %rax
        jz syscall_exit
        incq %gs:PERCPU_SYS_BAD
        sysretq
1:      incq %gs:PERCPU_SYS_ECHO
        leaq 1(%rdi), %rax
        movq %ss, %r8
        movq %cs, %r9
        movq %rsp, %rdx
        movq %gs:PERCPU_KSP, %rsp
        pushfq
        popq %r10
        movq %rdx, %rsp
        sysretq
        .globl syscall_exit
syscall_exit:
        movq %gs:PERCPU_KSP, %rsp
        movq %rdi, %rax
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %rbp
        popq %rbx
        ret

/* int $0x80 from CPL3 (a DPL3 interrupt gate): RAX = RDI + 0x80, back by iretq. */
        .globl int80_entry
int80_entry:
        incq %gs:PERCPU_INT80
        leaq 0x80(%rdi), %rax
        iretq

/* ------------------------------------------------------------------------- */
        .data
        .balign 16
        .globl gdt, gdt_end
gdt:
        .quad 0                         /* 0x00 null */
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFFA000000FFFF        /* 0x18 user code, 32-bit (STAR layout only) */
        .quad 0x00CFF2000000FFFF        /* 0x20 user data */
        .quad 0x00AFFA000000FFFF        /* 0x28 user code, 64-bit */
        .quad 0x00CF9A000000FFFF        /* 0x30 kernel code, 32-bit (boot, APs) */
        .fill MAX_CPUS * 2, 8, 0        /* 0x38 TSS descriptors, 16 bytes per CPU */
gdt_end:
        .balign 8
        .word 0
        .globl gdt_ptr
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .globl pvh_start_info, ap_stack_top, ap_cpu_index
        .balign 8
pvh_start_info: .quad 0
ap_stack_top:   .quad 0
ap_cpu_index:   .quad 0

/* Identity map of 0..4 GiB with 2 MiB pages; the top GiB (MMIO) uncached.
 * User access is granted per 2 MiB page at run time (bit 2 of the PDE). */
        .balign 4096
        .globl pml4, pd_tables
pml4:
        .quad pdpt + 0x7
        .fill 511, 8, 0
pdpt:
        .quad pd_tables + 0x0000 + 0x7
        .quad pd_tables + 0x1000 + 0x7
        .quad pd_tables + 0x2000 + 0x7
        .quad pd_tables + 0x3000 + 0x7
        .fill 508, 8, 0
pd_tables:
        .set i, 0
        .rept 1536
        .quad (i << 21) | 0x83
        .set i, i + 1
        .endr
        .rept 512
        .quad (i << 21) | 0x9B
        .set i, i + 1
        .endr

        .bss
        .balign 16
boot_stack:
        .skip BOOT_STACK_SIZE
        .globl boot_stack_top
boot_stack_top:
