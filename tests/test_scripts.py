"""Each script's main([...]) on tiny models and the small built-in data, chained as a user would."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

import distill_student
import evaluate
import refine_contrastive
import train_teacher
from common.data import read_texts
from common.demo_data import demo_base_model
from common.encoder import Encoder
from common.errors import UserError
from common.surgery import keep_layers

QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale"]
FAST = ["--per_device_train_batch_size", "8", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, small_data):
    """teacher (real all-MiniLM-L6-v2) -> aligned student (1 of its 6 layers) -> refined student."""
    root = tmp_path_factory.mktemp("chain")
    paths = {name: str(root / name) for name in ("teacher", "student-aligned", "student", "eval")}
    train_teacher.main(
        [
            "--model_name_or_path",
            demo_base_model(),
            "--train_file",
            small_data["train"],
            "--output_dir",
            paths["teacher"],
            "--max_train_steps",
            "4",
            "--learning_rate",
            "1e-4",
            *FAST,
        ]
    )
    distill_student.main(
        [
            "--teacher_model",
            paths["teacher"],
            "--query_file",
            small_data["queries"],
            "--student_num_layers",
            "1",
            "--output_dir",
            paths["student-aligned"],
            "--num_train_epochs",
            "3",
            "--learning_rate",
            "5e-4",
            *FAST,
        ]
    )
    refine_contrastive.main(
        [
            "--student_model",
            paths["student-aligned"],
            "--teacher_model",
            paths["teacher"],
            "--train_file",
            small_data["train"],
            "--corpus_file",
            small_data["ads"],
            "--output_dir",
            paths["student"],
            "--max_train_steps",
            "3",
            "--num_random_negatives",
            "16",
            *FAST,
        ]
    )
    return paths


def test_teacher_is_trained_and_complete(chain):
    teacher = Encoder.from_pretrained(chain["teacher"])
    before = Encoder.from_pretrained(demo_base_model()).encode(QUERIES, "query")
    after = teacher.encode(QUERIES, "query")
    assert np.isfinite(after).all() and not np.allclose(before, after)
    with open(os.path.join(chain["teacher"], "training_args.json")) as handle:
        recorded = json.load(handle)
    assert recorded["script"] == "train_teacher.py" and recorded["max_train_steps"] == 4
    assert json.loads(Path(os.path.join(chain["teacher"], "all_results.json")).read_text())["steps"] == 4
    st = SentenceTransformer(chain["teacher"], device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), after, atol=1e-5)


def test_alignment_moves_the_student_onto_the_teacher(chain, small_data):
    teacher = Encoder.from_pretrained(chain["teacher"])
    student = Encoder.from_pretrained(chain["student-aligned"])
    assert student.backbone.config.num_hidden_layers == 1
    assert student.config.extra["teacher_layers"] == [5]
    _, queries = read_texts(small_data["test_queries"], "id", "text")
    target = teacher.encode(queries, "query")
    untrained = Encoder.from_pretrained(chain["teacher"])
    keep_layers(untrained, [5])
    l2_before = ((untrained.encode(queries, "query") - target) ** 2).sum(1).mean()
    l2_after = ((student.encode(queries, "query") - target) ** 2).sum(1).mean()
    assert l2_after < 0.5 * l2_before  # held-out queries: the student learned the teacher's coordinates


def test_refined_student_and_evaluation(chain, small_data, tiny_bert):
    refined = Encoder.from_pretrained(chain["student"])
    aligned = Encoder.from_pretrained(chain["student-aligned"])
    assert not np.allclose(refined.encode(QUERIES, "query"), aligned.encode(QUERIES, "query"))
    results = evaluate.main(
        [
            "--teacher_model",
            chain["teacher"],
            "--students",
            f"aligned={chain['student-aligned']}",
            f"refined={chain['student']}",
            "--baselines",
            f"untuned={tiny_bert}",
            "--corpus_file",
            small_data["ads"],
            "--queries_file",
            small_data["test_queries"],
            "--qrels_file",
            small_data["qrels"],
            "--output_dir",
            chain["eval"],
            "--k",
            "5",
            "20",
            "--latency_queries",
            "5",
            "--throughput_queries",
            "16",
        ]
    )
    assert set(results["models"]) == {"untuned", "teacher", "aligned", "refined"}
    # Every number against a computation that shares nothing with evaluate.py but the metric functions:
    # exact search by numpy over freshly encoded vectors, ids mapped by hand.
    teacher_model = Encoder.from_pretrained(chain["teacher"])
    ad_ids, ad_texts = read_texts(small_data["ads"], "id", "text")
    teacher_ads = teacher_model.encode(ad_texts, "ad")
    expected = {}
    for name, path in [("teacher", chain["teacher"]), ("aligned", chain["student-aligned"]),
                       ("refined", chain["student"])]:  # fmt: skip
        expected[name] = brute_force_metrics(Encoder.from_pretrained(path), teacher_ads, ad_ids, small_data, [5, 20])
        for key, value in expected[name].items():
            assert results["models"][name]["metrics"][key] == pytest.approx(value, abs=1e-9), (name, key)
    for key in ("ndcg@5", "recall@20"):
        assert results["models"]["aligned"]["recovery"][key] == pytest.approx(
            100 * expected["aligned"][key] / expected["teacher"][key]
        )
    untuned = Encoder.from_pretrained(tiny_bert)  # a baseline searches its own ad vectors
    assert results["models"]["untuned"]["metrics"] == pytest.approx(
        brute_force_metrics(untuned, untuned.encode(ad_texts, "ad"), ad_ids, small_data, [5, 20])
    )
    # The 1-layer student has the teacher's parameters less exactly 5 of its 6 identical blocks.
    block = sum(p.numel() for p in teacher_model.backbone.encoder.layer[0].parameters())
    assert results["models"]["aligned"]["parameters"] == results["models"]["teacher"]["parameters"] - 5 * block
    assert all(results["models"][name]["speed"]["latency_p50_ms"] > 0 for name in results["models"])
    report = Path(os.path.join(chain["eval"], "report.md")).read_text()
    assert "| refined | student (teacher ads) |" in report
    assert json.loads(Path(os.path.join(chain["eval"], "results.json")).read_text())["num_queries"] == 16
    # Recovery with its bootstrap interval, overlap with the teacher's top-k, tail latency, FLOPs, plots.
    aligned = results["models"]["aligned"]
    for key in ("ndcg@5", "recall@20"):
        low, high = aligned["recovery_interval"][key]
        assert low <= aligned["recovery"][key] <= high
    teacher_top = {qid: rows for qid, rows in brute_force_ranked(teacher_model, teacher_ads, ad_ids, small_data, 20)}
    aligned_top = dict(brute_force_ranked(Encoder.from_pretrained(chain["student-aligned"]), teacher_ads, ad_ids,
                                          small_data, 20))  # fmt: skip
    for k in (5, 20):
        expected_overlap = np.mean([len(set(aligned_top[q][:k]) & set(teacher_top[q][:k])) / k for q in teacher_top])
        assert aligned["overlap"][f"overlap@{k}"] == pytest.approx(expected_overlap)
    for entry in results["models"].values():
        speed = entry["speed"]
        assert 0 < speed["latency_p50_ms"] <= speed["latency_p95_ms"] <= speed["latency_p99_ms"]
    # 1 of 6 identical blocks: the student's forward FLOPs are those of the embeddings-free block, once
    flops_ratio = aligned["flops_per_query"] / results["models"]["teacher"]["flops_per_query"]
    assert 1 / 6 - 0.01 < flops_ratio < 1 / 6 + 0.01
    for plot in ("recall_at_k.png", "quality_vs_latency.png"):
        assert Path(chain["eval"], plot).read_bytes()[:4] == b"\x89PNG" and f"({plot})" in report


def test_contrastive_only_baseline_is_a_cut_of_the_teacher_refined_without_alignment(chain, small_data, tmp_path):
    """The paper's baseline: phase 3 straight from layers cut from the teacher, no phase 2."""
    out = str(tmp_path / "contrastive-only")
    refine_contrastive.main(["--student_model", chain["teacher"], "--student_num_layers", "1", "--teacher_model",
                             chain["teacher"], "--train_file", small_data["train"], "--corpus_file", small_data["ads"],
                             "--output_dir", out, "--max_train_steps", "2", "--num_random_negatives", "8",
                             *FAST])  # fmt: skip
    baseline = Encoder.from_pretrained(out)
    assert baseline.backbone.config.num_hidden_layers == 1 and baseline.config.extra["teacher_layers"] == [5]
    cut = Encoder.from_pretrained(chain["teacher"])
    keep_layers(cut, [5])  # trained away from the plain cut, and it is not the aligned student
    for other in (cut, Encoder.from_pretrained(chain["student-aligned"])):
        assert not np.allclose(baseline.encode(QUERIES, "query"), other.encode(QUERIES, "query"), atol=1e-4)


