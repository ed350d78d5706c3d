"""Training data: one reader for JSONL/CSV files, the record formats, and the collators that pad them into batches.

readers.py (JSONL/CSV, DataError naming file:line) · sft.py (prompt/completion, LaTeX, chat format,
completion-only labels) · classification.py (multi-label records) · preference.py (reward pairs,
prompts) · seq2seq.py (input/target pairs for encoder-decoders) · vqa.py and vqa_v2.py (VQA records).
"""
