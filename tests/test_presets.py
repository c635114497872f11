"""UNet presets: the paper's networks field by field, small ones that run, overrides, configs and folders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from hf_ddpm.pipeline import PickleWeightsError
from hf_ddpm.presets import build_unet, get_preset, learned_variance_unet, list_presets, unet_config

# google/ddpm-cifar10-32's config.json, written out from DEVELOPERS.md's description of the paper's model.
DDPM_CIFAR10 = {
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "dropout": 0.1,
}


def test_ddpm_cifar10_preset_is_the_papers_network():
    preset = get_preset("ddpm-cifar10-32")
    for key, value in DDPM_CIFAR10.items():
        assert preset.unet[key] == value, key
    unet = build_unet("ddpm-cifar10-32")
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    # attention sits at 16x16: the second down block and the third up block
    assert [type(b).__name__ for b in unet.down_blocks][1] == "AttnDownBlock2D"
    assert [type(b).__name__ for b in unet.up_blocks][2] == "AttnUpBlock2D"
    d = preset.train_defaults
    paper = {"learning_rate": 2e-4, "lr_warmup_steps": 5000, "max_grad_norm": 1.0, "ema_max_decay": 0.9999}
    assert {k: d[k] for k in paper} == paper and d["train_batch_size"] == 128
    assert d["random_flip"] and (d["beta_start"], d["beta_end"]) == (1e-4, 0.02)


def test_ddpm_256_preset_parameter_count():
    assert get_preset("ddpm-256").num_parameters() == 113_673_219
    assert get_preset("ddpm-256").unet["block_out_channels"] == [128, 128, 256, 256, 512, 512]


@pytest.mark.parametrize("name", ["tiny-8", "digits-16", "small-16-rgb", "small-32-rgb"])
def test_small_presets_run_forward_and_backward(name):
    unet = build_unet(name)
    c, r = unet.config.in_channels, unet.config.sample_size
    assert r <= 32 and c in (1, 3)
    out = unet(torch.randn(2, c, r, r), torch.tensor([1, 999])).sample
    assert out.shape == (2, c, r, r)
    out.mean().backward()
    assert sum(p.numel() for p in unet.parameters()) < 2_000_000


def test_small_presets_cover_grayscale_and_rgb():
    channels = {get_preset(n).unet["in_channels"] for n in list_presets() if n.startswith(("tiny", "small", "digits"))}
    assert channels == {1, 3}


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown UNet preset 'cifar'; valid presets: ddpm-256, ddpm-cifar10-32"):
        build_unet("cifar")


def test_overrides_and_unknown_fields():
    assert build_unet("tiny-8", dropout=0.3, sample_size=16).config.sample_size == 16
    with pytest.raises(ValueError, match=r"unknown UNet2DModel field\(s\) \['dropuot'\]"):
        unet_config("tiny-8", dropuot=0.1)


def test_own_config_json_and_model_folder(tmp_path):
    unet = build_unet("tiny-8")
    unet.save_pretrained(tmp_path / "unet")
    json_path = tmp_path / "my.json"
    json_path.write_text(json.dumps({**get_preset("tiny-8").unet, "block_out_channels": [8, 16]}))
    from_json = build_unet(str(json_path))
    assert list(from_json.config.block_out_channels) == [8, 16]
    from_folder = build_unet(str(tmp_path / "unet"))  # weights come along: fine-tuning starts from them
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), unet.state_dict().values(),
                                                   strict=True))  # fmt: skip
    assert isinstance(build_unet(str(tmp_path)), UNet2DModel)  # a pipeline-style folder with unet/
    assert unet_config(str(tmp_path / "unet" / "config.json"))["sample_size"] == 8


def test_pickle_only_folder_loads_only_with_allow_pickle(tmp_path):
    unet = build_unet("tiny-8")
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)  # google/ddpm-cifar10-32's layout
    assert not list(tmp_path.rglob("*.safetensors"))
    with pytest.raises(PickleWeightsError, match="--allow_pickle"):
        build_unet(str(tmp_path))
    loaded = build_unet(str(tmp_path), allow_pickle=True)
    assert loaded.state_dict().keys() == unet.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())


def test_model_folder_without_weights_is_an_error_not_fresh_weights(tmp_path):
    build_unet("tiny-8").save_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no UNet weights"):
        build_unet(str(tmp_path))
    assert build_unet(str(tmp_path / "config.json")).config.sample_size == 8  # a config.json: fresh weights


def test_learned_variance_unet_keeps_every_weight_and_zeroes_the_variance_channels():
    unet = build_unet("small-16-rgb")
    wide = learned_variance_unet(unet)
    assert wide.config.out_channels == 6 and wide.config.in_channels == 3
    old, new = unet.state_dict(), wide.state_dict()
    assert new.keys() == old.keys()
    for name in old:
        if not name.startswith("conv_out."):
            assert torch.equal(new[name], old[name]), name
    for name in ("conv_out.weight", "conv_out.bias"):
        assert torch.equal(new[name][:3], old[name]) and not new[name][3:].any(), name
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():  # the same mean prediction, and v = 0: the mid-point log variance
        out = wide(x, t).sample
        assert torch.allclose(out[:, :3], unet(x, t).sample, atol=1e-6) and not out[:, 3:].any()
