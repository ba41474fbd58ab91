"""Metrics of the transact_* lm-eval tasks: rolling log-likelihood of a whole document per record.

Same aggregation as lm-eval's ``wikitext`` task: word and byte perplexity count the words and UTF-8
bytes of the document text that was scored.
"""

import re


def process_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    num_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
