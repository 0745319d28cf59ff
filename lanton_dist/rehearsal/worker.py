"""``python -m lanton_dist.rehearsal.worker SPEC.json OUT.json``: rehearse one rank in this
process (:func:`lanton_dist.rehearsal.driver.run_rank`) and write its result as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lanton_dist.rehearsal.driver import RankSpec, run_rank


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    data = json.loads(Path(spec_path).read_text())
    spec = RankSpec(**{**data, "overrides": tuple(data["overrides"])})
    Path(out_path).write_text(json.dumps(run_rank(spec).to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
