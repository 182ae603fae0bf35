"""The `d3codec` command line: click commands that parse options and call the library.

Every command turns a `D3Error` into one line on stderr (`error: ...`) and exit status 1;
usage errors exit 2 (click); Ctrl-C exits 130. No traceback reaches the user for bad input.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import click

from d3codec._version import __version__
from d3codec.errors import D3Error


class _Group(click.Group):
    """A click group that reports `D3Error` as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D3Error as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="d3codec")
def cli() -> None:
    """d3codec: compress a labelled image dataset into one small .d3 file (D3 distillation),
    and draw training batches from it.

    \b
    Typical use:
      d3codec encode digits --budget 1ipc -o digits.d3   # distil the embedded dataset
      d3codec info digits.d3                             # what is inside, byte by byte
      d3codec eval digits.d3 --test digits               # what it is worth
    """


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="d3codec")


# ---- commands are added below, one section per command ----


# ---- info, verify: look inside .d3 files (format/) ----

@cli.command("info")
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def info_cmd(file: str, as_json: bool) -> None:
    """Summarise a .d3 file: dataset, priors, decoders, labels, budget, and a byte breakdown
    whose parts add up exactly to the file size."""
    import json

    from d3codec.format.io import load
    from d3codec.format.summary import describe, render

    d3 = load(file)
    if as_json:
        click.echo(json.dumps(describe(d3), sort_keys=True))
    else:
        click.echo(render(d3, file))


@cli.command("verify")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files.")
def verify_cmd(files: tuple[str, ...], quiet: bool) -> None:
    """Check .d3 files fully (checksum, header, every tensor). Exit 0 when all are valid, else
    exit 1 with one `error: FILE: reason` line per bad file on stderr."""
    from d3codec.format.io import load

    bad = 0
    for file in files:
        try:
            d3 = load(file)
        except D3Error as exc:
            bad += 1
            message = str(exc)
            if not message.startswith(f"{file}:"):
                message = f"{file}: {message}"
            click.echo(f"error: {message}", err=True)
        else:
            if not quiet:
                click.echo(f"ok: {file} ({d3.file_bytes:,} bytes)")
    if bad:
        sys.exit(1)
