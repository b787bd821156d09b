"""Phase 2 at the scale of logged traffic (common/streaming.py, encode.py / distill_student.py --streaming):
streamed sources with on-the-fly filters, resumable teacher stores of a stream, mixing, and a position in the
stream that a resumed run restarts from. (SIGKILL and resume: tests/test_resume.py; 2 processes:
tests/test_multiprocess.py.)"""

import json
import os
import shutil

import numpy as np
import pytest

import distill_student
import encode
from common.encoder import Encoder
from common.errors import UserError
from common.store import EmbeddingStore, vectors_of
from common.streaming import (
    BloomFilter,
    MixedStream,
    StreamBatches,
    TextStream,
    open_or_build_stream_store,
    resolve_shards,
)


def one_process():
    """A real one-process CPU accelerator (conftest resets accelerate's shared state around each test)."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def rows_of(stream, epoch=0, start=0):
    return [(text, teacher) for text, teacher, _ in stream.rows(epoch, start)]


def test_shards_are_found_as_users_give_them(streams, tmp_path):
    builder, files = resolve_shards(streams["queries"])
    assert builder == "json" and [os.path.basename(f) for f in files] == [
        "part-00.jsonl",
        "part-01.jsonl",
        "part-02.jsonl",
    ]
    assert resolve_shards(os.path.join(streams["queries"], "part-0[01].jsonl"))[1] == files[:2]
    assert resolve_shards("org/logged-queries") == (None, None)  # a hub id
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="matches no file"):
        resolve_shards(str(tmp_path / "*.parquet"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"query": "a"}\n')
    (tmp_path / "mixed" / "b.csv").write_text("query\nb\n")
    with pytest.raises(UserError, match="all be of one type"):
        resolve_shards(str(tmp_path / "mixed"))


def test_filters_apply_on_the_fly_and_a_start_replays_the_same_rows(streams):
    """Length bounds and Bloom-filter dedupe drop rows as they stream (the empty row and the duplicate are the
    fixture's); starting at row n gives exactly the tail of the full epoch, also through a shuffle buffer."""
    stream = TextStream(streams["queries"], "query", min_chars=1, dedupe_capacity=1000)
    everything = rows_of(stream)
    assert len(everything) == streams["distinct"]
    assert stream.stats["duplicate"] == streams["rows"] - 1 - streams["distinct"] >= 1
    assert stream.stats["too_short"] == 1
    assert len({text for text, _ in everything}) == len(everything)
    long_ones = TextStream(streams["queries"], "query", min_chars=25, max_chars=30)
    kept = rows_of(long_ones)
    assert kept and all(25 <= len(text.strip()) <= 30 for text, _ in kept)

    shuffled = TextStream(streams["queries"], "query", dedupe_capacity=1000, shuffle_buffer=16, seed=3)
    epoch0, epoch1 = rows_of(shuffled, 0), rows_of(shuffled, 1)
    assert sorted(epoch0) == sorted(everything) and epoch0 != everything and epoch1 != epoch0
    for start in (0, 1, 17, len(epoch0) - 1, len(epoch0)):
        assert rows_of(shuffled, 0, start) == epoch0[start:]
    assert rows_of(shuffled, 1, 5) == epoch1[5:]

    context = TextStream(
        streams["queries"],
        "query",
        context_column="context",
        context_template="{query} | {context}",
        dedupe_capacity=1000,
    )
    for (text, teacher), (same, _) in zip(rows_of(context), everything):
        assert text == same and (teacher == text or teacher.startswith(f"{text} | category: "))


def test_bloom_filter_never_misses_a_duplicate_and_rarely_drops_a_new_text():
    bloom = BloomFilter(capacity=20_000, error_rate=1e-3)
    assert bloom.array.nbytes < 40_000  # fixed memory: about 1.8 bytes per text at 1e-3
    first_adds = [bloom.add(f"text {i}") for i in range(0, 20_000, 2)]
    assert sum(first_adds) <= 10  # new texts, rarely taken for duplicates while the filter is still sparse
    wrongly_dropped = sum(bloom.add(f"text {i}") for i in range(1, 20_000, 2))
    assert wrongly_dropped <= 30  # 10,000 new texts at 1e-3: about 10 expected
    assert all(bloom.add(f"text {i}") for i in range(0, 20_000, 2))


def test_a_streams_store_is_built_resumably_and_read_in_a_seeded_order(streams, tiny_bert, tmp_path, monkeypatch):
    """Chunks of 20 rows; a build killed in its third chunk resumes to the uninterrupted store; each epoch reads
    every row once (chunk order and rows within a chunk seeded); a start lands on the same row without reading
    the earlier ones; the vectors are the teacher's of the rows' texts; a changed source is refused."""
    encoder = Encoder.from_pretrained(tiny_bert).eval()
    stream = TextStream(streams["queries"], "query", dedupe_capacity=1000)

    def store_of(folder, source=stream, seed=0):
        return open_or_build_stream_store(one_process(), encoder, source, str(folder), None, None, 20, seed=seed)

    straight = store_of(tmp_path / "straight")

    import common.store

    real_save, saved = np.save, []

    def save_then_die(path, array):
        real_save(path, array)
        saved.append(path)
        if len(saved) == 7:  # three arrays per chunk: killed while writing the third chunk
            raise KeyboardInterrupt

    monkeypatch.setattr(common.store.np, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        store_of(tmp_path / "resumed")
    monkeypatch.setattr(common.store.np, "save", real_save)
    names = sorted(os.listdir(tmp_path / "resumed"))
    assert "chunk_000001" in names and "chunk_000002.partial" in names and "metadata.json" not in names
    with pytest.raises(UserError, match="has not finished"):
        EmbeddingStore.open(str(tmp_path / "resumed"))
    resumed = store_of(tmp_path / "resumed")
    assert resumed.metadata["chunks"] == straight.metadata["chunks"] and len(straight.sizes) == 5

    store = store_of(tmp_path / "resumed", seed=1)
    epoch0 = list(store.rows(0))
    texts = [text for text, _ in rows_of(stream)]
    assert sorted(text for text, _, _ in epoch0) == sorted(texts) and [t for t, _, _ in epoch0] != texts
    assert [t for t, _, _ in store.rows(1)] != [t for t, _, _ in epoch0]
    for start in (0, 19, 20, 21, 57, len(texts)):
        assert [(t, r[1]) for t, _, r in store.rows(0, start)] == [(t, r[1]) for t, _, r in epoch0[start:]]
    sample = epoch0[:13]
    vectors = vectors_of([reference for _, _, reference in sample])
    np.testing.assert_allclose(vectors, encoder.encode([t for t, _, _ in sample], "query"), atol=1e-5)

    # An unfinished build of the same folder from rows that are no longer the stream's is refused, not mixed in.
    shutil.copytree(tmp_path / "straight", tmp_path / "unfinished")
    os.remove(tmp_path / "unfinished" / "metadata.json")
    changed = TextStream(streams["queries"], "query")  # without dedupe: other rows in the chunks
    with pytest.raises(UserError, match="other rows"):
        store_of(tmp_path / "unfinished", changed)


def test_mixing_and_a_saved_position_continue_the_same_stream(streams):
    """General text at a ratio of 0.3 (cycling through its own epochs); a MixedStream restarted from the state
    saved after any global batch, across epochs, yields the rows the uninterrupted stream yields."""
    queries = TextStream(streams["queries"], "query", dedupe_capacity=1000, shuffle_buffer=8, seed=0)
    general = TextStream(streams["general"], "query", shuffle_buffer=8, seed=0)

    def batches(state=None, count=40):
        batcher = StreamBatches(MixedStream(queries, general, ratio=0.3, seed=5), 4, 2, 1, collate=list)
        if state is not None:
            batcher.load_state_dict(state)
        output, states = [], []
        for batch in batcher:
            output.append(batch)
            states.append(batcher.state_dict())
            if len(output) == count:
                break
        return output, states

    straight, states = batches()  # 40 global batches of 8 rows: over 3 epochs of the ~115-row mixed stream
    assert states[-1]["epoch"] >= 2 and states[-1]["general_epoch"] >= 1
    general_texts = {text for text, _ in rows_of(general)}
    rows = [row for batch in straight for row in batch]
    share = np.mean([text in general_texts for text, _, _ in rows])
    assert 0.2 < share < 0.4
    assert all(len(batch) == 4 for batch in straight)  # this process's half of each global batch
    for cut in (0, 7, 13, 14, 29):
        resumed, _ = batches(json.loads(json.dumps(states[cut])), count=40 - cut - 1)
        assert resumed == straight[cut + 1 :], cut


def test_streaming_options_are_checked(small_data, streams, tiny_bert, tmp_path):
    base = ["--teacher_model", tiny_bert, "--query_file", streams["queries"], "--student_num_layers", "1",
            "--store_dir", str(tmp_path / "stores")]  # fmt: skip
    cases = [
        (["--teacher_in_loop"], "add --streaming"),
        (["--dedupe_capacity", "100"], "filter a stream; add --streaming"),
        (["--streaming", "--teacher_in_loop"], "pass --max_train_steps"),
        (["--streaming", "--general_text_file", streams["general"]], "needs --general_text_ratio"),
        (["--streaming", "--general_text_ratio", "0.2"], "needs --general_text_file"),
        (
            ["--streaming", "--teacher_in_loop", "--max_train_steps", "2", "--teacher_query_store", "x"],
            "needs no store",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(UserError, match=message):
            distill_student.main([*base, *flags, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match="filter a stream"):
        encode.main(["--model_name_or_path", tiny_bert, "--input_file", small_data["ads"], "--max_query_chars", "9",
                     "--store_dir", str(tmp_path / "stores")])  # fmt: skip
    with pytest.raises(UserError, match="use --kind query"):
        encode.main(["--model_name_or_path", tiny_bert, "--input_file", small_data["ads"], "--streaming",
                     "--store_dir", str(tmp_path / "stores")])  # fmt: skip
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_encode_writes_the_chunked_store_that_phase_2_streams(streams, tiny_bert, tmp_path):
    """encode.py --streaming, then distill_student.py --streaming with the same data flags finds that store
    (no second one is built) and trains from it; with other filters it would need another store."""
    stores = str(tmp_path / "stores")
    data = ["--dedupe_capacity", "1000", "--chunk_rows", "20"]
    folder = encode.main(["--model_name_or_path", tiny_bert, "--input_file", streams["queries"], "--kind", "query",
                          "--text_column", "query", "--streaming", "--store_dir", stores, *data])  # fmt: skip
    assert len(EmbeddingStore.open(folder)) == streams["distinct"]
    results = distill_student.main(["--teacher_model", tiny_bert, "--query_file", streams["queries"], "--streaming",
                                    *data, "--student_num_layers", "1", "--store_dir", stores, "--num_train_epochs",
                                    "1", "--per_device_train_batch_size", "8",
                                    "--output_dir", str(tmp_path / "student")])  # fmt: skip
    assert results["teacher_query_store"] == folder and os.listdir(stores) == [os.path.basename(folder)]
    assert results["steps"] == -(-(streams["distinct"]) // 8)  # one epoch of the store
    with pytest.raises(UserError, match="min_chars"):
        distill_student.main(["--teacher_model", tiny_bert, "--query_file", streams["queries"], "--streaming", *data,
                              "--min_query_chars", "5", "--teacher_query_store", folder, "--student_num_layers", "1",
                              "--store_dir", stores, "--output_dir", str(tmp_path / "other")])  # fmt: skip


def test_tsv_shards_with_a_byte_order_mark_stream_as_text_with_tabs(tmp_path):
    """TSV shards are split on tabs, every cell stays text (a query "2024" is not the number 2024) and a
    spreadsheet's byte-order mark at the start of a shard is not part of the first column's name."""
    folder = tmp_path / "tsv"
    folder.mkdir()
    (folder / "a.tsv").write_bytes(b"\xef\xbb\xbfquery\tcontext\nrent a boat, cheap\tboats\n2024\tyears\n")
    (folder / "b.tsv").write_text("query\tcontext\ncafé près de moi\tfood\n", encoding="utf-8")
    stream = TextStream(str(folder), "query", context_column="context", context_template="{query} | {context}")
    assert rows_of(stream) == [("rent a boat, cheap", "rent a boat, cheap | boats"), ("2024", "2024 | years"),
                               ("café près de moi", "café près de moi | food")]  # fmt: skip


@pytest.mark.parametrize(
    "second_shard, expected",
    [
        ('{"text": "a renamed column"}\n', r"The shard .*b\.jsonl has no column 'query' \(columns: text\)"),
        ('{"query": "fine"}\n{"query": "fine too"}\n{"query": "cut off\n', r"b\.jsonl line 3 is not valid JSON"),
        ('{"query": 5}\n', r"b\.jsonl line 1, column .query.: expected text, got int"),
    ],
    ids=["renamed column", "malformed line", "a number"],
)
def test_a_later_shard_that_is_wrong_is_named_in_one_sentence(second_shard, expected, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"query": f"query {i}"}) + "\n" for i in range(50)))
    (folder / "b.jsonl").write_text(second_shard)
    with pytest.raises(UserError, match=expected) as refused:
        rows_of(TextStream(str(folder), "query"))
    assert "\n" not in str(refused.value)
