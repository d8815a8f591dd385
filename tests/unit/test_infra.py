"""Deploy and run manifests, read statically: the Ray cluster launcher config, KubeRay, the
CronJob, MLflow, images and the docs. Each file is parsed and the fields that matter are checked
against the code they run; no credential is written inline anywhere.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
PROJECT_IMAGE = "deeplab-ray"
MLFLOW_URI = "http://mlflow.mlflow.svc:5000"
RAY_DASHBOARD = "http://deeplab-ray-head-svc.deeplab.svc:8265"


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def one(path: Path, kind: str) -> dict:
    found = [d for d in load_docs(path) if d["kind"] == kind]
    assert len(found) == 1, f"{path}: expected one {kind}, found {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# ray_cluster.yaml


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does before launching anything
    validate_config(config)  # ...against ray/autoscaler/ray-schema.json
    return config


def test_cluster_config_is_valid_for_ray_up(cluster_config):
    assert cluster_config["provider"]["type"] == "aws"
    assert cluster_config["provider"]["region"]
    assert cluster_config["auth"]["ssh_user"] == "ubuntu"
    assert cluster_config["idle_timeout_minutes"] > 0


def test_cluster_config_image_matches_installed_ray(cluster_config):
    assert cluster_config["docker"]["image"] == RAY_IMAGE


def test_cluster_config_node_types(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1, "one GPU worker group"
    gpu = gpu[0]
    assert gpu["min_workers"] == 0, "GPU workers scale from zero"
    assert 1 <= gpu["max_workers"] <= cluster_config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))
    assert gpu["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    for node_type in types.values():  # the schema wants integers; check they are what Ray gets
        assert all(isinstance(v, int) for v in node_type["resources"].values())


def test_cluster_config_installs_this_project(cluster_config):
    (remote, local), = [(r, l) for r, l in cluster_config["file_mounts"].items() if l == "."]
    assert (REPO / local).resolve() == REPO, "run `ray up` from the repository root"
    for commands in (cluster_config["head_setup_commands"], cluster_config["worker_setup_commands"]):
        install = [c for c in commands if c.startswith("pip install")]
        assert len(install) == 1
        args = shlex.split(install[0])
        assert args[args.index("-e") + 1] == remote
        constraints = args[args.index("-c") + 1]
        assert constraints == f"{remote}/constraints.txt"
    pins = (REPO / "constraints.txt").read_text().split()
    assert f"ray=={ray.__version__}" in pins, "the cluster must get the Ray the tests ran with"
    assert any("ray start --head" in c for c in cluster_config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster_config["worker_start_ray_commands"])


# ---------------------------------------------------------------------------------------------
# KubeRay


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return one(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")


def test_raycluster_head_and_gpu_workers(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head_spec = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head_spec["rayStartParams"].values()), "KubeRay wants strings"
    head = head_spec["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    assert "nvidia.com/gpu" not in head["resources"]["limits"]

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 <= gpu["replicas"] <= gpu["maxReplicas"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    for group in groups.values():
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    for container in [head] + [c for g in groups.values() for c in g["template"]["spec"]["containers"]]:
        assert container["image"].split(":")[0] == PROJECT_IMAGE
        assert env_of(container)["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI
        assert container["securityContext"]["runAsNonRoot"] is True


def test_rayjob_trains_with_a_config_that_loads(raycluster):
    from pipelines.training.config import load_train_config

    job = one(INFRA / "kuberay" / "rayjob-train.yaml", "RayJob")
    spec = job["spec"]
    # Its own cluster (the trainer's MLflow credentials stay off the shared one), deleted after.
    assert "clusterSelector" not in spec and spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert job["metadata"]["namespace"] == raycluster["metadata"]["namespace"]
    python, script, *args = shlex.split(spec["entrypoint"])
    assert (python, script) == ("python", "pipelines/train.py")
    assert (REPO / script).is_file()
    config_path = args[args.index("--config") + 1]
    assert (REPO / config_path).is_file(), f"{config_path} is missing"
    overrides = [a for a in args if "=" in a]
    cfg = load_train_config(REPO / config_path, overrides)  # the exact config the job will train with
    gpu_group = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cfg.scaling.num_workers <= gpu_group["maxReplicas"], "training would wait for GPUs forever"
    assert cfg.scaling.use_gpu is True, "GPU workers scale from zero: 'auto' would see no GPU and use CPUs"
    assert cfg.tracking.tracking_uri == MLFLOW_URI
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/deeplab-ray"
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"].split(":")[0] == PROJECT_IMAGE


def submit_command(command: list[str]) -> list[str]:
    """The `ray job submit` words of the CronJob's script, its variables substituted; the script
    must stop that Ray job (same submission id) when the submitter pod is stopped."""
    assert command[:2] == ["/bin/bash", "-c"]
    script = command[2].replace("\\\n", " ")
    variables = dict(line.split("=", 1) for line in script.splitlines() if re.match(r"^\w+=", line))
    (submit,) = [line for line in script.splitlines() if line.strip().startswith("ray job submit")]
    assert re.search(r"trap 'ray job stop --address \"\$address\" \"\$id\".*' TERM", script)
    words = shlex.split(submit.rstrip("& "))
    assert words[words.index("--submission-id") + 1] == "$id"
    return [variables.get(w[1:], w).strip('"') if w.startswith("$") else w for w in words]


def test_cronjob_submits_segmentation_of_the_champion():
    from ray.dashboard.modules.job.cli import submit

    from pipelines.segment import build_parser

    cron = one(INFRA / "kuberay" / "cronjob-segment.yaml", "CronJob")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == PROJECT_IMAGE
    command = submit_command(container["command"] + container.get("args", []))
    assert command[:3] == ["ray", "job", "submit"]
    # `ray job submit` accepts these flags (parsed by its own click command, nothing is sent).
    ctx = submit.make_context("submit", command[3:])
    assert ctx.params["address"] == RAY_DASHBOARD
    assert ctx.params["working_dir"] == "/home/ray/deeplab-ray"
    assert ctx.params["no_wait"] is False, "the Job must wait to report the job's status"
    entrypoint = command[command.index("--") + 1:]
    assert entrypoint[:2] == ["python", "pipelines/segment.py"]
    assert (REPO / entrypoint[1]).is_file()
    args = build_parser().parse_args(entrypoint[2:])  # the segmentation CLI accepts them as given
    assert args.model == "models:/deeplab@champion"
    assert args.input.startswith("s3://") and args.input.endswith("/incoming/")
    assert args.output.startswith("s3://") and args.output.endswith("/masks/")
    assert args.since == "last"
    assert args.tracking_uri == MLFLOW_URI


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("folder", ["kuberay", "mlflow"])
def test_kustomizations_build_and_set_images(folder, tmp_path):
    copy = tmp_path / folder
    shutil.copytree(INFRA / folder, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    image = kustomization["images"][0]["name"]
    kustomization["images"][0]["newName"] = f"registry.example.com/team/{image}"
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(["kubectl", "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    listed = {Path(p).name for p in kustomization["resources"]}
    assert listed == {p.name for p in (INFRA / folder).glob("*.yaml")} - {"kustomization.yaml"}
    images = re.findall(r"image: (\S+)", built.stdout)
    ours = [i for i in images if image in i]
    assert ours and all(i.startswith(f"registry.example.com/team/{image}:") for i in ours), images
    assert all(d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace")


# ---------------------------------------------------------------------------------------------
# A shared cluster: every Ray and MLflow entry point authenticates and sits behind a NetworkPolicy


def ray_clusters() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the shared cluster and of every RayJob's own cluster."""
    kuberay = INFRA / "kuberay"
    found = [(f"{p.name}:{d['kind']}", d["spec"] if d["kind"] == "RayCluster" else d["spec"].get("rayClusterSpec"))
             for p in sorted(kuberay.glob("*.yaml")) for d in load_docs(p) if d.get("kind") in ("RayCluster", "RayJob")]
    return [(where, spec) for where, spec in found if spec is not None]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


