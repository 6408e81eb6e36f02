"""The devtrust verifier: appraises evidence, keeps the fleet's trust state, certifies devices.

It imports ``devtrust.core``, never the agent or the swtpm harness (tests/test_layers.py).
"""
