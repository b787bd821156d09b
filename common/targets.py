"""Phase 2's training rows: the student's texts and the teacher's targets for them, behind one small interface.

distill_student.py's loop calls only these members of its rows object:
- `dataloader(accelerator, tokenize, per_device_batch_size, accumulation)`: this process's batches, each the
  student's inputs (`tokenize(texts, "query")`) plus either "teacher_vectors" (float32, host memory) or
  "teacher_texts" (what the teacher in the loop encodes);
- `prepared_by_accelerate`: whether `accelerator.prepare` shards the dataloader (False: it is sliced per
  process already and its batches are on the device);
- `steps_per_epoch(dataloader, num_processes, accumulation)`: optimiser steps in one epoch, None when a stream's
  length is unknown (then --max_train_steps sets the budget);
- `sample_texts(count)`: the first student texts (calibration of pruning, the truncation check);
- `num_examples`: for the banner.

Three sources implement it: `InMemoryTargets` (texts in memory, the teacher's vectors in a memory-mapped store,
read per batch), and `StreamTargets` over a stream whose rows reference a chunked store's vectors, or carry the
teacher's text for the teacher in the loop. A script with other data writes a class with these members.
"""

import itertools
import math

import torch
from torch.utils.data import DataLoader

from common.data import LengthGroupedSampler
from common.store import vectors_of
from common.streaming import MixedStream, StreamBatches


class InMemoryTargets:
    """Texts held in memory; the teacher's vectors of them in an embedding store, of which each batch reads only
    its rows. The rows of one optimiser step (per-device batch x processes x accumulation) are a random draw of
    texts, the same for any number of processes; with `group_by_length` they have similar lengths, which saves
    the compute spent on padding."""

    prepared_by_accelerate = True

    def __init__(self, texts, store, seed, group_by_length=True, num_workers=0):
        self.texts, self.store, self.seed = texts, store, seed
        self.group_by_length, self.num_workers = group_by_length, num_workers
        self.num_examples = len(texts)

    def sample_texts(self, count):
        return self.texts[:count]

    def dataloader(self, accelerator, tokenize, per_device_batch_size, accumulation):
        texts, store = self.texts, self.store

        def collate(rows):
            batch = tokenize([texts[row] for row in rows], "query")
            batch["teacher_vectors"] = torch.from_numpy(store.read(rows))  # only this batch's rows
            return batch

        global_batch_size = per_device_batch_size * accelerator.num_processes
        sampler = None
        if self.group_by_length:
            sampler = LengthGroupedSampler([len(text) for text in texts], global_batch_size * accumulation, self.seed)
        return DataLoader(
            range(len(texts)),
            batch_size=per_device_batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(texts) >= global_batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def steps_per_epoch(self, dataloader, num_processes, accumulation):
        return math.ceil(len(dataloader) / num_processes / accumulation)


class StreamTargets:
    """Rows of a query source (a `common.store.StoreStream` of the teacher's chunked store, or a
    `common.streaming.TextStream` the teacher encodes in the loop), with an optional general-text source mixed
    in at `general_ratio`. Each global micro-batch is the stream's next per-device batch x processes rows; this
    process collates its slice, so N processes read exactly the rows of one process with the whole batch."""

    prepared_by_accelerate = False  # sliced per process here; accelerate must not shard it again
    num_examples = "a stream"

    def __init__(self, queries, general=None, general_ratio=0.0, seed=0):
        self.queries, self.general, self.general_ratio, self.seed = queries, general, general_ratio, seed

    def sample_texts(self, count):
        """The first student texts of the query source's first epoch (general text left out)."""
        return [text for text, _, _ in itertools.islice(self.queries.rows(0), count)]

    def dataloader(self, accelerator, tokenize, per_device_batch_size, accumulation):
        def collate(rows):
            batch = tokenize([text for text, _, _ in rows], "query").to(accelerator.device)
            if rows[0][2] is None:  # a text stream: the teacher in the loop encodes what it reads
                batch["teacher_texts"] = [teacher_text for _, teacher_text, _ in rows]
            else:  # (store, row) of each row: the store streams are already cut to --teacher_dim
                batch["teacher_vectors"] = torch.from_numpy(vectors_of([reference for _, _, reference in rows]))
            return batch

        stream = MixedStream(self.queries, self.general, self.general_ratio, self.seed)  # a fresh position
        return StreamBatches(
            stream, per_device_batch_size, accelerator.num_processes, accelerator.process_index, collate
        )

    def steps_per_epoch(self, dataloader, num_processes, accumulation):
        rows = getattr(self.queries, "rows_per_epoch", None)  # a chunked store's length; a text stream has none
        if rows is None:
            return None
        return math.ceil(rows / (1 - self.general_ratio) / (dataloader.per_device * num_processes * accumulation))
