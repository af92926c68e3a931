"""Exported models (``.pt2`` via torch.export, ``.onnx`` via onnxruntime) described by a card.

Both take float [0, 1] RGB NCHW and return logits; the card's contract (fixed size or size
multiple, minimum size, static or dynamic batch) is applied here so callers pass images of
any size.

Loading reads the model file once and builds the model from those bytes: checked against
an expected sha256 when given (:mod:`segflow.models.integrity`), and for a ``.pt2`` checked
to carry no code that loading would run (:mod:`segflow.models.pt2_archive`; an ONNX graph
runs in onnxruntime, which runs no Python). Then one forward pass of the smallest image the
card admits checks the graph against its card (:func:`check_against_card`), so a card that
does not fit its graph fails the load rather than every image of a run.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from segflow.models.base import SegmentationModel
from segflow.models.card import ModelCard, read_card
from segflow.models.errors import ModelCardError
from segflow.models.geometry import logits_at_input_size
from segflow.models.integrity import read_verified
from segflow.models.pt2_archive import check_pt2
from segflow.models.runtime import resolve_device
from segflow.models.semantic import SemanticModel

Forward = Callable[[torch.Tensor], torch.Tensor]


class ExportedSemanticModel(SemanticModel):
    def __init__(
        self,
        *,
        card: ModelCard,
        model_path: Path,
        forward: Forward,
        min_size: int | None = None,
        **options,
    ):
        super().__init__(name=card.name, classes=card.classes, **options)
        self.card = card
        self.model_path = model_path
        self._forward = forward
        self.min_size = min_size

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return logits_at_input_size(
            self._checked_forward,
            images.float().div(255),
            fixed_size=self.card.fixed_size,
            size_multiple=self.card.size_multiple,
            min_size=self.min_size,
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
    sha256: str | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    **semantic_options,
) -> ExportedSemanticModel:
    """``precision="auto"`` is fp32 even on CUDA: the graph is a fixed artifact whose card
    reference was measured in fp32, so autocast ("bf16", "fp16") is an explicit opt-in."""
    program = load_program(Path(path), device, weights, sha256, task="semantic")
    return program.checked_model(
        ExportedSemanticModel, Path(path), batch_size, precision, **semantic_options
    )


@dataclass(frozen=True)
class LoadedProgram:
    card: ModelCard
    module: torch.nn.Module
    device: torch.device
    min_size: int | None  # the larger of the card's and the program's own minimum side

    def checked_model(
        self,
        model_class: type[SegmentationModel],
        path: Path,
        batch_size: int,
        precision: str,
        **options,
    ) -> SegmentationModel:
        """``model_class`` over this program, checked against its card
        (:func:`check_against_card`). ``precision="auto"`` is fp32: the graph is a fixed
        artifact whose card reference was measured in fp32."""
        return check_against_card(
            model_class(
                card=self.card,
                model_path=path,
                forward=self.module,
                min_size=self.min_size,
                device=self.device,
                batch_size=batch_size,
                precision="fp32" if precision == "auto" else precision,
                # The exported graph fixes its own layouts; there is no module to convert.
                channels_last=False,
                **options,
            )
        )


def load_program(
    path: Path,
    device: str | torch.device,
    weights: str | Path | None,
    sha256: str | None,
    *,
    task: str,
) -> LoadedProgram:
    """A ``.pt2`` program on ``device``, with its card, which must state ``task``; built from
    the bytes read once, checked (``sha256``, :func:`check_pt2`) before torch sees them."""
    card = exported_card(path, weights, task)
    resolved = resolve_device(device)
    data = read_verified(path, sha256)
    check_pt2(data, path)
    program = torch.export.load(io.BytesIO(data))
    sides = [side for side in (card.min_size, program_min_size(program)) if side is not None]
    if resolved.type != "cpu":
        # Moves constants baked into the graph too, which module().to(device) would miss.
        program = torch.export.passes.move_to_device_pass(program, resolved)
    return LoadedProgram(card, program.module(), resolved, max(sides, default=None))


def program_min_size(program: torch.export.ExportedProgram) -> int | None:
    """The smallest height and width the program's image input takes: the lower bound of its
    range constraints (``torch.export.Dim(min=...)``, or what export inferred). A dynamic
    size is never below 2 per symbol: export specialises sizes 0 and 1, and its guards
    refuse them even where the range says 0."""
    inputs = set(program.graph_signature.user_inputs)
    image = next(node for node in program.graph.nodes if node.name in inputs)
    constraints = program.range_constraints
    lowest = []
    for side in image.meta["val"].shape[-2:]:
        if not isinstance(side, torch.SymInt):
            continue  # a static side: the card's fixed_size
        expression = side.node.expr
        lower = {s: max(int(constraints[s].lower), 2) for s in expression.free_symbols}
        bound = constraints.get(expression)
        lowest.append(max(int(expression.subs(lower)), 0 if bound is None else int(bound.lower)))
    return max(lowest, default=None)


def check_against_card(model: SegmentationModel) -> SegmentationModel:
    """``model`` after one forward pass of a 1x1 image, the smallest its card admits (padded
    up to the minimum size and multiple, or resized to the fixed size, as any image is): a
    graph that refuses it, or whose logits do not fit the card's classes, is reported now."""
    image = torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=model.device)
    try:
        with torch.inference_mode(), model._autocast():
            model._logits(image)
    except ModelCardError:
        raise
    except Exception as error:
        raise ModelCardError(
            f"{model.model_path} does not run on the smallest input its card {model.card.path} "
            f"admits (a 1x1 image under fixed_size={model.card.fixed_size}, "
            f"size_multiple={model.card.size_multiple}, min_size={model.min_size}, "
            f"batch={model.card.batch or 'dynamic'}): {error}"
        ) from error
    return model


def load_onnx(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
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
    session = onnxruntime.InferenceSession(read_verified(path, sha256), providers=providers)
    return check_against_card(
        ExportedSemanticModel(
            card=card,
            model_path=path,
            forward=OnnxForward(session),
            min_size=card.min_size,
            device=resolved,
            **semantic_options,
            batch_size=batch_size,
            precision="fp32",
            channels_last=False,
        )
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
