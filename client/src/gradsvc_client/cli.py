"""``gradsvc-train``: send a CSV or .npy file to a session as a training job, and follow it.

    gradsvc-train --server http://127.0.0.1:8000 --session s_... data.csv --epochs 5 \\
        --batch-size 32 [--x-columns a,b] [--y-columns c]

Columns are named by the CSV's header (or 0-based indices, which also work for .npy and for
a CSV without a header); by default y is the last column and x every other. The job's event
stream drives a progress line (epoch, step, loss, ETA); the exit status is 0 when the job
succeeds, 1 when it fails or is cancelled, 2 for bad arguments or data, 130 on Ctrl-C (which
cancels the job: the session keeps its last completed step). It needs only this package:
the server's ``gradsvc train`` is this same command.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from gradsvc_client.client import Client
from gradsvc_client.errors import ApiError, ClientError

__all__ = ["add_arguments", "load", "main", "run"]

PROG = "gradsvc-train"
DESCRIPTION = "run a training job on a session from a CSV/.npy file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments to a parser (this command's, or ``gradsvc train``'s).

    Args:
        parser: The parser to add them to.
    """
    parser.add_argument("data", help="a .csv (header optional) or .npy (2-d) file")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the service's URL")
    parser.add_argument("--session", required=True, help="the session to train")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--x-columns", help="comma-separated names or indices (default: all but y)")
    parser.add_argument("--y-columns", help="comma-separated names or indices (default: the last)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the rows' order")
    parser.add_argument("--seed", type=int, help="seeds the shuffling")
    parser.add_argument(
        "--api-key", default=os.environ.get("GRADSVC_API_KEY"), help="[GRADSVC_API_KEY]"
    )


def load(
    path: str, x_columns: str | None, y_columns: str | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """A file's x and y columns as float64 arrays.

    Args:
        path: A .csv (header optional) or .npy (2-d) file.
        x_columns: Comma-separated names or indices; None: every column but y's.
        y_columns: Comma-separated names or indices; None: the last column.

    Returns:
        x ``[rows, features]``, and y ``[rows]`` for one column, else ``[rows, columns]``.

    Raises:
        OSError: The file cannot be read.
        ValueError: It is not a table of numbers, or names a column it lacks.
    """
    names: list[str] = []
    if path.endswith(".npy"):
        table = np.load(path, allow_pickle=False)  # never a pickle from a file either
    else:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
        if rows and not _numeric(rows[0]):
            names, rows = [c.strip() for c in rows[0]], rows[1:]
        table = np.array(rows, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] < 2:
        raise ValueError(f"{path}: expected a table of at least 2 columns and 1 row")
    width = table.shape[1]
    ys = _columns(y_columns, names, width) if y_columns else [width - 1]
    xs = (
        _columns(x_columns, names, width) if x_columns else [c for c in range(width) if c not in ys]
    )
    y = table[:, ys].astype(np.float64)
    return table[:, xs].astype(np.float64), y[:, 0] if len(ys) == 1 else y


def _numeric(row: Sequence[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def _columns(spec: str, names: list[str], width: int) -> list[int]:
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if part in names:
            out.append(names.index(part))
        elif part.isdigit() and int(part) < width:
            out.append(int(part))
        else:
            raise ValueError(f"no column {part!r} (columns: {', '.join(names) or width})")
    return out


class _Progress:
    """One line of progress: rewritten in place on a terminal; elsewhere (a log, a pipe)
    printed at most once a second, and always at the end."""

    def __init__(self, out: TextIO, epochs: int, total: int | None) -> None:
        self.out, self.epochs, self.total = out, epochs, total
        self.tty = out.isatty()
        self.started = self.last = time.monotonic()
        self.line = ""

    def update(self, state: dict[str, Any], final: bool = False) -> None:
        done = int(state.get("steps_done") or 0)
        total = int(state.get("total_steps") or self.total or 0)
        loss = state.get("loss")
        width = 24
        filled = width * done // total if total else 0
        eta = "–"
        elapsed = time.monotonic() - self.started
        if total and done:
            eta = f"{max(0.0, elapsed * (total - done) / done):.0f}s"
        shown = f"{loss:.6g}" if isinstance(loss, float) else "–"
        self.line = (
            f"epoch {state.get('epoch') or 1}/{self.epochs} "
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total or '?'} loss {shown} eta {eta}"
        )
        now = time.monotonic()
        if self.tty:
            self.out.write("\r" + self.line + ("\n" if final else ""))
        elif final or now - self.last >= 1.0:
            self.out.write(self.line + "\n")
            self.last = now
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    """Start the job that ``args`` describe, follow it, and say how it ended.

    Args:
        args: What ``add_arguments``' parser parsed.

    Returns:
        The exit status: 0 succeeded, 1 failed or cancelled, 2 bad arguments or data,
        130 interrupted (the job is cancelled).
    """
    try:
        x, y = load(args.data, args.x_columns, args.y_columns)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    with Client(args.server, api_key=args.api_key, tensors="numpy") as client:
        try:
            job = client.train(
                args.session,
                x,
                y,
                args.epochs,
                args.batch_size,
                shuffle=not args.no_shuffle,
                seed=args.seed,
            )
        except ApiError as exc:
            sys.stderr.write(f"{PROG}: {exc.title}: {exc.detail}\n")
            return 2 if exc.status < 500 else 1
        except ClientError as exc:
            sys.stderr.write(f"{PROG}: {exc}\n")
            return 1
        final = job.raw
        progress = _Progress(sys.stdout, args.epochs, job.raw.get("total_steps"))
        try:
            for event in client.events(job.id):
                if not isinstance(event.data, dict):
                    continue
                final = event.data
                last = event.event == "end" or (event.job is not None and event.job.done)
                progress.update(final, final=last)
                if last:
                    break
        except KeyboardInterrupt:
            client.cancel(job.id)
            sys.stderr.write(f"{PROG}: cancelled job {job.id}\n")
            return 130
        except ClientError as exc:
            sys.stderr.write(f"{PROG}: {exc}\n")
            return 1
    status = final.get("status")
    name = Path(args.data).name
    if status == "succeeded":
        print(f"{name}: {final.get('steps_done')} steps, session at step {final.get('step')}")
        return 0
    detail = (final.get("error") or {}).get("detail", "")
    sys.stderr.write(f"{PROG}: job {job.id} {status}{': ' + detail if detail else ''}\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gradsvc-train`` console script.

    Args:
        argv: The arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status (see ``run``).
    """
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
