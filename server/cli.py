"""``serve``: start (in the background or the foreground), stop, or show the version."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .config import ConfigError, ServerConfig, load_config
from .models.workdirs import process_start
from .version import TORCHSERVE_VERSION, marserve_version

if TYPE_CHECKING:
    from .models.snapshot import SnapshotPlan

START_TIMEOUT = 120.0
# How a background server that could not start says why on its ready pipe.
_FAILED = "failed: "
STOP_TIMEOUT = 60.0


def pid_file() -> Path:
    return Path(tempfile.gettempdir()) / ".marserve.pid"


def _running_pid() -> int | None:
    """The pid of a live server recorded in the pid file; a stale file is removed."""
    path = pid_file()
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        written = path.stat().st_mtime
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    # Another program, even another marserve, may have been given the pid of a server that died
    # without cleaning up: the recorded server had started before it wrote the file.
    if b"serve" not in cmdline or _started_after(pid, written):
        path.unlink(missing_ok=True)
        return None
    return pid


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after the epoch time ``when`` (a second of slack: /proc
    gives the boot time in whole seconds); False where /proc cannot tell."""
    start = process_start(pid)
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return False
    return start is not None and boot + start / os.sysconf("SC_CLK_TCK") > when + 1


class OneLineCommand(click.Command):
    """A command whose errors are one line (``<prog>: error: ...``) and a non-zero exit."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"{prog_name or self.name}: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--start", "action", flag_value="start", default=True, help="Start the server (the default).")
@click.option("--stop", "action", flag_value="stop", help="Stop the running server.")
@click.option("-v", "--version", "action", flag_value="version", help="Print the version and exit.")
@click.option("--model-store", type=click.Path(path_type=Path), help="Directory of model archives.")
@click.option("--models", multiple=True, help="Models to load at start: NAME=FILE.mar, FILE.mar or 'all'.")
@click.option("--ts-config", type=click.Path(path_type=Path), help="config.properties to use.")
@click.option("--foreground", is_flag=True, help="Stay attached to the terminal; logs go there.")
@click.option(
    "--ncs", "--no-config-snapshots", "ncs", is_flag=True,
    help="Neither restore the saved models at start nor save them on changes.",
)  # fmt: skip
@click.option("--disable-token-auth", "--dt", "disable_token_auth", is_flag=True, help="Turn token authorization off.")
@click.option("--enable-model-api", is_flag=True, help="Allow registering and unregistering models.")
@click.argument("more_models", nargs=-1)
def cli(action: str, **options: Any) -> int:
    """marserve: a TorchServe-compatible model server (inference :8080, management :8081, metrics :8082;
    gRPC inference :7070, management :7071)."""
    if options["more_models"] and not options["models"]:
        raise click.UsageError(f"unexpected argument: {options['more_models'][0]}")
    if action == "version":
        click.echo(f"marserve Version is {marserve_version()} (TorchServe {TORCHSERVE_VERSION} compatible)")
        return 0
    if action == "stop":
        return stop()
    config = _config(options)
    if _running_pid() is not None:
        raise click.ClickException("marserve is already running, please use serve --stop to stop it.")
    # Read here, so that a snapshot that cannot be restored stops even a background start at once.
    snapshots = _snapshots(config, options["ncs"])
    if options["foreground"]:
        return run_foreground(config, snapshots)
    return start_background(config, snapshots)


def config_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """What the command line sets in the configuration (``options`` as click parsed them)."""
    overrides: dict[str, Any] = {}
    if options["model_store"] is not None:
        overrides["model_store"] = str(options["model_store"])
    models = [*options["models"], *options["more_models"]]
    if models:
        overrides["load_models"] = ",".join(models)
    if options["enable_model_api"]:
        overrides["enable_model_api"] = "true"
    if options["disable_token_auth"]:
        overrides["disable_token_authorization"] = "true"
    return overrides


def _config(options: dict[str, Any]) -> ServerConfig:
    env = dict(os.environ)
    path = env.get("TS_CONFIG_FILE") or options["ts_config"]
    if path is None and Path("config.properties").is_file():
        path = "config.properties"
    overrides = config_overrides(options)
    if path is not None and not Path(path).is_file():
        raise click.ClickException(f"--ts-config file not found: {path}")
    try:
        config = load_config(Path(path) if path else None, env=env, overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    require_model_store(config)
    return config


def require_model_store(config: ServerConfig) -> None:
    """TorchServe's one-line refusal when the model store is not given or not a directory."""
    if config.model_store is None:
        raise click.ClickException("Missing mandatory parameter --model-store")
    if not Path(config.model_store).is_dir():
        raise click.ClickException(f"--model-store directory not found: {config.model_store}")


