"""Student options: length-grouped batches, frozen embeddings, Matryoshka students end to end, pseudo-clicks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import distill_student
import encode
import evaluate
import refine_contrastive
from common.alignment import token_state_loss
from common.data import LengthGroupedSampler, read_qrels, text_key
from common.encoder import Encoder
from common.errors import UserError
from common.retrieval import retrieval_metrics
from common.store import EmbeddingStore
from common.surgery import keep_layers, truncate_output
from tests.test_store import write_sharded_store

FAST = ["--per_device_train_batch_size", "8", "--logging_steps", "1"]


def test_length_grouped_batches_cover_every_row_once_and_cut_padding():
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    sampler = LengthGroupedSampler(lengths, 16, seed=3, group_batches=8)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(1000))  # a permutation
        assert order == list(sampler)  # a function of seed and epoch only
        epochs.append(order)
    assert epochs[0] != epochs[1]
    batches = [np.array(epochs[0][i : i + 16]) for i in range(0, 1000, 16)]
    assert len(batches[-1]) == 1000 % 16  # the partial batch is last (dropped with drop_last)
    padded = sum(len(b) * lengths[b].max() for b in batches[:-1])
    shuffled = np.random.default_rng(1).permutation(1000)
    random_padded = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, 992, 16))
    tokens = lengths[np.concatenate(batches[:-1])].sum()  # what a batch without padding would compute
    assert padded < 1.2 * tokens and random_padded > 1.6 * tokens, (padded, random_padded, tokens)


def test_truncated_store_reads_the_first_coordinates_renormalised(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    store = write_sharded_store(str(tmp_path / "store"), list(vectors), dtype="float32")
    store.metadata["normalized"] = True
    view = store.truncated(3)
    everything = vectors.reshape(14, 8)
    expected = everything[:, :3] / np.linalg.norm(everything[:, :3], axis=1, keepdims=True)
    assert view.dim == 3 and store.dim == 8  # the view does not change the store
    np.testing.assert_allclose(view.read([13, 0, 5]), expected[[13, 0, 5]], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(list(view.iter_chunks(4))), expected, rtol=1e-6)
    np.testing.assert_allclose(store.read([13]), everything[[13]])
    stacked = EmbeddingStore.stack([view, view])
    assert stacked.dim == 3 and stacked.read([14]).shape == (1, 3)


def test_truncated_output_is_the_matryoshka_cut_of_the_full_output(tiny_bert):
    encoder = Encoder.from_pretrained(tiny_bert).eval()
    batch = encoder.tokenize(["rent a boat", "cheap used tractor for sale"], "query")
    encoder.config.normalize = False
    with torch.no_grad():
        full = encoder(**batch)
        encoder.config.normalize = True
        truncate_output(encoder, 12)
        cut = encoder(**batch)
    assert encoder.embedding_dim == 12
    torch.testing.assert_close(cut, F.normalize(full[:, :12], dim=-1))


def test_matryoshka_student_aligns_refines_and_is_scored_against_the_truncated_index(small_data, tiny_bert, tmp_path):
    aligned, refined = tmp_path / "aligned", tmp_path / "refined"
    stores = str(tmp_path / "stores")
    distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"], "--student_num_layers",
                          "1", "--teacher_dim", "16", "--output_dir", str(aligned), "--max_train_steps", "3",
                          "--store_dir", stores, *FAST])  # fmt: skip
    student = Encoder.from_pretrained(str(aligned))
    assert student.embedding_dim == 16 and student.config.extra["teacher_dim"] == 16
    refine_contrastive.main(["--student_model", str(aligned), "--teacher_model", tiny_bert, "--train_file",
                             small_data["train"], "--corpus_file", small_data["ads"], "--output_dir", str(refined),
                             "--max_train_steps", "2", "--num_random_negatives", "8", "--store_dir", stores,
                             *FAST])  # fmt: skip
    assert Encoder.from_pretrained(str(refined)).config.extra["teacher_dim"] == 16
    results = evaluate.main(["--teacher_model", tiny_bert, "--students", f"m16={refined}", "--corpus_file",
                             small_data["ads"], "--queries_file", small_data["test_queries"], "--qrels_file",
                             small_data["qrels"], "--output_dir", str(tmp_path / "eval"), "--store_dir", stores,
                             "--latency_queries", "2", "--throughput_queries", "4"])  # fmt: skip
    # The same metrics by hand: the teacher's ad vectors cut to 16 coordinates and re-normalised, exact search.
    teacher = Encoder.from_pretrained(tiny_bert)
    ads = [json.loads(line) for line in Path(small_data["ads"]).read_text().splitlines()]
    ad_vectors = teacher.encode([ad["text"] for ad in ads], "ad")[:, :16]
    ad_vectors /= np.linalg.norm(ad_vectors, axis=1, keepdims=True)
    queries = [json.loads(line) for line in Path(small_data["test_queries"]).read_text().splitlines()]
    query_vectors = Encoder.from_pretrained(str(refined)).encode([q["text"] for q in queries], "query")
    top = np.argsort(-(query_vectors @ ad_vectors.T), axis=1, kind="stable")[:, :100]
    ranked = {str(q["id"]): [str(ads[r]["id"]) for r in row] for q, row in zip(queries, top)}
    expected = retrieval_metrics(ranked, read_qrels(small_data["qrels"]), [10, 100])
    for key, value in expected.items():
        assert results["models"]["m16"]["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_frozen_embeddings_stay_the_teachers_and_speed_is_reported(small_data, tiny_bert, tmp_path):
    output = tmp_path / "s"
    results = distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"],
                                    "--student_num_layers", "1", "--freeze_embeddings", "--learning_rate", "1e-2",
                                    "--output_dir", str(output), "--max_train_steps", "3", *FAST])  # fmt: skip
    teacher, student = load_file(f"{tiny_bert}/model.safetensors"), load_file(f"{output}/model.safetensors")
    embeddings = [name for name in student if name.startswith("embeddings.")]
    assert len(embeddings) >= 3  # word, position and token-type embeddings, and their norm
    for name in embeddings:
        torch.testing.assert_close(student[name], teacher[name], rtol=0, atol=0)
    layer = "encoder.layer.0.attention.self.query.weight"
    assert (student[layer] - teacher[layer]).abs().max() > 1e-3  # the blocks trained
    assert results["train_runtime"] > 0 and results["train_samples_per_second"] > 0
    assert results["train_steps_per_second"] * results["train_runtime"] == pytest.approx(3, rel=0.05)
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["train_samples_per_second"] == results["train_samples_per_second"]


def test_pseudo_clicks_are_first_sentences_of_the_ads():
    texts = [
        "Cheap boats for rent. Call today.",
        "One sentence only.",
        "Hi. Too short a first sentence.",
        "A b c? Rest.",
    ]
    clicks = refine_contrastive.pseudo_clicks(enumerate(texts))  # (id, text) as the corpus is streamed
    assert [(click["query"], click["positive"]) for click in clicks] == [("Cheap boats for rent.", 0), ("A b c?", 3)]
    assert clicks[0]["group"] == text_key(texts[0])  # masks only ads of the same text
    with pytest.raises(UserError, match="first_sentence makes no click; use --pseudo_queries first_words"):
        refine_contrastive.pseudo_clicks([("x", "One sentence only.")])


def test_pseudo_clicks_of_unpunctuated_ads_are_their_first_words():
    texts = ["compact memories have flexible capacities a digital data storage", "too short an ad", "a b c d e"]
    clicks = refine_contrastive.pseudo_clicks(enumerate(texts), words=4)
    assert [(click["query"], click["positive"]) for click in clicks] == [("compact memories have flexible", 0),
                                                                         ("a b c d", 2)]  # fmt: skip
    assert clicks[1]["group"] == text_key(texts[2])
    with pytest.raises(UserError, match="first_sentence makes no click"):  # no sentence ends: nothing to click
        refine_contrastive.pseudo_clicks(enumerate(texts))
    with pytest.raises(UserError, match=r"No ad has more than 9 words.*lower --pseudo_query_words"):
        refine_contrastive.pseudo_clicks(enumerate(texts), words=9)


def test_refinement_on_pseudo_clicks_without_a_train_file(small_data, tiny_bert, tmp_path):
    student = tmp_path / "student"
    keep_layers(Encoder.from_pretrained(tiny_bert), [0]).save_pretrained(str(student))
    output = tmp_path / "refined"
    results = refine_contrastive.main(["--student_model", str(student), "--teacher_model", tiny_bert,
                                       "--corpus_file", small_data["ads"], "--pseudo_queries", "first_sentence",
                                       "--output_dir", str(output), "--max_train_steps", "2",
                                       "--num_random_negatives", "8", "--store_dir", str(tmp_path / "stores"),
                                       *FAST])  # fmt: skip
    assert results["steps"] == 2 and np.isfinite(results["train_loss"])
    words = refine_contrastive.main(["--student_model", str(student), "--teacher_model", tiny_bert,
                                     "--corpus_file", small_data["ads"], "--pseudo_queries", "first_words",
                                     "--pseudo_query_words", "3", "--output_dir", str(tmp_path / "words"),
                                     "--max_train_steps", "2", "--num_random_negatives", "8", "--store_dir",
                                     str(tmp_path / "stores"), *FAST])  # fmt: skip
    assert words["steps"] == 2 and words["train_loss"] != results["train_loss"]
    with pytest.raises(UserError, match="--pseudo_query_words sets the length of --pseudo_queries first_words"):
        refine_contrastive.main(["--student_model", str(student), "--corpus_file", small_data["ads"],
                                 "--pseudo_queries", "first_sentence", "--pseudo_query_words", "3",
                                 "--output_dir", str(tmp_path / "y")])  # fmt: skip
    assert not (tmp_path / "y").exists()
    with pytest.raises(UserError, match="drop --train_file"):  # fmt: skip
        refine_contrastive.main(
            [
                "--student_model",
                str(student),
                "--train_file",
                small_data["train"],
                "--pseudo_queries",
                "first_sentence",
                "--output_dir",
                str(tmp_path / "x"),
            ]
        )


def test_token_states_of_the_teacher_are_matched_in_the_loop(small_data, tiny_bert, tiny_bert_narrow, tmp_path):
    """With --token_loss_weight the student's hidden states move onto the teacher's, token by token."""
    held_out = [json.loads(line)["text"] for line in Path(small_data["test_queries"]).read_text().splitlines()][:32]
    teacher = Encoder.from_pretrained(tiny_bert).eval()
    batch = teacher.tokenize(held_out, "query")
    with torch.no_grad():
        _, teacher_states = teacher(**batch, return_token_states=True)

    def token_distance(folder):
        with torch.no_grad():
            _, states = Encoder.from_pretrained(str(folder)).eval()(**batch, return_token_states=True)
        return token_state_loss(states, teacher_states, batch["attention_mask"]).item()

    distances = {}
    for weight in ("0", "1"):
        output = tmp_path / f"w{weight}"
        results = distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"],
                                        "--student_num_layers", "1", "--progressive_from", "none",
                                        "--token_loss_weight", weight,
                                        "--learning_rate", "2e-3", "--output_dir", str(output),
                                        "--max_train_steps", "20", *FAST])  # fmt: skip
        distances[weight] = token_distance(output)
    log = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert all(entry["token_loss"] > 0 and np.isfinite(entry["token_loss"]) for entry in log)
    assert results["train_token_loss"] == log[-1]["token_loss"] and log[-1]["token_loss"] < log[0]["token_loss"]
    assert distances["1"] < 0.5 * distances["0"], distances
    with pytest.raises(UserError, match="needs the teacher's tokenizer and width"):
        distill_student.main(["--teacher_model", tiny_bert, "--student_model", tiny_bert_narrow, "--query_file",
                              small_data["queries"], "--token_loss_weight", "1", "--output_dir",
                              str(tmp_path / "x"), "--max_train_steps", "1"])  # fmt: skip


def test_kl_ranks_ads_of_the_teachers_ad_store(small_data, tiny_bert, tiny_bert_narrow, tmp_path):
    ad_store = str(tmp_path / "ad-store")
    encode.main(["--model_name_or_path", tiny_bert, "--input_file", small_data["ads"], "--kind", "ad",
                 "--output_dir", ad_store])  # fmt: skip
    common = ["--teacher_model", tiny_bert, "--query_file", small_data["queries"], "--student_num_layers", "1",
              "--max_train_steps", "2", *FAST]  # fmt: skip
    results = distill_student.main([*common, "--alignment_loss", "l2+kl", "--ad_store", ad_store,
                                    "--num_ranked_ads", "64", "--output_dir", str(tmp_path / "s")])  # fmt: skip
    assert np.isfinite(results["train_alignment_loss"]) and results["train_alignment_loss"] > 0
    # A batch of one query: the KL over the batch's own teacher vectors ranks a single item and is exactly 0,
    # the KL over the store's ads is not, so only ads drawn from the store can give a loss here.
    single = [*common, "--alignment_loss", "kl", "--per_device_train_batch_size", "1"]
    in_batch = distill_student.main([*single, "--output_dir", str(tmp_path / "in-batch")])
    assert in_batch["train_alignment_loss"] == 0
    over_ads = distill_student.main([*single, "--ad_store", ad_store, "--num_ranked_ads", "64",
                                     "--output_dir", str(tmp_path / "over-ads")])  # fmt: skip
    assert over_ads["train_alignment_loss"] > 1e-6
    with pytest.raises(UserError, match="add kl to --alignment_loss"):
        distill_student.main(
            [*common, "--alignment_loss", "l2", "--ad_store", ad_store, "--output_dir", str(tmp_path / "x")]
        )
    other = str(tmp_path / "other-store")
    encode.main(["--model_name_or_path", tiny_bert_narrow, "--input_file", small_data["ads"], "--kind", "ad",
                 "--output_dir", other])  # fmt: skip
    with pytest.raises(UserError, match="built by another model"):
        distill_student.main([*common, "--alignment_loss", "kl", "--ad_store", other,
                              "--output_dir", str(tmp_path / "y")])  # fmt: skip


def test_kl_ranks_the_teachers_vectors_of_the_label_free_texts_without_ads(small_data, streams, tiny_bert, tmp_path):
    """--kl_ranks texts: without ads, kl ranks vectors drawn from the teacher's query stores (in memory and
    streamed), so a batch of one query still has a ranking to learn; contradictory flags are refused."""
    common = ["--teacher_model", tiny_bert, "--student_num_layers", "1", "--max_train_steps", "2", *FAST,
              "--per_device_train_batch_size", "1", "--store_dir", str(tmp_path / "stores")]  # fmt: skip
    in_memory = [*common, "--query_file", small_data["queries"]]
    in_batch = distill_student.main([*in_memory, "--alignment_loss", "kl", "--output_dir", str(tmp_path / "b")])
    assert in_batch["train_alignment_loss"] == 0  # one item ranked against itself
    over_texts = distill_student.main([*in_memory, "--alignment_loss", "kl", "--kl_ranks", "texts",
                                       "--num_ranked_ads", "16", "--output_dir", str(tmp_path / "t")])  # fmt: skip
    assert over_texts["train_alignment_loss"] > 1e-6
    streamed = distill_student.main([*common, "--query_file", streams["queries"], "--streaming", "--alignment_loss",
                                     "l2+kl", "--kl_ranks", "texts", "--output_dir", str(tmp_path / "s")])  # fmt: skip
    assert np.isfinite(streamed["train_alignment_loss"]) and streamed["train_alignment_loss"] > 0
    ad_store = str(tmp_path / "ad-store")
    encode.main(["--model_name_or_path", tiny_bert, "--input_file", small_data["ads"], "--kind", "ad",
                 "--output_dir", ad_store])  # fmt: skip
    for flags, message in (
        (["--alignment_loss", "l2", "--kl_ranks", "texts"], "add kl to --alignment_loss"),
        (["--alignment_loss", "l2+kl", "--kl_ranks", "ads"], "give them with --corpus_file or --ad_store"),
        (["--alignment_loss", "l2+kl", "--kl_ranks", "texts", "--ad_store", ad_store], "leaves the ads"),
    ):
        with pytest.raises(UserError, match=message):
            distill_student.main([*in_memory, *flags, "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_max_length_sets_the_length_of_a_student_cut_from_the_teacher(small_data, tiny_bert, tmp_path):
    """--max_length applies to every student: one cut from the teacher (which reads the teacher's own config)
    included, not only --student_model."""
    distill_student.main(["--teacher_model", tiny_bert, "--query_file", small_data["queries"], "--student_num_layers",
                          "1", "--max_length", "9", "--output_dir", str(tmp_path / "cut"), "--max_train_steps", "1",
                          "--store_dir", str(tmp_path / "stores"), *FAST])  # fmt: skip
    assert Encoder.from_pretrained(tiny_bert).config.max_length != 9
    student = Encoder.from_pretrained(str(tmp_path / "cut"))
    assert student.config.max_length == 9
    assert student.tokenize(["a much longer query " * 5], "query")["input_ids"].shape[1] == 9
