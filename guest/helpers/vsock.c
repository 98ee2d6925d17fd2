/*
 * vsock: a static AF_VSOCK test helper for the embervm guest (tests/e2e/test_vsock.py).
 *
 * Build: gcc -static -O2 -o vsock vsock.c
 *
 * Servers (listen on PORT, any CID; run in the background from the guest script):
 *   vsock echo-server PORT          echo every connection back (poll, many at once); a peer's
 *                                   half-close is answered by closing once all is echoed
 *   vsock sink-server PORT          per connection (one at a time): read to EOF, reply
 *                                   "bytes=N crc=XXXXXXXX\n" (CRC-32, zlib's), print the same
 *   vsock close-server PORT N       per connection: read N bytes, then close (mid-stream)
 *   vsock wait PORT                 accept one connection, print the line it sends, exit
 * Clients (connect to CID:PORT):
 *   vsock source CID PORT BYTES     send BYTES of pseudo-random data, half-close, read the
 *                                   peer's "bytes=N crc=X" reply and compare with our own
 *   vsock echo-clients CID PORT N BYTES
 *                                   N concurrent connections, each sends BYTES of its own data,
 *                                   half-closes and checks that exactly that comes back
 *   vsock midclose CID PORT         write until the peer's close makes a write fail
 *   vsock refused CID PORT          connect where nobody listens: expect an error
 *   vsock cid                       print the local CID
 *
 * Every command prints one summary line starting with its name and "ok" or "FAIL", and exits
 * with status 0 on success.  Failures never hang: clients arm an alarm.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK (64 * 1024)
#define MAX_CONNS 256
#define CLIENT_ALARM 600

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

/* zlib.crc32 compatible: crc = crc32_update(crc, ...) starting from 0. */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* xorshift64*: cheap, deterministic data per seed. */
static void fill_random(uint64_t *state, unsigned char *buf, size_t n)
{
	uint64_t x = *state;
	for (size_t i = 0; i < n; i += 8) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		uint64_t v = x * 0x2545F4914F6CDD1DULL;
		size_t k = n - i < 8 ? n - i : 8;
		memcpy(buf + i, &v, k);
	}
	*state = x;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "vsock: TIMEOUT (alarm)\n";
	if (write(2, msg, sizeof(msg) - 1) < 0)
		_exit(3);
	_exit(3);
}

static int listen_on(unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				 .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 128) < 0) {
		printf("listen %u FAIL: %s\n", port, strerror(errno));
		exit(1);
	}
	return s;
}

static int connect_to(unsigned cid, unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(s);
		errno = e;
		return -1;
	}
	return s;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* -- servers ------------------------------------------------------------------------------ */

struct echo_conn {
	int fd;
	int eof;
	size_t len, off;
	unsigned char buf[CHUNK];
};

