"""What a diagnosis found, as typed results: rates, the tick per CPU, crash loops, WFx exits, findings."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from orchestrator.diagnose.tracing import TraceSummary

SEVERITY_ORDER = {"high": 0, "medium": 1, "info": 2}


class IpiRate(BaseModel):
    row: str  # RES/CAL/TLB/IWI (x86), IPI0..IPIn (arm64)
    description: str
    per_cpu: dict[int, float]  # per second over the window
    counts: dict[int, int]  # the delta over the window


class NohzCpu(BaseModel):
    cpu: int
    tick_stopped: bool | None  # /proc/timer_list at the end of the window
    nr_running: int | None
    current: str | None  # "comm pid" of the task on the CPU, None when idle
    runnable: list[str]
    active_timers: list[str]
    timers_fired: dict[str, int]  # during the window (trace)
    tick_dependencies: dict[str, int]  # tick_stop success=0 dependency=..., during the window
    tick_stops: int  # tick_stop success=1 during the window
    timer_irq_per_s: float | None  # local timer interrupts (x86 LOC, arm64 arch_timer) per second
    busy: bool
    tick_ok: bool


class CrashLoop(BaseModel):
    unit: str
    restarts_total: int
    restarts_in_window: int
    coredumps_last_hour: int
    last_signal: str | None
    exe: str | None
    state: str
    unit_file_state: str


class VmWfx(BaseModel):
    vm: str
    pid: int
    name: str
    wfi_per_s: float
    wfe_per_s: float
    exits_per_s: float | None


class Finding(BaseModel):
    target: str
    kind: str  # crash_loop, kick_all_cpus, page_table_teardown, nohz_tick, no_nohz_full, timer_migration, ...
    severity: str  # "high", "medium", "info"
    title: str
    evidence: list[str]
    change: str | None = None  # the profile change that addresses it ("guest.service.mirobot_teleoperate.service")
    profile: str | None = None  # the profile YAML that asks for it
    advice: str | None = None  # where no tuning removes it: why, and what the application can do


class IrqbalanceState(BaseModel):
    active: bool
    banned: str | None  # IRQBALANCE_BANNED_CPULIST / _CPUS as configured (None: no ban)


class TargetDiagnosis(BaseModel):
    target: str  # "host" or "guest"
    label: str
    kernel: str
    arch: str
    duration_s: float
    cpus: list[int]
    rt_cpus: list[int]
    nohz_full: list[int]
    isolated: list[int]
    timer_migration: int | None
    cmdline: str
    tracing: str  # what the who-sends data rests on
    ipis: list[IpiRate]
    timer_irq_per_s: dict[int, float]
    trace: TraceSummary | None
    nohz: list[NohzCpu]
    crash_loops: list[CrashLoop]
    wfx: list[VmWfx]
    findings: list[Finding]
    #: issue #20's probes (absent in older windows): movable kernel threads allowed on RT CPUs (names), whether
    #: irqbalance runs and with which ban, RT throttling events since boot, THP mode and compaction in the window
    kthreads_on_rt: list[str] = Field(default_factory=list)
    irqbalance: IrqbalanceState | None = None
    rt_throttled: int | None = None
    rt_runtime_us: int | None = None
    thp: str | None = None
    vmstat_delta: dict[str, int] = Field(default_factory=dict)
    tracing_state_before: dict[str, str]
    tracing_state_after: dict[str, str]
    tracing_state_notes: list[str]


class Diagnosis(BaseModel):
    unit: str
    started: datetime
    duration_s: float
    targets: list[TargetDiagnosis]

    @property
    def findings(self) -> list[Finding]:
        """All targets' findings, the most severe first."""
        return sorted((f for t in self.targets for f in t.findings), key=lambda f: SEVERITY_ORDER[f.severity])
