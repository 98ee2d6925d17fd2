/* netxfer: a bulk TCP transfer for the virtio-net end-to-end test, run inside the guest.
 *
 *   netxfer send HOST PORT BYTES SEED   connect, send BYTES of a xorshift64* stream seeded
 *                                       with SEED, half-close, wait for the peer to close
 *   netxfer recv HOST PORT              connect, read until the peer closes, then close
 *
 * Both print one line:  netxfer: <send|recv> bytes=N crc32=XXXXXXXX usec=T
 * (CRC-32 as zlib.crc32 computes it; T from connect to the end, CLOCK_MONOTONIC).
 *
 * Why not busybox nc: in this guest (kernel code emulated under PVM) a system call costs
 * ~0.9 ms and every byte that crosses a pipe is copied twice by emulated kernel code.  nc moves
 * 8 KiB per read/write and needs pipes for the data and for a checksum, which puts a 32 MiB
 * transfer at tens of minutes; here the data and its checksum stay in (native) user space and
 * the socket sees 256 KiB writes, so the transfer measures the network path.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static uint64_t now_usec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int connect_to(const char *host, const char *port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "netxfer: bad address %s\n", host);
		exit(2);
	}
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("netxfer: connect");
		exit(1);
	}
	return fd;
}

static int do_send(int fd, uint64_t total, uint64_t seed)
{
	static unsigned char buf[CHUNK];
	uint64_t x = seed ? seed : 1, sent = 0;
	uint32_t crc = 0;
	uint64_t t0 = now_usec();
	while (sent < total) {
		size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
		for (size_t i = 0; i < n; i += 8) {
			/* xorshift64* (Vigna): cheap, and no run of repeated bytes */
			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			uint64_t v = x * 0x2545F4914F6CDD1DULL;
			memcpy(buf + i, &v, n - i < 8 ? n - i : 8);
		}
		crc = crc_update(crc, buf, n);
		for (size_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w <= 0) {
				perror("netxfer: write");
				return 1;
			}
			off += (size_t)w;
		}
		sent += n;
	}
	shutdown(fd, SHUT_WR);
	/* The peer closes once it has everything: the time then covers the whole transfer. */
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	printf("netxfer: send bytes=%llu crc32=%08x usec=%llu\n", (unsigned long long)sent, crc,
	       (unsigned long long)(now_usec() - t0));
	return 0;
}

static int do_recv(int fd)
{
	static unsigned char buf[CHUNK];
	uint64_t got = 0;
	uint32_t crc = 0;
	uint64_t t0 = now_usec();
	for (;;) {
		ssize_t r = read(fd, buf, sizeof(buf));
		if (r < 0) {
			perror("netxfer: read");
			return 1;
		}
		if (r == 0)
			break;
		crc = crc_update(crc, buf, (size_t)r);
		got += (uint64_t)r;
	}
	printf("netxfer: recv bytes=%llu crc32=%08x usec=%llu\n", (unsigned long long)got, crc,
	       (unsigned long long)(now_usec() - t0));
	return 0;
}

int main(int argc, char **argv)
{
	crc_init();
	if (argc == 6 && !strcmp(argv[1], "send"))
		return do_send(connect_to(argv[2], argv[3]), strtoull(argv[4], NULL, 0),
			       strtoull(argv[5], NULL, 0));
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return do_recv(connect_to(argv[2], argv[3]));
	fprintf(stderr, "usage: netxfer send HOST PORT BYTES SEED | netxfer recv HOST PORT\n");
	return 2;
}
