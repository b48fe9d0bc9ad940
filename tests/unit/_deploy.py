"""Deployment test helpers: read the Dockerfile, compose.yaml and deploy/; render kustomize.

There is no Docker engine, cluster or ``kustomize`` binary to run them with, so the tests read
them. ``render`` is a small kustomize for the features deploy/ uses, in kustomize's own order:

- ``resources`` (files and directories) and ``components`` (``kind: Component``);
- ``configMapGenerator`` (``literals``; ``behavior`` create or merge) with kustomize's hash
  suffix, and the references to the generated name in pod templates updated;
- ``patches`` by path: strategic merge (maps merged, the lists of a pod spec merged by their
  key, ``null`` deletes), the patch's kind and name selecting its target;
- ``namespace``, ``labels`` (``includeSelectors: false``; ``includeTemplates``) and ``images``.

Any other field of a kustomization raises, so an overlay cannot use a feature that these tests
would render wrongly. Where ``kubectl`` is installed, a test compares ``kubectl kustomize``'s
output with this renderer's.

For NetworkPolicies, ``egress_allows`` answers whether a pod may connect to an address and
port, from the policies that select it (label selectors, ipBlocks with ``except``, ports).

For compose.yaml, ``interpolate`` resolves ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``
as ``docker compose`` does, with ``.env.example``'s values or none.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "schemas"
OVERLAYS = ("dev", "prod")

Resource = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "labels",
    "images",
    "configMapGenerator",
    "patches",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Strategic-merge keys of the lists in a pod spec (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
_GENERATED = "__generated__"


def load_yaml_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


# --- kustomize ---------------------------------------------------------------------------------


def render(directory: Path) -> list[Resource]:
    """The resources ``kustomize build <directory>`` prints (in an unspecified order)."""
    resources = _accumulate(directory, component=False, resources=[])
    _add_hash_suffixes(resources)
    for resource in resources:
        resource.pop(_GENERATED, None)
    return resources


def _kustomization(directory: Path) -> Resource:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(data) - SUPPORTED_FIELDS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields not rendered: {unknown}")
    return data


def _accumulate(directory: Path, *, component: bool, resources: list[Resource]) -> list[Resource]:
    kustomization = _kustomization(directory)
    expected = "Component" if component else "Kustomization"
    assert kustomization.get("kind", "Kustomization") == expected, directory
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(_accumulate(path, component=False, resources=[]))
        else:
            resources.extend(load_yaml_documents(path))
    for entry in kustomization.get("components", []):
        resources = _accumulate((directory / entry).resolve(), component=True, resources=resources)
    _generate_config_maps(kustomization.get("configMapGenerator", []), resources)
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, resources)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] != "Namespace":
                resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        _apply_labels(label, resources)
    for image in kustomization.get("images", []):
        _apply_image(image, resources)
    return resources


def _generate_config_maps(generators: list[Resource], resources: list[Resource]) -> None:
    for generator in generators:
        unknown = set(generator) - {"name", "literals", "behavior"}
        if unknown:
            raise NotImplementedError(f"configMapGenerator fields not rendered: {unknown}")
        data = dict(item.split("=", 1) for item in generator.get("literals", []))
        behavior = generator.get("behavior", "create")
        existing = [
            r
            for r in resources
            if r["kind"] == "ConfigMap" and r["metadata"]["name"] == generator["name"]
        ]
        if behavior == "create":
            assert not existing, f"ConfigMap {generator['name']} already exists"
            resources.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": generator["name"]},
                    "data": data,
                    _GENERATED: True,
                }
            )
        elif behavior == "merge":
            assert len(existing) == 1, f"merge needs one ConfigMap {generator['name']}"
            existing[0].setdefault("data", {}).update(data)
        else:
            raise NotImplementedError(f"configMapGenerator behavior {behavior!r}")


def config_map_hash(config_map: Resource) -> str:
    """kustomize's name suffix for a generated ConfigMap: sha256 of a JSON encoding of it.

    kustomize 5 means to encode kind, name and data, but it looks the name up as the single
    key ``metadata/name``, which no ConfigMap has: the name is encoded as empty, and the suffix
    depends on the data alone (checked against ``kubectl kustomize`` 5.5).
    """
    encoded = json.dumps(
        {"data": config_map.get("data", {}), "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoding/json escapes these three; kustomize hashes Go's output.
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escaped)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _add_hash_suffixes(resources: list[Resource]) -> None:
    renamed: dict[str, str] = {}
    for resource in resources:
        if resource.get(_GENERATED):
            old = _name(resource)
            resource["metadata"]["name"] = f"{old}-{config_map_hash(resource)}"
            renamed[old] = _name(resource)
    for resource in resources:
        for pod in pod_specs(resource):
            for container in containers(pod):
                for source in container.get("envFrom", []):
                    ref = source.get("configMapRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
            for volume in pod.get("volumes", []):
                ref = volume.get("configMap")
                if ref and ref.get("name") in renamed:
                    ref["name"] = renamed[ref["name"]]


def _apply_patch(directory: Path, patch: Resource, resources: list[Resource]) -> None:
    if set(patch) != {"path"}:
        raise NotImplementedError(f"only `patches: - path:` is rendered, got {patch}")
    for document in load_yaml_documents(directory / patch["path"]):
        targets = [
            r
            for r in resources
            if r["kind"] == document["kind"]
            and _name(r) == _name(document)
            and _group(r) == _group(document)
        ]
        assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} resources"
        builtin = "." not in _group(document) or _group(document).endswith(".k8s.io")
        merged = strategic_merge(targets[0], document, builtin=builtin)
        targets[0].clear()
        targets[0].update(merged)


def strategic_merge(base: Any, patch: Any, *, builtin: bool = True, key: str = "") -> Any:
    """Kubernetes' strategic merge for maps and keyed lists (JSON merge for custom resources)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for field, value in patch.items():
            if value is None:
                merged.pop(field, None)
            elif field in merged:
                merged[field] = strategic_merge(merged[field], value, builtin=builtin, key=field)
            else:
                merged[field] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and builtin and key in MERGE_KEYS:
        # kustomize's order: the patch's items (merged into the originals they name), then
        # the originals the patch does not name
        merge_key = MERGE_KEYS[key]
        originals = {item[merge_key]: item for item in base}
        named = {item[merge_key] for item in patch}
        merged_list = [
            strategic_merge(originals[item[merge_key]], item, key=key)
            if item[merge_key] in originals
            else copy.deepcopy(item)
            for item in patch
        ]
        return merged_list + [copy.deepcopy(i) for i in base if i[merge_key] not in named]
    return copy.deepcopy(patch)


