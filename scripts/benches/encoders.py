"""Bench rows for the encoders: BERT-base forward (8 x 128 tokens) and ViT-B/16 forward (4 images of 224²),
random weights, fp32, inference mode, minillm vs transformers (attn_implementation="sdpa") on the same
checkpoint (built by transformers, saved, and loaded by both)."""

from __future__ import annotations

import tempfile

import torch

from bench import interleaved, row


def _pair_bert(tmp: str, device: str):
    import transformers
    from minillm.models.bert import BertModel
    torch.manual_seed(0)
    cfg = transformers.BertConfig()  # bert-base: 12 layers, 768 wide, 12 heads, 3072 inner, vocab 30522
    transformers.BertModel(cfg).save_pretrained(tmp)
    ref = transformers.BertModel.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    ours = BertModel.from_pretrained(tmp, device=device).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 128), device=device)
    mask = torch.ones_like(ids)
    return (lambda: ours(ids, attention_mask=mask)), (lambda: ref(ids, attention_mask=mask).last_hidden_state)


def _pair_vit(tmp: str, device: str):
    import transformers
    from minillm.models.vit import ViTModel
    torch.manual_seed(0)
    cfg = transformers.ViTConfig()  # ViT-B/16: 224², 16² patches, 12 layers, 768 wide
    transformers.ViTModel(cfg).save_pretrained(tmp)
    ref = transformers.ViTModel.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    ours = ViTModel.from_pretrained(tmp, device=device).eval()
    x = torch.randn(4, 3, 224, 224, device=device)
    return (lambda: ours(x)), (lambda: ref(x).last_hidden_state)


def run(args) -> list[dict]:
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for name, make in (("BERT-base forward 8x128 (fp32)", _pair_bert), ("ViT-B/16 forward 4x224² (fp32)", _pair_vit)):
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            ours, ref = make(tmp, device)
            diff = (ours() - ref()).abs().max().item()
            t_ours, t_ref = interleaved(ours, ref, repeat=args.repeat, warmup=1, sync=sync)
        rows.append(row(name, t_ours, t_ref, "s", target=1.0,
                        note=f"max |Δ hidden| {diff:.1e}; threads {torch.get_num_threads()}"))
    return rows
