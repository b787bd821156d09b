"""Embedding store: round trip, memory-mapping, and refusal of stale or damaged stores."""

import json
import os

import numpy as np
import pytest
from accelerate import Accelerator

from common.data import data_fingerprint
from common.encoder import Encoder
from common.errors import UserError
from common.store import EmbeddingStore, build_store, store_for

IDS = ["a1", "a2", "a3", "a4", "a5"]
TEXTS = ["rent a kayak", "used laptops", "fix my phone", "sell my car", "buy a sofa"]


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.from_pretrained(tiny_bert)


def test_round_trip(encoder, tmp_path):
    folder = str(tmp_path / "store")
    store = build_store(Accelerator(), encoder, IDS, TEXTS, "ad", folder, batch_size=2)
    assert store.ids == IDS and store.dim == encoder.embedding_dim
    assert isinstance(store.shards[0], np.memmap)
    np.testing.assert_allclose(store.vectors, encoder.encode(TEXTS, "ad"), atol=1e-6)
    assert store.rows(["a3", "a1"]).tolist() == [2, 0]
    meta = store.metadata
    assert meta["model_fingerprint"] == encoder.fingerprint and meta["data_fingerprint"] == data_fingerprint(IDS, TEXTS)
    assert (meta["pooling"], meta["normalized"], meta["count"], meta["kind"]) == ("mean", True, 5, "ad")
    assert not os.path.exists(folder + ".partial")
    # Opening again with the same model and data reuses it.
    assert store_for(Accelerator(), encoder, IDS, TEXTS, "ad", folder).ids == IDS


def test_stale_or_damaged_store_is_refused(encoder, tiny_qwen, tmp_path):
    folder = str(tmp_path / "store")
    build_store(Accelerator(), encoder, IDS, TEXTS, "ad", folder)
    other_model = Encoder.from_pretrained(tiny_qwen)
    with pytest.raises(UserError, match="another model"):
        store_for(Accelerator(), other_model, IDS, TEXTS, "ad", folder)
    with pytest.raises(UserError, match="other data"):
        store_for(Accelerator(), encoder, IDS, [*TEXTS[:-1], "buy a couch"], "ad", folder)
    with pytest.raises(UserError, match="-d vectors"):
        EmbeddingStore.open(folder, dim=7)
    with pytest.raises(UserError, match="not in the store"):
        EmbeddingStore.open(folder).rows(["nope"])
    with open(os.path.join(folder, "metadata.json")) as handle:
        meta = json.load(handle)
    vectors_path = os.path.join(folder, meta["shards"][0]["vectors"])
    vectors = np.load(vectors_path)
    vectors[1, 0] = np.nan
    np.save(vectors_path, vectors)
    with pytest.raises(UserError, match="NaN"):
        EmbeddingStore.open(folder)


def test_half_written_store_is_not_a_store(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(UserError, match="not an embedding store"):
        EmbeddingStore.open(str(tmp_path / "store"))
