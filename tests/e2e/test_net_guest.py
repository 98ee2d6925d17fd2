"""virtio-net against the real Linux guest, on a TAP inside a network namespace of its own.

The test creates a namespace (``ip netns add``) with one TAP in it (10.0.2.1/24, IPv6 off) and
runs embervm inside it (``ip netns exec``) with ``--net tap=...,mac=...``; the guest configures
eth0 from the kernel command line (``ip=10.0.2.15::10.0.2.1:...``, ``ipv6.disable=1``).  So the
only traffic there is, ever, is between those two addresses, and the namespace goes away at the
end whatever happened.

Host side: one Python helper process inside the namespace (source below, ``HOST_HELPER``) takes
JSON commands on stdin: raw ICMP echo to the guest, TCP source/sink on two ports (CRC-32 and
timing of everything it moves), and a packet socket on the TAP that records every frame's
addresses from before the guest boots to the end.  Guest side: a script that reads one-word
commands from the serial console (the test writes to embervm's stdin) and ``netxfer``
(guest/helpers/netxfer.c, compiled static here) for the bulk transfers: in this guest a system
call costs ~0.9 ms and every byte crossing a pipe is copied twice by emulated kernel code, which
makes ``dd | nc`` take tens of minutes for 32 MiB (see netxfer.c).  The guest raises
``tcp_min_tso_segs``: at the low rates of an emulated kernel, TCP's TSO autosizing would keep
its segments at two MSS and never use the 64 KiB TSO the device offers.

One boot, several phases (one fixture records them, each test asserts on one part):
ping both ways with 56-, 1472- (a 1500-byte IP packet) and 1-byte payloads; 32 MiB each way
with checksum equality, timed; link down/up through the control socket seen by the guest as
carrier changes; driver unbind/bind through sysfs, then ping and a transfer again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Record, StepFailed, build_guest_helper, embervm_cmd

from embervm.control import request
from embervm.testing.initramfs import extend_initramfs

HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
MAC = "52:54:00:12:34:56"
TAP = "evtap0"
BULK = 32 << 20
SMALL = 1 << 20
RX_PORT, TX_PORT = 5002, 5001  # guest receives from 5002, sends to 5001
STEP_TIMEOUT = 300.0

GUEST_SCRIPT = r"""
echo 44 >/proc/sys/net/ipv4/tcp_min_tso_segs
# wait_for FILE VALUE: carrier and operstate change asynchronously (config work, linkwatch)
wait_for() {
	n=0
	while [ "$(cat $1 2>/dev/null)" != "$2" ] && [ $n -lt 100 ]; do
		usleep 100000
		n=$((n + 1))
	done
}
drv=/sys/bus/virtio/drivers/virtio_net
dev=none
for d in $drv/virtio*; do dev=${d##*/}; done
echo "NETDEV $dev $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/operstate)"
echo "FEATURES $(cat /sys/bus/virtio/devices/$dev/features)"
echo "NET-READY"
while :; do
	read -t 1 cmd a b c d || continue
	case "$cmd" in
	ping)
		ping -c "$b" -W 10 -s "$a" %(host)s >/tmp/ping.txt 2>&1
		rc=$?
		echo "PING $a rc=$rc $(grep 'packets received' /tmp/ping.txt)"
		;;
	xfer)
		/bin/netxfer recv %(host)s %(rx)d
		/bin/netxfer send %(host)s %(tx)d "$a" "$b"
		;;
	carrier)
		wait_for /sys/class/net/eth0/carrier "$a"
		echo "CARRIER $(cat /sys/class/net/eth0/carrier) $(cat /sys/class/net/eth0/operstate)"
		;;
	rebind)
		echo $dev >$drv/unbind
		echo "UNBOUND $?"
		echo $dev >$drv/bind
		echo "REBOUND $?"
		ip addr add %(guest)s/24 dev eth0
		ip link set eth0 up
		wait_for /sys/class/net/eth0/operstate up
		echo "REBOUND-UP $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/operstate)"
		;;
	done)
		echo "DONE done"
		break
		;;
	esac
	echo "DONE $cmd"
