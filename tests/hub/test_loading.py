"""load_state_dict_any: parity with timm and Hugging Face models (same features at several image sizes, the
interpolation following the weights' source), official and training-checkpoint layouts, readable errors."""

import logging

import pytest
import torch

from dinoscale import hub
from dinoscale.hub import WeightsLoadError, load_state_dict_any
from tests.hub.conftest import TINY_NAMED, assert_same_features, assert_same_weights, randomize_, tiny

SIZES = [(224, 224), (224, 168)]  # square and non-square, both interpolated from the trained grid


# ------------------------------------------------------------------------------------- timm


def test_timm_reg4_parity():
    timm = pytest.importorskip("timm")
    # depth=2 keeps the test fast; widths, heads and token layout are the real ViT-S/14-reg4 ones.
    ref = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112, dynamic_img_size=True, depth=2
    )
    ref = randomize_(ref).eval()
    # The release hyper-parameters of the register models (antialias, no offset) are what timm implements.
    ours = hub.dinov2_vits14_reg(pretrained=False, img_size=112, depth=2).eval()
    assert load_state_dict_any(ours, ref.state_dict()) == "timm"
    torch.manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            tokens = ref.forward_features(x)
        assert_same_features(ours, x, tokens[:, 0], tokens[:, 5:], tokens[:, 1:5])


def test_timm_giant_packed_swiglu_and_split_qkv():
    timm = pytest.importorskip("timm")
    ref = timm.create_model(
        "vit_giant_patch14_dinov2", pretrained=False, img_size=56, depth=2, embed_dim=48, num_heads=2
    )
    ref = randomize_(ref).eval()
    sd = ref.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].shape == (256, 48)  # packed: 2 x 128
    # The same weights with split q/k/v projections must load identically.
    split = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                split[k.replace(".qkv.", f".{name}.")] = part
        else:
            split[k] = v
    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = ref.forward_features(x)
    for state_dict in (sd, split):
        ours = hub.dinov2_vitg14(pretrained=False, img_size=56, depth=2, embed_dim=48, num_heads=2,
                                 interpolate_offset=0.0, interpolate_antialias=True).eval()
        assert load_state_dict_any(ours, state_dict) == "timm"
        assert_same_features(ours, x, tokens[:, 0], tokens[:, 1:])


# ------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("swiglu", [False, True])
def test_huggingface_dinov2_parity(tmp_path, swiglu):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
        use_swiglu_ffn=swiglu,
    )
    ref = randomize_(transformers.Dinov2Model(cfg)).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    # Dinov2Model resizes position embeddings to the exact grid without antialiasing.
    ours = tiny(ffn_layer="swiglu" if swiglu else "mlp", interpolate_offset=0.0, interpolate_antialias=False)
    assert load_state_dict_any(ours, tmp_path) == "huggingface"
    from_file = tiny(ffn_layer="swiglu" if swiglu else "mlp", interpolate_offset=0.0)
    load_state_dict_any(from_file, tmp_path / "model.safetensors")
    in_memory = tiny(ffn_layer="swiglu" if swiglu else "mlp", interpolate_offset=0.0)
    load_state_dict_any(in_memory, ref.state_dict())  # transformers' in-memory names (q_proj, gate_proj, ...)
    assert_same_weights(ours, from_file)
    assert_same_weights(ours, in_memory)
    torch.manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            hidden = ref(pixel_values=x).last_hidden_state  # after layernorm: [cls, patches]
        assert_same_features(ours, x, hidden[:, 0], hidden[:, 1:])


