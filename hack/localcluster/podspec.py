"""Pure functions from a pod (as a camelCase dict) to what the node agent needs.

Nothing here talks to the API or starts processes: reads of ConfigMaps and
Secrets are passed in as callables, and time is passed in as a string.
"""

import re

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80

_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class MissingReference(Exception):
    """A non-optional ConfigMap/Secret (or key) is not there yet; the pod must wait."""


def expand(text: str, env: dict) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


def field_ref_value(pod: dict, field_path: str) -> str:
    """Value of a downward-API fieldRef. The pod IP is the host's loopback address."""
    metadata, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if field_path in simple:
        return simple[field_path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
    if match:
        return (metadata.get(match.group(1)) or {}).get(match.group(2), "")
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(field_path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    raise ValueError(f"fieldRef {field_path!r} is not supported by the local node agent")


def _lookup(read, namespace: str, ref: dict, what: str) -> "str | None":
    value = read(namespace, ref["name"], ref["key"])
    if value is None and not ref.get("optional"):
        raise MissingReference(f"{what} {namespace}/{ref['name']} key {ref['key']!r}")
    return value


def container_env(pod: dict, container: dict, *, base_env: dict, read_config_map, read_secret) -> dict:
    """The container's environment: base_env, then envFrom, then env (later wins).

    read_config_map / read_secret: (namespace, name, key) -> str, or None when
    missing; key=None asks for the whole {key: value} dict (None when missing).
    Raises MissingReference for a missing non-optional reference.
    """
    namespace = pod["metadata"]["namespace"]
    env = dict(base_env)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, read in (("configMapRef", read_config_map), ("secretRef", read_secret)):
            ref = source.get(kind)
            if ref:
                values = read(namespace, ref["name"], None)
                if values is None and not ref.get("optional"):
                    raise MissingReference(f"{kind} {namespace}/{ref['name']}")
                env.update({prefix + k: v for k, v in (values or {}).items()})
    for variable in container.get("env") or []:
        name = variable["name"]
        if "value" in variable and variable["value"] is not None:
            env[name] = expand(variable["value"], env)
            continue
        source = variable.get("valueFrom") or {}
        value = None
        if "fieldRef" in source:
            value = field_ref_value(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source:
            value = _lookup(read_config_map, namespace, source["configMapKeyRef"], "ConfigMap")
        elif "secretKeyRef" in source:
            value = _lookup(read_secret, namespace, source["secretKeyRef"], "Secret")
        elif "resourceFieldRef" in source:
            value = resource_field_value(container, source["resourceFieldRef"])
        env[name] = "" if value is None else value
    return env


def resource_field_value(container: dict, ref: dict) -> str:
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    return str((resources.get(kind) or {}).get(resource, "0"))


def container_argv(container: dict, env: dict) -> list:
    """command + args with `$(VAR)` expanded; empty when the container relies on its image."""
    return [expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]


def termination_message(*, message_file: str, log_tail: str, exit_code: int, policy: str) -> str:
    """What goes in state.terminated.message, like the kubelet."""
    message = message_file[-MAX_TERMINATION_MESSAGE_BYTES:]
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        lines = log_tail.splitlines()[-FALLBACK_LOG_LINES:]
        message = "\n".join(lines)[-MAX_TERMINATION_MESSAGE_BYTES:]
    return message


def terminated_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def should_restart(*, restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def finished_phase(exit_codes: list) -> str:
    return "Succeeded" if all(code == 0 for code in exit_codes) else "Failed"


def condition(kind: str, status: bool, *, now: str, reason: str = None) -> dict:
    entry = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
             "lastTransitionTime": now}
    if reason:
        entry["reason"] = reason
    return entry