static int echo_server(unsigned port)
{
	static struct echo_conn *conns[MAX_CONNS];
	static struct pollfd pfd[MAX_CONNS + 1];
	int ls = listen_on(port);
	int n = 0;
	unsigned long long served = 0;

	set_nonblock(ls);
	for (;;) {
		pfd[0] = (struct pollfd){ .fd = ls, .events = n < MAX_CONNS ? POLLIN : 0 };
		for (int i = 0; i < n; i++) {
			struct echo_conn *c = conns[i];
			short ev = c->len > c->off ? POLLOUT : (c->eof ? 0 : POLLIN);
			pfd[i + 1] = (struct pollfd){ .fd = c->fd, .events = ev };
		}
		if (poll(pfd, n + 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			printf("echo-server FAIL: poll: %s\n", strerror(errno));
			return 1;
		}
		for (int i = n - 1; i >= 0; i--) {
			struct echo_conn *c = conns[i];
			short re = pfd[i + 1].revents;
			int done = 0;
			if (re & (POLLIN | POLLHUP | POLLERR) && !(c->len > c->off) && !c->eof) {
				ssize_t r = read(c->fd, c->buf, sizeof(c->buf));
				if (r > 0) {
					c->len = (size_t)r;
					c->off = 0;
				} else if (r == 0) {
					c->eof = 1;
				} else if (errno != EAGAIN && errno != EINTR) {
					done = 1;
				}
			} else if (re & (POLLOUT | POLLHUP | POLLERR) && c->len > c->off) {
				ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
				if (w > 0)
					c->off += (size_t)w;
				else if (w < 0 && errno != EAGAIN && errno != EINTR)
					done = 1;
			}
			if (c->eof && c->off >= c->len)
				done = 1;
			if (done) {
				close(c->fd);
				free(c);
				conns[i] = conns[--n];
				served++;
			}
		}
		if (pfd[0].revents & POLLIN) {
			int fd;
			while (n < MAX_CONNS && (fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
				struct echo_conn *c = calloc(1, sizeof(*c));
				if (!c) {
					close(fd);
					break;
				}
				c->fd = fd;
				conns[n++] = c;
			}
		}
	}
}

static int sink_server(unsigned port)
{
	static unsigned char buf[CHUNK];
	int ls = listen_on(port);
	for (;;) {
		int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			printf("sink-server FAIL: accept: %s\n", strerror(errno));
			return 1;
		}
		unsigned long long total = 0;
		uint32_t crc = 0;
		double t0 = now();
		const char *how = "eof";
		for (;;) {
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0) {
				how = strerror(errno);
				break;
			}
			if (r == 0)
				break;
			crc = crc32_update(crc, buf, (size_t)r);
			total += (unsigned long long)r;
		}
		double dt = now() - t0;
		char reply[96];
		int len = snprintf(reply, sizeof(reply), "bytes=%llu crc=%08x\n", total, crc);
		int wr = write_all(fd, (unsigned char *)reply, (size_t)len);
		printf("sink-server ok bytes=%llu crc=%08x end=%s reply=%s secs=%.2f MBps=%.1f\n",
		       total, crc, how, wr ? "failed" : "sent", dt, dt > 0 ? total / dt / 1e6 : 0.0);
		fflush(stdout);
		close(fd);
	}
}

static int close_server(unsigned port, unsigned long long limit)
{
	static unsigned char buf[CHUNK];
	int ls = listen_on(port);
	for (;;) {
		int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		unsigned long long total = 0;
		while (total < limit) {
			size_t want = limit - total < sizeof(buf) ? (size_t)(limit - total) : sizeof(buf);
			ssize_t r = read(fd, buf, want);
			if (r <= 0)
				break;
			total += (unsigned long long)r;
		}
		close(fd);
		printf("close-server ok closed after %llu bytes\n", total);
		fflush(stdout);
	}
}

static int wait_line(unsigned port)
{
	char line[128];
	int ls = listen_on(port);
	int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		printf("wait FAIL: accept: %s\n", strerror(errno));
		return 1;
	}
	size_t n = 0;
	while (n < sizeof(line) - 1) {
		ssize_t r = read(fd, line + n, 1);
		if (r <= 0 || line[n] == '\n')
			break;
		n++;
	}
	line[n] = 0;
	printf("wait ok port=%u line=%s\n", port, line);
	close(fd);
	close(ls);
	return 0;
}

/* -- clients ------------------------------------------------------------------------------ */

