"""The README's multi-GPU commands are the test: each phase's documented command, run as written on 2 CPU processes.

The commands are read from the README's "Running on your data and models" block and from docs/recipes.md's
block of variants, so the test fails when either documents a command that does not run. Only what cannot exist
here is substituted: the models (a tiny Qwen3 on the real Qwen vocabulary in place of Qwen3-Embedding-8B, read
in the Qwen3-Embedding convention with the command's instruction prompt; a narrower tiny Qwen3 in place of
Qwen3-0.6B, so the student gets a projection head), the data paths (the small built-in data), the accelerate
configs (their CPU twins: ZeRO-3 and DDP on gloo), the run length (2 optimiser steps), a Bloom filter sized for
a billion queries (sized for the data), the Hub push (no network), and the export gate's bars (a student of 2
steps on a random tiny model). Commands the tiny models cannot take (pruning 14 -> 7 -> 4 blocks) are listed and
skipped by name, so a new command is run unless it is skipped on purpose.
"""

import codecs
import json
import os
import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
SKIPPED = {"--prune_schedule 14,7,4": "the tiny student has 2 blocks"}
TRAINING = ("train_teacher.py", "distill_student.py", "refine_contrastive.py")


RECIPES_MARKER = "<!-- every command of this block is run by tests/test_readme_commands.py -->"


def bash_block_commands(path, marker):
    """The shell commands of the first bash block after `marker` in the markdown file at `path`."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index(marker) :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    commands, current = [], ""
    for line in block.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def readme_commands():
    """The README's commands ("Running on your data and models"), then those of docs/recipes.md's block that the
    README does not give (the recipes repeat the README's plain commands beside their variants)."""
    readme = bash_block_commands("README.md", "## Running on your data and models")
    recipes = bash_block_commands(os.path.join("docs", "recipes.md"), RECIPES_MARKER)
    assert set(readme) <= set(recipes), "the README's commands are also the recipes' (the same text)"
    return readme + [command for command in recipes if command not in readme]


def make_models(root):
    """A hub-style tiny Qwen3 teacher base (6 layers, width 32) and a narrower student base (2 layers, width 16),
    both on the real Qwen vocabulary with no sentence-transformers files (as Qwen/Qwen3-* look to the loader)."""
    from conftest import make_real_qwen_tokenizer
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_real_qwen_tokenizer()
    folders = {}
    for name, hidden, layers in (("teacher-base", 32, 6), ("student-base", 16, 2)):
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=2 * hidden,
                             max_position_embeddings=256)  # fmt: skip
        folders[name] = str(root / name)
        Qwen3Model(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def make_data(root, small_data, streams):
    """The README's data files from the small built-in data: parquet where the README says parquet."""
    data = {}
    for name, source in (("clicks.parquet", "train"), ("ads.parquet", "ads"), ("logged_queries.parquet", "queries")):
        data[name] = str(root / name)
        pd.read_json(small_data[source], lines=True).to_parquet(data[name])
    queries = pd.read_json(small_data["queries"], lines=True)
    os.makedirs(root / "logs")
    for shard in range(3):
        queries.iloc[shard::3].to_parquet(root / "logs" / f"queries-{shard}.parquet")
    data["'logs/queries-*.parquet'"] = shlex.quote(str(root / "logs" / "queries-*.parquet"))
    data["wiki_sentences/"] = streams["general"]
    data["test_queries.jsonl"], data["qrels.tsv"] = small_data["test_queries"], small_data["qrels"]
    return data


def localise(command, models, data, runs):
    """The command with this machine's models, data, runs folder and CPU configs, and a short run."""
    # bash's $'...' (the instruction prompt's newline) as the string bash passes
    command = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")),
                     command)  # fmt: skip
    command = command.replace("accelerate_configs/deepspeed_zero3.yaml", "accelerate_configs/deepspeed_zero3_cpu.yaml")
    command = command.replace("accelerate_configs/multi_gpu.yaml", "accelerate_configs/cpu_2proc.yaml")
    command = command.replace("Qwen/Qwen3-Embedding-8B", models["teacher-base"])
    command = command.replace("Qwen/Qwen3-0.6B", models["student-base"])
    command = re.sub(r"(?<![\w/.-])runs/", runs + "/", command)
    for name, path in sorted(data.items(), key=lambda item: -len(item[0])):
        command = re.sub(rf"(?<![\w/.-]){re.escape(name)}", path, command)
    command = command.replace("--dedupe_capacity 1000000000", "--dedupe_capacity 10000")
    command = re.sub(r" --push_to_hub --hub_model_id \S+", "", command)
    if any(f" {script} " in f" {command} " for script in TRAINING):
        command += " --max_train_steps 2 --per_device_train_batch_size 8 --num_warmup_steps 0"
    if " evaluate.py " in command:
        command += " --latency_queries 2 --throughput_queries 8"
    if " export.py " in command:
        command += " --speed_queries 8 --min_overlap 0.5 --max_recall_drop 100"
    return command


def test_the_readme_multi_gpu_commands_run_as_written(small_data, streams, tmp_path):
    commands = readme_commands()
    scripts = {word for command in commands for word in command.split() if word.endswith(".py")}
    assert {"train_teacher.py", "encode.py", "distill_student.py", "refine_contrastive.py", "evaluate.py",
            "export.py"} <= scripts, scripts  # fmt: skip
    assert any(
        c.startswith("accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml") for c in commands
    )
    models, data, runs = make_models(tmp_path), make_data(tmp_path, small_data, streams), str(tmp_path / "runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ran = []
    for command in commands:
        if any(marker in command for marker in SKIPPED):
            continue
        local = localise(command, models, data, runs)
        words = shlex.split(local)
        if words[0] == "accelerate":
            words = [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
        elif words[0] == "python":
            words = [sys.executable, *words[1:]]
        finished = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, f"{command}\n{(finished.stdout + finished.stderr)[-4000:]}"
        ran.append(command)
    assert len(ran) == len(commands) - len(SKIPPED)
    # What the chain produced: a teacher in the Qwen3-Embedding convention, a student with a projection head
    # scored against its ads, an evaluation report and a serving export.
    with open(os.path.join(runs, "teacher", "harness_encoder.json")) as handle:
        teacher = json.load(handle)
    assert (teacher["pooling"], teacher["padding_side"]) == ("last", "left")
    assert teacher["query_prompt"].startswith("Instruct: Given a web search query")
    with open(os.path.join(runs, "student", "harness_encoder.json")) as handle:
        assert json.load(handle)["projection_out"] == 32
    assert os.path.exists(os.path.join(runs, "eval", "results.json")) or os.listdir(os.path.join(runs, "eval"))
    assert os.path.exists(os.path.join(runs, "student-serving", "onnx", "model.onnx"))
