"""A container's environment as the kubelet and the runtime make it, from the pod spec (pure).

Dicts in, dict out: the pod and the objects it refers to are the API's JSON (Secret ``data``
base64-encoded as the API sends it); nothing here talks to the cluster. The rules follow the
kubelet (1.34, ``makeEnvironmentVariables``):

1. ``envFrom`` in order, each ConfigMap's or Secret's keys with the optional ``prefix``; a later
   source overrides an earlier one;
2. ``env`` in order, overriding ``envFrom``: a non-empty ``value`` has its ``$(VAR)`` references
   expanded against the variables declared so far, then the service variables (``$$`` is a
   literal ``$``; an unknown reference stays as written); else ``valueFrom`` (``fieldRef``,
   ``resourceFieldRef``, ``configMapKeyRef``, ``secretKeyRef``). An ``optional`` reference to a
   missing object or key leaves the variable out; a required one makes the container fail to
   start (``CreateContainerConfigError``), here an ``EnvError``;
3. the service variables (``{NAME}_SERVICE_HOST``, Docker-link ``{NAME}_PORT...``) for the
   ``kubernetes`` Service of ``default`` always, and for every Service of the pod's namespace
   with a cluster IP unless ``enableServiceLinks: false``; declared variables win over them;
4. the runtime (containerd, CRI-O) adds ``HOSTNAME``, the pod's host name, below all of these.

The image's own ``ENV`` is not in the pod spec and is not known here.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

MASTER_NAMESPACE = "default"
MASTER_SERVICES = ("kubernetes",)
_HOSTNAME_MAX = 63

JSON = Mapping[str, Any]


class EnvError(ValueError):
    """The container could not start with this spec (the kubelet would refuse it too). Never holds a value."""


@dataclass(frozen=True)
class Objects:
    """What the container's references resolve to; a name missing from a mapping does not exist.

    ``node_allocatable``: the node's ``status.allocatable`` (None when it could not be read): the
    kubelet's value of a ``limits.*`` resource the container does not limit.
    """

    config_maps: Mapping[str, JSON] = field(default_factory=dict)
    secrets: Mapping[str, JSON] = field(default_factory=dict)
    services: Sequence[JSON] = ()  # the pod's namespace's Services, and default/kubernetes
    node_allocatable: Mapping[str, str] | None = None


@dataclass(frozen=True)
class PodEnv:
    values: dict[str, str]
    # Variables left out and why, one line each (never a value): a node that could not be read, ...
    notes: tuple[str, ...] = ()


# -- quantities ------------------------------------------------------------------------------------

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``1Gi``, ``1e3``) as an exact number."""
    match = _QUANTITY.fullmatch(text.strip())
    if not match:
        raise EnvError(f"{text!r} is not a resource quantity")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        raise EnvError(f"{text!r} is not a resource quantity") from None
    suffix = match.group(2) or ""
    if suffix in _BINARY:
        return number * (Decimal(1024) ** _BINARY[suffix])
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    return number.scaleb(int(suffix[1:]))


def _ceil(value: Decimal) -> int:
    return math.ceil(value)


def resource_value(resource: str, quantity: str | None, divisor: str | None) -> str:
    """The downward API's rendering: CPU in whole divisor units of milli-CPU, the rest in bytes,
    both rounded up (``resource.ExtractContainerResourceValue``). An absent quantity is 0."""
    amount = parse_quantity(quantity) if quantity else Decimal(0)
    div = parse_quantity(divisor) if divisor else Decimal(0)
    if div == 0:
        div = Decimal(1)
    if resource.endswith(".cpu"):
        return str(_ceil(Decimal(_ceil(amount * 1000)) / Decimal(_ceil(div * 1000))))
    return str(_ceil(Decimal(_ceil(amount)) / Decimal(_ceil(div))))


_RESOURCES = (
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
)


def _container_resource(
    selector: JSON, pod: JSON, container: JSON, allocatable: Mapping[str, str] | None
) -> tuple[str | None, str | None]:
    """(value, note): note says why there is no value."""
    resource = str(selector.get("resource") or "")
    name = selector.get("containerName")
    if name:
        spec = pod.get("spec") or {}
        found = [c for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])] if c["name"] == name]
        if not found:
            raise EnvError(f"resourceFieldRef names container {name!r}, which the pod does not have")
        container = found[0]
    kind, _, what = resource.partition(".")
    if resource not in _RESOURCES and not (kind in ("limits", "requests") and what.startswith("hugepages-")):
        raise EnvError(f"unsupported container resource {resource!r}")
    given = ((container.get("resources") or {}).get(kind) or {}).get(what)
    if kind == "limits" and not what.startswith("hugepages-") and (not given or parse_quantity(given) == 0):
        # No limit: the kubelet uses what the node can allocate.
        if allocatable is None:
            return None, f"{resource} is not set, so the value is the node's allocatable, which could not be read"
        given = allocatable.get(what)
    return resource_value(resource, given, selector.get("divisor")), None


