"""export.py: ONNX and int8 exports with pooling, head and normalisation inside, behind the parity gate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distill_student
import export
from common.encoder import Encoder
from common.errors import UserError
from common.onnx_export import OnnxEncoder

QUERIES = ["q", "cheap flights to lisbon in may", "a much longer query " * 12, "used fridge freezer repair"]


@pytest.fixture(scope="module")
def projected_student(tmp_path_factory, small_data, tiny_bert, tiny_bert_narrow):
    """A student with a projection head (16 -> 32): the head must be inside the exported graph."""
    folder = str(tmp_path_factory.mktemp("student") / "student")
    distill_student.main(["--teacher_model", tiny_bert, "--student_model", tiny_bert_narrow, "--query_file",
                          small_data["queries"], "--output_dir", folder, "--max_train_steps", "2",
                          "--per_device_train_batch_size", "8"])  # fmt: skip
    return folder


def gate_args(student, teacher, data, out, *extra):
    return ["--model_name_or_path", student, "--teacher_model", teacher, "--corpus_file", data["ads"],
            "--queries_file", data["test_queries"], "--qrels_file", data["qrels"], "--output_dir", out,
            "--speed_queries", "8", "--batch_size", "4", "--gate_k", "20", "--batch_dependence_queries", "64",
            *extra]  # fmt: skip


def test_export_carries_pooling_head_and_normalisation_and_passes_the_gate(
    projected_student, tiny_bert, small_data, tmp_path
):
    out = str(tmp_path / "serving")
    results = export.main(gate_args(projected_student, tiny_bert, small_data, out, "--min_overlap", "0.9"))
    assert results["passed_gate"] and results["int8_scheme"] == "per_token"  # the first scheme, and it passes
    assert results["models"]["onnx int8 (per_token)"]["batch_dependence"] < 1e-6
    student = Encoder.from_pretrained(projected_student)
    assert student.projection is not None
    expected = student.encode(QUERIES, "query")
    fp32 = OnnxEncoder(student, os.path.join(out, "onnx", "model.onnx"))
    # other batch sizes and lengths than the trace: the axes are dynamic; the vectors are the student's
    np.testing.assert_allclose(fp32.encode(QUERIES, "query", batch_size=3), expected, atol=1e-5)
    np.testing.assert_allclose(fp32.encode(QUERIES[:1], "query"), expected[:1], atol=1e-5)
    int8_path = os.path.join(out, "onnx", "model_qint8.onnx")
    int8 = OnnxEncoder(student, int8_path).encode(QUERIES, "query")
    import onnx  # the head stays fp32 in the int8 graph, as sentence-transformers' 2_Dense runs it

    head = [node for node in onnx.load(int8_path).graph.node if node.name.startswith("/encoder/projection/")]
    assert head and all(node.op_type in ("MatMul", "Gemm", "Add") for node in head)
    assert np.allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-3)  # normalised inside the graph
    assert (int8 * expected).sum(1).min() > 0.95
    # The folder is still the student (loads as it did) and records the gate's numbers.
    np.testing.assert_allclose(Encoder.from_pretrained(out).encode(QUERIES, "query"), expected, atol=1e-6)
    recorded = json.loads(Path(out, "all_results.json").read_text())
    assert recorded["models"]["onnx fp32"]["overlap@20"] == 1.0
    assert recorded["models"]["onnx fp32"]["max_abs_diff"] < 1e-5
    # the speed figures carry what they were measured on and how busy the machine was meanwhile
    assert "VNNI" in recorded["device"] and recorded["models"]["onnx fp32"]["other_load_cores"] >= 0
    assert json.loads(Path(out, "training_args.json").read_text())["script"] == "export.py"


def test_the_gate_refuses_an_export_below_the_bar_and_writes_nothing(
    projected_student, tiny_bert, small_data, tmp_path
):
    out = tmp_path / "serving"
    with pytest.raises(UserError, match=r"refused by the parity gate: onnx int8 \(dynamic\): overlap@20 \d+\.\d\d% "
                                        r"< 100\.00%.*Nothing was written"):  # fmt: skip
        export.main(gate_args(projected_student, tiny_bert, small_data, str(out), "--int8_scheme", "dynamic",
                              "--min_overlap", "1.0", "--speed_queries", "0"))  # fmt: skip
    assert sorted(os.listdir(out)) == [".lock"]  # the folder was new: only the lock was made


def test_an_export_whose_vectors_depend_on_the_batch_is_refused(
    projected_student, tiny_bert, small_data, tmp_path, monkeypatch
):
    """A server batches requests as they come: a query's vector must be the same alone and beside any others.
    Measured for real, fp32 (torch after the export, ONNX), per-token W8A8 and blockwise int8 are batch-independent
    to float noise (the torch student once came back from the export with dropout on: 1 - cos of 7e-2 on the
    demo student). The gate refuses an export above --max_batch_dependence (dynamic int8 quantises each
    activation tensor with one scale: 9.9e-4 on the demo student, which this tiny model does not reproduce, so
    here the measurement of the int8 files is replaced by that value)."""
    loose = ["--min_overlap", "0.01", "--max_recall_drop", "100", "--speed_queries", "0"]
    for scheme in ("per_token", "blockwise"):
        results = export.main(gate_args(projected_student, tiny_bert, small_data, str(tmp_path / scheme),
                                        "--int8_scheme", scheme, *loose))  # fmt: skip
        for name in ("torch fp32", "onnx fp32", f"onnx int8 ({scheme})"):
            assert results["models"][name]["batch_dependence"] < 1e-6, name
    measured = export.batch_dependence
    monkeypatch.setattr(export, "batch_dependence", lambda encoder, texts: (
        9.9e-4 if str(getattr(encoder, "path", "")).endswith("qint8.onnx") else measured(encoder, texts)))  # fmt: skip
    with pytest.raises(UserError, match=r"onnx int8 \(dynamic\): a query's vector depends on its batch \(1 - cos up "
                                        r"to 9\.90e-04 > 0\.0001\).*no int8 scheme passes"):  # fmt: skip
        export.main(gate_args(projected_student, tiny_bert, small_data, str(tmp_path / "d"), "--int8_scheme",
                              "dynamic", *loose))  # fmt: skip
    assert sorted(os.listdir(tmp_path / "d")) == [".lock"]


def one_matmul_graph(path, weight, opset=17):
    """An ONNX graph y = x @ weight over x [batch, tokens, K]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/MatMul")],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)


