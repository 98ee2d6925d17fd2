"""Nothing imports upward (docs/ARCHITECTURE.md): the virtio core never needs KVM."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "embervm"

# package → embervm modules it must not import (directly or through `from ... import`)
FORBIDDEN = {
    "devices/virtio": ("embervm.kvm", "embervm.vmm", "embervm.cli", "embervm.boot"),
    "devices/legacy": ("embervm.kvm", "embervm.vmm", "embervm.cli", "embervm.devices.virtio"),
    "kvm": ("embervm.devices", "embervm.vmm", "embervm.cli", "embervm.boot", "embervm.bus"),
    "boot": ("embervm.kvm", "embervm.devices", "embervm.vmm", "embervm.cli"),
    "memory.py": ("embervm.kvm", "embervm.devices", "embervm.vmm"),
}


def imported_modules(path: Path) -> set[str]:
    pkg = "embervm." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_upward_imports(where):
    root = SRC / where
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    assert files
    bad = []
    for f in files:
        for name in imported_modules(f):
            if any(name == m or name.startswith(m + ".") for m in FORBIDDEN[where]):
                bad.append(f"{f.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)
