"""Layout detection: the official names without a mask token are timm's; chunked training names stay official."""

import re

from dinoscale.hub import convert_to_dinov2, detect_layout
from tests.hub.conftest import tiny


def test_official_names_without_mask_token_are_timm():
    state_dict = tiny().state_dict()
    assert detect_layout(state_dict) == "dinov2"
    del state_dict["mask_token"]
    assert detect_layout(state_dict) == "timm"
    converted, layout = convert_to_dinov2(state_dict)
    assert layout == "timm" and converted.keys() == state_dict.keys()


def test_chunked_training_names_without_mask_token_stay_official():
    # DINOv2's training code with block_chunks=2 over 4 blocks: blocks.<chunk>.<global index>.
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.", k): v
               for k, v in tiny(depth=4).state_dict().items() if k != "mask_token"}
    assert "blocks.1.3.norm1.weight" in chunked
    assert detect_layout(chunked) == "dinov2"
    converted, _ = convert_to_dinov2(chunked)
    assert "blocks.3.norm1.weight" in converted
