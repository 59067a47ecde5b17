"""`sentinel models import`: a user's trained DenseNet into the registry, checked before anything is written;
and the architecture and input options `models init` shares with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_config_cli import run_cli
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.errors import UsageError, WeightsError
from sentinel.reference.densenet import DenseNet, resolve_config
from sentinel.registry import Registry

BC = {"growth_rate": 12, "block_config": [4, 4, 4], "num_init_features": 24, "small_inputs": True,
      "num_classes": 10}
BC_FLAGS = ["--arch", "custom", "--growth-rate", "12", "--block-config", "4,4,4", "--num-init-features", "24",
            "--small-inputs", "--input-size", "32"]


def _trained(cfg, seed: int = 1) -> DenseNet:
    """A network with non-trivial BatchNorm statistics, as training leaves them."""
    torch.manual_seed(seed)
    m = DenseNet(resolve_config(cfg) if isinstance(cfg, dict) else cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
                mod.num_batches_tracked.fill_(123)
            elif isinstance(mod, torch.nn.Linear):
                mod.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _invoke(*args: str):
    return CliRunner().invoke(app, ["models", "import", *map(str, args)])


def _same_logits(entry, original: DenseNet, shape) -> None:
    torch.manual_seed(7)
    x = torch.randn(2, *shape)
    ref = entry.reference(device="cpu")
    got = ref.run(x.numpy(), embeddings=False).logits
    with torch.inference_mode():
        want = original(x).numpy()
    assert got.shape == want.shape
    assert abs(got - want).max() <= 1e-6


@pytest.fixture(scope="module")
def dn121_37():
    return _trained(resolve_config("densenet121", num_classes=37))


def test_torchvision_densenet121_pth_imports_and_lists(tmp_path, dn121_37):
    ck = tmp_path / "pets.pth"
    torch.save(dn121_37.state_dict(), ck)
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"breed_{i}\n" for i in range(37)))
    reg = tmp_path / "reg"
    res = _invoke(ck, "--arch", "densenet121", "--name", "pets", "--version", "v1", "--classes-file", names,
                  "--registry", reg)
    assert res.exit_code == 0, res.output
    assert f"imported pets:v1 into {reg}/pets/v1/ (6,991,781 parameters, 37 classes)" in res.output
    assert f"sentinel golden build --model pets:v1 --from FILE.npz --registry {reg}" in res.output
    entry = Registry(reg).resolve("pets:v1")
    m = entry.manifest
    assert (m.arch, m.architecture, m.input.shape) == ("densenet121", {"num_classes": 37}, (3, 224, 224))
    assert m.classes[0] == "breed_0" and len(m.classes) == 37
    # what `models init` writes for an ImageNet model
    assert m.raw_input is not None and (m.raw_input.shape, m.raw_input.dtype) == ((224, 224, 3), "uint8")
    p = m.preprocessing
    assert (p.resize, p.crop, p.layout, p.mean) == ((256, 256), (224, 224), "NHWC", (0.485, 0.456, 0.406))
    assert entry.weights_ok()
    assert not [x for x in reg.rglob(".*")]   # no temporary folder left behind
    _same_logits(entry, dn121_37, (3, 64, 64))
    listed = run_cli("models", "list", "--json", "--registry", str(reg))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["version"], r["parameters"], r["weights_ok"]) for r in rows] == [
        ("pets", "v1", 6_991_781, True)]


def test_safetensors_with_num_classes_and_input_size(tmp_path, dn121_37):
    from safetensors.torch import save_file

    ck = tmp_path / "pets.safetensors"
    save_file({k: v.contiguous() for k, v in dn121_37.state_dict().items()}, str(ck))
    res = _invoke(ck, "--arch", "densenet121", "--name", "pets", "--version", "v2", "--num-classes", "37",
                  "--input-size", "64,96", "--registry", tmp_path / "reg")
    assert res.exit_code == 0, res.output
    entry = Registry(tmp_path / "reg").resolve("pets:v2")
    m = entry.manifest
    assert m.input.shape == (3, 64, 96) and m.raw_input.shape == (64, 96, 3)
    assert (m.preprocessing.resize, m.preprocessing.crop) == ((73, 110), (64, 96))   # ×256/224, then the size
    _same_logits(entry, dn121_37, (3, 64, 64))


def test_custom_densenet_bc_nested_under_state_dict(tmp_path):
    model = _trained(BC)
    ck = tmp_path / "cifar.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 30, "best_acc": 0.93}, ck)
    res = _invoke(ck, *BC_FLAGS, "--name", "cifar", "--version", "v1", "--registry", tmp_path / "reg")
    assert res.exit_code == 0, res.output
    entry = Registry(tmp_path / "reg").resolve("cifar:v1")
    m = entry.manifest
    assert m.architecture == {**BC, "block_config": [4, 4, 4], "in_channels": 3}
    assert m.input.shape == (3, 32, 32) and m.raw_input.shape == (32, 32, 3)
    assert (m.preprocessing.resize, m.preprocessing.crop) == (None, None)   # CIFAR-style: the image as it is
    _same_logits(entry, model, (3, 32, 32))


def test_training_wrappers_are_unwrapped(tmp_path):
    """Nested under `model`, `module.` (DataParallel) keys, old torchvision `norm.1` names, no BatchNorm
    counters (pre-0.4 checkpoints), and a Sequential(Dropout, Linear) head, as a fine-tuning script makes it."""
    model = _trained(BC)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if "denselayer" in k:
            k = k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.")
        k = k.replace("classifier.", "classifier.1.")
        state["module." + k] = v
    ck = tmp_path / "ft.pth"
    torch.save({"model": state, "optimizer": {"lr": torch.tensor(0.1)}}, ck)
    res = _invoke(ck, *BC_FLAGS, "--name", "ft", "--version", "v1", "--registry", tmp_path / "reg")
    assert res.exit_code == 0, res.output
    assert "classifier.1" in res.output and "num_batches_tracked" in res.output
    _same_logits(Registry(tmp_path / "reg").resolve("ft:v1"), model, (3, 32, 32))


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _import(tmp_path, state_or_obj, *extra, name="m"):
    ck = tmp_path / "ck.pth"
    torch.save(state_or_obj, ck)
    return _invoke(ck, *BC_FLAGS, "--name", name, "--version", "v1", "--registry", tmp_path / "reg", *extra)


def test_missing_key_is_named_and_nothing_is_written(tmp_path):
    state = _trained(BC).state_dict()
    state.pop("features.denseblock2.denselayer3.conv1.weight")
    res = _import(tmp_path, state)
    assert isinstance(res.exception, WeightsError)
    assert "missing key 'features.denseblock2.denselayer3.conv1.weight'" in str(res.exception)
    assert not (tmp_path / "reg" / "m").exists()
    assert _files(tmp_path / "reg") == []


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    state = _trained(BC).state_dict()
    state["features.denseblock1.denselayer1.conv2.weight"] = torch.zeros(16, 48, 3, 3)
    res = _import(tmp_path, state)
    assert isinstance(res.exception, WeightsError)
    assert ("key 'features.denseblock1.denselayer1.conv2.weight' has shape (16, 48, 3, 3), "
            "the model expects (12, 48, 3, 3)") in str(res.exception)
    assert not (tmp_path / "reg" / "m").exists()


def test_wrong_arch_says_what_the_checkpoint_looks_like(tmp_path):
    model = _trained({**BC, "in_channels": 1})
    ck = tmp_path / "gray.pth"
    torch.save(model.state_dict(), ck)
    res = _invoke(ck, *BC_FLAGS, "--name", "g", "--version", "v1", "--registry", tmp_path / "reg")
    assert isinstance(res.exception, WeightsError)
    msg = str(res.exception)
    assert "'features.conv0.weight' has shape (24, 1, 3, 3), the model expects (24, 3, 3, 3)" in msg
    assert "--in-channels 1" in msg and "blocks [4, 4, 4]" in msg


class _WritesAFile:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    state = dict(_trained(BC).state_dict())
    state["extra"] = _WritesAFile(marker)
    ck = tmp_path / "evil.pth"
    torch.save(state, ck)
    # the payload is live: unrestricted unpickling of the same kind of file writes its file
    live = tmp_path / "live.pth"
    torch.save({"x": _WritesAFile(tmp_path / "live.txt")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live.txt").read_text() == "pwned"
    assert not marker.exists()
    res = run_cli("models", "import", str(ck), *BC_FLAGS, "--name", "evil", "--version", "v1",
                  "--registry", str(tmp_path / "reg"))
    assert res.returncode == 2, res.stderr
    assert "refused: this checkpoint needs unrestricted unpickling" in res.stderr
    assert "Unsupported global: GLOBAL" in res.stderr                       # what it would have called
    assert "safetensors.torch.save_file(model.state_dict()" in res.stderr   # how to convert it
    assert "set to `False`" not in res.stderr                               # not torch's advice to load it unsafely
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "reg" / "evil").exists()


def test_classes_file_count_mismatch(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"c{i}" for i in range(9)) + "\n")
    res = _import(tmp_path, _trained(BC).state_dict(), "--classes-file", names)
    assert isinstance(res.exception, UsageError)
    assert f"--classes-file {names}: 9 class names, but the model has 10 classes" in str(res.exception)
    assert not (tmp_path / "reg" / "m").exists()


def test_num_classes_mismatch_names_both_numbers(tmp_path):
    res = _import(tmp_path, _trained(BC).state_dict(), "--num-classes", "12")
    assert isinstance(res.exception, UsageError)
    assert "--num-classes 12, but the checkpoint's classifier.weight has 10 rows" in str(res.exception)


def test_existing_entry_needs_force(tmp_path):
    state = _trained(BC).state_dict()
    assert _import(tmp_path, state).exit_code == 0
    before = (tmp_path / "reg" / "m" / "v1" / "model.yaml").read_text()
    res = _import(tmp_path, state, "--description", "second")
    assert isinstance(res.exception, UsageError) and "pass --force" in str(res.exception)
    assert (tmp_path / "reg" / "m" / "v1" / "model.yaml").read_text() == before
    res = _import(tmp_path, state, "--description", "second", "--force")
    assert res.exit_code == 0, res.output
    assert Registry(tmp_path / "reg").resolve("m:v1").manifest.description == "second"
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["m"]


@pytest.mark.parametrize(("args", "words"), [
    (["--crop", "28,28"], "crop 28×28) into (3, 28, 28), but the network input is (3, 32, 32)"),
    (["--mean", "0.5,0.5"], "--mean 0.5,0.5: 2 values; the network takes 3 channels"),
    (["--name", "../x"], "--name '../x': must be letters"),
    (["--layout", "NHW"], "--layout NHW is for one-channel inputs"),
    (["--scale", "1/0"], "--scale '1/0'"),
])
def test_bad_options_are_usage_errors(tmp_path, args, words):
    res = _import(tmp_path, _trained(BC).state_dict(), *args)
    assert isinstance(res.exception, UsageError), res.output
    assert words in str(res.exception)
    assert _files(tmp_path / "reg") == []


def test_shape_options_need_arch_custom(tmp_path):
    ck = tmp_path / "x.pth"
    torch.save({}, ck)
    res = _invoke(ck, "--arch", "densenet121", "--growth-rate", "12", "--name", "x", "--version", "v1",
                  "--registry", tmp_path / "reg")
    assert isinstance(res.exception, UsageError) and "--growth-rate: shape options need --arch custom" in str(
        res.exception)


def test_models_init_custom_small_model(tmp_path):
    res = CliRunner().invoke(app, ["models", "init", "custom", "--growth-rate", "8", "--block-config", "2,2",
                                   "--small-inputs", "--in-channels", "1", "--mean", "0.5", "--std", "0.25",
                                   "--input-size", "16", "--num-classes", "4", "--name", "tiny", "--version", "v1",
                                   "--registry", str(tmp_path / "reg")])
    assert res.exit_code == 0, res.output
    entry = Registry(tmp_path / "reg").resolve("tiny:v1")
    m = entry.manifest
    assert m.input.shape == (1, 16, 16) and m.raw_input.shape == (16, 16)
    assert m.preprocessing.layout == "NHW" and m.preprocessing.std == (0.25,)
    out = entry.reference(device="cpu").run(torch.zeros(3, 1, 16, 16).numpy(), embeddings=False).logits
    assert out.shape == (3, 4)


def test_models_init_other_channels_need_mean_and_std(tmp_path):
    res = CliRunner().invoke(app, ["models", "init", "densenet121", "--in-channels", "1",
                                   "--registry", str(tmp_path / "reg")])
    assert isinstance(res.exception, UsageError)
    assert "--in-channels 1: give --mean and --std" in str(res.exception)
