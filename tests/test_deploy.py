"""The deployment files, checked by the tools that run them: the image's pins against pyproject.toml and what
CI tests with, the AWS cluster config with Ray's own checks (``prepare_config`` then ``validate_config``, as
``ray up`` does), the KubeRay manifest against KubeRay's own CRD for RayJob (a copy in ``tests/data``).

This machine cannot build images or start cloud clusters; what they assume is checked here, and that their
GPU node types scale from zero is checked on Ray's fake autoscaler with the same resources
(``test_gpu_cluster.py``).
"""

from __future__ import annotations

import copy
import gzip
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import torchvision
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from cellsam_ray.jobspec import spec_from_mapping
from cellsam_ray.version import __version__

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"REGISTRY/cellsam-ray:{__version__}"


def pins() -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, PYPROJECT["dependencies"])}


def dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile(), flags=re.M))


def aws_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "aws" / "cluster.yaml").read_text())


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())}


# ------------------------------------------------------------------------------------------------ image
def test_the_image_installs_what_pyproject_pins_and_ci_tests_with():
    args, requirements = build_args(), pins()
    for package, arg, tested in (("ray", "RAY_VERSION", ray.__version__), ("torch", "TORCH_VERSION", torch.__version__),
                                 ("torchvision", "TORCHVISION_VERSION", torchvision.__version__)):
        assert requirements[package].specifier.contains(args[arg]), (package, args[arg])
        assert Version(args[arg]).base_version == Version(tested).base_version, (package, args[arg], tested)
    base = re.search(r"^FROM (\S+)$", dockerfile(), flags=re.M).group(1)
    assert base == "rayproject/ray:${RAY_VERSION}-py311-gpu"  # a CUDA Ray image of that version, Python 3.11
    assert sys.version_info[:2] == (3, 11) and "3.11" in PYPROJECT["requires-python"].replace(">=", "")
    assert '"ray[default]==${RAY_VERSION}"' in dockerfile()  # the job API's dependencies, Ray itself kept


def test_the_image_holds_the_package_from_the_checkout_and_proves_its_cuda_build():
    text = dockerfile()
    assert "COPY --chown=ray:users cellsam_ray ./cellsam_ray" in text and "pip install --no-cache-dir ." in text
    last = text.strip().split("\nRUN ")[-1]
    assert "import cellsam_ray, ray, torch" in last and "assert torch.version.cuda" in last
    assert "--index-url \"${TORCH_INDEX}\"" in text and build_args()["TORCH_INDEX"].startswith(
        "https://download.pytorch.org/whl/cu")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!cellsam_ray/"]
    assert (ROOT / "cellsam_ray" / "assets" / "demo_cellsam.pt").is_file()  # the bundled model goes with it


# -------------------------------------------------------------------------------------- ray up on AWS
def test_the_aws_cluster_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = aws_config()
    validate_config(prepare_config(copy.deepcopy(config)))
    misspelled = copy.deepcopy(config)
    misspelled["available_node_types"]["gpu_l4"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):  # the check can fail
        validate_config(prepare_config(misspelled))


def test_the_aws_cluster_scales_gpus_from_zero_with_no_keys_and_token_auth():
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_types = {name: kind for name, kind in types.items() if kind["resources"].get("GPU")}
    assert not head["resources"].get("GPU") and head["node_config"]["InstanceType"].startswith("m")
    assert {kind["node_config"]["InstanceType"].split(".")[0] for kind in gpu_types.values()} >= {"g5", "g6", "p4d", "p5"}
    assert all(kind["min_workers"] == 0 and kind["resources"]["CPU"] >= kind["resources"]["GPU"]
               for kind in gpu_types.values())
    assert config["docker"]["image"] == IMAGE
    assert all("IamInstanceProfile" in kind["node_config"] for kind in types.values())
    text = (ROOT / "deploy" / "aws" / "cluster.yaml").read_text()
    assert not re.search(r"AKIA|aws_access_key|aws_secret|secret_access", text, flags=re.I)
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []
    head_start, worker_start = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start and "RAY_AUTH_MODE=token ray start" in worker_start
    assert "--dashboard-host=$(hostname -I" in head_start and "0.0.0.0" not in head_start
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# ----------------------------------------------------------------------------------------- KubeRay
def strict(schema):
    """The CRD's schema with unknown fields refused (as ``kubectl --validate=strict``): the API server would
    drop a misspelled field silently, and the manifest would not do what it says."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_schema():
    crd = yaml.safe_load(gzip.decompress((ROOT / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz").read_bytes()))
    assert crd["spec"]["names"]["kind"] == "RayJob"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def test_the_rayjob_validates_against_kuberays_crd(rayjob_schema):
    job = kuberay_documents()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(rayjob_schema).validate(job)
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):  # the check can fail
        jsonschema.Draft7Validator(rayjob_schema).validate(misspelled)


def test_the_rayjob_scales_gpus_from_zero_runs_the_mounted_spec_and_ends_its_cluster():
    docs = kuberay_documents()
    spec = docs["RayJob"]["spec"]
    cluster = spec["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == build_args()["RAY_VERSION"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert group["minReplicas"] == group["replicas"] == 0 and group["maxReplicas"] >= 1
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert {c["image"] for c in head["containers"] + worker["containers"]} == {IMAGE}
    # S3 through the pods' service account: no credentials in the manifest.
    account = docs["ServiceAccount"]
    assert head["serviceAccountName"] == worker["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    text = (ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text()
    assert not re.search(r"AKIA|aws_access_key|aws_secret|secret_access", text, flags=re.I)
    # The entrypoint runs the job spec of the ConfigMap, mounted in the head, where the driver runs.
    (mount,) = head["containers"][0]["volumeMounts"]
    (volume,) = head["volumes"]
    assert volume["name"] == mount["name"] and volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert spec["entrypoint"] == f"cellsam-ray run {mount['mountPath']}/job.yaml"
    job_spec = yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"])
    assert spec_from_mapping(job_spec, "rayjob.yaml").input.startswith("s3://")
