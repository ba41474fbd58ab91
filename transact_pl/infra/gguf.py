"""A GGUF file inside an export, made by llama.cpp's own converter and quantizer, with its perplexity in llama.cpp.

``--export.gguf=<type>`` runs, on the finished Hugging Face directory (before its manifest is written, so the GGUF
is listed there and ``overwrite`` replaces it with the rest):

1. ``convert_hf_to_gguf.py`` (llama.cpp's converter, in its own virtualenv under its own pinned requirements) to an
   f32 GGUF, the exact weights of the export;
2. ``llama-quantize`` to ``<type>`` (kept as ``model-<type>.gguf``; for ``f32`` step 1's file is kept as is);
3. ``llama-perplexity`` on each held-out text, for the f32 GGUF and the kept one: llama.cpp's own protocol, the first
   :data:`PERPLEXITY_CHUNKS` chunks of :data:`PERPLEXITY_CONTEXT` tokens, the second half of every chunk scored.

The numbers go into the model card and, when the export has one, ``transact_eval.json`` (key ``gguf``). The tools
are found in one cached build (``make llama-cpp``, ~30 min on 2 cores): ``$TRANSACT_LLAMA_CPP``, else
``<cache>/clients/llama.cpp`` (cache: ``$TRANSACT_PL_CACHE`` or ``~/.cache/transact_pl``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transact_pl.errors import ConfigError
from transact_pl.infra.assets import cache_dir

# llama-quantize's names (lower case) of the types an export may carry; f32 is the converter's output as is.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
PERPLEXITY_CONTEXT = 512
PERPLEXITY_CHUNKS = 4
# Characters of a text handed to llama-perplexity: enough for the chunks at ~4 characters per token, with margin.
_TEXT_CHARS = 2 * 8 * PERPLEXITY_CONTEXT * PERPLEXITY_CHUNKS
EVAL_FILE = "transact_eval.json"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class LlamaCpp:
    """The cached llama.cpp build of ``benchmarks/llama_cpp_build.sh``."""

    root: Path

    @property
    def converter(self) -> Path:
        return self.root / "src" / "convert_hf_to_gguf.py"

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def quantize(self) -> Path:
        return self.root / "build" / "bin" / "llama-quantize"

    @property
    def perplexity(self) -> Path:
        return self.root / "build" / "bin" / "llama-perplexity"

    @property
    def logits(self) -> Path:
        return self.root / "bin" / "transact-llama-logits"

    def missing(self) -> list[str]:
        """The parts the GGUF export needs that are not there."""
        needed = (self.converter, self.python, self.quantize, self.perplexity)
        return [str(path.relative_to(self.root)) for path in needed if not path.exists()]


def find_llama_cpp() -> LlamaCpp:
    """The build at ``$TRANSACT_LLAMA_CPP`` or ``<cache>/clients/llama.cpp`` (it may be incomplete: see ``missing``)."""
    override = os.environ.get("TRANSACT_LLAMA_CPP")
    return LlamaCpp(Path(override).expanduser() if override else cache_dir() / "clients" / "llama.cpp")


def gguf_problem(gguf_type: str | None, option: str = "--export.gguf") -> str | None:
    """Why ``--export.gguf`` cannot run (unknown type, llama.cpp not built), in one line; None when it can."""
    if gguf_type is None:
        return None
    if gguf_type not in GGUF_TYPES:
        return f"`{option}={gguf_type}` is not a GGUF type this export writes; choose one of {', '.join(GGUF_TYPES)}"
    tools = find_llama_cpp()
    missing = tools.missing()
    if missing:
        return (f"`{option}={gguf_type}` needs llama.cpp's converter and tools, not found in {tools.root} "
                f"(missing {', '.join(missing)}): build them once with `make llama-cpp` (~30 min on 2 cores) "
                "or point $TRANSACT_LLAMA_CPP at a build")
    return None


def _run(command: Sequence[str | Path], what: str) -> str:
    """Run a llama.cpp tool; its output (stdout and stderr), or a RuntimeError quoting its last line."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        last = (output.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"llama.cpp {what} failed: {last}")
    return output


def convert(tools: LlamaCpp, hf_dir: Path, out_file: Path, outtype: str = "f32", model_name: str | None = None) -> None:
    """llama.cpp's converter, in its own virtualenv, from a Hugging Face directory to a GGUF file; ``model_name``
    (default: the directory's name) becomes the GGUF's ``general.name``."""
    _run([tools.python, tools.converter, hf_dir, "--outtype", outtype, "--outfile", out_file,
          "--model-name", model_name or hf_dir.name], "convert_hf_to_gguf.py")


def quantize(tools: LlamaCpp, source: Path, target: Path, gguf_type: str) -> int:
    """``llama-quantize`` ``source`` to ``gguf_type``; returns how many tensors needed a fallback type (rows not a
    multiple of the type's block, e.g. 576 for 256-blocks of k-quants)."""
    output = _run([tools.quantize, source, target, gguf_type.upper()], "llama-quantize")
    fallback = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", output)
    return int(fallback.group(1)) if fallback else 0


def perplexity(tools: LlamaCpp, gguf_file: Path, text_file: Path) -> float:
    """``llama-perplexity``'s final estimate on ``text_file`` (see the module docstring for the protocol)."""
    output = _run([tools.perplexity, "-m", gguf_file, "-f", text_file, "-c", PERPLEXITY_CONTEXT, "-b",
                   PERPLEXITY_CONTEXT, "--chunks", PERPLEXITY_CHUNKS], "llama-perplexity")
    estimate = re.search(r"Final estimate: PPL = ([0-9.]+|nan|inf)", output)
    if estimate is None:
        raise RuntimeError("llama.cpp llama-perplexity printed no final estimate")
    return float(estimate.group(1))


