"""sd.py against the reference libraries at the same random weights: diffusers' UNet2DConditionModel, transformers'
CLIPTextModel and CLIPTokenizer, in both layouts (diffusers folder; LDM single file, whose key names diffusers' own
single-file converters map back to the folder's weights)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import sd  # noqa: E402
import sd_tiny  # noqa: E402
from data import UserError  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

HARD = ["a photo of a dog.", "A Photo Of A DOG!", "Héllo wörld ÉCOLE café naïve Ångström", "emoji 🐶🐱👍🏽 and ❤️!!!",
        "...!!!???---***", "it's isn't we'll they'd I'M You'RE o'clock rock'n'roll", "12345 3.14 1,000,000 2nd 10%",
        "  spaces\tand\nnewlines  between ", "日本語 テキスト 中文 한국어", "a--b__c''d 's", "Straße İstanbul ǅemal ﬁne",
        "e\u0301 (decomposed é) vs é", "word " * 100, "", "<b>tags</b> & ampersands &amp; \"quotes\"",
        "special <|endoftext|> inside <|startoftext|>!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Both versions as diffusers folders, with their reference models."""
    out = {}
    for version in ("sd1", "sd2"):
        d = str(tmp_path_factory.mktemp(version))
        out[version] = (d, *sd_tiny.save_folder(d, version))
    return out


def inputs(version, n=3):
    g = torch.Generator().manual_seed(1)
    D = sd_tiny.CONFIGS[version][0]["cross_attention_dim"]
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 500, 999][:n]), torch.randn(n, 77, D, generator=g)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_diffusers_folder_parity(folders, version):
    """UNet, text encoder and tokenizer of a pipeline folder match diffusers / transformers (max abs diff <= 1e-4)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer
    d, unet, text, _ = folders[version]
    pipe = sd.load(d)
    x, t, ctx = inputs(version)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        out = pipe.unet(x, t, ctx)
    assert ref.abs().mean() > 0.05  # random weights that reach the output
    assert (out - ref).abs().max().item() <= 1e-4
    ids = pipe.tokenize(HARD)
    ref_ids = CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer"))(
        HARD, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    assert ids[0, -1].item() == (0 if version == "sd2" else pipe.tokenizer.eos)  # SD 2 pads with 0, SD 1 with the end token
    with torch.no_grad():
        e_ref = text(ref_ids).last_hidden_state
    assert (pipe.encode_text(HARD) - e_ref).abs().max().item() <= 1e-4
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert (pipe.alphas_cumprod - sched.alphas_cumprod).abs().max().item() <= 1e-6
    assert pipe.prediction_type == "epsilon" and pipe.scaling_factor == 0.18215


@pytest.mark.parametrize("version,ext", [("sd1", ".safetensors"), ("sd2", ".ckpt")])
def test_single_file_parity(folders, tmp_path, version, ext):
    """An LDM single file: diffusers' single-file converters turn its keys back into the folder's weights exactly,
    and sd.load of the file gives the reference outputs (SD 2: the penultimate of OpenCLIP's layers)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)
    d, unet, text, _ = folders[version]
    f = str(tmp_path / f"model{ext}")
    ldm = sd_tiny.save_single(f, d, version)
    conv = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    want = unet.state_dict()
    assert set(conv) == set(want) and all(torch.equal(conv[k], want[k]) for k in want)
    want = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in text.state_dict().items()}
    if version == "sd1":
        conv = convert_ldm_clip_checkpoint(ldm)
    else:
        conv = convert_open_clip_checkpoint(text, ldm)
        L = text.config.num_hidden_layers  # the converter keeps every layer of this tiny file; SD uses the first L
        conv = {k: v for k, v in conv.items() if f"layers.{L}." not in k and k != "text_projection.weight"}
    assert set(conv) == set(want) and all(torch.equal(conv[k], want[k]) for k in want)
    pipe = sd.load(f, tokenizer=os.path.join(d, "tokenizer"), prediction_type="epsilon")
    x, t, ctx = inputs(version)
    with torch.no_grad():
        assert (pipe.unet(x, t, ctx) - unet(x, t, encoder_hidden_states=ctx).sample).abs().max().item() <= 1e-4
        ids = pipe.tokenize(HARD[:4])
        assert (pipe.encode_text(HARD[:4]) - text(ids).last_hidden_state).abs().max().item() <= 1e-4
    assert pipe.version == version and pipe.unet.config["use_linear"] == (version == "sd2")
    assert torch.equal(pipe.alphas_cumprod, ldm["alphas_cumprod"].float())  # the file's own schedule buffer


def test_v_prediction_converted_to_eps(folders, tmp_path):
    """A v-prediction model's output v becomes eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    d, unet, _, _ = folders["sd2"]
    pipe = sd.load(d, prediction_type="v_prediction")
    x, t, ctx = inputs("sd2")
    with torch.no_grad():
        v = unet(x, t, encoder_hidden_states=ctx).sample
        a = pipe.alphas_cumprod[t].view(-1, 1, 1, 1)
        assert (pipe.eps(x, t, ctx) - (a.sqrt() * v + (1 - a).sqrt() * x)).abs().max().item() <= 1e-5
    assert sd.load(d).prediction_type == "epsilon"


def test_refusals(folders, tmp_path):
    """Bad files get one line naming the file and what is wrong."""
    d = folders["sd2"][0]
    f = str(tmp_path / "sd2.safetensors")
    ldm = sd_tiny.save_single(f, d, "sd2")
    with pytest.raises(UserError, match="pass --prediction-type"):
        sd.load(f)
    with pytest.raises(UserError, match="pass --tokenizer"):
        sd.load(f, prediction_type="epsilon").tokenize(["a dog"])
    from safetensors.torch import save_file
    bad = {k: v.contiguous() for k, v in ldm.items() if "middle_block.1.proj_out" not in k}
    bad["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"missing keys: middle_block\.1\.proj_out.*unexpected keys: extra\.weight"):
        sd.load(str(tmp_path / "bad.safetensors"), prediction_type="epsilon")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x single file"):
        sd.load(str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="no unet/ folder"):
        sd.load(str(tmp_path))


def test_openai_bpe_file(folders, tmp_path):
    """OpenAI's bpe_simple_vocab_16e6.txt.gz layout (header line, merges; the vocabulary built from them) gives the
    same ids as the vocab.json + merges.txt pair."""
    import gzip
    d = os.path.join(folders["sd1"][0], "tokenizer")
    with open(os.path.join(d, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().split("\n")[1:]
    gz = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + merges))
    assert torch.equal(sd.read_tokenizer(gz)(HARD), sd.read_tokenizer(d)(HARD))
