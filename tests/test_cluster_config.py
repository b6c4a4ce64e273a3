"""One cluster definition: cluster.yaml (Ray cluster launcher) and k8s/*.yaml (KubeRay).

No cluster is started and nothing is contacted. cluster.yaml goes through the same steps
`ray up` takes before it talks to AWS (defaults merged, Ray's JSON schema, Docker checks), and
each node type's EC2 launch parameters through botocore's offline RunInstances validator. The
KubeRay manifests are parsed, their embedded Serve config and runtime_env are validated with
Ray's own schemas, and both files are checked against the facts the jobs rely on.
"""

from __future__ import annotations

import copy
import logging
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
K8S_DIR = ROOT / "k8s"

# Names other files and people rely on. Change them together with the files that use them.
RAY_VERSION = "2.60.0"
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
PROJECT_DIR = "/home/ray/bahe-ray"
GPU_PROFILE = "configs/gpu_cluster.yaml"
SERVE_CONFIG = "serve_configs/cluster.yaml"
HEAD, CPU_GROUP, GPU_GROUP = "head", "cpu-workers", "gpu-workers"
ENTRYPOINTS = {  # manifest -> job script (the scripts are the `ray job submit` entrypoints too)
    "rayjob-encode.yaml": "jobs/encode_behaviors.py",
    "rayjob-train.yaml": "jobs/train_ctr.py",
}
SERVICE_MANIFEST = "rayservice-scorer.yaml"
SERVE_APP = {
    "name": "scorer",
    "import_path": "bahe_ray.serve:build_app",
    "route_prefix": "/",
    "args": {"config": GPU_PROFILE},
}
EXTRAS = {"gpu", "minilm"}


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every Ray resource in k8s/*.yaml (all files must parse), keyed by file name."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        loaded = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        ray_docs = [d for d in loaded if str(d.get("apiVersion", "")).startswith("ray.io/")]
        assert len(ray_docs) <= 1, f"{path.name}: one Ray resource per file"
        if ray_docs:
            docs[path.name] = ray_docs[0]
    return docs


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        return spec["rayClusterConfig"]
    if doc["kind"] == "RayJob":
        return spec["rayClusterSpec"]
    return spec  # RayCluster


def _runtime_env(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "RayJob":
        return yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return app["runtime_env"]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# cluster.yaml: Ray's own validation


def test_cluster_yaml_passes_ray_validation(cluster: dict[str, Any]) -> None:
    """The checks `ray up` runs before contacting the cloud (commands._bootstrap_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    prepared = prepare_config(copy.deepcopy(cluster))  # AWS defaults, setup merge, Docker check
    validate_config(prepared)  # ray-schema.json + head type / min_workers / max_workers rules
    # Nothing was left to autodetection (that step asks AWS): every node type states its resources.
    for name, node_type in cluster["available_node_types"].items():
        assert node_type.get("resources") is not None, f"{name}: resources must be explicit"
    assert prepared["head_node_type"] == HEAD
    assert prepared["available_node_types"][HEAD]["max_workers"] == 0


def test_node_configs_are_valid_ec2_launch_parameters(cluster: dict[str, Any]) -> None:
    """node_config goes to EC2 RunInstances as is: check it against botocore's model, offline."""
    pytest.importorskip("botocore")  # comes with s3fs (aiobotocore)
    import botocore.session
    from botocore.validate import validate_parameters

    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for name, node_type in cluster["available_node_types"].items():
        params = dict(node_type["node_config"], MinCount=1, MaxCount=1)
        validate_parameters(params, shape)  # raises ParamValidationError on unknown keys/types
        assert params["InstanceType"], name


# --------------------------------------------------------------------------------------------
# cluster.yaml: the structure the jobs rely on


def test_head_runs_no_tasks(cluster: dict[str, Any]) -> None:
    assert cluster["head_node_type"] == HEAD
    head = cluster["available_node_types"][HEAD]
    assert head["resources"] == {"CPU": 0}


def test_worker_groups_autoscale_from_zero(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    assert set(types) == {HEAD, CPU_GROUP, GPU_GROUP}
    cpu, gpu = types[CPU_GROUP], types[GPU_GROUP]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert cpu["resources"].get("GPU", 0) == 0 and cpu["resources"]["CPU"] > 0
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert cpu["max_workers"] + gpu["max_workers"] <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0 and cluster["upscaling_speed"] > 0


def test_image_pins_ray_version(cluster: dict[str, Any]) -> None:
    import ray

    assert cluster["docker"]["image"] == IMAGE
    assert cluster["docker"]["container_name"]
    assert not {"head_image", "worker_image"} & set(cluster["docker"]), "one image for every node"
    # The client that runs `ray up` / `ray job submit` and the project pin the same Ray.
    assert ray.__version__ == RAY_VERSION
    ray_reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    (ray_req,) = [r for r in ray_reqs if r.name == "ray"]
    assert str(ray_req.specifier) == f"=={RAY_VERSION}"


def test_setup_installs_project_with_gpu_extra(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"][PROJECT_DIR] == "."
    assert cluster["file_mounts_sync_continuously"] is False
    assert {".venv", "outputs", ".git"} <= set(cluster["rsync_exclude"])
    installs = [c for c in cluster["setup_commands"] if c.startswith("pip install")]
    expected = f"pip install -e '{PROJECT_DIR}[{','.join(sorted(EXTRAS))}]'"
    assert expected in installs, installs
    # The extras exist and pin what they install (vLLM brings its own torch pin).
    extras = _pyproject()["project"]["optional-dependencies"]
    assert EXTRAS <= set(extras)
    for extra in EXTRAS:
        for req in map(Requirement, extras[extra]):
            assert any(s.operator == "==" for s in req.specifier), f"{extra}: {req} is not pinned"
    assert any(Requirement(r).name == "vllm" for r in extras["gpu"])


def test_dashboard_on_localhost_and_token_auth(cluster: dict[str, Any]) -> None:
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    worker_cmds = " ".join(cluster["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in head_cmds
    for cmds in (head_cmds, worker_cmds):
        assert "RAY_AUTH_MODE=token" in cmds  # the same mode on every node
        assert f"cd {PROJECT_DIR}" in cmds  # relative config paths resolve in the project
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def _cluster_serve_env() -> dict[str, str]:
    """Serve's throughput-mode variables a cluster's Ray starts with: those `bahe serve` sets locally, less the
    short draining period meant for the local HAProxy (a cluster's load balancers keep Serve's default)."""
    from bahe_ray.runtime import SERVE_THROUGHPUT_ENV

    return {k: v for k, v in SERVE_THROUGHPUT_ENV.items() if k != "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"}


def test_every_node_starts_ray_in_serve_throughput_mode(cluster: dict[str, Any],
                                                        manifests: dict[str, dict[str, Any]]) -> None:
    wanted = _cluster_serve_env()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if "ray start" in c]
        words = shlex.split(start.split("ray start")[0].split("&&")[-1])
        assert dict(w.split("=", 1) for w in words).items() >= wanted.items(), key
    for name, doc in manifests.items():
        spec = _cluster_spec(doc)
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                env = {e["name"]: e["value"] for e in container.get("env", [])}
                assert env.items() >= wanted.items(), f"{name}: {container['name']}"


# --------------------------------------------------------------------------------------------
# k8s/*.yaml (KubeRay)


def test_manifests_are_the_expected_resources(manifests: dict[str, dict[str, Any]]) -> None:
    assert {*ENTRYPOINTS, SERVICE_MANIFEST} <= set(manifests)
    for name in [*ENTRYPOINTS, SERVICE_MANIFEST]:
        doc = manifests[name]
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["kind"] == ("RayService" if name == SERVICE_MANIFEST else "RayJob"), name
        assert doc["metadata"]["name"].startswith("bahe-"), name


def test_manifests_share_one_cluster_shape(manifests: dict[str, dict[str, Any]]) -> None:
    specs = {name: _cluster_spec(doc) for name, doc in manifests.items()}
    first_name, first = next(iter(specs.items()))
    for name, spec in specs.items():
        assert spec == first, f"{name}: cluster spec differs from {first_name}"


def test_manifest_cluster_shape(manifests: dict[str, dict[str, Any]], cluster: dict[str, Any]) -> None:
    spec = _cluster_spec(manifests[SERVICE_MANIFEST])  # all equal, see above
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"  # the dashboard is on the pod network
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"] == IMAGE == cluster["docker"]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {CPU_GROUP, GPU_GROUP}  # the same groups as cluster.yaml

    def gpus(group: dict[str, Any]) -> int:
        (container,) = group["template"]["spec"]["containers"]
        return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    assert gpus(groups[CPU_GROUP]) == 0
    assert groups[CPU_GROUP]["minReplicas"] == 0
    gpu = groups[GPU_GROUP]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    assert gpus(gpu) == cluster["available_node_types"][GPU_GROUP]["resources"]["GPU"]


@pytest.mark.parametrize("manifest", sorted(ENTRYPOINTS))
def test_rayjob_entrypoints(manifests: dict[str, dict[str, Any]], manifest: str) -> None:
    spec = manifests[manifest]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv == ["python", ENTRYPOINTS[manifest], "--config", GPU_PROFILE]
    assert spec["shutdownAfterJobFinishes"] is True
    assert not spec.get("entrypointNumGpus"), "drivers reserve no GPU"
    # Some job scripts (and the GPU profile) arrive with other changes: the expected paths are
    # fixed above; the ones in the tree must be files, and the encode job is there already.
    script = ROOT / ENTRYPOINTS[manifest]
    if script.exists() or manifest == "rayjob-encode.yaml":
        assert script.is_file(), f"{manifest}: {script} is missing"


def test_runtime_env_ships_this_project(manifests: dict[str, dict[str, Any]]) -> None:
    from ray.runtime_env import RuntimeEnv

    envs = {name: _runtime_env(manifests[name]) for name in [*ENTRYPOINTS, SERVICE_MANIFEST]}
    first = next(iter(envs.values()))
    assert all(env == first for env in envs.values()), "one runtime_env for all manifests"
    RuntimeEnv(**first)  # Ray's own field validation (URI forms, pip spec)
    (pip,) = first["pip"]
    req = Requirement(pip)
    assert req.name == "bahe-ray" and set(req.extras) == EXTRAS
    assert req.url == first["working_dir"], "install the same commit the jobs run"
    assert _pyproject()["project"]["name"] == "bahe-ray"


def test_rayservice_serve_config(manifests: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(manifests[SERVICE_MANIFEST]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert {k: app[k] for k in SERVE_APP} == SERVE_APP
    assert config["http_options"]["host"] == "0.0.0.0"  # the serve Service reaches the pod IP

    path = ROOT / SERVE_CONFIG
    if not path.exists():
        pytest.skip(f"{SERVE_CONFIG} not in the tree yet")
    local = _load_yaml(path)
    ServeDeploySchema.model_validate(local)
    # The RayService adds only a runtime_env (pods start from the stock image) and its own
    # http_options (the proxy must listen on the pod network); the applications are the same.
    def without_runtime_env(a: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in a.items() if k != "runtime_env"}

    assert [without_runtime_env(a) for a in local["applications"]] == [without_runtime_env(app)], (
        f"{SERVICE_MANIFEST} serveConfigV2 applications differ from {SERVE_CONFIG}"
    )


def test_gpu_profile_fits_the_cluster(cluster: dict[str, Any]) -> None:
    path = ROOT / GPU_PROFILE
    if not path.exists():
        pytest.skip(f"{GPU_PROFILE} not in the tree yet")
    from bahe_ray.config import load_config

    cfg = load_config(path)
    node = cluster["available_node_types"][GPU_GROUP]["resources"]
    enc, train = cfg.encoder, cfg.train
    assert enc.num_gpus_per_actor > 0 or train.use_gpu, "the GPU profile requests no GPU"
    # Each GPU actor and train worker must fit on one node of the GPU group, or it never starts.
    assert enc.num_gpus_per_actor <= node["GPU"] and enc.tensor_parallel_size <= node["GPU"]
    if enc.num_gpus_per_actor > 0:
        assert enc.num_cpus_per_actor <= node["CPU"]
    if train.use_gpu:
        assert train.cpus_per_worker <= node["CPU"]
    # Several nodes (and pods that come and go) share these: not a path relative to one node.
    for key, value in {
        "store.path": cfg.store.path,
        "samples.path": cfg.samples.path,
        "train.output_dir": train.output_dir,
        "serve.checkpoint": cfg.serve.checkpoint,
    }.items():
        assert "://" in value or value.startswith("/"), f"{GPU_PROFILE} {key}={value!r} is node-local"


def test_docs_name_the_same_files() -> None:
    text = (ROOT / "docs" / "cluster.md").read_text(encoding="utf-8")
    for needle in [*ENTRYPOINTS.values(), GPU_PROFILE, SERVE_CONFIG, "/v1/score",
                   *(f"k8s/{m}" for m in [*ENTRYPOINTS, SERVICE_MANIFEST])]:
        assert needle in text, f"docs/cluster.md does not mention {needle}"
