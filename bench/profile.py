"""``python -m bench.profile OUT``: where the bulk route's time goes, under load.

A ``gradsvc serve`` on SQLite holds the 256 MLP sessions of ``bench.many``; while wrk loads
``POST /v1/sessions/step`` with them, py-spy samples the API process and the busiest worker
process. ``OUT`` gets each process's top frames by self time (the frame running) and by total
time (the frame anywhere on the stack), then a cProfile of the engine's ``run_group`` on the
same workload in this process. py-spy attaches with ptrace: it needs root, or
``kernel.yama.ptrace_scope`` 0, and says so when it cannot.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import orjson

from bench import many
from bench.driver import drive
from bench.servers import children, gradsvc_with_store, process_cpu_seconds, running
from bench.stores import opened

TOP = 25
_LINE = re.compile(r":\d+\)$")


def top_frames(collapsed: str, top: int = TOP) -> str:
    """Self and total sample shares of the frames in py-spy's ``--format raw`` output
    (one ``frame;frame;...;leaf count`` line per distinct stack)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # Per function, not per line: a function's samples spread over its lines otherwise.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        samples += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"-- top {top} by {title} time")
        lines += [f"{100 * n / samples:6.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines) + "\n"


def py_spy(pid: int, seconds: float, out: Path) -> str:
    """``py-spy record`` of ``pid`` for ``seconds``, summarised; or why it failed."""
    command = [
        "py-spy",
        *("record", "--pid", str(pid), "--duration", str(int(seconds))),
        *("--format", "raw", "--output", str(out), "--nonblocking", "--rate", "200"),
    ]
    spy = Path(sys.executable).with_name("py-spy")
    if spy.exists():
        command[0] = str(spy)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "py-spy is not installed (it is in the dev extra: make bench installs it)\n"
    if done.returncode != 0 or not out.exists():
        return (
            f"py-spy failed ({done.returncode}): {done.stderr.strip()[-400:]}\n"
            "(py-spy needs ptrace permission: run as root, or with "
            "kernel.yama.ptrace_scope=0, or with CAP_SYS_PTRACE in a container)\n"
        )
    return top_frames(out.read_text())


def engine_profile(calls: int) -> str:
    """cProfile of ``calls`` ``run_group`` steps over the 256 sessions, in this process."""
    step = many._vmap_step()
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    text = io.StringIO()
    for order in ("tottime", "cumtime"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(TOP)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("out", type=Path, help="where the text report goes")
    parser.add_argument("--seconds", type=float, default=10.0, help="of sampling under load")
    args = parser.parse_args(argv)
    parts = []
    with opened("sqlite") as store, tempfile.TemporaryDirectory() as tmp:
        target = gradsvc_with_store("profile", store.detail, store.url)
        with running(target) as server:
            ids = many._sessions(server, many.MLP_SESSION, many.SESSIONS)
            workers = children(server.pid)
            worker = max(workers, key=process_cpu_seconds) if workers else None
            body = orjson.dumps(
                {
                    "items": [{"session": sid, "batch": many.MLP_BATCH} for sid in ids],
                    "include": many.INCLUDE,
                }
            )
            results: dict[str, str] = {}
            pids = {"API process": server.pid} | ({"worker": worker} if worker else {})
            spies = [
                threading.Thread(
                    target=lambda n=name, p=pid: results.__setitem__(
                        n, py_spy(p, args.seconds, Path(tmp) / f"{p}.txt")
                    )
                )
                for name, pid in pids.items()
            ]
            for spy in spies:
                spy.start()
            stats = drive(
                f"{server.base}/v1/sessions/step",
                body,
                clients=2,
                max_requests=10**6,
                seconds=args.seconds + 1,
                server_cpu=server.cpu_seconds,
            )
            for spy in spies:
                spy.join()
            parts.append(
                f"# bulk route under load: {stats.ok} requests of {many.SESSIONS} steps, "
                f"{stats.step_rate:.0f} session-steps/s, errors={stats.errors} "
                f"({stats.first_error}), driver {stats.driver}"
            )
            for name, pid in pids.items():
                parts.append(f"## py-spy, {name} (pid {pid})\n{results.get(name, '')}")
    parts.append("## cProfile, engine run_group, 256 sessions, in-process\n" + engine_profile(20))
    args.out.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
