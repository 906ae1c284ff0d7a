import pytest
import torch

from dinoscale import hub
from dinoscale.device import inference_autocast_dtype
from dinoscale.eval.extract import extract_features
from dinoscale.eval.knn import knn_classify
from dinoscale.eval.linear import train_linear_probes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_extraction_autocast_knn_and_probe_match_cpu():
    torch.manual_seed(0)
    model = hub.dinov2_vits14(pretrained=False, embed_dim=64, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 28, 28, generator=g)
    ds = list(zip(images, (torch.arange(40) % 4).tolist()))
    cpu = extract_features(model, ds, batch_size=16, autocast_dtype="fp32", progress=False)
    assert inference_autocast_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    gpu = extract_features(model, ds, batch_size=16, device="cuda", progress=False)  # default autocast
    assert gpu["cls"].device.type == "cpu" and gpu["cls"].dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"  # moved back after the pass
    cos = torch.nn.functional.cosine_similarity(gpu["cls"], cpu["cls"], dim=1)
    assert cos.min() > 0.98
    res_cpu = knn_classify(cpu["cls"], cpu["labels"], cpu["cls"], cpu["labels"], ks=(1, 5))
    res_gpu = knn_classify(cpu["cls"].cuda(), cpu["labels"].cuda(), cpu["cls"].cuda(), cpu["labels"].cuda(), ks=(1, 5))
    for k in (1, 5):  # allow one query (2.5%) to flip on a near-tie between devices
        assert abs(res_gpu[k]["top1"] - res_cpu[k]["top1"]) <= 2.5
    cache = {"cls_blocks": cpu["cls"][:, None], "labels": cpu["labels"]}
    res = train_linear_probes(
        cache, cache, cache, n_last_blocks_list=(1,), avgpool_list=(False,), learning_rates=(0.1,), epochs=2,
        device="cuda",
    )
    assert 0 <= res["test_top1"] <= 100
