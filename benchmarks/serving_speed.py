"""Benchmark: query-encoder speed for serving. The student against the teacher beside the ratio of their
forward FLOPs (the bound a speed-up approaches), and the student's ONNX fp32 and int8 exports against the
torch fp32 student, at batch 1 (one request at a time, tokenisation included) and at a batch size.

All contenders run in one process on the same texts, alternating, after a warm-up; the table gives the
median queries per second over --repeats passes. FLOPs per query are counted by torch's FLOP counter on the
same texts at batch 1 (evaluate.forward_flops_per_query).

    make demo && python benchmarks/serving_speed.py                  # the demo teacher and student
    python benchmarks/serving_speed.py --teacher runs/teacher --student runs/student --queries_file q.jsonl
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402  (the repository's evaluate.py)
from common.data import read_texts  # noqa: E402
from common.demo_data import DEMO_ROOT, demo_paths  # noqa: E402
from common.encoder import Encoder  # noqa: E402
from common.onnx_export import INT8_SCHEMES, OnnxEncoder, export_onnx, quantize_int8  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=os.path.join(DEMO_ROOT, "teacher"))
    parser.add_argument("--student", default=os.path.join(DEMO_ROOT, "student"))
    parser.add_argument("--queries_file", default=None, help="id, text; default: the demo's test queries")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--queries", type=int, default=256, help="queries per pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "serving_speed"))
    return parser.parse_args(argv)


@torch.inference_mode()
def one_pass(encoder, texts, batch_size):
    if batch_size == 1:
        for text in texts:
            encoder(**encoder.tokenize([text], "query"))
    else:
        encoder.encode(texts, "query", batch_size=batch_size)


def main(argv=None):
    args = parse_args(argv)
    _, texts = read_texts(args.queries_file or demo_paths()["test_queries"], "id", "text")
    texts = [texts[i % len(texts)] for i in range(args.queries)]
    teacher = Encoder.from_pretrained(args.teacher, dtype="float32").eval()
    student = Encoder.from_pretrained(args.student, dtype="float32").eval()
    os.makedirs(args.output_dir, exist_ok=True)
    onnx_path = os.path.join(args.output_dir, "student.onnx")
    export_onnx(student, onnx_path)
    contenders = {"teacher (torch fp32)": teacher, "student (torch fp32)": student}
    contenders["student (onnx fp32)"] = OnnxEncoder(student, onnx_path)
    for scheme in INT8_SCHEMES:
        path = os.path.join(args.output_dir, f"student-int8-{scheme}.onnx")
        quantize_int8(onnx_path, path, scheme)
        contenders[f"student (onnx int8, {scheme})"] = OnnxEncoder(student, path)
    flops = {
        name: evaluate.forward_flops_per_query(model, texts, torch.device("cpu"), 64)
        for name, model in contenders.items()
        if isinstance(model, Encoder)
    }
    speed = {name: {} for name in contenders}
    for batch in args.batch_sizes:
        for model in contenders.values():
            one_pass(model, texts[: max(batch, 16)], batch)  # warm-up
        rates = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, model in contenders.items():  # alternating, so drifts hit every contender
                start = time.perf_counter()
                one_pass(model, texts, batch)
                rates[name].append(len(texts) / (time.perf_counter() - start))
        for name, values in rates.items():
            speed[name][batch] = statistics.median(values)
        print(f"batch {batch}: " + ", ".join(f"{name} {speed[name][batch]:.0f} q/s" for name in contenders))

    print(f"\nCPU, {torch.get_num_threads()} threads; {len(texts)} queries per pass, median of {args.repeats} passes\n")
    flops_ratio = flops["teacher (torch fp32)"] / flops["student (torch fp32)"]
    header = "| model | GFLOPs/query | " + " | ".join(f"q/s batch {b}" for b in args.batch_sizes)
    header += " | " + " | ".join(f"speed-up vs teacher, batch {b}" for b in args.batch_sizes) + " |"
    print(header)
    print("|---" * (2 + 2 * len(args.batch_sizes)) + "|")
    for name in contenders:
        gflops = f"{flops[name] / 1e9:.3f}" if name in flops else "(as torch)"
        cells = [f"{speed[name][b]:.0f}" for b in args.batch_sizes]
        cells += [f"{speed[name][b] / speed['teacher (torch fp32)'][b]:.2f}x" for b in args.batch_sizes]
        print(f"| {name} | {gflops} | " + " | ".join(cells) + " |")
    base = "student (torch fp32)"
    print(f"\nFLOPs ratio teacher / student: {flops_ratio:.2f}x; torch student speed-up over the FLOPs ratio: "
          + ", ".join(f"batch {b} {speed[base][b] / speed['teacher (torch fp32)'][b] / flops_ratio:.2f}"
                      for b in args.batch_sizes))  # fmt: skip
    print("\n| student export | " + " | ".join(f"vs torch fp32, batch {b}" for b in args.batch_sizes) + " |")
    print("|---" * (1 + len(args.batch_sizes)) + "|")
    for name in [n for n in contenders if "onnx" in n]:
        print(f"| {name} | " + " | ".join(f"{speed[name][b] / speed[base][b]:.2f}x" for b in args.batch_sizes) + " |")


if __name__ == "__main__":
    main()
