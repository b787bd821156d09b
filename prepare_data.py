"""Convert the public data sets a user tries first into the project's files (see docs/recipes.md).

    esci: Amazon Shopping Queries (ESCI), the two parquet files of github.com/amazon-science/esci-data
          (shopping_queries_dataset_examples.parquet, shopping_queries_dataset_products.parquet). One locale
          (--locale us). Products are the ads (title and brand, --product_fields); the train split gives
          clicks (each Exact product a positive, the query's Irrelevant products its hard negatives) and the
          label-free queries; the test split gives test queries and graded judgments E=3, S=2, C=1, I=0.
    beir: a BEIR-format folder (corpus.jsonl with _id/title/text, queries.jsonl with _id/text,
          qrels/<split>.tsv with query-id/corpus-id/score), e.g. MS MARCO passage as BeIR/msmarco
          (qrels/train.tsv -> clicks and label-free queries; qrels/dev.tsv or test.tsv -> test queries and
          judgments).

Outputs under --output_dir: ads.parquet (id, text), clicks.parquet (query, positive, positive_id,
negatives), queries.parquet (id, query: label-free), test_queries.parquet (id, text), qrels.tsv
(query_id, doc_id, relevance). The corpus is streamed in Arrow batches and written batch by batch; only the
texts of ads that clicks name are held (MS MARCO: 8.8M passages, ~0.5M of them clicked).

    python prepare_data.py --dataset esci --esci_dir esci-data/shopping_queries_dataset --output_dir data/esci
    python prepare_data.py --dataset beir --beir_dir msmarco --test_split dev --output_dir data/msmarco
From the Hugging Face hub (streamed, rewritten into the layouts above, then converted the same way):
    python prepare_data.py --dataset esci --esci_hub tasksource/esci --output_dir data/esci
    python prepare_data.py --dataset beir --beir_hub BeIR/msmarco --test_split dev --output_dir data/msmarco
"""

import argparse
import csv
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from common.args import non_negative_int
from common.errors import UserError, run_cli
from common.runtime import logger

ESCI_GRADES = {"E": 3, "S": 2, "C": 1, "I": 0}
ESCI_FILES = ("shopping_queries_dataset_examples.parquet", "shopping_queries_dataset_products.parquet")
OUTPUTS = ("ads.parquet", "clicks.parquet", "queries.parquet", "test_queries.parquet", "qrels.tsv")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["esci", "beir"], required=True)
    parser.add_argument("--esci_dir", default=None, help="Folder with the two ESCI parquet files.")
    parser.add_argument(
        "--esci_hub",
        default=None,
        help="ESCI as merged on the Hugging Face hub (e.g. tasksource/esci: one row per judgment with the product's "
        "fields, splits train and test), or a local folder in that layout; streamed.",
    )
    parser.add_argument("--locale", default="us", help="ESCI product_locale kept (us, es, jp).")
    parser.add_argument(
        "--product_fields", default="product_title,product_brand", help="ESCI product columns joined into ad text."
    )
    parser.add_argument("--small_version", action="store_true", help="ESCI: only the rows of its reduced task 1.")
    parser.add_argument("--beir_dir", default=None, help="BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/).")
    parser.add_argument(
        "--beir_hub",
        default=None,
        help="A BEIR data set on the hub (e.g. BeIR/msmarco: configs corpus and queries), or a local folder in that "
        "layout; its judgments come from --beir_qrels_hub (default: <beir_hub>-qrels). Streamed.",
    )
    parser.add_argument("--beir_qrels_hub", default=None)
    parser.add_argument("--train_split", default="train", help="BEIR qrels split for clicks.")
    parser.add_argument("--test_split", default="test", help="BEIR qrels split for the test queries.")
    parser.add_argument("--max_negatives", type=non_negative_int, default=8, help="ESCI: Irrelevant products kept.")
    parser.add_argument("--batch_rows", type=non_negative_int, default=65536)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    return parser.parse_args(argv)


