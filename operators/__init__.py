"""The Sluice operator: scales each curation stage's pods on Kafka consumer lag.

A ``SluicePipeline`` custom resource lists the stages; for each the operator owns one
Deployment and one Service, reads the stage's consumer lag from the broker, and sets the
Deployment's replicas from a pure plan (``operators.planner``). See DESIGN.md.

Layout: ``crd`` (the resource's typed spec), ``planner`` (policy, pure), ``desired``
(the objects a stage should have, pure), ``lag`` (Kafka offsets), ``actuator`` (Kubernetes
API calls), ``reconcile`` (one pass over a pipeline), ``handlers`` (kopf wiring),
``metrics``, ``settings``; ``python -m operators`` runs it.
"""

GROUP = "sluice.dev"
VERSION = "v1alpha1"
PLURAL = "sluicepipelines"
KIND = "SluicePipeline"
API_VERSION = f"{GROUP}/{VERSION}"
