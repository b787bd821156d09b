"""benchmarks/zero3_memory.py: the parameter count from a config equals the model's, the presets give the
published Qwen3-Embedding sizes, and the model states per GPU are DeepSpeed's own estimate."""

import os
import sys

import pytest
from transformers import AutoModel, BertConfig, Qwen3Config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import zero3_memory


@pytest.mark.parametrize("kind", ["qwen3", "bert"])
def test_parameters_from_the_config_equal_the_models(kind):
    if kind == "qwen3":
        config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip
        model = AutoModel.from_config(config)
    else:
        config = BertConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
        model = AutoModel.from_config(config, add_pooling_layer=False)
    assert zero3_memory.Shape.from_config(config).parameters() == sum(p.numel() for p in model.parameters())


def test_presets_give_the_published_sizes_and_deepspeeds_model_states():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    assert zero3_memory.PRESETS["Qwen/Qwen3-Embedding-0.6B"].parameters() == 595_776_512
    assert zero3_memory.PRESETS["Qwen/Qwen3-Embedding-4B"].parameters() == 4_021_774_336
    shape = zero3_memory.PRESETS["Qwen/Qwen3-Embedding-8B"]
    parts = zero3_memory.memory_per_gpu(shape, 8, 16, 32, 128, 1)
    model_states = parts["total"] - parts["activations"]
    largest = max(shape.layer_parameters(), shape.vocab * shape.hidden)
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(shape.parameters(), largest, 8, 1, cpu_offload=False)
    assert abs(model_states - gpu_bytes) <= 1
    doubled = zero3_memory.memory_per_gpu(shape, 8, 32, 32, 128, 1)
    assert doubled["activations"] == 2 * parts["activations"] and doubled["optimizer"] == parts["optimizer"]
    no_checkpointing = zero3_memory.memory_per_gpu(shape, 8, 16, 32, 128, 1, checkpointing=False)
    assert no_checkpointing["activations"] > 10 * parts["activations"]
    rows = zero3_memory.main(["--gpus", "8", "16"])
    assert len(rows) == 6 and rows[0][2]["total"] > rows[1][2]["total"]
