"""Teacher-only context (--query_context_column): the teacher reads each query with its offline context in
phase 1, in the phase-2 targets (built by distill_student.py or ahead of time by encode.py) and in evaluation;
the student only ever reads the query."""

import json
import os

import numpy as np
import pytest
from conftest import make_tiny_bert

import distill_student
import encode
import evaluate
import train_teacher
from common.data import read_contexts, read_qrels, read_texts, with_context
from common.encoder import Encoder
from common.errors import UserError
from common.retrieval import retrieval_metrics
from common.store import EmbeddingStore
from train_teacher import PairCollator, read_pairs

TEMPLATE = "{query} [context: {context}]"


def test_the_teacher_reads_query_and_context_in_phase_1(small_data, tmp_path):
    """read_pairs and the collator: the queries the teacher is trained on are the template filled with each
    row's context (the query alone where a row has none); the false-negative keys stay the raw query's."""
    args = train_teacher.parse_args(["--train_file", small_data["train"], "--query_context_column", "context",
                                     "--context_template", TEMPLATE])  # fmt: skip
    rows = read_pairs(args)
    with open(small_data["train"]) as handle:
        raw = [json.loads(line) for line in handle]
    assert any(row["context"] is None for row in raw) and any(row["context"] for row in raw)
    for row, source in zip(rows, raw):
        expected = source["query"] if source["context"] is None else f"{source['query']} [context: {source['context']}]"
        assert row["teacher_query"] == expected and row["query"] == source["query"]
    encoder = Encoder.from_pretrained(make_tiny_bert(tmp_path / "model"))
    batch = PairCollator(encoder, 1, [r["positive"] for r in rows], seed=0)(rows[:4])
    expected_inputs = encoder.tokenize_mixed([r["teacher_query"] for r in rows[:4]], [r["positive"] for r in rows[:4]])
    assert batch["inputs"]["input_ids"][:4].tolist() == expected_inputs["input_ids"][:4].tolist()


def test_context_teacher_targets_student_and_evaluation(small_data, tmp_path):
    """Phase 1 trains with context; encode.py writes the teacher's vectors of query + context, which
    distill_student.py (same flags) finds current instead of building another store; the student reads raw
    queries; evaluate.py scores the teacher on query + context (checked by exact numpy search) and says so."""
    flags = ["--query_context_column", "context"]
    model = make_tiny_bert(tmp_path / "model")
    teacher = str(tmp_path / "teacher")
    train_teacher.main([*flags, "--model_name_or_path", model, "--train_file", small_data["train"],
                        "--per_device_train_batch_size", "8", "--max_train_steps", "2",
                        "--output_dir", teacher])  # fmt: skip
    stores = str(tmp_path / "stores")
    store_path = encode.main([*flags, "--model_name_or_path", teacher, "--input_file", small_data["queries"],
                              "--kind", "query", "--text_column", "query", "--store_dir", stores])  # fmt: skip
    _, queries = read_texts(small_data["queries"], "id", "query", ids_optional=True)
    contexts = read_contexts(small_data["queries"], "context")
    composed = [with_context(q, c) for q, c in zip(queries, contexts)]
    assert composed != queries
    encoder = Encoder.from_pretrained(teacher)
    store = EmbeddingStore.open(store_path)
    np.testing.assert_allclose(store.read(np.arange(len(store))), encoder.encode(composed, "query"), atol=1e-5)

    distill_student.main([*flags, "--teacher_model", teacher, "--query_file", small_data["queries"],
                          "--corpus_file", small_data["ads"], "--student_num_layers", "1", "--max_train_steps", "2",
                          "--per_device_train_batch_size", "8", "--store_dir", stores,
                          "--output_dir", str(tmp_path / "student")])  # fmt: skip
    query_stores = [name for name in os.listdir(stores) if "-query-" in name]
    assert query_stores == [os.path.basename(store_path)]  # the encode.py store was current: no second one
    with open(tmp_path / "student" / "training_args.json") as handle:
        assert json.load(handle)["query_context_column"] == "context"

    out = tmp_path / "eval"
    results = evaluate.main([*flags, "--teacher_model", teacher, "--students", f"student={tmp_path / 'student'}",
                             "--baselines", "--corpus_file", small_data["ads"], "--queries_file",
                             small_data["test_queries"], "--qrels_file", small_data["qrels"], "--store_dir", stores,
                             "--latency_queries", "0", "--flops_queries", "0", "--throughput_queries", "1",
                             "--plots", "false", "--output_dir", str(out)])  # fmt: skip
    ad_ids, ads = read_texts(small_data["ads"], "id", "text")
    test_ids, test_queries = read_texts(small_data["test_queries"], "id", "text")
    test_contexts = read_contexts(small_data["test_queries"], "context")
    scores = encoder.encode([with_context(q, c) for q, c in zip(test_queries, test_contexts)], "query")
    scores = scores @ encoder.encode(ads, "ad").T
    ranked = {qid: [ad_ids[r] for r in np.argsort(-row, kind="stable")[:100]] for qid, row in zip(test_ids, scores)}
    expected = retrieval_metrics(ranked, read_qrels(small_data["qrels"]), [10, 100])
    for key, value in expected.items():
        assert results["models"]["teacher"]["metrics"][key] == pytest.approx(value, abs=1e-6)
    assert "teacher-only context (column `context`)" in (out / "report.md").read_text()


def test_context_options_are_checked(small_data, tmp_path):
    model = make_tiny_bert(tmp_path / "model")
    teacher = ["--model_name_or_path", model, "--train_file", small_data["train"], "--max_train_steps", "1"]
    with pytest.raises(UserError, match="no column 'landing_page'"):
        train_teacher.main([*teacher, "--query_context_column", "landing_page", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main([*teacher, "--context_template", "{query} {page}", "--output_dir", str(tmp_path / "b")])
    assert exit_info.value.code == 2
    with pytest.raises(UserError, match="use one or the other"):
        distill_student.main(["--teacher_model", model, "--query_context_column", "context", "--token_loss_weight",
                              "1", "--output_dir", str(tmp_path / "c")])  # fmt: skip
    with pytest.raises(UserError, match="--kind query"):
        encode.main(["--model_name_or_path", model, "--input_file", small_data["ads"], "--query_context_column",
                     "context", "--store_dir", str(tmp_path / "stores")])  # fmt: skip
    for folder in ("a", "b", "c"):
        assert not os.path.exists(tmp_path / folder / "model.safetensors")
