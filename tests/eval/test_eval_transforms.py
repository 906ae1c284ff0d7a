import io

import pytest
import torch
from PIL import Image

from dinoscale.eval.transforms import EvalTransform, eval_transform


def test_eval_transform_inputs_and_sizes():
    t = eval_transform(30, 14)  # rounds to 28; resize shorter side to 32 then crop 28
    assert isinstance(t, EvalTransform) and t.crop_size == 28 and t.resize_size == 32
    gray = torch.randint(0, 256, (40, 50), dtype=torch.uint8)
    x = t(gray)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    # Grayscale replicated to three channels, then each channel normalised with its own stats.
    torch.testing.assert_close(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456)
    buf = io.BytesIO()
    Image.new("L", (64, 48), color=128).save(buf, format="PNG")
    y = t(buf.getvalue())
    assert y.shape == (3, 28, 28)
    torch.testing.assert_close(y[0], torch.full((28, 28), (128 / 255 - 0.485) / 0.229), atol=1e-3, rtol=0)
    assert t(Image.new("RGBA", (28, 60))).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="channels"):
        t(torch.zeros(2, 20, 20, dtype=torch.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        t("not an image")
