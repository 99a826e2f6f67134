#!/usr/bin/env python3
"""Merge the results files that GPU calls brought back into benchmarks/results/<slug>.{jsonl,md,png}.

Each device call starts from this checkout's results file, so a second call's file lacks the first call's new rows:
for every op, the rows of the newest returned file that has it (by its rows' timestamps) replace that op's rows.

    python scripts/merge_results.py /work/.device/1/<slug>.jsonl /work/.device/2/<slug>.jsonl
"""
import argparse
import json
from pathlib import Path

from mltoolkit.benchmark.harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="returned <slug>.jsonl files, all of one device")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    slugs = {f.stem for f in args.files}
    if len(slugs) != 1:
        raise SystemExit(f"merge_results: the files name several devices: {sorted(slugs)}")
    newest: dict[str, list[dict]] = {}
    for f in args.files:
        by_op: dict[str, list[dict]] = {}
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_op.setdefault(row["op"], []).append(row)
        for op, rows in by_op.items():
            latest = max(r.get("timestamp", "") for r in rows)
            if op not in newest or latest > max(r.get("timestamp", "") for r in newest[op]):
                newest[op] = rows
    rows = [r for op_rows in newest.values() for r in op_rows]
    write_results(rows, args.out, slugs.pop(), set(newest))
    print(f"merged {len(rows)} rows of {len(newest)} ops into {args.out}")


if __name__ == "__main__":
    main()