def test_huggingface_with_registers_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
        num_register_tokens=4,
    )
    ref = randomize_(transformers.Dinov2WithRegistersModel(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = tiny(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    assert load_state_dict_any(ours, tmp_path) == "huggingface"
    torch.manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            hidden = ref(pixel_values=x).last_hidden_state  # [cls, registers, patches]
        assert_same_features(ours, x, hidden[:, 0], hidden[:, 5:], hidden[:, 1:5])


def test_huggingface_bin_and_classifier_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, num_labels=3
    )
    clf = randomize_(transformers.Dinov2ForImageClassification(cfg))
    torch.save(clf.state_dict(), tmp_path / "pytorch_model.bin")  # keys under "dinov2.", plus "classifier."
    ours = tiny(interpolate_offset=0.0)
    assert load_state_dict_any(ours, tmp_path / "pytorch_model.bin") == "huggingface"
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        hidden = clf.dinov2(pixel_values=x).last_hidden_state
    assert_same_features(ours, x, hidden[:, 0], hidden[:, 1:])


# ------------------------------------------------------------------------------------- official layout


def test_official_layout_round_trip(tmp_path):
    src = randomize_(hub.dinov2_vits14(pretrained=False, img_size=56, depth=2))
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    plain = hub.dinov2_vits14(pretrained=False, img_size=56, depth=2)
    plain.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True), strict=True)
    assert_same_weights(plain, src)
    via_loader = hub.dinov2_vits14(pretrained=False, img_size=56, depth=2)
    assert load_state_dict_any(via_loader, tmp_path / "backbone.pth") == "dinov2"
    assert_same_weights(via_loader, src)


def test_chunked_block_names_and_missing_mask_token():
    src = randomize_(tiny(depth=4))
    # DINOv2 training code with block_chunks=2: blocks.<chunk>.<global index>.
    chunked = {}
    for k, v in src.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k.split('.', 1)[1]}"
        chunked[k] = v
    del chunked["mask_token"]
    ours = tiny(depth=4)
    mask_token_before = ours.mask_token.detach().clone()
    load_state_dict_any(ours, chunked)
    assert torch.equal(ours.mask_token, mask_token_before)
    src_sd = src.state_dict()
    assert all(torch.equal(v, src_sd[k]) for k, v in ours.state_dict().items() if k != "mask_token")


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
def test_pos_embed_of_another_grid_is_interpolated(offset, antialias):
    big = randomize_(tiny(img_size=70, interpolate_offset=offset, interpolate_antialias=antialias))  # 5x5 grid
    small = tiny(img_size=28, interpolate_offset=offset, interpolate_antialias=antialias)  # 2x2 grid
    load_state_dict_any(small, big.state_dict())
    assert small.pos_embed.shape == (1, 5, 32)
    # Resampled as the big model does at run time, so both agree at the small model's native size.
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = big.forward_features(x)
    assert_same_features(small, x, ref["x_norm_clstoken"], ref["x_norm_patchtokens"], atol=1e-5)
    assert small.forward_features(torch.randn(1, 3, 42, 56))["x_norm_patchtokens"].shape == (1, 12, 32)


# ------------------------------------------------------------------------------------- training checkpoints


