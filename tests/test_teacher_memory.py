"""Teacher memory: no process loads a model to check a store, and a student cut from the teacher reads only the
blocks it keeps from the teacher's weight files (an 8B teacher on 8 ranks would otherwise cost ~50 GB per rank
before the first step)."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import distill_student
import refine_contrastive
from common.encoder import Encoder, EncoderSpec
from common.surgery import keep_layers

FAST = ["--per_device_train_batch_size", "8", "--max_train_steps", "2", "--logging_steps", "1"]


class WeightReads:
    """Records every whole-model load (AutoModel.from_pretrained), by folder, and every tensor the cut reads by
    name from a safetensors file."""

    def __init__(self, monkeypatch):
        import common.model_files

        self.whole, self.tensors = [], []
        real_from_pretrained = transformers.AutoModel.from_pretrained
        real_read_rows = common.model_files.SafetensorsFile.read_rows
        reads = self

        def from_pretrained(folder, *args, **kwargs):
            reads.whole.append(os.path.abspath(str(folder)))
            return real_from_pretrained(folder, *args, **kwargs)

        def read_rows(self, name, start, stop):
            reads.tensors.append(name)
            return real_read_rows(self, name, start, stop)

        monkeypatch.setattr("common.encoder.AutoModel.from_pretrained", from_pretrained)
        monkeypatch.setattr(common.model_files.SafetensorsFile, "read_rows", read_rows)

    def loaded_whole(self, folder):
        return os.path.abspath(str(folder)) in self.whole


def save_as_task_model(source, folder, dtype):
    """The encoder folder `source` with its weights renamed as a task model saves them (model.layers.0...,
    bert.encoder...), in `dtype`: how hub checkpoints such as Qwen3ForCausalLM name their tensors."""
    import shutil

    shutil.copytree(source, folder)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    prefix = "model." if any(name.startswith("layers.") for name in weights) else "bert."
    save_file(
        {prefix + name: tensor.to(dtype) for name, tensor in weights.items()},
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    return str(folder)


@pytest.mark.parametrize("model", ["bert", "qwen3"])
@pytest.mark.parametrize("layout", ["as saved", "task-model names in bf16"])
def test_a_cut_reads_only_the_kept_blocks_and_equals_the_whole_model_cut(model, layout, tmp_path, monkeypatch):
    from conftest import make_tiny_bert, make_tiny_qwen

    folder = (make_tiny_bert if model == "bert" else make_tiny_qwen)(tmp_path / "whole", layers=4)
    if layout != "as saved":
        folder = save_as_task_model(folder, tmp_path / "renamed", torch.bfloat16)
    expected = keep_layers(Encoder.from_pretrained(folder, dtype="float32"), [0, 3])
    reads = WeightReads(monkeypatch)
    cut = Encoder.from_pretrained(folder, dtype="float32", layers=[0, 3])
    assert not reads.loaded_whole(folder)
    block = "layers." if model == "qwen3" else "layer."
    touched = {name.split(block, 1)[1].split(".", 1)[0] for name in reads.tensors if block in name}
    assert touched == {"0", "3"}, f"read blocks {sorted(touched)}, kept [0, 3]"
    assert cut.backbone.config.num_hidden_layers == 2 and cut.backbone.dtype == torch.float32
    expected_state, cut_state = expected.state_dict(), cut.state_dict()
    assert expected_state.keys() == cut_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, cut_state[name]), name
    texts = ["rent a kayak", "cheap used tractor for sale near me"]
    assert torch.equal(torch.from_numpy(cut.encode(texts, "query")), torch.from_numpy(expected.encode(texts, "query")))


def test_a_checkpoint_dtype_is_kept_when_no_dtype_is_asked(tiny_qwen, tmp_path):
    folder = save_as_task_model(tiny_qwen, tmp_path / "bf16", torch.bfloat16)
    assert EncoderSpec.read(folder).load(layers=[1]).backbone.dtype == torch.bfloat16
    assert EncoderSpec.read(folder).load().backbone.dtype == torch.bfloat16


def test_spec_reads_what_a_store_check_needs_without_weights(tiny_qwen, monkeypatch):
    reads = WeightReads(monkeypatch)
    spec = EncoderSpec.read(tiny_qwen)
    encoder = Encoder.from_pretrained(tiny_qwen)
    assert (spec.fingerprint, spec.embedding_dim, spec.depth) == (encoder.fingerprint, encoder.embedding_dim, 2)
    assert spec.prompt_for("query") == encoder.prompt_for("query") and spec.config == encoder.config
    assert reads.whole == [os.path.abspath(tiny_qwen)]  # the one from_pretrained above, none for the spec


def test_distillation_and_refinement_with_current_stores_never_load_the_teacher(
    small_data, tiny_bert, tmp_path, monkeypatch
):
    stores = str(tmp_path / "stores")
    distill = ["--teacher_model", tiny_bert, "--query_file", small_data["queries"], "--corpus_file",
               small_data["ads"], "--student_num_layers", "1", "--store_dir", stores, *FAST]  # fmt: skip
    distill_student.main([*distill, "--output_dir", str(tmp_path / "first")])  # builds the stores
    reads = WeightReads(monkeypatch)
    distill_student.main([*distill, "--output_dir", str(tmp_path / "student")])
    assert not reads.loaded_whole(tiny_bert), "the teacher was loaded although its stores were current"
    reads.whole.clear()
    refine_contrastive.main(["--student_model", str(tmp_path / "student"), "--teacher_model", tiny_bert,
                             "--train_file", small_data["train"], "--corpus_file", small_data["ads"],
                             "--store_dir", stores, "--output_dir", str(tmp_path / "refined"), *FAST])  # fmt: skip
    assert not reads.loaded_whole(tiny_bert)
    assert reads.whole == [os.path.abspath(str(tmp_path / "student"))]  # the student alone, once
