"""Per-component ``runWith`` (Greengrass's CreateDeployment field): who a component runs as and
its system resource limits, set by a deployment and kept by later ones.

The stored form is Greengrass's own, ``{"posixUser": "u:g", "systemResourceLimits": {"memory": KB,
"cpus": N}}``, per component in the deployment journal's active set, so a rollback restores it with
the versions and a restart of the daemon finds it. A deployment's ``runWith`` for a component:

* a field left out keeps what an earlier deployment set (as Greengrass: the setting sticks);
* a field given replaces it; ``systemResourceLimits`` replaces as a whole (``{"memory": 1024}``
  sets a memory limit and no CPU limit, even if the device default has one);
* a field given as ``null`` (or ``posixUser: ""``) clears it: the component goes back to
  ``run_with_default`` in nucleus.yaml.

A component with no ``systemResourceLimits`` of its own gets ``run_with_default.system_resource_limits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nucleus.cgroups import Cgroups, Limits
from nucleus.errors import NucleusError
from nucleus.settings import Settings, SystemResourceLimits, check_posix_user
from nucleus.users import ComponentUser, component_user, unreachable

POSIX_USER = "runWith.posixUser"
LIMITS = "runWith.systemResourceLimits"


class ComponentRunWith(BaseModel):
    """One component's ``runWith`` in a deployment (Greengrass field names, unknown ones refused)."""

    model_config = ConfigDict(extra="forbid")

    posixUser: str | None = Field(None, description="user or user:group; null or empty: run_with_default")
    systemResourceLimits: SystemResourceLimits | None = Field(None, description="null: run_with_default's")

    @field_validator("posixUser")
    @classmethod
    def _user_and_group(cls, value: str | None) -> str | None:
        return check_posix_user(value) if value else None


def merged(stored: Mapping[str, Any] | None, update: ComponentRunWith) -> dict[str, Any]:
    """``stored`` after this deployment's ``update``: fields given replace (null clears), others stay."""
    out = dict(stored or {})
    for name in update.model_fields_set:
        value = getattr(update, name)
        if value is None:
            out.pop(name, None)
        elif isinstance(value, BaseModel):
            out[name] = value.model_dump(exclude_none=True)
        else:
            out[name] = value
    return out


def limits_of(stored: Mapping[str, Any] | None, settings: Settings) -> Limits:
    own = (stored or {}).get("systemResourceLimits")
    srl = SystemResourceLimits.model_validate(own) if own is not None else \
        settings.run_with_default.system_resource_limits
    return Limits(memory_kb=srl.memory, cpus=srl.cpus)


def user_of(name: str, stored: Mapping[str, Any] | None, settings: Settings) -> ComponentUser | None:
    """The component's user; NucleusError naming the component and the field it came from."""
    own = (stored or {}).get("posixUser")
    if not own:
        return component_user(settings.run_with_default.posix_user)
    try:
        user = component_user(own, field=POSIX_USER)
    except NucleusError as exc:
        raise NucleusError(exc.message, component=name, field=POSIX_USER) from None
    assert user is not None
    blocked = unreachable(user, settings.paths)
    if blocked is not None:
        device = component_user(settings.run_with_default.posix_user)
        if device is None:
            fix = (f"set run_with_default.posix_user (nucleus.yaml) to a user and group, and make {user.user} a "
                   "member of that group")
        else:  # the root opens to that group already: the advice to set it would send the user in circles
            fix = (f"the root opens to {device.group} (the group of run_with_default.posix_user): make {user.user} "
                   f"a member of it (usermod -aG {device.group} {user.user}) or run it as {user.user}:{device.group}")
        raise NucleusError(f"{user.user} may not pass through {blocked}, so it could not reach its work folder and "
                           f"artifacts; {fix}", component=name, field=POSIX_USER)
    return user


def check(name: str, stored: Mapping[str, Any] | None, settings: Settings, cgroups: Cgroups) -> None:
    """NucleusError naming the component and field if its ``runWith`` cannot be honoured here: an
    unknown user, a daemon that is not root, limits without a writable cgroup file system."""
    user_of(name, stored, settings)
    limits = limits_of(stored, settings)
    problem = cgroups.problem(limits)
    if problem is not None:
        own = (stored or {}).get("systemResourceLimits") is not None
        field = LIMITS if own else "run_with_default.system_resource_limits"
        raise NucleusError(f"system resource limits ({limits.describe()}) cannot be enforced: {problem}",
                           component=name, field=field)
