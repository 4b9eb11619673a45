"""One Optuna study per problem class and GPU model: its plan, its sampler, the workers' loop, the winner.

Plan. A study's budget counts measurements (variants evaluated). The worker that creates the study enqueues
one ticket per slot of the budget: the seed variants first (knobs fixed), then every other legal variant for
an exhaustive sweep, or empty tickets that the sampler fills for a model-based search. A worker pops a ticket
(Optuna's queue gives each waiting trial to exactly one worker, across processes and hosts), turns its knobs
into a variant and measures it. A proposal that is not new (measured already, or being measured by another
worker) is told as a copy or a failure without being measured, and a sampler-filled slot is enqueued again,
so that the budget counts real measurements. When the queue is empty, `ask` returns a trial that is not a
ticket: the lowest-numbered such trial waits for the running tickets, re-times the best few interleaved and
records the study's winner; the other workers adopt that winner, so every worker reports the same one.

Liveness. A worker stamps each trial it holds with a lease (host, pid, heartbeat). A running trial whose
process is gone (same host) or whose heartbeat is older than STALE_S (another host) is failed and its
ticket enqueued again, so a killed run resumes where it stopped; Ctrl-C does the same on the way out.
Trials that are not measurements (final choices, abandoned tickets) end as FAIL, which samplers ignore.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from .evaluate import Evaluator, Measurement
from .registry import ProblemClass
from .search import KnobSampler, Plan, Space, default_of, is_measured, make_plan, simplicity
from .variant import Variant

PENALTY_MS = 1e3  # the value of a failed measurement: finite, so every sampler ranks it last
TOP_RETIMED = 3
HEARTBEAT_S = 10.0
STALE_S = 120.0
POLL_S = 0.5
PLAN_WAIT_S = 30.0

_HOST = socket.gethostname()
_LIVE_TOKENS: set[str] = set()  # workers of this process still running


def _role(trial) -> str | None:
    return trial.user_attrs.get("role")


# --- storage --------------------------------------------------------------------------------------------------

def open_storage(url: str | None, gpu_slug: str):
    """An Optuna storage: `url` with '://' (postgresql://..., sqlite:///...) is an RDB; any other `url` is the
    path of a journal file; None is the journal file of this GPU model in fwagen's cache folder."""
    from pathlib import Path

    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    from .compiler import cache_root

    if url and "://" in url:
        from sqlalchemy.exc import SQLAlchemyError

        for attempt in range(5):
            try:
                return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except SQLAlchemyError:
                # Workers starting together on an empty database race to create Optuna's tables; the loser
                # finds them made a moment later.
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
    path = Path(url) if url else cache_root() / "tune" / f"{gpu_slug}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_name(space: Space, gpu_slug: str) -> str:
    return f"{space.pclass.key()}@{gpu_slug}#{space.digest()}"


# --- results --------------------------------------------------------------------------------------------------

@dataclass
class ClassResult:
    pclass: ProblemClass
    study: str
    sampler: str
    budget: int
    trials: int  # variants measured in the study
    winner: Variant | None
    winner_m: Measurement | None  # re-timed
    default: Variant | None
    default_m: Measurement | None  # re-timed beside the winner where it measured ok
    seconds: float
    partial: bool = False  # chosen on a time budget before the study's trial budget was spent
    history: list = field(default_factory=list)  # (trial number, Measurement) of every measurement, in order

    @property
    def speedup(self) -> float | None:
        if self.winner_m is None or self.default_m is None or not self.default_m.ok:
            return None
        return self.default_m.median_ms / self.winner_m.median_ms

    def entry(self, tuned_with: dict):
        from .registry import Entry

        default_ms = self.default_m.median_ms if self.default_m is not None and self.default_m.ok else None
        return Entry(self.pclass, self.winner, self.winner_m.median_ms, self.winner_m.spread,
                     None if self.default is None else self.default.key(), default_ms, self.trials, self.seconds,
                     self.sampler, self.study, self.partial, tuned_with)


def _duration(trial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


# --- the worker -------------------------------------------------------------------------------------------------

class Worker:
    """One process's share of a study: take tickets, measure, and end with the study's winner."""

    def __init__(self, study, space: Space, plan: Plan, evaluator: Evaluator, deadline: float | None = None,
                 on_measure=None):
        self.study, self.space, self.plan, self.evaluator = study, space, plan, evaluator
        self.pclass = space.pclass
        self.deadline, self.on_measure = deadline, on_measure
        self.token = uuid.uuid4().hex
        self._held: dict[int, object] = {}  # trial number -> trial
        self._stop = threading.Event()

    # leases and the reaper
    def _lease(self) -> dict:
        return {"host": _HOST, "pid": os.getpid(), "token": self.token, "at": time.time()}

    def _hold(self, trial) -> None:
        trial.set_user_attr("lease", self._lease())
        self._held[trial.number] = trial

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for trial in list(self._held.values()):
                try:
                    trial.set_user_attr("lease", self._lease())
                except Exception:  # noqa: BLE001 - the trial finished meanwhile; the next beat skips it
                    pass

    def _stale(self, trial, now: float) -> bool:
        lease = trial.user_attrs.get("lease")
        if lease is None:
            start = trial.datetime_start.timestamp() if trial.datetime_start else now
            return now - start > STALE_S
        if lease["host"] == _HOST:
            if lease["pid"] == os.getpid():
                return lease["token"] not in _LIVE_TOKENS
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return now - lease["at"] > STALE_S

    def reap(self) -> None:
        """Fail the running trials of dead workers; enqueue their tickets again."""
        now = time.time()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in self._held or not self._stale(trial, now):
                continue
            try:
                self.study.tell(trial.number, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another worker reaped or finished it first
                continue
            if _role(trial) == "ticket":
                self._requeue(trial)

    def _requeue(self, trial) -> None:
        enqueue_ticket(self.study, trial.user_attrs.get("slot"), trial.user_attrs.get("fixed"), trial.number)

    def _finish(self, trial, value=None, state=None, **attrs) -> None:
        """End a trial held by this worker: attributes, then (for a value) whether it counts as feasible."""
        self._held.pop(trial.number, None)
        try:
            for name, attr in attrs.items():
                trial.set_user_attr(name, attr)
            if value is not None:
                trial.set_constraint("failed", 0.0 if attrs.get("m", {}).get("status") == "ok" else 1.0)
            self.study.tell(trial, value, state=state)
        except Exception as error:  # noqa: BLE001 - reaped as stale meanwhile (a long stall): keep going
            optuna.logging.get_logger("fwagen").warning(f"trial {trial.number} ended elsewhere: {error}")

    # the loop
    def run(self) -> ClassResult:
        _LIVE_TOKENS.add(self.token)
        beat = threading.Thread(target=self._beat, daemon=True)
        beat.start()
        try:
            while True:
                done = self.finished()
                if done is not None:
                    return done
                if self.deadline is not None and time.time() > self.deadline:
                    return self.decide(partial=True)
                self.reap()
                trial = self.study.ask()
                if _role(trial) == "ticket":
                    self._ticket(trial)
                    continue
                result = self._endgame(trial)
                if result is not None:
                    return result
        finally:
            self._stop.set()
            _LIVE_TOKENS.discard(self.token)

    def _ticket(self, trial) -> None:
        self._hold(trial)
        try:
            self._measure(trial)
        except BaseException:  # Ctrl-C, a lost device, a replay miss: give the ticket back, then stop
            if trial.number in self._held:
                self._requeue(trial)  # before the trial ends, so that no worker sees an empty queue meanwhile
                self._finish(trial, state=TrialState.FAIL, outcome="interrupted")
            raise

    def _measure(self, trial) -> None:
        params = {name: trial.suggest_int(name, 0, len(values) - 1) for name, values in self.space.choices.items()}
        variant = self.space.variant(params)
        refill = not trial.user_attrs.get("fixed")  # a sampler-filled slot is enqueued again
        if variant is None:
            if refill:
                self._requeue(trial)
            self._finish(trial, PENALTY_MS, outcome="illegal", m={"status": "illegal"})
            return
        key = variant.key()
        # Claim the key, then look: of two workers on one key, at least the later to claim sees the other's
        # claim, so no variant is measured twice (at worst both step back and their slots are enqueued again).
        trial.set_user_attr("key", key)
        trials = self.study.get_trials(deepcopy=False)
        earlier = [t for t in trials if t.user_attrs.get("key") == key and t.number != trial.number
                   and (is_measured(t) or t.state == TrialState.RUNNING)]
        if earlier:
            measured = next((t for t in earlier if is_measured(t)), None)
            exhausted = len({t.user_attrs.get("key") for t in trials if t.state in
                             (TrialState.COMPLETE, TrialState.RUNNING)}) >= len(self.space)
            if refill and not exhausted:
                self._requeue(trial)
            if measured is not None:
                self._finish(trial, measured.value, copy_of=measured.number, m=measured.user_attrs["m"])
            else:
                self._finish(trial, state=TrialState.FAIL, outcome=f"duplicate of running trial {earlier[0].number}")
            return
        measurement = self.evaluator.evaluate(self.pclass, variant)
        self._finish(trial, measurement.median_ms if measurement.ok else PENALTY_MS, measured=True,
                     m=measurement.to_json())
        if self.on_measure is not None:
            self.on_measure(self, measurement)

    def measured(self) -> list:
        """(trial, Measurement) of every measurement of the study, in trial order."""
        return [(t, Measurement.from_json(t.user_attrs["m"])) for t in self.study.get_trials(deepcopy=False)
                if is_measured(t)]

    # the end
    def finished(self) -> ClassResult | None:
        """The study's recorded winner, if it is current: the plan spent and nothing queued or running since."""
        winner = self.study.user_attrs.get("winner")
        plan = self.study.user_attrs.get("plan", {})
        if winner is None or plan.get("budget", 0) < self.plan.budget:
            return None
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) and _role(t) == "ticket"
               or (_role(t) == "ticket" and t.number > winner["final"]) for t in trials):
            return None
        return self._result(winner, partial=False)

    def _endgame(self, trial) -> ClassResult | None:
        self._hold(trial)
        trial.set_user_attr("role", "final")
        try:
            while True:
                done = self.finished()  # another worker decided while this trial was being created
                if done is not None:
                    self._finish(trial, state=TrialState.FAIL, outcome="already decided")
                    return done
                self.reap()
                trials = self.study.get_trials(deepcopy=False)
                lower = [t for t in trials if _role(t) == "final" and t.state == TrialState.RUNNING
                         and t.number < trial.number]
                if lower:
                    self._finish(trial, state=TrialState.FAIL, outcome=f"superseded by trial {lower[0].number}")
                    return self._await(lower[0].number)
                if any(t.state == TrialState.WAITING for t in trials):
                    self._finish(trial, state=TrialState.FAIL, outcome="tickets remained")
                    return None
                if any(t.state == TrialState.RUNNING and _role(t) == "ticket" for t in trials):
                    time.sleep(POLL_S)
                    continue
                result = self.decide(partial=False, final=trial.number)
                self._finish(trial, state=TrialState.FAIL, outcome="decided")
                return result
        except BaseException:
            if trial.number in self._held:
                self._finish(trial, state=TrialState.FAIL, outcome="interrupted")
            raise

    def _await(self, number: int) -> ClassResult | None:
        """Wait for the final trial `number` of another worker: its winner, or None if it died undecided."""
        while True:
            winner = self.study.user_attrs.get("winner")
            if winner is not None and winner["final"] >= number:
                return self._result(winner, partial=False)
            final = self.study.get_trials(deepcopy=False)[number]
            if final.state.is_finished() and final.user_attrs.get("outcome") != "decided":
                return None
            self.reap()
            time.sleep(POLL_S)

    def decide(self, partial: bool, final: int | None = None) -> ClassResult:
        """Re-time the TOP_RETIMED fastest measurements and the default interleaved; among those whose
        difference from the fastest is inside the spread, the default wins, else the simplest."""
        started = time.time()
        measured = {m.key: m for _, m in self.measured()}
        fastest = sorted((m for m in measured.values() if m.ok), key=lambda m: m.median_ms)[:TOP_RETIMED]
        default = default_of(self.pclass, self.evaluator.arch)
        keys = [m.key for m in fastest]
        if default is not None and default.key() in measured and measured[default.key()].ok \
                and default.key() not in keys:
            keys.append(default.key())
        retimed = self.evaluator.retime(self.pclass, [self.space.by_key(k) for k in keys]) if keys else {}
        timed = {k: measured[k].with_timing(m) for k, m in retimed.items() if m.ok}
        winner = None
        if timed:
            best = min(timed.values(), key=lambda m: m.median_ms)
            ties = [m for m in timed.values()
                    if m.median_ms - best.median_ms <= best.median_ms * max(best.spread, m.spread)]
            # A tie with the default keeps the default: a tuned entry must be worth reading back.
            tied_keys = {m.key for m in ties}
            winner = default.key() if default is not None and default.key() in tied_keys else \
                min(ties, key=lambda m: simplicity(self.space.by_key(m.key))).key
        default_m = None if default is None else timed.get(default.key()) or measured.get(default.key())
        record = {"final": -1 if final is None else final, "winner": winner,
                  "winner_m": timed[winner].to_json() if winner else None,
                  "default": None if default is None else default.key(),
                  "default_m": None if default_m is None else default_m.to_json(),
                  "retime_s": time.time() - started}
        if not partial:
            self.study.set_user_attr("winner", record)
        return self._result(record, partial)

    def _result(self, record: dict, partial: bool) -> ClassResult:
        measured = self.measured()
        final = [t for t in self.study.get_trials(deepcopy=False) if t.number == record["final"]]
        seconds = sum(_duration(t) for t, _ in measured) + record.get("retime_s", 0.0) \
            + sum(_duration(t) for t in final)
        default = self.space.by_key(record["default"]) if record.get("default") else None
        default_m = Measurement.from_json(record["default_m"]) if record.get("default_m") else None
        winner = self.space.by_key(record["winner"]) if record.get("winner") else None
        return ClassResult(self.pclass, self.study.study_name, self.plan.kind, self.plan.budget, len(measured),
                           winner, Measurement.from_json(record["winner_m"]) if winner else None,
                           default, default_m, seconds, partial, [(t.number, m) for t, m in measured])


def enqueue_ticket(study, slot: int, fixed: dict | None, replaces: int | None = None) -> None:
    """Queue the ticket of a budget slot: its knobs fixed (a seed, a sweep point) or None for the sampler."""
    attrs = {"role": "ticket", "slot": slot, "fixed": fixed}
    if replaces is not None:
        attrs["replaces"] = replaces
    study.enqueue_trial(fixed or {}, user_attrs=attrs)


def ensure_plan(study, plan: Plan) -> None:
    """Enqueue the tickets of every slot of `plan` that has none alive (waiting, running or measured)."""
    live = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)
            if _role(t) == "ticket" and (t.state in (TrialState.WAITING, TrialState.RUNNING)
                                          or t.state == TrialState.COMPLETE)}
    for slot, fixed in enumerate(plan.tickets):
        if slot not in live:
            enqueue_ticket(study, slot, fixed)
    stored = study.user_attrs.get("plan", {})
    study.set_user_attr("plan", {"kind": plan.kind, "budget": max(plan.budget, stored.get("budget", 0))})


