/*
 * memtouch: make guest RAM resident on the host, then give it back to the guest kernel.
 *
 *   memtouch MIB
 *
 * Maps MIB MiB of anonymous memory, writes one byte per 4 KiB page (each write faults in a
 * page the guest kernel zeroes, so the VMM's backing page becomes resident), prints
 * "memtouch: MIB MiB in SECONDS s" and exits, which frees the pages to the guest's allocator.
 * The balloon e2e test uses it so that inflating the balloon has host memory to release.
 * Static, no libc beyond the basics: built with `gcc -static -O2` at test time.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: memtouch MIB\n");
		return 2;
	}
	long mib = strtol(argv[1], NULL, 10);
	if (mib <= 0 || mib > 65536) {
		fprintf(stderr, "memtouch: bad size %s\n", argv[1]);
		return 2;
	}
	size_t len = (size_t)mib << 20;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	volatile unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
					 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("memtouch: mmap");
		return 1;
	}
	for (size_t off = 0; off < len; off += 4096)
		p[off] = 1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("memtouch: %ld MiB in %.2f s\n", mib, s);
	fflush(stdout);
	return 0;
}
