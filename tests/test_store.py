"""Embedding store: round trip, row reads over memory-mapped shards, and refusal of stale or damaged stores."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator

from common.data import data_fingerprint
from common.encoder import Encoder
from common.errors import UserError
from common.store import EmbeddingStore, build_store, finish_store, open_or_build_store, write_shard

IDS = ["a1", "a2", "a3", "a4", "a5"]
TEXTS = ["rent a kayak", "used laptops", "fix my phone", "sell my car", "buy a sofa"]


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.from_pretrained(tiny_bert)


def open_or_build(encoder, texts, folder, ids=IDS):
    return open_or_build_store(
        Accelerator(), encoder, ids, texts, "ad", path=folder, store_dir=None, model_path=None, batch_size=2
    )


def test_round_trip(encoder, tmp_path):
    folder = str(tmp_path / "store")
    store = build_store(Accelerator(), encoder, IDS, TEXTS, "ad", folder, batch_size=2)
    assert store.ids.tolist() == IDS and store.dim == encoder.embedding_dim and len(store) == 5
    assert isinstance(store.shards[0], np.memmap)
    expected = encoder.encode(TEXTS, "ad")
    np.testing.assert_allclose(store.read(range(5)), expected, atol=1e-6)
    assert store.rows(["a3", "a1"]).tolist() == [2, 0]
    meta = store.metadata
    assert meta["model_fingerprint"] == encoder.fingerprint and meta["data_fingerprint"] == data_fingerprint(IDS, TEXTS)
    assert (meta["pooling"], meta["normalized"], meta["count"], meta["kind"]) == ("mean", True, 5, "ad")
    assert not os.path.exists(folder + ".partial")
    # Opening again with the same model and data reuses it (the files are not rewritten).
    modified = os.path.getmtime(os.path.join(folder, "metadata.json"))
    assert open_or_build(encoder, TEXTS, folder).ids.tolist() == IDS
    assert os.path.getmtime(os.path.join(folder, "metadata.json")) == modified


def write_sharded_store(folder, shards, dtype="float16"):
    """A store written the way N processes write one: a shard each, then the metadata."""
    partial = folder + ".partial"
    os.makedirs(partial)
    for rank, vectors in enumerate(shards):
        ids = [f"r{rank}-{i}" for i in range(len(vectors))]
        write_shard(partial, rank, len(shards), vectors, ids, dtype)
    metadata = {
        "kind": "ad",
        "dim": shards[0].shape[1],
        "dtype": dtype,
        "model_fingerprint": "m",
        "data_fingerprint": "d",
    }
    finish_store(partial, folder, metadata, [len(vectors) for vectors in shards])
    return EmbeddingStore.open(folder)


def test_rows_are_read_across_shards_in_the_order_asked(tmp_path):
    generator = np.random.default_rng(0)
    shards = [generator.standard_normal((count, 8)).astype(np.float32) for count in (5, 0, 7, 3)]
    store = write_sharded_store(str(tmp_path / "store"), shards)
    everything = np.concatenate(shards).astype(np.float16).astype(np.float32)
    rows = [14, 0, 6, 6, 4, 5, 11, 0]  # unsorted, repeated, crossing every non-empty shard
    vectors = store.read(rows)
    assert vectors.dtype == np.float32 and vectors.shape == (8, 8)
    np.testing.assert_array_equal(vectors, everything[rows])
    assert store.read([]).shape == (0, 8)
    assert store.ids.tolist()[5] == "r2-0" and store.rows(["r3-2"]).tolist() == [14]
    with pytest.raises(IndexError):
        store.read([15])
    # Two stores (queries, then general text) read as one.
    stacked = EmbeddingStore.stack([store, write_sharded_store(str(tmp_path / "other"), [shards[0]])])
    assert len(stacked) == 20
    np.testing.assert_array_equal(stacked.read([19, 0]), everything[[4, 0]])


def test_reading_rows_never_loads_the_store(tmp_path):
    """Shards stay memory-mapped: opening and reading rows allocates about what those rows take."""
    import tracemalloc  # numpy reports its allocations to tracemalloc; pages of a memory map are not allocations

    shards = [np.ones((50_000, 64), dtype=np.float32) for _ in range(4)]  # 51 MB in all
    folder = str(tmp_path / "store")
    write_sharded_store(folder, shards, dtype="float32")
    tracemalloc.start()
    store = EmbeddingStore.open(folder)
    vectors = store.read(np.arange(0, 200_000, 100))  # 2,000 rows over all four shards: 0.5 MB
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert vectors.shape == (2000, 64) and all(isinstance(shard, np.memmap) for shard in store.shards)
    assert peak < 8 << 20, peak  # a copy of the store would be 51 MB


def test_stale_or_damaged_store_is_refused(encoder, tiny_qwen, tmp_path):
    folder = str(tmp_path / "store")
    build_store(Accelerator(), encoder, IDS, TEXTS, "ad", folder)
    other_model = Encoder.from_pretrained(tiny_qwen)
    with pytest.raises(UserError, match="another model"):
        open_or_build(other_model, TEXTS, folder)
    with pytest.raises(UserError, match="other data"):
        open_or_build(encoder, [*TEXTS[:-1], "buy a couch"], folder)
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


def test_nan_in_a_large_shard_is_refused_when_its_row_is_read(tmp_path, monkeypatch):
    """Opening checks a bounded sample (first rows and evenly spaced blocks); a bad row outside it is
    refused when a step reads it."""
    import common.store

    monkeypatch.setattr(common.store, "_OPEN_CHECK_BYTES", 1 << 20)  # 4,096 rows of 64 floats: blocks of 128
    vectors = np.ones((20_000, 64), dtype=np.float32)
    folder = str(tmp_path / "store")
    write_sharded_store(folder, [vectors], dtype="float32")
    shard_path = os.path.join(folder, "vectors-00000-of-00001.npy")
    vectors[300, 3] = np.inf  # damaged on disk after the 1st block [0, 128), before the 2nd [641, 769)
    np.save(shard_path, vectors)
    store = EmbeddingStore.open(folder)
    assert store.read([0, 19_999]).shape == (2, 64)
    with pytest.raises(UserError, match=r"Row 300 .* NaN or inf"):
        store.read([5, 300])
    vectors[700, 0] = np.nan  # inside a sampled block: refused when opened
    np.save(shard_path, vectors)
    with pytest.raises(UserError, match="NaN or inf"):
        EmbeddingStore.open(folder)


def test_half_written_store_is_not_a_store(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(UserError, match="not an embedding store"):
        EmbeddingStore.open(str(tmp_path / "store"))


def test_a_folder_that_is_not_a_store_is_never_replaced(encoder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an embedding store"):
        build_store(Accelerator(), encoder, IDS, TEXTS, "ad", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_store_made_another_way_is_refused_beyond_fingerprints(encoder, tmp_path):
    """Same model, same texts, but encoded as ads: refused as a query store (the prompt would differ too)."""
    folder = str(tmp_path / "store")
    build_store(Accelerator(), encoder, IDS, TEXTS, "ad", folder)
    with pytest.raises(UserError, match="has kind 'ad' but 'query' is needed"):
        open_or_build_store(Accelerator(), encoder, IDS, TEXTS, "query", path=folder, store_dir=None, model_path=None)
    meta = json.loads(Path(folder, "metadata.json").read_text())
    meta["max_length"] = 7
    with open(os.path.join(folder, "metadata.json"), "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(UserError, match="has max_length 7"):
        open_or_build(encoder, TEXTS, folder)


def test_damaged_metadata_or_shards_are_refused_with_a_sentence(encoder, tmp_path):
    folder = tmp_path / "store"
    build_store(Accelerator(), encoder, IDS, TEXTS, "ad", str(folder))
    metadata = (folder / "metadata.json").read_text()
    (folder / "metadata.json").write_text(metadata[: len(metadata) // 2])  # half-written
    with pytest.raises(UserError, match=r"metadata\.json is damaged"):
        EmbeddingStore.open(str(folder))
    (folder / "metadata.json").write_text(metadata)
    shard = folder / "vectors-00000-of-00001.npy"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="missing, truncated or damaged"):
        EmbeddingStore.open(str(folder))
    shard.unlink()
    with pytest.raises(UserError, match="missing, truncated or damaged"):
        EmbeddingStore.open(str(folder))


@pytest.mark.parametrize("extension", ["jsonl", "csv", "parquet"])
def test_scanning_a_corpus_gives_read_texts_ids_and_fingerprint_in_batches(extension, tmp_path):
    """scan_corpus streams the file in Arrow batches (here of 7 rows) without keeping the texts: the same ids
    and the same fingerprint as reading it whole, so stores built by any script are found current; a duplicate
    id or an empty text is refused with the row as read_texts refuses it."""
    import pandas as pd

    from common.data import data_fingerprint, read_texts, scan_corpus
    from common.errors import UserError

    frame = pd.DataFrame({"id": [f"0{i}" for i in range(30)], "text": [f"ad number {i}" for i in range(30)]})
    path = str(tmp_path / f"ads.{extension}")
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True), "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[extension]()  # fmt: skip
    ids, texts = read_texts(path, "id", "text")
    assert scan_corpus(path, "id", "text", batch_rows=7) == (ids, data_fingerprint(ids, texts))
    assert ids[0] == "00"
    for column, value, message in (("id", "05", "id '05' appears more than once"), ("text", "", "row 3")):
        broken = frame.copy()
        broken.loc[3, column] = value
        bad = str(tmp_path / f"bad-{column}.jsonl")
        broken.to_json(bad, orient="records", lines=True)
        with pytest.raises(UserError, match=message):
            scan_corpus(bad, "id", "text", batch_rows=7)
