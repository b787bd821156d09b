"""The graph regulariser: the term by hand, N processes = 1 process, the graph file's checks, the draws, a graph
over queries turned into targets by hand, and the flags of phases 1 and 3 on the demo data's ad and query graphs."""

import json
import math
import os
import re

import pytest
import torch
from conftest import run_on_two_gloo_ranks

import refine_contrastive
import train_teacher
from common.errors import UserError
from common.graph import draw_neighbours, read_graph, read_query_graph
from common.loss import contrastive_loss, graph_loss

NODES = {"a": 0, "b": 1, "c": 2, "7": 3, "92": 4}


def find(ids):
    return [NODES.get(item_id, -1) for item_id in ids]


def nll(scores, label):
    return -(scores[label] - math.log(sum(math.exp(s) for s in scores)))


def test_graph_term_by_hand():
    """Anchor 0 has neighbours n00 (weight 1) and n01 (weight 3), anchor 1 one neighbour n10 and a padding row."""
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    neighbours = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])  # n00 n01 n10 padding
    weights = torch.tensor([1.0, 3.0, 2.0, 0.0])
    candidates = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])  # c0: anchor 0's clicked ad; c1 another ad
    loss = graph_loss(
        anchors,
        neighbours,
        weights,
        temperature=0.5,
        anchor_keys=torch.tensor([100, 101]),
        neighbour_keys=torch.tensor([10, 11, 12, 101]),
        candidates=candidates,
        candidate_keys=torch.tensor([100, 7]),
    )
    # Columns n00 n01 n10 pad c0 c1. Anchor 0: its own neighbours (other than the target), its clicked ad c0 and
    # the padding are no negatives, so pair (0, 0) ranks n00 against n10 and c1; pair (0, 1) n01 against n10, c1.
    # Anchor 1 (clicked ad key 101 = the padding's key): n10 against n00, n01, c0 and c1.
    t = 0.5
    pair_00 = nll([0.8 / t, 0.0 / t, -0.6 / t], 0)
    pair_01 = nll([0.6 / t, 0.0 / t, -0.6 / t], 0)
    pair_10 = nll([1.0 / t, 0.6 / t, 0.8 / t, 0.0 / t, 0.8 / t], 0)
    expected = (0.25 * pair_00 + 0.75 * pair_01 + 1.0 * pair_10) / 2  # per-anchor weights; 2 anchors count
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_anchors_without_neighbours_do_not_count_and_none_gives_zero():
    generator = torch.Generator().manual_seed(1)
    anchors = torch.nn.functional.normalize(torch.randn(3, 4, generator=generator), dim=1).requires_grad_(True)
    neighbours = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=1)
    candidates = torch.nn.functional.normalize(torch.randn(2, 4, generator=generator), dim=1)
    only_anchor_0 = torch.tensor([1.0, 0, 0, 0, 0, 0])  # anchors 1 and 2 have no neighbour
    loss = graph_loss(
        anchors, neighbours, only_anchor_0, temperature=1.0, anchor_keys=torch.tensor([90, 91, 92]),
        neighbour_keys=torch.arange(6), candidates=candidates, candidate_keys=torch.tensor([50, 51]),
    )  # fmt: skip
    scores = (anchors[0] @ torch.cat([neighbours[:1], candidates]).T).tolist()
    assert loss.item() == pytest.approx(nll(scores, 0), abs=1e-5)  # divided by 1 anchor, not 3
    none = graph_loss(
        anchors, neighbours, torch.zeros(6), temperature=1.0, anchor_keys=torch.tensor([90, 91, 92]),
        neighbour_keys=torch.arange(6),
    )  # fmt: skip
    assert none.item() == 0.0 and none.requires_grad


def test_drawn_neighbours_are_not_negatives_in_the_main_loss():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    keys = dict(positive_keys=torch.tensor([1, 2]), negative_keys=torch.tensor([3, 4]))
    plain, _ = contrastive_loss(queries, positives, negatives, temperature=1.0, false_negative_margin=None, **keys)
    masked, _ = contrastive_loss(
        queries,
        positives,
        negatives,
        temperature=1.0,
        false_negative_margin=None,
        not_negative_keys=torch.tensor([[3, 2], [2, 2]]),
        **keys,
    )  # fmt: skip query 0: the ad of key 3 and the other positive (key 2) are graph neighbours of its clicked ad
    row0 = [1.0, 0.6]  # p0, n1 (p1 and n0 masked)
    row1 = [1.0, 0.0, 0.8, 0.6]  # p1 (its own key padding masks nothing new), p0, n0, n1
    expected = (nll(row0, 0) + nll(row1, 0)) / 2
    assert masked.item() == pytest.approx(expected, abs=1e-6) and plain.item() > masked.item()


