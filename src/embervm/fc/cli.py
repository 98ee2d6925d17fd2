"""The ``firecracker`` command line: embervm as a drop-in Firecracker v1.16.1 binary.

``embervm --api-sock S ...`` and embervm invoked under the name ``firecracker`` (a symlink or
copy) run :func:`main`.  It follows Firecracker's ``main.rs``:

* flags are parsed like Firecracker's ``arg_parser.rs``: only ``--flag value``; an unknown,
  repeated or value-less flag (a value may not start with ``--``), ``--no-api`` without
  ``--config-file`` or ``--seccomp-filter`` with ``--no-seccomp`` exit 153; ``--help``/``-h``
  and ``--version`` win over everything else; words after a lone ``--`` are ignored;
* ``--version`` prints exactly what Firecracker prints (``Firecracker v1.16.1`` and an empty
  line: clients parse the first line), ``--help`` says that this is embervm;
* exit statuses are Firecracker's ``FcExitCode``: 0 when the guest rebooted or powered off,
  1 generic error, 152 bad configuration (``--level``, the config file, ``--metadata``),
  153 argument parsing, 156 SIGHUP.  Firecracker panics (SIGABRT) on a bad instance id or a
  non-numeric size; embervm answers 153 there instead, with the reason;
* the API socket is bound before anything heavy is imported, so it accepts connections within
  milliseconds of exec (the Machine, the API layer and h11 are imported afterwards; a client
  that connects early waits in the listen backlog);
* with ``--config-file`` the VM is configured from the file and started at once, and the API
  (unless ``--no-api``) serves the running VM;
* SIGTERM and SIGINT: Firecracker has no handler for them and dies of the signal.  embervm
  asks the Machine to shut down (:meth:`Machine.shutdown`: the guest gets Ctrl-Alt-Del and a
  grace period; a second signal stops it at once), removes the socket, then dies of the same
  signal (default action), so the parent sees exactly what Firecracker's parent sees (shells
  report 128+N).  SIGHUP stops the VM at once and exits 156, as Firecracker does;
* the API socket file is removed on every exit path Python can run code on (not SIGKILL).

Not implemented, and said so: seccomp (``--seccomp-filter``/``--no-seccomp`` are accepted and
ignored), PCI (``--enable-pci`` is refused), snapshots (``--snapshot-version`` and
``--describe-snapshot`` are refused), the boot timer device (``--boot-timer`` logs a warning).
"""

from __future__ import annotations

import os
import sys

FIRECRACKER_VERSION = "1.16.1"
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"
DEFAULT_MAX_PAYLOAD = 51200

EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_BAD_CONFIGURATION = 152
EXIT_ARG_PARSING = 153
EXIT_SIGHUP = 156

SECCOMP_NOTE = "seccomp is not implemented yet: the flag is accepted and ignored."

#: name -> (takes a value, default, help), as Firecracker's main.rs declares them
FLAGS: dict[str, tuple[bool, str | None, str]] = {
    "api-sock": (True, DEFAULT_API_SOCK, "Path to unix domain socket used by the API."),
    "id": (True, DEFAULT_INSTANCE_ID, "MicroVM unique identifier."),
    "seccomp-filter": (True, None, "Optional parameter which allows specifying the path to a "
                       "custom seccomp filter. For advanced users. (embervm: " + SECCOMP_NOTE
                       + ")"),
    "no-seccomp": (False, None, "Optional parameter which allows starting and using a microVM "
                   "without seccomp filtering. Not recommended. (embervm: " + SECCOMP_NOTE
                   + ")"),
    "start-time-us": (True, None, "Process start time (wall clock, microseconds). This "
                      "parameter is optional."),
    "start-time-cpu-us": (True, None, "Process start CPU time (wall clock, microseconds). This "
                          "parameter is optional."),
    "parent-cpu-time-us": (True, None, "Parent process CPU time (wall clock, microseconds). "
                           "This parameter is optional."),
    "config-file": (True, None, "Path to a file that contains the microVM configuration in "
                    "JSON format."),
    "metadata": (True, None, "Path to a file that contains metadata in JSON format to add to "
                 "the mmds."),
    "no-api": (False, None, "Optional parameter which allows starting and using a microVM "
               "without an active API socket."),
    "log-path": (True, None, "Path to a fifo or a file used for configuring the logger on "
                 "startup."),
    "level": (True, None, "Set the logger level."),
    "module": (True, None, "Set the logger module filter."),
    "show-level": (False, None, "Whether or not to output the level in the logs."),
    "show-log-origin": (False, None, "Whether or not to include the file path and line number "
                        "of the log's origin."),
    "metrics-path": (True, None, "Path to a fifo or a file used for configuring the metrics "
                     "on startup."),
    "boot-timer": (False, None, "Whether or not to load boot timer device for logging elapsed "
                   "time since InstanceStart command. (embervm: not implemented yet)"),
    "version": (False, None, "Print the binary version number."),
    "snapshot-version": (False, None, "Print the supported data format version. (embervm: "
                         "snapshots are not implemented yet)"),
    "describe-snapshot": (True, None, "Print the data format version of the provided snapshot "
                          "state file. (embervm: snapshots are not implemented yet)"),
    "http-api-max-payload-size": (True, str(DEFAULT_MAX_PAYLOAD), "Http API request payload "
                                  "max size, in bytes."),
    "mmds-size-limit": (True, None, "Mmds data store limit, in bytes."),
    "enable-pci": (False, None, "Enables PCIe support. (embervm: not implemented; refused)"),
}
_REQUIRES = {"no-api": "config-file"}
_FORBIDS = {"seccomp-filter": "no-seccomp", "no-seccomp": "seccomp-filter"}

