"""Reading metrics.jsonl rows and picking the series the charts draw."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dinoscale.viz.curves import knn_series, plot_knn, plot_series, read_rows, rows_of_type, series  # noqa: E402


def test_read_rows_counts_what_it_cannot_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        json.dumps({"step": 1, "loss": 2.0}),
        "",
        json.dumps(["not", "a", "row"]),
        json.dumps({"loss": 1.0}),  # no step
        json.dumps({"step": 2, "type": "eval", "knn/top1@20": 40.0}),
        '{"step": 3, "loss": 1.',  # cut short by a crash
    ]))
    rows, bad = read_rows(path)
    assert [r["step"] for r in rows] == [1, 2] and bad == 3
    assert rows_of_type(rows, None) == [rows[0]] and rows_of_type(rows, "eval") == [rows[1]]


def test_series_keeps_numbers_and_skips_nulls_and_booleans():
    rows = [{"step": 1, "loss": 3.0, "lr": 0.1, "flag": True}, {"step": 2, "loss": None, "lr": 0.2},
            {"step": 3, "loss": 1.0}]
    assert series(rows, lambda k: k in ("loss", "flag")) == {"loss": ([1, 3], [3.0, 1.0])}
    assert list(series(rows, lambda k: True)) == ["loss", "lr", "step"]  # sorted, no boolean "flag"
    assert series(rows, lambda k: True)["lr"] == ([1, 2], [0.1, 0.2])


def test_knn_series_and_their_axes():
    rows = [{"step": 2, "type": "eval", "knn/top1@20": 40.0, "knn/top5@20": 80.0, "time": 5.0},
            {"step": 4, "type": "final_knn", "teacher": 60.0, "random_init": 30.0}]
    knn, final = knn_series(rows)
    assert knn == {"knn/top1@20": ([2], [40.0]), "knn/top5@20": ([2], [80.0])}
    assert final == {"random_init": ([4], [30.0]), "teacher": ([4], [60.0])}
    fig, (ax_knn, ax_final, ax_empty) = plt.subplots(1, 3)
    plot_knn(ax_knn, knn, final)
    assert [line.get_label() for line in ax_knn.get_lines()] == ["knn/top1@20", "knn/top5@20"]
    assert len(ax_knn.collections) == 2 and not ax_knn.texts  # two stars, no "no data"
    plot_knn(ax_final, {}, final)  # the final kNN alone still counts as data
    assert not ax_final.texts and ax_final.get_legend() is not None
    plot_series(ax_empty, {}, ylabel="loss", log_scale=True)
    assert [t.get_text() for t in ax_empty.texts] == ["no data"] and ax_empty.get_yscale() == "linear"
    plt.close(fig)
