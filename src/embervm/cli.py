"""``embervm`` command line.

Every bad input ends with a one-line error that says what to fix and exit status 2, never a
traceback.  Exit statuses of ``run`` are documented in ``embervm.vmm``.
"""

from __future__ import annotations

import os
import sys


def _firecracker_invocation(argv: list[str]) -> bool:
    """True when this process is meant to be Firecracker (embervm.fc.cli): run under the name
    ``firecracker`` (a symlink or copy; also a release-style ``firecracker-v1.16.1-x86_64``),
    or as ``embervm`` (the console script or ``python -m embervm``) whose first argument is a
    flag other than click's ``--help``/``--version`` (``embervm --api-sock S``).  Anything
    else that merely imports this module (tests, tools) keeps the click CLI."""
    if not argv:
        return False
    name = os.path.basename(argv[0])
    if name == "firecracker" or name.startswith("firecracker-"):
        return True
    as_embervm = name == "embervm" or (
        name == "__main__.py" and os.path.basename(os.path.dirname(argv[0])) == "embervm")
    return (as_embervm and len(argv) > 1 and argv[1].startswith("--")
            and argv[1] not in ("--help", "--version"))


if _firecracker_invocation(sys.argv):
    # before importing click: the Firecracker front end must bind its socket within ms
    from .fc.cli import main as _firecracker_main

    _firecracker_main()

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .config import (  # noqa: E402
    BalloonConfig,
    ConsoleConfig,
    DiskConfig,
    NetConfig,
    SerialConfig,
    VmConfig,
    VsockConfig,
)
from .errors import ConfigError, EmbervmError  # noqa: E402

EXIT_CONFIG = 2


def parse_disk(spec: str) -> DiskConfig:
    """``PATH[,ro][,id=ID]``"""
    parts = spec.split(",")
    if not parts[0]:
        raise ConfigError(f"--disk {spec!r}: expected PATH[,ro][,id=ID]")
    disk = DiskConfig(Path(parts[0]))
    for opt in parts[1:]:
        if opt == "ro":
            disk.read_only = True
        elif opt.startswith("id="):
            disk.id = opt[3:]
        else:
            raise ConfigError(f"--disk {spec!r}: unknown option {opt!r} (use ro or id=ID)")
    return disk


def _options(flag: str, spec: str) -> dict[str, str]:
    opts = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"{flag} {spec!r}: expected key=value pairs separated by commas")
        opts[key] = value
    return opts


def parse_net(spec: str) -> NetConfig:
    """``tap=NAME[,mac=XX:XX:XX:XX:XX:XX]``"""
    opts = _options("--net", spec)
    unknown = set(opts) - {"tap", "mac"}
    if unknown or "tap" not in opts:
        raise ConfigError(f"--net {spec!r}: expected tap=NAME[,mac=XX:XX:XX:XX:XX:XX]")
    return NetConfig(opts["tap"], opts.get("mac"))


def parse_console(spec: str) -> ConsoleConfig:
    if spec == "stdio":
        return ConsoleConfig("stdio")
    if spec.startswith("socket:") and len(spec) > 7:
        return ConsoleConfig("socket", Path(spec[7:]))
    raise ConfigError(f"--console {spec!r}: expected stdio or socket:PATH")


def parse_vsock(spec: str) -> VsockConfig:
    """``cid=N,uds=PATH``"""
    opts = _options("--vsock", spec)
    if set(opts) != {"cid", "uds"}:
        raise ConfigError(f"--vsock {spec!r}: expected cid=N,uds=PATH")
    try:
        cid = int(opts["cid"], 0)
    except ValueError:
        raise ConfigError(f"--vsock cid={opts['cid']!r}: not a number") from None
    return VsockConfig(cid, Path(opts["uds"]))


def parse_balloon(spec: str) -> BalloonConfig:
    """``MIB[,deflate-on-oom][,stats=SECONDS]``"""
    first, *rest = spec.split(",")
    try:
        cfg = BalloonConfig(int(first))
    except ValueError:
        raise ConfigError(
            f"--balloon {spec!r}: expected MIB[,deflate-on-oom][,stats=SECONDS]"
        ) from None
    for opt in rest:
        if opt == "deflate-on-oom":
            cfg.deflate_on_oom = True
        elif opt.startswith("stats="):
            try:
                cfg.stats_seconds = int(opt[6:])
            except ValueError:
                raise ConfigError(f"--balloon {opt!r}: SECONDS must be a number") from None
        else:
            raise ConfigError(f"--balloon {spec!r}: unknown option {opt!r}")
    return cfg


def parse_serial(spec: str) -> SerialConfig:
    if spec == "stdio":
        return SerialConfig("stdio")
    if spec == "null":
        return SerialConfig("null")
    if spec.startswith("file:") and len(spec) > 5:
        return SerialConfig("file", Path(spec[5:]))
    raise ConfigError(f"--serial {spec!r}: expected stdio, null or file:PATH")



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embervm")
def cli() -> None:
    """embervm: a small, hackable microVM monitor on Linux KVM."""