@pytest.mark.parametrize("scheme, opset", [("per_token", 17), ("per_token", 18), ("dynamic", 17)])
def test_per_token_int8_is_the_hand_computation_and_never_depends_on_the_batch(scheme, opset, tmp_path):
    """per_token: each row x of the input is quantised with its own scale s = max|x| / 127 (uint8 around 128),
    each weight column with its own (max|w| / 127, int8), and the integer product rescaled: equal to that
    computation in numpy, and a row gives the same output alone and beside a row 1000 times larger. dynamic
    (one activation scale per tensor) is checked the same way and does depend on its neighbour. Opset 18 takes
    ReduceMax's axes as an input instead of an attribute: both forms are written."""
    import onnxruntime as ort

    from common.onnx_export import quantize_int8

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(48, 24)).astype(np.float32)
    source, target = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    one_matmul_graph(source, weight, opset)
    quantize_int8(source, target, scheme)
    session = ort.InferenceSession(target, providers=["CPUExecutionProvider"])
    x = rng.normal(size=(1, 5, 48)).astype(np.float32)
    alone = session.run(None, {"x": x})[0]
    beside_a_large_row = session.run(None, {"x": np.concatenate([x, 1000 * x[:, ::-1]])})[0][:1]
    if scheme == "dynamic":
        assert np.abs(alone - beside_a_large_row).max() > 1e-2
        return
    np.testing.assert_array_equal(alone, beside_a_large_row)
    w_scale = np.abs(weight).max(0) / 127
    w_int8 = np.clip(np.rint(weight / w_scale), -127, 127)
    rows = x.reshape(-1, 48)
    x_scale = np.abs(rows).max(1, keepdims=True) / 127
    x_int8 = np.clip(np.rint(rows / x_scale) + 128, 0, 255) - 128
    expected = ((x_int8 @ w_int8) * x_scale * w_scale).reshape(1, 5, 24)
    np.testing.assert_allclose(alone, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(alone - x @ weight).max() < 0.05 * np.abs(x @ weight).max()  # and close to fp32


def test_smoothed_per_token_int8_is_the_hand_computation_and_closer_to_fp32(tmp_path):
    """With calibration, each input channel is divided by t = sqrt(range / largest |w| of its weight row) and the
    row multiplied by it before the per-token quantisation: equal to that computation in numpy, and on inputs
    where a few channels are 30 times larger than the rest (as LayerNorm outputs have), closer to fp32 than
    per-token quantisation alone; still independent of the batch."""
    import onnxruntime as ort

    from common.onnx_export import quantize_int8

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(48, 24)).astype(np.float32)
    channel_size = np.ones(48, np.float32)
    channel_size[[3, 17, 40]] = 30.0
    source = str(tmp_path / "fp32.onnx")
    one_matmul_graph(source, weight)

    def inputs(batch):
        return (rng.normal(size=(batch, 5, 48)) * channel_size).astype(np.float32)

    calibration = [{"x": inputs(8)} for _ in range(4)]
    for name, batches in (("plain", None), ("smoothed", calibration)):
        quantize_int8(source, str(tmp_path / f"{name}.onnx"), "per_token", calibration=batches)
    plain, smoothed = (ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                       for name in ("plain", "smoothed"))  # fmt: skip
    x = inputs(16)
    exact = x @ weight
    y = smoothed.run(None, {"x": x})[0]
    ranges = np.max([np.abs(batch["x"]).reshape(-1, 48).max(0) for batch in calibration], axis=0)
    t = np.sqrt(ranges / np.abs(weight).max(1))
    rows, w = (x / t).reshape(-1, 48), weight * t[:, None]
    w_scale = np.abs(w).max(0) / 127
    x_scale = np.abs(rows).max(1, keepdims=True) / 127
    expected = (np.rint(rows / x_scale) @ np.rint(w / w_scale)) * x_scale * w_scale
    np.testing.assert_allclose(y, expected.reshape(exact.shape), rtol=1e-4, atol=1e-4)
    error_plain, error_smoothed = (
        np.abs(session.run(None, {"x": x})[0] - exact).mean() for session in (plain, smoothed)
    )
    assert error_smoothed < 0.7 * error_plain
    np.testing.assert_array_equal(smoothed.run(None, {"x": x[:1]})[0], y[:1])


