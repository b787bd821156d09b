"""Reading data through `datasets` (hub id or local jsonl/json/parquet/csv/tsv) with row-level checks."""

import hashlib
import os

import numpy as np
import torch

from common.errors import UserError

FILE_BUILDERS = {  # the file types load_table reads, and their datasets builders
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}


def load_table(source, split="train", streaming=False):
    """A `datasets.Dataset` (or IterableDataset with streaming) from a local file or a hub id."""
    import datasets

    source = str(source)
    if os.path.exists(source):
        extension = os.path.splitext(source)[1].lower()
        if extension not in FILE_BUILDERS:
            raise UserError(
                f"{source}: unsupported file type '{extension}'; use .jsonl, .json, .parquet, .csv or .tsv."
            )
        if os.path.getsize(source) == 0:
            raise UserError(f"{source} is empty; point the flag at a file with rows.")
        if extension != ".parquet":
            _check_utf8(source)
        kwargs = {"delimiter": "\t"} if extension == ".tsv" else {}
        if extension != ".parquet":
            with open(source, "rb") as handle:
                if handle.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark (spreadsheet exports): not data
                    kwargs["encoding"] = "utf-8-sig"
        if extension in (".csv", ".tsv"):
            # Every column as text, as written: type inference would turn an id "0152" into the number 152.
            import csv

            with open(source, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not a name
                header = next(csv.reader(handle, delimiter=kwargs.get("delimiter", ",")), [])
            if len(set(header)) == len(header) and all(header):
                kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
            # Cells as written: pandas would turn "NA", "null", "n/a" (a query, a brand) into missing values;
            # an empty cell is then the empty text, refused as such by the checks.
            kwargs["na_filter"] = False
        try:
            return datasets.load_dataset(
                FILE_BUILDERS[extension], data_files=source, split="train", streaming=streaming, **kwargs
            )
        except Exception as error:
            raise UserError(
                f"{source} could not be read as {extension[1:]} ({_first_line(error)}); fix the file."
            ) from None
    if source.startswith((".", "/")) or source.endswith(tuple(FILE_BUILDERS)):
        raise UserError(f"Data file '{source}' does not exist; check the path.")
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as error:
        raise UserError(
            f"Could not load data set '{source}' split '{split}' ({_first_line(error)}); check the hub id and "
            "connection, or pass a local file."
        ) from None


def _check_utf8(path):
    """Name the first line that is not UTF-8 (pyarrow would fail later, deep inside a column read)."""
    import codecs

    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            for start in range(0, len(chunk), 4096):
                piece = chunk[start : start + 4096]
                try:
                    decoder.decode(piece)
                except UnicodeDecodeError as error:
                    bad_line = line + piece[: error.start].count(b"\n")
                    raise UserError(
                        f"{path} line {bad_line} is not valid UTF-8; re-encode the file as UTF-8."
                    ) from None
                line += piece.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} ends inside a multi-byte character; re-encode the file as UTF-8.") from None


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def require_columns(table, columns, source, flag_hint="--*_column"):
    present = list(table.column_names or [])
    missing = [column for column in columns if column not in present]
    if missing:
        raise UserError(
            f"{source} has no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(present)}); "
            f"rename it or pass the name with {flag_hint}."
        )


def has_optional_column(table, column, default, source, flag):
    """Whether a table has an optional column. Absent under its default name, the column is simply not given; a
    name the user chose (not the flag's default) that the table lacks is a mistake, refused instead of switching
    the rule that reads the column off."""
    present = list(table.column_names or [])
    if column in present:
        return True
    if column != default:
        raise UserError(
            f"{source} has no column '{column}' that {flag} names (columns: {', '.join(present)}); fix the name, "
            "or drop the flag if the file has no such column."
        )
    return False


MISSING = "a missing value (null in JSON, an empty cell in CSV/TSV, a null in parquet)"


def optional_key(value):
    """An optional id or group cell as text; None when it is missing (null, or an empty cell of a CSV/TSV)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def check_text(value, source, row, column):
    """A text cell must be a non-empty string; says file, row and column otherwise."""
    if value is None:
        raise UserError(f"{source} row {row}, column '{column}': {MISSING}; fill it in or drop the row.")
    if not isinstance(value, str):
        raise UserError(
            f"{source} row {row}, column '{column}': expected text, got {type(value).__name__}; fix or drop the row."
        )
    if not value.strip():
        raise UserError(f"{source} row {row}, column '{column}': empty text; fix or drop the row.")
    return value


# ---------------------------------------------------------------------------- teacher-only context
DEFAULT_CONTEXT_TEMPLATE = "{query}\n{context}"


def check_context_template(template):
    """A --context_template must place {query} and {context} and nothing else in braces."""
    try:
        template.format(query="q", context="c")
    except (KeyError, IndexError, ValueError):
        raise UserError(
            f"--context_template {template!r} may only use {{query}} and {{context}} in braces (double a brace to "
            "write it: {{ }})."
        ) from None
    if "{query}" not in template or "{context}" not in template:
        raise UserError(f"--context_template {template!r} must contain both {{query}} and {{context}}.")
    return template


def check_context(value, source, row, column):
    """A context cell: text, or empty/null when a query has none (the teacher then sees the query alone)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise UserError(
            f"{source} row {row}, column '{column}': expected text or null, got {type(value).__name__}; fix the row."
        )
    return value


