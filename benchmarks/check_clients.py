"""Does every client compute the same model from an export? transformers 5.x (this project) vs 4.57 and llama.cpp.

    python -m benchmarks.check_clients [EXPORT ...] [--client-python PATH] [--llama-cpp DIR]

For each export, the same fixed text (the first 64 words of the first held-out news article) is tokenized and
run through the export in this interpreter's transformers (the reference) and in each client:

- transformers 4.57.x, in the client interpreter (``--client-python``: a virtualenv that ``make check-clients``
  builds in the cache). Pass: identical token ids, max |Δlogit| <= 1e-3 (fp32).
- llama.cpp (``--llama-cpp``: the build of ``make llama-cpp``): the export converted by llama.cpp's own
  ``convert_hf_to_gguf.py`` (under its pinned requirements) to an f32 and an f16 GGUF, tokenized by llama.cpp and
  run by ``transact-llama-logits`` (benchmarks/llama_logits.cpp) either in fp32 (f32 KV cache, no flash attention:
  the same computation as the reference) or with llama.cpp's defaults (f16 KV cache, flash attention, which on the
  CPU rounds to f16 inside). Pass: identical token ids, argmax 100 % and max |Δlogit| within the row's tolerance
  (:data:`LLAMA_CPP_TOLERANCES`).

Results: benchmarks/results/check_clients.json and a README-ready table (client × export).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from transact_pl.infra.gguf import LlamaCpp, convert

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "check_clients.json"
TOLERANCE = 1e-3
NUM_TOKENS = 64
# (GGUF weights, transact-llama-logits mode) -> largest allowed max |Δlogit| against transformers fp32. f32 weights
# in fp32 mode are the same computation up to summation order (the transformers tolerance). llama.cpp's defaults
# round keys, values and the attention's inner products to f16 (11 significant bits); f16 weights round every weight
# too. Measured on the exports and the dense SmolLM2 (benchmarks/results/check_clients.json), with headroom; argmax
# must agree at every position in every row.
LLAMA_CPP_TOLERANCES = {("f32", "fp32"): 1e-3, ("f32", "default"): 0.05, ("f16", "default"): 0.1}
LLAMA_CPP_MODES = {"fp32": "fp32 attention", "default": "defaults (f16 KV, flash attn)"}


def fixed_text(path: Path) -> Path:
    from datamodules.sources import load_documents

    document = load_documents("news", "--text")[0]
    path.write_text(" ".join(document.split()[:NUM_TOKENS]), encoding="utf-8")
    return path


def logits_in(python: str, export: Path, text: Path, out: Path) -> dict:
    result = subprocess.run([python, str(HERE / "client_logits.py"), str(export), str(text), str(out)],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return torch.load(out, weights_only=True)


def read_llama_logits(path: Path) -> dict:
    """The file ``transact-llama-logits`` writes: int32 T, int32 V, int32 ids[T], float32 logits[T][V]."""
    raw = path.read_bytes()
    num_tokens, vocab = np.frombuffer(raw, np.int32, 2)
    ids = np.frombuffer(raw, np.int32, num_tokens, offset=8)
    logits = np.frombuffer(raw, np.float32, num_tokens * vocab, offset=8 + 4 * num_tokens).reshape(num_tokens, vocab)
    return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "logits": torch.from_numpy(logits.copy())}


def llama_cpp_logits(tools: LlamaCpp, gguf: Path, text: Path, out: Path, mode: str) -> dict:
    result = subprocess.run([str(tools.logits), str(gguf), str(text), str(out), mode], capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return read_llama_logits(out)


def compare(reference: dict, client: dict, tolerance: float, need_argmax: bool) -> dict:
    if "error" in client:
        return {"loads": False, "error": client["error"], "passed": False}
    same_ids = torch.equal(reference["input_ids"], client["input_ids"])
    row = {"loads": True, "same_token_ids": same_ids, "tokens": int(reference["input_ids"].numel()),
           "tolerance": tolerance}
    if same_ids:
        delta = (reference["logits"] - client["logits"]).abs().max().item()
        agree = (reference["logits"].argmax(-1) == client["logits"].argmax(-1)).float().mean().item()
        row.update(max_abs_logit_difference=delta, argmax_agreement=agree,
                   passed=delta <= tolerance and (agree == 1.0 or not need_argmax))
    else:
        row["passed"] = False
    return row


def transformers_row(python: str, export: Path, text: Path, reference: dict, scratch: Path) -> dict:
    client = logits_in(python, export, text, scratch / "client.pt")
    row = compare(reference, client, TOLERANCE, need_argmax=False)
    return {"client": f"transformers {client.get('transformers', '?')}", **row}


def llama_cpp_rows(tools: LlamaCpp, export: Path, text: Path, reference: dict, scratch: Path) -> list[dict]:
    rows, ggufs = [], {}
    for weights in sorted({weights for weights, _ in LLAMA_CPP_TOLERANCES}, reverse=True):
        ggufs[weights] = scratch / f"model-{weights}.gguf"
        try:
            convert(tools, export, ggufs[weights], weights)
        except RuntimeError as error:
            ggufs[weights] = str(error)
    for (weights, mode), tolerance in LLAMA_CPP_TOLERANCES.items():
        gguf = ggufs[weights]
        client = ({"error": gguf} if isinstance(gguf, str)
                  else llama_cpp_logits(tools, gguf, text, scratch / "llama.bin", mode))
        rows.append({"client": f"llama.cpp {weights} GGUF, {LLAMA_CPP_MODES[mode]}",
                     **compare(reference, client, tolerance, True)})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| client | export | loads | same ids | max abs dlogit (tolerance) | argmax agreement | pass |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        delta = row.get("max_abs_logit_difference", float("nan"))
        print(f"| {row['client']} | {row['export']} | {row['loads']} | {row.get('same_token_ids', '-')} | "
              f"{delta:.2e} (≤ {row.get('tolerance', float('nan')):.2g}) | "
              f"{row.get('argmax_agreement', float('nan')) * 100:.1f} % | {row['passed']} |")
        if "error" in row:
            print(f"|   | error: {row['error']} | | | | | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", default=["exports/debug_tiny", "exports/smollm2_transact"])
    parser.add_argument("--client-python", help="python of a virtualenv with the client transformers (none: skipped)")
    parser.add_argument("--llama-cpp", type=Path, help="the llama.cpp build of `make llama-cpp` (none: skipped)")
    args = parser.parse_args(argv)
    exports = [Path(e) for e in args.exports if Path(e, "config.json").is_file()]
    if not exports:
        print(f"error: no export among {', '.join(args.exports)}; run `make demo` (or train.py) first", file=sys.stderr)
        return 2
    tools = LlamaCpp(args.llama_cpp) if args.llama_cpp else None
    if tools is not None and (tools.missing() or not tools.logits.exists()):
        print(f"error: no llama.cpp build in {tools.root}; run `make llama-cpp` (~30 min on 2 cores)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        text = fixed_text(scratch / "text.txt")
        for export in exports:
            reference = logits_in(sys.executable, export, text, scratch / "reference.pt")
            found = {"export": str(export), "reference_transformers": reference.get("transformers")}
            if args.client_python:
                rows.append({**found, **transformers_row(args.client_python, export, text, reference, scratch)})
            if tools is not None:
                rows += [{**found, **row} for row in llama_cpp_rows(tools, export, text, reference, scratch)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "protocol": f"first {NUM_TOKENS} words of the first held-out news article, no special tokens, CPU; reference "
                    "transformers 5.x fp32; pass: identical token ids and max |Δlogit| <= the row's tolerance "
                    f"({TOLERANCE} for transformers); llama.cpp rows also need argmax agreement at every position",
        "rows": rows}, indent=1))
    print_table(rows)
    return 0 if rows and all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
