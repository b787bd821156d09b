"""ONNX export of a query encoder for serving, int8 quantisation (per-token W8A8, blockwise, dynamic), and an
ONNX Runtime encoder with the Encoder's interface (tokenize, __call__, encode), so the same evaluation and
timing code runs on both.

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


INT8_SCHEMES = ("per_token", "blockwise", "dynamic")  # --int8_scheme auto: the first that passes the gate


def quantize_int8(source, target, scheme="per_token", calibration=None):
    """int8 weights for every MatMul/Gemm with constant weights (embeddings, norms and softmax stay fp32).

    per_token: W8A8 with int8 weights per output channel and activations quantised per token (one scale per
    row of the MatMul's input, its largest magnitude / 127) by QuantizeLinear, then integer GEMM
    (MatMulIntegerToFloat, uint8 x int8): a query's vector never depends on the other rows of its batch. With
    `calibration` (token batches, as the tokenizer gives them), the activations are first smoothed as
    SmoothQuant does: each input channel divided by sqrt(its largest |x| over the calibration / its weights'
    largest |w|), the weights' rows multiplied by it (the product is unchanged in exact arithmetic), so that a
    few large channels no longer set every token's scale.
    blockwise: MatMulNBits with 8 bits, weights in blocks of 32 inputs, int8 compute on activations quantised
    per block of 32 (accuracy level 4): an outlier only coarsens its block.
    dynamic: onnxruntime's dynamic quantisation, int8 weights per output channel, activations quantised per
    tensor on the fly: one scale for the whole batch, so a query's vector depends on its neighbours (the gate's
    batch-dependence check refuses it by default).
    """
    import onnx

    # The projection head stays fp32: it is tiny, and sentence-transformers' ONNX backend runs the folder's
    # 2_Dense module in fp32 on the graph's token states, so both paths give the same vectors.
    head = [node.name for node in onnx.load(source).graph.node if node.name.startswith("/encoder/projection/")]
    head += [f"{name}_MatMul" for name in head]  # the quantiser rewrites a Gemm as <name>_MatMul + <name>_Add
    if scheme == "per_token":
        ranges = input_channel_ranges(source, calibration) if calibration else None
        model = onnx.load(source)
        quantize_per_token(model, exclude=set(head), input_ranges=ranges)
        onnx.save(model, target)
    elif scheme == "dynamic":
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


def constant_weight_matmuls(model):
    """The MatMul nodes of `model` whose second input is a constant 2-D weight, with that weight."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    found = [(node, weights.get(node.input[1])) for node in model.graph.node if node.op_type == "MatMul"]
    return [(node, weight) for node, weight in found if weight is not None and len(weight.dims) == 2]


