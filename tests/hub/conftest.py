"""Shared by the hub tests: tiny backbones, non-trivial random weights, comparisons, and network stand-ins
(an offline torch.hub cache, a local HTTP server). No test reaches the internet."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from dinoscale.hub import zoo
from dinoscale.models.vit import DinoVisionTransformer

REPO_ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(autouse=True)
def fresh_random_weights_notice(monkeypatch):
    """Each test starts as a fresh process would: the random-weights warning not yet given."""
    monkeypatch.setattr(zoo, "_RANDOM_WEIGHTS_SAID", set())


def tiny(**kwargs) -> DinoVisionTransformer:
    params = dict(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
    params.update(kwargs)
    return DinoVisionTransformer(**params).eval()


# Overrides that make a named model tiny (same layout as the release: LayerScale, heads of width 16; as many
# blocks as the released linear heads read).
TINY_NAMED = dict(img_size=56, embed_dim=32, depth=4, num_heads=2)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights (library inits leave LayerScale ~1e-5 and biases at 0, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "gamma" in name or "lambda" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def assert_same_features(ours, x, cls_ref, patch_ref, reg_ref=None, atol=1e-4):
    with torch.no_grad():
        out = ours.forward_features(x)
    assert (out["x_norm_clstoken"] - cls_ref).abs().max() <= atol
    assert (out["x_norm_patchtokens"] - patch_ref).abs().max() <= atol
    if reg_ref is not None:
        assert (out["x_norm_regtokens"] - reg_ref).abs().max() <= atol


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """torch.hub's cache under tmp_path (returned: its ``checkpoints`` folder), and no network: every URL
    opened goes through a proxy at a closed local port, so a download fails the way it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    closed = f"http://127.0.0.1:{_closed_port()}"
    offline = urllib.request.build_opener(urllib.request.ProxyHandler({"http": closed, "https": closed}))
    monkeypatch.setattr(urllib.request, "_opener", offline)  # the opener urllib.request.urlopen uses
    return tmp_path / "torch" / "hub" / "checkpoints"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on stderr
        pass


@pytest.fixture
def http_files(tmp_path, monkeypatch):
    """``(folder, base_url)``: a local HTTP server for the files of ``folder``; torch.hub's cache in tmp_path and
    no proxy (the environment's would not reach 127.0.0.1)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(urllib.request, "_opener", urllib.request.build_opener(urllib.request.ProxyHandler({})))
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()
