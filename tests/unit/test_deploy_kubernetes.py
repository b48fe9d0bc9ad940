"""deploy/: every manifest parses, both overlays render and validate, and keep their promises.

Built-in kinds are validated, strictly (unknown fields refused), against the Kubernetes JSON
schemas that ``kubernetes-validate`` ships, for the oldest version we support and the newest it
knows. KEDA's kinds are custom resources: they are validated against the schemas in
tests/schemas/, written from KEDA's documented specification. Overlays are rendered by
tests/unit/_deploy.py's small kustomize and, where ``kubectl`` exists, compared with
``kubectl kustomize``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from decimal import Decimal
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import manual
from tests.unit._deploy import (
    DEPLOY,
    OVERLAYS,
    SCHEMAS,
    Resource,
    by_kind,
    config_map_hash,
    containers,
    key,
    load_yaml_documents,
    manifest_files,
    pod_specs,
    queues_in,
    render,
    rendered,
    split_image,
)

K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
SECRET_NAME = "queueworker-secrets"
WORKERS = {
    "queueworker-worker-http": ["http.request"],
    "queueworker-worker-data": ["data.processing"],
    "queueworker-worker-default": ["compensation", "task.created"],
}
DEPLOYMENTS = {
    "queueworker-web",
    "queueworker-beat",
    "queueworker-flower",
    *WORKERS,
}
NETWORK_POLICIES = {
    "queueworker-default-deny-ingress",
    "queueworker-web",
    "queueworker-flower",
    "queueworker-worker-egress",
}
APP_UID = 10001  # the Dockerfile's USER
# Artifacts: the processes that read or write them (web streams results, workers write them,
# beat's sweep deletes expired ones), and settings.py's default storage under the image's
# QW_VAR_DIR (/app/var).
ARTIFACT_USERS = ("queueworker-web", "queueworker-beat", *WORKERS)
FILE_SYSTEM_STORAGE = "django.core.files.storage.FileSystemStorage"
S3_STORAGE = "storages.backends.s3.S3Storage"
ARTIFACT_ROOT = "/app/var/artifacts"
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# A one-node development cluster: a ReadWriteOnce volume is shared by every pod of its node.
ONE_NODE_OVERLAYS = {"dev"}
HARD_LIMIT_GRACE_S = 10  # tasks_app.dispatch: a task's hard limit is its timeout + 10 s


@cache
def _keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"keda-{kind.lower()}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(resource: Resource, version: str) -> None:
    """Raise if the resource is not valid for that Kubernetes version (or KEDA's spec)."""
    if resource["kind"] in KEDA_KINDS:
        _keda_validator(resource["kind"]).validate(resource)
        behavior = (
            resource["spec"]
            .get("advanced", {})
            .get("horizontalPodAutoscalerConfig", {})
            .get("behavior")
        )
        if behavior is not None:  # KEDA passes it to the HPA it creates: Kubernetes' own type
            kubernetes_validate.validate(_hpa_with(behavior), version, strict=True)
        return
    kubernetes_validate.validate(resource, version, strict=True)


def _hpa_with(behavior: Resource) -> Resource:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-behavior"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 1,
            "behavior": behavior,
        },
    }


def config(resources) -> dict[str, str]:
    (config_map,) = [r for r in resources if r["kind"] == "ConfigMap"]
    return config_map["data"]


