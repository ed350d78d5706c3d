"""LoRA behaviour tests/test_lora.py leaves open, on tiny modules built here (seeded, fp32, fast): the defaults
of the public functions (r = α = 8, no dropout, no rsLoRA; AdapterConfig's), argument and target validation
before anything changes, merge/unmerge round trips (the `merged` flag: after unmerge the adapter is live
again), QLoRA merges (warned, re-quantized), adapters_disabled, prepare_adapters, merge_and_unload of 4-bit
layers, parameter counts with 4-bit weights, and peft adapter files both ways: configs missing optional keys,
extra / integer / non-finite tensors, peft's `.default.` key names, a second adapter into wrapped layers.
Expected values are written out by hand (x·Wᵀ + b + s·x·Aᵀ·Bᵀ with s = α/r or α/√r)."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minillm.linear import Linear  # the plain linear merging leaves
from minillm.hub import CheckpointError
from minillm.lora import (AdapterConfig, LoRALinear, adapters_disabled, apply_lora, count_parameters,
                          default_lora_targets, load_adapter, lora_layers, merge_and_unload, merge_lora,
                          prepare_adapters, save_adapter, unmerge_lora)
from minillm.nf4 import NF4_CODE, Linear4bit, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

# half the widest gap between adjacent NF4 codes: the worst NF4 rounding error, relative to a block's absmax
HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2


class Tiny(nn.Module):
    lora_targets = ("q", "v")

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5)
        self.v = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.v(self.q(x) + self.k(x))


class Holder(nn.Module):
    """A wrapper (a reward model, a policy) around a backbone that declares lora_targets."""

    def __init__(self):
        super().__init__()
        self.backbone = Tiny()
        self.head = nn.Linear(4, 1)


def by_hand(lin, a, b, s, x):
    """x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    y = x @ lin.weight.T
    if lin.bias is not None:
        y = y + lin.bias
    return y + s * ((x @ a.T) @ b.T)


def fill_b(model, std=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def all_trainable_no_lora(model):
    return all(p.requires_grad for p in model.parameters()) and not lora_layers(model)


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------

def test_lora_linear_defaults_r8_alpha8_no_dropout_no_rslora():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    m = LoRALinear(lin)
    assert (m.r, m.alpha, m.use_rslora, m.scaling) == (8, 8, False, 1.0)
    assert m.lora_A.weight.shape == (8, 6) and m.lora_B.weight.shape == (5, 8)
    assert not m.merged and not m.disabled
    nn.init.normal_(m.lora_B.weight)
    m.train()
    x = torch.randn(3, 6)
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)  # no dropout by default, even in train mode
    torch.testing.assert_close(y1, by_hand(lin, m.lora_A.weight, m.lora_B.weight, 1.0, x), atol=1e-5, rtol=1e-5)
    assert "r=8, alpha=8, scaling=1, merged=False" in repr(m)


def test_apply_lora_defaults_and_recorded_config(tmp_path):
    model = Tiny()
    assert apply_lora(model, ["q"]) is model
    assert isinstance(model.q, LoRALinear) and not isinstance(model.k, LoRALinear)
    assert (model.q.r, model.q.alpha, model.q.use_rslora, model.q.scaling) == (8, 8, False, 1.0)
    assert isinstance(model.q.dropout, nn.Identity)
    assert model.lora_config == {"target_modules": ["q"], "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
                                 "use_rslora": False}
    # a regex target is recorded (and saved) as the regex, not as the names it matched
    model = apply_lora(Tiny(), r"q|k", r=2, alpha=3, dropout=0.1, use_rslora=True)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == \
        ("q|k", 2, 3, 0.1, True)


def test_rank_one_works_rank_zero_is_refused():
    lin = nn.Linear(4, 3)
    m = LoRALinear(lin, r=1, alpha=2)
    assert m.lora_A.weight.shape == (1, 4) and m.scaling == 2.0
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(lin, r=0)


def test_lora_dtype_follows_the_base_weight():
    m = LoRALinear(nn.Linear(4, 3).double(), r=2)
    assert m.lora_A.weight.dtype == torch.float64 and m.lora_B.weight.dtype == torch.float64
    q = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 8)), r=2)  # packed uint8 codes: LoRA in float32
    assert q.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=-1), dict(r=True), dict(r=2.0), dict(r="4"),
                                dict(alpha=0), dict(alpha=-1.0), dict(alpha=True), dict(alpha=float("nan")),
                                dict(alpha=float("inf")), dict(alpha="8"),
                                dict(dropout=-0.1), dict(dropout=1.0), dict(dropout=1.5), dict(dropout=True),
                                dict(dropout="0.1"), dict(use_rslora=1), dict(use_rslora="yes")])