def _batch():
    generator = torch.Generator().manual_seed(0)
    unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, 5, generator=generator), dim=1)  # noqa: E731
    anchors, neighbours, candidates = unit(4), unit(8), unit(4)
    # Rank 0 (anchors 0, 1) has 3 weighted pairs; rank 1 (anchors 2, 3) one pair only, so the two ranks' shares of
    # the pairs differ, and a mean per rank would be wrong.
    weights = torch.tensor([1.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    keys = torch.arange(8) + 10
    return anchors, neighbours, weights, torch.arange(4) + 100, keys, candidates, torch.arange(4) + 200


def _graph_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    anchors, neighbours, weights, anchor_keys, keys, candidates, candidate_keys = _batch()
    a, n = slice(2 * rank, 2 * rank + 2), slice(4 * rank, 4 * rank + 4)
    local = [anchors[a].clone().requires_grad_(True), neighbours[n].clone().requires_grad_(True),
             candidates[a].clone().requires_grad_(True)]  # fmt: skip
    loss = graph_loss(local[0], local[1], weights[n], temperature=0.1, anchor_keys=anchor_keys[a],
                      neighbour_keys=keys[n], candidates=local[2], candidate_keys=candidate_keys[a])  # fmt: skip
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [t.grad for t in local]}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_graph_term_on_two_processes_equals_one(tmp_path):
    run_on_two_gloo_ranks(_graph_worker, tmp_path)
    anchors, neighbours, weights, anchor_keys, keys, candidates, candidate_keys = _batch()
    full = [anchors.clone().requires_grad_(True), neighbours.clone().requires_grad_(True),
            candidates.clone().requires_grad_(True)]  # fmt: skip
    loss = graph_loss(full[0], full[1], weights, temperature=0.1, anchor_keys=anchor_keys, neighbour_keys=keys,
                      candidates=full[2], candidate_keys=candidate_keys)  # fmt: skip
    loss.backward()
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    # What DDP and the logs do: the mean over the processes.
    assert (results[0]["loss"] + results[1]["loss"]).item() / 2 == pytest.approx(loss.item(), abs=1e-5)
    for rank, result in enumerate(results):
        for local_grad, tensor, rows in zip(result["grads"], full, (2, 4, 2)):
            torch.testing.assert_close(
                local_grad / 2, tensor.grad[rank * rows : rank * rows + rows], atol=1e-6, rtol=1e-5
            )


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


COLUMNS = ("node_id", "neighbor_id", "weight")
HEADER = "node_id\tneighbor_id\tweight\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (HEADER + "a\tb\t1\na\tz\t1\n", r"g.tsv line 3, column 'neighbor_id': id 'z' is not a known node; drop the"),
        (HEADER + "a\tb\t1\nc\tc\t2\n", r"g.tsv line 3: node 'c' links to itself; drop the row"),
        (HEADER + "a\tb\t1\nb\ta\t1\na\tb\t2\n", r"g.tsv line 4 repeats the edge of line 2; keep one row per edge"),
        (HEADER + "a\tb\t0\n", r"g.tsv line 2, column 'weight': weight '0' is not a number > 0"),
        (HEADER + "a\tb\t-1.5\n", r"line 2, column 'weight': weight '-1.5' is not a number > 0"),
        (HEADER + "a\tb\tnan\n", r"line 2, column 'weight': weight 'nan' is not a number > 0"),
        (HEADER + "a\tb\t\n", r"line 2, column 'weight': weight '' is not a number > 0; fix it, drop the row, or drop"),
        ("source\ttarget\tweight\na\tb\t1\n", r"line 1: the header \(source, target, weight\) has no column 'node_id', "
         r"'neighbor_id' for the node and neighbour ids; rename the columns or name them with --graph_node_column"),
        ("7\t92\t1\n92\t7\t1\n", r"line 1: the header \(7, 92, 1\) .* it has no header line: add one"),
        (HEADER + "a\tb\n", r"line 2: 2 cells under a header of 3 columns"),
        (HEADER, r"has a header but no edge"),
        (HEADER + "a\t\t1\n", r"line 2, column 'neighbor_id': '' is not an id"),
    ],
)  # fmt: skip
def test_a_bad_graph_file_gets_one_sentence_naming_file_row_and_fix(tmp_path, text, message):
    path = write(tmp_path, "g.tsv", text)
    with pytest.raises(UserError, match=message):
        read_graph(path, find, len(NODES), columns=COLUMNS, what="a known node")


