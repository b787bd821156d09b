"""The encoder: any HF AutoModel + pooling + prompts + optional projection head + L2 normalisation.

A model directory written by `Encoder.save_pretrained` is a complete encoder:
- the backbone and tokenizer as `save_pretrained` writes them (safetensors only),
- `harness_encoder.json`: pooling, normalisation, query/ad prompts, max length, padding side, head,
- the sentence-transformers files (`modules.json`, `1_Pooling/`, `2_Dense/` for the head,
  `3_Normalize/`, prompts in `config_sentence_transformers.json`), so that
  `SentenceTransformer(path).encode(q, prompt_name="query")` gives the same vectors as our loader.

Directories without `harness_encoder.json` (hub models such as Qwen3-Embedding or all-MiniLM-L6-v2)
are read through their sentence-transformers files, then through the model type.
"""

import copy
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from common.errors import UserError
from common.model_files import ENCODER_CONFIG_NAME, check_model_folder, model_fingerprint, read_json, resolve_model_dir
from common.surgery import keep_layers_of, load_layers

POOLINGS = ("mean", "cls", "last")
# Decoder LLM embedders (Qwen3-Embedding, gte-Qwen, e5-mistral, ...) pool the last (EOS) token.
DECODER_MODEL_TYPES = {"qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}


@dataclass
class EncoderConfig:
    pooling: str = "mean"
    normalize: bool = True
    query_prompt: str = ""
    ad_prompt: str = ""
    max_length: int = 128
    padding_side: str = "right"
    projection_in: int | None = None
    projection_out: int | None = None
    base_model: str = ""
    extra: dict = field(default_factory=dict)

    def validate(self):
        if self.pooling not in POOLINGS:
            raise UserError(f"Unknown pooling '{self.pooling}'; use one of {', '.join(POOLINGS)}.")
        if self.padding_side not in ("left", "right"):
            raise UserError(f"Unknown padding side '{self.padding_side}'; use 'left' or 'right'.")


def pool(hidden_states, attention_mask, pooling):
    """Pool token states into one vector per row; correct under left and right padding alike."""
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    if pooling == "cls":
        # First non-pad token: position 0 under right padding, after the pads under left padding.
        index = (attention_mask * (attention_mask.size(1) - positions)).argmax(1)
    elif pooling == "last":
        index = (attention_mask * positions).argmax(1)
    else:
        raise UserError(f"Unknown pooling '{pooling}'; use one of {', '.join(POOLINGS)}.")
    return hidden_states[torch.arange(hidden_states.size(0), device=hidden_states.device), index]


def append_end_of_text(tokenizer):
    """Make the tokenizer append the end-of-text token to every text, if it does not already.

    Last-token pooling reads the state of that token (the Qwen3-Embedding convention: `<|endoftext|>`, or
    the EOS token of vocabularies without it). Qwen3-Embedding's tokenizer appends it; Qwen3-0.6B's and
    most decoder LLMs' do not, and pooling would then read the last word. The token is added by the
    tokenizer's own post-processor, so truncation keeps it, and the saved tokenizer.json (hence
    sentence-transformers and any serving stack) appends it too. Returns True when it was added here.
    """
    vocabulary = tokenizer.get_vocab()
    token = "<|endoftext|>" if "<|endoftext|>" in vocabulary else tokenizer.eos_token
    if token is None or token not in vocabulary:
        raise UserError("Last-token pooling needs an end-of-text token but the tokenizer has none; use --pooling mean.")
    token_id = vocabulary[token]
    if tokenizer("a")["input_ids"][-1:] == [token_id]:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            "Last-token pooling needs a tokenizer that appends the end-of-text token, and this slow tokenizer "
            "does not; save the model with a fast tokenizer (tokenizer.json) or use --pooling mean."
        )
    from tokenizers import processors

    append = processors.TemplateProcessing(
        single=f"$A {token}", pair=f"$A {token} $B:1 {token}:1", special_tokens=[(token, token_id)]
    )
    existing = backend.post_processor
    backend.post_processor = append if existing is None else processors.Sequence([existing, append])
    return True


