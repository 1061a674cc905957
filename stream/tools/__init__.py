"""Tools around the monitor: the people-facing commands (replay, watch, demo, bench, soak), the
local dev stack (a Tansu broker and a redis-server as plain processes) and the measurements.

Tools import the serving side (stream.core, stream.worker, stream.kafka, the model package);
nothing there imports a tool (tests/test_layout.py).
"""