def test_graph_files_of_every_type_read_the_same_csr(tmp_path):
    edges = [("a", "b", 1.0), ("a", "c", 3.0), ("b", "a", 1.0), ("92", "7", 2.0)]
    tsv = write(tmp_path, "g.tsv", HEADER + "".join(f"{s}\t{t}\t{w:g}\n" for s, t, w in edges))
    csv = write(tmp_path, "g.csv", "neighbor_id,node_id\n" + "".join(f"{t},{s}\n" for s, t, _ in edges))
    jsonl = write(tmp_path, "g.jsonl", "".join(json.dumps({"node_id": s, "neighbor_id": t, "weight": w}) + "\n"
                                               for s, t, w in edges))  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = str(tmp_path / "g.parquet")
    columns = {"node_id": [s for s, *_ in edges], "neighbor_id": [t for _, t, _ in edges],
               "weight": [w for *_, w in edges]}  # fmt: skip
    pq.write_table(pa.table(columns), parquet)
    graphs = [read_graph(path, find, len(NODES), columns=COLUMNS, what="a node") for path in (tsv, jsonl, parquet)]
    for graph in graphs:
        assert graph.offsets.tolist() == [0, 2, 3, 3, 3, 4] and graph.targets.tolist() == [1, 2, 0, 3]
        assert graph.weights.tolist() == [1.0, 3.0, 1.0, 2.0]
    unweighted = read_graph(csv, find, len(NODES), columns=COLUMNS, what="a node")  # no weight column: weight 1
    assert unweighted.targets.tolist() == graphs[0].targets.tolist() and unweighted.weights.tolist() == [1.0] * 4
    assert graphs[0].fingerprint() == graphs[2].fingerprint() != unweighted.fingerprint()


def test_neighbours_are_drawn_by_weight_without_replacement_and_padded(tmp_path):
    rows = "".join(f"a\t{t}\t{w}\n" for t, w in (("b", 1), ("c", 8), ("7", 1))) + "b\ta\t1\n"
    graph = read_graph(write(tmp_path, "g.tsv", HEADER + rows), find, len(NODES), columns=COLUMNS, what="a node")
    drawn, _ = draw_neighbours(graph, [0] * 2000, 1, seed=3, keys=range(2000))
    share_of_c = float((drawn[:, 0] == 2).mean())
    assert 0.72 < share_of_c < 0.88  # 8 / 10 of the weight
    uniform, _ = draw_neighbours(graph, [0] * 2000, 1, seed=3, keys=range(2000), weighted=False)
    assert 0.28 < float((uniform[:, 0] == 2).mean()) < 0.39
    two, two_weights = draw_neighbours(graph, [0, 1, 2], 2, seed=3, keys=[5, 6, 7])
    assert len(set(two[0].tolist())) == 2 and set(two[0].tolist()) <= {1, 2, 3}  # distinct neighbours of a
    assert two[1].tolist() == [0, -1] and two_weights[1].tolist() == [1.0, 0.0]  # b has one neighbour: padded
    assert two[2].tolist() == [-1, -1] and two_weights[2].tolist() == [0.0, 0.0]  # c has none
    again, _ = draw_neighbours(graph, [0, 1, 2], 2, seed=3, keys=[5, 6, 7])
    assert (again == two).all()  # a function of (seed, key) only: any process, any worker, a resumed run


