"""Phase 2 at the scale of logged traffic: label-free text as streams, teacher targets in resumable chunks.

Sources of rows (each yields (student text, teacher text, vector reference) and can start at any row of
any epoch, which is what a resumed run needs):
- `TextStream`: a `datasets` streaming source (hub id, a local file, a folder or glob of jsonl/parquet/csv
  shards), filtered on the fly (length bounds in characters; exact duplicates by a fixed-size Bloom filter, so
  memory does not grow with the stream), optionally shuffled through a seeded buffer. Starting at row n of an
  epoch replays the epoch's first n rows (texts only, no model), so the filters and the shuffle buffer are
  exactly those of the uninterrupted run.
- `common.store.StoreStream`: the teacher's store of such a stream (`open_or_build_stream_store`: encode.py
  --streaming, or distill_student.py --streaming when the store is missing), the one store format of
  common/store.py written with the chunks' texts; a killed encode resumes at the first missing chunk. Each epoch
  reads chunks in a seeded order and the rows of a chunk in a seeded order (a block shuffle: one chunk's texts
  in memory); starting at row n is arithmetic.

`MixedStream` interleaves a general-text source into the queries at a ratio (one seeded draw per row; the
general source cycles). `StreamBatches` cuts the mixed stream into global micro-batches of per-device batch x
processes rows, of which each process collates its own slice: N processes read the rows one process with the
whole batch would. Its `state_dict()` (epoch, rows consumed per source, draws made) goes into the checkpoint.
"""

import csv
import glob
import hashlib
import json
import math
import os
import random

import numpy as np

from common.data import FILE_BUILDERS, with_context
from common.errors import UserError

SHARD_TYPES = FILE_BUILDERS  # the file types load_table reads, and their datasets builders


# ---------------------------------------------------------------------------- sources
def resolve_shards(source):
    """(builder, files) for local data (a file, a folder of shards, a glob pattern); (None, None) for a hub id."""
    source = str(source)
    if any(char in source for char in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise UserError(f"{source} matches no file; check the pattern.")
    elif os.path.isdir(source):
        files = sorted(
            os.path.join(source, name)
            for name in os.listdir(source)
            if os.path.splitext(name)[1].lower() in SHARD_TYPES
        )
        if not files:
            raise UserError(f"The folder {source} holds no .jsonl/.json/.parquet/.csv/.tsv shard; check the path.")
    elif os.path.exists(source):
        files = [source]
    else:
        files = None
    if files is None and (source.startswith((".", "/")) or source.endswith(tuple(SHARD_TYPES))):
        raise UserError(f"Data file '{source}' does not exist; check the path.")
    if files is None:
        return None, None
    files = [os.path.abspath(path) for path in files]
    extensions = {os.path.splitext(path)[1].lower() for path in files}
    extensions = {".jsonl" if extension == ".json" else extension for extension in extensions}  # one builder
    if len(extensions) != 1 or not extensions <= set(SHARD_TYPES):
        raise UserError(f"{source}: the shards must all be of one type among .jsonl, .json, .parquet, .csv, .tsv.")
    return SHARD_TYPES[extensions.pop()], files


def shard_columns(path):
    """The column names of one local shard, read from its head only (None for a .json array: not cheaply)."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(path).names
        except Exception as error:
            raise UserError(f"{path} is not a readable parquet file ({type(error).__name__}); fix the shard.") from None
    if extension == ".json":
        return None
    if extension in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            try:
                return next(csv.reader(handle, delimiter="\t" if extension == ".tsv" else ","), [])
            except UnicodeDecodeError:
                raise UserError(f"{path} is not valid UTF-8 near its start; re-encode the shard as UTF-8.") from None
    first = next(read_shard(path, None), None)  # a .jsonl: the first record's keys
    return [] if first is None else list(first[1])


def read_shard(path, columns):
    """(where, record) of every row of one local shard, read as load_table reads a file: a .jsonl line by line
    (each line's own types), a CSV/TSV with every cell as written (text; "NA" is a text), parquet by batches of
    `columns`; a UTF-8 byte-order mark is skipped. A row that cannot be parsed ends the run with one sentence
    naming the shard and line. `where` names the row for later messages ("<shard> line 7")."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=columns):
                for record in batch.to_pylist():
                    number += 1
                    yield f"{path} row {number}", record
        except OSError as error:  # damaged data pages
            raise UserError(f"{path} could not be read after row {number} ({error}); fix the shard.") from None
        return
    with open(path, newline="" if extension in (".csv", ".tsv") else None, encoding="utf-8-sig") as handle:
        try:
            if extension in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if extension == ".tsv" else ",")
                for record in reader:
                    if None in record:
                        raise UserError(f"{path} line {reader.line_num} has more cells than its header; fix the line.")
                    yield f"{path} line {reader.line_num}", record
                return
            if extension == ".json":  # one JSON array of records: a whole document by nature
                records = json.load(handle)
                if not isinstance(records, list):
                    raise UserError(f"{path} is not a JSON array of records; write one record per line (.jsonl).")
                for number, record in enumerate(records, 1):
                    if not isinstance(record, dict):
                        raise UserError(f"{path} record {number} is not a JSON object of columns; fix it.")
                    yield f"{path} record {number}", record
                return
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"{path} line {number} is not valid JSON; fix or drop that line.") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path} line {number} is not a JSON object of columns; fix that line.")
                yield f"{path} line {number}", record
        except UnicodeDecodeError:
            raise UserError(f"{path} is not valid UTF-8; re-encode the shard as UTF-8.") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON (line {error.lineno}); fix the file.") from None


