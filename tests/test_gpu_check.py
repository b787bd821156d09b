"""benchmarks/gpu_check.py's plumbing on the CPU: what it installs from the wheels beside it, and a dry run of
its benchmark step on random weights of the default's architecture, which must end in one well-formed table.
(The GPU itself runs it with `python benchmarks/gpu_check.py`; see benchmarks/README.md, "GPU check".)"""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check


def build_wheel(tmp_path, name):
    source = tmp_path / f"{name}-source"
    (source / name).mkdir(parents=True)
    (source / name / "__init__.py").write_text("VALUE = 42\n")
    (source / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name.replace("_", "-")}"\nversion = "1.0"\n'
    )
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*command, str(source)], check=True, capture_output=True)
    return wheels


def test_install_missing_installs_only_the_wheels_of_modules_that_cannot_be_imported(tmp_path):
    wheels = build_wheel(tmp_path, "harness_probe_package")
    (wheels / "numpy-0.0.1-py3-none-any.whl").write_bytes(b"not a wheel: numpy imports, so it is never opened")
    site = tmp_path / "site"
    packages = {"harness-probe-package": "harness_probe_package", "numpy": "numpy", "no-such-dist": "no_such_module"}
    installed, lacking = gpu_check.install_missing(str(wheels), str(site), packages)
    assert installed == ["harness-probe-package"] and lacking == ["no-such-dist"]
    assert (site / "harness_probe_package" / "__init__.py").exists()
    assert not (site / "numpy").exists()
    probe = [sys.executable, "-c", "import harness_probe_package as p; print(p.VALUE)"]
    env = gpu_check.child_environment(str(site))
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "42"


def test_wheel_names_give_their_distributions():
    name = "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    assert gpu_check.wheel_distribution(name) == "pydantic-core"
    assert gpu_check.wheel_distribution("/x/faiss_cpu-1.15.1-cp310-abi3-manylinux_2_28_x86_64.whl") == "faiss-cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_without_a_gpu_it_refuses_unless_asked_for_a_dry_run(tmp_path):
    with pytest.raises(SystemExit, match="--allow_cpu"):
        gpu_check.main(["--output_dir", str(tmp_path)])


def test_dry_run_benchmarks_random_weights_and_prints_one_table(tmp_path):
    wheels = tmp_path / "wheels"
    gpu_check.copy_model_files(str(wheels / gpu_check.MODEL_FILES))
    assert not any(name.endswith((".safetensors", ".bin")) for _, _, files in os.walk(wheels) for name in files)
    output = tmp_path / "check"
    rows = gpu_check.main(["--allow_cpu", "--quick", "--random_weights", "--steps", "encode", "--wheels", str(wheels),
                           "--output_dir", str(output)])  # fmt: skip
    checks = {check: (result, detail) for check, result, _, detail in rows}
    assert checks["benchmark model"][1].startswith("random weights")
    encoded = [result for check, (result, _) in checks.items() if check.startswith("encode:")]
    assert encoded == ["ok"]
    table = (output / "gpu_check.md").read_text().splitlines()
    assert table[0].startswith("GPU check: CPU (dry run)")
    assert len(table) == 4 + len(rows) and all(line.count("|") == 5 for line in table[2:])
