"""prepare_data.py: the public data sets' own schemas (ESCI's two parquet files, a BEIR folder such as MS MARCO
passage), written here as small files, converted into the project's files, which the scripts then read."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

import prepare_data
import train_teacher
from common.data import read_qrels, read_texts, scan_corpus
from common.errors import UserError


def write_esci(folder):
    """12 examples of the ESCI schema: 2 train queries, 1 test query, 2 locales."""
    os.makedirs(folder)
    rows = [  # query_id, query, product_id, locale, label, split
        (1, "usb c cable", "P1", "us", "E", "train"), (1, "usb c cable", "P2", "us", "I", "train"),
        (1, "usb c cable", "P3", "us", "S", "train"), (1, "usb c cable", "P4", "us", "E", "train"),
        (2, "red kettle", "P5", "us", "E", "train"), (2, "red kettle", "P6", "us", "C", "train"),
        (3, "garden hose 50ft", "P7", "us", "E", "test"), (3, "garden hose 50ft", "P8", "us", "S", "test"),
        (3, "garden hose 50ft", "P9", "us", "I", "test"), (3, "garden hose 50ft", "P10", "us", "C", "test"),
        (4, "cable usb c", "P1", "es", "E", "train"), (5, "tetera", "P11", "es", "E", "test"),
    ]  # fmt: skip
    pd.DataFrame(
        [{"example_id": i, "query": q, "query_id": qid, "product_id": p, "product_locale": loc, "esci_label": label,
          "small_version": int(i % 2 == 0), "large_version": 1, "split": split}
         for i, (qid, q, p, loc, label, split) in enumerate(rows)]
    ).to_parquet(os.path.join(folder, prepare_data.ESCI_FILES[0]))  # fmt: skip
    products = [(f"P{i}", "us", f"product {i} title", f"brand{i}" if i % 3 else None) for i in range(1, 12)]
    products += [("P1", "es", "cable usb tipo c", "marca"), ("P12", "us", "", None)]  # no text: not an ad
    pd.DataFrame(
        [{"product_id": p, "product_locale": loc, "product_title": title, "product_description": None,
          "product_bullet_point": None, "product_brand": brand, "product_color": None}
         for p, loc, title, brand in products]
    ).to_parquet(os.path.join(folder, prepare_data.ESCI_FILES[1]))  # fmt: skip
    return folder


def test_esci_becomes_clicks_ads_and_graded_judgments_the_scripts_read(tmp_path, tiny_bert):
    source, output = write_esci(str(tmp_path / "esci")), str(tmp_path / "prepared")
    counts = prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", output,
                                "--batch_rows", "4"])  # fmt: skip
    assert counts == {"ads": 11, "clicks": 3, "label-free queries": 2, "test queries": 1}
    ids, texts = read_texts(os.path.join(output, "ads.parquet"), "id", "text")
    assert ids[:2] == ["P1", "P2"] and texts[0] == "product 1 title. brand1" and texts[2] == "product 3 title"
    clicks = pd.read_parquet(os.path.join(output, "clicks.parquet"))
    assert list(clicks["positive_id"]) == ["P1", "P4", "P5"]  # E only, us only
    assert list(clicks["negatives"][0]) == ["product 2 title. brand2"] and len(clicks["negatives"][2]) == 0
    assert read_qrels(os.path.join(output, "qrels.tsv")) == {"3": {"P7": 3, "P8": 2, "P9": 0, "P10": 1}}
    assert read_texts(os.path.join(output, "test_queries.parquet"), "id", "text") == (["3"], ["garden hose 50ft"])
    assert read_texts(os.path.join(output, "queries.parquet"), "id", "query")[1] == ["usb c cable", "red kettle"]
    # The teacher trains on the converted clicks as they are.
    train_teacher.main(["--model_name_or_path", tiny_bert, "--train_file", os.path.join(output, "clicks.parquet"),
                        "--max_train_steps", "1", "--per_device_train_batch_size", "2",
                        "--output_dir", str(tmp_path / "teacher")])  # fmt: skip
    # Other locale; replacing needs --overwrite_output_dir; a folder of the user's is never written into.
    with pytest.raises(UserError, match="pass --overwrite_output_dir"):
        prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", output])
    with pytest.raises(UserError, match=r"gave no rows for ads\.parquet, clicks\.parquet"):
        prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", output, "--locale", "jp",
                           "--overwrite_output_dir"])  # fmt: skip
    assert read_qrels(os.path.join(output, "qrels.tsv")) == {"3": {"P7": 3, "P8": 2, "P9": 0, "P10": 1}}  # intact
    assert sorted(os.listdir(output)) == sorted(prepare_data.OUTPUTS)  # no partial files left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="did not write"):
        prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", str(tmp_path / "mine"),
                           "--overwrite_output_dir"])  # fmt: skip
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_beir_folder_such_as_ms_marco_becomes_the_projects_files(tmp_path):
    source = tmp_path / "msmarco"
    (source / "qrels").mkdir(parents=True)
    corpus = [{"_id": str(i), "title": "", "text": f"passage {i} about topic {i % 3}"} for i in range(10)]
    (source / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    queries = [{"_id": f"q{i}", "text": f"what is topic {i}"} for i in range(5)]
    (source / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (source / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\t0\t1\nq0\t3\t1\nq1\t1\t1\n")
    (source / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq3\t0\t1\nq4\t4\t2\n")
    output = str(tmp_path / "prepared")
    counts = prepare_data.main(["--dataset", "beir", "--beir_dir", str(source), "--test_split", "dev",
                                "--output_dir", output, "--batch_rows", "3"])  # fmt: skip
    assert counts == {"ads": 10, "clicks": 3, "label-free queries": 2, "test queries": 2}
    ids, texts = read_texts(os.path.join(output, "ads.parquet"), "id", "text")
    assert ids == [str(i) for i in range(10)] and texts[4] == "passage 4 about topic 1"
    assert scan_corpus(os.path.join(output, "ads.parquet"), "id", "text", batch_rows=4)[0] == ids
    clicks = pd.read_parquet(os.path.join(output, "clicks.parquet"))
    assert list(zip(clicks["query"], clicks["positive_id"])) == [("what is topic 0", "0"), ("what is topic 0", "3"),
                                                                 ("what is topic 1", "1")]  # fmt: skip
    assert read_qrels(os.path.join(output, "qrels.tsv")) == {"q3": {"0": 1}, "q4": {"4": 2}}
    with pytest.raises(UserError, match="header must be query-id"):
        (source / "qrels" / "test.tsv").write_text("q\td\ts\n")
        prepare_data.main(["--dataset", "beir", "--beir_dir", str(source), "--output_dir", str(tmp_path / "x")])


def test_esci_merged_on_the_hub_converts_as_the_github_files_do(tmp_path):
    """--esci_hub: ESCI as tasksource/esci publishes it (one row per judgment with the product's fields, labels
    spelled out, splits train/test), here a local folder in that layout read by the same datasets call; the
    outputs equal the conversion of the two GitHub files holding the same rows."""
    source = write_esci(str(tmp_path / "esci"))
    examples = pd.read_parquet(os.path.join(source, prepare_data.ESCI_FILES[0]))
    products = pd.read_parquet(os.path.join(source, prepare_data.ESCI_FILES[1]))
    merged = examples.merge(products, on=["product_id", "product_locale"], how="left")
    merged["esci_label"] = merged["esci_label"].map({"E": "Exact", "S": "Substitute", "C": "Complement",
                                                     "I": "Irrelevant"})  # fmt: skip
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        part = merged[merged["split"] == split].drop(columns=["split"])
        part.to_parquet(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    # P12 (no text) is in no judgment, so the hub has no row for it; the GitHub conversion never makes it an ad
    local, hub = str(tmp_path / "from-github"), str(tmp_path / "from-hub")
    prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", local])
    counts = prepare_data.main(["--dataset", "esci", "--esci_hub", str(tmp_path / "hub"), "--output_dir", hub,
                                "--batch_rows", "5"])  # fmt: skip
    assert counts == {"ads": 10, "clicks": 3, "label-free queries": 2, "test queries": 1}  # P11 is es, P12 absent
    for name in ("clicks.parquet", "queries.parquet", "test_queries.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(os.path.join(hub, name)), pd.read_parquet(os.path.join(local, name))
        )
    assert read_qrels(os.path.join(hub, "qrels.tsv")) == read_qrels(os.path.join(local, "qrels.tsv"))
    hub_ads = dict(zip(*read_texts(os.path.join(hub, "ads.parquet"), "id", "text")))
    local_ads = dict(zip(*read_texts(os.path.join(local, "ads.parquet"), "id", "text")))
    assert hub_ads == {key: value for key, value in local_ads.items() if key != "P11"}  # P11: judged in es only
    assert sorted(os.listdir(hub)) == sorted(prepare_data.OUTPUTS)  # the download was removed
    with pytest.raises(UserError, match=r"either --esci_dir .* or --esci_hub"):
        prepare_data.main(
            ["--dataset", "esci", "--esci_dir", source, "--esci_hub", "x/y", "--output_dir", str(tmp_path / "z")]
        )


def test_a_beir_data_set_on_the_hub_converts_as_its_folder_does(tmp_path):
    """--beir_hub: BeIR/msmarco's layout (configs corpus and queries; judgments in <id>-qrels with the dev split
    named validation), here local folders in that layout read by the same datasets calls."""
    corpus = [{"_id": str(i), "title": "", "text": f"passage {i} about topic {i % 3}"} for i in range(10)]
    queries = [{"_id": f"q{i}", "text": f"what is topic {i}"} for i in range(5)]
    train, dev = (
        "query-id\tcorpus-id\tscore\nq0\t0\t1\nq0\t3\t1\nq1\t1\t1\n",
        "query-id\tcorpus-id\tscore\nq3\t0\t1\nq4\t4\t2\n",
    )
    folder = tmp_path / "msmarco"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (folder / "qrels" / "train.tsv").write_text(train)
    (folder / "qrels" / "dev.tsv").write_text(dev)
    hub = tmp_path / "hub" / "msmarco"
    hub.mkdir(parents=True)
    (hub / "corpus.jsonl").write_text((folder / "corpus.jsonl").read_text())
    (hub / "queries.jsonl").write_text((folder / "queries.jsonl").read_text())
    (hub / "README.md").write_text(
        "---\nconfigs:\n- config_name: corpus\n  data_files:\n  - split: corpus\n    path: corpus.jsonl\n"
        "- config_name: queries\n  data_files:\n  - split: queries\n    path: queries.jsonl\n---\n"
    )
    qrels = tmp_path / "hub" / "msmarco-qrels"
    qrels.mkdir()
    (qrels / "train.tsv").write_text(train)
    (qrels / "dev.tsv").write_text(dev)
    local, from_hub = str(tmp_path / "from-folder"), str(tmp_path / "from-hub")
    prepare_data.main(["--dataset", "beir", "--beir_dir", str(folder), "--test_split", "dev", "--output_dir", local])
    counts = prepare_data.main(["--dataset", "beir", "--beir_hub", str(hub), "--test_split", "dev",
                                "--output_dir", from_hub])  # fmt: skip
    assert counts == {"ads": 10, "clicks": 3, "label-free queries": 2, "test queries": 2}
    for name in ("ads.parquet", "clicks.parquet", "queries.parquet", "test_queries.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(from_hub, name)),
                                      pd.read_parquet(os.path.join(local, name)))  # fmt: skip
    assert read_qrels(os.path.join(from_hub, "qrels.tsv")) == read_qrels(os.path.join(local, "qrels.tsv"))
    with pytest.raises(UserError, match="Could not load"):
        prepare_data.main(["--dataset", "beir", "--beir_hub", str(hub), "--beir_qrels_hub", str(tmp_path / "none"),
                           "--output_dir", str(tmp_path / "x")])  # fmt: skip
    assert not os.path.exists(tmp_path / "x" / "ads.parquet")


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated", "is not a readable parquet file"),
        ("not parquet", "is not a readable parquet file"),
        ("wrong schema", "has no column esci_label"),
    ],
)
def test_a_damaged_or_wrong_esci_file_is_refused_in_one_sentence(damage, expected, tmp_path):
    source = write_esci(str(tmp_path / "esci"))
    examples = Path(source, prepare_data.ESCI_FILES[0])
    if damage == "truncated":
        examples.write_bytes(examples.read_bytes()[: examples.stat().st_size // 2])
    elif damage == "not parquet":
        examples.write_text("query_id,query\n1,a\n")
    else:
        pd.read_parquet(examples).drop(columns=["esci_label"]).to_parquet(examples)
    with pytest.raises(UserError, match=expected) as refused:
        prepare_data.main(["--dataset", "esci", "--esci_dir", source, "--output_dir", str(tmp_path / "out")])
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_beir_files_that_start_with_a_byte_order_mark_convert_as_without_one(tmp_path):
    """A byte-order mark (Windows editors write one) is neither part of the first JSON line nor of the qrels
    header: the files convert exactly as the same files without it."""
    outputs = {}
    for name, mark in (("plain", ""), ("marked", "\ufeff")):
        source = tmp_path / name
        (source / "qrels").mkdir(parents=True)
        corpus = [{"_id": str(i), "title": "", "text": f"passage {i}"} for i in range(4)]
        (source / "corpus.jsonl").write_text(mark + "".join(json.dumps(row) + "\n" for row in corpus), "utf-8")
        (source / "queries.jsonl").write_text(mark + json.dumps({"_id": "q0", "text": "what"}) + "\n", "utf-8")
        for split in ("train", "test"):
            (source / "qrels" / f"{split}.tsv").write_text(mark + "query-id\tcorpus-id\tscore\nq0\t1\t1\n", "utf-8")
        output = str(tmp_path / f"{name}-prepared")
        outputs[name] = prepare_data.main(["--dataset", "beir", "--beir_dir", str(source), "--output_dir", output])
        assert read_qrels(os.path.join(output, "qrels.tsv")) == {"q0": {"1": 1}}
    assert outputs["marked"] == outputs["plain"] == {"ads": 4, "clicks": 1, "label-free queries": 1,
                                                     "test queries": 1}  # fmt: skip
