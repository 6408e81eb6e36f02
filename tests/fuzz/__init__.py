"""Fuzzing of every parser of device and operator bytes (issue 12, item 5).

- ``targets``: one harness per parser, ``check_<name>(data: bytes)``, which lets only the
  parser's domain errors through; ``TARGETS`` names them.
- ``seeds``: valid inputs for each, from the conformance corpus.
- ``mutate``: the mutations the suite applies to the seeds (tests/test_fuzz_parsers.py,
  hypothesis, a bounded number of inputs).
- ``python -m tests.fuzz NAME|all --runs N`` (``make fuzz``): the long run, coverage-guided
  (atheris, libFuzzer), seeded with ``seeds``; it reports the inputs run and exits non-zero
  on a crash, with the input saved.
"""
