"""Peak memory of `recover` per process, 1 process against 2, on SmolLM2 with the default batch.

    python bench/studies/recover_memory.py [--steps 4] [--processes 1,2]

Prunes SmolLM2-135M 2:4 (Wanda, 16 x 256 calibration tokens), then runs `thanos-deploy recover` on it
for a few steps at each process count in a fresh process (`/usr/bin/time -v`: the peak resident
size of the largest process of the run), and prints each run's peak RSS, the bytes each process
holds of parameters, gradients and optimizer states (measured from its shards, recovery.json) and
the plan's figures. CPU, gloo, OMP_NUM_THREADS = 2 / processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = str(Path(sys.executable).with_name("thanos-deploy"))


def run(command: list[str], env: dict) -> tuple[float, str]:
    """(peak RSS in bytes of the largest process, stdout) of a command."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(peak.group(1)) * 1024.0, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps of 4 x 256 tokens per run")
    ap.add_argument("--processes", default="1,2", help="process counts to compare")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recover-memory-"))
    rows = []
    try:
        student = work / "student"
        subprocess.run([CLI, "compress", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--nsamples", "16", "--seqlen", "256",
                        "--out", str(student)], check=True, capture_output=True)
        for n in (int(p) for p in args.processes.split(",")):
            out = work / f"recovered-{n}"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
            peak, _ = run([CLI, "recover", str(student), "--tokens", str(args.steps * 4 * 256), "--nproc", str(n), "--out", str(out)], env)
            log = json.loads((out / "recovery.json").read_text())
            rows.append({"processes": n, "peak_rss_bytes": peak, "shard_bytes": log["shard_bytes"], "plan": log["plan"]})
            held = sum(log["shard_bytes"].values())
            print(f"{n} process(es): peak RSS {peak / 1e9:.2f} GB per process; shards held {held / 1e9:.3f} GB "
                  f"(plan: {log['plan']['total'] / 1e9:.2f} GB in all)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            print(f"{row['processes']} against {base['processes']}: peak RSS {row['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x, "
                  f"shards {sum(row['shard_bytes'].values()) / sum(base['shard_bytes'].values()):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recover-memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
