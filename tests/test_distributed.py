"""Whole-toolkit distributed and failure checks: every training stage of every script under torchrun (2 CPU ranks,
gloo) equals one process with the same global batch; a SIGKILLed run resumes to bit-equal weights; a NaN loss
stops the run with one line naming the step and leaves the last good checkpoint intact.

This file is also the torchrun driver: `torchrun --nproc_per_node=2 tests/test_distributed.py OUT` runs the same
stages, in the same order, as the in-process reference (one launch instead of one per stage)."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import ddae_probe  # noqa: E402
import diffusion_classifier  # noqa: E402
import repcond_dit  # noqa: E402
import repfusion  # noqa: E402
from data import UserError  # noqa: E402
import training  # noqa: E402

SCRIPTS = {"repcond_dit": repcond_dit, "ddae_probe": ddae_probe, "diffusion_classifier": diffusion_classifier,
           "repfusion": repfusion}
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
# Same samples, noise and dropout masks on both sides; only the order of float sums differs (each rank sums its
# half, then the halves are averaged), so losses, metrics and weights agree to float32 rounding, amplified a
# little by Adam over a few steps.
LOSS_REL = 1e-4
LOSS_ABS = 1e-6  # distill's loss sums terms of order 1 that nearly cancel (-2e-4 at step 1): rel alone is too strict
METRIC_REL = 1e-4
WEIGHT_ATOL = 1e-4
TIMING_KEYS = ("img_s", "seconds", "train_s", "pretrain_s", "probe_s", "total_s", "calibration_seconds", "cpu_seconds")


def stages(root):
    """(script, stage function, argv) of every training stage, tiny: 3 steps of a global batch of 8, a log line per step.
    Later stages read earlier stages' checkpoints, as a user would chain them."""
    def d(*p):
        return os.path.join(root, *p)
    cpu = ["--device", "cpu", "--seed", "1"]  # not 0: the initial weights must not depend on seed x world size
    train = ["--steps", "3", "--batch-size", "8", "--log-every", "1", "--lr", "1e-3", "--warmup", "0", *cpu]
    # dropout 0.1 (the tiny preset has none): masks must be the global batch's, in pretrain and in finetune's trunk
    ddae_pre = ["pretrain", "--model", "tiny", "--ch", "8", "--dropout", "0.1", "--ema-decay", "0.9", *train]
    return [
        ("repcond_dit", "pretrain", ["pretrain", "--out-dir", d("rd_pretrain"), "--model", "DiT-XS/8", "--encoder", "ViT-XS/8",
                                     "--rep-dim", "32", *train]),
        # latent diffusion with the VAE applied on the fly: the posterior sample must be the global batch's too
        ("repcond_dit", "pretrain", ["pretrain", "--out-dir", d("rd_pretrain_vae"), "--model", "DiT-XS/8", "--encoder", "ViT-XS/8",
                                     "--rep-dim", "32", "--vae-path", vae_file(root), *train]),
        ("repcond_dit", "tune", ["tune", "--ckpt", d("rd_pretrain", "ckpt"), "--out-dir", d("rd_tune"), "--labels-per-class", "4",
                                 *train]),
        ("ddae_probe", "pretrain", [*ddae_pre, "--objective", "ddpm", "--out-dir", d("dp_ddpm")]),
        ("ddae_probe", "pretrain", [*ddae_pre, "--objective", "edm", "--out-dir", d("dp_edm")]),
        ("ddae_probe", "finetune", ["finetune", "--ckpt", d("dp_ddpm", "ckpt"), "--out-dir", d("dp_finetune"), "--layer", "mid",
                                    "--t", "100", "--labels-per-class", "4", "--n-test", "64", *train]),
        ("ddae_probe", "noisy", ["noisy", "--ckpt", d("dp_ddpm", "ckpt"), "--out-dir", d("dp_noisy"), "--layer", "mid",
                                 "--t", "1", "500", "--labels-per-class", "4", "--n-test", "30", "--eval-batch-size", "8", *train]),
        ("diffusion_classifier", "train", ["train", "--out-dir", d("dc_train"), "--model", "DiT-XS/8", "--image-size", "16",
                                           "--n-val", "16", *train]),
        ("repfusion", "distill", ["distill", "--teacher", d("dp_ddpm", "ckpt"), "--out-dir", d("rf_distill"), "--student", "resnet18",
                                  "--width", "4", "--t-policy", "rl", "--t-bins", "10", "--labels-per-class", "4", *train]),
        ("repfusion", "finetune", ["finetune", "--ckpt", d("rf_distill", "ckpt"), "--out-dir", d("rf_finetune"),
                                   "--labels-per-class", "4", *train]),
        ("repfusion", "scratch", ["scratch", "--out-dir", d("rf_scratch"), "--student", "resnet18", "--width", "4",
                                  "--labels-per-class", "4", *train]),
    ]