def _apply_labels(label: Resource, resources: list[Resource]) -> None:
    unknown = set(label) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or label.get("includeSelectors", False):
        raise NotImplementedError(f"labels: only pairs/includeTemplates are rendered: {label}")
    for resource in resources:
        resource.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
        if label.get("includeTemplates") and resource["kind"] in WORKLOAD_KINDS:
            template = resource.setdefault("spec", {}).setdefault("template", {})
            template.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])


def _apply_image(image: Resource, resources: list[Resource]) -> None:
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise NotImplementedError(f"images: only name/newName/newTag are rendered: {image}")
    for resource in resources:
        for pod in pod_specs(resource):
            for container in containers(pod):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def split_image(image: str) -> tuple[str, str | None]:
    """``registry:5000/name:tag`` → (``registry:5000/name``, ``tag``)."""
    name, _, _digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        return name, tag
    return name, None


# --- reading resources -------------------------------------------------------------------------


def _name(resource: Resource) -> str:
    return str(resource["metadata"]["name"])


def _group(resource: Resource) -> str:
    api_version = str(resource["apiVersion"])
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def key(resource: Resource) -> tuple[str, str, str, str]:
    namespace = resource["metadata"].get("namespace", "")
    return (resource["apiVersion"], resource["kind"], namespace, _name(resource))


def pod_specs(resource: Resource) -> Iterator[Resource]:
    if resource.get("kind") in WORKLOAD_KINDS:
        yield resource["spec"]["template"]["spec"]
    elif resource.get("kind") == "CronJob":
        yield resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def containers(pod: Resource) -> list[Resource]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def by_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {_name(r): r for r in resources if r["kind"] == kind}


@cache
def rendered(overlay: str) -> tuple[Resource, ...]:
    """An overlay, rendered once per test session (tests must not modify it)."""
    return tuple(render(DEPLOY / "overlays" / overlay))