def quantity(value) -> Decimal:
    units = {"m": Decimal("0.001"), "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    text = str(value)
    for suffix in ("Ki", "Mi", "Gi", "m"):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * units[suffix]
    return Decimal(text)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- parsing and rendering ---------------------------------------------------------------------


def test_every_manifest_parses_and_names_its_kind():
    files = manifest_files()
    assert len(files) >= 15
    for path in files:
        documents = load_yaml_documents(path)
        assert documents, path
        for document in documents:
            assert {"apiVersion", "kind"} <= set(document), path
            if path.name != "kustomization.yaml":
                assert document["metadata"]["name"], path


def test_layout_is_a_base_with_dev_and_prod_overlays():
    assert (DEPLOY / "base" / "kustomization.yaml").is_file()
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load(
            (DEPLOY / "overlays" / overlay / "kustomization.yaml").open()
        )
        assert "../../base" in kustomization["resources"]
        assert kustomization["namespace"] == f"queueworker-{overlay}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_service(overlay):
    resources = rendered(overlay)
    keys = [key(r) for r in resources]
    assert len(keys) == len(set(keys)), "duplicate resources"
    assert set(by_kind(resources, "Deployment")) == DEPLOYMENTS
    assert set(by_kind(resources, "Job")) == {"queueworker-migrate"}
    assert set(by_kind(resources, "Service")) == {"queueworker-web", "queueworker-flower"}
    assert set(by_kind(resources, "HorizontalPodAutoscaler")) >= {"queueworker-web"}
    assert set(by_kind(resources, "PodDisruptionBudget")) == {"queueworker-web", *WORKERS}
    assert set(by_kind(resources, "NetworkPolicy")) == NETWORK_POLICIES
    assert not by_kind(resources, "Secret"), "no secret values are committed"
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == f"queueworker-{overlay}"
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "queueworker"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = {key(r): r for r in yaml.safe_load_all(done.stdout) if r}
    ours = {key(r): r for r in render(DEPLOY / "overlays" / overlay)}
    assert set(ours) == set(theirs)
    for name, resource in ours.items():
        assert resource == theirs[name], name


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates_against_its_schema(overlay, version):
    for resource in rendered(overlay):
        try:
            validate(resource, version)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"no schema for {resource['apiVersion']} {resource['kind']}")
        except jsonschema.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path))
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")


def test_base_and_components_validate_on_their_own():
    components = sorted(p.name for p in (DEPLOY / "components").iterdir())
    assert components == ["artifacts-s3", "artifacts-volume", "keda", "worker-hpa"]
    for directory in ("base", *(f"components/{name}" for name in components)):
        kustomization = yaml.safe_load((DEPLOY / directory / "kustomization.yaml").read_text())
        patches = {patch["path"] for patch in kustomization.get("patches", [])}
        for path in sorted((DEPLOY / directory).glob("*.yaml")):
            if path.name == "kustomization.yaml" or path.name in patches:
                continue
            for resource in load_yaml_documents(path):
                validate(resource, K8S_VERSIONS[-1])


def _mutated(overlay: str, kind: str, name: str):
    (resource,) = [
        r for r in rendered(overlay) if r["kind"] == kind and r["metadata"]["name"] == name
    ]
    return copy.deepcopy(resource)


