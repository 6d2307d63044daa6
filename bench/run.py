"""`make bench`: every benchmark, one after the other, each writing bench/results/*.json."""

from __future__ import annotations

import logging

from bench import (
    acks,
    arm64,
    broker,
    custody,
    detect,
    engine,
    intake,
    jetstream,
    latency,
    pipeline,
    rules,
    simulator,
    sketches,
    uplink,
)


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    engine.main()
    sketches.main()
    pipeline.main()
    intake.main()
    uplink.main()
    latency.main()
    custody.main()
    rules.main()
    acks.main()
    broker.main()
    jetstream.main()
    simulator.main()
    arm64.main()  # as root: the emulated Pi root of make pi-check (built when missing)
    detect.main([])


if __name__ == "__main__":
    main()
