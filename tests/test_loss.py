"""InfoNCE against a hand computation, its false-negative masks, and gradients through the gather."""

import math
import os

import pytest
import torch
from conftest import run_on_two_gloo_ranks

from common.loss import contrastive_loss


def nll(scores, label):
    return -(scores[label] - math.log(sum(math.exp(s) for s in scores)))


def test_in_batch_loss_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, accuracy = contrastive_loss(queries, positives, temperature=1.0, false_negative_margin=None)
    expected = (nll([1.0, 0.6], 0) + nll([0.0, 0.8], 1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == 1.0


def test_temperature_hard_negatives_query_query_and_ad_ad_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # one hard negative per query
    loss, _ = contrastive_loss(
        queries, positives, negatives, temperature=0.5, false_negative_margin=None, query_query=True, ad_ad=True
    )
    # q1: p1 .8, p2 .6, n1 0, n2 1, q2 0, ad-ad p1.p2 = .96; q2: p1 .6, p2 .8, n1 1, n2 0, q1 0, p2.p1 .96
    row1 = [s / 0.5 for s in (0.8, 0.6, 0.0, 1.0, 0.0, 0.96)]
    row2 = [s / 0.5 for s in (0.6, 0.8, 1.0, 0.0, 0.0, 0.96)]
    assert loss.item() == pytest.approx((nll(row1, 0) + nll(row2, 1)) / 2, abs=1e-5)


def test_false_negative_masks():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    # Margin: for q1 the hard negative n1 (score 1.0) beats s(q1, p1) + 0.1 = 0.7 and is dropped, n2 (0.8) too.
    loss, _ = contrastive_loss(queries, positives, negatives, temperature=1.0, false_negative_margin=0.1)
    row1 = [0.6, 0.0]  # p1, p2 (n1, n2 masked)
    row2 = [0.8, 1.0, 0.0, 0.6]  # p1, p2, n1, n2: none above 1.1
    assert loss.item() == pytest.approx((nll(row1, 0) + nll(row2, 1)) / 2, abs=1e-6)
    # Same key as the positive (a duplicate ad in the batch) and same group: never a negative.
    keys = torch.tensor([7, 8])
    loss, _ = contrastive_loss(
        queries,
        positives,
        negatives,
        temperature=1.0,
        false_negative_margin=None,
        positive_keys=keys,
        negative_keys=torch.tensor([7, 9]),
    )
    row1 = [0.6, 0.0, 0.8]  # n1 has the key of p1
    row2 = [0.8, 1.0, 0.0, 0.6]
    assert loss.item() == pytest.approx((nll(row1, 0) + nll(row2, 1)) / 2, abs=1e-6)
    loss, _ = contrastive_loss(
        queries, positives, temperature=1.0, false_negative_margin=None, positive_groups=torch.tensor([3, 3])
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # each query's only negative is in its group


def test_same_group_ads_are_no_negatives_in_the_ad_ad_block():
    """Two clicks on ads of one ad group: p2 is neither q1's negative nor p1's ad-ad negative."""
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives = torch.tensor([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    groups = torch.tensor([5, 5, 6])
    loss, _ = contrastive_loss(
        queries, positives, temperature=1.0, false_negative_margin=None, ad_ad=True, positive_groups=groups
    )
    # Candidates of each row: p1 p2 p3, then ad-ad p_i.p1 p_i.p2 p_i.p3 (self and same group masked).
    row1 = [0.8, 1.0, 0.8]  # q1: p1, p3; ad-ad p1.p3 = .8
    row2 = [0.8, 0.0, 0.6]  # q2: p2, p3; ad-ad p2.p3 = .6
    row3 = [0.96, 1.0, 0.6, 0.8, 0.6]  # q3: p1 p2 p3; ad-ad p3.p1 = .8, p3.p2 = .6
    expected = (nll(row1, 0) + nll(row2, 0) + nll(row3, 2)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1) for _ in range(3)]
    return tensors  # queries, positives, negatives for 8 queries (4 per rank)


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * 4, rank * 4 + 4)
    local = [tensor[rows].clone().requires_grad_(True) for tensor in _global_batch()]
    loss, _ = contrastive_loss(*local, temperature=0.1, false_negative_margin=None, query_query=True, ad_ad=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [tensor.grad for tensor in local]}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_gradients_flow_through_gathered_negatives(tmp_path):
    """Two gloo ranks with half a batch each give the gradients of the full batch on one process."""
    run_on_two_gloo_ranks(_worker, tmp_path)
    full = [tensor.clone().requires_grad_(True) for tensor in _global_batch()]
    loss, _ = contrastive_loss(*full, temperature=0.1, false_negative_margin=None, query_query=True, ad_ad=True)
    loss.backward()
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert (results[0]["loss"] + results[1]["loss"]).item() / 2 == pytest.approx(loss.item(), abs=1e-5)
    for rank, result in enumerate(results):
        for local_grad, full_tensor in zip(result["grads"], full):
            # Each rank's loss is the mean over its own queries, so its gradients are world_size x the full mean's.
            torch.testing.assert_close(local_grad / 2, full_tensor.grad[rank * 4 : rank * 4 + 4], atol=1e-6, rtol=1e-5)
    # The positives of rank 1 got gradient from rank 0's queries, which only the gather can carry.
    assert results[1]["grads"][1].abs().sum() > 0