def buffer_shuffle(records, size, rng):
    """A seeded shuffle through a buffer of `size` rows (memory: the buffer), as streaming readers shuffle."""
    buffer = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


class BloomFilter:
    """Exact-duplicate removal in fixed memory: m bits and k hash positions per text, sized for `capacity`
    distinct texts at false-positive rate `error_rate` (a unique text wrongly taken for a duplicate)."""

    def __init__(self, capacity, error_rate=1e-4):
        self.bits = self.bits_for(capacity, error_rate)
        self.hashes = max(1, round(self.bits / capacity * math.log(2)))
        self.array = np.zeros((self.bits + 7) // 8, dtype=np.uint8)

    @staticmethod
    def bits_for(capacity, error_rate=1e-4):
        return max(64, math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2))

    @classmethod
    def bytes_for(cls, capacity, error_rate=1e-4):
        """The filter's memory for `capacity` distinct texts (checked against the machine before a run)."""
        return (cls.bits_for(capacity, error_rate) + 7) // 8

    def add(self, text):
        """Adds the text; returns whether it was (probably) there already."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        first, second = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1
        positions = np.array([(first + i * second) % self.bits for i in range(self.hashes)], dtype=np.int64)
        byte, mask = positions >> 3, (1 << (positions & 7)).astype(np.uint8)
        present = bool(np.all(self.array[byte] & mask))
        np.bitwise_or.at(self.array, byte, mask)
        return present


class TextStream:
    """Rows (text, teacher text, None) of a streaming source, filtered and optionally shuffled per epoch."""

    def __init__(
        self,
        source,
        column,
        split="train",
        context_column=None,
        context_template=None,
        min_chars=1,
        max_chars=None,
        dedupe_capacity=0,
        shuffle_buffer=0,
        seed=0,
    ):
        self.source, self.column, self.split = str(source), column, split
        self.context_column, self.context_template = context_column, context_template
        self.min_chars, self.max_chars = min_chars, max_chars
        self.dedupe_capacity, self.shuffle_buffer, self.seed = dedupe_capacity, shuffle_buffer, seed
        self.builder, self.files = resolve_shards(self.source)
        needed = [self.column] + ([self.context_column] if self.context_column else [])
        first = None  # the first CSV/TSV shard's header, which every other one must repeat
        for path in self.files or []:  # every shard's columns, before any work: a renamed column is named at once
            columns = shard_columns(path)
            missing = [name for name in needed if columns is not None and name not in columns]
            if missing:
                raise UserError(
                    f"The shard {path} has no column {missing[0]!r} (columns: {', '.join(columns)}); rename it, or "
                    "pass its name with --query_column / --query_context_column."
                )
            if os.path.splitext(path)[1].lower() in (".csv", ".tsv"):
                first = columns if first is None else first
                if columns != first:
                    raise UserError(
                        f"The shard {path} has the columns {', '.join(columns)} but {self.files[0]} has "
                        f"{', '.join(first)}; CSV/TSV shards of one stream need one header."
                    )
        self.stats = {"read": 0, "kept": 0, "too_short": 0, "too_long": 0, "duplicate": 0}

    def describe(self):
        """What determines the rows: recorded in a chunked store, compared when phase 2 reads it."""
        return {
            "source": self.source if self.files is None else None,  # local shards: their absolute paths
            "files": self.files,
            "column": self.column,
            "split": self.split if self.files is None else None,
            "context_column": self.context_column,
            "context_template": self.context_template if self.context_column else None,
            "min_chars": self.min_chars,
            "max_chars": self.max_chars,
            "dedupe_capacity": self.dedupe_capacity,
        }

    def _records(self, epoch):
        """(where, record) of the epoch's rows in order. Local shards are read by `read_shard` (exact types, every
        parse error named by shard and line), in a seeded order of shards and through a seeded shuffle buffer
        with --shuffle_buffer; a hub id is read by `datasets` (shuffled by its own buffer), its parse errors
        turned into one sentence."""
        columns = [self.column] + ([self.context_column] if self.context_column else [])
        if self.files is not None:
            rng = random.Random(f"{self.seed}-{epoch}")
            files = list(self.files)
            if self.shuffle_buffer:
                rng.shuffle(files)
            rows = (row for path in files for row in read_shard(path, columns))
            yield from buffer_shuffle(rows, self.shuffle_buffer, rng) if self.shuffle_buffer else rows
            return
        import datasets

        try:
            dataset = datasets.load_dataset(self.source, split=self.split, streaming=True)
        except Exception as error:
            raise UserError(f"Could not stream '{self.source}' ({type(error).__name__}: {error}); check it.") from None
        if self.shuffle_buffer:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(epoch)
        iterator, number = iter(dataset), 0
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # a parse error of a later shard of the hub data set
                text = str(error).strip().splitlines()
                raise UserError(
                    f"{self.source} could not be read after row {number} ({type(error).__name__}: "
                    f"{text[0] if text else ''}); fix or drop that row."
                ) from None
            number += 1
            yield f"{self.source} row {number}", record

    def rows(self, epoch=0, start=0):
        """The epoch's kept rows from row `start` on (the first `start` kept rows are replayed, not yielded)."""
        seen = BloomFilter(self.dedupe_capacity) if self.dedupe_capacity else None
        kept, stats = 0, {key: 0 for key in self.stats}
        columns = [self.column] + ([self.context_column] if self.context_column else [])
        for where, row in self._records(epoch):
            missing = [name for name in columns if name not in row]
            if missing:  # a hub data set's rows, or a record of a .jsonl without the column
                raise UserError(
                    f"{where} has no column {missing[0]!r} (columns: {', '.join(row)}); pass its name with "
                    "--query_column / --query_context_column."
                )
            stats["read"] += 1
            text = row[self.column]
            if text is not None and not isinstance(text, str):
                raise UserError(
                    f"{where}, column '{self.column}': expected text, got {type(text).__name__}; fix or drop the row."
                )
            length = len(text.strip()) if text else 0
            if length < max(self.min_chars, 1):
                stats["too_short"] += 1
                continue
            if self.max_chars and length > self.max_chars:
                stats["too_long"] += 1
                continue
            if seen is not None and seen.add(text):
                stats["duplicate"] += 1
                continue
            stats["kept"] += 1
            kept += 1
            if kept <= start:
                continue
            teacher_text = text
            if self.context_column:
                context = row[self.context_column]
                if context is not None and not isinstance(context, str):
                    raise UserError(
                        f"{where}, column '{self.context_column}': expected text or null, got "
                        f"{type(context).__name__}; fix the row."
                    )
                context = context if context and context.strip() else None  # none: the teacher reads the query
                teacher_text = with_context(text, context, self.context_template)
            self.stats = stats
            yield text, teacher_text, None
        self.stats = stats