@cli.command()
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=True),
              help="vmlinux (PVH ELF) or bzImage; default: the embedded guest kernel")
@click.option("--initrd", type=click.Path(path_type=Path, dir_okay=True),
              help="initramfs (cpio); default with the embedded kernel: its busybox initramfs")
@click.option("--cmdline", default=None,
              help="kernel command line replacing the default (required + recommended words)")
@click.option("--append", default="", help="words added to the kernel command line")
@click.option("--mem", "mem_mib", type=int, default=256, show_default=True,
              help="guest memory in MiB")
@click.option("--vcpus", type=int, default=1, show_default=True, help="number of vCPUs")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,id=ID]",
              help="raw disk image as virtio-blk (repeatable: vda, vdb, ...)")
@click.option("--serial", default="stdio", show_default=True, metavar="stdio|file:PATH|null",
              help="where the guest's serial console goes")
@click.option("--rng", is_flag=True, help="add a virtio-rng entropy device")
@click.option("--net", "nets", multiple=True, metavar="tap=NAME[,mac=MAC]",
              help="virtio-net on a TAP device (repeatable); created if absent and root")
@click.option("--console", "console", default=None, metavar="stdio|socket:PATH",
              help="virtio-console port 0 (guest hvc0) on stdio or a Unix socket")
@click.option("--vsock", "vsock", default=None, metavar="cid=N,uds=PATH",
              help="virtio-vsock, Firecracker-style host side on Unix sockets")
@click.option("--balloon", "balloon", default=None, metavar="MIB[,deflate-on-oom][,stats=S]",
              help="virtio-balloon with an initial target")
@click.option("--control", "control", type=click.Path(path_type=Path), default=None,
              help="control socket (line protocol, see docs/DEVICES.md)")
@click.option("--shell", is_flag=True,
              help="with the embedded guest: an interactive shell instead of exiting")
@click.option("-v", "--verbose", count=True, help="log more (-v info, -vv debug)")
def run(kernel, initrd, cmdline, append, mem_mib, vcpus, disks, serial, rng, nets, console,
        vsock, balloon, control, shell, verbose) -> None:
    """Boot a VM and serve it until the guest exits."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="embervm: %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = VmConfig(
            kernel=kernel, initrd=initrd, cmdline=cmdline, append=append, mem_mib=mem_mib,
            vcpus=vcpus, disks=[parse_disk(d) for d in disks], serial=parse_serial(serial),
            rng=rng, nets=[parse_net(n) for n in nets],
            console=parse_console(console) if console else None,
            vsock=parse_vsock(vsock) if vsock else None,
            balloon=parse_balloon(balloon) if balloon else None,
            control=control,
        )
        if shell:
            config.append = (config.append + " guest.shell").strip()
        from .vmm import Vmm  # imported late: `embervm --help` must not need KVM

        vmm = Vmm(config)
    except EmbervmError as e:
        click.echo(f"embervm: error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    status = vmm.run()
    if status not in (0,) and vmm.exit_reason:
        click.echo(f"embervm: {vmm.exit_reason}", err=True)
    sys.exit(status)


DEMO_SCRIPT = r"""
echo
echo "=== embervm demo: Linux $(uname -r) on $(grep -c ^processor /proc/cpuinfo) vCPU(s)"
echo "=== memory: $(grep MemTotal /proc/meminfo)"
echo "=== kernel command line: $(cat /proc/cmdline)"
echo "=== virtio devices:"
for d in /sys/bus/virtio/devices/*; do
    echo "    $(basename $d): device id $(cat $d/device), driver $(basename $(readlink $d/driver))"
done
echo "=== block devices: $(ls /sys/block | tr '\n' ' ')"
echo "=== this script came from /dev/vda: $(cat /sys/block/vda/size) sectors,\
 read-only=$(cat /sys/block/vda/ro)"
echo "=== hwrng: $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
echo "=== 16 random bytes from the host via virtio-rng:\
 $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')"
echo "=== rebooting: embervm exits with status 0"
"""


@cli.command()
@click.option("--vcpus", type=int, default=2, show_default=True)
@click.pass_context
def demo(ctx: click.Context, vcpus: int) -> None:
    """Boot the embedded guest with a virtio disk and entropy device, show what it sees, exit."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="embervm-demo-") as tmp:
        disk = Path(tmp) / "demo-script.img"
        data = DEMO_SCRIPT.encode()
        disk.write_bytes(data + b"\0" * (-len(data) % 4096))
        ctx.invoke(run, kernel=None, initrd=None, cmdline=None, append="guest.script=/dev/vda",
                   mem_mib=256, vcpus=vcpus, disks=(f"{disk},ro",), serial="stdio", rng=True,
                   nets=(), console=None, vsock=None, balloon=None, control=None, shell=False,
                   verbose=0)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