def vae_file(root):
    """A tiny random-weight VAE in the real layout (factor 2: 32x32 shapes -> 4x16x16 latents), beside the output folders."""
    return os.path.join(os.path.dirname(os.path.abspath(root)), "vae.safetensors")


def write_vae_file(root):
    from safetensors.torch import save_file
    import vae
    torch.manual_seed(0)
    save_file(vae.AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=1).state_dict(), vae_file(root))


def run_stages(root):
    """Run every stage in this process (or in each torchrun rank); the process group, if any, is set up once by the
    first stage and kept (a script's main() would end it)."""
    for script, fn, argv in stages(root):
        mod = SCRIPTS[script]
        getattr(mod, fn)(mod.build_parser().parse_args(argv))


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        run_stages(sys.argv[1])
    finally:
        training.cleanup_distributed()


# ---------------------------------------------------------------------------------------------- torchrun == one process

def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _close(a, b, path=""):
    """Recursive comparison of two metrics.json objects; floats within METRIC_REL, timings skipped."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in TIMING_KEYS:
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=METRIC_REL, abs_tol=1e-7), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_every_training_stage_under_torchrun_equals_one_process(tmp_path):
    from safetensors.torch import load_file
    one, two = tmp_path / "one", tmp_path / "two"
    write_vae_file(one)  # read by both runs
    # one launch runs every stage (this file is the driver); --standalone picks a free port
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.abspath(__file__), str(two)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs while the two ranks do: 2 cores
    try:
        run_stages(str(one))
    finally:
        torch.set_num_threads(threads)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    # only rank 0 writes: the same files, no rank-suffixed or duplicated ones
    assert _files(one) == _files(two)
    logs = [f for f in _files(one) if f.endswith("log.jsonl")]
    assert len(logs) == 12  # 10 fits + finetune's scratch baseline + ddae's second objective
    for f in logs:
        a = [json.loads(x) for x in open(one / f)]
        b = [json.loads(x) for x in open(two / f)]
        # one line per step, written once; the logged loss is the global batch's (ranks' losses averaged)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3], f
        for ra, rb in zip(a, b):
            assert math.isclose(ra["loss"], rb["loss"], rel_tol=LOSS_REL, abs_tol=LOSS_ABS), (f, ra["step"], ra["loss"], rb["loss"])
    for f in _files(one):
        if f.endswith("metrics.json"):  # evaluations sharded over ranks are all-reduced to the single-process figures
            _close(*(json.loads(open(d / f).read().replace(str(d), "OUT")) for d in (one, two)), f)
        if f.endswith(".safetensors"):
            a, b = load_file(one / f), load_file(two / f)
            assert a.keys() == b.keys(), f
            for k in a:
                assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=WEIGHT_ATOL), (f, k, (a[k] - b[k]).abs().max())


# ---------------------------------------------------------------------------------------------- crash, resume

def _load_checkpoint(ckpt):
    """Everything a resume reads, from the folder find_checkpoint picks: (step, model, ema)."""
    from safetensors.torch import load_file
    d = training.find_checkpoint(ckpt)
    state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    json.load(open(os.path.join(d, "config.json")))
    return state["step"], load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(d, "ema.safetensors"))


def test_sigkill_mid_run_then_resume_gives_bit_equal_weights(tmp_path):
    argv = ["pretrain", "--model", "DiT-XS/8", "--encoder", "ViT-XS/8", "--rep-dim", "32", "--device", "cpu", "--steps", "24",
            "--batch-size", "8", "--log-every", "2", "--ckpt-every", "4"]
    crash, full = tmp_path / "crash", tmp_path / "full"
    cmd = [sys.executable, os.path.join(ROOT, "repcond_dit.py"), *argv, "--out-dir", str(crash)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # the log line of step 10 is written after the checkpoint of step 8 (save follows the log line of its step)
    while not (crash / "log.jsonl").exists() or len(open(crash / "log.jsonl").readlines()) < 5:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step, model, ema = _load_checkpoint(str(crash / "ckpt"))  # whatever moment the kill hit, a whole checkpoint is there
    assert step % 4 == 0 and 8 <= step < 24
    assert all(torch.isfinite(v).all() for v in [*model.values(), *ema.values()])
    resume = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocesses: the same kernels, so bit-equal results
    try:
        repcond_dit.pretrain(repcond_dit.build_parser().parse_args([*argv, "--out-dir", str(full)]))
    finally:
        torch.set_num_threads(threads)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out[-3000:]
    assert f"resumed from {crash / 'ckpt'}" in out
    s1, m1, e1 = _load_checkpoint(str(full / "ckpt"))
    s2, m2, e2 = _load_checkpoint(str(crash / "ckpt"))
    assert s1 == s2 == 24 and m1.keys() == m2.keys() and e1.keys() == e2.keys()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    # the log reads as one run: the steps the crash cut short are logged once, with the uninterrupted run's losses
    log1, log2 = ([json.loads(line) for line in open(d / "log.jsonl")] for d in (full, crash))
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(2, 25, 2))
    assert [r["loss"] for r in log2] == [r["loss"] for r in log1]


# ---------------------------------------------------------------------------------------------- NaN stop

class _Batches:
    """A regression data set, batch(step) deterministic in the step, as data.Loader."""
    def batch(self, step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        return x, x.sum(1, keepdim=True).tanh()


def _fit(out, steps, bad=None, at=None):
    """The real fit() on a small MLP; bad="loss": the loss is NaN from step `at` on; bad="grad": at step `at` the loss
    is finite but its gradient is NaN (torch.where's unselected branch: 0 * d sqrt(-1) = NaN), as happens in practice."""
    p = argparse.ArgumentParser()
    cli.add_common_args(p, "runs/test")
    cli.add_train_args(p, steps=steps, batch_size=8, lr=1e-2)
    args = p.parse_args(["--device", "cpu", "--log-every", "2", "--ckpt-every", "2"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def loss_fn(net, x, y, step):
        loss = (net(x) - y).pow(2).mean()
        if bad == "loss" and step + 1 >= at:
            loss = loss * float("nan")
        if bad == "grad" and step + 1 == at:
            trap = torch.sqrt(-net[0].weight.pow(2).sum() - 1)  # NaN, never selected
            loss = torch.where(torch.tensor(True), loss, trap)
        return loss
    return training.fit(model, loss_fn, _Batches(), args, training.Dist(), str(out), {"test": "nan"})


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    # loss: NaN from step 5, seen at the log step 6; grad: step 4's loss is finite but its update makes the weights
    # NaN, which must stop the run before step 4's checkpoint is written
    at, stop, good = (5, "steps 5-6", 4) if bad == "loss" else (4, "step 4", 2)
    with pytest.raises(UserError) as e:
        _fit(tmp_path / "bad", 10, bad, at)
    msg = str(e.value)
    assert "\n" not in msg and stop in msg and "last good checkpoint kept" in msg, msg
    _fit(tmp_path / "clean", good)
    s1, m1, e1 = _load_checkpoint(str(tmp_path / "bad" / "ckpt"))
    s2, m2, e2 = _load_checkpoint(str(tmp_path / "clean" / "ckpt"))
    assert s1 == s2 == good
    assert all(torch.isfinite(v).all() and torch.equal(v, m2[k]) for k, v in m1.items())
    assert all(torch.isfinite(v).all() and torch.equal(v, e2[k]) for k, v in e1.items())
