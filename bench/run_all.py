"""`make bench`: every benchmark that fits a CI-sized machine, one after another (scale runs by hand)."""

import subprocess
import sys

BENCHES = ("overhead", "hf_trainer", "memory", "gpu")


def main() -> int:
    failed = [name for name in BENCHES if subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0]
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
