#!/usr/bin/env python3
"""Render the JSON of benchmarks/throughput.py (or ``tokenreduce benchmark --json``) as markdown.

python benchmarks/report.py bench-out/throughput.json [more.json ...] [--screen]
"""

from __future__ import annotations

import argparse
import json
import sys

from tokenreduce.bench.protocol import Result
from tokenreduce.bench.report import markdown, screen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON results written by tokenreduce.bench")
    p.add_argument("--screen", action="store_true", help="fixed-width tables instead of markdown")
    args = p.parse_args(argv)
    for i, path in enumerate(args.files):
        with open(path) as f:
            try:
                result = Result.from_dict(json.load(f))
            except (ValueError, TypeError) as err:
                print(f"report.py: {path}: {err}", file=sys.stderr)
                return 2
        print(("\n\n" if i else "") + (screen(result) if args.screen else markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
