"""LoRA for the teacher: adapters injected in place, only they train, and the save merges them into a plain
model (2 processes, ZeRO-3 and resume: tests/test_multiprocess.py)."""

import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert, make_tiny_qwen
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

import train_teacher
from common.encoder import Encoder
from common.errors import UserError
from common.lora import add_lora, merge_lora

QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale"]


@pytest.mark.parametrize("make", [make_tiny_bert, make_tiny_qwen])
def test_merged_save_gives_the_adapted_models_vectors(make, tmp_path):
    """Adapters with non-zero B (as after training), merged from the state dict and saved: the folder loads
    as an Encoder, with plain from_pretrained and in sentence-transformers, and gives the adapted vectors."""
    encoder = Encoder.from_pretrained(make(tmp_path / "base")).eval()
    trainable = add_lora(encoder, r=4, alpha=8.0, dropout=0.0)
    names = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert trainable == sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.2)
    adapted = encoder.encode(QUERIES, "query")
    merged = merge_lora(encoder.state_dict(), alpha=8.0, r=4)
    assert not any("lora_" in key or "base_layer" in key for key in merged)
    encoder.save_pretrained(str(tmp_path / "merged"), state_dict=merged)

    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert saved.keys() == base.keys()
    reloaded = Encoder.from_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(reloaded.encode(QUERIES, "query"), adapted, atol=1e-5)
    assert not np.allclose(Encoder.from_pretrained(str(tmp_path / "base")).encode(QUERIES, "query"), adapted, atol=1e-3)
    assert type(AutoModel.from_pretrained(str(tmp_path / "merged"))).__name__ in ("BertModel", "Qwen3Model")
    st = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), adapted, atol=1e-5)


def test_lora_teacher_trains_only_the_adapted_layers_and_saves_a_plain_model(small_data, tmp_path):
    """train_teacher.py --lora_r 4 --lora_target_modules query value: only those weights move (by the merged
    B A), embeddings, norms and the other layers stay the base model's bit for bit; the LoRA run resumes."""
    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    common = ["--model_name_or_path", model, "--train_file", small_data["train"], "--per_device_train_batch_size", "8",
              "--learning_rate", "1e-2", "--lora_r", "4", "--lora_target_modules", "query", "value",
              "--lora_dropout", "0", "--checkpointing_steps", "2", "--lr_scheduler_type", "constant_with_warmup",
              "--num_warmup_steps", "0"]  # fmt: skip
    output = tmp_path / "lora"
    results = train_teacher.main([*common, "--max_train_steps", "4", "--output_dir", str(output)])
    assert np.isfinite(results["train_loss"])
    base, trained = load_file(os.path.join(model, "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert trained.keys() == base.keys()
    moved = {key for key in base if not torch.equal(base[key], trained[key])}
    expected = {f"encoder.layer.{i}.attention.self.{name}.weight" for i in range(2) for name in ("query", "value")}
    assert moved == expected
    st = SentenceTransformer(str(output), device="cpu")
    np.testing.assert_allclose(
        st.encode(QUERIES), Encoder.from_pretrained(str(output)).encode(QUERIES, "query"), atol=1e-5
    )

    # 2 steps, then resumed to 4: the adapters and their optimiser state come back from the checkpoint.
    resumed = ["--output_dir", str(tmp_path / "resumed")]
    train_teacher.main([*common, "--max_train_steps", "2", *resumed])
    train_teacher.main([*common, "--max_train_steps", "4", *resumed, "--resume_from_checkpoint", "latest",
                        "--overwrite_output_dir"])  # fmt: skip
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert max(float((again[key] - trained[key]).abs().max()) for key in trained) < 1e-6


def test_lora_options_are_checked(small_data, tmp_path):
    model = make_tiny_bert(tmp_path / "model")
    common = ["--model_name_or_path", model, "--train_file", small_data["train"], "--max_train_steps", "1",
              "--per_device_train_batch_size", "8"]  # fmt: skip
    with pytest.raises(UserError, match=r"names no linear layer.*query"):
        train_teacher.main(
            [*common, "--lora_r", "4", "--lora_target_modules", "q_proj", "--output_dir", str(tmp_path / "a")]
        )
    with pytest.raises(UserError, match="need --lora_r"):
        train_teacher.main([*common, "--lora_alpha", "16", "--output_dir", str(tmp_path / "b")])
    assert not os.path.exists(tmp_path / "a" / "model.safetensors")