def test_model_cards_carry_the_recipe_and_the_evaluation(chain, small_data, tmp_path):
    """Training writes the recipe and results into the card; evaluate.py --write_model_cards adds the evaluation
    (metrics, recovery with its interval, latency, plots copied beside the card) to students of ours only."""
    card = Path(chain["student-aligned"], "README.md").read_text()
    assert "## Recipe" in card and "| teacher layers kept | `[5]` |" in card and "--learning_rate" in card
    assert "## Training results" in card and "train_runtime" in card
    student = shutil.copytree(chain["student"], tmp_path / "student")
    plain = shutil.copytree(chain["student"], tmp_path / "plain", ignore=shutil.ignore_patterns("training_args.json"))
    plain_card = (plain / "README.md").read_text()
    results = evaluate.main(["--teacher_model", chain["teacher"], "--students", f"refined={student}", f"plain={plain}",
                             "--baselines", "--corpus_file", small_data["ads"], "--queries_file",
                             small_data["test_queries"], "--qrels_file", small_data["qrels"], "--output_dir",
                             str(tmp_path / "eval"), "--k", "5", "20", "--latency_queries", "3",
                             "--throughput_queries", "8", "--write_model_cards"])  # fmt: skip
    card = (student / "README.md").read_text()
    low, high = results["models"]["refined"]["recovery_interval"]["ndcg@5"]
    assert f"[{low:.1f}, {high:.1f}] (95% CI)" in card and "| latency_p95_ms |" in card
    assert "![recall_at_k](recall_at_k.png)" in card and (student / "recall_at_k.png").exists()
    assert "## Recipe" in card  # the training part is kept
    assert (plain / "README.md").read_text() == plain_card  # not a run of ours: left as it is


