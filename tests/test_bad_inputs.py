"""Bad inputs a user can cause: each ends with one sentence naming the cause and the fix, and damages
nothing already written (a finished model, stores and data files are hashed before and after)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distill_student
import encode
import evaluate
import export
import mine_negatives
import prepare_data
import refine_contrastive
import train_teacher
from common.errors import UserError
from common.store import write_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, small_data, tiny_bert):
    """A finished teacher run, a teacher query store and data files: all must survive every bad input."""
    root = tmp_path_factory.mktemp("workspace")
    teacher = str(root / "teacher")
    train_teacher.main(
        tiny_teacher_run(
            tiny_bert, small_data["train"], teacher, "--max_train_steps", "1", "--checkpointing_steps", "1"
        )
    )
    distill_student.main(
        [
            "--teacher_model",
            teacher,
            "--query_file",
            small_data["queries"],
            "--output_dir",
            str(root / "student"),
            "--max_train_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
            "--student_num_layers",
            "1",
            "--teacher_query_store",
            str(root / "query-store"),
        ]
    )
    return {"root": root, "teacher": teacher, "student": str(root / "student"), "store": str(root / "query-store")}


def snapshot(*folders):
    digests = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def write(folder, name, content):
    path = Path(folder) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def jsonl(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


def make_esci(folder, label="E"):
    """The two files of an ESCI release with one train query (label `label`) and one test query."""
    import pandas as pd

    folder.mkdir()
    pd.DataFrame({"query_id": [1, 2], "query": ["usb cable", "red kettle"], "product_id": ["P1", "P2"],
                  "product_locale": ["us", "us"], "esci_label": [label, "E"], "small_version": [1, 1],
                  "split": ["train", "test"]}).to_parquet(folder / prepare_data.ESCI_FILES[0])  # fmt: skip
    pd.DataFrame({"product_id": ["P1", "P2"], "product_locale": ["us", "us"], "product_title": ["a cable", "a kettle"],
                  "product_brand": ["b", None]}).to_parquet(folder / prepare_data.ESCI_FILES[1])  # fmt: skip
    return str(folder)


def make_beir(folder, corpus=None, queries=None, qrels=None):
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv and test.tsv); each part replaceable."""
    (folder / "qrels").mkdir(parents=True)
    write(
        folder, "corpus.jsonl", corpus if corpus is not None else jsonl({"_id": "0", "title": "", "text": "a passage"})
    )
    write(folder, "queries.jsonl", queries if queries is not None else jsonl({"_id": "q0", "text": "a query"}))
    good = "query-id\tcorpus-id\tscore\nq0\t0\t1\n"
    write(folder / "qrels", "train.tsv", qrels if qrels is not None else good)
    write(folder / "qrels", "test.tsv", good)
    return str(folder)


GOOD = {"query": "rent a boat", "positive": "Boats for rent", "negatives": ["Used boats"]}


