"""Start-up cost: ``embervm run`` imports nothing a run does not use.

Start -> first KVM_RUN is benchmarked against QEMU (benchmarks/bench.py --only start), and
import time is most of it, so these tests pin the import set: each runs a fresh interpreter and
lists the modules it loaded.  Heavy modules that a run does not need (click, pyelftools, shutil
with its compression modules, the devices the VM does not have) must stay out.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PRELUDE = """
import sys
before = set(sys.modules)
"""
REPORT = """
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter imports running ``code`` (beyond its own start-up)."""
    p = subprocess.run([sys.executable, "-c", PRELUDE + code + REPORT], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.split())


def present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.startswith(tuple(n + "." for n in names)))


@pytest.mark.parametrize("argv", [["run", "--help"], ["--version"], ["demo", "-h"]])
def test_help_and_version_import_only_the_parser(argv):
    mods = loaded_by(f"""
import embervm.cli
try:
    embervm.cli.main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
""")
    assert "argparse" in mods and "embervm.cli" in mods  # the probe works
    assert present(mods, ("click", "elftools", "shutil", "logging", "pathlib", "dataclasses",
                          "embervm.config", "embervm.vmm", "embervm.errors")) == []


def test_a_run_imports_no_unused_module():
    """What ``embervm run --kernel K`` imports up to building the VM (without KVM: the VMM
    module and the parsed configuration)."""
    mods = loaded_by("""
import embervm.cli as cli
cfg = cli.config_from_args(cli.build_parser().parse_args(["run", "--kernel", "/k", "-v"]))
import embervm.vmm
""")
    assert "embervm.vmm" in mods and "embervm.config" in mods
    assert present(mods, (
        "click", "elftools", "shutil", "subprocess", "tempfile", "lzma", "bz2", "zlib",
        "hashlib", "embervm.devices.virtio.block", "embervm.devices.virtio.rng",
        "embervm.ratelimit", "embervm.devices.virtio.net", "embervm.devices.virtio.console",
        "embervm.devices.virtio.vsock", "embervm.devices.virtio.balloon", "embervm.machine",
        "embervm.fc", "embervm.control")) == []
