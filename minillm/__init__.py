"""minillm: the machinery behind LLM fine-tuning, written out in plain PyTorch.

Attention, GPT-2 / BERT / DistilBERT / ViT loading real hub checkpoints, LoRA, NF4,
reward models, PPO and DPO — each in one readable file, each checked against the
reference library (transformers, peft, bitsandbytes, trl) it reimplements.
"""

__version__ = "0.1.0"