def submitter_pods() -> list[tuple[str, dict]]:
    """(where, pod template) of everything that calls a Ray head: the CronJob and RayJob submitters."""
    cron = one(INFRA / "kuberay" / "cronjob-segment.yaml", "CronJob")
    job = one(INFRA / "kuberay" / "rayjob-train.yaml", "RayJob")
    return [("cronjob-segment.yaml", cron["spec"]["jobTemplate"]["spec"]["template"]),
            ("rayjob-train.yaml submitter", job["spec"]["submitterPodTemplate"])]


def from_secret(env: dict[str, dict], name: str) -> dict:
    assert name in env, f"{name} is not set"
    return env[name]["valueFrom"]["secretKeyRef"]


def test_every_ray_cluster_requires_a_token_from_a_secret():
    clusters = ray_clusters()
    assert len(clusters) == 2, clusters  # the shared cluster and training's own
    for where, spec in clusters:
        assert spec["authOptions"]["mode"] == "token", where
        assert spec["authOptions"]["secretName"] == "deeplab-ray-token", where
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                # A hand-set mode would fight the operator's; a literal token would be committed.
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_of(container)), where
    for where, template in submitter_pods():
        (container,) = template["spec"]["containers"]
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert from_secret(env, "RAY_AUTH_TOKEN") == {"name": "deeplab-ray-token", "key": "auth_token"}, where