# ---------------------------------------------------------------------------- the teacher's store of a stream
def open_or_build_stream_store(
    accelerator, encoder, stream, path, store_dir, model_path, chunk_rows, batch_size=128, dtype="float32", seed=0,
    dim=None,
):  # fmt: skip
    """The teacher's store of `stream` (epoch 0, unshuffled; with the texts), read as a StoreStream: opened at
    `path` (default: a path under `store_dir` named after the model and the stream's description) when finished
    and made from the same stream by the same teacher, refused when not, else built (or its build resumed: a
    chunk is the unit). `dim`: the Matryoshka width the rows are read at."""
    from common.encoder import EncoderSpec
    from common.store import StoreStream, open_or_build_store

    module = encoder if isinstance(encoder, EncoderSpec) else accelerator.unwrap_model(encoder)
    description = stream.describe()
    tag = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    if path is None:
        name = os.path.basename(os.path.abspath(str(model_path)).rstrip("/"))
        path = os.path.join(store_dir, f"{name}-query-stream-{module.fingerprint[:10]}-{tag[:10]}")

    def rows():
        for number, (text, teacher_text, _) in enumerate(stream.rows(0)):
            yield str(number), text, teacher_text

    store = open_or_build_store(
        accelerator, module, rows, "query", data_fp=tag, path=path, store_dir=store_dir, model_path=model_path,
        batch_size=batch_size, dtype=dtype, chunk_rows=chunk_rows, keep_texts=True,
        description=lambda: {**description, "stream_stats": stream.stats},  # the stats once the stream was read
    )  # fmt: skip
    recorded = store.metadata.get("description")
    if recorded is None or not store.metadata.get("texts"):
        raise UserError(f"The store {path} was not built from a stream; pass a store from encode.py --streaming.")
    for key, value in description.items():
        if recorded.get(key) != value:
            raise UserError(
                f"The store {path} was built with {key} = {recorded.get(key)!r} but this run has {value!r}; "
                "pass the same data flags, or another store path."
            )
    return StoreStream(store.truncated(dim) if dim else store, shuffle=True, seed=seed)


