"""Model cards and pushing a finished model folder to the Hub (checkpoints and stores stay local)."""

import json
import os

from common.errors import UserError

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

## Results
{results}
"""

DESCRIPTIONS = {
    "teacher": "A retrieval embedder fine-tuned contrastively on (query, clicked ad, hard negatives). "
    "It encodes both queries and ads.",
    "student": "A small query encoder aligned to a frozen teacher. Score its query vectors against the "
    "**teacher's** ad vectors (the teacher's ad index is reused as it is).",
}


def write_model_card(folder, encoder, role, script, results=None, name=None):
    results_text = "\n".join(f"- {key}: {value}" for key, value in (results or {}).items()) or "-"
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
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


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
                ".final.partial/*",
            ],
        )
    except Exception as error:
        raise UserError(
            f"Pushing {folder} to {repo_id} failed ({type(error).__name__}); check the connection, the repo id "
            "and that your token can write (the model is saved locally)."
        ) from None
