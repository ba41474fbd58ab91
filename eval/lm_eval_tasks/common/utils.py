"""Python pieces of the transact_* common tasks: HellaSwag's text clean-up, WinoGrande's partial scoring and the
few-shot sampler of the reference setting. Each follows lm-eval 0.4.13's own task for the data set; the sampler
draws what transact_pl.infra.common_tasks draws, so `make eval` and the in-process scorer see identical prompts."""

from __future__ import annotations

from lm_eval.api.samplers import ContextSampler

from transact_pl.infra.common_tasks import clean_hellaswag, fewshot_rows


def hellaswag_docs(dataset):
    """Adds the query (activity label, then the context with ctx_b capitalized), the cleaned endings and the gold index."""

    def add_prompt(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": clean_hellaswag(doc["activity_label"] + ": " + context),
                "choices": [clean_hellaswag(ending) for ending in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(add_prompt)


def winogrande_gold(doc: dict) -> int:
    """Partial scoring: doc_to_text returns the gold option's index; each option fills the blank in its own context."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_rest(doc: dict) -> str:
    """The sentence after the blank: the continuation scored under every filled-in context."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_filled(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


class LeaveOneOutSampler(ContextSampler):
    """Shots for a scored row drawn from the same split without that row, seeded by (fewshot seed, row), so a row's
    prompt does not depend on which other rows are scored (lm-eval's default sampler shares one generator)."""

    seed: int | None = None

    def set_rnd(self, rnd: int | None):
        self.seed = rnd
        return super().set_rnd(rnd)

    def sample(self, n: int, eval_doc: dict | None = None, df=None, **kwargs) -> list[dict]:
        if eval_doc is None:
            raise ValueError("LeaveOneOutSampler needs the scored row: set fewshot_split equal to test_split")
        pool = self.fewshot_docs()
        return [pool[row] for row in fewshot_rows(len(pool), eval_doc["doc_index"], n, self.seed)]