def _config_from_sentence_transformers(folder):
    """Read pooling, prompts, max length and a Dense head from a sentence-transformers folder."""
    modules = read_json(folder, "modules.json")
    if not modules:
        return None
    config, dense_path = EncoderConfig(normalize=False), None
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling_config = read_json(folder, module["path"], "config.json") or {}
            mode = pooling_config.get("pooling_mode")
            if mode is None:
                flags = {
                    "pooling_mode_cls_token": "cls",
                    "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_lasttoken": "last",
                }
                mode = next((name for key, name in flags.items() if pooling_config.get(key)), "mean")
            config.pooling = {"lasttoken": "last", "cls": "cls", "mean": "mean"}.get(mode, mode)
            if config.pooling not in POOLINGS:
                raise UserError(f"Pooling mode '{mode}' in {folder} is not supported; use mean, cls or lasttoken.")
        elif kind == "Dense":
            dense_path = module["path"]
        elif kind == "Normalize":
            config.normalize = True
    st_config = read_json(folder, "config_sentence_transformers.json") or {}
    prompts = st_config.get("prompts") or {}
    config.query_prompt = prompts.get("query", "")
    config.ad_prompt = prompts.get("document", prompts.get("passage", ""))
    bert_config = read_json(folder, "sentence_bert_config.json") or {}
    config.max_length = int(bert_config.get("max_seq_length") or config.max_length)
    if dense_path:
        dense = read_json(folder, dense_path, "config.json")
        activation = dense.get("activation_function", "")
        if not activation.endswith("Identity"):
            raise UserError(f"Dense head in {folder} uses activation {activation}; only a linear head is supported.")
        config.projection_in, config.projection_out = dense["in_features"], dense["out_features"]
        config.extra["dense_path"] = dense_path
    return config


