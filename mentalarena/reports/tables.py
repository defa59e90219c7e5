"""The one markdown-table writer of every report: the records report, each evaluation's results
and the loop's summary."""
from __future__ import annotations

MISSING = "–"  # a cell with no value (None)


def markdown_table(header: list, rows: list[list], missing: str = MISSING) -> list[str]:
    """The lines of a markdown table: a header row, the separator, one line per row. None is shown
    as `missing`; a `|` inside a cell becomes `/`, so a value can never split its row."""
    def line(cells: list) -> str:
        return "| " + " | ".join(missing if c is None else str(c).replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]
