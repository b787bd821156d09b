"""Model cards (written at a save, rewritten with an evaluation) and pushing a finished model folder to the Hub
(checkpoints and stores stay local)."""

import argparse
import json
import os
import shutil

from common.errors import UserError
from common.runtime import logger

CARD = """---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- harness-lm
- {role}
---
# {name}

{description}

Made with [harness-lm]({project}) `{script}`.

| | |
|---|---|
| pooling | {pooling} |
| normalised | {normalize} |
| query prompt | `{query_prompt}` |
| ad prompt | `{ad_prompt}` |
| max length | {max_length} |
| padding side | {padding_side} |
| output dimension | {dim} |

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}")
query_vectors = model.encode(["running shoes"], prompt_name="query")
```

## Training results

{results}
"""

DESCRIPTIONS = {
    "teacher": "A retrieval embedder fine-tuned contrastively on (query, clicked ad, hard negatives). "
    "It encodes both queries and ads.",
    "student": "A small query encoder aligned to a frozen teacher. Score its query vectors against the "
    "**teacher's** ad vectors (the teacher's ad index is reused as it is).",
}


# The flags that make a run's recipe, in the order the card lists them (those a script has).
RECIPE_FLAGS = [
    "model_name_or_path", "teacher_model", "student_model", "student_num_layers", "student_layers", "teacher_dim",
    "alignment_loss", "prune_schedule", "ffn_keep_ratio", "layer_importance", "learning_rate",
    "num_train_epochs", "max_train_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "temperature", "num_hard_negatives", "num_random_negatives", "pseudo_queries", "query_file", "train_file",
    "general_text_file", "corpus_file", "seed",
]  # fmt: skip


def _recipe(args, encoder):
    rows = [("teacher", encoder.config.extra.get("teacher"))] if encoder.config.extra.get("teacher") else []
    if encoder.config.extra.get("teacher_layers") is not None:
        rows.append(("teacher layers kept", encoder.config.extra["teacher_layers"]))
    for flag in RECIPE_FLAGS:
        value = getattr(args, flag, None) if args is not None else None
        if value not in (None, [], ""):
            rows.append((f"--{flag}", value))
    return "\n".join(f"| {name} | `{value}` |" for name, value in rows)


def _number(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def evaluation_section(report, name):
    """The card's evaluation: the model's and the teacher's metrics, recovery with its interval, overlap,
    latency, FLOPs and the report's plots (copied beside the card), from evaluate.py's results.json."""
    entry, teacher = report["models"][name], report["models"]["teacher"]
    level = round(100 * report["confidence_level"])
    lines = [
        "## Evaluation",
        "",
        f"evaluate.py on {report['num_queries']} queries and {report['num_ads']} ads ({report['index']} index); "
        f"the student's query vectors are searched in the teacher's ad vectors. Device: {report['device']}.",
        "",
        "| metric | this model | teacher | recovery |",
        "|---|---|---|---|",
    ]
    for key, value in entry["metrics"].items():
        interval = entry["recovery_interval"].get(key)
        recovery = f"{entry['recovery'][key]:.1f}%" if key in entry["recovery"] else "-"
        recovery += f" [{interval[0]:.1f}, {interval[1]:.1f}] ({level}% CI)" if interval else ""
        lines.append(f"| {key} | {value:.4f} | {teacher['metrics'][key]:.4f} | {recovery} |")
    for key, value in entry["overlap"].items():
        lines.append(f"| {key} with the teacher | {100 * value:.1f}% | | |")
    speed = entry.get("speed", {})
    for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "throughput_qps"):
        if key in speed:
            lines.append(f"| {key} | {speed[key]:.2f} | {teacher.get('speed', {}).get(key, float('nan')):.2f} | |")
    if entry.get("flops_per_query"):
        lines.append(f"| GFLOPs per query | {entry['flops_per_query'] / 1e9:.3f} | "
                     f"{(teacher.get('flops_per_query') or float('nan')) / 1e9:.3f} | |")  # fmt: skip
    lines += [""] + [f"![{plot[:-4]}]({plot})" for plot in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def write_model_card(folder, encoder, role, script, results=None, name=None, args=None, evaluation=None):
    """README.md of a model folder: what it is, how to load it, the recipe (teacher, flags, data), the run's
    results, and (given evaluate.py's section) its evaluation."""
    results_text = "\n".join(f"- {key}: {_number(value)}" for key, value in (results or {}).items()) or "-"
    recipe = _recipe(args, encoder)
    card = CARD.format(
        role=role,
        name=name or os.path.basename(os.path.abspath(folder)),
        description=DESCRIPTIONS[role],
        project="https://github.com/harness-lm/harness-lm",
        script=script,
        pooling=encoder.config.pooling,
        normalize=encoder.config.normalize,
        query_prompt=json.dumps(encoder.config.query_prompt)[1:-1],
        ad_prompt=json.dumps(encoder.config.ad_prompt)[1:-1],
        max_length=encoder.config.max_length,
        padding_side=encoder.config.padding_side,
        dim=encoder.embedding_dim,
        results=results_text,
    )
    if recipe:
        card += f"\n## Recipe\n\n| | |\n|---|---|\n{recipe}\n"
    if evaluation:
        card += "\n" + evaluation
    path = os.path.join(folder, "README.md")
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        handle.write(card)
    os.replace(path + ".partial", path)


def push_to_hub(folder, repo_id, token=None, private=False, commit_message="Upload model"):
    """Upload the model folder; the token comes from the flag, HF_TOKEN or the cached login, never logged."""
    from huggingface_hub import create_repo, upload_folder

    if not repo_id:
        raise UserError("--push_to_hub needs --hub_model_id (e.g. your-name/harness-student).")
    try:
        create_repo(repo_id, token=token, private=private, exist_ok=True)
        return upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            token=token,
            commit_message=commit_message,
            ignore_patterns=[
                "checkpoints/*",
                "stages/*",
                "*.partial/*",
                "stores/*",
                "training_args.json",
                ".lock",
                ".log_history.jsonl",
                ".final.partial/*",
            ],
        )
    except Exception as error:
        raise UserError(
            f"Pushing {folder} to {repo_id} failed ({type(error).__name__}); check the connection, the repo id "
            "and that your token can write (the model is saved locally; retry with `hf upload "
            f"{repo_id} {folder} . --exclude 'checkpoints/*' --exclude 'stages/*' --exclude training_args.json`)."
        ) from None


def update_model_card(folder, name, report, report_dir, args):
    """Rewrite the card of a student folder made by one of this project's scripts with this evaluation; the
    plots are copied beside it, so a push carries them. Other folders are left as they are."""
    run_file = os.path.join(str(folder), "training_args.json")
    if not os.path.isfile(run_file):
        logger.warning(f"{folder} holds no run of this project's scripts; its model card is left as it is.")
        return
    with open(run_file, encoding="utf-8") as handle:
        recorded = json.load(handle)
    results_file = os.path.join(str(folder), "all_results.json")
    run_results = None
    if os.path.isfile(results_file):
        with open(results_file, encoding="utf-8") as handle:
            run_results = json.load(handle)
    for plot in report.get("plots", []):
        shutil.copyfile(os.path.join(report_dir, plot), os.path.join(str(folder), plot))
    from common.encoder import Encoder

    encoder = Encoder.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    write_model_card(str(folder), encoder, "student", recorded.get("script", "?"), run_results,
                     args=argparse.Namespace(**recorded), evaluation=evaluation_section(report, name))  # fmt: skip
    logger.info(f"Wrote the evaluation into the model card {os.path.join(str(folder), 'README.md')}")
