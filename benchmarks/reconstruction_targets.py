"""What the sequential refit should reproduce: two targets tried at the reconstruction target point (6 of 9 heads,
MLP 768, one shot, no recovery), beside plain `acts` and the dense-input refit the pipeline ships.

Both run the calibration tokens layer by layer through two streams, the unpruned model's and the pruned model's
(pruned, refitted earlier layers); layer i's o_proj, then down_proj, is refitted by least squares on the pruned
stream's kept input channels x_K, against

- ``dense-output``: the unpruned layer's output on the unpruned stream, W · x_dense (the refit also undoes the
  drift that earlier layers left in its inputs);
- ``residual``: that, plus the residual stream's drift (unpruned minus pruned residual entering the sublayer), so
  that the sublayer's output puts the residual stream back where the unpruned model has it.

W' = T X_Kᵀ (X_K X_Kᵀ + λ I)⁻¹ with T the target, λ = damping · mean diag, fp64 sums. Calibration, damping and
held-out blocks are those of ``benchmarks.reconstruction`` (128 random blocks of 256 Wikipedia-train tokens, seed 0;
8 blocks of 256 tokens evenly spaced over the Wikipedia test split, news, Shakespeare).

    OMP_NUM_THREADS=2 python -m benchmarks.reconstruction_targets    # 40 min on 2 cores shared with another job
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from benchmarks.common import batches, console, load_dense, markdown_table, print_table, widths_for, write_results
from benchmarks.reconstruction import TARGET_POINT, TEXTS, calibration_sample, evaluate, heldout, pruned_model
from transact_pl.arch import all_layer_parts, decoder_layers, eval_mode, model_widths
from transact_pl.pruning import plan_shot
from transact_pl.reconstruction import DEFAULT_DAMPING, collect_second_moments, kept_input_channels, parameter_names
from transact_pl.reconstruction import refit_weights
from transact_pl.scoring import acts_scores
from transact_pl.sequential_reconstruction import LayerInputs, _call_layer, _expanded, _temporarily, capture_layer_inputs

CALIBRATION_BLOCKS, BLOCK_SIZE, EVAL_BLOCKS, BATCH_SIZE, SEED = 128, 256, 8, 4, 0


class Taps:
    """The inputs of o_proj, down_proj and post_attention_layernorm (the residual after attention) at the last call."""

    def __init__(self, layer: nn.Module, o_proj: nn.Linear, down_proj: nn.Linear) -> None:
        self.seen: dict[str, Tensor] = {}
        modules = {"o_proj": o_proj, "down_proj": down_proj, "residual": layer.post_attention_layernorm}
        self.handles = [module.register_forward_pre_hook(self.recorder(name)) for name, module in modules.items()]

    def recorder(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self.seen[name] = args[0].detach().flatten(0, 1).double()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def solve(cross: Tensor, gram: Tensor, damping: float) -> Tensor:
    """cross (out, k) · (gram + λ I)⁻¹ by Cholesky."""
    system = gram.clone()
    system.diagonal().add_(damping * system.diagonal().mean())
    return torch.cholesky_solve(cross.T, torch.linalg.cholesky(system)).T


def fit_linear(layer: nn.Module, taps: Taps, name: str, weight: Tensor, kept: Tensor, pruned: LayerInputs,
               index: int, unpruned: list[dict[str, Tensor]], drift: list[Tensor] | None, damping: float) -> Tensor:
    """Refit ``name`` (o_proj or down_proj) on the pruned stream's kept inputs against the chosen target."""
    gram = torch.zeros(len(kept), len(kept), dtype=torch.float64)
    cross = torch.zeros(weight.shape[0], len(kept), dtype=torch.float64)
    for batch, (hidden, arguments) in enumerate(zip(pruned.hidden, pruned.arguments)):
        _call_layer(layer, hidden, arguments[index])
        inputs = taps.seen[name][:, kept]
        target = unpruned[batch][name] @ weight.T
        if drift is not None:
            target += drift[batch] - (taps.seen["residual"] if name == "down_proj" else hidden.flatten(0, 1).double())
        gram += inputs.T @ inputs
        cross += target.T @ inputs
    return solve(cross, gram, damping).float()


