"""Inference-only encoder: the Encoder's features, computed faster (mostly for CPUs).

A frozen encoder at a fixed input size carries work that inference does not need:
- every batch norm after a convolution is a fixed affine map: it is folded into the
  convolution's weights and bias (one op instead of two, one pass over memory less);
- timm's TF-"same" convolutions (Conv2dSame, the stride-2 ones) compute their asymmetric padding
  on every call: at a fixed input size it is fixed, so it becomes a static ZeroPad2d;
- in channels_last memory PyTorch sends every convolution to oneDNN; in NCHW it sends the
  1x1 and depthwise convolutions of a single photo to its generic, much slower kernel;
- a 1x1 convolution is a matrix product over pixels;
- on a CPU, each convolution and the ReLU6 after it run as one oneDNN call (the fused kernels
  torch.compile uses), so the activation costs no extra pass over memory.

InferenceEncoder is a separate copy built from an Encoder: the Encoder itself, its state dict
(what checkpoints save and load) and fine-tuning (Encoder.set_trainable) stay untouched. Build it
again after the Encoder's weights change.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torchvision import transforms

from captioner.model.encoder import Body, Encoder, body_feature_map, build_transform, stage_modules


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d into the convolution registered just before it, in place.

    Relies on the backbones' layout (timm EfficientNet blocks, torchvision ResNets): a conv and
    its batch norm are consecutive children of one parent, applied one after the other. timm's
    BatchNormAct2d keeps its activation. Returns how many batch norms were folded.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
                raise ValueError(f"cannot fold {bn_name} ({bn}) into {conv}")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            after = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            setattr(parent, bn_name, after)
            folded += 1
    return folded


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@torch.no_grad()
def pad_statically(module: nn.Module, image_size: int) -> int:
    """Replace each timm Conv2dSame by a plain convolution with fixed padding, exact for inputs
    of image_size x image_size. Returns how many were replaced.

    A stride-2 TF "SAME" convolution pads one more pixel after than before: (p, p + 1). PyTorch
    pads symmetrically, so the kernel gets one leading row and column of zeros and the padding
    becomes p + 1 on both sides: every output reads the same pixels with the same weights, and no
    padded copy of the input is made.
    """
    input_sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        input_sizes[conv] = _pair(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, Conv2dSame)]
    was_training = module.training
    module.eval()
    module(torch.zeros(1, 3, image_size, image_size, device=next(module.parameters()).device))
    module.train(was_training)
    for hook in hooks:
        hook.remove()
    for parent in list(module.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, Conv2dSame) and conv in input_sizes:
                setattr(parent, name, _symmetric_conv(conv, input_sizes[conv]))
    return len(input_sizes)


def _pair(sizes: Sequence[int]) -> tuple[int, int]:
    """Two numbers as a pair (torch types a Conv2d's kernel_size, stride, ... tuple[int, ...])."""
    first, second = sizes
    return first, second


def _symmetric_conv(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Conv2d:
    """A plain nn.Conv2d equal to a TF-"SAME" convolution at one input size."""
    padding: list[int] = []
    leading: list[int] = []
    for size, kernel, stride, dilation in zip(input_size, conv.kernel_size, conv.stride, conv.dilation,
                                              strict=True):
        before, after = _same_padding(size, kernel, stride, dilation)
        if after - before not in (0, 1) or (after > before and dilation != 1):
            raise ValueError(f"cannot pad {conv} statically for input {input_size}")
        padding.append(after)
        leading.append(after - before)  # zero rows/columns to put in front of the kernel
    weight = F.pad(conv.weight, (leading[1], 0, leading[0], 0))  # (C_out, C_in / groups, kh', kw')
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, _pair(weight.shape[-2:]), _pair(conv.stride),
                      _pair(padding), _pair(conv.dilation), conv.groups, conv.bias is not None,
                      device=weight.device)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    plain.bias = conv.bias
    return plain


class PointwiseMatmul(nn.Module):
    """A 1x1, stride-1 convolution as one matrix product over channels_last pixels.

    PyTorch runs a single-threaded 1x1 convolution of a small batch on its generic kernel (and in
    channels_last, with two layout copies around it); as a matrix product (B*H*W, C_in) x
    (C_in, C_out) it goes to the BLAS library instead.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)  # (C_out, C_in)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C_in), contiguous when x is channels_last
        return F.linear(pixels, self.weight, self.bias).permute(0, 3, 1, 2)  # a channels_last view


def pointwise_as_matmul(module: nn.Module) -> int:
    """Replace each 1x1, stride-1, ungrouped convolution by a PointwiseMatmul. Returns the count."""
    replaced = 0
    for parent in list(module.modules()):
        for name, conv in list(parent.named_children()):
            if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                    and conv.padding == (0, 0) and conv.groups == 1):
                setattr(parent, name, PointwiseMatmul(conv))
                replaced += 1
    return replaced


def _activation_bounds(module: nn.Module) -> tuple[float, float] | None | Literal[False]:
    """(min, max) of a clamping activation (ReLU, ReLU6, Hardtanh, or one in a Sequential of
    Identities), None for an identity, False for anything else."""
    layers = [m for m in (module if isinstance(module, nn.Sequential) else [module])
              if not isinstance(m, nn.Identity)]
    if not layers:
        return None
    if len(layers) == 1 and isinstance(layers[0], nn.Hardtanh):  # ReLU6 is a Hardtanh
        return (layers[0].min_val, layers[0].max_val)
    if len(layers) == 1 and isinstance(layers[0], nn.ReLU):
        return (0.0, float("inf"))
    return False


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused CPU kernels (the ones inductor uses)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDNNConv(nn.Module):
    """A convolution (or PointwiseMatmul) and the clamping activation after it, as one oneDNN
    call: the activation is applied while the output is still in cache, not in a second pass.
    CPU only, channels_last inputs."""

    def __init__(self, conv: nn.Conv2d | PointwiseMatmul, bounds: tuple[float, float] | None):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.pointwise = isinstance(conv, PointwiseMatmul)
        if isinstance(conv, nn.Conv2d):
            self.padding, self.stride = list(conv.padding), list(conv.stride)
            self.dilation, self.groups = list(conv.dilation), conv.groups
        self.scalars: list[float]  # the activation's arguments
        if bounds is None:
            self.attr, self.scalars = "none", []
        elif bounds[1] == float("inf"):
            self.attr, self.scalars = "relu", []
        else:
            self.attr, self.scalars = "hardtanh", [float(bounds[0]), float(bounds[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:
            pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C_in)
            out = torch.ops.mkldnn._linear_pointwise(pixels, self.weight, self.bias, self.attr,
                                                     self.scalars, "")
            return out.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels_last
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            self.attr, self.scalars, "")


def fuse_activations(module: nn.Module) -> int:
    """Replace each convolution (or PointwiseMatmul) with the clamping activation registered just
    after it (after batch-norm folding: timm's BatchNormAct2d's activation) by one OneDNNConv.
    Pointwise projections with no activation (the blocks' last 1x1) stay PointwiseMatmuls: for
    their shapes (few output channels) the BLAS product ran 10-20% faster than oneDNN's here.
    Returns the count."""
    fused = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (act_name, act) in itertools.pairwise(children):
            if type(conv) is not nn.Conv2d and type(conv) is not PointwiseMatmul:
                continue
            bounds = _activation_bounds(act)
            if bounds is None and type(conv) is PointwiseMatmul:
                continue  # a projection without activation: BLAS's matrix product beats oneDNN's
            if bounds is not False:
                setattr(parent, conv_name, OneDNNConv(conv, bounds))
                setattr(parent, act_name, nn.Identity())
                fused += 1
    return fused


class FeatureMap(nn.Module):
    """A backbone's last feature map (B, D, h, w), as one module (what torch.export needs)."""

    def __init__(self, body: Body):
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return body_feature_map(self.body, images)


def calibration_photos(transform: transforms.Compose) -> torch.Tensor:
    """Preprocessed (N, 3, S, S) sample photos shipped with scikit-image: int8 calibration that
    needs no download. Calibrating on photos like the ones to caption is better."""
    from PIL import Image
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "grass", "gravel", "brick",
             "moon")
    return torch.stack([transform(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in names])


class _Compiled(nn.Module):
    """torch.compile with freezing: the weights are constants, so inductor pre-packs them and
    fuses each convolution with its activation (oneDNN post-ops). Freezing is switched on while
    the module runs, when compilation happens (passed as a torch.compile option, int8
    weight packing fails)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(images)


@torch.no_grad()
def _int8(net: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """Static int8 (activations and weights) by PyTorch's current quantization path: torchao's
    PT2E flow with the x86 inductor quantizer, calibrated on `calibration`, then compiled."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as err:
        raise ImportError("an int8 encoder needs the torchao package (pip install torchao)") from err
    # Exported for one photo at a time: oneDNN's int8 weight packing fails under a dynamic batch.
    exported = torch.export.export(net, (calibration[:1],)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for image in calibration.split(1):
        prepared(image)
    return _OnePhotoAtATime(_Compiled(convert_pt2e(prepared)))


class _OnePhotoAtATime(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(image) for image in images.split(1)])


class InferenceEncoder(nn.Module):
    """A frozen, eval-mode copy of an Encoder for inference: same inputs, same (B, L, D) grids.

    Each exact optimisation can be turned off (to measure its gain). Two opt-ins compile the
    backbone with torch.compile (inductor); the first call per batch size then takes from ten
    seconds to minutes:
    - compile=True: fp32, the same grids (within float rounding);
    - int8_calibration=(N, 3, S, S) photos: static int8, needs torchao; changes the grids
      noticeably (see the README's benchmark section for what it costs in CIDEr).
    Inputs must be image_size x image_size, the size the padding was fixed for.
    until_stage=K: computes the activations (B, C, H, W) entering the encoder's stage K instead
    (what a stage cache holds; see Encoder.forward's from_stage).
    """

    def __init__(self, encoder: Encoder, fold_bn: bool = True, static_padding: bool = True,
                 channels_last: bool = True, matmul_pointwise: bool = True, fuse: bool = True,
                 compile: bool = False, int8_calibration: torch.Tensor | None = None,
                 until_stage: int | None = None):
        super().__init__()
        if until_stage is not None:
            encoder.check_stage(until_stage)
        self.until_stage = until_stage
        self.backbone_name, self.image_size = encoder.backbone_name, encoder.image_size
        self.grid_size, self.feature_dim = encoder.grid_size, encoder.feature_dim
        body = copy.deepcopy(encoder.body).eval().requires_grad_(False)
        # New layers get weights copied in, but nn.Conv2d draws initial ones first: from a forked
        # stream, or building this copy would change the caller's random numbers (a training
        # run would then depend on whether its features were already cached).
        with torch.random.fork_rng(devices=[]):
            if fold_bn:
                fold_batchnorm(body)
            if static_padding:
                pad_statically(body, self.image_size)
            if matmul_pointwise and int8_calibration is None:  # the int8 quantizer wants convolutions
                if not channels_last:
                    raise ValueError("matmul_pointwise needs channels_last")
                pointwise_as_matmul(body)
        on_cpu = next(body.parameters()).device.type == "cpu"
        eager = int8_calibration is None and not compile  # inductor fuses on its own
        if fuse and channels_last and on_cpu and onednn_available() and eager:
            fuse_activations(body)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # The stage list is made after the rewrites above, which replace some of its modules.
        net = (FeatureMap(body) if until_stage is None
               else nn.Sequential(*stage_modules(body)[:until_stage]))
        self.net = net.to(memory_format=self.memory_format)
        self.eval()
        self.compiled: nn.Module | None = None
        if int8_calibration is not None:
            self.compiled = _int8(self.net, int8_calibration.contiguous(memory_format=self.memory_format))
        elif compile:
            self.compiled = _Compiled(self.net)

    @property
    def transform(self) -> transforms.Compose:
        return build_transform(self.backbone_name, self.image_size)

    def train(self, mode: bool = True) -> InferenceEncoder:
        if mode:
            raise RuntimeError("InferenceEncoder is for inference only: train the Encoder it was built from")
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"InferenceEncoder expects images (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        net = self.net if self.compiled is None else self.compiled
        fmap = net(images.contiguous(memory_format=self.memory_format))  # (B, D, h, w)
        if self.until_stage is not None:
            return fmap.contiguous()  # (B, C, H, W) entering stage until_stage
        if fmap.shape[-1] != self.grid_size or fmap.shape[-2] != self.grid_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)
        return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
