"""The embedding store: frozen teacher vectors of ads or queries, on disk, memory-mapped, read by row.

A store is a folder:
    metadata.json                 model and data fingerprints, dim, dtype, normalised, prompt, pooling, shards
    vectors-00000-of-00002.npy    float matrix of one shard (np.load(..., mmap_mode="r"))
    ids-00000-of-00002.npy        the ids of those rows
Each process writes its own shard; the main process writes metadata.json last and renames the
folder into place, so a crash never leaves a folder that looks complete. A store whose fingerprints
do not match the model and data it is used with is refused.

At scale (50M ads x 4096-d is 770 GB in float32) nothing here loads a whole store: the training scripts
read the rows each step needs (`EmbeddingStore.read`), shard by shard, from the memory maps. Vectors are
checked for NaN/inf when written, on a bounded sample when opened, and row by row when read.
"""

import json
import mmap
import os
import shutil

import numpy as np

from common.cli import lock_folder, unlock_folder
from common.data import data_fingerprint
from common.encoder import EncoderSpec
from common.errors import UserError

FORMAT = "harness-store/1"
_REQUIRED = ("format", "dim", "shards", "model_fingerprint", "data_fingerprint")
_OPEN_CHECK_BYTES = 64 << 20  # finiteness sample read when a store is opened


class EmbeddingStore:
    """Rows of one or more stores (see `stack`) over memory-mapped shards; ids are a numpy string array."""

    def __init__(self, folder, metadata, id_shards, shards):
        self.folder, self.metadata, self.id_shards, self.shards = folder, metadata, id_shards, shards
        self.offsets = np.cumsum([0] + [len(shard) for shard in shards])
        self.width = metadata["dim"]  # < dim for a Matryoshka view (see `truncated`)
        self._row_of = None

    @property
    def ids(self):
        """All ids as one numpy string array (read from the id shards when asked for)."""
        return np.concatenate(self.id_shards) if self.id_shards else np.array([], dtype=str)

    @property
    def dim(self):
        return self.width

    def truncated(self, dim):
        """A Matryoshka view of the store: the first `dim` coordinates of every row, re-normalised when the
        store's vectors are normalised (what a Matryoshka-trained embedder's truncated vector is)."""
        if not 0 < dim <= self.metadata["dim"]:
            raise UserError(
                f"Cannot truncate the {self.metadata['dim']}-d store {self.folder} to {dim} dimensions; "
                f"use a width from 1 to {self.metadata['dim']}."
            )
        view = EmbeddingStore(self.folder, self.metadata, self.id_shards, self.shards)
        view.width = dim
        return view

    def _finish(self, vectors):
        """float32 rows cut to this view's width (re-normalised after a cut when the store is normalised)."""
        if self.width < self.metadata["dim"]:
            vectors = vectors[:, : self.width]
            if self.metadata.get("normalized"):
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self):
        return int(self.offsets[-1])

    def read(self, rows):
        """float32 vectors of the given global rows (any order, repeats allowed), read from the memory maps.

        Rows are read in sorted order within each shard (sequential disk access), then put back in the
        order asked; only these rows are copied into memory.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a store of {len(self)} rows")
        output = np.empty((len(rows), self.metadata["dim"]), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.searchsorted(sorted_rows, self.offsets)
        for shard_index, shard in enumerate(self.shards):
            start, stop = bounds[shard_index], bounds[shard_index + 1]
            if start == stop:
                continue
            local = sorted_rows[start:stop] - self.offsets[shard_index]
            output[order[start:stop]] = shard[local]
        if not np.isfinite(output).all():
            bad = int(rows[~np.isfinite(output).all(axis=1)][0])
            raise UserError(f"Row {bad} of the store {self.folder} holds NaN or inf; rebuild the store.")
        return self._finish(output)

    def iter_chunks(self, chunk_rows=65536):
        """float32 blocks of at most `chunk_rows` consecutive rows, in row order, for whole passes such as
        building an index: only one block is in memory at a time."""
        for shard in self.shards:
            for start in range(0, len(shard), chunk_rows):
                yield self._finish(shard[start : start + chunk_rows])

    def rows(self, ids):
        """Row numbers of the given ids; an unknown id is an error naming it."""
        if self._row_of is None:
            self._row_of = {str(item_id): row for row, item_id in enumerate(self.ids.tolist())}
        try:
            return np.array([self._row_of[item_id] for item_id in ids], dtype=np.int64)
        except KeyError as error:
            raise UserError(
                f"id {error.args[0]!r} is not in the store {self.folder}; "
                "rebuild the store on the corpus that holds it."
            ) from None

    @classmethod
    def stack(cls, stores):
        """Several stores of the same width as one: rows of the first, then of the second, ..."""
        if len(stores) == 1:
            return stores[0]
        dims = {store.dim for store in stores}
        if len(dims) != 1:
            raise UserError(f"Stores of different widths {sorted(dims)} cannot be used together; rebuild them.")
        shards = [shard for store in stores for shard in store.shards]
        id_shards = [ids for store in stores for ids in store.id_shards]
        stacked = cls(", ".join(store.folder for store in stores), stores[0].metadata, id_shards, shards)
        stacked.width = stores[0].width
        return stacked

    @classmethod
    def open(cls, folder, model_fingerprint=None, data_fp=None, dim=None):
        path = os.path.join(folder, "metadata.json")
        if not os.path.exists(path):
            raise UserError(f"{folder} is not an embedding store (no metadata.json); build it with encode.py.")
        try:
            with open(path, encoding="utf-8") as handle:
                metadata = json.load(handle)
            if not isinstance(metadata, dict) or not all(key in metadata for key in _REQUIRED):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise UserError(
                f"{path} is damaged (not the metadata of a store); delete the store and rebuild it."
            ) from None
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
        budget_rows = max(_OPEN_CHECK_BYTES // (4 * metadata["dim"] * max(len(metadata["shards"]), 1)), 1)
        for shard in metadata["shards"]:
            try:
                shard_ids = np.load(os.path.join(folder, shard["ids"]), mmap_mode="r")
                vectors = np.load(os.path.join(folder, shard["vectors"]), mmap_mode="r")
            except (OSError, ValueError, KeyError, TypeError, EOFError):
                raise UserError(
                    f"A shard of the store {folder} is missing, truncated or damaged; delete the store and rebuild it."
                ) from None
            _advise_random_access(vectors)
            if len(shard_ids) != shard["count"] or vectors.shape != (shard["count"], metadata["dim"]):
                raise UserError(f"Shard {shard['vectors']} of {folder} does not match its metadata; rebuild the store.")
            if not _sample_is_finite(vectors, budget_rows):
                raise UserError(f"Shard {shard['vectors']} of {folder} contains NaN or inf; rebuild the store.")
            ids.append(shard_ids)
            shards.append(vectors)
        return cls(folder, metadata, ids, shards)


def _advise_random_access(memory_map):
    """Training reads scattered rows: without this hint the kernel reads ahead around every row and maps
    up to the whole file into the process (page cache, reclaimable, but counted in its resident memory)."""
    handle = getattr(memory_map, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)


def _sample_is_finite(vectors, budget_rows):
    """The whole shard when it is small, else the first rows and evenly spaced blocks (bounded I/O)."""
    if len(vectors) <= budget_rows:
        blocks = [(start, min(start + 8192, len(vectors))) for start in range(0, len(vectors), 8192)]
    else:
        size = max(budget_rows // 32, 1)
        blocks = [(start, start + size) for start in np.linspace(0, len(vectors) - size, 32).astype(np.int64)]
    return all(np.isfinite(vectors[start:stop]).all() for start, stop in blocks)


def _shard_names(rank, world):
    return f"vectors-{rank:05d}-of-{world:05d}.npy", f"ids-{rank:05d}-of-{world:05d}.npy"


def write_shard(partial, rank, world, vectors, ids, dtype="float32"):
    """One process's shard into the store being written at `partial`."""
    if not np.isfinite(vectors).all():
        raise UserError(f"The model produced NaN/inf vectors for shard {rank}; nothing was stored. Check the model.")
    vectors_name, ids_name = _shard_names(rank, world)
    np.save(os.path.join(partial, vectors_name), np.asarray(vectors).astype(dtype, copy=False))
    np.save(os.path.join(partial, ids_name), np.asarray(ids, dtype=str))


