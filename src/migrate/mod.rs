//! One migration, from checks to verdict: set-up, pass-by-pass monitoring, the escalation ladder, cancellation
//! and the final check that exactly one copy of the guest runs.

pub mod ladder;
