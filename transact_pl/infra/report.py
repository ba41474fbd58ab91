"""The before/after summary table and the dense-vs-final held-out tables (rich), printed at the end of a run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

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


# A model that spreads its probability evenly over V tokens has perplexity V exactly (up to float rounding).
UNIFORM_PPL_SHARE = 0.99


def uniform_warning(rows: list[dict], vocab_size: int) -> str | None:
    """A warning when the last measured model (``rows[-1]``) has a validation perplexity within 1% of the
    vocabulary size or above (or NaN/Inf): it predicts no better than a uniform guess, e.g. after divergence."""
    val_ppl = rows[-1].get("val_ppl") if rows else None
    if val_ppl is None or (math.isfinite(val_ppl) and val_ppl < UNIFORM_PPL_SHARE * vocab_size):
        return None
    return (f"the final model's validation perplexity {val_ppl:.4g} reaches its vocabulary size {vocab_size} (what a "
            "uniform guess scores): it predicts no better than chance (if training diverged, lower --model.learning_rate)")


HELDOUT_STAGES = ("dense", "final")
HELDOUT_HEADERS = ("text", "blocks × tokens", "dense ppl", "final ppl", "final / dense")


def heldout_ppl_cells(heldout: dict) -> list[list[str]]:
    """One row of ``HELDOUT_HEADERS`` cells per text measured at either stage ("-" where a stage lacks it)."""
    by_stage = [heldout.get(stage, {}).get("perplexity", {}) for stage in HELDOUT_STAGES]
    block_size = heldout["protocol"]["block_size"]
    cells = []
    for name in dict.fromkeys(name for results in by_stage for name in results):
        dense, final = (results.get(name) for results in by_stage)
        measured = dense or final
        ratio = f"{final['ppl'] / dense['ppl']:.2f}×" if dense and final else "-"
        cells.append([name, f"{measured['blocks']} × {block_size}",
                      *(f"{r['ppl']:.2f}" if r else "-" for r in (dense, final)), ratio])
    return cells


COMMON_TASK_HEADERS = ("task", "examples", "shots", "dense acc", "final acc", "final − dense")


def common_task_cells(heldout: dict) -> list[list[str]]:
    """One row of ``COMMON_TASK_HEADERS`` cells per common task measured at either stage, then their average."""
    by_stage = [heldout.get(stage, {}).get("common_tasks") or {} for stage in HELDOUT_STAGES]
    tasks = dict.fromkeys(task for results in by_stage for task in results.get("tasks", {}))
    cells = []
    for task in tasks:
        dense, final = (results.get("tasks", {}).get(task) for results in by_stage)
        measured = dense or final
        delta = f"{100 * (final['acc'] - dense['acc']):+.1f}" if dense and final else "-"
        cells.append([task, str(measured["examples"]), str(measured["shots"]),
                      *(f"{100 * r['acc']:.1f}" if r else "-" for r in (dense, final)), delta])
    if cells:
        dense, final = (results.get("average") for results in by_stage)
        delta = f"{100 * (final['acc'] - dense['acc']):+.1f}" if dense and final else "-"
        cells.append(["average", "", "", *(f"{100 * r['acc']:.1f}" if r else "-" for r in (dense, final)), delta])
    return cells


def heldout_samples(heldout: dict) -> list[tuple[str, str, str]]:
    """(prompt, dense continuation, final continuation) per prompt sampled at either stage ("-" where missing)."""
    by_stage = [heldout.get(stage, {}).get("samples", {}) for stage in HELDOUT_STAGES]
    prompts = dict.fromkeys(prompt for samples in by_stage for prompt in samples)
    return [(prompt, *(samples.get(prompt, "-") for samples in by_stage)) for prompt in prompts]


def heldout_tables(heldout: dict) -> list[Table]:
    """Held-out perplexity (texts × dense/final) and greedy samples (prompts × dense/final), those measured."""
    stages = " vs ".join(heldout[stage]["stage"] for stage in HELDOUT_STAGES if stage in heldout)
    tables = []
    for title, headers, cells in ((f"Held-out perplexity: {stages}", HELDOUT_HEADERS, heldout_ppl_cells(heldout)),
                                  (f"Common-task accuracy % (acc, seeded sample of each validation split): {stages}",
                                   COMMON_TASK_HEADERS, common_task_cells(heldout))):
        if cells:
            tables.append(_numbers_table(title, headers, cells))
    samples = heldout_samples(heldout)
    if samples:
        new_tokens = heldout["protocol"]["generation"]["max_new_tokens"]
        table = Table(title=f"Greedy samples (≤{new_tokens} new tokens): {stages}")
        for header in ("prompt", "dense", "final"):
            table.add_column(header, overflow="fold")
        for sample in samples:  # Text: generated text is not rich markup
            table.add_row(*(Text(cell) for cell in sample))
        tables.append(table)
    return tables


def _numbers_table(title: str, headers: tuple[str, ...], cells: list[list[str]]) -> Table:
    """A table whose first column names the row (left) and whose other columns are numbers (right)."""
    table = Table(title=title)
    for position, header in enumerate(headers):
        table.add_column(header, justify="left" if position == 0 else "right")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _wide(console: Console | None) -> Console:
    console = console or Console()
    if not console.is_terminal:  # logs and pipes get rich's 80 columns: wide enough for one line per row
        console = Console(width=150)
    return console


def print_summary(rows: list[dict], console: Console | None = None, heldout: dict | None = None,
                  vocab_size: int | None = None) -> None:
    """The summary table, then (given ``heldout``) the held-out perplexity and sample tables, then (given
    ``vocab_size``) a warning line if the final model is no better than uniform (see ``uniform_warning``)."""
    console = _wide(console)
    console.print(summary_table(rows))
    for table in heldout_tables(heldout) if heldout else []:
        console.print(table)
    warning = uniform_warning(rows, vocab_size) if vocab_size is not None else None
    if warning:
        console.print(Text(f"warning: {warning}", style="bold red"))