def test_evaluation_without_judgments_reports_overlap_over_a_sharded_index(chain, small_data, tmp_path, monkeypatch):
    """Logged queries have no judgments: overlap with the teacher only, and the sharded exact search over the
    memory-mapped store gives the flat index's overlap. The second run finds the teacher's store built by the
    first and never reads the ads' texts (only their ids and fingerprint, streamed)."""
    common_args = ["--teacher_model", chain["teacher"], "--students", f"aligned={chain['student-aligned']}",
                   "--baselines", "--corpus_file", small_data["ads"], "--queries_file", small_data["test_queries"],
                   "--k", "5", "20", "--latency_queries", "3", "--throughput_queries", "8",
                   "--flops_queries", "0"]  # fmt: skip
    flat = evaluate.main([*common_args, "--index", "flat", "--output_dir", str(tmp_path / "flat")])
    real_read_texts = evaluate.read_texts

    def read_texts_but_not_the_ads(source, *args, **kwargs):
        assert source != small_data["ads"], "the ads' texts were read although their store exists"
        return real_read_texts(source, *args, **kwargs)

    monkeypatch.setattr(evaluate, "read_texts", read_texts_but_not_the_ads)
    sharded = evaluate.main([*common_args, "--index", "sharded", "--output_dir", str(tmp_path / "sharded")])
    assert sharded["index"] == "sharded" and not sharded["judged"] and sharded["models"]["aligned"]["metrics"] == {}
    assert sharded["models"]["aligned"]["overlap"] == flat["models"]["aligned"]["overlap"]
    assert 0 < flat["models"]["aligned"]["overlap"]["overlap@20"] <= 1
    report = (tmp_path / "sharded" / "report.md").read_text()
    assert "no judgments: overlap with the teacher only" in report and "recovery" not in report
    assert (tmp_path / "sharded" / "overlap_at_k.png").exists()