def test_a_query_graph_gives_each_query_the_ads_its_neighbours_clicked(tmp_path):
    # Queries A..E (A twice) clicked ads 0..3; each neighbour's edge weight is split over the ads it clicked.
    edges = "A\tB\t2\nA\tC\t1\nB\tA\t1\nD\tA\t4\nE\tA\t1\nE\tB\t1\n"
    path = write(tmp_path, "sessions.tsv", HEADER + edges)
    graph, query_nodes = read_query_graph(path, ["A", "A", "B", "C", "D", "E"], [0, 1, 1, 2, 3, 3], columns=COLUMNS,
                                          what="a training query")  # fmt: skip
    assert query_nodes.tolist() == [0, 0, 1, 2, 3, 4]
    # A: B clicked only ad 1, which A clicked itself (already its positive); C clicked ad 2 -> (2, 1).
    # B: A clicked ads 0 and 1 (weight 1 / 2 each); ad 1 is B's own -> (0, 0.5).  C: no edge.
    # D: A at weight 4 -> ads 0 and 1 at 2 each.  E: A (1) -> 0.5 to each of 0, 1; B (1) -> 1 to ad 1: summed 1.5.
    assert graph.offsets.tolist() == [0, 1, 2, 2, 4, 6]
    assert graph.targets.tolist() == [2, 0, 0, 1, 0, 1]
    assert graph.weights.tolist() == [1.0, 0.5, 2.0, 2.0, 0.5, 1.5]
    assert graph.file_edges == 6  # the file's edges between queries, which the log reports beside the 6 targets
    with pytest.raises(UserError, match=r"sessions.tsv line 2, column 'neighbor_id': id 'Z' is not a training query"):
        read_query_graph(write(tmp_path, "sessions.tsv", HEADER + "A\tZ\t1\n"), ["A"], [0], columns=COLUMNS,
                         what="a training query")  # fmt: skip
    with pytest.raises(UserError, match=r"gone.tsv' does not exist; check --query_graph_file"):
        read_query_graph(str(tmp_path / "gone.tsv"), ["A"], [0], columns=COLUMNS, what="a training query")


QUERY_GRAPH_LOG = (
    r"query_graph.tsv: \d+ edges between queries, giving \d+ query -> ad targets; \d+ of 96 training rows "
    r"\([\d.]+%\) have a query with"
)


