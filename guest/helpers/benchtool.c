/*
 * benchtool: the guest side of `make bench` (benchmarks/bench.py).
 *
 * Built on the host at bench time (gcc -O2 -static -pthread), packed into an initramfs next to
 * tinyinit, and run by it (tinyinit.cmd=/benchtool).  It takes its parameters from the kernel
 * command line, so the host runs the same guest under embervm and QEMU with the same words:
 *
 *   bench.blk=DEV        block tests on DEV (e.g. /dev/vda), all O_DIRECT (the data moves by
 *                        DMA between the VMM and this process: the guest kernel, which PVM
 *                        emulates, copies nothing):
 *                          seq_read / seq_write: 1 MiB requests, MiB/s (write: fdatasync at
 *                          the end is inside the timed window);
 *                          rand_read_qd1 / rand_read_qd16: 4 KiB reads at random 4 KiB-aligned
 *                          offsets, IOPS; QD16 is 16 threads each with one read in flight
 *                          (the kit kernel has no AIO or io_uring);
 *   bench.tcp=IP:PORT    TCP throughput with a host endpoint (bench.py runs it): tcp_tx (guest
 *                        sends) and tcp_rx (guest receives), MiB/s;
 *   bench.vsock=PORT     the same over AF_VSOCK to the host (CID 2): vsock_tx, vsock_rx;
 *   bench.seconds=S      length of each timed test (default 3);
 *   bench.pause=S        at the end print "BENCH pause" and sleep S seconds, so the host can
 *                        sample the VMM's memory while the guest is still up.
 *
 * Output, on /dev/console: "BENCH <metric> <value> <unit>" per result, "BENCH error <text>" on
 * a failure (the test is skipped, the others still run), "BENCH done" at the end.
 *
 * Stream protocol (tcp and vsock): the guest connects and sends one request line
 * "tx <seconds>\n" or "rx <seconds>\n".  tx: the guest writes for <seconds>, shuts its side
 * down and reads the host's byte count ("<n>\n"): throughput = n / (time to that answer).
 * rx: the host writes for <seconds> and closes; throughput = bytes read / time to EOF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct sockaddr_vm_ {
	unsigned short svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[4];
};

#define SEQ_BLOCK (1 << 20)
#define RAND_BLOCK 4096
#define QD 16
#define STREAM_CHUNK (128 * 1024)

static FILE *con;
static char cmdline[4096];
static double seconds = 3.0;

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(con, fmt, ap);
	va_end(ap);
	fflush(con);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* The value of "key=" on the command line, copied into out (at most n-1 bytes); 0 if absent. */
static int arg(const char *key, char *out, size_t n)
{
	size_t kl = strlen(key);
	for (char *p = cmdline; *p;) {
		while (*p == ' ')
			p++;
		if (!strncmp(p, key, kl) && p[kl] == '=') {
			p += kl + 1;
			size_t i = 0;
			while (p[i] && p[i] != ' ' && i + 1 < n) {
				out[i] = p[i];
				i++;
			}
			out[i] = 0;
			return 1;
		}
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

static void *aligned(size_t n)
{
	void *p = 0;
	if (posix_memalign(&p, 4096, n))
		return 0;
	memset(p, 0xa5, n); /* fault the pages in before any timing */
	return p;
}

/* Interrupts taken so far by virtio devices (the "virtio" lines of /proc/interrupts): how many
 * completions each interrupt carried is the VMM's main influence on a guest that PVM makes
 * CPU-bound, since every interrupt costs the emulated guest kernel a handler run. */
static unsigned long long virtio_irqs(void)
{
	FILE *f = fopen("/proc/interrupts", "r");
	char line[512];
	unsigned long long total = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof line, f)) {
		if (!strstr(line, "virtio"))
			continue;
		char *p = strchr(line, ':');
		if (p)
			total += strtoull(p + 1, 0, 10); /* one vCPU: one count column */
	}
	fclose(f);
	return total;
}

static unsigned long long irq_mark;

static void irq_start(void)
{
	irq_mark = virtio_irqs();
}

/* "BENCH <name>_irq_per_op <interrupts per request>" (informational, not a headline metric). */
static void irq_report(const char *name, unsigned long long ops)
{
	if (ops)
		say("BENCH %s_irq_per_op %.3f irq/op\n", name, (virtio_irqs() - irq_mark) / (double)ops);
}

