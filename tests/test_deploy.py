"""deploy/, checked with the parsers the tools themselves use: YAML, Ray's cluster-config schema
and ``ray start`` options, segflow's and Prefect's command lines, the model ``prefect deploy``
reads prefect.yaml with, flow loading and parameter validation. No cluster is started, no image
is built; what needs a Kubernetes API server or a GPU is left to deploy/README.md.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
TOKEN_SECRET = {"name": "segflow-ray-token", "key": "auth_token"}
MODELS_DIR = "/models"
# What a run of each deployment is given besides the deployment's own parameters.
RUN_TIME_PARAMETERS = {
    "segment": {"input": "s3://your-bucket/corpus/", "model": "/models/espnet_camvid.pt2"},
}


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def document(name: str) -> dict:
    [doc] = documents(name)
    return doc


def pinned(package: str) -> str:
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise LookupError(f"{package} is not pinned in constraints.txt")


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


PREFECT_YAML = document("prefect.yaml")
DEPLOYMENTS = {deployment["name"]: deployment for deployment in PREFECT_YAML["deployments"]}
RAY_UP = document("ray-up-aws.yaml")


def cluster_specs() -> dict[str, dict]:
    return {
        "RayCluster": document("ray-cluster.yaml")["spec"],
        "RayJob": document("ray-job.yaml")["spec"]["rayClusterSpec"],
    }


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group) for the head and every worker group of a RayCluster spec."""
    head = [("head", spec["headGroupSpec"])]
    return head + [(group["groupName"], group) for group in spec["workerGroupSpecs"]]


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod template of the Kubernetes manifests, named by where it is."""
    pods = [
        (f"{kind}/{name}", group["template"]["spec"])
        for kind, spec in cluster_specs().items()
        for name, group in ray_groups(spec)
    ]
    pods.append(
        ("RayJob/submitter", document("ray-job.yaml")["spec"]["submitterPodTemplate"]["spec"])
    )
    pods.append(("Deployment/prefect-worker", prefect_worker_pod()))
    return pods


def prefect_worker_pod() -> dict:
    return document("prefect-worker.yaml")["spec"]["template"]["spec"]


def env(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def quantity(value: str | int) -> int:
    """A Kubernetes memory quantity in bytes."""
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value)).groups()
    return int(number) * units[unit]


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split on ; and &&, as argument lists."""
    return [shlex.split(part) for part in re.split(r";|&&", line) if part.strip()]


# --- every file ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda path: path.name)
def test_every_yaml_parses_to_mappings(path):
    docs = documents(path.name)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


def test_no_secret_is_written_into_deploy():
    assignment = re.compile(r"(RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)=")
    for path in [*DEPLOY.glob("*.yaml"), DEPLOY / "Dockerfile"]:
        assert not assignment.search(path.read_text()), path.name
    for path in DEPLOY.glob("*.yaml"):
        for doc in documents(path.name):
            assert doc.get("kind") != "Secret", f"{path.name}: Secrets are made with kubectl"
    for where, pod in pod_specs():
        for container in pod["containers"] + pod.get("initContainers", []):
            for name, entry in env(container).items():
                if re.search(r"TOKEN|SECRET|KEY|PASSWORD", name):
                    assert "value" not in entry, f"{where}: {name} must come from a Secret"


def test_readme_names_only_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    # Repository paths only: not the ones inside s3:// URIs or image names.
    repo_path = r"(?<![\w/.:-])((?:deploy|bench|pipelines|segflow|tests|workers)/[\w./-]*\w)"
    named = set(re.findall(repo_path, text))
    assert named
    assert [path for path in sorted(named) if not (REPO_ROOT / path).exists()] == []


# --- KubeRay ---------------------------------------------------------------------------------


def test_kuberay_manifests_pin_the_ray_of_constraints():
    for kind, name in (("RayCluster", "ray-cluster.yaml"), ("RayJob", "ray-job.yaml")):
        doc = document(name)
        assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    for kind, spec in cluster_specs().items():
        assert spec["rayVersion"] == pinned("ray"), kind


def test_the_ray_job_runs_on_the_ray_cluster_spec():
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_one_image_for_every_container_and_node():
    images = {
        container["image"]
        for _, pod in pod_specs()
        for container in pod["containers"] + pod.get("initContainers", [])
    }
    images.add(document("ray-up-aws.yaml")["docker"]["image"])
    assert len(images) == 1, images
    assert "/segflow:" in images.pop()


