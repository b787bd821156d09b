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
