"""The VQA model: fusion shapes, freeze modes, gradients, labels, greedy answers, input checks,
and the cross-attention GPT-2 it decodes with, saved by minillm and read by transformers."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.losses import lm_loss, mean_pool as masked_mean
from minillm.data.vqa import VQACollator, format_answer, make_labels, to_pixel_values
from minillm.models.vqa import FREEZE_MODES, MultiModalModel, answer_texts, format_prediction, greedy_answer
from vqa_standins import StandInConfig, StandInImageEncoder, StandInTextEncoder

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def tiny_model(fusion="mean", seed=0, text_h=32, image_h=24, C=16):
    torch.manual_seed(seed)
    text = StandInTextEncoder(StandInConfig(hidden_size=text_h, vocab_size=40, max_position_embeddings=12))
    image = StandInImageEncoder(StandInConfig(hidden_size=image_h, num_attention_heads=4, image_size=16, patch_size=4))
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=C, n_layer=2, n_head=2, n_positions=16,
                                     add_cross_attention=True, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return MultiModalModel(text, image, dec, fusion=fusion).eval()


def batch(B=3, T=6, Ta=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0  # right-padded question
    ids[0, 4:] = 0
    pix = torch.randn(B, 3, 16, 16, generator=g)
    dec = torch.randint(0, 30, (B, Ta), generator=g)
    return ids, mask, pix, dec


# ---- shapes ----
@pytest.mark.parametrize("fusion", ["mean", "tokens"])
def test_shapes(fusion):
    m = tiny_model(fusion)
    ids, mask, pix, dec = batch()
    enc, enc_mask = m.encode(ids, mask, pix)
    if fusion == "mean":
        assert enc.shape == (3, 1, 16) and enc_mask is None  # one fused vector, as the book does
    else:
        assert enc.shape == (3, 6 + 17, 16)  # question tokens + [CLS] + 16 patches
        assert enc_mask.shape == (3, 23) and enc_mask[0, :6].tolist() == [1, 1, 1, 1, 0, 0]
        assert bool((enc_mask[:, 6:] == 1).all())
    assert m(ids, mask, pix, dec).shape == (3, 4, 30)


def test_mean_fusion_is_the_books_formula():
    """fused = (W_t mean(text) + b_t + W_v mean(image) + b_v) / 2, the mean over the question's real tokens."""
    m = tiny_model("mean")
    ids, mask, pix, _ = batch()
    with torch.no_grad():
        enc, _ = m.encode(ids, mask, pix)
        text = m.text_encoder(ids, mask)
        image = m.image_encoder(pix)
        t0 = text[0, :4].sum(0) / 4  # row 0 has 4 real tokens
        rows = [t0] + [text[i].mean(0) for i in (1, 2)]
        want = torch.stack([(m.text_projection(r) + m.image_projection(image[i].mean(0))) / 2
                            for i, r in enumerate(rows)])
    torch.testing.assert_close(enc[:, 0], want, rtol=0, atol=1e-6)  # fp32, same ops in another order


@pytest.mark.parametrize("fusion", ["mean", "tokens"])
def test_question_padding_does_not_change_the_answer_logits(fusion):
    m = tiny_model(fusion)
    ids, mask, pix, dec = batch()
    with torch.no_grad():
        full = m(ids, mask, pix, dec)
        alone = m(ids[:1, :4], mask[:1, :4], pix[:1], dec[:1])
    torch.testing.assert_close(full[:1], alone, rtol=0, atol=1e-5)  # fp32; padding must be invisible


def test_masked_mean():
    h = torch.arange(12.0).view(1, 4, 3)
    assert masked_mean(h, torch.tensor([[1, 1, 0, 0]])).tolist() == [[1.5, 2.5, 3.5]]
    assert masked_mean(h, None).tolist() == [[4.5, 5.5, 6.5]]


