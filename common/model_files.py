"""Model folders on disk and on the Hub: the download, the integrity check run before any library reads a folder,
the content fingerprint that stores record, and plain reads of safetensors files."""

import hashlib
import json
import os
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoConfig

from common.errors import UserError
from common.run_folder import STAGING

ENCODER_CONFIG_NAME = "harness_encoder.json"
# What decides the vectors; a fingerprint hashes these files (weights sampled, see `model_fingerprint`).
FINGERPRINT_SKIP = {"README.md", ".gitattributes", "training_args.json", "all_results.json", "trainer_state.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def resolve_model_dir(name_or_path, revision=None, token=None):
    """Return a local folder for a local path or a hub id (downloaded once into the HF cache)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")):
        raise UserError(f"Model path '{name_or_path}' is not a model folder; pass a folder written by save_pretrained.")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "2_Dense/*"]
    try:
        return snapshot_download(name_or_path, revision=revision, token=token, allow_patterns=patterns)
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise UserError(
            f"Could not get model '{name_or_path}' from the Hub ({type(error).__name__}); check the id and your "
            "connection or token, or pass a local folder (offline: download it first with `hf download`)."
        ) from None


def model_depth(name_or_path, trust_remote_code=False):
    """The number of transformer blocks a model folder or hub id declares (its config only; no weights)."""
    folder = resolve_model_dir(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"{folder} holds no loadable model config ({error}); pass a Hugging Face model.") from None
    depth = getattr(config, "num_hidden_layers", None)
    if depth is None:
        raise UserError(f"{folder} does not say how many layers it has (no num_hidden_layers in its config).")
    return depth


def read_json(folder, *parts):
    path = os.path.join(folder, *parts)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError):
        raise UserError(
            f"{path} is not valid JSON (a damaged or half-written file); restore or re-save the model."
        ) from None


def check_model_folder(folder):
    """Refuse a model folder that is not complete, before any library reads it: a save that did not finish,
    a training run that did not finish, no config or tokenizer, damaged or truncated weights, a head missing."""
    if os.path.isdir(os.path.join(folder, STAGING)):
        raise UserError(
            f"{folder} was being saved when its run stopped (the folder is incomplete); run the script again "
            "with --resume_from_checkpoint latest to finish it."
        )
    names = set(os.listdir(folder))
    if "checkpoints" in names and "training_args.json" not in names:
        raise UserError(
            f"{folder} holds a training run that has not finished (checkpoints, no final model); finish it with "
            "--resume_from_checkpoint latest, or point at a finished model."
        )
    if "config.json" not in names:
        raise UserError(f"{folder} has no config.json, so it is not a complete model folder; point at a saved model.")
    if not names & set(TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer files; save the tokenizer with the model (save_pretrained).")
    for name in sorted(names):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, name))
    index = read_json(folder, "model.safetensors.index.json")
    if index:
        missing = sorted(set(index.get("weight_map", {}).values()) - names)
        if missing:
            raise UserError(f"{folder} lacks the weight shard {missing[0]} its index names; download or save it again.")
    saved = read_json(folder, ENCODER_CONFIG_NAME)
    if saved and saved.get("projection_out"):
        head = os.path.join(folder, saved.get("extra", {}).get("dense_path", "2_Dense"), "model.safetensors")
        if not os.path.exists(head):
            raise UserError(f"{folder} declares a projection head but {head} is missing; save the model again.")
        check_safetensors(head)


def check_safetensors(path):
    """A safetensors file's header must parse and its tensors must end exactly where the file ends."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        try:
            if not 0 < header_size <= size - 8:
                raise ValueError
            header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            end = None
    if end is None or 8 + header_size + end != size:
        raise UserError(f"{path} is damaged or truncated; restore it, or resume or re-run the save.")


def model_fingerprint(folder):
    """A content hash of a model folder: configs and tokenizer in full, weight files sampled.

    Weight files are hashed by their size and 64 evenly spaced 64 KiB blocks, so an 8B model is
    fingerprinted in well under a second; any training step changes every block.
    """
    digest = hashlib.sha256()
    # Top-down walk, pruned in place: checkpoints/, stages/ (training state, rotated or deleted at will) and runs/
    # (tracker logs) are never entered, and sorting `dirs` fixes the order. (Sorting os.walk's generator would walk the
    # whole tree before the pruning could act.)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "checkpoint", "stages")) and d != "runs")
        for name in sorted(files):
            if name in FINGERPRINT_SKIP or name.startswith("."):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            size = os.path.getsize(path)
            digest.update(str(size).encode())
            with open(path, "rb") as handle:
                if name.endswith((".safetensors", ".bin")) and size > 64 * 65536:
                    for block in range(64):
                        handle.seek(block * (size - 65536) // 63)
                        digest.update(handle.read(65536))
                else:
                    digest.update(handle.read())
    return digest.hexdigest()


class SafetensorsFile:
    """A safetensors file read by plain reads (its header is JSON; tensors are contiguous bytes): rows of one
    tensor at a time land in a buffer of their own, so a cut reads only what it keeps and the file's pages are
    never mapped into the process (a memory-mapped read counts every touched page in its resident memory)."""

    DTYPES: ClassVar[dict] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            self.header = json.loads(handle.read(size))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def names(self):
        return list(self.header)

    def shape(self, name):
        return list(self.header[name]["shape"])

    def dtype(self, name):
        return self.DTYPES[self.header[name]["dtype"]]

    def read_rows(self, name, start, stop):
        """Rows [start, stop) of the first dimension of tensor `name` (the whole tensor for a scalar)."""
        entry = self.header[name]
        shape, dtype = entry["shape"], self.DTYPES[entry["dtype"]]
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        item_bytes = torch.empty((), dtype=dtype).element_size()
        begin = entry["data_offsets"][0]
        if not shape:
            start, stop = 0, 1
        buffer = bytearray((stop - start) * row_items * item_bytes)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin + start * row_items * item_bytes)
            handle.readinto(buffer)
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return tensor.reshape([stop - start, *shape[1:]] if shape else [])


def weight_files(folder):
    """{tensor name: safetensors file} of a model folder (single file or sharded with an index); None without."""
    index = read_json(folder, "model.safetensors.index.json")
    if index:
        return {name: os.path.join(folder, file) for name, file in index["weight_map"].items()}
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return None
    return {name: path for name in SafetensorsFile(path).names()}
