"""embervm side by side with QEMU microvm (and a raw C exit loop): ``make bench``.

One invocation builds what it needs, then runs each measurement ``--runs`` times (default 5)
per VMM, alternating the two run by run so both see the same host load, and prints the median,
min and max of every metric with the ratio embervm / reference.  docs/PERFORMANCE.md explains
the method and what limits each figure.

Metrics (guest: the embedded kit kernel, 1 vCPU, ``--mem`` MiB, the same command line words):

1. ``boot``: process start (just before ``fork``) to the ``GUEST-READY`` line on the console.
2. ``exit``: 200,000 port-I/O and MMIO exits of a hand-built guest through embervm's own exit
   loop (``exitbench.py``) against ``exitloop.c``, the same guest on raw KVM ioctls, taking
   turns in blocks on one vCPU.
3. ``blk``: the guest's ``benchtool`` on a virtio-blk disk (the same image file for both):
   sequential read/write with 1 MiB O_DIRECT requests, 4 KiB random reads at QD1 and QD16.
4. ``net``: TCP both ways between the guest and a host endpoint over a TAP device, inside a
   network namespace the benchmark creates (vmlinux-full); needs root and virtio-net.
5. ``vsock``: stream throughput both ways to a Unix-socket endpoint (embervm only).
6. ``rss``: the VMM's RSS minus its guest-RAM mapping, sampled while the guest pauses after the
   block tests (``/proc/PID/smaps``).
7. ``start``: process start to the first KVM_RUN: embervm logs it (``-v``), QEMU's
   ``kvm_vcpu_ioctl`` trace event shows it (separate short runs, killed once it is seen).

Run: ``python benchmarks/bench.py [--quick] [--runs N] [--only boot,exit,...] [--out DIR]``.
``--quick`` (one run, shorter tests, 50,000 exits) is for development; numbers need the full run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
try:
    import embervm
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
    import embervm

from embervm import images  # noqa: E402
from embervm.config import CMDLINE_EMBERVM, CMDLINE_RECOMMENDED, CMDLINE_REQUIRED  # noqa: E402

METRIC_GROUPS = ("boot", "exit", "blk", "net", "vsock", "rss", "start", "api")
QEMU = "qemu-system-x86_64"
# The reference command of guest/README.md: microvm without ACPI, the CPU model that works on
# the PVM host, an i8042 so the guest's reboot=k ends QEMU.
QEMU_BASE = [
    QEMU, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
    "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-device", "i8042", "-serial", "stdio",
]  # fmt: skip
NETNS = f"embervm-bench-{os.getpid()}"
TAP = "emb0"
HOST_IP, GUEST_IP, NET_PORT = "10.77.0.1", "10.77.0.2", 5201
VSOCK_PORT = 5202

# (group, key, label, unit, higher_is_better, target as (comparison, value) or None)
METRICS: list[tuple[str, str, str, str, bool, tuple[str, float] | None]] = [
    ("boot", "boot", "boot: start -> GUEST-READY", "s", False, ("<=", 0.80)),
    ("start", "start", "start -> first KVM_RUN", "ms", False, ("<=", 1.0)),
    ("api", "api_sock", "API socket accepting after exec (QEMU: QMP)", "ms", False,
     ("abs<=", 50.0)),
    ("api", "api_istart", "InstanceStart -> first KVM_RUN", "ms", False, ("abs<=", 20.0)),
    ("api", "api_get_p50", "GET / latency, median (QEMU: QMP query-status)", "us", False,
     None),
    ("api", "api_get_p99", "GET / latency, p99 (QEMU: QMP query-status)", "us", False, None),
    ("api", "api_patch_p50", "PATCH /machine-config latency, median", "us", False, None),
    ("api", "api_patch_p99", "PATCH /machine-config latency, p99", "us", False, None),
    ("exit", "pio_out", "exit: PIO out (port 0x80 sink)", "us", False, ("<=", 1.10)),
    ("exit", "mmio_write", "exit: MMIO write (virtio ACK)", "us", False, ("<=", 1.10)),
    ("exit", "pio_in", "exit: PIO in (8250 LSR)", "us", False, None),
    ("exit", "mmio_read", "exit: MMIO read (virtio ISR)", "us", False, None),
    ("blk", "seq_read", "blk: seq read 1 MiB", "MiB/s", True, (">=", 1.0)),
    ("blk", "seq_write", "blk: seq write 1 MiB", "MiB/s", True, (">=", 1.0)),
    ("blk", "rand_read_qd1", "blk: 4K rand read QD1", "IOPS", True, (">=", 1.0)),
    ("blk", "rand_read_qd16", "blk: 4K rand read QD16", "IOPS", True, (">=", 1.0)),
    ("blk", "seq_read_irq_per_op", "  guest interrupts per request, seq read", "irq", False,
     None),
    ("blk", "rand_read_qd1_irq_per_op", "  ... rand read QD1", "irq", False, None),
    ("blk", "rand_read_qd16_irq_per_op", "  ... rand read QD16", "irq", False, None),
    ("net", "tcp_tx", "net: TCP guest -> host", "MiB/s", True, (">=", 1.0)),
    ("net", "tcp_rx", "net: TCP host -> guest", "MiB/s", True, (">=", 1.0)),
    ("vsock", "vsock_tx", "vsock: guest -> host", "MiB/s", True, None),
    ("vsock", "vsock_rx", "vsock: host -> guest", "MiB/s", True, None),
    ("rss", "rss_overhead", "VMM RSS minus guest RAM", "MiB", False, ("abs<=", 25.0)),
    ("rss", "rss_private", "  of which private", "MiB", False, None),
    ("rss", "rss_guest", "guest RAM resident", "MiB", False, None),
]


@dataclass
class Settings:
    runs: int
    seconds: float
    exits: int
    mem_mib: int
    disk_mib: int
    out: Path
    groups: tuple[str, ...]
    timeout: float


@dataclass
class Samples:
    """metric key -> VMM name ("embervm", "qemu", "c") -> values."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # metric key -> VMM -> round -> value: the two VMMs' runs of one round ran back to back.
    rounds: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, vmm: str, value: float, round_: int | None = None) -> None:
        self.values.setdefault(key, {}).setdefault(vmm, []).append(value)
        if round_ is not None:
            self.rounds.setdefault(key, {}).setdefault(vmm, {})[round_] = value

    def ratio(self, key: str, vmm: str, ref: str) -> float | None:
        """embervm / reference: the median of the per-round ratios when the runs were paired
        (each round's two runs saw the same host load, so a load change between rounds
        cancels), else the ratio of the medians."""
        per = self.rounds.get(key, {})
        a, b = per.get(vmm, {}), per.get(ref, {})
        paired = [a[i] / b[i] for i in a.keys() & b.keys() if b[i]]
        if paired:
            return statistics.median(paired)
        emb, other = self.values.get(key, {}).get(vmm), self.values.get(key, {}).get(ref)
        if not emb or not other or not statistics.median(other):
            return None
        return statistics.median(emb) / statistics.median(other)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- preparation --------------------------------------------------------------------------------