@pytest.mark.parametrize(
    "mistake",
    ["misspelt-field", "string-port", "bad-strategy", "keda-number", "keda-no-queue", "keda-field"],
)
def test_validation_refuses_mistakes(mistake):
    if mistake.startswith("keda"):
        resource = _mutated("prod", "ScaledObject", "queueworker-worker-http")
        trigger = resource["spec"]["triggers"][0]
        if mistake == "keda-number":
            trigger["metadata"]["value"] = 20  # KEDA's metadata is a map of strings
        elif mistake == "keda-no-queue":
            del trigger["metadata"]["queueName"]
        else:
            resource["spec"]["pollingIntervall"] = 15
    else:
        resource = _mutated("prod", "Deployment", "queueworker-web")
        pod = resource["spec"]["template"]["spec"]
        if mistake == "misspelt-field":
            pod["containers"][0]["imagePullPolicyy"] = "Always"
        elif mistake == "string-port":
            pod["containers"][0]["ports"][0]["containerPort"] = "8000"
        else:
            resource["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = [1]
    with pytest.raises(jsonschema.ValidationError):
        validate(resource, K8S_VERSIONS[-1])


# --- the processes -----------------------------------------------------------------------------


def _container(resources, deployment: str, name: str | None = None) -> Resource:
    pod = by_kind(resources, "Deployment")[deployment]["spec"]["template"]["spec"]
    main = pod["containers"]
    return main[0] if name is None else next(c for c in main if c["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_web_probes_live_and_ready_endpoints_with_an_allowed_host(overlay):
    resources = rendered(overlay)
    web = _container(resources, "queueworker-web")
    assert web["args"] == ["web"]
    assert web["livenessProbe"]["httpGet"]["path"] == "/api/health/live/"
    assert web["readinessProbe"]["httpGet"]["path"] == "/api/health/ready/"
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    allowed = config(resources)["DJANGO_ALLOWED_HOSTS"].split(",")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = web[probe]["httpGet"]
        assert ports[http["port"]] == 8000  # gunicorn's QW_BIND port in the image
        # Django answers 400 to the pod IP a probe sends by default
        headers = {h["name"]: h["value"] for h in http["httpHeaders"]}
        assert headers["Host"] in allowed, (probe, headers, allowed)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_beat_is_a_single_replica_recreated_never_autoscaled_or_budgeted(overlay):
    resources = rendered(overlay)
    beat = by_kind(resources, "Deployment")["queueworker-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"] == ["beat"]
    targets = {
        r["spec"]["scaleTargetRef"]["name"]
        for r in resources
        if r["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert "queueworker-beat" not in targets
    labels = beat["spec"]["template"]["metadata"]["labels"]
    for budget in by_kind(resources, "PodDisruptionBudget").values():
        assert not matches(budget["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_groups_consume_their_queues_and_outlast_their_tasks(overlay):
    resources = rendered(overlay)
    settings = config(resources)
    longest = int(settings["QW_MAX_TIMEOUT_S"]) + max(
        int(settings["QW_LEASE_SECONDS"]), HARD_LIMIT_GRACE_S
    )
    for name, queues in WORKERS.items():
        deployment = by_kind(resources, "Deployment")[name]
        worker = _container(resources, name)
        assert worker["args"][0] == "worker"
        assert queues_in(worker["args"]) == queues
        # SIGTERM → Celery's warm shutdown: the running tasks finish before SIGKILL
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > longest, (name, grace, longest)
        probe = worker["livenessProbe"]["exec"]["command"]
        assert probe == ["python", "/app/docker/healthcheck.py"]
        assert worker["livenessProbe"]["timeoutSeconds"] > 5  # the ping's own timeout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_is_a_job_and_the_processes_wait_for_it(overlay):
    resources = rendered(overlay)
    job = by_kind(resources, "Job")["queueworker-migrate"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["args"] == ["migrate"]
    assert job["spec"]["backoffLimit"] >= 1
    for name in ("queueworker-web", "queueworker-beat", *WORKERS):
        init = by_kind(resources, "Deployment")[name]["spec"]["template"]["spec"]["initContainers"]
        assert [c["args"] for c in init] == [["wait-for-migrations"]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_within_limits(overlay):
    for resource in rendered(overlay):
        for pod in pod_specs(resource):
            for container in containers(pod):
                requests = container["resources"]["requests"]
                limits = container["resources"]["limits"]
                for kind in ("cpu", "memory"):
                    assert quantity(requests[kind]) <= quantity(limits[kind]), (
                        resource["metadata"]["name"],
                        container["name"],
                        kind,
                    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    resources = rendered(overlay)
    for namespace in by_kind(resources, "Namespace").values():
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = [pod for resource in resources for pod in pod_specs(resource)]
    assert len(pods) == len(DEPLOYMENTS) + 1
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == APP_UID
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(pod):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            # a read-only root: the writable places are an emptyDir on /tmp and, where the
            # artifacts live on a shared volume, that claim at the artifact root
            assert security["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert "emptyDir" in mounts.pop("/tmp")
            for path, volume in mounts.items():
                assert path == ARTIFACT_ROOT and "persistentVolumeClaim" in volume, path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configuration_comes_from_the_configmap_and_the_secret(overlay):
    resources = rendered(overlay)
    config_maps = set(by_kind(resources, "ConfigMap"))
    settings = config(resources)
    assert settings["LOG_FORMAT"] == "json"
    for resource in resources:
        for pod in pod_specs(resource):
            for container in containers(pod):
                sources = container["envFrom"]
                assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} == (
                    config_maps
                )
                assert [s["secretRef"]["name"] for s in sources if "secretRef" in s] == [
                    SECRET_NAME
                ]
                # no value written into a manifest: `env` only refers to a Secret's keys
                for var in container.get("env", []):
                    assert set(var) == {"name", "valueFrom"}, var
                    assert set(var["valueFrom"]) == {"secretKeyRef"}, var
    for secret_setting in ("DJANGO_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL"):
        assert secret_setting not in settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_for_every_container(overlay):
    resources = rendered(overlay)
    images = {
        container["image"]
        for resource in resources
        for pod in pod_specs(resource)
        for container in containers(pod)
    }
    assert len(images) == 1
    _, tag = split_image(images.pop())
    assert tag and (overlay == "dev" or tag != "latest")


# --- artifacts storage --------------------------------------------------------------------------


def _environment(resources, container: Resource) -> dict[str, object]:
    """A container's variables: its ConfigMaps' values, then its ``env`` (a value or a ref)."""
    config_maps = by_kind(resources, "ConfigMap")
    environ: dict[str, object] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environ.update(config_maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        environ[var["name"]] = var.get("value", var.get("valueFrom"))
    return environ


def _artifact_storage(resources, deployment: str, *, one_node: bool) -> tuple:
    """Where a process keeps artifacts, checked to be shared by every pod of the service."""
    pod = by_kind(resources, "Deployment")[deployment]["spec"]["template"]["spec"]
    container = _container(resources, deployment)
    environ = _environment(resources, container)
    backend = environ.get("QW_ARTIFACT_STORAGE", FILE_SYSTEM_STORAGE)
    if backend == FILE_SYSTEM_STORAGE:
        # a read-only root, and each pod's own disk anyway: only a volume that every pod
        # mounts at the artifact root lets web read what a worker wrote
        root = environ.get("QW_ARTIFACT_ROOT", ARTIFACT_ROOT)
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert root in mounts, f"{deployment}: FileSystemStorage at {root}, no volume there"
        assert not mounts[root].get("readOnly"), deployment
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[root]["name"])
        assert "persistentVolumeClaim" in volume, f"{deployment}: {volume} is not shared"
        claim = volume["persistentVolumeClaim"]["claimName"]
        modes = by_kind(resources, "PersistentVolumeClaim")[claim]["spec"]["accessModes"]
        shared = {"ReadWriteMany", "ReadWriteOnce"} if one_node else {"ReadWriteMany"}
        assert set(modes) & shared, (deployment, claim, modes)
        return (backend, root, claim)
    assert backend == S3_STORAGE, backend
    options = json.loads(str(environ["QW_ARTIFACT_STORAGE_OPTIONS"]))
    assert options["bucket_name"] and options["region_name"], options
    assert not {"access_key", "secret_key", "security_token"} & set(options), "credentials"
    secrets = []
    for name in S3_CREDENTIALS:
        reference = environ.get(name)
        assert isinstance(reference, dict), f"{deployment}: {name} is not from a Secret"
        assert reference["secretKeyRef"]["key"] == name
        secrets.append(reference["secretKeyRef"]["name"])
    return (backend, json.dumps(options, sort_keys=True), *secrets)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_web_beat_and_workers_share_one_artifact_storage(overlay):
    resources = rendered(overlay)
    storages = {
        name: _artifact_storage(resources, name, one_node=overlay in ONE_NODE_OVERLAYS)
        for name in ARTIFACT_USERS
    }
    assert len(set(storages.values())) == 1, storages


def test_prod_keeps_artifacts_in_object_storage():
    resources = rendered("prod")
    backend, *_ = _artifact_storage(resources, "queueworker-worker-data", one_node=False)
    assert backend == S3_STORAGE
    assert not by_kind(resources, "PersistentVolumeClaim")
    # the credentials only where artifacts are used (not Flower, not the migration)
    for resource in resources:
        for pod in pod_specs(resource):
            for container in containers(pod):
                if container["name"] in ("flower", "migrate", "wait-for-migrations"):
                    assert "env" not in container, container["name"]


@pytest.mark.skipif(
    importlib.util.find_spec("storages") is None, reason="django-storages[s3] is not installed"
)
def test_prod_storage_options_are_s3_storage_settings():
    from storages.backends.s3 import S3Storage

    options = json.loads(config(rendered("prod"))["QW_ARTIFACT_STORAGE_OPTIONS"])
    storage = S3Storage(**options)  # an unknown option raises ImproperlyConfigured
    assert storage.bucket_name == options["bucket_name"]


def test_artifacts_volume_component_replaces_s3_in_prod(tmp_path: Path):
    # given prod with the documented swap: components/artifacts-volume instead of artifacts-s3,
    # and no S3 options
    overlay = _prod_with_component(
        tmp_path, "artifacts-s3", "artifacts-volume", drop="QW_ARTIFACT_STORAGE_OPTIONS"
    )
    # when rendered
    resources = render(overlay)
    # then one ReadWriteMany claim at the artifact root of web, beat and every worker, no S3
    storages = {_artifact_storage(resources, name, one_node=False) for name in ARTIFACT_USERS}
    assert storages == {(FILE_SYSTEM_STORAGE, ARTIFACT_ROOT, "queueworker-artifacts")}
    (claim,) = by_kind(resources, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "QW_ARTIFACT_STORAGE_OPTIONS" not in config(resources)
    for resource in resources:
        for pod in pod_specs(resource):
            assert not any("env" in c for c in containers(pod))
        validate(resource, K8S_VERSIONS[-1])


# --- autoscaling and disruption ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_target_existing_deployments_one_each_that_leave_replicas_alone(overlay):
    resources = rendered(overlay)
    deployments = by_kind(resources, "Deployment")
    targets = [
        r["spec"]["scaleTargetRef"]["name"]
        for r in resources
        if r["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    ]
    assert len(targets) == len(set(targets)), "two autoscalers fight over one Deployment"
    assert "queueworker-web" in targets
    for target in targets:
        # a Deployment's own replicas would reset the autoscaler's count at every apply
        assert "replicas" not in deployments[target]["spec"], target
    web = by_kind(resources, "HorizontalPodAutoscaler")["queueworker-web"]["spec"]
    assert 1 <= web["minReplicas"] <= web["maxReplicas"]
    assert web["metrics"][0]["resource"]["name"] == "cpu"


def test_prod_scales_workers_on_their_queues_with_keda():
    resources = rendered("prod")
    scaled = by_kind(resources, "ScaledObject")
    assert set(scaled) == set(WORKERS)
    (auth,) = by_kind(resources, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": SECRET_NAME, "key": "CELERY_BROKER_URL"}
    ]
    for name, queues in WORKERS.items():
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert spec["minReplicaCount"] >= 1  # a consumer for countdown retries
        assert [t["metadata"]["queueName"] for t in spec["triggers"]] == queues
        for trigger in spec["triggers"]:
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
            assert not {"host", "hostFromEnv", "password"} & set(trigger["metadata"])


def test_dev_has_no_keda():
    assert not by_kind(list(rendered("dev")), "ScaledObject")


def _prod_with_component(tmp_path: Path, old: str, new: str, drop: str | None = None) -> Path:
    """A copy of the prod overlay with component ``new`` in place of ``old`` (and the
    ConfigMap literal ``drop`` removed), as the README tells a cluster without ``old``."""
    overlay = tmp_path / f"prod-{new}"
    shutil.copytree(DEPLOY / "overlays" / "prod", overlay)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["resources"] = [
        str(DEPLOY / "base") if entry == "../../base" else entry
        for entry in kustomization["resources"]
    ]
    assert f"../../components/{old}" in kustomization["components"]
    names = [Path(entry).name for entry in kustomization["components"]]
    kustomization["components"] = [
        str(DEPLOY / "components" / (new if name == old else name)) for name in names
    ]
    (generator,) = kustomization["configMapGenerator"]
    generator["literals"] = [
        literal for literal in generator["literals"] if literal.partition("=")[0] != drop
    ]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return overlay


def test_hpa_fallback_component_renders_and_replaces_keda(tmp_path: Path):
    # given prod with the documented swap: components/worker-hpa instead of components/keda
    overlay = _prod_with_component(tmp_path, "keda", "worker-hpa")
    # when rendered
    resources = render(overlay)
    # then every worker has a CPU HPA, nothing of KEDA is left, and it all validates
    assert not by_kind(resources, "ScaledObject")
    assert not by_kind(resources, "TriggerAuthentication")
    hpas = by_kind(resources, "HorizontalPodAutoscaler")
    assert set(hpas) == {"queueworker-web", *WORKERS}
    deployments = by_kind(resources, "Deployment")
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert "replicas" not in deployments[name]["spec"]
    for resource in resources:
        validate(resource, K8S_VERSIONS[-1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_services_select_their_pods(overlay):
    resources = rendered(overlay)
    deployments = by_kind(resources, "Deployment")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}

    def selected_by(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pods.items() if matches(selector, labels)]

    for name, deployment in deployments.items():
        assert selected_by(deployment["spec"]["selector"]["matchLabels"]) == [name]
    for name, budget in by_kind(resources, "PodDisruptionBudget").items():
        assert selected_by(budget["spec"]["selector"]["matchLabels"]) == [name]
        assert budget["spec"]["maxUnavailable"] == 1  # drains proceed even with one replica
    for name, service in by_kind(resources, "Service").items():
        assert selected_by(service["spec"]["selector"]) == [name]
        pod = deployments[name]["spec"]["template"]["spec"]
        ports = {port["name"] for c in containers(pod) for port in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_prod_serves_https_through_its_ingress_and_trusts_the_proxy():
    resources = rendered("prod")
    (ingress,) = by_kind(resources, "Ingress").values()
    settings = config(resources)
    host = ingress["spec"]["rules"][0]["host"]
    assert ingress["spec"]["tls"][0]["hosts"] == [host]
    assert host in settings["DJANGO_ALLOWED_HOSTS"].split(",")
    assert f"https://{host}" in settings["DJANGO_CSRF_TRUSTED_ORIGINS"].split(",")
    assert settings["DJANGO_TRUST_X_FORWARDED_PROTO"] == "true"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] in by_kind(resources, "Service")
    assert "queueworker-flower" not in json.dumps(ingress), "Flower has no login of its own"


def test_manual_documents_the_deploy_commands():
    readme = manual.text()  # README.md and docs/ (docs/deployment.md)
    for snippet in (
        "kubectl apply -k deploy/overlays/prod",
        "components/worker-hpa",
        "components/artifacts-volume",
        "queueworker-secrets",
        "queueworker-artifacts",
        "docker compose up",
    ):
        assert snippet in readme, snippet


# --- the renderer itself -----------------------------------------------------------------------


def test_config_map_hash_is_kustomizes():
    # kubectl kustomize 5.5 names this generated ConfigMap example-k24cmtf268
    data = {"GREETING": "hello <world> & more", "LEVEL": "info"}
    assert config_map_hash({"metadata": {"name": "example"}, "data": data}) == "k24cmtf268"


PATCH_BASE = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: main
          image: app
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
          resources: {limits: {cpu: "1"}}
"""
PATCH = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      containers:
        - name: main
          env: [{name: B, value: "3"}, {name: C, value: "4"}]
          resources: null
        - name: sidecar
          image: other
"""


def test_renderer_merges_pod_lists_by_their_keys(tmp_path: Path):
    # given a Deployment and a strategic-merge patch of its containers
    (tmp_path / "deployment.yaml").write_text(PATCH_BASE)
    (tmp_path / "patch.yaml").write_text(PATCH)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deployment.yaml]\npatches: [{path: patch.yaml}]\n"
    )
    # when rendered
    (deployment,) = render(tmp_path)
    # then containers merge by name, env by name (kustomize's order), and null deletes
    main, sidecar = deployment["spec"]["template"]["spec"]["containers"]
    assert main["image"] == "app" and "resources" not in main
    assert main["env"] == [
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
        {"name": "A", "value": "1"},
    ]
    assert sidecar == {"name": "sidecar", "image": "other"}
    if shutil.which("kubectl"):
        done = subprocess.run(
            ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True
        )
        assert yaml.safe_load(done.stdout) == deployment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_http_worker_runs_a_prefork_child_per_core(overlay):
    resources = rendered(overlay)
    args = _container(resources, "queueworker-worker-http")["args"]
    assert args[args.index("-P") + 1] == "prefork"
    assert int(args[args.index("-c") + 1]) == 2
    for name in ("queueworker-worker-data", "queueworker-worker-default"):
        assert "-P" not in _container(resources, name)["args"], name
