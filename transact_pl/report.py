"""The before/after summary table (rich), printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

COLUMNS = (
    ("stage", "stage", str),
    ("heads", "heads (q/kv)", None),
    ("mlp", "MLP width", str),
    ("params", "params", lambda v: f"{v / 1e6:.1f} M"),
    ("non_embedding_params", "non-emb params", lambda v: f"{v / 1e6:.1f} M"),
    ("kv_bytes_per_token", "KV B/token (16-bit)", lambda v: f"{v:,}"),
    ("val_ppl", "val ppl", lambda v: f"{v:.2f}"),
    ("test_ppl", "test ppl", lambda v: f"{v:.2f}"),
)


def summary_table(rows: list[dict], title: str = "TransAct pruning summary") -> Table:
    table = Table(title=title)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "stage" else "right")
    for row in rows:
        table.add_row(*format_row(row))
    return table


def format_row(row: dict) -> list[str]:
    """The cells of one summary row, as printed (heads as query/KV)."""
    cells = []
    for key, _, fmt in COLUMNS:
        if key == "heads":
            cells.append(f"{row['heads']}/{row['kv_heads']}")
        else:
            cells.append(fmt(row[key]) if key in row else "-")
    return cells


def print_summary(rows: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:  # logs and pipes get rich's 80 columns: wide enough for one line per row
        console = Console(width=150)
    console.print(summary_table(rows))