def text_head(documents: Sequence[str]) -> str:
    """The first documents of a text, joined by blank lines, up to what the perplexity chunks need."""
    head, size = [], 0
    for document in documents:
        head.append(document)
        size += len(document)
        if size >= _TEXT_CHARS:
            break
    return "\n\n".join(head)


def gguf_protocol() -> str:
    """How :func:`perplexity` measures, in words for the model card and the eval file."""
    return (f"llama-perplexity on the first {PERPLEXITY_CHUNKS} chunks of {PERPLEXITY_CONTEXT} tokens of each text "
            "(its first documents, joined by blank lines), each chunk on its own with the second half of it scored, "
            "BOS only where the GGUF asks for one, f16 KV cache: llama.cpp's protocol, not the one of the evaluation "
            "above, so compare a quantized GGUF with the f32 GGUF")


def measure(tools: LlamaCpp, gguf_file: Path, text_files: Mapping[str, Path]) -> dict[str, float | str]:
    """Perplexity per text; a text llama-perplexity cannot score (e.g. shorter than two chunks) gets the reason."""
    results: dict[str, float | str] = {}
    for name, text_file in text_files.items():
        try:
            results[name] = perplexity(tools, gguf_file, text_file)
        except RuntimeError as error:
            results[name] = str(error)
    return results


class GGUFExport:
    """The ``--export.gguf`` step, called with the finished export directory (see the module docstring).

    Args:
        gguf_type: one of :data:`GGUF_TYPES`.
        texts: held-out texts to measure perplexity on, name -> documents (may be empty: nothing measured).
        model_name: the GGUF's ``general.name`` (None: the name of the directory it is called with, which for an
            export being written is a temporary one).
    """

    def __init__(self, gguf_type: str, texts: Mapping[str, Sequence[str]], model_name: str | None = None) -> None:
        problem = gguf_problem(gguf_type)
        if problem:
            raise ConfigError(problem)
        self.gguf_type = gguf_type
        self.texts = dict(texts)
        self.model_name = model_name
        self.tools = find_llama_cpp()

    def __call__(self, export_dir: Path) -> dict:
        """Write ``model-<type>.gguf`` into ``export_dir``, add the record to its card and eval file; return it."""
        target = export_dir / f"model-{self.gguf_type}.gguf"
        record = make_gguf(self.tools, export_dir, self.gguf_type, target, self.texts, self.model_name)
        add_to_card(export_dir / CARD_FILE, record)
        add_to_eval(export_dir / EVAL_FILE, record)
        return record


def make_gguf(tools: LlamaCpp, hf_dir: Path, gguf_type: str, target: Path, texts: Mapping[str, Sequence[str]],
              model_name: str | None = None) -> dict:
    """Convert ``hf_dir`` to ``target`` (a ``gguf_type`` GGUF) and measure it and the f32 GGUF on ``texts``.

    Returns ``{"file", "type", "bytes", "fallback_tensors", "protocol", "perplexity": {"f32": {text: ppl},
    gguf_type: {text: ppl}}}``; a text llama-perplexity could not score has the reason instead of a number.
    """
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
        full = target if gguf_type == "f32" else Path(scratch) / "model-f32.gguf"
        convert(tools, hf_dir, full, model_name=model_name)
        fallback = 0 if gguf_type == "f32" else quantize(tools, full, target, gguf_type)
        text_files = {}
        for name, documents in texts.items():
            text_files[name] = Path(scratch) / f"{len(text_files)}.txt"
            text_files[name].write_text(text_head(documents), encoding="utf-8")
        return {"file": target.name, "type": gguf_type, "bytes": target.stat().st_size, "fallback_tensors": fallback,
                "protocol": gguf_protocol(), "perplexity": {"f32": measure(tools, full, text_files),
                                                            gguf_type: measure(tools, target, text_files)}}


def add_to_eval(eval_file: Path, record: dict) -> None:
    """Store ``record`` under ``gguf`` in an existing ``transact_eval.json`` (an export without one gets none)."""
    if eval_file.is_file():
        data = json.loads(eval_file.read_text())
        eval_file.write_text(json.dumps({**data, "gguf": record}, indent=1))


def _cell(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "not measured"


def card_section(record: dict) -> list[str]:
    """The model card's "GGUF (llama.cpp)" lines: file, size, how to run it, and the perplexity table."""
    gguf_type, ppl = record["type"], record["perplexity"]
    lines = ["", "## GGUF (llama.cpp)", "",
             f"`{record['file']}` ({record['bytes'] / 1e6:.1f} MB, {gguf_type}) was made from this directory by "
             "llama.cpp's own `convert_hf_to_gguf.py` (f32) and `llama-quantize`; run it with "
             f"`llama-cli -m {record['file']}`."]
    if record["fallback_tensors"]:
        lines[-1] += (f" {record['fallback_tensors']} tensors have rows that are not a multiple of {gguf_type}'s "
                      "block and use llama.cpp's fallback type.")
    names = list(ppl["f32"])
    if not names:
        return lines + ["", "Perplexity not measured: no held-out texts were named (`--report.extra_eval` in a run, "
                        "`--gguf-texts` with export_checkpoint)."]
    columns = ["f32"] if gguf_type == "f32" else ["f32", gguf_type]
    lines += ["", f"Perplexity: {record['protocol']}.", "",
              "| text | " + " | ".join(f"{column} GGUF ppl" for column in columns) + " |",
              "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([name] + [_cell(ppl[column][name]) for column in columns]) + " |" for name in names]
    return lines


def add_to_card(card_file: Path, record: dict) -> None:
    """Append the GGUF section to the export's model card."""
    with card_file.open("a", encoding="utf-8") as card:
        card.write("\n".join(card_section(record)) + "\n")
