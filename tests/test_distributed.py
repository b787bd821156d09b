"""Multi-process runs as users launch them: 2 gloo processes (DDP) and DeepSpeed ZeRO-3 on CPU.

Both train the same tiny teacher from the same seed; ZeRO-3 shards parameters, gradients and optimiser
state across the two ranks and consolidates them at save time, so its saved model must give the same
vectors as the DDP run, and reload identically through sentence-transformers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from common.encoder import Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale"]


def launch(launch_args, script_args, tmp_path, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *script_args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, tiny_bert):
    tmp_path = tmp_path_factory.mktemp("distributed")
    script = [
        "train_teacher.py",
        "--model_name_or_path",
        tiny_bert,
        "--train_file",
        small_data["train"],
        "--per_device_train_batch_size",
        "8",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--weight_decay",
        "0",
        "--num_hard_negatives",
        "1",
        "--num_warmup_steps",
        "1",
        "--logging_steps",
        "1",
    ]
    ddp, zero3 = str(tmp_path / "ddp"), str(tmp_path / "zero3")
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        launch(["--multi_gpu", "--num_processes", "2"], [*script, "--output_dir", ddp], tmp_path, "ddp")
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    launch(
        ["--config_file", "accelerate_configs/deepspeed_zero3_cpu.yaml"],
        [*script, "--output_dir", zero3],
        tmp_path,
        "zero3",
    )
    return {"ddp": ddp, "zero3": zero3, "initial": tiny_bert, "logs": tmp_path}


def test_two_gloo_processes_train(runs):
    log = (runs["logs"] / "ddp.log").read_text()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in log  # 2 ranks x 8
    trained = Encoder.from_pretrained(runs["ddp"]).encode(QUERIES, "query")
    initial = Encoder.from_pretrained(runs["initial"]).encode(QUERIES, "query")
    assert np.isfinite(trained).all() and not np.allclose(trained, initial, atol=1e-4)


def test_deepspeed_zero3_saves_the_same_model_as_ddp(runs):
    zero3 = Encoder.from_pretrained(runs["zero3"])
    vectors = zero3.encode(QUERIES, "query")
    np.testing.assert_allclose(vectors, Encoder.from_pretrained(runs["ddp"]).encode(QUERIES, "query"), atol=1e-5)
    st = SentenceTransformer(runs["zero3"], device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), vectors, atol=1e-5)


def test_learning_rate_schedule_is_the_one_asked_for_under_ddp_and_zero3(runs):
    """accelerate steps the prepared scheduler once per process, under DeepSpeed too (our scheduler is not one
    of DeepSpeed's own): both runs must still warm up over 1 step and decay to 0 at step 3."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=3)
    expected = []
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr()[0])
    for run in ("ddp", "zero3"):
        with open(os.path.join(runs[run], "trainer_state.json")) as handle:
            rates = [entry["lr"] for entry in json.load(handle)["log_history"]]
        np.testing.assert_allclose(rates, expected, rtol=1e-9, atol=1e-12)


def test_two_processes_write_one_sharded_store(tmp_path, small_data, tiny_bert):
    from common.data import read_texts
    from common.store import EmbeddingStore

    store = str(tmp_path / "ads-store")
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        launch(
            ["--multi_gpu", "--num_processes", "2"],
            [
                "encode.py",
                "--model_name_or_path",
                tiny_bert,
                "--input_file",
                small_data["ads"],
                "--output_dir",
                store,
                "--encode_batch_size",
                "16",
                "--chunk_rows",
                "16",
            ],
            tmp_path,
            "encode",
        )
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    opened = EmbeddingStore.open(store)
    # Chunks of 16 rows, chunk c written by process c % 2, each with its model's fingerprint.
    chunks = opened.metadata["chunks"]
    assert len(chunks) > 2 and all(chunk["rows"] == 16 for chunk in chunks[:-1])
    ids, texts = read_texts(small_data["ads"], "id", "text")
    assert opened.ids == ids
    expected = Encoder.from_pretrained(tiny_bert).encode(texts, "ad")
    np.testing.assert_allclose(opened.read(range(len(ids))), expected, atol=1e-5)
    assert not [name for name in os.listdir(store) if name.endswith(".partial")]


