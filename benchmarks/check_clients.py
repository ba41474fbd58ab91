"""Does every client compute the same model from an export? transformers 5.x (this project) vs 4.57.

    python -m benchmarks.check_clients [EXPORT ...] [--client-python PATH]

For each export, the same fixed text (the first 64 tokens of a held-out news article) is tokenized and run
through the export in this interpreter's transformers and in the client interpreter's (a virtualenv with
transformers 4.57.x: ``make check-clients`` builds it in the cache). Token ids must be identical and logits agree
within 1e-3; next-token argmax agreement is reported. Results: benchmarks/results/check_clients.json and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "check_clients.json"
TOLERANCE = 1e-3
NUM_TOKENS = 64


def fixed_text(path: Path) -> Path:
    from datamodules.text import load_documents

    document = load_documents("news", "--text")[0]
    path.write_text(" ".join(document.split()[:NUM_TOKENS]), encoding="utf-8")
    return path


def logits_in(python: str, export: Path, text: Path, out: Path) -> dict:
    result = subprocess.run([python, str(HERE / "client_logits.py"), str(export), str(text), str(out)],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return torch.load(out, weights_only=True)


def compare(reference: dict, client: dict) -> dict:
    if "error" in client:
        return {"loads": False, "error": client["error"]}
    same_ids = torch.equal(reference["input_ids"], client["input_ids"])
    row = {"loads": True, "transformers": client["transformers"], "same_token_ids": same_ids,
           "tokens": int(reference["input_ids"].numel())}
    if same_ids:
        delta = (reference["logits"] - client["logits"]).abs().max().item()
        agree = (reference["logits"].argmax(-1) == client["logits"].argmax(-1)).float().mean().item()
        row.update(max_abs_logit_difference=delta, argmax_agreement=agree, passed=delta <= TOLERANCE)
    else:
        row["passed"] = False
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", default=["exports/debug_tiny", "exports/smollm2_transact"])
    parser.add_argument("--client-python", required=True, help="python of a virtualenv with the client transformers")
    args = parser.parse_args(argv)
    exports = [Path(e) for e in args.exports if Path(e, "config.json").is_file()]
    if not exports:
        print(f"error: no export among {', '.join(args.exports)}; run `make demo` (or train.py) first", file=sys.stderr)
        return 2
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        text = fixed_text(Path(scratch) / "text.txt")
        for export in exports:
            reference = logits_in(sys.executable, export, text, Path(scratch) / "reference.pt")
            client = logits_in(args.client_python, export, text, Path(scratch) / "client.pt")
            rows[str(export)] = {"reference_transformers": reference.get("transformers"), **compare(reference, client)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"protocol": f"first {NUM_TOKENS} words of the first held-out news article, no special "
                                               f"tokens, fp32, CPU; pass: identical token ids and max |Δlogit| <= {TOLERANCE}",
                                   "exports": rows}, indent=1))
    print("| export | client | loads | same ids | max abs dlogit | argmax agreement | pass |")
    print("|---|---|---|---|---|---|---|")
    for export, row in rows.items():
        print(f"| {export} | transformers {row.get('transformers', '?')} | {row['loads']} | {row.get('same_token_ids', '-')} | "
              f"{row.get('max_abs_logit_difference', float('nan')):.2e} | {row.get('argmax_agreement', float('nan')):.3f} | "
              f"{row.get('passed', False)} |")
    return 0 if all(row.get("passed") for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
