"""The shared vocabulary of fieldline.

Everything the edge agent, the cloud workers and the simulators must agree on lives here: the
clock abstraction, the sensor catalog, the device registry (reference data), device payload codecs,
reject reasons and the versioned edge->cloud wire contract. This package imports nothing else of
fieldline's, so both sides of the wire can depend on it.
"""