# --- NetworkPolicy ------------------------------------------------------------------------------


def selector_matches(selector: Resource, labels: dict[str, str]) -> bool:
    """A LabelSelector (``matchLabels`` and ``matchExpressions``) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        label, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(label) not in values:
            return False
        if operator == "NotIn" and label in labels and labels[label] in values:
            return False
        if operator == "Exists" and label not in labels:
            return False
        if operator == "DoesNotExist" and label in labels:
            return False
    return True


def policy_types(policy: Resource) -> list[str]:
    """A NetworkPolicy's types; without the field, Kubernetes' default."""
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def policies_for(resources: Iterable[Resource], pod_labels: dict[str, str], direction: str):
    """The NetworkPolicies of ``direction`` (Ingress or Egress) that select a pod."""
    return [
        policy
        for policy in resources
        if policy["kind"] == "NetworkPolicy"
        and direction in policy_types(policy)
        and selector_matches(policy["spec"]["podSelector"], pod_labels)
    ]


def port_allowed(
    ports: list[Resource] | None, port: int, protocol: str, named: dict[str, int] | None = None
) -> bool:
    """Whether a rule's ``ports`` (none: every port) let ``port``/``protocol`` through."""
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        number = entry.get("port")
        if number is None:
            return True
        if isinstance(number, str):
            number = (named or {}).get(number)
            if number == port:
                return True
        elif number <= port <= entry.get("endPort", number):
            return True
    return False


def ip_block_contains(block: Resource, address: IPAddress) -> bool:
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(c) for c in block.get("except", []))


def egress_allows(
    resources: Iterable[Resource],
    pod_labels: dict[str, str],
    address: str,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether a pod may connect to ``address`` (outside the cluster) on ``port``.

    A peer that selects pods or namespaces never matches an outside address; a rule without
    ``to`` matches every destination. A pod that no Egress policy selects may go anywhere.
    """
    policies = policies_for(resources, pod_labels, "Egress")
    if not policies:
        return True
    ip = ipaddress.ip_address(address)
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            if not port_allowed(rule.get("ports"), port, protocol):
                continue
            peers = rule.get("to")
            if not peers or any(
                "ipBlock" in peer and ip_block_contains(peer["ipBlock"], ip) for peer in peers
            ):
                return True
    return False


# --- commands and queues -----------------------------------------------------------------------


def queues_in(argv: list[str]) -> list[str]:
    """Queue names given to ``-Q`` / ``--queues`` (also ``-Qa,b``, ``--queues=a,b``)."""
    found: list[str] = []
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-Q", "--queues") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--queues="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-Q") and len(arg) > 2:
            value = arg[2:]
        if value is not None:
            found.extend(q.strip() for q in value.split(",") if q.strip())
    return found


def shell_words(text: str) -> list[str]:
    """Words of shell-ish text (a Procfile line, a Dockerfile instruction), comments dropped."""
    words: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words.extend(shlex.split(line, comments=True))
        except ValueError:  # unbalanced quotes in prose: fall back to whitespace
            words.extend(line.split())
    return words


# --- compose.yaml ------------------------------------------------------------------------------

# The secrets compose.yaml requires from .env, with stand-in values.
COMPOSE_SECRETS = {
    "DJANGO_SECRET_KEY": "stand-in-secret-key",
    "POSTGRES_PASSWORD": "standinpostgres",
    "RABBITMQ_PASSWORD": "standinrabbitmq",
    "FLOWER_BASIC_AUTH": "admin:standinflower",
}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def interpolate(value, environ: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, colon, operator, argument = match.groups()
        current = environ.get(name)
        missing = current is None or (colon == ":" and current == "")
        if operator == "-" and missing:
            return argument
        if operator == "?" and missing:
            raise LookupError(f"required variable {name} is missing a value: {argument}")
        return current or ""

    return VARIABLE.sub(substitute, value)


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example line without '=': {line}"
            values[name.strip()] = value
    return values


def seconds(duration: str) -> float:
    """A Compose (Go) duration such as 360s, 6m or 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    pairs = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def dockerfile_stages(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) for each FROM."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for instruction, arguments in dockerfile_instructions(text):
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", arguments, flags=re.I)
            stages.append((match.group(1) if match else str(len(stages)), []))
        elif stages:
            stages[-1][1].append((instruction, arguments))
    return stages
