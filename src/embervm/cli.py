"""``embervm`` command line.

Every bad input ends with a one-line error that says what to fix and exit status 2, never a
traceback.  Exit statuses of ``run`` are documented in ``embervm.vmm``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import DiskConfig, SerialConfig, VmConfig
from .errors import ConfigError, EmbervmError

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
@click.option("--shell", is_flag=True,
              help="with the embedded guest: an interactive shell instead of exiting")
@click.option("-v", "--verbose", count=True, help="log more (-v info, -vv debug)")
def run(kernel, initrd, cmdline, append, mem_mib, vcpus, disks, serial, rng, shell,
        verbose) -> None:
    """Boot a VM and serve it until the guest exits."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="embervm: %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = VmConfig(
            kernel=kernel, initrd=initrd, cmdline=cmdline, append=append, mem_mib=mem_mib,
            vcpus=vcpus, disks=[parse_disk(d) for d in disks], serial=parse_serial(serial),
            rng=rng,
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
