"""FAISS search over ad vectors (exact, sharded over a memory-mapped store, IVF, HNSW) and the retrieval
metrics (P@k, R@k, nDCG@k with graded gains, MRR@k), overlap@k between rankings, bootstrap intervals."""

import math
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from common.runtime import check_fits_in_memory

INDEX_TYPES = ("auto", "flat", "sharded", "ivf", "hnsw")


@dataclass
class IndexSpec:
    """How the ad vectors are searched.

    flat: exact inner product, the vectors copied into memory as float32 (on the GPUs when faiss has them);
    sharded: exact, over the memory-mapped store one chunk at a time, the top-k merged: memory stays at one
    chunk whatever the store's size; ivf: inverted lists (nlist cells, nprobe of them searched);
    hnsw: a graph (M links per vector, ef_search candidates); auto: flat when the float32 vectors fit in
    memory_gb, sharded otherwise. IVF and HNSW are approximate; evaluate.py reports their recall.
    """

    kind: str = "auto"
    use_gpu: bool = True
    memory_gb: float = 8.0
    nlist: int | None = None  # default: 4 sqrt(N), at most N / 39 (faiss wants >= 39 training rows per cell)
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    seed: int = 0

    def resolve(self, rows, dim):
        """The concrete kind for `rows` vectors of width `dim` (auto decides by memory)."""
        if self.kind not in INDEX_TYPES:
            raise UserError(f"Unknown index type '{self.kind}'; use one of {', '.join(INDEX_TYPES)}.")
        if self.kind != "auto":
            return self.kind
        return "flat" if rows * dim * 4 <= self.memory_gb * 2**30 else "sharded"

    def ivf_cells(self, rows):
        """The IVF cell count for `rows` vectors: --nlist, or 4 sqrt(rows) at most rows / 39."""
        return self.nlist or max(1, min(int(4 * math.sqrt(rows)), rows // 39 or 1))

    def check(self, rows, k, dim=None):
        """Refuse, before any work, parameters that cannot work for `rows` vectors (of width `dim`, if known)
        searched for the top `k` (instead of clamping them silently), and an in-memory index that the machine
        cannot hold."""
        if dim is not None and self.resolve(rows, dim) != "sharded":
            check_fits_in_memory(
                rows * dim * 4,
                f"A {self.resolve(rows, dim)} index of {rows} {dim}-d vectors",
                "use --index sharded (exact, one chunk of the store in memory) or lower --index_memory_gb",
            )
        if self.kind == "ivf" and self.nlist and self.nlist > max(rows // 39, 1):
            raise UserError(
                f"--nlist {self.nlist} needs at least {39 * self.nlist} ads to train its cells (faiss wants 39 per "
                f"cell) and there are {rows}; use --nlist {max(rows // 39, 1)} or less, or leave it out."
            )
        if self.kind == "ivf" and self.nlist and self.nprobe > self.nlist:
            raise UserError(f"--nprobe {self.nprobe} is more than the {self.nlist} cells of --nlist; lower it.")
        if self.kind == "hnsw" and self.ef_search < k:
            raise UserError(
                f"--ef_search {self.ef_search} is below k = {k}: HNSW returns at most ef_search candidates per "
                f"query; use --ef_search {k} or more."
            )

    def describe(self, rows, dim):
        """The kind with the parameters it searches with, for reports: e.g. 'ivf (nlist 92, nprobe 32)'."""
        kind = self.resolve(rows, dim)
        if kind == "ivf":
            cells = self.ivf_cells(rows)
            return f"ivf (nlist {cells}, nprobe {min(self.nprobe, cells)})"
        if kind == "hnsw":
            return f"hnsw (M {self.hnsw_m}, efConstruction {self.ef_construction}, efSearch {self.ef_search})"
        return kind


def _num_gpus():
    import faiss

    # faiss-cpu has no GPU API at all; faiss-gpu on a machine without GPUs reports zero of them.
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _chunks(ad_vectors, chunk_rows):
    if hasattr(ad_vectors, "iter_chunks"):
        yield from ad_vectors.iter_chunks(chunk_rows)
    else:
        ad_vectors = np.asarray(ad_vectors)
        for start in range(0, len(ad_vectors), chunk_rows):
            yield ad_vectors[start : start + chunk_rows]


def _finite(chunk):
    chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    if not np.isfinite(chunk).all():
        raise UserError("The ad vectors hold NaN or inf; rebuild the store.")
    return chunk


def build_index(ad_vectors, use_gpu=True, chunk_rows=65536, spec=None):
    """A searchable index of `ad_vectors` (a matrix or an EmbeddingStore), by `spec` (default: exact).

    Vectors are added chunk by chunk, so no float32 copy of a whole store is made besides the index
    itself; the sharded kind keeps no copy at all. Every kind has .search(queries, k) and .ntotal.
    """
    import faiss

    spec = spec or IndexSpec(kind="flat", use_gpu=use_gpu)
    rows = len(ad_vectors)
    dim = ad_vectors.dim if hasattr(ad_vectors, "dim") else np.asarray(ad_vectors).shape[1]
    kind = spec.resolve(rows, dim)
    if kind == "sharded":
        return ShardedIndex(ad_vectors, use_gpu=spec.use_gpu)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:  # ivf: cells trained on a sample of rows read from the store, not on the whole store
        nlist = spec.ivf_cells(rows)
        sample = np.sort(np.random.default_rng(spec.seed).choice(rows, min(rows, 256 * nlist), replace=False))
        training = ad_vectors.read(sample) if hasattr(ad_vectors, "read") else np.asarray(ad_vectors)[sample]
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(_finite(training))
        index.nprobe = min(spec.nprobe, nlist)
    if spec.use_gpu and kind != "hnsw" and _num_gpus() > 0:  # faiss has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(index)
    for chunk in _chunks(ad_vectors, chunk_rows):
        index.add(_finite(chunk))
        del chunk  # freed before the next block is read
    return index


class ShardedIndex:
    """Exact inner-product search over a (memory-mapped) store, one chunk of rows at a time: each chunk's
    top-k is merged into the running top-k, so memory is one chunk plus the results, for any store size.
    The results are a flat index's (ads of exactly equal scores may come in another order)."""

    def __init__(self, ad_vectors, use_gpu=True, chunk_bytes=256 * 2**20):
        self.ad_vectors = ad_vectors
        self.ntotal = len(ad_vectors)
        self.d = ad_vectors.dim if hasattr(ad_vectors, "dim") else np.asarray(ad_vectors).shape[1]
        self.chunk_rows = max(1024, chunk_bytes // (4 * self.d))
        self.query_batch_size = 65536  # every query batch is one pass over the store
        self.gpu_resources = None
        if use_gpu and _num_gpus() > 0:
            import faiss

            self.gpu_resources = faiss.StandardGpuResources()

    def search(self, query_vectors, k):
        import faiss

        query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
        best_scores = np.full((len(query_vectors), k), -np.inf, dtype=np.float32)
        best_rows = np.full((len(query_vectors), k), -1, dtype=np.int64)
        offset = 0
        for chunk in _chunks(self.ad_vectors, self.chunk_rows):
            chunk = _finite(chunk)
            chunk_k = min(k, len(chunk))
            if self.gpu_resources is not None:
                scores, rows = faiss.knn_gpu(
                    self.gpu_resources, query_vectors, chunk, chunk_k, metric=faiss.METRIC_INNER_PRODUCT
                )
            else:
                scores, rows = faiss.knn(query_vectors, chunk, chunk_k, metric=faiss.METRIC_INNER_PRODUCT)
            scores = np.concatenate([best_scores, scores], axis=1)
            rows = np.concatenate([best_rows, np.where(rows >= 0, rows + offset, -1)], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(scores, order, axis=1)
            best_rows = np.take_along_axis(rows, order, axis=1)
            offset += len(chunk)
            del chunk, scores, rows  # freed before the next block is read: one block in memory, not two
        return best_scores, best_rows


def search(index, query_vectors, k, batch_size=None):
    """Top-k (scores, row indices) for each query; k is capped at the number of ads."""
    k = min(k, index.ntotal)
    batch_size = batch_size or getattr(index, "query_batch_size", 4096)
    query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
    scores, rows = [], []
    for start in range(0, len(query_vectors), batch_size):
        batch_scores, batch_rows = index.search(query_vectors[start : start + batch_size], k)
        scores.append(batch_scores)
        rows.append(batch_rows)
    if not scores:
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
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
