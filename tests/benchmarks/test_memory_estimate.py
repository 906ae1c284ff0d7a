"""benchmarks/memory_estimate.py's like-with-like rows: our configs read as configured (the ViT-L/14 config is
not DINOv2's ViT-L recipe), the estimate of the code before the LayerScale fold, FSDP on one rank, and --against
estimating exactly the step a train_step.py JSON line measured."""

import json

import pytest

GiB = 1024**3


@pytest.fixture(scope="module")
def me(load_benchmark):
    return load_benchmark("memory_estimate")


def test_our_configs_are_read_as_configured(me):
    vitl, ac = me.config_recipe("train/vitl14")
    assert (vitl.ffn_layer, vitl.n_prototypes, vitl.bottleneck_dim, vitl.separate_ibot_head) == (
        "mlp", 65536, 256, False)
    assert vitl.batch_per_gpu == 64 and ac is True
    dinov2_vitl = next(r for r in me.RECIPES if r.name == "ViT-L/14")
    assert (dinov2_vitl.ffn_layer, dinov2_vitl.n_prototypes, dinov2_vitl.batch_per_gpu) == ("swiglufused", 131072, 32)
    # our ViT-g/14 config is DINOv2's recipe: the same estimate
    vitg, ac = me.config_recipe("train/vitg14")
    dinov2_vitg = next(r for r in me.RECIPES if r.name == "ViT-g/14")
    assert ac is True
    assert me.estimate(vitg, shards=8, activation_checkpointing=True) == me.estimate(
        dinov2_vitg, shards=8, activation_checkpointing=True)
    overridden, ac = me.config_recipe("train/vitl14", ["train.batch_size_per_rank=32",
                                                        "compute.activation_checkpointing=false"])
    assert overridden.batch_per_gpu == 32 and ac is False
    with pytest.raises(ValueError, match="selective"):
        me.config_recipe("train/vitl14", ["compute.activation_checkpointing=selective"])
    with pytest.raises(ValueError, match="patch"):
        me.config_recipe("quickstart")


def test_output_scaled_layerscale_keeps_two_values_per_token_and_no_weights(me):
    vitl, _ = me.config_recipe("train/vitl14")
    folded = me.estimate(vitl, shards=1, activation_checkpointing=False, batch=2)
    before = me.estimate(vitl, shards=1, activation_checkpointing=False, batch=2, layerscale_folded=False)
    D, L, T = 1024, 24, 2 * me.tokens_per_image()[0]
    w = D * D + D * 4 * D  # proj and fc2, scaled
    assert before["activations"] - folded["activations"] == pytest.approx(L * (2 * D * T - w) * 2)
    assert before["total"] - before["activations"] == folded["total"] - folded["activations"]


def test_fsdp_on_one_rank_gathers_units_and_shards_no_state(me):
    vitg, _ = me.config_recipe("train/vitg14")
    plain = me.estimate(vitg, shards=1, activation_checkpointing=True)
    one_rank = me.estimate(vitg, shards=1, activation_checkpointing=True, fsdp=True)
    assert one_rank["states"] == plain["states"]
    assert one_rank["compute"] == 2 * (2 + 2 + 4) * me.model_numbers(vitg)["largest_unit"] < plain["compute"]


def test_against_estimates_the_measured_step(me, tmp_path):
    rows = [
        {"config": "vitl14", "variant": "bf16-eager", "fsdp": False, "batch": 32, "peak_memory_gib": 37.2},
        {"config": "vitl14", "variant": "fp32-eager", "fsdp": False, "batch": 4, "peak_memory_gib": None},  # CPU
        {"config": "vitg14", "variant": "bf16-eager", "fsdp": True, "batch": 12, "peak_memory_gib": 25.0,
         "attn_env": "xformers"},
    ]
    path = tmp_path / "step.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = me.against(path).splitlines()
    assert len(lines) == 2 + 2  # header, rule, the two bf16 GPU rows
    vitl, _ = me.config_recipe("train/vitl14", ["compute.activation_checkpointing=false",
                                                 "train.batch_size_per_rank=32"])
    e = [me.estimate(vitl, shards=1, activation_checkpointing=False, layerscale_folded=f) for f in (False, True)]
    expected = " / ".join(f"{(x['total'] - x['overhead']) / GiB:.1f}" for x in e)
    assert "ViT-L/14 mlp, one shared 65536 | 32 | no | no | 37.2 GiB" in lines[2], lines[2]
    assert f"| {expected} GiB |" in lines[2], (expected, lines[2])
    assert "DINOSCALE_ATTN=xformers" in lines[3] and "DINO + iBOT 131072 | 12 | full | yes" in lines[3], lines[3]