# -- the downward API's fields ---------------------------------------------------------------------


def _format_map(values: Mapping[str, str]) -> str:
    """``key="value"`` lines, sorted, values quoted as Go's strconv.Quote does for printable text."""
    return "\n".join(f"{k}={_go_quote(values[k])}" for k in sorted(values))


def _go_quote(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


_SUBSCRIPT = re.compile(r"(metadata\.(?:labels|annotations))\['(.+)'\]")


def field_value(path: str, pod: JSON) -> str:
    """A ``fieldRef.fieldPath`` of the pod."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    pod_ips = [str(ip.get("ip")) for ip in status.get("podIPs") or [] if ip.get("ip")] or (
        [str(status["podIP"])] if status.get("podIP") else []
    )
    host_ips = [str(ip.get("ip")) for ip in status.get("hostIPs") or [] if ip.get("ip")] or (
        [str(status["hostIP"])] if status.get("hostIP") else []
    )
    subscripted = _SUBSCRIPT.fullmatch(path)
    if subscripted:
        which = "labels" if subscripted.group(1).endswith("labels") else "annotations"
        return str((meta.get(which) or {}).get(subscripted.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": pod_ips[0] if pod_ips else "",
        "status.podIPs": ",".join(pod_ips),
        "status.hostIP": host_ips[0] if host_ips else "",
        "status.hostIPs": ",".join(host_ips),
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        return _format_map(meta.get(path.partition(".")[2]) or {})
    raise EnvError(f"unsupported fieldPath {path!r}")


# -- services --------------------------------------------------------------------------------------


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def _has_cluster_ip(service: JSON) -> bool:
    ip = (service.get("spec") or {}).get("clusterIP")
    return bool(ip) and ip != "None"


def _join_host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def service_variables(services: Iterable[JSON], namespace: str, enable_links: bool) -> dict[str, str]:
    """The kubelet's service variables for a pod in ``namespace``: ``default``'s ``kubernetes``
    Service always, the namespace's other Services only with service links on."""
    chosen: dict[str, JSON] = {}
    for service in services:
        meta = service.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not _has_cluster_ip(service):
            continue
        if meta.get("namespace") == MASTER_NAMESPACE and name in MASTER_SERVICES:
            chosen.setdefault(name, service)
        elif meta.get("namespace") == namespace and enable_links:
            chosen[name] = service
    variables: dict[str, str] = {}
    for name, service in sorted(chosen.items()):
        spec = service.get("spec") or {}
        ports = spec.get("ports") or []
        if not ports:
            continue
        ip = str(spec["clusterIP"])
        prefix = _env_name(name)
        variables[f"{prefix}_SERVICE_HOST"] = ip
        variables[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                variables[f"{prefix}_SERVICE_PORT_{_env_name(port['name'])}"] = str(port["port"])
        for index, port in enumerate(ports):
            protocol = str(port.get("protocol") or "TCP")
            url = f"{protocol.lower()}://{_join_host_port(ip, int(port['port']))}"
            if index == 0:
                variables[f"{prefix}_PORT"] = url
            base = f"{prefix}_PORT_{port['port']}_{protocol.upper()}"
            variables[base] = url
            variables[f"{base}_PROTO"] = protocol.lower()
            variables[f"{base}_PORT"] = str(port["port"])
            variables[f"{base}_ADDR"] = ip
    return variables


# -- $(VAR) expansion ------------------------------------------------------------------------------


def expand(text: str, *sources: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is ``$``; ``$(NAME)`` is the first source's value,
    else left as written; an unclosed ``$(`` and a ``$`` before anything else stay as they are."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            for source in sources:
                if name in source:
                    out.append(source[name])
                    break
            else:
                out.append(f"$({name})")
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


# -- the container ---------------------------------------------------------------------------------


def pod_hostname(pod: JSON) -> str:
    """The host name the runtime gives the pod's containers: ``spec.hostname``, else the pod's
    name cut to 63 characters (without a trailing ``-`` or ``.``)."""
    spec = pod.get("spec") or {}
    if spec.get("hostname"):
        return str(spec["hostname"])
    name = str((pod.get("metadata") or {}).get("name") or "")
    return name[:_HOSTNAME_MAX].rstrip("-.") if len(name) > _HOSTNAME_MAX else name


def find_container(pod: JSON, name: str) -> JSON:
    spec = pod.get("spec") or {}
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if container.get("name") == name:
            return dict(container)
    raise EnvError(f"the pod has no container {name!r}")


def default_container(pod: JSON) -> str:
    """The container ``kubectl exec`` picks: the ``kubectl.kubernetes.io/default-container``
    annotation when it names one of the pod's containers, else the first."""
    spec = pod.get("spec") or {}
    names = [str(c.get("name")) for c in spec.get("containers") or []]
    wanted = ((pod.get("metadata") or {}).get("annotations") or {}).get("kubectl.kubernetes.io/default-container")
    if wanted in names:
        return str(wanted)
    if not names:
        raise EnvError("the pod has no containers")
    return names[0]


def secret_text(value: str) -> str:
    """A Secret's base64 ``data`` value as the text a process gets (non-UTF-8 bytes kept as in os.environ)."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise EnvError("a Secret value is not valid base64") from None


def _source_data(kind: str, obj: JSON) -> dict[str, str]:
    data = obj.get("data") or {}
    if kind == "Secret":
        return {str(k): secret_text(str(v)) for k, v in data.items()}
    return {str(k): str(v) for k, v in data.items()}


def referenced(container: JSON) -> tuple[set[str], set[str]]:
    """The ConfigMaps and Secrets the container's environment names (to fetch them first)."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    for source in container.get("envFrom") or []:
        if source.get("configMapRef"):
            config_maps.add(str(source["configMapRef"]["name"]))
        if source.get("secretRef"):
            secrets.add(str(source["secretRef"]["name"]))
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        if value_from.get("configMapKeyRef"):
            config_maps.add(str(value_from["configMapKeyRef"]["name"]))
        if value_from.get("secretKeyRef"):
            secrets.add(str(value_from["secretKeyRef"]["name"]))
    return config_maps, secrets


def needs_node(container: JSON) -> bool:
    """Whether a ``limits.*`` variable of the container may need the node's allocatable."""
    return any(
        str(((var.get("valueFrom") or {}).get("resourceFieldRef") or {}).get("resource", "")).startswith("limits.")
        for var in container.get("env") or []
    )


def container_env(pod: JSON, container_name: str, objects: Objects) -> PodEnv:
    """The environment the kubelet and the runtime give ``container_name`` of ``pod``."""
    container = find_container(pod, container_name)
    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    links = (pod.get("spec") or {}).get("enableServiceLinks") is not False
    services = service_variables(objects.services, namespace, links)
    declared: dict[str, str] = {}
    notes: list[str] = []

    def lookup(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        found = (objects.config_maps if kind == "ConfigMap" else objects.secrets).get(name)
        if found is None:
            if optional:
                return None
            raise EnvError(f"{kind} {namespace}/{name} not found")
        return _source_data(kind, found)

    for source in container.get("envFrom") or []:
        kind, source_ref = (
            ("ConfigMap", source["configMapRef"]) if source.get("configMapRef") else ("Secret", source.get("secretRef"))
        )
        if not source_ref:
            continue
        data = lookup(kind, str(source_ref["name"]), bool(source_ref.get("optional")))
        prefix = str(source.get("prefix") or "")
        for key, value in (data or {}).items():
            declared[prefix + key] = value

    for var in container.get("env") or []:
        name = str(var["name"])
        value = var.get("value") or ""
        value_from = var.get("valueFrom") or {}
        if value:
            value = expand(value, declared, services)
        elif value_from.get("fieldRef"):
            value = field_value(str(value_from["fieldRef"]["fieldPath"]), pod)
        elif value_from.get("resourceFieldRef"):
            result, note = _container_resource(value_from["resourceFieldRef"], pod, container, objects.node_allocatable)
            if result is None:
                notes.append(f"{name}: left out: {note}")
                continue
            value = result
        elif value_from.get("configMapKeyRef") or value_from.get("secretKeyRef"):
            kind = "ConfigMap" if value_from.get("configMapKeyRef") else "Secret"
            ref: JSON = value_from.get("configMapKeyRef") or value_from["secretKeyRef"]
            optional = bool(ref.get("optional"))
            data = lookup(kind, str(ref["name"]), optional)
            if data is None:
                continue
            key = str(ref["key"])
            if key not in data:
                if optional:
                    continue
                raise EnvError(f"{name}: no key {key!r} in {kind} {namespace}/{ref['name']}")
            value = data[key]
        elif value_from.get("fileKeyRef"):
            notes.append(f"{name}: left out: fileKeyRef (an alpha feature) is not supported")
            continue
        declared[name] = value

    values = {"HOSTNAME": pod_hostname(pod), **services, **declared}
    return PodEnv(values, tuple(notes))