/* -- block ------------------------------------------------------------------------------------ */

static uint64_t disk_size;

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void seq(const char *dev, int write)
{
	const char *name = write ? "seq_write" : "seq_read";
	int fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	char *buf = aligned(SEQ_BLOCK);
	if (fd < 0 || !buf) {
		say("BENCH error %s: open %s: %s\n", name, dev, strerror(errno));
		if (fd >= 0)
			close(fd);
		free(buf);
		return;
	}
	uint64_t off = 0, bytes = 0;
	irq_start();
	double t0 = now(), t;
	do {
		if (off + SEQ_BLOCK > disk_size)
			off = 0;
		ssize_t n = write ? pwrite(fd, buf, SEQ_BLOCK, off) : pread(fd, buf, SEQ_BLOCK, off);
		if (n != SEQ_BLOCK) {
			say("BENCH error %s: %zd at %llu: %s\n", name, n, (unsigned long long)off,
			    strerror(errno));
			goto out;
		}
		off += SEQ_BLOCK;
		bytes += SEQ_BLOCK;
	} while (now() - t0 < seconds);
	if (write && fdatasync(fd)) {
		say("BENCH error %s: fdatasync: %s\n", name, strerror(errno));
		goto out;
	}
	t = now() - t0;
	say("BENCH %s %.2f MiB/s\n", name, bytes / t / (1 << 20));
	irq_report(name, bytes / SEQ_BLOCK);
out:
	close(fd);
	free(buf);
}

struct rand_job {
	const char *dev;
	double deadline;
	uint64_t seed;
	uint64_t ops;
	int failed;
};

static void *rand_reader(void *p)
{
	struct rand_job *j = p;
	int fd = open(j->dev, O_RDONLY | O_DIRECT);
	char *buf = aligned(RAND_BLOCK);
	uint64_t blocks = disk_size / RAND_BLOCK;
	if (fd < 0 || !buf) {
		j->failed = errno ? errno : ENOMEM;
		goto out;
	}
	do {
		uint64_t off = (xorshift(&j->seed) % blocks) * RAND_BLOCK;
		if (pread(fd, buf, RAND_BLOCK, off) != RAND_BLOCK) {
			j->failed = errno ? errno : EIO;
			break;
		}
		j->ops++;
	} while (now() < j->deadline);
out:
	if (fd >= 0)
		close(fd);
	free(buf);
	return 0;
}

static void rand_read(const char *dev, int depth)
{
	struct rand_job jobs[QD];
	pthread_t tids[QD];
	irq_start();
	double t0 = now();
	for (int i = 0; i < depth; i++) {
		jobs[i] = (struct rand_job){ dev, t0 + seconds, 0x9e3779b97f4a7c15ull * (i + 1), 0, 0 };
		if (depth == 1) {
			rand_reader(&jobs[0]);
		} else if (pthread_create(&tids[i], 0, rand_reader, &jobs[i])) {
			say("BENCH error rand_read_qd%d: pthread_create failed\n", depth);
			depth = i;
			break;
		}
	}
	uint64_t ops = 0;
	int failed = 0;
	for (int i = 0; i < depth; i++) {
		if (depth > 1)
			pthread_join(tids[i], 0);
		ops += jobs[i].ops;
		failed |= jobs[i].failed;
	}
	double t = now() - t0;
	if (failed)
		say("BENCH error rand_read_qd%d: %s\n", depth, strerror(failed));
	else
		say("BENCH rand_read_qd%d %.0f IOPS\n", depth, ops / t);
	char name[32];
	snprintf(name, sizeof name, "rand_read_qd%d", depth);
	irq_report(name, ops);
}

