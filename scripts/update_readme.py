#!/usr/bin/env python
"""Write the latest measured ladder tables into README.md, between the markers

    <!-- ladder:start -->
    <!-- ladder:end -->

Usage: python scripts/update_readme.py bench-out/report.json [--readme README.md]

Only this script writes between the markers; the tables come from a real ``fastops bench``
report (fastops.bench.report.ladder_tables). Exit code 1 if the README lacks the markers or the
report is not a fastops-bench report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- ladder:start -->", "<!-- ladder:end -->"


def rewrite(readme_text: str, tables: str) -> str:
    """README text with everything between the markers replaced by ``tables``."""
    start = readme_text.find(START)
    end = readme_text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README lacks the markers {START} … {END} (in that order)")
    return readme_text[:start + len(START)] + "\n" + tables.strip() + "\n" + readme_text[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="report.json written by `fastops bench`")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = parser.parse_args(argv)

    from fastops.bench.report import SCHEMA, ladder_tables

    report = json.loads(Path(args.report).read_text())
    if report.get("schema") != SCHEMA:
        print(f"error: {args.report} is not a {SCHEMA} report (schema={report.get('schema')!r})",
              file=sys.stderr)
        return 1
    readme = Path(args.readme)
    try:
        text = rewrite(readme.read_text(), ladder_tables(report))
    except ValueError as exc:
        print(f"error: {readme}: {exc}; add them where the tables belong", file=sys.stderr)
        return 1
    readme.write_text(text)
    print(f"updated {readme} from {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