def test_ray_cluster_launcher_nodes_start_with_token_auth_and_the_head_has_its_own_profile(cluster_config):
    mounts = cluster_config["file_mounts"]
    token_path = next(r for r, local in mounts.items() if local == "~/.ray/auth_token")
    for commands in (cluster_config["head_start_ray_commands"], cluster_config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path};" in start
        assert start.index("RAY_AUTH_MODE") < start.index("ray start")
    assert token_path != "~/.ray/auth_token"  # a file of its own: a node's default token stays untouched
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items()
               if n != cluster_config["head_node_type"]}
    assert head == "deeplab-ray-head" and head not in workers
    policy = __import__("json").loads((INFRA / "aws" / "deeplab-ray-head-policy.json").read_text())
    actions = [a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])]
    assert not [a for a in actions if a.endswith("*")], "no wildcard actions"
    s3 = [st for st in policy["Statement"] if any(a.startswith("s3:") for a in st["Action"])]
    assert all(r != "*" and not r.startswith("arn:aws:s3:::*") for st in s3 for r in st["Resource"])


def network_policies(folder: str) -> list[dict]:
    return [d for p in sorted((INFRA / folder).glob("*.yaml")) for d in load_docs(p) if d.get("kind") == "NetworkPolicy"]


def policies_selecting(labels: dict[str, str], namespace: str, folder: str) -> list[dict]:
    return [p for p in network_policies(folder) if p["metadata"]["namespace"] == namespace
            and "Ingress" in p["spec"]["policyTypes"]
            and all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())]


def admitted_ports(policies: list[dict], client_labels: dict[str, str]) -> set[int] | None:
    """Ports a pod with `client_labels` (same namespace) may reach; None = every port."""
    ports: set[int] = set()
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule without `from` admits everyone"
            if any(all(client_labels.get(k) == v for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items())
                   and "namespaceSelector" not in peer and "podSelector" in peer for peer in rule["from"]):
                if not rule.get("ports"):
                    return None
                ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_every_ray_pod_is_behind_a_network_policy():
    for where, spec in ray_clusters():
        for template in pod_templates(spec):
            labels = template.get("metadata", {}).get("labels", {})
            policies = policies_selecting(labels, "deeplab", "kuberay")
            assert policies, f"{where}: a Ray pod no NetworkPolicy selects"
            assert admitted_ports(policies, {"app": "anything-else"}) == set(), where
            assert admitted_ports(policies, labels) is None, f"{where}: Ray pods must reach each other"
            assert admitted_ports(policies, {"deeplab.io/ray-client": "true"}) == {8265, 10001}, where
    for where, template in submitter_pods():
        assert template["metadata"]["labels"]["deeplab.io/ray-client"] == "true", where


