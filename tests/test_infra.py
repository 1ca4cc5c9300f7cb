"""Offline checks of the deployment files in infra/ (no cluster, no Docker).

The KubeRay manifests are validated against the operator's CRD schemas made
strict the way ``kubeconform -strict`` is: every object schema that lists
``properties`` (and does not preserve unknown fields) rejects any other key, so a
misspelled field fails instead of being silently dropped by the API server. The
schemas are not part of the project: they are found through
``NEON_RAY_KUBERAY_SCHEMAS`` or at ``../shared/kuberay`` beside the repository.
Without them only the schema tests skip; every other check here still runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(REPO, "infra")
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml"}
SECRET_NAME = "neon-s3"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
REQUIRED_S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_LIKE = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def load_yaml(name: str):
    """The single YAML document of infra/<name>."""
    with open(os.path.join(INFRA, name)) as f:
        docs = list(yaml.safe_load_all(f))
    assert len(docs) == 1, f"infra/{name}: expected one YAML document, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {kind: load_yaml(name) for kind, name in MANIFESTS.items()}


# --- strict schema validation -------------------------------------------------

def schema_dir() -> str:
    """The KubeRay schema folder; skip when absent, fail when misconfigured."""
    env = os.environ.get("NEON_RAY_KUBERAY_SCHEMAS")
    if env:
        if not os.path.isdir(env):
            pytest.fail(f"NEON_RAY_KUBERAY_SCHEMAS={env!r} is not a directory")
        return env
    path = os.path.normpath(os.path.join(REPO, "..", "shared", "kuberay"))
    if not os.path.isdir(path):
        pytest.skip(f"KubeRay CRD schemas not found at {path} (set NEON_RAY_KUBERAY_SCHEMAS to the folder "
                    f"holding RayCluster-ray.io-v1.schema.json and RayJob-ray.io-v1.schema.json)")
    return path


def strict(schema):
    """A copy of ``schema`` where each object with ``properties`` rejects other keys."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def load_schema(kind: str) -> dict:
    path = os.path.join(schema_dir(), f"{kind}-ray.io-v1.schema.json")
    assert os.path.isfile(path), f"schema folder has no {os.path.basename(path)}"
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def validators():
    """kind -> (strict validator, validator of the schema as published)."""
    import jsonschema

    out = {}
    for kind in MANIFESTS:
        schema = load_schema(kind)
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = (jsonschema.Draft7Validator(strict(schema)), jsonschema.Draft7Validator(schema))
    return out


def errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_matches_strict_kuberay_schema(kind, manifests, validators):
    doc = manifests[kind]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    problems = errors(validators[kind][0], doc)
    assert not problems, f"infra/{MANIFESTS[kind]} fails the KubeRay schema:\n" + "\n".join(problems)


def test_strict_schema_catches_misspelled_fields(manifests, validators):
    strict_v, loose_v = validators["RayCluster"]
    bad = copy.deepcopy(manifests["RayCluster"])
    bad["spec"]["enableInTreeAutoScaling"] = bad["spec"].pop("enableInTreeAutoscaling")
    container = bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["securityContex"] = container.pop("securityContext")
    # The schema as published accepts both typos; the strict one names each.
    assert errors(loose_v, bad) == []
    found = "\n".join(errors(strict_v, bad))
    assert "enableInTreeAutoScaling" in found and "securityContex'" in found, found

    job_strict, _ = validators["RayJob"]
    bad_job = copy.deepcopy(manifests["RayJob"])
    bad_job["spec"]["runtimeEnvYaml"] = bad_job["spec"].pop("runtimeEnvYAML")
    assert "runtimeEnvYaml" in "\n".join(errors(job_strict, bad_job))


def test_schema_catches_wrong_types_and_values(manifests, validators):
    strict_v, _ = validators["RayCluster"]
    bad = copy.deepcopy(manifests["RayCluster"])
    bad["spec"]["authOptions"]["mode"] = "tokens"
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    del bad["spec"]["headGroupSpec"]["template"]
    found = errors(strict_v, bad)
    assert len(found) == 3, found


# --- what the manifests must say ------------------------------------------------

