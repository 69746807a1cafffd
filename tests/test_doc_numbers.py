"""Every cited number in README.md and docs/ equals the committed file and key it names.

The docs cite a figure as ``VALUE [SOURCE]`` or ``VALUE (LO–HI) [SOURCE]``, the source in square
brackets right after the number (in a table, in the next cell):

    SOURCE = path#key                   a JSON file: key is a dotted path (a number indexes a list)
           | path#column@col=value,...  a CSV file: the column in the one row matching the filters

``path`` is relative to the repository root; a bare file name is under ``reports/metrics/``. A
value followed by ``%`` is the source's value x 100. The printed value must equal the source's
rounded to the printed decimals (``65,536`` and ``0.0705`` alike); an interval is checked against
``key_ci`` (``name_ci.i`` for a list element ``name.i``; the value's own list when the key ends in
``_ci``; in a CSV, the row's ``lo`` and ``hi`` for its ``value`` column). A citation whose file or key is
missing fails, so a renamed key cannot leave a stale number behind.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"[−-]?\d[\d,]*(?:\.\d+)?"
CITATION = re.compile(
    rf"(?P<value>{NUMBER})(?P<pct>\s?%)?"
    rf"(?:\s*\((?P<lo>{NUMBER})\s*(?:–|-|to)\s*(?P<hi>{NUMBER})\s*%?\))?"
    r"\s*\|?\s*\[(?P<source>[\w./-]+\.(?:json|csv)#[^\]\s]+)\]"
)


def parse_number(text: str) -> tuple[float, int]:
    """``(value, decimals)`` of a printed number."""
    text = text.replace("−", "-").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), decimals


def json_key(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if part.isdigit() and isinstance(data, list) else data[part]
    return data


def lookup(source: str) -> tuple[Any, Any]:
    """``(value, interval or None)`` of a citation's source."""
    path, _, key = source.partition("#")
    file = ROOT / path if "/" in path else ROOT / "reports" / "metrics" / path
    if not file.is_file():
        raise AssertionError(f"[{source}]: {file.relative_to(ROOT)} not found")
    if file.suffix == ".json":
        data = json.loads(file.read_text())
        try:
            value = json_key(data, key)
        except (KeyError, IndexError, TypeError):
            raise AssertionError(f"[{source}]: no key {key!r} in {path}") from None
        ci = None
        if key.endswith("_ci"):
            ci = value
        else:  # `k` -> `k_ci`; a list element `k.i` -> `k_ci.i`
            head, _, index = key.rpartition(".")
            try:
                ci = json_key(data, f"{head}_ci.{index}" if index.isdigit() else f"{key}_ci")
            except (KeyError, IndexError, TypeError):
                ci = None
        return value, ci
    column, _, filters = key.partition("@")
    table = pl.read_csv(file, infer_schema_length=None)
    for condition in filter(None, filters.split(",")):
        col, _, want = condition.partition("=")
        table = table.filter(pl.col(col).cast(pl.String) == want)
    if table.height != 1 or column not in table.columns:
        raise AssertionError(f"[{source}]: {table.height} rows match in {path} (need one with column {column!r})")
    ci = None
    if column == "value" and {"lo", "hi"} <= set(table.columns) and table["lo"][0] is not None:
        ci = [table["lo"][0], table["hi"][0]]  # a table of values with their intervals (mlsae compare)
    return table[column][0], ci


def agrees(printed: str, actual: Any, percent: bool) -> bool:
    value, decimals = parse_number(printed)
    if not isinstance(actual, (int, float)) or isinstance(actual, bool) or not math.isfinite(actual):
        return False
    actual = actual * 100 if percent else actual
    return abs(actual - value) <= 0.5 * 10**-decimals * (1 + 1e-9) + 1e-12


def citations(text: str) -> list[re.Match[str]]:
    return list(CITATION.finditer(text))


def check(text: str) -> list[str]:
    """The disagreements of every citation in `text`, one line each."""
    problems = []
    for m in citations(text):
        source, percent = m["source"], bool(m["pct"])
        try:
            value, ci = lookup(source)
        except AssertionError as e:
            problems.append(str(e))
            continue
        if m["lo"] is not None and not m["source"].split("#")[1].endswith("_ci") and ci is None:
            problems.append(f"[{source}]: an interval is printed but the source has none")
        if (m["lo"] is not None and ci is not None) and not (
            agrees(m["lo"], ci[0], percent) and agrees(m["hi"], ci[1], percent)
        ):
            problems.append(f"[{source}]: printed interval {m['lo']}–{m['hi']}, source {ci}")
        if not agrees(m["value"], value[0] if isinstance(value, list) else value, percent):
            problems.append(f"[{source}]: printed {m['value']}{'%' if percent else ''}, source {value!r}")
    return problems


def test_the_checker_reads_and_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser on known text: agreeing citations pass, each kind of mismatch is caught."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "m.json").write_text(
        json.dumps(
            {
                "a": 0.07049,
                "a_ci": [0.0681, 0.0729],
                "n": 65536,
                "by": [0.12, 0.41],
                "by_ci": [[0, 1], [0.4, 0.42]],
                "f": 0.0531,
            }
        )
    )
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "t.csv").write_text("figure,sd\nx,0.0011\ny,0.02\n")
    (tmp_path / "x" / "v.csv").write_text("figure,value,lo,hi\nx,0.5,0.4,0.6\ny,2,,\n")
    good = (
        "share 0.0705 (0.068–0.073) [m.json#a], 65,536 [m.json#n] tokens, block 1: 0.41 [m.json#by.1], "
        "5.3 % [m.json#f] dead | 0.0011 | [x/t.csv#sd@figure=x] |"
    )
    assert len(citations(good)) == 5 and check(good) == []
    assert check("0.0706 [m.json#a]") and check("0.0705 (0.069–0.073) [m.json#a]")
    assert check("5.3 [m.json#f]")  # the % sign matters
    assert check("1 [m.json#missing]") and check("1 [nope.json#a]") and check("0.02 [x/t.csv#sd@figure=z]")
    assert check("0.05 (0.04–0.06) [m.json#f]")  # an interval the source does not have
    assert check("0.41 (0.40–0.42) [m.json#by.1]") == [] and check("0.41 (0.39–0.42) [m.json#by.1]")
    assert check("0.5 (0.4–0.6) [x/v.csv#value@figure=x]") == [] and check("0.5 (0.4–0.7) [x/v.csv#value@figure=x]")
    assert check("2 [x/v.csv#value@figure=y]") == [] and check("2 (1–3) [x/v.csv#value@figure=y]")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_cited_numbers_equal_the_committed_files(doc: Path) -> None:
    problems = check(doc.read_text())
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_readme_results_table_is_cited() -> None:
    """The README's results table: every row cites its figure, and there are enough of them."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Results")
    section = text[start : text.index("\n## ", start + 1)]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    cited = [r for r in rows[1:] if citations(r)]
    assert len(cited) >= 8, f"only {len(cited)} cited rows in the README's results table"
