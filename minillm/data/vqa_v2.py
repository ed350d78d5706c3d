"""A loader for the VQA v2 files: annotations JSON + questions JSON + a folder of COCO images.

VQA v2 (Goyal et al., 2017) pairs COCO images with open-ended questions, each answered by ten
people; `multiple_choice_answer` is the most common of their answers. The files:

    v2_OpenEnded_mscoco_train2014_questions.json  {"data_subtype": "train2014",
                                                   "questions": [{"image_id", "question", "question_id"}, ...]}
    v2_mscoco_train2014_annotations.json          {"annotations": [{"question_id", "image_id",
                                                   "multiple_choice_answer", "answers": [{"answer", ...}], ...}]}
    train2014/COCO_train2014_000000458752.jpg     COCO_<subtype>_<image_id, 12 digits>.jpg

Each record, as in the book (ch. 9): image_id, question_id, question, answer (the
multiple_choice_answer; the decoder reads it as bos + ' ' + answer + eos, see
minillm.models.vqa.format_answer), all_answers, image (uint8 (H, W, 3)). The book's limits:
questions[start_at:end_at] in file order; at most `max_images` distinct images (questions about
further images are skipped); at most `max_questions` records in all. Images are read with
Pillow (optional: `pip install pillow`), grey-scale ones converted to RGB (COCO has some), other
modes refused; `image_size` resizes to a square, as ViT's preprocessing does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading VQA v2 images needs Pillow, which minillm does not install by default: "
                          "pip install pillow") from None
    return Image


def load_image(path: str | Path, image_size: Optional[int] = None) -> np.ndarray:
    """A JPEG/PNG file -> uint8 (H, W, 3) (resized to (image_size, image_size) when given).
    Grey-scale ('L') images are converted to RGB; other modes (CMYK, RGBA, palette, 16-bit) are refused."""
    Image = _pil()
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                im = im.convert("RGB")
            elif mode != "RGB":
                raise ValueError(f"{path}: image mode {mode!r} ({len(im.getbands())} channel(s)); expected RGB "
                                 f"(or grey-scale 'L', converted). Convert the file to RGB first.")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as e:  # Pillow's errors for unreadable / truncated files
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _read_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if key not in data:
        raise ValueError(f"{path}: no '{key}' list; is this a VQA v2 file?")
    return data


def image_file_name(image_id: int, subtype: str = "train2014") -> str:
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def load_vqa_v2(annotations_file: str | Path, questions_file: str | Path, images_folder: str | Path,
                start_at: Optional[int] = None, end_at: Optional[int] = None, max_images: Optional[int] = None,
                max_questions: Optional[int] = None, image_size: Optional[int] = None,
                missing: str = "skip") -> list[dict]:
    """Read VQA v2 records (see the module docstring). missing='skip' skips questions whose image file is
    absent (one warning with the count); missing='error' raises on the first."""
    if missing not in ("skip", "error"):
        raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
    annotations_file, questions_file = Path(annotations_file), Path(questions_file)
    ann_data = _read_json(annotations_file, "annotations")
    q_data = _read_json(questions_file, "questions")
    subtype = q_data.get("data_subtype", "train2014")
    annotations = {a["question_id"]: a for a in ann_data["annotations"]}
    images_folder = Path(images_folder)
    if not images_folder.is_dir():
        raise FileNotFoundError(f"{images_folder}: image folder not found")

    records: list[dict] = []
    images: dict[int, np.ndarray] = {}
    n_missing = 0
    for q in q_data["questions"][start_at:end_at]:
        if max_questions is not None and len(records) >= max_questions:
            break
        image_id, qid = q["image_id"], q["question_id"]
        if image_id not in images and max_images is not None and len(images) >= max_images:
            continue  # a new image beyond the limit
        if qid not in annotations:
            raise ValueError(f"{annotations_file}: no annotation for question_id {qid} (from {questions_file})")
        if image_id not in images:
            path = images_folder / image_file_name(image_id, subtype)
            if not path.is_file():
                if missing == "error":
                    raise FileNotFoundError(f"{path}: image of question {qid} not found")
                n_missing += 1
                continue
            images[image_id] = load_image(path, image_size)
        ann = annotations[qid]
        records.append({"image_id": image_id, "question_id": qid, "question": q["question"],
                        "answer": ann["multiple_choice_answer"],
                        "all_answers": [a["answer"] for a in ann.get("answers", [])],
                        "image": images[image_id]})
    if n_missing:
        warnings.warn(f"{n_missing} question(s) skipped: their image is not in {images_folder}", stacklevel=2)
    return records
