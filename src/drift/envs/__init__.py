"""The environments drift ships, and the runner that loads and calls any environment.

- `try_again`: try-again (the fixed-feedback loop), hint (too high / too low), the DRIFT
  reference's prompt modes (reference-full, reference-simple);
- `code`: write a Python function, judged by its unit tests in a sandbox (`sandbox`);
- `verifiers_env`: an installed `verifiers` environment (`env = "verifiers:NAME"`);
- `runner`: loading (`env = "module:factory"` + `env_args`) and batched, time-limited calls.

The interface itself (`Step`, `EnvConfig`, `Episode`) is `drift.env`'s.
"""