def open_study(storage, name: str, plan: Plan, sampler) -> optuna.Study:
    """Load the study `name`, or create it and enqueue its plan. Exactly one worker creates a study; the others
    wait for its plan (a creator that died before finishing is taken over after PLAN_WAIT_S)."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize")
        study.set_user_attr("created_at", time.time())
        ensure_plan(study, plan)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    arrived = time.time()
    while "plan" not in study.user_attrs:
        # The creator stamps the study and enqueues its plan right after creating it; a creator that died in
        # between is taken over PLAN_WAIT_S after its stamp (or after our arrival, if it left none).
        if time.time() - study.user_attrs.get("created_at", arrived) > PLAN_WAIT_S:
            break
        time.sleep(POLL_S)
    if study.user_attrs.get("plan", {}).get("budget", 0) < plan.budget:
        ensure_plan(study, plan)
    return study


def tune_class(pclass: ProblemClass, evaluator: Evaluator, storage, gpu_slug: str, *, seeds=(),
               trials: int | None = None, sampler: str = "auto", seed: int | None = None,
               deadline: float | None = None, on_measure=None) -> ClassResult | None:
    """Run (or join, or resume) the study of one class and return its winner; None where no variant is legal."""
    space = Space.build(pclass, evaluator.arch, evaluator.covers(pclass))
    if not len(space):
        return None
    default = default_of(pclass, evaluator.arch)
    plan = make_plan(space, [v for v in (*seeds, default) if v is not None], trials, sampler,
                     seed=0 if seed is None else seed)
    order = [space.variant(p) for p in plan.tickets if p is not None]
    evaluator.prefetch(pclass, order + [v for v in space.variants if v not in set(order)])
    study = open_study(storage, study_name(space, gpu_slug), plan,
                       KnobSampler(space, seed, model="random" if plan.kind == "random" else "tpe"))
    return Worker(study, space, plan, evaluator, deadline, on_measure).run()
