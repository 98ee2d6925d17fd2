"""embervm.fclog: Firecracker's log line format, levels, module filter, FIFOs."""

from __future__ import annotations

import io
import logging
import os
import re
import threading

import pytest

from embervm import fclog
from embervm.errors import ConfigError

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}"


@pytest.fixture(autouse=True)
def _reset():
    yield
    fclog.reset()


def captured(**kw) -> io.StringIO:
    out = io.StringIO()
    fclog.configure("my-vm", stream=out, **kw)
    return out


def test_plain_format(tmp_path):
    out = captured()
    logging.getLogger("embervm.vmm").info("hello %s", "world")
    line = out.getvalue()
    assert re.fullmatch(TS + r" \[my-vm:main\] hello world\n", line), line


def test_level_and_origin_in_firecracker_order():
    out = captured(show_level=True, show_log_origin=True)
    log = logging.getLogger("embervm.devices.virtio.block")
    log.warning("slow disk")
    lineno = test_level_and_origin_in_firecracker_order.__code__.co_firstlineno + 3
    line = out.getvalue()
    # what Firecracker's own test parses: [ID:THREAD:LEVEL:path/with/slash:LINE]
    m = re.fullmatch(TS + r" \[my-vm:main:WARN:([^:]+/[^:]+):(\d+)\] slow disk\n", line)
    assert m, line
    assert m.group(1).endswith("tests/unit/test_fclog.py") and int(m.group(2)) == lineno


def test_level_only_and_thread_name():
    out = captured(show_level=True)
    log = logging.getLogger("embervm.kvm")
    t = threading.Thread(target=lambda: log.error("vcpu failed"), name="fc_vcpu 0")
    t.start()
    t.join()
    assert re.fullmatch(TS + r" \[my-vm:fc_vcpu 0:ERROR\] vcpu failed\n", out.getvalue())


def test_timestamp_is_local_time_with_nanoseconds():
    rec = logging.LogRecord("embervm", logging.INFO, __file__, 1, "m", None, None)
    rec.created = 86400 * 365 + 0.25
    import time

    expect = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(86400 * 365)) + ".250000000"
    assert fclog.FcFormatter.timestamp(rec) == expect


@pytest.mark.parametrize("level,shown", [
    ("Error", {"ERROR"}),
    ("warning", {"ERROR", "WARN"}),
    ("WARN", {"ERROR", "WARN"}),
    ("Info", {"ERROR", "WARN", "INFO"}),
    ("debug", {"ERROR", "WARN", "INFO", "DEBUG"}),
    ("Trace", {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"}),
    ("Off", set()),
])
def test_level_filter(level, shown):
    out = captured(level=level, show_level=True)
    log = logging.getLogger("embervm.x")
    log.critical("c")
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    log.log(fclog.TRACE, "t")
    levels = set(re.findall(r":(ERROR|WARN|INFO|DEBUG|TRACE)\]", out.getvalue()))
    assert levels == shown


@pytest.mark.parametrize("bad", ["verbose", "", "Warnings"])
def test_bad_level_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        fclog.configure("id", level=bad)


@pytest.mark.parametrize("module,kept", [
    ("vmm::devices::virtio::block", {"embervm.devices.virtio.block"}),
    ("vmm::devices::virtio::block::virtio::device", {"embervm.devices.virtio.block"}),
    ("vmm::devices", {"embervm.devices.virtio.block", "embervm.devices.virtio.net",
                      "embervm.devices.virtio.tap", "embervm.devices.legacy.serial"}),
    ("vmm::devices::virtio::net", {"embervm.devices.virtio.net", "embervm.devices.virtio.tap"}),
    ("vmm::devices::vir", {"embervm.devices.virtio.block", "embervm.devices.virtio.net",
                           "embervm.devices.virtio.tap"}),
    ("api_server::request", {"embervm.fc.http"}),
    ("embervm.devices.legacy", {"embervm.devices.legacy.serial"}),
    ("vmm", {"embervm.devices.virtio.block", "embervm.devices.virtio.net",
             "embervm.devices.virtio.tap", "embervm.devices.legacy.serial", "embervm.fc.http",
             "embervm.vmm"}),
    ("utils::net", set()),
])
def test_module_filter(module, kept):
    out = captured(module=module)
    names = ["embervm.devices.virtio.block", "embervm.devices.virtio.net",
             "embervm.devices.virtio.tap", "embervm.devices.legacy.serial", "embervm.fc.http",
             "embervm.vmm"]
    for name in names:
        logging.getLogger(name).info("from %s", name)
    got = set(re.findall(r"\] from (\S+)\n", out.getvalue()))
    assert got == kept


def test_log_file_is_appended_to(tmp_path):
    path = tmp_path / "log"
    path.write_text("old line\n")
    fclog.configure("vm1", path=str(path))
    logging.getLogger("embervm").info("new line")
    fclog.reset()
    text = path.read_text().splitlines()
    assert text[0] == "old line" and text[1].endswith("[vm1:main] new line")


def test_unopenable_path_is_a_config_error_and_changes_nothing(tmp_path):
    out = captured()
    with pytest.raises(ConfigError):
        fclog.configure("vm2", path=str(tmp_path / "missing" / "log"))
    logging.getLogger("embervm").info("still here")
    assert "[my-vm:main] still here" in out.getvalue()


def test_fifo_without_reader_does_not_block(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def run():
        fclog.configure("fifo-vm", path=str(fifo))
        log = logging.getLogger("embervm.vmm")
        for i in range(2000):  # ~100 KB: more than the 64 KiB pipe holds
            log.info("line %d %s", i, "x" * 20)
        done.set()

    before = fclog.counters["missed_log_count"]
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(10), "logging blocked on a FIFO without a reader"
    assert fclog.counters["missed_log_count"] > before  # the full pipe dropped lines
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    while True:
        try:
            chunk = os.read(rfd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    lines = data.decode().splitlines()
    pattern = TS + r" \[fifo-vm:[^\]:]+\] line \d+ x{20}"
    assert lines and all(re.fullmatch(pattern, x) for x in lines)
    assert len(lines) + fclog.counters["missed_log_count"] - before == 2000


def test_reconfigure_replaces_the_destination(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    fclog.configure("vm", path=str(first), show_level=True)
    log = logging.getLogger("embervm.machine")
    log.info("one")
    fclog.configure("vm", path=str(second), level="Debug")
    log.debug("two")
    root = logging.getLogger("embervm")
    assert sum(isinstance(h, fclog.FcHandler) for h in root.handlers) == 1
    fclog.reset()
    assert first.read_text().count("\n") == 1 and "[vm:main:INFO] one" in first.read_text()
    assert second.read_text().count("\n") == 1 and "[vm:main] two" in second.read_text()


def test_reset_restores_the_logger():
    root = logging.getLogger("embervm")
    before = (root.level, root.propagate, list(root.handlers))
    captured(level="Off")
    fclog.reset()
    assert (root.level, root.propagate, list(root.handlers)) == before


def test_exceptions_are_in_the_line():
    out = captured()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("embervm.vmm").exception("failed")
    text = out.getvalue()
    assert "] failed\nTraceback" in text and "ValueError: boom" in text


def test_origin_of_embervm_code_is_relative_to_the_package():
    path = os.path.join(os.path.dirname(fclog.__file__), "devices", "virtio", "block.py")
    rec = logging.LogRecord("embervm.devices.virtio.block", logging.INFO, path, 42, "m", None,
                            None)
    assert fclog.FcFormatter.origin(rec) == "embervm/devices/virtio/block.py:42"