def pod_templates(doc: dict):
    """(where, pod spec) for every pod the manifest makes."""
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster.get("workerGroupSpecs", []):
        yield f"worker group {g['groupName']}", g["template"]["spec"]
    if doc["kind"] == "RayJob":
        assert "submitterPodTemplate" in doc["spec"], "RayJob: set submitterPodTemplate (non-root, limits)"
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def ray_cluster(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def check_container_security(where: str, sc: dict, pod_sc: dict) -> None:
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: drop ALL capabilities"
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert non_root is True, f"{where}: runAsNonRoot must be true"
    assert uid == 1000, f"{where}: runAsUser must be the image's user 1000, got {uid}"
    assert not sc.get("privileged", False), f"{where}: privileged"


def check_resources(where: str, res: dict, needs_gpu: bool = False) -> None:
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            assert r in res.get(part, {}), f"{where}: resources.{part}.{r} missing"
    if needs_gpu:
        assert str(res["limits"].get("nvidia.com/gpu")) == "1", f"{where}: limits.nvidia.com/gpu must be 1"
        assert str(res["requests"].get("nvidia.com/gpu")) == "1", f"{where}: requests.nvidia.com/gpu must be 1"


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_every_container_is_non_root_with_limits(kind, manifests):
    doc = manifests[kind]
    seen = 0
    for where, pod in pod_templates(doc):
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == 1000, f"{where}: pod securityContext"
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), f"{where}: host namespaces"
        for c in pod.get("initContainers", []) + pod["containers"]:
            name = f"{kind} {where} container {c['name']}"
            check_container_security(name, c.get("securityContext", {}), pod_sc)
            check_resources(name, c.get("resources", {}), needs_gpu=where.startswith("worker"))
            seen += 1
    auto = ray_cluster(doc)["autoscalerOptions"]
    check_container_security(f"{kind} autoscaler", auto.get("securityContext", {}), {})
    check_resources(f"{kind} autoscaler", auto.get("resources", {}))
    assert seen >= (3 if kind == "RayJob" else 2)


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_cluster_shape_autoscaling_auth_and_shm(kind, manifests):
    spec = ray_cluster(manifests[kind])
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "head must not take Ray work"
    head = spec["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"], "head is CPU only"
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    for where, pod in [("head", head)] + [(g["groupName"], g["template"]["spec"]) for g in groups]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{where}: mount an emptyDir at /dev/shm"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm not in memory"


def test_rayjob_cluster_is_the_raycluster(manifests):
    assert manifests["RayJob"]["spec"]["rayClusterSpec"] == manifests["RayCluster"]["spec"], \
        "infra/rayjob.yaml spec.rayClusterSpec has drifted from infra/raycluster.yaml spec"


