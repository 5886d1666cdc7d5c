"""``marserve-torchserve``: TorchServe's ``torchserve`` command line, mapped onto ``serve``.

It exists for images that replace TorchServe, KServe's ``kserve-torchserve`` runtime first: that
runtime runs ``torchserve --start --model-store=... --ts-config=...`` as the container's main
process. The pip package installs it under this name only, so that it never shadows a real
TorchServe in the same environment; the container image links it as ``torchserve``.

Two things differ from ``serve``:

- **Foreground in a container.** ``torchserve --start`` daemonizes, and TorchServe's images keep the
  container alive with ``tail -f /dev/null``. Here the server stays in the foreground when it is
  the container's main process (pid 1, or the child of an init such as tini that is pid 1), so
  that the container lives and dies with it and receives its SIGTERM.
- **KServe's ports.** Under KServe (``PROTOCOL_VERSION`` in the environment, or
  ``TS_SERVICE_ENVELOPE`` set to ``kserve``/``kservev2``, as KServe's runtime sets them), the
  ``config.properties`` was written for TorchServe behind KServe's wrapper, which owned the
  container's ports and forwarded to TorchServe on 8085. marserve speaks KServe's protocols itself,
  so it takes the wrapper's place: HTTP (TorchServe's API, v1 and v2) on 0.0.0.0:8080, gRPC (v2)
  on 0.0.0.0:8081, metrics on 0.0.0.0:8082; the management APIs move to loopback, where only the
  pod's own containers reach them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from . import cli as serve_cli
from .cli import OneLineCommand, config_overrides, require_model_store
from .config import ConfigError, ServerConfig, load_config
from .version import TORCHSERVE_VERSION, marserve_version

# TorchServe's flags that have no meaning for marserve: accepted, so that existing command lines
# run, and named in a warning.
_IGNORED_FLAGS = ("workflow_store", "log_config", "cpp_log_config", "plugins_path")
# Where the management API goes under KServe when its configured port is one KServe's ports take:
# TorchServe's port behind KServe's wrapper, on loopback.
KSERVE_MANAGEMENT_PORT = 8085


def is_kserve(env: Mapping[str, str]) -> bool:
    """Whether KServe's TorchServe runtime started this process (by the variables it sets)."""
    return bool(env.get("PROTOCOL_VERSION")) or env.get("TS_SERVICE_ENVELOPE", "").lower() in ("kserve", "kservev2")


def is_container_main(pid: int, ppid: int) -> bool:
    """Whether a process is a container's main one: pid 1, or the child of the init that is."""
    return pid == 1 or ppid == 1


