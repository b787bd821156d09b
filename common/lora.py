"""LoRA adapters for the teacher (peft), and their merge into the Hub-format save.

The adapters are injected in place into the encoder's backbone (peft's `inject_adapter_in_model`), so the
script's model stays an Encoder and accelerate, DeepSpeed and the checkpoints see one module as without LoRA;
only the adapters (and a projection head, if any) are trained. The final save merges them into the weights
from the full state dict (`accelerator.get_state_dict`, which also gathers ZeRO-3 shards): the folder is a
plain model that loads with `from_pretrained` and in sentence-transformers, with no peft needed.
"""

from torch import nn

from common.errors import UserError

ADAPTER = "default"


def add_lora(encoder, r, alpha, dropout, target_modules=None):
    """Injects LoRA (rank r, scaling alpha / r) into the backbone's linear layers (all but BERT's unused
    pooler; or those whose names end with one of `target_modules`) and freezes everything else in the
    backbone. Returns the number of trainable parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as error:
        raise UserError("--lora_r needs peft; install it with: pip install peft") from error
    linear = [
        name
        for name, module in encoder.backbone.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith("pooler.")
    ]
    if target_modules:
        unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
        if unknown:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise UserError(
                f"--lora_target_modules {' '.join(unknown)} names no linear layer of the model; its linear layers "
                f"end with: {', '.join(suffixes)}."
            )
        linear = [n for n in linear if any(n == t or n.endswith("." + t) for t in target_modules)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=linear, bias="none")
    inject_adapter_in_model(config, encoder.backbone, adapter_name=ADAPTER)
    adapted = [module for module in encoder.backbone.modules() if isinstance(module, LoraLinear)]
    if len(adapted) != len(linear):
        raise UserError(f"LoRA adapted {len(adapted)} of the {len(linear)} linear layers asked for.")
    for name, parameter in encoder.backbone.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def merge_lora(state_dict, alpha, r):
    """The state dict of the merged model: W + (alpha / r) B A for every adapted layer, under the layer's own
    names (`...query.weight`, not `...query.base_layer.weight`), the adapters dropped. Works on the full state
    dict of any process layout; merges in float32 and stores in the weight's dtype."""
    scaling = alpha / r
    merged = {}
    for key, tensor in state_dict.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = tensor
            continue
        prefix, leaf = key.split(".base_layer.")
        if leaf == "weight":
            down = state_dict[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            up = state_dict[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            tensor = (tensor.float() + scaling * (up @ down)).to(tensor.dtype)
        merged[f"{prefix}.{leaf}"] = tensor
    return merged
