"""What a worker does with commands from ``control``.

Masks and the fusion mode are worker state, folded from the command log (so a worker
that starts late reaches the current state by reading the log from the start). Model
versions live in the registry: a model command loads the version off the hot path (a
background thread), swaps it in between batches (a new :class:`Bundle` object replaces
the old one in one assignment), records it in the registry, then acknowledges. A
version that fails to load is rejected and the current one keeps serving.

During a Redis outage (see :class:`~streamfuse.redislink.RedisLink`) every command is
still applied and acknowledged: masks and fusion modes need no Redis; a model command
with a version loads it from disk, swaps it in and acks, and its registry record is kept
and written when Redis returns (reconciling with the registry waits until then, so the
stale registry cannot swap it back). Only a rollback without a version needs Redis to pick
its target (the same one for every worker): it waits for Redis, then is applied and acked.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from streamfuse.errors import StreamfuseError
from streamfuse.events import SCOPES, Command, Sample
from streamfuse.models.bundle import LoadedUnit, warm_up
from streamfuse.models.encoders import SensorModel
from streamfuse.redislink import RedisLink

log = logging.getLogger(__name__)
MODEL_ACTIONS = ("rollback_model", "activate_model", "rollback_fusion")


def mask_label(modality: str, scope: str, scope_id: str) -> str:
    """How a mask is reported in acks: ``image`` or ``image@line:line-0``."""
    return modality if scope == "global" else f"{modality}@{scope}:{scope_id}"


@dataclass
class WorkerState:
    """What the commands have set; reported in every Ack."""

    masks: set[tuple[str, str, str]] = field(default_factory=set)  # (modality, scope, scope id)
    fusion_mode: str = "ume"
    seen_commands: set[str] = field(default_factory=set)

    def masked_for(self, modality: str, sample: Sample) -> bool:
        return bool(self.masks) and any(
            (modality, scope, sid) in self.masks
            for scope, sid in (("global", ""), ("line", sample.line_id), ("asset", sample.asset_id)))

    def masked_labels(self) -> tuple[str, ...]:
        return tuple(sorted(mask_label(*m) for m in self.masks))


@dataclass
class PendingSwap:
    unit: str
    version: str
    command: Command | None  # None: reconciling with the registry
    future: Future


class CommandHandler:
    """Applies commands to a worker's state and model units.

    Args:
        worker: the :class:`~streamfuse.inference.worker.InferenceWorker` (its ``bundle``
            is replaced on a swap).
        registry: the model registry; without one, model commands are rejected.
    """

    def __init__(self, worker: Any, registry: Any | None, link: RedisLink | None = None) -> None:
        self.worker = worker
        self.registry = registry
        self.link = link or RedisLink(f"worker {worker.worker_id}")
        self.state = WorkerState(fusion_mode=worker.bundle.fusion_mode)
        self.pending: list[PendingSwap] = []
        self.unrecorded: list[tuple[str, str, Command]] = []  # switches made, registry not yet told
        self.waiting: list[Command] = []  # rollbacks whose target needs Redis, which is down
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ commands

    def apply(self, cmd: Command, catching_up: bool = False) -> tuple[str, str] | None:
        """Apply ``cmd``; returns (status, reason), or None when a model load was started
        (the ack follows from :meth:`finish_swaps`)."""
        st, bundle = self.state, self.worker.bundle
        if cmd.command_id in st.seen_commands:
            return "duplicate", "already applied"
        st.seen_commands.add(cmd.command_id)
        if cmd.action in ("mask_modality", "unmask_modality"):
            if cmd.modality not in bundle.modalities:
                return "rejected", f"unknown modality {cmd.modality!r}; bundle has {list(bundle.modalities)}"
            if cmd.scope not in SCOPES:
                return "rejected", f"unknown scope {cmd.scope!r}; one of {', '.join(SCOPES)}"
            mask = (cmd.modality, cmd.scope, cmd.scope_id if cmd.scope != "global" else "")
            (st.masks.add if cmd.action == "mask_modality" else st.masks.discard)(mask)
            self.worker.metrics.masked.labels(cmd.modality).set(sum(m[0] == cmd.modality for m in st.masks))
            return "applied", ""
        if cmd.action == "set_fusion_mode":
            if cmd.fusion_mode not in bundle.fusion_modes:
                return "rejected", (f"fusion mode {cmd.fusion_mode!r} is not available with fusion "
                                    f"{bundle.versions.get('fusion')}; available: {list(bundle.fusion_modes)}")
            st.fusion_mode = cmd.fusion_mode
            return "applied", ""
        if cmd.action not in MODEL_ACTIONS:
            return "rejected", f"unknown action {cmd.action!r}; one of {', '.join(Command.ACTIONS)}"
        if catching_up:
            # The registry holds the current versions; an old model command must not undo newer changes.
            return "skipped", "model versions at start-up come from the registry"
        if self.registry is None:
            return "rejected", f"{cmd.action} needs the model registry, and this worker has none"
        return self._model_command(cmd)

    def _model_command(self, cmd: Command) -> tuple[str, str] | None:
        bundle = self.worker.bundle
        unit = "fusion" if cmd.action == "rollback_fusion" else cmd.modality
        if unit not in (*bundle.modalities, "fusion"):
            return "rejected", f"unknown unit {unit!r}; units: {[*bundle.modalities, 'fusion']}"
        version = cmd.version
        if not version:
            try:
                reached, version = self.link.reach(lambda: self._rollback_target(cmd, unit), what="reading the rollback target")
            except StreamfuseError as exc:
                return "rejected", str(exc)
            if not reached:
                self.waiting.append(cmd)  # applied and acked once Redis returns
                return None
        if bundle.versions.get(unit) == version:
            self._record(unit, version, cmd)
            return "applied", f"{unit} already at {version}"
        self._load(unit, version, cmd)
        return None

    def _rollback_target(self, cmd: Command, unit: str) -> str:
        """The version a rollback without an explicit version goes to, decided once per
        command for all workers (the first to ask claims it in Redis)."""
        from streamfuse.models.registry import RegistryError

        key = f"{self.registry.prefix}command:{cmd.command_id}"
        claimed = self.registry.redis.get(key)
        if claimed is not None:
            return claimed.decode()
        history = self.registry.history(unit)
        previous = history[-1].get("previous") if history else None
        if not previous:
            raise RegistryError(f"{unit} has no previous version to roll back to", unit)
        self.registry.redis.set(key, previous, nx=True, ex=7 * 24 * 3600)
        return self.registry.redis.get(key).decode()

    # ------------------------------------------------------------------ model swaps

    def _load(self, unit: str, version: str, cmd: Command | None) -> None:
        future = self._pool.submit(self._load_unit, unit, version, self.worker.bundle.device)
        self.pending.append(PendingSwap(unit, version, cmd, future))

    def _load_unit(self, unit: str, version: str, device) -> LoadedUnit:
        """On the loader thread: the unit's weights, and a model's served (traced) form."""
        loaded = self.registry.load_unit(unit, version, device)
        if isinstance(loaded.module, SensorModel):
            warm_up(loaded.module)
        return loaded

    def retry_waiting(self) -> list[tuple[Command, str, str]]:
        """Commands that waited for Redis, tried again; returns the acks of those decided."""
        acks: list[tuple[Command, str, str]] = []
        if not self.waiting or not self.flush_records():  # decide on the registry as this worker left it
            return acks
        while self.waiting and self.link.ready():
            cmd = self.waiting.pop(0)
            result = self._model_command(cmd)
            if result is not None:
                acks.append((cmd, *result))
            elif self.waiting and self.waiting[-1] is cmd:  # Redis still down: keep the order
                self.waiting.insert(0, self.waiting.pop())
                break
        return acks

    def reconcile(self) -> None:
        """Follow the registry: load any active version this worker does not serve yet
        (after the switches it made during a Redis outage are recorded there)."""
        if self.registry is None or not self.flush_records():
            return
        reached, active = self.link.reach(self.registry.active, what="reading the active versions")
        if not reached:
            return
        busy = {p.unit for p in self.pending}
        for unit, version in active.items():
            if unit not in busy and unit in self.worker.bundle.units \
                    and self.worker.bundle.versions.get(unit) != version:
                self._load(unit, version, None)

    def finish_swaps(self) -> list[tuple[Command, str, str]]:
        """Swap in every finished load; returns (command, status, reason) to acknowledge."""
        acks = []
        for p in [p for p in self.pending if p.future.done()]:
            self.pending.remove(p)
            try:
                loaded = p.future.result()
                self.worker.bundle = self.worker.bundle.with_unit(p.unit, loaded)
            except StreamfuseError as exc:
                log.warning("%s %s not loaded, keeping %s: %s", p.unit, p.version,
                            self.worker.bundle.versions.get(p.unit), exc)
                if p.command is not None:
                    acks.append((p.command, "rejected", f"{p.unit} {p.version} does not load: {exc}"))
                continue
            if self.state.fusion_mode not in self.worker.bundle.fusion_modes:
                self.state.fusion_mode = self.worker.bundle.fusion_mode
            self.worker.metrics.versions.info(dict(self.worker.bundle.versions))
            log.warning("now serving %s %s", p.unit, p.version)
            if p.command is not None:
                self._record(p.unit, p.version, p.command)
                acks.append((p.command, "applied", f"{p.unit} now {p.version}"))
        return acks

    def _record(self, unit: str, version: str, cmd: Command) -> None:
        self.unrecorded.append((unit, version, cmd))
        self.flush_records()

    def flush_records(self) -> bool:
        """Write the switches made to the registry, oldest first; False while some wait for Redis."""
        while self.unrecorded:
            unit, version, cmd = self.unrecorded[0]
            # Idempotent: the first worker switches the registry, the others find it done.
            reason = f"{cmd.action} {cmd.command_id}: {cmd.reason}"
            try:
                reached, _ = self.link.reach(lambda u=unit, v=version, r=reason: self.registry.activate(
                    u, v, reason=r, actor=self.worker.worker_id), what="recording a version switch")
            except StreamfuseError as exc:
                log.warning("registry not switched to %s %s for command %s: %s", unit, version, cmd.command_id, exc)
                reached = True
            if not reached:
                return False
            self.unrecorded.pop(0)
        return True