def test_apply_lora_refuses_bad_arguments_before_changing_anything(kw):
    model = Tiny()
    with pytest.raises(ValueError):
        apply_lora(model, ["q"], **kw)
    assert all_trainable_no_lora(model)


@pytest.mark.parametrize("kw,scaling", [(dict(r=1, alpha=0.5), 0.5), (dict(r=2, alpha=1), 0.5),
                                        (dict(r=4, alpha=2, dropout=0.0), 0.5), (dict(r=4, alpha=2, dropout=0.99), 0.5),
                                        (dict(r=4, alpha=2, use_rslora=True), 1.0)])
def test_apply_lora_accepts_edge_values(kw, scaling):
    model = apply_lora(Tiny(), ["q"], **kw)
    assert model.q.scaling == scaling


@pytest.mark.parametrize("targets,msg", [([], "empty"), ("(", "regular expression"), (5, "regex or a list"),
                                         (["q", 3], "regex or a list"), (["nope"], "matched no module"),
                                         (r"q\.nope", "matched no module")])
def test_apply_lora_refuses_bad_targets_before_changing_anything(targets, msg):
    model = Tiny()
    with pytest.raises(ValueError, match=msg):
        apply_lora(model, targets)
    assert all_trainable_no_lora(model)


def test_second_apply_adds_adapters_but_never_nests():
    model = apply_lora(Tiny(), ["q"], r=2)
    apply_lora(model, ["k"], r=2)
    assert [type(model.q), type(model.k), type(model.v)] == [LoRALinear, LoRALinear, nn.Linear]
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(model, ["q"])
    # the frozen layer inside an adapter is no target; the error names the linears a user can target
    with pytest.raises(ValueError, match=r"matched no module of Tiny; its linear layers are named: k, q, v$"):
        apply_lora(model, r".*\.base_layer")
    assert isinstance(model.q.base_layer, nn.Linear)


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------

def test_merge_unmerge_round_trip_keeps_the_adapter_live():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(LoRALinear(lin, r=2, alpha=6))
    m = model[0]
    fill_b(model)
    a, b = m.lora_A.weight.detach(), m.lora_B.weight.detach()
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = x @ w0.T + lin.bias + 3.0 * (x @ a.T) @ b.T
        assert merge_lora(model) is model and m.merged
        torch.testing.assert_close(lin.weight, w0 + 3.0 * b @ a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        merge_lora(model)  # a second merge adds nothing
        torch.testing.assert_close(lin.weight, w0 + 3.0 * b @ a, atol=1e-6, rtol=1e-6)
        assert unmerge_lora(model) is model and not m.merged
        torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)  # the adapter counts again
        unmerge_lora(model)  # a second unmerge subtracts nothing
        torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=1e-6)
    assert "merged=False" in repr(m)


def test_qlora_merge_warns_requantizes_and_unmerges():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 4), blocksize=64)
    m = LoRALinear(base, r=2, alpha=4)
    fill_b(nn.Sequential(m))
    w0 = base.dequantize_weight(torch.float32).clone()
    delta = 2.0 * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y0 = x @ w0.T + base.bias + 2.0 * (x @ m.lora_A.weight.T) @ m.lora_B.weight.T
        torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
        with pytest.warns(UserWarning, match="re-quantizes"):
            m.merge()
        target = w0 + delta  # one block per row (64 inputs): NF4 error ≤ half a gap × the row's absmax
        err = (base.dequantize_weight(torch.float32) - target).abs()
        assert bool((err <= HALF_GAP * target.abs().amax(1, keepdim=True) * (1 + 1e-5)).all())
        assert m.merged
        with pytest.warns(UserWarning, match="re-quantizes"):
            m.unmerge()
        assert not m.merged
        err = (base.dequantize_weight(torch.float32) - w0).abs()
        assert float(err.max()) < 0.5 * float(delta.abs().max())  # near W again, far from W ± Δ
        # bf16 input into a QLoRA layer whose adapter is float32: computed, returned in bf16
        yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# adapters_disabled, lora_layers
# ---------------------------------------------------------------------------------------------

