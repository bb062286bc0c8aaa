"""The Sluice operator: scales each curation stage's pods on Kafka consumer lag.

The chart renders every stage Deployment; for an autoscaled stage it also renders a
``SluiceScaler`` pointing at it (``scaleTargetRef``, as a KEDA ScaledObject or an HPA does).
The operator reads the lag of the consumer group the stage registry names for that stage,
plans replicas with a pure policy (``operators.planner``) and sets them through the
Deployment's scale subresource. It renders nothing. See DESIGN.md.

Layout: ``crd`` (the resource's typed spec and status), ``planner`` (policy, pure), ``lag``
(which group, and its offsets), ``actuator`` (the two Kubernetes calls), ``reconcile`` (one
pass over a scaler), ``handlers`` (kopf wiring), ``metrics``, ``settings``;
``python -m operators`` runs it.
"""

GROUP = "sluice.dev"
VERSION = "v1alpha1"
PLURAL = "sluicescalers"
KIND = "SluiceScaler"
API_VERSION = f"{GROUP}/{VERSION}"