def _snapshots(config: ServerConfig, ncs: bool) -> SnapshotPlan:
    from .models.snapshot import SnapshotError, plan_snapshots

    try:
        return plan_snapshots(config, enabled=not ncs)
    except SnapshotError as exc:
        raise click.ClickException(str(exc)) from None


def start_background(config: ServerConfig, snapshots: SnapshotPlan) -> int:
    """Start a detached server and return once all its ports listen (or it failed).

    The server is a fork of this process rather than a new interpreter: it keeps the modules and
    the configuration already loaded here, which saves a third of the start-up.
    """
    log_dir = Path(config.log_location)
    log_dir.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_dir / "marserve.log", "ab") as log_file:
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _detach(log_file.fileno())
            _serve_detached(config, snapshots, write_end)
    os.close(write_end)
    ready = _read_ready(read_end, START_TIMEOUT)
    os.close(read_end)
    if ready is None or ready.startswith(_FAILED):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if ready is not None:
            raise click.ClickException(ready[len(_FAILED) :])
        raise click.ClickException(f"marserve failed to start; see {log_dir / 'ts_log.log'} and marserve.log there")
    inference, management, metrics, grpc_inference, grpc_management = (ready.split() + ["-"] * 5)[:5]
    click.echo(
        f"marserve started (pid {pid}): inference {inference}, management {management}, "
        f"metrics {metrics}; {_grpc_line(config, grpc_inference, grpc_management)}; logs in {log_dir}/"
    )
    return 0


def _grpc_line(config: ServerConfig, inference: str, management: str) -> str:
    """Where gRPC listens, for the start message (``-``: that port is not listening)."""
    if not config.enable_grpc:
        return "gRPC off"
    if inference == "-" and management == "-":
        return "gRPC not listening (see the log)"
    tls = " (TLS)" if config.enable_grpc_ssl else ""
    return f"gRPC inference {inference}, management {management}{tls}"


def _detach(log_fd: int) -> None:
    """In the forked server: a session of its own, no terminal, output to the log."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def _serve_detached(config: ServerConfig, snapshots: SnapshotPlan, ready_fd: int) -> NoReturn:
    # Never returns into the CLI's code: the parent is the one that reports and exits.
    code = 1
    try:
        code = run_foreground(config, snapshots, ready_fd)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - logged, and the parent sees the ready pipe close
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_ready(fd: int, timeout: float) -> str | None:
    """The server's one line on the ready pipe: its URLs, or ``_FAILED`` and why it could not start."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None  # the server exited before it was ready
        data += chunk
    return data.decode().strip()


def run_foreground(config: ServerConfig, snapshots: SnapshotPlan | None = None, ready_fd: int | None = None) -> int:
    """Serve until stopped; with ``ready_fd`` (a background start) say on it where the ports listen."""
    from .http.auth import KEY_FILE_NAME
    from .logs import configure_logging
    from .serve import StartupError, serve

    access_log = configure_logging(config, foreground=ready_fd is None)

    def on_ready(urls: list[str]) -> None:
        pid_file().write_text(str(os.getpid()))
        if ready_fd is not None:
            os.write(ready_fd, (" ".join(urls) + "\n").encode())
            os.close(ready_fd)

    async def until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            config, environ=dict(os.environ), stop=stop, key_file=Path.cwd() / KEY_FILE_NAME,
            temp_dir=Path(tempfile.gettempdir()), on_ready=on_ready, access_log=access_log, snapshots=snapshots,
        )  # fmt: skip

    try:
        _run(until_signalled())
    except StartupError as exc:
        if ready_fd is None:
            raise click.ClickException(str(exc)) from None
        os.write(ready_fd, f"{_FAILED}{exc}\n".encode())
        return 1
    finally:
        if _running_pid() == os.getpid():
            pid_file().unlink(missing_ok=True)
    return 0


def _run(coroutine: Any) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coroutine)


def stop() -> int:
    pid = _running_pid()
    if pid is None:
        click.echo("marserve is not currently running.")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        logging.warning("marserve did not stop within %.0f s; killing it", STOP_TIMEOUT)
        os.kill(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    click.echo("marserve has stopped.")
    return 0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="serve")
