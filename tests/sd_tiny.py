"""Tiny random Stable Diffusion models in the real file layouts, for the tests (diffusers / transformers as the
reference: a diffusers pipeline folder, and the LDM single file made from it with the public key names)."""
import collections
import json
import os

import torch

import sd

CORPUS = ("a photo of a dog. a photo of a cat. a photo of the small red car, a blurry photo of a bird on a tree. "
          "there is a ship at sea; an airplane in the sky! the frog, the horse and the deer. it's a truck, isn't it? "
          "photos of dogs and cats and cars and birds, numbers 123 4567 and symbols ... !!! ??? --- 'quoted' words")


def bpe_files(folder, n_merges=200):
    """A small CLIP-style vocabulary (every byte symbol, with and without </w>, then the merges, then the two special
    tokens, as CLIP's vocab.json is built) trained on CORPUS; writes vocab.json and merges.txt into folder."""
    b2u = sd.bytes_to_unicode()
    words = collections.Counter()
    for w in sd.pre_tokenize(CORPUS.lower()):
        chars = [b2u[b] for b in w.encode("utf-8")]
        words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    base = list(b2u.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(tokens)


# version -> (UNet kwargs of diffusers, text encoder kwargs of transformers); SD 1.x: 8 heads, conv proj, quick-GELU;
# SD 2.x: head dim 64, linear proj, GELU. Both at the smallest widths GroupNorm(32) and the head rules allow.
CONFIGS = {
    "sd1": (dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="quick_gelu")),
    "sd2": (dict(block_out_channels=(64, 128), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128, attention_head_dim=[1, 2],
                 use_linear_projection=True),
            dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")),
}


def randomize(module, seed):
    """Random weights that make every path matter (zero-initialised output convs would hide a wrong layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05))
    return module


def diffusers_models(version, vocab_size, seed=0):
    """(diffusers UNet2DConditionModel, transformers CLIPTextModel, diffusers AutoencoderKL) with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    ukw, tkw = CONFIGS[version]
    unet = randomize(UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32, **ukw), seed).eval()
    text = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, **tkw)), seed + 1).eval()
    v = randomize(AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), seed + 2)
    return unet, text, v.eval()


def save_folder(path, version, prediction_type="epsilon", seed=0):
    """A diffusers pipeline folder: unet/, text_encoder/, tokenizer/, vae/, scheduler/. Returns the three models."""
    n = bpe_files(os.path.join(path, "tokenizer"))
    unet, text, v = diffusers_models(version, n, seed)
    unet.save_pretrained(os.path.join(path, "unet"))
    text.save_pretrained(os.path.join(path, "text_encoder"))
    v.save_pretrained(os.path.join(path, "vae"))
    with open(os.path.join(path, "tokenizer", "special_tokens_map.json"), "w") as f:
        json.dump({"pad_token": "!" if version == "sd2" else "<|endoftext|>"}, f)  # as the hub's SD 2 / SD 1 folders
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "num_train_timesteps": 1000, "prediction_type": prediction_type}, f)
    return unet, text, v


def ldm_state_dict(folder, version, seed=0):
    """The LDM single-file state dict of a save_folder pipeline, with the public key names: the UNet under
    model.diffusion_model.* (our loader's LDM names), the text encoder under cond_stage_model.transformer.* (SD 1.x)
    or cond_stage_model.model.* in OpenCLIP's layout with fused in_proj and one more (unused, final) layer (SD 2.x),
    the VAE under first_stage_model.*, and LDM's schedule buffers."""
    pipe = sd.load(folder)
    out = {"model.diffusion_model." + k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text = pipe.text_encoder.state_dict()
    if version == "sd1":
        out |= {"cond_stage_model.transformer." + k: v.clone() for k, v in text.items()}
    else:
        oc = {"token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
              "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
              "ln_final.weight": text["text_model.final_layer_norm.weight"], "ln_final.bias": text["text_model.final_layer_norm.bias"]}
        L = pipe.text_encoder.config["layers"]
        g = torch.Generator().manual_seed(seed + 7)
        for i in range(L + 1):  # layer L: OpenCLIP's last layer, which SD 2.x skips (random here: must not matter)
            src = i if i < L else 0
            p, q = f"text_model.encoder.layers.{src}.", f"transformer.resblocks.{i}."

            def t(k):
                v = text[p + k]
                return v if i < L else torch.randn(v.shape, generator=g)
            oc[q + "attn.in_proj_weight"] = torch.cat([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")])
            oc[q + "attn.in_proj_bias"] = torch.cat([t("self_attn.q_proj.bias"), t("self_attn.k_proj.bias"), t("self_attn.v_proj.bias")])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                oc[f"{q}{a}.weight"], oc[f"{q}{a}.bias"] = t(b + ".weight"), t(b + ".bias")
        width = pipe.text_encoder.config["width"]
        oc["text_projection"] = torch.randn(width, width, generator=g)
        oc["logit_scale"] = torch.tensor(4.6052)
        out |= {"cond_stage_model.model." + k: v.clone() for k, v in oc.items()}
    out |= {"first_stage_model." + k: v.clone() for k, v in pipe.vae.state_dict().items()}
    out["alphas_cumprod"] = pipe.alphas_cumprod.clone()
    out["betas"] = torch.zeros(1000)
    return out


def save_single(path, folder, version, seed=0):
    """Write ldm_state_dict as .safetensors (or a weights-only .ckpt with a "state_dict" wrapper, as LDM saves)."""
    tensors = ldm_state_dict(folder, version, seed)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    return tensors

