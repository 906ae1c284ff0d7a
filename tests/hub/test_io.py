"""Reading checkpoints: damaged files, and URLs (served by a local HTTP server; torch.hub's cache in tmp)."""

import pytest
import torch
from safetensors.torch import save_file

from dinoscale.hub import WeightsLoadError, load_state_dict_any, read_checkpoint, url_cache_path
from tests.hub.conftest import assert_same_weights, randomize_, tiny


def test_truncated_files_raise_weights_load_error(tmp_path):
    sd = tiny().state_dict()
    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsLoadError, match=r"checkpoint file .*cut\.pth: the zip archive is truncated"):
        load_state_dict_any(tiny(), tmp_path / "cut.pth")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the tensor data: caught by the zip CRC, not loaded silently
    (tmp_path / "flipped.pth").write_bytes(bytes(flipped))
    with pytest.raises(WeightsLoadError, match=r"flipped\.pth: the zip archive is corrupt"):
        load_state_dict_any(tiny(), tmp_path / "flipped.pth")
    save_file(sd, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsLoadError, match=r"could not read checkpoint file .*cut\.safetensors"):
        load_state_dict_any(tiny(), tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsLoadError, match="neither a torch.distributed.checkpoint"):
        load_state_dict_any(tiny(), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_state_dict_any(tiny(), tmp_path / "nothere.pth")



# ------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_url_is_downloaded_once_into_torch_hub_cache(http_files, tmp_path, monkeypatch, name):
    folder, base = http_files
    src = randomize_(tiny())
    if name.endswith(".safetensors"):
        save_file(src.state_dict(), folder / name)
    else:
        torch.save(src.state_dict(), folder / name)
    url = f"{base}/{name}"
    ours = tiny()
    assert load_state_dict_any(ours, url) == "dinov2"
    assert_same_weights(ours, src)
    cached = url_cache_path(url)
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / name and cached.is_file()  # $TORCH_HOME/hub
    (folder / name).unlink()  # gone from the server: the cached copy is read, no request made

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    again = tiny()
    load_state_dict_any(again, url)
    assert_same_weights(again, src)


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pth", "missing.bin"])
def test_url_failure_is_one_weights_load_error_naming_url_cause_and_cache_path(http_files, name):
    _, base = http_files
    url = f"{base}/{name}"
    with pytest.raises(WeightsLoadError) as info:
        load_state_dict_any(tiny(), url)
    message = str(info.value)
    assert url in message and "HTTP Error 404" in message
    assert str(url_cache_path(url)) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, not a chain
    assert not url_cache_path(url).exists() and list(url_cache_path(url).parent.iterdir()) == []  # no partial file


def test_refused_connection_names_the_url(offline_hub):
    url = "https://dl.example.invalid/some/weights.safetensors"
    with pytest.raises(WeightsLoadError, match="could not download https://dl.example.invalid/some/weights") as info:
        read_checkpoint(url)
    assert "URLError" in str(info.value) and str(offline_hub / "weights.safetensors") in str(info.value)


def test_unreadable_download_is_removed_from_the_cache(http_files):
    folder, base = http_files
    (folder / "bad.pth").write_bytes(b"PK\x03\x04 not really a zip archive")
    url = f"{base}/bad.pth"
    with pytest.raises(WeightsLoadError, match=r"(?s)could not load weights from .*bad\.pth.*truncated or corrupt"
                       r".*removed from the cache"):
        load_state_dict_any(tiny(), url)
    assert not url_cache_path(url).exists()
    # A damaged file already in the cache (put there by hand) is named, not deleted.
    url_cache_path(url).write_bytes(b"PK\x03\x04 still not a zip archive")
    with pytest.raises(WeightsLoadError, match=r"delete the cached file .*bad\.pth"):
        load_state_dict_any(tiny(), url)
    assert url_cache_path(url).exists()


def test_url_without_a_file_name():
    with pytest.raises(WeightsLoadError, match="names no file"):
        read_checkpoint("https://example.invalid/folder/")
