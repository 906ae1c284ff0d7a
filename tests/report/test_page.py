"""The report page: every section, only inline pictures, escaped text, partial runs, the CLI."""

import base64
import importlib.util
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.eval.backbones import load_backbone
from dinoscale.report import NotARunError, write_report
from dinoscale.report.figures import pictures_chart, sample_images
from dinoscale.report.run import read_run
from dinoscale.viz.attention import attention_maps, prepare_image

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["summary", "losses", "schedules", "knn", "throughput", "problems", "pictures", "config"]
PNG_PREFIX = "data:image/png;base64,"


class PageParser(HTMLParser):
    """Tags, section ids, every attribute value, the img sources and the text of each section."""

    def __init__(self):
        super().__init__()
        self.tags, self.sections, self.attributes, self.images = [], [], [], []
        self.text = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.attributes.extend((tag, k, v or "") for k, v in attrs.items())
        if tag == "section":
            self.sections.append(attrs["id"])
            self.text[attrs["id"]] = ""
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self.sections:
            self.text[self.sections[-1]] += data


def parse(path):
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def decode_png(src):
    assert src.startswith(PNG_PREFIX), src[:40]
    with Image.open(io.BytesIO(base64.b64decode(src[len(PNG_PREFIX):], validate=True))) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def test_finished_run_report_is_self_contained(tiny_run, tmp_path):
    path = write_report(tiny_run, tmp_path / "report.html")
    page = parse(path)
    assert page.sections == SECTIONS
    # Nothing to fetch: no scripts, stylesheets or frames, no URL in any attribute, every picture inline.
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for tag, name, value in page.attributes:
        assert not value.lower().startswith(("http:", "https:", "//", "file:")), (tag, name, value[:80])
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert len(page.images) == 6  # losses, schedules, kNN, throughput, gradient norm, pictures
    for src in page.images:
        pixels = decode_png(src)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank

    final = read_run(tiny_run).final_knn
    summary = page.text["summary"]
    assert "finished" in summary and "4 of 4" in summary
    assert f"teacher {final['teacher']:.2f}% vs random init {final['random_init']:.2f}%" in summary
    assert "export/teacher_backbone.safetensors" in summary and "knn/top1@20" in summary
    assert "Not available" not in "".join(page.text.values())
    assert "corrupt samples" in page.text["problems"]
    assert "Weights: export/teacher_backbone.safetensors" in page.text["pictures"]
    assert "fashion-mnist:test" in page.text["pictures"]
    assert f"output_dir: {tiny_run}" in page.text["config"]


def test_config_text_is_escaped(run_copy):
    config = run_copy / "config.yaml"
    comment = 'method: dinov2  # <script>alert("x")</script> & co'
    config.write_text(config.read_text().replace("method: dinov2", comment))
    text = write_report(run_copy, pictures=False).read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text


def test_partial_runs_say_what_is_not_available_yet(run_copy):
    # Crashed after the step-2 checkpoint and eval: no export, no final kNN.
    metrics = run_copy / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2 and r.get("type") != "final_knn"))
    for path in (run_copy / "export").iterdir():
        path.unlink()
    page = parse(write_report(run_copy))
    assert page.sections == SECTIONS
    assert "incomplete: step 2 of 4" in page.text["summary"]
    assert "final kNN" in page.text["summary"] and "not available yet" in page.text["summary"]
    assert "not exported yet" in page.text["summary"]
    assert "Weights: checkpoints/step_000000004" in page.text["pictures"]  # the newest checkpoint instead

    # Nothing but config.yaml: every section but the summary and the config says it is not available yet.
    for path in list(run_copy.iterdir()):
        if path.name != "config.yaml":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    page = parse(write_report(run_copy))
    assert page.sections == SECTIONS and page.images == []
    for section in SECTIONS[1:-1]:
        assert "Not available yet" in page.text[section], section
    assert "no exported teacher and no checkpoint yet" in page.text["pictures"]
    assert "no step logged yet" in page.text["summary"]


def test_pictures_are_the_attention_of_the_loaded_teacher(tiny_run):
    cfg = read_run(tiny_run).config
    images, source, notes = sample_images(cfg, 4)
    assert source == "fashion-mnist:test" and notes == []
    assert [name for name, _ in images] == ["Ankle boot", "Pullover", "Trouser", "Shirt"]  # one per class
    model = load_backbone(weights=str(tiny_run))
    fig = pictures_chart(model, images, 16)
    rows, cols = 4, 1 + 1 + 2 + 2  # image, mean attention, 2 heads, 2 PCA pictures
    assert len(fig.axes) == rows * cols
    # The head columns show exactly attention_maps() of the model, min-max scaled.
    x, _ = prepare_image(images[0][1], model.patch_size, 16)
    maps = attention_maps(model, x)
    head0 = fig.axes[2].get_images()[0].get_array()
    expected = maps[0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    torch.testing.assert_close(torch.as_tensor(np.asarray(head0), dtype=torch.float32), expected)


def test_pictures_fall_back_to_sample_photos(tiny_run):
    pytest.importorskip("skimage.data")
    cfg = read_run(tiny_run).config.copy()
    cfg.evaluation.knn_test_dataset = "/nonexistent/images"
    cfg.evaluation.knn_train_dataset = None
    cfg.train.dataset = "pipe:curl -s http://example.invalid/x.tar"  # never run just for pictures
    images, source, notes = sample_images(cfg, 2)
    assert source == "scikit-image sample photos" and [name for name, _ in images] == ["astronaut", "chelsea"]
    assert len(notes) == 1 and notes[0].startswith("/nonexistent/images: FileNotFoundError")


def test_cli(tiny_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("report_tool", REPO / "tools" / "report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "r.html"
    assert tool.main([str(tiny_run), "--output", str(out), "--no-pictures"]) == 0
    assert parse(out).sections == [s for s in SECTIONS if s != "pictures"]
    assert tool.main([str(tmp_path)]) == 2
    assert "is not a dinoscale run directory: it has no config.yaml" in capsys.readouterr().err
    with pytest.raises(NotARunError):
        write_report(tmp_path)
