"""The embedding store: the frozen teacher's vectors of ads or queries, in chunks on disk, memory-mapped, read by row.

One format for ads and queries, whatever wrote it (encode.py, or a training script finding its store missing):
    metadata.json            written last: model and data fingerprints, dim, dtype, normalised, prompt, pooling,
                             max length, the chunks and their row counts; a folder without it is a build in progress
    chunk_000000/            one chunk of --chunk_rows rows, renamed into place when whole:
        vectors.npy          float16/float32 rows (np.load(..., mmap_mode="r"))
        ids.npy              the rows' ids (utf-8 bytes)
        keys.npy             int64 keys of the rows' texts (duplicate and false-negative masks need no text)
        texts.json           the texts themselves, only in stores that are read as a stream (phase 2 --streaming)
        chunk.json           rows, the fingerprint of the chunk's rows and of the model that encoded them
    index/id_hashes.npy, index/id_rows.npy, index/key_hashes.npy, index/key_rows.npy
                             sorted 64-bit hashes of the ids and the text keys with their rows: ids and texts are
                             found by binary search on memory maps, with no dict per process

Building is bounded and resumable: every process reads the rows in order (texts only, one chunk at a time),
encodes the chunks c with c % processes == its rank and writes each one atomically; a chunk already on disk is
checked (same rows, same model) and skipped, so a killed build resumes at the first missing chunk. Processes
wait for each other's chunks on the file system, not in a collective, so a slow rank never trips the collective
timeout; the main process then writes the index and the metadata. Whether to open or build is decided once,
by the main process, for all.

At scale (47M ads x 4096-d is 385 GB in float16) nothing here loads a whole store: the training scripts read the
rows each step needs (`read`), chunk by chunk, from memory maps; whole passes (`iter_chunks`, an index build or
an exact search) read chunk after chunk with readahead on. Vectors are checked for NaN/inf when written, on a
bounded sample when opened, and row by row when read.
"""

import hashlib
import json
import mmap
import os
import shutil
import time
from collections import OrderedDict

import numpy as np

from common.data import fingerprint_row, text_key
from common.encoder import EncoderSpec
from common.errors import UserError
from common.run_folder import lock_folder, unlock_folder
from common.runtime import check_fits_in_memory

FORMAT = "harness-store/2"
_REQUIRED = ("format", "dim", "chunks", "model_fingerprint", "data_fingerprint")
_OPEN_CHECK_BYTES = 64 << 20  # finiteness sample read when a store is opened
_OPEN_CHUNKS = 64  # memory maps kept open at once (a 47M-row store has thousands of chunks)
CHUNK_BYTES = 256 << 20  # default chunk size: rows x dim x 4 bytes of float32 vectors while one is encoded