def cases(ws, data, tiny_qwen, tiny_bert_narrow, tiny_bert, tmp):
    """(name, script main, argv, expected message part) for each bad input."""
    out = str(tmp / "out")
    teacher_args = ["--model_name_or_path", ws["teacher"], "--output_dir", out, "--max_train_steps", "1"]

    def teacher(train_file, *extra):
        return train_teacher.main, [*teacher_args, "--train_file", train_file, *extra]

    nan_store = str(tmp / "nan-store")
    shutil.copytree(ws["store"], nan_store)
    meta = json.loads(Path(nan_store, "metadata.json").read_text())
    vectors_path = Path(nan_store, meta["chunks"][0]["name"], "vectors.npy")
    vectors = np.load(vectors_path)
    vectors[3, 1] = np.inf
    np.save(vectors_path, vectors)
    ad_store = str(tmp / "ad-store")  # the teacher's ad vectors (random here: only the kind matters)
    query_metadata = json.loads(Path(ws["store"], "metadata.json").read_text())
    kept = {key: value for key, value in query_metadata.items() if key in ("dim", "model_fingerprint", "model")}
    vectors = np.random.default_rng(0).normal(size=(4, query_metadata["dim"])).astype("float32")
    write_store(ad_store, vectors, ["a0", "a1", "a2", "a3"], metadata={**kept, "kind": "ad"})
    pickle_model = str(tmp / "pickle-model")
    shutil.copytree(ws["teacher"], pickle_model)
    os.rename(os.path.join(pickle_model, "model.safetensors"), os.path.join(pickle_model, "pytorch_model.bin"))
    qrels_unknown_query = write(tmp, "q1.tsv", "query_id\tdoc_id\trelevance\nnope\tad00000\t1\n")
    qrels_unknown_doc = write(tmp, "q2.tsv", "query_id\tdoc_id\trelevance\nq0000\tnope\t1\n")
    qrels_bad_grade = write(tmp, "q3.tsv", "query_id\tdoc_id\trelevance\nq0000\tad00000\thigh\n")
    duplicate_ads = write(tmp, "dup.jsonl", jsonl({"id": "a", "text": "x"}, {"id": "a", "text": "y"}))
    qrels_float_grade = write(tmp, "q4.jsonl", jsonl({"query_id": "q0000", "doc_id": "ad00000", "relevance": 2.0}))
    qrels_conflict = write(tmp, "q5.tsv", "query_id\tdoc_id\trelevance\nq0000\tad00000\t2\nq0000\tad00000\t0\n")
    qrels_nothing_relevant = write(tmp, "q6.tsv", "query_id\tdoc_id\trelevance\nq0000\tad00000\t0\n")
    qrels_null_id = write(tmp, "q7.jsonl", jsonl({"query_id": None, "doc_id": "ad00000", "relevance": 1}))
    null_ad_id = write(tmp, "nullid.jsonl", jsonl({"id": "a", "text": "x"}, {"id": None, "text": "y"}))
    eval_args = [
        "--teacher_model",
        ws["teacher"],
        "--students",
        "--baselines",
        "--corpus_file",
        data["ads"],
        "--queries_file",
        data["test_queries"],
        "--output_dir",
        str(tmp / "eval"),
        "--latency_queries",
        "0",
    ]
    refine_args = [
        "--teacher_model",
        ws["teacher"],
        "--corpus_file",
        data["ads"],
        "--output_dir",
        out,
        "--max_train_steps",
        "1",
        "--store_dir",
        str(tmp / "stores"),
    ]
    distill_args = ["--teacher_model", ws["teacher"], "--output_dir", out, "--max_train_steps", "1",
                    "--student_num_layers", "1"]  # fmt: skip
    export_args = ["--model_name_or_path", ws["student"], "--teacher_model", ws["teacher"], "--corpus_file",
                   data["ads"], "--queries_file", data["test_queries"], "--output_dir", str(tmp / "serving"),
                   "--speed_queries", "0"]  # fmt: skip
    users_folder = tmp / "users-folder"
    users_folder.mkdir()
    (users_folder / "notes.txt").write_text("mine")
    a_file = write(tmp, "a-file.txt", "not a folder")
    esci = make_esci(tmp / "esci")
    esci_bad_label = make_esci(tmp / "esci-label", label="X")
    beir = make_beir(tmp / "beir")
    beir_not_json = make_beir(tmp / "beir-json", corpus="{not json\n")
    beir_no_id = make_beir(tmp / "beir-id", corpus=jsonl({"title": "t", "text": "a passage"}))
    beir_query_no_text = make_beir(tmp / "beir-q", queries=jsonl({"_id": "q0"}))
    beir_bad_score = make_beir(tmp / "beir-score", qrels="query-id\tcorpus-id\tscore\nq0\t0\thigh\n")
    beir_bad_header = make_beir(tmp / "beir-header", qrels="q\td\ts\nq0\t0\t1\n")
    beir_latin1 = make_beir(tmp / "beir-bytes", corpus=b'{"_id": "0", "text": "caf\xe9"}\n')

    def prepare(*extra):
        return prepare_data.main, ["--output_dir", str(tmp / "prepared"), *extra]

    mine_args = ["--model_name_or_path", ws["teacher"], "--train_file", data["train"], "--corpus_file", data["ads"],
                 "--output_dir", str(tmp / "mined")]  # fmt: skip
    encode_args = ["--model_name_or_path", ws["teacher"], "--input_file", data["queries"], "--text_column", "query",
                   "--store_dir", str(tmp / "stores")]  # fmt: skip
    return [
        ("empty file", *teacher(write(tmp, "empty.jsonl", "")), "is empty"),
        ("missing column", *teacher(write(tmp, "c.jsonl", jsonl({"query": "a", "ad": "b"}))), "no column 'positive'"),
        ("misnamed column flag", *teacher(data["train"], "--query_column", "q"), "no column 'q'"),
        ("wrong type", *teacher(write(tmp, "t.jsonl", jsonl(GOOD, {**GOOD, "query": 5}))), "got int"),
        ("empty query", *teacher(write(tmp, "e.jsonl", jsonl(GOOD, {**GOOD, "query": ""}))), "row 1, column 'query'"),
        ("whitespace query", *teacher(write(tmp, "w.jsonl", jsonl(GOOD, {**GOOD, "query": " \t"}))), "empty text"),
        (
            "null positive",
            *teacher(write(tmp, "n.jsonl", jsonl(GOOD, {**GOOD, "positive": None}))),
            "a missing value (null in JSON",
        ),
        ("negatives not a list", *teacher(write(tmp, "l.jsonl", jsonl({**GOOD, "negatives": "x"}))), "list of texts"),
        (
            "non-UTF-8 bytes",
            *teacher(
                write(tmp, "b.jsonl", b'{"query": "ok", "positive": "x"}\n{"query": "caf\xe9", "positive": "x"}\n')
            ),
            "line 2 is not valid UTF-8",
        ),
        ("unsupported file type", *teacher(write(tmp, "x.txt", "hello")), "unsupported file type"),
        ("missing file", *teacher(str(tmp / "nowhere.jsonl")), "does not exist"),
        ("unreachable hub data set", *teacher("someone/clicks-data"), "Could not load data set"),
        (
            "unreachable hub model",
            train_teacher.main,
            ["--model_name_or_path", "someone/embedder", "--train_file", data["train"], "--output_dir", out],
            "Could not get model",
        ),
        (
            "output folder holds a finished run",
            train_teacher.main,
            ["--model_name_or_path", tiny_bert, "--train_file", data["train"], "--output_dir", ws["teacher"]],
            "already holds a finished run",
        ),
        (
            "output folder is the input model, even with --overwrite_output_dir",
            train_teacher.main,
            [
                "--model_name_or_path",
                ws["teacher"],
                "--train_file",
                data["train"],
                "--output_dir",
                ws["teacher"],
                "--overwrite_output_dir",
            ],
            "is, holds or sits inside the input",
        ),
        (
            "output folder inside the input model",
            train_teacher.main,
            [
                "--model_name_or_path",
                ws["teacher"],
                "--train_file",
                data["train"],
                "--output_dir",
                os.path.join(ws["teacher"], "retrained"),
            ],
            "is, holds or sits inside the input",
        ),
        (
            "output folder holding the training data",
            train_teacher.main,
            [
                *teacher_args[:-4],
                "--train_file",
                data["train"],
                "--output_dir",
                os.path.dirname(data["train"]),
                "--overwrite_output_dir",
            ],
            "is, holds or sits inside the input",
        ),
        (
            "output folder of another script's run",
            distill_student.main,
            [
                "--teacher_model",
                tiny_bert,
                "--output_dir",
                ws["teacher"],
                "--overwrite_output_dir",
                "--student_num_layers",
                "1",
            ],
            "holds a run of train_teacher.py, not of distill_student.py",
        ),
        (
            "output folder that is the user's, not a run",
            train_teacher.main,
            [
                "--model_name_or_path",
                tiny_bert,
                "--train_file",
                data["train"],
                "--output_dir",
                str(ws["root"]),
                "--overwrite_output_dir",
            ],
            "is not empty and holds no run of train_teacher.py",
        ),
        (
            "output path that is a file",
            train_teacher.main,
            [*teacher_args[:-4], "--train_file", data["train"], "--output_dir", data["train"]],
            "is a file, not a folder",
        ),
        (
            "pickle-only weights",
            train_teacher.main,
            ["--model_name_or_path", pickle_model, "--train_file", data["train"], "--output_dir", out],
            "safetensors",
        ),
        (
            "cls pooling on a decoder",
            train_teacher.main,
            ["--model_name_or_path", tiny_qwen, "--pooling", "cls", "--train_file", data["train"], "--output_dir", out],
            "cls pooling on the causal decoder",
        ),
        ("push without repo id", *teacher(data["train"], "--push_to_hub"), "needs --hub_model_id"),
        ("batch larger than the data", *teacher(write(tmp, "one.jsonl", jsonl(GOOD))), "fewer than one global batch"),
        (
            "not a checkpoint",
            *teacher(data["train"], "--resume_from_checkpoint", str(tmp)),
            "not a complete checkpoint",
        ),
        (
            "config with an unknown flag",
            *teacher(data["train"], "--config", write(tmp, "c.yaml", "lr: 0.1\n")),
            "unknown flags lr",
        ),
        ("missing config file", *teacher(data["train"], "--config", str(tmp / "none.yaml")), "does not exist"),
        (
            "store holding inf",
            distill_student.main,
            [*distill_args, "--query_file", data["queries"], "--teacher_query_store", nan_store],
            "NaN or inf",
        ),
        (
            "ad store passed as the query store",
            distill_student.main,
            [*distill_args, "--query_file", data["queries"], "--teacher_query_store", ad_store],
            "holds ad vectors, not query vectors",
        ),
        (
            "query store passed as the ad store",
            distill_student.main,
            [
                *distill_args,
                "--query_file",
                data["queries"],
                "--teacher_query_store",
                ws["store"],
                "--ad_store",
                ws["store"],
            ],
            "holds query vectors, not ad vectors",
        ),
        (
            "store written inside the teacher's folder",
            encode.main,
            [
                "--model_name_or_path",
                ws["teacher"],
                "--input_file",
                data["ads"],
                "--output_dir",
                os.path.join(ws["teacher"], "stores", "ads"),
            ],
            "lies inside the model folder",
        ),
        (
            "store directory inside the teacher's folder",
            distill_student.main,
            [*distill_args, "--query_file", data["train"], "--store_dir", os.path.join(ws["teacher"], "stores")],
            "lies inside the model folder",
        ),
        *[
            (
                f"{flag} naming a column the clicks lack",
                *teacher(data["train"], flag, "advertiser"),
                f"no column 'advertiser' that {flag} names",
            )
            for flag in ("--group_column", "--negatives_column")
        ],
        *[
            (
                f"refine: {flag} naming a column the clicks lack",
                refine_contrastive.main,
                [*refine_args, "--student_model", ws["student"], "--train_file", data["train"], flag, "advertiser"],
                f"no column 'advertiser' that {flag}",
            )
            for flag in ("--group_column", "--positive_id_column", "--negative_ids_column")
        ],
        *[
            (
                f"mining: {flag} naming a column the file lacks",
                mine_negatives.main,
                [
                    "--model_name_or_path",
                    ws["teacher"],
                    "--train_file",
                    data["train"],
                    "--corpus_file",
                    data["ads"],
                    "--output_dir",
                    out,
                    flag,
                    "brand",
                ],
                f"no column 'brand' that {flag} names",
            )
            for flag in ("--group_column", "--ad_group_column", "--positive_id_column")
        ],
        (
            "IVF with more cells than the ads can train",
            evaluate.main,
            [*eval_args, "--index", "ivf", "--nlist", "100000"],
            "needs at least 3900000 ads to train its cells",
        ),
        (
            "IVF probing more cells than it has",
            evaluate.main,
            [*eval_args, "--index", "ivf", "--nlist", "2", "--nprobe", "8"],
            "--nprobe 8 is more than the 2 cells",
        ),
        (
            "HNSW with fewer candidates than k",
            evaluate.main,
            [*eval_args, "--index", "hnsw", "--ef_search", "5"],
            "--ef_search 5 is below k = 100",
        ),
        (
            "student scored beside another teacher",
            evaluate.main,
            [*eval_args, "--teacher_model", tiny_bert, "--students", f"aligned={ws['student']}"],
            "was aligned to another teacher",
        ),
        (
            "student refined against another teacher",
            refine_contrastive.main,
            [*refine_args, "--teacher_model", tiny_bert, "--student_model", ws["student"]],
            "was aligned to another teacher",
        ),
        (
            "a Bloom filter larger than the machine",
            encode.main,
            [
                "--model_name_or_path",
                ws["teacher"],
                "--input_file",
                data["queries"],
                "--kind",
                "query",
                "--streaming",
                "--text_column",
                "query",
                "--dedupe_capacity",
                str(10**13),
                "--output_dir",
                str(tmp / "s"),
            ],
            "of memory and this machine has",
        ),
        (
            "store chunks larger than the machine",
            encode.main,
            [
                "--model_name_or_path",
                ws["teacher"],
                "--input_file",
                data["ads"],
                "--chunk_rows",
                str(10**12),
                "--output_dir",
                str(tmp / "s"),
            ],
            "lower --chunk_rows",
        ),
        (
            "store built on other data",
            distill_student.main,
            [*distill_args, "--query_file", data["train"], "--teacher_query_store", ws["store"]],
            "other data",
        ),
        (
            "store built by another model",
            distill_student.main,
            [
                *distill_args,
                "--teacher_model",
                ws["student"],
                "--student_model",
                tiny_bert_narrow,
                "--query_file",
                data["queries"],
                "--teacher_query_store",
                ws["store"],
            ],
            "another model",
        ),
        (
            "checkpoint of another script",
            distill_student.main,
            [
                *distill_args,
                "--query_file",
                data["queries"],
                "--resume_from_checkpoint",
                os.path.join(ws["teacher"], "checkpoints", "step_1"),
                "--store_dir",
                str(tmp / "stores"),
            ],
            "is a checkpoint of train_teacher.py, not of distill_student.py",
        ),
        (
            "resume with another batch size",
            *teacher(
                data["train"],
                "--resume_from_checkpoint",
                os.path.join(ws["teacher"], "checkpoints", "step_1"),
                "--per_device_train_batch_size",
                "4",
            ),
            "was written with per_device_train_batch_size = 8 but this run has 4",
        ),
        (
            "resume with another model",
            train_teacher.main,
            [
                "--model_name_or_path",
                tiny_qwen,
                "--train_file",
                data["train"],
                "--output_dir",
                out,
                "--per_device_train_batch_size",
                "8",
                "--max_train_steps",
                "1",
                "--resume_from_checkpoint",
                os.path.join(ws["teacher"], "checkpoints", "step_1"),
            ],
            "was written with model_shape",
        ),
        (
            "store folder under a file",
            distill_student.main,
            [*distill_args, "--query_file", data["queries"], "--store_dir", data["queries"]],
            "which is a file",
        ),
        (
            "Matryoshka width wider than the teacher",
            distill_student.main,
            [*distill_args, "--query_file", data["queries"], "--teacher_dim", "4096"],
            "--teacher_dim 4096 is wider than the teacher's 32-d vectors",
        ),
        (
            "query file without the column",
            distill_student.main,
            [*distill_args, "--query_file", data["test_queries"]],
            "no column 'query'",
        ),
        (
            "student width does not match the store",
            refine_contrastive.main,
            [*refine_args, "--student_model", tiny_bert_narrow, "--train_file", data["train"]],
            "16-d vectors",
        ),
        (
            "click naming an unknown ad id",
            refine_contrastive.main,
            [
                *refine_args,
                "--student_model",
                ws["student"],
                "--train_file",
                write(tmp, "u.jsonl", jsonl({"query": "a", "positive_id": "nope"})),
            ],
            "'nope' is not in",
        ),
        (
            "click text not in the corpus",
            refine_contrastive.main,
            [
                *refine_args,
                "--student_model",
                ws["student"],
                "--train_file",
                write(tmp, "v.jsonl", jsonl({"query": "a", "positive": "no such ad"})),
            ],
            "not in the corpus",
        ),
        (
            "duplicate ids in the corpus",
            refine_contrastive.main,
            [
                *refine_args,
                "--student_model",
                ws["student"],
                "--train_file",
                data["train"],
                "--corpus_file",
                duplicate_ads,
            ],
            "appears more than once",
        ),
        (
            "judgment naming an unknown query",
            evaluate.main,
            [*eval_args, "--qrels_file", qrels_unknown_query],
            "judges query 'nope'",
        ),
        (
            "judgment naming an unknown ad",
            evaluate.main,
            [*eval_args, "--qrels_file", qrels_unknown_doc],
            "judges ad 'nope'",
        ),
        ("non-integer grade", evaluate.main, [*eval_args, "--qrels_file", qrels_bad_grade], "not an integer grade"),
        ("float grade", evaluate.main, [*eval_args, "--qrels_file", qrels_float_grade], "'2.0' is not an integer"),
        ("conflicting judgments", evaluate.main, [*eval_args, "--qrels_file", qrels_conflict], "already judged 2"),
        ("nothing relevant", evaluate.main, [*eval_args, "--qrels_file", qrels_nothing_relevant], "judges nothing"),
        ("null query id in judgments", evaluate.main, [*eval_args, "--qrels_file", qrels_null_id], "a missing value"),
        (
            "null ad id in the corpus",
            evaluate.main,
            [*eval_args, "--qrels_file", data["qrels"], "--corpus_file", null_ad_id],
            "row 1, column 'id': a missing value",
        ),
        (
            "a student named teacher",
            evaluate.main,
            [*eval_args, "--qrels_file", data["qrels"], "--students", f"teacher={ws['student']}"],
            "reserved 'teacher'",
        ),
        (
            "student without a name",
            evaluate.main,
            [*eval_args, "--qrels_file", data["qrels"], "--students", ws["student"]],
            "NAME=PATH",
        ),
        (
            "baseline cut keeping every layer",
            refine_contrastive.main,
            [*refine_args, "--student_model", ws["teacher"], "--student_num_layers", "2"],
            "keeps all 2 layers",
        ),
        (
            "judgments missing",
            evaluate.main,
            ["--corpus_file", data["ads"], "--output_dir", str(tmp / "eval")],
            "Pass all of",
        ),
        # export.py
        ("export with queries but no corpus", export.main,
         ["--queries_file", data["test_queries"], "--output_dir", str(tmp / "serving")], "needs --corpus_file"),
        ("export into the student's own folder", export.main,
         [*export_args, "--output_dir", ws["student"], "--overwrite_output_dir"], "is, holds or sits inside the input"),
        ("export into a folder of the user's", export.main, [*export_args, "--output_dir", str(users_folder)],
         "holds no run of export.py"),
        ("export gated against another teacher", export.main, [*export_args, "--teacher_model", tiny_bert],
         "was aligned to another teacher"),
        ("export with judgments naming an unknown query", export.main,
         [*export_args, "--qrels_file", qrels_unknown_query], "judges query 'nope'"),
        ("export with judgments naming an unknown ad", export.main, [*export_args, "--qrels_file", qrels_unknown_doc],
         "judges ad 'nope'"),
        ("export gate deeper than the ads", export.main, [*export_args, "--gate_k", "100000"], "is more than the"),
        ("export at an opset without attention", export.main, [*export_args, "--opset", "13"],
         "cannot express the attention"),
        ("export queries without the text column", export.main, [*export_args, "--text_column", "title"],
         "no column 'title'"),
        ("export queries file missing", export.main, [*export_args, "--queries_file", str(tmp / "none.jsonl")],
         "does not exist"),
        ("export with a query store as the ad store", export.main, [*export_args, "--ad_store", ws["store"]],
         "holds query vectors, not ad vectors"),
        # prepare_data.py
        ("prepare without a source", *prepare("--dataset", "esci"), "pass one of them"),
        ("prepare with two sources", *prepare("--dataset", "beir", "--beir_dir", beir, "--beir_hub", "x/y"),
         "pass one of them"),
        ("prepare into a file", prepare_data.main, ["--dataset", "beir", "--beir_dir", beir, "--output_dir", a_file],
         "is a file"),
        ("prepare into a folder of the user's", prepare_data.main,
         ["--dataset", "beir", "--beir_dir", beir, "--output_dir", str(users_folder)], "did not write"),
        ("ESCI folder without its files", *prepare("--dataset", "esci", "--esci_dir", str(tmp)),
         "point --esci_dir at the folder"),
        ("ESCI product field that is not a column",
         *prepare("--dataset", "esci", "--esci_dir", esci, "--product_fields", "product_title,colour"),
         "has no column colour"),
        ("ESCI label outside E, S, C, I", *prepare("--dataset", "esci", "--esci_dir", esci_bad_label),
         "esci_label 'X' is not one of"),
        ("BEIR corpus line that is not JSON", *prepare("--dataset", "beir", "--beir_dir", beir_not_json),
         "line 1 is not JSON"),
        ("BEIR corpus row without _id", *prepare("--dataset", "beir", "--beir_dir", beir_no_id),
         "line 1 has no '_id'"),
        ("BEIR query without text", *prepare("--dataset", "beir", "--beir_dir", beir_query_no_text),
         "line 1 has no 'text'"),
        ("BEIR judgment with a word for a score", *prepare("--dataset", "beir", "--beir_dir", beir_bad_score),
         "line 2: expected query-id, corpus-id and an integer score"),
        ("BEIR judgments with another header", *prepare("--dataset", "beir", "--beir_dir", beir_bad_header),
         "the header must be query-id"),
        ("BEIR corpus that is not UTF-8", *prepare("--dataset", "beir", "--beir_dir", beir_latin1),
         "line 1 is not valid UTF-8"),
        ("BEIR split without judgments", *prepare("--dataset", "beir", "--beir_dir", beir, "--test_split", "dev"),
         "dev.tsv does not exist"),
        # mine_negatives.py
        ("mine with clicks but no corpus", mine_negatives.main,
         ["--train_file", data["train"], "--output_dir", str(tmp / "mined")], "Pass both"),
        ("mine more negatives than candidates", mine_negatives.main,
         [*mine_args, "--num_negatives", "20", "--top_k", "10"], "raise --top_k"),
        ("mine into the model's folder", mine_negatives.main, [*mine_args, "--output_dir", ws["teacher"]],
         "is, holds or sits inside the input"),
        ("mine clicks without the query column", mine_negatives.main, [*mine_args, "--query_column", "q"],
         "no column 'q'"),
        # encode.py
        ("query context for ads", encode.main, [*encode_args, "--query_context_column", "ctx"],
         "use it with --kind query"),
        ("streamed ad store", encode.main, [*encode_args, "--streaming", "--output_dir", str(tmp / "s1")],
         "use --kind query"),
        ("streamed store with overwrite", encode.main,
         [*encode_args, "--kind", "query", "--streaming", "--output_dir", str(tmp / "s2"), "--overwrite_output_dir"],
         "does not apply to a streamed store"),
    ]  # fmt: skip


