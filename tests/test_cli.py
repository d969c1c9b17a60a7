"""The command line a researcher meets: nothing lost (a stage never writes into what it reads, a finished run is not
silently replaced, --resume continues only the same run), nothing silently ignored (flags before the subcommand),
and the same plumbing in every script."""
import argparse
import os

import pytest
import torch

import cli
import data
import ddae_probe
import diffusion_classifier
import repcond_dit
import repfusion
import training
from data import UserError

SCRIPTS = {"repcond_dit": repcond_dit, "ddae_probe": ddae_probe, "diffusion_classifier": diffusion_classifier,
           "repfusion": repfusion}
STAGES = {"repcond_dit": ["pretrain", "tune", "classify", "probe", "sample"],
          "ddae_probe": ["pretrain", "probe", "align", "finetune", "noisy", "sample", "bench-grid"],
          "diffusion_classifier": ["train", "classify", "bench"], "repfusion": ["distill", "finetune", "scratch"]}
REQUIRED = {("repcond_dit", "tune"): ["--ckpt", "x"], ("repcond_dit", "classify"): ["--ckpt", "x"],
            ("repcond_dit", "probe"): ["--ckpt", "x"], ("repcond_dit", "sample"): ["--ckpt", "x"],
            ("repfusion", "distill"): ["--teacher", "x"], ("repfusion", "finetune"): ["--ckpt", "x"]}


def test_default_output_folders_are_per_script_and_per_stage():
    seen = {}
    for name, mod in SCRIPTS.items():
        for stage in STAGES[name]:
            out = mod.build_parser().parse_args([stage, *REQUIRED.get((name, stage), [])]).out_dir
            assert out not in seen, (name, stage, seen.get(out))
            seen[out] = (name, stage)
    assert repcond_dit.build_parser().parse_args(["tune", "--ckpt", "x"]).out_dir == "runs/repcond/tune"


@pytest.mark.parametrize("name", ["repcond_dit", "repfusion", "ddae_probe", "diffusion_classifier"])
def test_flags_before_the_subcommand_are_used(name):
    stage = STAGES[name][0]
    args = cli.parse_args(SCRIPTS[name].build_parser(), ["--steps", "3", "--batch-size", "8", stage,
                                                               *REQUIRED.get((name, stage), []), "--seed", "5"])
    assert (args.cmd, args.steps, args.batch_size, args.seed) == (stage, 3, 8, 5)  # were the subcommand's defaults