# ---- freezing ----
@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_freeze_modes_train_exactly_the_intended_parameters(mode):
    m = tiny_model()
    names = [n for n, _ in m.named_parameters()]
    enc = {n for n in names if n.startswith(("text_encoder.", "image_encoder."))}
    proj = {n for n in names if n.startswith(("text_projection.", "image_projection."))}
    cross = {n for n in names if n.startswith("decoder.") and ".crossattention." in n}
    rest = {n for n in names if n.startswith("decoder.")} - cross
    assert enc and proj and cross and rest and enc | proj | cross | rest == set(names)
    assert any("ln_cross_attn" in n for n in rest)  # the book's rule: its name lacks 'crossattention'
    want = {"nothing": enc | proj | cross | rest, "encoders": proj | cross | rest,
            "decoder": enc | proj | cross, "all": proj | cross}[mode]
    m.freeze("all")  # each call sets the whole state, whatever came before
    m.freeze(mode)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == want


def test_freeze_rejects_unknown_mode():
    with pytest.raises(ValueError, match="freeze mode"):
        tiny_model().freeze("decoders")


@pytest.mark.parametrize("mode", ["nothing", "decoder", "all"])
def test_cross_attention_receives_gradient(mode):
    m = tiny_model("tokens").train()
    m.freeze(mode)
    ids, mask, pix, dec = batch()
    labels = make_labels(dec, torch.ones_like(dec))
    lm_loss(m(ids, mask, pix, dec), labels).backward()
    for n, p in m.named_parameters():
        if ".crossattention." in n or "projection" in n:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        elif not p.requires_grad:
            assert p.grad is None, n
    # the encoders learn through the cross-attention when they are not frozen
    enc_grad = m.text_encoder.embeddings.weight.grad
    assert (enc_grad is not None and float(enc_grad.abs().sum()) > 0) == (mode in ("nothing", "decoder"))


# ---- labels and loss ----
def test_labels_mask_padding_but_keep_the_closing_eos():
    eos = 0  # GPT-2 pads with its eos token
    ids = torch.tensor([[eos, 5, 6, eos], [eos, 7, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert make_labels(ids, mask).tolist() == [[eos, 5, 6, eos], [eos, 7, eos, -100]]


def test_lm_loss_is_shifted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(2) for t in range(3)
             if labels[b, t + 1] != -100]
    assert len(terms) == 4
    torch.testing.assert_close(lm_loss(logits, labels), torch.stack(terms).mean(), rtol=0, atol=1e-6)


# ---- input checks ----
def test_nan_and_inf_inputs_are_refused():
    m = tiny_model()
    ids, mask, pix, dec = batch()
    pix[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"pixel_values contains NaN or Inf \(batch rows \[1\]\)"):
        m(ids, mask, pix, dec)
    pix[1, 0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        m(ids, mask, pix, dec)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (3, 3, 16, 20), (3, 4, 16, 16), (3, 16, 16)])
def test_wrong_image_shape_refused(shape):
    m = tiny_model()
    ids, mask, _, dec = batch()
    with pytest.raises(ValueError, match=r"pixel_values has shape .* expects \(B, 3, 16, 16\)"):
        m(ids, mask, torch.zeros(shape), dec)


def test_decoder_without_cross_attention_refused():
    text = StandInTextEncoder(StandInConfig())
    image = StandInImageEncoder(StandInConfig())
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        MultiModalModel(text, image, dec)


@pytest.mark.parametrize("image, msg", [
    (np.zeros((16, 16), np.uint8), r"expected an RGB image .*\(1 channel"),
    (np.zeros((16, 16, 4), np.uint8), r"got shape \(16, 16, 4\) \(4 channel"),
    (np.zeros((16, 12, 3), np.uint8), r"expected 16×16 pixels, got 16×12"),
    (np.zeros((16, 16, 3), np.float64), "expected uint8"),
])
def test_bad_images_refused(image, msg):
    with pytest.raises(ValueError, match=msg):
        to_pixel_values(image, 16, what="image of record 7")


def test_pixel_values_normalisation():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 1] = (255, 0, 51)
    x = to_pixel_values(img, 2)
    assert x.shape == (3, 2, 2)
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([1.0, -1.0, -0.6]), rtol=0, atol=1e-6)  # (v/255-.5)/.5
    assert float(x[0, 0, 0]) == -1.0


