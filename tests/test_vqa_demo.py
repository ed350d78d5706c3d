"""The VQA demo: a quick run (small set, few epochs) checks that training learns what the baseline cannot;
the full run (marked slow) checks the issue's bar: >= 90% on colour and shape questions, >= 2x the
majority-answer baseline overall."""

import pytest
import torch

from minillm.demos.vqa_demo import VQADemoConfig, accuracy_by_type, format_report, run_vqa_demo


def test_accuracy_by_type_by_hand():
    recs = [{"question_type": "colour", "answer": "red"}, {"question_type": "colour", "answer": "blue"},
            {"question_type": "count", "answer": "two"}, {"question_type": "position", "answer": "top left"}]
    acc = accuracy_by_type(recs, ["red", "red", "two", "top"])
    assert acc == {"colour": 0.5, "count": 1.0, "position": 0.0, "overall": 0.5}


def test_quick_demo_learns(tmp_path):
    """~30 s of CPU on 1 thread: 1,000 scenes (fresh ones each epoch), 6 epochs must beat the majority baseline clearly."""
    cfg = VQADemoConfig(n_images=1000, epochs=6,
                        fusions=("tokens",), threads=1)
    logs = []
    r = run_vqa_demo(cfg, out_dir=str(tmp_path), plot=False, log=logs.append)
    res, base = r["tokens"], r["baseline"]
    assert r["n_train"] == 800 * 5 and r["n_test"] == 200 * 5
    assert res["losses"][-1] < 0.6 * res["losses"][0]
    assert res["accuracy"]["count"] >= base["count"] + 0.3, format_report(r, cfg.fusions)
    # measured: count 100% (majority 27%), colour 49.5% (25%), overall 51.0% (30.8%)
    assert res["accuracy"]["colour"] >= base["colour"] + 0.15, format_report(r, cfg.fusions)
    assert res["accuracy"]["overall"] >= 1.4 * base["overall"], format_report(r, cfg.fusions)
    q, truth, pred, prob = res["examples"][0]
    assert 0.0 < prob <= 1.0 and isinstance(pred, str)
    assert any("held-out exact-match accuracy" in line for line in logs)


def test_side_by_side_equals_sequential(tmp_path):
    """The fusions trained in one child process each (JSON in, JSON out) give exactly the sequential run's
    losses, accuracies and examples (one thread everywhere: the same float operations)."""
    runs = {}
    for parallel in (False, True):
        logs = []
        cfg = VQADemoConfig(n_images=60, epochs=2, threads=1, parallel=parallel, eval_batch_size=64)
        runs[parallel] = run_vqa_demo(cfg, out_dir=str(tmp_path / str(parallel)), plot=False, log=logs.append)
        assert any("held-out exact-match accuracy" in line for line in logs)
    assert any("side by side" in line for line in logs)
    assert any(line.startswith("[fusion=mean] epoch 2/2") for line in logs)  # child lines are relayed
    for fusion in ("mean", "tokens"):
        seq, par = runs[False][fusion], runs[True][fusion]
        assert par["losses"] == seq["losses"] and par["accuracy"] == seq["accuracy"]
        assert [list(e) for e in seq["examples"]] == par["examples"]
        assert par["parameters"] == seq["parameters"]
    assert runs[False]["mean"]["losses"] != runs[False]["tokens"]["losses"]


@pytest.mark.slow
def test_full_demo_reaches_the_bar(tmp_path):
    """The issue's bar on the default `minillm vqa-demo` run: colour and shape >= 90% held-out and overall >= 2x the
    majority baseline — reached by fusion='tokens'. Measured (seed 0, 18 epochs, the fusions side by side on
    2 cores, 5 min 19 s wall): tokens: colour 99.8%, shape 100%, count 100%, position 100%, yes/no 98.5%,
    overall 99.7%; mean (the book's one fused vector): colour 54.3%, shape 24.5%, count 100%, position 26.2%,
    yes/no 75.3%, overall 56.1%; majority baseline overall 29.8%. Tokens fusion, seeds 1 and 2: overall
    99.8% / 99.97%, shape 99.5% / 100%. (At 15 epochs, seed 0: shape 90.5%: the loss falls steeply
    between epochs 8 and 14.) The mean fusion is held to what it reaches."""
    try:
        import matplotlib  # noqa: F401
        plot = True
    except ImportError:
        plot = False
    cfg = VQADemoConfig(threads=1)
    r = run_vqa_demo(cfg, out_dir=str(tmp_path), plot=plot)
    report = format_report(r, cfg.fusions)
    tokens, mean, base = r["tokens"]["accuracy"], r["mean"]["accuracy"], r["baseline"]
    assert tokens["colour"] >= 0.9 and tokens["shape"] >= 0.9, report
    assert tokens["overall"] >= 2 * base["overall"], report
    assert mean["overall"] >= 1.5 * base["overall"] and mean["count"] >= 0.9, report
    if plot:
        for fusion in cfg.fusions:
            assert (tmp_path / f"vqa_examples_{fusion}.png").stat().st_size > 10_000


def test_cli_runs_and_reports_the_baseline(capsys, tmp_path):
    from minillm.cli import main
    from minillm.demos import shapes
    threads = torch.get_num_threads()
    assert main(["vqa-demo", "--n-images", "20", "--epochs", "1", "--fusion", "mean", "--no-plot", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    train, test = shapes.make_shapes_dataset(20, seed=0)
    base = shapes.majority_baseline(train, test)
    row = [line for line in out.splitlines() if line.strip().startswith("overall")][0]
    assert f"{base['overall']:.1%}" in row and "fusion=mean" in out
    assert torch.get_num_threads() == threads  # --threads is restored after the run
