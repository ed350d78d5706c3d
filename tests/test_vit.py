"""ViT: golden outputs of transformers' ViTModel in the google/vit (pooler) and facebook/dino (no pooler)
layouts, interpolated position embeddings, the image preprocessor against ViTImageProcessor, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm import hub
from minillm.models.image_processing import ImageProcessor, resample_weights
from minillm.models.vit import ViTConfig, ViTModel

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
ATOL = 1e-4  # fp32 bar for hidden states against transformers


def golden(name):
    return load_file(str(GOLDEN / f"encoders_{name}.safetensors"))


@pytest.mark.parametrize("name,pooler", [("tiny-vit", True), ("tiny-dino", False)])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_matches_transformers_golden(name, pooler, use_sdpa):
    g = golden(name)
    m = ViTModel.from_pretrained(ROOT / "weights" / name, use_sdpa=use_sdpa).eval()
    assert (m.pooler is not None) == pooler and m.config.hidden_size == 32
    with torch.no_grad():
        h = m(g["pixel_values"])
        assert h.shape == (2, 1 + 16, 32)  # CLS + (32/8)^2 patches
        torch.testing.assert_close(h, g["last_hidden_state"], atol=ATOL, rtol=0)
        if pooler:
            out = m(g["pixel_values"], return_pooled=True)
            torch.testing.assert_close(out.pooler_output, g["pooler_output"], atol=ATOL, rtol=0)
        else:
            with pytest.raises(ValueError, match="no pooler"):
                m(g["pixel_values"], return_pooled=True)
        # another image size: bicubically interpolated position embeddings (transformers' interpolate_pos_encoding)
        big = m(g["pixel_values_48x40"], interpolate_pos_encoding=True)
        assert big.shape == (2, 1 + 6 * 5, 32)
        torch.testing.assert_close(big, g["last_hidden_state_48x40"], atol=ATOL, rtol=0)


def test_outputs_independent_of_batch_order():
    g = golden("tiny-vit")
    m = ViTModel.from_pretrained(ROOT / "weights" / "tiny-vit").eval()
    x = torch.cat([g["pixel_values"], g["pixel_values"].flip(-1)])
    perm = torch.tensor([3, 1, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(m(x)[perm], m(x[perm]), atol=1e-6, rtol=0)


def test_bad_images_are_clear_errors():
    m = ViTModel.from_pretrained(ROOT / "weights" / "tiny-vit")
    with pytest.raises(ValueError, match="image size 48x48 does not match the model's 32x32"):
        m(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="4 channels, the model expects 3"):
        m(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        m(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="float tensor"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        m(torch.zeros(1, 3, 4, 32), interpolate_pos_encoding=True)
    with pytest.raises(hub.CheckpointError, match="model_type 'bert'.*not 'vit'"):
        ViTModel.from_pretrained(ROOT / "weights" / "tiny-bert")


def test_classification_layout_loads(tmp_path):
    src = ROOT / "weights" / "tiny-vit"
    base = load_file(str(src / "model.safetensors"))
    state = {"vit." + k: v for k, v in base.items() if not k.startswith("pooler.")}
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(10, 32), torch.zeros(10)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    m = ViTModel.from_pretrained(tmp_path)
    assert m.pooler is None  # ViTForImageClassification has none
    assert torch.equal(m.embeddings.cls_token, base["embeddings.cls_token"])


def test_save_pretrained_round_trip(tmp_path):
    m = ViTModel.from_pretrained(ROOT / "weights" / "tiny-dino")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(load_file(str(ROOT / "weights" / "tiny-dino" / "model.safetensors")))
    m2 = ViTModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())


# ---- preprocessing ----

@pytest.mark.parametrize("name", ["tiny-vit", "tiny-dino"])
@pytest.mark.parametrize("size", [None, 224])
def test_preprocessing_matches_vit_image_processor(name, size):
    """Pillow's resampling written out: bilinear (tiny-vit) and bicubic (tiny-dino), downscale and upscale."""
    g = golden("preprocess")
    proc = ImageProcessor.from_pretrained(ROOT / "weights" / name)
    key = f"pixel_values_{name}"
    if size:
        proc.size = {"height": size, "width": size}
        key += f"_{size}"
    ours = proc(g["image"].numpy())["pixel_values"]
    assert ours.shape == g[key].shape
    diff = (ours - g[key]).abs().max().item()
    assert diff <= 1e-5, f"max per-pixel difference {diff} (bar 1e-5; the issue's bar is 1e-2)"