def test_training_checkpoint_prefers_teacher_backbone(tmp_path):
    student, teacher = randomize_(tiny(), seed=1), randomize_(tiny(), seed=2)
    ckpt = {
        "model": {
            **{f"module.student.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.teacher.backbone._orig_mod.{k}": v for k, v in teacher.state_dict().items()},
            "module.teacher.dino_head.mlp.0.weight": torch.randn(8, 32),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "iteration": 12,
    }
    torch.save(ckpt, tmp_path / "ckpt.pth")
    ours = tiny()
    assert load_state_dict_any(ours, tmp_path / "ckpt.pth") == "dinov2"
    assert_same_weights(ours, teacher)


@pytest.mark.parametrize("wrapper", ["teacher", "state_dict", "model"])
def test_wrapped_and_prefixed_state_dicts(tmp_path, wrapper):
    from safetensors.torch import save_file

    src = randomize_(tiny())
    prefixed = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    ours = tiny()
    load_state_dict_any(ours, {wrapper: prefixed})
    assert_same_weights(ours, src)
    save_file({f"module.backbone.{k}": v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    ours = tiny()
    load_state_dict_any(ours, tmp_path / "w.safetensors")
    assert_same_weights(ours, src)


def test_two_untagged_backbones_are_ambiguous():
    a = tiny().state_dict()
    with pytest.raises(WeightsLoadError, match="several backbones"):
        load_state_dict_any(tiny(), {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in a.items()}})


def test_distributed_checkpoint_directory(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    student, teacher = randomize_(tiny(), seed=1), randomize_(tiny(), seed=2)
    state = {
        "model": {"student": {"backbone": student.state_dict()}, "teacher": {"backbone": teacher.state_dict()}},
        "iteration": torch.tensor(7),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "step_7"))
    assert (tmp_path / "step_7" / ".metadata").is_file()
    ours = tiny()
    load_state_dict_any(ours, tmp_path / "step_7")
    assert_same_weights(ours, teacher)


UNPICKLED = []


class _RecordsUnpickling:
    """Unpickling an instance calls ``_record_unpickling``: shows whether a reader unpickled it."""

    def __reduce__(self):
        return _record_unpickling, ()


def _record_unpickling():
    UNPICKLED.append(True)
    return "unpickled"


def test_checkpoints_are_read_without_unpickling_objects(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from dinoscale.checkpoint import read_dcp_checkpoint

    src = randomize_(tiny())
    state = {"teacher": {"backbone": src.state_dict()}, "optimizer": {"param_groups": [{"lr": 0.1}]},
             "trusted": _RecordsUnpickling(), "step": torch.tensor(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    UNPICKLED.clear()
    read = read_dcp_checkpoint(tmp_path / "ckpt")
    assert set(read) == {"teacher", "step"} and torch.equal(read["step"], torch.tensor(3))
    ours = tiny()
    load_state_dict_any(ours, tmp_path / "ckpt")
    assert_same_weights(ours, src)
    # a torch.save file is read with weights_only=True: the object is refused, not unpickled
    torch.save({"model": src.state_dict(), "trusted": _RecordsUnpickling()}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsLoadError, match=r"ckpt\.pth"):
        load_state_dict_any(tiny(), tmp_path / "ckpt.pth")
    assert UNPICKLED == []


# ------------------------------------------------------------------------------------- errors


def test_wrong_architecture_lists_the_mismatches(tmp_path):
    torch.save(tiny(depth=3, num_register_tokens=4).state_dict(), tmp_path / "other.pth")
    target = tiny(depth=2, embed_dim=48)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsLoadError) as info:
        load_state_dict_any(target, tmp_path / "other.pth")
    message = str(info.value)
    assert "other.pth" in message and "layout 'dinov2'" in message
    assert "unexpected keys" in message and "blocks.2.attn.qkv.weight" in message and "register_tokens" in message
    assert "shape mismatches" in message and "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in message
    assert "... and" in message  # long lists are truncated
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing loaded half-way


def test_missing_keys_are_listed():
    sd = tiny().state_dict()
    del sd["blocks.1.norm2.weight"]
    with pytest.raises(WeightsLoadError, match=r"missing keys \(1\): blocks\.1\.norm2\.weight"):
        load_state_dict_any(tiny(), sd)


# ------------------------------------------------------------------------------------- interpolation follows the source

OTHER_SIZES = [(98, 98), (42, 70)]  # both away from the 56 px the tiny references are configured for


def ours_hidden(model, x) -> torch.Tensor:
    """``[cls, registers, patches]`` after the final norm, as transformers' last_hidden_state orders them."""
    with torch.no_grad():
        out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


def release_model_with_other_interpolation(registers: int):
    # The original release's interpolation (+0.1 offset, no antialias), which neither library uses.
    model = hub.dinov2_vits14(pretrained=False, num_register_tokens=registers, **{**TINY_NAMED, "depth": 2}).eval()
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.1, False)
    return model


@pytest.mark.parametrize("registers", [0, 4])
def test_huggingface_weights_bring_transformers_interpolation(tmp_path, registers):
    transformers = pytest.importorskip("transformers")
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    if registers:
        ref = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**sizes, num_register_tokens=registers)
        )
    else:
        ref = transformers.Dinov2Model(transformers.Dinov2Config(**sizes))
    ref = randomize_(ref).eval()
    ref.save_pretrained(tmp_path)
    ours = release_model_with_other_interpolation(registers)
    kept = release_model_with_other_interpolation(registers)
    assert load_state_dict_any(ours, tmp_path) == "huggingface"
    assert load_state_dict_any(kept, tmp_path, interpolation="model") == "huggingface"
    assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.0, bool(registers))
    assert (kept.interpolate_offset, kept.interpolate_antialias) == (0.1, False)
    torch.manual_seed(0)
    for h, w in OTHER_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = ref(pixel_values=x)
        assert (ours_hidden(ours, x) - out.last_hidden_state).abs().max() <= 1e-5
        with torch.no_grad():
            cls = ours.forward_features(x)["x_norm_clstoken"]
        assert (cls - out.pooler_output).abs().max() <= 1e-5
        # The release's own interpolation gives other features: the switch is what makes them equal.
        assert (ours_hidden(kept, x) - out.last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize(
    "timm_name, registers", [("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 4)]
)
def test_timm_weights_bring_timm_interpolation(timm_name, registers):
    timm = pytest.importorskip("timm")
    ref = timm.create_model(timm_name, pretrained=False, img_size=56, dynamic_img_size=True, depth=2, embed_dim=32,
                            num_heads=2)
    ref = randomize_(ref).eval()
    ours = release_model_with_other_interpolation(registers)
    kept = release_model_with_other_interpolation(registers)
    # The plain model has the official key names; its missing mask token tells timm's apart.
    assert load_state_dict_any(ours, ref.state_dict()) == "timm"
    load_state_dict_any(kept, ref.state_dict(), interpolation="model")
    assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.0, True)
    torch.manual_seed(0)
    for h, w in OTHER_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            tokens = ref.forward_features(x)  # [cls, registers, patches] after the final norm
        assert (ours_hidden(ours, x) - tokens).abs().max() <= 1e-5
        assert (ours_hidden(kept, x) - tokens).abs().max() > 1e-3


def test_interpolation_switch_is_logged_once(monkeypatch, caplog):
    from dinoscale.hub import loading

    monkeypatch.setattr(loading, "_LOGGED_SWITCHES", set())
    state_dict = tiny().state_dict()
    del state_dict["mask_token"]  # timm's layout
    with caplog.at_level(logging.INFO, logger="dinoscale.hub.loading"):
        for _ in range(3):
            load_state_dict_any(tiny(), state_dict)
    switches = [r.getMessage() for r in caplog.records if "interpolation follows" in r.getMessage()]
    assert len(switches) == 1
    assert "timm" in switches[0] and "interpolate_offset=0.1" in switches[0] and "interpolation='model'" in switches[0]


def test_official_layout_keeps_the_model_interpolation():
    src = randomize_(tiny())
    for offset, antialias in [(0.1, False), (0.0, True)]:
        ours = tiny(interpolate_offset=offset, interpolate_antialias=antialias)
        assert load_state_dict_any(ours, src.state_dict()) == "dinov2"
        assert (ours.interpolate_offset, ours.interpolate_antialias) == (offset, antialias)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        load_state_dict_any(tiny(), src.state_dict(), interpolation="timm")


def test_failed_load_leaves_the_interpolation():
    state_dict = tiny(depth=3).state_dict()
    del state_dict["mask_token"]  # timm's layout, but one block too many
    ours = tiny()
    with pytest.raises(WeightsLoadError, match="unexpected keys"):
        load_state_dict_any(ours, state_dict)
    assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.1, False)