def test_a_qwen3_convention_student_exports_with_last_token_pooling(tiny_qwen, tmp_path):
    """Left padding and last-token pooling survive the trace: batches of other shapes give the model's vectors."""
    from common.onnx_export import export_onnx

    student = Encoder.from_pretrained(tiny_qwen)
    assert student.config.pooling == "last" and student.config.padding_side == "left"
    path = str(tmp_path / "qwen.onnx")
    export_onnx(student, path)
    np.testing.assert_allclose(
        OnnxEncoder(student, path).encode(QUERIES, "query", batch_size=3), student.encode(QUERIES, "query"), atol=1e-5
    )


def test_export_refuses_a_folder_that_is_not_its_own(projected_student, tiny_bert, small_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    command = [sys.executable, "export.py", *gate_args(projected_student, tiny_bert, small_data, str(mine))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(export.__file__))
    assert result.returncode == 2 and "holds no run of export.py" in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


ST_ONNX_CHECK = """
import json, sys
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], backend="onnx", model_kwargs={"file_name": sys.argv[2]}, device="cpu")
print(json.dumps(model.encode(json.loads(sys.argv[3]), batch_size=1).tolist()))
"""


@pytest.mark.slow
def test_sentence_transformers_onnx_backend_loads_the_export(projected_student, tiny_bert, small_data, tmp_path):
    """sentence-transformers' ONNX backend needs optimum, whose releases pin transformers < 4.58 while this
    project runs transformers 5: the check runs in a separate virtual environment with the newest
    sentence-transformers[onnx] that installs (5.7), installed from its lock file as a user's serving image
    would have it (tests/st_onnx_serving.txt says how the lock was made)."""
    out = str(tmp_path / "serving")
    export.main(
        gate_args(projected_student, tiny_bert, small_data, out, "--min_overlap", "0.9", "--speed_queries", "0")
    )
    venv = tmp_path / "st-onnx"
    root = os.path.dirname(export.__file__)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: no bytecode for the whole of torch and transformers up front (only what is imported);
    # --no-deps: the lock file is the whole environment, and `pip check` proves it is consistent
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "--no-deps", "-r",
                              os.path.join(root, "tests", "st_onnx_serving.txt")],
                             env={**os.environ, "PIP_CONSTRAINT": os.path.join(root, "constraints.txt")},
                             capture_output=True, text=True)  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    consistent = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True)
    assert consistent.returncode == 0, consistent.stdout[-2000:]
    student = Encoder.from_pretrained(projected_student)
    for file_name in ("onnx/model.onnx", "onnx/model_qint8.onnx"):
        loaded = subprocess.run([str(venv / "bin" / "python"), "-c", ST_ONNX_CHECK, out, file_name,
                                 json.dumps(QUERIES)], capture_output=True, text=True, cwd=str(tmp_path))  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        theirs = np.array(json.loads(loaded.stdout.strip().splitlines()[-1]))
        ours = OnnxEncoder(student, os.path.join(out, file_name)).encode(QUERIES, "query", batch_size=1)
        np.testing.assert_allclose(theirs, ours, atol=1e-5, err_msg=file_name)  # their pooling and head, our graph
