//! Test-only reference planners: the balancing policies (band, idc, sandpiper with hotspot and the load-move model)
//! and the evacuation planner as they were before the scale work of issue 11, kept verbatim (without their unit
//! tests) so that [`equivalence`] can check that the indexed planners decide exactly as the straightforward ones
//! did. They are slow on purpose (linear look-ups in loops, a projected copy of the scenario per candidate
//! destination): never optimise them, never use them outside tests.

#![allow(dead_code)]

pub(crate) use super::scenario;
pub(crate) use super::{fig, Decision, Policy, RoundPlan};

pub mod band;
pub mod evacuate;
pub mod hotspot;
pub mod idc;
pub mod model;
pub mod sandpiper;

mod equivalence;

/// [`crate::plan::plan_round`] on the reference policies.
pub fn plan_round(policy: Policy, scenario: &scenario::Scenario) -> RoundPlan {
    match policy {
        Policy::Band => band::plan(scenario),
        Policy::Idc => idc::plan(scenario),
        Policy::Sandpiper => sandpiper::plan(scenario),
    }
}
