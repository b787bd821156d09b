"""Timings that the machine's other work distorts are flagged: `common.runtime.LoadProbe` measures how many
cores other processes kept busy during a measurement, and the evaluation report marks those latencies."""

import subprocess
import sys
import time

from common.report import render_report
from common.runtime import LoadProbe


def test_other_work_during_a_timing_is_measured_in_cores():
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 2.5\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.3)  # the busy loop is running
        with LoadProbe() as probe:
            time.sleep(1.0)  # this process idles: what the probe sees is the other process
    finally:
        busy.kill()
    assert probe.other_cores is not None and probe.other_cores > LoadProbe.FLAG_CORES
    with LoadProbe() as own:  # this process's own work is not "other work"
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass
    assert own.other_cores < probe.other_cores


def report_of(other_cores):
    speed = {"latency_p50_ms": 6.1, "latency_p95_ms": 7.0, "latency_p99_ms": 8.2, "throughput_qps": 900.0,
             "other_load_cores": other_cores}  # fmt: skip
    entry = {"role": "student (teacher ads)", "parameters": 22_700_000, "speed": speed, "overlap": {"overlap@10": 0.9},
             "metrics": {}, "flops_per_query": 1e9}  # fmt: skip
    return render_report({"k": [10], "judged": False, "index": "flat", "num_queries": 3, "num_ads": 10,
                          "teacher": "teacher", "confidence_level": 0.95, "throughput_batch_size": 64,
                          "device": "cpu", "threads": 2, "models": {"student": entry}})  # fmt: skip


def test_the_report_flags_latencies_measured_on_a_busy_machine():
    loaded = report_of(1.8)
    assert "| student (loaded) |" in loaded and "measured while the machine was busy" in loaded
    assert "student: 1.8 cores" in loaded
    idle = report_of(0.1)
    assert "| student |" in idle and "busy" not in idle