# ---- collator ----
@pytest.fixture(scope="module")
def tokenizers_():
    from minillm.demos.vqa_demo import answer_tokenizer, text_tokenizer
    return text_tokenizer(8), answer_tokenizer()


def test_collator_batch(tokenizers_):
    ttok, atok = tokenizers_
    col = VQACollator(ttok, atok, image_size=4, text_max_length=8)
    img = np.zeros((4, 4, 3), np.uint8)
    recs = [{"question": "what color is the circle?", "answer": "red", "image": img},
            {"question": "is there a cross?", "answer": "top left", "image": img}]
    b = col(recs)
    assert b["pixel_values"].shape == (2, 3, 4, 4)
    assert ttok.decode(b["input_ids"][0]) == "[CLS] what color is the circle ? [SEP]"
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]  # right-padded to the longest
    # the book's decoder text: bos + ' ' + answer + eos
    assert format_answer("red", "<|endoftext|>", "<|endoftext|>") == "<|endoftext|> red<|endoftext|>"
    eot = atok.eos_token_id
    red, top, left = (atok.token_to_id(w) for w in ("red", "top", "left"))
    assert b["decoder_input_ids"].tolist() == [[eot, red, eot, eot], [eot, top, left, eot]]
    assert b["labels"].tolist() == [[eot, red, eot, -100], [eot, top, left, eot]]


def test_long_question_truncated_with_warning(tokenizers_):
    ttok, atok = tokenizers_
    col = VQACollator(ttok, atok, image_size=4, text_max_length=8)
    q = "what color is the circle " * 4
    with pytest.warns(UserWarning, match=r"question 42 has 22 tokens, more than the text encoder's limit of 8"):
        b = col([{"question_id": 42, "question": q, "answer": "red", "image": np.zeros((4, 4, 3), np.uint8)}])
    assert b["input_ids"].shape == (1, 8)
    assert ttok.decode(b["input_ids"][0]) == "[CLS] what color is the circle what [SEP]"  # [SEP] kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a question within the limit: no warning
        col([{"question": "what color is the circle?", "answer": "red", "image": np.zeros((4, 4, 3), np.uint8)}])


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_is_a_clear_error(tokenizers_, answer):
    ttok, atok = tokenizers_
    col = VQACollator(ttok, atok, image_size=4, text_max_length=8)
    with pytest.raises(ValueError, match=r"record 9: answer .* tokenizes to nothing between bos and eos"):
        col([{"question_id": 9, "question": "what?", "answer": answer, "image": np.zeros((4, 4, 3), np.uint8)}])


def test_collator_names_the_bad_image(tokenizers_):
    ttok, atok = tokenizers_
    col = VQACollator(ttok, atok, image_size=4, text_max_length=8)
    with pytest.raises(ValueError, match=r"image of record 5: expected 4×4 pixels, got 5×4"):
        col([{"question_id": 5, "question": "what?", "answer": "red", "image": np.zeros((5, 4, 3), np.uint8)}])


