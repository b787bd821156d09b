"""Structured pruning of a student: whole transformer blocks, and FFN hidden units.

- Layer importance on calibration queries, mean over real tokens; the K most important blocks are
  kept, in their order. `block_influence` (default): 1 - cos(block input, block output), how much a
  block turns the hidden state (ShortGPT). `norm_ratio`: ||block output|| / ||block input||, the
  criterion in the HARNESS-LM summaries; on the real collections in benchmarks/ it dropped the last
  block of all-MiniLM-L6-v2 (whose output norm is smallest) and lost badly to an evenly spaced cut.
  `first_last`: the first and the last block always, the others by block influence (the last block
  writes the output space the student must match; the first reads the token embeddings).
- FFN importance: mean |activation| per hidden unit at the input of the down projection
  (act(gate(x)) * up(x) for gated MLPs such as Qwen3/LLaMA, act(W1 x) for BERT); the same number of
  units is kept in every layer (the config holds one intermediate_size), with the matching rows of
  the up/gate projections and columns of the down projection.
HARNESS-LM re-aligns the student to the teacher after every pruning step (see distill_student.py).
"""

import contextlib

import torch
from torch import nn

from common.errors import UserError
from common.surgery import find_layers, keep_layers


def _ffn_parts(layer):
    """(input projections whose output rows are units, down projection whose input columns are units)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "down_proj"):
        return [p for p in (getattr(mlp, "gate_proj", None), mlp.up_proj) if p is not None], mlp.down_proj
    if hasattr(layer, "intermediate") and hasattr(layer, "output"):  # BERT family
        return [layer.intermediate.dense], layer.output.dense
    raise UserError(f"FFN pruning does not know the MLP of {type(layer).__name__}; use --ffn_keep_ratio 1.")


def _hidden(value):
    return value[0] if isinstance(value, tuple) else value


LAYER_CRITERIA = ("block_influence", "norm_ratio", "first_last")


@torch.inference_mode()
def importance(encoder, texts, batch_size=32, criterion="block_influence"):
    """Per-layer importance (list of floats) and per-layer FFN unit importance (list of 1-d tensors)."""
    if criterion not in LAYER_CRITERIA:
        raise UserError(f"Unknown layer importance '{criterion}'; use one of {', '.join(LAYER_CRITERIA)}.")
    layers, _, _ = find_layers(encoder.backbone)
    layer_scores = torch.zeros(len(layers), dtype=torch.float64)
    unit_scores = [None] * len(layers)
    state = {"mask": None, "tokens": 0}
    hooks = []

    def block_hook(index):
        def hook(module, args, kwargs, output):
            inputs = kwargs.get("hidden_states", args[0] if args else None).float()
            outputs = _hidden(output).float()
            if criterion == "norm_ratio":  # block_influence otherwise (also for first_last's other blocks)
                score = outputs.norm(dim=-1) / inputs.norm(dim=-1).clamp(min=1e-6)
            else:
                score = 1 - torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1)
            layer_scores[index] += (score * state["mask"]).sum().double().cpu()

        return hook

    def unit_hook(index):
        def hook(module, args):
            activation = args[0].float().abs() * state["mask"].unsqueeze(-1)
            total = activation.sum(dim=(0, 1)).double().cpu()
            unit_scores[index] = total if unit_scores[index] is None else unit_scores[index] + total

        return hook

    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(index), with_kwargs=True))
        with contextlib.suppress(UserError):  # layer ranking still works; FFN pruning will say it cannot
            hooks.append(_ffn_parts(layer)[1].register_forward_pre_hook(unit_hook(index)))
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    try:
        for start in range(0, len(texts), batch_size):
            batch = encoder.tokenize(texts[start : start + batch_size], "query").to(device)
            state["mask"] = batch["attention_mask"].float()
            state["tokens"] += int(batch["attention_mask"].sum())
            encoder(**batch)
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(was_training)
    tokens = max(state["tokens"], 1)
    layer_scores = (layer_scores / tokens).tolist()
    if criterion == "first_last":  # kept before any other block
        layer_scores[0] = layer_scores[-1] = float("inf")
    return layer_scores, [None if s is None else s / tokens for s in unit_scores]


def prune_layers(encoder, layer_scores, keep):
    """Keep the `keep` most important blocks (in their original order); returns the kept indices."""
    if keep >= len(layer_scores):
        return list(range(len(layer_scores)))
    kept = sorted(sorted(range(len(layer_scores)), key=lambda i: -layer_scores[i])[:keep])
    keep_layers(encoder, kept)
    return kept


def prune_ffn(encoder, unit_scores, keep_units):
    """Keep the `keep_units` most important FFN units in every layer."""
    layers, _, _ = find_layers(encoder.backbone)
    for layer, scores in zip(layers, unit_scores):
        if scores is None:
            raise UserError(f"No FFN activations were recorded for {type(layer).__name__}; use --ffn_keep_ratio 1.")
        kept = torch.sort(torch.topk(scores, keep_units).indices).values
        ups, down = _ffn_parts(layer)
        for projection in ups:
            _replace_linear(projection, rows=kept)
        _replace_linear(down, columns=kept)
    encoder.backbone.config.intermediate_size = keep_units


def _replace_linear(linear, rows=None, columns=None):
    """Slice a Linear in place (rows: output units, columns: input units)."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows.to(weight.device)].clone())
        linear.out_features = len(rows)
    if columns is not None:
        weight = weight[:, columns.to(weight.device)]
        linear.in_features = len(columns)
    linear.weight = nn.Parameter(weight.clone())
