"""Layer surgery on encoders: keep a subset of the transformer blocks (after loading, or at load time reading only
those blocks' tensors), choose evenly spaced blocks, freeze the input embeddings, cut the output (Matryoshka).
Pruning by importance (common/pruning.py) is built on these."""

import copy

import torch
from torch import nn
from transformers import AutoModel

from common.errors import UserError
from common.model_files import SafetensorsFile, weight_files

BLOCK_BYTES = 64 << 20  # a large tensor (the vocabulary) is copied in row blocks of about this size


def load_layers(folder, model_config, layers, dtype, trust_remote_code):
    """A backbone of only the blocks `layers` (renumbered 0..K-1), its weights read by name from the
    safetensors files: an 8B teacher cut to 4 blocks reads those 4 blocks and the embeddings, never the whole
    model (the peak is the kept weights in `dtype` plus one block of rows). None when the files do not name
    every tensor the cut needs (then the caller loads the whole model and cuts it)."""
    files = weight_files(folder)
    if files is None:
        return None
    config = copy.deepcopy(model_config)
    total = config.num_hidden_layers
    if not layers or max(layers) >= total or min(layers) < 0:
        raise UserError(f"Layer indices {layers} are out of range for a {total}-layer model.")
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    readers = {path: SafetensorsFile(path) for path in set(files.values())}
    if dtype is None:  # the checkpoint's own dtype (its weights' header says it), as a whole load gives it
        floating = [readers[path].dtype(name) for name, path in files.items()]
        dtype = next((kind for kind in floating if kind.is_floating_point), torch.float32)
    model = AutoModel.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    _, owner, attribute = find_layers(model)
    prefix_of_blocks = next(
        name.rsplit(f"{attribute}.0.", 1)[0] + f"{attribute}." for name, _ in model.named_parameters()
        if f"{attribute}.0." in name
    )  # fmt: skip
    state, buffers = model.state_dict(), dict(model.named_buffers())
    sources = {}
    for name, target in state.items():
        source = name
        if name.startswith(prefix_of_blocks):
            index, rest = name[len(prefix_of_blocks) :].split(".", 1)
            source = f"{prefix_of_blocks}{layers[int(index)]}.{rest}"
        found = _find_checkpoint_name(source, files, model.base_model_prefix)
        if found is None:
            if name in buffers:
                continue  # a buffer the checkpoint does not store (rotary frequencies, position ids)
            return None
        if readers[files[found]].shape(found) != list(target.shape):
            return None
        sources[name] = found
    with torch.no_grad():
        for name, source in sources.items():
            reader, target = readers[files[source]], state[name]
            if target.ndim == 0:
                target.copy_(reader.read_rows(source, 0, 1))
                continue
            rows = max(1, BLOCK_BYTES // max(target[0].numel() * target.element_size(), 1))
            for start in range(0, target.shape[0], rows):
                stop = min(start + rows, target.shape[0])
                target[start:stop].copy_(reader.read_rows(source, start, stop))
    for new_index, layer in enumerate(getattr(owner, attribute)):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    model.eval()
    return model


def _find_checkpoint_name(name, files, base_prefix):
    """The checkpoint's name for a model tensor: as is, under the base model's prefix (a checkpoint of a task
    model, e.g. model.layers.0... or bert.encoder...), or with LayerNorm's legacy gamma/beta names."""
    candidates = [name, f"{base_prefix}.{name}"] if base_prefix else [name]
    legacy = [c.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
              for c in candidates]  # fmt: skip
    return next((candidate for candidate in candidates + legacy if candidate in files), None)


def keep_layers(encoder, layer_indices):
    """Keep only the given transformer blocks of the backbone (in order); returns the encoder."""
    keep_layers_of(encoder.backbone, layer_indices)
    return encoder


def keep_layers_of(backbone, layer_indices):
    """keep_layers on a bare transformers backbone."""
    layers, owner, attribute = find_layers(backbone)
    if not layer_indices or max(layer_indices) >= len(layers) or min(layer_indices) < 0:
        raise UserError(f"Layer indices {layer_indices} are out of range for a {len(layers)}-layer model.")
    setattr(owner, attribute, nn.ModuleList([layers[i] for i in layer_indices]))
    config = backbone.config
    config.num_hidden_layers = len(layer_indices)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layer_indices]
    for new_index, layer in enumerate(getattr(owner, attribute)):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # decoder KV-cache indexing
    return backbone


def evenly_spaced_layers(total, keep):
    """`keep` layer indices spread over `total`, always including the first and the last."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def find_layers(backbone):
    for owner_name in ("encoder", ""):
        owner = getattr(backbone, owner_name, None) if owner_name else backbone
        for attribute in ("layer", "layers"):
            layers = getattr(owner, attribute, None)
            if isinstance(layers, nn.ModuleList):
                return layers, owner, attribute
    raise UserError(f"Cannot find the transformer blocks of {type(backbone).__name__}; pass --student_model instead.")


def freeze_input_embeddings(encoder):
    """Stop training the token (and, where the model has them, position and segment) embeddings.

    Returns the number of parameters frozen. A student cut from the teacher then keeps the teacher's
    token space, also for words its training text never contained; the optimiser skips the largest
    matrix of a small model (the vocabulary: 11.7M of all-MiniLM-L6-v2's 22.7M parameters).
    """
    modules = [encoder.backbone.get_input_embeddings()]
    embeddings = getattr(encoder.backbone, "embeddings", None)  # BERT-like: word, position, token type, norm
    if isinstance(embeddings, nn.Module):
        modules.append(embeddings)
    frozen = {id(p): p for module in modules for p in module.parameters()}
    for parameter in frozen.values():
        parameter.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


def truncate_output(encoder, dim):
    """Make the encoder output the first `dim` coordinates of what it outputs now (Matryoshka truncation).

    Done with a linear head that keeps those coordinates: the rows of an existing head, or the identity's
    first rows. With normalisation after the head, the output is exactly the truncated, re-normalised
    vector, which is where a student aligned to a truncated teacher (--teacher_dim) starts.
    """
    if not 0 < dim <= encoder.embedding_dim:
        raise UserError(f"Cannot cut {encoder.embedding_dim}-d outputs to {dim}; use 1 to {encoder.embedding_dim}.")
    old = encoder.projection
    encoder.add_projection(dim)
    with torch.no_grad():
        if old is not None:
            encoder.projection.weight.copy_(old.weight[:dim])
            encoder.projection.bias.copy_(old.bias[:dim] if old.bias is not None else 0)
        else:
            encoder.projection.weight.copy_(torch.eye(dim, encoder.hidden_size))
            encoder.projection.bias.zero_()
    return encoder
