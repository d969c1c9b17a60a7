"""Bad input, script by script: a missing or empty data path, a corrupt PNG, a checkpoint of another image size or
of another model, incompatible flags, a truncated safetensors file and a pickle that tries to run code.

Every case must end in ONE clear line (data.UserError in-process; `error: ...` on stderr and a non-zero exit from
the command line) that names the file or flag and what was expected, and must leave every file the user already
has (the run folder given as --out-dir, the inputs) byte for byte as it was."""
import hashlib
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ddae_probe as dp
import diffusion_classifier as dc
import repcond_dit as rd
import repfusion as rf
import vae
from data import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"repcond_dit": rd, "ddae_probe": dp, "diffusion_classifier": dc, "repfusion": rf, "vae": vae}
CPU = ["--device", "cpu"]
RC = ["--model", "DiT-XS/8", "--encoder", "ViT-XS/8", "--rep-dim", "32", "--steps", "1", "--batch-size", "8", "--log-every", "1", *CPU]
DP = ["--model", "tiny", "--ch", "16", "--steps", "1", "--batch-size", "8", "--log-every", "1", *CPU]
RF = ["--student", "resnet18", "--width", "8", "--t-policy", "fixed", "--t", "10", "--steps", "1", "--batch-size", "8",
      "--log-every", "1", *CPU]
DC = ["--n-test", "8", "--n-samples", "4", "--to-keep", "1", "--n-val", "0", "--batch-size", "8", "--no-progress", *CPU]


def call(script, argv):
    mod = SCRIPTS[script]
    return mod.main(mod.parse_args(argv) if script == "vae" else mod.build_parser().parse_args(argv))


class Evil:
    """Unpickling this runs `touch MARKER`: what a malicious .pt/.ckpt would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def png_folder(root, size, n=8, classes=("a", "b"), seed=0):
    """train/ and test/ splits of class sub-folders with n smooth RGB PNGs each."""
    g = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                img = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="bilinear")[0]
                Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(os.path.join(root, split, c, f"{i}.png"))
    return root


def truncate(src, dst):
    blob = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(blob[:len(blob) // 2])


def copy_ckpt(ckpt, dst, write_ema):
    """A copy of a checkpoint folder whose ema.safetensors (what the scripts load) write_ema(path) replaces. The
    training state (optimizer, step) is left out: only --resume reads it."""
    shutil.copytree(ckpt, dst, ignore=shutil.ignore_patterns("state.pt"))
    write_ema(os.path.join(dst, "ema.safetensors"))
    return dst


@pytest.fixture(scope="module")
def r(tmp_path_factory):
    """Tiny good runs of every script (one step each) on a 16px PNG folder, and the bad inputs, made once."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("bad_input"))
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    s = types.SimpleNamespace(root=root, marker=p("pwned"), missing=p("no_such_folder"))
    s.img16, s.img32 = png_folder(p("img16"), 16), png_folder(p("img32"), 32, seed=1)
    os.makedirs(p("empty"))
    s.empty = p("empty")
    s.corrupt = png_folder(p("corrupt"), 16, n=2)
    for split in ("train", "test"):
        with open(p("corrupt", split, "b", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(60))  # a PNG signature, then garbage
    # a tiny Stable-Diffusion-layout VAE (GroupNorm(32) needs 32 channels) and the latents it writes
    torch.manual_seed(0)
    s.vae = p("vae.safetensors")
    save_file(vae.AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=1).state_dict(), s.vae)
    s.latents = p("latents.safetensors")
    call("vae", ["encode", "--data", s.img16, "--vae-path", s.vae, "--out", s.latents, *CPU])
    s.trunc_latents = p("trunc_latents.safetensors")
    truncate(s.latents, s.trunc_latents)
    s.evil = p("evil.pt")
    torch.save({"pos_embed": Evil(s.marker), "x_embedder.proj.weight": torch.zeros(1)}, s.evil)
    # good runs: their folders are the --out-dir of the bad calls, which must leave them as they are
    s.rc_pre, s.rc_tune, s.dp, s.rf, s.dc, s.dc_cls = (p(n) for n in ("rc_pre", "rc_tune", "dp", "rf", "dc", "dc_cls"))
    s.out = p("new_out")  # the --out-dir of stages that read a run: a stage never writes into a folder it reads
    call("repcond_dit", ["pretrain", "--data", s.img16, "--out-dir", s.rc_pre, *RC])
    call("repcond_dit", ["tune", "--ckpt", p("rc_pre", "ckpt"), "--out-dir", s.rc_tune, "--labels-per-class", "4", "--steps", "1",
                         "--batch-size", "8", "--log-every", "1", *CPU])
    call("ddae_probe", ["pretrain", "--data", s.img16, "--out-dir", s.dp, *DP])
    call("repfusion", ["distill", "--teacher", s.dp, "--data", s.img16, "--out-dir", s.rf, *RF])
    call("diffusion_classifier", ["train", "--data", s.img16, "--model", "DiT-XS/8", "--n-val", "4", "--steps", "1", "--batch-size", "8",
                                  "--log-every", "1", "--out-dir", s.dc, *CPU])
    call("diffusion_classifier", ["classify", "--ckpt", p("dc", "ckpt"), "--out-dir", s.dc_cls, *DC, "--n-val", "4"])  # + calibration
    # broken copies of good checkpoints
    evil_state = lambda path: torch.save({"step": 1, "optimizer": Evil(s.marker)}, path)  # noqa: E731
    for name in ("rc_pre", "dp", "rf", "dc"):
        setattr(s, f"{name}_evil", p(f"{name}_evil"))
        shutil.copytree(getattr(s, name), p(f"{name}_evil"))
        evil_state(p(f"{name}_evil", "ckpt", "state.pt"))
        setattr(s, f"{name}_trunc", copy_ckpt(p(name, "ckpt"), p(f"{name}_trunc"),
                                              lambda d, n=name: truncate(p(n, "ckpt", "ema.safetensors"), d)))
    for name, other in {"rc_pre": "dp", "dp": "rc_pre", "dc": "rf", "rf": "dp"}.items():  # a matching config, another model's weights
        setattr(s, f"{name}_swap", copy_ckpt(p(name, "ckpt"), p(f"{name}_swap"),
                                             lambda d, o=other: shutil.copy(p(o, "ckpt", "ema.safetensors"), d)))
    torch.set_num_threads(n_threads)
    s.files = tree(root)  # what the user has on disk: every bad call must leave it as it is
    return s


