"""``embervm`` command line (``run``, ``demo``), on :mod:`argparse`.

Every bad input ends with a one-line error that says what to fix and exit status 2, never a
traceback: argparse's own usage errors too (:class:`_Parser` overrides ``error``).  Exit
statuses of ``run`` are documented in ``embervm.vmm``.

Start-up cost matters (the time from ``embervm run`` to the first ``KVM_RUN`` is a benchmark
against QEMU), so this module imports only ``argparse`` at load time: the configuration classes,
``pathlib`` and ``logging`` are imported when a command needs them, and the help formatter is
given the terminal width itself so argparse never imports ``shutil`` (which pulls in the bz2,
lzma and zlib modules).
"""

from __future__ import annotations

import os
import sys


def _firecracker_invocation(argv: list[str]) -> bool:
    """True when this process is meant to be Firecracker (embervm.fc.cli): run under the name
    ``firecracker`` (a symlink or copy; also a release-style ``firecracker-v1.16.1-x86_64``),
    or as ``embervm`` (the console script or ``python -m embervm``) whose first argument is a
    flag other than embervm's own ``--help``/``--version`` (``embervm --api-sock S``).
    Anything else that merely imports this module (tests, tools) keeps the embervm CLI."""
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
    # before any other import: the Firecracker front end must bind its socket within ms
    from .fc.cli import main as _firecracker_main

    _firecracker_main()

import argparse  # noqa: E402

from . import __version__  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .config import (
        BalloonConfig,
        ConsoleConfig,
        DiskConfig,
        NetConfig,
        SerialConfig,
        VmConfig,
        VsockConfig,
    )

EXIT_CONFIG = 2


# -- option values ----------------------------------------------------------------------------


def parse_disk(spec: str) -> DiskConfig:
    """``PATH[,ro][,root][,id=ID]``: a raw image; ``ro`` attaches it read-only, ``root`` makes
    it the root device (``/dev/vda``, ``root=/dev/vda`` on the kernel command line), ``id`` is
    its name and virtio-blk serial."""
    from pathlib import Path

    from .config import DiskConfig
    from .errors import ConfigError

    parts = spec.split(",")
    if not parts[0]:
        raise ConfigError(f"--disk {spec!r}: expected PATH[,ro][,root][,id=ID]")
    disk = DiskConfig(Path(parts[0]))
    for opt in parts[1:]:
        if opt == "ro":
            disk.read_only = True
        elif opt == "root":
            disk.is_root_device = True
        elif opt.startswith("id="):
            disk.id = opt[3:]
        else:
            raise ConfigError(
                f"--disk {spec!r}: unknown option {opt!r} (use ro, root or id=ID)")
    return disk


def _options(flag: str, spec: str) -> dict[str, str]:
    """``key=value,key=value`` as a dict; anything else is a ConfigError naming ``flag``."""
    from .errors import ConfigError

    opts = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"{flag} {spec!r}: expected key=value pairs separated by commas")
        opts[key] = value
    return opts


def parse_net(spec: str) -> NetConfig:
    """``tap=NAME[,mac=XX:XX:XX:XX:XX:XX]``"""
    from .config import NetConfig
    from .errors import ConfigError

    opts = _options("--net", spec)
    unknown = set(opts) - {"tap", "mac"}
    if unknown or "tap" not in opts:
        raise ConfigError(f"--net {spec!r}: expected tap=NAME[,mac=XX:XX:XX:XX:XX:XX]")
    return NetConfig(opts["tap"], opts.get("mac"))


def parse_console(spec: str) -> ConsoleConfig:
    """``stdio`` or ``socket:PATH``"""
    from pathlib import Path

    from .config import ConsoleConfig
    from .errors import ConfigError

    if spec == "stdio":
        return ConsoleConfig("stdio")
    if spec.startswith("socket:") and len(spec) > 7:
        return ConsoleConfig("socket", Path(spec[7:]))
    raise ConfigError(f"--console {spec!r}: expected stdio or socket:PATH")


