"""Whether two runs of one spec are the same run: every non-timing number of their metrics.jsonl,
step by step, over the steps both logged. A redesign that must change nothing is measured so.

    python bench/same_run.py BEFORE_RUN_DIR AFTER_RUN_DIR --before-commit REV \
        --out bench/results/same_run_seams.json

Timings (seconds, tokens/s, idle fractions, waits, memory) are left out: they are the machine's.
The JSON lists the first step and field that differ (none when the runs agree) and each run's
held-out curve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

TIMING = ("time", "seconds", "tokens_per_s", "memory_bytes", "idle_fraction", "wait_seconds")


def records(run: Path) -> dict[tuple[str, int], dict]:
    """(kind, step) -> that record's non-timing fields. A train record is keyed by its `version`
    (the steps done): its `step` was the 0-based batch index before issue 21 and is the steps done
    since, so runs on either side of that change still line up."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        step = r["version"] if r["kind"] == "train" and "version" in r else r["step"]
        out[(r["kind"], step)] = {k: v for k, v in r.items() if not k.endswith(TIMING)
                                  and not (k == "step" and r["kind"] == "train")}
    return out


def compare(before: Path, after: Path) -> dict:
    a, b = records(before), records(after)
    shared = sorted(set(a) & set(b), key=lambda key: (key[1], key[0]))
    first = None
    for key in shared:
        for field in sorted(set(a[key]) | set(b[key])):
            if a[key].get(field) != b[key].get(field):
                first = {"kind": key[0], "step": key[1], "field": field,
                         "before": a[key].get(field), "after": b[key].get(field)}
                break
        if first:
            break

    def curve(r: dict) -> list[list[float]]:
        return [[step, round(v["eval_reward"], 4)] for (kind, step), v in sorted(r.items(), key=lambda kv: kv[0][1])
                if kind == "eval"]

    return {"records_compared": len(shared),
            "train_steps_compared": sum(kind == "train" for kind, _ in shared),
            "identical": first is None, "first_difference": first,
            "eval_curve_before": curve(a), "eval_curve_after": curve(b)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--before-commit", required=True, help="the commit the BEFORE run was made with")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "same_run",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "before_commit": args.before_commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, CPU only",
        "before_spec": json.loads((args.before / "spec.json").read_text()),
        "after_spec": json.loads((args.after / "spec.json").read_text()),
        **compare(args.before, args.after),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("records_compared", "train_steps_compared", "identical",
                                             "first_difference")}))


if __name__ == "__main__":
    main()