@torch.no_grad()
def two_stream_refit(model: nn.Module, plan, calibration: list, damping: float, residual: bool) -> dict[str, Tensor]:
    """{o_proj / down_proj weight name: refit} of every layer, fitted layer by layer as the module docstring says."""
    names, refits = parameter_names(model), {}
    with eval_mode(model):
        pruned = capture_layer_inputs(model, calibration, torch.device("cpu"))
        unpruned_hidden = [hidden.clone() for hidden in pruned.hidden]
        for index, (layer, parts) in enumerate(zip(decoder_layers(model), all_layer_parts(model))):
            kept_attention, kept_mlp = kept_input_channels(plan, index)
            taps = Taps(layer, parts.o_proj, parts.down_proj)
            unpruned, next_hidden = [], []
            for hidden, arguments in zip(unpruned_hidden, pruned.arguments):
                next_hidden.append(_call_layer(layer, hidden, arguments[index]))
                unpruned.append(dict(taps.seen))
            # the residual drift entering attention (o_proj's target) and the MLP (down_proj's)
            drift_attention = [hidden.flatten(0, 1).double() for hidden in unpruned_hidden] if residual else None
            drift_mlp = [seen["residual"] for seen in unpruned] if residual else None
            o_weight, down_weight = parts.o_proj.weight.detach().double(), parts.down_proj.weight.detach().double()
            o_refit = fit_linear(layer, taps, "o_proj", o_weight, kept_attention, pruned, index, unpruned, drift_attention, damping)
            with _temporarily({parts.o_proj.weight: _expanded(o_refit, kept_attention, parts.o_proj.in_features)}):
                down_refit = fit_linear(layer, taps, "down_proj", down_weight, kept_mlp, pruned, index, unpruned, drift_mlp, damping)
                with _temporarily({parts.down_proj.weight: _expanded(down_refit, kept_mlp, parts.down_proj.in_features)}):
                    pruned.hidden = [_call_layer(layer, hidden, arguments[index])
                                     for hidden, arguments in zip(pruned.hidden, pruned.arguments)]
            taps.remove()
            unpruned_hidden = next_hidden
            refits[names[id(parts.o_proj.weight)]], refits[names[id(parts.down_proj.weight)]] = o_refit, down_refit
            console.print(f"layer {index} refitted", end="  ")
    console.print()
    return refits


def main() -> None:
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    calibration = batches(calibration_sample(tokenizer, BLOCK_SIZE, CALIBRATION_BLOCKS, SEED), BATCH_SIZE)
    evaluation = heldout(tokenizer, BLOCK_SIZE, EVAL_BLOCKS)
    moments = collect_second_moments(dense, calibration)
    plan = plan_shot(dense, acts_scores(moments.activation_stats()), widths_for(model_widths(dense), *TARGET_POINT), 1, "acts")
    methods = {"acts": lambda: None,
               "acts+LS dense (shipped)": lambda: refit_weights(dense, plan, moments, DEFAULT_DAMPING),
               "acts+LS dense-output target": lambda: two_stream_refit(dense, plan, calibration, DEFAULT_DAMPING, False),
               "acts+LS residual target": lambda: two_stream_refit(dense, plan, calibration, DEFAULT_DAMPING, True)}
    rows = []
    for method, refit in methods.items():
        clock = time.perf_counter()
        rows.append({"method": method, **evaluate(pruned_model(dense, plan, refit()), evaluation, BATCH_SIZE),
                     "seconds": round(time.perf_counter() - clock, 1)})
        console.print(f"{method}: " + ", ".join(f"{text} {rows[-1][text]:.1f}" for text in TEXTS))
    headers = ["method", *TEXTS, *(f"{text} ÷ acts" for text in TEXTS)]
    table = [[row["method"], *(row[text] for text in TEXTS), *(round(row[text] / rows[0][text], 3) for text in TEXTS)]
             for row in rows]
    settings = (f"SmolLM2-135M-Instruct, one shot at {TARGET_POINT} (KV groups, MLP), no recovery; calibration "
                f"{CALIBRATION_BLOCKS}×{BLOCK_SIZE} random Wikipedia-train tokens (seed {SEED}); damping {DEFAULT_DAMPING:g}; "
                f"{EVAL_BLOCKS}×{BLOCK_SIZE} held-out tokens per text, evenly spaced")
    print_table(f"Refit targets — {settings}", headers, table)
    write_results("reconstruction_targets", {"settings": settings, "rows": rows, "markdown": markdown_table(headers, table)},
                  started)


if __name__ == "__main__":
    main()
