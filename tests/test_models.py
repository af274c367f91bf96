import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from resnet_study import EXPERIMENTS, ModelConfig, UsageError, build_model, count_params
from resnet_study.catalogue import PRESETS
from resnet_study.models import (
    Conv2d,
    ResNet18,
    imagenet_weights_path,
    network,
    training_flops,
)
from resnet_study.models.resnet import ZeroPadShortcut

from .helpers import LITERATURE_PARAMS, PAPER_PARAMS

GROUPS = PRESETS.groups()


def test_every_paper_row_is_an_experiment():
    assert GROUPS["paper"] == list(PAPER_PARAMS)
    assert GROUPS["literature"] == ["wrn-16-8", "wrn-16-8-paper-recipe", "resnet-110",
                                    "resnet-110-paper-recipe"]


@pytest.mark.parametrize("name", GROUPS["literature"])
def test_literature_parameter_counts(name):
    hundred, ten = LITERATURE_PARAMS[name.removesuffix("-paper-recipe")]
    for classes, expected in ((100, hundred), (10, ten)):
        with torch.device("meta"):
            assert count_params(network(EXPERIMENTS[name].model, classes)) == expected


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_wrn_16_8_layout():
    model = network(EXPERIMENTS["wrn-16-8"].model)
    widths = {}
    for i in (1, 2, 3):
        layer = getattr(model, f"layer{i}")
        layer.register_forward_hook(lambda m, inp, out, i=i: widths.update({i: out.shape[1:]}))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert widths == {1: (128, 32, 32), 2: (256, 16, 16), 3: (512, 8, 8)}
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 2
    assert len(_convs(model)) == 16  # depth 16: stem, 12 block convs, three 1x1 projections
    for layer in (model.layer1, model.layer2, model.layer3):  # 1x1 projection, BN-ReLU shared
        assert isinstance(layer[0].downsample, nn.Conv2d)
        assert layer[0].downsample.kernel_size == (1, 1) and layer[1].downsample is None
    assert isinstance(model.final_bn, nn.BatchNorm2d) and model.conv1.out_channels == 16


def test_wrn_projection_reads_the_pre_activation():
    """Zagoruyko & Komodakis's code: the 1x1 shortcut sees BN-ReLU of the block input."""
    model = network(EXPERIMENTS["wrn-16-8"].model).eval()
    block = model.layer2[0]
    seen = {}
    block.downsample.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    x = torch.randn(2, 128, 32, 32)
    block(x)
    assert torch.equal(seen["x"], torch.relu(block.bn1(x)))


def test_wrn_dropout_sits_between_the_two_convs():
    cfg = EXPERIMENTS["wrn-16-8"].replace(block_dropout=0.3).model
    block = network(cfg).layer1[1]
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.3
    assert EXPERIMENTS["wrn-16-8"].model.block_dropout == 0  # off in the official recipe


def test_resnet_110_layout_and_option_a_shortcut():
    model = network(EXPERIMENTS["resnet-110"].model)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [18, 18, 18]
    assert len(_convs(model)) + 1 == 110  # 6n + 2 weighted layers: convs and fc
    assert [getattr(model, f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, ZeroPadShortcut) and not list(shortcut.parameters())
    x = torch.randn(2, 16, 32, 32)
    y = shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet_110_with_projection_shortcuts_is_option_b():
    cfg = EXPERIMENTS["resnet-110"].replace(shortcut="projection").model
    with torch.device("meta"):
        model = network(cfg)
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)
    assert count_params(model) == 1_733_812 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize("settings, message", [
    (dict(blocks=3), "a resnet18 has 2 blocks per stage"),
    (dict(shortcut="zero-pad"), "a resnet18 has 2 blocks per stage and projection shortcuts"),
    (dict(family="cifar-resnet"), "family cifar-resnet has the 3x3 stem only"),
    (dict(family="cifar-resnet", stem="cifar", pretrained="imagenet"),
     "pretrained weights exist only for the base architecture"),
    (dict(family="cifar-resnet", stem="cifar", blocks=0), "blocks must be a whole number >= 1"),
    (dict(channels=4), "channels must be a whole number >= 8"),
    (dict(family="cifar-resnet", stem="cifar", channels=32), "channels sets a resnet18's layer1"),
    (dict(channels=32, pretrained="imagenet"), "64 channels"),
    (dict(stem="cifar-s2", pretrained="imagenet"), "a 7x7 imagenet stem"),
])
def test_impossible_architectures_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        ModelConfig(**settings)


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_parameter_count_equals_paper(name):
    with torch.device("meta"):
        model = ResNet18(EXPERIMENTS[name].model, num_classes=100)
    assert count_params(model) == PAPER_PARAMS[name]


