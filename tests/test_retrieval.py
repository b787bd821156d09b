"""Metrics against hand-computed cases and the FAISS search."""

import math

import numpy as np
import pytest

from common.retrieval import build_index, retrieval_metrics, search


def test_metrics_by_hand():
    qrels = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"d": 1}, "q3": {"x": 0}}  # q3 has nothing relevant: skipped
    ranked = {"q1": ["b", "z", "a"], "q2": ["z", "y", "w"], "q3": ["x"]}
    metrics = retrieval_metrics(ranked, qrels, [1, 3])
    assert metrics["precision@1"] == pytest.approx((1 + 0) / 2)
    assert metrics["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["recall@3"] == pytest.approx((1 + 0) / 2)
    assert metrics["mrr@3"] == pytest.approx((1 + 0) / 2)
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics["ndcg@3"] == pytest.approx((dcg / idcg + 0) / 2)
    assert metrics["ndcg@1"] == pytest.approx((1 / 2 + 0) / 2)


def test_faiss_search_finds_nearest():
    ads = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]], dtype=np.float32)
    scores, rows = search(build_index(ads), queries, k=10)  # k is capped at the number of ads
    assert rows.shape == (2, 4)
    assert rows[:, 0].tolist() == [1, 3] and scores[0, 0] == pytest.approx(0.9)


def test_sharded_search_over_a_memory_mapped_store_equals_the_flat_index(tmp_path, monkeypatch):
    """The exact search for stores larger than memory: chunks of the memory map, top-k merged."""
    from test_store import write_sharded_store

    from common import retrieval
    from common.store import EmbeddingStore

    generator = np.random.default_rng(0)
    shards = [generator.standard_normal((count, 16)).astype(np.float32) for count in (700, 0, 1300, 450)]
    store = write_sharded_store(str(tmp_path / "store"), shards, dtype="float32")
    queries = generator.standard_normal((40, 16)).astype(np.float32)
    flat_scores, flat_rows = search(build_index(store), queries, 50)
    sharded = retrieval.ShardedIndex(store, chunk_bytes=4 * 16 * 256)  # chunks of 1024 rows (the minimum)
    assert sharded.chunk_rows == 1024
    chunks_read = []
    original = EmbeddingStore.iter_chunks
    monkeypatch.setattr(EmbeddingStore, "iter_chunks", lambda self, n: (chunks_read.append(n), original(self, n))[1])
    scores, rows = search(sharded, queries, 50)
    assert chunks_read == [1024]  # one pass over the store for all queries
    np.testing.assert_allclose(scores, flat_scores, rtol=1e-5, atol=1e-5)
    assert np.array_equal(rows, flat_rows)
    everything = np.concatenate(shards)  # and against numpy
    expected = np.argsort(-(queries @ everything.T), axis=1, kind="stable")[:, :50]
    assert np.array_equal(rows, expected)
    # auto: flat when the float32 vectors fit the memory budget, sharded when they do not
    assert isinstance(build_index(store, spec=retrieval.IndexSpec(kind="auto")), faiss_index_type())
    tiny_budget = retrieval.IndexSpec(kind="auto", memory_gb=len(store) * 16 * 4 / 2**30 / 2)
    assert isinstance(build_index(store, spec=tiny_budget), retrieval.ShardedIndex)


def faiss_index_type():
    import faiss

    return faiss.Index


