"""The gateway agent: intake -> decode/validate -> windows -> results -> uplink.

Only ``devices`` is imported from the rest of fieldline; nothing here knows about InfluxDB or
Grafana, so ``pip install 'fieldline[edge]'`` on a Raspberry Pi stays small.
"""
