"""Several workers opening one fresh PostgreSQL search at the same moment, as a SLURM array's
nodes do: Optuna creates its tables on first use, and two doing so at once collide
(`duplicate key value violates unique constraint "pg_type_typname_nsp_index"`, the failure of
CI's two-command test). The search takes an advisory lock around it.

    python benchmarks/pg_first_open.py raw|search PROCESSES

`raw` opens Optuna's RDBStorage as it is; `search` opens it as `resnet-study search` does. Each
of 3 rounds starts a throwaway server (tests/helpers.postgres_server) and PROCESSES processes
that open it at one agreed moment; it prints each failure's last line and the count.
"""

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import postgres_server  # noqa: E402

OPEN = {
    "raw": "import optuna; optuna.storages.RDBStorage(url)",
    "search": "from pathlib import Path; from resnet_study.search.storage import open_storage; "
              "open_storage(url, Path('.'), 'x')",
}


def main(mode: str, processes: int) -> None:
    wait = "import sys, time; url = sys.argv[1]; time.sleep(float(sys.argv[2]) - time.time())"
    code = f"{wait}; {OPEN[mode]}"
    failed = 0
    for _ in range(3):
        with postgres_server() as url:
            at = time.time() + 6  # after every process has imported what it needs
            procs = [subprocess.Popen([sys.executable, "-c", code, url, str(at)],
                                      stderr=subprocess.PIPE) for _ in range(processes)]
            for p in procs:
                _, err = p.communicate()
                if p.returncode:
                    failed += 1
                    print(err.decode().strip().splitlines()[-1][:200])
    print(f"{mode}: {failed} of {3 * processes} processes failed")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
