"""HARNESS-LM's retrieval metrics as a Hugging Face `evaluate` metric module.

The same numbers as evaluate.py (one implementation: common/retrieval.py): P@k, R@k, nDCG@k (graded, linear
gains) and MRR@k averaged over the queries with a relevant ad; with the teacher's rankings, overlap@k with
the teacher (no judgments needed) and the recovery of each metric with a paired bootstrap interval.

Inside the repository `import evaluate` finds the script evaluate.py, so load it with
    from common.hf_metric import load_retrieval_metric
    metric = load_retrieval_metric()
(outside: evaluate.load("path/to/harness-lm/metrics/harness_retrieval") with the repository on PYTHONPATH).
"""

import datasets

import evaluate
from common.retrieval import bootstrap_ratio_interval, overlap_at_k, per_query_metrics

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: per query, the ad ids the model returned, best first.
    references: per query, the relevant ad ids (an empty list: no judgment; the query counts for overlap only).
    relevance: per query, the grade of each reference (integers > 0; default 1 each), for nDCG.
    teacher_predictions: per query, the teacher's ad ids, best first: adds overlap@k and the recovery of each
        metric (model / teacher, in %) with its bootstrap interval.
    k: the cut-offs (default [10, 100]).
    bootstrap_samples, confidence_level, seed: the recovery interval (default 1000, 0.95, 0).
Returns:
    {"precision@k", "recall@k", "ndcg@k", "mrr@k"} (when any query has a relevant reference), "overlap@k",
    "recovery_<metric>@k" and "recovery_<metric>@k_interval" (with teacher_predictions), "num_queries_scored".
Example:
    >>> metric.compute(predictions=[["a", "b"]], references=[["b"]], k=[1, 2])["mrr@2"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HarnessRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        relevance=None,
        teacher_predictions=None,
        k=(10, 100),
        bootstrap_samples=1000,
        confidence_level=0.95,
        seed=0,
    ):
        ks = sorted(set(int(value) for value in k))
        if relevance is None:
            relevance = [[1] * len(refs) for refs in references]
        if len(relevance) != len(references) or any(len(g) != len(r) for g, r in zip(relevance, references)):
            raise ValueError("relevance must give one grade per reference of every query")
        qrels = {
            str(i): dict(zip(refs, map(int, grades))) for i, (refs, grades) in enumerate(zip(references, relevance))
        }
        ranked = {str(i): list(ids) for i, ids in enumerate(predictions)}
        per_query = per_query_metrics(ranked, qrels, ks)
        scored = sorted(next(iter(per_query.values())))
        results = {"num_queries_scored": len(scored)}
        if scored:
            results.update({key: sum(values.values()) / len(values) for key, values in per_query.items()})
        if teacher_predictions is not None:
            if len(teacher_predictions) != len(predictions):
                raise ValueError("teacher_predictions must rank the same queries as predictions")
            teacher_lists = [list(ids) for ids in teacher_predictions]
            for cut in ks:
                results[f"overlap@{cut}"] = overlap_at_k(list(ranked.values()), teacher_lists, cut)
            teacher = per_query_metrics({str(i): ids for i, ids in enumerate(teacher_lists)}, qrels, ks)
            for key, values in per_query.items():
                model_values = [values[q] for q in scored]
                teacher_values = [teacher[key][q] for q in scored]
                if not scored or sum(teacher_values) <= 0:
                    continue
                results[f"recovery_{key}"] = 100 * sum(model_values) / sum(teacher_values)
                low, high = bootstrap_ratio_interval(
                    model_values, teacher_values, samples=bootstrap_samples, level=confidence_level, seed=seed
                )
                results[f"recovery_{key}_interval"] = [100 * low, 100 * high]
        return results