#: Firecracker's level names (case-insensitive) -> the canonical one
LEVELS = {"off": "Off", "trace": "Trace", "debug": "Debug", "info": "Info", "warn": "Warn",
          "warning": "Warn", "error": "Error"}


class ArgError(Exception):
    """A command line Firecracker's parser refuses (exit 153)."""


class Exit(Exception):
    """Stop with ``status`` after printing ``Error: <message>`` (when there is one)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status


# -- parsing -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> dict[str, str | bool]:
    """The flags given in ``argv`` (without the program name) as ``{name: value or True}``,
    defaults filled in.  ``{"help": True}`` or ``{"version": True}`` alone when asked for."""
    if "--" in argv:
        argv = argv[:argv.index("--")]  # Firecracker keeps the rest as "extra args", unused
    if "--help" in argv or "-h" in argv:
        return {"help": True}
    if "--version" in argv:
        return {"version": True}
    given: dict[str, str | bool] = {}
    it = iter(argv)
    for word in it:
        if not word.startswith("--"):
            raise ArgError(f"Found argument '{word}' which wasn't expected, or isn't valid in "
                           "this context.")
        name = word[2:]
        if name not in FLAGS:
            raise ArgError(f"Found argument '{name}' which wasn't expected, or isn't valid in "
                           "this context.")
        if name in given:
            raise ArgError(f"The argument '{name}' was provided more than once.")
        takes_value = FLAGS[name][0]
        if takes_value:
            value = next(it, None)
            if value is None or value.startswith("--"):
                raise ArgError(f"The argument '{name}' requires a value, but none was "
                               "supplied.")
            given[name] = value
        else:
            given[name] = True
    for name in sorted(given):  # Firecracker checks in name order
        other = _REQUIRES.get(name)
        if other is not None and other not in given:
            raise ArgError(f"Argument '{other}' required, but not found.")
        other = _FORBIDS.get(name)
        if other is not None and other in given:
            raise ArgError(f"Argument '{other}' cannot be used together with argument "
                           f"'{name}'.")
    args: dict[str, str | bool] = {n: d for n, (_, d, _) in FLAGS.items() if d is not None}
    args.update(given)
    return args


def format_help() -> str:
    """The ``--help`` text in Firecracker's layout (flags in name order, aligned)."""
    names = {n: (f"  --{n} <{n}>" if FLAGS[n][0] else f"  --{n}") for n in FLAGS}
    names["help"] = "  --help"
    width = max(len(v) for v in names.values())
    lines = ["optional arguments:"]
    for n in sorted(names):
        if n == "help":
            text = "Show the help message."
        else:
            _, default, text = FLAGS[n]
            if default is not None:
                text += f" [default: \"{default}\"]"
        lines.append(f"{names[n]:<{width}}   {text}")
    from ..host import host_profile

    lines += ["", f"embervm: host profile: {host_profile().description} (EMBERVM_HOST_PROFILE="
              "kvm|pvm overrides it); on a PVM host the guest kernel needs extra command-line "
              "words, which embervm puts before boot_args there only."]
    return "\n".join(lines)


