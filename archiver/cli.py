"""``model-archiver``: a drop-in for ``torch-model-archiver`` 0.12 (same flags, defaults and outputs)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .build import ARCHIVE_FORMATS, ArchiveSpec, build_archive, collect_entries
from .errors import ArchiveError
from .manifest import RUNTIMES

# Below this a progress bar would only flicker.
_PROGRESS_MIN_BYTES = 64 << 20


class _OneLineCommand(click.Command):
    """Reports every failure, usage errors included, as one line on stderr and a non-zero exit."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"model-archiver: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("model-archiver: aborted", err=True)
            sys.exit(1)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"model-archiver: error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.command(cls=_OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-name", required=True, help="Model name; the output is <model-name>.mar.")
@click.option("-v", "--version", "version", required=True, help="Model version (free-form).")
@click.option("--serialized-file", help="Weights: a state_dict .pt/.pth, a TorchScript .pt, an .onnx ...")
@click.option("--model-file", help="Python file defining exactly one nn.Module class (eager mode).")
@click.option("--handler", required=True, help="Built-in handler name, or handler.py[:function].")
@click.option("--extra-files", help="Comma-separated files, directories and globs, copied to the archive root.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="python", show_default=True)
@click.option("--export-path", default=os.getcwd, show_default="current directory", help="Where the output goes.")
@click.option("--archive-format", type=click.Choice(ARCHIVE_FORMATS), default="default", show_default=True)
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing output.")
@click.option("-r", "--requirements-file", help="requirements.txt with the model's Python dependencies.")
@click.option("-c", "--config-file", help="Model config YAML (batchSize, minWorkers, ...).")
def cli(**options: Any) -> None:
    """Bundle a model's weights, code and files into a TorchServe-compatible archive."""
    spec = ArchiveSpec(**options)
    try:
        entries = collect_entries(spec)
        total = sum(path.stat().st_size for path in entries.values())
        if total >= _PROGRESS_MIN_BYTES and sys.stderr.isatty():
            with click.progressbar(length=total, label=f"Archiving {spec.model_name}", file=sys.stderr) as bar:
                build_archive(spec, entries, progress=bar.update)
        else:
            build_archive(spec, entries)
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(argv, prog_name="model-archiver")
