"""Build c4_sample.jsonl (beside this script, shipped in the package): the first documents of the C4 (en)
validation subset, up to 1 MB.

Usage: python quantlm/resources/calibration/build_c4_sample.py [SOURCE_JSONL] [--max-bytes 1000000]
SOURCE_JSONL defaults to the shared copy ../shared/data/c4/c4_validation_2k.jsonl (beside the checkout; 2000
documents).
Documents are kept in source order, with their `text` and `url` fields (attribution), until the next
one would push the file past --max-bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=str(HERE.parents[3] / "shared/data/c4/c4_validation_2k.jsonl"))
    p.add_argument("--max-bytes", type=int, default=1_000_000)
    p.add_argument("--out", default=str(HERE / "c4_sample.jsonl"))
    args = p.parse_args()
    lines, size = [], 0
    with open(args.source, encoding="utf-8") as f:
        for raw in f:
            row = json.loads(raw)
            line = json.dumps({"text": row["text"], "url": row.get("url", "")}, ensure_ascii=False) + "\n"
            if size + len(line.encode()) > args.max_bytes:
                break
            lines.append(line)
            size += len(line.encode())
    Path(args.out).write_text("".join(lines), encoding="utf-8")
    print(f"{args.out}: {len(lines)} documents, {size} bytes")


if __name__ == "__main__":
    main()
