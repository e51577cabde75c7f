"""``make gpu-check-dry``: the GPU check's own code, on the CPU at tiny shapes, so that the first GPU run
cannot die on a mistake a CPU could have caught (benchmarks/gpu_check.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *extra, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SEQCPO_CUDA_TESTS_ON_CPU", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, json.loads((tmp_path / "gpu_check.json").read_text())


@pytest.mark.integration  # about 40 s on 2 cores: the CUDA tests in a subprocess, then every benchmark set
def test_dry_run_passes_every_set(tmp_path):
    proc, res = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "estimated total" in proc.stdout.split("# cuda_tests")[0]  # the plan and its estimate come first
    sets = res["sets"]
    assert list(sets) == ["cuda_tests", "steps_3b", "memory_k8", "an_64_rows", "vllm", "packing_mix", "document_rows"]
    for name, entry in sets.items():
        assert entry["status"] == "ok" or (name == "vllm" and entry["status"].startswith("skipped")), (name, entry)
    # the CUDA tests really ran on the CPU (not skipped): 7 of them
    assert sum(t.startswith("PASSED") for t in sets["cuda_tests"]["tests"]) == 7, sets["cuda_tests"]["output_tail"]
    variants = {r["variant"] for r in sets["steps_3b"]["rows"]}
    assert {"mle", "shared_cached", "twopass_cached", "mn_fused_live"} <= variants
    assert all(r["status"].startswith("ok") for r in sets["steps_3b"]["rows"] + sets["memory_k8"]["rows"])
    assert {r["backend"] for r in sets["an_64_rows"]["rows"]} == {"shared_prefill", "hf"}
    mix = {r["variant"]: r for r in sets["packing_mix"]["rows"]}
    assert mix["packed_cached"]["padding_overhead"] == 0.0 and mix["shared_cached"]["padding_overhead"] > 0.05
    doc = {r["variant"]: r for r in sets["document_rows"]["rows"]}
    assert set(doc) == {"mle_row", "doc_cached", "doc_live", "windows_live", "win32_live"}
    assert all(r["median_s"] > 0 for r in doc.values())
    assert res["estimate_s"] <= 420


def test_budget_skips_what_would_not_fit_and_still_writes_the_json(tmp_path):
    proc, res = _run(tmp_path, "--budget", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "estimated total" in proc.stdout
    assert all(e["status"].startswith("skipped") for e in res["sets"].values()), res["sets"]
    assert "budget" in res["sets"]["steps_3b"]["status"]


def test_the_budget_alarm_is_not_swallowed_by_a_variant_handler():
    """run_gpu.run_steps records a variant's Exception and goes on; the alarm that cuts an overrunning set must
    get through such a handler."""
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    with pytest.raises(gpu_check.SetTimeout):
        with gpu_check.alarm(1.0):
            try:
                time.sleep(5)
            except Exception:  # noqa: BLE001 - what run_steps does
                pass