def test_token_auth_on_every_container():
    for kind, spec in cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}, kind
    for where, pod in pod_specs():
        for container in pod["containers"]:
            variables = env(container)
            assert variables["RAY_AUTH_MODE"].get("value") == "token", where
            assert variables["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET, where


def test_the_gpu_group_holds_one_gpu_a_pod_and_does_not_scale():
    for kind, spec in cluster_specs().items():
        gpu_groups = []
        for name, group in ray_groups(spec):
            [container] = group["template"]["spec"]["containers"]
            resources = container["resources"]
            if "nvidia.com/gpu" in resources.get("limits", {}):
                gpu_groups.append(name)
                assert int(resources["limits"]["nvidia.com/gpu"]) == 1
                assert resources["requests"] == resources["limits"]
                # The actor pool is sized from the GPUs present when a run starts.
                assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] > 0
                tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
                assert "nvidia.com/gpu" in tolerated
            assert "num-gpus" not in group["rayStartParams"], (kind, name)
        assert gpu_groups == ["gpu"], kind
        assert spec["enableInTreeAutoscaling"] is False
        cpu_groups = [group for name, group in ray_groups(spec) if name not in ("head", "gpu")]
        assert cpu_groups, f"{kind}: no CPU worker group"


def test_the_object_store_fits_in_shm_and_shm_in_memory():
    for kind, spec in cluster_specs().items():
        for name, group in ray_groups(spec):
            pod = group["template"]["spec"]
            [container] = pod["containers"]
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            volumes = {volume["name"]: volume for volume in pod["volumes"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", (kind, name)
            store = int(group["rayStartParams"]["object-store-memory"])
            limit = quantity(container["resources"]["limits"]["memory"])
            assert store <= quantity(shm["sizeLimit"]) < limit, (kind, name)


def test_ray_start_params_are_ray_start_options():
    from ray.scripts.scripts import start

    for kind, spec in cluster_specs().items():
        for name, group in ray_groups(spec):
            role = ["--head"] if name == "head" else ["--address=segflow-head-svc:6379"]
            options = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
            params = start.make_context("ray start", role + options).params
            if name == "head":
                assert params["num_cpus"] == 0, f"{kind}: actors would land on the head"


def test_models_are_fetched_where_every_driver_and_actor_reads_them():
    fetchers = [
        container
        for _, pod in pod_specs()
        for container in pod.get("initContainers", [])
        if container["name"] == "fetch-models"
    ]
    ray_pods = [pod for where, pod in pod_specs() if not where.endswith("submitter")]
    assert len(fetchers) == len(ray_pods)
    assert all(fetcher["command"] == fetchers[0]["command"] for fetcher in fetchers)
    assert fetchers[0]["command"][-1] == MODELS_DIR
    for pod in ray_pods:
        [container] = pod["containers"]
        assert MODELS_DIR in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_the_model_fetch_copies_the_bucket_prefix(s3_env, tmp_path, monkeypatch):
    import fsspec

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    fsspec.filesystem("s3").clear_instance_cache()
    files = {
        "espnet_camvid.pt2": b"program",
        "espnet_camvid.json": b"{}",
        "torch/hub/checkpoints/deeplabv3_resnet50_coco-cd0a2569.pth": b"weights",
    }
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("models-bucket")
    fs.pipe({f"models-bucket/segflow/models/{path}": data for path, data in files.items()})
    target = tmp_path / "models"
    target.mkdir()  # an emptyDir is there before the init container runs
    [fetch] = [
        container
        for container in prefect_worker_pod()["initContainers"]
        if container["name"] == "fetch-models"
    ]
    command = [sys.executable, *fetch["command"][1:-1], str(target)]
    models_uri = "s3://models-bucket/segflow/models"
    subprocess.run(
        command, env={**os.environ, "SEGFLOW_MODELS_URI": models_uri}, check=True, timeout=120
    )
    fetched = {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()}
    assert fetched == set(files)
    assert all((target / path).read_bytes() == data for path, data in files.items())


def test_the_ray_job_entrypoint_is_a_segflow_command():
    import typer

    from segflow.cli import app

    argv = shlex.split(document("ray-job.yaml")["spec"]["entrypoint"])
    assert pyproject()["project"]["scripts"][argv[0]] == "segflow.cli:app"
    command = typer.main.get_command(app).commands[argv[1]]
    params = command.make_context(argv[1], argv[2:]).params
    assert params["ray_address"] == "auto"
    # Every node reads the input and writes the output: they must be in the bucket.
    assert urlsplit(params["input"]).scheme == urlsplit(params["out"]).scheme == "s3"
    assert params["model"].startswith(MODELS_DIR + "/")


def test_the_ray_job_submitter_leaves_its_command_to_kuberay():
    submitter = document("ray-job.yaml")["spec"]["submitterPodTemplate"]["spec"]
    [container] = submitter["containers"]
    # KubeRay writes the `ray job submit` command into a container that has none.
    assert "command" not in container
    assert "args" not in container
    assert submitter["restartPolicy"] == "Never"


# --- Prefect -----------------------------------------------------------------------------------


def test_prefect_yaml_is_what_prefect_deploy_reads():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    model = PrefectYamlModel.model_validate(PREFECT_YAML)
    assert [deployment.name for deployment in model.deployments] == ["segment", "evaluate"]
    assert PREFECT_YAML["prefect-version"] == pinned("prefect")
    for deployment in model.deployments:
        assert deployment.work_pool.name == "segflow"
        for schedule in deployment.schedules or []:
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    assert DEPLOYMENTS["evaluate"]["schedules"], "evaluate runs on a schedule"
    assert "schedules" not in DEPLOYMENTS["segment"], "segment runs on demand"


def test_pull_steps_are_real_steps_run_where_the_image_keeps_the_code():
    from prefect.utilities.importtools import import_object

    directories = []
    for step in PREFECT_YAML["pull"]:
        [(name, arguments)] = step.items()
        inspect.signature(import_object(name)).bind(**arguments)
        directories.append(arguments.get("directory"))
    assert dockerfile_value("WORKDIR") in directories


def test_the_work_pool_is_a_process_pool_with_token_auth():
    from prefect.workers.process import ProcessWorker

    for name, deployment in DEPLOYMENTS.items():
        variables = deployment["work_pool"]["job_variables"]
        assert set(variables) <= set(ProcessWorker.job_configuration_variables.model_fields), name
        assert variables["env"]["RAY_AUTH_MODE"] == "token"
        assert not [key for key in variables["env"] if "TOKEN" in key], "the token is a Secret"


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_deployment_entrypoints_load_as_flows_and_take_their_parameters(name):
    from prefect.flows import Flow, load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    deployment = DEPLOYMENTS[name]
    path, function = deployment["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}")
    assert isinstance(flow, Flow)
    run_time = RUN_TIME_PARAMETERS.get(name, {})
    # A run asks for exactly these; the deployment gives every other required one.
    required = set(parameter_schema(flow).required or [])
    assert required - set(deployment["parameters"]) == set(run_time)
    flow.validate_parameters({**deployment["parameters"], **run_time})


def test_the_segment_deployment_joins_the_ray_cluster_through_ray_client():
    address = urlsplit(DEPLOYMENTS["segment"]["parameters"]["ray_address"])
    cluster = document("ray-cluster.yaml")
    [head] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert address.scheme == "ray"
    # KubeRay names the head's Service <cluster>-head-svc.
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc"
    assert address.port == ports["client"]
    assert urlsplit(DEPLOYMENTS["segment"]["parameters"]["out"]).scheme == "s3"


def test_the_prefect_worker_polls_the_deployments_pool():
    from prefect.cli._app import _app
    from prefect.settings import PREFECT_WORKER_WEBSERVER_PORT
    from prefect.workers.process import ProcessWorker

    [container] = prefect_worker_pod()["containers"]
    argv = container["command"]
    assert argv[0] == "prefect"
    function, bound, _ = _app.parse_args(argv[1:], exit_on_error=False, print_error=False)
    assert (function.__module__, function.__name__) == ("prefect.cli.worker", "start")
    assert bound.arguments["work_pool_name"] == DEPLOYMENTS["segment"]["work_pool"]["name"]
    assert bound.arguments["worker_type"] == ProcessWorker.type
    assert bound.arguments["with_healthcheck"] is True
    assert container["livenessProbe"]["httpGet"]["port"] == PREFECT_WORKER_WEBSERVER_PORT.value()


# --- ray up --------------------------------------------------------------------------------------


def test_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(RAY_UP))
    validate_config(prepared)
    # Ray's defaults would pip-install over the image's pinned packages.
    for commands in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[commands] == [], commands


def test_ray_up_keeps_token_auth_on_with_the_token_in_rays_default_path():
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    docker = RAY_UP["docker"]
    assert "--env=RAY_AUTH_MODE=token" in docker["run_options"]
    assert not {"head_run_options", "worker_run_options"} & set(docker)
    default = _get_default_token_path().relative_to(Path.home())
    [(target, source)] = RAY_UP["file_mounts"].items()
    assert Path(target) == Path("~") / default
    assert source.startswith(("~/", "/")), "the token comes from a file on the laptop"


def test_ray_up_start_commands_are_ray_commands():
    from ray.scripts.scripts import cli, start

    starts = {}
    for role in ("head", "worker"):
        for line in RAY_UP[f"{role}_start_ray_commands"]:
            for argv in shell_commands(line):
                assert argv[0] == "ray" and argv[1] in cli.commands, argv
                if argv[1] == "start":
                    starts[role] = start.make_context("ray start", argv[2:]).params
    assert starts["head"]["head"] and starts["head"]["num_cpus"] == 0
    assert starts["head"]["ray_client_server_port"] == 10001
    assert starts["worker"]["address"] and not starts["worker"]["head"]


def test_ray_up_has_a_fixed_gpu_group_and_a_cpu_group():
    types = RAY_UP["available_node_types"]
    gpu = [name for name, node in types.items() if node["resources"].get("GPU")]
    assert gpu == ["gpu"]
    assert types["gpu"]["resources"]["GPU"] == 1
    assert types["gpu"]["min_workers"] == types["gpu"]["max_workers"] > 0
    assert types[RAY_UP["head_node_type"]]["resources"] == {"CPU": 0}
    assert [name for name in types if name not in ("gpu", RAY_UP["head_node_type"])] == ["cpu"]


# --- the image -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_value(keyword: str) -> str:
    return [arguments for instruction, arguments in dockerfile() if instruction == keyword][-1]


def test_the_image_python_meets_requires_python():
    [base] = [arguments for instruction, arguments in dockerfile() if instruction == "FROM"]
    version = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-[\w.-]+", base).group(1)
    assert Version(version) in SpecifierSet(pyproject()["project"]["requires-python"])


def test_the_image_installs_only_with_the_constraints():
    installs = [args for instruction, args in dockerfile() if "pip install" in args]
    assert installs
    assert all(re.search(r"pip install -c constraints\.txt\b", args) for args in installs)
    [project] = [args for args in installs if re.search(r"'\.\[[\w,]+\]'", args)]
    extras = re.search(r"'\.\[([\w,]+)\]'", project).group(1).split(",")
    assert extras == ["onnx", "smp"]
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    steps = dockerfile()
    first_install = next(i for i, (_, args) in enumerate(steps) if "pip install" in args)
    copied_before = [
        args.split()[:-1] for instruction, args in steps[:first_install] if instruction == "COPY"
    ]
    assert any("constraints.txt" in sources for sources in copied_before)


def test_the_image_runs_as_the_manifests_non_root_user():
    user = dockerfile_value("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    for where, pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == int(user), where


def test_the_image_holds_no_weights_and_no_secrets():
    for instruction, arguments in dockerfile():
        if instruction in ("COPY", "ADD"):
            assert not re.search(r"\.(pt2?|pth|onnx|safetensors)\b|models|\.aws|\.ray", arguments)
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|ACCESS_KEY|PASSWORD", arguments), arguments


def test_the_build_context_is_what_the_image_copies():
    rules = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(path: str) -> bool:  # Docker's rule: the last pattern that matches wins
        verdict = False
        for rule in rules:
            if fnmatch(path, rule.lstrip("!")):
                verdict = not rule.startswith("!")
        return verdict

    sources = [
        source
        for instruction, arguments in dockerfile()
        if instruction == "COPY"
        for source in arguments.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert not excluded(source), source
    for private in (".venv", ".git", "out", ".hypothesis", "tests"):
        assert excluded(private), private
