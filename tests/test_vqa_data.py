"""VQA data: the synthetic shapes set (rendering checked from the pixels) and the VQA v2 file-format loader
(on a tiny set fabricated in that format)."""

import json
import warnings

import numpy as np
import pytest

from minillm.demos import shapes
from minillm.data.vqa_v2 import image_file_name, load_image, load_vqa_v2


# ---- synthetic shapes ----
@pytest.fixture(scope="module")
def data():
    return shapes.make_shapes_dataset(60, size=32, seed=3)


def palette_pixels(image, colour, tol=60):
    d = np.abs(image.astype(int) - np.array(shapes.COLOURS[colour])).sum(-1)
    return d < tol  # within noise of the colour (noise sd 8 per channel)


def test_fixed_seed_and_held_out_split(data):
    train, test = data
    again_train, again_test = shapes.make_shapes_dataset(60, size=32, seed=3)
    assert [r["question"] for r in train] == [r["question"] for r in again_train]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(test, again_test))
    other, _ = shapes.make_shapes_dataset(60, size=32, seed=4)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(train, other))
    assert len({r["image_id"] for r in test}) == 12 and len({r["image_id"] for r in train}) == 48  # 20% held out
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in test}
    assert len(train) == 48 * 5 and {r["question_type"] for r in train} == set(shapes.QUESTION_TYPES)
    assert train[0]["image"].shape == (32, 32, 3) and train[0]["image"].dtype == np.uint8


def test_answers_are_true_of_the_pixels(data):
    """Read the answers back from the rendered image: colours present, count of coloured blobs, cell of a colour."""
    for r in data[0] + data[1]:
        img, q, a = r["image"], r["question"], r["answer"]
        present = [c for c in shapes.COLOURS if palette_pixels(img, c).sum() >= 12]
        if r["question_type"] == "colour":
            assert a in present, q
        elif r["question_type"] == "count":
            assert a == shapes.COUNT_WORDS[len(present)], q
        elif r["question_type"] == "position":
            colour = q.split()[3]
            ys, xs = np.nonzero(palette_pixels(img, colour))
            row = "top" if ys.mean() < 16 else "bottom"
            col = "left" if xs.mean() < 16 else "right"
            assert a == f"{row} {col}", q
        elif r["question_type"] == "yesno" and a == "yes":
            assert q.split()[3] in present, q


def test_shape_masks_have_the_expected_area():
    S = 200
    r = 40.0
    area = {s: shapes.shape_mask(s, S, 100, 100, r).sum() for s in shapes.SHAPES}
    assert abs(area["circle"] - np.pi * r * r) / (np.pi * r * r) < 0.01
    assert abs(area["square"] - (1.7 * r) ** 2) / (1.7 * r) ** 2 < 0.03
    assert abs(area["triangle"] - 2 * r * r) / (2 * r * r) < 0.03  # base 2r, height 2r
    w = r / 3
    assert abs(area["cross"] - (2 * (2 * w) * (2 * r) - (2 * w) ** 2)) / area["cross"] < 0.03


def test_answer_balance(data):
    train, _ = shapes.make_shapes_dataset(400, seed=0)
    yes = [r["answer"] for r in train if r["question_type"] == "yesno"]
    assert 0.4 < yes.count("yes") / len(yes) < 0.6
    cells = [r["answer"] for r in train if r["question_type"] == "position"]
    assert set(cells) == set(shapes.CELLS)


def test_vocabularies_cover_the_dataset(data):
    qv, av = set(shapes.question_vocabulary()), set(shapes.answer_vocabulary())
    for r in data[0]:
        assert set(r["question"].replace("?", " ?").split()) <= qv
        assert set(r["answer"].split()) <= av


def test_majority_baseline_by_hand():
    train = [{"question_type": "colour", "answer": a} for a in ["red", "red", "blue"]] + \
            [{"question_type": "yesno", "answer": a} for a in ["no", "yes", "no"]]
    test = [{"question_type": "colour", "answer": a} for a in ["red", "blue", "blue", "green"]] + \
           [{"question_type": "yesno", "answer": a} for a in ["no", "no", "yes", "yes"]]
    b = shapes.majority_baseline(train, test)
    assert b["colour"] == 0.25 and b["yesno"] == 0.5 and b["overall"] == 3 / 8