def test_bad_inputs_end_with_one_sentence_and_damage_nothing(
    workspace, small_data, tiny_qwen, tiny_bert_narrow, tiny_bert, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(workspace["root"], os.path.dirname(small_data["train"]))
    table = cases(workspace, small_data, tiny_qwen, tiny_bert_narrow, tiny_bert, tmp_path)
    assert len(table) >= 103  # the classes of docs/guarantees.md, each with its siblings, over all eight scripts
    scripts = {main.__module__ for _, main, _, _ in table}
    assert scripts == {"train_teacher", "distill_student", "refine_contrastive", "evaluate", "encode", "export",
                       "mine_negatives", "prepare_data"}  # fmt: skip
    failures = []
    for name, main, argv, expected in table:
        try:
            main(argv)
            failures.append(f"{name}: no error")
        except UserError as error:
            message = str(error)
            if expected not in message or "\n" in message or not message.endswith((".", ")")):
                failures.append(f"{name}: {message!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(workspace["root"], os.path.dirname(small_data["train"])) == before


def test_deepspeed_requested_but_not_installed(small_data, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without DeepSpeed looks like
    with pytest.raises(UserError, match="DeepSpeed but it is not installed"):
        train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], tmp_path / "o"))


@pytest.mark.parametrize(
    "content, expected",
    [
        ("zero_optimization:\n  stage: 3\n", "is not valid JSON"),
        ("[3]", "must be a JSON object"),
        (None, "does not exist"),
    ],
    ids=["yaml", "a list", "missing"],
)
def test_a_deepspeed_config_that_is_not_a_json_object_is_refused_before_work(
    content, expected, small_data, tiny_bert, tmp_path, monkeypatch
):
    pytest.importorskip("deepspeed")
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(UserError, match=expected):
        train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_an_in_memory_index_the_machine_cannot_hold_is_refused_before_work(
    small_data, tiny_bert, tmp_path, monkeypatch
):
    """Sized by the machine, not by a fixed rule: with 1 MiB available, a flat (in-memory) index of the ads is
    refused before any store is built, and the sharded search (one chunk in memory) is what the message offers."""
    import common.runtime

    monkeypatch.setattr(common.runtime, "available_memory_bytes", lambda: 1 << 20)
    ads = write(tmp_path, "ads.jsonl", jsonl(*[{"id": f"a{i}", "text": f"ad number {i}"} for i in range(10_000)]))
    with pytest.raises(UserError, match=r"A flat index of 10000 32-d vectors needs .*use --index sharded"):
        evaluate.main(["--teacher_model", tiny_bert, "--students", "--corpus_file", ads, "--queries_file",
                       small_data["test_queries"], "--index", "flat", "--output_dir", str(tmp_path / "eval"),
                       "--store_dir", str(tmp_path / "stores")])  # fmt: skip
    assert not (tmp_path / "stores").exists()


