"""Registry promotion entry point (logic in pipelines/registry.py).

    python pipelines/promote.py --model deeplab --candidate 7
    python pipelines/promote.py --model deeplab --candidate latest --dry-run

Exit codes: 0 promoted, 3 rejected, 2 usage / unknown model or version, 1 other errors.
"""

import sys
from pathlib import Path

# Run as a script from the repository root (or a Ray job's working dir): make `pipelines` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.registry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
