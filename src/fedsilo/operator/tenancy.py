"""Pure: what a FederatedJob may ask of the cluster (the operator must not be a confused deputy).

Whoever may create a FederatedJob chooses silo namespaces, data volumes and the aggregator
image, and the operator acts on them with its own rights. `TenancyPolicy.check` lists what
a job asks for that the operator's settings do not allow; a job with problems gets no new
children, and `admission_patch` turns the verdict into the condition `Admitted`, the phase
and the Events. The hub chart's ValidatingAdmissionPolicy mirrors these rules (the namespace
label opt-in excepted: CEL cannot read another namespace's labels). `working_namespaces` is
where the operator's rights are when it watches only some namespaces.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fedsilo.operator import naming
from fedsilo.operator.status import Event, condition
from fedsilo.spec import FederatedJob

if TYPE_CHECKING:
    from fedsilo.operator.settings import OperatorSettings

__all__ = [
    "ADMITTED",
    "TenancyPolicy",
    "admission_patch",
    "image_repository",
    "never_admitted",
    "split_list",
    "working_namespaces",
]

ADMITTED = "Admitted"
REFUSED = "Refused"  # never admitted: no children, the job is Failed until its spec is fixed
CHANGE_REFUSED = "ChangeRefused"  # admitted before: it runs on as last admitted, nothing new is created

# A tag or a digest after the repository: "repo:tag" or "repo@sha256:..." (or both).
_TAG = r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?"


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated setting as a tuple (blanks dropped)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def working_namespaces(settings: OperatorSettings) -> tuple[str, ...]:
    """The namespaces the operator writes to when it watches only some: the watched ones and the
    silo allow-list (its RBAC is Roles there). Empty: the whole cluster (cluster-wide mode, or a
    glob that cannot be enumerated)."""
    names = (*settings.namespaces(), *split_list(settings.silo_namespaces))
    if not settings.namespaces() or any(c in name for name in names for c in "*?["):
        return ()
    return tuple(dict.fromkeys(names))


def image_repository(image: str) -> str:
    """`ghcr.io/fedsilo/fedsilo:0.1.0` -> `ghcr.io/fedsilo/fedsilo` (a registry port is kept)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _label(selector: str) -> tuple[str, str | None] | None:
    """`key=value` -> (key, value); `key` -> (key, None): any value; empty -> None (no opt-in)."""
    if not selector.strip():
        return None
    key, sep, value = selector.strip().partition("=")
    return key.strip(), value.strip() if sep else None