def test_preprocessing_inputs_and_errors():
    g = golden("preprocess")
    proc = ImageProcessor.from_pretrained(ROOT / "weights" / "tiny-vit")
    img = g["image"]  # (45, 61, 3) uint8
    a = proc(img)["pixel_values"]
    torch.testing.assert_close(proc([img.numpy(), img])["pixel_values"], torch.cat([a, a]), atol=0, rtol=0)
    grey = proc(img[..., 0].numpy())["pixel_values"]
    assert grey.shape == (1, 3, 32, 32) and torch.equal(grey[0, 0], grey[0, 2])
    with pytest.raises(ValueError, match="image has 4 channels"):
        proc(np.zeros((10, 10, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="HWC or CHW"):
        proc(np.zeros((2, 10, 10, 3), dtype=np.uint8))


def test_resample_weights_rows_sum_to_one():
    for n_in, n_out, r in [(61, 32, 2), (45, 224, 3), (7, 5, 3), (100, 13, 2)]:
        W = resample_weights(n_in, n_out, r)
        torch.testing.assert_close(W.sum(1), torch.ones(n_out, dtype=W.dtype))


def test_image_file_through_pillow(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    g = golden("preprocess")
    pil.fromarray(g["image"].numpy()).save(tmp_path / "img.png")
    proc = ImageProcessor.from_pretrained(ROOT / "weights" / "tiny-vit")
    torch.testing.assert_close(proc(tmp_path / "img.png")["pixel_values"], g["pixel_values_tiny-vit"], atol=1e-5, rtol=0)


# ---- live comparisons ----

@pytest.mark.reference
@pytest.mark.parametrize("pooler", [True, False])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_random_configs_match_transformers_live(pooler, use_sdpa, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=40,
                                 image_size=[24, 36], patch_size=6, num_channels=2, qkv_bias=pooler,
                                 layer_norm_eps=1e-6, hidden_act="gelu_new", initializer_range=0.3)
    ref = transformers.ViTModel(cfg, add_pooling_layer=pooler).eval()
    ref.save_pretrained(tmp_path)
    m = ViTModel.from_pretrained(tmp_path, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 2, 24, 36)
    with torch.no_grad():
        r = ref(x)
        o = m(x, return_pooled=pooler)
        torch.testing.assert_close(o.last_hidden_state if pooler else o, r.last_hidden_state, atol=ATOL, rtol=0)
        if pooler:
            torch.testing.assert_close(o.pooler_output, r.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("hw", [(64, 64), (40, 56), (16, 16), (32, 32)])
def test_interpolation_matches_transformers_live(hw):
    transformers = pytest.importorskip("transformers")
    ref = transformers.ViTModel.from_pretrained(str(ROOT / "weights" / "tiny-vit")).eval()
    m = ViTModel.from_pretrained(ROOT / "weights" / "tiny-vit").eval()
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.no_grad():
        torch.testing.assert_close(m(x, interpolate_pos_encoding=True),
                                   ref(x, interpolate_pos_encoding=True).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.reference
def test_preprocessing_random_images_live():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    rs = np.random.RandomState(3)
    worst = 0.0
    for i in range(12):
        img = (rs.rand(rs.randint(8, 90), rs.randint(8, 90), 3) * 255).astype(np.uint8)
        H, W, resample = rs.randint(8, 90), rs.randint(8, 90), [2, 3][i % 2]
        ref = transformers.ViTImageProcessorPil(size={"height": H, "width": W}, resample=resample,
                                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        ours = ImageProcessor(size={"height": H, "width": W}, resample=resample, image_mean=[0.485, 0.456, 0.406],
                              image_std=[0.229, 0.224, 0.225])
        worst = max(worst, (ours(img)["pixel_values"] - ref(img, return_tensors="pt")["pixel_values"]).abs().max().item())
    assert worst <= 1e-5, f"max per-pixel difference {worst} (bar 1e-5)"


@pytest.mark.slow  # writes a 330 MB checkpoint; the hub names are covered by the tiny golden checkpoints
@pytest.mark.reference
@pytest.mark.parametrize("pooler", [True, False])  # google/vit-base-patch16-224-in21k / facebook/dino-vitb16
def test_real_config_names_and_shapes_equal_hub_layout(pooler, tmp_path):
    """ViT-B/16's config: the names and shapes transformers writes to disk (the hub layout) are ours."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=pooler).save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"):
        ours = ViTModel(ViTConfig(), add_pooling_layer=pooler)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == saved


def test_float_chw_input_is_taken_as_0_to_1():
    g = golden("preprocess")
    proc = ImageProcessor.from_pretrained(ROOT / "weights" / "tiny-vit")
    proc.size = {"height": 45, "width": 61}  # no resize: only the scale question
    a = proc(g["image"])["pixel_values"]
    b = proc(g["image"].permute(2, 0, 1).float() / 255)["pixel_values"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
