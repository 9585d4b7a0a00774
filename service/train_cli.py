"""``gradsvc train``: send a CSV or .npy file to a session as a training job, and follow it.

    gradsvc train --server http://127.0.0.1:8000 --session s_... data.csv --epochs 5 \\
        --batch-size 32 [--x-columns a,b] [--y-columns c]

Columns are named by the CSV's header (or 0-based indices, which also work for .npy and for
a CSV without a header); by default y is the last column and x every other. The job's event
stream drives a progress bar (epoch, step, loss, ETA); the exit status is 0 when the job
succeeds, 1 when it fails or is cancelled, 2 for bad arguments or data, 130 on Ctrl-C (which
cancels the job: the session keeps its last completed step).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser("train", help="run a training job on a session from a CSV/.npy file")
    train.add_argument("data", help="a .csv (header optional) or .npy (2-d) file")
    train.add_argument("--server", default="http://127.0.0.1:8000", help="the service's URL")
    train.add_argument("--session", required=True, help="the session to train")
    train.add_argument("--epochs", type=int, required=True)
    train.add_argument("--batch-size", type=int, required=True)
    train.add_argument("--x-columns", help="comma-separated names or indices (default: all but y)")
    train.add_argument("--y-columns", help="comma-separated names or indices (default: the last)")
    train.add_argument("--no-shuffle", action="store_true", help="keep the rows' order")
    train.add_argument("--seed", type=int, help="seeds the shuffling")
    train.add_argument(
        "--api-key", default=os.environ.get("GRADSVC_API_KEY"), help="[GRADSVC_API_KEY]"
    )


def load(path: str, x_columns: str | None, y_columns: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The file's x and y columns as float64 arrays: x ``[rows, features]``, y ``[rows]`` for
    one column, else ``[rows, columns]``."""
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


def run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from service.client import ApiError, Client, ClientError

    try:
        x, y = load(args.data, args.x_columns, args.y_columns)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"gradsvc train: {exc}\n")
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
            sys.stderr.write(f"gradsvc train: {exc.title}: {exc.detail}\n")
            return 2 if exc.status < 500 else 1
        except ClientError as exc:
            sys.stderr.write(f"gradsvc train: {exc}\n")
            return 1
        columns = (
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        )
        final = job.raw
        try:
            with Progress(*columns, transient=False) as progress:
                total = job.raw.get("total_steps")
                task = progress.add_task(
                    "train", total=total, epoch=1, epochs=args.epochs, loss="–"
                )
                for event in client.events(job.id):
                    if not isinstance(event.data, dict):
                        continue
                    final = event.data
                    loss = final.get("loss")
                    progress.update(
                        task,
                        completed=final.get("steps_done", 0),
                        epoch=final.get("epoch", 1),
                        loss=f"{loss:.6g}" if isinstance(loss, float) else "–",
                    )
                    if event.event == "end":
                        break
        except KeyboardInterrupt:
            client.cancel(job.id)
            sys.stderr.write(f"gradsvc train: cancelled job {job.id}\n")
            return 130
    status = final.get("status")
    name = Path(args.data).name
    if status == "succeeded":
        print(f"{name}: {final.get('steps_done')} steps, session at step {final.get('step')}")
        return 0
    detail = (final.get("error") or {}).get("detail", "")
    sys.stderr.write(f"gradsvc train: job {job.id} {status}{': ' + detail if detail else ''}\n")
    return 1