def kserve_overrides(config: ServerConfig, http_port: int, grpc_port: int, metrics_port: int) -> dict[str, object]:
    """Settings that put the server where KServe's container expects it (see the module docstring).

    ``config`` is what the file and the flags say without them: its management ports are kept, on
    loopback, unless KServe's ports take them; tokens stay as it sets them, and are off when it
    leaves them unset, because KServe's clients cannot hold a pod's keys (KServe authenticates at
    its gateway, and its own model servers take no keys).
    """
    taken = {http_port, grpc_port, metrics_port}
    management_port = config.management_address.port
    if management_port in taken or config.management_address == config.inference_address:
        management_port = KSERVE_MANAGEMENT_PORT
    grpc_management_port = config.grpc_management_port
    if grpc_management_port in taken or grpc_management_port == management_port:
        grpc_management_port = 0  # any free port: nothing outside the pod can reach it anyway
    overrides: dict[str, object] = {
        "inference_address": f"http://0.0.0.0:{http_port}",
        "management_address": f"http://127.0.0.1:{management_port}",
        "metrics_address": f"http://0.0.0.0:{metrics_port}",
        "grpc_inference_address": "0.0.0.0",
        "grpc_inference_port": str(grpc_port),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(grpc_management_port),
    }
    if config.disable_token_authorization is None:
        overrides["disable_token_authorization"] = "true"
    return overrides


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--start", "action", flag_value="start", default=True, help="Start the server (the default).")
@click.option("--stop", "action", flag_value="stop", help="Stop the running server.")
@click.option("-v", "--version", "action", flag_value="version", help="Print the version and exit.")
@click.option("--ts-config", type=click.Path(path_type=Path), help="config.properties to use.")
@click.option("--model-store", type=click.Path(path_type=Path), help="Directory of model archives.")
@click.option("--models", multiple=True, help="Models to load at start: NAME=FILE.mar, FILE.mar or 'all'.")
@click.option("--foreground", is_flag=True, help="Stay attached (the default for a container's main process).")
@click.option("--ncs", "--no-config-snapshots", "ncs", is_flag=True, help="Neither restore nor save the models.")
@click.option("--disable-token-auth", "--dt", "disable_token_auth", is_flag=True, help="Turn token authorization off.")
@click.option("--enable-model-api", is_flag=True, help="Allow registering and unregistering models.")
@click.option("--workflow-store", help="Ignored: marserve has no workflows.")
@click.option("--log-config", help="Ignored: logging is set in config.properties (log_level, log_format).")
@click.option("--cpp-log-config", help="Ignored: marserve has no C++ backend.")
@click.option("--plugins-path", "--ppath", "plugins_path", help="Ignored: marserve has no Java plugins.")
@click.option(
    "--kserve/--no-kserve", default=None,
    help="Take KServe's ports (HTTP 8080, gRPC 8081, metrics 8082); default: on under KServe's runtime.",
)  # fmt: skip
@click.option("--kserve-http-port", type=int, default=8080, show_default=True, help="HTTP port under KServe.")
@click.option("--kserve-grpc-port", type=int, default=8081, show_default=True, help="gRPC (h2c) port under KServe.")
@click.option("--kserve-metrics-port", type=int, default=8082, show_default=True, help="Metrics port under KServe.")
@click.argument("more_models", nargs=-1)
def cli(action: str, **options: Any) -> int:
    """TorchServe's command line, served by marserve (installed as marserve-torchserve; the image
    links it as torchserve)."""
    for flag in _IGNORED_FLAGS:
        if options[flag] is not None:
            click.echo(f"torchserve: warning: --{flag.replace('_', '-')} is ignored by marserve", err=True)
    if action == "version":
        click.echo(f"marserve Version is {marserve_version()} (TorchServe {TORCHSERVE_VERSION} compatible)")
        return 0
    if action == "stop":
        return serve_cli.stop()
    env = dict(os.environ)
    kserve = is_kserve(env) if options["kserve"] is None else options["kserve"]
    config = _config(options, env, kserve)
    if serve_cli._running_pid() is not None:
        raise click.ClickException("marserve is already running, please use torchserve --stop to stop it.")
    snapshots = serve_cli._snapshots(config, options["ncs"])
    if options["foreground"] or is_container_main(os.getpid(), os.getppid()):
        return serve_cli.run_foreground(config, snapshots)
    return serve_cli.start_background(config, snapshots)


def _config(options: dict[str, Any], env: Mapping[str, str], kserve: bool) -> ServerConfig:
    """The configuration ``serve`` would read from these flags, moved to KServe's ports if ``kserve``."""
    path = env.get("TS_CONFIG_FILE") or options["ts_config"]
    if path is None and Path("config.properties").is_file():
        path = "config.properties"
    if path is not None and not Path(path).is_file():
        raise click.ClickException(f"--ts-config file not found: {path}")
    overrides = config_overrides(options)
    try:
        config = load_config(Path(path) if path else None, env=env, overrides=overrides)
        if kserve:
            ports = (options["kserve_http_port"], options["kserve_grpc_port"], options["kserve_metrics_port"])
            moved = kserve_overrides(config, *ports)
            config = load_config(Path(path) if path else None, env=env, overrides={**overrides, **moved})
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    require_model_store(config)
    return config


def main() -> None:
    """Console-script entry point (``marserve-torchserve``; ``torchserve`` in the image)."""
    cli.main(prog_name="torchserve")
