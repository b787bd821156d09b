"""Graph metadata over ads (co-clicked ads, ads of one group or advertiser, linked documents) and over queries
(queries of one session, queries that click the same ads) for the graph regulariser of phases 1 and 3
(common/loss.py `graph_loss`, after RAMEN, arXiv 2402.18434). A graph over queries becomes targets through the
training clicks: a query's extra targets are the ads its neighbours clicked (`read_query_graph`).

A graph file has one edge per row: node id, neighbour id, optional weight (> 0; 1 when the column is absent),
as .tsv/.csv with a header line, .jsonl or .parquet. Edges are directed as written: give both directions for
a symmetric relation. The edges are held as CSR arrays over the node numbers the caller resolves the ids to
(the rows of the ad store in phase 3, the training ads in phase 1): no dict of ids or texts.
"""

import csv
import hashlib
import json
import math
import os

import numpy as np

from common.errors import UserError

GRAPH_FILE_TYPES = (".tsv", ".csv", ".jsonl", ".parquet")


class Graph:
    """Weighted directed edges between nodes 0..num_nodes-1 in CSR form: the neighbours of node n are
    targets[offsets[n]:offsets[n+1]] with their weights, sorted by neighbour."""

    def __init__(self, offsets, targets, weights, source, file_edges=None):
        self.offsets, self.targets, self.weights, self.source = offsets, targets, weights, source
        # A graph derived from a file's edges (a query graph turned into query -> ad targets): the file's count.
        self.file_edges = file_edges

    @property
    def num_nodes(self):
        return len(self.offsets) - 1

    @property
    def num_edges(self):
        return len(self.targets)

    def degree(self, nodes):
        nodes = np.asarray(nodes, dtype=np.int64)
        return self.offsets[nodes + 1] - self.offsets[nodes]

    def fingerprint(self):
        digest = hashlib.sha256()
        for array in (self.offsets, self.targets, self.weights):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def sample(self, node, count, rng, weighted=True):
        """Up to `count` distinct neighbours of `node` (with their edge weights), drawn without replacement in
        proportion to the weights (or uniformly), padded with node -1 and weight 0 to exactly `count`."""
        start, end = int(self.offsets[node]), int(self.offsets[node + 1])
        nodes = np.full(count, -1, dtype=np.int64)
        weights = np.zeros(count, dtype=np.float32)
        degree = end - start
        if degree == 0:
            return nodes, weights
        edge_weights = self.weights[start:end].astype(np.float64)
        if degree <= count:
            chosen = np.arange(degree)
        else:
            chosen = rng.choice(
                degree, size=count, replace=False, p=edge_weights / edge_weights.sum() if weighted else None
            )
            chosen.sort()
        nodes[: len(chosen)] = self.targets[start + chosen]
        weights[: len(chosen)] = edge_weights[chosen]
        return nodes, weights


