"""bench.py: one command covers every section; bench.json holds the printed rows, each ratio is the quotient of
two figures of the run, and the fast paths compute what the slow ones do (same DC0 classes, same probe accuracies,
the adaptive ELBO schedule's NFE)."""
import json
import math

import pytest
import torch

import bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One in-process `python bench.py --smoke` over every section, on one thread (fastest on a shared CPU)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    try:
        rep = bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--warmup", "1", "--iters", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(n)
    return rep, json.loads(out.read_text())


def figure(row):
    return row["img_s"] if "img_s" in row else row["seconds"]


def test_json_has_every_section_with_positive_figures_and_ratios_that_are_quotients(report):
    rep, saved = report
    assert saved["rows"] == json.loads(json.dumps(rep["rows"]))  # the file holds the rows the table prints
    assert saved["device"].startswith("CPU") and saved["date"] and saved["threads"] == 1
    assert set(saved["sections"]) == set(bench.SECTIONS) == {r["section"] for r in saved["rows"]}
    assert all(v["wall_s"] > 0 and v["cpu_s"] >= 0 for v in saved["sections"].values())
    for sec in bench.SECTIONS:
        rows = [r for r in saved["rows"] if r["section"] == sec]
        assert len(rows) >= 2 and all(math.isfinite(figure(r)) and figure(r) > 0 for r in rows), sec
        compared = [r for r in rows if "ratio" in r]
        assert compared, f"{sec}: no comparison"
        for r in compared:
            base = next(b for b in rows if b["mode"] == r["baseline"] and b["config"] == r["config"])
            want = r["img_s"] / base["img_s"] if "img_s" in r else base["seconds"] / r["seconds"]
            assert r["ratio"] == pytest.approx(want, rel=1e-12)
    training = [r for r in saved["rows"] if r["section"].endswith("_train")]
    assert {r["mode"] for r in training} == {"eager fp32", "bf16 autocast"}  # CPU: no compile


def test_fast_paths_compute_the_same_as_the_slow_ones(report):
    rows = {(r["section"], r["mode"]): r for r in report[1]["rows"]}
    dc0 = rows["dc_classify", "batched images x classes"]
    assert dc0["same_pred"] == 1.0 and dc0["nfe_per_image"] == 10  # same eps, same classes as one forward per (image, class)
    grid = rows["probe_grid", "batched grid"]
    assert grid["max_abs_acc_diff"] == 0.0  # the batched grid's probe accuracies equal one run per cell
    full = rows["elbo_classify", "exhaustive"]
    adaptive = next(r for (s, _), r in rows.items() if s == "elbo_classify" and r is not full)
    K, M = 10, 10  # --smoke: 10 classes, 10 slots; the paper's stages M/10 -> keep 5 -> M -> keep 1
    assert full["nfe_per_image"] == K * M and adaptive["nfe_per_image"] == K * (M // 10) + 5 * (M - M // 10)
    assert adaptive["nfe_ratio"] == pytest.approx(full["nfe_per_image"] / adaptive["nfe_per_image"])


def test_table_has_a_header_with_date_and_device_and_one_line_per_row(report):
    rep, _ = report
    text = bench.table(rep)
    lines = text.splitlines()
    assert lines[0].startswith(f"date {rep['date']} | device {rep['device']}")
    assert sum(line.startswith("| ") and not line.startswith("| section") for line in lines) == len(rep["rows"])
    assert "ratio" in lines[1] and "NFE/image" in lines[1]


def test_sd_unet_rows_compare_the_same_function(report):
    """The SD UNet rows time sd.py and diffusers' UNet2DConditionModel at the same weights, which agree."""
    rows = {(r["section"], r["mode"]): r for r in report[1]["rows"]}
    ours = rows["sd_unet", "sd.py"]
    assert ours["baseline"] == "diffusers UNet2DConditionModel" and ours["max_abs_diff"] <= 1e-4