def default_chunk_rows(dim):
    """Rows per chunk: about 256 MB of float32 vectors (16,384 rows at 4096-d), at least 1,024, at most 262,144."""
    return int(min(max(CHUNK_BYTES // (4 * dim), 1024), 262_144))


def _hashes(values):
    """64-bit unsigned hashes of strings (for the sorted on-disk indexes)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little") for value in values],
        dtype=np.uint64,
    )


def matryoshka_cut(vectors, dim, normalized):
    """The first `dim` coordinates of each vector (a numpy array or a torch tensor), re-normalised when the
    vectors are normalised: what a Matryoshka-trained embedder's truncated vector is. The one place the cut is
    made, for a store's view (EmbeddingStore.truncated) and for the teacher's vectors of phase 2 alike."""
    if not dim or dim >= vectors.shape[-1]:
        return vectors
    vectors = vectors[..., :dim]
    if not normalized:
        return vectors
    if isinstance(vectors, np.ndarray):
        vectors = vectors.astype(np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    import torch

    return torch.nn.functional.normalize(vectors, dim=-1)


class EmbeddingStore:
    """Rows of one or more stores (see `stack`) over memory-mapped chunks."""

    def __init__(self, folder, metadata, parts=None):
        self.folder, self.metadata = folder, metadata
        # (store folder, chunk name, rows) of every chunk, in row order (several stores after `stack`)
        self.parts = parts or [(folder, chunk["name"], int(chunk["rows"])) for chunk in metadata["chunks"]]
        self.offsets = np.cumsum([0] + [rows for _, _, rows in self.parts])
        self.width = metadata["dim"]  # < dim for a Matryoshka view (see `truncated`)
        self.sequential = False  # readahead on: set by iter_chunks for whole passes
        self._maps = OrderedDict()
        self._indexes = {}

    @property
    def dim(self):
        return self.width

    def __len__(self):
        return int(self.offsets[-1])

    def _map(self, part, name):
        """The memory map of one file of one chunk (least recently used maps are closed past _OPEN_CHUNKS)."""
        key = (part, name)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        folder, chunk, _ = self.parts[part]
        try:
            array = np.load(os.path.join(folder, chunk, name), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            raise UserError(
                f"{os.path.join(folder, chunk, name)} is missing, truncated or damaged; delete the store and rebuild "
                "it."
            ) from None
        _advise(array, self.sequential)
        self._maps[key] = array
        while len(self._maps) > 3 * _OPEN_CHUNKS:
            self._maps.popitem(last=False)
        return array

    def truncated(self, dim):
        """A Matryoshka view of the store: the first `dim` coordinates of every row, re-normalised when the
        store's vectors are normalised (what a Matryoshka-trained embedder's truncated vector is)."""
        if not 0 < dim <= self.metadata["dim"]:
            raise UserError(
                f"Cannot truncate the {self.metadata['dim']}-d store {self.folder} to {dim} dimensions; "
                f"use a width from 1 to {self.metadata['dim']}."
            )
        view = EmbeddingStore(self.folder, self.metadata, self.parts)
        view.width = dim
        return view

    def _finish(self, vectors):
        """float32 rows cut to this view's width (matryoshka_cut)."""
        vectors = matryoshka_cut(vectors, self.width, bool(self.metadata.get("normalized")))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _by_part(self, rows):
        """(part, positions in `rows`, local rows) for every chunk the rows fall in, local rows sorted."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a store of {len(self)} rows")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.searchsorted(sorted_rows, self.offsets)
        for part in np.flatnonzero(bounds[1:] > bounds[:-1]):
            start, stop = bounds[part], bounds[part + 1]
            yield int(part), order[start:stop], sorted_rows[start:stop] - self.offsets[part]

    def read(self, rows):
        """float32 vectors of the given global rows (any order, repeats allowed), read from the memory maps.

        Rows are read in sorted order within each chunk (sequential disk access), then put back in the order
        asked; only these rows are copied into memory."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        output = np.empty((len(rows), self.metadata["dim"]), dtype=np.float32)
        for part, positions, local in self._by_part(rows):
            output[positions] = self._map(part, "vectors.npy")[local]
        if not np.isfinite(output).all():
            bad = int(rows[~np.isfinite(output).all(axis=1)][0])
            raise UserError(f"Row {bad} of the store {self.folder} holds NaN or inf; rebuild the store.")
        return self._finish(output)

    def ids_of(self, rows):
        """The ids (str) of the given global rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        output = np.empty(len(rows), dtype=object)
        for part, positions, local in self._by_part(rows):
            output[positions] = [value.decode("utf-8") for value in self._map(part, "ids.npy")[local]]
        return output.tolist()

    def keys_of(self, rows):
        """int64 keys (common.data.text_key) of the texts of the given global rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        output = np.empty(len(rows), dtype=np.int64)
        for part, positions, local in self._by_part(rows):
            output[positions] = self._map(part, "keys.npy")[local]
        return output

    def texts_of_chunk(self, part):
        """The texts of one chunk (stores written with texts: a query stream's store)."""
        folder, chunk, _ = self.parts[part]
        path = os.path.join(folder, chunk, "texts.json")
        if not os.path.exists(path):
            raise UserError(f"The store {self.folder} holds no texts; build it from a stream (encode.py --streaming).")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    @property
    def ids(self):
        """All ids, in row order (a list of len(store) strings: for small stores and tests; use ids_of)."""
        return self.ids_of(np.arange(len(self)))

    def iter_chunks(self, chunk_rows=65536):
        """float32 blocks of at most `chunk_rows` consecutive rows, in row order, for whole passes such as
        building an index: only one block is in memory at a time, and the kernel reads ahead."""
        previous, self.sequential = self.sequential, True
        self._maps.clear()
        try:
            for part in range(len(self.parts)):
                vectors = self._map(part, "vectors.npy")
                for start in range(0, len(vectors), chunk_rows):
                    yield self._finish(vectors[start : start + chunk_rows])
                self._maps.pop((part, "vectors.npy"), None)
        finally:
            self.sequential = previous
            self._maps.clear()

    def _lookup(self, kind, values):
        """Rows of the given ids (kind "id") or text keys (kind "key", int64) by binary search on the sorted
        hash index of each stacked store; -1 where absent."""
        output = np.full(len(values), -1, dtype=np.int64)
        if not len(values):
            return output
        hashes = _hashes(values) if kind == "id" else np.asarray(values, dtype=np.int64).astype(np.uint64)
        for folder, offset in self._stores():
            if (folder, kind) not in self._indexes:
                index = os.path.join(folder, "index")
                self._indexes[folder, kind] = (
                    np.load(os.path.join(index, f"{kind}_hashes.npy"), mmap_mode="r"),
                    np.load(os.path.join(index, f"{kind}_rows.npy"), mmap_mode="r"),
                )
            sorted_hashes, rows = self._indexes[folder, kind]
            position = np.searchsorted(sorted_hashes, hashes)
            found = (position < len(sorted_hashes)) & (output < 0)
            found[found] = sorted_hashes[position[found]] == hashes[found]
            output[found] = np.asarray(rows[position[found]]) + offset
        if kind == "id":  # a 64-bit hash collision between an unknown id and a stored one is caught here
            hit = np.flatnonzero(output >= 0)
            stored = self.ids_of(output[hit])
            for position, value in zip(hit, stored):
                if value != values[position]:
                    output[position] = self._scan_for(values[position])
        return output

    def _scan_for(self, item_id):
        """The row of an id whose hash collides with another stored id's (found by a scan; about never)."""
        for part in range(len(self.parts)):
            ids = self._map(part, "ids.npy")
            match = np.flatnonzero(ids == item_id.encode("utf-8"))
            if len(match):
                return int(self.offsets[part] + match[0])
        return -1

    def _stores(self):
        """(folder, first row) of each store this one stacks."""
        seen, result = set(), []
        for part, (folder, _, _) in enumerate(self.parts):
            if folder not in seen:
                seen.add(folder)
                result.append((folder, int(self.offsets[part])))
        return result

    def find_rows(self, ids):
        """Row numbers of the given ids; -1 for an id not in the store."""
        return self._lookup("id", [str(item_id) for item_id in ids])

    def rows(self, ids):
        """Row numbers of the given ids; an unknown id is an error naming it."""
        ids = [str(item_id) for item_id in ids]
        rows = self.find_rows(ids)
        if (rows < 0).any():
            missing = ids[int(np.flatnonzero(rows < 0)[0])]
            raise UserError(
                f"id {missing!r} is not in the store {self.folder}; rebuild the store on the corpus that holds it."
            )
        return rows

    def ranked_ids(self, rows):
        """Search results as ids: for each query's row numbers (-1: no result), the ids of its ads in order."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = self.ids_of(np.where(rows >= 0, rows, 0).ravel()) if rows.size else []
        width = rows.shape[1] if rows.ndim == 2 else 0
        return [[ids[q * width + j] for j in range(width) if rows[q, j] >= 0] for q in range(len(rows))]

    def rows_of_texts(self, texts):
        """The first row holding each text (by its key); -1 for a text not in the store."""
        return self._lookup("key", [text_key(text) for text in texts])

    @classmethod
    def stack(cls, stores):
        """Several stores of the same width as one: rows of the first, then of the second, ..."""
        if len(stores) == 1:
            return stores[0]
        dims = {store.dim for store in stores}
        if len(dims) != 1:
            raise UserError(f"Stores of different widths {sorted(dims)} cannot be used together; rebuild them.")
        parts = [part for store in stores for part in store.parts]
        stacked = cls(", ".join(store.folder for store in stores), stores[0].metadata, parts)
        stacked.width = stores[0].width
        return stacked

    @classmethod
    def open(cls, folder, model_fingerprint=None, data_fp=None, dim=None, kind=None):
        path = os.path.join(folder, "metadata.json")
        if not os.path.exists(path):
            if os.path.isdir(folder) and any(name.startswith("chunk_") for name in os.listdir(folder)):
                raise UserError(
                    f"{folder} is a store whose build has not finished (no metadata.json); run the command that "
                    "builds it again with the same flags to resume it."
                )
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
        if kind and metadata.get("kind", kind) != kind:  # first: the other checks would send the user elsewhere
            raise UserError(
                f"The store {folder} holds {metadata['kind']} vectors, not {kind} vectors; pass a {kind} store "
                f"(encode.py --kind {kind} writes one)."
            )
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
        store = cls(folder, metadata)
        sample = sorted(set(np.linspace(0, len(store.parts) - 1, min(len(store.parts), 32)).astype(int).tolist()))
        budget_rows = max(_OPEN_CHECK_BYTES // (4 * metadata["dim"] * max(len(sample), 1)), 1)
        for part in sample:  # a bounded sample: shapes and finiteness of up to 32 chunks
            vectors = store._map(part, "vectors.npy")
            name, rows = store.parts[part][1], store.parts[part][2]
            if vectors.shape != (rows, metadata["dim"]) or len(store._map(part, "ids.npy")) != rows:
                raise UserError(f"Chunk {name} of {folder} does not match its metadata; rebuild the store.")
            if not np.isfinite(vectors[:budget_rows]).all():
                raise UserError(f"Chunk {name} of {folder} contains NaN or inf; rebuild the store.")
        for kind in ("id", "key"):
            if not os.path.exists(os.path.join(folder, "index", f"{kind}_hashes.npy")):
                raise UserError(f"The index of the store {folder} is missing; delete the store and rebuild it.")
        store._maps.clear()
        return store


def _advise(memory_map, sequential):
    """Scattered row reads (training) want no readahead: without MADV_RANDOM the kernel reads ahead around every
    row and maps up to the whole file into the process (page cache, reclaimable, but counted in its resident
    memory). Whole passes (evaluation's exact search, index builds) want the opposite: MADV_SEQUENTIAL."""
    handle = getattr(memory_map, "_mmap", None)
    advice = getattr(mmap, "MADV_SEQUENTIAL" if sequential else "MADV_RANDOM", None)
    if handle is not None and hasattr(handle, "madvise") and advice is not None:
        handle.madvise(advice)


# ---------------------------------------------------------------------------- building
def _chunk_name(index):
    return f"chunk_{index:06d}"


def _rows_fingerprint(rows):
    digest = hashlib.sha256()
    for item_id, text, encoded in rows:
        digest.update(f"{item_id}\x00{text}\x00{encoded}\x01".encode())
    return digest.hexdigest()


def rows_of_lists(ids, texts, encoded_texts=None):
    """Rows (id, text, what the model encodes) of in-memory lists, as build_store reads them."""
    return lambda: zip(ids, texts, encoded_texts if encoded_texts is not None else texts)


def rows_of_corpus(source, id_column, text_column, split="train", ids_optional=False):
    """Rows of a corpus file read in Arrow batches: only one batch of texts is in memory at a time."""
    from common.data import iter_corpus

    def rows():
        for item_id, text in iter_corpus(source, id_column, text_column, split, ids_optional):
            yield item_id, text, text

    return rows


def _model_folder_around(folder):
    """The model folder that `folder` is or lies inside (config.json beside weights or an encoder config), or None."""
    path = os.path.abspath(folder)
    while True:
        if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(path):
            names = os.listdir(path)
            if (
                "harness_encoder.json" in names
                or "modules.json" in names
                or any(name.endswith((".safetensors", ".bin")) for name in names)
            ):
                return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def check_store_path(folder):
    """Where a store may be written: a new folder, or a store (finished or not), outside every model folder; a
    store inside a model folder would change that model's fingerprint, and every store of it would then be
    refused as built by another model."""
    model = _model_folder_around(folder)
    if model is not None:
        raise UserError(
            f"The store path {folder} lies inside the model folder {model}; a store there changes the model's "
            "fingerprint (its other stores would be refused). Choose a path outside the model folder."
        )
    _check_folder(folder)


def _check_folder(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"The store path {folder} lies under {parent}, which is a file; choose a folder path.")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"The store path {folder} is a file; choose a folder path.")
    if os.path.isdir(folder):
        names = set(os.listdir(folder)) - {".lock", "metadata.json", "metadata.json.partial", "index", "index.partial"}
        if any(not name.startswith("chunk_") for name in names):  # never write into (or delete) what is not a store
            raise UserError(f"{folder} exists and is not an embedding store; choose another store path.")


def _wait_for(paths):
    """Poll the file system until every path exists: ranks wait for each other's chunks without a collective,
    whose timeout a long build would exceed (a rank that died ends the launch anyway)."""
    delay = 0.05
    while not all(os.path.exists(path) for path in paths):
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def build_store(
    accelerator, encoder, rows, kind, folder, *, batch_size=128, dtype="float32", chunk_rows=None, data_fp=None,
    keep_texts=False, description=None,
):  # fmt: skip
    """Encode the rows (a function returning an iterator of (id, text, text the model encodes)) into the store
    at `folder` with every process; resume a killed build. Returns the store opened.

    Every process reads the rows in order, one chunk at a time; chunk c is encoded by process c % N. A chunk
    on disk is checked against the rows and the model (else refused) and skipped. `data_fp`, when given, is
    the fingerprint the rows must have (data_fingerprint over (id, encoded text)); `description` (a dict, or a
    function called once the rows were read) is recorded: a stream's filters and counts; `keep_texts` writes
    each chunk's texts (a stream read by phase 2)."""
    module = accelerator.unwrap_model(encoder)
    check_store_path(folder)
    if accelerator.is_main_process:
        lock_folder(folder, "the store")  # a second builder would write the same chunks
    accelerator.wait_for_everyone()
    world, rank = accelerator.num_processes, accelerator.process_index
    chunk_rows = chunk_rows or default_chunk_rows(module.embedding_dim)
    check_fits_in_memory(  # each process holds one chunk's vectors (and texts) while it encodes
        chunk_rows * module.embedding_dim * 4, f"A chunk of {chunk_rows} rows", "lower --chunk_rows"
    )
    chunks, pending, digest, seen = [], [], hashlib.sha256(), 0

    def flush(index, batch):
        name, fingerprint = _chunk_name(index), _rows_fingerprint(batch)
        chunks.append({"name": name, "rows": len(batch)})
        path = os.path.join(folder, name)
        if os.path.exists(os.path.join(path, "chunk.json")):
            with open(os.path.join(path, "chunk.json"), encoding="utf-8") as handle:
                written = json.load(handle)
            if written.get("fingerprint") != fingerprint:
                raise UserError(
                    f"{path} was encoded from other rows than the data gives now (the data or a filter changed); "
                    "build the store in a new folder."
                )
            if written.get("model_fingerprint") != module.fingerprint:
                raise UserError(
                    f"{path} was encoded by another model than {module.config.base_model or 'this one'}; build the "
                    "store in a new folder (or resume it with the model that started it)."
                )
            return
        if index % world != rank:
            return
        with accelerator.autocast():  # bf16 on GPUs when the run uses mixed precision
            vectors = module.encode([encoded for _, _, encoded in batch], kind, batch_size, device=accelerator.device)
        if not np.isfinite(vectors).all():
            raise UserError(f"The model produced NaN/inf vectors for {name}; nothing was stored. Check the model.")
        _write_chunk(path, vectors, batch, fingerprint, module.fingerprint, dtype, keep_texts)

    for row in rows():
        fingerprint_row(digest, str(row[0]), row[2])  # what the model encodes (a query with its context)
        pending.append(row)
        seen += 1
        if len(pending) == chunk_rows:
            flush(len(chunks), pending)
            pending = []
    if pending:
        flush(len(chunks), pending)
    if not chunks:
        raise UserError("The data gives no row to encode; check the file, the column and the filters.")
    if data_fp is not None and digest.hexdigest() != data_fp:
        raise UserError("The data changed while the store was being built; build it again.")
    _wait_for([os.path.join(folder, chunk["name"], "chunk.json") for chunk in chunks])
    metadata_path = os.path.join(folder, "metadata.json")
    if accelerator.is_main_process:
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
            "data_fingerprint": digest.hexdigest(),
            "count": seen,
            "chunk_rows": chunk_rows,
            "texts": bool(keep_texts),
            **({"description": description() if callable(description) else description} if description else {}),
        }
        _finish_store(folder, chunks, metadata)
        unlock_folder(folder)
    _wait_for([metadata_path])
    accelerator.wait_for_everyone()
    return EmbeddingStore.open(folder)


def _write_chunk(path, vectors, rows, fingerprint, model_fingerprint, dtype, keep_texts):
    """One chunk (see the module docstring), written beside its final name and renamed when whole."""
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    np.save(os.path.join(partial, "vectors.npy"), np.asarray(vectors).astype(dtype))
    ids = [str(item_id).encode("utf-8") for item_id, _, _ in rows]
    np.save(os.path.join(partial, "ids.npy"), np.array(ids, dtype=f"S{max(max(map(len, ids)), 1)}"))
    np.save(os.path.join(partial, "keys.npy"), np.array([text_key(text) for _, text, _ in rows], dtype=np.int64))
    if keep_texts:
        with open(os.path.join(partial, "texts.json"), "w", encoding="utf-8") as handle:
            json.dump([text for _, text, _ in rows], handle, ensure_ascii=False)
    record = {"rows": len(rows), "fingerprint": fingerprint, "model_fingerprint": model_fingerprint}
    with open(os.path.join(partial, "chunk.json"), "w", encoding="utf-8") as handle:
        json.dump({**record, "dim": int(np.shape(vectors)[1]), "dtype": dtype}, handle)
    os.replace(partial, path)


def _finish_store(folder, chunks, metadata):
    """The index, then metadata.json last (atomically): the store is usable from that moment on."""
    _write_index(folder, chunks)
    metadata = {"format": FORMAT, **metadata, "chunks": chunks}
    path = os.path.join(folder, "metadata.json")
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
    os.replace(path + ".partial", path)


def write_store(folder, vectors, ids, texts=None, *, metadata, chunk_rows=None, dtype="float32", keep_texts=False):
    """A store of vectors computed elsewhere (benchmarks' synthetic stores, tests): the same chunks, index and
    metadata as build_store writes, one process. `metadata` gives at least model_fingerprint and kind;
    `vectors` is an array (a memory map is read chunk by chunk) or a function (start, stop) -> the rows
    [start, stop), so a synthetic store is never whole in memory."""
    _check_folder(folder)
    os.makedirs(folder, exist_ok=True)
    texts = texts if texts is not None else [str(item_id) for item_id in ids]
    block = vectors if callable(vectors) else (lambda start, stop: np.asarray(vectors[start:stop]))
    dim = int(np.shape(block(0, 1))[1])
    chunk_rows = chunk_rows or default_chunk_rows(dim)
    chunks, digest = [], hashlib.sha256()
    for index, start in enumerate(range(0, len(ids), chunk_rows)):
        rows = [(str(i), t, t) for i, t in zip(ids[start : start + chunk_rows], texts[start : start + chunk_rows])]
        for item_id, text, _ in rows:
            fingerprint_row(digest, item_id, text)
        name = _chunk_name(index)
        chunk_vectors = block(start, start + len(rows))
        model = metadata.get("model_fingerprint")
        _write_chunk(os.path.join(folder, name), chunk_vectors, rows, _rows_fingerprint(rows), model, dtype, keep_texts)
        chunks.append({"name": name, "rows": len(rows)})
    defaults = {"dim": dim, "dtype": dtype, "data_fingerprint": digest.hexdigest(), "count": len(ids)}
    _finish_store(folder, chunks, {**defaults, **metadata, "chunk_rows": chunk_rows, "texts": bool(keep_texts)})
    return EmbeddingStore.open(folder)


def _write_index(folder, chunks):
    """Sorted 64-bit hashes of the ids and of the text keys, with their rows (main process, once per build:
    24 bytes per row in memory while sorting). A duplicate id is refused here."""
    ids, keys = [], []
    for chunk in chunks:
        ids.append(
            _hashes([value.decode("utf-8") for value in np.load(os.path.join(folder, chunk["name"], "ids.npy"))])
        )
        keys.append(np.load(os.path.join(folder, chunk["name"], "keys.npy")).astype(np.uint64))
    partial = os.path.join(folder, "index.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for kind, hashes in (("id", np.concatenate(ids)), ("key", np.concatenate(keys))):
        order = np.argsort(hashes, kind="stable")  # stable: the first row of a repeated text key comes first
        hashes = hashes[order]
        if kind == "id":
            repeated = np.flatnonzero(hashes[1:] == hashes[:-1])
            if len(repeated):
                store = EmbeddingStore(folder, {"dim": 1, "chunks": chunks})
                first, second = store.ids_of(order[[repeated[0], repeated[0] + 1]])
                if first == second:
                    raise UserError(f"id '{first}' appears more than once in the data; ids must be unique.")
        np.save(os.path.join(partial, f"{kind}_hashes.npy"), hashes)
        np.save(os.path.join(partial, f"{kind}_rows.npy"), order.astype(np.int64))
        del order, hashes
    shutil.rmtree(os.path.join(folder, "index"), ignore_errors=True)
    os.replace(partial, os.path.join(folder, "index"))


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
    accelerator, encoder, rows, kind, *, data_fp, path=None, store_dir, model_path, batch_size=128,
    dtype="float32", chunk_rows=None, keep_texts=False, description=None,
):  # fmt: skip
    """The store of `encoder`'s vectors of `rows` (see build_store): opened at `path` (default: a fingerprinted
    path under `store_dir`) when finished and matching the model and data, refused when it does not match,
    built by all processes (or its build resumed) otherwise. `encoder` is an Encoder or an EncoderSpec: a spec
    is checked against the store from its files alone and its weights are loaded (once, see
    EncoderSpec.load_once) only when the store must be built. `data_fp` is the rows' data fingerprint
    (common.data.data_fingerprint / corpus_fingerprint), or for a stream the hash of its description.
    Whether to open or build is decided once, by the main process, for all: ranks that looked at the folder at
    different moments of another job's build would otherwise take different paths and hang."""
    module = encoder if isinstance(encoder, EncoderSpec) else accelerator.unwrap_model(encoder)
    path = path or default_store_path(store_dir, model_path, kind, module, data_fp)
    if shared_decision(accelerator, os.path.exists(os.path.join(path, "metadata.json"))):
        store = EmbeddingStore.open(
            path, module.fingerprint, None if description else data_fp, module.embedding_dim, kind=kind
        )
        check_store_matches(store, module, kind)
        return store
    if isinstance(module, EncoderSpec):
        module = module.load_once()
    return build_store(
        accelerator, module, rows, kind, path, batch_size=batch_size, dtype=dtype, chunk_rows=chunk_rows,
        data_fp=None if description else data_fp, keep_texts=keep_texts, description=description,
    )  # fmt: skip


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


def vectors_of(references):
    """float32 vectors of (store, row) references (rows of one or more stores, e.g. queries and general text
    mixed by a stream), each read from its own store."""
    output = np.empty((len(references), references[0][0].dim), dtype=np.float32)
    by_store = {}
    for position, (store, row) in enumerate(references):
        by_store.setdefault(id(store), (store, [], []))
        by_store[id(store)][1].append(position)
        by_store[id(store)][2].append(row)
    for store, positions, rows in by_store.values():
        output[positions] = store.read(rows)
    return output


class StoreStream:
    """A store with texts read as a stream for phase 2: per epoch a seeded order of its chunks and of the rows in
    each chunk (a block shuffle: one chunk's texts in memory). Rows are (text, None, (store, global row)); a
    Matryoshka student's stream is over the truncated view of the store."""

    def __init__(self, store, shuffle=True, seed=0):
        self.store, self.shuffle, self.seed = store, shuffle, seed
        self.folder = self.source = store.folder
        self.metadata = store.metadata
        self.sizes = np.diff(store.offsets)
        self.rows_per_epoch = len(store)
        self._cached = (None, None)

    def _orders(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.sizes))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))

    def _rows_of(self, epoch, chunk):
        size = int(self.sizes[chunk])
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, chunk]).permutation(size)

    def _texts(self, chunk):
        if self._cached[0] != chunk:
            self._cached = (chunk, self.store.texts_of_chunk(chunk))
        return self._cached[1]

    def rows(self, epoch=0, start=0):
        """(text, None, (store, global row)) of the epoch from row `start` on; the start is found without reading."""
        order = self._orders(epoch)
        ends = np.cumsum(self.sizes[order])
        first = int(np.searchsorted(ends, start, side="right"))
        for position in range(first, len(order)):
            chunk = int(order[position])
            offset = start - (int(ends[position - 1]) if position else 0) if position == first else 0
            texts = self._texts(chunk)
            base = int(self.store.offsets[chunk])
            for row in self._rows_of(epoch, chunk)[offset:]:
                yield texts[row], None, (self.store, base + int(row))
