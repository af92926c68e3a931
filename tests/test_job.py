"""The typed job: built from Python, JSON and the flow's parameters, each setting checked on
its own and against the model's task before any work, and passed whole to the model."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segflow.cli import app
from segflow.job import Job, JobError, model_option
from segflow.models.registry import load_job_model
from segflow.preflight import check_job, default_run_id, resolve_job, run_config

ESPNET = "models/espnet_camvid.pt2"


def job(**settings) -> Job:
    return Job(**{"input": "in", "model": "m", "out": "out"} | settings)


def test_a_job_round_trips_through_json_and_the_flows_parameters():
    original = job(
        batch_size=16,
        precision="bf16",
        score_threshold=0.5,
        model_options={"classes": ["road", "sky"], "weights": "none"},
        actors_per_gpu=2,
    )
    assert Job.from_json(original.to_json()) == original
    assert Job.from_parameters(json.loads(original.to_json())) == original
    assert hash(Job.from_json(original.to_json())) == hash(original)  # the pool matches by it
    assert original.model_options == (("classes", ("road", "sky")), ("weights", "none"))
    assert json.loads(original.to_json())["model_options"] == {
        "classes": ["road", "sky"],
        "weights": "none",
    }


def test_the_flows_parameters_are_the_jobs_fields_with_the_same_defaults():
    from pipelines.segment import segment

    parameters = {
        name: parameter.default
        for name, parameter in inspect.signature(segment.fn).parameters.items()
        if name not in ("on_plan", "on_shard")
    }
    fields = {
        f.name: inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(Job)
    }
    fields["model_options"] = None  # JSON's null: none given
    assert parameters == fields


def test_a_deployments_json_parameters_make_the_job():
    import yaml

    from pipelines.segment import segment
    from tests.conftest import REPO_ROOT

    deployments = yaml.safe_load((REPO_ROOT / "deploy" / "prefect.yaml").read_text())
    [deployment] = [d for d in deployments["deployments"] if d["name"] == "segment"]
    run = {"input": "s3://b/corpus/", "model": "smp:Unet", "precision": "bf16"}
    run["model_options"] = {"classes": ["road", "sky"], "weights": "/models/unet.pt"}
    validated = segment.validate_parameters(deployment["parameters"] | run)
    built = Job.from_parameters(
        {k: v for k, v in validated.items() if k not in ("on_plan", "on_shard")}
    )
    assert (built.model, built.precision, built.out) == (
        "smp:Unet",
        "bf16",
        "s3://your-bucket/segflow/runs",
    )
    assert built.model_options == (("classes", ("road", "sky")), ("weights", "/models/unet.pt"))
    assert built.ray_address == deployment["parameters"]["ray_address"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"batch_size": True}, "--batch-size must be int, got True"),
        ({"batch_size": "8"}, "--batch-size must be int, got '8'"),
        ({"precision": "fp64"}, "--precision must be one of auto, fp32, bf16, fp16"),
        ({"precision": "fp16", "device": "cpu"}, "--precision fp16 needs a GPU"),
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"decode": "nvjpeg"}, "--decode must be one of cpu, gpu"),
        ({"decode": "gpu", "device": "cpu"}, "--decode gpu needs a GPU"),
        ({"score_threshold": 1.5}, "--score-threshold must be in [0, 1]"),
        ({"mask_threshold": 1.0}, "--mask-threshold must be in [0, 1)"),
        ({"max_detections": 0}, "--max-detections must be at least 1"),
        ({"cpus_per_actor": 0}, "--cpus-per-actor must be more than 0"),
        ({"actors_per_gpu": 0}, "--actors-per-gpu must be at least 1"),
        (
            {"actors_per_gpu": 2, "device": "cpu"},
            "--actors-per-gpu 2 shares a GPU between actors, and --device is cpu",
        ),
        ({"read_timeout": float("nan")}, "--read-timeout must be float or null"),
        (
            {"model_options": {"batch_size": 4}},
            "--model-option batch_size: set it with --batch-size",
        ),
        ({"model_options": {"tile_size": 4}}, "--model-option tile_size: set it with --tile-size"),
        ({"model_options": {"a b": 1}}, "must be a Python identifier"),
        ({"model_options": [("classes", 3), ("classes", 4)]}, "classes given more than once"),
        ({"model_options": {"classes": {"a": 1}}}, "values are numbers, text or lists"),
    ],
)
def test_a_bad_setting_is_an_error_naming_its_option(settings, message):
    with pytest.raises(JobError) as raised:
        job(**settings)
    assert message in str(raised.value)


def test_parameters_name_what_is_unknown_or_missing():
    with pytest.raises(JobError, match=r"unknown job parameter\(s\) batchsize"):
        Job.from_parameters({"input": "i", "model": "m", "out": "o", "batchsize": 8})
    with pytest.raises(JobError, match="the job needs model"):
        Job.from_parameters({"input": "i", "out": "o"})
    with pytest.raises(JobError, match="must be an object"):
        Job.from_json("[1]")


def test_model_options_read_values_as_json_where_they_parse():
    assert model_option("classes=12") == ("classes", 12)
    assert model_option('classes=["road", "sky"]') == ("classes", ["road", "sky"])
    assert model_option("weights=/models/unet.pt") == ("weights", "/models/unet.pt")
    assert model_option("encoder=resnet18") == ("encoder", "resnet18")
    with pytest.raises(JobError, match="'classes' is not KEY=VALUE"):
        model_option("classes")


@pytest.mark.parametrize(
    ("model", "settings", "message"),
    [
        ("maskrcnn_resnet50_fpn", {"tile_size": 512}, "--tile-size applies to semantic models"),
        ("maskrcnn_resnet50_fpn", {"soft_metrics": True}, "--soft-metrics applies to semantic"),
        (ESPNET, {"score_threshold": 0.5}, "--score-threshold applies to instance models"),
        (ESPNET, {"max_detections": 5}, "--max-detections applies to instance models"),
        (ESPNET, {"slice_size": 512}, "--slice-size applies to instance models"),
        (ESPNET, {"slice_merge": "nms"}, "--slice-merge applies to instance models"),
    ],
)
def test_an_option_of_another_task_fails_the_check_naming_it(
    shared, tmp_path, model, settings, message
):
    spec = str(shared / model) if model == ESPNET else model
    out = tmp_path / "out"
    with pytest.raises(JobError) as raised:
        check_job(Job(input=str(tmp_path), model=spec, out=str(out), **settings))
    assert message in str(raised.value)
    assert not out.exists()


def test_the_cli_reports_an_option_of_another_task_without_a_traceback(tmp_path):
    out = tmp_path / "out"
    args = ["segment", str(tmp_path), "--model", "maskrcnn_resnet50_fpn", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--tile-size", "512"])
    assert result.exit_code == 2, result.output
    assert "--tile-size applies to semantic models only" in result.output
    assert "Traceback" not in result.output and "TypeError" not in result.output
    assert not out.exists()


def test_a_batch_of_16_reaches_the_forward_pass_as_16():
    from workers.segment_actor import SegmentActor

    settings = {"model": "lraspp_mobilenet_v3_large", "batch_size": 16, "device": "cpu"}
    actor = SegmentActor(job(**settings, model_options={"weights": "none"}), device="cpu")
    forwarded = []
    actor.model.network.register_forward_pre_hook(
        lambda _, inputs: forwarded.append(len(inputs[0]))
    )
    actor.model.predict([torch.zeros(64, 48, 3, dtype=torch.uint8)] * 16)
    assert forwarded == [16]


def test_precision_reaches_the_model_bf16_running_on_the_cpu():
    settings = {"model": "lraspp_mobilenet_v3_large", "model_options": {"weights": "none"}}
    assert load_job_model(job(**settings), device="cpu").autocast_dtype is None
    bf16 = load_job_model(job(**settings, precision="bf16"), device="cpu")
    assert bf16.autocast_dtype == torch.bfloat16
    [prediction] = bf16.predict([torch.zeros(32, 32, 3, dtype=torch.uint8)])
    assert prediction.labels.shape == (32, 32)
    # Job(device="auto") on a machine without CUDA: the loader refuses it on the CPU.
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--precision\) 'fp16' needs a CUDA device"):
            load_job_model(job(**settings, precision="fp16"), device="cpu")


def test_instance_thresholds_reach_the_model():
    settings = {"model": "maskrcnn_resnet50_fpn", "model_options": {"weights": "none"}}
    thresholds = {"score_threshold": 0.7, "mask_threshold": 0.3, "max_detections": 5}
    model = load_job_model(job(**settings, **thresholds), device="cpu")
    assert (model.score_threshold, model.mask_threshold, model.max_detections) == (0.7, 0.3, 5)


def test_smp_models_take_their_classes_and_weights_as_model_options(tmp_path):
    smp = job(
        input=str(tmp_path),
        model="smp:Unet",
        out=str(tmp_path / "out"),
        model_options={"classes": 3, "weights": "none", "encoder": "resnet18"},
    )
    checked = check_job(smp)
    assert checked.config["model_options"] == {
        "classes": 3,
        "encoder": "resnet18",
        "weights": "none",
    }
    model = load_job_model(checked.job, device="cpu")
    assert model.classes == ("class_0", "class_1", "class_2")
    missing = dataclasses.replace(smp, model_options=(("classes", 3),))
    with pytest.raises(Exception, match="smp:Unet needs weights="):
        check_job(missing)


def test_a_resolved_job_is_what_the_run_records(shared, tmp_path):
    model = shared / ESPNET
    resolved = resolve_job(job(input=str(tmp_path), model=str(model), out="relative/out"))
    assert resolved.out == str(Path("relative/out").absolute())
    assert resolved.model_sha256 is not None and resolved.run_id is not None
    assert resolve_job(resolved) == resolved  # the CLI's prestart and its flow agree
    # A default job records what it did before the job was typed: a rerun resumes.
    assert check_job(resolved).config["model_options"] == {}


def test_gpu_decoding_is_part_of_the_runs_configuration_and_cpu_decoding_is_not():
    """nvjpeg's pixels differ from the CPU decoder's: a run decoded on the GPU gets another
    run id, and one resumed with the other decoder is refused; the default changes nothing
    (runs made before the option keep their ids)."""
    on_cpu, on_gpu = run_config(job()), run_config(job(decode="gpu"))
    assert "decode" not in on_cpu
    assert on_gpu == on_cpu | {"decode": "gpu"}
    assert default_run_id(on_gpu) != default_run_id(on_cpu)
