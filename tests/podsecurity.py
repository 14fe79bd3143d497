"""The Pod Security Standards "restricted" profile as a checker of a pod spec, rule by rule.

Written from the published profile (kubernetes.io/docs/concepts/security/pod-security-standards,
policy version "latest", Kubernetes 1.30): every baseline control, then the controls restricted
adds. Each returned problem names the field, so a failing test says which rule broke.
Used by tests/operator/test_pod_security.py (stage pods) and tests/chart (the operator Deployment).
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

RULES = (
    "HostProcess", "Host Namespaces", "Privileged Containers", "Capabilities (baseline)", "HostPath Volumes",
    "Host Ports", "AppArmor", "SELinux", "/proc Mount Type", "Seccomp (baseline)", "Sysctls",
    "Volume Types", "Privilege Escalation", "Running as Non-root", "Running as Non-root user",
    "Seccomp (restricted)", "Capabilities (restricted)",
)
"""Every control of the profile; restricted_violations checks each (a test holds the count)."""


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(spec.get(kind) or []):
            found.append((f"spec.{kind}[{index}]", container))
    return found


def restricted_violations(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every way a pod spec (and its annotations) breaks Pod Security "restricted"; [] when it complies."""
    problems: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    containers = _containers(spec)

    def each_context():
        yield "spec.securityContext", pod_sc
        for path, container in containers:
            yield f"{path}.securityContext", container.get("securityContext") or {}

    # HostProcess
    for path, sc in each_context():
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{path}.windowsOptions.hostProcess: must be unset or false")
    # Host Namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"spec.{field}: must be unset or false")
    # Privileged Containers
    for path, container in containers:
        if (container.get("securityContext") or {}).get("privileged"):
            problems.append(f"{path}.securityContext.privileged: must be unset or false")
    # Capabilities (baseline) and (restricted)
    for path, container in containers:
        capabilities = (container.get("securityContext") or {}).get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if added - BASELINE_CAPABILITIES:
            problems.append(f"{path}.securityContext.capabilities.add: {sorted(added - BASELINE_CAPABILITIES)} "
                            "beyond the baseline set")
        if added - {"NET_BIND_SERVICE"}:
            problems.append(f"{path}.securityContext.capabilities.add: only NET_BIND_SERVICE may be added")
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{path}.securityContext.capabilities.drop: must include ALL")
    # HostPath Volumes and Volume Types
    for index, volume in enumerate(spec.get("volumes") or []):
        sources = set(volume) - {"name"}
        if "hostPath" in sources:
            problems.append(f"spec.volumes[{index}].hostPath: forbidden")
        if not sources or sources - RESTRICTED_VOLUME_TYPES:
            problems.append(f"spec.volumes[{index}]: type {sorted(sources)} not in {sorted(RESTRICTED_VOLUME_TYPES)}")
    # Host Ports
    for path, container in containers:
        for index, port in enumerate(container.get("ports") or []):
            if port.get("hostPort"):
                problems.append(f"{path}.ports[{index}].hostPort: must be unset or 0")
    # AppArmor
    for path, sc in each_context():
        profile = (sc.get("appArmorProfile") or {}).get("type")
        if profile not in (None, "RuntimeDefault", "Localhost"):
            problems.append(f"{path}.appArmorProfile.type: {profile!r} not RuntimeDefault or Localhost")
    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
            problems.append(f"metadata.annotations[{key}]: {value!r} not runtime/default or localhost/*")
    # SELinux
    for path, sc in each_context():
        options = sc.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            problems.append(f"{path}.seLinuxOptions.type: {options['type']!r} not allowed")
        for field in ("user", "role"):
            if options.get(field):
                problems.append(f"{path}.seLinuxOptions.{field}: must be unset")
    # /proc Mount Type
    for path, container in containers:
        mount = (container.get("securityContext") or {}).get("procMount")
        if mount not in (None, "Default"):
            problems.append(f"{path}.securityContext.procMount: must be unset or Default")
    # Seccomp (baseline): never Unconfined; (restricted): RuntimeDefault or Localhost, pod-wide or per container
    for path, sc in each_context():
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{path}.seccompProfile.type: must not be Unconfined")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for path, container in containers:
        seccomp = ((container.get("securityContext") or {}).get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{path}.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost "
                            "(here or in spec.securityContext)")
    # Sysctls
    for index, sysctl in enumerate(pod_sc.get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls[{index}]: {sysctl.get('name')!r} is not a safe sysctl")
    # Privilege Escalation
    for path, container in containers:
        if (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{path}.securityContext.allowPrivilegeEscalation: must be false")
    # Running as Non-root: pod-wide true, or every container true; no container may say false
    for path, container in containers:
        non_root = (container.get("securityContext") or {}).get("runAsNonRoot")
        if non_root is False or (non_root is None and pod_sc.get("runAsNonRoot") is not True):
            problems.append(f"{path}.securityContext.runAsNonRoot: must be true (here or in spec.securityContext)")
    if pod_sc.get("runAsNonRoot") is False:
        problems.append("spec.securityContext.runAsNonRoot: must not be false")
    # Running as Non-root user
    for path, sc in each_context():
        if sc.get("runAsUser") == 0:
            problems.append(f"{path}.runAsUser: must not be 0")
    return problems
