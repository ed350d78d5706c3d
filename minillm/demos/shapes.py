"""A synthetic VQA set: coloured shapes on a 2×2 grid, drawn with numpy, with template questions.

Each scene puts 1–4 objects into distinct cells of a 2×2 grid (position jittered by a pixel, size by ±15%);
within a scene every object has its own colour and its own shape, so each question has
exactly one answer. Every scene gets one question of each type:

    colour   "what color is the circle?"            -> "red"
    shape    "what shape is the blue object?"       -> "square"
    count    "how many objects are there?"          -> "three"
    position "where is the green triangle?"         -> "top left"      (two tokens)
    yesno    "is there a yellow cross?"             -> "yes" / "no"    (half the time)

Images are uint8 (H, W, 3). Everything derives from one seed; the held-out split holds
scenes (images) never seen in training, so no test question shares an image with training.
Source: in the spirit of CLEVR (Johnson et al., 2017) and Sort-of-CLEVR (Santoro et al., 2017),
made small enough to train on a CPU in minutes; record fields follow VQA v2 (the book, ch. 9).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240),
           "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "cross")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major over the 2×2 grid
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position", "yesno")
BACKGROUND = (30, 30, 30)


def shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    """Bool (size, size) mask of one shape centred at (cy, cx) with half-size r (pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up: the half-width grows linearly from the top edge
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "cross":
        w = r / 3
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def render_scene(objects: list[dict], size: int = 32, rng: Optional[np.random.Generator] = None,
                 noise: float = 8.0) -> np.ndarray:
    """Draw objects ({'shape', 'colour', 'cell', 'cy', 'cx', 'r'}) on a dark background -> uint8 (size, size, 3)."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for o in objects:
        img[shape_mask(o["shape"], size, o["cy"], o["cx"], o["r"])] = COLOURS[o["colour"]]
    if rng is not None and noise > 0:
        img += rng.normal(0.0, noise, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def random_scene(rng: np.random.Generator, size: int = 32, max_objects: int = 4, jitter: float = 1.0) -> list[dict]:
    """1..max_objects objects, distinct cells, distinct colours, distinct shapes; each centre jittered by up to
    `jitter` pixels (at most what keeps the shape inside its cell), the size by ±15%."""
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(len(CELLS))[:n]
    colours = rng.permutation(len(COLOURS))[:n]
    shapes = rng.permutation(len(SHAPES))[:n]
    half = size / 2
    objects = []
    for c, col, sh in zip(cells, colours, shapes):
        row, column = divmod(int(c), 2)
        r = float(rng.uniform(0.28, 0.38) * half)
        j = min(jitter, half / 2 - r - 0.5)  # keep the shape inside its cell
        cy = row * half + half / 2 + float(rng.uniform(-j, j))
        cx = column * half + half / 2 + float(rng.uniform(-j, j))
        objects.append({"shape": SHAPES[sh], "colour": list(COLOURS)[col], "cell": CELLS[c], "cy": cy, "cx": cx, "r": r})
    return objects


def questions_for(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One (question type, question, answer) per type for a scene."""
    pick = objects[int(rng.integers(len(objects)))]
    qs = [("colour", f"what color is the {pick['shape']}?", pick["colour"])]
    pick = objects[int(rng.integers(len(objects)))]
    qs.append(("shape", f"what shape is the {pick['colour']} object?", pick["shape"]))
    qs.append(("count", "how many objects are there?", COUNT_WORDS[len(objects)]))
    pick = objects[int(rng.integers(len(objects)))]
    qs.append(("position", f"where is the {pick['colour']} {pick['shape']}?", pick["cell"]))
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        col, sh = sorted(present)[int(rng.integers(len(present)))]
        qs.append(("yesno", f"is there a {col} {sh}?", "yes"))
    else:  # an absent pair; half the time its colour or its shape is in the scene, to make it a real question
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == o["colour"] or s == o["shape"] for o in objects)]
        pool = near if near and rng.random() < 0.5 else absent
        col, sh = pool[int(rng.integers(len(pool)))]
        qs.append(("yesno", f"is there a {col} {sh}?", "no"))
    return qs


def make_shapes_dataset(n_images: int = 2000, size: int = 32, seed: int = 0, noise: float = 8.0,
                        test_fraction: float = 0.2, jitter: float = 1.0) -> tuple[list[dict], list[dict]]:
    """-> (train, test) lists of records like the VQA v2 loader's: image_id, question_id, question,
    answer (the plain answer text), question_type, image (uint8 (size, size, 3)).
    The last `test_fraction` of the scenes (by image) are held out."""
    if size % 2:
        raise ValueError(f"size must be even (a 2×2 grid), got {size}")
    rng = np.random.default_rng(seed)
    records = []
    for image_id in range(n_images):
        objects = random_scene(rng, size, jitter=jitter)
        image = render_scene(objects, size, rng, noise)
        for qtype, question, answer in questions_for(objects, rng):
            records.append({"image_id": image_id, "question_id": len(records), "question": question,
                            "answer": answer, "question_type": qtype, "image": image})
    n_test = int(round(n_images * test_fraction))
    cut = n_images - n_test
    return [r for r in records if r["image_id"] < cut], [r for r in records if r["image_id"] >= cut]


def question_vocabulary() -> list[str]:
    """Every word a template question can use (lower case; '?' is its own token)."""
    words = {"what", "color", "is", "the", "shape", "object", "how", "many", "objects", "are", "there", "where",
             "a", "?"}
    return sorted(words | set(COLOURS) | set(SHAPES))


def answer_vocabulary() -> list[str]:
    words = set(COLOURS) | set(SHAPES) | set(COUNT_WORDS) | {"yes", "no"}
    for cell in CELLS:
        words |= set(cell.split())
    return sorted(words)


def majority_baseline(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Exact-match accuracy of answering each question type with its most common training answer.
    Keys: each question type, and 'overall' (the per-type majority answers applied to every test question)."""
    result, hits = {}, 0
    for qtype in QUESTION_TYPES:
        answers = Counter(r["answer"] for r in train if r["question_type"] == qtype)
        rows = [r for r in test if r["question_type"] == qtype]
        if not answers or not rows:
            continue
        top = answers.most_common(1)[0][0]
        n = sum(r["answer"] == top for r in rows)
        result[qtype] = n / len(rows)
        hits += n
    result["overall"] = hits / max(len(test), 1)
    return result