static int source(unsigned cid, unsigned port, unsigned long long bytes)
{
	static unsigned char buf[CHUNK];
	uint64_t seed = 0x9E3779B97F4A7C15ULL;
	uint32_t crc = 0;
	int fd = connect_to(cid, port);
	if (fd < 0) {
		printf("source FAIL: connect: %s\n", strerror(errno));
		return 1;
	}
	double t0 = now();
	for (unsigned long long sent = 0; sent < bytes;) {
		size_t n = bytes - sent < sizeof(buf) ? (size_t)(bytes - sent) : sizeof(buf);
		fill_random(&seed, buf, n);
		crc = crc32_update(crc, buf, n);
		if (write_all(fd, buf, n) < 0) {
			printf("source FAIL: write after %llu bytes: %s\n", sent, strerror(errno));
			return 1;
		}
		sent += n;
	}
	shutdown(fd, SHUT_WR);
	char reply[128];
	size_t got = 0;
	for (;;) {
		ssize_t r = read(fd, reply + got, sizeof(reply) - 1 - got);
		if (r <= 0)
			break;
		got += (size_t)r;
		if (memchr(reply, '\n', got) || got == sizeof(reply) - 1)
			break;
	}
	double dt = now() - t0;
	reply[got] = 0;
	char *nl = strchr(reply, '\n');
	if (nl)
		*nl = 0;
	char mine[96];
	snprintf(mine, sizeof(mine), "bytes=%llu crc=%08x", bytes, crc);
	int ok = strcmp(mine, reply) == 0;
	printf("source %s %s peer=[%s] secs=%.2f MBps=%.1f\n", ok ? "ok" : "FAIL", mine, reply,
	       dt, dt > 0 ? bytes / dt / 1e6 : 0.0);
	close(fd);
	return !ok;
}

struct client {
	int fd;
	uint64_t seed, check_seed;
	size_t sent, recvd;
	size_t chunk_len, chunk_off;
	int shut, done, bad;
	unsigned char chunk[4096];
};

static int echo_clients(unsigned cid, unsigned port, int n, size_t bytes)
{
	static struct client cl[MAX_CONNS];
	static struct pollfd pfd[MAX_CONNS];
	static unsigned char buf[CHUNK], want[4096];
	if (n < 1 || n > MAX_CONNS) {
		printf("echo-clients FAIL: 1..%d connections\n", MAX_CONNS);
		return 1;
	}
	/* Connect them all first: they are concurrent for the whole transfer. */
	for (int i = 0; i < n; i++) {
		struct client *c = &cl[i];
		memset(c, 0, sizeof(*c));
		c->seed = c->check_seed = 1000003ULL * (uint64_t)(i + 1);
		c->fd = connect_to(cid, port);
		if (c->fd < 0) {
			printf("echo-clients FAIL: connect %d: %s\n", i, strerror(errno));
			return 1;
		}
		set_nonblock(c->fd);
	}
	double t0 = now();
	int left = n, failed = 0;
	while (left) {
		for (int i = 0; i < n; i++) {
			struct client *c = &cl[i];
			short ev = POLLIN;
			if (c->sent < bytes)
				ev |= POLLOUT;
			pfd[i] = (struct pollfd){ .fd = c->done ? -1 : c->fd, .events = ev };
		}
		if (poll(pfd, n, -1) < 0 && errno != EINTR)
			break;
		for (int i = 0; i < n; i++) {
			struct client *c = &cl[i];
			if (c->done)
				continue;
			if (pfd[i].revents & POLLOUT && c->sent < bytes) {
				/* The stream is 4 KiB blocks of this connection's generator. */
				if (c->chunk_off == c->chunk_len) {
					c->chunk_len = bytes - c->sent < 4096 ? bytes - c->sent : 4096;
					c->chunk_off = 0;
					fill_random(&c->seed, c->chunk, c->chunk_len);
				}
				ssize_t w = write(c->fd, c->chunk + c->chunk_off,
						  c->chunk_len - c->chunk_off);
				if (w > 0) {
					c->chunk_off += (size_t)w;
					c->sent += (size_t)w;
				} else if (w < 0 && errno != EAGAIN && errno != EINTR) {
					c->bad = 1;
					c->done = 1;
					left--;
					continue;
				}
				if (c->sent == bytes && !c->shut) {
					shutdown(c->fd, SHUT_WR);
					c->shut = 1;
				}
			}
			if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) {
				ssize_t r = read(c->fd, buf, sizeof(buf));
				if (r > 0) {
					size_t off = 0;
					while (off < (size_t)r) {
						size_t pos = c->recvd % 4096;
						if (pos == 0 && c->recvd < bytes) {
							size_t blk = bytes - c->recvd < 4096 ? bytes - c->recvd : 4096;
							fill_random(&c->check_seed, want, blk);
						}
						size_t k = (size_t)r - off;
						if (k > 4096 - pos)
							k = 4096 - pos;
						if (c->recvd + k > bytes || memcmp(buf + off, want + pos, k))
							c->bad = 1;
						c->recvd += k;
						off += k;
					}
				} else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
					if (c->recvd != bytes)
						c->bad = 1;
					c->done = 1;
					left--;
				}
			}
		}
	}
	for (int i = 0; i < n; i++) {
		failed += cl[i].bad;
		close(cl[i].fd);
	}
	double dt = now() - t0;
	printf("echo-clients %s connections=%d bytes_each=%zu failed=%d secs=%.2f\n",
	       failed ? "FAIL" : "ok", n, bytes, failed, dt);
	return failed != 0;
}