def _rows_of_text_file(path, delimiter):
    """(line number, cells) of a delimited file, the header line first."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for line, cells in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            if cells:
                yield line, cells


def _records(path, columns, flag):
    """(where, {column: value}) per edge, and the columns the file has, for every supported file type."""
    extension = os.path.splitext(path)[1].lower()
    node_column, neighbor_column, _ = columns
    if extension in (".tsv", ".csv"):
        rows = _rows_of_text_file(path, "\t" if extension == ".tsv" else ",")
        first = next(rows, None)
        if first is None:
            raise UserError(f"{path} is empty; point {flag} at a file with a header line and edges.")
        header = [name.strip() for name in first[1]]
        if node_column not in header or neighbor_column not in header:
            missing = [name for name in (node_column, neighbor_column) if name not in header]
            hint = (
                "it has no header line: add one"
                if all(_is_number(name) for name in header)
                else "rename the columns or name them with --graph_node_column / --graph_neighbor_column"
            )
            raise UserError(
                f"{path} line 1: the header ({', '.join(header)}) has no column {', '.join(map(repr, missing))} "
                f"for the node and neighbour ids; {hint}."
            )

        def records():
            for line, cells in rows:
                if len(cells) != len(header):
                    raise UserError(
                        f"{path} line {line}: {len(cells)} cells under a header of {len(header)} columns; fix the row."
                    )
                yield f"line {line}", dict(zip(header, cells))

        return records(), header
    if extension == ".jsonl":

        def records():
            with open(path, encoding="utf-8-sig") as handle:
                for line, text in enumerate(handle, start=1):
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError:
                        raise UserError(f"{path} line {line} is not a JSON object; fix the line.") from None
                    if not isinstance(record, dict):
                        raise UserError(f"{path} line {line} is not a JSON object; fix the line.")
                    for column in (node_column, neighbor_column):
                        if column not in record:
                            raise UserError(
                                f"{path} line {line} has no key '{column}' (keys: {', '.join(record)}); add it or "
                                "name the key with --graph_node_column / --graph_neighbor_column."
                            )
                    yield f"line {line}", record

        return records(), None
    if extension == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        header = parquet.schema_arrow.names
        missing = [name for name in (node_column, neighbor_column) if name not in header]
        if missing:
            raise UserError(
                f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)}); rename it or "
                "name it with --graph_node_column / --graph_neighbor_column."
            )
        wanted = [name for name in columns if name in header]

        def records():
            row = 0
            for batch in parquet.iter_batches(columns=wanted, batch_size=65536):
                for record in batch.to_pylist():
                    yield f"row {row}", record
                    row += 1

        return records(), header
    raise UserError(
        f"{path}: unsupported graph file type '{extension}'; use {', '.join(GRAPH_FILE_TYPES)} (with a header line)."
    )


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_node(value, path, where, column):
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise UserError(f"{path} {where}, column '{column}': {value!r} is not an id; fix or drop the row.")
    return str(value).strip() if isinstance(value, str) else str(value)


def _check_weight(value, path, where, column):
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise UserError(
            f"{path} {where}, column '{column}': weight {value!r} is not a number > 0; fix it, drop the row, or "
            "drop the column (every edge then weighs 1)."
        )
    return number


def read_graph(path, find_nodes, num_nodes, *, columns, what, keep=None, chunk_rows=1 << 20, flag="--ad_graph_file"):
    """The Graph of an edge file, every row checked: ids known to `find_nodes` (a list of ids -> node numbers,
    -1 for an unknown id), no self-loop, no edge twice, weights finite and > 0.

    `columns` = (node column, neighbour column, weight column); a missing weight column means weight 1.
    `what` names the nodes in messages (e.g. "an ad of the ad store"). With `keep` (a bool per node), only the
    edges from kept nodes are held (every row is still checked). Rows are resolved a chunk at a time, so a
    large graph costs its CSR arrays (8 + 8 + 4 bytes per edge held, 8 per node), never a table of its ids.
    """
    if not os.path.exists(path):
        raise UserError(f"Graph file '{path}' does not exist; check {flag}.")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty; point {flag} at a file with a header line and edges.")
    node_column, neighbor_column, weight_column = columns
    records, header = _records(path, columns, flag)
    has_weight = header is not None and weight_column in header
    sources, targets, weights, places = [], [], [], []

    def resolve(chunk):
        ids = [value for _, node, neighbour, _ in chunk for value in (node, neighbour)]
        found = np.asarray(find_nodes(ids), dtype=np.int64).reshape(-1, 2)
        for (where, node, neighbour, _), (node_row, neighbour_row) in zip(chunk, found):
            for value, row, column in ((node, node_row, node_column), (neighbour, neighbour_row, neighbor_column)):
                if row < 0:
                    raise UserError(
                        f"{path} {where}, column '{column}': id '{value}' is not {what}; drop the edge or add the node."
                    )
            if node_row == neighbour_row:
                raise UserError(
                    f"{path} {where}: node '{node}' links to itself; drop the row (a self-loop adds no neighbour)."
                )
        held = keep[found[:, 0]] if keep is not None else np.ones(len(found), dtype=bool)
        sources.append(found[held, 0])
        targets.append(found[held, 1])
        weights.append(np.array([weight for *_, weight in chunk], dtype=np.float32)[held])
        places.append([where for (where, *_), is_held in zip(chunk, held) if is_held])

    chunk = []
    for where, record in records:
        node = _check_node(record.get(node_column), path, where, node_column)
        neighbour = _check_node(record.get(neighbor_column), path, where, neighbor_column)
        if header is None:  # jsonl: a weight key on any line counts for that line
            weight = record.get(weight_column, 1.0)
            weight = 1.0 if weight_column not in record else _check_weight(weight, path, where, weight_column)
        else:
            weight = _check_weight(record.get(weight_column), path, where, weight_column) if has_weight else 1.0
        chunk.append((where, node, neighbour, weight))
        if len(chunk) == chunk_rows:
            resolve(chunk)
            chunk = []
    if chunk:
        resolve(chunk)
    if not sources:
        raise UserError(f"{path} has a header but no edge; add edges or drop {flag}.")
    sources, targets, weights = np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)
    order = np.lexsort((targets, sources))
    sources, targets, weights = sources[order], targets[order], weights[order]
    repeated = np.flatnonzero((sources[1:] == sources[:-1]) & (targets[1:] == targets[:-1]))
    if len(repeated):
        first, second = sorted((int(order[repeated[0]]), int(order[repeated[0] + 1])))
        flat = [where for chunk_places in places for where in chunk_places]
        raise UserError(
            f"{path} {flat[second]} repeats the edge of {flat[first]}; keep one row per edge (add their weights "
            "into one)."
        )
    offsets = np.zeros(num_nodes + 1, dtype=np.int64)
    np.add.at(offsets, sources + 1, 1)
    return Graph(np.cumsum(offsets), targets, weights, path)


def draw_neighbours(graph, nodes, count, seed, keys, weighted=True):
    """Neighbour nodes (len(nodes), count) and their weights for a batch: node i's draw is a function of
    (seed, keys[i]) only (e.g. the key of the query's text), so any number of processes, data loader workers
    or a resumed run draw the same neighbours for the same row."""
    drawn = np.full((len(nodes), count), -1, dtype=np.int64)
    drawn_weights = np.zeros((len(nodes), count), dtype=np.float32)
    for index, (node, key) in enumerate(zip(nodes, keys)):
        rng = np.random.default_rng([seed, int(key)])
        drawn[index], drawn_weights[index] = graph.sample(int(node), count, rng, weighted)
    return drawn, drawn_weights


def draw_from_graphs(graphs, rows, count, seed, keys, weighted=True):
    """`count` targets per row from each (Graph, row field naming the row's node) pair, side by side: nodes and
    weights of shape (len(rows), count x len(graphs)), drawn as draw_neighbours draws."""
    draws = [
        draw_neighbours(graph, [row[field] for row in rows], count, seed, keys, weighted) for graph, field in graphs
    ]
    return np.concatenate([nodes for nodes, _ in draws], axis=1), np.concatenate([w for _, w in draws], axis=1)


def read_query_graph_of_rows(path, rows, ad_field, *, columns, what, logger):
    """read_query_graph over training rows (each with a "query_id" and its clicked ad's node in `ad_field`):
    sets each row's "query_node", logs the coverage, and returns the (Graph, "query_node") pair the collators
    draw from."""
    graph, query_nodes = read_query_graph(
        path, [row["query_id"] for row in rows], [row[ad_field] for row in rows], columns=columns, what=what
    )
    for row, node in zip(rows, query_nodes):
        row["query_node"] = int(node)
    log_graph(logger, graph, query_nodes, "query")
    return graph, "query_node"


def log_graph(logger, graph, anchor_nodes, what):
    """How much of the training data the graph reaches (a graph that reaches nothing is an error)."""
    degrees = graph.degree(anchor_nodes)
    covered = int((degrees > 0).sum())
    if covered == 0:
        raise UserError(
            f"{graph.source}: none of the {len(anchor_nodes):,} training rows' {what} has a neighbour in the graph; "
            "check that the graph names the same ids as the training data."
        )
    edges = f"{graph.num_edges:,} edges"
    if graph.file_edges is not None:
        edges = f"{graph.file_edges:,} edges between queries, giving {graph.num_edges:,} query -> ad targets"
    logger.info(
        f"Graph {graph.source}: {edges}; {covered:,} of {len(anchor_nodes):,} training rows "
        f"({100 * covered / len(anchor_nodes):.1f}%) have a {what} with neighbours (mean degree "
        f"{degrees[degrees > 0].mean():.1f})"
    )


class CorpusIds:
    """Row numbers of a corpus's ids without holding the ids: a sorted array of their 63-bit hashes (8 + 8 bytes
    per ad, read by streaming the corpus once), and the texts of chosen rows by streaming it again."""

    def __init__(self, source, id_column, text_column):
        from common.data import iter_corpus, text_key

        self.source, self.columns = source, (id_column, text_column)
        hashes = np.fromiter((text_key(item_id) for item_id, _ in iter_corpus(source, id_column, text_column)),
                             dtype=np.int64)  # fmt: skip
        self.order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.order]
        repeated = np.flatnonzero(self.hashes[1:] == self.hashes[:-1])
        if len(repeated):
            rows = sorted(self.order[repeated[0] : repeated[0] + 2].tolist())
            raise UserError(f"{source} rows {rows[0]} and {rows[1]} have the same id; ids must be unique.")

    def __len__(self):
        return len(self.hashes)

    def find_rows(self, ids):
        """Rows of the given ids; -1 for an id not in the corpus."""
        from common.data import text_key

        hashes = np.array([text_key(str(item_id)) for item_id in ids], dtype=np.int64)
        position = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[position] == hashes, self.order[position], -1)

    def texts(self, rows):
        """{row: text} of the given rows, one more pass over the corpus."""
        from common.data import iter_corpus

        wanted, found = set(int(row) for row in rows), {}
        for row, (_, text) in enumerate(iter_corpus(self.source, *self.columns)):
            if row in wanted:
                found[row] = text
        return found


def read_query_graph(path, query_ids, clicked, *, columns, what):
    """A graph over queries (queries of one session, queries that click the same ads) turned into extra targets:
    query q's targets are the ads its graph neighbours q' were clicked on in the training data, each weighing
    w(q, q') / (the number of ads q' clicked), summed over the neighbours that clicked it; an ad q itself
    clicked is left out (it is already q's positive). Returns (that Graph from query nodes to the ads' node
    numbers, the query node of each training row).

    query_ids: the id of each training row's query; clicked: the node number of each row's clicked ad. The
    query graph's ids must be ids of training queries (`what` names them in messages); its rows are checked as
    read_graph checks them.
    """
    node_of = {}
    nodes = (node_of.setdefault(str(query_id), len(node_of)) for query_id in query_ids)
    query_nodes = np.fromiter(nodes, dtype=np.int64, count=len(query_ids))
    clicked = np.asarray(clicked, dtype=np.int64)
    queries = read_graph(path, lambda ids: [node_of.get(str(i), -1) for i in ids], len(node_of), columns=columns,
                         what=what, flag="--query_graph_file")  # fmt: skip
    # The distinct ads each query clicked, in CSR form over the query nodes.
    pairs = np.unique(np.stack([query_nodes, clicked], axis=1), axis=0)
    click_offsets = np.zeros(len(node_of) + 1, dtype=np.int64)
    np.add.at(click_offsets, pairs[:, 0] + 1, 1)
    click_offsets = np.cumsum(click_offsets)
    click_counts = np.diff(click_offsets)
    # Every (query, neighbour, ad the neighbour clicked) triple, then summed per (query, ad).
    sources = np.repeat(np.arange(len(node_of)), np.diff(queries.offsets))
    per_edge = click_counts[queries.targets]
    starts = np.repeat(click_offsets[queries.targets], per_edge)
    within = np.arange(per_edge.sum()) - np.repeat(np.cumsum(per_edge) - per_edge, per_edge)
    ads = pairs[starts + within, 1]
    weights = np.repeat(queries.weights.astype(np.float64) / per_edge.clip(min=1), per_edge)
    sources = np.repeat(sources, per_edge)
    num_ads = int(clicked.max()) + 1
    edge_keys = sources * num_ads + ads
    own_keys = pairs[:, 0] * num_ads + pairs[:, 1]
    kept = ~np.isin(edge_keys, own_keys)
    edge_keys, inverse = np.unique(edge_keys[kept], return_inverse=True)
    summed = np.bincount(inverse, weights=weights[kept], minlength=len(edge_keys)).astype(np.float32)
    offsets = np.zeros(len(node_of) + 1, dtype=np.int64)
    np.add.at(offsets, edge_keys // num_ads + 1, 1)
    targets = Graph(np.cumsum(offsets), edge_keys % num_ads, summed, path, file_edges=queries.num_edges)
    return targets, query_nodes