def parse_vsock(spec: str) -> VsockConfig:
    """``cid=N,uds=PATH``"""
    from pathlib import Path

    from .config import VsockConfig
    from .errors import ConfigError

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
    from .config import BalloonConfig
    from .errors import ConfigError

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
    """``stdio``, ``null`` or ``file:PATH``"""
    from pathlib import Path

    from .config import SerialConfig
    from .errors import ConfigError

    if spec == "stdio":
        return SerialConfig("stdio")
    if spec == "null":
        return SerialConfig("null")
    if spec.startswith("file:") and len(spec) > 5:
        return SerialConfig("file", Path(spec[5:]))
    raise ConfigError(f"--serial {spec!r}: expected stdio, null or file:PATH")


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """The :class:`VmConfig` that ``embervm run``'s parsed options describe.  Bad option values
    raise :class:`ConfigError` (the VMM validates the rest, e.g. that files exist)."""
    from pathlib import Path

    from .config import VmConfig
    from .errors import ConfigError

    disks = [parse_disk(d) for d in args.disks]
    roots = [d for d in disks if d.is_root_device]
    if len(roots) > 1:
        raise ConfigError(f"--disk {roots[1].path},root: only one disk can be the root device "
                          f"({roots[0].path} is already)")
    append = args.append
    if args.shell:
        append = (append + " guest.shell").strip()
    return VmConfig(
        kernel=Path(args.kernel) if args.kernel is not None else None,
        initrd=Path(args.initrd) if args.initrd is not None else None,
        cmdline=args.cmdline, append=append, mem_mib=args.mem_mib, vcpus=args.vcpus,
        disks=disks, serial=parse_serial(args.serial), rng=args.rng,
        nets=[parse_net(n) for n in args.nets],
        console=parse_console(args.console) if args.console is not None else None,
        vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
        balloon=parse_balloon(args.balloon) if args.balloon is not None else None,
        control=Path(args.control) if args.control is not None else None,
    )


# -- commands ---------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """``embervm run``: build the VM, serve it until the guest exits; returns the exit status
    (0 reboot/power-off, 1 crash, 2 bad configuration, 128+N signal N)."""
    import logging

    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="embervm: %(levelname)s %(name)s: %(message)s",
    )
    from .errors import EmbervmError

    try:
        config = config_from_args(args)
        from .vmm import Vmm  # imported late: `embervm --help` must not need KVM

        vmm = Vmm(config)
    except EmbervmError as e:
        _say(f"embervm: error: {e}")
        return EXIT_CONFIG
    status = vmm.run()
    if status != 0 and vmm.exit_reason:
        _say(f"embervm: {vmm.exit_reason}")
    return status


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


def demo_command(args: argparse.Namespace) -> int:
    """``embervm demo``: ``embervm run`` of the embedded guest with :data:`DEMO_SCRIPT` on a
    read-only script disk (``guest.script=/dev/vda``) and virtio-rng; returns its status."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="embervm-demo-") as tmp:
        disk = os.path.join(tmp, "demo-script.img")
        data = DEMO_SCRIPT.encode()
        try:
            with open(disk, "wb") as f:
                f.write(data + b"\0" * (-len(data) % 4096))
        except OSError as e:  # a host problem, not bad input: status 1
            _say(f"embervm: error: demo: cannot write its script disk {disk}: {e.strerror}")
            return 1
        run_args = build_parser().parse_args(
            ["run", "--append", "guest.script=/dev/vda", "--disk", f"{disk},ro", "--rng",
             "--vcpus", str(args.vcpus)])
        return run_command(run_args)


# -- the parser -------------------------------------------------------------------------------