def check_output(args):
    """A new or empty folder, or one holding only our outputs with --overwrite_output_dir."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file; choose a folder path.")
    present = set(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else set()
    if present - set(OUTPUTS) - {".partial"}:
        raise UserError(
            f"--output_dir {args.output_dir} holds files prepare_data.py did not write; choose a new or empty folder."
        )
    if present - {".partial"} and not args.overwrite_output_dir:
        raise UserError(f"{args.output_dir} already holds prepared data; pass --overwrite_output_dir to replace it.")


def parquet_file(path, columns, what):
    """A parquet file opened by its footer, refused in one sentence when it is damaged or lacks a column."""
    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # not parquet, truncated, damaged footer
        raise UserError(f"{path} is not a readable parquet file ({type(error).__name__}); download it again.") from None
    names = handle.schema_arrow.names
    absent = [column for column in columns if column not in names]
    if absent:
        raise UserError(
            f"{path} has no column {absent[0]} (columns: {', '.join(names)}); check that it is {what} and the "
            "column flags (--product_fields)."
        )
    return handle


def need_file(path, flag):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; point {flag} at the folder that holds it.")
    return path


class Outputs:
    """The five files, written into <output_dir>/.partial and moved into place together at the end."""

    def __init__(self, output_dir):
        self.output_dir, self.partial = output_dir, os.path.join(output_dir, ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        os.makedirs(self.partial)
        self.writers = {}

    def write(self, name, rows, schema):
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=schema)
        if name not in self.writers:
            self.writers[name] = pq.ParquetWriter(os.path.join(self.partial, name), schema)
        self.writers[name].write_table(table)

    def write_qrels(self, triples):
        with open(os.path.join(self.partial, "qrels.tsv"), "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["query_id", "doc_id", "relevance"])
            writer.writerows(triples)

    def finish(self, counts):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
        missing = [name for name in OUTPUTS if not os.path.exists(os.path.join(self.partial, name))]
        if missing:
            raise UserError(f"The source gave no rows for {', '.join(missing)}; check the split and locale flags.")
        for name in OUTPUTS:
            os.replace(os.path.join(self.partial, name), os.path.join(self.output_dir, name))
        os.rmdir(self.partial)
        logger.info("Wrote " + ", ".join(f"{name}: {count}" for name, count in counts.items()))


ADS = pa.schema([("id", pa.string()), ("text", pa.string())])
CLICKS = pa.schema(
    [
        ("query", pa.string()),
        ("positive", pa.string()),
        ("positive_id", pa.string()),
        ("negatives", pa.list_(pa.string())),
    ]
)
QUERIES = pa.schema([("id", pa.string()), ("query", pa.string())])
TEST = pa.schema([("id", pa.string()), ("text", pa.string())])


def prepare_esci(args, out):
    examples_path, products_path = (need_file(os.path.join(args.esci_dir, name), "--esci_dir") for name in ESCI_FILES)
    fields = [field.strip() for field in args.product_fields.split(",") if field.strip()]
    products = parquet_file(products_path, ["product_id", "product_locale", *fields], "the ESCI products file")
    columns = ["query_id", "query", "product_id", "product_locale", "esci_label", "small_version", "split"]
    examples_file = parquet_file(examples_path, columns, "the ESCI examples file")
    try:
        examples = examples_file.read(columns=columns).to_pandas()
    except Exception as error:  # damaged data pages behind a readable footer
        raise UserError(f"{examples_path} could not be read ({type(error).__name__}); download it again.") from None
    examples = examples[examples["product_locale"] == args.locale]
    if args.small_version:
        examples = examples[examples["small_version"] == 1]
    unknown = set(examples["esci_label"]) - set(ESCI_GRADES)
    if unknown:
        raise UserError(f"{examples_path}: esci_label '{sorted(unknown)[0]}' is not one of E, S, C, I.")
    examples["query_id"] = examples["query_id"].astype(str)
    examples["product_id"] = examples["product_id"].astype(str)
    train = examples[examples["split"] == "train"]
    clicked = set(train.loc[train["esci_label"].isin(["E", "I"]), "product_id"])

    # Ads: every product of the locale, streamed; only clicked products' texts kept for the clicks.
    ad_text, ads = {}, 0
    for batch in products.iter_batches(
        batch_size=args.batch_rows or 65536, columns=["product_id", "product_locale", *fields]
    ):
        rows = []
        for row in batch.to_pylist():
            if row["product_locale"] != args.locale:
                continue
            text = ". ".join(str(row[field]).strip() for field in fields if row[field] and str(row[field]).strip())
            if not text:
                continue  # a product without title or brand cannot be an ad
            rows.append({"id": str(row["product_id"]), "text": text})
            if rows[-1]["id"] in clicked:
                ad_text[rows[-1]["id"]] = text
        out.write("ads.parquet", rows, ADS)
        ads += len(rows)

    clicks = []
    for _, group in train.groupby("query_id", sort=True):
        query = group["query"].iloc[0]
        negatives = [ad_text[p] for p in group.loc[group["esci_label"] == "I", "product_id"] if p in ad_text]
        for product in group.loc[group["esci_label"] == "E", "product_id"]:
            if product in ad_text:
                clicks.append({"query": query, "positive": ad_text[product], "positive_id": product,
                               "negatives": negatives[: args.max_negatives]})  # fmt: skip
    out.write("clicks.parquet", clicks, CLICKS)
    train_queries = train.drop_duplicates("query_id").sort_values("query_id")
    out.write(
        "queries.parquet",
        [{"id": q, "query": t} for q, t in zip(train_queries["query_id"], train_queries["query"])],
        QUERIES,
    )
    test = examples[examples["split"] == "test"]
    test_queries = test.drop_duplicates("query_id").sort_values("query_id")
    out.write(
        "test_queries.parquet",
        [{"id": q, "text": t} for q, t in zip(test_queries["query_id"], test_queries["query"])],
        TEST,
    )
    out.write_qrels(
        sorted(
            (q, p, ESCI_GRADES[label]) for q, p, label in zip(test["query_id"], test["product_id"], test["esci_label"])
        )
    )
    return {
        "ads": ads,
        "clicks": len(clicks),
        "label-free queries": len(train_queries),
        "test queries": len(test_queries),
    }


def read_beir_qrels(path):
    """{query_id: {doc_id: score}} from a BEIR qrels tsv (header query-id, corpus-id, score)."""
    qrels = {}
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a byte-order mark is not the header
        reader = csv.reader(handle, delimiter="\t")
        line = 1
        try:
            header = next(reader, [])
            if header[:3] != ["query-id", "corpus-id", "score"]:
                raise UserError(f"{path}: the header must be query-id, corpus-id, score (BEIR qrels).")
            for line, row in enumerate(reader, start=2):
                try:
                    qrels.setdefault(row[0], {})[row[1]] = int(row[2])
                except (IndexError, ValueError):
                    raise UserError(f"{path} line {line}: expected query-id, corpus-id and an integer score.") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} near line {line + 1} is not valid UTF-8; save it as UTF-8.") from None
    return qrels


def read_jsonl_lines(path, required=("_id", "text")):
    """The JSON objects of a BEIR .jsonl file, each checked for the `required` keys (a byte-order mark is
    skipped); a line that is not an object with them, or not UTF-8, is named by its number."""
    line_number = 0
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"{path} line {line_number} is not JSON; check that it is a BEIR file.") from None
                missing = [key for key in required if not isinstance(record, dict) or record.get(key) is None]
                if missing:
                    raise UserError(
                        f"{path} line {line_number} has no '{missing[0]}'; fix the line (BEIR rows are JSON objects "
                        f"with {' and '.join(required)})."
                    )
                yield record
        except UnicodeDecodeError:
            raise UserError(f"{path} line {line_number + 1} is not valid UTF-8; save it as UTF-8.") from None


def prepare_beir(args, out):
    corpus_path = need_file(os.path.join(args.beir_dir, "corpus.jsonl"), "--beir_dir")
    queries_path = need_file(os.path.join(args.beir_dir, "queries.jsonl"), "--beir_dir")
    train = read_beir_qrels(need_file(os.path.join(args.beir_dir, "qrels", f"{args.train_split}.tsv"), "--beir_dir"))
    test = read_beir_qrels(need_file(os.path.join(args.beir_dir, "qrels", f"{args.test_split}.tsv"), "--beir_dir"))
    clicked = {doc for grades in train.values() for doc, score in grades.items() if score > 0}
    ad_text, rows, ads = {}, [], 0
    for record in read_jsonl_lines(corpus_path, required=("_id",)):  # a title alone is text enough
        text = " ".join(part for part in (record.get("title") or "", record.get("text") or "") if part.strip()).strip()
        if not text:
            continue
        rows.append({"id": str(record["_id"]), "text": text})
        if rows[-1]["id"] in clicked:
            ad_text[rows[-1]["id"]] = text
        if len(rows) >= (args.batch_rows or 65536):
            out.write("ads.parquet", rows, ADS)
            ads, rows = ads + len(rows), []
    out.write("ads.parquet", rows, ADS)
    ads += len(rows)
    query_text = {str(record["_id"]): record["text"] for record in read_jsonl_lines(queries_path)
                  if str(record["_id"]) in train or str(record["_id"]) in test}  # fmt: skip
    clicks, label_free = [], []
    for query_id in sorted(train):
        if query_id not in query_text:
            continue
        label_free.append({"id": query_id, "query": query_text[query_id]})
        for doc, score in sorted(train[query_id].items()):
            if score > 0 and doc in ad_text:
                clicks.append({"query": query_text[query_id], "positive": ad_text[doc], "positive_id": doc,
                               "negatives": []})  # fmt: skip
    out.write("clicks.parquet", clicks, CLICKS)
    out.write("queries.parquet", label_free, QUERIES)
    test_ids = [query_id for query_id in sorted(test) if query_id in query_text]
    out.write("test_queries.parquet", [{"id": q, "text": query_text[q]} for q in test_ids], TEST)
    out.write_qrels([(q, doc, score) for q in test_ids for doc, score in sorted(test[q].items())])
    return {"ads": ads, "clicks": len(clicks), "label-free queries": len(label_free), "test queries": len(test_ids)}


# ---------------------------------------------------------------------------- from the hub
ESCI_LABEL_NAMES = {"Exact": "E", "Substitute": "S", "Complement": "C", "Irrelevant": "I", **{k: k for k in "ESCI"}}
ESCI_PRODUCT_FIELDS = ["product_title", "product_brand", "product_description", "product_bullet_point", "product_color"]


def _hub_split(source, split, config=None):
    """One split of a hub data set (or a local folder in its layout), streamed."""
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split, streaming=True)
    except Exception as error:
        raise UserError(
            f"Could not load '{source}'{f' ({config})' if config else ''} split '{split}' ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); check the id, the split and the connection."
        ) from None


def esci_from_hub(args, folder):
    """ESCI merged on the hub -> the two files of the GitHub release in `folder` (examples and products, each
    product once), so that prepare_esci converts both the same way."""
    examples_schema = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("product_id", pa.string()),
                                 ("product_locale", pa.string()), ("esci_label", pa.string()),
                                 ("small_version", pa.int64()), ("split", pa.string())])  # fmt: skip
    products_schema = pa.schema([("product_id", pa.string()), ("product_locale", pa.string())]
                                + [(field, pa.string()) for field in ESCI_PRODUCT_FIELDS])  # fmt: skip
    examples = pq.ParquetWriter(os.path.join(folder, ESCI_FILES[0]), examples_schema)
    products = pq.ParquetWriter(os.path.join(folder, ESCI_FILES[1]), products_schema)
    seen = set()
    try:
        for split in ("train", "test"):
            for batch in _hub_split(args.esci_hub, split).iter(batch_size=args.batch_rows or 65536):
                count = len(batch["query"])
                missing = [
                    c for c in ("query_id", "query", "product_id", "product_locale", "esci_label") if c not in batch
                ]
                if missing:
                    raise UserError(
                        f"{args.esci_hub} has no column {missing[0]}; check that it is ESCI merged (tasksource/esci)."
                    )
                labels = [ESCI_LABEL_NAMES.get(label, label) for label in batch["esci_label"]]
                examples.write_table(pa.Table.from_pydict({
                    "query_id": [str(v) for v in batch["query_id"]], "query": batch["query"],
                    "product_id": [str(v) for v in batch["product_id"]], "product_locale": batch["product_locale"],
                    "esci_label": labels, "small_version": batch.get("small_version", [0] * count),
                    "split": [split] * count,
                }, schema=examples_schema))  # fmt: skip
                rows, fields = [], {field: batch.get(field) or [None] * count for field in ESCI_PRODUCT_FIELDS}
                for i in range(count):
                    key = (str(batch["product_id"][i]), batch["product_locale"][i])
                    if key not in seen:
                        seen.add(key)
                        rows.append({"product_id": key[0], "product_locale": key[1],
                                     **{field: values[i] for field, values in fields.items()}})  # fmt: skip
                if rows:
                    products.write_table(pa.Table.from_pylist(rows, schema=products_schema))
    finally:
        examples.close()
        products.close()


def beir_from_hub(args, folder):
    """A BEIR data set on the hub -> the BEIR folder layout in `folder` (corpus.jsonl, queries.jsonl and
    qrels/<split>.tsv), so that prepare_beir converts it; the hub names the dev split 'validation'."""
    qrels_source = args.beir_qrels_hub or f"{args.beir_hub.rstrip('/')}-qrels"
    for config, name in (("corpus", "corpus.jsonl"), ("queries", "queries.jsonl")):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            for batch in _hub_split(args.beir_hub, config, config).iter(batch_size=args.batch_rows or 65536):
                fields = [key for key in ("_id", "title", "text") if key in batch]
                for values in zip(*(batch[key] for key in fields)):
                    handle.write(json.dumps(dict(zip(fields, values)), ensure_ascii=False) + "\n")
    os.makedirs(os.path.join(folder, "qrels"))
    for split in dict.fromkeys([args.train_split, args.test_split]):
        hub_split = "validation" if split == "dev" else split
        with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["query-id", "corpus-id", "score"])
            for batch in _hub_split(qrels_source, hub_split).iter(batch_size=args.batch_rows or 65536):
                writer.writerows(zip(batch["query-id"], batch["corpus-id"], batch["score"]))


def main(argv=None):
    args = parse_args(argv)
    local, hub = {"esci": (args.esci_dir, args.esci_hub), "beir": (args.beir_dir, args.beir_hub)}[args.dataset]
    if bool(local) == bool(hub):
        raise UserError(
            f"--dataset {args.dataset} reads either --{args.dataset}_dir (a local folder of its files) or "
            f"--{args.dataset}_hub (a hub id); pass one of them."
        )
    check_output(args)
    created = not os.path.exists(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    out = Outputs(args.output_dir)
    download, counts = None, None
    try:
        if hub:  # the hub's rows rewritten into the local layout beside the outputs, then converted as local files
            download = os.path.join(out.partial, "download")
            os.makedirs(download)
            if args.dataset == "esci":
                esci_from_hub(args, download)
                args.esci_dir = download
            else:
                beir_from_hub(args, download)
                args.beir_dir = download
        counts = prepare_esci(args, out) if args.dataset == "esci" else prepare_beir(args, out)
        if download:
            shutil.rmtree(download)
        out.finish(counts)
    finally:  # a failed conversion leaves the earlier files as they were and no partial ones
        for writer in out.writers.values():
            writer.close()
        shutil.rmtree(out.partial, ignore_errors=True)
        if counts is None and created and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)  # a refused conversion leaves no trace of a folder it made
    return counts


if __name__ == "__main__":
    run_cli(main)
