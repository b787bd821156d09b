"""The phase-2 study's selection rule (benchmarks/distill_study.py): leave one collection out, with seeds."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import distill_study


def runs(model, collection, recoveries):
    """One row per seed, with the same recovery of nDCG@10 and R@100."""
    return [
        {
            "collection": collection,
            "model": model,
            "seed": seed,
            "recovery ndcg@10": value,
            "recovery recall@100": value,
        }
        for seed, value in enumerate(recoveries)
    ]


def test_each_collection_is_scored_with_the_choice_made_on_the_others():
    # cut wins on a and b by a lot and loses on c: chosen when c is held out, not when a or b is.
    rows = [
        *runs("noads-default-2", "a", [0.90, 0.91, 0.92]),
        *runs("noads-default-2", "b", [0.90, 0.91, 0.92]),
        *runs("noads-default-2", "c", [0.95, 0.96, 0.97]),
        *runs("noads-cut-2", "a", [0.96, 0.97, 0.98]),
        *runs("noads-cut-2", "b", [0.92, 0.93, 0.94]),
        *runs("noads-cut-2", "c", [0.80, 0.81, 0.82]),
        *runs("noads-firstlast-2", "a", [0.99, 0.99, 0.99]),  # measured on one collection only: left out
    ]
    lines = distill_study.leave_one_out(rows)
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "noads-firstlast-2" not in "\n".join(lines)
    # held out a: on b and c default (0.91, 0.96) beats cut (0.93, 0.81), so default is scored on a: 91%
    assert "| a | noads-default-2 | 91.0% | 91.0% |" in table["a"]
    # held out b: on a and c default (0.91 + 0.96) / 2 = 0.935 beats cut (0.97 + 0.81) / 2 = 0.89
    assert "| b | noads-default-2 | 91.0% |" in table["b"]
    # held out c: on a and b cut (0.97, 0.93) beats default (0.91, 0.91): cut is scored on c, 81%
    assert "| c | noads-cut-2 | 81.0% |" in table["c"]
    assert table["mean"].startswith("| mean | | 87.7% |")
    assert "Chosen on all 3 collections: noads-default-2." in "\n".join(lines)
    assert any(line.startswith("noads-cut-2 does not beat noads-default-2") for line in lines)


@pytest.mark.parametrize("margin, verdict", [(0.05, "beats"), (0.005, "does not beat")])
def test_a_challenger_beats_the_default_only_by_more_than_the_spread_on_every_collection(margin, verdict):
    rows = []
    for collection in ("a", "b"):
        rows += runs("ads-default-3", collection, [0.90, 0.91, 0.92])  # sd 0.01
        rows += runs("ads-cut-3", collection, [0.90 + margin, 0.91 + margin, 0.92 + margin])
    lines = distill_study.leave_one_out(rows)
    assert f"ads-cut-3 {verdict} ads-default-3 on every collection by more than the spread" in "\n".join(lines)


def test_rows_of_earlier_runs_are_kept_and_a_row_measured_again_replaces_its_earlier_one(tmp_path):
    results_file = str(tmp_path / "results" / "rows.jsonl")
    first = [*runs("noads-cut-2", "a", [0.90, 0.91]), *runs("noads-cut-2", "b", [0.80])]
    distill_study.save_rows(results_file, first)
    again = runs("noads-cut-2", "a", [0.95])  # seed 0 of collection a measured again
    rows = distill_study.save_rows(results_file, again)
    by_key = {distill_study.row_key(row): row["recovery ndcg@10"] for row in rows}
    assert by_key == {("a", "noads-cut-2", 0): 0.95, ("a", "noads-cut-2", 1): 0.91, ("b", "noads-cut-2", 0): 0.80}
    assert not os.path.exists(results_file + ".tmp")


def test_with_one_seed_the_verdict_is_undecided():
    rows = [*runs("ads-default-2", "a", [0.90]), *runs("ads-cut-2", "a", [0.99])]
    rows += [*runs("ads-default-2", "b", [0.90]), *runs("ads-cut-2", "b", [0.99])]
    assert "ads-cut-2 against ads-default-2: undecided" in "\n".join(distill_study.leave_one_out(rows))


def test_phase_3_pseudo_queries_are_first_words_only_where_no_document_has_a_sentence_end(tmp_path):
    punctuated, unpunctuated = tmp_path / "cisi.jsonl", tmp_path / "npl.jsonl"
    punctuated.write_text('{"id": "1", "text": "A study of libraries. They keep books."}\n')
    unpunctuated.write_text('{"id": "1", "text": "compact memories have flexible capacities a digital data storage"}\n')
    assert distill_study.pseudo_queries(str(punctuated)) == "first_sentence"
    assert distill_study.pseudo_queries(str(unpunctuated)) == "first_words"