def tree(root):
    """path -> sha256 of every file under root: what the user has on disk."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# (script, case) -> (argv, strings the one error line must hold); {name} stands for an attribute of the fixture `r`.
# The --out-dir of every training call is a good run's folder (or the latents file a good `vae.py encode` wrote);
# stages that read a run write to {out}, a new folder (writing into the folder a stage reads is itself refused).
RC_CLS = ["classify", "--out-dir", "{out}", *CPU]
DP_PROBE = ["probe", "--out-dir", "{out}", *CPU]
DC_CLS = ["classify", "--out-dir", "{dc_cls}", *DC]
RF_FT = ["finetune", "--out-dir", "{out}", *CPU]
RF_DISTILL = ["distill", "--out-dir", "{out}", *RF]
ENCODE = ["encode", "--out", "{latents}", *CPU]
NOT_FIT = ["does not fit the model", "missing [", "unexpected ["]
CASES = {
    # a data path that does not exist
    ("repcond_dit", "missing_data"): (["pretrain", "--data", "{missing}", "--out-dir", "{rc_pre}", *RC], ["--data {missing}", "no such"]),
    ("ddae_probe", "missing_data"): (["pretrain", "--data", "{missing}", "--out-dir", "{dp}", *DP], ["--data {missing}", "no such"]),
    ("diffusion_classifier", "missing_data"): ([*DC_CLS, "--ckpt", "{dc}/ckpt", "--data", "{missing}"], ["--data {missing}", "no such"]),
    ("repfusion", "missing_data"): ([*RF_DISTILL, "--teacher", "{dp}", "--data", "{missing}"], ["--data {missing}", "no such"]),
    ("vae", "missing_data"): ([*ENCODE, "--data", "{missing}", "--vae-path", "{vae}"], ["--data {missing}", "no such"]),
    # an empty folder
    ("repcond_dit", "empty_folder"): (["pretrain", "--data", "{empty}", "--out-dir", "{rc_pre}", *RC], ["{empty}: no images"]),
    ("ddae_probe", "empty_folder"): (["pretrain", "--data", "{empty}", "--out-dir", "{dp}", *DP], ["{empty}: no images"]),
    ("diffusion_classifier", "empty_folder"): ([*DC_CLS, "--ckpt", "{dc}/ckpt", "--data", "{empty}"], ["{empty}: no images"]),
    ("repfusion", "empty_folder"): ([*RF_DISTILL, "--teacher", "{dp}", "--data", "{empty}"], ["{empty}: no images"]),
    ("vae", "empty_folder"): ([*ENCODE, "--data", "{empty}", "--vae-path", "{vae}"], ["{empty}: no images"]),
    # a corrupt PNG among good ones: the error names it
    ("repcond_dit", "corrupt_png"): (["pretrain", "--data", "{corrupt}", "--out-dir", "{rc_pre}", *RC],
                                     ["{corrupt}/train/b/broken.png: cannot read image"]),
    ("ddae_probe", "corrupt_png"): ([*DP_PROBE, "--ckpt", "{dp}/ckpt", "--data", "{corrupt}"],
                                    ["{corrupt}/train/b/broken.png: cannot read image"]),
    ("diffusion_classifier", "corrupt_png"): ([*DC_CLS, "--ckpt", "{dc}/ckpt", "--data", "{corrupt}"],  # classifies the test split
                                              ["{corrupt}/test/b/broken.png: cannot read image"]),
    ("repfusion", "corrupt_png"): ([*RF_FT, "--ckpt", "{rf}/ckpt", "--data", "{corrupt}"],
                                   ["{corrupt}/train/b/broken.png: cannot read image"]),
    ("vae", "corrupt_png"): ([*ENCODE, "--data", "{corrupt}", "--vae-path", "{vae}"], ["{corrupt}/train/b/broken.png: cannot read image"]),
    # a checkpoint trained on 16px images, given 32px ones
    ("repcond_dit", "wrong_size"): ([*RC_CLS, "--ckpt", "{rc_tune}/ckpt", "--data", "{img32}"],
                                    ["--data {img32}", "(3, 32, 32)", "{rc_tune}/ckpt was trained on (3, 16, 16)"]),
    ("ddae_probe", "wrong_size"): ([*DP_PROBE, "--ckpt", "{dp}/ckpt", "--data", "{img32}"],
                                   ["--data {img32}", "(3, 32, 32)", "the network takes (3, 16, 16)"]),
    ("diffusion_classifier", "wrong_size"): ([*DC_CLS, "--ckpt", "{dc}/ckpt", "--data", "{img32}"],
                                             ["--data {img32}", "(3, 32, 32)", "the denoiser takes (3, 16, 16)"]),
    ("repfusion", "wrong_size"): ([*RF_FT, "--ckpt", "{rf}/ckpt", "--data", "{img32}"],
                                  ["--data {img32}", "(3, 32, 32)", "distilled on (3, 16, 16)"]),
    ("repfusion", "wrong_size_teacher"): ([*RF_DISTILL, "--teacher", "{dp}", "--data", "{img32}"],
                                          ["--data {img32}", "(3, 32, 32)", "the network takes (3, 16, 16)"]),
    # a checkpoint of another model: another script's folder, a VAE file, another model's weights under a fitting config
    ("repcond_dit", "other_model"): ([*RC_CLS, "--ckpt", "{rf}/ckpt"], ["{rf}/ckpt", "not a repcond_dit checkpoint"]),
    ("repcond_dit", "vae_as_ckpt"): ([*RC_CLS, "--ckpt", "{vae}"], ["{vae}: expected a checkpoint folder"]),
    ("repcond_dit", "other_weights"): (["probe", "--ckpt", "{rc_pre_swap}", "--labels-per-class", "2", "--out-dir", "{rc_pre}", *CPU],
                                       ["{rc_pre_swap}/ema.safetensors", *NOT_FIT]),
    ("ddae_probe", "other_model"): ([*DP_PROBE, "--ckpt", "{rf}/ckpt"], ["{rf}/ckpt/config.json: neither a ddae_probe nor a repcond_dit"]),
    ("ddae_probe", "vae_as_dit"): ([*DP_PROBE, "--ckpt", "{vae}", "--data", "{latents}"], ["{vae}: not a DiT state dict"]),
    ("ddae_probe", "other_weights"): ([*DP_PROBE, "--ckpt", "{dp_swap}"], ["{dp_swap}/ema.safetensors", *NOT_FIT]),
    ("diffusion_classifier", "other_model"): ([*DC_CLS, "--ckpt", "{rf}/ckpt"], ["{rf}/ckpt/config.json: not a DiT checkpoint"]),
    ("diffusion_classifier", "vae_as_dit"): ([*DC_CLS, "--ckpt", "{vae}", "--data", "{latents}"], ["{vae}: not a DiT state dict"]),
    ("diffusion_classifier", "unconditional"): ([*DC_CLS, "--ckpt", "{dp}/ckpt"], ["{dp}/ckpt: this UNet is unconditional"]),
    ("diffusion_classifier", "other_weights"): ([*DC_CLS, "--ckpt", "{dc_swap}"], ["{dc_swap}/ema.safetensors", *NOT_FIT]),
    ("repfusion", "other_model"): ([*RF_FT, "--ckpt", "{rc_pre}/ckpt"], ["--ckpt {rc_pre}/ckpt: not a `repfusion.py distill` checkpoint"]),
    ("repfusion", "other_teacher"): ([*RF_DISTILL, "--teacher", "{rf}", "--data", "{img16}"],
                                     ["--teacher {rf}: not a ddae_probe.py or repcond_dit.py checkpoint"]),
    ("repfusion", "other_weights"): ([*RF_FT, "--ckpt", "{rf_swap}"], ["{rf_swap}/ema.safetensors", *NOT_FIT]),
    ("vae", "other_model"): ([*ENCODE, "--data", "{img16}", "--vae-path", "{rc_pre}/ckpt/model.safetensors"],
                             ["{rc_pre}/ckpt/model.safetensors: does not fit the Stable Diffusion VAE", "missing keys"]),
    # incompatible flags, a flag that only means something with another, an --out-dir that holds another run
    ("repcond_dit", "flags_label_budget"): (["tune", "--ckpt", "{rc_pre}/ckpt", "--labels-per-class", "2", "--labeled-fraction", "0.5",
                                             "--out-dir", "{rc_tune}", *CPU], ["exactly one of --labels-per-class and --labeled-fraction"]),
    ("repcond_dit", "flags_encoder_ckpt"): (["pretrain", "--data", "{img16}", "--encoder-ckpt", "{rc_pre}/ckpt", "--out-dir", "{out}",
                                             *RC],
                                            ["--encoder-ckpt {rc_pre}/ckpt: only read with --freeze-encoder"]),
    ("diffusion_classifier", "flags_stages"): (["classify", "--ckpt", "{dc}/ckpt", "--out-dir", "{dc_cls}", "--n-samples", "2", "4", *CPU],
                                               ["--to-keep is needed with several --n-samples stages"]),
    ("diffusion_classifier", "flags_out_dir_of_another_run"): (
        ["classify", "--ckpt", "{dc}/ckpt", "--out-dir", "{dc_cls}", "--n-samples", "2", "4", "--to-keep", "2", "1", *DC[6:],
         "--n-val", "4"],
        ["--out-dir {dc_cls}: holds results of another run"]),
    ("repfusion", "flags_label_budget"): ([*RF_FT, "--ckpt", "{rf}/ckpt", "--labels-per-class", "2", "--labeled-fraction", "0.5"],
                                         ["exactly one of --labels-per-class and --labeled-fraction"]),
    ("vae", "flags_splits"): ([*ENCODE, "--data", "{img16}", "--split", "train", "test", "--vae-path", "{vae}"],
                              ["--out {latents}: with several splits, put '{{split}}' in the name"]),
    # a truncated safetensors file: a checkpoint's weights, a teacher's, a latents file
    ("repcond_dit", "truncated"): (["probe", "--ckpt", "{rc_pre_trunc}", "--labels-per-class", "2", "--out-dir", "{rc_pre}", *CPU],
                                   ["{rc_pre_trunc}/ema.safetensors: unreadable safetensors file"]),
    ("repcond_dit", "truncated_latents"): (["pretrain", "--data", "{trunc_latents}", "--out-dir", "{rc_pre}", *RC],
                                           ["{trunc_latents}: not a readable safetensors file"]),
    ("ddae_probe", "truncated"): ([*DP_PROBE, "--ckpt", "{dp_trunc}"], ["{dp_trunc}/ema.safetensors: unreadable safetensors file"]),
    ("diffusion_classifier", "truncated"): ([*DC_CLS, "--ckpt", "{dc_trunc}"], ["{dc_trunc}/ema.safetensors: unreadable safetensors file"]),
    ("repfusion", "truncated"): ([*RF_FT, "--ckpt", "{rf_trunc}"], ["{rf_trunc}/ema.safetensors: unreadable safetensors file"]),
    ("repfusion", "truncated_teacher"): ([*RF_DISTILL, "--teacher", "{dp_trunc}", "--data", "{img16}"],
                                         ["{dp_trunc}/ema.safetensors: unreadable safetensors file"]),
    # a pickle that runs code when loaded (a --resume state, an official-DiT .pt, a VAE .pt): refused, the code never runs
    ("repcond_dit", "pickle_resume"): (["pretrain", "--data", "{img16}", "--resume", "--out-dir", "{rc_pre_evil}", *RC],
                                       ["{rc_pre_evil}/ckpt/state.pt: refusing to unpickle posix.system"]),
    ("ddae_probe", "pickle_resume"): (["pretrain", "--data", "{img16}", "--resume", "--out-dir", "{dp_evil}", *DP],
                                      ["{dp_evil}/ckpt/state.pt: refusing to unpickle posix.system"]),
    ("ddae_probe", "pickle_dit"): ([*DP_PROBE, "--ckpt", "{evil}", "--data", "{latents}"],
                                   ["{evil}: refusing to unpickle posix.system"]),
    ("diffusion_classifier", "pickle_resume"): (["train", "--data", "{img16}", "--model", "DiT-XS/8", "--n-val", "4", "--steps", "1",
                                                 "--batch-size", "8", "--resume", "--out-dir", "{dc_evil}", *CPU],
                                                ["{dc_evil}/ckpt/state.pt: refusing to unpickle posix.system"]),
    ("diffusion_classifier", "pickle_dit"): ([*DC_CLS, "--ckpt", "{evil}", "--data", "{latents}"],
                                             ["{evil}: refusing to unpickle posix.system"]),
    ("repfusion", "pickle_resume"): (["distill", "--teacher", "{dp}", "--data", "{img16}", "--resume", "--out-dir", "{rf_evil}", *RF],
                                     ["{rf_evil}/ckpt/state.pt: refusing to unpickle posix.system"]),
    ("vae", "pickle"): ([*ENCODE, "--data", "{img16}", "--vae-path", "{evil}"], ["{evil}: refusing to unpickle posix.system"]),
}


def unchanged(r):
    """Every file under the fixture's folder (run folders used as --out-dir, inputs) has the bytes it had, none is new."""
    before, after = r.files, tree(r.root)
    r.files = after  # a failure here is reported once, not again by every later case
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def fill(items, s):
    return [x.format(**vars(s)) for x in items]