# ---- VQA v2 file format ----
def fabricate_vqa_v2(root, image_ids=(9, 25, 31), questions_per_image=3, bad=None):
    """A tiny VQA v2 set: questions JSON, annotations JSON, JPEG images named as COCO names them."""
    Image = pytest.importorskip("PIL.Image")
    folder = root / "train2014"
    folder.mkdir()
    questions, annotations = [], []
    for k, image_id in enumerate(image_ids):
        rgb = np.zeros((20 + k, 30, 3), np.uint8)
        rgb[..., k % 3] = 200  # image k is mostly red / green / blue
        Image.fromarray(rgb).save(folder / image_file_name(image_id), quality=95)
        for j in range(questions_per_image):
            qid = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": f"question {j} about image {image_id}?",
                              "question_id": qid})
            answers = [{"answer": f"ans{j}", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
            answers[0]["answer"] = "other"
            annotations.append({"question_type": "what", "multiple_choice_answer": f"ans{j}", "answers": answers,
                                "image_id": image_id, "answer_type": "other", "question_id": qid})
    qf, af = root / "v2_OpenEnded_mscoco_train2014_questions.json", root / "v2_mscoco_train2014_annotations.json"
    qf.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                              "data_subtype": "train2014", "questions": questions}))
    af.write_text(json.dumps({"info": {}, "data_subtype": "train2014", "annotations": annotations}))
    return af, qf, folder


def test_loader_reads_the_records(tmp_path):
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    recs = load_vqa_v2(af, qf, folder)
    assert len(recs) == 9
    r = recs[4]
    assert (r["image_id"], r["question_id"], r["question"], r["answer"]) == (25, 25001, "question 1 about image 25?",
                                                                           "ans1")
    assert r["all_answers"] == ["other"] + ["ans1"] * 9
    assert r["image"].shape == (21, 30, 3) and r["image"].dtype == np.uint8
    assert abs(int(r["image"][..., 1].mean()) - 200) <= 3 and int(r["image"][..., 0].max()) < 20  # green, JPEG noise
    assert recs[3]["image"] is recs[5]["image"]  # one array per image


def test_loader_limits(tmp_path):
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    ids = lambda **kw: [r["question_id"] for r in load_vqa_v2(af, qf, folder, **kw)]
    assert ids(start_at=2, end_at=5) == [9002, 25000, 25001]
    assert ids(max_images=2) == [9000, 9001, 9002, 25000, 25001, 25002]
    assert ids(max_questions=4) == [9000, 9001, 9002, 25000]
    assert ids(start_at=1, max_images=1, max_questions=5) == [9001, 9002]
    assert ids(start_at=4, max_images=2, max_questions=3) == [25001, 25002, 31000]
    assert ids(end_at=0) == []


def test_loader_resizes(tmp_path):
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    recs = load_vqa_v2(af, qf, folder, image_size=16, max_questions=1)
    assert recs[0]["image"].shape == (16, 16, 3)
    assert abs(int(recs[0]["image"][..., 0].mean()) - 200) <= 3


def test_missing_images(tmp_path):
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    (folder / image_file_name(25)).unlink()
    with pytest.warns(UserWarning, match="3 question"):
        recs = load_vqa_v2(af, qf, folder)
    assert [r["image_id"] for r in recs] == [9] * 3 + [31] * 3
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000025.jpg: image of question 25000"):
        load_vqa_v2(af, qf, folder, missing="error")


def test_grey_images_converted_other_modes_refused(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    grey = tmp_path / "grey.jpg"
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(grey)
    a = load_image(grey)
    assert a.shape == (8, 8, 3) and int(a.min()) >= 115 and int(a.max()) <= 125
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8)).save(cmyk)
    with pytest.raises(ValueError, match=r"cmyk.jpg: image mode 'CMYK' \(4 channel\(s\)\); expected RGB"):
        load_image(cmyk)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8)).save(rgba)
    with pytest.raises(ValueError, match="image mode 'RGBA'"):
        load_image(rgba)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        load_image(broken)


def test_bad_files(tmp_path):
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load_vqa_v2(qf, qf, folder)
    af.write_text('{"annotations": [\n  {"question_id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"annotations.json: not valid JSON \(line 2"):
        load_vqa_v2(af, qf, folder)
    af.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="no annotation for question_id 9000"):
        load_vqa_v2(af, qf, folder)


def test_loader_output_feeds_the_collator(tmp_path):
    """Real-format records -> a training batch; an empty multiple_choice_answer is named by its question id."""
    from minillm.demos.vqa_demo import answer_tokenizer, text_tokenizer
    from minillm.data.vqa import VQACollator
    af, qf, folder = fabricate_vqa_v2(tmp_path)
    recs = load_vqa_v2(af, qf, folder, image_size=8, max_questions=2)
    for r in recs:
        r["answer"] = "yes"
    col = VQACollator(text_tokenizer(16), answer_tokenizer(), image_size=8, text_max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown words map to [UNK]; fine here
        b = col(recs)
    assert b["pixel_values"].shape == (2, 3, 8, 8)
    recs[1]["answer"] = ""
    with pytest.raises(ValueError, match="record 9001: answer '' tokenizes to nothing"):
        col(recs)
