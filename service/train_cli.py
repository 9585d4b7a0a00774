"""``gradsvc train``: the client's ``gradsvc-train``, as a subcommand of the server's CLI.

The command lives in the client distribution (``gradsvc_client.cli``) so that it works with
only the client installed; this adds it to ``gradsvc``'s parser unchanged.
"""

from __future__ import annotations

import argparse

from gradsvc_client import cli


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` to the server CLI's subcommands.

    Args:
        sub: ``gradsvc``'s subparsers.
    """
    cli.add_arguments(sub.add_parser("train", help=cli.DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    """Run ``gradsvc train`` (see ``gradsvc_client.cli.run``).

    Args:
        args: The parsed arguments.

    Returns:
        The exit status.
    """
    return cli.run(args)
