"""mine_negatives.py: hard negatives by the model's own ranking, with the false-negative rules checked against
the model's scores computed here, and a file train_teacher.py trains on."""

import json

import numpy as np
import pandas as pd
import pytest

import mine_negatives
import train_teacher
from common.data import read_texts, text_key
from common.encoder import Encoder
from common.errors import UserError


def test_mined_negatives_pass_the_rules_and_train_the_teacher(small_data, tiny_bert, tmp_path):
    output = tmp_path / "mined"
    common = ["--model_name_or_path", tiny_bert, "--train_file", small_data["train"], "--corpus_file",
              small_data["ads"], "--num_negatives", "3", "--top_k", "200"]  # fmt: skip
    stats = mine_negatives.main([*common, "--margin", "0.02", "--output_dir", str(output)])
    mined = pd.read_parquet(output / "clicks.parquet")
    clicks = pd.read_json(small_data["train"], lines=True)
    assert len(mined) == len(clicks) and list(mined["query"]) == list(clicks["query"])
    assert stats == json.loads((output / "mining_stats.json").read_text())
    assert stats["candidates_examined"] == stats["negatives_kept"] + sum(stats["removed"].values())
    assert stats["removed"]["positive (same id or text)"] > 0 and stats["negatives_kept"] > len(clicks)
    # Groups of many ads (here: the advertiser, ~1 in 10 ads of the small data): an advertiser's other ads are
    # never negatives of its clicks.
    ads_frame = pd.read_json(small_data["ads"], lines=True).assign(group=lambda frame: frame["advertiser"])
    ads_frame.to_json(tmp_path / "ads.jsonl", orient="records", lines=True)
    advertiser = dict(zip(ads_frame["id"], ads_frame["advertiser"]))
    clicks.assign(group=clicks["positive_id"].map(advertiser)).to_json(tmp_path / "clicks.jsonl", orient="records",
                                                                        lines=True)  # fmt: skip
    by_advertiser = mine_negatives.main([
        "--model_name_or_path", tiny_bert, "--train_file", str(tmp_path / "clicks.jsonl"), "--corpus_file",
        str(tmp_path / "ads.jsonl"), "--num_negatives", "5", "--output_dir", str(tmp_path / "by-advertiser"),
    ])  # fmt: skip
    assert by_advertiser["removed"]["same group"] > 0
    grouped = pd.read_parquet(tmp_path / "by-advertiser" / "clicks.parquet")
    for _, row in grouped.iterrows():
        assert all(advertiser[ad] != row["group"] for ad in row["negative_ids"])

    # Every kept negative, checked with the model's scores computed here.
    model = Encoder.from_pretrained(tiny_bert)
    ad_ids, ad_texts = read_texts(small_data["ads"], "id", "text")
    ads = pd.read_json(small_data["ads"], lines=True).set_index("id")
    text_of = dict(zip(ad_ids, ad_texts))
    rows = mined.sample(20, random_state=0)
    queries = model.encode(list(rows["query"]), "query")
    positives = model.encode(list(rows["positive"]), "ad")
    for (_, row), query, positive in zip(rows.iterrows(), queries, positives):
        assert len(row["negative_ids"]) <= 3 and len(row["negatives"]) == len(row["negative_ids"])
        if len(row["negative_ids"]):
            vectors = model.encode([text_of[ad] for ad in row["negative_ids"]], "ad")
            assert (vectors @ query <= query @ positive - 0.02 + 1e-5).all()
        assert row["positive_id"] not in list(row["negative_ids"])
        assert all(text_key(text) != text_key(row["positive"]) for text in row["negatives"])
        assert all(ads.loc[ad, "group"] != row["group"] for ad in row["negative_ids"])
        assert list(row["negatives"]) == [text_of[ad] for ad in row["negative_ids"]]

    # The teacher trains on the mined file.
    train_teacher.main(["--model_name_or_path", tiny_bert, "--train_file", str(output / "clicks.parquet"),
                        "--num_hard_negatives", "3", "--max_train_steps", "1", "--per_device_train_batch_size", "4",
                        "--output_dir", str(tmp_path / "teacher")])  # fmt: skip

    # A margin no candidate passes removes them all; a finished run is not replaced without the flag.
    strict = mine_negatives.main([*common, "--margin", "10", "--output_dir", str(tmp_path / "strict")])
    assert strict["negatives_kept"] == 0 and strict["rows_with_fewer_than_num_negatives"] == strict["rows"]
    with pytest.raises(UserError, match="already holds a finished run"):
        mine_negatives.main([*common, "--output_dir", str(output)])
    relative = mine_negatives.main([*common, "--relative_margin", "0.5", "--output_dir", str(tmp_path / "relative"),
                                    "--store_dir", str(tmp_path / "stores")])  # fmt: skip
    assert relative["removed"]["margin"] > stats["removed"]["margin"] - 1 and np.isfinite(
        relative["mean_positive_score"]
    )
