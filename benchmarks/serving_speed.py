"""Benchmark: query-encoder speed for serving. The student against the teacher beside the ratio of their
forward FLOPs (the bound a speed-up approaches), and the student's ONNX fp32 and int8 exports against the
torch fp32 student, at batch 1 (one request at a time, tokenisation included) and at a batch size.

All contenders run in one process on the same texts, alternating, after a warm-up; the table gives the
median queries per second over --repeats passes. FLOPs per query are counted by torch's FLOP counter on the
same texts at batch 1 (evaluate.forward_flops_per_query).

With --device cuda the teacher and the student run on the GPU in --dtype; the ONNX exports run on the CPU
(ONNX Runtime's CPU provider), so they are compared with the torch fp32 student on the CPU, measured beside them.

    make demo && python benchmarks/serving_speed.py                  # the demo teacher and student
    python benchmarks/serving_speed.py --teacher runs/teacher --student runs/student --queries_file q.jsonl
    python benchmarks/serving_speed.py --device cuda --dtype bfloat16 --results_json serving.json
"""

import argparse
import json
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
from common.runtime import LoadProbe, cpu_features  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=os.path.join(DEMO_ROOT, "teacher"))
    parser.add_argument("--student", default=os.path.join(DEMO_ROOT, "student"))
    parser.add_argument("--queries_file", default=None, help="id, text; default: the demo's test queries")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--queries", type=int, default=256, help="queries per pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "serving_speed"))
    parser.add_argument("--device", default="cpu", help="where the torch teacher and student run (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the torch models' dtype on --device (the CPU reference student stays fp32)")  # fmt: skip
    parser.add_argument("--results_json", default=None, help="also write the measured numbers to this file")
    return parser.parse_args(argv)


@torch.inference_mode()
def one_pass(encoder, texts, batch_size, device):
    if batch_size == 1:  # one request at a time: tokenise, move, encode, read the vector back
        for text in texts:
            encoder(**encoder.tokenize([text], "query").to(device)).cpu()
    else:
        encoder.encode(texts, "query", batch_size=batch_size, device=device)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_features()}, {torch.get_num_threads()} threads"


def time_contenders(contenders, texts, args):
    """{name: {batch size: median queries per second}}, the contenders alternating within each repeat."""
    speed = {name: {} for name in contenders}
    for batch in args.batch_sizes:
        for model, where_to in contenders.values():
            one_pass(model, texts[: max(batch, 16)], batch, where_to)  # warm-up
        rates = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, (model, where_to) in contenders.items():  # alternating, so drifts hit every contender
                if where_to.type == "cuda":
                    torch.cuda.synchronize(where_to)
                start = time.perf_counter()
                one_pass(model, texts, batch, where_to)
                if where_to.type == "cuda":
                    torch.cuda.synchronize(where_to)
                rates[name].append(len(texts) / (time.perf_counter() - start))
        for name, values in rates.items():
            speed[name][batch] = statistics.median(values)
        print(f"batch {batch}: " + ", ".join(f"{name} {speed[name][batch]:.0f} q/s" for name in contenders))

    return speed


