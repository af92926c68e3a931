"""Train the demo U-Net on the synthetic aerial corpus and export it as two segflow models.

One network is trained once: a :class:`~segflow.models.unet.UNet` (base width 16, depth 3)
whose output is the corpus's class logits plus one instance-boundary logit (the band of
``BAND`` pixels along the inside of each building's and car's edge). Two graphs are exported
from it with ``torch.export``, each with its model card:

- ``aerial_unet.pt2``: the class logits, a semantic model;
- ``aerial_instances.pt2``: class and boundary logits, an instance model read by the
  boundary-band adapter (:mod:`segflow.models.exported_instance`).

Loss: cross-entropy + Dice over the classes, binary cross-entropy + Dice over the boundary.
Training samples random crops (half of them centred on a car: cars are under 1% of the
pixels), rotated and flipped; seeds fix the crops, the augmentation and the initial weights,
and on a fixed number of CPU threads the run is repeatable. The committed models were made
with (CPU, one thread, 8 to 9 minutes on a shared two-core machine):

    .venv/bin/python -m segflow.demo.corpus out/aerial --split train --images 200
    nice -n 10 .venv/bin/python -m segflow.demo.train train out/aerial/train --out models/demo

and measured on the held-out split, their figures recorded in the cards, with:

    .venv/bin/python -m segflow.demo.corpus out/aerial --split heldout --images 40 \\
        --large 3 --broken 3
    .venv/bin/segflow segment out/aerial/heldout/images --model models/demo/aerial_unet.pt2 \\
        --gt masks:out/aerial/heldout/labels --out out/eval/semantic
    .venv/bin/segflow evaluate out/eval/semantic --json > out/eval/semantic.json
    .venv/bin/python -m segflow.demo.train record models/demo/aerial_unet.json \\
        out/eval/semantic.json

and the same for ``aerial_instances.pt2`` with ``--gt
coco:out/aerial/heldout/instances.json``. (``segment`` exits with status 1 there: the three
broken files fail, as they should.)
"""

from __future__ import annotations

import argparse
import json
import platform
import posixpath
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from segflow import rle
from segflow.decode import decode_image, decode_label_map
from segflow.demo.corpus import CAR, CLASSES, THINGS
from segflow.groundtruth import read_coco, read_json
from segflow.models.card import card_fields
from segflow.models.exported_instance import METHOD
from segflow.models.unet import UNet

BAND = 2  # pixels: the boundary band's width, from an instance's edge inwards
MIN_AREA = 20  # pixels: smaller predicted pieces are noise; the corpus draws no object under 40
SEMANTIC_NAME = "aerial_unet"
INSTANCE_NAME = "aerial_instances"


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # (3, H, W) uint8
    labels: torch.Tensor  # (H, W) int64 class ids
    band: torch.Tensor  # (H, W) bool: in an instance's boundary band