def test_adapters_disabled_gives_the_base_model_and_restores():
    model = apply_lora(Tiny(), ["q", "v"], r=2, alpha=4)
    fill_b(model)
    plain = Tiny()
    x = torch.randn(3, 6)
    with torch.no_grad():
        y_lora = model(x)
        y_base = plain(x)
        assert not torch.allclose(y_lora, y_base)
        with adapters_disabled(model) as mm:
            assert mm is model
            torch.testing.assert_close(model(x), y_base, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), y_lora, atol=0, rtol=0)
        model.q.disabled = True  # a layer switched off by the caller stays off afterwards
        with adapters_disabled(model):
            pass
        assert model.q.disabled and not model.v.disabled
        model.q.disabled = False
        merge_lora(model)
        with pytest.raises(ValueError, match="merged"):
            with adapters_disabled(model):
                pass
    assert lora_layers(model) == [model.q, model.v]
    assert lora_layers(Tiny()) == []


# ---------------------------------------------------------------------------------------------
# AdapterConfig, default_lora_targets, prepare_adapters
# ---------------------------------------------------------------------------------------------

def test_adapter_config_defaults():
    c = AdapterConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, c.quantize) == (0, 16.0, 0.0, None, None)


@pytest.mark.parametrize("kw", [dict(lora_r=-1), dict(lora_r=True), dict(lora_r=1.5), dict(lora_alpha=0),
                                dict(lora_alpha=-2), dict(lora_alpha=float("nan")), dict(lora_alpha="x"),
                                dict(lora_dropout=-0.1), dict(lora_dropout=1.0), dict(lora_dropout=1.2),
                                dict(quantize="int8"), dict(quantize="nf4")])
def test_adapter_config_refuses(kw):
    with pytest.raises(ValueError):
        AdapterConfig(**kw)


def test_adapter_config_accepts_edges():
    AdapterConfig(lora_r=0, lora_alpha=0.5, lora_dropout=0.0)
    AdapterConfig(lora_r=4, lora_dropout=0.5, quantize="nf4")


def test_default_lora_targets_found_in_submodules():
    assert default_lora_targets(Tiny()) == ("q", "v")
    assert default_lora_targets(Holder()) == ("q", "v")
    with pytest.raises(ValueError, match="declares no lora_targets"):
        default_lora_targets(nn.Sequential(nn.Linear(2, 2)))


def test_prepare_adapters_full_finetuning_leaves_the_model():
    model = Tiny()
    assert prepare_adapters(model, AdapterConfig()) is model
    assert all_trainable_no_lora(model)


def test_prepare_adapters_lora_default_and_given_targets():
    model = Holder()
    extra = model.head.weight
    assert prepare_adapters(model, AdapterConfig(lora_r=2, lora_dropout=0.25), also_train=[extra]) is model
    bb = model.backbone
    assert [type(bb.q), type(bb.k), type(bb.v)] == [LoRALinear, nn.Linear, LoRALinear]
    assert bb.q.scaling == 16.0 / 2 and bb.q.dropout.p == 0.25
    assert isinstance(bb.q.base_layer, nn.Linear)  # no quantization asked
    assert extra.requires_grad and not model.head.bias.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"head.weight", "backbone.q.lora_A.weight", "backbone.q.lora_B.weight",
         "backbone.v.lora_A.weight", "backbone.v.lora_B.weight"}
    model = prepare_adapters(Tiny(), AdapterConfig(lora_r=2, lora_alpha=3, lora_targets=["k"]))
    assert [type(model.q), type(model.k), type(model.v)] == [nn.Linear, LoRALinear, nn.Linear]
    assert model.k.scaling == 1.5


def test_prepare_adapters_qlora():
    model = prepare_adapters(Tiny(), AdapterConfig(lora_r=2, quantize="nf4"))
    assert isinstance(model.q.base_layer, Linear4bit) and isinstance(model.k, Linear4bit)
    assert model.q.base_layer.compute_dtype is None  # default: compute in the input's dtype
    model = prepare_adapters(Tiny(), AdapterConfig(lora_r=2, quantize="nf4"), compute_dtype=torch.bfloat16)
    assert model.q.base_layer.compute_dtype == torch.bfloat16
    model = Tiny()
    with pytest.raises(ValueError, match="matched no module"):
        prepare_adapters(model, AdapterConfig(lora_r=2, quantize="nf4", lora_targets=["nope"]))
    assert all(type(m) is nn.Linear for m in (model.q, model.k, model.v))  # not quantized either
    assert all_trainable_no_lora(model)


