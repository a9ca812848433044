"""Seeded fuzzing of `models.load_model` (issue 14): mutated official and own checkpoints either load or
are refused with one `CheckpointError` line naming the file; nothing is written, no global changes,
no case hangs. The long run is `python -m benchmarks.fuzz_checkpoint --cases 20000 --fixture`.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.fuzz_checkpoint import ALWAYS_REFUSED, fuzz

SEED = 20240614


def test_fuzz_load_model_refuses_or_loads(tmp_path: Path) -> None:
    cases = int(os.environ.get("CKPT_FUZZ_CASES", "300"))
    summary = fuzz(cases, SEED, tmp_path, fixture=True, limit_s=60.0, fixture_share=0.02)
    assert summary["n_failures"] == 0, summary["failures"][:5]
    results = summary["results"]
    assert summary["cases"] == cases and set(results) <= {"loaded", "refused"}
    # the mutations reach both outcomes and every family (a fuzzer that only breaks the zip proves little)
    assert results.get("refused", 0) > cases // 2 and results.get("loaded", 0) > cases // 20
    assert set(summary["by_family"]) >= {"bytes", "zip", "yaml", "insert", "entry", "replace", "swap_global",
                                         "int_arg", "opcode"}
    assert set(summary["bases"]) == {"official", "ours", "fixture"}
    dangerous = [k for k in summary["kinds"] if k.rsplit(":", 1)[-1] in ALWAYS_REFUSED]
    assert dangerous and all(summary["kinds"][k].get("loaded", 0) == 0 for k in dangerous)
