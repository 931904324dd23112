"""`romebert loadtest`: drive a running server with Locust and report latency, throughput and exit depth.

No torch here: the load generator runs on any machine with the `loadtest` extra installed.
"""
