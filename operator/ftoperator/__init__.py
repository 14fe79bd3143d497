"""The FineTuneRun operator (import name ``ftoperator``; the source folder is ``operator/ftoperator/``).

Layers, bottom to top (each imports only from the layers below it):

1. pure core -- ``api`` (the CRD's pydantic models), ``podapi`` (the Pod API
   subset of ``spec.podTemplate``), ``naming``, ``conditions``, ``stageplan``
   (which stages run, with which inputs), ``validation``, ``builders``,
   ``observe``, ``decide``, ``progress``,
   ``crdgen``: no I/O, no clock, no Kubernetes client; time is passed in.
2. ``kubeapi`` -- the only module that talks to the Kubernetes API.
3. ``reconciler`` (fetch -> decide -> apply) and ``metrics``.
4. ``handlers`` (kopf decorators, thin) and ``__main__`` (flags, ``kopf.run``).
"""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneRun"
PLURAL = "finetuneruns"
SINGULAR = "finetunerun"
SHORT_NAME = "ftr"
API_VERSION = f"{GROUP}/{VERSION}"