@dataclass(frozen=True)
class TenancyPolicy:
    """Where a job's silos may run, what they may mount, which aggregator image may run.

    silo_namespaces: globs of namespaces (besides the job's own) open to any job's silos.
    namespace_label: (key, value or None for any value) a namespace carries to opt in; None: off.
    allow_host_path: hostPath data volumes allowed at all.
    allow_writable_data: PVC or hostPath data mounted read-write allowed.
    own_repository: the operator's image repository (any tag or digest is allowed).
    images: more allowed aggregator images, globs over the whole reference.
    """

    silo_namespaces: tuple[str, ...] = ()
    namespace_label: tuple[str, str | None] | None = None
    allow_host_path: bool = False
    allow_writable_data: bool = False
    own_repository: str = ""
    images: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> TenancyPolicy:
        return cls(
            silo_namespaces=split_list(settings.silo_namespaces),
            namespace_label=_label(settings.silo_namespace_label),
            allow_host_path=settings.allow_host_path,
            allow_writable_data=settings.allow_writable_data,
            own_repository=image_repository(settings.image),
            images=split_list(settings.aggregator_images),
        )

    def listed(self, namespace: str) -> bool:
        """Whether the allow-list opens `namespace` to every job's silos."""
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.silo_namespaces)

    def labels_needed(self, job: FederatedJob) -> list[str]:
        """Silo namespaces whose labels decide (not the job's own, not listed); empty when the
        label opt-in is off. The caller reads these namespaces' labels for `check`."""
        if self.namespace_label is None:
            return []
        own = naming.job_namespace(job)
        wanted = {naming.silo_namespace(job, s) for s in job.spec.silos}
        return sorted(ns for ns in wanted if ns != own and not self.listed(ns))

    def opted_in(self, labels: Mapping[str, str] | None) -> bool:
        """Whether a namespace's labels carry the opt-in label (None: the namespace is missing)."""
        if self.namespace_label is None or labels is None:
            return False
        key, value = self.namespace_label
        return key in labels and (value is None or labels[key] == value)

    def image_allowed(self, image: str) -> bool:
        if self.own_repository and re.fullmatch(re.escape(self.own_repository) + _TAG, image):
            return True
        return any(fnmatch.fnmatchcase(image, pattern) for pattern in self.images)

    def check(self, job: FederatedJob, namespace_labels: Mapping[str, Mapping[str, str] | None]) -> list[str]:
        """What `job` asks for that this policy refuses, one sentence each (empty: admitted).

        `namespace_labels` holds the labels of the namespaces `labels_needed` named (None or
        absent: the namespace does not exist).
        """
        problems: list[str] = []
        own = naming.job_namespace(job)
        for silo in job.spec.silos:
            namespace = naming.silo_namespace(job, silo)
            if namespace != own and not self.listed(namespace) and not self.opted_in(namespace_labels.get(namespace)):
                problems.append(f"silo {silo.name}: namespace {namespace} is not open to fedsilo silos ({self._how()})")
            volume = silo.volume
            if volume is None or silo.external:
                continue
            if volume.host_path is not None and not self.allow_host_path:
                problems.append(
                    f"silo {silo.name}: hostPath volumes are refused (a node's files are no silo's data): "
                    "use a persistentVolumeClaim, or ask the operator's administrator for allowHostPath"
                )
            if not volume.read_only and not volume.empty_dir and not self.allow_writable_data:
                problems.append(
                    f"silo {silo.name}: the data volume must be mounted read-only: set volume.readOnly: true "
                    "(or ask the operator's administrator for allowWritableData)"
                )
        image = job.spec.aggregator.image
        if image is not None and not self.image_allowed(image):
            allowed = ", ".join([f"{self.own_repository}:<tag>", *self.images])
            problems.append(f"spec.aggregator.image {image} is not allowed: use one of {allowed}")
        return problems

    def _how(self) -> str:
        """How a namespace becomes open, for the message."""
        ways = ["use the job's own namespace"]
        if self.silo_namespaces:
            ways.append(f"one matching the operator's siloNamespaces ({', '.join(self.silo_namespaces)})")
        if self.namespace_label is not None:
            key, value = self.namespace_label
            ways.append(f"one labelled {key}={value}" if value is not None else f"one labelled {key}")
        return ", or ".join(ways)


def _admitted(conditions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == ADMITTED), None)


def never_admitted(status: Mapping[str, Any] | None) -> bool:
    """Whether the job was refused before it had any child (no aggregator to ask)."""
    old = _admitted((status or {}).get("conditions") or [])
    return old is not None and old.get("status") == "False" and old.get("reason") == REFUSED


def admission_patch(
    problems: Sequence[str], previous: Mapping[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields (condition `Admitted`, and the phase of a job refused from the start) and Events.

    Refused from the start: phase Failed with the reasons, Warning `Refused`. Refused after an
    edit: the phase is left to the aggregator (the job runs on as last admitted), Warning
    `ChangeRefused`. Admitted again: Normal `Admitted`, and a job refused from the start is Pending.
    """
    conditions = list(previous.get("conditions") or [])
    old = _admitted(conditions)
    if problems:
        message = "; ".join(problems)
        had_children = any(c.get("type") == "ChildrenReady" for c in conditions)
        before = old is not None and (old.get("status") == "True" or old.get("reason") == CHANGE_REFUSED)
        reason = CHANGE_REFUSED if before or (old is None and had_children) else REFUSED
        fields: dict[str, Any] = {
            "conditions": [condition(conditions, ADMITTED, False, reason, message, generation, now)],
        }
        if reason == REFUSED:
            fields.update(phase="Failed", message=f"refused by the operator's tenancy policy: {message}")
            return fields, [Event("Warning", REFUSED, f"no children created: {message}")]
        detail = f"generation {generation} refused, the job runs on as last admitted: {message}"
        return fields, [Event("Warning", CHANGE_REFUSED, detail)]
    message = "silo namespaces, data volumes and the aggregator image are allowed"
    fields = {"conditions": [condition(conditions, ADMITTED, True, "Allowed", message, generation, now)]}
    events: list[Event] = []
    if old is not None and old.get("status") == "False":
        events.append(Event("Normal", ADMITTED, f"generation {generation} admitted: {message}"))
        if old.get("reason") == REFUSED:
            fields.update(phase="Pending", message="")
    return fields, events