done
"""

HOST_HELPER = r"""
import json, os, select, socket, struct, sys, threading, time, zlib
host, guest, tap, rx_port, tx_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5])
seen = {"ethertypes": set(), "ipv4": set(), "arp": set(), "frames": 0}
lock = threading.Lock()

def sniff(sock):
    while True:
        frame = sock.recv(128)
        with lock:
            seen["frames"] += 1
            etype = struct.unpack_from("!H", frame, 12)[0]
            seen["ethertypes"].add(etype)
            if etype == 0x0800 and len(frame) >= 34:
                seen["ipv4"].add(socket.inet_ntoa(frame[26:30]))
                seen["ipv4"].add(socket.inet_ntoa(frame[30:34]))
            elif etype == 0x0806 and len(frame) >= 42:
                seen["arp"].add(socket.inet_ntoa(frame[28:32]))
                seen["arp"].add(socket.inet_ntoa(frame[38:42]))

packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
packet.bind((tap, 0))
threading.Thread(target=sniff, args=(packet,), daemon=True).start()
listeners = {p: socket.create_server((host, p), backlog=4) for p in (rx_port, tx_port)}
for s in listeners.values():
    s.settimeout(300)

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF

def ping(size, count):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(count):
        payload = bytes((seq * 7 + i) & 0xFF for i in range(size))
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        t0 = time.monotonic()
        s.sendto(body, (guest, 0))
        while True:
            left = t0 + 10 - time.monotonic()
            if left <= 0 or not select.select([s], [], [], left)[0]:
                break
            data, (src, _) = s.recvfrom(65535)
            icmp = data[(data[0] & 15) * 4:]
            if src == guest and icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                if icmp[8:] == payload and checksum(icmp) == 0:
                    rtts.append(round((time.monotonic() - t0) * 1000, 2))
                break
    s.close()
    return {"sent": count, "received": len(rtts), "rtt_ms": rtts}

def send(nbytes):
    data = os.urandom(nbytes)
    c, _ = listeners[rx_port].accept()
    t0 = time.monotonic()
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):  # the guest closes once it has read everything
        pass
    dt = time.monotonic() - t0
    c.close()
    return {"bytes": nbytes, "crc32": "%08x" % zlib.crc32(data), "seconds": dt}

