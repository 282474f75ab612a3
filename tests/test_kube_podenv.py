"""A container's environment from its pod spec, as the kubelet makes it (pure; ktrace/kube/podenv.py)."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import pytest

from ktrace.kube import podenv
from ktrace.kube.podenv import EnvError, Objects, container_env


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pod(env: list[Any] | None = None, env_from: list[Any] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "x"}
    if env is not None:
        container["env"] = env
    if env_from is not None:
        container["envFrom"] = env_from
    for key in ("resources",):
        if key in spec:
            container[key] = spec.pop(key)
    return {
        "metadata": {
            "name": "web-7d9f-abcde",
            "namespace": "shop",
            "uid": "1234-5678",
            "labels": {"app": "web", "tier": "front"},
            "annotations": {"note": 'say "hi"'},
        },
        "spec": {
            "nodeName": "node-1",
            "serviceAccountName": "web-sa",
            "containers": [container, {"name": "side", "image": "y", "resources": {"limits": {"memory": "64Mi"}}}],
            **spec,
        },
        "status": {
            "podIP": "10.244.0.7",
            "podIPs": [{"ip": "10.244.0.7"}, {"ip": "fd00::7"}],
            "hostIP": "10.250.0.1",
            "hostIPs": [{"ip": "10.250.0.1"}],
        },
    }


CONFIG = {"settings": {"data": {"MODE": "fast", "LEVEL": "3", "url": "http://x"}}}
SECRETS = {"creds": {"data": {"PASSWORD": b64("s3cr3t"), "TOKEN": b64("t0k")}}}


def env_of(p: dict[str, Any], **objects: Any) -> dict[str, str]:
    objects.setdefault("config_maps", CONFIG)
    objects.setdefault("secrets", SECRETS)
    values = container_env(p, "app", Objects(**objects)).values
    values.pop("HOSTNAME")
    return values


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ([{"name": "A", "value": "1"}], {"A": "1"}),
        ([{"name": "A", "value": ""}], {"A": ""}),
        ([{"name": "A"}], {"A": ""}),
        # $(VAR): declared earlier only; unknown ones stay; $$ escapes; a later declaration is not seen.
        ([{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)-$(A)"}], {"A": "x", "B": "x-x"}),
        ([{"name": "B", "value": "$(A)"}, {"name": "A", "value": "x"}], {"A": "x", "B": "$(A)"}),
        ([{"name": "B", "value": "$$(A) $$ $x $( $"}], {"B": "$(A) $ $x $( $"}),
        ([{"name": "B", "value": "$(MODE)"}], {"B": "$(MODE)"}),
        # A later declaration of the same name wins.
        ([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], {"A": "2"}),
    ],
    ids=["literal", "empty", "no-value", "expand", "expand-later", "escapes", "unknown", "redeclared"],
)
def test_literal_values_and_expansion(env: list[dict[str, Any]], expected: dict[str, str]) -> None:
    assert env_of(pod(env)) == expected


def test_value_from_every_source() -> None:
    env = [
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "LABELS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
        {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "MODE"}}},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "PASSWORD"}}},
        {"name": "URL", "value": "$(NAME).$(NS):$(MODE)"},
    ]
    assert env_of(pod(env)) == {
        "NAME": "web-7d9f-abcde",
        "NS": "shop",
        "UID": "1234-5678",
        "APP": "web",
        "NONE": "",
        "NOTE": 'say "hi"',
        "LABELS": 'app="web"\ntier="front"',
        "NODE": "node-1",
        "SA": "web-sa",
        "IP": "10.244.0.7",
        "IPS": "10.244.0.7,fd00::7",
        "HOST": "10.250.0.1",
        "MODE": "fast",
        "PW": "s3cr3t",
        "URL": "web-7d9f-abcde.shop:fast",
    }


def test_env_from_with_prefix_and_order() -> None:
    env_from = [
        {"configMapRef": {"name": "settings"}},
        {"secretRef": {"name": "creds"}, "prefix": "DB_"},
        {"configMapRef": {"name": "settings"}, "prefix": "X_"},
    ]
    env = [{"name": "LEVEL", "value": "9"}, {"name": "C", "value": "$(DB_TOKEN)/$(url)"}]
    assert env_of(pod(env, env_from)) == {
        "MODE": "fast",
        "LEVEL": "9",  # env overrides envFrom
        "url": "http://x",
        "DB_PASSWORD": "s3cr3t",
        "DB_TOKEN": "t0k",
        "X_MODE": "fast",
        "X_LEVEL": "3",
        "X_url": "http://x",
        "C": "t0k/http://x",
    }


@pytest.mark.parametrize(
    "env",
    [
        [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k", "optional": True}}}],
        [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nokey", "optional": True}}}],
        [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}}],
        [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nokey", "optional": True}}}],
    ],
)
def test_optional_references_leave_the_variable_out(env: list[dict[str, Any]]) -> None:
    assert env_of(pod(env, [{"configMapRef": {"name": "gone", "optional": True}}])) == {}


@pytest.mark.parametrize(
    ("env", "env_from", "message"),
    [
        ([{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}], [], "ConfigMap shop/gone"),
        ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nokey"}}}], [], "no key 'nokey'"),
        ([], [{"secretRef": {"name": "gone"}}], "Secret shop/gone not found"),
        ([{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.restartPolicy"}}}], [], "unsupported"),
    ],
)
def test_a_required_reference_that_is_missing_is_an_error(
    env: list[dict[str, Any]], env_from: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(EnvError, match=message) as caught:
        env_of(pod(env, env_from))
    assert "s3cr3t" not in str(caught.value)


def test_secret_values_are_decoded_bytes_as_the_process_gets_them() -> None:
    secrets = {"raw": {"data": {"K": base64.b64encode(b"caf\xc3\xa9 \xff").decode()}}}
    env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "raw", "key": "K"}}}]
    value = env_of(pod(env), secrets=secrets)["K"]
    assert value.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


SERVICES = [
    {
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
    },
    {
        "metadata": {"name": "redis-main", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.3.4", "ports": [{"port": 6379}, {"name": "metrics", "port": 9121}]},
    },
    {
        "metadata": {"name": "dns", "namespace": "shop"},
        "spec": {"clusterIP": "fd00::a", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
    },
    {"metadata": {"name": "headless", "namespace": "shop"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}},
    {"metadata": {"name": "external", "namespace": "shop"}, "spec": {"type": "ExternalName", "ports": [{"port": 1}]}},
    {
        "metadata": {"name": "elsewhere", "namespace": "other"},
        "spec": {"clusterIP": "10.96.9.9", "ports": [{"port": 1}]},
    },
]

KUBERNETES_VARS = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_SERVICE_PORT_HTTPS": "443",
    "KUBERNETES_PORT": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    "KUBERNETES_PORT_443_TCP_PORT": "443",
    "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1",
}


def test_service_links() -> None:
    assert podenv.service_variables(SERVICES, "shop", enable_links=True) == {
        **KUBERNETES_VARS,
        "REDIS_MAIN_SERVICE_HOST": "10.96.3.4",
        "REDIS_MAIN_SERVICE_PORT": "6379",
        "REDIS_MAIN_SERVICE_PORT_METRICS": "9121",
        "REDIS_MAIN_PORT": "tcp://10.96.3.4:6379",
        "REDIS_MAIN_PORT_6379_TCP": "tcp://10.96.3.4:6379",
        "REDIS_MAIN_PORT_6379_TCP_PROTO": "tcp",
        "REDIS_MAIN_PORT_6379_TCP_PORT": "6379",
        "REDIS_MAIN_PORT_6379_TCP_ADDR": "10.96.3.4",
        "REDIS_MAIN_PORT_9121_TCP": "tcp://10.96.3.4:9121",
        "REDIS_MAIN_PORT_9121_TCP_PROTO": "tcp",
        "REDIS_MAIN_PORT_9121_TCP_PORT": "9121",
        "REDIS_MAIN_PORT_9121_TCP_ADDR": "10.96.3.4",
        "DNS_SERVICE_HOST": "fd00::a",
        "DNS_SERVICE_PORT": "53",
        "DNS_SERVICE_PORT_DNS": "53",
        "DNS_PORT": "udp://[fd00::a]:53",
        "DNS_PORT_53_UDP": "udp://[fd00::a]:53",
        "DNS_PORT_53_UDP_PROTO": "udp",
        "DNS_PORT_53_UDP_PORT": "53",
        "DNS_PORT_53_UDP_ADDR": "fd00::a",
    }
    # Without service links, the kubernetes Service's variables stay: in-cluster clients need them.
    assert podenv.service_variables(SERVICES, "shop", enable_links=False) == KUBERNETES_VARS


def test_declared_variables_win_over_service_variables_and_can_use_them() -> None:
    env = [
        {"name": "KUBERNETES_SERVICE_PORT", "value": "8443"},
        {"name": "API", "value": "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"},
    ]
    values = env_of(pod(env, enableServiceLinks=False), services=SERVICES)
    assert values["KUBERNETES_SERVICE_PORT"] == "8443"
    # Expansion sees the declared value first, then the service variables.
    assert values["API"] == "https://10.96.0.1:8443"
    assert "REDIS_MAIN_SERVICE_HOST" not in values
    assert "REDIS_MAIN_SERVICE_HOST" in env_of(pod(env), services=SERVICES)


@pytest.mark.parametrize(
    ("name", "pod_spec", "expected"),
    [
        ("web-1", {}, "web-1"),
        ("web-1", {"hostname": "db-0"}, "db-0"),
        ("a" * 62 + "-b", {}, "a" * 62),  # cut to 63 characters, trailing '-' dropped
    ],
)
def test_hostname(name: str, pod_spec: dict[str, Any], expected: str) -> None:
    p = pod(**pod_spec)
    p["metadata"]["name"] = name
    assert container_env(p, "app", Objects()).values["HOSTNAME"] == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Decimal(1)),
        ("500m", Decimal("0.5")),
        ("1.5", Decimal("1.5")),
        ("2Ki", Decimal(2048)),
        ("1Gi", Decimal(1024**3)),
        ("1G", Decimal(10**9)),
        ("1e3", Decimal(1000)),
        ("100n", Decimal("0.0000001")),
    ],
)
def test_quantities(text: str, value: Decimal) -> None:
    assert podenv.parse_quantity(text) == value


@pytest.mark.parametrize(
    ("resource", "divisor", "expected"),
    [
        ("limits.cpu", None, "2"),  # 1500m rounded up to whole CPUs
        ("limits.cpu", "1m", "1500"),
        ("requests.cpu", "100m", "3"),  # 250m in units of 100m, rounded up
        ("limits.memory", None, str(512 * 1024**2)),
        ("limits.memory", "1Mi", "512"),
        ("requests.memory", "1M", "269"),  # 256Mi = 268.4 MB, rounded up
        ("requests.ephemeral-storage", None, "0"),  # not set: 0
    ],
)
def test_resource_field_ref(resource: str, divisor: str | None, expected: str) -> None:
    ref: dict[str, Any] = {"resource": resource}
    if divisor:
        ref["divisor"] = divisor
    resources = {"limits": {"cpu": "1500m", "memory": "512Mi"}, "requests": {"cpu": "250m", "memory": "256Mi"}}
    env = [{"name": "V", "valueFrom": {"resourceFieldRef": ref}}]
    assert env_of(pod(env, resources=resources)) == {"V": expected}


def test_an_unset_limit_is_the_nodes_allocatable() -> None:
    env = [
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "SIDE", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "containerName": "side"}}},
    ]
    with_node = env_of(pod(env), node_allocatable={"cpu": "3800m", "memory": "8Gi"})
    assert with_node == {"CPU": "4", "SIDE": str(64 * 1024**2)}
    result = container_env(pod(env), "app", Objects())
    assert "CPU" not in result.values and result.values["SIDE"] == str(64 * 1024**2)
    assert result.notes == (
        "CPU: left out: limits.cpu is not set, so the value is the node's allocatable, which could not be read",
    )


def test_referenced_objects_and_default_container() -> None:
    p = pod(
        [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "one", "key": "k"}}},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "two", "key": "k"}}},
        ],
        [{"configMapRef": {"name": "three"}}, {"secretRef": {"name": "four"}}],
    )
    assert podenv.referenced(podenv.find_container(p, "app")) == ({"one", "three"}, {"two", "four"})
    assert podenv.default_container(p) == "app"
    p["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "side"
    assert podenv.default_container(p) == "side"
    p["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "nonexistent"
    assert podenv.default_container(p) == "app"