@pytest.mark.parametrize("cfg", [
    ModelConfig(), ModelConfig(block="pre"), ModelConfig(width=2, shortcut_kernel=3),
    ModelConfig(batch_norm=False, block_dropout=0.2, fc_dropout=0.5), ModelConfig(stem="cifar"),
    ModelConfig(stem="cifar-s2", channels=48, width=2),
])
def test_forward_and_backward_shapes(cfg):
    model = ResNet18(cfg, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# layer3 and layer4 compute their tiny maps as one matrix product: same function, another
# summation order. In bf16 autocast, measured up to 0.039 over 30 seeds at logits up to 2.9
# (2.5 bf16 ulps there); a wrong network is off by the logits' own size.
AGAINST_TORCHVISION = {"fp32": (None, 1e-4, 1e-4), "bf16": (torch.bfloat16, 1.6e-2, 5e-2)}


@pytest.mark.parametrize("precision", AGAINST_TORCHVISION)
def test_base_model_is_torchvision_state_dict_compatible(precision):
    dtype, rtol, atol = AGAINST_TORCHVISION[precision]
    torch.manual_seed(0)  # not whatever the tests before it left
    ours = build_model("resnet18-lr0.01", num_classes=100)
    theirs = torchvision.models.resnet18(num_classes=100)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    theirs.load_state_dict(a)
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        ours.train(train)
        theirs.train(train)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            mine, reference = ours(x), theirs(x)
        assert mine.dtype == (dtype or torch.float32)
        torch.testing.assert_close(mine, reference, rtol=rtol, atol=atol)


@pytest.mark.parametrize("size,stride,bias,channels_last", [
    ((1, 1), 1, False, False), ((2, 2), 1, False, True), ((2, 2), 2, True, False),
    ((2, 1), 1, True, True), ((1, 2), 2, False, False),
])
def test_small_map_conv_is_the_convolution_as_a_matrix_product(size, stride, bias,
                                                                channels_last):
    ours = Conv2d(6, 10, 3, stride=stride, padding=1, bias=bias)
    ours._conv_forward = lambda *a: pytest.fail("took the convolution path, not the GEMM")
    ref = nn.Conv2d(6, 10, 3, stride=stride, padding=1, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    a, b = ours(x), ref(x)  # float32: assert_close's float32 tolerances
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(a, [x, *ours.parameters()], g),
                    torch.autograd.grad(b, [x, *ref.parameters()], g), strict=True):
        torch.testing.assert_close(u, v)


def test_small_map_conv_takes_the_matrix_product_on_the_cpu_only():
    """Elsewhere (CUDA, or the meta device that counts FLOPs) the convolution runs as such."""
    conv = Conv2d(6, 10, 3, padding=1, bias=False)
    convolved = []
    real = conv._conv_forward
    conv._conv_forward = lambda x, *a: convolved.append(x.device.type) or real(x, *a)
    conv(torch.randn(2, 6, 1, 1))
    conv.to("meta")(torch.empty(2, 6, 1, 1, device="meta"))
    assert convolved == ["meta"]


def test_preact_shortcut_has_bn_before_conv_and_no_final_bn():
    model = ResNet18(ModelConfig(block="pre"))
    ds = model.layer2[0].downsample
    assert isinstance(ds[0], nn.BatchNorm2d) and ds[0].num_features == 64
    assert isinstance(ds[1], nn.Conv2d) and ds[1].kernel_size == (1, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.final_relu.modules())


def test_wide_model_projects_layer1_and_keeps_stem_at_64():
    model = ResNet18(ModelConfig(width=2))
    assert model.conv1.out_channels == 64
    assert model.layer1[0].downsample[0].out_channels == 128
    assert model.fc.in_features == 1024


@pytest.mark.parametrize("channels", [32, 48, 96])
def test_channels_set_the_stem_and_every_stage(channels):
    """Issue 31: C channels give the stem and layer1 C, and the stages C, 2C, 4C, 8C; with
    32, a 16x16 stem costs no more than the paper's 8x8 stem at 64 (width for resolution)."""
    model = ResNet18(ModelConfig(channels=channels, stem="cifar-s2"), num_classes=100)
    assert model.conv1.out_channels == model.bn1.num_features == channels
    assert [getattr(model, f"layer{i}")[1].conv2.out_channels for i in (1, 2, 3, 4)] == [
        channels, 2 * channels, 4 * channels, 8 * channels]
    assert model.fc.in_features == 8 * channels
    cost = training_flops(ModelConfig(channels=channels, stem="cifar-s2"), 100)
    assert (cost <= training_flops(ModelConfig(), 100)) == (channels == 32)


def test_no_bn_removes_every_batch_norm_and_keeps_convs_bias_free():
    model = ResNet18(ModelConfig(batch_norm=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_dropout_is_active_only_in_training():
    model = ResNet18(ModelConfig(block_dropout=0.2, fc_dropout=0.5))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_pretrained_path_loads_all_but_fc(tmp_path):
    source = torchvision.models.resnet18()  # 1000-class ImageNet head
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(pretrained=str(path)), num_classes=100)
    assert model.fc.out_features == 100
    torch.testing.assert_close(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    torch.testing.assert_close(model.bn1.running_var, source.bn1.running_var)


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))


def test_pretrained_file_with_pickle_payload_is_refused(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Payload()}, f)
    with pytest.raises(UsageError, match="not a loadable state dict"):
        build_model(ModelConfig(pretrained=str(path)))
    assert not _Payload.marker.exists()