def test_command_line_exit_code_and_single_line(small_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--corpus_file", small_data["ads"], "--output_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: Pass all of --corpus_file")
    assert "Traceback" not in result.stderr


def tiny_teacher_run(tiny_bert, train_file, output, *extra):
    return ["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(output),
            "--per_device_train_batch_size", "8", *extra]  # fmt: skip


def test_long_queries_are_truncated_and_counted(small_data, tiny_bert, tmp_path, caplog):
    rows = [json.loads(line) for line in Path(small_data["train"]).read_text().splitlines()]
    rows[0]["query"] = "cheap used laptop " * 200
    train_file = write(tmp_path, "long.jsonl", jsonl(*rows))
    caplog.set_level("INFO", logger="harness")
    train_teacher.main(tiny_teacher_run(tiny_bert, train_file, tmp_path / "o", "--max_train_steps", "1"))
    assert "1 of 96 queries" in caplog.text and "are truncated" in caplog.text


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_data, tiny_bert, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    real_loss, calls = train_teacher.contrastive_loss, []

    def loss_that_breaks_at_step_3(*args, **kwargs):  # fault injection: the 3rd batch yields NaN
        calls.append(1)
        loss, accuracy = real_loss(*args, **kwargs)
        return (loss * float("nan"), accuracy) if len(calls) == 3 else (loss, accuracy)

    monkeypatch.setattr(train_teacher, "contrastive_loss", loss_that_breaks_at_step_3)
    output = tmp_path / "o"
    with pytest.raises(UserError, match="loss became nan at step 3"):
        train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], output, "--max_train_steps", "5",
                                            "--checkpointing_steps", "1"))  # fmt: skip
    assert not (output / "model.safetensors").exists()
    assert sorted(os.listdir(output / "checkpoints")) == ["step_1", "step_2"]
    weights = load_file(str(output / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(np.isfinite(tensor.numpy()).all() for tensor in weights.values())


@pytest.mark.parametrize("checkpointing_steps", ["1", "100"])
def test_nan_parameters_are_never_saved(checkpointing_steps, small_data, tiny_bert, tmp_path):
    """A parameter the loss never reads (BERT's pooler, unused by mean pooling) holds NaN, as in a damaged
    checkpoint: training runs with finite losses and gradients, and the save is refused with one sentence and
    nothing written, for a periodic checkpoint (at step 1) and for the final model."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-pooler"
    shutil.copytree(tiny_bert, model)
    weights = load_file(str(model / "model.safetensors"))
    (pooler,) = [name for name in weights if name.endswith("pooler.dense.weight")]
    weights[pooler][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    output = tmp_path / "o"
    with pytest.raises(UserError, match=r"Parameter .*pooler\.dense\.weight holds NaN/inf; nothing was written"):
        train_teacher.main(tiny_teacher_run(str(model), small_data["train"], output, "--max_train_steps", "2",
                                            "--checkpointing_steps", checkpointing_steps))  # fmt: skip
    assert not (output / "model.safetensors").exists()
    assert not (output / "checkpoints").exists() or not os.listdir(output / "checkpoints")
    assert torch.isnan(load_file(str(model / "model.safetensors"))[pooler]).any()  # the input is left as it was


def test_hub_token_never_reaches_logs_or_files(small_data, tiny_bert, tmp_path, capsys, caplog):
    secret = "hf_DoNotLeakThisToken123"
    output = tmp_path / "o"
    caplog.set_level("INFO")
    train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], output, "--max_train_steps", "2",
                                        "--checkpointing_steps", "1", "--hub_token", secret))  # fmt: skip
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_second_writer_of_an_output_folder_or_store_is_refused(small_data, tiny_bert, tmp_path):
    """Two runs into one --output_dir, or two builders of one store: the second is refused with a sentence
    while the first holds the folder's lock (here: held by this test, as a running job would)."""
    import fcntl

    from accelerate import Accelerator

    from common.encoder import Encoder
    from common.store import build_store, rows_of_lists

    output = tmp_path / "teacher"
    output.mkdir()
    with open(output / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="Another process is writing the output folder"):
            train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], output, "--max_train_steps", "1"))
    assert os.listdir(output) == [".lock"]
    store = tmp_path / "store"
    store.mkdir()
    with open(store / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="Another process is writing the store"):
            build_store(Accelerator(), Encoder.from_pretrained(tiny_bert), rows_of_lists(["a"], ["rent a boat"]), "ad",
                        str(store))  # fmt: skip
    assert os.listdir(store) == [".lock"]
    # Once the first writer is done, the folder is free again.
    train_teacher.main(tiny_teacher_run(tiny_bert, small_data["train"], output, "--max_train_steps", "1"))
    assert (output / "training_args.json").exists()


