"""Run a command (e.g. torchrun ... run.py ...) and report each rank's peak resident memory.

    .venv/bin/python benchmarks/peak_rss.py --out runs/bench/peak.json -- torchrun --nproc_per_node 2 run.py ...

Every `--interval-s` the command's descendant processes are listed (Linux /proc); a process that has RANK in its
environment is a rank, and its kernel high-water mark VmHWM (the peak of its resident set since it started) is kept.
The last reading before a rank exits is its peak over the whole run, to within the interval's last moments (VmHWM
only grows). Prints one line per rank and writes JSON; the command's exit status is this script's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in children(int(k))]


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    value = next((e[5:] for e in env if e.startswith(b"RANK=")), None)
    return int(value) if value is not None else None


def hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval-s", type=float, default=0.5)
    p.add_argument("--out", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in children(proc.pid):
            rank = rank_of(pid)
            mib = hwm_mib(pid) if rank is not None else None
            if mib is not None:
                peaks[rank] = max(peaks.get(rank, 0.0), mib)
        time.sleep(args.interval_s)
    wall_s = time.perf_counter() - start
    for rank in sorted(peaks):
        print(f"rank {rank}: peak resident {peaks[rank]:.0f} MiB ({peaks[rank] / 1024:.2f} GiB)")
    print(f"exit status {proc.returncode}, {wall_s:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": command, "exit_status": proc.returncode, "wall_s": wall_s,
                                              "peak_rss_mib_per_rank": peaks}, indent=1))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
