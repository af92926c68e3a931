"""Model files as untrusted input: a .pt2 that would run code is refused with nothing run, a
model file replaced during a run is caught by its hash, a card that does not fit its graph
fails the load, and images smaller than the graph's minimum are padded up to it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segflow.models import (
    ModelCardError,
    ModelIntegrityError,
    UnsafeModelError,
    load_model,
    model_file,
)
from segflow.models.weights import read_state_dict
from segflow.shard import segment_images

ROOT = "espnet_camvid/"
WEIGHTS_CONFIG = ROOT + "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = ROOT + "data/constants/model_constants_config.json"
PROGRAM = ROOT + "models/model.json"

Entries = dict[str, bytes]


class Touch:
    """Unpickling it creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def copy_model(shared: Path, folder: Path, suffix: str = ".pt2") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"espnet_camvid{suffix}"
    shutil.copy(shared / "models" / path.name, path)
    shutil.copy(shared / "models" / "espnet_camvid.json", path.with_suffix(".json"))
    return path


def rewrite(path: Path, edit: Callable[[Entries], None]) -> Path:
    """Rewrite the zip at ``path`` with ``edit`` applied to its entries (name -> bytes)."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    edit(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def edit_json(entries: Entries, name: str, edit: Callable[[dict], None]) -> None:
    value = json.loads(entries[name])
    edit(value)
    entries[name] = json.dumps(value).encode()


def pickled_weight(payload: bytes) -> Callable[[Entries], None]:
    def edit(entries: Entries) -> None:
        def mark(config: dict) -> None:
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            entries[ROOT + "data/weights/" + first["path_name"]] = payload

        edit_json(entries, WEIGHTS_CONFIG, mark)

    return edit


def pickled_constant(payload: bytes) -> Callable[[Entries], None]:
    def edit(entries: Entries) -> None:
        entry = {"path_name": "tensor_0", "is_param": False, "use_pickle": True}
        edit_json(entries, CONSTANTS_CONFIG, lambda config: config["config"].update(c=entry))
        entries[ROOT + "data/constants/tensor_0"] = payload

    return edit


def added(entry: str) -> Callable[[bytes], Callable[[Entries], None]]:
    return lambda payload: lambda entries: entries.update({entry: payload})


def shell(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def guard_code(marker: Path) -> Callable[[Entries], None]:
    def edit(entries: Entries) -> None:
        guard = f"{shell(marker)} == 0"
        edit_json(entries, PROGRAM, lambda program: program["guards_code"].append(guard))

    return edit


def shape_expression(marker: Path) -> Callable[[Entries], None]:
    def edit(entries: Entries) -> None:
        text = entries[PROGRAM].decode()
        first = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', first)
        entries[PROGRAM] = (text[:first] + shell(marker) + text[end:]).encode()

    return edit


# Each way an archive can make torch.export.load (or the module it builds) run code.
PAYLOAD_EDITS = {
    "pickled weight": pickled_weight,
    "pickled tensor constant": pickled_constant,
    "custom object": added(ROOT + "data/constants/custom_obj_0"),
    "opaque object": added(ROOT + "data/constants/opaque_obj_0"),
    "legacy pickled state dict": added(ROOT + "data/weights/model.pt"),
    "sample inputs that are not weights-only": added(ROOT + "data/sample_inputs/model.pt"),
    "compiled code": added(ROOT + "data/aotinductor/model/model.so"),
    "legacy layout at the top": added("serialized_state_dict.pt"),
}
CODE_EDITS = {"guard code": guard_code, "shape expression": shape_expression}


@pytest.fixture
def espnet(shared: Path, tmp_path: Path) -> Path:
    return copy_model(shared, tmp_path / "model")


@pytest.mark.parametrize("how", [*PAYLOAD_EDITS, *CODE_EDITS])
def test_a_pt2_that_would_run_code_is_refused_and_nothing_runs(espnet, tmp_path, how):
    marker = tmp_path / "marker"
    if how in PAYLOAD_EDITS:
        rewrite(espnet, PAYLOAD_EDITS[how](pickle.dumps(Touch(marker), protocol=2)))
    else:
        rewrite(espnet, CODE_EDITS[how](marker))
    with pytest.raises(UnsafeModelError, match="refusing to load it") as refused:
        load_model(espnet, device="cpu")
    assert str(espnet) in str(refused.value)
    assert not marker.exists()


def test_an_instance_pt2_is_checked_too(espnet, tmp_path):
    marker = tmp_path / "marker"
    rewrite(espnet, pickled_weight(pickle.dumps(Touch(marker), protocol=2)))
    instances = {"method": "boundary-band", "things": ["car"], "band": 2, "min_area": 20}
    write_card(espnet, lambda card: card.update(task="instance", instances=instances))
    with pytest.raises(UnsafeModelError, match="as a pickle"):
        load_model(espnet, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["pickled weight", "sample inputs that are not weights-only"])
def test_torch_itself_would_run_those_pickles(espnet, tmp_path, how):
    """The archives above are live: torch.export.load runs their payload (the check the
    refusal test is measured against)."""
    marker = tmp_path / "marker"
    rewrite(espnet, PAYLOAD_EDITS[how](pickle.dumps(Touch(marker), protocol=2)))
    with contextlib.suppress(Exception):
        torch.export.load(espnet)
    assert marker.exists()


def test_the_shared_models_pass_the_check_and_load(shared):
    for name in ("espnet_camvid", "espnetv2_voc"):
        model = load_model(shared / "models" / f"{name}.pt2", device="cpu")
        assert model.predict([np.zeros((16, 16, 3), np.uint8)])[0].labels.shape == (16, 16)


# --------------------------------------------------------------------------------------------
# The model file's sha256: recorded, pinned, checked on the bytes loaded.


def test_model_file_is_the_file_a_model_is_built_from(espnet, tmp_path):
    found = model_file(espnet)
    assert found.path == espnet
    assert found.sha256 == hashlib.sha256(espnet.read_bytes()).hexdigest()
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, weights)
    assert model_file("smp:Unet", weights=weights).path == weights
    assert model_file("lraspp_mobilenet_v3_large", weights="none") is None
    with pytest.raises(ModelIntegrityError, match="random weights reads no file"):
        load_model("lraspp_mobilenet_v3_large", weights="none", sha256=found.sha256)


def test_a_weights_file_of_another_hash_is_refused(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, weights)
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert read_state_dict(weights, actual)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ModelIntegrityError, match=f"{weights} has sha256 {actual}, expected 0+"):
        read_state_dict(weights, "0" * 64)
    with pytest.raises(ModelIntegrityError, match="64 hex digits"):
        read_state_dict(weights, "abc")


def replace_model(path: Path) -> None:
    """Another valid model in the same place: the same archive with one more entry."""
    rewrite(path, lambda entries: entries.update({ROOT + "extra/note": b"retrained"}))


def actor_arguments(model: Path, sha256: str) -> dict:
    return {
        "model": str(model),
        "device": "cpu",
        "model_options": {},
        "model_sha256": sha256,
        "batch_size": 2,
        "prefetch_threads": 1,
        "max_pixels": None,
        "gt": None,
        "ignore_index": None,
        "trimap_width": 5,
        "read_timeout": 60.0,
        "stall_timeout": 600.0,
    }


def test_an_actor_refuses_a_model_file_replaced_after_the_run_recorded_it(espnet):
    from workers.segment_actor import SegmentActor

    recorded = model_file(espnet).sha256
    replace_model(espnet)
    now = model_file(espnet).sha256
    with pytest.raises(ModelIntegrityError) as refused:
        SegmentActor(**actor_arguments(espnet, recorded))
    assert f"model file {espnet} has sha256 {now}, expected {recorded}" in str(refused.value)


@pytest.mark.slow
@pytest.mark.integration
def test_actors_on_ray_fail_their_shards_on_a_replaced_model_file(local_ray, espnet, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segflow.errors import RunIncompleteError
    from segflow.manifest import ManifestReader, Shard
    from segflow.store import RunStore
    from workers.pool import WorkerConfig, segment_shards, start_workers

    recorded = model_file(espnet).sha256
    replace_model(espnet)
    arguments = actor_arguments(espnet, recorded)
    arguments["model_options"] = ()
    config = WorkerConfig(**arguments, cpus_per_actor=1)
    workers = start_workers(config, max_actors=1)
    store = RunStore(str(tmp_path / "out"), "r")
    pq.write_table(pa.table({"uri": ["unused.png"]}), tmp_path / "manifest.parquet")
    manifest = ManifestReader((tmp_path / "manifest.parquet").open("rb"))
    try:
        with pytest.raises(RunIncompleteError) as failed:
            list(segment_shards(workers, store, manifest, [Shard(0, 0, 1)], config))
    finally:
        workers.stop()
    message = str(failed.value)
    assert message.startswith("shard-000000 did not run: ")
    assert f"{espnet} has sha256 {model_file(espnet).sha256}, expected {recorded}" in message
    assert not (tmp_path / "out" / "run=r" / "_commits").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_the_cli_refuses_an_unsafe_model_and_a_model_of_another_hash(shared, frames, tmp_path):
    from tests.test_segment_flow import Cli, make_corpus

    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    marker = tmp_path / "marker"
    unsafe = rewrite(
        copy_model(shared, tmp_path / "unsafe_model"),
        pickled_weight(pickle.dumps(Touch(marker), protocol=2)),
    )
    model = copy_model(shared, tmp_path / "model")
    actual = model_file(model).sha256
    cases = {
        "unsafe": ([str(corpus), "--model", str(unsafe)], "refusing to load it"),
        "another hash": (
            [str(corpus), "--model", str(model), "--model-sha256", "f" * 64],
            f"has sha256 {actual}, expected {'f' * 64}",
        ),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        returncode, output = Cli(*args, "--out", str(out), log=tmp_path / f"{name}.log").wait()
        assert returncode == 2, (name, output)
        assert message in " ".join(output.split()), (name, output)
        assert not out.exists(), name
    # Neither the driver nor any actor (prestarted before the driver's checks) ran the pickle.
    assert not marker.exists()

    out = tmp_path / "pinned"
    args = [str(corpus), "--model", str(model), "--model-sha256", actual.upper()]
    returncode, output = Cli(*args, "--out", str(out), log=tmp_path / "pinned.log").wait()
    assert returncode == 0, output
    (run_json,) = out.glob("*/run.json")
    assert json.loads(run_json.read_text())["model_sha256"] == actual


# --------------------------------------------------------------------------------------------
# Cards that do not fit their model, or no model at all.


def write_card(model: Path, edit: Callable[[dict], None]) -> None:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda card: card.update(classes=[f"c{i}" for i in range(200_000)]), "200000 classes"),
        (lambda card: card["input"].update(fixed_size=[100_000, 100_000]), "input.fixed_size"),
        (lambda card: card["input"].update(size_multiple=None, batch=10**9), "input.batch"),
        (lambda card: card["input"].update(size_multiple=100_000), "input.size_multiple"),
    ],
)
def test_unreasonable_card_values_are_refused_when_the_card_is_read(espnet, edit, message):
    write_card(espnet, edit)
    with pytest.raises(ModelCardError, match=message) as refused:
        load_model(espnet, device="cpu")
    assert str(espnet.with_suffix(".json")) in str(refused.value)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_card_with_other_classes_than_the_graph_fails_the_load(shared, tmp_path, suffix):
    model = copy_model(shared, tmp_path / "model", suffix)
    write_card(model, lambda card: card.update(classes=card["classes"][:5]))
    with pytest.raises(ModelCardError, match=r"\(5 classes") as refused:
        load_model(model, device="cpu")
    assert str(model.with_suffix(".json")) in str(refused.value)
    assert "shape (1, 11," in str(refused.value)


def test_a_card_admitting_inputs_the_graph_refuses_fails_the_load(espnet):
    # The graph takes sides from 64 px only: stated as 16, with no minimum, it is refused.
    write_card(espnet, lambda card: card["input"].update(fixed_size=[16, 16], size_multiple=None))
    with pytest.raises(ModelCardError, match="does not run on the smallest input"):
        load_model(espnet, device="cpu")


# --------------------------------------------------------------------------------------------
# Images smaller than the graph's minimum side.

SMALL = [(1, 1), (1, 500), (30, 30)]


@pytest.fixture(scope="module", params=[".pt2", ".onnx"])
def espnet_model(request, shared):
    return load_model(shared / "models" / f"espnet_camvid{request.param}", device="cpu")


def small_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in SMALL]


def test_small_images_are_padded_up_to_the_graphs_minimum(espnet_model):
    # The .pt2 states its minimum in its range constraints; the ONNX graph takes any multiple
    # of 8 (the card's size_multiple), so 30 px is padded to 32 there.
    pt2 = espnet_model.model_path.suffix == ".pt2"
    assert espnet_model.min_size == (64 if pt2 else None)
    side = 64 if pt2 else 32
    images = small_images()
    predictions = espnet_model.predict(images)
    assert [tuple(p.labels.shape) for p in predictions] == SMALL
    # Padded bottom-right with zeros and cropped back, as a larger image would be.
    padded = np.zeros((side, side, 3), np.uint8)
    padded[:30, :30] = images[2]
    (whole,) = espnet_model.predict([padded])
    assert torch.equal(predictions[2].labels, whole.labels[:30, :30])


def test_small_images_are_segmented_in_a_shard_without_errors(espnet_model, tmp_path):
    uris = []
    for (height, width), image in zip(SMALL, small_images(), strict=True):
        path = tmp_path / f"{height}x{width}.png"
        Image.fromarray(image).save(path)
        uris.append(str(path))
    result = segment_images(espnet_model, uris, run_id="small", prefetch_threads=1)
    assert result.tables["errors"].num_rows == 0
    images = result.tables["images"].to_pylist()
    assert [row["status"] for row in images] == ["ok"] * 3
    assert [(row["height"], row["width"]) for row in images] == SMALL
