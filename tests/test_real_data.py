"""real_data.py: the four bare recipes on a real set, one table; each row is what that file's own run measured."""
import json
import subprocess
import sys

import pytest

import real_data
from conftest import ROOT

# tiny budgets (the plumbing, not the figures): each file's bare run with every stage shortened
TINY = {
    "ddae_probe": "--steps 6 --batch-size 16 --labels-per-class 3 --n-test 30 --t 1 101 --views 1",
    "diffusion_classifier": "--steps 4 --batch-size 16 --n-val 20 --n-test 20 --n-samples 4",
    "repfusion": "--teacher-steps 2 --teacher-ch 8 --steps 4 --finetune-steps 2 --batch-size 16 --width 4 --labels-per-class 4 "
                 "--image-size 16",
    "repcond_dit": "--steps 4 --tune-steps 4 --batch-size 16 --labels-per-class 3 --n-test 30 --t 50 --n-noise 1",
}


def test_every_row_is_the_headline_and_baseline_of_that_files_own_run(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "rd"
    flags = [a for s, f in TINY.items() for a in ("--flags", f"{s}={f}")]
    r = subprocess.run([sys.executable, "real_data.py", "--out-dir", str(out), "--device", "cpu", *flags],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    saved = json.load(open(out / "real_data.json"))
    assert saved["settings"]["data"] == "digits" and saved["settings"]["budget"] == "cpu" and [row["script"] for row in saved["rows"]] == list(real_data.SCRIPTS)
    for row in saved["rows"]:
        m = json.load(open(out / row["script"] / "seed0" / "metrics.json"))
        assert row["metrics"] == m  # the row carries that run's own figures
        head, base, shown = real_data.headline(row["script"], m)
        assert (row["headline"], row["baseline"], row["direction"]) == (head, base, shown)
        assert f"| {row['script']} | 0 | {head} | {base} |" in open(out / "real_data.md").read()
        assert TINY[row["script"]] in row["command"] and "--data digits" in row["command"]
    ddae = saved["rows"][0]["metrics"]
    assert saved["rows"][0]["direction"] == (ddae["probe_best_acc"] > ddae["raw_pixel_acc"])


def test_a_failed_run_is_a_row_that_names_its_log_and_the_others_still_run(tmp_path):
    out = tmp_path / "rd"
    r = subprocess.run([sys.executable, "real_data.py", "--out-dir", str(out), "--device", "cpu", "--data", "no-such-set",
                        "--only", "ddae_probe", "repcond_dit"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    rows = json.load(open(out / "real_data.json"))["rows"]
    assert [row["script"] for row in rows] == ["ddae_probe", "repcond_dit"]
    for row in rows:
        assert row["error"].startswith("exit 1: see ") and "no-such-set" in open(row["error"][len("exit 1: see "):]).read()


def test_a_finished_run_is_reused_for_the_same_command_and_refused_for_another(tmp_path):
    pytest.importorskip("sklearn")
    out, base = tmp_path / "rd", [sys.executable, "real_data.py", "--device", "cpu", "--only", "ddae_probe"]
    go = lambda *a: subprocess.run([*base, "--out-dir", str(out), *a], capture_output=True, text=True, cwd=ROOT)
    r = go("--seeds", "0", "1", "--flags", f"ddae_probe={TINY['ddae_probe']}")
    assert r.returncode == 0, r.stderr[-2000:]
    first = json.load(open(out / "real_data.json"))["rows"]
    assert [row["seed"] for row in first] == [0, 1, "mean"]  # two seeds: a mean row, direction on the means
    m = [row["metrics"] for row in first[:2]]
    assert first[2]["headline"] == f"{(m[0]['probe_best_acc'] + m[1]['probe_best_acc']) / 2:.3f}"
    assert first[2]["note"] == f"{sum(row['direction'] for row in first[:2])} of 2 seeds"
    log = out / "ddae_probe_seed0.log"
    stamp = log.stat().st_mtime_ns
    r = go("--flags", f"ddae_probe={TINY['ddae_probe']}")  # the same command again: reused, not rerun
    assert r.returncode == 0 and "reusing" in r.stdout and log.stat().st_mtime_ns == stamp
    again = json.load(open(out / "real_data.json"))["rows"]
    assert again[0]["metrics"] == first[0]["metrics"] and again[0]["seconds"] == first[0]["seconds"]
    r = go("--flags", f"ddae_probe={TINY['ddae_probe']} --lr 1e-3")  # another command into the same folder: refused, kept
    row = json.load(open(out / "real_data.json"))["rows"][0]
    assert "holds a run of another command" in row["error"] and "--overwrite" in row["error"]
    assert json.load(open(out / "ddae_probe" / "seed0" / "metrics.json")) == first[0]["metrics"]


def test_bad_flags_are_refused_in_one_line(tmp_path):
    for spec, line in (("dit=--steps 1", "error: --flags dit=--steps 1: expected SCRIPT=FLAGS with SCRIPT one of "
                                         "ddae_probe, diffusion_classifier, repfusion, repcond_dit"),
                       ("repfusion=--seed 3", "error: --flags repfusion=--seed 3: --seed is set by real_data.py itself (use its own flag)")):
        r = subprocess.run([sys.executable, "real_data.py", "--out-dir", str(tmp_path), "--flags", spec],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.strip() == line


@pytest.mark.parametrize("script", real_data.SCRIPTS)
def test_the_gpu_budget_is_flags_the_bare_run_takes(script):
    """--budget gpu is only ever run on a GPU: its flags must parse here, and set what they say."""
    import importlib
    args = importlib.import_module(script).build_parser().parse_args(real_data.BUDGETS["gpu"][script])
    flags = real_data.BUDGETS["gpu"][script]
    for flag, value in zip(flags[::2], flags[1::2]):
        assert str(getattr(args, flag[2:].replace("-", "_"))).strip("[]") == value
