"""The segmenter: backbone weights, loss, learning-rate schedule, weights files, prediction."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torchvision

from syntagen_st.core.checks import validate_train
from syntagen_st.core.config import TrainConfig
from syntagen_st.core.errors import UserError
from syntagen_st.core.store import sha256_file
from syntagen_st.segmentation.module import PolyDecay, SegModule, seg_loss
from syntagen_st.segmentation.network import build_segmenter, load_model, predict_proba, save_weights, write_checksum

TINY = "lraspp_mobilenet_v3_large"


def test_backbone_weights_file_is_really_loaded(tmp_path):
    reference = torchvision.models.resnet50(weights=None)  # random: any match is no accident
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    cfg = TrainConfig(arch="deeplabv3_resnet50", backbone_weights=str(path))
    validate_train(cfg)
    backbone = SegModule(cfg).model.backbone.state_dict()
    source = reference.state_dict()
    assert set(backbone) == {k for k in source if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(value, source[key]), key


def test_mobilenet_backbone_from_prefixed_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_segmenter(TINY, str(path))
    first = model.backbone["0"][0].weight  # IntermediateLayerGetter over mobilenet.features
    assert torch.equal(first, reference.features[0][0].weight)


def test_wrong_backbone_file_is_one_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="other.pth") as err:
        build_segmenter("deeplabv3_resnet50", str(path))
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth: unreadable weights file"):
        build_segmenter(TINY, str(tmp_path / "junk.pth"))


def test_no_backbone_weights_warns_what_it_costs(tmp_path):
    with pytest.warns(UserWarning) as record:
        SegModule(TrainConfig(arch=TINY, backbone_weights="none"))
    message = " ".join(str(w.message) for w in record)
    for words in ("random weights", "lower mIoU", "ImageNet", "local state-dict file"):
        assert words in message, message
    # A backbone from a file is the user's informed choice: no warning then.
    path = tmp_path / "backbone.safetensors"
    reference = torchvision.models.mobilenet_v3_large(weights=None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SegModule(TrainConfig(arch=TINY, backbone_weights=str(path)))


def test_loss_ignores_255_and_weights_pixels():
    logits = torch.randn(2, 21, 8, 8)
    target = torch.randint(0, 21, (2, 8, 8))
    plain = seg_loss({"out": logits}, target, 0.5)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, target))
    ignored = target.clone()
    ignored[0] = 255
    assert torch.allclose(seg_loss({"out": logits}, ignored, 0.5), torch.nn.functional.cross_entropy(logits[1:], target[1:]))
    assert seg_loss({"out": logits}, torch.full_like(target, 255), 0.5).item() == 0.0  # not NaN
    with_aux = seg_loss({"out": logits, "aux": logits}, target, 0.5)
    assert torch.allclose(with_aux, 1.5 * plain)
    weight = torch.zeros(2, 8, 8)
    weight[1] = 1.0  # confidence 0 on the first image: it does not count
    assert torch.allclose(seg_loss({"out": logits}, target, 0.5, weight), torch.nn.functional.cross_entropy(logits[1:], target[1:]))


def test_poly_schedule_and_aux_head_rate():
    decay = PolyDecay(100, 0.9)
    assert decay(0) == 1.0 and decay(100) == 0.0 and decay(150) == 0.0
    assert decay(50) == pytest.approx(0.5**0.9)
    cfg = TrainConfig(arch="deeplabv3_mobilenet_v3_large", backbone_weights="none", lr=0.02)
    with pytest.warns(UserWarning):
        module = SegModule(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02, pytest.approx(0.2)]
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4


def test_weights_roundtrip_and_prediction(tmp_path):
    model = build_segmenter("deeplabv3_mobilenet_v3_large").eval()
    weights = tmp_path / "model.safetensors"
    digest = save_weights(model, weights, "deeplabv3_mobilenet_v3_large")
    assert write_checksum(weights) == digest == sha256_file(weights)
    assert (tmp_path / "checksum.txt").read_text() == f"{digest}  model.safetensors\n"
    # same weights, same bytes: safetensors would otherwise order metadata entries at random
    assert {save_weights(model, tmp_path / f"again{i}.safetensors", "deeplabv3_mobilenet_v3_large") for i in range(4)} == {digest}
    loaded = load_model(weights)
    assert loaded.aux_classifier is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(48, 64), (48, 64), (32, 40)]]
    probs = list(predict_proba(loaded, images, batch_size=2))
    assert [p.shape for p in probs] == [(21, 48, 64), (21, 48, 64), (21, 32, 40)]
    assert np.allclose(probs[0].sum(0), 1.0, atol=1e-4)
    # batching must not change the answer
    alone = next(predict_proba(loaded, images[1:2], batch_size=1))
    assert np.allclose(alone, probs[1], atol=1e-5)
    assert probs[0].dtype == np.float32


def test_train_config_checks_choices():
    for field, value in [("arch", "unet"), ("logger", "tensorboard"), ("val_panels", -1)]:
        with pytest.raises(UserError, match=f"train.{field}"):
            validate_train(dataclasses.replace(TrainConfig(), **{field: value}))


def test_only_load_errors_become_unreadable_weights(tmp_path, monkeypatch):
    """A damaged file is the user's to fix (one line, the cause kept); anything else, such as
    running out of memory, is not reported as unreadable weights."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(UserError, match="unreadable safetensors file") as err:
        load_model(path)
    assert err.value.__cause__ is not None

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        build_segmenter(TINY, str(tmp_path / "backbone.pth"))


@pytest.mark.slow
def test_refinement_predicts_without_lightning():
    import subprocess
    import sys

    code = ("import sys, syntagen_st.selftrain.heldout, syntagen_st.selftrain.decide, syntagen_st.segmentation.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'wandb')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
