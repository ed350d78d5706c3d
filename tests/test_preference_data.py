"""pairs.jsonl / prompts.jsonl: parsing, margins from scores, and errors that name the file and line."""

import json

import pytest

from minillm.data.readers import DataError
from minillm.data.preference import join_text, load_pairs, load_prompts


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_pairs_margins(tmp_path):
    p = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"},
                         {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
                         {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 6, "score_rejected": 2}])
    assert [d["margin"] for d in load_pairs(p)] == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("row,msg", [
    ({"prompt": "q", "chosen": "a"}, "d.jsonl:2: missing or non-string 'rejected'"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "d.jsonl:2: 'chosen' is an empty response"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "d.jsonl:2: 'margin' must be a finite"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 5}, "d.jsonl:2: score_chosen"),
    ('{"prompt": ', "d.jsonl:2: malformed JSON"),
])
def test_pairs_errors_name_the_line(tmp_path, row, msg):
    p = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    assert msg in str(e.value)


def test_prompts(tmp_path):
    assert load_prompts(write(tmp_path, [{"prompt": "hi"}, '"there"'])) == ["hi", "there"]
    with pytest.raises(ValueError, match="d.jsonl:2"):
        load_prompts(write(tmp_path, [{"prompt": "hi"}, {"prompt": ""}]))
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")


def test_join_text():
    assert join_text("a :", "b") == "a : b"
    assert join_text("a\n", "b") == "a\nb"
    assert join_text("a", " b") == "a b"
