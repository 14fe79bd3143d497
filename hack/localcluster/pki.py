"""Certificates and keys for a throwaway control plane (pure: returns PEM bytes).

One self-signed CA signs the API server's serving certificate and, for a real
node, the identities of the kubelet (client `system:node:<name>` in
`system:nodes`, for the Node authorizer; serving, for logs/exec), of the API
server towards the kubelet and of kube-proxy (`system:kube-proxy`, bound by the
default RBAC to `system:node-proxier`). A separate RSA key pair signs
service-account tokens. Nothing here touches the filesystem.
"""

import dataclasses
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

SERVICE_IP = "10.0.0.1"  # first address of --service-cluster-ip-range
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclasses.dataclass(frozen=True)
class ClusterPKI:
    ca_cert: bytes
    ca_key: bytes
    apiserver_cert: bytes
    apiserver_key: bytes
    service_account_key: bytes  # private, PKCS#8 PEM
    service_account_pub: bytes
    # identity -> (certificate PEM, key PEM); see `node_identities`
    identities: dict = dataclasses.field(default_factory=dict)


def node_identities(node_name: str, node_ip: str) -> dict:
    """What a real node needs signed: identity -> (common name, organizations, IP SANs, DNS SANs)."""
    return {
        "kubelet-client": (f"system:node:{node_name}", ("system:nodes",), (), ()),
        "kubelet-serving": (f"system:node:{node_name}", ("system:nodes",), (node_ip,), (node_name,)),
        "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ("system:masters",), (), ()),
        "kube-proxy": ("system:kube-proxy", (), (), ()),
    }


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(*, subject: str, issuer_name, public_key, signing_key, now, ca: bool, sans=(),
                 organizations=()):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]
                     + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def generate(*, now: datetime.datetime, apiserver_ips=(), identities=None) -> ClusterPKI:
    """Generate a fresh CA, an API-server serving pair and a service-account key pair.

    apiserver_ips: extra IP SANs of the API server (the address pods reach it on);
    identities: name -> (common name, organizations, IP SANs, DNS SANs), each
    signed by the CA (`node_identities` gives a real node's).
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(
        subject="localcluster-ca", issuer_name=None, public_key=ca_key.public_key(),
        signing_key=ca_key, now=now, ca=True,
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(ip))
            for ip in ("127.0.0.1", SERVICE_IP, *apiserver_ips)]
    sans += [x509.DNSName(dns) for dns in APISERVER_DNS_NAMES]
    server_cert = _certificate(
        subject="kube-apiserver", issuer_name=ca_cert.subject,
        public_key=server_key.public_key(), signing_key=ca_key, now=now, ca=False, sans=sans,
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed = {}
    for name, (common_name, organizations, ips, dns_names) in (identities or {}).items():
        key = ec.generate_private_key(ec.SECP256R1())
        identity_sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        identity_sans += [x509.DNSName(dns) for dns in dns_names]
        cert = _certificate(
            subject=common_name, issuer_name=ca_cert.subject, public_key=key.public_key(),
            signing_key=ca_key, now=now, ca=False, sans=identity_sans, organizations=organizations,
        )
        signed[name] = (cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))
    return ClusterPKI(
        identities=signed,
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key=_pem_key(ca_key),
        apiserver_cert=server_cert.public_bytes(serialization.Encoding.PEM),
        apiserver_key=_pem_key(server_key),
        service_account_key=_pem_key(sa_key),
        service_account_pub=sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
