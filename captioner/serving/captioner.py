"""The Python API: `Captioner.from_pretrained().caption(images)`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, overload

import torch

from captioner.data.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import reads_attributes
from captioner.model.evidence import EVIDENCE_STAGE, ImageNetEvidence, check_untuned_before
from captioner.model.focus import Focus, check_strength, focus_weights, region_evidence
from captioner.model.folder import load_model, save_model
from captioner.model.onnx_decoder import runtime_decoder
from captioner.model.onnx_encoder import OnnxEncoder, runtime_encoder
from captioner.model.onnx_runtime import torch_on_one_thread
from captioner.model.options import DEFAULT_FOCUS_STRENGTH, DecodeOptions, check_whole_number
from captioner.model.quantize import INT8_FILE, Int8EncoderError, copy_int8_encoder, int8_encoder
from captioner.model.results import CaptionResult, caption_features
from captioner.model.vocabulary import Vocabulary
from captioner.serving import hub

DEFAULT_WEIGHTS = hub.default_weights()
# On a CPU the encoder runs a few images at a time: their activations stay in cache, which
# makes it ~2x faster per image than one batch of 32 (captioner benchmark). Decoding still
# runs the whole batch at once.
CPU_ENCODER_BATCH = 4
TINY_IMAGE = 32  # pixels on the short side below which a result carries a note


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_options(options: DecodeOptions | None, changes: dict[str, Any]) -> DecodeOptions:
    """`options` (default: the defaults) with the keyword arguments `changes` applied."""
    if options is not None and not isinstance(options, DecodeOptions):
        raise TypeError(
            f"options must be a DecodeOptions, got {options!r}; pass decoding options "
            "by name (beam_size=3, ...)"
        )
    return (options or DecodeOptions()).replace(**changes)


class Captioner:
    """A trained model plus its vocabulary and preprocessing, ready to caption images."""

    def __init__(
        self,
        model: CaptionModel,
        vocab: Vocabulary,
        device: str | torch.device | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        quantize: bool | None = None,
        folder: str | Path | None = None,
    ):
        self.device = torch.device(device) if device else default_device()
        self.model = model.to(self.device).eval()
        self.path = Path(folder) if folder is not None else None  # the model folder, if any
        # pixels (B, 3, S, S) -> grids (B, L, D): the model's encoder, on ONNX Runtime on a CPU
        # (the same grids, faster; int8: the folder's int8 graph); any module that does the same
        # may stand in.
        self.encoder: torch.nn.Module = runtime_encoder(self.model.encoder)
        self.quantize = False  # int8 encoder and decoder step (CPU)
        if self.device.type == "cpu" and quantize is not False:
            try:
                self.encoder = int8_encoder(self.model.encoder, self.path, stage_output=EVIDENCE_STAGE)
                self.quantize = True
            except Int8EncoderError:
                if quantize:  # asked for: say what is missing
                    raise
        self.vocab = vocab
        self.transform = model.encoder.transform
        self.max_pixels = max_pixels
        self.config: dict[str, Any] = {}  # that folder's config.json (metadata, stored dtype)
        self._evidence_head: ImageNetEvidence | None = None  # built when evidence is first asked for
        self._evidence_trunk: torch.nn.Module | None = None
        self._runtime_decoder: tuple[torch.nn.Module, Any] | None = None  # (model.decoder, its runner)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        quantize: bool | None = None,
        revision: str | None = None,
    ) -> Captioner:
        """Load a model folder, or a Hugging Face Hub repo id ("user/model", at `revision`);
        by default the shipped model (or $CAPTIONER_WEIGHTS). A local path wins over a repo id.

        On a CPU the encoder and the decoder's step run in int8 when the folder has an int8
        encoder made from its weights (encoder_int8.onnx, captioner.model.quantize; the shipped
        model has one, `captioner export --quantize` makes one): ~1.5x faster captions, as good
        on the shipped model's dev scores but not the same captions (docs/benchmarks.md).
        quantize=False: float32 throughout; quantize=True: int8 or Int8EncoderError saying how to
        make the graph; None (the default): int8 when the folder has it.
        """
        path = hub.find_model(path, revision, default=DEFAULT_WEIGHTS)
        model, vocab, config = load_model(path)
        captioner = cls(
            model, vocab, device, quantize=quantize, folder=path.parent if path.is_file() else path
        )
        captioner.config = config
        return captioner

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write this model as a folder `from_pretrained` loads (and the Hub hosts): weights (in
        the dtype they were stored in, unless `dtype`), config.json, the model card if any, and
        the int8 encoder of quantize=True if the folder has one made from these weights."""
        if any(name.endswith("_packed_params") for name in self.model.state_dict()):
            raise ValueError(
                "this Captioner's model.decoder is int8-quantized; save the float model it was "
                "derived from (quantize=True keeps model.decoder float and quantizes at load time)"
            )
        stored = getattr(torch, self.config.get("weights_dtype", "float32"))
        directory = save_model(
            directory,
            self.model,
            self.vocab,
            metadata=self.config.get("metadata"),
            dtype=dtype if dtype is not None else stored,
        )
        hub.copy_card(self.path, directory)
        if self.path is not None and (self.path / INT8_FILE).is_file():  # if it fits the saved weights
            copy_int8_encoder(load_model(directory)[0].encoder, self.path, directory)
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload captioner model",
    ) -> str:
        """Upload this model to the Hugging Face Hub as `repo_id` (created if needed), with its
        model card as README.md. Returns the commit URL."""
        return hub.upload_model_folder(
            self.save_pretrained,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
        )

    @property
    def decoder(self) -> Any:
        """What decodes: model.decoder, its step on ONNX Runtime on a CPU (int8 with quantize;
        captioner.model.onnx_decoder). Made again when model.decoder is replaced; after changing
        its weights in place, replace it. Setting it decodes with that runner instead."""
        if self._runtime_decoder is None or self._runtime_decoder[0] is not self.model.decoder:
            runner = runtime_decoder(self.model.decoder, self.quantize)
            self._runtime_decoder = (self.model.decoder, runner)
        return self._runtime_decoder[1]

    @decoder.setter
    def decoder(self, runner: Any) -> None:
        self._runtime_decoder = (self.model.decoder, runner)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.model.grid_shape

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Any supported input -> normalised (3, S, S) tensor."""
        return self.transform(load_image(image, self.max_pixels))

    def evidence_head(self) -> ImageNetEvidence:
        """The encoder's untuned ImageNet tail and classifier (captioner.model.evidence)."""
        if self._evidence_head is None:
            train_config = self.config.get("metadata", {}).get("train_config", {})
            check_untuned_before(train_config.get("fine_tune_from"))
            self._evidence_head = ImageNetEvidence(self.model.encoder.backbone_name).to(self.device)
        return self._evidence_head

    def evidence_trunk(self) -> torch.nn.Module:
        """The encoder's stages before the evidence stage, on the runtime the encoder uses."""
        if self._evidence_trunk is None:
            self._evidence_trunk = runtime_encoder(self.model.encoder, until_stage=EVIDENCE_STAGE)
        return self._evidence_trunk

    def encode_with_evidence(
        self, pixels: torch.Tensor, focus: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Photos (B, 3, S, S) -> grids (B, L, D) and ImageNet probabilities (B, 1000), of the focus
        region where `focus` (B, L) has one (captioner.model.focus.region_evidence): the stages
        before the evidence stage run once, then the tuned tail and the untuned one, in
        channels_last, where a CPU's convolutions are fastest (captioner.model.evidence). The int8
        encoder gives both from its one pass: the same grids as without evidence."""
        if isinstance(self.encoder, OnnxEncoder) and self.encoder.stage_output is not None:
            features, stage_input = self.encoder.with_stage_input(pixels)
            stage_input = stage_input.contiguous(memory_format=torch.channels_last)
        else:
            stage_input = self.evidence_trunk()(pixels).contiguous(memory_format=torch.channels_last)
            features = self.model.encoder(stage_input, from_stage=EVIDENCE_STAGE)
        return features, region_evidence(self.evidence_head(), stage_input, focus)

    def _runtime_threads(self) -> AbstractContextManager[None]:
        """With the encoder on onnxruntime (a CPU), torch's own operations run on one thread
        during a call, so that its idle workers do not spin on onnxruntime's cores
        (captioner.model.onnx_runtime.torch_on_one_thread)."""
        return torch_on_one_thread() if isinstance(self.encoder, OnnxEncoder) else nullcontext()

    @torch.inference_mode()
    def caption_tensors(
        self,
        pixels: torch.Tensor,
        options: DecodeOptions | None = None,
        focus: torch.Tensor | None = None,
        evidence: bool = False,
        **decoding: Any,
    ) -> list[CaptionResult]:
        """Caption a preprocessed batch (B, 3, S, S); `focus` is an attention bias (B, L).
        Decoding: `options`, with any of its fields given as keywords changed (see caption)."""
        with self._runtime_threads():
            return self._caption_tensors(pixels, decode_options(options, decoding), focus, evidence)

    def _caption_tensors(
        self, pixels: torch.Tensor, options: DecodeOptions, focus: torch.Tensor | None, evidence: bool
    ) -> list[CaptionResult]:
        pixels = pixels.to(self.device)
        chunk = CPU_ENCODER_BATCH if self.device.type == "cpu" else len(pixels) or 1
        probabilities = None
        # semantic attributes (issue #37 2c): a decoder that reads the evidence gets it always
        if evidence or options.uses_evidence or reads_attributes(self.model.decoder):
            batches = pixels.split(chunk)
            regions = [None] * len(batches) if focus is None else focus.to(self.device).split(chunk)
            parts = [self.encode_with_evidence(*part) for part in zip(batches, regions, strict=True)]
            features, probabilities = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            features = torch.cat([self.encoder(part) for part in pixels.split(chunk)])
        return caption_features(
            self.decoder,
            self.vocab,
            features,
            options,
            None if focus is None else focus.to(self.device),
            probabilities,
            report_evidence=evidence or options.uses_evidence,
        )

    def focus_bias(self, focus: Focus | None, image_size: tuple[int, int], strength: float) -> torch.Tensor:
        """A box or mask on an image of (width, height) pixels -> its attention bias (L,)."""
        if focus is None:
            return torch.zeros(self.grid_shape[0] * self.grid_shape[1])
        return check_strength(strength) * focus_weights(focus, image_size, self.grid_shape)

    @overload
    def caption(
        self,
        images: ImageInput,
        options: DecodeOptions | None = ...,
        *,
        batch_size: int = ...,
        focus: Focus | Sequence[Focus | None] | None = ...,
        focus_strength: float = ...,
        evidence: bool = ...,
        **decoding: Any,
    ) -> CaptionResult: ...

    @overload  # a list of ImageInput; typed list[Any], as a list[str] is no list[ImageInput]
    def caption(
        self,
        images: list[Any] | tuple[Any, ...],
        options: DecodeOptions | None = ...,
        *,
        batch_size: int = ...,
        focus: Focus | Sequence[Focus | None] | None = ...,
        focus_strength: float = ...,
        evidence: bool = ...,
        **decoding: Any,
    ) -> list[CaptionResult]: ...

    def caption(
        self,
        images: ImageInput | list[Any] | tuple[Any, ...],
        options: DecodeOptions | None = None,
        *,
        batch_size: int = 32,
        focus: Focus | Sequence[Focus | None] | None = None,
        focus_strength: float = DEFAULT_FOCUS_STRENGTH,
        evidence: bool = False,
        **decoding: Any,
    ) -> CaptionResult | list[CaptionResult]:
        """Caption one image (returns one result) or a list of images (returns a list).

        Decoding follows `options` (a DecodeOptions; default: its defaults), with any of its
        fields given as keywords changed: `caption(image, beam_size=5, n_best=2,
        length_penalty=1.0, max_length=20, no_repeat_ngram_size=3)`. `no_repeat_ngram_size=3`
        (the default; 0 turns it off) stops "a man in a red shirt and a man in a red shirt".

        evidence=True also returns what the encoder's ImageNet classifier saw (result.evidence,
        best first, and result.word_evidence per word; captioner.model.evidence); with `focus`, of
        the region (focus_strength 0: of the whole photo); ~10% more time. The decoding options
        evidence_penalty, person_penalty, constrain_evidence (captioner.model.steering) use it.

        `focus` steers the caption toward a region: a box (x0, y0, x1, y1) in the image's
        pixels (also a 1-D array or tensor of four) or a boolean mask of its size (a list of
        those, or None, for a list of images); `focus_strength` is how hard, 0 to 10000
        (captioner.model.focus). focus=None decodes as without it.

        Images may be file paths, PIL images, numpy arrays or torch tensors ((3, H, W) or
        (H, W, 3); floats in 0..1 or 0..255, integers in 0..255: pixels, not a normalised tensor,
        whose negative values are refused). Bad inputs raise ImageLoadError naming the input;
        decoding options out of range raise ValueError naming the option.
        """
        options = decode_options(options, decoding)
        check_whole_number("batch_size", batch_size, 1)
        single = not isinstance(images, (list, tuple))
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        focuses = [focus] if single else list(focus) if focus is not None else [None] * len(items)
        if len(focuses) != len(items):
            raise ValueError(f"focus: {len(focuses)} regions for {len(items)} images")
        with self._runtime_threads():
            results = self._caption_batches(items, focuses, options, batch_size, focus_strength, evidence)
        return results[0] if single else results

    def _caption_batches(
        self,
        items: list[Any],
        focuses: list[Any],
        options: DecodeOptions,
        batch_size: int,
        focus_strength: float,
        evidence: bool,
    ) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        for start in range(0, len(items), batch_size):
            loaded = [load_image(x, self.max_pixels) for x in items[start : start + batch_size]]
            pixels = torch.stack([self.transform(image) for image in loaded])
            regions = focuses[start : start + batch_size]
            bias = (
                None
                if all(r is None for r in regions)
                else torch.stack(
                    [
                        self.focus_bias(r, im.size, focus_strength)
                        for r, im in zip(regions, loaded, strict=True)
                    ]
                )
            )
            batch = self.caption_tensors(pixels, options, bias, evidence)
            for image, result in zip(loaded, batch, strict=True):
                result.notes += self.input_notes(image.size)
            results += batch
        return results

    def input_notes(self, size: tuple[int, int]) -> list[str]:
        """Warnings about an input image of (width, height) pixels."""
        width, height = size
        if min(width, height) >= TINY_IMAGE:
            return []
        side = self.model.encoder.image_size
        return [
            f"the image is only {width}x{height} pixels: the model sees it blown up to {side}x{side}, "
            "so the caption says little about it"
        ]
