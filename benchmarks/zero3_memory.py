"""Plan the teacher's memory per GPU under DeepSpeed ZeRO-3 (train_teacher.py), computed from the model's size.

Per GPU, with N GPUs in all, P parameters, bf16 mixed precision and AdamW (accelerate_configs/ds_zero3.json):
- model states, partitioned over the N GPUs (ZeRO paper; DeepSpeed's estimate_zero3_model_states_mem_needs):
  bf16 parameters 2P/N, fp32 gradients 4P/N, fp32 master weights 4P/N, Adam moments 8P/N (18 bytes per
  parameter / N), plus the largest layer gathered whole during its forward/backward (4 bytes x its parameters);
- activations of one micro-batch with gradient checkpointing (bf16): each layer's input kept, 2 x T x h x L bytes
  for T tokens per GPU, plus one layer's activations while it is recomputed: 2 x T x (8h + 2 kv + 4i) bytes
  (SDPA/flash attention: no seq^2 term). T = per-device batch x (query length + (1 + hard negatives) x ad length):
  train_teacher.py encodes queries, positives and negatives in one pass.
Activations are an estimate (allocator slack, temporary buffers and the loss's B x C logits come on top): keep
20-30% of the GPU free. Without --gradient_checkpointing the activations grow about L-fold.

    python benchmarks/zero3_memory.py                                   # Qwen3-Embedding-8B, 4B and 0.6B
    python benchmarks/zero3_memory.py --model runs/teacher --gpus 8 16 --per_device_train_batch_size 32
"""

import argparse
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1024**3


@dataclass
class Shape:
    """What the memory depends on, from a Qwen3/Llama-style (or BERT-style) config."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True  # Qwen3/Llama: gate, up and down projections; BERT: up and down (with biases)
    qk_norm: bool = True  # Qwen3's per-head RMSNorm on queries and keys
    positions: int = 0  # BERT's learned position embeddings (and token types below)
    token_types: int = 0

    @classmethod
    def from_config(cls, config):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        gated = config.model_type not in ("bert", "roberta", "xlm-roberta")
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            gated_mlp=gated,
            qk_norm=config.model_type == "qwen3",
            positions=0 if gated else config.max_position_embeddings,
            token_types=0 if gated else config.type_vocab_size,
        )

    def layer_parameters(self):
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.gated_mlp:  # no biases, RMSNorm weights only
            attention = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
            return attention + 3 * h * self.intermediate + 2 * h
        attention = (h * q + q) + 2 * (h * kv + kv) + (q * h + h)
        return attention + (h * self.intermediate + self.intermediate) + (self.intermediate * h + h) + 4 * h

    def parameters(self):
        """The encoder's parameters (no language-model head: an embedder does not have one)."""
        embeddings = self.vocab * self.hidden
        final = self.hidden if self.gated_mlp else 0  # Qwen3's final RMSNorm (BERT: see embedding norms below)
        if not self.gated_mlp:  # BERT: positions, token types, the embedding LayerNorm (no pooler: not used)
            embeddings += (self.positions + self.token_types + 2) * self.hidden
        return embeddings + self.layers * self.layer_parameters() + final


# Qwen3-Embedding configs (as published on the Hub); their parameter counts are those the model cards give.
PRESETS = {
    "Qwen/Qwen3-Embedding-8B": Shape(4096, 36, 12288, 32, 8, 128, 151665),
    "Qwen/Qwen3-Embedding-4B": Shape(2560, 36, 9728, 32, 8, 128, 151665),
    "Qwen/Qwen3-Embedding-0.6B": Shape(1024, 28, 3072, 16, 8, 128, 151669),
}


def memory_per_gpu(shape, gpus, per_device_batch, query_length, ad_length, hard_negatives, checkpointing=True):
    """Bytes per GPU: {'parameters', 'gradients', 'optimizer', 'gathered layer', 'activations', 'total'}."""
    params = shape.parameters()
    largest = max(shape.layer_parameters(), shape.vocab * shape.hidden)  # the embedding matrix is one module
    tokens = per_device_batch * (query_length + (1 + hard_negatives) * ad_length)
    h, kv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    one_layer = 2 * tokens * (8 * h + 2 * kv + 4 * i)
    activations = 2 * tokens * h * shape.layers + one_layer if checkpointing else one_layer * shape.layers
    parts = {
        "parameters": 2 * params / gpus,
        "gradients": 4 * params / gpus,
        "optimizer": 12 * params / gpus,
        "gathered layer": 4 * largest,
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    return parts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=list(PRESETS), help="Preset names, model folders or hub ids.")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32], help="GPUs in all (nodes x per node).")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--query_length", type=int, default=32, help="Tokens per query (padded).")
    parser.add_argument("--ad_length", type=int, default=128, help="Tokens per ad (padded).")
    parser.add_argument("--num_hard_negatives", type=int, default=1)
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    return parser.parse_args(argv)


def shape_of(name):
    if name in PRESETS:
        return PRESETS[name]
    from transformers import AutoConfig

    return Shape.from_config(AutoConfig.from_pretrained(name))


def main(argv=None):
    args = parse_args(argv)
    print(
        f"per-device batch {args.per_device_train_batch_size} (queries of {args.query_length} tokens, "
        f"1 + {args.num_hard_negatives} ads of {args.ad_length}), bf16 + AdamW, gradient checkpointing "
        f"{'off' if args.no_gradient_checkpointing else 'on'}; GiB per GPU\n"
    )
    print("| model | parameters | GPUs | bf16 params | fp32 grads | fp32 master + Adam | gathered layer "
          "| activations | total |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.model:
        shape = shape_of(name)
        for gpus in args.gpus:
            parts = memory_per_gpu(
                shape,
                gpus,
                args.per_device_train_batch_size,
                args.query_length,
                args.ad_length,
                args.num_hard_negatives,
                checkpointing=not args.no_gradient_checkpointing,
            )
            rows.append((name, gpus, parts))
            cells = [parts[key] / GIB for key in ("parameters", "gradients", "optimizer", "gathered layer",
                                                  "activations", "total")]  # fmt: skip
            print(
                f"| {name} | {shape.parameters() / 1e9:.2f}B | {gpus} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"
            )
    return rows


if __name__ == "__main__":
    main()