# ---------------------------------------------------------------------------- mixing and batching
class MixedStream:
    """The query source's epochs with general text interleaved at `ratio` (a seeded draw per row); the epoch
    ends with the query source's, the general source cycles through its own epochs."""

    def __init__(self, queries, general=None, ratio=0.0, seed=0):
        if general is not None and not 0 < ratio < 1:
            raise UserError("--general_text_ratio must be in (0, 1) with --general_text_file in streaming mode.")
        self.queries, self.general, self.ratio, self.seed = queries, general, ratio, seed
        self.state = {"epoch": 0, "queries": 0, "general_epoch": 0, "general": 0, "draws": 0}

    def _general_rows(self):
        state = self.state
        while True:
            produced = False
            for row in self.general.rows(state["general_epoch"], state["general"]):
                produced = True
                state["general"] += 1
                yield row
            if not produced and state["general"] == 0:
                raise UserError(f"{self.general.source} gives no general text row; check it.")
            state["general_epoch"], state["general"] = state["general_epoch"] + 1, 0

    def rows(self):
        """Endless: epoch after epoch, from the current state on (a fresh run or a checkpoint's)."""
        state = self.state
        while True:
            queries = self.queries.rows(state["epoch"], state["queries"])
            general = self._general_rows() if self.general is not None else None
            draws = np.random.default_rng([self.seed, state["epoch"], 1]) if general is not None else None
            if draws is not None and state["draws"]:
                draws.random(state["draws"])  # the draws the checkpoint had made
            produced = False
            while True:
                if draws is not None and draws.random() < self.ratio:
                    state["draws"] += 1
                    produced = True
                    yield next(general)
                    continue
                if draws is not None:
                    state["draws"] += 1
                row = next(queries, None)
                if row is None:
                    if draws is not None:
                        state["draws"] -= 1  # the draw that ended the epoch is drawn again at its start
                    break
                produced = True
                state["queries"] += 1
                yield row
            if not produced and state["queries"] == 0:
                raise UserError(f"{self.queries.source} gives no row after the filters; check the data.")
            state["epoch"], state["queries"], state["draws"] = state["epoch"] + 1, 0, 0


class StreamBatches:
    """This process's micro-batches of a MixedStream: each global micro-batch is the next per_device x processes
    rows, this process collates rows [rank x per_device, (rank + 1) x per_device) of it. Endless (the training
    loop stops at --max_train_steps); `state_dict()` is the position after the last batch given."""

    is_stream = True  # TrainLoop saves and restores its position instead of counting batches

    def __init__(self, stream, per_device, num_processes, rank, collate):
        self.stream, self.per_device, self.num_processes, self.rank = stream, per_device, num_processes, rank
        self.collate = collate
        self._position = dict(stream.state)

    def __iter__(self):
        global_batch = self.per_device * self.num_processes
        rows, pending = self.stream.rows(), []
        for row in rows:
            pending.append(row)
            if len(pending) == global_batch:
                batch = pending[self.rank * self.per_device : (self.rank + 1) * self.per_device]
                pending = []
                self._position = dict(self.stream.state)
                yield self.collate(batch)

    def set_epoch(self, epoch):
        """Epochs are the stream's own (see state_dict)."""

    def state_dict(self):
        return dict(self._position)

    def load_state_dict(self, state):
        self.stream.state = dict(state)
        self._position = dict(state)
