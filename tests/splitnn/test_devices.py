"""The device cells run on (``splitnn.devices``): resolving ``auto``/``cuda``, determinism on CUDA, and that a full
run puts everything on the configured device.

Without a GPU, a device is simulated on the CPU (``SimulatedDevice``): a TorchFunctionMode that marks what was
moved with ``.to(SIMULATED)`` (or made there), carries the mark through every operation, reports
``SIMULATED`` as the device of a marked tensor, and records a *violation* wherever CUDA would fail: a module whose
weights are on one side called with an input on the other, and ``.numpy()`` of a tensor still on the device. A
forgotten ``.to(device)`` (the images, a training batch, the auxiliary data, the judge) is then a violation, as it
would be an error on a GPU. The ``cuda``-marked tests run the real thing where a GPU is present.
"""
import copy
import json
import sqlite3
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from leakbench.evaluation.cli import main
from leakbench.splitnn import devices
from leakbench.splitnn.training import TrainConfig, cpu_state, train

#: The simulated device: a CPU device with an index, which ``torch.device("cpu")`` (where results go back) is not.
SIMULATED = torch.device("cpu", 0)
MARK = "_on_simulated_device"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def on_device(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and getattr(tensor, MARK, False)


def mark(tensor):
    if isinstance(tensor, torch.Tensor):
        try:
            setattr(tensor, MARK, True)
        except (AttributeError, RuntimeError):  # a tensor that takes no attributes stays unmarked
            pass
    return tensor


def tensors(value):
    """The tensors in an argument or a result, one level into lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                yield item


GET_DEVICE = torch.Tensor.device.__get__  # a fresh method-wrapper on each access: compare with ==
WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


class SimulatedDevice(TorchFunctionMode):
    """Tracks which tensors are on ``SIMULATED`` (see the module docstring); ``violations`` lists what would fail."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.moves = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == GET_DEVICE:
            return SIMULATED if on_device(args[0]) else func(*args)
        if func is torch.Tensor.to or func is torch.Tensor.cpu:
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and on_device(args[0]):
            self.violations.append(f"numpy() of a {tuple(args[0].shape)} tensor on the device")
        device = kwargs.get("device")
        if device is not None and not isinstance(device, int) and torch.device(device) == SIMULATED:
            return mark(func(*args, **{**kwargs, "device": "cpu"}))  # made on the device
        out = func(*args, **kwargs)
        if any(on_device(t) for a in (*args, *kwargs.values()) for t in tensors(a)):
            for t in tensors(out):
                mark(t)
        return out

    def _move(self, func, args, kwargs):
        source = args[0]
        if func is torch.Tensor.cpu:
            target, dtype = torch.device("cpu"), None
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # to(other): other's device and dtype
            target, dtype = (SIMULATED if on_device(args[1]) else torch.device("cpu")), args[1].dtype
        else:
            target, dtype = torch._C._nn._parse_to(*args[1:], **kwargs)[:2]
        out = source if dtype is None or dtype == source.dtype else source.to(dtype)
        if target is None:  # a dtype conversion stays where it is
            return mark(out) if on_device(source) else out
        if target == SIMULATED:
            self.moves += 1
            if on_device(source):
                return out
            if isinstance(source, nn.Parameter):  # Module.to sets the Parameter's data: the Parameter is moved
                mark(source)
                return mark(out.detach())
            return mark(out.clone() if out is source else out)
        if target.type == "cpu" and on_device(source):  # back to the host: a new tensor, unmarked
            return out.clone() if out is source else out
        return out


def _check_module(mode):
    """A forward pre-hook for every module: its own weights and its tensor inputs must be on one side."""

    def hook(module, args):
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        inputs = [t for a in args for t in tensors(a) if not WRAPPED(t)]
        if not own or not inputs:
            return
        where = {on_device(t) for t in own}
        if len(where) > 1:
            mode.violations.append(f"{type(module).__name__}: weights on both sides")
        elif any(on_device(t) != on_device(own[0]) for t in inputs):
            side = "the device" if on_device(own[0]) else "the CPU"
            mode.violations.append(f"{type(module).__name__} (weights on {side}) called with an input on the other")

    return hook


@pytest.fixture
def simulated(monkeypatch):
    """Config device ``cpu`` resolved to SIMULATED, with the mode and the module check active."""
    monkeypatch.setattr(devices, "resolve", lambda spec: (str(SIMULATED), None))
    deepcopy_parameter = nn.Parameter.__deepcopy__

    def carry(self, memo):  # a deep copy of a model on the device is on the device
        out = deepcopy_parameter(self, memo)
        return mark(out) if on_device(self) else out

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", carry)
    mode = SimulatedDevice()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(_check_module(mode))
    try:
        yield mode
    finally:
        handle.remove()


class Judge(nn.Module):
    """The user's evaluation classifier (tiny; its head's input is the embedding)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 4, 3, 1, 1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1).flatten(1))


def build(num_classes: int, in_channels: int) -> nn.Module:
    """The factory the config names as ``test_devices:build``."""
    return Judge(num_classes, in_channels)


def _config(tmp_path, defenses="[none]", attacks="[{name: rmle, params: {iterations: 5}}]", judge="false",
            device="cpu"):
    path = tmp_path / "device.yaml"
    path.write_text(f"""name: device
seed: 0
dataset: {{name: digits, params: {{size: 16}}}}
model: resnet20
train: {{epochs: 1, batch_size: 256}}
cut: layer1
defenses: {defenses}
attacks: {attacks}
evaluation: {{num_images: 2, classifier: {judge}}}
device: {device}
""")
    return path


def _judge(tmp_path):
    path = tmp_path / "judge.pt"
    torch.manual_seed(5)
    torch.save(build(10, 3).state_dict(), path)
    return f"{{factory: 'test_devices:build', weights: {path}}}"


def _rows(out):
    with sqlite3.connect(out / "results.sqlite") as db:
        cells = db.execute("select defense, attack, status, accuracy, reason from cells order by defense, attack")
        rows = cells.fetchall()
        psnr = dict(db.execute("select c.defense || '/' || c.attack, avg(i.psnr) from images i join cells c "
                               "on c.cell_key = i.cell_key group by 1"))
        provenance = json.loads(db.execute("select provenance_json from runs").fetchone()[0])
    return rows, psnr, provenance


# ---------------------------------------------------------------- resolving and determinism


def test_auto_is_cuda_when_a_gpu_is_visible_and_cuda_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == ("cpu", None) and devices.resolve("cpu") == ("cpu", None)
    with pytest.raises(Exception, match="no CUDA device is visible"):
        devices.resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == ("cuda", None)
    assert devices.resolve("cuda") == ("cuda", None) and devices.resolve("cuda:1") == ("cuda:1", None)
    with pytest.raises(Exception, match=r"cuda:0\.\.cuda:1"):
        devices.resolve("cuda:2")
    with pytest.raises(Exception, match="auto, cpu, cuda or cuda:N"):
        devices.resolve("gpu")


def test_use_makes_cuda_deterministic_and_leaves_the_cpu_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only: calls.append((on, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert devices.use("cpu") == torch.device("cpu") and not calls
    assert "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    assert devices.use("cuda:0") == torch.device("cuda:0")
    assert calls == [(True, True)] and __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
    devices.use("cuda")
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_of_is_where_a_modules_inputs_go_and_checkpoints_are_cpu_copies():
    assert devices.of(nn.ReLU()) == torch.device("cpu")
    assert devices.of(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert devices.of(nn.BatchNorm2d(2, affine=False, device="meta")) == torch.device("meta")  # buffers only
    model = nn.BatchNorm2d(2)
    state = cpu_state(model)
    assert list(state) == list(model.state_dict()) and state._metadata == model.state_dict()._metadata
    assert all(a is b or torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))


# ---------------------------------------------------------------- a full run on a simulated device


def test_the_simulated_device_notices_a_forgotten_move(simulated):
    model = nn.Linear(3, 2)
    with simulated:
        model.to(SIMULATED)
        assert devices.of(model) == SIMULATED
        model(torch.ones(1, 3).to(SIMULATED))
        assert not simulated.violations
        model(torch.ones(1, 3))  # not moved
        model(torch.ones(1, 3).to(SIMULATED)).detach().cpu().numpy()  # back on the host: fine
        model(torch.ones(1, 3).to(SIMULATED)).detach().numpy()  # still on the device
        copy.deepcopy(model)(torch.ones(1, 3).to(SIMULATED))
    assert simulated.violations == ["Linear (weights on the device) called with an input on the other",
                                    "numpy() of a (1, 2) tensor on the device"]


def test_a_full_run_puts_model_images_defense_attack_context_and_judge_on_the_device(simulated, tmp_path,
                                                                                    monkeypatch):
    """Training, a fitted defense (random_projection: sampled_features; pruning: its own sample and fine-tuning),
    a noise defense (its generator and the dFIL bound), attacks with the auxiliary data and the server (shadow,
    inverting with rMLE) and the query oracle (inverse_net), the metrics and the user's judge, all on the simulated
    device; the stored rows are done and came back to the host. Fails if any of them is not moved (checked by
    leaving out the move of the images, of the training batches or of the auxiliary data, one at a time)."""
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    config = _config(tmp_path, defenses="[{name: gaussian_noise, params: {scale: 0.1}}, "
                                        "{name: random_projection, params: {finetune_epochs: 1, samples: 64}}, "
                                        "{name: pruning, params: {ratio: 0.25, samples: 32, finetune_server: 1}}]",
                     attacks="[{name: shadow, params: {epochs: 1, iterations: 3}}, "  # and its rMLE inverter
                             "{name: inverse_net, params: {hidden: 8, epochs: 1}}]", judge=_judge(tmp_path))
    with warnings.catch_warnings(), simulated:
        warnings.simplefilter("ignore")
        code = main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    rows, _, provenance = _rows(tmp_path / "out")
    assert len(rows) == 6 and {r[2] for r in rows} == {"done"}, rows
    assert code == 0
    assert simulated.violations == [] and simulated.moves > 0
    assert provenance["device"] == devices.describe("cpu")


# ---------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@cuda
def test_a_cell_on_cuda_matches_the_cpu_and_provenance_names_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    attacks = "[{name: rmle, params: {iterations: 20}}, {name: inverse_net, params: {hidden: 8, epochs: 2}}]"
    found = {}
    for device in ("cpu", "cuda"):
        config = _config(tmp_path, attacks=attacks, judge=_judge(tmp_path), device=device)
        assert main(["run", str(config), "--out", str(tmp_path / device), "--quiet"]) == 0
        found[device] = _rows(tmp_path / device)
    (cpu_rows, cpu_psnr, _), (gpu_rows, gpu_psnr, provenance) = found["cpu"], found["cuda"]
    assert [r[2] for r in gpu_rows] == ["done"] * len(cpu_rows), gpu_rows
    assert provenance["device"] == f"cuda ({torch.cuda.get_device_name()})"
    for cpu, gpu in zip(cpu_rows, gpu_rows):
        assert gpu[3] == pytest.approx(cpu[3], abs=0.02)  # the defended model's accuracy
    assert gpu_psnr.keys() == cpu_psnr.keys()
    for cell in cpu_psnr:
        assert abs(gpu_psnr[cell] - cpu_psnr[cell]) < 0.5, (cell, cpu_psnr[cell], gpu_psnr[cell])


@pytest.mark.cuda
@cuda
def test_the_same_seed_gives_the_same_row_twice_on_cuda(tmp_path, monkeypatch):
    rows = []
    for run in ("a", "b"):
        monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / f"cache_{run}"))  # trained again each time
        config = _config(tmp_path, device="cuda")
        assert main(["run", str(config), "--out", str(tmp_path / run), "--quiet"]) == 0
        rows.append(_rows(tmp_path / run)[:2])
    (first, first_psnr), (second, second_psnr) = rows
    assert [r[:3] for r in first] == [r[:3] for r in second] and {r[2] for r in first} == {"done"}
    # equal up to the ops without a deterministic CUDA kernel (warn_only: they warn, and may round differently)
    assert [r[3] for r in second] == pytest.approx([r[3] for r in first], rel=1e-4)
    assert second_psnr == pytest.approx(first_psnr, rel=1e-4)
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.cuda
@cuda
def test_a_checkpoint_trained_on_cuda_loads_on_the_cpu(tmp_path):
    config = TrainConfig("resnet20", "digits", dataset_params={"size": 16}, epochs=1, batch_size=256)
    on_gpu = train(config, tmp_path, progress=False, device="cuda")
    assert devices.of(on_gpu.model).type == "cuda" and not on_gpu.from_cache
    assert all(t.device.type == "cpu" for t in torch.load(on_gpu.path, weights_only=True).values())
    on_cpu = train(config, tmp_path, progress=False, device="cpu")
    assert on_cpu.from_cache and devices.of(on_cpu.model) == torch.device("cpu")
    for a, b in zip(on_gpu.model.state_dict().values(), on_cpu.model.state_dict().values()):
        assert torch.equal(a.cpu(), b)
