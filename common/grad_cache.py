"""Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): a contrastive batch of any size in the memory of one chunk.

1. every row is embedded chunk by chunk without a graph (the RNG state before each chunk is kept);
2. the loss is computed on those cached vectors as leaves, and its backward gives d loss / d vector;
3. each chunk is embedded again with a graph (same RNG state, so the same dropout masks) and back-propagated
   with its vectors' gradients: sum(vectors * grads) has exactly the loss's gradient for the parameters.

The parameter gradients equal those of the plain batch (tests/test_distributed.py: under DDP and DeepSpeed
ZeRO-3, 2 processes, the same weights as the plain run). Under DDP, the gradients are all-reduced once, at the
last chunk; under DeepSpeed, each chunk's backward adds to the partitioned gradients and only the last one is
the accumulation boundary that lets the engine step.
"""

import torch
from accelerate.utils import DistributedType


def _chunks(inputs, chunk_size):
    rows = next(iter(inputs.values())).shape[0]
    return [{name: tensor[start : start + chunk_size] for name, tensor in inputs.items()}
            for start in range(0, rows, chunk_size)]  # fmt: skip


class _RandomState:
    """The CPU (and current CUDA device) RNG state, to replay a chunk's dropout masks."""

    def __init__(self, device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def embed_without_graph(model, inputs, chunk_size):
    """(vectors of all rows as a leaf that requires grad, the RNG state before each chunk)."""
    states, parts = [], []
    with torch.no_grad():
        for chunk in _chunks(inputs, chunk_size):
            device = chunk["input_ids"].device
            states.append(_RandomState(device))
            parts.append(model(**chunk))
    return torch.cat(parts).detach().requires_grad_(True), states


def backward_through_chunks(accelerator, model, inputs, chunk_size, vectors, states):
    """Re-embed each chunk with a graph and back-propagate the cached vectors' gradients into the parameters."""
    chunks = _chunks(inputs, chunk_size)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    start = 0
    for index, (chunk, state) in enumerate(zip(chunks, states)):
        last = index == len(chunks) - 1
        rows = chunk["input_ids"].shape[0]
        state.restore()  # the dropout masks of the cached pass
        surrogate = (model(**chunk) * vectors.grad[start : start + rows]).sum()
        start += rows
        if last:
            accelerator.backward(surrogate)  # DDP: all-reduce now; DeepSpeed: the boundary (and its step)
        elif deepspeed:
            engine = accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=False)
            engine.backward(surrogate)
        else:
            with accelerator.no_sync(model):
                accelerator.backward(surrogate)
