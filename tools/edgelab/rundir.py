"""The run dir: what the lab created, written as it goes, so `down` after a crash
midway still finds everything."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelab.processes import LabProcess

RUN_DIR = Path("/run/edgeproxy-lab")
RECORD = RUN_DIR / "lab.json"
BPF_ROOT = Path("/sys/fs/bpf/edgeproxy")


def node_dir(node: str) -> Path:
    return RUN_DIR / node


def machine_dir() -> Path:
    return RUN_DIR / "machines"


@dataclass
class LabRecord:
    state_path: str
    phase: str = "building"  # building -> up; anything but "up" means a partial lab
    delay_method: str = ""
    namespaces: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    processes: list[LabProcess] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "state_path": self.state_path,
            "phase": self.phase,
            "delay_method": self.delay_method,
            "namespaces": self.namespaces,
            "nodes": self.nodes,
            "processes": [p.to_json() for p in self.processes],
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabRecord:
        return cls(
            state_path=str(data["state_path"]),
            phase=str(data.get("phase", "building")),
            delay_method=str(data.get("delay_method", "")),
            namespaces=[str(n) for n in data.get("namespaces", [])],
            nodes=[str(n) for n in data.get("nodes", [])],
            processes=[LabProcess.from_json(p) for p in data.get("processes", [])],
            notes=[str(n) for n in data.get("notes", [])],
        )

    def save(self) -> None:
        """Atomic replace, so a crash never leaves half a file."""
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        tmp = RECORD.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, RECORD)

    def add_namespace(self, namespace: str) -> None:
        self.namespaces.append(namespace)
        self.save()

    def add_process(self, process: LabProcess) -> None:
        self.processes.append(process)
        self.save()


def load_record() -> LabRecord | None:
    """The record, or None when there is none or it cannot be read (down still
    cleans by the topology's exact names then)."""
    try:
        return LabRecord.from_json(json.loads(RECORD.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
