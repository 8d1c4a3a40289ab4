"""The nucleus exception tree.

Every error the nucleus raises for bad input or a failed operation derives from
:class:`NucleusError` and carries structured fields so that the CLI, the IPC layer and the
logs can say *which* file, field or component is at fault without parsing messages.
The ``code`` attribute is stable: IPC error frames and ``nucleus`` exit messages use it.

::

    NucleusError
    ├── RecipeError              RECIPE_INVALID        file + field path + reason
    ├── VersionError             VERSION_INVALID       a version or requirement that does not parse
    ├── ResolutionError          DEPENDENCY_CONFLICT   the whole requirement chain
    │   ├── DependencyCycleError DEPENDENCY_CYCLE      the members of the cycle
    │   └── UnknownComponentError COMPONENT_NOT_FOUND  no such component/version in the store
    ├── ArtifactError            ARTIFACT_ERROR        fetch / unarchive / permission problems
    │   └── DigestMismatchError  DIGEST_MISMATCH       expected vs actual digest
    ├── ConfigurationError       CONFIG_INVALID        bad JSON pointer, bad merge document
    ├── LifecycleError           LIFECYCLE_ERROR       a step failed or timed out
    ├── DeploymentError          DEPLOYMENT_FAILED     a deployment could not be applied
    └── DaemonNotRunningError    DAEMON_NOT_RUNNING    the CLI found no daemon at the socket

The exception type decides the lifecycle outcome: retryable problems (a crashing process)
lead to ERRORED with backoff, fatal ones (bad recipe, digest mismatch) fail the deployment
before anything running is touched.
"""

from __future__ import annotations

from pathlib import Path


class NucleusError(Exception):
    """Base of every error the nucleus reports to a user."""

    code: str = "NUCLEUS_ERROR"

    def __init__(
        self,
        message: str,
        *,
        component: str | None = None,
        path: str | Path | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.component = component
        self.path = str(path) if path is not None else None
        self.field = field

    def __str__(self) -> str:
        parts: list[str] = []
        if self.path:
            parts.append(self.path)
        if self.field:
            parts.append(self.field)
        prefix = ": ".join(parts)
        if self.component and self.component not in self.message:
            prefix = f"{prefix} [{self.component}]" if prefix else f"[{self.component}]"
        return f"{prefix}: {self.message}" if prefix else self.message

    def to_dict(self) -> dict[str, str | None]:
        """A JSON-able form for IPC error frames and deployment reports."""
        return {
            "code": self.code,
            "message": str(self),
            "component": self.component,
            "path": self.path,
            "field": self.field,
        }


class RecipeError(NucleusError):
    code = "RECIPE_INVALID"


class VersionError(NucleusError):
    code = "VERSION_INVALID"


class ResolutionError(NucleusError):
    code = "DEPENDENCY_CONFLICT"


class DependencyCycleError(ResolutionError):
    code = "DEPENDENCY_CYCLE"


class UnknownComponentError(ResolutionError):
    code = "COMPONENT_NOT_FOUND"


class ArtifactError(NucleusError):
    code = "ARTIFACT_ERROR"


class DigestMismatchError(ArtifactError):
    code = "DIGEST_MISMATCH"


class ConfigurationError(NucleusError):
    code = "CONFIG_INVALID"


class LifecycleError(NucleusError):
    code = "LIFECYCLE_ERROR"


class DeploymentError(NucleusError):
    code = "DEPLOYMENT_FAILED"


class DaemonNotRunningError(NucleusError):
    code = "DAEMON_NOT_RUNNING"