def main(argv=None):
    args = parse_args(argv)
    device, cpu = torch.device(args.device), torch.device("cpu")
    _, texts = read_texts(args.queries_file or demo_paths()["test_queries"], "id", "text")
    texts = [texts[i % len(texts)] for i in range(args.queries)]
    teacher = Encoder.from_pretrained(args.teacher, dtype="float32").eval()
    student = Encoder.from_pretrained(args.student, dtype="float32").eval()
    # FLOPs are counted once, on the CPU in fp32: the count does not depend on the device.
    flops_teacher = evaluate.forward_flops_per_query(teacher, texts, cpu, 64)
    flops_student = evaluate.forward_flops_per_query(student, texts, cpu, 64)
    os.makedirs(args.output_dir, exist_ok=True)
    onnx_path = os.path.join(args.output_dir, "student.onnx")
    export_onnx(student, onnx_path)
    on_device = device.type != "cpu" or args.dtype != "float32"
    where = f"torch {args.dtype}, {device.type}"
    teacher_name, student_name, base = f"teacher ({where})", f"student ({where})", "student (torch float32, cpu)"
    contenders = {teacher_name: (teacher, device), student_name: (student, device)}
    if on_device:
        contenders[base] = (Encoder.from_pretrained(args.student, dtype="float32").eval(), cpu)
        teacher.to(device=device, dtype=getattr(torch, args.dtype))
        student.to(device=device, dtype=getattr(torch, args.dtype))
    contenders["student (onnx fp32, cpu)"] = (OnnxEncoder(contenders[base][0], onnx_path), cpu)
    # per_token smoothing calibrated on the timed queries themselves: this benchmark measures speed only
    calibration = [{name: tensor.numpy() for name, tensor in student.tokenize(texts[i : i + 64], "query").items()}
                   for i in range(0, len(texts), 64)]  # fmt: skip
    for scheme in INT8_SCHEMES:
        path = os.path.join(args.output_dir, f"student-int8-{scheme}.onnx")
        quantize_int8(onnx_path, path, scheme, calibration=calibration if scheme == "per_token" else None)
        contenders[f"student (onnx int8 {scheme}, cpu)"] = (OnnxEncoder(contenders[base][0], path), cpu)
    flops = {teacher_name: flops_teacher, student_name: flops_student, base: flops_student}
    with LoadProbe() as probe:  # other work on the machine during the timings: printed, flagged
        speed = time_contenders(contenders, texts, args)
    where_measured = device_name(device) + ("" if device.type == "cpu" else f"; CPU rows: {device_name(cpu)}")
    print(f"\n{where_measured}; {len(texts)} queries per pass, median of {args.repeats} passes")
    if probe.other_cores is not None:
        loaded = probe.other_cores > LoadProbe.FLAG_CORES
        print(f"Other work on the machine during the timings: {probe.other_cores:.2f} cores"
              + (" (LOADED: these figures are low; time again on an idle machine)" if loaded else ""))  # fmt: skip
    print()
    flops_ratio = flops_teacher / flops_student
    header = "| model | GFLOPs/query | " + " | ".join(f"q/s batch {b}" for b in args.batch_sizes)
    header += " | " + " | ".join(f"speed-up vs teacher, batch {b}" for b in args.batch_sizes) + " |"
    print(header)
    print("|---" * (2 + 2 * len(args.batch_sizes)) + "|")
    for name in contenders:
        gflops = f"{flops[name] / 1e9:.3f}" if name in flops else "(as torch)"
        cells = [f"{speed[name][b]:.0f}" for b in args.batch_sizes]
        cells += [f"{speed[name][b] / speed[teacher_name][b]:.2f}x" for b in args.batch_sizes]
        print(f"| {name} | {gflops} | " + " | ".join(cells) + " |")
    print(f"\nFLOPs ratio teacher / student: {flops_ratio:.2f}x; torch student speed-up over the FLOPs ratio: "
          + ", ".join(f"batch {b} {speed[student_name][b] / speed[teacher_name][b] / flops_ratio:.2f}"
                      for b in args.batch_sizes))  # fmt: skip
    print("\n| student export (cpu) | " + " | ".join(f"vs {base}, batch {b}" for b in args.batch_sizes) + " |")
    print("|---" * (1 + len(args.batch_sizes)) + "|")
    for name in [n for n in contenders if "onnx" in n]:
        print(f"| {name} | " + " | ".join(f"{speed[name][b] / speed[base][b]:.2f}x" for b in args.batch_sizes) + " |")
    results = {"device": where_measured, "other_load_cores": probe.other_cores, "queries": len(texts),
               "repeats": args.repeats, "flops_ratio": flops_ratio,
               "gflops": {name: value / 1e9 for name, value in flops.items()}, "queries_per_second": speed}  # fmt: skip
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