def boundary_band(instances: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels of an instance (``instances`` > 0) with a pixel of anything else within
    ``width`` pixels (8-neighbourhood). The image border is not an edge: an object cut by it
    continues beyond."""
    ids = instances[None, None].float()
    high = F.max_pool2d(ids, 2 * width + 1, stride=1, padding=width)
    low = -F.max_pool2d(-ids, 2 * width + 1, stride=1, padding=width)
    return ((instances > 0) & ((high != ids) | (low != ids))[0, 0]).contiguous()


def load_split(root: str) -> tuple[list[Example], list[tuple[int, float, float]], dict]:
    """A corpus split's examples, the centres (example, y, x) of its cars, and its parameters
    (``corpus.json``)."""
    root = root.rstrip("/")
    parameters = read_json(f"{root}/corpus.json", "corpus parameters", ValueError)
    if parameters.get("classes") != list(CLASSES):
        raise ValueError(
            f"{root}/corpus.json: classes {parameters.get('classes')} are not {list(CLASSES)}"
        )
    coco = read_coco(f"{root}/instances.json")
    car_category = THINGS.index(CAR) + 1
    examples, cars = [], []
    for image_id, entry in sorted(coco.images.items()):
        name = entry["file_name"]
        with fsspec.open(f"{root}/images/{name}", "rb") as f:
            image = decode_image(f.read(), name=name)
        label_name = f"{posixpath.splitext(name)[0]}.png"
        with fsspec.open(f"{root}/labels/{label_name}", "rb") as f:
            labels = torch.from_numpy(decode_label_map(f.read(), name=label_name))
        instances = torch.zeros(labels.shape, dtype=torch.int64)
        for k, annotation in enumerate(coco.annotations.get(image_id, []), start=1):
            instances[torch.from_numpy(rle.decode(annotation["segmentation"])).bool()] = k
            if annotation["category_id"] == car_category:
                x, y, w, h = annotation["bbox"]
                cars.append((len(examples), y + h / 2, x + w / 2))
        examples.append(Example(image.permute(2, 0, 1), labels, boundary_band(instances, BAND)))
    if not examples:
        raise ValueError(f"{root}/instances.json lists no images")
    return examples, cars, parameters


class CropSampler:
    """Random training crops, from one seeded generator."""

    def __init__(self, examples, cars, crop: int, seed: int) -> None:
        if any(min(e.labels.shape) < crop for e in examples):
            raise ValueError(f"crop {crop} is larger than an image of the training split")
        self.examples, self.cars, self.crop = examples, cars, crop
        self.generator = torch.Generator().manual_seed(seed)
        self.areas = torch.tensor([e.labels.numel() for e in examples], dtype=torch.float64)

    def _integer(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _crop(self) -> tuple[Example, int, int]:
        if self.cars and self._integer(2):
            index, y, x = self.cars[self._integer(len(self.cars))]
            example = self.examples[index]
            top = int(y) - self.crop // 2 + self._integer(self.crop // 2) - self.crop // 4
            left = int(x) - self.crop // 2 + self._integer(self.crop // 2) - self.crop // 4
        else:
            example = self.examples[int(torch.multinomial(self.areas, 1, generator=self.generator))]
            top = self._integer(example.labels.shape[0] - self.crop + 1)
            left = self._integer(example.labels.shape[1] - self.crop + 1)
        height, width = example.labels.shape
        top = min(max(top, 0), height - self.crop)
        left = min(max(left, 0), width - self.crop)
        return example, top, left

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (N, 3, crop, crop) float in [0, 1], labels (N, crop, crop), band (N, ...)."""
        images, labels, bands = [], [], []
        for _ in range(size):
            example, top, left = self._crop()
            window = (slice(top, top + self.crop), slice(left, left + self.crop))
            turns, flip = self._integer(4), self._integer(2)
            for out, tensor in (
                (images, example.image[:, window[0], window[1]]),
                (labels, example.labels[window]),
                (bands, example.band[window]),
            ):
                tensor = torch.rot90(tensor, turns, dims=(-2, -1))
                out.append(tensor.flip(-1) if flip else tensor)
        return (
            torch.stack(images).float().div(255),
            torch.stack(labels),
            torch.stack(bands).float(),
        )


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - the mean over channels of the soft Dice coefficient, (N, C, H, W) both."""
    dims = (0, 2, 3)
    intersection = (probabilities * targets).sum(dims)
    total = probabilities.sum(dims) + targets.sum(dims)
    return 1 - ((2 * intersection + 1) / (total + 1)).mean()


def loss_of(logits: torch.Tensor, labels: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    classes, boundary = logits[:, :-1], logits[:, -1:]
    one_hot = F.one_hot(labels, len(CLASSES)).permute(0, 3, 1, 2).float()
    return (
        F.cross_entropy(classes, labels)
        + dice_loss(torch.softmax(classes, dim=1), one_hot)
        + F.binary_cross_entropy_with_logits(boundary[:, 0], band)
        + dice_loss(torch.sigmoid(boundary), band[:, None])
    )


def train(
    examples, cars, *, steps: int, batch: int, crop: int, lr: float, seed: int
) -> tuple[UNet, list[float]]:
    """The trained network (in eval mode) and the loss every 50 steps."""
    torch.manual_seed(seed)
    network = UNet(len(CLASSES) + 1)
    sampler = CropSampler(examples, cars, crop, seed)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    network.train()
    losses, started, running = [], time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        images, labels, band = sampler.batch(batch)
        loss = loss_of(network(images), labels, band)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        if step % 50 == 0 or step == steps:
            losses.append(round(running / (step - 50 * (len(losses))), 4))
            running = 0.0
            elapsed = time.perf_counter() - started
            print(f"step {step}/{steps}  loss {losses[-1]:.4f}  {elapsed:.0f} s", flush=True)
    return network.eval(), losses


class _ClassLogits(nn.Module):
    """The network without its boundary logit."""

    def __init__(self, network: UNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)[:, :-1]


def export(module: nn.Module, size_multiple: int, path: Path) -> None:
    """``module`` as a torch.export program of any batch and any multiple of the size."""
    batch, height, width = (torch.export.Dim(name) for name in ("batch", "height", "width"))
    example = torch.rand(2, 3, 3 * size_multiple, 4 * size_multiple)
    shapes = {"image": {0: batch, 2: size_multiple * height, 3: size_multiple * width}}
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    torch.export.save(program, path)


def model_card(name: str, task: str, network: UNet, provenance: dict[str, Any]) -> dict:
    card = card_fields(
        name=name.replace("_", "-"),
        task=task,
        classes=list(CLASSES),
        size_multiple=network.size_multiple,
    )
    card["files"] = {"pt2": f"{name}.pt2"}
    card["input"]["note"] = (
        f"normalisation is folded into the graph; H and W must be multiples of "
        f"{network.size_multiple} (pad, then crop the output)"
    )
    if task == "semantic":
        card["ground_truth"] = {"format": "index PNG, one value per class id above"}
    else:
        card["output"]["channels"] = "the classes' logits, then one instance-boundary logit"
        card["instances"] = {
            "method": METHOD,
            "things": [CLASSES[thing] for thing in THINGS],
            "band": BAND,
            "min_area": MIN_AREA,
        }
        card["ground_truth"] = {"format": "COCO instances; categories named as the things"}
    card["source"] = (
        f"segflow.models.unet.UNet(base=16, depth={network.depth}), "
        f"{sum(p.numel() for p in network.parameters())} parameters, trained from scratch by "
        "segflow.demo.train on segflow's synthetic aerial corpus (segflow.demo.corpus)"
    )
    card["provenance"] = provenance
    return card


def run_training(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    examples, cars, corpus = load_split(args.corpus)
    print(f"{len(examples)} images, {len(cars)} cars from {args.corpus}", flush=True)
    network, losses = train(
        examples,
        cars,
        steps=args.steps,
        batch=args.batch,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export(_ClassLogits(network), network.size_multiple, out / f"{SEMANTIC_NAME}.pt2")
    export(network, network.size_multiple, out / f"{INSTANCE_NAME}.pt2")
    provenance = {
        "command": shlex.join(["python", "-m", "segflow.demo.train", *sys.argv[1:]]),
        "seed": args.seed,
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "crop": args.crop,
            "optimiser": f"AdamW, one-cycle learning rate up to {args.lr}, weight decay 1e-4",
            "loss": "cross-entropy + Dice (classes), binary cross-entropy + Dice (boundary band)",
            "boundary_band": BAND,
            "loss_every_50_steps": losses,
            "threads": args.threads,
            "wall_seconds": round(time.perf_counter() - started),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "corpus": corpus,
    }
    for name, task in ((SEMANTIC_NAME, "semantic"), (INSTANCE_NAME, "instance")):
        card = model_card(name, task, network, provenance)
        (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}/{SEMANTIC_NAME}.pt2 and {out}/{INSTANCE_NAME}.pt2 with their cards")


def reference_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of ``segflow evaluate --json`` that a card records."""
    if "semantic" in result:
        semantic = result["semantic"]
        return {
            "mIoU": _rounded(semantic["miou"]),
            "pixel_accuracy": _rounded(semantic["pixel_accuracy"]),
            "boundary_iou": _rounded(semantic["boundary_iou"]),
            "per_class_iou": [_rounded(v) for v in semantic["per_class_iou"]],
        }
    return {
        iou_type: {
            **{
                name: _rounded(value)
                for name, value in zip(scores["stat_names"], scores["stats"], strict=True)
                if name in ("AP", "AP50", "AP75", "AR100")
            },
            "per_class_ap": {c: _rounded(v) for c, v in scores["per_class_ap"].items()},
        }
        for iou_type, scores in result["instance"].items()
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def record_reference(card_path: Path, result_path: Path) -> dict[str, Any]:
    """Write the figures of ``result_path`` (``segflow evaluate --json``) into the card at
    ``card_path`` as its ``reference``, after checking that they are the card's model's."""
    from segflow.evaluation import open_run

    card = json.loads(card_path.read_text(encoding="utf-8"))
    result = json.loads(result_path.read_text(encoding="utf-8"))
    run = open_run(result["run"]).store.read_json("run.json")
    if Path(run["model"]).resolve() != card_path.with_suffix(".pt2").resolve():
        raise ValueError(
            f"{result_path} evaluates a run of {run['model']}, not of {card_path}'s model"
        )
    if card["task"] not in result:
        raise ValueError(f"{result_path} holds no {card['task']} figures")
    corpus = f"{posixpath.dirname(run['input'].rstrip('/'))}/corpus.json"
    fs, path = fsspec.core.url_to_fs(corpus)
    card["reference"] = {
        "data": run["input"],
        # The corpus parameters, where the data is a split of the demo corpus.
        **({"corpus": json.loads(fs.cat_file(path))} if fs.exists(path) else {}),
        "ground_truth": run["gt"],
        "images_evaluated": result["images"]["evaluated"],
        "measured_with": "segflow segment DATA --model <this model> --gt GROUND_TRUTH, then "
        "segflow evaluate --json (the commands in segflow/demo/train.py)",
        **reference_figures(result),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card["reference"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segflow.demo.train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="train on a corpus split and export")
    training.add_argument("corpus", help="the split's folder (URI), e.g. out/aerial/train")
    training.add_argument("--out", default="models/demo", help="folder for the models")
    training.add_argument("--steps", type=int, default=1400)
    training.add_argument("--batch", type=int, default=8)
    training.add_argument("--crop", type=int, default=128)
    training.add_argument("--lr", type=float, default=3e-3)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--threads", type=int, default=1, help="CPU threads (results depend on it)"
    )
    recording = commands.add_parser("record", help="record held-out figures in a model card")
    recording.add_argument("card", type=Path, help="the model card (.json)")
    recording.add_argument("result", type=Path, help="the output of segflow evaluate --json")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.crop < 8 or args.crop % 8:
            parser.error(f"--crop must be a positive multiple of 8 (2^depth), got {args.crop}")
        if args.steps < 1 or args.batch < 1:
            parser.error(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
        run_training(args)
    else:
        try:
            print(json.dumps(record_reference(args.card, args.result), indent=2))
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"cannot record {args.result} in {args.card}: {error!r}")


if __name__ == "__main__":
    main()
