"""ONNX export of a query encoder for serving, int8 dynamic quantisation, and an ONNX Runtime encoder with
the Encoder's interface (tokenize, __call__, encode), so the same evaluation and timing code runs on both.

The graph takes the tokenizer's outputs (input_ids, attention_mask, and token_type_ids when the model has
them) and returns
- `last_hidden_state` first: sentence-transformers' ONNX backend (optimum's ORTModelForFeatureExtraction)
  reads it and applies the folder's own Pooling / Dense / Normalize modules;
- `sentence_embedding`: pooled, projected and normalised inside the graph, what a serving stack returns.
"""

import os
import warnings

import numpy as np
import torch

from common.errors import UserError

ONNX_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"


class _ServingGraph(torch.nn.Module):
    """The encoder with pooling, head and normalisation, as one function of the token tensors."""

    def __init__(self, encoder, input_names):
        super().__init__()
        self.encoder, self.input_names = encoder, input_names

    def forward(self, *tensors):
        inputs = dict(zip(self.input_names, tensors))
        embeddings, hidden = self.encoder(**inputs, return_token_states=True)
        return hidden, embeddings


def model_input_names(encoder):
    """The tokenizer outputs the backbone takes (token_type_ids only for models that have them)."""
    sample = encoder.tokenize(["a"], "query")
    return [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]


def export_onnx(encoder, path, opset=17):
    """Write the fp32 serving graph to `path` with dynamic batch and sequence axes."""
    encoder = encoder.float().eval()
    names = model_input_names(encoder)
    sample = encoder.tokenize(["an example query", "a second, longer example query for the trace"], "query")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    axes["sentence_embedding"] = {0: "batch"}
    # The tracer warns that shape checks in transformers' masking code become constants; they hold for every
    # shape (the mask always matches the sequence), and tests/test_export.py checks other batch sizes and
    # lengths than the trace against the torch model, for BERT and Qwen3 conventions.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            # eval(): the exporter puts the module back in its own mode afterwards, and a new module is in
            # training mode: without it the encoder would come back with dropout on.
            _ServingGraph(encoder, names).eval(),
            tuple(sample[name] for name in names),
            path,
            input_names=names,
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: dynamic axes for BERT- and Qwen-style models
        )


INT8_SCHEMES = ("dynamic", "blockwise")


def quantize_int8(source, target, scheme="dynamic"):
    """int8 weights for every MatMul/Gemm with constant weights (embeddings, norms and softmax stay fp32).

    dynamic: onnxruntime's dynamic quantisation, int8 weights per output channel, activations quantised per
    tensor on the fly (QLinear integer kernels): the fastest, the furthest from fp32.
    blockwise: MatMulNBits with 8 bits, weights in blocks of 32 inputs, int8 compute on activations quantised
    per block of 32 (accuracy level 4): an outlier only coarsens its block, so the vectors stay closer to fp32.
    """
    import onnx

    # The projection head stays fp32: it is tiny, and sentence-transformers' ONNX backend runs the folder's
    # 2_Dense module in fp32 on the graph's token states, so both paths give the same vectors.
    head = [node.name for node in onnx.load(source).graph.node if node.name.startswith("/encoder/projection/")]
    head += [f"{name}_MatMul" for name in head]  # the quantiser rewrites a Gemm as <name>_MatMul + <name>_Add
    if scheme == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=head)
    elif scheme == "blockwise":
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(
            onnx.load(source), bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=head
        )
        quantizer.process()
        quantizer.model.save_model_to_file(target, False)
    else:
        raise UserError(f"Unknown int8 scheme '{scheme}'; use one of {', '.join(INT8_SCHEMES)}.")


class OnnxEncoder:
    """An exported graph run by ONNX Runtime behind the Encoder's interface (tokenisation and prompts are the
    source Encoder's, so the inputs are exactly those the torch model sees)."""

    def __init__(self, encoder, path, threads=None, providers=None):
        import onnxruntime as ort

        if not os.path.exists(path):
            raise UserError(f"{path} does not exist; export the model first (python export.py).")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.source, self.path = encoder, path
        self.config, self.embedding_dim = encoder.config, encoder.embedding_dim

    def tokenize(self, texts, kind):
        return self.source.tokenize(texts, kind)

    def __call__(self, **batch):
        feed = {name: batch[name].cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(["sentence_embedding"], feed)[0])

    def encode(self, texts, kind, batch_size=64, device=None, progress=False):
        """float32 vectors, batches length-sorted as Encoder.encode sorts them."""
        order = np.argsort([-len(text) for text in texts], kind="stable")
        output = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            output[index] = self(**self.tokenize([texts[i] for i in index], kind)).numpy()
        return output