# ---------------------------------------------------------------------------------------------
# merge_and_unload with 4-bit layers, count_parameters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_qlora_model(dtype):
    model = Tiny().to(dtype)
    quantize_model(model, skip=[])
    deq = {n: getattr(model, n).dequantize_weight(torch.float32).clone() for n in ("q", "k", "v")}
    bias = {n: getattr(model, n).bias for n in ("q", "k")}
    apply_lora(model, ["q"], r=2, alpha=4)
    fill_b(model)
    delta = 2.0 * model.q.lora_B.weight.detach().float() @ model.q.lora_A.weight.detach().float()
    assert merge_and_unload(model) is model
    assert not hasattr(model, "lora_config")
    for n in ("q", "k", "v"):
        lin = getattr(model, n)
        assert type(lin) is Linear and lin.weight.dtype == dtype and not lin.weight.requires_grad
        want = (deq[n] + delta) if n == "q" else deq[n]
        assert torch.equal(lin.weight, want.to(dtype)), n
    for n in ("q", "k"):
        assert torch.equal(getattr(model, n).bias, bias[n]) and not getattr(model, n).bias.requires_grad
    assert model.v.bias is None


def test_count_parameters_counts_4bit_weights():
    model = quantize_model(Tiny(), skip=[])
    apply_lora(model, ["q"], r=2)
    lora = 2 * 6 + 5 * 2
    assert count_parameters(model) == (lora, 6 * 5 + 6 * 5 + 5 * 4 + 5 + 5 + lora)


# ---------------------------------------------------------------------------------------------
# adapter files
# ---------------------------------------------------------------------------------------------

