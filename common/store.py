"""The embedding store: frozen teacher vectors of ads or queries, on disk, memory-mappable.

A store is a folder:
    metadata.json                 model and data fingerprints, dim, dtype, normalised, prompt, pooling, shards
    vectors-00000-of-00002.npy    float matrix of one shard (np.load(..., mmap_mode="r"))
    ids-00000-of-00002.npy        the ids of those rows
Each process writes its own shard; the main process writes metadata.json last and renames the
folder into place, so a crash never leaves a folder that looks complete. A store whose fingerprints
do not match the model and data it is used with is refused.
"""

import json
import os
import shutil

import numpy as np

from common.data import data_fingerprint
from common.errors import UserError

FORMAT = "harness-store/1"


class EmbeddingStore:
    def __init__(self, folder, metadata, ids, shards):
        self.folder, self.metadata, self.ids, self.shards = folder, metadata, ids, shards
        self._row_of = None

    @property
    def dim(self):
        return self.metadata["dim"]

    def __len__(self):
        return len(self.ids)

    @property
    def vectors(self):
        """The whole matrix: memory-mapped when there is one shard, concatenated otherwise."""
        if len(self.shards) == 1:
            return self.shards[0]
        return np.concatenate(self.shards)

    def rows(self, ids):
        """Row numbers of the given ids; an unknown id is an error naming it."""
        if self._row_of is None:
            self._row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        try:
            return np.array([self._row_of[item_id] for item_id in ids], dtype=np.int64)
        except KeyError as error:
            raise UserError(
                f"id {error.args[0]!r} is not in the store {self.folder}; "
                "rebuild the store on the corpus that holds it."
            ) from None

    @classmethod
    def open(cls, folder, model_fingerprint=None, data_fp=None, dim=None, check_finite=True):
        path = os.path.join(folder, "metadata.json")
        if not os.path.exists(path):
            raise UserError(f"{folder} is not an embedding store (no metadata.json); build it with encode.py.")
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
        if metadata.get("format") != FORMAT:
            raise UserError(f"{folder} has store format {metadata.get('format')!r}, expected {FORMAT}; rebuild it.")
        if model_fingerprint and metadata["model_fingerprint"] != model_fingerprint:
            raise UserError(
                f"The store {folder} was built by another model ({metadata.get('model')}); delete it or pass "
                "the model that built it, so stale vectors are never used."
            )
        if data_fp and metadata["data_fingerprint"] != data_fp:
            raise UserError(
                f"The store {folder} was built on other data than the one given; delete it or pass the same data."
            )
        if dim is not None and metadata["dim"] != dim:
            raise UserError(
                f"The store {folder} holds {metadata['dim']}-d vectors but {dim}-d are needed; use a matching store."
            )
        ids, shards = [], []
        for shard in metadata["shards"]:
            shard_ids = np.load(os.path.join(folder, shard["ids"]))
            vectors = np.load(os.path.join(folder, shard["vectors"]), mmap_mode="r")
            if len(shard_ids) != shard["count"] or vectors.shape != (shard["count"], metadata["dim"]):
                raise UserError(f"Shard {shard['vectors']} of {folder} does not match its metadata; rebuild the store.")
            if check_finite:
                for start in range(0, len(vectors), 65536):
                    if not np.isfinite(vectors[start : start + 65536]).all():
                        raise UserError(f"Shard {shard['vectors']} of {folder} contains NaN or inf; rebuild the store.")
            ids.extend(str(item_id) for item_id in shard_ids)
            shards.append(vectors)
        return cls(folder, metadata, ids, shards)


def _shard_names(rank, world):
    return f"vectors-{rank:05d}-of-{world:05d}.npy", f"ids-{rank:05d}-of-{world:05d}.npy"


def build_store(accelerator, encoder, ids, texts, kind, folder, batch_size=128, dtype="float32", data_fp=None):
    """Encode texts with every process (each its slice) into a new store folder; return it opened.
    `data_fp` is data_fingerprint(ids, texts) when the caller already has it (hashing billions of texts
    once is enough)."""
    partial = folder.rstrip("/") + ".partial"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a crash: never trusted, rebuilt from scratch
    accelerator.wait_for_everyone()
    os.makedirs(partial, exist_ok=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-len(texts) // world)
    start, stop = rank * per_rank, min((rank + 1) * per_rank, len(texts))
    module = accelerator.unwrap_model(encoder) if hasattr(accelerator, "unwrap_model") else encoder
    with accelerator.autocast():  # bf16 on GPUs when the run uses mixed precision
        vectors = module.encode(
            texts[start:stop],
            kind,
            batch_size=batch_size,
            device=accelerator.device,
            progress=accelerator.is_local_main_process,
        )
    vectors_name, ids_name = _shard_names(rank, world)
    np.save(os.path.join(partial, vectors_name), vectors.astype(dtype))
    np.save(os.path.join(partial, ids_name), np.array(ids[start:stop], dtype=str))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = []
        for shard_rank in range(world):
            shard_start, shard_stop = shard_rank * per_rank, min((shard_rank + 1) * per_rank, len(texts))
            vectors_name, ids_name = _shard_names(shard_rank, world)
            shards.append({"vectors": vectors_name, "ids": ids_name, "count": max(shard_stop - shard_start, 0)})
        metadata = {
            "format": FORMAT,
            "kind": kind,
            "count": len(texts),
            "dim": int(module.embedding_dim),
            "dtype": dtype,
            "normalized": bool(module.config.normalize),
            "prompt": module.prompt_for(kind),
            "pooling": module.config.pooling,
            "max_length": module.config.max_length,
            "model": str(module.config.base_model),
            "model_fingerprint": module.fingerprint,
            "data_fingerprint": data_fp or data_fingerprint(ids, texts),
            "shards": shards,
        }
        with open(os.path.join(partial, "metadata.json"), "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(partial, folder)
    accelerator.wait_for_everyone()
    return EmbeddingStore.open(folder)


def store_for(accelerator, encoder, ids, texts, kind, folder, batch_size=128, data_fp=None):
    """Open the store at `folder` if it matches this encoder and data, build it if it does not exist."""
    module = accelerator.unwrap_model(encoder)
    data_fp = data_fp or data_fingerprint(ids, texts)
    if os.path.exists(os.path.join(folder, "metadata.json")):
        return EmbeddingStore.open(folder, module.fingerprint, data_fp, module.embedding_dim)
    return build_store(accelerator, encoder, ids, texts, kind, folder, batch_size=batch_size, data_fp=data_fp)


def default_store_path(store_dir, model_path, kind, encoder, data_fp):
    """<store_dir>/<model name>-<kind>-<model fp>-<data fp>: a default path is never stale by construction."""
    name = os.path.basename(os.path.abspath(str(model_path)).rstrip("/"))
    tag = f"{encoder.fingerprint[:10]}-{data_fp[:10]}"
    return os.path.join(store_dir, f"{name}-{kind}-{tag}")