def input_channel_ranges(source, batches):
    """{tensor name: largest |x| per channel} of the input of every constant-weight MatMul of the graph at
    `source`, over the token positions (attention mask 1) of `batches` run through the fp32 graph."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(source)
    inputs = sorted({node.input[0] for node, _ in constant_weight_matmuls(model)})
    known = {output.name for output in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in inputs if name not in known)  # fmt: skip
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed_names = [node.name for node in session.get_inputs()]
    ranges = {}
    for batch in batches:
        outputs = session.run(inputs, {name: np.asarray(batch[name]) for name in feed_names})
        mask = np.asarray(batch["attention_mask"]).astype(bool) if "attention_mask" in batch else None
        for name, values in zip(inputs, outputs):
            token_rows = mask is not None and values.shape[:2] == mask.shape
            rows = values[mask] if token_rows else values.reshape(-1, values.shape[-1])
            ranges[name] = np.maximum(ranges.get(name, 0), np.abs(rows).max(0))
    return ranges


def quantize_weight_per_channel(weight):
    """Symmetric int8 per output channel of a [in, out] weight: (int8 weight, float32 scale per column)."""
    scale = np.maximum(np.abs(weight).max(0), 1e-12) / 127
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def quantize_per_token(model, exclude=(), input_ranges=None, smoothing=0.5):
    """Rewrite, in place, every MatMul of `model` whose second input is a constant 2-D weight [K, N] (and whose
    name is not in `exclude`) as W8A8 with per-token activation scales:
        x2 = Reshape(x, [-1, K]);  s = max(ReduceMax(|x2|, axis 1), eps) / 127        (one scale per row)
        q = QuantizeLinear(x2, s, 128, axis=0)                                         (uint8, zero point 128)
        y = Reshape(MatMulIntegerToFloat(q, Wq, 1, Ws, 128) * s[:, None], [..., N])
    Every row is quantised by its own scale, so a row's output is a function of that row alone. uint8
    activations with int8 weights are the integer GEMM x86 CPUs run fast (int8 x int8 is far slower in ONNX
    Runtime's CPU kernels). With `input_ranges` ({input name: largest |x| per channel}), the MatMuls that share
    an input are smoothed together first: x / t and t * W for t = range^a / (largest |w| of the row over the
    group's weights)^(1 - a), a = `smoothing` (one Mul per shared input, e.g. one for query, key and value)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}

    def constant(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    shared = {
        "eps": constant("per_token/eps", np.float32(127e-12)),
        "127": constant("per_token/127", np.float32(127.0)),
        "one": constant("per_token/one", np.float32(1.0)),
        "zero_point": constant("per_token/zero_point", np.uint8(128)),
        "last": constant("per_token/last_axis", np.array([-1], np.int64)),
        "begin": constant("per_token/begin", np.array([0], np.int64)),
    }
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 17)

    def reduce_max_rows(source, target):  # ReduceMax over axis 1: an attribute up to opset 17, an input from 18
        if opset >= 18:
            return helper.make_node("ReduceMax", [source, shared["axis_1"]], [target], keepdims=0)
        return helper.make_node("ReduceMax", [source], [target], axes=[1], keepdims=0)

    shared["axis_1"] = constant("per_token/axis_1", np.array([1], np.int64))
    chosen = [(node, weight) for node, weight in constant_weight_matmuls(model) if node.name not in exclude]
    # MatMuls are known by their output's name (node names may be empty)
    weight_values = {node.output[0]: numpy_helper.to_array(weight).astype(np.float32) for node, weight in chosen}
    smoothed_input = {}  # MatMul -> the smoothed input's name
    by_input = {}
    for node, _ in chosen:
        by_input.setdefault(node.input[0], []).append(node.output[0])
    smoothing_nodes = {}  # input name -> the Mul that smooths it, placed before the first MatMul that reads it
    for x, names in by_input.items() if input_ranges else ():
        weight_rows = np.max([np.abs(weight_values[name]).max(1) for name in names], axis=0)
        factor = np.maximum(input_ranges[x], 1e-5) ** smoothing / np.maximum(weight_rows, 1e-5) ** (1 - smoothing)
        factor = factor.astype(np.float32)
        for name in names:
            weight_values[name] = weight_values[name] * factor[:, None]
            smoothed_input[name] = f"{x}/smoothed"
        inverse = constant(f"{x}/smoothing_inverse", (1 / factor).astype(np.float32))
        smoothing_nodes[x] = helper.make_node("Mul", [x, inverse], [f"{x}/smoothed"], name=f"{x}/smoothing")
    nodes, replaced = [], set()
    for node in graph.node:
        if node.output[0] not in weight_values:
            nodes.append(node)
            continue
        weight = weights[node.input[1]]
        (k, n), (y,) = weight.dims, node.output
        prefix = f"{y}/per_token"
        if node.input[0] in smoothing_nodes:
            nodes.append(smoothing_nodes.pop(node.input[0]))
        x = smoothed_input.get(node.output[0], node.input[0])
        w_int8, w_scale = quantize_weight_per_channel(weight_values[node.output[0]])
        replaced.add(weight.name)

        def name(suffix, prefix=prefix):
            return f"{prefix}/{suffix}"

        wq, ws = constant(name("weight_int8"), w_int8), constant(name("weight_scale"), w_scale)
        rows_k, n_out = (
            constant(name("rows_by_k"), np.array([-1, k], np.int64)),
            constant(name("n"), np.array([n], np.int64)),
        )
        zero_point_row = numpy_helper.from_array(np.array([128], np.uint8))
        nodes += [
            helper.make_node("Shape", [x], [name("shape")]),
            helper.make_node("Reshape", [x, rows_k], [name("x2")]),
            helper.make_node("Abs", [name("x2")], [name("abs")]),
            reduce_max_rows(name("abs"), name("amax")),
            helper.make_node("Max", [name("amax"), shared["eps"]], [name("amax_safe")]),
            helper.make_node("Div", [name("amax_safe"), shared["127"]], [name("scale")]),
            helper.make_node("Shape", [name("scale")], [name("rows")]),
            helper.make_node("ConstantOfShape", [name("rows")], [name("zero_points")], value=zero_point_row),
            helper.make_node("QuantizeLinear", [name("x2"), name("scale"), name("zero_points")], [name("q")], axis=0),
            helper.make_node(
                "MatMulIntegerToFloat",
                [name("q"), wq, shared["one"], ws, shared["zero_point"]],
                [name("y_unscaled")],
                domain="com.microsoft",
            ),
            helper.make_node("Unsqueeze", [name("scale"), shared["last"]], [name("scale_column")]),
            helper.make_node("Mul", [name("y_unscaled"), name("scale_column")], [name("y2")]),
            helper.make_node("Slice", [name("shape"), shared["begin"], shared["last"]], [name("leading")]),
            helper.make_node("Concat", [name("leading"), n_out], [name("y_shape")], axis=0),
            helper.make_node("Reshape", [name("y2"), name("y_shape")], [y]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {value for node in nodes for value in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name in replaced and tensor.name not in still_used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    if not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


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