class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_save_adapter_of_a_hand_made_layer_and_load_it_back(tmp_path):
    model = Head()
    model.fc = LoRALinear(model.fc, r=2, alpha=4, use_rslora=True)  # no apply_lora: no lora_config
    fill_b(model)
    assert save_adapter(model, tmp_path) == tmp_path
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    want = {"target_modules": ["fc"], "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "use_rslora": True,
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "fan_in_fan_out": False,
            "bias": "none", "lora_bias": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}
    assert {k: cfg[k] for k in want} == want
    x = torch.randn(2, 4)
    again = load_adapter(Head(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert again.fc.scaling == 4 / math.sqrt(2)


def test_save_adapter_task_type_and_base_path(tmp_path):
    model = apply_lora(Head(), ["fc"], r=2)
    model.lm_head = nn.Linear(3, 3)
    model.source_dir = tmp_path / "base"
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    model.is_encoder_decoder = True
    save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(Head(), tmp_path / "c")


def write_adapter(d, cfg, tensors):
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def head_tensors(seed=3, r=2):
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.fc.lora_A.weight": torch.randn(r, 4, generator=g),
            "base_model.model.fc.lora_B.weight": torch.randn(3, r, generator=g)}


@pytest.mark.parametrize("extra", [{}, {"lora_dropout": None, "use_rslora": None}])
def test_load_adapter_config_without_optional_keys(tmp_path, extra):
    t = head_tensors()
    d = write_adapter(tmp_path, {"r": 2, "lora_alpha": 6, "target_modules": ["fc"], **extra}, t)
    model = Head()
    lin = model.fc
    assert load_adapter(model, d) is model
    assert isinstance(model.fc.dropout, nn.Identity) and not model.fc.use_rslora and model.fc.scaling == 3.0
    x = torch.randn(2, 4)
    a, b = t["base_model.model.fc.lora_A.weight"], t["base_model.model.fc.lora_B.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), by_hand(lin, a, b, 3.0, x), atol=1e-5, rtol=1e-5)


def test_load_adapter_reads_peft_default_key_names(tmp_path):
    t = {k.replace(".weight", ".default.weight"): v for k, v in head_tensors().items()}
    model = load_adapter(Head(), write_adapter(tmp_path, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"]}, t))
    assert torch.equal(model.fc.lora_A.weight, head_tensors()["base_model.model.fc.lora_A.weight"])


@pytest.mark.parametrize("change,msg", [
    ({"extra": torch.zeros(2)}, "unexpected tensor 'extra'"),
    ({"base_model.model.fc.lora_A.weight": torch.zeros(2, 4, dtype=torch.int32)}, "expected a float tensor"),
    ({"base_model.model.fc.lora_B.weight": torch.full((3, 2), float("nan"))}, "non-finite"),
])
def test_load_adapter_refuses_bad_tensors_untouched(tmp_path, change, msg):
    d = write_adapter(tmp_path, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"]}, {**head_tensors(), **change})
    model = Head()
    with pytest.raises(CheckpointError, match=msg):
        load_adapter(model, d)
    assert all_trainable_no_lora(model)


def test_load_adapter_allow_nonfinite(tmp_path):
    t = {**head_tensors(), "base_model.model.fc.lora_B.weight": torch.full((3, 2), float("inf"))}
    model = load_adapter(Head(), write_adapter(tmp_path, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"]}, t),
                         allow_nonfinite=True)
    assert torch.isinf(model.fc.lora_B.weight).all()


@pytest.mark.parametrize("change", [{"r": 0}, {"r": "2"}, {"lora_alpha": "8"}, {"lora_alpha": 0},
                                    {"lora_dropout": 1.0}, {"use_rslora": "no"}, {"target_modules": 5},
                                    {"target_modules": ["fc", ""]}, {"target_modules": ["fc", 3]},
                                    {"target_modules": "("}, {"use_qalora": True}, {"target_modules": []}])
def test_load_adapter_refuses_bad_configs_with_a_checkpoint_error(tmp_path, change):
    d = write_adapter(tmp_path, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"], **change}, head_tensors())
    model = Head()
    with pytest.raises(CheckpointError):
        load_adapter(model, d)
    assert all_trainable_no_lora(model)


def test_load_adapter_accepts_peft_defaults_for_unsupported_features(tmp_path):
    cfg = {"r": 2, "lora_alpha": 2, "target_modules": ["fc"], "use_qalora": False, "use_dora": False,
           "lora_bias": False, "bias": "none", "modules_to_save": None, "layer_replication": None}
    assert isinstance(load_adapter(Head(), write_adapter(tmp_path, cfg, head_tensors())).fc, LoRALinear)


@pytest.mark.parametrize("n_extra,shown_more", [(20, None), (21, 1), (25, 5)])
def test_load_adapter_error_lists_at_most_20_problems(tmp_path, n_extra, shown_more):
    extras = {f"x{i:02d}": torch.zeros(1) for i in range(n_extra)}
    d = write_adapter(tmp_path, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"]}, {**head_tensors(), **extras})
    with pytest.raises(CheckpointError) as e:
        load_adapter(Head(), d)
    text = str(e.value)
    assert text.count("unexpected tensor") == 20
    assert ("... and" in text) == (shown_more is not None)
    if shown_more:
        assert text.rstrip().endswith(f"... and {shown_more} more")


def test_load_second_adapter_into_wrapped_layers(tmp_path):
    model = apply_lora(Head(), ["fc"], r=2, alpha=2)
    lin = model.fc.base_layer
    t = head_tensors(seed=5)
    for rslora, scaling in ((True, 8 / math.sqrt(2)), (False, 4.0)):
        d = write_adapter(tmp_path / str(rslora), {"r": 2, "lora_alpha": 8, "target_modules": ["fc"],
                                                   "use_rslora": rslora}, t)
        assert load_adapter(model, d) is model
        assert model.fc.scaling == scaling and model.fc.use_rslora == rslora and model.fc.alpha == 8
        x = torch.randn(2, 4)
        a, b = t["base_model.model.fc.lora_A.weight"], t["base_model.model.fc.lora_B.weight"]
        with torch.no_grad():
            torch.testing.assert_close(model(x), by_hand(lin, a, b, scaling, x), atol=1e-5, rtol=1e-5)
        # saved again, it is the adapter just loaded (alpha and rsLoRA included), not the first one
        save_adapter(model, tmp_path / f"out{rslora}")
        cfg = json.loads((tmp_path / f"out{rslora}" / "adapter_config.json").read_text())
        assert (cfg["lora_alpha"], cfg["use_rslora"]) == (8, rslora)
        assert torch.equal(load_file(tmp_path / f"out{rslora}" / "adapter_model.safetensors")
                           ["base_model.model.fc.lora_B.weight"], b)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, d)


def test_load_adapter_into_hand_made_wrappers(tmp_path):
    model = Head()
    model.fc = LoRALinear(model.fc, r=2, alpha=1)  # wrapped by hand: no lora_config
    lin = model.fc.base_layer
    t = head_tensors(seed=7)
    d = write_adapter(tmp_path, {"r": 2, "lora_alpha": 6, "target_modules": ["fc"]}, t)
    assert load_adapter(model, d) is model and model.fc.scaling == 3.0
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(lin, t["base_model.model.fc.lora_A.weight"],
                                                     t["base_model.model.fc.lora_B.weight"], 3.0, x),
                                   atol=1e-5, rtol=1e-5)
