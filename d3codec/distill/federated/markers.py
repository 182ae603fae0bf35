"""The work folder `<output>.parts/`: each subtask's part file, and the done / failed markers of
the experts that ranks train for a subtask they share (written atomically, waited for by its lead)."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from d3codec.distill.merge import RECORD
from d3codec.errors import ConfigError
from d3codec.format.atomic import write_atomic
from d3codec.format.io import load
from d3codec.format.types import D3File

Log = Callable[[str], None]


class SharedExpertFailed(RuntimeError):
    """Another rank failed training an expert this rank's subtask waits for (its own error says why)."""


def part_path(workdir: str, index: int) -> str:
    """Where subtask `index`'s finished part lives in the work folder."""
    return os.path.join(workdir, f"part-{index:03d}.d3")


def finished_part(path: str, run: str, index: int) -> Optional[D3File]:
    """The part at `path` when it is a complete part of this run's subtask `index`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        d3 = load(path)
    except ConfigError:
        raise
    except Exception:  # damaged or foreign file: redo the subtask
        return None
    record = d3.provenance.get(RECORD)
    if isinstance(record, dict) and record.get("run") == run and record.get("subtask") == index:
        return d3
    return None


def marker(workdir: str, index: int, expert: int) -> str:
    """Prefix of the done / failed marker of expert `expert` of subtask `index` (`.done`, `.failed`)."""
    return f"{part_path(workdir, index)}.expert-{expert:04d}"


def _write_marker(path: str, record: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(record).encode())


def mark_done(workdir: str, index: int, expert: int, record: dict[str, Any]) -> None:
    """Expert `expert` of subtask `index` is in the cache (`record`: who trained it, where)."""
    _write_marker(marker(workdir, index, expert) + ".done", record)


def mark_failed(workdir: str, index: int, expert: int, record: dict[str, Any]) -> None:
    """Training expert `expert` of subtask `index` failed (`record["error"]` says why)."""
    _write_marker(marker(workdir, index, expert) + ".failed", record)


def clear_expert_markers(workdir: str) -> None:
    """Remove the expert markers of earlier invocations (called once per run, before any rank starts)."""
    if not os.path.isdir(workdir):
        return
    for name in os.listdir(workdir):
        if ".expert-" in name:
            try:
                os.unlink(os.path.join(workdir, name))
            except OSError:
                pass


def wait_for_experts(workdir: str, index: int, shared: dict[int, int], say: Log, poll: float = 0.05) -> None:
    """Wait until every expert of subtask `index` that other ranks train (expert -> rank) has its
    done marker; raise when one has a failed marker. A marker whose folder this rank cannot see
    (a cache not shared by the ranks) only means `encode` trains that expert again, to the same values."""
    pending = dict(shared)
    if pending:
        say(f"subtask {index}: waiting for experts {sorted(pending)} from ranks {sorted(set(pending.values()))}")
    while pending:
        for i, r in sorted(pending.items()):
            prefix = marker(workdir, index, i)
            if os.path.isfile(prefix + ".failed"):
                with open(prefix + ".failed") as f:
                    error = json.load(f).get("error", "")
                raise SharedExpertFailed(f"rank {r} failed training expert {i} of subtask {index} ({error}); "
                                         "rerun the same command to resume")
            if os.path.isfile(prefix + ".done"):
                with open(prefix + ".done") as f:
                    record = json.load(f)
                del pending[i]
                where = os.path.join(record.get("folder", ""), f"expert_{i:04d}.safetensors")
                if record.get("folder") and not os.path.isfile(where):
                    say(f"subtask {index}: expert {i} from rank {r} is not in this rank's cache ({where}); "
                        "training it here (give the ranks one shared --cache-dir to avoid this)")
                else:
                    say(f"subtask {index}: expert {i} from rank {r}")
        if pending:
            time.sleep(poll)