def brute_force_ranked(encoder, ad_vectors, ad_ids, data, k):
    """(query id, top-k ad ids) of `encoder`'s query vectors against `ad_vectors` by exact numpy search."""
    query_ids, query_texts = read_texts(data["test_queries"], "id", "text")
    scores = encoder.encode(query_texts, "query") @ ad_vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [(qid, [ad_ids[row] for row in rows]) for qid, rows in zip(query_ids, top)]


def brute_force_metrics(encoder, ad_vectors, ad_ids, data, ks):
    """Retrieval metrics of `encoder`'s query vectors against `ad_vectors` by exact numpy search."""
    from common.data import read_qrels
    from common.retrieval import retrieval_metrics

    ranked = dict(brute_force_ranked(encoder, ad_vectors, ad_ids, data, max(ks)))
    return retrieval_metrics(ranked, read_qrels(data["qrels"]), ks)


def test_projection_head_student_from_another_model(chain, small_data, tiny_bert_narrow, tmp_path):
    """A 16-d student of a 384-d teacher gets a head that is saved in the model folder."""
    distill_student.main(
        [
            "--teacher_model",
            chain["teacher"],
            "--student_model",
            tiny_bert_narrow,
            "--query_file",
            small_data["queries"],
            "--output_dir",
            str(tmp_path / "s"),
            "--max_train_steps",
            "2",
            *FAST,
        ]
    )
    student = Encoder.from_pretrained(str(tmp_path / "s"))
    assert student.embedding_dim == 384 and student.hidden_size == 16
    assert os.path.exists(tmp_path / "s" / "2_Dense" / "model.safetensors")
    st = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), student.encode(QUERIES, "query"), atol=1e-5)
    # The teacher's query store was computed once and is reused by the second distillation.
    stores = os.listdir(os.path.join(os.path.dirname(chain["student-aligned"]), "stores"))
    assert sum(name.startswith("teacher-query-") for name in stores) == 1


def test_decoder_teacher_in_qwen3_embedding_convention(small_data, tiny_qwen, tmp_path):
    train_teacher.main(
        [
            "--model_name_or_path",
            tiny_qwen,
            "--train_file",
            small_data["train"],
            "--output_dir",
            str(tmp_path / "t"),
            "--max_train_steps",
            "2",
            "--num_hard_negatives",
            "2",
            *FAST,
        ]
    )
    teacher = Encoder.from_pretrained(str(tmp_path / "t"))
    assert (teacher.config.pooling, teacher.config.padding_side) == ("last", "left")
    assert teacher.config.query_prompt.startswith("Instruct:")
    assert teacher.tokenizer.padding_side == "left"
    st = SentenceTransformer(str(tmp_path / "t"), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), teacher.encode(QUERIES, "query"), atol=1e-5)


def test_yaml_config_and_command_line_override(small_data, tiny_bert, tmp_path):
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({"max_train_steps": 1, "temperature": 0.07, "learning_rate": 1e-4}))
    args = train_teacher.parse_args(["--config", str(config), "--learning_rate", "2e-4"])
    assert (args.max_train_steps, args.temperature, args.learning_rate) == (1, 0.07, 2e-4)
    config.write_text(yaml.safe_dump({"max_train_step": 1}))
    with pytest.raises(UserError, match="unknown flags max_train_step"):
        train_teacher.parse_args(["--config", str(config)])