_DTYPES = {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EncoderSpec:
    """An encoder as its folder declares it, read without its weights: pooling, prompts, normalisation, width,
    depth and the content fingerprint. This is all a store check needs, so no process loads a billion-parameter
    teacher to learn whether its stores are current; `load()` reads the weights when something must be encoded.
    """

    name_or_path: str
    folder: str
    config: EncoderConfig
    model_config: object  # the backbone's transformers config
    trust_remote_code: bool = False
    allow_pickle: bool = False
    _fingerprint: str | None = None
    _loaded: object = None

    @classmethod
    def read(
        cls,
        name_or_path,
        *,
        pooling=None,
        query_prompt=None,
        ad_prompt=None,
        max_length=None,
        padding_side=None,
        normalize=None,
        trust_remote_code=False,
        revision=None,
        token=None,
        allow_pickle=False,
    ):
        name_or_path = str(name_or_path)
        folder = resolve_model_dir(name_or_path, revision=revision, token=token)
        check_model_folder(folder)
        saved = read_json(folder, ENCODER_CONFIG_NAME)
        try:
            model_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise UserError(f"{folder} holds no loadable model config ({error}); pass a Hugging Face model.") from None
        if saved is not None:
            try:
                config = EncoderConfig(**saved)
            except TypeError as error:
                raise UserError(f"{folder}/{ENCODER_CONFIG_NAME} is not an encoder config ({error}).") from None
        else:
            config = _config_from_sentence_transformers(folder) or EncoderConfig()
            if model_config.model_type in DECODER_MODEL_TYPES:
                if read_json(folder, "modules.json") is None:
                    config.pooling = "last"
                config.padding_side = "left"
            config.base_model = name_or_path
        overrides = {
            "pooling": pooling,
            "query_prompt": query_prompt,
            "ad_prompt": ad_prompt,
            "max_length": max_length,
            "padding_side": padding_side,
            "normalize": normalize,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        if config.pooling == "last" and config.padding_side == "right" and padding_side is None:
            config.padding_side = "left"
        config.validate()
        if config.pooling == "cls" and model_config.model_type in DECODER_MODEL_TYPES:
            raise UserError(
                f"cls pooling on the causal decoder {name_or_path} pools a token that sees only itself; "
                "use --pooling last (or mean)."
            )
        has_safetensors = any(name.endswith(".safetensors") for name in os.listdir(folder))
        if not has_safetensors and not allow_pickle:
            raise UserError(
                f"{folder} has no .safetensors weights; convert the checkpoint to safetensors or pass "
                "--allow_pickle_weights if you trust it (loading pickle weights can run arbitrary code)."
            )
        return cls(name_or_path, folder, config, model_config, trust_remote_code, allow_pickle)

    @property
    def hidden_size(self):
        return self.model_config.hidden_size

    @property
    def embedding_dim(self):
        return self.config.projection_out or self.hidden_size

    @property
    def depth(self):
        return self.model_config.num_hidden_layers

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.folder)
        return self._fingerprint

    def prompt_for(self, kind):
        if kind not in ("query", "ad"):
            raise ValueError(f"kind must be 'query' or 'ad', got {kind!r}")
        return self.config.query_prompt if kind == "query" else self.config.ad_prompt

    def load(self, dtype=None, layers=None):
        """The Encoder (a fresh one at each call): weights in `dtype` (None: the checkpoint's own), all blocks or
        only `layers` (then only those blocks' tensors are read from the weight files)."""
        folder, config = self.folder, copy.deepcopy(self.config)
        has_safetensors = any(name.endswith(".safetensors") for name in os.listdir(folder))
        backbone = None
        if layers is not None:
            backbone = load_layers(folder, self.model_config, layers, _DTYPES[dtype], self.trust_remote_code)
        if backbone is None:
            backbone = AutoModel.from_pretrained(
                folder, dtype=_DTYPES[dtype], trust_remote_code=self.trust_remote_code, use_safetensors=has_safetensors
            )
            if layers is not None:
                keep_layers_of(backbone, layers)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        projection = None
        if config.projection_out:
            projection = nn.Linear(config.projection_in, config.projection_out)
            dense_path = config.extra.get("dense_path", "2_Dense")
            weights = load_file(os.path.join(folder, dense_path, "model.safetensors"))
            projection.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
            projection.to(backbone.dtype)
        encoder = Encoder(backbone, tokenizer, config, projection)
        encoder.fingerprint = self.fingerprint
        return encoder

    def load_once(self):
        """The Encoder in the checkpoint's own dtype, loaded at the first call and the same object after (a
        teacher that builds several stores is read once); `release()` lets it go."""
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def release(self):
        self._loaded = None


def check_student_of(student, teacher, student_name):
    """A student records the fingerprint of the teacher it was aligned to (or refined against): its vectors live
    in that teacher's space, so it is refused beside another teacher. `student` and `teacher` are Encoders or
    EncoderSpecs; a student with no record (a hub model, an unaligned cut) is not checked."""
    recorded = student.config.extra.get("teacher_fingerprint")
    if recorded and recorded != teacher.fingerprint:
        raise UserError(
            f"{student_name} was aligned to another teacher ({student.config.extra.get('teacher', 'not named')}), "
            f"not to {teacher.name_or_path if hasattr(teacher, 'name_or_path') else 'this teacher'}: its vectors live "
            "in that teacher's space; pass the teacher it was aligned to."
        )


class Encoder(nn.Module):
    """Backbone + pooling + optional linear head + optional L2 normalisation."""

    def __init__(self, backbone, tokenizer, config, projection=None):
        super().__init__()
        config.validate()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.projection = projection
        self.tokenizer.padding_side = config.padding_side
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler.requires_grad_(False)  # BERT's pooler is never used; DDP would flag it as unused
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if config.pooling == "last":
            append_end_of_text(self.tokenizer)
        self.fingerprint = None  # set by from_pretrained; stores record it

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=None, layers=None, **options):
        """Load a model folder or hub id; explicit arguments override what the folder says (see EncoderSpec.read).
        `layers`: keep only these transformer blocks, read from the weight files by name (the others never load)."""
        return EncoderSpec.read(name_or_path, **options).load(dtype=dtype, layers=layers)

    # ---------------------------------------------------------------- shape
    @property
    def hidden_size(self):
        return self.backbone.config.hidden_size

    @property
    def embedding_dim(self):
        return self.config.projection_out or self.hidden_size

    def add_projection(self, out_features):
        """Add a linear head hidden_size -> out_features (used when a student must match a teacher's width)."""
        self.projection = nn.Linear(self.hidden_size, out_features).to(self.backbone.dtype)
        self.config.projection_in, self.config.projection_out = self.hidden_size, out_features
        self.config.extra.pop("dense_path", None)

    # ---------------------------------------------------------------- encoding
    def prompt_for(self, kind):
        if kind not in ("query", "ad"):
            raise ValueError(f"kind must be 'query' or 'ad', got {kind!r}")
        return self.config.query_prompt if kind == "query" else self.config.ad_prompt

    def tokenize(self, texts, kind):
        prompt = self.prompt_for(kind)
        return self.tokenizer(
            [prompt + text for text in texts],
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )

    def count_truncated(self, texts, kind, limit=100_000):
        """How many of (the first `limit` of) texts exceed max_length tokens once prompted."""
        prompt, sample, count = self.prompt_for(kind), texts[:limit], 0
        for start in range(0, len(sample), 10_000):
            encoded = self.tokenizer([prompt + text for text in sample[start : start + 10_000]], truncation=False)
            count += sum(len(ids) > self.config.max_length for ids in encoded["input_ids"])
        return count, len(sample)

    def tokenize_mixed(self, queries, ads):
        """Queries (with the query prompt) then ads (with the ad prompt) in one padded batch."""
        texts = [self.config.query_prompt + text for text in queries] + [self.config.ad_prompt + text for text in ads]
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )

    def forward(self, input_ids, attention_mask, return_token_states=False, **model_inputs):
        """Pooled (projected, normalised) vectors; with return_token_states, also the last hidden states."""
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)
        embeddings = pool(outputs.last_hidden_state, attention_mask, self.config.pooling)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        if self.config.normalize:
            embeddings = F.normalize(embeddings.float(), dim=-1)
        return (embeddings, outputs.last_hidden_state) if return_token_states else embeddings

    def encode(self, texts, kind, batch_size=64, device=None, progress=False):
        """Encode texts to a float32 numpy array; batches are length-sorted so padding stays small. With `device`,
        the model runs there (moved for the call and back), and so do its inputs: they never meet on two devices."""
        home = next(self.parameters()).device
        device = torch.device(device) if device is not None else home
        if device != home:
            self.to(device)
        try:
            return self._encode(texts, kind, batch_size, device, progress)
        finally:
            if device != home:
                self.to(home)

    @torch.inference_mode()  # only here: parameters moved under inference mode could no longer train
    def _encode(self, texts, kind, batch_size, device, progress):
        order = np.argsort([-len(text) for text in texts], kind="stable")
        output = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode {'queries' if kind == 'query' else 'ads'}", unit="batch")
        was_training = self.training
        self.eval()
        for start in starts:
            index = order[start : start + batch_size]
            batch = self.tokenize([texts[i] for i in index], kind).to(device)
            output[index] = self(**batch).float().cpu().numpy()
        self.train(was_training)
        return output

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, folder, state_dict=None):
        """Write a complete encoder folder (safetensors only). `state_dict` is the full encoder's
        (e.g. from `accelerator.get_state_dict` under ZeRO-3); by default this module's own."""
        os.makedirs(folder, exist_ok=True)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(folder, state_dict=backbone_state, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        config = asdict(self.config)
        config["extra"] = {k: v for k, v in config["extra"].items() if k != "dense_path"}
        with open(os.path.join(folder, ENCODER_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        self._save_sentence_transformers_files(folder, state_dict)

    def _save_sentence_transformers_files(self, folder, state_dict):
        pooling_flags = {
            "pooling_mode_cls_token": self.config.pooling == "cls",
            "pooling_mode_mean_tokens": self.config.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.config.pooling == "last",
            "include_prompt": True,
        }
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        _write_json(
            os.path.join(folder, "1_Pooling", "config.json"),
            {"word_embedding_dimension": self.hidden_size, **pooling_flags},
        )
        if self.projection is not None:
            dense = os.path.join(folder, "2_Dense")
            os.makedirs(dense, exist_ok=True)
            _write_json(
                os.path.join(dense, "config.json"),
                {
                    "in_features": self.config.projection_in,
                    "out_features": self.config.projection_out,
                    "bias": True,
                    "activation_function": "torch.nn.modules.linear.Identity",
                },
            )
            head = {
                k.replace("projection.", "linear.", 1): v.detach().contiguous().cpu()
                for k, v in state_dict.items()
                if k.startswith("projection.")
            }
            save_file(head, os.path.join(dense, "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.config.normalize:
            os.makedirs(os.path.join(folder, "3_Normalize"), exist_ok=True)
            modules.append(
                {
                    "idx": len(modules),
                    "name": str(len(modules)),
                    "path": "3_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
        _write_json(os.path.join(folder, "modules.json"), modules)
        _write_json(
            os.path.join(folder, "sentence_bert_config.json"),
            {"max_seq_length": self.config.max_length, "do_lower_case": False},
        )
        _write_json(
            os.path.join(folder, "config_sentence_transformers.json"),
            {
                "prompts": {"query": self.config.query_prompt, "document": self.config.ad_prompt},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )


def _write_json(path, payload):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
