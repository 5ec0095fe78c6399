"""The `lite-selftrain` command: builds configs from TOML and flags, then calls library functions.

Every `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from .errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lite-selftrain")
def cli():
    """Self-training for small language models: sample, score, build, train, evaluate, repeat."""


def main():
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