def overwriting(script, argv):
    """The calls write into good runs' folders: with --overwrite, so the failure under test is reached (without it
    the folder itself is refused first); a failing call must still leave every byte as it was."""
    return argv if script == "vae" or "--resume" in argv else [*argv, "--overwrite"]


@pytest.mark.parametrize("script,case", list(CASES), ids=[f"{a}-{b}" for a, b in CASES])
def test_one_clear_line_and_nothing_damaged(r, script, case):
    argv, expected = (fill(x, r) for x in CASES[(script, case)])
    argv = overwriting(script, argv)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(UserError) as e:
            call(script, argv)
    finally:
        torch.set_num_threads(n)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    for want in expected:
        assert want in msg, (want, msg)
    assert not os.path.exists(r.marker), "the pickle ran code"
    unchanged(r)


@pytest.mark.parametrize("script", ["repcond_dit", "ddae_probe", "diffusion_classifier", "repfusion", "vae"])
def test_command_line_prints_one_error_line(r, script):
    """The entry point itself (one process per script: importing torch costs seconds): exactly one `error: ...` line
    on stderr, exit status 1, no traceback, nothing written."""
    argv, expected = (fill(x, r) for x in CASES[(script, "missing_data")])
    argv = overwriting(script, argv)
    p = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for want in expected:
        assert want in lines[0], (want, lines[0])
    unchanged(r)