def test_mlflow_requires_users_and_is_behind_a_network_policy(mlflow_manifests, raycluster):
    (container,) = mlflow_manifests["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    env = env_of(container)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert from_secret(env, name)["name"] == "mlflow-admin"
    ini = mlflow_manifests["ConfigMap/mlflow-config"]["data"]["basic_auth.ini"]
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_password" not in ini
    for kind_name in ("Deployment/mlflow", "StatefulSet/mlflow-postgres"):
        labels = mlflow_manifests[kind_name]["spec"]["template"]["metadata"]["labels"]
        policies = policies_selecting(labels, "mlflow", "mlflow")
        assert policies, f"{kind_name}: no NetworkPolicy selects it"
        assert all(rule.get("from") and rule.get("ports") for p in policies for rule in p["spec"]["ingress"])
    # The jobs authenticate the MLflow client's way; the shared cluster only reads, training registers.
    job = one(INFRA / "kuberay" / "rayjob-train.yaml", "RayJob")
    for spec, user in ((raycluster["spec"], "mlflow-reader"), (job["spec"]["rayClusterSpec"], "mlflow-trainer")):
        for template in pod_templates(spec):
            for ray_container in template["spec"]["containers"]:
                ray_env = env_of(ray_container)
                assert from_secret(ray_env, "MLFLOW_TRACKING_USERNAME")["name"] == user
                assert from_secret(ray_env, "MLFLOW_TRACKING_PASSWORD")["name"] == user


# ---------------------------------------------------------------------------------------------
# MLflow server


@pytest.fixture(scope="module")
def mlflow_manifests() -> dict[str, dict]:
    folder = INFRA / "mlflow"
    docs = [d for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_docs(p)]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_mlflow_uses_postgres_and_s3_with_credentials_from_secrets(mlflow_manifests):
    deployment = mlflow_manifests["Deployment/mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    destination = command[command.index("--artifacts-destination") + 1]
    assert destination == "$(ARTIFACTS_DESTINATION)"
    env = env_of(container)
    config = mlflow_manifests["ConfigMap/mlflow-config"]["data"]
    assert config[env["ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]["key"]].startswith("s3://")
    backend = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert backend["name"] == "mlflow-db"
    service = mlflow_manifests["Service/mlflow"]
    assert service["spec"]["ports"][0]["port"] == 5000
    assert service["metadata"]["namespace"] == "mlflow"  # -> http://mlflow.mlflow.svc:5000

    postgres = mlflow_manifests["StatefulSet/mlflow-postgres"]
    (db,) = postgres["spec"]["template"]["spec"]["containers"]
    assert db["image"].startswith("postgres:")
    db_env = env_of(db)
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert db_env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert postgres["spec"]["volumeClaimTemplates"], "the database must outlive its pod"


# ---------------------------------------------------------------------------------------------
# Images


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_project_dockerfile():
    steps = dockerfile_instructions(INFRA / "docker" / "Dockerfile")
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms == [RAY_IMAGE]
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # USER comes before anything is installed or run.
    assert [op for op, _ in steps].index("USER") < [op for op, _ in steps].index("RUN")
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = [a for a in arg.split() if not a.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} is missing from the repository"
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip install" in run and "-c constraints.txt" in run
    ignore = [line for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "only the listed paths go into the build context (not .venv or data)"


def test_mlflow_dockerfile_pins_the_tested_mlflow():
    from importlib.metadata import version

    steps = dockerfile_instructions(INFRA / "mlflow" / "Dockerfile")
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert f"mlflow[auth]=={version('mlflow')}" in run, "the [auth] extra: --app-name basic-auth"
    assert "psycopg2" in run and "boto3" in run
    assert [arg for op, arg in steps if op == "USER"][-1] not in ("root", "0")


# ---------------------------------------------------------------------------------------------
# No secrets anywhere


DEPLOY_FILES = sorted([REPO / "ray_cluster.yaml", *INFRA.rglob("*")], key=str)
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"),
    "credentials in a URI": re.compile(r"\w+://[^/\s:@]+:(?!\$)[^/\s@]+@"),  # ${VAR} is fine
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|BACKEND_STORE_URI|CREDENTIAL", re.I)


@pytest.mark.parametrize("path", [p for p in DEPLOY_FILES if p.is_file()], ids=lambda p: str(p.relative_to(REPO)))
def test_no_credentials_inline(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not pattern.search(text), f"{what} in {path}"
    if path.suffix not in (".yaml", ".yml"):
        return
    for doc in load_docs(path):
        assert doc.get("kind") != "Secret", f"{path}: Secrets are created by the operator, not committed"

        def walk(node):
            if isinstance(node, dict):
                if "name" in node and "value" in node and SECRET_NAMES.search(str(node["name"])):
                    raise AssertionError(f"{path}: {node['name']} has an inline value; use valueFrom")
                for child in node.values():
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)

        walk(doc)


def test_secret_scan_catches_inline_credentials():
    """The scan itself: it must flag what it is meant to flag."""
    assert SECRET_PATTERNS["AWS access key id"].search("key: AKIA" + "ABCDEFGHIJKLMNOP")
    assert SECRET_PATTERNS["credentials in a URI"].search("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not SECRET_PATTERNS["credentials in a URI"].search("http://mlflow.mlflow.svc:5000")
    assert SECRET_NAMES.search("POSTGRES_PASSWORD")


def test_operations_guide_covers_the_workflow_and_names_real_files():
    guide = (REPO / "docs" / "operations.md").read_text()
    for needle in ("ray up ray_cluster.yaml", "ray job submit --working-dir .", "ray job logs",
                   "pipelines/promote.py", "exit code", "CronJob", "AWS_ACCESS_KEY_ID",
                   "MLFLOW_TRACKING_URI", "Resume"):
        assert needle in guide, needle
    mentioned = set(re.findall(r"\b((?:pipelines|configs|infra)/[\w./-]+\.(?:py|yaml)|ray_cluster\.yaml)\b", guide))
    assert {"pipelines/train.py", "pipelines/promote.py", "ray_cluster.yaml"} <= mentioned
    missing = sorted(p for p in mentioned if not (REPO / p).is_file())
    assert not missing, f"docs/operations.md names files that do not exist: {missing}"
    assert (INFRA / "README.md").is_file()


def test_no_doc_names_a_file_that_is_not_there():
    pattern = re.compile(r"\b((?:pipelines|deeplab_core|configs|infra|bench|tests|docs)/[\w./-]+\.(?:py|yaml|md|sh))\b")
    docs = [REPO / "README.md", REPO / "infra" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = {}
    for doc in docs:
        names = {m for m in pattern.findall(doc.read_text()) if not (REPO / m).exists()}
        if names:
            missing[doc.name] = sorted(names)
    assert not missing, f"docs name files that do not exist: {missing}"

