"""Host/device boundaries of every training step, caught on a CPU-only machine.

On a GPU the prepared data loader moves each batch to the device, while vectors read from a store during the
step are in host memory: an operation that joins the two fails ("Expected all tensors to be on the same
device"). The `meta` device fails the same way when a CPU tensor meets a meta one, so these tests hand each
script's loss function its batch on `meta` (moved by accelerate's own `send_to_device`, as the prepared loader
does) and the model behind a boundary that runs the real encoder on the CPU and returns its outputs on `meta`.
Any host tensor that reaches the loss without being moved raises here as it would on a GPU.
"""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn

import distill_student
import refine_contrastive
import train_teacher
from common.alignment import parse_objectives
from common.data import read_texts
from common.encoder import Encoder
from common.grad_cache import embed_without_graph
from common.graph import read_graph
from common.store import build_store, rows_of_lists

DEVICE = torch.device("meta")


class OnDevice(nn.Module):
    """A real encoder as it looks from a GPU step: its inputs must be on the device, and its outputs are there.

    The inputs must already be on `meta` (a host tensor reaching the model is the bug); the encoder then runs on
    the CPU on inputs of the same shapes (meta tensors hold no values) and its outputs are moved to `meta`."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.tokenize = encoder.tokenize  # host tensors: the loss moves them to the device

    def forward(self, **inputs):
        host_inputs = {}
        for name, value in inputs.items():
            if torch.is_tensor(value):
                assert value.device == DEVICE, f"{name} reached the model on {value.device}, not on the device"
                value = torch.ones(value.shape, dtype=value.dtype)  # token id 1, attention everywhere
            host_inputs[name] = value
        outputs = self.encoder(**host_inputs)
        if isinstance(outputs, tuple):
            return tuple(output.detach().to(DEVICE) for output in outputs)
        return outputs.detach().to(DEVICE)


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.from_pretrained(tiny_bert, dtype="float32")


@pytest.fixture(scope="module")
def ad_store(encoder, small_data, tmp_path_factory):
    ids, texts = read_texts(small_data["ads"], "id", "text")
    folder = str(tmp_path_factory.mktemp("stores") / "ads")
    return build_store(Accelerator(cpu=True), encoder, rows_of_lists(ids, texts), "ad", folder)


def test_refinement_step_moves_store_reads_to_the_device(encoder, ad_store):
    store = ad_store
    args = refine_contrastive.parse_args(["--num_hard_negatives", "2"])
    clicks = [{"query": f"query {i}", "positive": i, "negatives": [i + 1], "group": i} for i in range(4)]
    collate = refine_contrastive.ClickCollator(encoder, store, args.num_hard_negatives, args.seed)
    batch = send_to_device(collate(clicks), DEVICE)
    random_rows = np.arange(5, 13)
    random_vectors = torch.from_numpy(store.read(random_rows))  # what the step reads, in host memory
    loss, logs = refine_contrastive.refinement_loss(
        OnDevice(encoder), batch, random_vectors, refine_contrastive.ad_keys(store, random_rows), args
    )
    assert loss.device == DEVICE and logs["accuracy"].device == DEVICE


def test_refinement_step_with_an_ad_graph_moves_store_reads_to_the_device(encoder, ad_store, tmp_path):
    store = ad_store
    args = refine_contrastive.parse_args(["--graph_weight", "0.5", "--graph_neighbours", "2"])
    ids = store.ids_of(np.arange(6))
    edges = [(ids[0], ids[1]), (ids[0], ids[2]), (ids[0], ids[3]), (ids[1], ids[0])]  # 3 of 4 clicks: no neighbour
    path = tmp_path / "graph.tsv"
    path.write_text("node_id\tneighbor_id\n" + "".join(f"{a}\t{b}\n" for a, b in edges))
    graph = read_graph(str(path), store.find_rows, len(store), columns=("node_id", "neighbor_id", "weight"), what="ad")
    clicks = [{"query": f"query {i}", "positive": i, "negatives": [i + 1], "group": i} for i in range(4)]
    collate = refine_contrastive.ClickCollator(encoder, store, 1, args.seed, [(graph, "positive")], 2)
    batch = send_to_device(collate(clicks), DEVICE)
    random_rows = np.arange(5, 13)
    loss, logs = refine_contrastive.refinement_loss(
        OnDevice(encoder),
        batch,
        torch.from_numpy(store.read(random_rows)),
        refine_contrastive.ad_keys(store, random_rows),
        args,
    )
    assert loss.device == DEVICE and logs["graph_loss"].device == DEVICE


def test_teacher_step_with_an_ad_graph_stays_on_the_device(encoder, tmp_path):
    args = train_teacher.parse_args(["--graph_weight", "0.5", "--graph_neighbours", "2"])
    rows = [{"query": f"query {i}", "teacher_query": f"query {i}", "positive": f"ad {i}", "negatives": [],
             "group": None, "positive_node": i} for i in range(4)]  # fmt: skip
    path = tmp_path / "graph.tsv"
    path.write_text("node_id\tneighbor_id\tweight\n0\t1\t2\n0\t2\t1\n1\t0\t2\n")
    graph = read_graph(str(path), lambda ids: [int(i) for i in ids], 4, columns=("node_id", "neighbor_id", "weight"),
                       what="ad")  # fmt: skip
    graphs = [(graph, "positive_node")]  # the graph and the row field naming each row's node in it
    collate = train_teacher.PairCollator(encoder, 1, [f"ad {i}" for i in range(8)], args.seed, graphs, 2)
    collate.node_texts = {i: f"ad {i}" for i in range(4)}
    batch = send_to_device(collate(rows), DEVICE)
    loss, logs = train_teacher.teacher_loss(OnDevice(encoder)(**batch["inputs"]), batch, args)
    assert loss.device == DEVICE and logs["graph_loss"].device == DEVICE


@pytest.mark.parametrize(
    "mode", ["teacher vectors from a store", "with ranked ads", "teacher in the loop", "token loss"]
)
def test_distillation_step_moves_host_tensors_to_the_device(mode, encoder, ad_store):
    store = ad_store
    args = distill_student.parse_args([])
    args.alignment_loss = parse_objectives("l2+kl" if mode == "with ranked ads" else "l2")
    args.token_loss_weight = 1.0 if mode == "token loss" else 0.0
    texts = ["rent a kayak", "used laptops near me", "fix my phone screen"]
    # As both collate functions leave a batch: the student's inputs on the device (moved by the prepared loader
    # or by the streaming collate), the teacher's vectors in host memory, or its texts.
    batch = send_to_device(encoder.tokenize(texts, "query"), DEVICE)
    if mode == "teacher in the loop":
        batch["teacher_texts"] = texts
    else:
        batch["teacher_vectors"] = torch.from_numpy(store.read([0, 1, 2]))
    ranked = torch.from_numpy(store.read(np.arange(8))) if mode == "with ranked ads" else None
    teacher = OnDevice(encoder) if mode in ("teacher in the loop", "token loss") else None
    loss, logs = distill_student.distillation_loss(
        Accelerator(cpu=True), OnDevice(encoder), batch, args, teacher, ranked
    )
    assert loss.device == DEVICE and all(value.device == DEVICE for value in logs.values())


@pytest.mark.parametrize("grad_cache", [False, True])
def test_teacher_step_stays_on_the_device(grad_cache, encoder):
    args = train_teacher.parse_args(["--num_hard_negatives", "1"])
    rows = [
        {"query": f"query {i}", "teacher_query": f"query {i}", "positive": f"ad {i}", "negatives": [], "group": None}
        for i in range(4)
    ]
    collate = train_teacher.PairCollator(encoder, 1, [f"ad {i}" for i in range(8)], args.seed)
    batch = send_to_device(collate(rows), DEVICE)
    model = OnDevice(encoder)
    if grad_cache:
        vectors, _ = embed_without_graph(model, batch["inputs"], chunk_size=3)
    else:
        vectors = model(**batch["inputs"])
    loss, logs = train_teacher.teacher_loss(vectors, batch, args)
    assert loss.device == DEVICE and logs["accuracy"].device == DEVICE