def test_approximate_indexes_search_the_store(tmp_path):
    """IVF with every cell probed and HNSW with a wide beam find what the exact search finds."""
    from common.retrieval import IndexSpec, overlap_at_k

    generator = np.random.default_rng(1)
    centers = generator.standard_normal((20, 16))
    ads = (centers[generator.integers(0, 20, 4000)] + 0.3 * generator.standard_normal((4000, 16))).astype(np.float32)
    ads /= np.linalg.norm(ads, axis=1, keepdims=True)
    queries = ads[generator.integers(0, 4000, 50)] + 0.05 * generator.standard_normal((50, 16)).astype(np.float32)
    _, exact = search(build_index(ads), queries, 10)
    ivf = build_index(ads, spec=IndexSpec(kind="ivf", nlist=16, nprobe=16))
    assert type(ivf).__name__ == "IndexIVFFlat" and ivf.nlist == 16 and ivf.nprobe == 16
    assert overlap_at_k(search(ivf, queries, 10)[1], exact, 10) == 1.0  # all cells probed: exact
    narrow = build_index(ads, spec=IndexSpec(kind="ivf", nlist=16, nprobe=1))
    assert overlap_at_k(search(narrow, queries, 10)[1], exact, 10) < 1.0  # one cell: approximate
    hnsw = build_index(ads, spec=IndexSpec(kind="hnsw", hnsw_m=16, ef_search=256))
    assert type(hnsw).__name__ == "IndexHNSWFlat" and hnsw.hnsw.efSearch == 256
    assert overlap_at_k(search(hnsw, queries, 10)[1], exact, 10) >= 0.99


def test_overlap_and_bootstrap_interval_by_hand():
    from common.retrieval import bootstrap_ratio_interval, overlap_at_k

    assert overlap_at_k([["a", "b", "c"], ["x", "y", "z"]], [["c", "a", "q"], ["z", "w", "y"]], 2) == pytest.approx(
        (1 / 2 + 0 / 2) / 2
    )
    student = np.array([0.5, 0.7, 0.2, 0.9, 0.4, 0.6])
    teacher = np.array([0.6, 0.7, 0.4, 0.8, 0.5, 0.7])
    low, high = bootstrap_ratio_interval(student, teacher, samples=500, level=0.9, seed=3)
    rng = np.random.default_rng(3)  # the same paired resampling written out
    draws = rng.integers(0, 6, size=(500, 6))
    ratios = [student[d].mean() / teacher[d].mean() for d in draws]
    assert (low, high) == pytest.approx((np.percentile(ratios, 5), np.percentile(ratios, 95)))
    assert low < student.mean() / teacher.mean() < high
    same = bootstrap_ratio_interval(teacher, teacher, samples=200)
    assert same == pytest.approx((1.0, 1.0))  # a model against itself: no uncertainty


def test_the_evaluate_metric_module_loads_offline_past_the_shadowing_script(monkeypatch):
    """metrics/harness_retrieval through the installed `evaluate` package, although `import evaluate` here
    finds the repository's evaluate.py; its numbers are common/retrieval.py's."""
    import sys

    import evaluate as script  # the repository's evaluate.py
    from common.hf_metric import load_retrieval_metric
    from common.retrieval import overlap_at_k

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hasattr(script, "render_report")
    metric = load_retrieval_metric()
    assert sys.modules["evaluate"] is script  # `import evaluate` still means the script afterwards
    generator = np.random.default_rng(0)
    ads = [f"ad{i}" for i in range(30)]
    predictions = [list(generator.permutation(ads)[:10]) for _ in range(12)]
    teacher = [list(generator.permutation(ads)[:10]) for _ in range(12)]
    references = [list(generator.choice(ads, size=3, replace=False)) for _ in range(11)] + [[]]
    grades = [list(generator.integers(1, 4, size=3)) for _ in range(11)] + [[]]
    result = metric.compute(
        predictions=predictions, references=references, relevance=grades, teacher_predictions=teacher, k=[5, 10]
    )
    qrels = {str(i): dict(zip(refs, map(int, g))) for i, (refs, g) in enumerate(zip(references, grades))}
    expected = retrieval_metrics({str(i): p for i, p in enumerate(predictions)}, qrels, [5, 10])
    expected_teacher = retrieval_metrics({str(i): p for i, p in enumerate(teacher)}, qrels, [5, 10])
    assert result["num_queries_scored"] == 11
    for key, value in expected.items():
        assert result[key] == pytest.approx(value)
        assert result[f"recovery_{key}"] == pytest.approx(100 * value / expected_teacher[key])
        low, high = result[f"recovery_{key}_interval"]
        assert low <= result[f"recovery_{key}"] <= high
    assert result["overlap@5"] == pytest.approx(overlap_at_k(predictions, teacher, 5))
    assert metric.compute(predictions=[["a", "b"]], references=[["b"]], k=[2])["mrr@2"] == 0.5
