/*
 * exitloop: the physical limit of a VM exit on this host, with raw KVM ioctls.
 *
 * Part of `make bench` (benchmarks/bench.py compiles it with gcc at bench time).  A one-vCPU VM
 * in flat 32-bit protected mode runs a hand-assembled loop that exits to user space N times;
 * the loop here does the least a VMM can do per exit: KVM_RUN, read exit_reason, and for a read
 * exit store a value for the guest.  No device emulation, no dispatch.  The guest code is the
 * same byte for byte as the embervm side of the benchmark (benchmarks/exitbench.py), so the
 * difference between the two is what embervm's exit path costs on top of KVM.
 *
 *   exitloop [N] [MODE...]     N exits per mode (default 200000);
 *                              MODE: pio_out pio_in mmio_write mmio_read (default: all)
 *
 * Prints one line per mode: "<mode> exits=<n> seconds=<s> us_per_exit=<us>".
 * Exits 1 with a message on any unexpected exit or ioctl failure.
 *
 * Built with -shared -fPIC -DEXITLOOP_LIB it is a library instead: exitbench.py calls
 * exitloop_serve() on its own vCPU, alternating blocks of exits served by this loop and by
 * embervm's, so that both are timed under the same host load (PVM exit costs drift by +-20%
 * from second to second on a shared host).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE 0x10000
#define CODE 0x1000
#define GDT 0x500

/*
 * Serve port-I/O and MMIO exits of a set-up vCPU until any other exit (the guest's final HLT).
 * Returns the number of exits served, -1 with errno set if KVM_RUN failed, or -2 when it was
 * interrupted with immediate_exit set (a watchdog's kick).
 */
long exitloop_serve(int vcpu, struct kvm_run *run)
{
	long exits = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if ((errno == EINTR || errno == EAGAIN) && run->immediate_exit)
				return -2;
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		uint32_t why = run->exit_reason;
		if (why == KVM_EXIT_IO) {
			if (run->io.direction == KVM_EXIT_IO_IN)
				((uint8_t *)run)[run->io.data_offset] = 0x60; /* LSR: THRE|TEMT */
		} else if (why == KVM_EXIT_MMIO) {
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0, 4);
		} else {
			return exits;
		}
		exits++;
	}
}

#ifndef EXITLOOP_LIB
static void die(const char *what)
{
	fprintf(stderr, "exitloop: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Guest loops, flat32, ECX counts down from N (patched in at offset 1). */
static const uint8_t LOOPS[4][16] = {
	/* each: mov ecx, N; [mov dx, port;] 1: <exit>; dec ecx; jnz 1b; hlt
	 * pio_out: out dx, al to port 0x80 (the PC's POST/delay port)
	 * pio_in: in al, dx from port 0x3fd (a 16550's LSR)
	 * mmio_write: mov [0xd0000064], ecx (virtio-mmio InterruptACK)
	 * mmio_read: mov eax, [0xd0000060] (virtio-mmio InterruptStatus) */
	{ 0xb9, 0, 0, 0, 0, 0x66, 0xba, 0x80, 0x00, 0xee, 0x49, 0x75, 0xfc, 0xf4 },
	{ 0xb9, 0, 0, 0, 0, 0x66, 0xba, 0xfd, 0x03, 0xec, 0x49, 0x75, 0xfc, 0xf4 },
	{ 0xb9, 0, 0, 0, 0, 0x89, 0x0d, 0x64, 0x00, 0x00, 0xd0, 0x49, 0x75, 0xf7, 0xf4 },
	{ 0xb9, 0, 0, 0, 0, 0x8b, 0x05, 0x60, 0x00, 0x00, 0xd0, 0x49, 0x75, 0xf7, 0xf4 },
};
static const char *const MODES[4] = { "pio_out", "pio_in", "mmio_write", "mmio_read" };

static void flat(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	memset(s, 0, sizeof *s);
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->db = 1;
	s->s = 1;
	s->g = 1;
}

static double run_mode(int kvm, int mode, uint32_t n, int mmap_size)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0)
		die("KVM_SET_TSS_ADDR");
	uint8_t *mem = mmap(0, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	static const uint64_t gdt[3] = { 0, 0x00cf9b000000ffffull, 0x00cf93000000ffffull };
	memcpy(mem + GDT, gdt, sizeof gdt);
	memcpy(mem + CODE, LOOPS[mode], sizeof LOOPS[mode]);
	memcpy(mem + CODE + 1, &n, 4);
	struct kvm_userspace_memory_region r = { 0, 0, 0, RAM_SIZE, (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	struct kvm_run *run = mmap(0, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_sregs s;
	if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	s.gdt.base = GDT;
	s.gdt.limit = sizeof gdt - 1;
	s.cr0 |= 1; /* PE */
	flat(&s.cs, 0x08, 0xb);
	flat(&s.ds, 0x10, 0x3);
	s.es = s.fs = s.gs = s.ss = s.ds;
	if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs rg;
	memset(&rg, 0, sizeof rg);
	rg.rip = CODE;
	rg.rsp = 0x8000;
	rg.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &rg) < 0)
		die("KVM_SET_REGS");

	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	long exits = exitloop_serve(vcpu, run);
	clock_gettime(CLOCK_MONOTONIC, &b);
	if (exits < 0)
		die("KVM_RUN");  /* no watchdog here: -2 cannot happen */
	if (run->exit_reason != KVM_EXIT_HLT || exits != n) {
		fprintf(stderr, "exitloop: %s: exit reason %u after %ld exits (expected HLT after %u)\n",
			MODES[mode], run->exit_reason, exits, n);
		exit(1);
	}
	munmap(run, mmap_size);
	close(vcpu);
	close(vm);
	munmap(mem, RAM_SIZE);
	return (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
}

int main(int argc, char **argv)
{
	uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], 0, 10) : 200000;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	for (int m = 0; m < 4; m++) {
		int wanted = argc <= 2;
		for (int i = 2; i < argc; i++)
			wanted |= !strcmp(argv[i], MODES[m]);
		if (!wanted)
			continue;
		double t = run_mode(kvm, m, n, mmap_size);
		printf("%s exits=%u seconds=%.6f us_per_exit=%.3f\n", MODES[m], n, t, t / n * 1e6);
		fflush(stdout);
	}
	return 0;
}
#endif /* EXITLOOP_LIB */
