"""Next-token logits of an exported model in whatever transformers this interpreter has (no project imports).

    python benchmarks/client_logits.py <export dir> <text file> <out.pt>

Run by ``benchmarks/check_clients.py`` in a separate virtualenv (e.g. transformers 4.57) to compare a client
with the transformers the project itself uses. Writes {"transformers": version, "input_ids": (T,), "logits": (T, V)}.
"""

import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(export: str, text_file: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    text = open(text_file, encoding="utf-8").read()
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0].float()
    torch.save({"transformers": transformers.__version__, "input_ids": input_ids[0], "logits": logits}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