def _say(line: str) -> None:
    """One line on stderr (errors and exit reasons)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_width: int | None = None


def _help_width() -> int:
    """argparse's help width (``COLUMNS``, else the terminal's, else 80; minus 2 as argparse
    does), found without ``shutil``; computed once, since argparse makes a formatter per
    option."""
    global _width
    if _width is None:
        try:
            cols = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            cols = 0
        if cols <= 0:
            try:
                cols = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                cols = 80
        _width = max(cols, 40) - 2
    return _width


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with the width from :func:`_help_width` and wider option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=_help_width())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``embervm: error: ...`` plus where
    the help is, and exit status 2, like every other bad input of ``embervm``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())  # argparse may wrap a choice list
        _say(f"embervm: error: {message} (see {self.prog} --help)")
        sys.exit(EXIT_CONFIG)


def _host_epilog() -> str:
    from .host import host_profile

    return (f"Host profile: {host_profile().description}. On a PVM host (kvm_pvm loaded) the "
            "guest kernel needs extra command-line words, which embervm adds there only "
            "(also to --cmdline); EMBERVM_HOST_PROFILE=kvm|pvm overrides the detection.")


def build_parser() -> argparse.ArgumentParser:
    """The ``embervm`` parser: ``--version``, ``-h/--help`` and the ``run`` and ``demo``
    commands; each command's handler is ``args.func(args) -> int`` (the exit status), and
    ``args.command_parser`` is the command's own parser (for its usage errors)."""
    top = _Parser(prog="embervm", formatter_class=_Formatter, allow_abbrev=False,
                  usage="%(prog)s [-h] [--version] COMMAND [OPTIONS]",
                  description="embervm: a small, hackable microVM monitor on Linux KVM.")
    top.add_argument("--version", action="version", version=f"embervm, version {__version__}")
    commands = top.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    run = commands.add_parser(
        "run", help="Boot a VM and serve it until the guest exits.",
        description="Boot a VM and serve it until the guest exits.",
        prog="embervm run", usage="%(prog)s [OPTIONS]", formatter_class=_Formatter,
        allow_abbrev=False, epilog=_host_epilog())
    run.set_defaults(func=run_command, command_parser=run)
    opt = run.add_argument
    opt("--kernel", metavar="PATH",
        help="vmlinux (PVH ELF) or bzImage; default: the embedded guest kernel")
    opt("--initrd", metavar="PATH",
        help="initramfs (cpio); default with the embedded kernel and no root disk: its busybox "
             "initramfs")
    opt("--cmdline", metavar="TEXT",
        help="kernel command line replacing the default (required + recommended words)")
    opt("--append", default="", metavar="TEXT", help="words added to the kernel command line")
    opt("--mem", dest="mem_mib", type=int, default=256, metavar="MIB",
        help="guest memory in MiB (default: %(default)s)")
    opt("--vcpus", type=int, default=1, metavar="N", help="number of vCPUs (default: %(default)s)")
    opt("--disk", dest="disks", action="append", default=[], metavar="PATH[,ro][,root][,id=ID]",
        help="raw disk image as virtio-blk (repeatable: vda, vdb, ...); root: the root device "
             "(vda, root=/dev/vda; no default initramfs)")
    opt("--serial", default="stdio", metavar="stdio|file:PATH|null",
        help="where the guest's serial console goes (default: %(default)s)")
    opt("--rng", action="store_true", help="add a virtio-rng entropy device")
    opt("--net", dest="nets", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
        help="virtio-net on a TAP device (repeatable); created if absent and root")
    opt("--console", metavar="stdio|socket:PATH",
        help="virtio-console port 0 (guest hvc0) on stdio or a Unix socket")
    opt("--vsock", metavar="cid=N,uds=PATH",
        help="virtio-vsock, Firecracker-style host side on Unix sockets")
    opt("--balloon", metavar="MIB[,deflate-on-oom][,stats=S]",
        help="virtio-balloon with an initial target")
    opt("--control", metavar="PATH", help="control socket (line protocol, see docs/DEVICES.md)")
    opt("--shell", action="store_true",
        help="with the embedded guest: an interactive shell instead of exiting")
    opt("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")

    demo = commands.add_parser(
        "demo", help="Boot the embedded guest with a virtio disk and entropy device, show what "
                     "it sees, exit.",
        description="Boot the embedded guest with a virtio disk and entropy device, show what it "
                    "sees, exit.",
        prog="embervm demo", usage="%(prog)s [OPTIONS]", formatter_class=_Formatter,
        allow_abbrev=False)
    demo.set_defaults(func=demo_command, command_parser=demo)
    demo.add_argument("--vcpus", type=int, default=2, metavar="N",
                      help="number of vCPUs (default: %(default)s)")
    return top


def main(argv: list[str] | None = None) -> None:
    """The ``embervm`` console script: parse ``argv`` (default ``sys.argv[1:]``), run the
    command, exit with its status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}" if extra
                     else "expected a command: run or demo")
    if extra:  # reported by the command's parser, so the hint names its --help
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
