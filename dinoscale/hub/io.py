"""Reading checkpoints: files, ``save_pretrained`` directories, torch.distributed.checkpoint directories, URLs.

Every ``torch.load`` here runs with ``weights_only=True``: tensors and plain containers only, no arbitrary
objects are unpickled. Safetensors files are read with ``safetensors``; a DCP directory with
:func:`dinoscale.checkpoint.read_dcp_checkpoint` (tensors only). A URL (any file type) is downloaded once into
torch.hub's cache (:func:`url_cache_path`) and read from there; a cached file is read without network. What
comes back is the raw object (usually a possibly nested dict of tensors); finding and converting the backbone
in it is ``dinoscale.hub.convert``'s job. Every failure is a :class:`WeightsLoadError` naming the file or URL.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file as load_safetensors

from dinoscale.checkpoint import CheckpointError, read_dcp_checkpoint

MAX_LISTED = 12  # names shown in an error message before "... and N more"


class WeightsLoadError(ValueError):
    """Weights could not be read, or do not match the model (detected layout and mismatches in the message)."""


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with a little-endian u64 header length followed by a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save (zip) file cannot be opened, if the zip structure itself is broken."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"the zip archive is truncated or corrupt (no central directory; {path.stat().st_size} bytes)"
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"the zip archive is corrupt ({e})"
        if bad is not None:
            return f"the zip archive is corrupt (bad CRC in member {bad})"
    return None


def _torch_load(path: Path):
    problem = _zip_problem(path)
    if problem is not None:
        raise WeightsLoadError(f"could not read checkpoint file {path}: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:  # not torch.save's format: a legacy pickle or garbage
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = f"not a torch.save zip archive nor a safetensors file, and unpickling failed ({first_line})"
        else:  # torch.save's format, holding objects other than tensors and plain containers
            reason = str(e)
        raise WeightsLoadError(f"could not read checkpoint file {path} ({path.stat().st_size} bytes): {reason}") from e


def _read_file(path: Path):
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            return load_safetensors(str(path), device="cpu")
        return _torch_load(path)
    except WeightsLoadError:
        raise
    except Exception as e:  # truncated pickle, bad header, ... -- name the file and the reason
        size = path.stat().st_size
        raise WeightsLoadError(
            f"could not read checkpoint file {path} ({size} bytes): {type(e).__name__}: {e}"
        ) from e


def _read_dcp(path: Path) -> dict:
    try:
        return read_dcp_checkpoint(path)
    except CheckpointError as e:
        raise WeightsLoadError(f"could not read distributed checkpoint {path}: {e}") from e


def _read_hf_directory(path: Path) -> dict | None:
    """State dict of a ``save_pretrained`` directory (single file or sharded with an index), else None."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return _read_file(path / single)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsLoadError(f"could not read shard index {path / index}: {e}") from e
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(_read_file(path / shard))
            return state_dict
    return None


def url_cache_path(url: str) -> Path:
    """Where a URL's file is cached: torch.hub's ``get_dir()/checkpoints/<file name of the URL>``.

    The same file ``torch.hub.load_state_dict_from_url`` (and upstream DINOv2's hub) uses, so a file it already
    downloaded is reused; ``$TORCH_HOME`` moves the cache (``$TORCH_HOME/hub/checkpoints``).
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise WeightsLoadError(f"could not load weights from {url}: the URL names no file")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _read_url(url: str):
    """Read a URL's file from torch.hub's cache, downloading it there first if absent.

    A cached file is read without touching the network. Every failure is one :class:`WeightsLoadError` naming
    the URL and its cause (the download's traceback is not chained: the message carries it); a failed download
    names the path to put the file at by hand.
    """
    cached = url_cache_path(url)
    downloaded = False
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written to a temporary file and renamed when complete: a broken download leaves no cached file.
            torch.hub.download_url_to_file(url, str(cached), progress=True)
        except Exception as e:
            raise WeightsLoadError(
                f"could not download {url}: {type(e).__name__}: {e}\n"
                f"  without network: download it elsewhere and put it at {cached} "
                "(torch.hub's cache, torch.hub.get_dir()/checkpoints; $TORCH_HOME moves it); it is then read "
                "from there"
            ) from None
        downloaded = True
    try:
        return _read_file(cached)
    except WeightsLoadError as e:
        if downloaded:
            cached.unlink(missing_ok=True)  # a bad download must not be found in the cache next time
            advice = "the downloaded file was removed from the cache"
        else:
            advice = f"delete the cached file {cached} to download it again"
        raise WeightsLoadError(f"could not load weights from {url}: {e}\n  {advice}") from None


def read_checkpoint(path_or_url: str | os.PathLike):
    """Read a checkpoint file, directory (HF ``save_pretrained`` or torch.distributed.checkpoint) or URL."""
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        return _read_url(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _read_dcp(path)
        state_dict = _read_hf_directory(path)
        if state_dict is None:
            listing = sorted(p.name for p in path.iterdir())[:MAX_LISTED]
            raise WeightsLoadError(
                f"directory {path} is neither a torch.distributed.checkpoint (no .metadata) nor a "
                f"save_pretrained directory (no model.safetensors / pytorch_model.bin); it contains {listing}"
            )
        return state_dict
    return _read_file(path)