# ---- greedy answers ----
class ScriptedDecoder(torch.nn.Module):
    """Stands in for the decoder: at answer position k, row b's logits are log(probs) of a scripted distribution
    (token script[k] with probability p, the rest shared evenly)."""

    def __init__(self, scripts, V=6):
        super().__init__()
        self.scripts, self.V, self.steps = scripts, V, 0
        self.config = GPT2Config(vocab_size=V, n_embd=4, n_layer=1, n_head=1, add_cross_attention=True)

    def new_cache(self, max_length=None):
        return None  # no cache: generate then feeds the whole sequence each step

    def forward(self, tokens, attention_mask=None, cache=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        self.steps += 1
        B, T = tokens.shape
        out = torch.empty(B, T, self.V)
        for b, script in enumerate(self.scripts):
            for k in range(T):
                tok, p = script[min(k, len(script) - 1)]
                out[b, k] = math.log((1 - p) / (self.V - 1))
                out[b, k, tok] = math.log(p)
        return out


def test_greedy_stops_at_eos_and_multiplies_token_probabilities():
    m = tiny_model()
    eos, bos = 0, 1
    m.decoder = ScriptedDecoder([[(3, 0.9), (4, 0.8), (eos, 0.5)], [(5, 0.6), (eos, 0.7), (2, 0.9)]])
    ids, mask, pix, _ = batch(B=2)
    tokens, prob = greedy_answer(m, ids, mask, pix, bos, eos, max_new_tokens=10)
    assert tokens.tolist() == [[bos, 3, 4, eos], [bos, 5, eos, eos]]  # a finished row is filled with eos
    assert m.decoder.steps == 3 + 1  # 3 decoding steps (stopped once every row had its eos) + the scoring pass
    torch.testing.assert_close(prob, torch.tensor([0.9 * 0.8 * 0.5, 0.6 * 0.7]), rtol=1e-5, atol=0)  # fp32 log-sum
    assert answer_texts(tokens, type("T", (), {"decode": lambda self, r, skip_special_tokens: " ".join(map(str, r))})(),
                        eos) == ["3 4", "5"]
    assert format_prediction("cat", 0.6612) == "cat 66%"


def test_greedy_respects_max_new_tokens():
    m = tiny_model()
    m.decoder = ScriptedDecoder([[(3, 0.9)]])
    ids, mask, pix, _ = batch(B=1)
    tokens, prob = greedy_answer(m, ids[:1], mask[:1], pix[:1], 1, 0, max_new_tokens=4)
    assert tokens.tolist() == [[1, 3, 3, 3, 3]]
    torch.testing.assert_close(prob, torch.tensor([0.9 ** 4]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fusion", ["mean", "tokens"])
def test_greedy_agrees_with_the_full_forward(fusion):
    """The greedy tokens are the argmax of a teacher-forced forward over them; the probability is the product."""
    m = tiny_model(fusion, seed=3)
    ids, mask, pix, _ = batch()
    tokens, prob = greedy_answer(m, ids, mask, pix, bos_token_id=1, eos_token_id=0, max_new_tokens=5)
    with torch.no_grad():
        logp = torch.log_softmax(m(ids, mask, pix, tokens), -1)  # (B, 1+n, V)
    for b in range(3):
        lp, row = 0.0, tokens[b].tolist()
        for k in range(1, len(row)):
            assert int(logp[b, k - 1].argmax()) == row[k]
            lp += float(logp[b, k - 1, row[k]])
            if row[k] == 0:
                break
        assert abs(math.exp(lp) - float(prob[b])) < 1e-5  # fp32


# ---- the cross-attention decoder, saved by minillm, read by transformers ----
def test_decoder_saved_by_minillm_matches_transformers_golden(tmp_path):
    """weights/tiny-vqa-decoder was written by minillm's save_pretrained; transformers read it and wrote the
    logits in tests/golden/vqa_decoder.safetensors (scripts/golden/vqa.py). Tolerance 1e-4 (fp32)."""
    g = load_file(str(GOLDEN / "vqa_decoder.safetensors"))
    model = GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-vqa-decoder")).eval()
    assert model.config.add_cross_attention
    with torch.no_grad():
        one = model(g["input_ids"], encoder_hidden_states=g["encoder_hidden_states"][:, :1])
        padded = model(g["input_ids"], attention_mask=g["attention_mask"],
                       encoder_hidden_states=g["encoder_hidden_states"],
                       encoder_attention_mask=g["encoder_attention_mask"])
    torch.testing.assert_close(one, g["logits_one_token"], rtol=0, atol=1e-4)
    torch.testing.assert_close(padded, g["logits_padded"], rtol=0, atol=1e-4)
    # what minillm saves now is what transformers read: same tensors, bit for bit
    model.save_pretrained(str(tmp_path))
    saved, committed = load_file(str(tmp_path / "model.safetensors")), \
        load_file(str(ROOT / "weights" / "tiny-vqa-decoder" / "model.safetensors"))
    assert saved.keys() == committed.keys()
    assert any(".crossattention.q_attn.weight" in k for k in saved) and any("ln_cross_attn" in k for k in saved)
    for k in saved:
        assert torch.equal(saved[k], committed[k]), k


@pytest.mark.reference
@pytest.mark.parametrize("cfg", [
    dict(n_layer=2, n_embd=32, n_head=4),
    dict(n_layer=3, n_embd=24, n_head=3, scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False),
])
def test_decoder_round_trip_live(tmp_path, cfg):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=20, add_cross_attention=True, **cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert ref.config.add_cross_attention
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    enc = torch.randn(2, 4, cfg["n_embd"], generator=g)
    enc_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        for kw in (dict(encoder_hidden_states=enc[:, :1]),
                   dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)):
            torch.testing.assert_close(model(ids, **kw), ref(ids, **kw).logits, rtol=0, atol=1e-4)  # fp32


@pytest.mark.reference
def test_hub_gpt2_gains_cross_attention_live(tmp_path):
    """from_pretrained(add_cross_attention=True) on a checkpoint without it, saved, read by transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"), add_cross_attention=True).eval()
    model.save_pretrained(str(tmp_path))
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    enc = torch.randn(2, 1, model.config.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, encoder_hidden_states=enc),
                                   ref(ids, encoder_hidden_states=enc).logits, rtol=0, atol=1e-4)  # fp32


# ---- the book's construction from hub checkpoints: DistilBERT + ViT (DINO) + GPT-2 gaining cross-attention ----
def book_model(fusion="mean"):
    from minillm.models.distilbert import DistilBertModel
    from minillm.models.vit import ViTModel
    torch.manual_seed(0)
    return MultiModalModel(DistilBertModel.from_pretrained(str(ROOT / "weights" / "tiny-distilbert")),
                           ViTModel.from_pretrained(str(ROOT / "weights" / "tiny-dino")),
                           GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"), add_cross_attention=True),
                           fusion=fusion)


@pytest.mark.parametrize("fusion", ["mean", "tokens"])
def test_hub_checkpoints_fit_together(fusion):
    m = book_model(fusion).eval()
    S = m.image_encoder.config.image_size
    P = (S // m.image_encoder.config.patch_size) ** 2
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])
    mask = (ids != 0).long()
    pix = torch.randn(2, 3, S, S)
    dec = torch.tensor([[5, 6, 7], [8, 9, 10]])
    enc, enc_mask = m.encode(ids, mask, pix)
    assert enc.shape == ((2, 1, 64) if fusion == "mean" else (2, 5 + 1 + P, 64))  # tiny-gpt2 is 64 wide
    assert m(ids, mask, pix, dec).shape == (2, 3, m.decoder.config.vocab_size)
    m.freeze("all")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters()
                         if ".crossattention." in n or n.startswith(("text_projection", "image_projection"))}
    m.train()
    lm_loss(m(ids, mask, pix, dec), make_labels(dec, torch.ones_like(dec))).backward()
    for n, p in m.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
        elif fusion == "mean" and ".q_attn." in n:
            # one encoder token: every attention weight is 1 whatever the query, so the query projection
            # gets no gradient; cross-attention is then the linear map c_proj(W_v e) (see the module docstring)
            assert float(p.grad.abs().max()) == 0.0, n
        else:
            assert float(p.grad.abs().sum()) > 0, n
