//! The `agentd` package is its binaries (`agentd`, `agentctl`, `agent-exec`, and the
//! test suite's `agentd-test-agent`); their code lives in the crates under `crates/`.
//! This empty library only lets the package's tests enable its `test-agent` feature
//! through a dev-dependency on itself.