def recv():
    c, _ = listeners[tx_port].accept()
    t0 = time.monotonic()
    n, crc = 0, 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
        crc = zlib.crc32(b, crc)
    dt = time.monotonic() - t0
    c.close()
    return {"bytes": n, "crc32": "%08x" % crc, "seconds": dt}

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "ping":
            out = ping(cmd["size"], cmd["count"])
        elif cmd["op"] == "send":
            out = send(cmd["bytes"])
        elif cmd["op"] == "recv":
            out = recv()
        else:
            with lock:
                out = {k: sorted(v) if isinstance(v, set) else v for k, v in seen.items()}
    except Exception as e:
        out = {"error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(out), flush=True)
"""


@dataclass
class _Record(Record):
    step: str = "setup"


class Lines:
    """A child process's stdout collected line by line on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))

    def wait(self, pred, start: int = 0, what: str = "line") -> tuple[int, str]:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            for i in range(start, len(self.lines)):
                if pred(self.lines[i]):
                    return i, self.lines[i]
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the reader catch the last lines
                if not any(pred(x) for x in self.lines[start:]):
                    raise StepFailed(f"{what}: process exited with status "
                                     f"{self.proc.returncode}")
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: nothing within {STEP_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def join(self) -> None:
        self._thread.join(10)


class HostHelper:
    """The host side inside the namespace: one JSON command in, one JSON reply out."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", HOST_HELPER, HOST_IP, GUEST_IP,
             TAP, str(RX_PORT), str(TX_PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = Lines(self.proc)
        self._next = 0

    def start(self) -> None:
        if self.reply(what="helper start") != {"ready": True}:
            raise StepFailed("host helper did not start")

    def post(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, what: str = "helper") -> dict:
        i, line = self.out.wait(lambda x: True, self._next, what)
        self._next = i + 1
        out = json.loads(line)
        if "error" in out:
            raise StepFailed(f"{what}: {out['error']}")
        return out

    def call(self, what: str, **cmd: Any) -> dict:
        self.post(**cmd)
        return self.reply(what)

    def finish(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.out.join()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


class Vm:
    """embervm inside the namespace; guest commands go to its serial console (stdin)."""

    def __init__(self, ns: str, args: list[str], stderr_path: Path) -> None:
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in finish()
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *embervm_cmd(*args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self.console = Lines(self.proc)

    def command(self, line: str) -> int:
        """Send one command; return the console index from which its output starts."""
        start = len(self.console.lines)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return start

    def run(self, line: str) -> list[str]:
        """Send a command and wait for the script's ``DONE``; return the lines it printed."""
        start = self.command(line)
        word = line.split()[0]
        end, _ = self.console.wait(lambda x: x == f"DONE {word}", start, f"guest {line!r}")
        return self.console.lines[start:end]

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.console.join()
        self._stderr.close()


def _one(lines: list[str], prefix: str) -> str:
    found = [x for x in lines if x.startswith(prefix)]
    if not found:
        raise StepFailed(f"no {prefix!r} line in {lines}")
    return found[-1]


def _netxfer(line: str) -> dict[str, Any]:
    words = dict(w.split("=", 1) for w in line.split()[2:])
    return {"bytes": int(words["bytes"]), "crc32": words["crc32"],
            "seconds": int(words["usec"]) / 1e6}


def _pings(vm: Vm, helper: HostHelper, v: dict[str, Any], tag: str) -> None:
    for size in (56, 1472, 1):
        out = vm.run(f"ping {size} 3")
        v[f"guest_ping_{size}{tag}"] = _one(out, f"PING {size} ")
        v[f"host_ping_{size}{tag}"] = helper.call(f"host ping -s {size}", op="ping", size=size,
                                                   count=3)


def _transfer(vm: Vm, helper: HostHelper, nbytes: int, seed: int) -> dict[str, Any]:
    # The helper accepts in this order; the guest connects in the same order.
    helper.post(op="send", bytes=nbytes)
    helper.post(op="recv")
    out = vm.run(f"xfer {nbytes} {seed}")
    return {
        "host_sent": helper.reply("host to guest"),
        "guest_received": _netxfer(_one(out, "netxfer: recv")),
        "guest_sent": _netxfer(_one(out, "netxfer: send")),
        "host_received": helper.reply("guest to host"),
    }


def _net_device(sock: Path) -> dict[str, Any]:
    [dev] = [d for d in request(sock, ["status"])["devices"] if d["name"] == "net"]
    return dev


def run_scenario(vm: Vm, helper: HostHelper, sock: Path, rec: Record) -> None:
    v = rec.values
    rec.step = "boot"
    i, _ = vm.console.wait(lambda x: x == "NET-READY", 0, "guest boot")
    v["netdev"] = _one(vm.console.lines[:i], "NETDEV ")
    v["features"] = _one(vm.console.lines[:i], "FEATURES ").split()[1]

    rec.step = "ping"
    _pings(vm, helper, v, "")

    rec.step = "bulk transfer"
    v["bulk"] = _transfer(vm, helper, BULK, 20240611)
    v["device_after_bulk"] = _net_device(sock)

    rec.step = "link down/up"
    v["link_down_reply"] = request(sock, [f"net:{TAP}", "link", "down"])
    v["carrier_down"] = _one(vm.run("carrier 0"), "CARRIER ")
    v["link_up_reply"] = request(sock, [f"net:{TAP}", "link", "up"])
    v["carrier_up"] = _one(vm.run("carrier 1"), "CARRIER ")

    rec.step = "rebind"
    out = vm.run("rebind")
    v["unbind"], v["bind"] = _one(out, "UNBOUND "), _one(out, "REBOUND ")
    v["rebound_up"] = _one(out, "REBOUND-UP ")
    _pings(vm, helper, v, "_rebound")
    v["small"] = _transfer(vm, helper, SMALL, 7)
    v["device_end"] = _net_device(sock)
    v["seen"] = helper.call("sniffer", op="seen")

    rec.step = "shutdown"
    vm.command("done")
    rec.exit_status = vm.proc.wait(STEP_TIMEOUT)
    rec.step = "done"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, timeout=60, capture_output=True)


@pytest.fixture(scope="module")
def netxfer(tmp_path_factory) -> bytes:
    return build_guest_helper("netxfer", tmp_path_factory.mktemp("helpers")).read_bytes()


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and a TAP device")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 (ip) and /dev/net/tun")
    ns = f"embervm-net-{os.getpid()}"
    _sh("ip", "netns", "add", ns)
    try:
        # IPv6 off before the TAP exists: no link-local address, no router solicitations.
        for key in ("all", "default"):
            _sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        _sh("ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap")
        _sh("ip", "-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        _sh("ip", "-n", ns, "link", "set", TAP, "up")
        yield ns
    finally:
        # Deleting the namespace deletes the TAP; processes in it were killed by the fixture.
        subprocess.run(["ip", "netns", "del", ns], timeout=60, capture_output=True)


@pytest.fixture(scope="module")
def scenario(netns, kernel_full, initrd_busybox, netxfer, tmp_path_factory) -> Record:
    d = tmp_path_factory.mktemp("net")
    script = GUEST_SCRIPT % {"host": HOST_IP, "guest": GUEST_IP, "rx": RX_PORT, "tx": TX_PORT}
    initrd = extend_initramfs(initrd_busybox, {
        "bin/netxfer": netxfer,
        "net-test.sh": script.encode(),
    }, d / "initrd.cpio")
    sock = d / "vm.sock"
    rec = _Record()
    helper = vm = None
    try:
        helper = HostHelper(netns)
        helper.start()
        rec.step = "start"
        vm = Vm(netns, [
            "run", "--kernel", str(kernel_full), "--initrd", str(initrd), "--mem", "256",
            "--net", f"tap={TAP},mac={MAC}", "--control", str(sock), "--serial", "stdio",
            "--append", f"guest.script=/net-test.sh ip={GUEST_IP}::{HOST_IP}:255.255.255.0::"
                        "eth0:off ipv6.disable=1",
        ], d / "stderr.txt")
        run_scenario(vm, helper, sock, rec)
    except (StepFailed, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
        rec.failure = f"{type(e).__name__}: {e}"
    finally:
        if vm is not None:
            vm.finish()
            rec.console = list(vm.console.lines)
            rec.stderr = vm.stderr_path.read_text(errors="replace")
        if helper is not None:
            rec.stderr += "\n--- host helper stderr ---\n" + helper.finish()
    for key in ("bulk", "small"):
        if key in rec.values:  # the measured numbers, for the record (pytest -s shows them)
            t = rec.values[key]
            h2g, g2h = t["host_sent"], t["host_received"]
            print(f"\nnet e2e {key}: host->guest {h2g['bytes'] / h2g['seconds'] / 1e6:.2f} MB/s "
                  f"({h2g['seconds']:.1f} s), guest->host "
                  f"{g2h['bytes'] / g2h['seconds'] / 1e6:.2f} MB/s ({g2h['seconds']:.1f} s)")
    if "device_end" in rec.values:
        print("net e2e device metrics:", rec.values["device_end"]["metrics"])
    return rec


# -- the assertions ---------------------------------------------------------------------------


def _bit(features: str, bit: int) -> bool:
    return len(features) > bit and features[bit] == "1"


def test_guest_gets_eth0_with_the_given_mac_link_up_and_the_offloads(scenario):
    _, dev, mac, state = scenario.get("netdev").split()
    assert (mac, state) == (MAC, "up"), scenario.tail()
    feats = scenario.get("features")
    # CSUM, GUEST_CSUM, MAC, GUEST_TSO4, HOST_TSO4, MRG_RXBUF, STATUS, EVENT_IDX, VERSION_1
    for bit in (0, 1, 5, 7, 11, 15, 16, 29, 32):
        assert _bit(feats, bit), (bit, feats)
    assert not _bit(feats, 17), "no control queue is offered"


@pytest.mark.parametrize("size", [56, 1472, 1])
def test_guest_pings_host(scenario, size):
    line = scenario.get(f"guest_ping_{size}")
    assert f"PING {size} rc=0 3 packets transmitted, 3 packets received" in line, (
        line, scenario.tail())


@pytest.mark.parametrize("size", [56, 1472, 1])
def test_host_pings_guest(scenario, size):
    out = scenario.get(f"host_ping_{size}")
    assert out["received"] == out["sent"] == 3, (out, scenario.tail())


def test_32_mib_host_to_guest_arrive_intact(scenario):
    t = scenario.get("bulk")
    sent, got = t["host_sent"], t["guest_received"]
    assert got["bytes"] == sent["bytes"] == BULK, (t, scenario.tail())
    assert got["crc32"] == sent["crc32"], t


def test_32_mib_guest_to_host_arrive_intact(scenario):
    t = scenario.get("bulk")
    sent, got = t["guest_sent"], t["host_received"]
    assert got["bytes"] == sent["bytes"] == BULK, (t, scenario.tail())
    assert got["crc32"] == sent["crc32"], t


def test_segmentation_offloads_carry_the_bulk_traffic(scenario):
    m = scenario.get("device_after_bulk")["metrics"]
    # Guest TSO frames (HOST_TSO4) went to the TAP whole, and the host kernel's GSO frames came
    # into the guest whole (GUEST_TSO4 + MRG_RXBUF): frames larger than the 1500-byte MTU.
    assert m["tx_gso_frames"] > 0 and m["rx_gso_frames"] > 0, m
    assert m["tx_bytes"] / m["tx_frames"] > 1514 or m["rx_bytes"] / m["rx_frames"] > 1514, m
    assert m["tx_dropped"] == m["rx_malformed"] == m["invalid_chains"] == m["errors"] == 0, m


def test_link_down_and_up_reach_the_guest_as_carrier_changes(scenario):
    assert scenario.get("link_down_reply") == {"ok": True, "link_up": False}
    assert scenario.get("carrier_down").split()[1:] == ["0", "down"], scenario.tail()
    assert scenario.get("link_up_reply") == {"ok": True, "link_up": True}
    assert scenario.get("carrier_up").split()[1:] == ["1", "up"], scenario.tail()


def test_net_survives_driver_unbind_and_rebind(scenario):
    assert (scenario.get("unbind"), scenario.get("bind")) == ("UNBOUND 0", "REBOUND 0")
    assert scenario.get("rebound_up").split()[1] == MAC, scenario.tail()
    for size in (56, 1472, 1):
        line = scenario.get(f"guest_ping_{size}_rebound")
        assert "3 packets received" in line, (line, scenario.tail())
        assert scenario.get(f"host_ping_{size}_rebound")["received"] == 3
    t = scenario.get("small")
    assert t["guest_received"]["crc32"] == t["host_sent"]["crc32"], t
    assert t["host_received"]["crc32"] == t["guest_sent"]["crc32"], t
    assert t["host_received"]["bytes"] == SMALL, t
    m = scenario.get("device_end")["metrics"]
    assert m["activations"] == 2 and m["resets"] >= 1, m


def test_traffic_stays_between_the_two_addresses(scenario):
    seen = scenario.get("seen")
    assert seen["frames"] > 1000, seen
    assert set(seen["ethertypes"]) <= {0x0800, 0x0806}, seen  # IPv4 and ARP, nothing else
    assert set(seen["ipv4"]) == {HOST_IP, GUEST_IP}, seen
    assert set(seen["arp"]) <= {HOST_IP, GUEST_IP}, seen


def test_guest_reboot_ends_embervm_with_status_0(scenario):
    assert scenario.exit_status == 0, scenario.failure + scenario.tail()
    assert scenario.step == "done", scenario.failure + scenario.tail()
