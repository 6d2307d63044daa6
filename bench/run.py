"""`make bench`: every benchmark, one after the other, each writing bench/results/*.json."""

from __future__ import annotations

import logging

from bench import pipeline


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    pipeline.main()


if __name__ == "__main__":
    main()
