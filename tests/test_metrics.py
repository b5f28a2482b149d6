"""metrics.jsonl and TensorBoard; one row per step after a resume."""
from mm.metrics import MetricsLogger, read_metrics, truncate_jsonl


def test_metrics_logger_appends_jsonl(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=True)
    m.log(1, {"loss": 2.0})
    m.log(2, {"loss": 1.0, "note": "x"})
    m.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.0)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resumed_run_supersedes_the_rows_it_trains_again(tmp_path):
    """Killed at step 5 after a checkpoint at step 3: the resumed logger drops rows 4-5, then logs them anew."""
    m = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        m.log(step, {"loss": float(step)})
    m.log(3, {"zeroshot_top1": 0.5})  # an evaluation row at the checkpoint's step stays
    m.close()
    m = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    for step in (4, 5, 6):
        m.log(step, {"loss": 10.0 + step})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if r["step"] >= 4] == [14.0, 15.0, 16.0]


def test_truncate_jsonl_counts_what_it_drops(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(f'{{"step": {s}, "keys": ["k{s}"]}}\n' for s in range(1, 9)))
    assert truncate_jsonl(path, 6) == 2 and truncate_jsonl(path, 6) == 0
    assert path.read_text().count("\n") == 6
    assert truncate_jsonl(tmp_path / "missing.jsonl", 1) == 0