def test_resume_from_latest_checkpoint_matches_uninterrupted(small_data, tiny_bert, tmp_path):
    common = [
        "--model_name_or_path",
        tiny_bert,
        "--train_file",
        small_data["train"],
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant_with_warmup",
        "--num_warmup_steps",
        "0",
        "--checkpointing_steps",
        "2",
        "--num_train_epochs",
        "2",
        *FAST,
    ]  # 12 batches per epoch: the resume lands mid-epoch
    train_teacher.main([*common, "--output_dir", str(tmp_path / "straight"), "--max_train_steps", "8"])
    train_teacher.main([*common, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "6"])
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step_4", "step_6"]  # rotation keeps 2
    (tmp_path / "resumed" / "checkpoints" / "step_8.partial").mkdir()  # a crash mid-save is never "latest"
    (tmp_path / "resumed" / "checkpoints" / "step_2").mkdir()  # a kill in the middle of deleting step_2
    (tmp_path / "resumed" / "checkpoints" / "step_2" / "optimizer.bin").write_bytes(b"")
    train_teacher.main(
        [
            *common,
            "--output_dir",
            str(tmp_path / "resumed"),
            "--max_train_steps",
            "8",
            "--resume_from_checkpoint",
            "latest",
            "--overwrite_output_dir",
        ]
    )
    straight = Encoder.from_pretrained(str(tmp_path / "straight")).encode(QUERIES, "query")
    resumed = Encoder.from_pretrained(str(tmp_path / "resumed")).encode(QUERIES, "query")
    np.testing.assert_allclose(resumed, straight, atol=1e-5)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["step_6", "step_8"]  # leftovers cleared
    # The logs of every step, once each, as the uninterrupted run has them; a checkpoint records only their count.
    straight_log, resumed_log = (
        json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        for run in ("straight", "resumed")
    )
    assert [entry["step"] for entry in resumed_log] == list(range(1, 9))
    np.testing.assert_allclose([e["loss"] for e in resumed_log], [e["loss"] for e in straight_log], atol=1e-5)
    checkpoint_state = json.loads((checkpoints / "step_8" / "trainer_state.json").read_text())
    assert checkpoint_state["log_history_entries"] == 8 and "log_history" not in checkpoint_state


def test_user_errors_name_the_cause(small_data, tiny_bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "rent a boat", "ad": "Boats for rent"}\n')
    with pytest.raises(UserError, match="no column 'positive'"):
        train_teacher.main(
            ["--model_name_or_path", tiny_bert, "--train_file", str(bad), "--output_dir", str(tmp_path / "o")]
        )
    bad.write_text('{"query": "rent a boat", "positive": "Boats"}\n{"query": "  ", "positive": "Boats"}\n')
    with pytest.raises(UserError, match="row 1, column 'query': empty text"):
        train_teacher.main(
            ["--model_name_or_path", tiny_bert, "--train_file", str(bad), "--output_dir", str(tmp_path / "o")]
        )
    with pytest.raises(UserError, match="not a model folder"):
        train_teacher.main(
            [
                "--model_name_or_path",
                str(tmp_path / "missing"),
                "--train_file",
                small_data["train"],
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_push_to_hub_without_network_fails_cleanly_and_keeps_the_model(chain, monkeypatch):
    from common.hub import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="the model is saved locally"):
        push_to_hub(chain["student"], "someone/student", token="hf_secret_token_value")
    assert os.path.exists(os.path.join(chain["student"], "model.safetensors"))
    card = Path(os.path.join(chain["student"], "README.md")).read_text()
    assert "sentence-transformers" in card and "hf_secret" not in card
    assert "hub_token" not in Path(os.path.join(chain["student"], "training_args.json")).read_text()


def test_general_text_is_mixed_into_alignment_and_bf16_evaluation(chain, small_data, tmp_path):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"query": f"the history of the {w} in europe"}) + "\n"
                               for w in ("printing press", "railway", "telescope", "bicycle")))  # fmt: skip
    results = distill_student.main([
        "--teacher_model", chain["teacher"], "--query_file", small_data["queries"], "--general_text_file",
        str(general), "--student_num_layers", "1", "--output_dir", str(tmp_path / "s"), "--max_train_steps", "1",
        *FAST,
    ])  # fmt: skip
    from common.store import EmbeddingStore

    store = EmbeddingStore.open(results["teacher_query_store"])
    assert len(store) == 96  # the general text has a store of its own
    general_stores = [name for name in os.listdir(os.path.dirname(results["teacher_query_store"])) if "-query-" in name]
    assert len(general_stores) == 2
    bf16 = evaluate.main([
        "--teacher_model", chain["teacher"], "--students", f"s={tmp_path / 's'}", "--baselines", "--dtype",
        "bfloat16", "--corpus_file", small_data["ads"], "--queries_file", small_data["test_queries"],
        "--qrels_file", small_data["qrels"], "--output_dir", str(tmp_path / "eval"), "--latency_queries", "2",
        "--store_dir", str(tmp_path / "stores"),
    ])  # fmt: skip
    ad_ids, ad_texts = read_texts(small_data["ads"], "id", "text")
    teacher = Encoder.from_pretrained(chain["teacher"])
    fp32 = brute_force_metrics(teacher, teacher.encode(ad_texts, "ad"), ad_ids, small_data, [10, 100])
    for key in ("ndcg@10", "recall@100"):  # bf16 rounding moves a few ranks, not the quality
        assert bf16["models"]["teacher"]["metrics"][key] == pytest.approx(fp32[key], abs=0.05)


