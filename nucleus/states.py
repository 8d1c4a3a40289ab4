"""Component lifecycle states and the transitions between them.

The states are Greengrass's, so that people who know ``greengrass-cli component list``
read ``nucleus list`` without a glossary. The transition table is the contract between the
pure machine (:mod:`nucleus.lifecycle`), which must only produce these edges, and everything
that reacts to state changes (orchestrator, CLI, deployment settle checks). It imports
nothing of ours so that every layer may depend on it.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    NEW = "NEW"
    INSTALLED = "INSTALLED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FINISHED = "FINISHED"
    ERRORED = "ERRORED"
    BROKEN = "BROKEN"


# Why some edges exist:
#  * FINISHED/BROKEN -> INSTALLED/ERRORED: a (forced) restart of a component that was never
#    installed runs the install step first.
#  * STOPPING -> STARTING: ``restart`` goes straight from the stop back into a start, without
#    showing a FINISHED that would make a deployment's settle check think it is done.
#  * ERRORED -> ERRORED: a retried install that fails again reports the new reason.
#  * INSTALLED -> FINISHED: a component with neither startup nor run has nothing to run.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.INSTALLED, State.ERRORED, State.BROKEN, State.STOPPING}),
    State.INSTALLED: frozenset({State.STARTING, State.FINISHED, State.STOPPING}),
    State.STARTING: frozenset(
        {State.RUNNING, State.FINISHED, State.ERRORED, State.BROKEN, State.STOPPING}
    ),
    State.RUNNING: frozenset({State.FINISHED, State.ERRORED, State.BROKEN, State.STOPPING}),
    State.STOPPING: frozenset({State.FINISHED, State.STARTING}),
    State.FINISHED: frozenset(
        {State.STARTING, State.INSTALLED, State.ERRORED, State.BROKEN, State.STOPPING}
    ),
    State.ERRORED: frozenset(
        {State.ERRORED, State.STARTING, State.INSTALLED, State.BROKEN, State.STOPPING}
    ),
    State.BROKEN: frozenset({State.STARTING, State.INSTALLED, State.ERRORED, State.STOPPING}),
}

# States in which the component has (or may have) processes that a stop must end.
ACTIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
# States a stop ends in: nothing of the component runs, and nothing will restart it.
STOPPED = frozenset({State.NEW, State.INSTALLED, State.FINISHED, State.BROKEN})


def can_transition(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]