def finish_store(partial, folder, metadata, shard_counts):
    """Write metadata.json last and rename the folder into place (main process only)."""
    world = len(shard_counts)
    metadata = {
        "format": FORMAT,
        **metadata,
        "count": int(sum(shard_counts)),
        "shards": [
            {"vectors": _shard_names(rank, world)[0], "ids": _shard_names(rank, world)[1], "count": int(count)}
            for rank, count in enumerate(shard_counts)
        ],
    }
    with open(os.path.join(partial, "metadata.json"), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
    if os.path.exists(os.path.join(partial, ".lock")):
        os.remove(os.path.join(partial, ".lock"))  # the lock stays held on the open file until the process ends
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(partial, folder)


def build_store(accelerator, encoder, ids, texts, kind, folder, batch_size=128, dtype="float32", data_fp=None):
    """Encode texts with every process (each its slice) into a new store folder; return it opened.
    `data_fp` is data_fingerprint(ids, texts) when the caller already has it (hashing billions of texts
    once is enough)."""
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"The store path {folder} lies under {parent}, which is a file; choose a folder path.")
    not_a_store = os.path.exists(folder) and not os.path.exists(os.path.join(folder, "metadata.json"))
    if not_a_store and (not os.path.isdir(folder) or os.listdir(folder)):  # never delete what is not a store
        raise UserError(f"{folder} exists and is not an embedding store; choose another store path.")
    partial = folder.rstrip("/") + ".partial"
    if accelerator.is_main_process:
        lock_folder(partial, "the store")  # a second builder would clear this one's shards
    if accelerator.is_main_process and os.path.exists(partial):
        for name in os.listdir(partial):  # left by a crash: never trusted, rebuilt from scratch
            if name != ".lock":
                os.remove(os.path.join(partial, name))
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
    write_shard(partial, rank, world, vectors, ids[start:stop], dtype)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        counts = [max(min((r + 1) * per_rank, len(texts)) - r * per_rank, 0) for r in range(world)]
        metadata = {
            "kind": kind,
            "dim": int(module.embedding_dim),
            "dtype": dtype,
            "normalized": bool(module.config.normalize),
            "prompt": module.prompt_for(kind),
            "pooling": module.config.pooling,
            "max_length": module.config.max_length,
            "model": str(module.config.base_model),
            "model_fingerprint": module.fingerprint,
            "data_fingerprint": data_fp or data_fingerprint(ids, texts),
        }
        finish_store(partial, folder, metadata, counts)
        unlock_folder(partial)
    accelerator.wait_for_everyone()
    return EmbeddingStore.open(folder)