def test_bf16_checkpoints_train_with_fp32_master_weights(small_data, tiny_qwen, tmp_path):
    """A Qwen3 saved in bf16 trains in fp32: at lr 1e-5 a pure-bf16 run would round most updates away."""
    from safetensors.torch import load_file

    bf16 = str(tmp_path / "bf16")
    Encoder.from_pretrained(tiny_qwen, dtype="bfloat16").save_pretrained(bf16)
    initial = load_file(os.path.join(bf16, "model.safetensors"))
    assert {tensor.dtype for tensor in initial.values()} == {torch.bfloat16}
    train_teacher.main(["--model_name_or_path", bf16, "--train_file", small_data["train"], "--output_dir",
                        str(tmp_path / "t"), "--max_train_steps", "3", "--learning_rate", "1e-5",
                        "--num_warmup_steps", "0", "--mixed_precision", "bf16", *FAST])  # fmt: skip
    trained = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert {tensor.dtype for tensor in trained.values()} == {torch.float32}
    changed = sum(int((trained[k] != initial[k].float()).sum()) for k in initial if "norm" not in k)
    total = sum(initial[k].numel() for k in initial if "norm" not in k)
    assert changed > 0.9 * total, f"only {changed} of {total} weights moved"
    # A student cut from the bf16 teacher is trained in fp32 as well.
    distill_student.main(["--teacher_model", bf16, "--query_file", small_data["queries"], "--student_num_layers",
                          "1", "--output_dir", str(tmp_path / "s"), "--max_train_steps", "1", *FAST])  # fmt: skip
    student = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert {tensor.dtype for tensor in student.values()} == {torch.float32}


def test_query_store_from_encode_py_is_used_by_distillation(small_data, tiny_bert, tmp_path):
    import encode

    store = str(tmp_path / "teacher-queries")
    encode.main(["--model_name_or_path", tiny_bert, "--input_file", small_data["queries"], "--kind", "query",
                 "--text_column", "query", "--output_dir", store])  # fmt: skip
    written = os.path.getmtime(os.path.join(store, "metadata.json"))
    results = distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"],
                                    "--teacher_query_store", store, "--student_num_layers", "1", "--output_dir",
                                    str(tmp_path / "s"), "--max_train_steps", "1", *FAST])  # fmt: skip
    assert results["teacher_query_store"] == store
    assert os.path.getmtime(os.path.join(store, "metadata.json")) == written  # used as it is, not rebuilt


