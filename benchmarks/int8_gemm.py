"""Benchmark: the integer GEMM behind export.py's per_token int8 scheme. ONNX Runtime's CPU `MatMulInteger`
with uint8 or int8 activations (int8 weights) against an fp32 `MatMul` of the same shape, one op per graph,
median of --repeats runs, alternating. It is why the per-token scheme quantises activations to uint8 around
128 instead of to int8.

    python benchmarks/int8_gemm.py                      # [64 x 24 x 384] x [384 x 1536], the demo FFN's shape
    python benchmarks/int8_gemm.py --rows 1 --tokens 24 --k 4096 --n 4096
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.runtime import cpu_features  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="batch")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--k", type=int, default=384)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=30)
    return parser.parse_args(argv)


def session(kind, k, n):
    """A one-op graph: fp32 MatMul, or MatMulInteger with int8 weights and `kind` activations."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        weights = [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w")]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        uint8 = kind == "uint8 x int8"
        weights = [numpy_helper.from_array(rng.integers(-127, 128, size=(k, n)).astype(np.int8), "w")]
        if uint8:  # zero point 128: the symmetric range [-127, 127] stored as [1, 255]
            weights.append(numpy_helper.from_array(np.array(128, np.uint8), "zero_point"))
        nodes = [helper.make_node("MatMulInteger", ["x", "w", *(["zero_point"] if uint8 else [])], ["y"])]
        x_type, y_type = (TensorProto.UINT8 if uint8 else TensorProto.INT8), TensorProto.INT32
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", x_type, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", y_type, None)], weights)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(1)
    shape = (args.rows, args.tokens, args.k)
    inputs = {
        "fp32": rng.normal(size=shape).astype(np.float32),
        "uint8 x int8": rng.integers(1, 256, size=shape).astype(np.uint8),
        "int8 x int8": rng.integers(-127, 128, size=shape).astype(np.int8),
    }
    sessions = {kind: session(kind, args.k, args.n) for kind in inputs}
    for kind, run in sessions.items():
        for _ in range(3):
            run.run(None, {"x": inputs[kind]})
    times = {kind: [] for kind in sessions}
    for _ in range(args.repeats):
        for kind, run in sessions.items():
            start = time.perf_counter()
            run.run(None, {"x": inputs[kind]})
            times[kind].append(time.perf_counter() - start)
    print(f"{cpu_features()}; [{args.rows} x {args.tokens} x {args.k}] x [{args.k} x {args.n}], median of "
          f"{args.repeats}\n")  # fmt: skip
    print("| GEMM | ms | vs fp32 |\n|---|---|---|")
    fp32 = statistics.median(times["fp32"])
    for kind, values in times.items():
        print(f"| {kind} | {1000 * statistics.median(values):.2f} | {fp32 / statistics.median(values):.2f}x |")
    return {kind: statistics.median(values) for kind, values in times.items()}


if __name__ == "__main__":
    main()