def test_evaluation_never_writes_into_a_folder_that_is_not_its_report(small_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    with pytest.raises(UserError, match=r"holds no earlier report of evaluate\.py"):
        evaluate.main(["--corpus_file", small_data["ads"], "--queries_file", small_data["test_queries"],
                       "--qrels_file", small_data["qrels"], "--output_dir", str(mine)])  # fmt: skip
    assert (mine / "report.md").read_text() == "my own notes"


def test_ids_are_read_as_written(tmp_path):
    """A TSV or CSV id "0152" stays "0152" (type inference would make it 152 and lose the judgment)."""
    from common.data import read_qrels, read_texts

    qrels = write(tmp_path, "qrels.tsv", "query_id\tdoc_id\trelevance\n0152\t007\t2\n0152\t7\t-1\n")
    assert read_qrels(qrels) == {"0152": {"007": 2, "7": -1}}  # a negative grade is kept: not relevant
    corpus = write(tmp_path, "ads.csv", "id,text\n007,Boats for rent\n7,Used laptops\n")
    assert read_texts(corpus, "id", "text") == (["007", "7"], ["Boats for rent", "Used laptops"])


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".json"])
def test_a_table_that_starts_with_a_byte_order_mark_reads_as_without_one(extension, tmp_path):
    """Spreadsheet exports start CSV/TSV (and some JSON) files with the UTF-8 byte-order mark: the first column
    keeps its name and ids keep their text."""
    from common.data import load_table, read_texts

    rows = [{"id": "0152", "text": "rent a boat"}, {"id": "7", "text": "café près de moi"}]
    if extension in (".csv", ".tsv"):
        separator = "," if extension == ".csv" else "\t"
        body = "id" + separator + "text\n" + "".join(f"{r['id']}{separator}{r['text']}\n" for r in rows)
    elif extension == ".jsonl":
        body = jsonl(*rows)
    else:
        body = json.dumps(rows)
    path = write(tmp_path, "table" + extension, b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert load_table(path).column_names == ["id", "text"]
    assert read_texts(path, "id", "text") == (["0152", "7"], ["rent a boat", "café près de moi"])


def test_na_and_null_cells_of_a_csv_are_read_as_written_and_missing_cells_are_named(tmp_path):
    """pandas would read "NA", "null" and "n/a" as missing values: here a cell is its text ("NA" is a query
    one can type), and a cell that is really missing is refused as such, naming its row and column."""
    from common.data import read_qrels, read_texts

    queries = write(tmp_path, "q.csv", "id,text\n1,NA\n2,null\n3,n/a\n")
    assert read_texts(queries, "id", "text") == (["1", "2", "3"], ["NA", "null", "n/a"])
    empty = write(tmp_path, "e.csv", "id,text\n1,rent a boat\n2,\n")
    with pytest.raises(UserError, match=r"e\.csv row 1, column 'text': empty text"):
        read_texts(empty, "id", "text")
    qrels = write(tmp_path, "qrels.tsv", "query_id\tdoc_id\trelevance\nq1\td1\t1\nq2\td2\t\n")
    with pytest.raises(UserError, match=r"row 1, column 'relevance': a missing value .* where a grade is needed"):
        read_qrels(qrels)