def test_refinement_groups_and_duplicate_ads(tmp_path):
    """A click without a group masks only its own ad's text; an ad text under another id is the positive."""
    from common.store import write_store

    texts = ["Boats for rent", "Used laptops", "Boats for rent", "Fix my phone"]  # a3 duplicates a1's text
    store = write_store(str(tmp_path / "ads"), np.eye(4, dtype=np.float32), ["a1", "a2", "a3", "a4"], texts,
                        metadata={"kind": "ad", "model_fingerprint": "m"}, chunk_rows=3)  # fmt: skip
    clicks_file = tmp_path / "clicks.jsonl"
    rows = [{"query": "rent a boat", "positive_id": "a1", "group": None},
            {"query": "cheap laptop", "positive_id": "a2", "group": None},
            {"query": "boat hire", "positive_id": "a3", "group": "boats"},
            {"query": "phone repair", "positive_id": "a4", "group": "boats"}]  # fmt: skip
    clicks_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = refine_contrastive.parse_args(["--train_file", str(clicks_file)])
    clicks = refine_contrastive.read_clicks(args, store)
    groups = [click["group"] for click in clicks]
    assert groups[0] != groups[1]  # two clicks without a group are not one group
    assert groups[2] == groups[3] and groups[2] != groups[0]
    keys = refine_contrastive.ad_keys(store, np.arange(4)).tolist()
    assert keys[0] == keys[2] and len(set(keys)) == 3  # the duplicate text shares the positive's key


def test_a_final_save_cut_short_is_refused_and_finished_by_resuming(small_data, tiny_bert, tmp_path, monkeypatch):
    import common.loop

    output = tmp_path / "teacher"
    args = ["--model_name_or_path", tiny_bert, "--train_file", small_data["train"], "--output_dir", str(output),
            "--max_train_steps", "4", "--checkpointing_steps", "2", *FAST]  # fmt: skip

    def crash(staging, folder, last):
        raise KeyboardInterrupt  # the process dies between writing the model and moving it into place

    monkeypatch.setattr(common.loop, "move_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        train_teacher.main(args)
    monkeypatch.undo()
    with pytest.raises(UserError, match="was being saved when its run stopped"):
        Encoder.from_pretrained(str(output))
    train_teacher.main([*args, "--resume_from_checkpoint", "latest"])
    finished = Encoder.from_pretrained(str(output))
    assert not (output / ".final.partial").exists() and (output / "training_args.json").exists()
    assert np.isfinite(finished.encode(QUERIES, "query")).all()


def test_distillation_with_a_weighted_sum_of_objectives(small_data, tiny_bert, tmp_path):
    output = tmp_path / "s"
    results = distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"],
                                    "--student_num_layers", "1", "--alignment_loss", "l2+0.5*kl+kernel+0.1*cosine",
                                    "--output_dir", str(output), "--max_train_steps", "2", *FAST])  # fmt: skip
    assert np.isfinite(results["train_alignment_loss"]) and results["train_alignment_loss"] > 0
    recorded = json.loads((output / "training_args.json").read_text())["alignment_loss"]
    assert recorded == [[1.0, "l2"], [0.5, "kl"], [1.0, "kernel"], [0.1, "cosine"]]


def test_gradient_caching_gives_the_plain_batchs_weights_on_one_process(small_data, tmp_path):
    """train_teacher.py --grad_cache_chunk_size: 8 queries, 8 positives and 8 negatives embedded 5 rows at a time
    end with the plain run's weights (dropout off; 2 processes and ZeRO-3: tests/test_distributed.py)."""
    from conftest import make_tiny_bert
    from safetensors.torch import load_file

    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    common = ["--model_name_or_path", model, "--train_file", small_data["train"], "--per_device_train_batch_size", "8",
              "--max_train_steps", "3", "--learning_rate", "1e-3", "--num_hard_negatives", "1"]  # fmt: skip
    plain = train_teacher.main([*common, "--output_dir", str(tmp_path / "plain")])
    cached = train_teacher.main([*common, "--grad_cache_chunk_size", "5", "--output_dir", str(tmp_path / "cached")])
    assert cached["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    left, right = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("plain", "cached"))
    assert max(float((left[key] - right[key]).abs().max()) for key in left) < 2e-5
