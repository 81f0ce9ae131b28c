"""`python -m bench [SCENARIO ...] [--quick] [--json PATH]`: see bench.runner."""

from bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