def ensure_tool(need: str, package: str) -> None:
    """Install ``package`` with apt-get when ``need`` (a command, or an absolute path) is
    missing and we are root; otherwise say what to install."""

    def present() -> bool:
        return Path(need).exists() if need.startswith("/") else shutil.which(need) is not None

    if present():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"{need} missing: apt-get install -y {package}")
        subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True,
                       stdout=subprocess.DEVNULL)
    if not present():
        raise SystemExit(f"bench: {need} is missing; install it: apt-get install -y {package}")


def newc_cpio(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A newc cpio archive of regular files ``name -> (data, mode)``, then the trailer."""
    out = bytearray()
    ino = 0x7000

    def entry(name: str, data: bytes, mode: int) -> None:
        nonlocal ino
        ino += 1
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, (data, mode) in files.items():
        entry(name, data, mode)
    entry("TRAILER!!!", b"", 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


@dataclass
class Artifacts:
    exitloop: Path
    exitlib: Path
    initrd: Path
    disk: Path
    kernel_base: Path
    kernel_full: Path
    tsc_khz: int | None


def tsc_khz() -> int | None:
    """KVM_GET_TSC_KHZ, as embervm puts it on the guest command line."""
    from embervm.errors import EmbervmError
    from embervm.kvm import Kvm

    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            return vm.create_vcpu(0).get_tsc_khz()
    except EmbervmError:
        return None


def prepare(s: Settings) -> Artifacts:
    ensure_tool(QEMU, "qemu-system-x86")
    ensure_tool("gcc", "gcc")
    # The static C library for the guest tool (Debian's multiarch path).
    libc_a = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True,
                            text=True).stdout.strip()
    ensure_tool(libc_a if libc_a.startswith("/") else "/usr/lib/x86_64-linux-gnu/libc.a",
                "libc6-dev")
    s.out.mkdir(parents=True, exist_ok=True)
    # embervm as an installation runs it: bytecode compiled once (pip does it at install time),
    # not recompiled at every start because the environment sets PYTHONDONTWRITEBYTECODE (this
    # development machine does: +40 ms of start-up).  The cache stays out of the source tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(s.out.resolve() / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(embervm.__file__).parent)],
                   check=True, stdout=subprocess.DEVNULL)
    # ... and the standard library's, which a cache prefix relocates too.
    subprocess.run([sys.executable, "-c", "import embervm.cli, embervm.vmm, pkgutil, importlib\n"
                    "for m in pkgutil.walk_packages(embervm.__path__, 'embervm.'):\n"
                    "    importlib.import_module(m.name)"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exitloop = s.out / "exitloop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exitloop, HERE / "exitloop.c"], check=True)
    exitlib = s.out / "exitloop.so"
    subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-DEXITLOOP_LIB", "-o", exitlib,
                    HERE / "exitloop.c"], check=True)
    tool = s.out / "benchtool"
    subprocess.run(["gcc", "-O2", "-s", "-static", "-pthread", "-Wall", "-o", tool,
                    ROOT / "guest/helpers/benchtool.c"], check=True)
    # The kit's tiny init (uncompressed: inflating runs emulated in the guest) + the tool.  The
    # kernel unpacks concatenated archives in order.
    initrd = s.out / "initramfs-bench.cpio"
    tiny = images.image("initramfs-tiny").read_bytes()
    initrd.write_bytes(tiny + b"\0" * (-len(tiny) % 512)
                       + newc_cpio({"benchtool": (tool.read_bytes(), 0o100755)}))
    disk = s.out / "disk.img"
    want = s.disk_mib << 20
    if not disk.exists() or disk.stat().st_size != want:
        # Written data, not a sparse file: reads of holes would be cheaper than real reads.
        with open(disk, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(s.disk_mib):
                f.write(block)
    return Artifacts(exitloop, exitlib, initrd, disk, images.image("vmlinux-base"),
                     images.image("vmlinux-full"), tsc_khz())


def cmdline(art: Artifacts, extra: str) -> str:
    """The same words for both VMMs: embervm's defaults (required + recommended + acpi=off +
    TSC frequency).  Each VMM adds its own virtio_mmio.device= words."""
    tsc = f" tsc_early_khz={art.tsc_khz} tsc=reliable" if art.tsc_khz else ""
    return f"{CMDLINE_REQUIRED} {CMDLINE_RECOMMENDED} {CMDLINE_EMBERVM}{tsc} {extra}".strip()


def embervm_cmd(kernel: Path, initrd: Path, mem: int, words: str, disks: list[Path],
                extra: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("embervm")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "embervm.cli"]
    argv = head + ["run", "--kernel", str(kernel), "--initrd", str(initrd), "--mem", str(mem),
                   "--serial", "stdio", "--cmdline", words]
    for d in disks:
        argv += ["--disk", str(d)]
    return argv + extra


def qemu_cmd(kernel: Path, initrd: Path, mem: int, words: str, disks: list[Path],
             extra: list[str]) -> list[str]:
    argv = QEMU_BASE + ["-m", str(mem), "-kernel", str(kernel), "-initrd", str(initrd),
                        "-append", words]
    for i, d in enumerate(disks):
        argv += ["-drive", f"id=d{i},file={d},format=raw,if=none",
                 "-device", f"virtio-blk-device,drive=d{i}"]
    return argv + extra


# -- running a guest ----------------------------------------------------------------------------


@dataclass
class GuestRun:
    boot_s: float | None = None
    results: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] | None = None
    errors: list[str] = field(default_factory=list)
    status: int | None = None
    log: list[str] = field(default_factory=list)


def _pump(stream: object, name: str, q: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        q.put((name, time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))
    q.put((name, time.monotonic(), None))


@contextlib.contextmanager
def spawn(argv: list[str]) -> Iterator[tuple[subprocess.Popen, float, queue.Queue]]:
    """Start ``argv`` with its stdout and stderr lines timestamped into a queue; yields
    (process, monotonic start, queue).  The process is killed on the way out if still alive."""
    q: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    for stream, name in ((p.stdout, "out"), (p.stderr, "err")):
        threading.Thread(target=_pump, args=(stream, name, q), daemon=True).start()
    try:
        yield p, t0, q
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def run_guest(argv: list[str], mem_mib: int, timeout: float) -> GuestRun:
    r = GuestRun()
    with spawn(argv) as (p, t0, q):
        open_streams = 2
        deadline = t0 + timeout
        while open_streams:
            try:
                name, t, line = q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                r.errors.append(f"timeout after {timeout:.0f} s")
                break
            if line is None:
                open_streams -= 1
                continue
            r.log.append(f"{t - t0:8.3f} {name} {line}")
            if name != "out":
                continue
            if r.boot_s is None and "GUEST-READY" in line:
                r.boot_s = t - t0
            m = re.search(r"BENCH (\S+)(?: (.*))?$", line)
            if not m:
                continue
            what, rest = m.group(1), m.group(2) or ""
            if what == "error":
                r.errors.append(rest)
            elif what == "pause":
                r.rss = vmm_memory(p.pid, mem_mib << 20)
            elif what != "done":
                with contextlib.suppress(ValueError, IndexError):
                    r.results[what] = float(rest.split()[0])
        if p.poll() is None:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                r.errors.append("the VMM did not exit after the guest finished")
        r.status = p.poll()
    if r.status not in (0, None) and not r.errors:
        r.errors.append(f"exit status {r.status}")
    return r


def vmm_memory(pid: int, guest_bytes: int) -> dict[str, float] | None:
    """RSS of the VMM minus its guest RAM: the anonymous mapping(s) of at least half the guest
    size (embervm: one mmap of exactly that size; QEMU: its RAM block), from /proc/PID/smaps."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    total = guest = private = 0
    size = 0
    anon = False
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
    for line in text.splitlines():
        m = header.match(line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
            anon = m.group(3) in ("", "[anon]") or m.group(3).startswith("[anon:")
            is_guest = anon and size >= guest_bytes // 2
            continue
        key, _, rest = line.partition(":")
        if key == "Rss":
            kb = int(rest.split()[0])
            total += kb
            if is_guest:
                guest += kb
        elif key in ("Private_Clean", "Private_Dirty") and not is_guest:
            private += int(rest.split()[0])
    mib = 1024.0
    return {"rss_overhead": (total - guest) / mib, "rss_private": private / mib,
            "rss_guest": guest / mib, "rss_total": total / mib}


# -- the measurements ---------------------------------------------------------------------------


def alternate(i: int) -> tuple[str, str]:
    return ("embervm", "qemu") if i % 2 == 0 else ("qemu", "embervm")


def bench_guest(s: Settings, art: Artifacts, samples: Samples) -> None:
    """boot, blk and rss: one guest run per VMM and round."""
    blk = "blk" in s.groups
    words = cmdline(art, "tinyinit.noblk tinyinit.cmd=/benchtool bench.pause=1.5 "
                    + (f"bench.blk=/dev/vda bench.seconds={s.seconds:g}" if blk else ""))
    disks = [art.disk] if blk else []
    for i in range(s.runs):
        for vmm in alternate(i):
            make = embervm_cmd if vmm == "embervm" else qemu_cmd
            argv = make(art.kernel_base, art.initrd, s.mem_mib, words, disks, [])
            r = run_guest(argv, s.mem_mib, s.timeout)
            summary = ", ".join(f"{k} {v:g}" for k, v in r.results.items())
            log(f"run {i + 1} {vmm}: boot {r.boot_s and round(r.boot_s, 2)} s; {summary}"
                + (f"; errors: {r.errors}" if r.errors else ""))
            if r.errors:
                samples.notes.append(f"run {i + 1} {vmm}: {'; '.join(r.errors)}")
                dump = s.out / f"failed-{vmm}-{i + 1}.log"
                dump.write_text("\n".join(r.log) + "\n")
            if r.boot_s is not None:
                samples.add("boot", vmm, r.boot_s, i)
            for k, v in r.results.items():
                samples.add(k, vmm, v, i)
            if r.rss:
                for k, v in r.rss.items():
                    samples.add(k, vmm, v, i)


def bench_exits(s: Settings, art: Artifacts, samples: Samples) -> None:
    """exitbench.py with the C loop as a library: both loops serve the same guest on the same
    vCPU in alternating blocks, so both see the same host load."""
    argv = [sys.executable, str(HERE / "exitbench.py"), str(s.exits), "--c-lib",
            str(art.exitlib)]
    for i in range(s.runs):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if out.returncode:
            samples.notes.append(f"exit run {i + 1}: {out.stderr.strip()[-300:]}")
            continue
        for line in out.stdout.splitlines():
            m = re.match(r"(\w+) exits=\d+ embervm_us=(\S+) c_us=(\S+)", line)
            if m:
                samples.add(m.group(1), "embervm", float(m.group(2)), i)
                samples.add(m.group(1), "c", float(m.group(3)), i)
        log(f"exit run {i + 1}: {out.stdout.strip().replace(chr(10), '; ')}")


def bench_start(s: Settings, art: Artifacts, samples: Samples) -> None:
    """Process start -> first KVM_RUN; short runs, killed once the first KVM_RUN is seen."""
    words = cmdline(art, "tinyinit.noblk")
    for i in range(s.runs):
        for vmm in alternate(i):
            if vmm == "embervm":
                argv = embervm_cmd(art.kernel_base, art.initrd, s.mem_mib, words, [], ["-v"])
                pattern = re.compile(r"first KVM_RUN at monotonic (\d+\.\d+)")
            else:
                argv = qemu_cmd(art.kernel_base, art.initrd, s.mem_mib, words, [],
                                ["-msg", "timestamp=on", "-trace", "kvm_vcpu_ioctl"])
                pattern = re.compile(r"^\d+@(\d+\.\d+):kvm_vcpu_ioctl .*type 0xae80\b")
            wall0 = time.time()
            value = None
            with spawn(argv) as (p, t0, q):
                deadline = t0 + 30
                while value is None and time.monotonic() < deadline:
                    try:
                        name, _t, line = q.get(timeout=1)
                    except queue.Empty:
                        continue
                    m = pattern.search(line or "")
                    if m and name == "err":
                        # embervm logs CLOCK_MONOTONIC; QEMU's trace stamps gettimeofday().
                        stamp = float(m.group(1))
                        value = (stamp - t0) if vmm == "embervm" else (stamp - wall0)
                p.send_signal(signal.SIGTERM)
            if value is None:
                samples.notes.append(f"start run {i + 1} {vmm}: no first-KVM_RUN marker")
            else:
                samples.add("start", vmm, value * 1000, i)
                log(f"start run {i + 1} {vmm}: first KVM_RUN after {value * 1000:.1f} ms")


def bench_api(s: Settings, art: Artifacts, samples: Samples) -> None:
    """The control plane against QEMU's QMP: benchmarks/api_bench.py (one untimed round first,
    so both run from a warm page cache and embervm from its compiled bytecode)."""
    sys.path.insert(0, str(HERE))
    import api_bench

    api_bench.measure(art.kernel_base, art.initrd, 1, 50)
    api_bench.measure(art.kernel_base, art.initrd, s.runs, 1000, samples.add)
    log("api: done")


def landed(path: str) -> bool:
    """Whether ``path`` is part of the checkout's committed tree (a device being written in the
    work tree right now is not ready to be measured); without git, whether it exists."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"HEAD:{path}"],
                              capture_output=True).returncode == 0
    return (ROOT / path).exists()


def _net_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace and TAP)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    if not landed("src/embervm/devices/virtio/net.py"):
        return "pending: virtio-net (src/embervm/devices/virtio/net.py) has not landed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def netns() -> Iterator[None]:
    """A private network namespace with one TAP (HOST_IP/24), removed afterwards."""
    _ip("netns", "add", NETNS)
    try:
        _ip("-n", NETNS, "link", "set", "lo", "up")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, capture_output=True)


def _fresh_tap() -> None:
    """(Re)create the TAP, so each VMM finds it in the same state."""
    subprocess.run(["ip", "-n", NETNS, "link", "del", TAP], check=False, capture_output=True)
    _ip("-n", NETNS, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    _ip("-n", NETNS, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    _ip("-n", NETNS, "link", "set", TAP, "up")


@contextlib.contextmanager
def stream_server(argv_prefix: list[str], *args: str) -> Iterator[None]:
    p = subprocess.Popen(argv_prefix + [sys.executable, str(HERE / "streamserver.py"), *args],
                         stdout=subprocess.PIPE, text=True)
    try:
        if p.stdout is None or p.stdout.readline().strip() != "ready":
            raise SystemExit("bench: the stream server did not start")
        yield
    finally:
        p.kill()
        p.wait()


def bench_net(s: Settings, art: Artifacts, samples: Samples) -> None:
    why = _net_available()
    if why:
        samples.notes.append(f"net: {why}")
        log(f"net skipped: {why}")
        return
    ip_word = f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    words = cmdline(art, f"tinyinit.noblk tinyinit.cmd=/benchtool {ip_word} "
                    f"bench.tcp={HOST_IP}:{NET_PORT} bench.seconds={s.seconds:g}")
    inside = ["ip", "netns", "exec", NETNS]
    # Bound to every address of the private namespace: the TAP (and HOST_IP) is made anew for
    # each run, and nothing but the guest can reach the namespace.
    with netns(), stream_server(inside, "tcp", "0.0.0.0", str(NET_PORT)):
        for i in range(s.runs):
            for vmm in alternate(i):
                _fresh_tap()
                if vmm == "embervm":
                    argv = embervm_cmd(art.kernel_full, art.initrd, s.mem_mib, words, [],
                                       ["--net", f"tap={TAP}"])
                else:
                    argv = qemu_cmd(art.kernel_full, art.initrd, s.mem_mib, words, [], [
                        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                        "-device", "virtio-net-device,netdev=n0"])
                r = run_guest(inside + argv, s.mem_mib, s.timeout)
                log(f"net run {i + 1} {vmm}: {r.results} {r.errors or ''}")
                if r.errors:
                    samples.notes.append(f"net run {i + 1} {vmm}: {'; '.join(r.errors)}")
                    (s.out / f"failed-net-{vmm}-{i + 1}.log").write_text("\n".join(r.log))
                for k, v in r.results.items():
                    samples.add(k, vmm, v, i)


def bench_vsock(s: Settings, art: Artifacts, samples: Samples) -> None:
    if not landed("src/embervm/devices/virtio/vsock.py"):
        why = "pending: virtio-vsock (src/embervm/devices/virtio/vsock.py) has not landed"
        samples.notes.append(f"vsock: {why}")
        log(f"vsock skipped: {why}")
        return
    uds = s.out / "vsock.sock"
    words = cmdline(art, f"tinyinit.noblk tinyinit.cmd=/benchtool bench.vsock={VSOCK_PORT} "
                    f"bench.seconds={s.seconds:g}")
    # Firecracker's hybrid vsock: a guest connecting to CID 2 port P reaches <uds>_P.
    with stream_server([], "unix", f"{uds}_{VSOCK_PORT}"):
        for i in range(s.runs):
            argv = embervm_cmd(art.kernel_full, art.initrd, s.mem_mib, words, [],
                               ["--vsock", f"cid=3,uds={uds}"])
            r = run_guest(argv, s.mem_mib, s.timeout)
            log(f"vsock run {i + 1}: {r.results} {r.errors or ''}")
            if r.errors:
                samples.notes.append(f"vsock run {i + 1}: {'; '.join(r.errors)}")
                (s.out / f"failed-vsock-{i + 1}.log").write_text("\n".join(r.log))
            for k, v in r.results.items():
                samples.add(k, "embervm", v)


# -- report -------------------------------------------------------------------------------------


def host_info() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "kvm": "PVM (kvm_pvm)" if Path("/sys/module/kvm_pvm").exists() else "KVM",
        "qemu": qemu.splitlines()[0] if qemu else "",
        "python": platform.python_version(),
    }


def other_vmms() -> int:
    """VMM processes on the host that are not ours (the load the numbers were taken under)."""
    mine = os.getpid()
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != mine and (b"qemu-system" in cmd or b"embervm" in cmd and b" run" in cmd):
                n += 1
    return n


def report(samples: Samples, s: Settings, meta: dict[str, object]) -> str:
    def cell(vals: list[float] | None) -> str:
        if not vals:
            return "-"
        med = statistics.median(vals)
        fmt = (lambda v: f"{v:.0f}") if med >= 100 else (lambda v: f"{v:.2f}")
        return f"{fmt(med)} [{fmt(min(vals))}-{fmt(max(vals))}]"

    lines = [
        "| metric | unit | embervm | reference | ref. | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, key, label, unit, _higher, target in METRICS:
        if group not in s.groups:
            continue
        per = samples.values.get(key, {})
        emb = per.get("embervm")
        ref_name = "c" if group == "exit" else "qemu"
        ref = per.get(ref_name)
        r = samples.ratio(key, "embervm", ref_name)
        tgt = ""
        if target:
            op, val = target
            if op == "abs<=":
                tgt = f"<= {val:g} {unit}"
                ok = emb is not None and statistics.median(emb) <= val
            else:
                tgt = f"{op} {val:g}x"
                ok = r is not None and (r <= val if op == "<=" else r >= val)
            tgt += " ok" if ok else (" MISSED" if emb else "")
        ref_label = {"c": "C loop", "qemu": "QEMU"}[ref_name] if ref else "-"
        lines.append(f"| {label} | {unit} | {cell(emb)} | {cell(ref)} | {ref_label} | "
                     f"{'-' if r is None else f'{r:.2f}'} | {tgt} |")
    head = (f"embervm vs {meta['host']['qemu']} microvm, {s.runs} run(s) each, alternating; "
            f"median [min-max]; guest {s.mem_mib} MiB, 1 vCPU; tests {s.seconds:g} s; "
            f"{s.exits} exits per exit row; ratio: median of the per-round ratios\n"
            f"host: {meta['host']['cpu']}, {meta['host']['cores']} cores, "
            f"{meta['host']['kvm']}, Linux {meta['host']['kernel']}, Python "
            f"{meta['host']['python']}; load average {meta['load_before']} before, "
            f"{meta['load_after']} after; other VMMs running: {meta['other_vmms_before']} "
            f"before, {meta['other_vmms_after']} after; took {meta['seconds']:.0f} s\n")
    notes = "".join(f"\nnote: {n}" for n in samples.notes)
    return head + "\n" + "\n".join(lines) + "\n" + notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one run, 1.5 s tests, 50,000 exits (development)")
    ap.add_argument("--runs", type=int, help="runs per VMM (default 5, --quick 1)")
    ap.add_argument("--seconds", type=float, help="length of each guest test (default 4)")
    ap.add_argument("--exits", type=int, help="exits per exit-cost row (default 200000)")
    ap.add_argument("--mem", type=int, default=128, help="guest MiB (default 128)")
    ap.add_argument("--disk-mib", type=int, default=256, help="disk image size (default 256)")
    ap.add_argument("--only", default=",".join(METRIC_GROUPS),
                    help=f"comma-separated subset of {','.join(METRIC_GROUPS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "out/bench",
                    help="work and results directory (default out/bench)")
    a = ap.parse_args(argv)
    groups = tuple(g for g in a.only.split(",") if g)
    bad = set(groups) - set(METRIC_GROUPS)
    if bad:
        ap.error(f"unknown metric group(s): {', '.join(sorted(bad))}")
    s = Settings(
        runs=a.runs or (1 if a.quick else 5),
        seconds=a.seconds or (1.5 if a.quick else 4.0),
        exits=a.exits or (50_000 if a.quick else 200_000),
        mem_mib=a.mem, disk_mib=a.disk_mib, out=a.out, groups=groups,
        timeout=120.0,
    )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise SystemExit("bench: /dev/kvm is missing or not accessible")
    start = time.monotonic()
    meta: dict[str, object] = {"load_before": os.getloadavg(),
                               "other_vmms_before": other_vmms()}
    art = prepare(s)
    samples = Samples()
    # Cheapest first, so a broken set-up shows early.  A failing group is noted, not fatal.
    steps = [("start", bench_start), ("api", bench_api), ("exit", bench_exits),
             ("guest", bench_guest),
             ("net", bench_net), ("vsock", bench_vsock)]
    for name, step in steps:
        wanted = {"boot", "blk", "rss"} & set(groups) if name == "guest" else name in groups
        if not wanted:
            continue
        try:
            step(s, art, samples)
        except (Exception, SystemExit) as e:  # report what the other groups measured
            samples.notes.append(f"{name}: failed: {e!r}")
            log(f"{name} failed: {e!r}")
    meta.update(load_after=os.getloadavg(), other_vmms_after=other_vmms(),
                seconds=time.monotonic() - start, host=host_info(),
                settings={k: str(v) for k, v in vars(s).items()})
    meta["load_before"] = " ".join(f"{x:.2f}" for x in meta["load_before"])  # type: ignore
    meta["load_after"] = " ".join(f"{x:.2f}" for x in meta["load_after"])  # type: ignore
    text = report(samples, s, meta)
    print(text)
    (s.out / "results.md").write_text(text)
    (s.out / "results.json").write_text(json.dumps(
        {"meta": meta, "samples": samples.values, "rounds": samples.rounds,
         "notes": samples.notes}, indent=1))
    log(f"results in {s.out / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
