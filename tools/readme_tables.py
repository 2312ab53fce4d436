"""Copy the reference report's numbers into the READMEs' answer tables, or check that they match.

README.md ("The short answer") and docs/reference/README.md ("The answer") each show a few columns of
docs/reference/report/table.md: a table whose header reads `| loss | mask | <region> <metric> | ...` takes every cell
from the row of that loss and mask in table.md's section for `<region>`, column `<metric>`, without the paper's value
in parentheses (bold kept: it is the report's rule). Run after `docs/reference/grid-report.sh` rebuilds the report;
tests/test_tools.py runs it with --check, so no README number can drift from the report.
  usage: python tools/readme_tables.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from facevae_dist.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "reference" / "report" / "table.md"
READMES = (ROOT / "README.md", ROOT / "docs" / "reference" / "README.md")
_SECTION = re.compile(r"^## .*\(`([a-z-]+)`\)\s*$")
_PAPER_VALUE = re.compile(r"\s*\([0-9.]+\)$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _row_key(loss: str, mask: str) -> tuple[str, str]:
    """'SSIM + l1', 'yes (mask decoder)' in table.md; 'SSIM+l1', 'yes' in the READMEs."""
    return loss.replace(" ", ""), mask.split()[0]


def report_cells(table_md: str) -> dict[tuple[str, str], dict[tuple[str, str], str]]:
    """{(region, metric): {(loss, mask): cell}} from every per-hypothesis section of table.md."""
    out: dict = {}
    region = header = None
    for line in table_md.splitlines():
        if line.startswith("## "):
            match = _SECTION.match(line)
            region, header = (match.group(1) if match else None), None
        elif region and line.startswith("| Loss | Mask |"):
            header = _cells(line)
        elif region and header and line.startswith("|") and not line.startswith("|---"):
            cells = _cells(line)
            for metric, cell in zip(header[3:], cells[3:]):
                metric = metric.split(" (")[0]  # '10·RMSE (paper: 10·l2)'
                out.setdefault((region, metric), {})[_row_key(cells[0], cells[1])] = _PAPER_VALUE.sub("", cell)
    return out


def rewrite(readme: str, cells: dict, name: str) -> str:
    """The README with every answer table's cells taken from the report; ValueError names what is missing."""
    lines, columns = readme.splitlines(keepends=True), None
    for i, line in enumerate(lines):
        if line.startswith("| loss | mask |"):
            columns = [tuple(c.split(" ", 1)) for c in _cells(line)[2:]]
            missing = [" ".join(c) for c in columns if c not in cells]
            if missing:
                raise ValueError(f"{name}:{i + 1}: no column {', '.join(missing)} in {TABLE.name}")
        elif columns and line.startswith("|") and not line.startswith("|---"):
            row = _cells(line)
            key = _row_key(row[0], row[1])
            try:
                new = [cells[column][key] for column in columns]
            except KeyError:
                raise ValueError(f"{name}:{i + 1}: no row {row[0]}/{row[1]} in {TABLE.name}") from None
            lines[i] = "| " + " | ".join(row[:2] + new) + " |\n"
        elif not line.startswith("|"):
            columns = None
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a README differs")
    args = parser.parse_args(argv)
    cells = report_cells(TABLE.read_text())
    stale = []
    for path in READMES:
        old = path.read_text()
        try:
            new = rewrite(old, cells, str(path.relative_to(ROOT)))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if new != old:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                atomic_write_text(path, new)
    if stale:
        print(("differs from the report: " if args.check else "rewritten: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