def validate_instance_id(value: str) -> None:
    """1 to 64 characters, alphanumeric or ``-`` (Firecracker's validate_instance_id)."""
    if not 1 <= len(value) <= 64:
        raise ArgError(f"Invalid instance ID: Invalid len ({len(value)});  the length must be "
                       "between 1 and 64")
    for i, c in enumerate(value):
        if not (c == "-" or c.isalnum()):
            raise ArgError(f"Invalid instance ID: Invalid char ({c}) at position {i}")


def _number(args: dict, name: str, kind: str = "usize") -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if not (isinstance(value, str) and value.isdigit() and value.isascii()):
        raise ArgError(f"'{name}' parameter expected to be of '{kind}' type.")
    return int(value)


# -- logging -----------------------------------------------------------------------------------


class Logging:
    """The logger's configuration, kept so that PUT /logger can change parts of it as
    Firecracker's ``Logger::update`` does (a missing level means Info; other missing fields
    keep their value).  Uses :func:`embervm.fclog.configure` (Firecracker's line format, file
    or FIFO) when that module exists; otherwise a plain handler on stderr or the log file."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.path: str | None = None
        self.level = "Info"
        self.show_level = False
        self.show_log_origin = False
        self.module: str | None = None
        self._handler = None

    def update(self, path: str | None = None, level: str | None = None,
               show_level: bool | None = None, show_log_origin: bool | None = None,
               module: str | None = None) -> None:
        """Apply a (partial) logger configuration; ConfigError (fclog) or OSError (the
        fallback) if the path cannot be opened."""
        if path is not None:
            self.path = path
        self.level = level or "Info"
        if show_level is not None:
            self.show_level = show_level
        if show_log_origin is not None:
            self.show_log_origin = show_log_origin
        if module is not None:
            self.module = module
        try:
            from .. import fclog
        except ImportError:
            fclog = None
        if fclog is not None:
            fclog.configure(self.instance_id, path=self.path, level=self.level,
                            show_level=self.show_level, show_log_origin=self.show_log_origin,
                            module=self.module)
        else:
            self._fallback()

    def _fallback(self) -> None:
        import logging

        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644)
            handler: logging.Handler = logging.StreamHandler(
                os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace"))
        else:
            handler = logging.StreamHandler(sys.stderr)
        parts = "%(asctime)s [" + self.instance_id.replace("%", "%%") + ":%(threadName)s"
        if self.show_level:
            parts += ":%(levelname)s"
        if self.show_log_origin:
            parts += ":%(pathname)s:%(lineno)d"
        handler.setFormatter(logging.Formatter(parts + "] %(message)s"))
        if self.module:
            handler.addFilter(logging.Filter(self.module))
        root = logging.getLogger("embervm")
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler.close()
        self._handler = handler
        root.addHandler(handler)
        root.propagate = False
        levels = {"Off": logging.CRITICAL + 10, "Trace": logging.DEBUG,
                  "Debug": logging.DEBUG, "Info": logging.INFO, "Warn": logging.WARNING,
                  "Error": logging.ERROR}
        root.setLevel(levels[self.level])

    def api_setup(self, cfg) -> None:
        """The ``logger_setup`` callback of FirecrackerApi (PUT /logger, the config file's
        ``logger``): ``cfg`` has log_path, level, show_level, show_log_origin, module."""
        self.update(path=cfg.log_path, level=cfg.level, show_level=cfg.show_level,
                    show_log_origin=cfg.show_log_origin, module=cfg.module)


# -- running -----------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT/SIGHUP while the front end runs (see the module docstring)."""

    def __init__(self) -> None:
        self.machine = None
        self.received: int | None = None
        self.count = 0

    def install(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        import signal

        self.count += 1
        if self.received is None:
            self.received = signum
        machine = self.machine
        if machine is None:
            return  # still starting up: checked before serving
        if signum == signal.SIGHUP:
            machine.kill(EXIT_SIGHUP)
        elif self.count == 1:
            machine.shutdown(128 + signum)
        else:
            machine.kill(128 + signum)


def _read_json(path: str, what: str):
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise Exit(EXIT_BAD_CONFIGURATION,
                   f"Unable to open or read from the {what}: {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Exit(EXIT_BAD_CONFIGURATION, f"The {what} {path} is not valid JSON: {e}") from None


def _report_start_times(metrics: dict, args: dict) -> None:
    """Firecracker's api_server.process_startup_time_us / _cpu_us from the jailer's flags."""
    import time

    start_us = _number(args, "start-time-us", "u64")
    cpu_us = _number(args, "start-time-cpu-us", "u64")
    parent_us = _number(args, "parent-cpu-time-us", "u64") or 0
    if start_us is not None:
        metrics["process_startup_time_us"] = max(0, time.monotonic_ns() // 1000 - start_us)
    if cpu_us is not None:
        metrics["process_startup_time_cpu_us"] = max(
            0, time.process_time_ns() // 1000 - cpu_us + parent_us)


def _serve(args: dict, signals: _Signals) -> int:
    """Everything after argument parsing; returns the exit status (or raises Exit)."""
    instance_id = str(args["id"])
    validate_instance_id(instance_id)
    level = args.get("level")
    if level is not None:
        canonical = LEVELS.get(str(level).lower())
        if canonical is None:
            raise Exit(EXIT_BAD_CONFIGURATION,
                       f"Invalid value for logger level: Failed to parse string to level "
                       f"filter: {level}.Possible values: [Error, Warning, Info, Debug]")
        level = canonical
    max_payload = _number(args, "http-api-max-payload-size")
    mmds_limit = _number(args, "mmds-size-limit")
    for name in ("start-time-us", "start-time-cpu-us", "parent-cpu-time-us"):
        _number(args, name, "u64")
    if args.get("enable-pci"):
        raise Exit(EXIT_GENERIC, "--enable-pci: PCI is not implemented by embervm (its devices "
                                 "are virtio-mmio only); start without --enable-pci.")
    seccomp = args.get("seccomp-filter")
    if isinstance(seccomp, str) and not os.access(seccomp, os.R_OK):
        raise Exit(EXIT_GENERIC, f"Seccomp error: cannot read the seccomp filter {seccomp}")
    api_enabled = not args.get("no-api")
    sock_path = str(args["api-sock"])

    listener = None
    server = None
    machine = None
    signals.install()  # before binding: a signal from now on cannot leave the socket behind
    try:
        if api_enabled:
            from ..errors import ConfigError
            from .sock import bind_unix

            try:
                listener = bind_unix(sock_path)
            except ConfigError as e:
                raise Exit(EXIT_GENERIC, f"RunWithApi error: {e}") from None

        import logging

        from ..errors import EmbervmError

        log = logging.getLogger("embervm.fc")
        logs = Logging(instance_id)
        try:
            logs.update(path=args.get("log-path"), level=level,
                        show_level=bool(args.get("show-level")),
                        show_log_origin=bool(args.get("show-log-origin")),
                        module=args.get("module"))
        except OSError as e:  # the fallback's open
            raise Exit(EXIT_GENERIC, "Could not initialize logger: Failed to open target "
                                     f"file: {e.strerror or e}") from None
        except EmbervmError as e:  # fclog's ConfigError
            raise Exit(EXIT_GENERIC, f"Could not initialize logger: {e}") from None
        log.info("Running Firecracker v%s (embervm)", FIRECRACKER_VERSION)
        if seccomp is not None or args.get("no-seccomp"):
            log.warning("%s", SECCOMP_NOTE)

        from ..machine import Machine
        from .api import FirecrackerApi

        machine = Machine(id=instance_id)
        machine._default_ok = False  # Firecracker refuses to start without a boot source
        api = FirecrackerApi(machine, mmds_size_limit=mmds_limit or max_payload,
                             version=FIRECRACKER_VERSION, logger_setup=logs.api_setup)
        if listener is not None:
            from .http import ApiServer

            server = ApiServer(sock_path, machine.loop, api.handle, max_payload=max_payload,
                               listener=listener)
            listener = None  # the server owns it now
            for name, counters in server.metrics.items():
                machine.add_metrics_group(name, counters)
            _report_start_times(server.metrics["api_server"], args)
            log.info("Listening on API socket (%r).", sock_path)
        signals.machine = machine
        if args.get("boot-timer"):
            log.warning("--boot-timer: the boot timer device is not implemented by embervm "
                        "yet; no guest boot time will be logged")
        metrics_path = args.get("metrics-path")
        if metrics_path is not None:
            try:
                machine.set_metrics(str(metrics_path))
            except EmbervmError as e:
                raise Exit(EXIT_GENERIC, f"Could not initialize metrics: {e}") from None
        metadata = args.get("metadata")
        if metadata is not None:
            doc = _read_json(str(metadata), "mmds content file")
            try:
                api.mmds.put(doc)
            except (EmbervmError, ValueError) as e:
                raise Exit(EXIT_BAD_CONFIGURATION, f"--metadata {metadata}: {e}") from None
        config_file = args.get("config-file")
        if config_file is not None:
            doc = _read_json(str(config_file), "configuration file")
            try:
                api.apply_config(doc)
            except EmbervmError as e:
                raise Exit(EXIT_BAD_CONFIGURATION,
                           f"Configuration for VMM from one single json failed: {e}") from None
            if signals.received is None:
                try:
                    machine.start()
                except EmbervmError as e:
                    raise Exit(EXIT_GENERIC,
                               f"Could not Start MicroVM from one single json: {e}") from None
                log.info("Successfully started microvm that was configured from one single "
                         "json")
        if signals.received is not None:  # a signal during start-up: do not serve
            machine.shutdown(128 + signals.received)
        elif not machine.started:
            _warm_up()
        status = machine.serve()
        return EXIT_GENERIC if status is None else status
    finally:
        if server is not None:
            server.close()
        if listener is not None:
            listener.close()
            from .sock import remove_socket_file

            remove_socket_file(sock_path)
        if machine is not None:
            try:
                machine.close()
            except Exception as e:  # the process is ending: say so, keep the exit status
                print(f"embervm: closing the VM failed: {type(e).__name__}: {e}",
                      file=sys.stderr)


def _warm_up() -> None:
    """Import what InstanceStart needs (the VMM, KVM bindings, boot loaders, devices: ~100 ms
    of imports) on a background thread while the API waits for its first requests, so that
    InstanceStart -> first KVM_RUN is only the VM's construction.  The socket is already
    accepting; a request that needs one of these modules meanwhile waits on Python's import
    lock, as it would have imported it itself."""
    import logging
    import threading

    def imports() -> None:
        try:
            from .. import vmm  # noqa: F401
            from ..devices.virtio import balloon, block, net, rng, vsock  # noqa: F401
        except Exception:  # a broken install fails InstanceStart with its error; note it here too
            logging.getLogger("embervm.fc").debug("warm-up import failed", exc_info=True)

    threading.Thread(target=imports, name="warm-up", daemon=True).start()


def _run(argv: list[str] | None) -> tuple[int, int | None]:
    """(exit status, the signal that ended the run or None)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except ArgError as e:
        print(f"Error: Arguments parsing error: {e} \n\nFor more information try --help.",
              file=sys.stderr)
        return EXIT_ARG_PARSING, None
    if args.get("help"):
        print(f"Firecracker v{FIRECRACKER_VERSION}\n")
        print("This is embervm, a microVM monitor in Python on Linux KVM, emulating Firecracker "
              f"v{FIRECRACKER_VERSION}'s binary and API.\n")
        print(format_help())
        return EXIT_OK, None
    if args.get("version"):
        print(f"Firecracker v{FIRECRACKER_VERSION}\n")
        return EXIT_OK, None
    if args.get("snapshot-version") or "describe-snapshot" in args:
        flag = "--snapshot-version" if args.get("snapshot-version") else "--describe-snapshot"
        print(f"Error: {flag}: snapshots are not implemented by embervm yet.", file=sys.stderr)
        return EXIT_GENERIC, None
    signals = _Signals()
    try:
        status = _serve(args, signals)
    except ArgError as e:
        print(f"Error: {e}", file=sys.stderr)
        status = EXIT_ARG_PARSING
    except Exit as e:
        if str(e):
            print(f"Error: {e}", file=sys.stderr)
        status = e.status
    except Exception as e:  # a bug or a host failure: a visible failure, status 1
        import traceback

        traceback.print_exc()
        print(f"Error: {type(e).__name__}: {e}", file=sys.stderr)
        status = EXIT_GENERIC
    _log_exit(status)
    import signal

    if signals.received in (signal.SIGTERM, signal.SIGINT):
        return 128 + signals.received, signals.received
    if signals.received == signal.SIGHUP:
        return EXIT_SIGHUP, None
    return status, None


def _log_exit(status: int) -> None:
    """The last log line, which Firecracker's test framework parses for the exit code."""
    import logging

    log = logging.getLogger("embervm.fc")
    if status == EXIT_OK:
        log.info("Firecracker exiting successfully. exit_code=0")
    else:
        log.error("Firecracker exiting with error. exit_code=%d", status)


def run(argv: list[str] | None = None) -> int:
    """Run the front end and return its exit status (128+N after signal N); never exits."""
    return _run(argv)[0]


def main(argv: list[str] | None = None) -> int:
    """The ``firecracker`` entry point: run, then exit with the status.  After SIGTERM or
    SIGINT it dies of that signal instead, as Firecracker does (see the module docstring)."""
    status, sig = _run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if sig is not None:
        import signal

        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(status)


if __name__ == "__main__":
    main()
