"""repfusion.py: student ResNets, feature losses, the REINFORCE policy's sign, a frozen teacher, every stage
(distill / finetune / scratch) running, resuming exactly and running under torchrun, and clear errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import repfusion as rf
from cli import add_common_args, add_train_args, DiT_models
from data import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# AdamW at 2e-3 (the official SGD 0.1 schedule is the stages' default; these tiny runs learn in a few steps with Adam)
ADAM = ["--optimizer", "adamw", "--weight-decay", "0", "--lr-steps"]
TINY = ["--device", "cpu", "--student", "resnet18", "--width", "4", "--batch-size", "16", "--lr", "2e-3", *ADAM]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for these tiny tensors


def run(argv, **kw):
    args = rf.build_parser().parse_args(argv)
    stage = {"distill": rf.distill, "finetune": rf.finetune, "scratch": rf.scratch, None: rf.pipeline}[args.cmd]
    return stage(args, **kw)


def cli(argv, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "repfusion.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, **kw)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A ddae_probe.py UNet and a repcond_dit.py DiT, each pre-trained for a few steps on `shapes`."""
    import ddae_probe
    import repcond_dit
    out = tmp_path_factory.mktemp("teachers")
    ddae_probe.main(ddae_probe.build_parser().parse_args(
        ["pretrain", "--out-dir", str(out / "ddae"), "--model", "tiny", "--ch", "8", "--steps", "2", "--batch-size", "16",
         "--log-every", "2", "--device", "cpu"]))
    repcond_dit.main(repcond_dit.build_parser().parse_args(
        ["pretrain", "--out-dir", str(out / "dit"), "--cond", "none", "--model", "DiT-XS/8", "--steps", "2", "--batch-size", "16",
         "--log-every", "2", "--device", "cpu"]))
    return {"ddae": str(out / "ddae"), "dit": str(out / "dit")}


def distill_args(out, teacher, *extra, steps=4):
    return ["distill", "--teacher", teacher, "--out-dir", str(out), "--steps", str(steps), "--log-every", "2",
            "--t-bins", "10", "--entropy-decay-steps", "4", "--hist-every", "1", *TINY, *extra]


# ---------------------------------------------------------------------------------------------- models, losses

@pytest.mark.parametrize("name,dim", [("resnet18", 8 * 8), ("resnet50", 8 * 8 * 4)])
def test_cifar_resnet_stages_and_names(name, dim):
    net = rf.build_student(name, width=8, num_classes=10)
    maps = net.forward_features(torch.randn(2, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]  # 3x3 stride-1 stem, no max-pool
    assert maps[-1].shape[1] == dim == net.feature_dim and net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    keys = net.state_dict().keys()
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "fc.weight"} <= set(keys)
    assert sum(p.numel() for p in rf.build_student("resnet18").parameters()) == 11_168_832  # the standard CIFAR ResNet-18 backbone


def test_feature_losses():
    t = torch.randn(8, 16, 4, 4)
    assert rf.at_loss(t, t).item() < 1e-9 and rf.at_loss(torch.randn(8, 5, 8, 8), t).item() > 0  # any channels, resized
    assert rf.at_loss(3 * t, t).item() < 1e-9  # attention maps are normalised
    f = torch.randn(12, 32)
    assert rf.rkd_loss(2.5 * f, f).item() < 1e-6  # relations are scale-free
    assert rf.rkd_loss(torch.randn(12, 7), f).item() > 0.01