static int midclose(unsigned cid, unsigned port)
{
	static unsigned char buf[CHUNK];
	int fd = connect_to(cid, port);
	if (fd < 0) {
		printf("midclose FAIL: connect: %s\n", strerror(errno));
		return 1;
	}
	memset(buf, 0x5a, sizeof(buf));
	unsigned long long sent = 0;
	for (;;) {
		ssize_t w = write(fd, buf, sizeof(buf));
		if (w < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		sent += (unsigned long long)w;
	}
	int e = errno;
	int ok = e == EPIPE || e == ECONNRESET;
	printf("midclose %s write failed after %llu bytes: %s\n", ok ? "ok" : "FAIL", sent,
	       strerror(e));
	close(fd);
	return !ok;
}

static int refused(unsigned cid, unsigned port)
{
	int fd = connect_to(cid, port);
	if (fd >= 0) {
		printf("refused FAIL: connected\n");
		close(fd);
		return 1;
	}
	int e = errno;
	int ok = e == ECONNRESET || e == ECONNREFUSED;
	printf("refused %s connect: %s\n", ok ? "ok" : "FAIL", strerror(e));
	return !ok;
}

static int print_cid(void)
{
	unsigned int cid = 0;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
		printf("cid FAIL: %s\n", strerror(errno));
		return 1;
	}
	printf("cid ok %u\n", cid);
	close(fd);
	return 0;
}

static unsigned long long num(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end || end == s) {
		printf("vsock: bad number %s\n", s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN); /* a peer's close must show up as EPIPE, not kill us */
	signal(SIGALRM, on_alarm);
	crc_init();
	if (argc < 2)
		goto usage;
	const char *cmd = argv[1];
	if (!strcmp(cmd, "echo-server") && argc == 3)
		return echo_server((unsigned)num(argv[2]));
	if (!strcmp(cmd, "sink-server") && argc == 3)
		return sink_server((unsigned)num(argv[2]));
	if (!strcmp(cmd, "close-server") && argc == 4)
		return close_server((unsigned)num(argv[2]), num(argv[3]));
	if (!strcmp(cmd, "wait") && argc == 3)
		return wait_line((unsigned)num(argv[2]));
	if (!strcmp(cmd, "cid") && argc == 2)
		return print_cid();
	alarm(CLIENT_ALARM);
	if (!strcmp(cmd, "source") && argc == 5)
		return source((unsigned)num(argv[2]), (unsigned)num(argv[3]), num(argv[4]));
	if (!strcmp(cmd, "echo-clients") && argc == 6)
		return echo_clients((unsigned)num(argv[2]), (unsigned)num(argv[3]), (int)num(argv[4]),
				    (size_t)num(argv[5]));
	if (!strcmp(cmd, "midclose") && argc == 4)
		return midclose((unsigned)num(argv[2]), (unsigned)num(argv[3]));
	if (!strcmp(cmd, "refused") && argc == 4)
		return refused((unsigned)num(argv[2]), (unsigned)num(argv[3]));
usage:
	fprintf(stderr, "usage: vsock echo-server|sink-server PORT | close-server PORT N | wait PORT |"
		" source CID PORT BYTES | echo-clients CID PORT N BYTES | midclose CID PORT |"
		" refused CID PORT | cid\n");
	return 2;
}