def with_context(query, context, template=DEFAULT_CONTEXT_TEMPLATE):
    """What the teacher reads for a query with teacher-only context (the student only ever reads the query)."""
    return query if context is None else template.format(query=query, context=context)


def read_contexts(source, column, split="train"):
    """The context column of a query file, one entry per row (None where a row has none)."""
    table = load_table(source, split=split)
    require_columns(table, [column], source, "--query_context_column")
    return [check_context(value, source, row, column) for row, value in enumerate(table[column])]


def check_id(value, source, row, column):
    """An id cell: a string, or an integer written without quotes; kept as text ("0152" stays "0152")."""
    if value is None:
        raise UserError(
            f"{source} row {row}, column '{column}': {MISSING} where an id is needed; fill it in or drop the row."
        )
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(
            f"{source} row {row}, column '{column}': expected an id (text or integer), got "
            f"{type(value).__name__}; fix or drop the row."
        )
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{source} row {row}, column '{column}': empty id; fix or drop the row.")
    return str(value)


def check_text_list(value, source, row, column):
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(
            f"{source} row {row}, column '{column}': expected a list of texts, got {type(value).__name__}; fix the row."
        )
    return [check_text(item, source, row, column) for item in value]


def read_texts(source, id_column, text_column, split="train", ids_optional=False):
    """(ids, texts) from a corpus or query file; ids must be unique.

    With `ids_optional` (label-free queries), a file without the id column gets its row numbers as ids
    ("0", "1", ...): encode.py and distill_student.py read a query file the same way, so a query store
    written by one is found current by the other.
    """
    table = load_table(source, split=split)
    has_ids = id_column in (table.column_names or [])
    require_columns(table, [text_column] if ids_optional and not has_ids else [id_column, text_column], source,
                    "--id_column/--text_column")  # fmt: skip
    texts = [check_text(value, source, row, text_column) for row, value in enumerate(table[text_column])]
    if not has_ids:
        return [str(row) for row in range(len(texts))], texts
    ids = [check_id(value, source, row, id_column) for row, value in enumerate(table[id_column])]
    check_unique_ids(ids, source, id_column)
    return ids, texts


def scan_corpus(source, id_column, text_column, batch_rows=65536):
    """(ids, data fingerprint) of a corpus file, read in Arrow batches of `batch_rows` rows: every row is
    checked as read_texts checks it, and the fingerprint equals data_fingerprint(*read_texts(...)), but the
    texts are never held together: a scorer of 50M ads against an existing store keeps only the ids."""
    table = load_table(source)
    require_columns(table, [id_column, text_column], source, "--id_column/--text_column")
    ids, digest, row = [], hashlib.sha256(), 0
    for batch in table.select_columns([id_column, text_column]).iter(batch_size=batch_rows):
        for item_id, text in zip(batch[id_column], batch[text_column]):
            item_id, text = check_id(item_id, source, row, id_column), check_text(text, source, row, text_column)
            fingerprint_row(digest, item_id, text)
            ids.append(item_id)
            row += 1
    check_unique_ids(ids, source, id_column)
    return ids, digest.hexdigest()


def iter_corpus(source, id_column, text_column, split="train", ids_optional=False, batch_rows=8192):
    """(id, text) of every row of a corpus or query file, read in Arrow batches of `batch_rows` rows and checked
    as read_texts checks them: only one batch of texts is in memory (a store build streams 50M ads through).
    Uniqueness of the ids is checked by the store's index instead (common/store.py)."""
    table = load_table(source, split=split)
    has_ids = id_column in (table.column_names or [])
    columns = [text_column] if ids_optional and not has_ids else [id_column, text_column]
    require_columns(table, columns, source, "--id_column/--text_column")
    row = 0
    for batch in table.select_columns(columns).iter(batch_size=batch_rows):
        for position, text in enumerate(batch[text_column]):
            item_id = check_id(batch[id_column][position], source, row, id_column) if has_ids else str(row)
            yield item_id, check_text(text, source, row, text_column)
            row += 1


def corpus_fingerprint(source, id_column, text_column, split="train", ids_optional=False):
    """data_fingerprint(*read_texts(...)) computed in one streamed pass, holding neither ids nor texts."""
    return corpus_summary(source, id_column, text_column, split=split, ids_optional=ids_optional)[0]


