"""Phase-2 objectives against hand computations, their parser, and 2 gloo processes = 1 process."""

import argparse
import math
import os

import pytest
import torch
from conftest import run_on_two_gloo_ranks

from common.alignment import alignment_loss, parse_objectives, token_state_loss

STUDENT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TEACHER = torch.tensor([[0.8, 0.6], [0.0, 1.0]])


def test_l2_and_cosine_by_hand():
    l2 = ((1 - 0.8) ** 2 + (0 - 0.6) ** 2 + (0.6 - 0) ** 2 + (0.8 - 1) ** 2) / 2
    assert alignment_loss(STUDENT, TEACHER, parse_objectives("l2")).item() == pytest.approx(l2)
    cosine = ((1 - 0.8) + (1 - 0.8)) / 2  # cos = <s, t> for unit vectors: 0.8 and 0.8
    assert alignment_loss(STUDENT, TEACHER, parse_objectives("cosine")).item() == pytest.approx(cosine)
    combined = alignment_loss(STUDENT, TEACHER, parse_objectives("l2 + 0.5*cosine")).item()
    assert combined == pytest.approx(l2 + 0.5 * cosine)


def test_kl_by_hand():
    tau = 0.5

    def softmax(row):
        exps = [math.exp(value / tau) for value in row]
        return [value / sum(exps) for value in exps]

    # Items are the teacher vectors of the batch: t1 = (.8, .6), t2 = (0, 1).
    teacher_scores = [[1.0, 0.6], [0.6, 1.0]]  # <t_i, t_j>
    student_scores = [[0.8, 0.0], [0.96, 0.8]]  # <s_i, t_j>
    expected = 0.0
    for target_row, student_row in zip(teacher_scores, student_scores):
        p, q = softmax(target_row), softmax(student_row)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    loss = alignment_loss(STUDENT, TEACHER, parse_objectives("kl"), temperature=tau)
    assert loss.item() == pytest.approx(expected / 2, abs=1e-6)
    assert alignment_loss(TEACHER, TEACHER, parse_objectives("kl")).item() == pytest.approx(0.0, abs=1e-6)


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def test_kernel_alignment_by_hand():
    """mean_ij (<s_i, s_j> - <t_i, t_j>)^2, the Gram matrices written out from the vectors."""
    # STUDENT and TEACHER differ in coordinates but not in structure: <s1, s2> = 0.6 = <t1, t2>.
    assert alignment_loss(STUDENT, TEACHER, parse_objectives("kernel")).item() == pytest.approx(0.0, abs=1e-7)
    student = [[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]]
    teacher = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    expected = sum((dot(s_i, s_j) - dot(t_i, t_j)) ** 2 for s_i, t_i in zip(student, teacher)
                   for s_j, t_j in zip(student, teacher)) / 9  # fmt: skip
    assert expected > 0.1  # (0 - 0.6)^2, (0.6 - 0.8)^2, (-0.8 - 0)^2, each twice: 2.08 / 9
    loss = alignment_loss(torch.tensor(student), torch.tensor(teacher), parse_objectives("kernel"))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", ["l3", "0*l2", "-1*kl", "l2+l2", "x*kl", ""])
def test_bad_objective_specs_are_refused(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_objectives(bad)


def _batch():
    generator = torch.Generator().manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1)
    return student, teacher


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    student, teacher = _batch()
    rows = slice(rank * 4, rank * 4 + 4)
    local = student[rows].clone().requires_grad_(True)
    loss = alignment_loss(local, teacher[rows], parse_objectives("l2+kl+kernel+cosine"), temperature=0.1)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_give_the_gradient_of_one(tmp_path):
    """Half the batch on each of 2 gloo ranks, gradients averaged as DDP does: the one-process gradient."""
    run_on_two_gloo_ranks(_worker, tmp_path)
    student, teacher = _batch()
    full = student.clone().requires_grad_(True)
    loss = alignment_loss(full, teacher, parse_objectives("l2+kl+kernel+cosine"), temperature=0.1)
    loss.backward()
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert (results[0]["loss"] + results[1]["loss"]).item() / 2 == pytest.approx(loss.item(), abs=1e-5)
    for rank, result in enumerate(results):
        # The kernel term's gather sends each rank's row gradients back to their owner (all-reduced), so the
        # local gradient, halved as DDP averages, is the one-process gradient of those rows.
        torch.testing.assert_close(result["grad"] / 2, full.grad[rank * 4 : rank * 4 + 4], atol=1e-6, rtol=1e-5)


def test_token_state_loss_by_hand():
    student = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [9.0, 9.0]], [[0.0, 1.0], [5.0, 5.0], [7.0, 7.0]]])
    teacher = torch.zeros(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # text 0: two real tokens; text 1: one
    # text 0: tokens (1 + 0)/2 = 0.5 and (4 + 4)/2 = 4 -> 2.25; text 1: (0 + 1)/2 = 0.5; mean 1.375
    assert token_state_loss(student, teacher, mask).item() == pytest.approx(1.375)


def test_kl_over_given_ad_vectors_by_hand():
    tau = 0.5
    ads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])

    def softmax(row):
        exps = [math.exp(value / tau) for value in row]
        return [value / sum(exps) for value in exps]

    expected = 0.0
    for s, t in zip(STUDENT.tolist(), TEACHER.tolist()):
        p = softmax([t[0] * a[0] + t[1] * a[1] for a in ads.tolist()])
        q = softmax([s[0] * a[0] + s[1] * a[1] for a in ads.tolist()])
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    loss = alignment_loss(STUDENT, TEACHER, parse_objectives("kl"), temperature=tau, items=ads)
    assert loss.item() == pytest.approx(expected / 2, abs=1e-6)
    in_batch = alignment_loss(STUDENT, TEACHER, parse_objectives("kl"), temperature=tau)
    assert in_batch.item() != pytest.approx(loss.item())  # the ads, not the batch, are ranked
