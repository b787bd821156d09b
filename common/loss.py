"""InfoNCE for retrieval with in-batch, hard and cross-process negatives (one module, as in open_clip).

Every process computes the loss of its own queries against the candidates of all processes. The
gather keeps the gradient: its backward sums the gradients that every process sends back to the
candidates, so with DDP/DeepSpeed averaging the result equals one large-batch loss. It only uses
all_gather and all_reduce, which both NCCL and gloo have.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor):
    """Concatenate `tensor` from all processes (same shape on each); gradients flow back to each owner."""
    if not distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor):
    if not distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def contrastive_loss(
    queries,
    positives,
    negatives=None,
    *,
    temperature,
    positive_keys=None,
    negative_keys=None,
    query_keys=None,
    positive_groups=None,
    false_negative_margin=0.1,
    query_query=False,
    ad_ad=False,
    not_negative_keys=None,
    gather=True,
):
    """InfoNCE of each local query against its positive, with every other candidate as a negative.

    queries, positives: (B, D) local rows (L2-normalised for cosine). negatives: (B*H, D) or None.
    Candidates are all positives and negatives of all processes; with `query_query` the other queries
    and with `ad_ad` the positive's similarity to the other positives join the denominator (the
    Qwen3-Embedding / GTE formulation). Keys (int64 per row, e.g. hashed ad ids or texts) mark
    duplicates: a candidate with the key of the query's positive is never a negative. With
    `positive_groups` (int64 per row, e.g. hashed ad-group ids), another positive of the same group is
    not a negative either. `not_negative_keys` (B, K) int64, e.g. the keys of the graph neighbours of each
    query's positive: a candidate with one of these keys is not a negative of that query (pad a row with its
    positive's key). With `false_negative_margin` m, a negative scoring above s(q, p) + m is
    dropped as a likely false negative. Returns (loss, accuracy of the positive being ranked first).
    """
    batch = queries.shape[0]
    gather_fn = gather_with_grad if gather else (lambda tensor: tensor)
    keys_fn = gather_no_grad if gather else (lambda tensor: tensor)
    offset = dist.get_rank() * batch if gather and distributed() else 0
    local = torch.arange(batch, device=queries.device)
    labels = offset + local

    all_positives = gather_fn(positives)
    candidates = [all_positives]
    if positive_keys is None:
        positive_keys = -1 - labels  # unique across processes: no two positives count as duplicates
    all_positive_keys = keys_fn(positive_keys)
    candidate_keys = [all_positive_keys]
    if negatives is not None and negatives.numel():
        candidates.append(gather_fn(negatives))
        if negative_keys is None:
            negative_keys = torch.full((negatives.shape[0],), -(10**12), dtype=torch.long, device=queries.device)
        candidate_keys.append(keys_fn(negative_keys))
    candidates, candidate_keys = torch.cat(candidates), torch.cat(candidate_keys)

    scores = queries @ candidates.T  # (B, C)
    positive_scores = scores[local, labels].unsqueeze(1)
    is_label = torch.zeros_like(scores, dtype=torch.bool)
    is_label[local, labels] = True
    mask = (candidate_keys.unsqueeze(0) == positive_keys.unsqueeze(1)) & ~is_label
    same_group = None
    if positive_groups is not None:
        same_group = keys_fn(positive_groups).unsqueeze(0) == positive_groups.unsqueeze(1)
        mask[:, : same_group.shape[1]] |= same_group & ~is_label[:, : same_group.shape[1]]
    if not_negative_keys is not None:
        related = (candidate_keys[None, :, None] == not_negative_keys[:, None, :]).any(dim=2)
        mask |= related & ~is_label
    blocks, masks = [scores], [mask]
    if query_query:
        all_queries = gather_fn(queries)
        block = queries @ all_queries.T
        self_mask = torch.zeros_like(block, dtype=torch.bool)
        self_mask[local, labels] = True
        if query_keys is not None:
            self_mask |= keys_fn(query_keys).unsqueeze(0) == query_keys.unsqueeze(1)
        blocks.append(block)
        masks.append(self_mask)
    if ad_ad:
        block = positives @ all_positives.T
        # s(p_i, p_j): the positive against itself, a duplicate of it, or an ad of its group is no negative.
        ad_mask = (all_positive_keys.unsqueeze(0) == positive_keys.unsqueeze(1)) | is_label[:, : block.shape[1]]
        if same_group is not None:
            ad_mask |= same_group
        if not_negative_keys is not None:
            ad_mask |= (all_positive_keys[None, :, None] == not_negative_keys[:, None, :]).any(dim=2)
        blocks.append(block)
        masks.append(ad_mask)
    logits, mask = torch.cat(blocks, dim=1), torch.cat(masks, dim=1)
    if false_negative_margin is not None:
        too_close = logits > positive_scores + false_negative_margin
        too_close[local, labels] = False
        mask |= too_close
    logits = (logits / temperature).float().masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def graph_loss(
    anchors,
    neighbours,
    neighbour_weights,
    *,
    temperature,
    anchor_keys,
    neighbour_keys,
    candidates=None,
    candidate_keys=None,
    gather=True,
):
    """The graph regulariser: each anchor's graph neighbours as extra targets (after RAMEN, arXiv 2402.18434).

    anchors (B, D): local rows, e.g. the queries, or their clicked ads. neighbours (B*K, D): K drawn graph
    neighbours per anchor (rows i*K .. i*K+K-1 are anchor i's), with neighbour_weights (B*K,) >= 0 (the edge
    weights; 0 marks padding). For every pair (anchor i, neighbour k) of weight > 0, a cross-entropy picks the
    neighbour among the candidates: the neighbours of all processes and the gathered `candidates` (e.g. the
    main loss's positives and negatives). Not negatives for anchor i: padding, any candidate with the key of
    `anchor_keys[i]` (the anchor's clicked ad, or the anchor itself) or of one of its own neighbours. Within an
    anchor the pairs weigh w_k / sum_k w_k, so every anchor with a neighbour counts once.

    Returns the weighted sum over every process's pairs divided by the number of anchors with a neighbour over
    all processes, times the number of processes: averaged over the processes (what DDP does to gradients and
    the training loop to logged values), it is exactly the one-process loss of the whole batch, however the
    anchors with neighbours fall across processes. Every process must call it (it gathers).
    """
    batch = anchors.shape[0]
    count = neighbours.shape[0] // batch
    gather_fn = gather_with_grad if gather else (lambda tensor: tensor)
    keys_fn = gather_no_grad if gather else (lambda tensor: tensor)
    world = dist.get_world_size() if gather and distributed() else 1
    offset = dist.get_rank() * batch * count if world > 1 else 0

    weights = neighbour_weights.float().view(batch, count)
    totals = weights.sum(dim=1, keepdim=True)
    weights = torch.where(totals > 0, weights / totals.clamp_min(1e-30), torch.zeros_like(weights)).flatten()
    anchors_with_neighbours = (totals > 0).sum().float()
    if world > 1:
        dist.all_reduce(anchors_with_neighbours)

    all_neighbours = gather_fn(neighbours)
    all_keys = keys_fn(neighbour_keys)
    is_padding = keys_fn(neighbour_weights.float()) <= 0
    blocks, key_blocks = [all_neighbours], [all_keys]
    if candidates is not None and candidates.numel():
        blocks.append(gather_fn(candidates))
        key_blocks.append(keys_fn(candidate_keys))
        is_padding = torch.cat([is_padding, is_padding.new_zeros(blocks[-1].shape[0])])
    columns, column_keys = torch.cat(blocks), torch.cat(key_blocks)

    # One row per (anchor, neighbour) slot, padding included: no data-dependent shapes (no sync with the device).
    own_keys = torch.cat([anchor_keys.view(batch, 1), neighbour_keys.view(batch, count)], dim=1)  # (B, 1+K)
    mask = (column_keys[None, :, None] == own_keys[:, None, :]).any(dim=2) | is_padding[None, :]  # (B, C)
    slots = torch.arange(batch * count, device=anchors.device)
    targets = offset + slots
    pair_mask = mask.repeat_interleave(count, dim=0)
    pair_mask[slots, targets] = False
    scores = anchors.repeat_interleave(count, dim=0) @ columns.T  # (B*K, C)
    logits = (scores / temperature).float().masked_fill(pair_mask, float("-inf"))
    logits = torch.where((weights > 0)[:, None], logits, torch.zeros_like(logits))  # padding: finite, weight 0
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (weights * losses).sum() * world / anchors_with_neighbours.clamp_min(1.0)