def test_pretrained_with_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UsageError, match="not a resnet18 state dict"):
        build_model(ModelConfig(pretrained=str(path)))


def test_imagenet_weights_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("resnet_study.models.pretrained.IMAGENET_WEIGHTS_URL",
                        "http://127.0.0.1:9/resnet18-f37072fd.pth")  # discard port: refused
    with pytest.raises(UsageError) as err:
        build_model("resnet18-pretrained")
    assert str(imagenet_weights_path()) in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_imagenet_weights_found_in_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = torchvision.models.resnet18()
    imagenet_weights_path().parent.mkdir(parents=True)
    torch.save(source.state_dict(), imagenet_weights_path())
    model = build_model("resnet18-pretrained")
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("stem, size, gflop", [
    ("imagenet", 8, 0.218), ("imagenet-nopool", 16, 0.840), ("imagenet-s1", 16, 0.869),
    ("cifar-s2", 16, 0.833), ("cifar", 32, 3.329)])
def test_each_stem_gives_layer1_its_map_at_its_cost(stem, size, gflop):
    """The map layer1 sees of a 32x32 image, and the training GFLOP per image: the two 16x16
    stems cost about 4x the paper's, under the New Wide ResNet-18's 0.916."""
    model = ResNet18(ModelConfig(stem=stem), num_classes=100)
    seen = []
    model.layer1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [size]
    assert training_flops(ModelConfig(stem=stem), 100) / 1e9 == pytest.approx(gflop, abs=5e-4)
    if stem.startswith("imagenet"):  # the same 7x7 conv: its parameters, ImageNet's weights
        assert count_params(model) == PAPER_PARAMS["resnet18-lr0.01"]
        ModelConfig(stem=stem, pretrained="imagenet")


def test_pretrained_only_for_the_base_architecture():
    with pytest.raises(UsageError, match="base architecture"):
        ModelConfig(width=2, pretrained="imagenet")


REPEAT_SCRIPT = """
import torch
from resnet_study.models import Conv2d

torch.manual_seed(0)
conv = Conv2d(256, 512, 3, padding=1, bias=False)
x = torch.randn(256, 256, 2, 2)
conv(x).square().sum().backward()
print(float(conv.weight.grad.double().square().sum()))
"""


def test_small_map_conv_gradients_are_the_same_in_every_process():
    # Runs of a study must not differ in the last bits from one process to the next; with a
    # gather (scatter-add backward) they did. Exact, in float32 (no autocast).
    outputs = {subprocess.run([sys.executable, "-c", REPEAT_SCRIPT], capture_output=True,
                              text=True, check=True).stdout for _ in range(3)}
    assert len(outputs) == 1, outputs