def test_refinement_with_the_demo_query_graph(small_data, tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO", logger="harness")
    args = ["--student_model", tiny_bert, "--teacher_model", tiny_bert, "--train_file", small_data["train"],
            "--corpus_file", small_data["ads"], "--store_dir", str(tmp_path / "stores"), "--max_train_steps", "2",
            "--per_device_train_batch_size", "16", "--num_random_negatives", "8", "--logging_steps", "1",
            "--query_graph_file", small_data["query_graph"]]  # fmt: skip
    results = refine_contrastive.main([*args, "--output_dir", str(tmp_path / "queries")])
    assert re.search(QUERY_GRAPH_LOG, caplog.text)
    assert results["train_graph_loss"] > 0 and math.isfinite(results["train_loss"])
    both = refine_contrastive.main([*args, "--ad_graph_file", small_data["ad_graph"], "--output_dir",
                                    str(tmp_path / "both")])  # fmt: skip
    assert both["train_graph_loss"] != results["train_graph_loss"]
    no_ids = write(tmp_path, "no_ids.jsonl", "".join(json.dumps({"query": f"q {i}", "positive_id": "ad00000"}) + "\n"
                                                     for i in range(32)))  # fmt: skip
    with pytest.raises(UserError, match=r"no_ids.jsonl has no column 'query_id'.*--query_id_column \(needed by"):
        refine_contrastive.main([*args, "--train_file", no_ids, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(UserError, match=r"--query_graph_file names the queries of --train_file; pseudo-clicks"):
        refine_contrastive.main([*args, "--pseudo_queries", "first_sentence", "--output_dir", str(tmp_path / "y")])
    assert not os.path.exists(tmp_path / "x" / "model.safetensors") and not os.path.exists(tmp_path / "y")


def test_teacher_with_the_demo_query_graph(small_data, tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO", logger="harness")
    args = ["--model_name_or_path", tiny_bert, "--max_train_steps", "2", "--per_device_train_batch_size", "16",
            "--train_file", small_data["train"], "--query_graph_file", small_data["query_graph"]]  # fmt: skip
    results = train_teacher.main([*args, "--output_dir", str(tmp_path / "queries")])  # the ads are the positives
    assert re.search(QUERY_GRAPH_LOG, caplog.text)
    assert results["train_graph_loss"] > 0
    both = train_teacher.main([*args, "--ad_graph_file", small_data["ad_graph"], "--corpus_file", small_data["ads"],
                               "--output_dir", str(tmp_path / "both")])  # fmt: skip
    assert both["train_graph_loss"] > 0 and both["train_graph_loss"] != results["train_graph_loss"]


def test_refinement_with_the_demo_ad_graph(small_data, tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO", logger="harness")
    args = ["--student_model", tiny_bert, "--teacher_model", tiny_bert, "--train_file", small_data["train"],
            "--corpus_file", small_data["ads"], "--store_dir", str(tmp_path / "stores"), "--max_train_steps", "3",
            "--per_device_train_batch_size", "16", "--num_random_negatives", "8", "--logging_steps", "1"]  # fmt: skip
    results = refine_contrastive.main([*args, "--ad_graph_file", small_data["ad_graph"], "--output_dir",
                                       str(tmp_path / "graph")])  # fmt: skip
    assert "training rows (38.5%) have a clicked ad with neighbours" in caplog.text
    assert results["train_graph_loss"] > 0 and math.isfinite(results["train_loss"])
    plain = refine_contrastive.main([*args, "--output_dir", str(tmp_path / "plain")])
    assert "train_graph_loss" not in plain and plain["train_loss"] != results["train_loss"]
    bad = write(tmp_path, "bad.tsv", HEADER + "ad00000\tad99999\t1\n")
    with pytest.raises(UserError, match=r"bad.tsv line 2, column 'neighbor_id': id 'ad99999' is not an ad of the ad"):
        refine_contrastive.main([*args, "--ad_graph_file", bad, "--output_dir", str(tmp_path / "bad")])
    assert not os.path.exists(tmp_path / "bad" / "model.safetensors")


def test_teacher_with_the_demo_ad_graph(small_data, tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO", logger="harness")
    args = ["--model_name_or_path", tiny_bert, "--max_train_steps", "2", "--per_device_train_batch_size", "16",
            "--ad_graph_file", small_data["ad_graph"]]  # fmt: skip
    results = train_teacher.main([*args, "--train_file", small_data["train"], "--corpus_file", small_data["ads"],
                                  "--output_dir", str(tmp_path / "graph")])  # fmt: skip
    assert "training rows (38.5%) have a positive with neighbours" in caplog.text and results["train_graph_loss"] > 0
    # Without the corpus, the graph may only name training ads; the demo graph names others.
    with pytest.raises(UserError, match=r"ad_graph.tsv line \d+, column '\w+': id 'ad\d+' is not the id of a positive"):
        train_teacher.main([*args, "--train_file", small_data["train"], "--output_dir", str(tmp_path / "w")])

    def jsonl(name, rows):
        return write(tmp_path, name, "".join(json.dumps(row) + "\n" for row in rows))

    without_ids = jsonl("no_ids.jsonl", [{"query": f"query {i}", "positive": f"ad {i}"} for i in range(32)])
    with pytest.raises(UserError, match=r"no_ids.jsonl has no column 'positive_id'.*--positive_id_column \(needed by"):
        train_teacher.main([*args, "--train_file", without_ids, "--output_dir", str(tmp_path / "x")])
    rows = [{"query": f"query {i}", "positive": f"ad {i}", "positive_id": "ad00001"} for i in range(32)]
    with pytest.raises(UserError, match=r"two_texts.jsonl row 1: ad id 'ad00001' has another text than in an earlier"):
        train_teacher.main([*args, "--train_file", jsonl("two_texts.jsonl", rows), "--output_dir", str(tmp_path / "y")])
    with pytest.raises(UserError, match=r"two_texts.jsonl row 0: ad id 'ad00001' has another text than in .*ads.jsonl"):
        train_teacher.main([*args, "--train_file", jsonl("two_texts.jsonl", rows), "--corpus_file", small_data["ads"],
                            "--output_dir", str(tmp_path / "z")])  # fmt: skip


def test_the_graph_study_table_pairs_each_variant_with_the_run_without_the_graph_of_its_seed(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import graph_study

    def row(variant, seed, ndcg, top10):
        return {"dataset": "cisi", "phase": "refine", "graph": variant, "seed": seed, "train_s": 10.0, "steps": 5,
                "ndcg@10": ndcg, "recall@100": [1.0, 1.0], "top10": top10}  # fmt: skip

    path = str(tmp_path / "rows.jsonl")
    ten, other = [list("abcdefghij")], [list("abcdeFGHIJ")]
    graph_study.save_rows(path, [row(False, 0, [0.4, 0.6], ten), row(True, 0, [0.6, 0.6], other)])
    graph_study.save_rows(path, [row("none", 1, [0.5, 0.5], ten), row("graph", 1, [0.5, 0.5], ten)])
    rows = graph_study.read_rows(path)
    assert sorted(r["graph"] for r in rows) == ["graph", "graph", "none", "none"]  # the first rows said true/false
    table = graph_study.render_table(rows, samples=200)
    assert "| none | 2 | 0.5000 (0.0000) | 1.0000 (0.0000) | 10 |" in table
    assert "| graph | 2 | 0.5500 (0.0707) |" in table
    assert "| graph | 0 | 1.200 [1.000, 1.500] | 1.000 [1.000, 1.000] | 0.500 |" in table  # 0.6 / 0.5; 5 of 10 shared
    assert "| graph | 1 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 |" in table
