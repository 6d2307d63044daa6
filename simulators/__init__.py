"""Device fleets for demos, tests and benchmarks: realistic signals, injected faults with ground
truth, published to real MQTT brokers. Imports ``devices`` only."""
