"""The `ddpm-codec` command line: parse, call the library, print. JSON on stdout, humans on stderr."""
from __future__ import annotations

import functools
import json
import sys

import click

from ddpm_codec import perf


class InputError(click.ClickException):
    """Bad input or arguments: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(fn):
    """Turn the library's user-facing errors into exit code 2 with one line, never a traceback."""
    from ddpm_codec.adapt import AdaptError
    from ddpm_codec.checkpoint import CheckpointError
    from ddpm_codec.codec import DecodeError
    from ddpm_codec.coding.container import FormatError
    from ddpm_codec.coding.entropy import CodingError
    from ddpm_codec.data import DataError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, CheckpointError, DecodeError, FormatError, CodingError, AdaptError) as e:
            raise InputError(str(e)) from None
        except OSError as e:
            raise InputError(f"{e.filename or ''}: {e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddpm-codec")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="torch CPU threads (default: all cores).")
def cli(threads: int | None) -> None:
    """Image compression with a denoising diffusion model (DDPM).

    encode/decode/info: lossless bits-back coding into .ddpm files; nll:
    bits/dim through the variational bound; train: Algorithm 1; calibrate:
    the reverse variance; sample: Algorithm 2 or DDIM; bench: speed.
    """
    perf.setup(threads)


from . import commands  # noqa: E402,F401  (registers the subcommands on `cli`)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ddpm-codec")


if __name__ == "__main__":  # pragma: no cover
    main()
