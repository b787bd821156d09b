"""Embedding store: round trip, row reads over memory-mapped chunks, ids and texts found on disk, resumable
bounded builds, and refusal of stale or damaged stores."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator

from common.data import data_fingerprint, text_key
from common.encoder import Encoder
from common.errors import UserError
from common.store import EmbeddingStore, build_store, open_or_build_store, rows_of_lists, write_store

IDS = ["a1", "a2", "a3", "a4", "a5"]
TEXTS = ["rent a kayak", "used laptops", "fix my phone", "sell my car", "buy a sofa"]


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.from_pretrained(tiny_bert)


def build(encoder, folder, texts=TEXTS, ids=IDS, kind="ad", **options):
    return build_store(Accelerator(), encoder, rows_of_lists(ids, texts), kind, folder, batch_size=2, **options)


def open_or_build(encoder, texts, folder, ids=IDS, kind="ad"):
    return open_or_build_store(
        Accelerator(), encoder, rows_of_lists(ids, texts), kind, data_fp=data_fingerprint(ids, texts), path=folder,
        store_dir=None, model_path=None, batch_size=2,
    )  # fmt: skip


def test_round_trip(encoder, tmp_path):
    folder = str(tmp_path / "store")
    store = build(encoder, folder, chunk_rows=2)  # chunks of 2, 2 and 1 rows
    assert store.ids == IDS and store.dim == encoder.embedding_dim and len(store) == 5
    assert [name for name in sorted(os.listdir(folder)) if name.startswith("chunk")] == [
        "chunk_000000", "chunk_000001", "chunk_000002"
    ]  # fmt: skip
    expected = encoder.encode(TEXTS, "ad")
    np.testing.assert_allclose(store.read(range(5)), expected, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(list(store.iter_chunks(3))), expected, atol=1e-6)
    assert store.rows(["a3", "a1"]).tolist() == [2, 0]
    assert store.keys_of([4, 0]).tolist() == [text_key(TEXTS[4]), text_key(TEXTS[0])]
    assert store.rows_of_texts(["fix my phone", "not an ad"]).tolist() == [2, -1]
    meta = store.metadata
    assert meta["model_fingerprint"] == encoder.fingerprint and meta["data_fingerprint"] == data_fingerprint(IDS, TEXTS)
    assert (meta["pooling"], meta["normalized"], meta["count"], meta["kind"]) == ("mean", True, 5, "ad")
    # Opening again with the same model and data reuses it (the files are not rewritten).
    modified = os.path.getmtime(os.path.join(folder, "metadata.json"))
    assert open_or_build(encoder, TEXTS, folder).ids == IDS
    assert os.path.getmtime(os.path.join(folder, "metadata.json")) == modified


def synthetic(folder, chunks, dtype="float16", **options):
    """A store of the given vectors, a chunk each, as N processes would write one chunk each."""
    vectors = np.concatenate(chunks)
    ids = [f"r{i}" for i in range(len(vectors))]
    sizes = {len(chunk) for chunk in chunks[:-1]}
    rows = sizes.pop() if sizes else len(vectors)
    return write_store(folder, vectors, ids, metadata={"kind": "ad", "model_fingerprint": "m"}, chunk_rows=rows,
                       dtype=dtype, **options)  # fmt: skip


def test_rows_are_read_across_chunks_in_the_order_asked(tmp_path):
    generator = np.random.default_rng(0)
    chunks = [generator.standard_normal((count, 8)).astype(np.float32) for count in (5, 5, 5, 3)]
    store = synthetic(str(tmp_path / "store"), chunks)
    everything = np.concatenate(chunks).astype(np.float16).astype(np.float32)
    rows = [14, 0, 6, 6, 4, 5, 11, 0, 17]  # unsorted, repeated, crossing every chunk
    vectors = store.read(rows)
    assert vectors.dtype == np.float32 and vectors.shape == (9, 8)
    np.testing.assert_array_equal(vectors, everything[rows])
    assert store.read([]).shape == (0, 8)
    assert store.ids_of([5, 17]) == ["r5", "r17"] and store.rows(["r14", "r2"]).tolist() == [14, 2]
    with pytest.raises(IndexError):
        store.read([18])
    # Two stores (queries, then general text) read as one, ids found in either.
    stacked = EmbeddingStore.stack([store, synthetic(str(tmp_path / "other"), [chunks[0]])])
    assert len(stacked) == 23
    np.testing.assert_array_equal(stacked.read([22, 0]), everything[[4, 0]])
    assert stacked.rows(["r4"]).tolist() == [4]  # the first store's, as ids are looked up in order


def test_reading_rows_never_loads_the_store(tmp_path):
    """Chunks stay memory-mapped: opening, finding ids and reading rows allocate about what those rows take."""
    import tracemalloc  # numpy reports its allocations to tracemalloc; pages of a memory map are not allocations

    folder = str(tmp_path / "store")
    synthetic(folder, [np.ones((50_000, 64), dtype=np.float32) for _ in range(4)], dtype="float32")  # 51 MB
    tracemalloc.start()
    store = EmbeddingStore.open(folder)
    vectors = store.read(np.arange(0, 200_000, 100))  # 2,000 rows over all four chunks: 0.5 MB
    rows = store.rows([f"r{i}" for i in range(0, 200_000, 1000)])
    keys = store.keys_of(np.arange(0, 200_000, 100))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert vectors.shape == (2000, 64) and rows.tolist() == list(range(0, 200_000, 1000)) and len(keys) == 2000
    assert peak < 8 << 20, peak  # a copy of the store would be 51 MB


def test_whole_passes_read_ahead_and_step_reads_do_not(tmp_path, monkeypatch):
    """Scattered row reads advise MADV_RANDOM (no readahead around every row); iter_chunks, the sequential pass of
    an index build or an exact search, advises MADV_SEQUENTIAL."""
    import mmap

    import common.store

    advised = []
    real = common.store._advise
    monkeypatch.setattr(common.store, "_advise", lambda array, sequential: (advised.append(sequential),
                                                                             real(array, sequential)))  # fmt: skip
    store = synthetic(str(tmp_path / "store"), [np.ones((10, 4), dtype=np.float32)] * 3)
    advised.clear()
    store.read([0, 25])
    assert advised and not any(advised)
    advised.clear()
    assert sum(len(block) for block in store.iter_chunks(4)) == 30
    assert advised and all(advised) and hasattr(mmap, "MADV_SEQUENTIAL")


def test_a_killed_build_resumes_at_the_first_missing_chunk(encoder, tiny_qwen, tmp_path, monkeypatch):
    """Memory while building is one chunk: the model sees chunk_rows texts at a time. A build killed after some
    chunks resumes without encoding them again; a resume with another model or other rows is refused."""
    texts = [f"ad number {i} for sale" for i in range(10)]
    ids = [f"id{i}" for i in range(10)]
    encoded = []
    real_encode = Encoder.encode

    def counting_encode(self, batch, *args, **kwargs):
        encoded.append(len(batch))
        return real_encode(self, batch, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counting_encode)
    folder = tmp_path / "store"
    straight = build(encoder, str(tmp_path / "straight"), texts, ids, chunk_rows=3)
    assert encoded == [3, 3, 3, 1]
    store = build(encoder, str(folder), texts, ids, chunk_rows=3)
    # As a kill leaves it: two chunks whole, one half-written, no index and no metadata.
    os.remove(folder / "metadata.json")
    shutil.rmtree(folder / "index")
    shutil.rmtree(folder / "chunk_000003")
    os.rename(folder / "chunk_000002", folder / "chunk_000002.partial")
    with pytest.raises(UserError, match="has not finished"):
        EmbeddingStore.open(str(folder))
    encoded.clear()
    resumed = build(encoder, str(folder), texts, ids, chunk_rows=3)
    assert encoded == [3, 1]  # chunks 2 and 3 only
    np.testing.assert_array_equal(resumed.read(range(10)), straight.read(range(10)))
    assert resumed.metadata["data_fingerprint"] == store.metadata["data_fingerprint"]
    os.remove(folder / "metadata.json")
    shutil.rmtree(folder / "chunk_000003")
    with pytest.raises(UserError, match="encoded by another model"):
        build(Encoder.from_pretrained(tiny_qwen), str(folder), texts, ids, chunk_rows=3)
    with pytest.raises(UserError, match="other rows"):
        build(encoder, str(folder), ["changed", *texts[1:]], ids, chunk_rows=3)  # a text of chunk 0
    with pytest.raises(UserError, match="other rows"):
        build(encoder, str(folder), texts[::-1], ids, chunk_rows=3)


def test_duplicate_ids_are_refused_when_the_index_is_written(encoder, tmp_path):
    with pytest.raises(UserError, match="id 'a2' appears more than once"):
        build(encoder, str(tmp_path / "store"), TEXTS, ["a1", "a2", "a3", "a2", "a5"], chunk_rows=2)


def test_stale_or_damaged_store_is_refused(encoder, tiny_qwen, tmp_path):
    folder = str(tmp_path / "store")
    build(encoder, folder)
    other_model = Encoder.from_pretrained(tiny_qwen)
    with pytest.raises(UserError, match="another model"):
        open_or_build(other_model, TEXTS, folder)
    with pytest.raises(UserError, match="other data"):
        open_or_build(encoder, [*TEXTS[:-1], "buy a couch"], folder)
    with pytest.raises(UserError, match="-d vectors"):
        EmbeddingStore.open(folder, dim=7)
    with pytest.raises(UserError, match="not in the store"):
        EmbeddingStore.open(folder).rows(["nope"])
    vectors_path = os.path.join(folder, "chunk_000000", "vectors.npy")
    vectors = np.load(vectors_path)
    vectors[1, 0] = np.nan
    np.save(vectors_path, vectors)
    with pytest.raises(UserError, match="NaN"):
        EmbeddingStore.open(folder)


def test_nan_in_a_large_chunk_is_refused_when_its_row_is_read(tmp_path, monkeypatch):
    """Opening checks a bounded sample (the first rows of up to 32 chunks); a bad row outside it is refused when
    a step reads it."""
    import common.store

    monkeypatch.setattr(common.store, "_OPEN_CHECK_BYTES", 1 << 16)  # 256 rows of 64 floats
    vectors = np.ones((20_000, 64), dtype=np.float32)
    folder = str(tmp_path / "store")
    synthetic(folder, [vectors], dtype="float32")
    chunk_path = os.path.join(folder, "chunk_000000", "vectors.npy")
    vectors[300, 3] = np.inf  # damaged on disk after the sampled rows
    np.save(chunk_path, vectors)
    store = EmbeddingStore.open(folder)
    assert store.read([0, 19_999]).shape == (2, 64)
    with pytest.raises(UserError, match=r"Row 300 .* NaN or inf"):
        store.read([5, 300])
    vectors[100, 0] = np.nan  # inside the sample: refused when opened
    np.save(chunk_path, vectors)
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
        build(encoder, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_store_made_another_way_is_refused_beyond_fingerprints(encoder, tmp_path):
    """Same model, same texts, but encoded as ads: refused as a query store (the prompt would differ too)."""
    folder = str(tmp_path / "store")
    build(encoder, folder)
    with pytest.raises(UserError, match="holds ad vectors, not query vectors"):
        open_or_build(encoder, TEXTS, folder, kind="query")
    meta = json.loads(Path(folder, "metadata.json").read_text())
    meta["max_length"] = 7
    with open(os.path.join(folder, "metadata.json"), "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(UserError, match="has max_length 7"):
        open_or_build(encoder, TEXTS, folder)


def test_damaged_metadata_or_chunks_are_refused_with_a_sentence(encoder, tmp_path):
    folder = tmp_path / "store"
    build(encoder, str(folder))
    metadata = (folder / "metadata.json").read_text()
    (folder / "metadata.json").write_text(metadata[: len(metadata) // 2])  # half-written
    with pytest.raises(UserError, match=r"metadata\.json is damaged"):
        EmbeddingStore.open(str(folder))
    (folder / "metadata.json").write_text(metadata)
    chunk = folder / "chunk_000000" / "vectors.npy"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="missing, truncated or damaged"):
        EmbeddingStore.open(str(folder))
    chunk.unlink()
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


def write_sharded_store(folder, shards, dtype="float16"):
    """A store of the given vectors, a chunk each (for the retrieval and alignment tests)."""
    return synthetic(folder, [np.asarray(shard) for shard in shards], dtype=dtype)


def _decision_worker(rank, world, port, out_dir):
    """One rank of test_ranks_that_see_the_store_differently_take_the_main_process_path: opens or builds the store
    at the relative path "store", from its own folder."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    from common.encoder import EncoderSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    os.chdir(os.path.join(out_dir, f"rank{rank}"))
    with open(os.path.join(out_dir, "model.txt"), encoding="utf-8") as handle:
        spec = EncoderSpec.read(handle.read())
    gloo = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=60))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[gloo])
    rows, data_fp = rows_of_lists(IDS, TEXTS), data_fingerprint(IDS, TEXTS)
    store = open_or_build_store(accelerator, spec, rows, "ad", data_fp=data_fp, path="store", store_dir=None,
                                model_path=None, batch_size=2, chunk_rows=2)  # fmt: skip
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"built": spec._loaded is not None, "ids": store.ids}, handle)
    accelerator.wait_for_everyone()


def test_ranks_that_see_the_store_differently_take_the_main_process_path(tiny_bert, tmp_path):
    """A store another job is finishing can be seen unfinished by one rank and finished by the next (a shared
    file system's caches, or a moment apart). Each rank deciding alone, rank 0 would build (waiting in a
    collective) while rank 1 opened and went on: a hang. Here rank 0's folder holds the store without its
    metadata (a build killed after its last chunk) and rank 1's the finished store, under the same relative
    path: both must follow rank 0 and build (resuming: nothing is encoded again)."""
    from conftest import run_on_two_gloo_ranks

    finished = build(Encoder.from_pretrained(tiny_bert), str(tmp_path / "finished"), chunk_rows=2)
    shutil.copytree(finished.folder, tmp_path / "rank1" / "store")
    shutil.copytree(finished.folder, tmp_path / "rank0" / "store")
    os.remove(tmp_path / "rank0" / "store" / "metadata.json")
    (tmp_path / "model.txt").write_text(tiny_bert)
    run_on_two_gloo_ranks(_decision_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [result["built"] for result in results] == [True, True]
    assert all(result["ids"] == IDS for result in results)
    assert EmbeddingStore.open(str(tmp_path / "rank0" / "store")).metadata["count"] == len(IDS)