def test_a_flag_the_subcommand_does_not_take_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:  # --tune-steps belongs to the bare run only
        cli.run(repcond_dit.main, repcond_dit.build_parser(), ["--tune-steps", "5", "pretrain"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "error: unrecognized arguments: --tune-steps 5" in err[0], err
    with pytest.raises(SystemExit) as e:  # argparse's own errors too: one line, status 1
        cli.run(repcond_dit.main, repcond_dit.build_parser(), ["tune", "--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "required: --ckpt" in err[0], err


def test_help_shows_every_default():
    text = repcond_dit.build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    assert "(default: 400000)" in text and "(default: runs/repcond/pretrain)" in text


def test_a_stage_never_writes_into_the_folder_it_reads(tmp_path):
    for argv in (["tune", "--ckpt", f"{tmp_path}/run/ckpt", "--out-dir", f"{tmp_path}/run", "--labels-per-class", "1"],
                 ["classify", "--ckpt", f"{tmp_path}/run/ckpt", "--out-dir", f"{tmp_path}/run"]):
        with pytest.raises(UserError, match=f"--out-dir {tmp_path}/run and --ckpt {tmp_path}/run/ckpt, which this stage reads, overlap"):
            repcond_dit.main(repcond_dit.build_parser().parse_args(argv))
    with pytest.raises(UserError, match="and --teacher .* overlap"):
        repfusion.main(repfusion.build_parser().parse_args(["distill", "--teacher", f"{tmp_path}/t", "--out-dir", f"{tmp_path}/t"]))
    with pytest.raises(UserError, match="overlap"):  # an --out-dir inside the run it reads (its ckpt/ folder) too
        repcond_dit.main(repcond_dit.build_parser().parse_args(["classify", "--ckpt", f"{tmp_path}/run", "--out-dir", f"{tmp_path}/run/ckpt"]))
    assert not os.listdir(tmp_path)  # nothing was written


def test_an_evaluation_never_replaces_another_run_unasked(tmp_path):
    for name in ("metrics.json", "config.json"):
        os.makedirs(tmp_path / name.split(".")[0])
        (tmp_path / name.split(".")[0] / name).write_text("{}")
        argv = ["probe", "--ckpt", str(tmp_path / "x"), "--labels-per-class", "1", "--out-dir", str(tmp_path / name.split(".")[0])]
        with pytest.raises(UserError, match="holds another run .*pass --overwrite to replace it"):
            repcond_dit.main(repcond_dit.build_parser().parse_args(argv))
        assert (tmp_path / name.split(".")[0] / name).read_text() == "{}"
    with pytest.raises(UserError, match="--resume and --overwrite"):
        repcond_dit.main(repcond_dit.build_parser().parse_args(["pretrain", "--resume", "--overwrite", "--out-dir", str(tmp_path / "n")]))


def pretrain(out, *extra):
    return ddae_probe.main(ddae_probe.build_parser().parse_args(
        ["pretrain", "--model", "tiny", "--ch", "8", "--image-size", "16", "--steps", "4", "--batch-size", "8", "--warmup", "0",
         "--log-every", "2", "--ckpt-every", "2", "--device", "cpu", "--out-dir", str(out), *extra]))


def test_a_finished_run_is_never_silently_replaced_and_resume_continues_only_the_same_run(tmp_path):
    pretrain(tmp_path / "run")
    before = {f: open(tmp_path / "run" / f, "rb").read() for f in ("log.jsonl", "config.json")}
    ckpt = open(tmp_path / "run" / "ckpt" / "model.safetensors", "rb").read()
    with pytest.raises(UserError, match="holds another run .*pass --overwrite to replace it, --resume to continue"):
        pretrain(tmp_path / "run", "--steps", "2")
    # the default lr: the official 1e-4 per 128 samples at --batch-size 8
    with pytest.raises(UserError, match=r"--resume: --lr 0.01 \(the run has 6.25e-06\), --seed 3 \(the run has 0\) differ "):
        pretrain(tmp_path / "run", "--resume", "--steps", "6", "--lr", "0.01", "--seed", "3")
    with pytest.raises(UserError, match="--steps 2: the checkpoint in .* is at step 4 already"):
        pretrain(tmp_path / "run", "--resume", "--steps", "2")
    assert before == {f: open(tmp_path / "run" / f, "rb").read() for f in before}  # nothing of the run was touched
    assert ckpt == open(tmp_path / "run" / "ckpt" / "model.safetensors", "rb").read()
    pretrain(tmp_path / "run", "--resume", "--steps", "6")  # the same flags: continues
    pretrain(tmp_path / "run", "--overwrite", "--steps", "2")  # said out loud: replaced
    import json
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [2]  # the old run's log is gone


def test_warm_up_longer_than_the_run_is_said(tmp_path, capsys):
    pretrain(tmp_path / "run", "--warmup", "50")
    assert "--warmup 50 is longer than --steps 4" in capsys.readouterr().out


def test_torchrun_prints_an_error_once(tmp_path, monkeypatch, capsys):
    def fail(args):
        raise UserError("--data x: no such file")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            cli.run(fail, argparse.ArgumentParser(), [])
        assert e.value.code == 1 and ("error: --data x: no such file" in capsys.readouterr().err) == printed


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        net = torch.nn.Linear(2, 2)
        training.save_checkpoint(str(tmp_path / "ckpt"), net, net, None, 1, {})
        modes = {f: os.stat(tmp_path / "ckpt" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "ckpt")}
    finally:
        os.umask(old)
    assert modes and set(modes.values()) == {0o644}, modes


def test_encoder_patch_size_is_checked_with_one_line(tmp_path):
    with pytest.raises(UserError, match="--encoder ViT-XS/8: patch size 8 does not divide the input size 20"):
        repcond_dit.main(repcond_dit.build_parser().parse_args(
            ["pretrain", "--model", "DiT-XS/4", "--encoder", "ViT-XS/8", "--image-size", "20", "--steps", "1", "--device", "cpu",
             "--out-dir", str(tmp_path / "x")]))


class _FakeInception(torch.nn.Module):
    """The interface of clean-fid's TorchScript Inception: .layers maps (N, 3, 299, 299) in [-1, 1] to 2048 features."""
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_fid_takes_inception_weights_from_a_file_and_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "INCEPTION_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"FID needs Inception weights .*inception-2015-12-05\.pt.*--inception-path"):
        training.inception(None, "cpu", download=False)
    with pytest.raises(UserError, match="--inception-path .*missing.pt: no such file"):
        training.inception(str(tmp_path / "missing.pt"), "cpu")
    torch.jit.script(_FakeInception()).save(str(tmp_path / "my_inception.pt"))  # any file name
    net = training.inception(str(tmp_path / "my_inception.pt"), "cpu")
    assert net(torch.full((2, 3, 299, 299), 128.0)).shape == (2, 2048)


def _latents_file(path, split, n=8):
    import json
    from safetensors.torch import save_file
    mean = torch.randn(n, 4, 4, 4)
    save_file({"mean": mean, "std": torch.ones_like(mean) * 0.1, "mean_flip": mean.flip(3), "std_flip": torch.ones_like(mean) * 0.1,
               "labels": torch.arange(n) % 2}, str(path),
              metadata={"format": "repcond-latents-v1", "scaling_factor": "0.18215", "image_size": "32", "split": split,
                        "classes": json.dumps(["a", "b"]), "source": "test"})
    return str(path)


def test_a_latents_file_is_one_split_and_a_stage_asks_for_the_other_by_flag(tmp_path):
    train, test = _latents_file(tmp_path / "c_train.safetensors", "train", 8), _latents_file(tmp_path / "c_test.safetensors", "test", 6)
    with pytest.raises(UserError, match="holds one split, this one the train split; the test split is another file .* --test-data"):
        data.load(train, "test")
    argv = ["pretrain", "--data", train, "--model", "DiT-XS/4", "--encoder", "ViT-XS/4", "--rep-dim", "8", "--steps", "2",
            "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "pre")]
    with pytest.raises(UserError, match="pass it with --test-data"):  # refused before any training, not after it
        repcond_dit.main(repcond_dit.build_parser().parse_args(argv))
    assert not os.path.exists(tmp_path / "pre" / "ckpt")
    m = repcond_dit.main(repcond_dit.build_parser().parse_args([*argv, "--test-data", test]))
    assert m["steps"] == 2
    # later stages read the run's own test file, recorded at pre-training
    repcond_dit.main(repcond_dit.build_parser().parse_args(
        ["tune", "--ckpt", str(tmp_path / "pre"), "--labels-per-class", "2", "--steps", "2", "--batch-size", "4", "--device", "cpu",
         "--out-dir", str(tmp_path / "tune")]))
    c = repcond_dit.main(repcond_dit.build_parser().parse_args(
        ["classify", "--ckpt", str(tmp_path / "tune"), "--t", "100", "--n-val", "0", "--device", "cpu", "--out-dir", str(tmp_path / "c")]))
    assert c["n_test"] == 6  # the test file's 6 latents, not the train file's 8
    with pytest.raises(UserError, match=r"this one the test split; the train split is another file .*pass it with --data \(the train"):
        repcond_dit.main(repcond_dit.build_parser().parse_args(
            ["classify", "--ckpt", str(tmp_path / "tune"), "--data", test, "--t", "100", "--device", "cpu", "--out-dir", str(tmp_path / "c2")]))
    with pytest.raises(SystemExit):  # a stage that does not read a test split does not offer the flag
        diffusion_classifier.build_parser().parse_args(["classify", "--ckpt", "x", "--data", train, "--test-data", test])


def test_pictures_a_person_can_read(tmp_path):
    from PIL import Image
    # a grid of accuracies: its lowest cell is coloured (the scale starts at 0), long labels are drawn whole
    labels = ["checkerboard-with-a-long-name", "dots"]
    training.save_heatmap([[0.5, 0.6], [0.55, 0.65]], str(tmp_path / "h.png"), labels, labels, title="probe accuracy")
    img = Image.open(tmp_path / "h.png").convert("RGB")
    white = sum(1 for p in img.getdata() if p == (255, 255, 255))
    assert img.width > 300 and img.height > 300  # room for the 29-character labels (the old one cut them at 7)
    coloured = sum(1 for p in img.getdata() if p[2] == 255 and p[0] < 200)  # the blue of the cells
    assert coloured > 4 * 1000 and white < img.width * img.height
    # a curve: the legend sits right of the frame, not over the lines
    training.save_curve([1, 2, 3], {"test accuracy": [0.1, 0.2, 0.3], "val accuracy": [0.2, 0.1, 0.3]}, str(tmp_path / "c.png"),
                        "t", "score", "sweep")
    c = Image.open(tmp_path / "c.png")
    assert c.width > 560
    # sample grids carry captions and enlarge small images
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    training.save_image_grid(x, str(tmp_path / "s.png"), nrow=4)
    training.save_image_grid(x, str(tmp_path / "s_cap.png"), nrow=4, captions=["a", "b", "c", "d"])
    plain, cap = Image.open(tmp_path / "s.png"), Image.open(tmp_path / "s_cap.png")
    assert plain.size == (4 * 68, 68) and cap.size == (4 * 68, 68 + 16)


def test_every_file_a_run_writes_gets_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        training.save_safetensors({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"), {"k": "v"})
        assert os.stat(tmp_path / "x.safetensors").st_mode & 0o777 == 0o644  # safetensors alone writes 0600
    finally:
        os.umask(old)


HELP_PROBE = """
import runpy, sys, time
sys.argv = [{script!r}, *{args!r}]
t0 = time.perf_counter()
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("\\nRESULT", code, "torch" in sys.modules, round(time.perf_counter() - t0, 3))
"""


@pytest.mark.parametrize("script,args", [("repcond_dit.py", ["--help"]), ("ddae_probe.py", ["probe", "--help"]),
                                         ("diffusion_classifier.py", ["classify", "--help"]),
                                         ("repfusion.py", ["distill", "--help"]), ("vae.py", ["encode", "--help"]),
                                         ("data.py", ["--help"]), ("repcond_dit.py", ["pretrain", "--bogus", "1"])])
def test_help_and_a_refused_line_answer_before_torch_loads(script, args):
    """--help (and a flag argparse refuses) is answered by the standard-library parser at the top of each script:
    torch, about 2 s to import, never loads (the answer takes a few tens of ms)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", HELP_PROBE.format(script=script, args=args)], cwd=root,
                         capture_output=True, text=True, timeout=60)
    code, torch_loaded, seconds = out.stdout.rsplit("RESULT", 1)[1].split()
    assert torch_loaded == "False", f"{script} {args} imported torch"
    assert code == ("0" if "--help" in args else "1")
    if "--help" in args:
        assert "usage:" in out.stdout and "(default:" in out.stdout
    else:
        assert out.stderr.strip().count("\n") == 0 and "--bogus" in out.stderr  # one line


def test_names_the_command_line_offers_are_the_ones_the_models_build():
    """The parsers' choices live in the torch-free cli.py (and repfusion's STUDENTS); each is a model the code builds."""
    import models
    assert repfusion.STUDENTS == tuple(repfusion.Student_models)
    for name in cli.DiT_models:
        assert isinstance(models.DiT(input_size=8, in_channels=3, num_classes=2, learn_sigma=False,
                                     **dict(cli.DiT_models[name], depth=1)), torch.nn.Module)
    assert set(cli.UNet_models) == {"ddpm", "ddpmpp", "tiny"}