def test_encode_script_reuses_a_current_store_and_refuses_a_stale_one(tmp_path, small_data, tiny_bert, tiny_qwen):
    import encode
    from common.errors import UserError
    from common.store import EmbeddingStore

    store = str(tmp_path / "store")
    ads = ["--input_file", small_data["ads"], "--output_dir", store]
    encode.main(["--model_name_or_path", tiny_bert, *ads, "--dtype", "float16"])
    modified = os.path.getmtime(os.path.join(store, "metadata.json"))
    encode.main(["--teacher_model", tiny_bert, *ads])  # current: kept
    assert os.path.getmtime(os.path.join(store, "metadata.json")) == modified
    with pytest.raises(UserError, match="another model"):
        encode.main(["--model_name_or_path", tiny_qwen, *ads])
    encode.main(["--model_name_or_path", tiny_qwen, *ads, "--overwrite_output_dir"])  # rebuilt on request
    assert EmbeddingStore.open(store).metadata["model_fingerprint"] == Encoder.from_pretrained(tiny_qwen).fingerprint


@pytest.mark.slow
def test_gradient_caching_gives_the_plain_batchs_weights_under_ddp_and_zero3(tmp_path, small_data):
    """--grad_cache_chunk_size: the batch's 2 x 8 x (1 + 1 + 1) rows embedded 5 at a time on each of 2 processes,
    the loss on the cached vectors (gathered across processes), then each chunk back-propagated: the weights of
    the plain batch of 16 on one process (which 2 processes of 8 give, tests/test_multiprocess.py), under DDP and
    under DeepSpeed ZeRO-3 (dropout off: the plain pass draws its masks for the whole batch at once, the cached
    one per chunk)."""
    from conftest import make_tiny_bert
    from safetensors.torch import load_file

    import train_teacher

    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    flags = ["--model_name_or_path", model, "--train_file", small_data["train"], "--max_train_steps", "3",
             "--learning_rate", "1e-3", "--weight_decay", "0", "--num_hard_negatives", "1",
             "--num_warmup_steps", "1"]  # fmt: skip
    script = ["train_teacher.py", *flags, "--per_device_train_batch_size", "8"]
    cached = ["--grad_cache_chunk_size", "5"]
    train_teacher.main([*flags, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "plain")])
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        ddp = ["--multi_gpu", "--num_processes", "2"]
        launch(ddp, [*script, *cached, "--output_dir", str(tmp_path / "ddp")], tmp_path, "ddp")
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    launch(["--config_file", "accelerate_configs/deepspeed_zero3_cpu.yaml"],
           [*script, *cached, "--output_dir", str(tmp_path / "zero3")], tmp_path, "zero3")  # fmt: skip
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for run in ("ddp", "zero3"):
        weights = load_file(str(tmp_path / run / "model.safetensors"))
        # DeepSpeed's consolidated BERT save names LayerNorm parameters gamma/beta (from_pretrained maps them back)
        weights = {key.replace(".gamma", ".weight").replace(".beta", ".bias"): value for key, value in weights.items()}
        worst = max(float((weights[key].float() - plain[key].float()).abs().max()) for key in plain)
        assert worst < 2e-5, (run, worst)
    vectors = Encoder.from_pretrained(str(tmp_path / "zero3")).encode(QUERIES, "query")
    np.testing.assert_allclose(vectors, Encoder.from_pretrained(str(tmp_path / "plain")).encode(QUERIES, "query"),
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_our_schedules_give_transformers_learning_rate_at_every_step(name):
    """common.loop.get_scheduler stands in for transformers.get_scheduler (whose import costs every process
    2.5 s): the same learning rate at every step, and a state dict either one loads."""
    import torch
    import transformers

    from common.loop import get_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = make(name, optimizer, num_warmup_steps=3, num_training_steps=11)
        values = []
        for _ in range(14):  # past the end: the linear schedule stays at 0
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values, scheduler.state_dict()

    ours, our_state = rates(get_scheduler)
    theirs, their_state = rates(transformers.get_scheduler)
    assert ours == theirs
    assert our_state.keys() == their_state.keys() and our_state["last_epoch"] == their_state["last_epoch"]