def test_categorical_draw_follows_the_probabilities():
    probs = torch.tensor([[0.1, 0.6, 0.3]]).expand(20000, 3)
    a = rf.sample_categorical(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert torch.bincount(a, minlength=3).float().div(20000).sub(probs[0]).abs().max() < 0.02
    assert rf.entropy_coef(0, 0.1, 100) == 0.1 and rf.entropy_coef(50, 0.1, 100) == pytest.approx(0.05) and rf.entropy_coef(150, 0.1, 100) == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_gradient_moves_mass_toward_reward(sign):
    """REINFORCE with a moving-average baseline: a reward for bin 5 (sign +1) pulls the mass there; a penalty pushes it away."""
    torch.manual_seed(0)
    pol = rf.PolicyNet(3, 8)
    opt = torch.optim.Adam(pol.parameters(), lr=1e-2)
    x, g, baseline = torch.randn(64, 3, 32, 32), torch.Generator().manual_seed(1), None
    for step in range(40):
        logits = pol(x)
        a = rf.sample_categorical(F.softmax(logits.detach(), 1), torch.rand(64, generator=g))
        reward = sign * (a == 5).float()
        b = reward.mean() if baseline is None else baseline
        loss, _ = rf.reinforce_loss(logits, a, reward - b, rf.entropy_coef(step, 0.01, 20))
        opt.zero_grad()
        loss.backward()
        opt.step()
        baseline = 0.9 * b + 0.1 * reward.mean()
    p = F.softmax(pol(x), 1).mean(0)
    assert (p[5] > 0.6) if sign > 0 else (p[5] < 0.02)


def test_official_policy_head_losses_and_recipe_defaults():
    """Repfusion's released code: PolicyNet_Cov (LeNet-5, unpadded 5x5 convs, 1000 actions, default init), the task head
    Linear(256, 256)-ReLU-Linear(256, 256)-ReLU-Linear(256, K) without LayerNorm, AT (losses/at.py) at kd_weight 1000,
    RKD (losses/rkd.py) distance 25 + angle 50, REINFORCE without a baseline, clean teacher input, SGD-free defaults
    we can match: EMA 0.999, no clipping; fine-tuning batch 64."""
    pol = rf.PolicyNet(3, 1000)
    assert [tuple(p.shape) for p in pol.parameters()] == [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,),
                                                          (84, 120), (84,), (1000, 84), (1000,)]
    x = torch.randn(2, 3, 32, 32)
    conv = F.max_pool2d(F.relu(pol.conv2(F.max_pool2d(F.relu(pol.conv1(x)), 2))), 2)
    assert conv.shape == (2, 16, 5, 5) and pol.fc3.weight.abs().sum() > 0  # 400 features without pooling; default init
    head = rf.TaskHead(256, 10)
    assert [tuple(p.shape) for p in head.parameters()] == [(256, 256), (256,), (256, 256), (256,), (10, 256), (10,)]
    assert isinstance(head.norm, torch.nn.Identity)
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 8, 8, 8, generator=g), torch.randn(4, 16, 4, 4, generator=g)

    def at_map(fm, eps=1e-6):  # losses/at.py
        am = fm.abs().pow(2).sum(1, keepdim=True)
        return am / (am.norm(dim=(2, 3), keepdim=True) + eps)
    want = F.mse_loss(at_map(F.interpolate(fs, (4, 4), mode="bilinear")), at_map(ft))
    assert abs(rf.at_loss(fs, ft).item() - want.item()) < 1e-6 and rf.FEAT_WEIGHT["at"] == 1000.0
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g)

    def pdist(e):  # losses/rkd.py
        sq = e.pow(2).sum(1)
        d = (sq[:, None] + sq[None] - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def angle(e):
        v = F.normalize(e[None] - e[:, None], p=2, dim=2)
        return torch.bmm(v, v.transpose(1, 2)).view(-1)
    td, sd = pdist(t), pdist(s)
    want = 25 * F.smooth_l1_loss(sd / sd[sd > 0].mean(), td / td[td > 0].mean()) + 50 * F.smooth_l1_loss(angle(s), angle(t))
    assert abs(rf.rkd_loss(s, t).item() - want.item()) < 1e-5 and rf.FEAT_WEIGHT["rkd"] == 1.0
    d = rf.build_parser().parse_args(["distill", "--teacher", "x"])
    assert (d.teacher_input, d.baseline, d.grad_clip, d.ema_decay, d.t_bins, d.head_hidden) == ("clean", "none", 0.0, 0.999, 1000, None)
    f = rf.build_parser().parse_args(["finetune", "--ckpt", "x"])
    assert (f.batch_size, f.grad_clip, f.labels_per_class, f.labeled_fraction) == (64, 0.0, None, None)


# ---------------------------------------------------------------------------------------------- the RL loop end to end

class OneBinTeacher(rf.Teacher):
    """A stand-in teacher whose feature tells the class only when t falls in one bin (else noise)."""
    kind, layer, T = "toy", "toy", 400

    def __init__(self, good_bin, n_bins):
        self.good_bin, self.n_bins = good_bin, n_bins

    def noise_shape(self, x):
        return x.shape[1:]

    def __call__(self, x, t, eps):
        c = (((x.mean(dim=(1, 2, 3)) + 1) * 127.5 - 20) / 20).round().long().clamp(0, 9)  # images are constant 20 + 20c
        good = F.one_hot(c, 16).float() * 3
        bad = eps[:, 0, 0, :16] if eps is not None else torch.zeros_like(good)
        f = torch.where((t * self.n_bins // self.T == self.good_bin)[:, None], good, bad)
        return f, f[:, :, None, None]


RL_FLAGS = ["--baseline", "ema", *ADAM]  # 40 steps: without a baseline (the official default) the toy policy moves too slowly


def test_rl_policy_learns_the_informative_timestep(tmp_path):
    root = tmp_path / "const"
    for c in range(10):
        os.makedirs(root / f"c{c}")
        for i in range(8):
            Image.fromarray(np.full((16, 16, 3), 20 + 20 * c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    teacher = OneBinTeacher(good_bin=2, n_bins=4)
    m = run(["distill", "--teacher", "toy", "--data", str(root), "--out-dir", str(tmp_path / "rl"), "--steps", "40",
             "--log-every", "20", "--t-bins", "4", "--entropy-coef", "0.01", "--lr", "1e-2", "--device", "cpu",
             "--width", "4", "--batch-size", "32", "--no-augment", *RL_FLAGS], teacher=teacher)
    assert m["t_hist_last"]["fraction"][2] > 0.6, m["t_hist_last"]
    assert m["t_hist"]["n"] == 40 * 32
    hist = json.load(open(tmp_path / "rl" / "t_hist.json"))
    assert hist["counts_per_tenth"][-1][2] > hist["counts_per_tenth"][0][2]  # the mass moved there over training


# ---------------------------------------------------------------------------------------------- stages

@pytest.mark.parametrize("policy", ["rl", "fixed", "random"])
def test_distill_runs_and_teacher_stays_frozen(tmp_path, teachers, policy):
    teacher = rf.load_teacher(teachers["ddae"], None, "noised", "cpu", data_spec="shapes")
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    m = run(distill_args(tmp_path, teachers["ddae"], "--t-policy", policy, "--t", "30", steps=6), teacher=teacher)
    after = teacher.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.net.training and not any(p.requires_grad for p in teacher.net.parameters())
    assert m["teacher_layer"] == "mid" and m["t_policy"] == policy and m["t_hist"]["n"] == 6 * 16
    if policy == "fixed":
        assert m["t_hist"]["fraction"][0] == 1.0 and m["t_mean"] == 30
    assert os.path.exists(tmp_path / "t_hist.png") and os.path.exists(tmp_path / "t_hist.json")
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)
    keys = load_file(tmp_path / "ckpt" / "ema.safetensors").keys()
    assert ("policy.fc3.weight" in keys) == ("head.fc2.weight" in keys) == (policy == "rl") and "t_hist" in keys
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


@pytest.mark.parametrize("loss,kind,inp", [("at", "ddae", "clean"), ("rkd", "dit", "noised"), ("mse", "dit", "clean")])
def test_feature_losses_and_teachers(tmp_path, teachers, loss, kind, inp):
    m = run(distill_args(tmp_path, teachers[kind], "--feat-loss", loss, "--teacher-input", inp, steps=2))
    assert m["teacher_kind"] == kind and m["teacher_input"] == inp
    if kind == "dit":
        assert m["teacher_layer"] == "blocks.2" and m["teacher_dim"] == 128  # DiT-XS: 4 blocks of width 128


def _same_weights(a, b):
    for f in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(a / "ckpt" / f), load_file(b / "ckpt" / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def test_distill_resume_is_exact(tmp_path, teachers):
    run(distill_args(tmp_path / "full", teachers["ddae"], steps=6))
    run(distill_args(tmp_path / "half", teachers["ddae"], steps=3))
    run(distill_args(tmp_path / "half", teachers["ddae"], "--resume", steps=6))
    _same_weights(tmp_path / "full", tmp_path / "half")  # includes the baseline, the t histogram, BatchNorm statistics


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teachers):
    out = tmp_path_factory.mktemp("distilled")
    run(distill_args(out, teachers["ddae"], steps=4))
    return out


@pytest.mark.parametrize("stage", ["finetune", "scratch"])
def test_classifier_stages_run_and_resume_exactly(tmp_path, distilled, stage):
    src = ["--ckpt", str(distilled)] if stage == "finetune" else ["--student", "resnet18", "--width", "4"]
    common = [stage, *src, "--labels-per-class", "4", "--batch-size", "16", "--lr", "2e-3", "--log-every", "2", "--device", "cpu"]
    m = run([*common, "--out-dir", str(tmp_path / "full"), "--steps", "4"])
    run([*common, "--out-dir", str(tmp_path / "half"), "--steps", "2"])
    run([*common, "--out-dir", str(tmp_path / "half"), "--steps", "4", "--resume"])
    _same_weights(tmp_path / "full", tmp_path / "half")
    assert m["n_labeled"] == 40 and m["chance"] == 0.1 and 0 <= m["accuracy"] <= 1
    assert ("probe_accuracy" in m) == (stage == "finetune")
    cfg = json.load(open(tmp_path / "full" / "ckpt" / "config.json"))
    assert cfg["stage"] == f"repfusion-{stage}" and cfg["num_classes"] == 10


def test_finetune_starts_from_the_distilled_student(tmp_path, distilled):
    m = run(["finetune", "--ckpt", str(distilled), "--out-dir", str(tmp_path), "--steps", "1", "--lr", "0",
             "--labels-per-class", "2", "--batch-size", "16", "--device", "cpu"])
    a = load_file(distilled / "ckpt" / "ema.safetensors")
    b = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(a["student.layer3.1.conv2.weight"], b["layer3.1.conv2.weight"]) and m["accuracy"] >= 0


# ---------------------------------------------------------------------------------------------- pipeline, torchrun

PIPE = ["--steps", "4", "--finetune-steps", "2", "--batch-size", "16", "--width", "4", "--labels-per-class", "4",
        "--t-policy", "rl", "--device", "cpu"]


def test_pipeline_runs_every_stage(tmp_path, teachers):
    # torchrun == one process, stage by stage, is tests/test_distributed.py's
    one = run(["--out-dir", str(tmp_path / "one"), "--teacher", teachers["ddae"], *PIPE])
    for k in ("student_acc", "scratch_acc", "chance", "t_policy", "t_hist", "student_probe_acc", "t_mean", "seconds"):
        assert k in one, k
    assert json.load(open(tmp_path / "one" / "metrics.json"))["student_acc"] == one["student_acc"]
    assert one["t_hist"]["n"] == 4 * 16  # every distillation pick counted once



def test_pipeline_uses_its_image_size_and_feature_loss_in_every_stage(tmp_path):
    """--image-size reaches the teacher, the distillation and scratch (finetune reads it from the distill run), and
    the bare run distils with attention transfer (--feat-loss, default at), on the built-in real digits."""
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    run(["--out-dir", str(out), "--data", "digits", "--image-size", "16", "--teacher-steps", "2", "--teacher-ch", "8", *PIPE])
    cfg = lambda stage: json.load(open(out / stage / "ckpt" / "config.json"))
    assert [cfg(s)["sample_shape"] for s in ("teacher", "distill", "finetune", "scratch")] == [[3, 16, 16]] * 4
    assert cfg("distill")["args"]["feat_loss"] == "at" and cfg("teacher")["image_size"] == 16


def test_pipeline_feature_loss_default_is_per_task(tmp_path, teachers):
    """The bare run distils with attention transfer for classification and with MSE for the dense tasks (where MSE
    measured better on seg); --feat-loss overrides both."""
    out = tmp_path / "seg"
    run(["--out-dir", str(out), "--task", "seg", "--image-size", "16", "--teacher-steps", "2", "--teacher-ch", "8", *PIPE])
    assert json.load(open(out / "distill" / "ckpt" / "config.json"))["args"]["feat_loss"] == "mse"
    for stage in ("finetune", "scratch"):  # --image-size reaches the dense tail too
        assert json.load(open(out / stage / "ckpt" / "config.json"))["args"]["image_size"] == 16
    small = tmp_path / "small"  # 1 label a class (10) under --batch-size 16: fine-tuning takes the whole budget a step
    m = run(["--out-dir", str(small), "--teacher", teachers["ddae"], *PIPE, "--labels-per-class", "1"])
    assert m["n_labeled"] == 10 and json.load(open(small / "scratch" / "ckpt" / "config.json"))["args"]["batch_size"] == 10
    args = rf.build_parser().parse_args(["--feat-loss", "rkd"])
    assert args.feat_loss == "rkd" and rf.build_parser().parse_args([]).feat_loss is None


# ---------------------------------------------------------------------------------------------- bad input

def test_a_checkpoint_that_is_not_a_teacher_gives_one_clear_line(tmp_path, distilled):
    r = cli(["distill", "--teacher", str(distilled), "--out-dir", str(tmp_path), *TINY])
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: --teacher") and "not a ddae_probe.py or repcond_dit.py checkpoint" in r.stderr


def test_other_user_errors(tmp_path, teachers):
    with pytest.raises(UserError, match="no such checkpoint folder"):
        rf.load_teacher(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--teacher-layer up.99: not a layer"):
        rf.load_teacher(teachers["ddae"], "up.99", data_spec="shapes")
    with pytest.raises(UserError, match="--t 5000"):
        run(distill_args(tmp_path, teachers["ddae"], "--t-policy", "fixed", "--t", "5000"))
    for kind in ("ddae", "dit"):  # a teacher trained on 32 px images, distilled on 16 px ones
        with pytest.raises(UserError, match=r"--image-size 16: the data's images are 16x16, but the teacher .* takes \(3, 32, 32\)"):
            run(distill_args(tmp_path / kind, teachers[kind], "--image-size", "16"))
    with pytest.raises(UserError, match="not a `repfusion.py distill` checkpoint"):
        run(["finetune", "--ckpt", teachers["ddae"], "--out-dir", str(tmp_path), "--device", "cpu"])


def test_an_official_dit_file_is_a_teacher_as_in_every_script(tmp_path):
    """--teacher takes what --ckpt takes elsewhere: an official DiT .pt (here random weights in its layout, pixel space
    on `shapes`); the teacher reads the middle block with the null label and stays frozen."""
    import models
    torch.manual_seed(0)
    dit = models.DiT(input_size=32, in_channels=3, num_classes=10, learn_sigma=True, **DiT_models["DiT-XS/8"])
    for p in dit.parameters():
        p.data.normal_(0, 0.02)
    torch.save({"ema": dit.state_dict(), "args": None}, tmp_path / "dit.pt")
    t = rf.load_teacher(str(tmp_path / "dit.pt"), data_spec="shapes")
    assert t.kind == "dit" and t.layer == "blocks.2" and t.T == 1000
    m = run(distill_args(tmp_path / "d", str(tmp_path / "dit.pt"), "--data", "shapes", "--t-policy", "fixed", "--t", "10", steps=2))
    assert m["teacher_kind"] == "dit" and m["teacher_dim"] == 128 and math.isfinite(m["final_feat_loss"])
    with pytest.raises(UserError, match="official DiT file needs --data"):
        rf.load_teacher(str(tmp_path / "dit.pt"))


def test_official_optimizer_and_step_schedule(tmp_path):
    """distill: SGD 0.1, momentum 0.9, wd 1e-4, x0.1 at epochs 100 and 150 of 200 (the official CIFAR configs);
    finetune / scratch: the same with Nesterov momentum. fit multiplies the lr by 0.1 at each --lr-steps step."""
    d = rf.build_parser().parse_args(["distill", "--teacher", "x"])
    assert (d.optimizer, d.lr, d.momentum, d.weight_decay, d.nesterov, d.lr_steps) == ("sgd", 0.1, 0.9, 1e-4, False, [39_000, 58_500])
    assert d.lr_steps == [d.steps // 2, d.steps * 3 // 4]
    f = rf.build_parser().parse_args(["finetune", "--ckpt", "x"])
    assert (f.optimizer, f.lr, f.nesterov, f.weight_decay, f.batch_size) == ("sgd", 0.1, True, 1e-4, 64)
    assert f.lr_steps == [f.steps // 2, round(f.steps * 0.75)]
    import argparse
    import training
    p = argparse.ArgumentParser()
    add_train_args(p, 8, 4, 0.1, optimizer="sgd", nesterov=True, lr_steps=(4, 6))
    add_common_args(p, str(tmp_path))
    args = p.parse_args(["--log-every", "1", "--device", "cpu", "--no-compile"])

    class Batches:
        def batch(self, step):
            return torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    model = torch.nn.Linear(3, 2)
    training.fit(model, lambda net, x, y, step: F.cross_entropy(net(x), y), Batches(), args, training.Dist(), str(tmp_path), {})
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "log.jsonl")]
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["nesterov"] and "momentum_buffer" in state["state"][0]
