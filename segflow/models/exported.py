"""Exported models (``.pt2`` via torch.export, ``.onnx`` via onnxruntime) described by a card.

Both take float [0, 1] RGB NCHW and return logits; the card's contract (fixed size or size
multiple, static or dynamic batch) is applied here so callers pass images of any size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from segflow.models.card import ModelCard, read_card
from segflow.models.errors import ModelCardError
from segflow.models.geometry import logits_at_input_size
from segflow.models.runtime import resolve_device
from segflow.models.semantic import SemanticModel

Forward = Callable[[torch.Tensor], torch.Tensor]


class ExportedSemanticModel(SemanticModel):
    def __init__(self, *, card: ModelCard, model_path: Path, forward: Forward, **options):
        super().__init__(name=card.name, classes=card.classes, **options)
        self.card = card
        self.model_path = model_path
        self._forward = forward

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return logits_at_input_size(
            self._checked_forward,
            images.float().div(255),
            fixed_size=self.card.fixed_size,
            size_multiple=self.card.size_multiple,
        )

    def _checked_forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.card.batch is None:
            logits = self._forward(batch)
        else:
            logits = torch.cat(
                [self._static_batch_forward(chunk) for chunk in batch.split(self.card.batch)]
            )
        expected = (batch.shape[0], len(self.classes), *batch.shape[-2:])
        if tuple(logits.shape) != expected:
            raise ModelCardError(
                f"{self.model_path} returned logits of shape {tuple(logits.shape)} for input "
                f"{tuple(batch.shape)}, but its card {self.card.path} implies {expected} "
                f"({len(self.classes)} classes, output at input resolution)"
            )
        return logits

    def _static_batch_forward(self, chunk: torch.Tensor) -> torch.Tensor:
        # A graph exported with a fixed batch takes exactly that many images: pad the last
        # chunk with blank images and drop their logits.
        missing = self.card.batch - chunk.shape[0]
        padded = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, missing)) if missing else chunk
        return self._forward(padded)[: chunk.shape[0]]


class OnnxForward:
    """Runs an onnxruntime session on torch tensors (through host memory)."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits, *_) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(batch.device)


def load_pt2(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    **semantic_options,
) -> ExportedSemanticModel:
    """``precision="auto"`` is fp32 even on CUDA: the graph is a fixed artifact whose card
    reference was measured in fp32, so autocast ("bf16", "fp16") is an explicit opt-in."""
    card, forward, resolved = load_program(Path(path), device, weights, task="semantic")
    return ExportedSemanticModel(
        card=card,
        model_path=Path(path),
        forward=forward,
        device=resolved,
        **semantic_options,
        batch_size=batch_size,
        precision="fp32" if precision == "auto" else precision,
        # The exported graph fixes its own layouts; there is no module to convert.
        channels_last=False,
    )


def load_program(
    path: Path, device: str | torch.device, weights: str | Path | None, *, task: str
) -> tuple[ModelCard, torch.nn.Module, torch.device]:
    """A ``.pt2`` program on ``device``, with its card, which must state ``task``."""
    card = exported_card(path, weights, task)
    resolved = resolve_device(device)
    program = torch.export.load(path)
    if resolved.type != "cpu":
        # Moves constants baked into the graph too, which module().to(device) would miss.
        program = torch.export.passes.move_to_device_pass(program, resolved)
    return card, program.module(), resolved


def load_onnx(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    **semantic_options,
) -> ExportedSemanticModel:
    """``device="auto"`` picks CUDA only when both torch and onnxruntime can use it.
    ``precision`` can only be fp32 ("auto"): onnxruntime runs the graph as exported."""
    import onnxruntime

    path = Path(path)
    card = exported_card(path, weights, "semantic")
    if precision not in ("auto", "fp32"):
        raise ValueError(
            f"{path}: ONNX models run in the precision they were exported in; "
            f"precision must be 'auto' or 'fp32', got {precision!r}"
        )
    has_cuda_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if isinstance(device, str) and device == "auto" and not has_cuda_provider:
        device = "cpu"
    resolved = resolve_device(device)
    providers: list[str | tuple[str, dict]] = ["CPUExecutionProvider"]
    if resolved.type == "cuda":
        if not has_cuda_provider:
            raise ValueError(
                f"device {device!r} was requested but this onnxruntime has no "
                f"CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": resolved.index or 0}))
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    return ExportedSemanticModel(
        card=card,
        model_path=path,
        forward=OnnxForward(session),
        device=resolved,
        **semantic_options,
        batch_size=batch_size,
        precision="fp32",
        channels_last=False,
    )


def exported_card(path: Path, weights: str | Path | None, task: str) -> ModelCard:
    """The card of an exported model, which carries its own weights, for a ``task`` loader."""
    if weights is not None:
        raise ValueError(
            f"{path} is an exported model and carries its own weights; got weights={weights!r}"
        )
    card = read_card(path)
    if card.task != task:
        raise ModelCardError(f"model card {card.path} states a {card.task} model, not {task}")
    return card
