"""Every script on one CUDA device in bf16: what no CPU test can run (skipped without a GPU; `pytest -m gpu`).

A tiny Qwen3 teacher in the Qwen3-Embedding convention (last-token pooling, left padding, instruction prompt) is
trained, then a student distilled from it (the progressive default, and streamed with the teacher in the loop),
refined, its stores encoded, evaluated and exported, each script with --mixed_precision bf16 on the GPU. Each
output must be a complete model whose vectors, reloaded on the CPU, are finite and normalised; evaluation and
the export gate must report numbers. The README's phase-1 command also runs as written, under the production
DeepSpeed ZeRO-3 config (bf16 from ds_zero3.json) on one GPU, where deepspeed is installed.
`benchmarks/gpu_check.py` runs this file with the GPU benchmarks.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import distill_student
import encode
import evaluate
import export
import refine_contrastive
import train_teacher
from common.encoder import Encoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BF16 = ["--mixed_precision", "bf16", "--logging_steps", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale"]


def check_model(folder):
    vectors = Encoder.from_pretrained(folder).encode(QUERIES, "query")
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, tiny_qwen):
    root = tmp_path_factory.mktemp("gpu")
    paths = {name: str(root / name) for name in ("teacher", "student-aligned", "student", "stores", "eval", "serving")}
    train_teacher.main(["--model_name_or_path", tiny_qwen, "--train_file", small_data["train"], "--output_dir",
                        paths["teacher"], "--max_train_steps", "4", "--per_device_train_batch_size", "16",
                        *BF16])  # fmt: skip
    return paths


def test_teacher_trains_on_the_gpu(runs):
    check_model(runs["teacher"])
    with open(os.path.join(runs["teacher"], "trainer_state.json")) as handle:
        state = json.load(handle)
    assert len(state["log_history"]) == 4 and all(np.isfinite(entry["loss"]) for entry in state["log_history"])


def test_distill_refine_encode_evaluate_export_on_the_gpu(runs, small_data, streams):
    distill_student.main(["--teacher_model", runs["teacher"], "--query_file", small_data["queries"], "--corpus_file",
                          small_data["ads"], "--student_num_layers", "1", "--store_dir", runs["stores"],
                          "--output_dir", runs["student-aligned"], "--max_train_steps", "4", *BF16])  # fmt: skip
    check_model(runs["student-aligned"])
    in_loop = runs["student-aligned"] + "-in-loop"
    distill_student.main(["--teacher_model", runs["teacher"], "--query_file", streams["queries"], "--streaming",
                          "--teacher_in_loop", "--student_num_layers", "1", "--max_train_steps", "4",
                          "--per_device_train_batch_size", "8", "--output_dir", in_loop, *BF16])  # fmt: skip
    check_model(in_loop)
    refine_contrastive.main(["--student_model", runs["student-aligned"], "--teacher_model", runs["teacher"],
                             "--train_file", small_data["train"], "--corpus_file", small_data["ads"], "--store_dir",
                             runs["stores"], "--output_dir", runs["student"], "--max_train_steps", "4",
                             *BF16])  # fmt: skip
    check_model(runs["student"])
    store = encode.main(["--model_name_or_path", runs["teacher"], "--input_file", small_data["ads"], "--model_dtype",
                         "bfloat16", "--store_dir", runs["stores"], "--output_dir",
                         os.path.join(runs["stores"], "bf16-ads")])  # fmt: skip
    assert os.path.exists(os.path.join(store, "metadata.json"))
    results = evaluate.main(["--teacher_model", runs["teacher"], "--students", f"student={runs['student']}",
                             "--corpus_file", small_data["ads"], "--queries_file", small_data["test_queries"],
                             "--qrels_file", small_data["qrels"], "--store_dir", runs["stores"], "--output_dir",
                             runs["eval"], "--latency_queries", "8", "--throughput_queries", "32"])  # fmt: skip
    assert results["device"] != "cpu" and all(
        np.isfinite(value) for key, value in results["models"]["student"].items() if key.startswith("ndcg@")
    )
    exported = export.main(["--model_name_or_path", runs["student"], "--teacher_model", runs["teacher"],
                            "--corpus_file", small_data["ads"], "--queries_file", small_data["test_queries"],
                            "--store_dir", runs["stores"], "--output_dir", runs["serving"], "--speed_queries", "16",
                            "--min_overlap", "0.9"])  # fmt: skip
    assert "onnx fp32" in exported["models"]


def test_readme_teacher_command_under_the_production_zero3_config_on_one_gpu(tmp_path, small_data, tiny_qwen):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    output = str(tmp_path / "teacher-zero3")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "1", "train_teacher.py",
               "--model_name_or_path", tiny_qwen, "--train_file", small_data["train"],
               "--query_prompt", "Instruct: Given a web search query, retrieve relevant ads\nQuery:",
               "--temperature", "0.01", "--per_device_train_batch_size", "16", "--gradient_checkpointing",
               "--checkpointing_steps", "2", "--max_train_steps", "4", "--logging_steps", "1",
               "--output_dir", output]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check_model(output)
    with open(os.path.join(output, "trainer_state.json")) as handle:
        state = json.load(handle)
    assert len(state["log_history"]) == 4 and all(np.isfinite(entry["loss"]) for entry in state["log_history"])
