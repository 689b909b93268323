"""The ``keyedge`` command line: one function per command, errors as one line + exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from .errors import KeyedgeError

app = typer.Typer(
    help="keyedge: key-based adversarially defended ViTs, from secret key to edge-GPU engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
key_app = typer.Typer(help="Inspect key files (never prints the key itself).", no_args_is_help=True)
app.add_typer(key_app, name="key")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"keyedge: error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`KeyedgeError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyedgeError as exc:
            fail(str(exc))

    return wrapper


@app.command()
@handles_errors
def keygen(
    out: Path = typer.Option(..., "-o", "--out", help="Key file to write (0600, atomic)."),
    block_size: int = typer.Option(..., "--block-size", "-m", min=1, max=64,
                                   help="Block size M: the key permutes the M*M*C values of each block."),
    channels: int = typer.Option(3, "--channels", min=1, max=16, help="Image channels C."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key file."),
    insecure_seed: int | None = typer.Option(
        None, "--insecure-seed", help="Draw from a seeded generator (tests only; recorded as insecure)."),
) -> None:
    """Generate a new secret key from the operating system's CSPRNG."""
    from .keys import Key

    key = Key.generate(block_size, channels, seed=insecure_seed)
    key.save(out, overwrite=force)
    typer.echo(f"wrote {out} (block size {block_size}, {channels} channels, "
               f"fingerprint {key.fingerprint}{', INSECURE seeded key' if key.insecure else ''})")
    typer.echo("keep this file secret: anyone holding it can craft white-box attacks on its models")


@key_app.command("inspect")
@handles_errors
def key_inspect(path: Path = typer.Argument(..., help="Key file.")) -> None:
    """Show a key's block size, channels, key-space size and fingerprint."""
    from .keys import Key

    key = Key.load(path)
    typer.echo(f"file:         {path}")
    typer.echo(f"block size:   {key.block_size}")
    typer.echo(f"channels:     {key.channels}")
    typer.echo(f"values:       {key.size} per block")
    typer.echo(f"key space:    10^{key.log10_keyspace:.1f} keys  ((M*M*C)!)")
    typer.echo(f"insecure:     {'yes (seeded, for tests only)' if key.insecure else 'no'}")
    typer.echo(f"fingerprint:  {key.fingerprint}")


def main() -> None:
    app(prog_name="keyedge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