def walk_env(node, path=""):
    """(path, env entry) for every env list entry anywhere in a manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                for e in v:
                    yield f"{path}/env/{e.get('name')}", e
            else:
                yield from walk_env(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_env(v, f"{path}[{i}]")


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_credentials_come_from_the_secret(kind, manifests):
    doc = manifests[kind]
    text = open(os.path.join(INFRA, MANIFESTS[kind])).read()
    assert not re.search(r"^kind:\s*Secret", text, re.M), "no Secret may be inlined in a manifest"
    for path, e in walk_env(doc):
        if SECRET_LIKE.search(e["name"]):
            assert "value" not in e, f"{path}: secret-like variable with a literal value"
    # Every Ray container reads the S3 variables from the Secret by reference.
    for where, pod in pod_templates(doc):
        if where == "submitter":
            continue
        c = pod["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
        from_env = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
        for key in S3_KEYS:
            ref = refs.get(key)
            assert ref is not None or SECRET_NAME in from_env, f"{kind} {where}: {key} not taken from the Secret"
            if ref is not None:
                assert (ref["name"], ref["key"]) == (SECRET_NAME, key)
                assert ref.get("optional", False) is (key not in REQUIRED_S3_KEYS), f"{where}: {key} optional?"


def test_secret_template_has_the_keys_and_no_real_values():
    secret = load_yaml("secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    data = secret["stringData"]
    assert sorted(data) == sorted(S3_KEYS)
    for key in REQUIRED_S3_KEYS:
        assert data[key].startswith("REPLACE_WITH_"), f"secret.example.yaml: {key} must stay a placeholder"


def test_infra_files_hold_no_machine_paths_or_baked_secrets():
    for name in sorted(os.listdir(INFRA)):
        with open(os.path.join(INFRA, name)) as f:
            text = f.read()
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert here not in text, f"infra/{name} names a path on this machine ({here})"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"infra/{name} holds what looks like an AWS key"


# --- the job the RayJob runs ---------------------------------------------------

def entrypoint_argv(manifests) -> list[str]:
    return shlex.split(manifests["RayJob"]["spec"]["entrypoint"])


def test_entrypoint_runs_the_xar_job_script(manifests):
    argv = entrypoint_argv(manifests)
    assert argv[0] == "python" and argv[1] == "jobs/neon_xar.py", argv
    assert os.path.isfile(os.path.join(REPO, argv[1])), f"{argv[1]} does not exist"
    assert argv[2:] == ["--config", "jobs/configs/xar-l-imagenet256.yaml"], argv
    cluster = manifests["RayJob"]["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["workingDir"] == "/home/ray/neon_ray", "the relative entrypoint needs the image's project folder"
    spec = manifests["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_runtime_env_yaml_is_a_mapping(manifests):
    env = yaml.safe_load(manifests["RayJob"]["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and env, "runtimeEnvYAML must parse into a non-empty mapping"
    json.dumps(env)  # KubeRay passes it on as --runtime-env-json
    assert set(env) <= {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "config",
                        "container", "image_uri", "nsight", "py_executable", "java_jars"}, sorted(env)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "Ray env_vars values are strings"
    assert not any(SECRET_LIKE.search(k) for k in env.get("env_vars", {})), "no credentials in the runtime env"


def test_entrypoint_config_resolves_with_dry_run(manifests):
    argv = entrypoint_argv(manifests)
    config = os.path.join(REPO, argv[3])
    assert os.path.isfile(config), f"{argv[3]} (the RayJob's experiment config) does not exist yet"
    done = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} --dry-run failed:\n{done.stderr[-2000:]}"
    resolved = yaml.safe_load(done.stdout)
    assert str(resolved["run_dir"]).startswith("s3://"), "a cluster run writes to object storage"


# --- the image -------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        lines = [ln for ln in f.read().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pinned(package: str) -> str:
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for ln in f:
            m = re.match(rf"{package}==(\S+)", ln.strip(), re.I)
            if m:
                return m.group(1)
    raise AssertionError(f"constraints.txt does not pin {package}")


def test_dockerfile_base_installs_with_constraints_and_runs_non_root(manifests):
    ins = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    base = next(a for k, a in ins if k == "FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    assert base == f"rayproject/ray:{pinned('ray')}-py311-gpu", base
    assert ray_cluster(manifests["RayCluster"])["rayVersion"] == pinned("ray")

    pips = [a for k, a in ins if k == "RUN" and "pip install" in a]
    assert pips and all(re.search(r"(-c|--constraint)\s+constraints\.txt", a) for a in pips), pips
    env = " ".join(a for k, a in ins if k == "ENV")
    assert re.search(r"\bDS_BUILD_OPS=0\b", env), "DeepSpeed must install with DS_BUILD_OPS=0"

    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] in ("1000", "ray"), f"final USER must be non-root, got {users[-1:]}"
    for k, a in ins:
        if k in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", a) or a.split()[:1]
            assert not any(SECRET_LIKE.search(n) for n in names), f"Dockerfile bakes in a secret-like {k}: {a}"
    # Everything the image copies exists in the build context.
    for k, a in ins:
        if k == "COPY":
            for src in [s for s in a.split() if not s.startswith("--")][:-1]:
                assert os.path.exists(os.path.join(REPO, src)), f"COPY source {src} missing"
    images = {c["image"] for d in manifests.values() for _, pod in pod_templates(d) for c in pod["containers"]}
    assert len(images) == 1 and not images.pop().startswith("rayproject/"), "pods must run the project image"