static void blk(const char *dev)
{
	int fd = open(dev, O_RDONLY);
	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &disk_size) || disk_size < SEQ_BLOCK) {
		say("BENCH error blk: %s: %s\n", dev, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	seq(dev, 0);
	seq(dev, 1);
	rand_read(dev, 1);
	rand_read(dev, QD);
}

/* -- streams (TCP, vsock) --------------------------------------------------------------------- */

static int connect_to(const char *kind, const struct sockaddr *sa, socklen_t len)
{
	int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		say("BENCH error %s: socket: %s\n", kind, strerror(errno));
		return -1;
	}
	/* The host endpoint may need a moment after the guest's link comes up: retry ~5 s. */
	for (int tries = 0;; tries++) {
		if (!connect(fd, sa, len))
			return fd;
		if (tries == 50) {
			say("BENCH error %s: connect: %s\n", kind, strerror(errno));
			close(fd);
			return -1;
		}
		usleep(100000);
	}
}

static void stream(const char *kind, const struct sockaddr *sa, socklen_t len, int tx)
{
	char *buf = aligned(STREAM_CHUNK);
	char name[32];
	snprintf(name, sizeof name, "%s_%s", kind, tx ? "tx" : "rx");
	int fd = buf ? connect_to(name, sa, len) : -1;
	if (fd < 0) {
		free(buf);
		return;
	}
	char req[32];
	int rl = snprintf(req, sizeof req, "%s %.3f\n", tx ? "tx" : "rx", seconds);
	if (write(fd, req, rl) != rl) {
		say("BENCH error %s: request: %s\n", name, strerror(errno));
		goto out;
	}
	uint64_t bytes = 0;
	double t0 = now();
	if (tx) {
		do {
			ssize_t n = write(fd, buf, STREAM_CHUNK);
			if (n <= 0) {
				say("BENCH error %s: write: %s\n", name, strerror(errno));
				goto out;
			}
		} while (now() - t0 < seconds);
		shutdown(fd, SHUT_WR);
		char ans[64];
		size_t got = 0;
		ssize_t n;
		while (got + 1 < sizeof ans && (n = read(fd, ans + got, sizeof ans - 1 - got)) > 0)
			got += n;
		ans[got] = 0;
		bytes = strtoull(ans, 0, 10);
		if (!got || !bytes) {
			say("BENCH error %s: no byte count from the host\n", name);
			goto out;
		}
	} else {
		ssize_t n;
		while ((n = read(fd, buf, STREAM_CHUNK)) > 0)
			bytes += n;
		if (n < 0) {
			say("BENCH error %s: read: %s\n", name, strerror(errno));
			goto out;
		}
	}
	say("BENCH %s %.2f MiB/s\n", name, bytes / (now() - t0) / (1 << 20));
out:
	close(fd);
	free(buf);
}

static void tcp(const char *spec)
{
	char host[256];
	snprintf(host, sizeof host, "%s", spec);
	char *colon = strchr(host, ':');
	struct sockaddr_in sin = { .sin_family = AF_INET };
	if (!colon || inet_pton(AF_INET, (*colon = 0, host), &sin.sin_addr) != 1) {
		say("BENCH error tcp: bad bench.tcp=%s (expected IP:PORT)\n", spec);
		return;
	}
	sin.sin_port = htons(atoi(colon + 1));
	stream("tcp", (struct sockaddr *)&sin, sizeof sin, 1);
	stream("tcp", (struct sockaddr *)&sin, sizeof sin, 0);
}

static void vsock(const char *port)
{
	struct sockaddr_vm_ svm = { .svm_family = AF_VSOCK, .svm_cid = 2 };
	svm.svm_port = atoi(port);
	stream("vsock", (struct sockaddr *)&svm, sizeof svm, 1);
	stream("vsock", (struct sockaddr *)&svm, sizeof svm, 0);
}

int main(void)
{
	con = fopen("/dev/console", "w");
	if (!con)
		con = stdout;
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
		cmdline[n > 0 ? n : 0] = 0;
		if (n > 0 && cmdline[n - 1] == '\n')
			cmdline[n - 1] = 0;
		close(fd);
	}
	char v[256];
	if (arg("bench.seconds", v, sizeof v) && atof(v) > 0)
		seconds = atof(v);
	if (arg("bench.blk", v, sizeof v))
		blk(v);
	if (arg("bench.tcp", v, sizeof v))
		tcp(v);
	if (arg("bench.vsock", v, sizeof v))
		vsock(v);
	if (arg("bench.pause", v, sizeof v) && atof(v) > 0) {
		say("BENCH pause\n");
		usleep((useconds_t)(atof(v) * 1e6));
	}
	say("BENCH done\n");
	return 0;
}
