"""`make bench`: every benchmark, one after the other, each writing bench/results/*.json."""

from __future__ import annotations

import logging

from bench import (
    broker,
    custody,
    detect,
    engine,
    intake,
    jetstream,
    latency,
    pipeline,
    simulator,
    sketches,
)


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    engine.main()
    sketches.main()
    pipeline.main()
    intake.main()
    latency.main()
    custody.main()
    broker.main()
    jetstream.main()
    simulator.main()
    detect.main([])


if __name__ == "__main__":
    main()
