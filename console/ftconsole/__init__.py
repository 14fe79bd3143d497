"""The finetune console (import name ``ftconsole``; the source folder is ``console/ftconsole/``).

A small web server that shows FineTuneRuns (state, stages, metric history, samples) and records
human preference labels as ``PreferenceLabel`` custom resources. Layers, bottom to top:

1. pure core -- ``labels`` (the PreferenceLabel model, its CRD, JSON Lines conversion),
   ``history`` (the bounded metric history the trainer writes), ``authz`` (which access
   review each page needs), ``pages`` (HTML rendering, every text escaped): no I/O, no clock.
2. ``kube`` -- the only module that talks to the Kubernetes API.
3. ``server`` (HTTP handlers: authenticate, authorise, fetch, render) and ``cli``
   (``python -m ftconsole serve | labels export | labels import``).
"""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
LABEL_KIND = "PreferenceLabel"
LABEL_PLURAL = "preferencelabels"
LABEL_SINGULAR = "preferencelabel"
LABEL_SHORT_NAME = "pl"
API_VERSION = f"{GROUP}/{VERSION}"