def check_store_matches(store, encoder, kind):
    """Beyond fingerprints: the store holds `kind` vectors made the way this encoder makes them (an ad store
    passed as a query store, or one built with another prompt, pooling or normalisation, is refused)."""
    expected = {
        "kind": kind,
        "prompt": encoder.prompt_for(kind),
        "pooling": encoder.config.pooling,
        "normalized": bool(encoder.config.normalize),
        "max_length": encoder.config.max_length,
    }
    for key, value in expected.items():
        if key in store.metadata and store.metadata[key] != value:
            raise UserError(
                f"The store {store.folder} has {key} {store.metadata[key]!r} but {value!r} is needed here; pass "
                f"the {kind} store of this model, or rebuild it."
            )


def default_store_dir(args):
    """Where stores go unless a flag names one: --store_dir, else `stores/` beside the output folder."""
    if getattr(args, "store_dir", None):
        return args.store_dir
    return os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "stores")


def default_store_path(store_dir, model_path, kind, encoder, data_fp):
    """<store_dir>/<model name>-<kind>-<model fp>-<data fp>: a default path is never stale by construction."""
    name = os.path.basename(os.path.abspath(str(model_path)).rstrip("/"))
    tag = f"{encoder.fingerprint[:10]}-{data_fp[:10]}"
    return os.path.join(store_dir, f"{name}-{kind}-{tag}")


def open_or_build_store(
    accelerator, encoder, ids, texts, kind, *, path=None, store_dir, model_path, batch_size=128, data_fp=None
):
    """The store of `encoder`'s vectors of these texts: opened at `path` (default: a fingerprinted path under
    `store_dir`) when it matches the model and data, refused when it does not, built by all processes
    when it does not exist. `encoder` is an Encoder or an EncoderSpec: a spec is checked against the store from
    its files alone and its weights are loaded (once, see EncoderSpec.load_once) only when the store must be
    built. The encoder is moved to the accelerator's device for the build and back.
    `texts` may be a function that reads them (with `data_fp` given): called only when the store is built.
    Whether to open or build is decided once, by the main process, for all: ranks that looked at the folder
    at different moments of another job's build would otherwise take different paths and hang."""
    module = encoder if isinstance(encoder, EncoderSpec) else accelerator.unwrap_model(encoder)
    if callable(texts) and data_fp is None:
        texts = texts()
    data_fp = data_fp or data_fingerprint(ids, texts)
    path = path or default_store_path(store_dir, model_path, kind, module, data_fp)
    if shared_decision(accelerator, os.path.exists(os.path.join(path, "metadata.json"))):
        store = EmbeddingStore.open(path, module.fingerprint, data_fp, module.embedding_dim)
        check_store_matches(store, module, kind)
        return store
    texts = texts() if callable(texts) else texts
    if isinstance(module, EncoderSpec):
        module = module.load_once()
    device = next(module.parameters()).device
    module.to(accelerator.device)
    store = build_store(accelerator, module, ids, texts, kind, path, batch_size=batch_size, data_fp=data_fp)
    module.to(device)
    return store


def shared_decision(accelerator, value):
    """The main process's `value` on every process (one broadcast; no communication on one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    decision = [value]
    broadcast_object_list(decision, from_process=0)
    return decision[0]


def store_for_student(store, student):
    """The teacher's store as the student is scored against it: truncated for a Matryoshka student (aligned
    with --teacher_dim), whole otherwise; a student of another width is refused with the fix."""
    teacher_dim = student.config.extra.get("teacher_dim")
    if teacher_dim and teacher_dim == student.embedding_dim and teacher_dim < store.dim:
        store = store.truncated(teacher_dim)
    if student.embedding_dim != store.dim:
        raise UserError(
            f"The student outputs {student.embedding_dim}-d vectors but the teacher's store {store.folder} holds "
            f"{store.dim}-d; align the student to this teacher first (distill_student.py adds the projection head)."
        )
    return store