def corpus_summary(source, id_column, text_column, watch=(), split="train", ids_optional=False):
    """(data fingerprint, row count, the ids of `watch` that the corpus holds) in one streamed pass, holding
    neither the ids nor the texts: a scorer of 50M ads checks its judgments against the corpus with a set of
    the judged ids only, and maps search results to ids through the store."""
    digest, count, watch, found = hashlib.sha256(), 0, set(watch), set()
    for item_id, text in iter_corpus(source, id_column, text_column, split, ids_optional):
        fingerprint_row(digest, item_id, text)
        count += 1
        if item_id in watch:
            found.add(item_id)
    return digest.hexdigest(), count, found


def check_judgments(qrels, qrels_file, query_ids, queries_file, known_ads, corpus_file):
    """Judgments that name a query of the queries file and an ad of the corpus only (`known_ads`: the judged ads
    the corpus holds, from corpus_summary): else the metrics would silently score against the wrong files."""
    unknown_queries = set(qrels) - set(query_ids)
    if unknown_queries:
        raise UserError(
            f"{qrels_file} judges query '{sorted(unknown_queries)[0]}' that is not in {queries_file}; use the "
            "matching judgments file."
        )
    unknown_ads = {doc for grades in qrels.values() for doc in grades} - set(known_ads)
    if unknown_ads:
        raise UserError(
            f"{qrels_file} judges ad '{sorted(unknown_ads)[0]}' that is not in {corpus_file}; use the matching corpus."
        )


def read_qrels(source, query_column="query_id", doc_column="doc_id", relevance_column="relevance"):
    """{query_id: {doc_id: grade}} from a tsv/csv/jsonl of graded judgments."""
    table = load_table(source)
    require_columns(table, [query_column, doc_column, relevance_column], source)
    qrels = {}
    for row, (qid, did, grade) in enumerate(zip(table[query_column], table[doc_column], table[relevance_column])):
        qid, did = check_id(qid, source, row, query_column), check_id(did, source, row, doc_column)
        if optional_key(grade) is None:
            raise UserError(f"{source} row {row}, column '{relevance_column}': {MISSING} where a grade is needed.")
        if isinstance(grade, bool) or not isinstance(grade, (int, str)):
            grade = repr(grade)  # a float (2.5, or 2.0) is not a grade
        try:
            grade = int(grade)
        except (TypeError, ValueError):
            raise UserError(
                f"{source} row {row}, column '{relevance_column}': '{grade}' is not an integer grade."
            ) from None
        previous = qrels.setdefault(qid, {}).get(did)
        if previous is not None and previous != grade:
            raise UserError(
                f"{source} row {row}: query '{qid}' and document '{did}' were already judged {previous}, now "
                f"{grade}; keep one judgment per pair."
            )
        qrels[qid][did] = grade
    if not any(grade > 0 for grades in qrels.values() for grade in grades.values()):
        raise UserError(f"{source} judges nothing relevant (no grade > 0); check the relevance column.")
    return qrels


def check_unique_ids(ids, source, id_column):
    if len(set(ids)) != len(ids):
        duplicate = next(value for value, count in _counts(ids).items() if count > 1)
        raise UserError(
            f"{source}: id '{duplicate}' appears more than once in column '{id_column}'; ids must be unique."
        )


def _counts(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def text_key(text):
    """A stable 63-bit key for an id or a text (for duplicate and false-negative masks)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def fingerprint_row(digest, item_id, text):
    digest.update(item_id.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x01")


def data_fingerprint(ids, texts):
    digest = hashlib.sha256()
    for item_id, text in zip(ids, texts):
        fingerprint_row(digest, item_id, text)
    return digest.hexdigest()


def keys_array(values):
    return np.array([text_key(value) for value in values], dtype=np.int64)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A shuffled order of rows in which every global batch holds texts of similar length.

    Each epoch: a random permutation (a function of seed and epoch only), cut into groups of
    `group_batches` global batches; each group sorted by length (characters: free to compute for a
    billion rows, and close to the token count) and cut into global batches; the order of the full
    batches shuffled, a partial last batch kept last. Padding to the longest text of a batch then
    wastes little. Used with DataLoader(batch_size=per-device batch): accelerate hands process k the
    k-th per-device slice of each global batch, so N processes see exactly the rows of 1 process with
    the global batch.
    """

    def __init__(self, lengths, global_batch_size, seed, group_batches=64):
        self.lengths = np.asarray(lengths)
        self.global_batch_size, self.seed, self.group_batches = global_batch_size, seed, group_batches
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        size, group = self.global_batch_size, self.global_batch_size * self.group_batches
        batches = []
        for start in range(0, len(order), group):
            rows = order[start : start + group]
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            batches += [rows[i : i + size] for i in range(0, len(rows), size)]
        full = [batch for batch in batches if len(batch) == size]
        partial = [batch for batch in batches if len(batch) < size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        for batch in shuffled + partial:
            yield from batch.tolist()
