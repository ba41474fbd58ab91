"""GGUF sizes and llama.cpp perplexities of exports, per type: what ``--export.gguf=<type>`` would write.

    python -m benchmarks.gguf_quality [EXPORT ...] [--dense] [--types f16 q8_0 q4_k_m]

Each export (and with ``--dense`` the dense SmolLM2, exported first by this project's exporter so that its config
and tokenizer are the portable ones) is converted by llama.cpp's own converter and quantizer, exactly as
``--export.gguf`` does (``transact_pl.infra.gguf.make_gguf``), and measured with llama-perplexity on the held-out
texts news and shakespeare (:func:`transact_pl.infra.gguf.gguf_protocol`). The exports are not modified.
Results: benchmarks/results/gguf_quality.json and a README-ready table. Needs ``make llama-cpp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from datamodules.sources import load_documents
from transact_pl.infra.gguf import find_llama_cpp, gguf_problem, gguf_protocol, make_gguf

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_quality.json"
TEXTS = ("news", "shakespeare")


def export_dense(directory: Path) -> Path:
    """The dense embedded SmolLM2 written by ``export_model`` (portable config and tokenizer, no pruning)."""
    from transact_pl.infra.assets import EMBEDDED_MODEL
    from transact_pl.infra.export import export_model
    from transact_pl.infra.loading import load_causal_lm, load_tokenizer

    return export_model(load_causal_lm(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL), directory / "smollm2_dense", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", default=["exports/smollm2_transact"])
    parser.add_argument("--dense", action="store_true", help="also the dense SmolLM2 (exported first, in a temp dir)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    args = parser.parse_args(argv)
    problem = next((p for p in map(gguf_problem, args.types) if p), None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tools = find_llama_cpp()
    texts = {name: load_documents(name) for name in TEXTS}
    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models = {export: Path(export) for export in args.exports}
        if args.dense:
            models["SmolLM2-135M dense"] = export_dense(scratch)
        for name, directory in models.items():
            for gguf_type in args.types:
                start = time.perf_counter()
                target = scratch / f"model-{gguf_type}.gguf"
                record = make_gguf(tools, directory, gguf_type, target, texts, directory.name)
                rows.append({"model": name, **record, "seconds": round(time.perf_counter() - start, 1)})
                (scratch / record["file"]).unlink()
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"protocol": gguf_protocol(), "llama_cpp": str(tools.root.resolve()), "rows": rows},
                                  indent=1))
    print("| model | GGUF | MB | fallback tensors | " + " | ".join(f"{t} ppl (f32 GGUF)" for t in TEXTS) + " |")
    print("|---|---|---|---|" + "---|" * len(TEXTS))
    for row in rows:
        ppl = row["perplexity"]
        cells = [f"{ppl[row['type']][t]:.2f} ({ppl['f32'][t]:.2f})" if isinstance(ppl["f32"][t], float) else "-"
                 for t in TEXTS]
        print(f"| {row['model']} | {row['type']} | {row['bytes'] / 1e6:.1f} | {row['fallback_tensors']} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
