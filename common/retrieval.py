"""FAISS search over an ad matrix and the retrieval metrics (P@k, R@k, nDCG@k with graded gains, MRR@k)."""

import math

import numpy as np

from common.errors import UserError


def build_index(ad_vectors, use_gpu=True, chunk_rows=65536):
    """Exact inner-product index (cosine on normalised vectors); on the GPUs when faiss has them.

    `ad_vectors` is a matrix or an EmbeddingStore; a store is added shard by shard in chunks, so no
    float32 copy of the whole store is made besides the index itself.
    """
    import faiss

    chunks = ad_vectors.iter_chunks(chunk_rows) if hasattr(ad_vectors, "iter_chunks") else [ad_vectors]
    dim = ad_vectors.dim if hasattr(ad_vectors, "dim") else np.asarray(ad_vectors).shape[1]
    index = faiss.IndexFlatIP(dim)
    # faiss-cpu has no GPU API at all; faiss-gpu on a machine without GPUs reports zero of them.
    if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if not np.isfinite(chunk).all():
            raise UserError("The ad vectors hold NaN or inf; rebuild the store.")
        index.add(chunk)
    return index


def search(index, query_vectors, k, batch_size=4096):
    """Top-k (scores, row indices) for each query; k is capped at the number of ads."""
    k = min(k, index.ntotal)
    query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
    scores, rows = [], []
    for start in range(0, len(query_vectors), batch_size):
        batch_scores, batch_rows = index.search(query_vectors[start : start + batch_size], k)
        scores.append(batch_scores)
        rows.append(batch_rows)
    return np.concatenate(scores), np.concatenate(rows)


def per_query_metrics(ranked_ids, qrels, ks):
    """{metric@k: {query_id: value}} over the queries that have at least one relevant document.

    ranked_ids: {query_id: [doc_id, ...] best first}; qrels: {query_id: {doc_id: grade}}, grade > 0
    is relevant. nDCG uses linear gains (the grade itself) and log2 discounts, as trec_eval does.
    """
    values = {f"{name}@{k}": {} for k in ks for name in ("precision", "recall", "ndcg", "mrr")}
    judged = [qid for qid, grades in qrels.items() if any(grade > 0 for grade in grades.values())]
    for qid in judged:
        grades = qrels[qid]
        ranked = ranked_ids.get(qid, [])
        relevant_count = sum(1 for grade in grades.values() if grade > 0)
        ideal = sorted((grade for grade in grades.values() if grade > 0), reverse=True)
        for k in ks:
            hits = [grades.get(doc_id, 0) for doc_id in ranked[:k]]
            relevant_hits = sum(1 for grade in hits if grade > 0)
            values[f"precision@{k}"][qid] = relevant_hits / k
            values[f"recall@{k}"][qid] = relevant_hits / relevant_count
            dcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(hits))
            idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal[:k]))
            values[f"ndcg@{k}"][qid] = dcg / idcg
            first = next((rank for rank, grade in enumerate(hits) if grade > 0), None)
            values[f"mrr@{k}"][qid] = 0.0 if first is None else 1.0 / (first + 1)
    return values


def retrieval_metrics(ranked_ids, qrels, ks):
    """Mean P@k, R@k, nDCG@k and MRR@k over the queries that have at least one relevant document."""
    per_query = per_query_metrics(ranked_ids, qrels, ks)
    return {name: sum(values.values()) / max(len(values), 1) for name, values in per_query.items()}


def overlap_at_k(rows_a, rows_b, k):
    """Mean |top-k(a) & top-k(b)| / k over queries: agreement of two rankings, no judgments needed."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows_a, rows_b)]))


def bootstrap_ratio_interval(numerator, denominator, samples=1000, level=0.95, seed=0):
    """Confidence interval of mean(numerator) / mean(denominator) over queries (paired percentile bootstrap).

    numerator and denominator are per-query values of the same queries (a student's and the teacher's
    metric); queries are resampled with replacement, both models together.
    """
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(numerator), size=(samples, len(numerator)))
    top, bottom = numerator[draws].mean(axis=1), denominator[draws].mean(axis=1)
    ratios = top[bottom > 0] / bottom[bottom > 0]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))
