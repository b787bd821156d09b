"""Argument types, the flags every phase shares, `--config` YAML files, and the checks of values that must fail
before any work."""

import argparse
import itertools
import json
import math
import os
import sys

import yaml

from common.errors import UserError
from common.run_folder import check_output_dir, lock_folder
from common.runtime import check_fits_in_memory


# ---------------------------------------------------------------------------- typed values
# argparse calls these on the text of a flag (from the command line or, via `parse_with_config`, from YAML),
# so a wrong type or an out-of-range value stops the run before any work, with one `error:` line naming it.
def _integer(text):
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _real(text):
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text):
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def non_negative_int(text):
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def positive_float(text):
    value = _real(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def non_negative_float(text):
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def finite_float(text):
    return _real(text)


def fraction(text):
    """A share in (0, 1]."""
    value = _real(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in (0, 1]")
    return value


def probability(text):
    """A dropout rate: 0 <= p < 1."""
    value = _real(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in [0, 1)")
    return value


def boolean(text):
    """true/false (also yes/no, 1/0), as HfArgumentParser reads `--flag false`."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} must be true or false")


def layer_list(text):
    """Comma-separated block indices, e.g. '0,3,5': integers >= 0, increasing."""
    try:
        values = [int(item) for item in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < 0 or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r} must list distinct layer indices >= 0 in increasing order")
    return values


def shrinking_schedule(text):
    """Block counts after each pruning step, e.g. '14,7,4': integers >= 1, strictly decreasing."""
    try:
        values = [int(item) for item in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < 1 or any(later >= earlier for earlier, later in itertools.pairwise(values)):
        raise argparse.ArgumentTypeError(f"{text!r} must be block counts >= 1 that strictly decrease, e.g. 14,7,4")
    return values


# ---------------------------------------------------------------------------- flags
def add_common_training_args(parser):
    """The Hub's flag names for the parts of a training run every phase has."""
    group = parser.add_argument_group("Optimisation")
    group.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    group.add_argument("--learning_rate", type=positive_float, default=5e-5)
    group.add_argument("--weight_decay", type=non_negative_float, default=0.01)
    group.add_argument("--num_train_epochs", type=positive_float, default=1.0)
    group.add_argument("--max_train_steps", type=positive_int, default=None, help="Overrides --num_train_epochs.")
    group.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup"])
    group.add_argument(
        "--num_warmup_steps", type=non_negative_int, default=None, help="Default: 5%% of the optimiser steps."
    )
    group.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group = parser.add_argument_group("Runtime")
    group.add_argument("--seed", type=non_negative_int, default=42)
    group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: what `accelerate config` says (bf16 in the shipped GPU configs). Weights stay fp32.",
    )
    group.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    add_model_safety_args(group)
    group = parser.add_argument_group("Checkpointing")
    group.add_argument(
        "--checkpointing_steps", type=positive_int, default=None, help="Save the training state every N steps."
    )
    group.add_argument("--checkpoints_total_limit", type=positive_int, default=2, help="Keep the last N checkpoints.")
    group.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    group = parser.add_argument_group("Logging and Hub")
    group.add_argument("--report_to", default="none", help="tensorboard, wandb, all or none.")
    group.add_argument("--logging_steps", type=positive_int, default=10)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--hub_token", default=None, help="Default: the HF_TOKEN environment or the cached login.")
    group.add_argument("--hub_private_repo", action="store_true")


def add_model_safety_args(group):
    """The two opt-ins every script that loads a model shares; both are off by default."""
    group.add_argument("--trust_remote_code", action="store_true", help="Run model code from the Hub (off: unsafe).")
    group.add_argument("--allow_pickle_weights", action="store_true", help="Load .bin weights (off: unsafe).")


def add_context_args(group, where="the query file"):
    """Teacher-only context: a column of offline text per query that only the teacher reads."""
    from common.data import DEFAULT_CONTEXT_TEMPLATE, check_context_template

    group.add_argument(
        "--query_context_column",
        default=None,
        help=f"Column of {where} holding offline-only text per query (an expansion, a category path, the landing "
        "page) that the teacher reads with the query; the student only ever reads the query. Empty: the query alone.",
    )
    group.add_argument(
        "--context_template",
        type=_checked(check_context_template),
        default=DEFAULT_CONTEXT_TEMPLATE,
        help="How the teacher reads a query with its context (default: the query, a newline, the context).",
    )


def add_graph_args(group, nodes):
    """The graph regulariser's flags (one set for phases 1 and 3); `nodes` says which ids the graph names."""
    group.add_argument(
        "--ad_graph_file",
        default=None,
        help=f"Graph metadata over ads (node id, neighbour id, optional weight; ids are {nodes}): each query's "
        "clicked ad's neighbours become extra targets of the query, weighted (the graph regulariser, after "
        "RAMEN). Training only: the saved model is an ordinary encoder.",
    )
    group.add_argument(
        "--query_graph_file",
        default=None,
        help="Graph metadata over queries (node id, neighbour id, optional weight; ids are --query_id_column's, of "
        "the training queries): queries of one session, queries that click the same ads. The ads a query's "
        "neighbours clicked in the training data become its extra targets, weighted (the same term as "
        "--ad_graph_file; the two may be combined).",
    )
    group.add_argument(
        "--query_id_column",
        default="query_id",
        help="Query id column of --train_file; read only with --query_graph_file.",
    )
    group.add_argument("--graph_node_column", default="node_id")
    group.add_argument("--graph_neighbor_column", default="neighbor_id")
    group.add_argument("--graph_weight_column", default="weight", help="Optional column; absent: every edge weighs 1.")
    group.add_argument(
        "--graph_neighbours",
        type=positive_int,
        default=4,
        help="Neighbours drawn per query at each step (from each graph given).",
    )
    group.add_argument(
        "--graph_weight",
        type=non_negative_float,
        default=0.1,
        help="Weight of the graph term in the loss; 0 keeps only its mask (a drawn neighbour is never a negative).",
    )
    group.add_argument(
        "--graph_sampling",
        choices=["weighted", "uniform"],
        default="weighted",
        help="Draw neighbours in proportion to the edge weights, or uniformly (without replacement either way).",
    )


def add_stream_filter_args(group):
    """Filters applied on the fly to a streamed query file (--streaming), by encode.py and distill_student.py
    alike: a chunked store records them, and phase 2 refuses a store built with others."""
    group.add_argument("--min_query_chars", type=positive_int, default=1, help="Streaming: drop shorter texts.")
    group.add_argument("--max_query_chars", type=positive_int, default=None, help="Streaming: drop longer texts.")
    group.add_argument(
        "--dedupe_capacity",
        type=non_negative_int,
        default=0,
        help="Streaming: drop exact duplicates with a Bloom filter sized for this many distinct texts (about 2.4 "
        "bytes each, fixed; 1e-4 of unique texts dropped by mistake); 0: keep duplicates.",
    )
    group.add_argument(
        "--chunk_rows",
        type=positive_int,
        default=None,
        help="Rows per chunk of a teacher store built here (the unit a killed build resumes at, and what one process "
        "holds while encoding); default: about 256 MB of float32 vectors (16,384 rows at 4096-d).",
    )


def check_stream_filters_need_streaming(args):
    """The stream filters act on streams only; given without --streaming they would be silently ignored. The
    Bloom filter of --dedupe_capacity must fit in memory."""
    if not args.streaming and (args.min_query_chars != 1 or args.max_query_chars or args.dedupe_capacity):
        raise UserError("--min_query_chars, --max_query_chars and --dedupe_capacity filter a stream; add --streaming.")
    if args.dedupe_capacity:
        from common.streaming import BloomFilter

        check_fits_in_memory(
            BloomFilter.bytes_for(args.dedupe_capacity),
            f"The Bloom filter of --dedupe_capacity {args.dedupe_capacity}",
            "lower --dedupe_capacity (about 2.4 bytes per distinct text)",
        )


def _checked(check):
    """An argparse type from a check that raises UserError: the message becomes argparse's error line."""

    def convert(text):
        try:
            return check(text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def parse_with_config(parser, argv=None):
    """Parse argv; `--config file.yaml` supplies values that flags on the command line override.

    YAML values go through the same argparse conversion and checks as typed flags (they become command-line
    tokens placed before argv): `max_train_steps: 2.5` is refused like `--max_train_steps 2.5`, and an
    on/off flag takes only true or false, never the string "false".
    """
    parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags win.")
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    if not os.path.isfile(known.config):
        raise UserError(f"Config file {known.config} does not exist or is not a file; check the path.")
    try:
        with open(known.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{known.config} is not valid YAML ({type(error).__name__}); fix the file.") from None
    if not isinstance(values, dict):
        raise UserError(f"{known.config} must be a YAML mapping of flag names to values.")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    unknown = sorted(str(key) for key in values if key not in actions or key == "config")
    if unknown:
        raise UserError(f"{known.config} sets unknown flags {', '.join(unknown)}; remove or rename them.")
    tokens = []
    for key, value in values.items():
        action, flag = actions[key], actions[key].option_strings[0]
        if action.nargs == 0:  # on/off flags (store_true)
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
                raise UserError(
                    f"{known.config}: {key} is the text {value!r} (in quotes); write {value.strip().lower()} without "
                    "quotes, as YAML's true or false."
                )
            if not isinstance(value, bool):
                raise UserError(f"{known.config}: {key} is an on/off flag; set it to true or false, not {value!r}.")
            tokens += [flag] if value else []
            continue
        if value is None:
            continue  # the flag's default
        items = value if isinstance(value, list) and action.nargs in ("*", "+") else [value]
        nested = any(isinstance(item, (list, dict)) for item in items)
        if nested or (isinstance(value, (list, dict)) and items is not value):
            raise UserError(f"{known.config}: {key} must be a single value, got {value!r}.")
        texts = [("true" if item else "false") if isinstance(item, bool) else str(item) for item in items]
        for text in texts:
            if action.type is not None:
                try:
                    action.type(text)
                except (argparse.ArgumentTypeError, ValueError) as error:
                    raise UserError(f"{known.config}: {key}: {error}.") from None
            if action.choices is not None and action.type is None and text not in action.choices:
                raise UserError(f"{known.config}: {key} must be one of {', '.join(map(str, action.choices))}.")
        tokens += [flag, *texts]
    return parser.parse_args(tokens + argv)


def check_run_args(args, script, inputs=()):
    """Checks that must fail before any work: the output folder (see `check_output_dir`), the values that only
    make sense together, Hub push settings, DeepSpeed."""
    check_output_dir(args, script, inputs)
    steps, warmup = getattr(args, "max_train_steps", None), getattr(args, "num_warmup_steps", None)
    if steps is not None and warmup is not None and warmup > steps:
        raise UserError(
            f"--num_warmup_steps {warmup} is more than --max_train_steps {steps}: the learning rate would never "
            "reach its peak; lower the warm-up."
        )
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id (e.g. your-name/harness-student).")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(
                "The accelerate config asks for DeepSpeed but it is not installed; `pip install deepspeed` or "
                "launch with accelerate_configs/multi_gpu.yaml."
            ) from None
        check_deepspeed_config_file(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    lock_folder(args.output_dir, "the output folder")  # last: a refused run leaves nothing behind


def check_deepspeed_config_file(path):
    """The DeepSpeed config an accelerate config names (deepspeed_config_file) must be a readable JSON object;
    accelerate would otherwise fail inside the Accelerator with its own traceback."""
    if not path or path == "none":
        return
    if not os.path.isfile(path):
        raise UserError(
            f"The accelerate config's deepspeed_config_file {path} does not exist; fix the path in the accelerate "
            "config (relative paths are read from the folder the launch starts in)."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(
            f"The DeepSpeed config {path} is not valid JSON ({type(error).__name__}); fix the file, e.g. start "
            "from accelerate_configs/ds_zero3.json."
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"The DeepSpeed config {path} must be a JSON object of DeepSpeed settings; fix the file.")


def check_has_negatives(args, random_negatives=0):
    """A contrastive run whose queries would see no negative has a loss of 0 at every step: refuse it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.per_device_train_batch_size * world == 1 and args.num_hard_negatives == 0 and random_negatives == 0:
        raise UserError(
            "With one query per step and no hard or random negatives the contrastive loss is 0 and nothing is "
            "learned; raise --per_device_train_batch_size or add negatives."
        )
