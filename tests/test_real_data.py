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
    flags = [a for s, f in TINY.items() for a in ("--flags", s, f)]
    r = subprocess.run([sys.executable, "real_data.py", "--out-dir", str(out), "--device", "cpu", *flags],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    saved = json.load(open(out / "real_data.json"))
    assert saved["data"] == "digits" and saved["budget"] == "cpu" and [row["script"] for row in saved["rows"]] == list(real_data.SCRIPTS)
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


def test_flags_for_an_unknown_file_are_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "real_data.py", "--out-dir", str(tmp_path), "--flags", "dit", "--steps 1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == "error: --flags dit: not one of ddae_probe, diffusion_classifier, repfusion, repcond_dit"
