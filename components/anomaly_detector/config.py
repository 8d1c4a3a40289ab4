"""The detector's configuration (recipe ``DefaultConfiguration``, merged by deployments)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.anomaly.errors import SignatureError
from components.anomaly.signing import parse_public_key
from components.configuration import parse_config

COMPONENT = "com.nucleus.AnomalyDetector"


class DetectorConfig(BaseModel):
    """Keys are the recipe's (camelCase, Greengrass style; snake_case accepted). An unknown key is an
    error (:func:`load_config`), so a misspelt one cannot silently leave its default in place."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    model_component: str = Field("com.nucleus.TurbineModel", alias="modelComponent")
    trusted_keys: list[str] = Field(default_factory=list, alias="trustedKeys")
    sensor_topic: str = Field("sensors/+/raw", alias="sensorTopic")
    anomaly_topic_prefix: str = Field("anomaly", alias="anomalyTopicPrefix")
    retraining_topic_prefix: str = Field("retraining", alias="retrainingTopicPrefix")
    heartbeat_topic: str = Field("heartbeat/anomaly_detector", alias="heartbeatTopic")
    heartbeat_interval_s: float = Field(0.5, gt=0, alias="heartbeatIntervalS")
    model_poll_interval_s: float = Field(5.0, gt=0, alias="modelPollIntervalS")
    # 8: fastest per window when behind (benchmarks/pipeline.py); larger batches spill the cache.
    max_batch: int = Field(8, ge=1, le=4096, alias="maxBatch")
    max_pending_windows: int = Field(4096, ge=1, alias="maxPendingWindows")
    subscription_queue: int = Field(4096, ge=16, alias="subscriptionQueue")
    intra_op_threads: int = Field(1, ge=1, le=64, alias="intraOpThreads")
    top_contributors: int = Field(3, ge=1, le=32, alias="topContributors")
    capture_low_confidence_below: float = Field(0.2, ge=0, le=1, alias="captureLowConfidenceBelow")
    capture_normal_every: int = Field(600, ge=0, alias="captureNormalEvery")
    capture_max_per_minute: int = Field(60, ge=0, alias="captureMaxPerMinute")
    capture_include_window: bool = Field(False, alias="captureIncludeWindow")
    # After a model is loaded: trim the heap and page out library code only loading used (memory.py).
    release_memory_after_load: bool = Field(True, alias="releaseMemoryAfterLoad")
    # Every this many seconds (0 = never): return free heap to the kernel (malloc_trim only, no page-out, so
    # the scoring path never faults library code back in). A backlog leaves several MB of freed heap behind.
    trim_memory_every_s: float = Field(30.0, ge=0, alias="trimMemoryEveryS")
    # Alarm policy (components/anomaly/alarm.py): None = as the model card says (older cards: the plain
    # threshold, no hold-off). Overrides apply to every model this detector loads.
    alarm_mode: Literal["threshold", "likelihood"] | None = Field(None, alias="alarmMode")
    alarm_holdoff_windows: int | None = Field(None, ge=0, alias="alarmHoldoffWindows")
    alarm_tail_probability: float | None = Field(None, gt=0, lt=1, alias="alarmTailProbability")
    # Learning knn models: where each asset's run-time memory is kept across restarts (relative to the
    # component's work directory) and how often it is written (0 = only when the detector stops).
    memory_dir: str = Field("knn-memory", alias="memoryDir")
    memory_save_every_s: float = Field(60.0, ge=0, alias="memorySaveEveryS")

    @field_validator("trusted_keys")
    @classmethod
    def _keys_parse(cls, keys: list[str]) -> list[str]:
        """A key that is not one (a truncated paste, a private key, an RSA key) was taken, logged once at
        start and left out: the deployment succeeded and every model it signed was then 'untrusted'."""
        for i, text in enumerate(keys):
            try:
                parse_public_key(text)
            except SignatureError as exc:
                raise ValueError(f"[{i}]: {exc.message}") from None
        return keys


def load_config(raw: Any, component: str = COMPONENT) -> DetectorConfig:
    """The shared rule (components/configuration.py): ``accessControl`` is the nucleus's, any other
    unknown key raises ConfigError naming the component and the key."""
    return parse_config(DetectorConfig, raw, component)


# Keys read once, when the detector starts (its subscriptions, its memory files, its periodic tasks).
# The recipe's Setenv interpolates each of them, so a deployment that changes one changes the resolved
# lifecycle and the nucleus restarts the detector; every other key applies to the running detector.
RESTART_KEYS = ("model_component", "sensor_topic", "subscription_queue", "max_pending_windows", "memory_dir",
                "memory_save_every_s", "trim_memory_every_s")
