"""diffusion_classifier.py with Stable Diffusion (tiny random SD 1.x / 2.x in both layouts): zero-shot classification
of an image folder end to end, the errors it stores equal to the paper's definition computed by hand, prompt CSVs and
ensembles, and the image-text `score` matrix."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import data  # noqa: E402
import diffusion_classifier as dc  # noqa: E402
import sd  # noqa: E402
import sd_tiny  # noqa: E402
from data import UserError  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
CLASSES = ["cat", "dog", "red_car"]


def run(argv):
    return dc.main(dc.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD 1.x folder, an SD 2.x single file (its tokenizer beside it), and a folder of 3 classes x 1 image."""
    root = tmp_path_factory.mktemp("sdc")
    sd_tiny.save_folder(str(root / "sd1"), "sd1")
    sd_tiny.save_folder(str(root / "sd2"), "sd2", seed=3)
    single = str(root / "single" / "sd2.safetensors")
    os.makedirs(os.path.dirname(single))
    sd_tiny.save_single(single, str(root / "sd2"), "sd2", seed=3)
    sd_tiny.bpe_files(os.path.dirname(single))  # vocab.json + merges.txt beside the file: found without --tokenizer
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(root / "imgs" / c)
        for i in range(1):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    return root


def results(out):
    recs = [json.loads(line) for f in sorted(os.listdir(out / "results")) for line in open(out / "results" / f)]
    return sorted(recs, key=lambda r: r["idx"])


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_classify_end_to_end(world, tmp_path, layout):
    """Zero-shot classification of an image folder: metrics.json, confusion.png, the paper schedule's exact pass
    count, and every stored error equal to the paper's (mean over prompts of ||eps - eps_theta(x_t, t, text)||^2,
    x_t from the posterior mean x scaling factor and the slot's noise, the same noise for every class)."""
    path = str(world / "sd1") if layout == "folder" else str(world / "single" / "sd2.safetensors")
    templates = ["a photo of a {}.", "a blurry photo of a {}."] if layout == "folder" else ["a photo of a {}."]
    extra = [] if layout == "folder" else ["--prediction-type", "v_prediction"]
    out = tmp_path / "run"
    run(["classify", "--sd-path", path, "--data", str(world / "imgs"), "--prompts", *templates, "--image-size", "16",
         "--n-samples", "2", "4", "--to-keep", "2", "1", "--out-dir", str(out), "--save-errors", "--max-batch", "16", *extra])
    m = json.load(open(out / "metrics.json"))
    assert m["n_images"] == 3 and m["chance"] == pytest.approx(1 / 3) and 0 <= m["accuracy"] <= 1
    assert m["nfe_per_image"] == 3 * 2 + 2 * 2  # K x 2 slots, then the 2 kept classes x 2 more
    assert os.path.getsize(out / "confusion.png") > 0
    rj = json.load(open(out / "run.json"))
    assert rj["class_names"] == CLASSES and rj["prompts"][:len(templates)] == [t.format("cat") for t in templates]
    # the errors by hand, for the first image
    pipe = sd.load(path, prediction_type=extra[1] if extra else None)
    ds = data.load(str(world / "imgs"), "test", 16)
    rec = results(out)[0]
    z0 = pipe.vae.encode(data.to_float(ds.images[rec["idx"]:rec["idx"] + 1])).mean * pipe.scaling_factor  # (1, 4, 8, 8)
    grid = rj["t_grid"]
    noise = dc.slot_noise(z0.shape[1:], len(grid), 0, 0, rec["idx"], torch.device("cpu"))  # (M, 4, 8, 8)
    t = torch.tensor(grid)
    abar = pipe.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    worst = 0.0
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            ctx = pipe.encode_text([tp.format(name.replace("_", " ")) for tp in templates])  # (P, 77, D)
            e = torch.stack([(pipe.eps(x_t, t, ctx[p:p + 1].expand(len(t), -1, -1)) - noise).pow(2).mean((1, 2, 3))
                             for p in range(len(templates))]).mean(0)  # (M,)
            for j, v in enumerate(rec["E"][c]):
                if v is not None:
                    worst = max(worst, abs(v - e[j].item()) / e[j].item())
    assert sum(v is not None for row in rec["E"] for v in row) == 10
    assert worst < 1e-5, worst


def test_prompts_csv(world, tmp_path):
    """A prompts CSV in the official format (prompt,classname,classidx), its class order not the folder's, two rows
    for one class (averaged): the data's labels are matched by class name, and the prompts keep the CSV's order."""
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,classname,classidx\na photo of a red car.,red_car,0\na photo of a dog.,dog,1\n"
                   "a photo of a cat.,cat,2\na picture of a cat.,cat,2\n")
    out = tmp_path / "run"
    run(["classify", "--sd-path", str(world / "sd1"), "--data", str(world / "imgs"), "--prompts", str(csv), "--image-size", "16",
         "--n-samples", "2", "--to-keep", "1", "--out-dir", str(out)])
    rj = json.load(open(out / "run.json"))
    assert rj["class_names"] == ["red_car", "dog", "cat"] and len(rj["prompts"]) == 4
    assert [r["label"] for r in results(out)] == [2, 1, 0]  # folder order cat, dog, red_car -> CSV indices


def test_score_matrix(world, tmp_path):
    """score: an images x texts error matrix (JSON + heatmap) whose entries equal classify's errors for the same
    image and text (same slots, same paired noise)."""
    out = tmp_path / "score"
    texts = ["a photo of a cat.", "a photo of a dog.", "a photo of a red car."]
    res = run(["score", "--sd-path", str(world / "sd1"), "--data", str(world / "imgs"), "--texts", *texts, "--image-size", "16",
               "--n-samples", "3", "--out-dir", str(out)])
    s = json.load(open(out / "scores.json"))
    assert len(s["error"]) == 3 and all(len(row) == 3 for row in s["error"]) and os.path.getsize(out / "scores.png") > 0
    assert s["best_text"] == [int(np.argmin(row)) for row in s["error"]] and res["texts"] == texts
    cls = tmp_path / "cls"
    run(["classify", "--sd-path", str(world / "sd1"), "--data", str(world / "imgs"), "--prompts", "a photo of a {}.",
         "--image-size", "16", "--n-samples", "3", "--schedule", "full", "--out-dir", str(cls)])
    for rec in results(cls):
        row = s["error"][s["images"].index(rec["idx"])]
        assert np.allclose(row, rec["err"], rtol=1e-5, atol=0)


def test_refusals(world, tmp_path):
    """Bad --sd-path / --prompts combinations get one line."""
    base = ["classify", "--data", str(world / "imgs"), "--image-size", "16", "--n-samples", "2", "--to-keep", "1",
            "--out-dir", str(tmp_path / "x")]
    with pytest.raises(UserError, match=r"one '\{\}'"):
        run(base + ["--sd-path", str(world / "sd1"), "--prompts", "a photo"])
    with pytest.raises(UserError, match="pass --prediction-type"):
        run(base + ["--sd-path", str(world / "single" / "sd2.safetensors"), "--prompts", "a {}"])
    with pytest.raises(UserError, match="--prompts is required"):
        run(base + ["--sd-path", str(world / "sd1")])
    with pytest.raises(UserError, match="need --sd-path"):
        run(base + ["--ckpt", str(world), "--prompts", "a {}"])
    with pytest.raises(UserError, match="not a multiple"):
        run(base[:3] + ["--image-size", "15"] + base[5:] + ["--sd-path", str(world / "sd1"), "--prompts", "a {}"])
